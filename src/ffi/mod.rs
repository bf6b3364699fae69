//! The C ABI (`include/kvcompress.h` is generated from this file by cbindgen).
//!
//! Conventions, kept by every export (the README's "C API" section states them for users):
//! - one opaque handle, `kvc_evictor`, created by `kvc_evictor_init`, released by
//!   `kvc_evictor_free` (NULL is a no-op; freeing twice is undefined);
//! - every fallible call returns a `kvc_status` (`KVC_STATUS_OK` = 0); `kvc_status_str` gives
//!   static text and `kvc_evictor_last_error` the detail of the last failure on that handle;
//! - arguments are checked (NULL, shapes, dtypes, NaN/Inf) before any work; outputs are written
//!   only on success; the caller owns every buffer;
//! - every export runs inside a panic boundary: a panic becomes `KVC_STATUS_PANIC`;
//! - a handle must not be used from two threads at once; separate handles are independent.

#![allow(non_camel_case_types)]

mod boundary;

use crate::backend::{Backend, Parallelism};
use crate::error::{Error, Result};
use crate::evictor::{Evictor, SeqInput};
use crate::policy::{CostLimit, Policy, POLICY_NAMES};
use crate::view::{Dtype, KeyLayer, Keys, Memory, Rope, Shape};
use boundary::{c_str, c_str_array, guard, guard_value, slice, write_msg};
use std::cell::RefCell;
use std::ffi::{c_char, CString};

/// Version of the C ABI; bumped whenever a struct or a signature changes. Callers compare
/// `KVC_ABI_VERSION` (compile time) with `kvc_abi_version()` (run time).
pub const KVC_ABI_VERSION: u32 = 4;

/// Status of a call: `KVC_STATUS_OK` (0) or one of the `KVC_STATUS_*` errors.
pub type kvc_status = u32;

/// Status codes. Numbers are fixed forever; retired numbers are never reused.
pub mod status {
    use super::kvc_status;
    /// success
    pub const KVC_STATUS_OK: kvc_status = 0;
    /// a required pointer was NULL
    pub const KVC_STATUS_NULL_ARGUMENT: kvc_status = 1;
    /// sizes are zero or inconsistent
    pub const KVC_STATUS_INVALID_SHAPE: kvc_status = 2;
    /// dtype code not supported
    pub const KVC_STATUS_UNSUPPORTED_DTYPE: kvc_status = 3;
    /// NaN or Inf in queries or keys
    pub const KVC_STATUS_NON_FINITE_INPUT: kvc_status = 4;
    /// unknown policy name
    pub const KVC_STATUS_UNKNOWN_POLICY: kvc_status = 5;
    /// unknown parameter for the policy
    pub const KVC_STATUS_UNKNOWN_PARAM: kvc_status = 6;
    /// parameter value does not parse or is out of range
    pub const KVC_STATUS_INVALID_PARAM_VALUE: kvc_status = 7;
    /// an output buffer is too small
    pub const KVC_STATUS_BUFFER_TOO_SMALL: kvc_status = 8;
    /// CUDA requested but not available
    pub const KVC_STATUS_CUDA_UNAVAILABLE: kvc_status = 9;
    /// caller built against another ABI version
    pub const KVC_STATUS_ABI_MISMATCH: kvc_status = 10;
    /// a string argument is not UTF-8
    pub const KVC_STATUS_INVALID_UTF8: kvc_status = 11;
    /// the policy's plans would cost more than `kvc_params.max_plan_cost` / `max_token_cost`
    pub const KVC_STATUS_POLICY_TOO_COSTLY: kvc_status = 12;
    /// a panic was caught inside the library (a bug: please report it)
    pub const KVC_STATUS_PANIC: kvc_status = 100;
}
pub use status::*;

