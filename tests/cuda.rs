//! CUDA backend against the CPU path (feature `cuda`).
//!
//! K is laid out as an engine cache would hold it: per layer a buffer of more rows than cells,
//! rows padded past `n_head_kv * head_dim`, cells mapped to shuffled rows, stored as f32, f16 or
//! bf16. The very same bytes are scored by the CPU path (host copy) and by the device (device
//! copy), so the comparison measures only the arithmetic: per unit, scores and evidence must
//! agree within a tolerance per dtype (the device uses `expf` and another summation order than
//! the CPU's `exp_neg` and 4x8 blocking).
//!
//! Tests that need a device pass when none opens, so `cargo test --features cuda` is green on
//! machines without a GPU, but never silently: each skipped test writes a marker into
//! `KVC_SKIP_DIR` when set (scripts/cuda-check.sh prints one line per marker, since cargo hides
//! the output of passing tests), and with `KVC_REQUIRE_GPU=1` (cuda-check.sh sets it when
//! `nvidia-smi` lists a GPU) a missing device fails them.
#![cfg(feature = "cuda")]

mod common;

use common::{gen_case, Case, Pattern, Rng};
use cudarc::driver::{CudaSlice, DevicePtr};
use kvcompress::backend::cuda::{self, Gpu, UnitsIn};
use kvcompress::backend::{Backend, Parallelism};
use kvcompress::score::UnitCtx;
use kvcompress::state::QueryRow;
use kvcompress::view::{Dtype, KeyLayer, Keys, Memory};
use kvcompress::{select, Error, Evictor, Policy, SeqInput, Shape};
use std::sync::Arc;

/// The device, or `None` after recording that `test` was skipped (a failure with
/// `KVC_REQUIRE_GPU=1`).
fn device(test: &str) -> Option<Arc<Gpu>> {
    match cuda::gpu() {
        Ok(g) => Some(g),
        Err(e) => {
            skipped(test, &e.to_string());
            None
        }
    }
}

/// The ordinal of the opened device (what an engine puts in `kvc_layer_view.k_device`).
fn dev_ordinal(gpu: &Gpu) -> u32 {
    gpu.context().ordinal() as u32
}

/// Record a test skipped for want of a device: a failure under `KVC_REQUIRE_GPU=1`, else a
/// marker file in `KVC_SKIP_DIR` (and a line on stderr, shown with `--nocapture`).
fn skipped(test: &str, why: &str) {
    if std::env::var("KVC_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("{test}: KVC_REQUIRE_GPU=1 but no CUDA device: {why}");
    }
    eprintln!("{test}: skipped: no CUDA device ({why})");
    if let Ok(dir) = std::env::var("KVC_SKIP_DIR") {
        let dir = std::path::Path::new(&dir);
        std::fs::create_dir_all(dir).expect("KVC_SKIP_DIR");
        std::fs::write(dir.join(test), format!("no CUDA device ({why})\n")).expect("skip marker");
    }
}

/// Absolute and relative tolerance of a score comparison for K stored as `dt`.
fn tol(dt: Dtype) -> (f32, f32) {
    match dt {
        Dtype::F32 => (2e-6, 1e-3),
        // same converted values on both sides; larger logits of rounded keys, looser bound
        Dtype::F16 => (5e-6, 2e-3),
        Dtype::Bf16 => (1e-5, 4e-3),
    }
}

fn assert_close(what: &str, dt: Dtype, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let (atol, rtol) = tol(dt);
    for (j, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= atol + rtol * w.abs(),
            "{what} ({dt:?}) cell {j}: device {g} vs cpu {w}"
        );
    }
}

/// An engine-like cache of one case: the bytes (host and device) and the row map.
struct Cache {
    host: Vec<Vec<u8>>,
    dev: Vec<CudaSlice<u8>>,
    rows: Vec<u32>,
    row_stride: usize,
    dtype: Dtype,
}

