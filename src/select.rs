//! Stage 4 of the pipeline: from scores and budgets to keep sets.
//!
//! - per (layer, KV head) keep sets: protected cells plus the unit's top `b` candidates;
//! - the token-granularity projection: the cells llama.cpp frees are the same in every layer
//!   and head, so one keep set is chosen from a token ranking: the rule's own ranking when it
//!   has one (DBudgetKV, GVote), else the number of unit keep sets holding the cell;
//! - the cap: the engine may demand at most `max_cells`.
//!
//! Tie rule (everywhere): equal scores keep the newer cell (higher position) first.

use crate::score::ScoreGrid;

/// Where the keep sets apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    /// the same cells in every layer and head; cells are freed
    Token,
    /// a keep set per layer; cells no layer keeps are freed
    Layer,
    /// a keep set per (layer, KV head); cells no head keeps are freed
    Head,
}

/// Cells that are always kept: the `sinks` oldest held cells, the `recent` newest, position 0
/// and the newest cell.
pub fn protected(pos: &[i32], sinks: usize, recent: usize) -> Vec<bool> {
    let n = pos.len();
    let mut p = vec![false; n];
    p.iter_mut().take(sinks).for_each(|x| *x = true);
    p.iter_mut()
        .skip(n.saturating_sub(recent))
        .for_each(|x| *x = true);
    if let Some(first) = pos.iter().position(|&x| x == 0) {
        p[first] = true;
    }
    if n > 0 {
        p[n - 1] = true;
    }
    p
}

/// Cells that can never be evicted, whatever the cap: position 0 and the newest cell.
pub fn pinned(pos: &[i32]) -> Vec<bool> {
    protected(pos, 0, 0)
}

/// Order of `idx` by descending `score`, ties by descending position.
fn sort_desc(idx: &mut [usize], score: &[f32], pos: &[i32]) {
    idx.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(pos[b].cmp(&pos[a])));
}

/// Rank of every candidate within one unit (0 = most worth keeping; score descending, ties
/// newer first); protected cells get rank 0.
pub fn unit_ranks(score: &[f32], pos: &[i32], prot: &[bool]) -> Vec<u32> {
    let mut cand: Vec<usize> = (0..score.len()).filter(|&i| !prot[i]).collect();
    sort_desc(&mut cand, score, pos);
    let mut ranks = vec![0u32; score.len()];
    for (r, &i) in cand.iter().enumerate() {
        ranks[i] = r as u32;
    }
    ranks
}

/// Keep set of one unit from its ranks: protected cells plus the `b` best candidates.
pub fn keep_from_ranks(ranks: &[u32], prot: &[bool], b: usize) -> Vec<bool> {
    ranks
        .iter()
        .zip(prot)
        .map(|(&r, &p)| p || (r as usize) < b)
        .collect()
}

/// Token ranking for uniform allocations: a cell ranks by its best rank in any unit (a cell
/// one head needs badly beats a cell every head finds middling), ties by mean normalized score.
/// The ranking does not depend on the budget, so a larger budget keeps a superset.
pub fn best_rank_ranking(ranks: &[Vec<u32>], token_mean: &[f32]) -> Vec<f32> {
    let n = token_mean.len();
    let mut best = vec![u32::MAX; n];
    for r in ranks {
        best.iter_mut().zip(r).for_each(|(b, &x)| *b = (*b).min(x));
    }
    best.iter()
        .zip(token_mean)
        .map(|(&b, m)| (n as u32).saturating_sub(b) as f32 + m.clamp(0.0, 0.99))
        .collect()
}

/// [`best_rank_ranking`] computed straight from per-unit scores.
pub fn best_rank_of(
    units: &[Vec<f32>],
    pos: &[i32],
    prot: &[bool],
    token_mean: &[f32],
) -> Vec<f32> {
    let ranks: Vec<Vec<u32>> = units.iter().map(|u| unit_ranks(u, pos, prot)).collect();
    best_rank_ranking(&ranks, token_mean)
}

/// Keep set of one unit: the protected cells plus the top `b` candidates by `score`.
pub fn unit_keep(score: &[f32], pos: &[i32], prot: &[bool], b: usize) -> Vec<bool> {
    keep_from_ranks(&unit_ranks(score, pos, prot), prot, b)
}

/// Token ranking from unit keep sets: the number of sets holding each cell, with the mean
/// normalized score (below 1) as tie-break. Used when layers or heads get different budgets
/// (PyramidKV, DynamicKV, Ada-KV), so that the allocation shapes which cells survive.
pub fn votes_ranking(unit_keep: &[Vec<bool>], token_mean: &[f32]) -> Vec<f32> {
    let mut r: Vec<f32> = token_mean.iter().map(|m| m.clamp(0.0, 0.999)).collect();
    for k in unit_keep {
        r.iter_mut()
            .zip(k)
            .for_each(|(x, &kept)| *x += kept as u8 as f32);
    }
    r
}

/// The final token keep set: pinned cells, then protected cells, then the best of `ranking`,
/// `budget` cells in all (never fewer than the pinned ones).
pub fn project(ranking: &[f32], pos: &[i32], prot: &[bool], budget: usize) -> Vec<bool> {
    let pin = pinned(pos);
    let n = ranking.len();
    let tier = |i: usize| (pin[i] as u8) * 2 + prot[i] as u8;
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| {
        tier(b)
            .cmp(&tier(a))
            .then(ranking[b].total_cmp(&ranking[a]))
            .then(pos[b].cmp(&pos[a]))
    });
    let take = budget.max(pin.iter().filter(|&&x| x).count()).min(n);
    let mut keep = vec![false; n];
    for &i in &idx[..take] {
        keep[i] = true;
    }
    keep
}