impl Error {
    /// The fixed C status code of this error.
    pub fn status(&self) -> kvc_status {
        match self {
            Error::NullArgument(_) => KVC_STATUS_NULL_ARGUMENT,
            Error::InvalidShape(_) => KVC_STATUS_INVALID_SHAPE,
            Error::UnsupportedDtype(_) => KVC_STATUS_UNSUPPORTED_DTYPE,
            Error::NonFinite { .. } => KVC_STATUS_NON_FINITE_INPUT,
            Error::UnknownPolicy(_) => KVC_STATUS_UNKNOWN_POLICY,
            Error::UnknownParam { .. } => KVC_STATUS_UNKNOWN_PARAM,
            Error::InvalidParamValue { .. } => KVC_STATUS_INVALID_PARAM_VALUE,
            Error::BufferTooSmall { .. } => KVC_STATUS_BUFFER_TOO_SMALL,
            Error::CudaUnavailable(_) => KVC_STATUS_CUDA_UNAVAILABLE,
            Error::AbiMismatch { .. } => KVC_STATUS_ABI_MISMATCH,
            Error::InvalidUtf8(_) => KVC_STATUS_INVALID_UTF8,
            Error::TooCostly { .. } => KVC_STATUS_POLICY_TOO_COSTLY,
            Error::Panic(_) => KVC_STATUS_PANIC,
        }
    }

    /// The message handed to C callers: the error's text, with the known names after an
    /// unknown policy.
    pub fn c_message(&self) -> String {
        match self {
            Error::UnknownPolicy(_) => format!("{self} (known: {})", POLICY_NAMES.join(", ")),
            _ => self.to_string(),
        }
    }
}

/// Element type of K: `KVC_DTYPE_F32`, `KVC_DTYPE_F16` or `KVC_DTYPE_BF16`.
pub type kvc_dtype = u32;
/// 32-bit float
pub const KVC_DTYPE_F32: kvc_dtype = 0;
/// IEEE half
pub const KVC_DTYPE_F16: kvc_dtype = 1;
/// bfloat16
pub const KVC_DTYPE_BF16: kvc_dtype = 2;

/// Which processor scores K: `KVC_BACKEND_AUTO` (the default: where each call's K is),
/// `KVC_BACKEND_CPU` (host K only) or `KVC_BACKEND_CUDA` (device K only; the device must open
/// when the evictor is made).
pub type kvc_backend = u32;
/// K in host memory, scored on the CPU
pub const KVC_BACKEND_CPU: kvc_backend = 0;
/// K in CUDA device memory, scored on that device
pub const KVC_BACKEND_CUDA: kvc_backend = 1;
/// per call: host K on the CPU, CUDA K in place on its device (a library built without the
/// `cuda` feature answers `KVC_STATUS_CUDA_UNAVAILABLE` for device K)
pub const KVC_BACKEND_AUTO: kvc_backend = 2;

/// `kvc_layer_view.k_memory`: where `k` points.
pub type kvc_memory = u32;
/// host memory (the zero value)
pub const KVC_MEMORY_HOST: kvc_memory = 0;
/// memory of CUDA device `k_device` (a device address of the runtime's primary context, e.g.
/// a ggml-cuda buffer's `tensor->data`); never dereferenced on the host
pub const KVC_MEMORY_CUDA: kvc_memory = 1;

/// `kvc_seq_view.flags`: the decode call that just ran produced logits for the sequence. With
/// more than one new token in the call this marks the end of a prompt, where the policy runs;
/// with one new token it is a decode step, where the policy runs every `interval` tokens.
pub const KVC_SEQ_FLAG_PROMPT_END: u32 = 1;

/// `kvc_seq_view.flags`: the engine needs room in the cache this sequence lives in (set on every
/// resident sequence, idle ones included, before any is squeezed by `max_cells`). The policy
/// runs if tokens arrived since its last run and gives up what it would anyway: the verdict that
/// `evict=pressure` deferred, or the decoded tokens its budget does not keep. An engine that
/// never sets it gets the behaviour of ABI 1; a library that predates it ignores it.
pub const KVC_SEQ_FLAG_ROOM: u32 = 2;