impl Cache {
    fn new(gpu: &Gpu, case: &Case, dtype: Dtype, seed: u64) -> Cache {
        let shape = &case.shape;
        let n = case.pos.len();
        let row_elems = shape.n_head_kv * shape.head_dim;
        let pad = 3;
        let row_stride = (row_elems + pad) * dtype.size();
        let n_slots = n + 5;
        let mut rng = Rng::new(seed);
        // shuffled distinct slots
        let mut slots: Vec<u32> = (0..n_slots as u32).collect();
        for i in (1..slots.len()).rev() {
            slots.swap(i, rng.below(i + 1));
        }
        let rows: Vec<u32> = slots[..n].to_vec();
        let mut host = Vec::new();
        for il in 0..shape.n_layer {
            // unused slots and padding hold garbage the kernels must not read
            let mut buf: Vec<u8> = (0..n_slots * row_stride).map(|i| (i * 7) as u8).collect();
            for (cell, &r) in rows.iter().enumerate() {
                for e in 0..row_elems {
                    let v = case
                        .keys
                        .at(shape, il, cell, e / shape.head_dim, e % shape.head_dim);
                    let off = r as usize * row_stride + e * dtype.size();
                    match dtype {
                        Dtype::F32 => buf[off..off + 4].copy_from_slice(&v.to_le_bytes()),
                        Dtype::F16 => buf[off..off + 2]
                            .copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes()),
                        Dtype::Bf16 => buf[off..off + 2]
                            .copy_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes()),
                    }
                }
            }
            host.push(buf);
        }
        let dev = host
            .iter()
            .map(|b| gpu.stream().clone_htod(b).expect("upload K"))
            .collect();
        Cache {
            host,
            dev,
            rows,
            row_stride,
            dtype,
        }
    }

    fn host_keys(&self) -> Keys<'_> {
        Keys {
            layers: self
                .host
                .iter()
                .map(|b| KeyLayer {
                    base: b.as_ptr(),
                    row_stride: self.row_stride,
                    dtype: self.dtype,
                    memory: Memory::Host,
                })
                .collect(),
            rows: &self.rows,
        }
    }

    fn device_keys(&self, gpu: &Gpu) -> Keys<'_> {
        Keys {
            layers: self
                .dev
                .iter()
                .map(|b| {
                    let (ptr, _sync) = b.device_ptr(gpu.stream());
                    KeyLayer {
                        base: ptr as usize as *const u8,
                        row_stride: self.row_stride,
                        dtype: self.dtype,
                        memory: Memory::Cuda(gpu.context().ordinal() as u32),
                    }
                })
                .collect(),
            rows: &self.rows,
        }
    }
}

/// The query rows of a case, plus (optionally) a first row that sees no cell at all.
fn query_rows(case: &Case, blind_row: bool) -> Vec<QueryRow> {
    let mut rows: Vec<QueryRow> = case
        .query_rows()
        .into_iter()
        .map(|(pos, data)| QueryRow {
            pos,
            data: data.into_boxed_slice(),
        })
        .collect();
    if blind_row && case.pos[0] > i32::MIN {
        let data = rows[0].data.clone();
        rows.insert(
            0,
            QueryRow {
                pos: case.pos[0] - 1,
                data,
            },
        );
    }
    rows
}