/// What [`select`] needs for one sequence.
pub struct SelectIn<'a> {
    /// the scorer's output
    pub grid: &'a ScoreGrid,
    /// per unit, [`unit_ranks`] of its scores
    pub ranks: &'a [Vec<u32>],
    /// per unit, its candidate budget (the allocator's split)
    pub budgets: &'a [usize],
    /// positions of the held cells
    pub pos: &'a [i32],
    /// always-kept cells
    pub protected: &'a [bool],
    /// cells to keep in all (token granularity)
    pub target: usize,
    /// the engine's cap (0 = none)
    pub max_cells: usize,
    /// where the keep sets apply
    pub granularity: Granularity,
    /// the rule's token ranking, when its verdict applies (not when a cap cut below it)
    pub verdict: Option<Vec<f32>>,
    /// every unit gets the same budget (the allocator is uniform)
    pub uniform: bool,
}

/// The keep sets of one plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// per held cell: kept
    pub keep: Vec<bool>,
    /// per unit: kept (what a per-layer/per-head mask holds)
    pub unit_keep: Vec<Vec<bool>>,
    /// per layer: cells it keeps
    pub layer_kept: Vec<u32>,
}

/// Keep sets from ranks and budgets: the unit sets (shared per layer at layer granularity), then
/// the cells to keep: at token granularity the projection of one token ranking onto `target`
/// cells; at layer/head granularity the union of the unit sets, trimmed to the cells most units
/// keep when that union is over the engine's cap.
pub fn select(c: SelectIn) -> Selection {
    let grid = c.grid;
    let (n_layer, h) = (grid.n_layer, grid.n_head_kv);
    let n = c.pos.len();
    let prot = c.protected;
    let mut sets: Vec<Vec<bool>> = c
        .ranks
        .iter()
        .zip(c.budgets)
        .map(|(r, &b)| keep_from_ranks(r, prot, b))
        .collect();
    if c.granularity == Granularity::Layer {
        // one keep set per layer, shared by its KV heads (a per-layer mask): the cells ranked
        // by the mean of the heads' scores, the layer's budget the mean of theirs
        for l in 0..n_layer {
            let units = l * h..(l + 1) * h;
            let mean: Vec<f32> = (0..n)
                .map(|i| units.clone().map(|u| grid.units[u][i]).sum::<f32>() / h as f32)
                .collect();
            let b = (c.budgets[units.clone()].iter().sum::<usize>() + h / 2) / h;
            let k = unit_keep(&mean, c.pos, prot, b);
            for u in units {
                sets[u].clone_from(&k);
            }
        }
    }
    let keep = match c.granularity {
        Granularity::Token => {
            // an adaptive rule's ranking carries its verdict (which cells its budget covers);
            // when the cap binds below that budget the verdict does not apply, and cells rank
            // by their best rank in any unit like every uniform policy
            let ranking = match c.verdict {
                Some(r) => r,
                None if c.uniform => best_rank_ranking(c.ranks, &grid.token_mean()),
                None => votes_ranking(&sets, &grid.token_mean()),
            };
            project(&ranking, c.pos, prot, c.target)
        }
        // finer granularities free only what no unit keeps; when that union is over the
        // engine's cap, the cells most units keep win and the unit sets are trimmed to them
        Granularity::Layer | Granularity::Head => {
            let mut k = pinned(c.pos);
            for uk in &sets {
                k.iter_mut().zip(uk).for_each(|(a, &b)| *a |= b);
            }
            let held = k.iter().filter(|&&x| x).count();
            if c.max_cells > 0 && held > c.max_cells {
                let ranking = votes_ranking(&sets, &grid.token_mean());
                k = project(&ranking, c.pos, prot, c.target.min(c.max_cells));
                for uk in &mut sets {
                    uk.iter_mut().zip(&k).for_each(|(a, &b)| *a &= b);
                }
            }
            k
        }
    };
    let layer_kept = (0..n_layer)
        .map(|l| match c.granularity {
            Granularity::Token => keep.iter().filter(|&&k| k).count() as u32,
            _ => (0..n)
                .filter(|&i| (0..h).any(|g| sets[l * h + g][i]))
                .count() as u32,
        })
        .collect();
    Selection {
        keep,
        unit_keep: sets,
        layer_kept,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protected_covers_sinks_recent_and_pins() {
        let pos = [0, 1, 2, 3, 10, 11, 12];
        let p = protected(&pos, 2, 2);
        assert_eq!(p, vec![true, true, false, false, false, true, true]);
        assert_eq!(
            pinned(&pos),
            vec![true, false, false, false, false, false, true]
        );
    }

    #[test]
    fn projection_respects_tiers_then_rank_then_newer() {
        let pos = [0, 1, 2, 3, 4];
        let prot = [true, false, false, false, true];
        let rank = [0.0, 0.5, 0.5, 0.9, 0.0];
        assert_eq!(
            project(&rank, &pos, &prot, 3),
            vec![true, false, false, true, true]
        );
        assert_eq!(
            project(&rank, &pos, &prot, 4),
            vec![true, false, true, true, true]
        );
        // a budget below the pinned cells still keeps them
        assert_eq!(
            project(&rank, &pos, &prot, 0),
            vec![true, false, false, false, true]
        );
    }

    #[test]
    fn unit_keep_takes_top_candidates() {
        let pos = [0, 1, 2, 3];
        let prot = [true, false, false, false];
        assert_eq!(
            unit_keep(&[0.0, 0.2, 0.1, 0.2], &pos, &prot, 1),
            vec![true, false, false, true]
        );
    }
}
