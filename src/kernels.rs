//! Numeric kernels of the CPU path: dot products, masked softmax rows, pooling, top-p nuclei.
//! No policy knowledge: the scorers (`crate::score`) build every policy's arithmetic on these.
//! Every policy's attention arithmetic goes through these few functions.
// index loops keep the micro-kernels in the shape the vectorizer recognizes
#![allow(clippy::needless_range_loop)]

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

/// `2^x`-based `exp` for `x <= 0` (softmax after max subtraction), branch-free so the compiler
/// vectorizes loops over it; relative error below 2e-5. Inputs below -60 give exp(-60) (~1e-26):
/// such weights carry no attention mass, and going lower would produce denormals after
/// normalization, which are two orders of magnitude slower on x86.
#[inline(always)]
pub fn exp_neg(x: f32) -> f32 {
    let t = x.max(-60.0) * std::f32::consts::LOG2_E;
    let fi = t.floor();
    let f = t - fi;
    let p = 1.0
        + f * (std::f32::consts::LN_2
            + f * (0.240_226_5 + f * (0.055_504_11 + f * (0.009_618_129 + f * 0.001_333_355))));
    f32::from_bits(((fi as i32 + 127) << 23) as u32) * p
}

/// K of one unit stored transposed, `[head_dim][n]`, so that scoring a query is a stream of
/// vector multiply-adds over cells with no horizontal sums.
#[derive(Debug, Clone, Copy)]
pub struct KeysT<'a> {
    /// `data[c * n + j]` = dimension `c` of cell `j`
    pub data: &'a [f32],
    /// cells
    pub n: usize,
    /// head size
    pub d: usize,
}

/// Queries scored together by the micro-kernel.
const QB: usize = 4;
/// Cells per vector lane group.
const KB: usize = 8;

/// `out[r][j] = scale * q_r · k_j` for `R` (at most four) queries over the first `n_vis` cells.
/// `R` is the batch's own size, so a lone query does one row of multiply-adds, not four.
#[inline(always)]
fn logits<const R: usize>(qs: &[&[f32]], k: KeysT, n_vis: usize, scale: f32, out: &mut [Vec<f32>]) {
    let (n, d) = (k.n, k.d);
    let q: [&[f32]; R] = std::array::from_fn(|r| &qs[r][..d]);
    let full = n_vis / KB * KB;
    let mut j = 0;
    while j < full {
        let mut acc = [[0.0f32; KB]; R];
        for c in 0..d {
            let kv: [f32; KB] = k.data[c * n + j..c * n + j + KB].try_into().unwrap();
            for r in 0..R {
                let qc = q[r][c];
                for l in 0..KB {
                    acc[r][l] += qc * kv[l];
                }
            }
        }
        for (r, o) in out.iter_mut().enumerate().take(R) {
            let o: &mut [f32; KB] = (&mut o[j..j + KB]).try_into().unwrap();
            for l in 0..KB {
                o[l] = acc[r][l] * scale;
            }
        }
        j += KB;
    }
    for j in full..n_vis {
        for (r, o) in out.iter_mut().enumerate().take(R) {
            let mut s = 0.0f32;
            for c in 0..d {
                s += q[r][c] * k.data[c * n + j];
            }
            o[j] = s * scale;
        }
    }
}

/// Lane-parallel max and sum (a single accumulator would serialize the loop).
#[inline(always)]
fn lanes_max(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; KB];
    let chunks = x.chunks_exact(KB);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..KB {
            m[l] = if c[l] > m[l] { c[l] } else { m[l] };
        }
    }
    rest.iter()
        .chain(m.iter())
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

#[inline(always)]
fn lanes_sum(x: &[f32]) -> f32 {
    let mut s = [0.0f32; KB];
    let chunks = x.chunks_exact(KB);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..KB {
            s[l] += c[l];
        }
    }
    s.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// In place: softmax over `row[..n_vis]`, zeros beyond.
#[inline(always)]
fn softmax_in_place(row: &mut [f32], n_vis: usize) {
    let max = lanes_max(&row[..n_vis]);
    for v in &mut row[..n_vis] {
        *v = exp_neg(*v - max);
    }
    let inv = 1.0 / lanes_sum(&row[..n_vis]);
    row[..n_vis].iter_mut().for_each(|v| *v *= inv);
    row[n_vis..].iter_mut().for_each(|v| *v = 0.0);
}

