//! Stage 2 of the pipeline: how important is each cached token, per (layer, KV head)?
//!
//! A scorer works on one *unit* (a layer and a KV head) at a time, so the CPU backend runs units
//! in parallel and the CUDA backend maps a unit to a block. Scores are computed per query head
//! and reduced over the GQA group (mean or max): KV heads are never expanded.

mod gvote;
mod simple;
mod window;

pub use gvote::GVote;
pub use simple::{KeyNorm, Position, PositionWithQueries};
pub use window::{Accumulated, ContextAttention, WindowAttention};

use crate::kernels;
use crate::state::QueryRow;
use crate::view::Shape;

/// How the query heads of one GQA group are folded into one KV-head score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GqaReduce {
    /// average over the group (kvpress, Ada-KV default)
    Mean,
    /// maximum over the group
    Max,
}

impl GqaReduce {
    /// Fold `[group][n]` into `[n]`.
    pub fn fold(self, per_head: &[Vec<f32>]) -> Vec<f32> {
        let n = per_head.first().map_or(0, |v| v.len());
        let mut out = vec![0.0f32; n];
        match self {
            GqaReduce::Mean => {
                for h in per_head {
                    out.iter_mut().zip(h).for_each(|(o, v)| *o += v);
                }
                let inv = 1.0 / per_head.len().max(1) as f32;
                out.iter_mut().for_each(|o| *o *= inv);
            }
            GqaReduce::Max => {
                out.iter_mut().for_each(|o| *o = f32::NEG_INFINITY);
                for h in per_head {
                    out.iter_mut().zip(h).for_each(|(o, v)| *o = o.max(*v));
                }
            }
        }
        out
    }
}

/// How a device backend computes a scorer's unit scores: the kernel and the folding/pooling it
/// needs, stated by the scorer itself so a backend never rebuilds a policy from its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DeviceScore {
    /// attention each cell receives from the rows, averaged over the rows, reduced over the GQA
    /// group, then pooled along the cells with an odd `kernel` (1 = none)
    Window {
        /// pooling kernel (odd; 1 = none)
        kernel: usize,
        /// max pooling (true) or average
        max_pool: bool,
        /// group reduction
        gqa: GqaReduce,
    },
    /// attention received summed over the rows, GQA fold, plus the carried scores
    Accumulated {
        /// group reduction
        gqa: GqaReduce,
    },
    /// `-||k||`
    KeyNorm,
    /// the cell's position
    Position,
    /// no device kernel: the backend gathers the unit's keys and runs [`Scorer::score_unit`]
    Host,
}

/// Which of the remembered query rows a scorer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuerySel {
    /// none (position or key-only scorers)
    None,
    /// the newest `n` rows
    Last(usize),
    /// every row not yet folded into the carried scores (H2O)
    Unconsumed,
    /// rows spread over the whole sequence: every position that is a multiple of `stride`, plus
    /// the newest `newest`; at most `cap` spread rows are remembered (thinned by halves beyond)
    Spread {
        /// distance between sampled positions
        stride: usize,
        /// newest rows always read
        newest: usize,
        /// most spread rows remembered per sequence
        cap: usize,
    },
}

/// A reconstruction pass a scorer asks the engine for (KVzip, arXiv 2505.23416): after a prompt's
/// end, the engine teacher-forces "repeat the previous context" followed by the context's own
/// tokens, in chunks, on the same sequence after its end, hands the query rows of those positions
/// over (`Evictor::push_recon`) and frees the scratch cells; the next plan reads those rows, which
/// attend to the whole context, instead of the context's own causal ones.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Recon {
    /// fraction of the context's chunks reconstructed (0..1]: a sample, evenly spread, costs that
    /// fraction of an extra prefill
    pub fraction: f32,
    /// one reconstruction query row in `stride` is handed over
    pub stride: usize,
    /// most reconstruction rows read by one plan (thinned by halves beyond)
    pub cap: usize,
}

/// Everything one (layer, KV head) unit sees.
pub struct UnitCtx<'a> {
    /// model geometry
    pub shape: &'a Shape,
    /// layer index
    pub layer: usize,
    /// KV head index
    pub kv_head: usize,
    /// this head's keys for every held cell, transposed `[head_dim][n]` f32, ascending position
    pub keys: &'a [f32],
    /// positions of the held cells, ascending
    pub pos: &'a [i32],
    /// the query rows the scorer asked for, oldest first
    pub queries: &'a [&'a QueryRow],
    /// carried scores for this unit, aligned to `pos` (H2O)
    pub carry: Option<&'a [f32]>,
    /// cells that are always kept
    pub protected: &'a [bool],
}

