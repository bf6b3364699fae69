//! CUDA backend (feature `cuda`): K stays in device memory where the engine keeps it and is read
//! in place by the kernels in `cuda/*.cu` (compiled by `build.rs`, embedded in the library).
//!
//! What runs on the device, per layer and KV head:
//! - `keys.cu`: squared key norms with a finiteness check (every policy; KnormPress scores), and
//!   a transposed f32 gather for the scorers that have no device kernel (GVote's sampled-query
//!   nucleus votes): their unit is gathered on the device, copied to the host and scored by the
//!   CPU code, so results match the CPU backend exactly;
//! - `attention.cu`: window attention per query head with causal visibility (SnapKV, PyramidKV,
//!   DynamicKV, Ada-KV, TOVA, H2O, the DBudgetKV ranker) in two passes over K (softmax statistics,
//!   then probabilities), and DBudgetKV's evidence (squared newest-query attention per head);
//! - `scores.cu`: GQA reduction (mean / max) and 1-D pooling along the cells.
//!
//! Loading: nothing touches the driver until `libcuda.so.1` has been opened with `dlopen` (an
//! unchecked cudarc call without a driver panics); driver calls then run under `catch_unwind`, and
//! the C boundary catches panics as well. For each module the loader picks the cubin built for
//! the device's architecture (same major, minor not above the device's: sm_80 also serves 8.6 and
//! 8.9, sm_90 serves 9.0) and falls back to the PTX (`compute_80`, ISA 9.0 with the pinned nvcc
//! 13.0, which a CUDA 13.0 driver (580) and newer accepts).
//!
//! Streams and synchronization: the engine synchronizes its own streams before calling (llama.cpp
//! does before handing out the K view), so K is complete when we read it. We use the device's
//! primary context, as ggml-cuda and the CUDA runtime do, on a stream of our own, and synchronize
//! that stream before returning: nothing of ours is in flight when a call returns, and the engine
//! may overwrite K at once. Calls are serialized by a mutex.

pub use super::{UnitOut, UnitsIn};
use crate::error::{Error, Result};
use crate::score::{DeviceScore as Recipe, GqaReduce, UnitCtx};
use crate::view::{Dtype, Keys};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

/// The PTX and cubins compiled by `build.rs`.
mod kernels {
    /// One compiled `.cu` file.
    pub struct Module {
        /// file stem
        pub name: &'static str,
        /// PTX for `compute_80`
        pub ptx: &'static str,
        /// `(sm, cubin)`, e.g. `(90, ...)` for sm_90
        pub cubins: &'static [(u32, &'static [u8])],
    }
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Largest head size the attention kernels take (`KVC_MAX_D` in `cuda/common.cuh`).
const MAX_HEAD_DIM: usize = 512;

/// Threads per block of the per-cell kernels (a multiple of 32; see the launch comments).
const BLOCK: u32 = 128;
/// Threads per block of the element-wise score kernels.
const BLOCK_EW: u32 = 256;

/// An opened device with the kernels loaded.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    funcs: HashMap<String, CudaFunction>,
    /// what was loaded, per module (`attention: sm_90 cubin`, ...)
    loaded: Vec<String>,
    /// serializes calls on the stream
    lock: Mutex<()>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({})", self.loaded.join(", "))
    }
}

fn unavailable(msg: impl Into<String>) -> Error {
    Error::CudaUnavailable(msg.into())
}

fn drv(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| unavailable(format!("{what}: {e}"))
}

