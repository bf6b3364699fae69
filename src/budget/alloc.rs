//! Allocators: spread an average per-unit budget over layers and KV heads.

use super::{fix_sum, Allocator};
use crate::score::ScoreGrid;

/// Every unit gets the same budget.
#[derive(Debug, Clone, Copy, Default)]
pub struct Uniform;

impl Allocator for Uniform {
    fn allocate(&self, grid: &ScoreGrid, cand: &[bool], per_unit: usize) -> Vec<usize> {
        let n_cand = cand.iter().filter(|&&c| c).count();
        vec![per_unit.min(n_cand); grid.units.len()]
    }
    fn uniform(&self) -> bool {
        true
    }
}

/// Expand one budget per layer to its KV heads (equal share).
fn per_layer_to_units(layer: &[usize], n_head_kv: usize) -> Vec<usize> {
    layer
        .iter()
        .flat_map(|&b| std::iter::repeat_n(b, n_head_kv))
        .collect()
}

/// PyramidKV: budgets shrink linearly with depth; the first layer gets `2B - B/beta`, the last
/// `B/beta` (clamped to the candidates, then the mean is restored to `B`).
#[derive(Debug, Clone, Copy)]
pub struct Pyramid {
    /// ratio between the largest and the smallest layer budget's offset (paper: 20)
    pub beta: f32,
}

impl Pyramid {
    /// Budget of each layer for an average of `b` among `n_cand` candidates.
    pub fn layer_budgets(&self, n_layer: usize, b: usize, n_cand: usize) -> Vec<usize> {
        let b = b.min(n_cand) as f64;
        let mut min = b / self.beta as f64;
        let mut max = 2.0 * b - min;
        if max > n_cand as f64 {
            max = n_cand as f64;
            min = 2.0 * b - max;
        }
        let step = if n_layer > 1 {
            (max - min) / (n_layer - 1) as f64
        } else {
            0.0
        };
        let mut v: Vec<usize> = (0..n_layer)
            .map(|l| (max - l as f64 * step).round().max(0.0) as usize)
            .collect();
        let prio: Vec<f32> = (0..n_layer).map(|l| -(l as f32)).collect();
        fix_sum(&mut v, b as usize * n_layer, n_cand, &prio);
        v
    }
}

impl Allocator for Pyramid {
    fn allocate(&self, grid: &ScoreGrid, cand: &[bool], per_unit: usize) -> Vec<usize> {
        let n_cand = cand.iter().filter(|&&c| c).count();
        per_layer_to_units(
            &self.layer_budgets(grid.n_layer, per_unit, n_cand),
            grid.n_head_kv,
        )
    }
}

/// Indices of the `k` largest values among `(unit, cell)` pairs, counted per unit.
fn topk_counts(scores: &[Vec<f32>], cand: &[bool], k: usize) -> Vec<usize> {
    let mut all: Vec<(f32, usize)> = Vec::new();
    for (u, s) in scores.iter().enumerate() {
        all.extend(s.iter().zip(cand).filter(|(_, &c)| c).map(|(&v, _)| (v, u)));
    }
    let k = k.min(all.len());
    let mut counts = vec![0usize; scores.len()];
    if k == 0 {
        return counts;
    }
    all.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, u) in &all[..k] {
        counts[u] += 1;
    }
    counts
}

/// DynamicKV: a layer's budget follows its share of the model-wide top scores, capped at
/// `max_ratio` times the average. The paper updates the split every 4 layers during a
/// layer-by-layer prefill; the library sees every layer at once, so it applies the final update
/// directly.
#[derive(Debug, Clone, Copy)]
pub struct Dynamic {
    /// cap of one layer's budget as a multiple of the average (paper scripts: 10)
    pub max_ratio: f32,
}

impl Allocator for Dynamic {
    fn allocate(&self, grid: &ScoreGrid, cand: &[bool], per_unit: usize) -> Vec<usize> {
        let n_cand = cand.iter().filter(|&&c| c).count();
        let b = per_unit.min(n_cand);
        let nl = grid.n_layer;
        let norm = grid.normalized();
        // one score vector per layer: mean over its heads
        let layers: Vec<Vec<f32>> = (0..nl)
            .map(|l| {
                let mut acc = vec![0.0f32; grid.n()];
                for g in 0..grid.n_head_kv {
                    acc.iter_mut()
                        .zip(&norm[l * grid.n_head_kv + g])
                        .for_each(|(a, v)| *a += v);
                }
                acc
            })
            .collect();
        let counts = topk_counts(&layers, cand, b * nl);
        let total: usize = counts.iter().sum();
        let cap = ((self.max_ratio as f64 * b as f64).floor() as usize).clamp(b, n_cand.max(b));
        let mut v: Vec<usize> = counts
            .iter()
            .map(|&c| {
                if total == 0 {
                    b
                } else {
                    (c as f64 * (b * nl) as f64 / total as f64).floor() as usize
                }
            })
            .collect();
        let prio: Vec<f32> = counts.iter().map(|&c| c as f32).collect();
        fix_sum(&mut v, b * nl, cap.min(n_cand), &prio);
        per_layer_to_units(&v, grid.n_head_kv)
    }
}

/// Ada-KV: inside each layer, the heads share the layer's budget by a global top-k over their
/// scores (more for heads whose attention is spread), mixed with a uniform floor `alpha`.
/// Layer budgets come from `layers` (uniform or pyramid).
pub struct Ada {
    /// safeguard: fraction of each head's budget given uniformly (paper: 0.2 with GQA)
    pub alpha: f32,
    /// how the layers' budgets are set
    pub layers: Box<dyn Allocator>,
}

impl Allocator for Ada {
    fn allocate(&self, grid: &ScoreGrid, cand: &[bool], per_unit: usize) -> Vec<usize> {
        let n_cand = cand.iter().filter(|&&c| c).count();
        let layer_units = self.layers.allocate(grid, cand, per_unit);
        let g_n = grid.n_head_kv;
        let norm = grid.normalized();
        let mut out = Vec::with_capacity(grid.units.len());
        for l in 0..grid.n_layer {
            let bl = layer_units[l * g_n]; // per-head budget of this layer
            let heads = &norm[l * g_n..(l + 1) * g_n];
            let counts = topk_counts(heads, cand, bl * g_n);
            let floor = (self.alpha as f64 * bl as f64).floor();
            let mut v: Vec<usize> = counts
                .iter()
                .map(|&c| (c as f64 * (1.0 - self.alpha as f64) + floor).round() as usize)
                .collect();
            let prio: Vec<f32> = counts.iter().map(|&c| c as f32).collect();
            fix_sum(&mut v, bl * g_n, n_cand, &prio);
            out.extend(v);
        }
        out
    }
}