/// Per unit: (scores, evidence) of the CPU path and of the device, for one policy.
#[allow(clippy::type_complexity)]
fn both(
    gpu: &Gpu,
    case: &Case,
    cache: &Cache,
    name: &str,
    params: &[&str],
    rows: &[QueryRow],
    carry: Option<&[Vec<f32>]>,
) -> (
    Vec<(Vec<f32>, Option<Vec<f32>>)>,
    Vec<(Vec<f32>, Option<Vec<f32>>)>,
) {
    let policy = Policy::parse(name, params).unwrap();
    let scorer = policy.scorer.as_deref().unwrap();
    let shape = case.shape;
    let queries: Vec<&QueryRow> = match scorer.queries() {
        kvcompress::score::QuerySel::None => Vec::new(),
        kvcompress::score::QuerySel::Last(k) => {
            rows.iter().skip(rows.len().saturating_sub(k)).collect()
        }
        kvcompress::score::QuerySel::Unconsumed => rows.iter().collect(),
        // the remembered spread sample (dbudget ranker=context): these cases hand over their
        // rows directly, so every row is the sample
        kvcompress::score::QuerySel::Spread { .. } => rows.iter().collect(),
    };
    let prot = select::protected(&case.pos, policy.sinks, policy.window);
    let hk = cache.host_keys();
    let mut cpu = Vec::new();
    let mut buf = Vec::new();
    for u in 0..shape.n_layer * shape.n_head_kv {
        let (layer, kv_head) = (u / shape.n_head_kv, u % shape.n_head_kv);
        hk.gather_head_t(&shape, layer, kv_head, &mut buf).unwrap();
        let ctx = UnitCtx {
            shape: &shape,
            layer,
            kv_head,
            keys: &buf,
            pos: &case.pos,
            queries: &queries,
            carry: carry.map(|c| c[u].as_slice()),
            protected: &prot,
        };
        cpu.push((scorer.score_unit(&ctx), policy.rule.unit_evidence(&ctx)));
    }
    let dk = cache.device_keys(gpu);
    let dev = cuda::score_units(
        &UnitsIn {
            scorer,
            rule: policy.rule.as_ref(),
            shape: &shape,
            keys: Some(&dk),
            pos: &case.pos,
            queries: &queries,
            carry,
            protected: &prot,
            par: &Parallelism::Serial,
        },
        dev_ordinal(gpu),
    )
    .unwrap_or_else(|e| panic!("{name} {params:?}: {e}"));
    (cpu, dev)
}

fn compare(
    what: &str,
    dt: Dtype,
    cpu: &[(Vec<f32>, Option<Vec<f32>>)],
    dev: &[(Vec<f32>, Option<Vec<f32>>)],
) {
    assert_eq!(cpu.len(), dev.len(), "{what}: units");
    for (u, (c, d)) in cpu.iter().zip(dev).enumerate() {
        assert_close(&format!("{what} unit {u} scores"), dt, &d.0, &c.0);
        match (&c.1, &d.1) {
            (None, None) => {}
            (Some(ce), Some(de)) => assert_close(&format!("{what} unit {u} evidence"), dt, de, ce),
            (c, d) => panic!(
                "{what} unit {u}: evidence cpu {:?} vs device {:?}",
                c.is_some(),
                d.is_some()
            ),
        }
    }
}

const DTYPES: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::Bf16];

/// Geometries: GQA groups 1 and 4, head sizes that are and are not multiples of 8, cell counts
/// below a warp, across block boundaries, and query windows beyond one shared-memory batch.
fn shapes() -> Vec<(Shape, usize, usize)> {
    vec![
        (Shape::new(2, 8, 2, 64, 0.0).unwrap(), 300, 12),
        (Shape::new(1, 4, 4, 80, 0.0).unwrap(), 5, 3),
        (Shape::new(2, 12, 3, 128, 0.1).unwrap(), 129, 9),
    ]
}

/// The window-attention policies compared below.
const WINDOW_POLICIES: &[(&str, &[&str])] = &[
    ("snapkv", &["window=8"]),
    ("snapkv", &["window=16", "pooling=avg", "gqa=max", "pool=5"]),
    ("tova", &[]),
    ("pyramidkv", &["window=4", "pool=3"]),
    ("dbudget", &["window=8"]),
    ("dbudget", &["window=8", "ranker=position"]),
];

/// Every policy string of these tests parses (checked on machines without a device too).
#[test]
fn test_policies_parse() {
    let more: &[(&str, &[&str])] = &[
        ("h2o", &["gqa=mean"]),
        ("h2o", &["gqa=max"]),
        ("knorm", &[]),
        ("gvote", &["samples=4"]),
        ("snapkv", &["ratio=0.5"]),
        ("adakv", &["ratio=0.6"]),
        ("h2o", &["ratio=0.5"]),
    ];
    for (name, params) in WINDOW_POLICIES.iter().chain(more) {
        Policy::parse(name, params).unwrap_or_else(|e| panic!("{name} {params:?}: {e}"));
    }
}

