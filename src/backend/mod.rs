//! Where the per-(layer, KV head) work runs: the CPU (rayon, with a serial switch) or, with the
//! `cuda` feature, the GPU. [`score_units`] is the one entry point: the scorer's and the rule's
//! device recipes ([`Scorer::device`], [`BudgetRule::needs_newest_attention`]) say what a device
//! computes, so a backend never sees a policy or its parameters. Without the `cuda` feature a
//! stub answers [`Error::CudaUnavailable`](crate::Error::CudaUnavailable).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_stub.rs"]
mod cuda;

use crate::budget::BudgetRule;
use crate::error::Result;
use crate::score::Scorer;
use crate::state::QueryRow;
use crate::view::{Keys, Memory, Shape};

use rayon::prelude::*;
use std::sync::Arc;

/// Which processor scores K.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// K in host memory, scored with rayon
    Cpu,
    /// K in CUDA device memory, scored there (the device must open when the evictor is made)
    Cuda,
    /// per call, where K is: host memory on the CPU, CUDA device memory on that device (the
    /// device is opened at the first call that hands device K)
    Auto,
}

impl Backend {
    /// Decode the C backend code.
    pub fn from_code(code: u32) -> crate::Result<Self> {
        match code {
            0 => Ok(Backend::Cpu),
            1 => Ok(Backend::Cuda),
            2 => Ok(Backend::Auto),
            other => Err(crate::Error::InvalidShape(format!(
                "backend code {other} (expected CPU=0, CUDA=1 or AUTO=2)"
            ))),
        }
    }

    /// The name used in messages (`backend=cpu`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
            Backend::Auto => "auto",
        }
    }
}

/// Scores and, for rules that need it, evidence of one unit.
pub type UnitOut = (Vec<f32>, Option<Vec<f32>>);

/// Everything a backend needs to score every unit of one sequence.
pub struct UnitsIn<'a> {
    /// stage 2 (its device recipe: [`Scorer::device`])
    pub scorer: &'a dyn Scorer,
    /// stage 3's total rule, for its per-unit evidence
    pub rule: &'a dyn BudgetRule,
    /// model geometry
    pub shape: &'a Shape,
    /// K (host or device memory, as the backend expects); `None` for scorers that read no K
    pub keys: Option<&'a Keys<'a>>,
    /// positions of the held cells
    pub pos: &'a [i32],
    /// the query rows the scorer asked for, oldest first
    pub queries: &'a [&'a QueryRow],
    /// carried scores per unit (accumulating scorers)
    pub carry: Option<&'a [Vec<f32>]>,
    /// always-kept cells
    pub protected: &'a [bool],
    /// parallelism of the host-side work
    pub par: &'a Parallelism,
}

/// Fail unless `backend` can run here (CUDA: the feature is compiled in and a device opens;
/// `Auto` always can: it opens a device only when K is handed over in device memory).
pub fn probe(backend: Backend) -> Result<()> {
    match backend {
        Backend::Cpu | Backend::Auto => Ok(()),
        Backend::Cuda => cuda::probe(),
    }
}

/// Scores (and evidence) of every unit `(layer, kv_head)`, in unit order. Where K lives picks
/// the processor: host K on the CPU, CUDA K in place on its device (no host copy). A backend
/// that does not match where K is fails with a message instead of reading the wrong memory; a
/// scorer that reads no K runs on the CPU whatever the backend.
pub fn score_units(backend: Backend, inp: &UnitsIn) -> Result<Vec<UnitOut>> {
    let Some(keys) = inp.keys else {
        return cpu::score_units(inp);
    };
    let memory = keys.memory().ok_or_else(|| {
        crate::Error::InvalidShape(
            "K of one call lives in different memories (host and device, or two devices); \
             hand every layer in one memory"
                .into(),
        )
    })?;
    match (backend, memory) {
        (Backend::Cpu | Backend::Auto, Memory::Host) => cpu::score_units(inp),
        (Backend::Cuda | Backend::Auto, Memory::Cuda(device)) => cuda::score_units(inp, device),
        (Backend::Cpu, Memory::Cuda(device)) => Err(crate::Error::InvalidShape(format!(
            "K is in the memory of CUDA device {device} but backend=cpu (the CPU reads host \
             memory only; use backend=auto or cuda)"
        ))),
        (Backend::Cuda, Memory::Host) => Err(crate::Error::InvalidShape(
            "K is in host memory but backend=cuda (the CUDA backend reads K in device memory; \
             use backend=auto or cpu)"
                .into(),
        )),
    }
}

/// Serial or parallel execution of independent work items.
///
/// `KVC_THREADS` in the environment overrides the programmatic choice: `1` forces serial
/// execution (useful for profiling and for bit-for-bit comparisons), `N` a pool of N threads.
#[derive(Clone)]
pub enum Parallelism {
    /// one item after the other on the calling thread
    Serial,
    /// rayon's global pool
    Global,
    /// a dedicated pool
    Pool(Arc<rayon::ThreadPool>),
}

impl std::fmt::Debug for Parallelism {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Parallelism::Serial => write!(f, "Serial"),
            Parallelism::Global => write!(f, "Global"),
            Parallelism::Pool(p) => write!(f, "Pool({})", p.current_num_threads()),
        }
    }
}

impl Parallelism {
    /// `n_threads`: 0 = all cores, 1 = serial, N = a pool of N threads, capped at the number of
    /// cores (at least 2): more threads than cores never speeds up this CPU-bound work, and an
    /// absurd count from a host would otherwise spawn that many OS threads.
    pub fn new(n_threads: usize) -> Self {
        let n = std::env::var("KVC_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(n_threads);
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        let n = n.min(cores.max(2));
        match n {
            0 => Parallelism::Global,
            1 => Parallelism::Serial,
            n => match rayon::ThreadPoolBuilder::new().num_threads(n).build() {
                Ok(pool) => Parallelism::Pool(Arc::new(pool)),
                Err(_) => Parallelism::Global,
            },
        }
    }

    /// `f(i)` for `i in 0..n`, results in order.
    pub fn map<T, F>(&self, n: usize, f: F) -> Vec<T>
    where
        T: Send,
        F: Fn(usize) -> T + Sync + Send,
    {
        match self {
            Parallelism::Serial => (0..n).map(f).collect(),
            Parallelism::Global => (0..n).into_par_iter().map(f).collect(),
            Parallelism::Pool(pool) => pool.install(|| (0..n).into_par_iter().map(f).collect()),
        }
    }
}
