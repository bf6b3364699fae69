//! Slow, obviously-correct f64 versions of the attention arithmetic. Tests compare the fast CPU
//! path against these; nothing in the library calls them.

use crate::view::{OwnedKeys, Shape};

/// Softmax of `scale * q·k_j` over keys with `pos_j <= qpos`, in f64 (0 for hidden keys).
pub fn attention_row(
    shape: &Shape,
    keys: &OwnedKeys,
    pos: &[i32],
    layer: usize,
    head: usize,
    q: &[f32],
    qpos: i32,
) -> Vec<f64> {
    let g = head / shape.group();
    let logits: Vec<Option<f64>> = (0..pos.len())
        .map(|j| {
            (pos[j] <= qpos).then(|| {
                shape.kq_scale as f64
                    * (0..shape.head_dim)
                        .map(|k| q[k] as f64 * keys.at(shape, layer, j, g, k) as f64)
                        .sum::<f64>()
            })
        })
        .collect();
    let max = logits
        .iter()
        .flatten()
        .cloned()
        .fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = logits
        .iter()
        .map(|l| l.map_or(0.0, |v| (v - max).exp()))
        .collect();
    let sum: f64 = exps.iter().sum();
    exps.iter()
        .map(|e| if sum > 0.0 { e / sum } else { 0.0 })
        .collect()
}

/// Window-attention score of one unit: mean over `queries` rows (each `(pos, [n_layer][n_head*d])`)
/// of the attention, reduced over the GQA group by mean (no pooling).
pub fn window_scores(
    shape: &Shape,
    keys: &OwnedKeys,
    pos: &[i32],
    queries: &[(i32, Vec<f32>)],
    layer: usize,
    kv_head: usize,
) -> Vec<f64> {
    let group = shape.group();
    let d = shape.head_dim;
    let mut out = vec![0.0f64; pos.len()];
    for h in kv_head * group..(kv_head + 1) * group {
        for (qpos, row) in queries {
            let off = layer * shape.q_row_len() + h * d;
            let a = attention_row(shape, keys, pos, layer, h, &row[off..off + d], *qpos);
            out.iter_mut()
                .zip(&a)
                .for_each(|(o, v)| *o += v / (queries.len() as f64 * group as f64));
        }
    }
    out
}