/// Window attention, GQA reduction, pooling and DBudgetKV's evidence for every dtype and shape.
#[test]
fn window_scorers_match_cpu() {
    let Some(gpu) = device("window_scorers_match_cpu") else {
        return;
    };
    let policies = WINDOW_POLICIES;
    for (si, (shape, n, n_q)) in shapes().into_iter().enumerate() {
        for (pi, pattern) in [Pattern::Peaked, Pattern::Flat, Pattern::SinkHeavy]
            .into_iter()
            .enumerate()
        {
            let case = gen_case(shape, n, n_q, pattern, 100 + (si * 10 + pi) as u64);
            let rows = query_rows(&case, true);
            for dt in DTYPES {
                let cache = Cache::new(&gpu, &case, dt, 7 + si as u64);
                for (name, params) in policies {
                    let (cpu, dev) = both(&gpu, &case, &cache, name, params, &rows, None);
                    compare(
                        &format!("{name} {params:?} shape {si} {pattern:?}"),
                        dt,
                        &cpu,
                        &dev,
                    );
                }
            }
        }
    }
}

/// H2O: attention summed over every unconsumed row, plus the carried scores.
#[test]
fn accumulated_matches_cpu() {
    let Some(gpu) = device("accumulated_matches_cpu") else {
        return;
    };
    for (si, (shape, n, n_q)) in shapes().into_iter().enumerate() {
        let case = gen_case(shape, n, n_q, Pattern::Peaked, 200 + si as u64);
        let rows = query_rows(&case, false);
        let mut rng = Rng::new(5);
        let carry: Vec<Vec<f32>> = (0..shape.n_layer * shape.n_head_kv)
            .map(|_| (0..n).map(|_| rng.uniform()).collect())
            .collect();
        for dt in DTYPES {
            let cache = Cache::new(&gpu, &case, dt, 11);
            for gqa in ["gqa=mean", "gqa=max"] {
                let (cpu, dev) = both(&gpu, &case, &cache, "h2o", &[gqa], &rows, Some(&carry));
                compare(&format!("h2o {gqa} shape {si}"), dt, &cpu, &dev);
                let (cpu, dev) = both(&gpu, &case, &cache, "h2o", &[gqa], &rows, None);
                compare(&format!("h2o {gqa} shape {si} no carry"), dt, &cpu, &dev);
            }
        }
    }
}

/// Key norms (KnormPress) on the device.
#[test]
fn key_norms_match_cpu() {
    let Some(gpu) = device("key_norms_match_cpu") else {
        return;
    };
    for (si, (shape, n, n_q)) in shapes().into_iter().enumerate() {
        let case = gen_case(shape, n, n_q, Pattern::SinkHeavy, 300 + si as u64);
        for dt in DTYPES {
            let cache = Cache::new(&gpu, &case, dt, 13);
            let (cpu, dev) = both(&gpu, &case, &cache, "knorm", &[], &[], None);
            compare(&format!("knorm shape {si}"), dt, &cpu, &dev);
        }
    }
}

/// GVote has no device kernel: its units are gathered on the device and scored by the CPU code,
/// so the results are identical.
#[test]
fn gathered_fallback_is_exact() {
    let Some(gpu) = device("gathered_fallback_is_exact") else {
        return;
    };
    for (si, (shape, n, n_q)) in shapes().into_iter().enumerate() {
        let case = gen_case(shape, n, n_q, Pattern::Peaked, 400 + si as u64);
        let rows = query_rows(&case, false);
        for dt in DTYPES {
            let cache = Cache::new(&gpu, &case, dt, 17);
            let (cpu, dev) = both(&gpu, &case, &cache, "gvote", &["samples=4"], &rows, None);
            assert_eq!(cpu, dev, "gvote shape {si} {dt:?}");
        }
    }
}

