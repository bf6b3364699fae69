//! CPU numeric kernels: dot products, masked softmax rows, pooling, top-p nuclei.
//! Every policy's attention arithmetic goes through these few functions.

/// Dot product with eight independent accumulators so the compiler vectorizes it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Number of keys a query at `qpos` may see: keys are sorted by position and visible when
/// `pos <= qpos` (causal rule).
#[inline]
pub fn visible(key_pos: &[i32], qpos: i32) -> usize {
    key_pos.partition_point(|&p| p <= qpos)
}

/// `out[j] = softmax_j(scale * q·k_j)` over the first `n_vis` keys, 0 beyond.
/// `keys` is row-major `[n][d]`. Returns false (and zeros) when no key is visible.
pub fn softmax_row(
    q: &[f32],
    keys: &[f32],
    d: usize,
    n_vis: usize,
    scale: f32,
    out: &mut [f32],
) -> bool {
    let n = out.len();
    debug_assert!(n_vis <= n && keys.len() >= n * d);
    out[n_vis..].iter_mut().for_each(|v| *v = 0.0);
    if n_vis == 0 {
        return false;
    }
    let mut max = f32::NEG_INFINITY;
    for j in 0..n_vis {
        let s = scale * dot(q, &keys[j * d..(j + 1) * d]);
        out[j] = s;
        if s > max {
            max = s;
        }
    }
    let mut sum = 0.0f32;
    for v in &mut out[..n_vis] {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    out[..n_vis].iter_mut().for_each(|v| *v *= inv);
    true
}

/// 1-D pooling with odd `kernel`, stride 1, "same" padding (edges use the part of the window
/// inside the row). `max`: max pooling, else average.
pub fn pool1d(x: &[f32], kernel: usize, max: bool) -> Vec<f32> {
    let n = x.len();
    if kernel <= 1 || n == 0 {
        return x.to_vec();
    }
    let h = kernel / 2;
    (0..n)
        .map(|i| {
            let lo = i.saturating_sub(h);
            let hi = (i + h + 1).min(n);
            let w = &x[lo..hi];
            if max {
                w.iter().copied().fold(f32::NEG_INFINITY, f32::max)
            } else {
                w.iter().sum::<f32>() / w.len() as f32
            }
        })
        .collect()
}

/// Mark the smallest set of entries, largest first, whose mass reaches `p` (the top-p nucleus)
/// of a probability row. Ties are taken by lower index first. Returns how many were marked.
pub fn mark_nucleus(probs: &[f32], p: f32, marks: &mut [bool], scratch: &mut Vec<u32>) -> usize {
    scratch.clear();
    scratch.extend((0..probs.len() as u32).filter(|&j| probs[j as usize] > 0.0));
    scratch.sort_unstable_by(|&a, &b| {
        probs[b as usize]
            .total_cmp(&probs[a as usize])
            .then(a.cmp(&b))
    });
    let mut mass = 0.0f32;
    let mut n = 0;
    for &j in scratch.iter() {
        if mass >= p {
            break;
        }
        marks[j as usize] = true;
        mass += probs[j as usize];
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..19).map(|i| 1.0 - i as f32 * 0.1).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-4);
    }

    #[test]
    fn softmax_masks_future_keys() {
        let keys = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let mut out = [9.0f32; 3];
        assert!(softmax_row(&[1.0, 0.0], &keys, 2, 2, 1.0, &mut out));
        assert_eq!(out[2], 0.0);
        assert!((out[0] + out[1] - 1.0).abs() < 1e-6);
        assert!(out[0] > out[1]);
    }

    #[test]
    fn pooling_max_and_avg() {
        let x = [0.0, 3.0, 0.0, 0.0, 1.0];
        assert_eq!(pool1d(&x, 3, true), vec![3.0, 3.0, 3.0, 1.0, 1.0]);
        assert_eq!(pool1d(&x, 3, false), vec![1.5, 1.0, 1.0, 1.0 / 3.0, 0.5]);
    }

    #[test]
    fn nucleus_takes_largest_first() {
        let probs = [0.1, 0.6, 0.3];
        let mut marks = [false; 3];
        let n = mark_nucleus(&probs, 0.8, &mut marks, &mut Vec::new());
        assert_eq!(n, 2);
        assert_eq!(marks, [false, true, true]);
    }
}
