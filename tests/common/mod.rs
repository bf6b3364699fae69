//! Shared helpers of the integration tests: a tiny seeded RNG, generators of keys and queries
//! with known attention patterns (peaked, flat, sink-heavy), and a one-call driver of the
//! evictor.
//!
//! Each test binary uses a different subset, so unused items are allowed.
#![allow(dead_code)]

use kvcompress::backend::{Backend, Parallelism};
use kvcompress::{Evictor, OwnedKeys, Plan, Policy, SeqInput, Shape};

/// SplitMix64: deterministic, dependency-free, good enough for test data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0xD1B5_4A32_D192_ED03)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = (self.uniform() as f64).max(1e-12);
        let u2 = self.uniform() as f64;
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

/// How the generated queries spread their attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// each query head points at a few "hot" cells; most mass lands there
    Peaked,
    /// small keys and queries: attention close to uniform
    Flat,
    /// the oldest cells carry a shared direction every query follows (attention sinks)
    SinkHeavy,
}

/// Every pattern, for strategies.
pub const PATTERNS: [Pattern; 3] = [Pattern::Peaked, Pattern::Flat, Pattern::SinkHeavy];

/// One generated sequence: held cells, K and the captured query rows.
#[derive(Debug, Clone)]
pub struct Case {
    /// model geometry
    pub shape: Shape,
    /// positions of the held cells, strictly ascending
    pub pos: Vec<i32>,
    /// engine cell ids (distinct, not equal to the positions)
    pub cells: Vec<u32>,
    /// K, `[n_layer][n_cells][n_head_kv*head_dim]`
    pub keys: OwnedKeys,
    /// positions of the query rows, strictly ascending (the newest tokens)
    pub q_pos: Vec<i32>,
    /// query rows, `[n_layer][n_q][n_head*head_dim]`
    pub q: Vec<f32>,
}

impl Case {
    /// The sequence as the evictor sees it.
    pub fn input(&self, max_cells: usize) -> SeqInput<'_> {
        SeqInput {
            seq_id: 7,
            cells: &self.cells,
            pos: &self.pos,
            max_cells,
            prompt_end: true,
            room: false,
        }
    }

    /// Query rows as `(pos, [n_layer][n_head*head_dim])`, the layout of
    /// `kvcompress::reference::window_scores`.
    pub fn query_rows(&self) -> Vec<(i32, Vec<f32>)> {
        let row = self.shape.q_row_len();
        let n_q = self.q_pos.len();
        (0..n_q)
            .map(|i| {
                let mut data = Vec::with_capacity(self.shape.n_layer * row);
                for l in 0..self.shape.n_layer {
                    let off = (l * n_q + i) * row;
                    data.extend_from_slice(&self.q[off..off + row]);
                }
                (self.q_pos[i], data)
            })
            .collect()
    }

    /// The newest `k` query rows only (same layout as `q`).
    pub fn last_queries(&self, k: usize) -> (Vec<i32>, Vec<f32>) {
        let n_q = self.q_pos.len();
        let from = n_q.saturating_sub(k);
        let row = self.shape.q_row_len();
        let mut q = Vec::new();
        for l in 0..self.shape.n_layer {
            q.extend_from_slice(&self.q[(l * n_q + from) * row..(l * n_q + n_q) * row]);
        }
        (self.q_pos[from..].to_vec(), q)
    }
}