/// Construction parameters. Get defaults from `kvc_params_default()`, then set the shape.
/// Fields are only ever appended.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct kvc_params {
    /// `KVC_ABI_VERSION` of the caller; filled by `kvc_params_default()`
    pub abi_version: u32,
    /// cache layers
    pub n_layer: u32,
    /// query heads
    pub n_head: u32,
    /// KV heads (`n_head % n_head_kv == 0`)
    pub n_head_kv: u32,
    /// K head size
    pub head_dim: u32,
    /// attention scale; 0 = 1/sqrt(head_dim)
    pub kq_scale: f32,
    /// `KVC_BACKEND_*` (default `KVC_BACKEND_AUTO`)
    pub backend: kvc_backend,
    /// 0 = all cores, 1 = serial, N = N threads, at most the number of cores (at least 2); env
    /// `KVC_THREADS` overrides
    pub n_threads: u32,
    /// the policy is refused (`KVC_STATUS_POLICY_TOO_COSTLY`) when one plan would cost more than
    /// this many units (`kvc_cost`); 0 = no bound. Default 2048.
    pub max_plan_cost: f32,
    /// ... or when its decode plans would cost more than this many units per generated token
    /// (`kvc_cost.per_token`); 0 = no bound. Default 64.
    pub max_token_cost: f32,
    /// `KVC_ROPE_*`: the rotary embedding of the captured queries and cached keys (ABI 4).
    /// `KVC_ROPE_UNKNOWN` (the default) is always safe; `gvote` fits its sampler better when told
    pub rope_type: u32,
    /// rotated dimensions per head (even, at most `head_dim`), with `rope_type` set
    pub rope_n_rot: u32,
    /// frequency base, with `rope_type` set
    pub rope_freq_base: f32,
    /// linear position scale (1 = none), with `rope_type` set
    pub rope_freq_scale: f32,
}

/// `kvc_params.rope_type`: not told, not rotary, or a rotation the library does not model
/// (YaRN, M-RoPE, per-layer frequencies).
pub const KVC_ROPE_UNKNOWN: u32 = 0;
/// ... dimension pairs `(2i, 2i+1)` rotated by `pos * freq_scale * freq_base^(-2i/n_rot)`
/// (llama.cpp's `LLAMA_ROPE_TYPE_NORM`).
pub const KVC_ROPE_NORM: u32 = 1;
/// ... pairs `(i, i + n_rot/2)`, same angles (`LLAMA_ROPE_TYPE_NEOX`).
pub const KVC_ROPE_NEOX: u32 = 2;

// the codes are literals for cbindgen; `Rope::from_code` decodes the same values
const _: () = assert!(
    KVC_ROPE_UNKNOWN == Rope::UNKNOWN_CODE
        && KVC_ROPE_NORM == Rope::NORM_CODE
        && KVC_ROPE_NEOX == Rope::NEOX_CODE
);

/// What a policy's plans cost (`kvc_policy_cost`), in units of one query row of every query
/// head scored against every held key of every layer: the attention work of decoding one token
/// over the same cells, so the same bound fits every model and cache size.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct kvc_cost {
    /// the costliest plan (at a prompt end)
    pub per_plan: f32,
    /// decode plans' cost per generated token (the plan over `interval`; 0 with `interval=0`)
    pub per_token: f32,
}

/// K of one cache layer. Row `r` starts at `(const char *)k + r * k_row_stride`; within a row,
/// KV head `h` starts at element `h * head_dim`. Quantized caches: the engine dequantizes to F32.
/// Every layer of one call is in the same memory.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct kvc_layer_view {
    /// host pointer, or device pointer with `k_memory = KVC_MEMORY_CUDA`
    pub k: *const std::ffi::c_void,
    /// bytes between consecutive rows
    pub k_row_stride: u64,
    /// `KVC_DTYPE_*`
    pub k_dtype: kvc_dtype,
    /// `KVC_MEMORY_*`: where `k` points
    pub k_memory: kvc_memory,
    /// CUDA device ordinal of `k` with `KVC_MEMORY_CUDA` (ignored for host memory)
    pub k_device: u32,
}

/// The cells one sequence holds right now.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct kvc_seq_view {
    /// engine sequence id
    pub seq_id: i32,
    /// number of cells
    pub n_cells: u32,
    /// `[n_cells]` engine cell ids, echoed back in the plan
    pub cells: *const u32,
    /// `[n_cells]` positions, strictly ascending
    pub pos: *const i32,
    /// `[n_cells]` row of each cell in every layer's K; NULL = `cells[i]`
    pub k_rows: *const u32,
    /// the plan leaves at most this many cells (0 = no cap)
    pub max_cells: u32,
    /// `KVC_SEQ_FLAG_*`
    pub flags: u32,
    /// `[n_layer]` K views; may be NULL for `kvc_evictor_due` and for policies that read no K
    pub layers: *const kvc_layer_view,
}

/// Counters of one plan.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct kvc_stats {
    /// 1 when the policy ran in this call
    pub ran: u32,
    /// cells held before the plan
    pub n_cells: u32,
    /// cells held after
    pub n_keep: u32,
    /// cells the plan frees
    pub n_evict: u32,
    /// cells the policy's own rule wanted to keep, before `max_cells`
    pub budget: u32,
    /// tokens the sequence has seen (highest position + 1)
    pub n_seen: u32,
    /// cells the policy's own rule would have kept but `max_cells` took (0 = not squeezed)
    pub n_squeezed: u32,
}