/// Whether the driver library can be opened, without going through cudarc (which panics when it
/// is missing).
fn driver_present() -> bool {
    // SAFETY: dlopen with a valid NUL-terminated name; the handle is deliberately kept open (the
    // driver stays loaded for the life of the process, as cudarc keeps it).
    let h = unsafe { libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    !h.is_null()
}

/// The device `probe` and `gpu` open: `KVC_CUDA_DEVICE`, else 0. Device K names its own device.
fn ordinal() -> usize {
    std::env::var("KVC_CUDA_DEVICE")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

impl Gpu {
    fn open(ordinal: usize) -> Result<Gpu> {
        if kernels::MODULES.is_empty() {
            return Err(unavailable(format!(
                "this library was built without CUDA kernels ({})",
                kernels::NOT_BUILT
            )));
        }
        if !driver_present() {
            return Err(unavailable(
                "libcuda.so.1 cannot be opened (no NVIDIA driver on this machine)",
            ));
        }
        // the device's primary context (cudarc retains it), the one ggml-cuda and the CUDA runtime
        // use: the engine's device addresses are valid in it
        let ctx = CudaContext::new(ordinal).map_err(drv("opening the device"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(drv("reading the compute capability"))?;
        let stream = ctx.new_stream().map_err(drv("creating a stream"))?;
        let mut funcs = HashMap::new();
        let mut loaded = Vec::new();
        for m in kernels::MODULES {
            let cubin = m
                .cubins
                .iter()
                .filter(|(sm, _)| (*sm / 10) as i32 == major && (*sm % 10) as i32 <= minor)
                .max_by_key(|(sm, _)| *sm);
            let mut module = None;
            if let Some((sm, bin)) = cubin {
                if let Ok(md) = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(bin.to_vec())) {
                    loaded.push(format!("{}: sm_{sm} cubin", m.name));
                    module = Some(md);
                }
            }
            let module = match module {
                Some(md) => md,
                None => {
                    let md = ctx
                        .load_module(cudarc::nvrtc::Ptx::from_src(m.ptx))
                        .map_err(|e| {
                            unavailable(format!(
                                "loading {}.ptx on a {major}.{minor} device: {e} (the PTX ISA \
                                 may be newer than this driver accepts; rebuild with the nvcc \
                                 pinned in scripts/cuda-check.sh)",
                                m.name
                            ))
                        })?;
                    loaded.push(format!("{}: PTX (JIT for {major}.{minor})", m.name));
                    md
                }
            };
            for name in entry_points(m.name) {
                let f = module
                    .load_function(&name)
                    .map_err(drv("looking up a kernel"))?;
                funcs.insert(name, f);
            }
        }
        Ok(Gpu {
            ctx,
            stream,
            funcs,
            loaded,
            lock: Mutex::new(()),
        })
    }

    fn f(&self, name: &str) -> Result<&CudaFunction> {
        self.funcs
            .get(name)
            .ok_or_else(|| unavailable(format!("kernel {name} missing from the loaded modules")))
    }

    /// The context (primary context of the device).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The library's own stream.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// What was loaded per module (cubin for which architecture, or PTX).
    pub fn loaded(&self) -> &[String] {
        &self.loaded
    }
}

/// Kernel names of a module.
fn entry_points(module: &str) -> Vec<String> {
    let typed = |names: &[&str]| -> Vec<String> {
        names
            .iter()
            .flat_map(|n| ["f32", "f16", "bf16"].map(|s| format!("{n}_{s}")))
            .collect()
    };
    match module {
        "keys" => typed(&["key_norms", "gather_t"]),
        "attention" => {
            let mut v = typed(&["attn_stats", "attn_accum"]);
            v.push("attn_stats_reduce".into());
            v
        }
        "scores" => vec!["gqa_fold".into(), "pool1d".into()],
        _ => Vec::new(),
    }
}

fn suffix(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 => "f32",
        Dtype::F16 => "f16",
        Dtype::Bf16 => "bf16",
    }
}

/// Opened devices by ordinal.
static GPU: Mutex<Vec<(usize, Arc<Gpu>)>> = Mutex::new(Vec::new());

/// The default device (`KVC_CUDA_DEVICE`, else 0), opening it on first use.
pub fn gpu() -> Result<Arc<Gpu>> {
    gpu_on(ordinal())
}

/// Device `ordinal`, opening it on first use. A failure is not cached (a later call retries).
pub fn gpu_on(ordinal: usize) -> Result<Arc<Gpu>> {
    let mut g = GPU.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, gpu)) = g.iter().find(|(o, _)| *o == ordinal) {
        return Ok(gpu.clone());
    }
    let opened = catch_unwind(|| Gpu::open(ordinal)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Err(unavailable(format!("the CUDA driver panicked: {msg}")))
    });
    match opened {
        Ok(gpu) => {
            let gpu = Arc::new(gpu);
            g.push((ordinal, gpu.clone()));
            Ok(gpu)
        }
        Err(e) => Err(e),
    }
}

