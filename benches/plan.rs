//! Time of one eviction plan (score + allocate + select, `Evictor::plan` after `push_queries`)
//! for one sequence, at two model shapes and the main policies. CPU backend, F16 keys.
//!
//! ```text
//! cargo bench --bench plan                 # full: SmolLM2-135M at 8K, an 8B shape at 32K
//! BENCH_QUICK=1 cargo bench --bench plan   # smoke run: 1/4 of the tokens (at most 4096), one run
//! BENCH_RUNS=3 BENCH_SHAPES=smollm2 BENCH_POLICIES=snapkv,dbudget cargo bench --bench plan
//! BENCH_BACKEND=cuda cargo bench --features cuda --bench plan   # K in device memory (below)
//! ```
//!
//! `BENCH_BACKEND=cuda` (feature `cuda`): K is uploaded to the device once per shape and handed
//! over as device memory to a `Backend::Auto` evictor, as llama.cpp with `-ngl 99` does, so the
//! plan reads it in place. Each row then also reports `k_gb_per_s`: K's bytes over the median
//! plan time. For `knorm` (one pass over K, the key-norm kernel) this is the scoring kernels'
//! read bandwidth, launch and result copies included; the window-attention policies read K three
//! times (norm pass, softmax statistics, probabilities). `BENCH_OUT` overrides the JSON path
//! (default `results/bench-plan.json`, with cuda `results/bench-plan-cuda.json`).
//!
//! Each run builds a fresh evictor and pushes the W newest query rows (not timed), then times
//! `plan` alone. Reports median/min/max over the runs as JSON, printed and written to
//! `results/bench-plan.json`. Thread count: `KVC_THREADS` (default: all cores).

use kvcompress::backend::{Backend, Parallelism};
use kvcompress::view::{Dtype, KeyLayer, Keys, Memory};
use kvcompress::{Evictor, Policy, SeqInput, Shape};
use std::fmt::Write as _;
#[cfg(feature = "cuda")]
use std::sync::Arc;
use std::time::Instant;

struct Case {
    name: &'static str,
    n_layer: usize,
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
    n_tokens: usize,
    window: usize,
    runs: usize,
}

const CASES: &[Case] = &[
    Case {
        name: "smollm2-135m",
        n_layer: 30,
        n_head: 9,
        n_head_kv: 3,
        head_dim: 64,
        n_tokens: 8192,
        window: 32,
        runs: 5,
    },
    Case {
        name: "8b-class",
        n_layer: 32,
        n_head: 32,
        n_head_kv: 8,
        head_dim: 128,
        n_tokens: 32768,
        window: 32,
        runs: 3,
    },
];

const POLICIES: &[&str] = &["snapkv", "dbudget", "gvote", "h2o", "streaming"];

/// xorshift64: deterministic values in [-2, 2).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
    }
}

