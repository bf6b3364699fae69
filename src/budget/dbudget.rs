//! DBudgetKV / ReFreeKV (arXiv 2502.16886): prune from the least important cell upwards and stop
//! when the attention the newest query pays to what is left has lost more than `T` of its norm.
//!
//! Per layer `l` and query head `h`, let `a_lh` be the newest query's attention over the
//! candidate cells (protected cells zeroed). The retained norm after removing a set `R` is
//! `kept_l(R) = mean_h ||a_lh without R||_2`, and `drop_l = 1 - kept_l(R) / kept_l(∅)`.
//! [`Measure::Mass`] takes the L1 norm instead (the attention mass left): the L2 norm is ruled by
//! the few largest entries, so where one cell draws most of a head's attention (gemma3) removing
//! thousands of small ones barely moves it, while their summed mass is what the output loses.
//!
//! Token-granularity projection (llama.cpp frees the same cells in every layer and head, see
//! `crate::select`): one global ranking (each cell's best rank over
//! the units, ties by the mean normalized window score: a cell one head needs badly outranks a
//! cell every head finds middling, which is how a needle survives) is walked from the bottom, and the walk stops *before* the first cell
//! whose removal would push any layer's drop above `T`. So every layer keeps its own guarantee.

use super::{BudgetRule, DecideCtx, Decision};
use crate::score::UnitCtx;

/// The DBudgetKV stopping rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DBudget {
    /// maximum relative drop of the retained attention norm, per layer
    pub threshold: f32,
    /// whose attention the norm is measured on
    pub evidence: Evidence,
    /// which norm
    pub measure: Measure,
}

/// The norm [`DBudget`] measures the retained attention by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    /// L2, the paper's
    Norm,
    /// L1: the attention mass left
    Mass,
}

/// The attention row whose norm [`DBudget`] keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// the newest query's (the papers' rule: the question, when it is part of the prompt)
    Newest,
    /// per cell, the largest attention from any query the scorer read: with queries spread over
    /// the context (`ranker=context`) the rule then guards what any part of the text attends to,
    /// not only what the prompt's last token does, which matters when the question comes later
    MaxOverQueries,
}

impl BudgetRule for DBudget {
    /// `[group][n]`: squared newest-query attention per query head of the unit, protected cells 0.
    fn unit_evidence(&self, u: &UnitCtx) -> Option<Vec<f32>> {
        let newest = u.queries.last()?;
        let n = u.n();
        let mut out = Vec::with_capacity(u.shape.group() * n);
        if self.evidence == Evidence::MaxOverQueries {
            for row in u.received_max(u.queries) {
                out.extend(
                    row.iter()
                        .zip(u.protected)
                        .map(|(a, &p)| if p { 0.0 } else { a * a }),
                );
            }
            return Some(out);
        }
        // one row per query head, zeros where the newest query sees no key
        out.resize(u.shape.group() * n, 0.0);
        let qs: Vec<&[f32]> = u.heads().map(|h| u.q(newest, h)).collect();
        u.attend(&qs, newest.pos, |i, row| {
            out[i * n..(i + 1) * n]
                .iter_mut()
                .zip(row.iter().zip(u.protected))
                .for_each(|(o, (a, &p))| *o = if p { 0.0 } else { a * a });
        });
        Some(out)
    }

    fn needs_newest_attention(&self) -> bool {
        self.evidence == Evidence::Newest
    }

    fn decide(&self, c: &DecideCtx) -> Decision {
        let n = c.pos.len();
        let ranking =
            crate::select::best_rank_of(&c.grid.units, c.pos, c.protected, &c.grid.token_mean());
        let order = eviction_order(&ranking, c.pos, c.protected);
        // no queries seen yet: nothing to measure against, keep everything
        if c.evidence.iter().any(|e| e.is_empty()) {
            return Decision {
                budget: n,
                ranking: Some(ranking),
            };
        }
        let drops = walk_drops(
            self.measure,
            c.shape.n_layer,
            c.shape.n_head_kv,
            c.shape.group(),
            n,
            c.evidence,
            &order,
        );
        // drops[i] = worst layer drop after evicting order[..i]; pick the largest i within T
        let t = self.threshold as f64;
        let cut = drops
            .iter()
            .take_while(|&&d| d <= t)
            .count()
            .saturating_sub(1);
        Decision {
            budget: n - cut,
            ranking: Some(ranking),
        }
    }

    fn adaptive(&self) -> bool {
        true
    }
}

/// Non-protected cells from least to most important (ties: older first).
pub(crate) fn eviction_order(ranking: &[f32], pos: &[i32], protected: &[bool]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..ranking.len()).filter(|&i| !protected[i]).collect();
    order.sort_by(|&a, &b| ranking[a].total_cmp(&ranking[b]).then(pos[a].cmp(&pos[b])));
    order
}

/// `out[i]` = the largest per-layer relative norm drop after evicting `order[..i]`
/// (`out[0] = 0`), for `i` in `0..=order.len()`. Evidence is per unit `[group][n]` of squared
/// attention (what every backend computes; [`Measure::Mass`] takes its square root). Layers whose
/// candidates hold no attention never constrain the walk.
pub fn walk_drops(
    measure: Measure,
    n_layer: usize,
    n_head_kv: usize,
    group: usize,
    n: usize,
    evidence: &[Vec<f32>],
    order: &[usize],
) -> Vec<f64> {
    let heads = n_head_kv * group;
    // what one cell contributes to its head's sum: a squared entry (L2) or the entry itself (mass)
    let term = |v: f32| match measure {
        Measure::Norm => v as f64,
        Measure::Mass => (v.max(0.0) as f64).sqrt(),
    };
    // s[l][h] = remaining sum of terms; layer-major, head = g*group + j
    let mut s = vec![0.0f64; n_layer * heads];
    for l in 0..n_layer {
        for g in 0..n_head_kv {
            let e = &evidence[l * n_head_kv + g];
            for j in 0..group {
                s[l * heads + g * group + j] = e[j * n..(j + 1) * n].iter().map(|&v| term(v)).sum();
            }
        }
    }
    let kept = |s: &[f64], l: usize| {
        s[l * heads..(l + 1) * heads]
            .iter()
            .map(|v| match measure {
                Measure::Norm => v.max(0.0).sqrt(),
                Measure::Mass => v.max(0.0),
            })
            .sum::<f64>()
            / heads as f64
    };
    let base: Vec<f64> = (0..n_layer).map(|l| kept(&s, l)).collect();
    let mut out = Vec::with_capacity(order.len() + 1);
    out.push(0.0);
    let mut worst = 0.0f64;
    for &t in order {
        for l in 0..n_layer {
            for g in 0..n_head_kv {
                let e = &evidence[l * n_head_kv + g];
                for j in 0..group {
                    s[l * heads + g * group + j] -= term(e[j * n + t]);
                }
            }
        }
        // the drop only grows along the walk, so the running max is exact
        for (l, &b) in base.iter().enumerate() {
            if b > 0.0 {
                worst = worst.max((b - kept(&s, l)) / b);
            }
        }
        out.push(worst);
    }
    out
}