/// Opaque eviction engine: one model shape, one policy, the state of every sequence.
pub struct kvc_evictor {
    inner: Evictor,
    last_error: RefCell<CString>,
}

impl kvc_evictor {
    fn set_error(&self, e: &Error) {
        let msg = e.c_message().replace('\0', " ");
        *self.last_error.borrow_mut() = CString::new(msg).unwrap_or_default();
    }
}

/// Run `f` on a handle, recording failures on it.
fn with_evictor(
    ev: *mut kvc_evictor,
    f: impl FnOnce(&mut kvc_evictor) -> Result<()>,
) -> kvc_status {
    if ev.is_null() {
        return KVC_STATUS_NULL_ARGUMENT;
    }
    // SAFETY: non-NULL handles come from kvc_evictor_init and are not shared across threads.
    // One `&mut` only: the error is recorded after the closure (and its borrow) has ended.
    let h = unsafe { &mut *ev };
    *h.last_error.borrow_mut() = CString::default();
    let mut failure = None;
    let status = guard(|e| failure = Some(e.clone()), || f(&mut *h));
    if let Some(e) = failure {
        h.set_error(&e);
    }
    status
}

/// Defaults: the caller's ABI version, `KVC_BACKEND_AUTO`, all cores, shape zeroed (must be set).
#[no_mangle]
pub extern "C" fn kvc_params_default() -> kvc_params {
    kvc_params {
        abi_version: KVC_ABI_VERSION,
        n_layer: 0,
        n_head: 0,
        n_head_kv: 0,
        head_dim: 0,
        kq_scale: 0.0,
        backend: KVC_BACKEND_AUTO,
        n_threads: 0,
        max_plan_cost: CostLimit::default().per_plan,
        max_token_cost: CostLimit::default().per_token,
        rope_type: KVC_ROPE_UNKNOWN,
        rope_n_rot: 0,
        rope_freq_base: 0.0,
        rope_freq_scale: 0.0,
    }
}

/// `kvc_params`' cost bounds, checked: finite and >= 0.
fn cost_limit(p: &kvc_params) -> Result<CostLimit> {
    for (name, v) in [
        ("max_plan_cost", p.max_plan_cost),
        ("max_token_cost", p.max_token_cost),
    ] {
        if !v.is_finite() || v < 0.0 {
            return Err(Error::InvalidParamValue {
                name: name.into(),
                value: v.to_string(),
                why: "expected a finite number >= 0 (0 = no bound)".into(),
            });
        }
    }
    Ok(CostLimit {
        per_plan: p.max_plan_cost,
        per_token: p.max_token_cost,
    })
}

/// Create an evictor for a model shape and a policy with `name=value` overrides.
/// On failure `*out` is untouched and `err` (optional, `err_len` bytes) receives a message.
///
/// # Safety
/// Pointers must be valid as documented: `params`, `policy` and `out` non-NULL, `kv` an array
/// of `n_kv` C strings, `err` writable for `err_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn kvc_evictor_init(
    params: *const kvc_params,
    policy: *const c_char,
    kv: *const *const c_char,
    n_kv: usize,
    out: *mut *mut kvc_evictor,
    err: *mut c_char,
    err_len: usize,
) -> kvc_status {
    guard(
        |e| write_msg(err, err_len, &e.c_message()),
        || {
            if params.is_null() {
                return Err(Error::NullArgument("params"));
            }
            if out.is_null() {
                return Err(Error::NullArgument("out"));
            }
            let p = *params;
            if p.abi_version != KVC_ABI_VERSION {
                return Err(Error::AbiMismatch {
                    caller: p.abi_version,
                    library: KVC_ABI_VERSION,
                });
            }
            let shape = Shape::new(
                p.n_layer as usize,
                p.n_head as usize,
                p.n_head_kv as usize,
                p.head_dim as usize,
                p.kq_scale,
            )?
            .with_rope(Rope::from_code(
                p.rope_type,
                p.rope_n_rot,
                p.rope_freq_base,
                p.rope_freq_scale,
                p.head_dim as usize,
            )?);
            let backend = Backend::from_code(p.backend)?;
            let policy = parse_policy(policy, kv, n_kv)?;
            policy.check_cost(&cost_limit(&p)?)?;
            let inner = Evictor::new(
                shape,
                policy,
                Parallelism::new(p.n_threads as usize),
                backend,
            )?;
            let handle = Box::new(kvc_evictor {
                inner,
                last_error: RefCell::new(CString::default()),
            });
            *out = Box::into_raw(handle);
            write_msg(err, err_len, "");
            Ok(())
        },
    )
}