/// A NaN in K is reported like the CPU path does (same layer, same cell).
#[test]
fn non_finite_keys_are_refused() {
    let Some(gpu) = device("non_finite_keys_are_refused") else {
        return;
    };
    let (shape, n, n_q) = shapes()[0];
    let mut case = gen_case(shape, n, n_q, Pattern::Flat, 500);
    let row = shape.n_head_kv * shape.head_dim;
    // layer 1, cell 37, KV head 1
    case.keys.data[n * row + 37 * row + shape.head_dim + 5] = f32::NAN;
    let rows = query_rows(&case, false);
    let cache = Cache::new(&gpu, &case, Dtype::F16, 19);
    let policy = Policy::parse("snapkv", &[]).unwrap();
    let queries: Vec<&QueryRow> = rows.iter().collect();
    let prot = vec![false; n];
    let dk = cache.device_keys(&gpu);
    let err = cuda::score_units(
        &UnitsIn {
            scorer: policy.scorer.as_deref().unwrap(),
            rule: policy.rule.as_ref(),
            shape: &shape,
            keys: Some(&dk),
            pos: &case.pos,
            queries: &queries,
            carry: None,
            protected: &prot,
            par: &Parallelism::Serial,
        },
        dev_ordinal(&gpu),
    )
    .unwrap_err();
    assert_eq!(
        err,
        Error::NonFinite {
            what: "keys",
            layer: 1,
            row: 37
        }
    );
}

/// Host pointers handed to the CUDA backend are refused before any kernel touches them.
#[test]
fn host_keys_are_refused() {
    let Some(gpu) = device("host_keys_are_refused") else {
        return;
    };
    let (shape, n, n_q) = shapes()[1];
    let case = gen_case(shape, n, n_q, Pattern::Flat, 600);
    let cache = Cache::new(&gpu, &case, Dtype::F32, 23);
    let policy = Policy::parse("snapkv", &[]).unwrap();
    let hk = cache.host_keys();
    let prot = vec![false; n];
    let err = cuda::score_units(
        &UnitsIn {
            scorer: policy.scorer.as_deref().unwrap(),
            rule: policy.rule.as_ref(),
            shape: &shape,
            keys: Some(&hk),
            pos: &case.pos,
            queries: &[],
            carry: None,
            protected: &prot,
            par: &Parallelism::Serial,
        },
        dev_ordinal(&gpu),
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidShape(_)), "{err}");
}

/// Whole plans: a CUDA evictor and a CPU evictor on the same cache evict the same number of
/// cells for fixed budgets, nearly the same cells, and DBudgetKV's emergent budget agrees.
#[test]
fn plans_match_cpu() {
    let Some(gpu) = device("plans_match_cpu") else {
        return;
    };
    let shape = Shape::new(2, 8, 2, 64, 0.0).unwrap();
    let case = gen_case(shape, 400, 16, Pattern::Peaked, 700);
    for dt in DTYPES {
        let cache = Cache::new(&gpu, &case, dt, 29);
        for (name, params) in [
            ("snapkv", &["ratio=0.5"][..]),
            ("adakv", &["ratio=0.6"][..]),
            ("h2o", &["ratio=0.5"][..]),
            ("dbudget", &[][..]),
            ("gvote", &[][..]),
        ] {
            let mut plans = Vec::new();
            for backend in [Backend::Cpu, Backend::Cuda] {
                let policy = Policy::parse(name, params).unwrap();
                let mut ev = Evictor::new(shape, policy, Parallelism::Serial, backend).unwrap();
                ev.push_queries(7, &case.q_pos, &case.q).unwrap();
                let keys = match backend {
                    Backend::Cpu => cache.host_keys(),
                    _ => cache.device_keys(&gpu),
                };
                let input = SeqInput {
                    seq_id: 7,
                    cells: &case.cells,
                    pos: &case.pos,
                    max_cells: 0,
                    prompt_end: true,
                    room: false,
                };
                plans.push(ev.plan(&input, Some(&keys)).unwrap());
            }
            let (c, d) = (&plans[0], &plans[1]);
            let what = format!("{name} {params:?} {dt:?}");
            let n = case.pos.len() as f64;
            let budget_gap = (c.stats.budget as f64 - d.stats.budget as f64).abs() / n;
            assert!(
                budget_gap <= 0.02,
                "{what}: budgets {} vs {}",
                c.stats.budget,
                d.stats.budget
            );
            if name != "dbudget" {
                assert_eq!(c.stats.n_evict, d.stats.n_evict, "{what}");
            }
            let common = c
                .evict
                .iter()
                .filter(|x| d.evict.binary_search(x).is_ok())
                .count();
            let most = c.evict.len().max(d.evict.len()).max(1);
            assert!(
                common as f64 / most as f64 >= 0.95,
                "{what}: {common} of {most} evictions shared"
            );
        }
    }
}