#[inline(always)]
fn attention_rows_impl(
    qs: &[(&[f32], usize)],
    k: KeysT,
    scale: f32,
    mut sink: impl FnMut(usize, &[f32]),
) {
    let mut bufs = vec![vec![0.0f32; k.n]; QB];
    for (b, chunk) in qs.chunks(QB).enumerate() {
        let n_vis = chunk.iter().map(|c| c.1).max().unwrap_or(0);
        let vecs: Vec<&[f32]> = chunk.iter().map(|c| c.0).collect();
        match vecs.len() {
            1 => logits::<1>(&vecs, k, n_vis, scale, &mut bufs),
            2 => logits::<2>(&vecs, k, n_vis, scale, &mut bufs),
            3 => logits::<3>(&vecs, k, n_vis, scale, &mut bufs),
            _ => logits::<QB>(&vecs, k, n_vis, scale, &mut bufs),
        }
        for (r, &(_, nv)) in chunk.iter().enumerate() {
            if nv == 0 {
                continue;
            }
            softmax_in_place(&mut bufs[r], nv);
            sink(b * QB + r, &bufs[r]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attention_rows_avx2(
    qs: &[(&[f32], usize)],
    k: KeysT,
    scale: f32,
    sink: &mut dyn FnMut(usize, &[f32]),
) {
    attention_rows_impl(qs, k, scale, sink)
}

/// Attention rows of several queries over the same keys: for each `(q, n_vis)` in `qs`, the
/// softmax of `scale * q·k_j` over the first `n_vis` cells (0 beyond) is passed to
/// `sink(index, row)`. Queries with `n_vis == 0` see nothing and are skipped.
/// Uses AVX2 when the processor has it (checked at run time), so one binary serves every x86-64.
pub fn attention_rows(
    qs: &[(&[f32], usize)],
    k: KeysT,
    scale: f32,
    mut sink: impl FnMut(usize, &[f32]),
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the features the function is compiled for were detected on this processor.
        unsafe { attention_rows_avx2(qs, k, scale, &mut sink) };
        return;
    }
    attention_rows_impl(qs, k, scale, sink)
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
/// of a probability row: `marks[j]` (for every `j < probs.len()`) is set to whether entry `j` is
/// in it. Ties are taken by lower index first; the mass is summed in f64. Returns how many were
/// marked.
///
/// The nucleus is found by a radix selection on the values' bits, not by sorting the row: a
/// positive f32 orders like its bit pattern, so a histogram of the top bits with each bucket's
/// mass says which bucket the cut falls in; everything above it is in, everything below out, and
/// only that bucket's entries go on to the next bits (then a sort once few are left). A row costs
/// two sequential passes. GVote casts 9 ballots per query head and layer, and sorting every one,
/// then a quickselect over indices, was most of its plan time (`score::gvote::BALLOT_COST`).
/// When f64 rounding makes the sums disagree by an ulp at the cut, the cut's whole bucket is in.
pub fn mark_nucleus(probs: &[f32], p: f32, marks: &mut [bool], scratch: &mut Vec<u32>) -> usize {
    // (shift, width) of the three digits of the 31 value bits, most significant first
    const DIGITS: [(u32, u32); 3] = [(20, 11), (10, 10), (0, 10)];
    const LEAF: usize = 32;
    let p = p as f64;
    let key = |j: u32, (shift, width): (u32, u32)| {
        ((probs[j as usize].to_bits() >> shift) & ((1 << width) - 1)) as usize
    };
    let mut mass = [0.0f64; 1 << 11];
    let mut count = [0u32; 1 << 11];
    let (mut done, mut k) = (0.0f64, 0usize);
    scratch.clear();
    // invariant: every marked entry comes before every candidate in `scratch`, and `done` (< p)
    // is their mass; candidates share the digits above the current one. The first digit's pass
    // writes every mark, so the caller need not clear them
    for (level, &digit) in DIGITS.iter().enumerate() {
        let buckets = 1usize << digit.1;
        mass[..buckets].iter_mut().for_each(|m| *m = 0.0);
        count[..buckets].iter_mut().for_each(|c| *c = 0);
        let mut add = |j: u32| {
            let b = key(j, digit);
            mass[b] += probs[j as usize] as f64;
            count[b] += 1;
        };
        if level == 0 {
            (0..probs.len() as u32)
                .filter(|&j| probs[j as usize] > 0.0)
                .for_each(&mut add);
        } else {
            scratch.iter().for_each(|&j| add(j));
        }
        // the bucket the cut falls in, from the largest values down
        let mut cut = None;
        for b in (0..buckets).rev() {
            if count[b] == 0 {
                continue;
            }
            if done + mass[b] >= p {
                cut = Some(b);
                break;
            }
            done += mass[b];
            k += count[b] as usize;
        }
        // above the cut: in; the cut's bucket: the next candidates (in index order); below: out.
        // No cut: the row's whole mass is under p, and every positive entry is in
        // (branch-free marking: in a flat row the comparison is a coin flip per entry)
        let cut = cut.map_or(-1, |c| c as isize);
        if level == 0 {
            for (j, m) in marks.iter_mut().enumerate().take(probs.len()) {
                let b = if probs[j] > 0.0 {
                    key(j as u32, digit) as isize
                } else {
                    -2
                };
                *m = b > cut;
                if b == cut {
                    scratch.push(j as u32);
                }
            }
        } else {
            scratch.retain(|&j| {
                let b = key(j, digit) as isize;
                marks[j as usize] |= b > cut;
                b == cut
            });
        }
        if scratch.len() <= LEAF {
            break;
        }
    }
    // the last candidates, largest first (equal values: lower index first, as scratch is in
    // index order and the sort is stable), until the mass reaches p
    scratch.sort_by(|&a, &b| probs[b as usize].total_cmp(&probs[a as usize]));
    for &j in scratch.iter() {
        if done >= p {
            break;
        }
        marks[j as usize] = true;
        done += probs[j as usize] as f64;
        k += 1;
    }
    k
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

    /// The sort-based definition the selection must reproduce.
    fn nucleus_by_sort(probs: &[f32], p: f32) -> Vec<bool> {
        let mut ix: Vec<usize> = (0..probs.len()).filter(|&j| probs[j] > 0.0).collect();
        ix.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        let mut marks = vec![false; probs.len()];
        let mut mass = 0.0f64;
        for j in ix {
            if mass >= p as f64 {
                break;
            }
            marks[j] = true;
            mass += probs[j] as f64;
        }
        marks
    }

    /// A small LCG for the test rows (deterministic, no dependency).
    fn lcg(seed: u64) -> impl FnMut() -> u64 {
        let mut state = seed;
        move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            state
        }
    }

    /// `mark_nucleus` against the sorted definition, into marks that start all set (it must
    /// write every mark, not only the nucleus').
    fn assert_nucleus_as_sorted(probs: &[f32], p: f32, scratch: &mut Vec<u32>, what: &str) {
        let want = nucleus_by_sort(probs, p);
        let mut got = vec![true; probs.len()];
        let k = mark_nucleus(probs, p, &mut got, scratch);
        assert_eq!(got, want, "{what} p {p}");
        assert_eq!(k, want.iter().filter(|&&m| m).count(), "{what} p {p}");
    }

    #[test]
    fn nucleus_by_selection_equals_the_sorted_definition() {
        // values on a 1/1024 grid: every partial sum is exact in f64, so any summation order
        // gives the sorted order's cut; many ties, zeros, and rows shorter and longer than the
        // selection's 32-entry leaf
        let mut next = lcg(12345);
        let mut scratch = Vec::new();
        for case in 0..400 {
            let n = [0, 1, 2, 5, 31, 33, 64, 300, 2000][case % 9];
            let levels = 1 + (next() >> 33) % 40;
            let raw: Vec<f32> = (0..n).map(|_| ((next() >> 33) % levels) as f32).collect();
            let total: f32 = raw.iter().sum();
            let probs: Vec<f32> = raw
                .iter()
                .map(|&v| if total > 0.0 { v / 1024.0 } else { 0.0 })
                .collect();
            let mass: f32 = probs.iter().sum();
            for p in [0.0, 0.3, 0.5, 0.8, 0.95, 1.0] {
                let what = format!("n {n} levels {levels}");
                assert_nucleus_as_sorted(&probs, p * mass, &mut scratch, &what);
            }
        }
    }

    #[test]
    fn nucleus_of_softmax_rows_equals_the_sorted_definition() {
        // continuous values, as gvote's attention rows: flat and peaked rows of 8192 cells
        let mut next = lcg(777);
        let mut scratch = Vec::new();
        for temp in [0.1f32, 1.0, 4.0, 16.0] {
            let logits: Vec<f32> = (0..8192)
                .map(|_| temp * ((next() >> 40) as f32 / (1u64 << 24) as f32))
                .collect();
            let mut probs = vec![0.0f32; logits.len()];
            let keys: Vec<f32> = logits.iter().flat_map(|&l| [l, 1.0]).collect();
            assert!(softmax_row(
                &[1.0, 0.0],
                &keys,
                2,
                logits.len(),
                1.0,
                &mut probs
            ));
            for p in [0.5f32, 0.9, 0.95, 0.99] {
                assert_nucleus_as_sorted(&probs, p, &mut scratch, &format!("temp {temp}"));
            }
        }
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