/// Release an evictor. NULL is a no-op; calling it twice on the same handle is undefined.
///
/// # Safety
/// `ev` must come from `kvc_evictor_init` and not be used afterwards.
#[no_mangle]
pub unsafe extern "C" fn kvc_evictor_free(ev: *mut kvc_evictor) {
    if ev.is_null() {
        return;
    }
    guard_value((), || drop(Box::from_raw(ev)));
}

/// Detail of the last failed call on `ev` ("" when the last call succeeded). Valid until the
/// next call on `ev`. NULL handle: static text.
///
/// # Safety
/// `ev` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn kvc_evictor_last_error(ev: *const kvc_evictor) -> *const c_char {
    if ev.is_null() {
        return c"NULL evictor".as_ptr();
    }
    guard_value(c"internal panic".as_ptr(), || {
        (*ev).last_error.borrow().as_ptr()
    })
}

/// The policy and every resolved parameter ("dbudget sinks=4 threshold=0.01 ..."), copied into
/// `buf` (NUL-terminated, truncated). Returns the full length (0 for a NULL handle).
///
/// # Safety
/// `ev` a live handle; `buf` writable for `len` bytes or NULL.
#[no_mangle]
pub unsafe extern "C" fn kvc_evictor_describe(
    ev: *const kvc_evictor,
    buf: *mut c_char,
    len: usize,
) -> usize {
    if ev.is_null() {
        return 0;
    }
    guard_value(0, || {
        let d = (*ev).inner.policy().describe();
        write_msg(buf, len, &d);
        d.len()
    })
}

/// Query rows per layer and call that the policy wants the engine to capture (0 = none).
///
/// # Safety
/// `ev` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn kvc_evictor_q_window(ev: *const kvc_evictor) -> u32 {
    if ev.is_null() {
        return 0;
    }
    guard_value(0, || (*ev).inner.q_window() as u32)
}

/// After every decode call: the newest query rows of a sequence, `q` laid out
/// `[n_layer][n_q][n_head * head_dim]` f32, post-RoPE and rotated like the cached K.
///
/// # Safety
/// `q_pos` holds `n_q` values and `q` `n_layer*n_q*n_head*head_dim` floats (NULL if `n_q == 0`).
#[no_mangle]
pub unsafe extern "C" fn kvc_evictor_push_queries(
    ev: *mut kvc_evictor,
    seq_id: i32,
    n_q: u32,
    q_pos: *const i32,
    q: *const f32,
) -> kvc_status {
    with_evictor(ev, |h| {
        let n_q = n_q as usize;
        let shape = *h.inner.shape();
        let q_pos = slice(q_pos, n_q, "q_pos")?;
        let n_f = shape
            .n_layer
            .checked_mul(n_q)
            .and_then(|x| x.checked_mul(shape.q_row_len()))
            .ok_or_else(|| Error::InvalidShape(format!("n_q={n_q} is too large")))?;
        let q = slice(q, n_f, "q")?;
        h.inner.push_queries(seq_id, q_pos, q)
    })
}

/// The reconstruction pass the policy wants after a prompt's end (`dbudget ranker=recon`, KVzip):
/// `*fraction` of the context's chunks to teacher-force after a "repeat the previous context"
/// prompt on the same sequence (0 = no pass), and one row in `*stride` of those positions to hand
/// over with [`kvc_evictor_push_recon`].
///
/// # Safety
/// `ev` is NULL or a live handle; `fraction` and `stride` writable.
#[no_mangle]
pub unsafe extern "C" fn kvc_evictor_recon(
    ev: *mut kvc_evictor,
    fraction: *mut f32,
    stride: *mut u32,
) -> kvc_status {
    with_evictor(ev, |h| {
        if fraction.is_null() || stride.is_null() {
            return Err(Error::NullArgument("fraction/stride"));
        }
        let r = h.inner.recon();
        *fraction = r.map_or(0.0, |r| r.fraction);
        *stride = r.map_or(1, |r| r.stride as u32);
        Ok(())
    })
}