/// `Backend::Auto` (the C default): K in device memory is scored in place on its device, exactly
/// as `Backend::Cuda` does, and host K exactly as `Backend::Cpu` does; `Backend::Cpu` refuses
/// device K and `Backend::Cuda` host K, with a message and without reading them.
#[test]
fn auto_backend_follows_the_memory() {
    let Some(gpu) = device("auto_backend_follows_the_memory") else {
        return;
    };
    let shape = Shape::new(2, 8, 2, 64, 0.0).unwrap();
    let case = gen_case(shape, 300, 16, Pattern::Peaked, 800);
    let input = SeqInput {
        seq_id: 7,
        cells: &case.cells,
        pos: &case.pos,
        max_cells: 0,
        prompt_end: true,
        room: false,
    };
    for dt in DTYPES {
        let cache = Cache::new(&gpu, &case, dt, 31);
        for (name, params) in [("snapkv", &["ratio=0.5"][..]), ("dbudget", &[][..])] {
            let plan = |backend: Backend, device: bool| {
                let policy = Policy::parse(name, params).unwrap();
                let mut ev = Evictor::new(shape, policy, Parallelism::Serial, backend).unwrap();
                ev.push_queries(7, &case.q_pos, &case.q).unwrap();
                let keys = if device {
                    cache.device_keys(&gpu)
                } else {
                    cache.host_keys()
                };
                ev.plan(&input, Some(&keys))
            };
            let what = format!("{name} {dt:?}");
            let auto_dev = plan(Backend::Auto, true).unwrap();
            assert!(auto_dev.stats.n_evict > 0, "{what}: nothing evicted");
            assert_eq!(
                auto_dev.evict,
                plan(Backend::Cuda, true).unwrap().evict,
                "{what}"
            );
            assert_eq!(
                plan(Backend::Auto, false).unwrap().evict,
                plan(Backend::Cpu, false).unwrap().evict,
                "{what}"
            );
            let e = plan(Backend::Cpu, true).unwrap_err();
            assert!(e.to_string().contains("backend=cpu"), "{what}: {e}");
            let e = plan(Backend::Cuda, false).unwrap_err();
            assert!(e.to_string().contains("backend=cuda"), "{what}: {e}");
        }
    }
}

/// Runs everywhere: without a device the CUDA backend is refused with CudaUnavailable, never a
/// panic; with one, it opens and reports what it loaded.
#[test]
fn backend_opens_or_reports_unavailable() {
    let shape = Shape::new(2, 8, 2, 64, 0.0).unwrap();
    let policy = Policy::parse("snapkv", &[]).unwrap();
    match Evictor::new(shape, policy, Parallelism::Serial, Backend::Cuda) {
        Ok(_) => {
            let gpu = cuda::gpu().expect("opened once");
            eprintln!("CUDA backend loaded: {}", gpu.loaded().join(", "));
            assert!(cuda::kernels_built());
        }
        Err(Error::CudaUnavailable(msg)) => skipped("backend_opens_or_reports_unavailable", &msg),
        Err(e) => panic!("expected CudaUnavailable, got {e}"),
    }
}

/// `scripts/cuda-check.sh` builds with `KVC_CUDA_REQUIRE=1`: the kernels must then be embedded.
#[test]
fn kernels_embedded_when_required() {
    if std::env::var("KVC_CUDA_REQUIRE").is_ok_and(|v| v == "1") {
        assert!(
            cuda::kernels_built(),
            "built with KVC_CUDA_REQUIRE=1 but no kernels embedded"
        );
    }
}
