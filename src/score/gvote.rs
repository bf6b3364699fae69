//! GVote (arXiv 2509.03136): sample plausible *future* queries and let each vote for the keys
//! it needs. The paper keeps the union of the votes; here the rule
//! (`budget::Vote`) keeps the cells a quorum of (layer, KV head) units votes for
//! (`quorum=0.5` by default; `quorum=0` is the union).
//!
//! The paper fits a Gaussian to normalized hidden states and projects samples through W_q.
//! The library never sees hidden states or weights, so it fits the Gaussian directly to the
//! captured post-RoPE queries of the observation window, per query head, with a diagonal
//! covariance. That models the query distribution at nearby positions, which is what the next
//! tokens will produce. Each sample (and the real newest query) marks its top-p nucleus over
//! all held keys (a future query sees every cached key).

use super::{QuerySel, Scorer, UnitCtx};
use crate::kernels;

/// Cost units of one GVote ballot, from results/bench-plan.json (SmolLM2-135M shape, 8192
/// cells, 2 threads): a plan with the default 9 ballots took 520 ms, a 9-row dbudget plan 137 ms
/// and a 32-row snapkv plan 225 ms, so a row is ~3.8 ms, the fixed ranking/selection ~27 rows
/// and a ballot ~46 ms = 12 rows (the nucleus sorts the held cells).
pub const BALLOT_COST: f32 = 12.0;

/// The GVote scorer: per cell, the fraction of (query head, sample) nuclei that contain it.
#[derive(Debug, Clone)]
pub struct GVote {
    /// observation window: query rows the Gaussian is fitted to
    pub window: usize,
    /// nucleus mass each sampled query must keep
    pub p: f32,
    /// Monte-Carlo samples per query head (the real newest query is added to them)
    pub samples: usize,
    /// seed of the sampler; results are deterministic for a seed
    pub seed: u64,
    /// max-pooling kernel over the vote shares (1 = none): a cell next to a voted one shares
    /// its vote, so a multi-token entity is kept whole
    pub kernel: usize,
}

/// SplitMix64: tiny, fast and good enough to draw Gaussian samples reproducibly.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Box-Muller
    fn normal(&mut self) -> f32 {
        let (u1, u2) = (self.uniform(), self.uniform());
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

impl GVote {
    /// Seed of one (layer, query head) stream, independent of thread scheduling.
    fn stream_seed(&self, layer: usize, head: usize) -> u64 {
        self.seed
            .wrapping_mul(0x100_0000_01B3)
            .wrapping_add((layer as u64) << 32 | head as u64)
    }
}

impl Scorer for GVote {
    fn queries(&self) -> QuerySel {
        QuerySel::Last(self.window)
    }
    /// Each ballot (the newest query and every sample, per query head) is one attention row
    /// plus a sort of the held cells for its nucleus, which dominates: `BALLOT_COST` units. The
    /// Gaussian fit reads the window twice (`2 * window * head_dim` per head, at most 2 units
    /// while the window is no longer than the cells held).
    fn cost_units(&self, _rows: usize) -> f32 {
        (self.samples + 1) as f32 * BALLOT_COST + 2.0
    }
    fn score_unit(&self, u: &UnitCtx) -> Vec<f32> {
        let n = u.n();
        let d = u.shape.head_dim;
        let mut votes = vec![0u32; n];
        let mut marks = vec![false; n];
        let mut probs = vec![0.0f32; n];
        let mut scratch = Vec::new();
        let mut ballots = 0u32;
        let Some(newest) = u.queries.last() else {
            return vec![0.0; n];
        };
        let mut cast = |q: &[f32], votes: &mut [u32]| {
            marks.iter_mut().for_each(|m| *m = false);
            if u.attend(q, i32::MAX, &mut probs) {
                kernels::mark_nucleus(&probs, self.p, &mut marks, &mut scratch);
                votes
                    .iter_mut()
                    .zip(&marks)
                    .for_each(|(v, &m)| *v += m as u32);
            }
        };
        for h in u.heads() {
            // the real newest query votes first (GVote's "single-step budget estimation")
            cast(u.q(newest, h), &mut votes);
            ballots += 1;
            // diagonal Gaussian fitted to the window's queries of this head
            let rows = u.queries.len() as f32;
            let mut mean = vec![0.0f32; d];
            for r in u.queries {
                mean.iter_mut()
                    .zip(u.q(r, h))
                    .for_each(|(m, v)| *m += v / rows);
            }
            let mut std = vec![0.0f32; d];
            for r in u.queries {
                std.iter_mut()
                    .zip(u.q(r, h))
                    .zip(&mean)
                    .for_each(|((s, v), m)| *s += (v - m) * (v - m) / rows);
            }
            std.iter_mut().for_each(|s| *s = s.sqrt());
            let mut rng = Rng::new(self.stream_seed(u.layer, h));
            let mut q = vec![0.0f32; d];
            for _ in 0..self.samples {
                for k in 0..d {
                    q[k] = mean[k] + std[k] * rng.normal();
                }
                cast(&q, &mut votes);
                ballots += 1;
            }
        }
        let shares: Vec<f32> = votes
            .iter()
            .map(|&v| v as f32 / ballots.max(1) as f32)
            .collect();
        kernels::pool1d(&shares, self.kernel, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_roughly_standard() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let xs: Vec<f32> = (0..4000).map(|_| a.normal()).collect();
        assert!(xs
            .iter()
            .zip((0..4000).map(|_| b.normal()))
            .all(|(x, y)| *x == y));
        let mean = xs.iter().sum::<f32>() / xs.len() as f32;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / xs.len() as f32;
        assert!(
            mean.abs() < 0.1 && (var - 1.0).abs() < 0.1,
            "mean {mean} var {var}"
        );
    }
}
