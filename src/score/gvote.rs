//! GVote (arXiv 2509.03136): sample plausible *future* queries and let each vote for the keys
//! it needs. The paper keeps the union of the votes; here a (layer, KV head) unit votes for the
//! cells its real newest queries need or that at least `support` of its samples need, and the
//! rule (`budget::Vote`) keeps the cells a `quorum` of units votes for (`support=0 quorum=0` is
//! the union, which on a short prompt is every cell).
//!
//! The paper fits a Gaussian to normalized hidden states and projects samples through W_q.
//! The library never sees hidden states or weights, so it fits the Gaussian to the captured
//! queries of the observation window, per query head, after moving each to the next position
//! with the engine's rotary embedding (`Shape::rope`; unmoved when unknown), with the window's
//! own (low-rank) covariance. That models the query distribution at the next positions, which
//! is what the next tokens will produce. Each sample (and the real newest query) marks its
//! top-p nucleus over all held keys (a future query sees every cached key).

use super::{QuerySel, Scorer, UnitCtx};
use crate::kernels;

/// Cost units of one GVote ballot, from results/bench-plan.json (SmolLM2-135M shape, 8192
/// cells, 2 threads): a plan with the default 9 ballots took 520 ms, a 9-row dbudget plan 137 ms
/// and a 32-row snapkv plan 225 ms, so a row is ~3.8 ms, the fixed ranking/selection ~27 rows
/// and a ballot ~46 ms = 12 rows when the nucleus sorted the held cells. Since a unit's ballots
/// share their passes over K and each nucleus is a radix selection (`kernels::mark_nucleus`), a
/// gvote plan costs about what a dbudget plan does (results/bench-plan-gvote-fast.json), i.e. a
/// ballot ~1-2 rows; 12 is kept, an upper bound, so that the cost bounds operators set against
/// it keep their meaning.
const BALLOT_COST: f32 = 12.0;