/// Fail unless a CUDA driver and device can be opened and the kernels load.
pub fn probe() -> Result<()> {
    gpu().map(|_| ())
}

/// Whether kernels were compiled into this library (nvcc was found at build time).
pub fn kernels_built() -> bool {
    !kernels::MODULES.is_empty()
}

fn grid(n: usize, block: u32, y: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(block).max(1), y as u32, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Refuse K pointers the device cannot read (host memory would fault the kernel and poison the
/// context the engine shares with us).
fn check_device_pointer(gpu: &Gpu, layer: usize, ptr: u64) -> Result<()> {
    use cudarc::driver::sys;
    let mut ordinal: i32 = -1;
    // SAFETY: the driver writes one int for CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL into `ordinal`;
    // run() bound the context to this thread first. An unknown pointer returns an error code.
    let rc = unsafe {
        sys::cuPointerGetAttribute(
            &mut ordinal as *mut i32 as *mut std::ffi::c_void,
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            ptr,
        )
    };
    if rc != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::InvalidShape(format!(
            "layer {layer}: K at {ptr:#x} is not device memory the driver knows ({rc:?}); the \
             CUDA backend reads K in device memory"
        )));
    }
    if ordinal as usize != gpu.ctx.ordinal() {
        return Err(Error::InvalidShape(format!(
            "layer {layer}: K lives on device {ordinal}, the view says device {}",
            gpu.ctx.ordinal()
        )));
    }
    Ok(())
}

/// Scores (and evidence) of every unit `(layer, kv_head)`, in unit order, computed from K in
/// the memory of CUDA device `device`, read in place. The stream is synchronized before
/// returning.
pub fn score_units(inp: &UnitsIn, device: u32) -> Result<Vec<UnitOut>> {
    let gpu = gpu_on(device as usize)?;
    let _serial = gpu.lock.lock().unwrap_or_else(|p| p.into_inner());
    let res = catch_unwind(AssertUnwindSafe(|| run(&gpu, inp)));
    // whatever happened, leave nothing in flight
    let synced = gpu.stream.synchronize().map_err(drv("synchronizing"));
    let out = res.unwrap_or_else(|_| Err(unavailable("a CUDA call panicked")))?;
    synced?;
    Ok(out)
}