/// After a reconstruction pass on a sequence (see [`kvc_evictor_recon`]): its query rows, `q` laid
/// out `[n_layer][n_q][n_head * head_dim]` f32 like [`kvc_evictor_push_queries`]'s. The sequence's
/// next plan reads them instead of its spread rows, then drops them.
///
/// # Safety
/// `q` holds `n_layer*n_q*n_head*head_dim` floats (NULL if `n_q == 0`).
#[no_mangle]
pub unsafe extern "C" fn kvc_evictor_push_recon(
    ev: *mut kvc_evictor,
    seq_id: i32,
    n_q: u32,
    q: *const f32,
) -> kvc_status {
    with_evictor(ev, |h| {
        let n_q = n_q as usize;
        let shape = *h.inner.shape();
        let n_f = shape
            .n_layer
            .checked_mul(n_q)
            .and_then(|x| x.checked_mul(shape.q_row_len()))
            .ok_or_else(|| Error::InvalidShape(format!("n_q={n_q} is too large")))?;
        let q = slice(q, n_f, "q")?;
        h.inner.push_recon(seq_id, n_q, q)
    })
}

/// Borrow a sequence view.
unsafe fn seq_input<'a>(
    seq: *const kvc_seq_view,
) -> Result<(SeqInput<'a>, &'a [u32], *const kvc_layer_view)> {
    if seq.is_null() {
        return Err(Error::NullArgument("seq"));
    }
    let s = &*seq;
    let n = s.n_cells as usize;
    let cells = slice(s.cells, n, "seq.cells")?;
    let pos = slice(s.pos, n, "seq.pos")?;
    let rows = if s.k_rows.is_null() {
        cells
    } else {
        slice(s.k_rows, n, "seq.k_rows")?
    };
    let input = SeqInput {
        seq_id: s.seq_id,
        cells,
        pos,
        max_cells: s.max_cells as usize,
        prompt_end: s.flags & KVC_SEQ_FLAG_PROMPT_END != 0,
        room: s.flags & KVC_SEQ_FLAG_ROOM != 0,
    };
    Ok((input, rows, s.layers))
}

/// Whether the policy wants to run now (end of a prompt, over `max_cells`, or the decode
/// interval reached). Cheap: reads no K (`seq->layers` may be NULL).
///
/// # Safety
/// `seq` points to a valid view; `due` is writable.
#[no_mangle]
pub unsafe extern "C" fn kvc_evictor_due(
    ev: *mut kvc_evictor,
    seq: *const kvc_seq_view,
    due: *mut bool,
) -> kvc_status {
    with_evictor(ev, |h| {
        if due.is_null() {
            return Err(Error::NullArgument("due"));
        }
        let (input, _, _) = seq_input(seq)?;
        *due = h.inner.due(&input)?;
        Ok(())
    })
}

/// Run the policy on a sequence and write the cells to free, ascending, into
/// `evict[0..*n_evict)`. `evict_cap >= seq->n_cells` always suffices. `stats` is optional.
///
/// # Safety
/// `seq` and its arrays valid as documented; `evict` writable for `evict_cap` values;
/// `n_evict` writable; `stats` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvc_evictor_plan(
    ev: *mut kvc_evictor,
    seq: *const kvc_seq_view,
    evict: *mut u32,
    evict_cap: usize,
    n_evict: *mut usize,
    stats: *mut kvc_stats,
) -> kvc_status {
    with_evictor(ev, |h| {
        if n_evict.is_null() {
            return Err(Error::NullArgument("n_evict"));
        }
        let (input, rows, layers) = seq_input(seq)?;
        let shape = *h.inner.shape();
        let keys = if layers.is_null() {
            None
        } else {
            let views = slice(layers, shape.n_layer, "seq.layers")?;
            let mut out = Vec::with_capacity(views.len());
            for v in views {
                let dtype = Dtype::from_code(v.k_dtype)?;
                let memory = match v.k_memory {
                    KVC_MEMORY_HOST => Memory::Host,
                    KVC_MEMORY_CUDA => Memory::Cuda(v.k_device),
                    other => {
                        return Err(Error::InvalidShape(format!(
                            "seq.layers[].k_memory={other} (expected KVC_MEMORY_HOST=0 or \
                             KVC_MEMORY_CUDA=1)"
                        )))
                    }
                };
                if v.k.is_null() && input.cells.is_empty() {
                    // nothing will be read
                } else if v.k.is_null() {
                    return Err(Error::NullArgument("seq.layers[].k"));
                }
                out.push(KeyLayer {
                    base: v.k as *const u8,
                    row_stride: v.k_row_stride as usize,
                    dtype,
                    memory,
                });
            }
            Some(Keys { layers: out, rows })
        };
        // the evictor checks the capacity before it remembers anything, so a failed call
        // leaves the sequence as it was and can be retried with a larger buffer
        let plan = h.inner.plan_bounded(&input, keys.as_ref(), evict_cap)?;
        if !plan.evict.is_empty() {
            if evict.is_null() {
                return Err(Error::NullArgument("evict"));
            }
            std::ptr::copy_nonoverlapping(plan.evict.as_ptr(), evict, plan.evict.len());
        }
        *n_evict = plan.evict.len();
        if !stats.is_null() {
            let s = plan.stats;
            *stats = kvc_stats {
                ran: s.ran as u32,
                n_cells: s.n_cells as u32,
                n_keep: s.n_keep as u32,
                n_evict: s.n_evict as u32,
                budget: s.budget as u32,
                n_seen: s.n_seen as u32,
                n_squeezed: s.n_squeezed as u32,
            };
        }
        Ok(())
    })
}

