//! Stage 3 of the pipeline: how many cells to keep, and how they are spread.
//!
//! - A [`BudgetRule`] decides the total for the sequence: a fixed ratio or count (baselines), or
//!   a budget that *emerges* from attention (DBudgetKV's norm-drop stop, GVote's vote).
//! - An [`Allocator`] spreads that total over layers (PyramidKV, DynamicKV) and KV heads
//!   (Ada-KV). Allocators conserve the total.

mod alloc;
mod dbudget;

pub use alloc::{Ada, Dynamic, Pyramid, Uniform};
pub use dbudget::{walk_drops, DBudget, Evidence, Measure};

use crate::score::{ScoreGrid, UnitCtx};
use crate::view::Shape;

/// What a rule sees when it decides.
pub struct DecideCtx<'a> {
    /// model geometry
    pub shape: &'a Shape,
    /// the scorer's output
    pub grid: &'a ScoreGrid,
    /// per unit, what [`BudgetRule::unit_evidence`] returned (empty vectors when unused)
    pub evidence: &'a [Vec<f32>],
    /// positions of the held cells
    pub pos: &'a [i32],
    /// always-kept cells
    pub protected: &'a [bool],
    /// tokens the sequence has seen (highest position + 1)
    pub n_seen: usize,
}

/// A rule's verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// cells to keep in total (protected ones included)
    pub budget: usize,
    /// the token ranking the rule's guarantee refers to (larger = keep first); when `None`, the
    /// selection ranks tokens by how many (layer, head) keep-sets contain them
    pub ranking: Option<Vec<f32>>,
}

/// Total number of cells to keep.
pub trait BudgetRule: Send + Sync {
    /// Per-unit evidence computed in the same pass as the scores (same gathered keys).
    fn unit_evidence(&self, _u: &UnitCtx) -> Option<Vec<f32>> {
        None
    }
    /// The device recipe of [`unit_evidence`](Self::unit_evidence): whether the rule needs the
    /// squared attention of the newest query row per query head, protected cells zeroed
    /// (`[group][n]` per unit), which a device backend computes in its attention pass.
    fn needs_newest_attention(&self) -> bool {
        false
    }
    /// The verdict.
    fn decide(&self, c: &DecideCtx) -> Decision;
    /// True when the budget emerges from the input rather than from a user-set size.
    fn adaptive(&self) -> bool {
        false
    }
}

/// The user-set budget of the baselines.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fixed {
    /// evict this fraction of the tokens seen (kvpress' `compression_ratio`)
    Ratio(f32),
    /// keep this many cells
    Tokens(usize),
}

impl BudgetRule for Fixed {
    fn decide(&self, c: &DecideCtx) -> Decision {
        let want = match *self {
            Fixed::Ratio(r) => keep_for_ratio(r, c.n_seen),
            Fixed::Tokens(t) => t,
        };
        Decision {
            budget: want.min(c.pos.len()),
            ranking: None,
        }
    }
}

/// Cells kept when a fraction `r` of `n_seen` tokens is evicted: `ceil((1 - r) * n_seen)`.
///
/// `r` comes from a decimal string through f32, which is inexact (0.7 is 0.699999988), and a
/// plain `ceil` then keeps one cell too many (4 of 10 at 0.7). The ratio is taken back to the
/// shortest decimal that reads as the same f32, and the product is computed in f64 with a tiny
/// tolerance for the f64 rounding of that decimal.
pub fn keep_for_ratio(r: f32, n_seen: usize) -> usize {
    let r: f64 = format!("{r}").parse().unwrap_or(r as f64);
    let keep = (1.0 - r) * n_seen as f64;
    (keep - 1e-9 * keep.max(1.0)).ceil().max(0.0) as usize
}

/// GVote's budget: every cell that at least `min_votes` units voted for (a unit votes for a
/// cell when any of its sampled queries' top-p nuclei contains it). `min_votes = 1` is the
/// union, the lossless end of the knob.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Vote {
    /// fraction of the (layer, KV head) units that must vote for a cell; 0 = union
    pub quorum: f32,
}

impl Vote {
    /// Per cell: number of units that voted for it.
    pub fn tally(grid: &ScoreGrid) -> Vec<u32> {
        let mut v = vec![0u32; grid.n()];
        for u in &grid.units {
            v.iter_mut()
                .zip(u)
                .for_each(|(t, s)| *t += (*s > 0.0) as u32);
        }
        v
    }

    /// Votes needed for a cell to stay.
    pub fn min_votes(&self, n_units: usize) -> u32 {
        ((self.quorum as f64 * n_units as f64).ceil() as u32).max(1)
    }
}

impl BudgetRule for Vote {
    fn decide(&self, c: &DecideCtx) -> Decision {
        let tally = Self::tally(c.grid);
        let need = self.min_votes(c.grid.units.len());
        let budget = tally
            .iter()
            .zip(c.protected)
            .filter(|(&v, &p)| p || v >= need)
            .count();
        // cells with enough votes come first (so the kept set is exactly them plus the
        // protected cells); within each tier a cell ranks by the best rank it reaches in any
        // unit's vote shares (a cell every ballot of one head wants beats a cell many heads want
        // a little): under a tight cap a plain sum of shares let the filler outvote a needle
        let best =
            crate::select::best_rank_of(&c.grid.units, c.pos, c.protected, &c.grid.token_mean());
        let tier = (tally.len() + 2) as f32;
        let ranking = best
            .iter()
            .zip(&tally)
            .map(|(&b, &v)| if v >= need { b + tier } else { b })
            .collect();
        Decision {
            budget,
            ranking: Some(ranking),
        }
    }
    fn adaptive(&self) -> bool {
        true
    }
}

/// Spread a per-unit budget over units.
pub trait Allocator: Send + Sync {
    /// `per_unit` candidate cells per unit on average → one count per unit (each at most the
    /// number of candidates), summing to `per_unit * n_units` (clamped to what exists).
    fn allocate(&self, grid: &ScoreGrid, cand: &[bool], per_unit: usize) -> Vec<usize>;
    /// True when every unit always gets the same budget (the token projection then needs no
    /// allocation at all).
    fn uniform(&self) -> bool {
        false
    }
}

/// Adjust `v` so it sums to `target`, every entry staying within `cap`; growth goes to the
/// entries with the largest `prio` first, shrinking takes from the largest entries first.
pub(crate) fn fix_sum(v: &mut [usize], target: usize, cap: usize, prio: &[f32]) {
    let target = target.min(cap * v.len());
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| prio[b].total_cmp(&prio[a]).then(a.cmp(&b)));
    v.iter_mut().for_each(|x| *x = (*x).min(cap));
    let mut sum: usize = v.iter().sum();
    while sum < target {
        let mut progressed = false;
        for &i in &order {
            if sum == target {
                break;
            }
            if v[i] < cap {
                v[i] += 1;
                sum += 1;
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
    }
    while sum > target {
        let i = (0..v.len())
            .max_by(|&a, &b| v[a].cmp(&v[b]).then(b.cmp(&a)))
            .unwrap_or(0);
        v[i] -= 1;
        sum -= 1;
    }
}