/// The GVote scorer: per cell, the fraction of (query head, sample) nuclei that contain it.
#[derive(Debug, Clone)]
pub struct GVote {
    /// observation window: query rows the Gaussian is fitted to
    pub window: usize,
    /// nucleus mass each sampled query must keep
    pub p: f32,
    /// Monte-Carlo samples per query head (the real newest query is added to them)
    pub samples: usize,
    /// share of a unit's samples whose nuclei must hold a cell for the unit to vote for it (the
    /// real newest queries' nuclei always vote); 0 = any sample, the paper's union
    pub support: f32,
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
    /// plus a selection of its nucleus: `BALLOT_COST` units (an upper bound). The
    /// fit and each draw read the window once (`window * head_dim` per head and sample, well
    /// under a unit per ballot while the window is shorter than the cells held): 2 units.
    fn cost_units(&self, _rows: usize) -> f32 {
        (self.samples + 1) as f32 * BALLOT_COST + 2.0
    }
    fn score_unit(&self, u: &UnitCtx) -> Vec<f32> {
        let n = u.n();
        let d = u.shape.head_dim;
        let Some(newest) = u.queries.last() else {
            return vec![0.0; n];
        };
        // every ballot of the unit, per query head: the real newest query first (GVote's
        // "single-step budget estimation"), then its samples; they are cast together below
        let heads = u.heads().len();
        let per_head = 1 + self.samples;
        let mut ballots = vec![0.0f32; heads * per_head * d];
        // the samples are queries of the next position: every window row is first moved there
        // (its rotary angle advanced by the distance, `Shape::rope`), so the fit sees how the
        // queries' content varies and not how their rotation spins with position, which
        // scattered the samples over every relative offset (results/gvote-tuning.md)
        let target = newest.pos as i64 + 1;
        let rows = u.queries.len();
        let mut aligned = vec![0.0f32; rows * d];
        let mut mean = vec![0.0f32; d];
        for (h, mine) in u.heads().zip(ballots.chunks_exact_mut(per_head * d)) {
            let (real, samples) = mine.split_at_mut(d);
            real.copy_from_slice(u.q(newest, h));
            if self.samples == 0 {
                continue;
            }
            for (r, dst) in u.queries.iter().zip(aligned.chunks_exact_mut(d)) {
                dst.copy_from_slice(u.q(r, h));
                u.shape.rope.shift(dst, target - r.pos as i64);
            }
            mean.iter_mut().for_each(|m| *m = 0.0);
            for a in aligned.chunks_exact(d) {
                mean.iter_mut()
                    .zip(a)
                    .for_each(|(m, v)| *m += v / rows as f32);
            }
            for a in aligned.chunks_exact_mut(d) {
                a.iter_mut().zip(&mean).for_each(|(v, m)| *v -= m);
            }
            // a draw from the Gaussian with the window's own mean and full covariance (rank <
            // rows): mean + sum_r z_r (row_r - mean) / sqrt(rows - 1), z ~ N(0, 1). It stays in
            // the span of real queries, where a diagonal fit draws every dimension independently
            let norm = 1.0 / ((rows.max(2) - 1) as f32).sqrt();
            let mut rng = Rng::new(self.stream_seed(u.layer, h));
            for q in samples.chunks_exact_mut(d) {
                q.copy_from_slice(&mean);
                for a in aligned.chunks_exact(d) {
                    let z = rng.normal() * norm;
                    q.iter_mut().zip(a).for_each(|(v, c)| *v += z * c);
                }
            }
        }
        // each ballot marks its nucleus; K is read once per four ballots, not once per ballot
        let (mut real, mut sampled) = (vec![0u32; n], vec![0u32; n]);
        let mut marks = vec![false; n];
        let mut scratch = Vec::new();
        let qs: Vec<&[f32]> = ballots.chunks_exact(d).collect();
        u.attend(&qs, i32::MAX, |i, probs| {
            kernels::mark_nucleus(probs, self.p, &mut marks, &mut scratch);
            let votes = if i % per_head == 0 {
                &mut real
            } else {
                &mut sampled
            };
            votes
                .iter_mut()
                .zip(&marks)
                .for_each(|(v, &m)| *v += m as u32);
        });
        // the unit votes for a cell its real newest queries want, or that at least `support`
        // of its sampled queries want (a Monte-Carlo estimate that a future query needs it);
        // a union over every sample votes for most cells of a short prompt. The score (the
        // larger share) ranks the voted cells for the rule's tie-breaks; 0 = no vote
        let n_sampled = (heads * self.samples).max(1) as f32;
        let shares: Vec<f32> = real
            .iter()
            .zip(&sampled)
            .map(|(&r, &s)| {
                let (r, s) = (r as f32 / heads as f32, s as f32 / n_sampled);
                if r > 0.0 || (s > 0.0 && s >= self.support) {
                    r.max(s)
                } else {
                    0.0
                }
            })
            .collect();
        kernels::pool1d(&shares, self.kernel, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::QueryRow;
    use crate::view::{Rope, RopeFreq, Shape};

    /// Cells a unit votes for (share > 0) when every window query has the same content, rotated
    /// by `rope` to its own position (the scorer is `told` the rotation or not): with the
    /// rotation known the samples are that one query at the next position, so they add little
    /// to the newest query's own nucleus; without it they scatter.
    fn coverage(rope: Rope, told: Rope, samples: usize) -> usize {
        let (d, n, w) = (16, 96, 16);
        let shape = Shape::new(1, 1, 1, d, 0.5).unwrap().with_rope(told);
        let mut rng = Rng::new(3);
        let keys_rows: Vec<Vec<f32>> = (0..n)
            .map(|i| {
                let mut k: Vec<f32> = (0..d).map(|_| rng.normal()).collect();
                rope.shift(&mut k, i as i64);
                k
            })
            .collect();
        let keys: Vec<f32> = (0..d)
            .flat_map(|j| keys_rows.iter().map(move |k| k[j]))
            .collect();
        let pos: Vec<i32> = (0..n as i32).collect();
        let content: Vec<f32> = (0..d).map(|_| rng.normal()).collect();
        let rows: Vec<QueryRow> = (n - w..n)
            .map(|p| {
                let mut q = content.clone();
                rope.shift(&mut q, p as i64);
                QueryRow {
                    pos: p as i32,
                    data: q.into_boxed_slice(),
                }
            })
            .collect();
        let refs: Vec<&QueryRow> = rows.iter().collect();
        let protected = vec![false; n];
        let u = UnitCtx {
            shape: &shape,
            layer: 0,
            kv_head: 0,
            keys: &keys,
            pos: &pos,
            queries: &refs,
            carry: None,
            protected: &protected,
        };
        let g = GVote {
            window: w,
            p: 0.9,
            samples,
            support: 0.0,
            seed: 0,
            kernel: 1,
        };
        g.score_unit(&u).iter().filter(|&&s| s > 0.0).count()
    }

    #[test]
    fn samples_of_rotated_queries_do_not_scatter_when_the_rope_is_known() {
        let f = RopeFreq {
            n_rot: 16,
            freq_base: 10000.0,
            freq_scale: 1.0,
        };
        let rope = Rope::Norm(f);
        let newest = coverage(rope, rope, 0);
        let known = coverage(rope, rope, 16);
        let unknown = coverage(rope, Rope::Unknown, 16);
        // 96 cells: 44 / 48 / 71 at the time of writing
        assert!(
            known <= newest + 6,
            "{known} cells vs {newest} for the newest query alone"
        );
        assert!(
            unknown > known + 12,
            "{unknown} cells unaligned vs {known} aligned"
        );
    }

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