fn env_list(name: &str) -> Option<Vec<String>> {
    std::env::var(name).ok().map(|v| {
        v.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    })
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// 1/5/15-minute load averages: other work on the machine skews the timings.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

struct Row {
    shape: String,
    n_tokens: usize,
    policy: String,
    runs: usize,
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
    n_keep: usize,
    k_bytes: usize,
}

/// K of one shape in device memory: the buffers (kept alive) and the device's ordinal.
#[cfg(feature = "cuda")]
struct DeviceK {
    _bufs: Vec<cudarc::driver::CudaSlice<u16>>,
    ptrs: Vec<u64>,
    ordinal: u32,
    _gpu: Arc<kvcompress::backend::cuda::Gpu>,
}

#[cfg(feature = "cuda")]
fn upload(k: &[Vec<u16>]) -> DeviceK {
    use cudarc::driver::DevicePtr;
    let gpu = kvcompress::backend::cuda::gpu().expect("BENCH_BACKEND=cuda: no CUDA device");
    let st = gpu.stream().clone();
    let bufs: Vec<_> = k
        .iter()
        .map(|l| st.clone_htod(l).expect("upload K"))
        .collect();
    st.synchronize().expect("synchronize");
    let ptrs = bufs.iter().map(|b| b.device_ptr(&st).0).collect();
    let ordinal = gpu.context().ordinal() as u32;
    DeviceK {
        _bufs: bufs,
        ptrs,
        ordinal,
        _gpu: gpu,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument (if any) selects policies or shapes
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| v != "0" && !v.is_empty());
    let runs_override = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    let shapes = env_list("BENCH_SHAPES");
    let policies: Vec<String> = env_list("BENCH_POLICIES")
        .unwrap_or_else(|| POLICIES.iter().map(|s| s.to_string()).collect());
    let threads_env = std::env::var("KVC_THREADS").ok();
    let par = Parallelism::new(0);
    let threads = match &par {
        Parallelism::Serial => 1,
        Parallelism::Global => rayon::current_num_threads(),
        Parallelism::Pool(p) => p.current_num_threads(),
    };
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    let on_cuda = match std::env::var("BENCH_BACKEND").as_deref() {
        Ok("cuda") => true,
        Ok("cpu") | Err(_) => false,
        Ok(other) => panic!("BENCH_BACKEND={other}: expected cpu or cuda"),
    };
    if on_cuda && cfg!(not(feature = "cuda")) {
        panic!("BENCH_BACKEND=cuda needs the `cuda` feature (cargo bench --features cuda)");
    }

    let load_before = loadavg();
    let mut rows = Vec::new();
    for case in CASES {
        let selected = shapes
            .as_ref()
            .is_none_or(|s| s.iter().any(|x| case.name.starts_with(x.as_str())));
        let filtered = filter.is_empty()
            || filter
                .iter()
                .any(|f| case.name.contains(f.as_str()) || policies.iter().any(|p| p == f));
        if !selected || !filtered {
            continue;
        }
        let n = if quick {
            (case.n_tokens / 4).min(4096)
        } else {
            case.n_tokens
        };
        let runs = runs_override
            .unwrap_or(if quick { 1 } else { case.runs })
            .max(1);
        let shape = Shape::new(
            case.n_layer,
            case.n_head,
            case.n_head_kv,
            case.head_dim,
            0.0,
        )
        .expect("shape");
        let row_elems = case.n_head_kv * case.head_dim;
        eprintln!(
            "bench plan: {} ({} layers, {} heads, {} KV heads, d={}), {n} tokens, W={}, {runs} run(s), {threads} thread(s)",
            case.name, case.n_layer, case.n_head, case.n_head_kv, case.head_dim, case.window
        );
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        // K: [layer][token][n_head_kv * head_dim] f16, one buffer per layer
        let k: Vec<Vec<u16>> = (0..case.n_layer)
            .map(|_| {
                (0..n * row_elems)
                    .map(|_| half::f16::from_f32(rng.next()).to_bits())
                    .collect()
            })
            .collect();
        let q: Vec<f32> = (0..case.n_layer * case.window * shape.q_row_len())
            .map(|_| rng.next())
            .collect();
        let cells: Vec<u32> = (0..n as u32).collect();
        let pos: Vec<i32> = (0..n as i32).collect();
        let q_pos: Vec<i32> = ((n - case.window) as i32..n as i32).collect();
        #[allow(unused_mut)]
        let mut layers: Vec<KeyLayer> = k
            .iter()
            .map(|l| KeyLayer {
                memory: Memory::Host,
                base: l.as_ptr() as *const u8,
                row_stride: row_elems * 2,
                dtype: Dtype::F16,
            })
            .collect();
        #[cfg(feature = "cuda")]
        let _dev = on_cuda.then(|| {
            let d = upload(&k);
            for (l, &p) in layers.iter_mut().zip(&d.ptrs) {
                l.base = p as usize as *const u8;
                l.memory = Memory::Cuda(d.ordinal);
            }
            d
        });
        let k_bytes = case.n_layer * n * row_elems * 2;
        let keys = Keys {
            layers,
            rows: &cells,
        };
        let input = SeqInput {
            seq_id: 0,
            cells: &cells,
            pos: &pos,
            max_cells: 0,
            prompt_end: true,
            room: false,
        };
        for name in &policies {
            if !filter.is_empty()
                && !filter
                    .iter()
                    .any(|f| f == name || case.name.contains(f.as_str()))
            {
                continue;
            }
            let mut times = Vec::with_capacity(runs);
            let mut n_keep = 0;
            for _ in 0..runs {
                let policy = Policy::parse(name, &[]).expect("policy");
                let backend = if on_cuda { Backend::Auto } else { Backend::Cpu };
                let mut ev = Evictor::new(shape, policy, par.clone(), backend).expect("evictor");
                ev.push_queries(0, &q_pos, &q).expect("push_queries");
                let t = Instant::now();
                let plan = ev.plan(&input, Some(&keys)).expect("plan");
                times.push(t.elapsed().as_secs_f64() * 1e3);
                n_keep = plan.stats.n_keep;
                std::hint::black_box(&plan);
            }
            times.sort_by(f64::total_cmp);
            let median = if times.len() % 2 == 1 {
                times[times.len() / 2]
            } else {
                (times[times.len() / 2 - 1] + times[times.len() / 2]) / 2.0
            };
            eprintln!(
                "  {name:<10} median {median:9.2} ms  min {:9.2}  max {:9.2}  keep {n_keep}/{n}  K {:.1} GB/s",
                times[0],
                times[times.len() - 1],
                k_bytes as f64 / (median * 1e-3) / 1e9
            );
            rows.push(Row {
                shape: case.name.to_string(),
                n_tokens: n,
                policy: name.clone(),
                runs,
                median_ms: median,
                min_ms: times[0],
                max_ms: times[times.len() - 1],
                n_keep,
                k_bytes,
            });
        }
        // drop this shape's buffers before the next one
        drop(keys);
        drop(k);
    }

    let shape_of = |name: &str| CASES.iter().find(|c| c.name == name);
    let mut j = String::from("{\n");
    let _ = writeln!(j, "  \"bench\": \"plan\",");
    let _ = writeln!(j, "  \"quick\": {quick},");
    let _ = writeln!(
        j,
        "  \"machine\": {{\"nproc\": {nproc}, \"cpu\": {}, \"kvc_threads_env\": {}, \
         \"loadavg_before\": {}, \"loadavg_after\": {}}},",
        json_str(&cpu_model()),
        threads_env.as_deref().map_or("null".into(), json_str),
        json_str(&load_before),
        json_str(&loadavg())
    );
    let _ = writeln!(j, "  \"threads\": {threads},");
    let _ = writeln!(
        j,
        "  \"backend\": \"{}\",",
        if on_cuda { "cuda" } else { "cpu" }
    );
    let _ = writeln!(j, "  \"dtype\": \"f16\",");
    j.push_str("  \"results\": [\n");
    for (i, r) in rows.iter().enumerate() {
        let c = shape_of(&r.shape).expect("case");
        let _ = write!(
            j,
            "    {{\"shape\": {{\"name\": {}, \"n_layer\": {}, \"n_head\": {}, \"n_head_kv\": {}, \
             \"head_dim\": {}, \"n_tokens\": {}, \"window\": {}}}, \"policy\": {}, \"runs\": {}, \
             \"median_ms\": {:.3}, \"min_ms\": {:.3}, \"max_ms\": {:.3}, \"n_keep\": {}, \
             \"threads\": {threads}, \"k_bytes\": {}, \"k_gb_per_s\": {:.1}}}",
            json_str(&r.shape),
            c.n_layer,
            c.n_head,
            c.n_head_kv,
            c.head_dim,
            r.n_tokens,
            c.window,
            json_str(&r.policy),
            r.runs,
            r.median_ms,
            r.min_ms,
            r.max_ms,
            r.n_keep,
            r.k_bytes,
            r.k_bytes as f64 / (r.median_ms * 1e-3) / 1e9
        );
        j.push_str(if i + 1 < rows.len() { ",\n" } else { "\n" });
    }
    j.push_str("  ]\n}\n");
    print!("{j}");
    let path = std::env::var("BENCH_OUT").map_or_else(
        |_| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("results")
                .join(if on_cuda {
                    "bench-plan-cuda.json"
                } else {
                    "bench-plan.json"
                })
        },
        std::path::PathBuf::from,
    );
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    match std::fs::create_dir_all(dir).and_then(|_| std::fs::write(&path, &j)) {
        Ok(()) => eprintln!("wrote {}", path.display()),
        Err(e) => eprintln!("could not write {}: {e}", path.display()),
    }
}