/// Forget a sequence (it was cleared or its slot reused).
///
/// # Safety
/// `ev` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn kvc_evictor_seq_forget(ev: *mut kvc_evictor, seq_id: i32) -> kvc_status {
    with_evictor(ev, |h| {
        h.inner.forget(seq_id);
        Ok(())
    })
}

/// Cells kept per layer by the last plan of `seq_id`, into `counts[0..n_layer)`.
///
/// # Safety
/// `counts` writable for `n_layer` values.
#[no_mangle]
pub unsafe extern "C" fn kvc_evictor_layer_kept(
    ev: *mut kvc_evictor,
    seq_id: i32,
    counts: *mut u32,
    n_layer: usize,
) -> kvc_status {
    with_evictor(ev, |h| {
        if counts.is_null() {
            return Err(Error::NullArgument("counts"));
        }
        let kept = h
            .inner
            .layer_kept(seq_id)
            .ok_or_else(|| Error::InvalidShape(format!("sequence {seq_id} has no plan yet")))?;
        if n_layer < kept.len() {
            return Err(Error::BufferTooSmall {
                need: kept.len(),
                got: n_layer,
            });
        }
        std::ptr::copy_nonoverlapping(kept.as_ptr(), counts, kept.len());
        Ok(())
    })
}

/// Keep flags (1 = kept) that the last plan of `seq_id` chose for one layer and KV head, one per
/// cell of the view that plan saw, in its order (`n` must equal its `n_cells`).
///
/// # Safety
/// `mask` writable for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn kvc_evictor_keep_mask(
    ev: *mut kvc_evictor,
    seq_id: i32,
    layer: u32,
    kv_head: u32,
    mask: *mut u8,
    n: usize,
) -> kvc_status {
    with_evictor(ev, |h| {
        if mask.is_null() {
            return Err(Error::NullArgument("mask"));
        }
        let shape = *h.inner.shape();
        if layer as usize >= shape.n_layer || kv_head as usize >= shape.n_head_kv {
            return Err(Error::InvalidShape(format!(
                "layer {layer}, KV head {kv_head} out of range (n_layer={}, n_head_kv={})",
                shape.n_layer, shape.n_head_kv
            )));
        }
        let (pos, keep) = h
            .inner
            .unit_keep(seq_id, layer as usize, kv_head as usize)
            .ok_or_else(|| {
                Error::InvalidShape(format!(
                    "no plan for sequence {seq_id}, layer {layer}, KV head {kv_head}"
                ))
            })?;
        if n != pos.len() {
            return Err(Error::InvalidShape(format!(
                "mask has {n} entries, the last plan saw {} cells",
                pos.len()
            )));
        }
        for (i, &k) in keep.iter().enumerate() {
            *mask.add(i) = k as u8;
        }
        Ok(())
    })
}