fn run(gpu: &Gpu, inp: &UnitsIn) -> Result<Vec<UnitOut>> {
    let shape = inp.shape;
    let keys: &Keys = inp.keys.ok_or(Error::NullArgument(
        "keys (the CUDA backend reads K on the device)",
    ))?;
    let (n_layer, n_kv, d) = (shape.n_layer, shape.n_head_kv, shape.head_dim);
    let group = shape.group();
    let n = inp.pos.len();
    let st = &gpu.stream;
    if n == 0 {
        return Ok(vec![(Vec::new(), None); n_layer * n_kv]);
    }
    if d > MAX_HEAD_DIM {
        return Err(unavailable(format!(
            "head_dim={d} exceeds the CUDA kernels' limit of {MAX_HEAD_DIM}"
        )));
    }
    // the stages state what they need: the scorer its kernel, GQA fold and pooling; the rule
    // whether it reads the newest query's attention
    let recipe = inp.scorer.device();
    let want_evidence = inp.rule.needs_newest_attention();
    gpu.ctx
        .bind_to_thread()
        .map_err(drv("binding the context"))?;
    for (il, l) in keys.layers.iter().enumerate() {
        check_device_pointer(gpu, il, l.base as u64)?;
    }
    let rows_d = st.clone_htod(keys.rows).map_err(drv("upload"))?;

    // pass 0, every policy: finiteness (and KnormPress' norms)
    let mut sq_d = st.alloc_zeros::<f32>(n_kv * n).map_err(drv("alloc"))?;
    let mut bad_d = st
        .clone_htod(&vec![i32::MAX; n_layer * n_kv])
        .map_err(drv("upload"))?;
    let mut norms = vec![
        0.0f32;
        if recipe == Recipe::KeyNorm {
            n_layer * n_kv * n
        } else {
            0
        }
    ];
    for (il, l) in keys.layers.iter().enumerate() {
        let f = gpu.f(&format!("key_norms_{}", suffix(l.dtype)))?;
        let (base, stride) = (l.base as u64, l.row_stride as u64);
        let (n_i, d_i) = (n as i32, d as i32);
        let mut bad_l = bad_d.slice_mut(il * n_kv..(il + 1) * n_kv);
        let mut b = st.launch_builder(f);
        b.arg(&base)
            .arg(&stride)
            .arg(&rows_d)
            .arg(&n_i)
            .arg(&d_i)
            .arg(&mut sq_d)
            .arg(&mut bad_l);
        // SAFETY: argument types match key_norms_<T> in cuda/keys.cu; `base`/`stride` were
        // checked against the shape (Keys::validate) and as device memory, the row indices are
        // the caller's promise as on the CPU path; sq has n_kv*n floats, bad_l n_kv ints.
        unsafe { b.launch(grid(n, BLOCK, n_kv)) }.map_err(drv("key_norms"))?;
        if recipe == Recipe::KeyNorm {
            st.memcpy_dtoh(&sq_d, &mut norms[il * n_kv * n..(il + 1) * n_kv * n])
                .map_err(drv("download"))?;
        }
    }
    let bad = st.clone_dtoh(&bad_d).map_err(drv("download"))?;
    st.synchronize().map_err(drv("synchronizing"))?;
    if let Some(u) = bad.iter().position(|&r| r != i32::MAX) {
        return Err(Error::NonFinite {
            what: "keys",
            layer: u / n_kv,
            row: bad[u] as usize,
        });
    }

    let mut out: Vec<UnitOut> = match recipe {
        Recipe::Host => return host_units(gpu, inp, &rows_d),
        Recipe::KeyNorm => norms
            .chunks_exact(n)
            .map(|sq| (sq.iter().map(|s| -s.sqrt()).collect(), None))
            .collect(),
        Recipe::Position => {
            let p: Vec<f32> = inp.pos.iter().map(|&p| p as f32).collect();
            vec![(p, None); n_layer * n_kv]
        }
        // filled below
        Recipe::Window { .. } | Recipe::Accumulated { .. } => {
            vec![(vec![0.0; n], None); n_layer * n_kv]
        }
    };
    let attention = matches!(recipe, Recipe::Window { .. } | Recipe::Accumulated { .. });
    let n_rows = inp.queries.len();
    if n_rows == 0 || !(attention || want_evidence) {
        // no query yet: zero attention scores and no evidence, as on the CPU
        if let Recipe::Accumulated { .. } = recipe {
            add_carry(&mut out, inp.carry);
        }
        return Ok(out);
    }

    // queries as stored: [row][n_layer * n_head * d]
    let q_stride = n_layer * shape.q_row_len();
    let mut q = Vec::with_capacity(n_rows * q_stride);
    for r in inp.queries {
        q.extend_from_slice(&r.data);
    }
    let n_vis: Vec<i32> = inp
        .queries
        .iter()
        .map(|r| crate::kernels::visible(inp.pos, r.pos) as i32)
        .collect();
    let prot: Vec<u8> = inp.protected.iter().map(|&p| p as u8).collect();
    let q_d = st.clone_htod(&q).map_err(drv("upload"))?;
    let nvis_d = st.clone_htod(&n_vis).map_err(drv("upload"))?;
    let prot_d = st.clone_htod(&prot).map_err(drv("upload"))?;
    let n_chunks = (n as u32).div_ceil(BLOCK) as usize;
    let nq = group * n_rows;
    let mut part_d = st
        .alloc_zeros::<f32>(2 * n_kv * nq * n_chunks)
        .map_err(drv("alloc"))?;
    let mut stat_d = st.alloc_zeros::<f32>(2 * n_kv * nq).map_err(drv("alloc"))?;
    let mut recv_d = st
        .alloc_zeros::<f32>(shape.n_head * n)
        .map_err(drv("alloc"))?;
    let mut last_d = st
        .alloc_zeros::<f32>(shape.n_head * n)
        .map_err(drv("alloc"))?;
    let mut fold_d = st.alloc_zeros::<f32>(n_kv * n).map_err(drv("alloc"))?;
    let mut pool_d = st.alloc_zeros::<f32>(n_kv * n).map_err(drv("alloc"))?;
    let mut host = vec![0.0f32; shape.n_head * n];
    let mut evidence = vec![0.0f32; shape.n_head * n];
    let (n_i, d_i, rows_i, group_i) = (n as i32, d as i32, n_rows as i32, group as i32);
    let (q_stride_i, scale) = (q_stride as i64, shape.kq_scale);
    let (chunks_i, total_i) = (n_chunks as i32, (n_kv * nq) as i32);
    for (il, l) in keys.layers.iter().enumerate() {
        let (base, stride) = (l.base as u64, l.row_stride as u64);
        let q_off = (il * shape.q_row_len()) as i64;
        let sfx = suffix(l.dtype);

        let f = gpu.f(&format!("attn_stats_{sfx}"))?;
        let mut b = st.launch_builder(f);
        b.arg(&base)
            .arg(&stride)
            .arg(&rows_d)
            .arg(&n_i)
            .arg(&d_i)
            .arg(&q_d)
            .arg(&q_stride_i)
            .arg(&q_off)
            .arg(&nvis_d)
            .arg(&rows_i)
            .arg(&group_i)
            .arg(&scale)
            .arg(&mut part_d);
        // SAFETY: matches attn_stats_<T> in cuda/attention.cu; q holds n_rows rows of q_stride
        // floats with q_off + n_head*d <= q_stride; part holds n_kv*nq*n_chunks float2 and the
        // grid's x extent is n_chunks; d <= KVC_MAX_D was checked above.
        unsafe { b.launch(grid(n, BLOCK, n_kv)) }.map_err(drv("attn_stats"))?;

        let f = gpu.f("attn_stats_reduce")?;
        let mut b = st.launch_builder(f);
        b.arg(&part_d).arg(&chunks_i).arg(&total_i).arg(&mut stat_d);
        // SAFETY: matches attn_stats_reduce; part and stat sized as above.
        unsafe { b.launch(grid(n_kv * nq, BLOCK, 1)) }.map_err(drv("attn_stats_reduce"))?;

        let f = gpu.f(&format!("attn_accum_{sfx}"))?;
        let mut b = st.launch_builder(f);
        b.arg(&base)
            .arg(&stride)
            .arg(&rows_d)
            .arg(&n_i)
            .arg(&d_i)
            .arg(&q_d)
            .arg(&q_stride_i)
            .arg(&q_off)
            .arg(&nvis_d)
            .arg(&rows_i)
            .arg(&group_i)
            .arg(&scale)
            .arg(&stat_d)
            .arg(&prot_d)
            .arg(&mut recv_d);
        // the kernel skips the evidence when `last` is null
        let no_last = 0u64;
        if want_evidence {
            b.arg(&mut last_d);
        } else {
            b.arg(&no_last);
        }
        // SAFETY: matches attn_accum_<T>; recv and last hold n_head*n floats (every entry is
        // written: nq > 0 here), prot n bytes; a null `last` is checked in the kernel.
        unsafe { b.launch(grid(n, BLOCK, n_kv)) }.map_err(drv("attn_accum"))?;

        if want_evidence {
            st.memcpy_dtoh(&last_d, &mut evidence)
                .map_err(drv("download"))?;
        }
        let (gqa, kernel, max_pool, rows) = match recipe {
            Recipe::Window {
                kernel,
                max_pool,
                gqa,
            } => (gqa, kernel, max_pool, n_rows.max(1) as f32),
            Recipe::Accumulated { gqa } => (gqa, 1, true, 1.0),
            _ => (GqaReduce::Mean, 1, true, 1.0),
        };
        if attention {
            let max_i = (gqa == GqaReduce::Max) as i32;
            let f = gpu.f("gqa_fold")?;
            let mut b = st.launch_builder(f);
            b.arg(&recv_d)
                .arg(&n_i)
                .arg(&group_i)
                .arg(&rows)
                .arg(&max_i)
                .arg(&mut fold_d);
            // SAFETY: matches gqa_fold in cuda/scores.cu; recv n_head*n, fold n_kv*n floats.
            unsafe { b.launch(grid(n, BLOCK_EW, n_kv)) }.map_err(drv("gqa_fold"))?;
            let src = if kernel > 1 {
                let (k_i, maxp_i) = (kernel as i32, max_pool as i32);
                let f = gpu.f("pool1d")?;
                let mut b = st.launch_builder(f);
                b.arg(&fold_d)
                    .arg(&n_i)
                    .arg(&k_i)
                    .arg(&maxp_i)
                    .arg(&mut pool_d);
                // SAFETY: matches pool1d in cuda/scores.cu; both buffers n_kv*n floats.
                unsafe { b.launch(grid(n, BLOCK_EW, n_kv)) }.map_err(drv("pool1d"))?;
                &pool_d
            } else {
                &fold_d
            };
            st.memcpy_dtoh(src, &mut host[..n_kv * n])
                .map_err(drv("download"))?;
        }
        st.synchronize().map_err(drv("synchronizing"))?;
        for g in 0..n_kv {
            let u = &mut out[il * n_kv + g];
            if attention {
                u.0.copy_from_slice(&host[g * n..(g + 1) * n]);
            }
            if want_evidence {
                u.1 = Some(evidence[g * group * n..(g + 1) * group * n].to_vec());
            }
        }
    }
    if let Recipe::Accumulated { .. } = recipe {
        add_carry(&mut out, inp.carry);
    }
    Ok(out)
}