/// Generate a sequence of `n` held cells (with gaps: some positions were evicted before) and
/// `n_q` query rows for the newest positions.
pub fn gen_case(shape: Shape, n: usize, n_q: usize, pattern: Pattern, seed: u64) -> Case {
    assert!(n >= 1);
    let mut rng = Rng::new(seed);
    // positions: ascending with random gaps, starting at 0 most of the time
    let mut pos = Vec::with_capacity(n);
    let mut p: i32 = if rng.below(4) == 0 {
        rng.below(3) as i32
    } else {
        0
    };
    for _ in 0..n {
        pos.push(p);
        p += 1 + if rng.below(3) == 0 {
            rng.below(3) as i32
        } else {
            0
        };
    }
    let cells: Vec<u32> = (0..n as u32).map(|i| 1000 + 3 * i).collect();
    let d = shape.head_dim;
    let row_k = shape.n_head_kv * d;
    let (key_scale, q_scale) = match pattern {
        Pattern::Peaked => (1.0, 1.0),
        Pattern::Flat => (0.05, 0.05),
        Pattern::SinkHeavy => (0.5, 0.5),
    };
    let mut k = vec![0.0f32; shape.n_layer * n * row_k];
    for v in &mut k {
        *v = key_scale * rng.normal();
    }
    // a shared "sink" direction per (layer, kv head)
    let sink_dir: Vec<f32> = (0..shape.n_layer * row_k).map(|_| rng.normal()).collect();
    if pattern == Pattern::SinkHeavy {
        let n_sink = n.min(1 + rng.below(3));
        for l in 0..shape.n_layer {
            for c in 0..n_sink {
                for e in 0..row_k {
                    k[(l * n + c) * row_k + e] += 3.0 * sink_dir[l * row_k + e];
                }
            }
        }
    }
    // query rows at the newest positions (the last n_q held cells' positions)
    let n_q = n_q.min(n).max(1);
    let q_pos: Vec<i32> = pos[n - n_q..].to_vec();
    let row_q = shape.q_row_len();
    let group = shape.group();
    let mut q = vec![0.0f32; shape.n_layer * n_q * row_q];
    for l in 0..shape.n_layer {
        for (i, &qp) in q_pos.iter().enumerate() {
            for h in 0..shape.n_head {
                let g = h / group;
                let dst = (l * n_q + i) * row_q + h * d;
                let noise: Vec<f32> = (0..d).map(|_| q_scale * rng.normal()).collect();
                match pattern {
                    Pattern::Peaked => {
                        // follow one of the visible keys, strongly
                        let vis = pos.partition_point(|&x| x <= qp).max(1);
                        let hot = rng.below(vis);
                        let gain = rng.range(2.0, 4.0);
                        for e in 0..d {
                            q[dst + e] = gain * k[(l * n + hot) * row_k + g * d + e] + noise[e];
                        }
                    }
                    Pattern::Flat => q[dst..dst + d].copy_from_slice(&noise),
                    Pattern::SinkHeavy => {
                        for e in 0..d {
                            q[dst + e] = sink_dir[l * row_k + g * d + e] + noise[e];
                        }
                    }
                }
            }
        }
    }
    let keys = OwnedKeys::new(&shape, n, k).expect("key buffer size");
    Case {
        shape,
        pos,
        cells,
        keys,
        q_pos,
        q,
    }
}

/// An evictor on the CPU backend.
pub fn evictor(shape: Shape, name: &str, params: &[&str], threads: usize) -> Evictor {
    let policy = Policy::parse(name, params).unwrap_or_else(|e| panic!("{name} {params:?}: {e}"));
    Evictor::new(shape, policy, Parallelism::new(threads), Backend::Cpu).expect("cpu evictor")
}

/// Push the case's queries, then plan once.
pub fn plan_case(ev: &mut Evictor, case: &Case, max_cells: usize) -> Plan {
    ev.push_queries(7, &case.q_pos, &case.q)
        .expect("push_queries");
    let keys = case.keys.view(&case.shape);
    ev.plan(&case.input(max_cells), Some(&keys)).expect("plan")
}

/// Fresh evictor for `name params`, push, plan: the plan and the kept flags per held cell.
pub fn run(
    case: &Case,
    name: &str,
    params: &[&str],
    threads: usize,
    max_cells: usize,
) -> (Plan, Vec<bool>) {
    let mut ev = evictor(case.shape, name, params, threads);
    let plan = plan_case(&mut ev, case, max_cells);
    let keep = kept_flags(&case.cells, &plan);
    (plan, keep)
}

/// Per held cell: not in the plan's eviction list.
pub fn kept_flags(cells: &[u32], plan: &Plan) -> Vec<bool> {
    cells
        .iter()
        .map(|c| plan.evict.binary_search(c).is_err())
        .collect()
}

/// Indices of set flags.
pub fn which(flags: &[bool]) -> Vec<usize> {
    flags
        .iter()
        .enumerate()
        .filter(|(_, &f)| f)
        .map(|(i, _)| i)
        .collect()
}

/// Normalized mean squared error of `got` against `want`.
pub fn nmse(got: &[f32], want: &[f64]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| w * w).sum::<f64>().max(1e-30);
    num / den
}