/// Validate a policy name and overrides without a model (startup flags, request fields).
///
/// # Safety
/// `policy` a C string, `kv` an array of `n_kv` C strings, `err` writable for `err_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn kvc_policy_check(
    policy: *const c_char,
    kv: *const *const c_char,
    n_kv: usize,
    err: *mut c_char,
    err_len: usize,
) -> kvc_status {
    guard(
        |e| write_msg(err, err_len, &e.c_message()),
        || {
            parse_policy(policy, kv, n_kv)?;
            write_msg(err, err_len, "");
            Ok(())
        },
    )
}

/// The policy a C caller names, with its `name=value` overrides: where `kvc_evictor_init`,
/// `kvc_policy_check` and `kvc_policy_cost` all start, so they accept and refuse the same input.
///
/// # Safety
/// `policy` a C string, `kv` an array of `n_kv` C strings (or NULL with `n_kv == 0`).
unsafe fn parse_policy(
    policy: *const c_char,
    kv: *const *const c_char,
    n_kv: usize,
) -> Result<Policy> {
    Policy::parse(c_str(policy, "policy")?, &c_str_array(kv, n_kv, "kv")?)
}

/// What a policy's plans cost (`kvc_cost`), without a model: an engine compares it with the
/// bound it lets a client reach before creating anything. `err` as in `kvc_policy_check`.
///
/// # Safety
/// `policy` a C string, `kv` an array of `n_kv` C strings, `out` writable, `err` writable for
/// `err_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn kvc_policy_cost(
    policy: *const c_char,
    kv: *const *const c_char,
    n_kv: usize,
    out: *mut kvc_cost,
    err: *mut c_char,
    err_len: usize,
) -> kvc_status {
    guard(
        |e| write_msg(err, err_len, &e.c_message()),
        || {
            if out.is_null() {
                return Err(Error::NullArgument("out"));
            }
            let c = parse_policy(policy, kv, n_kv)?.cost();
            *out = kvc_cost {
                per_plan: c.per_plan,
                per_token: c.per_token,
            };
            write_msg(err, err_len, "");
            Ok(())
        },
    )
}

static POLICY_LIST: std::sync::OnceLock<CString> = std::sync::OnceLock::new();

/// Comma-separated policy names ("none,streaming,..."). Static.
#[no_mangle]
pub extern "C" fn kvc_policy_names() -> *const c_char {
    guard_value(c"".as_ptr(), || {
        POLICY_LIST
            .get_or_init(|| CString::new(POLICY_NAMES.join(",")).unwrap_or_default())
            .as_ptr()
    })
}

/// Static text for a status code.
#[no_mangle]
pub extern "C" fn kvc_status_str(status: kvc_status) -> *const c_char {
    let s: &'static std::ffi::CStr = match status {
        KVC_STATUS_OK => c"ok",
        KVC_STATUS_NULL_ARGUMENT => c"a required argument is NULL",
        KVC_STATUS_INVALID_SHAPE => c"invalid or inconsistent shape",
        KVC_STATUS_UNSUPPORTED_DTYPE => c"unsupported dtype",
        KVC_STATUS_NON_FINITE_INPUT => c"NaN or Inf in the input",
        KVC_STATUS_UNKNOWN_POLICY => c"unknown policy",
        KVC_STATUS_UNKNOWN_PARAM => c"unknown policy parameter",
        KVC_STATUS_INVALID_PARAM_VALUE => c"invalid policy parameter value",
        KVC_STATUS_BUFFER_TOO_SMALL => c"output buffer too small",
        KVC_STATUS_CUDA_UNAVAILABLE => c"CUDA unavailable",
        KVC_STATUS_ABI_MISMATCH => c"ABI version mismatch",
        KVC_STATUS_INVALID_UTF8 => c"string argument is not UTF-8",
        KVC_STATUS_POLICY_TOO_COSTLY => c"policy too costly for the engine's bound",
        KVC_STATUS_PANIC => c"internal panic (a bug)",
        _ => c"unknown status code",
    };
    s.as_ptr()
}

/// Library version, e.g. "0.1.0". Static.
#[no_mangle]
pub extern "C" fn kvc_version() -> *const c_char {
    static V: &std::ffi::CStr = match std::ffi::CStr::from_bytes_with_nul(
        concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes(),
    ) {
        Ok(v) => v,
        Err(_) => c"unknown",
    };
    V.as_ptr()
}

/// The library's ABI version (compare with `KVC_ABI_VERSION` from the header).
#[no_mangle]
pub extern "C" fn kvc_abi_version() -> u32 {
    KVC_ABI_VERSION
}