fn add_carry(out: &mut [UnitOut], carry: Option<&[Vec<f32>]>) {
    if let Some(c) = carry {
        for (u, c) in out.iter_mut().zip(c) {
            u.0.iter_mut().zip(c).for_each(|(a, b)| *a += b);
        }
    }
}

/// Scorers without a device kernel: gather each layer's heads transposed to f32 on the device,
/// copy them to the host and run the CPU scorer and rule on them (the CPU path's arithmetic).
fn host_units(gpu: &Gpu, inp: &UnitsIn, rows_d: &CudaSlice<u32>) -> Result<Vec<UnitOut>> {
    let shape = inp.shape;
    let (n_kv, d, n) = (shape.n_head_kv, shape.head_dim, inp.pos.len());
    let scorer = inp.scorer;
    let keys: &Keys = inp.keys.ok_or(Error::NullArgument(
        "keys (the CUDA backend reads K on the device)",
    ))?;
    let st = &gpu.stream;
    let mut buf_d = st.alloc_zeros::<f32>(n_kv * d * n).map_err(drv("alloc"))?;
    let mut out = Vec::with_capacity(shape.n_layer * n_kv);
    for (il, l) in keys.layers.iter().enumerate() {
        let (base, stride) = (l.base as u64, l.row_stride as u64);
        let (n_i, d_i) = (n as i32, d as i32);
        let f = gpu.f(&format!("gather_t_{}", suffix(l.dtype)))?;
        let mut b = st.launch_builder(f);
        b.arg(&base)
            .arg(&stride)
            .arg(rows_d)
            .arg(&n_i)
            .arg(&d_i)
            .arg(&mut buf_d);
        // SAFETY: matches gather_t_<T> in cuda/keys.cu; buf holds n_kv*d*n floats.
        unsafe { b.launch(grid(n, BLOCK, n_kv)) }.map_err(drv("gather_t"))?;
        let host = st.clone_dtoh(&buf_d).map_err(drv("download"))?;
        st.synchronize().map_err(drv("synchronizing"))?;
        let units = inp.par.map(n_kv, |g| {
            let ctx = UnitCtx {
                shape,
                layer: il,
                kv_head: g,
                keys: &host[g * d * n..(g + 1) * d * n],
                pos: inp.pos,
                queries: inp.queries,
                carry: inp.carry.map(|c| c[il * n_kv + g].as_slice()),
                protected: inp.protected,
            };
            (scorer.score_unit(&ctx), inp.rule.unit_evidence(&ctx))
        });
        out.extend(units);
    }
    Ok(out)
}