impl UnitCtx<'_> {
    /// Number of held cells.
    pub fn n(&self) -> usize {
        self.pos.len()
    }

    /// Query heads of this unit's GQA group.
    pub fn heads(&self) -> std::ops::Range<usize> {
        let g = self.shape.group();
        self.kv_head * g..(self.kv_head + 1) * g
    }

    /// Query vector of global head `h` in `row`.
    pub fn q<'r>(&self, row: &'r QueryRow, h: usize) -> &'r [f32] {
        let d = self.shape.head_dim;
        let off = self.layer * self.shape.q_row_len() + h * d;
        &row.data[off..off + d]
    }

    /// The unit's keys as the CPU kernels read them (transposed, `[head_dim][n]`).
    pub fn keys_t(&self) -> kernels::KeysT<'_> {
        kernels::KeysT {
            data: self.keys,
            n: self.n(),
            d: self.shape.head_dim,
        }
    }

    /// Attention rows of several queries at position `qpos` over the held keys they may see
    /// (causal; `i32::MAX`: every key, as a future query sees them), passed to `sink(index,
    /// row)` in order; a query that sees no key is skipped. K is read once per four queries
    /// (`kernels::attention_rows`), so a scorer hands over all its queries at once.
    pub fn attend(&self, qs: &[&[f32]], qpos: i32, sink: impl FnMut(usize, &[f32])) {
        let n_vis = kernels::visible(self.pos, qpos);
        let qs: Vec<(&[f32], usize)> = qs.iter().map(|&q| (q, n_vis)).collect();
        kernels::attention_rows(&qs, self.keys_t(), self.shape.kq_scale, sink);
    }

    /// Per query head of the group: the largest attention each cell receives from any of `rows`.
    pub fn received_max(&self, rows: &[&QueryRow]) -> Vec<Vec<f32>> {
        self.received_folded(rows, |a, p| *a = a.max(p))
    }

    /// Per query head of the group: the attention mass each cell receives from `rows`, summed.
    pub fn received(&self, rows: &[&QueryRow]) -> Vec<Vec<f32>> {
        self.received_folded(rows, |a, p| *a += p)
    }

    /// Per query head of the group: each cell's attention from `rows`, folded row by row into
    /// an accumulator starting at 0 (sum or max).
    fn received_folded(&self, rows: &[&QueryRow], fold: impl Fn(&mut f32, f32)) -> Vec<Vec<f32>> {
        let n = self.n();
        self.heads()
            .map(|h| {
                let mut acc = vec![0.0f32; n];
                let qs: Vec<(&[f32], usize)> = rows
                    .iter()
                    .map(|r| (self.q(r, h), kernels::visible(self.pos, r.pos)))
                    .collect();
                kernels::attention_rows(&qs, self.keys_t(), self.shape.kq_scale, |_, row| {
                    acc.iter_mut().zip(row).for_each(|(a, &p)| fold(a, p))
                });
                acc
            })
            .collect()
    }
}

/// Importance of each held cell for one unit; larger means more worth keeping.
pub trait Scorer: Send + Sync {
    /// The query rows this scorer reads.
    fn queries(&self) -> QuerySel;
    /// Whether it reads K at all (position-only scorers do not).
    fn needs_keys(&self) -> bool {
        true
    }
    /// Whether the returned scores are carried to the next plan (accumulating scorers).
    fn carries(&self) -> bool {
        false
    }
    /// Score one unit: one value per held cell.
    fn score_unit(&self, u: &UnitCtx) -> Vec<f32>;
    /// The device recipe of [`score_unit`](Self::score_unit); [`DeviceScore::Host`] (the
    /// default) runs the CPU arithmetic on keys gathered by the device.
    fn device(&self) -> DeviceScore {
        DeviceScore::Host
    }
    /// The reconstruction pass this scorer wants at a prompt's end (none by default).
    fn recon(&self) -> Option<Recon> {
        None
    }
    /// Scoring work of one plan that reads `rows` query rows, in cost units (one query row of
    /// every query head against every held key; `policy::Cost`). The default: each row read is
    /// one unit, a K-only scorer one pass over K, a position scorer nothing.
    fn cost_units(&self, rows: usize) -> f32 {
        match (self.needs_keys(), self.queries()) {
            (false, _) => 0.0,
            (true, QuerySel::None) => 1.0,
            (true, _) => rows as f32,
        }
    }
}

/// Scores of every unit: `units[layer * n_head_kv + kv_head][cell]`.
#[derive(Debug, Clone)]
pub struct ScoreGrid {
    /// layers
    pub n_layer: usize,
    /// KV heads
    pub n_head_kv: usize,
    /// one score vector per unit
    pub units: Vec<Vec<f32>>,
}

impl ScoreGrid {
    /// Held cells.
    pub fn n(&self) -> usize {
        self.units.first().map_or(0, |u| u.len())
    }

    /// Scores of unit (l, g).
    pub fn unit(&self, l: usize, g: usize) -> &[f32] {
        &self.units[l * self.n_head_kv + g]
    }

    /// Per unit, scores divided by the unit's total (attention-like mass that sums to 1), so
    /// units can be compared; a unit with no positive mass is left as is.
    pub fn normalized(&self) -> Vec<Vec<f32>> {
        self.units
            .iter()
            .map(|u| {
                let min = u.iter().copied().fold(f32::INFINITY, f32::min);
                let shift = if min < 0.0 { -min } else { 0.0 };
                let sum: f32 = u.iter().map(|v| v + shift).sum();
                if sum > 0.0 && sum.is_finite() {
                    u.iter().map(|v| (v + shift) / sum).collect()
                } else {
                    u.clone()
                }
            })
            .collect()
    }

    /// One score per cell: the mean of the normalized unit scores.
    pub fn token_mean(&self) -> Vec<f32> {
        let n = self.n();
        let norm = self.normalized();
        let mut out = vec![0.0f32; n];
        for u in &norm {
            out.iter_mut().zip(u).for_each(|(o, v)| *o += v);
        }
        let inv = 1.0 / norm.len().max(1) as f32;
        out.iter_mut().for_each(|o| *o *= inv);
        out
    }
}
