//! Borrowed views of what the engine hands over: the model shape, the cells of a sequence and
//! the K rows of every layer. This is the only module that reads caller memory.

use crate::error::{shape_err, Error, Result};

/// Element type of a K buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// 32-bit float
    F32,
    /// IEEE half
    F16,
    /// bfloat16
    Bf16,
}

impl Dtype {
    /// Decode the C dtype code.
    pub fn from_code(code: u32) -> Result<Self> {
        match code {
            0 => Ok(Dtype::F32),
            1 => Ok(Dtype::F16),
            2 => Ok(Dtype::Bf16),
            other => Err(Error::UnsupportedDtype(other)),
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }
}

/// Attention geometry of the model (one cache layer looks like every other).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// cache layers
    pub n_layer: usize,
    /// query heads
    pub n_head: usize,
    /// KV heads; `n_head % n_head_kv == 0`
    pub n_head_kv: usize,
    /// K head size
    pub head_dim: usize,
    /// softmax scale applied to q·k
    pub kq_scale: f32,
    /// how the engine rotated the queries and keys by position ([`Rope::Unknown`] unless told)
    pub rope: Rope,
}

/// The rotary position embedding the engine applied to the captured queries and cached keys
/// (`kvc_params.rope_*`). GVote uses it to move window queries to one position before fitting
/// its Gaussian: without it the fit mixes every position's rotation into the spread.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rope {
    /// not told, not rotary, or a rotation this library does not model (YaRN, M-RoPE, ...)
    Unknown,
    /// dimension pairs `(2i, 2i+1)` rotated by `pos * freq_scale * freq_base^(-2i/n_rot)`
    /// (ggml's `LLAMA_ROPE_TYPE_NORM`: Llama, SmolLM2, ...)
    Norm(RopeFreq),
    /// pairs `(i, i + n_rot/2)`, same angles (`LLAMA_ROPE_TYPE_NEOX`: Qwen, Gemma, ...)
    Neox(RopeFreq),
}

/// Angles of a rotary embedding; dimensions at and past `n_rot` are not rotated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeFreq {
    /// rotated dimensions (even, at most `head_dim`)
    pub n_rot: usize,
    /// base of the frequencies
    pub freq_base: f32,
    /// position scale (linear scaling)
    pub freq_scale: f32,
}

impl Rope {
    /// `kvc_params.rope_type` code of [`Rope::Unknown`]
    pub(crate) const UNKNOWN_CODE: u32 = 0;
    /// ... of [`Rope::Norm`]
    pub(crate) const NORM_CODE: u32 = 1;
    /// ... of [`Rope::Neox`]
    pub(crate) const NEOX_CODE: u32 = 2;

    /// Decode and check the C fields against the head size.
    pub fn from_code(
        code: u32,
        n_rot: u32,
        freq_base: f32,
        freq_scale: f32,
        head_dim: usize,
    ) -> Result<Self> {
        if code == Self::UNKNOWN_CODE {
            return Ok(Rope::Unknown);
        }
        if code != Self::NORM_CODE && code != Self::NEOX_CODE {
            return Err(shape_err(format!(
                "rope_type={code}: expected 0 (unknown), 1 (norm) or 2 (neox)"
            )));
        }
        let n_rot = n_rot as usize;
        if n_rot == 0 || n_rot % 2 != 0 || n_rot > head_dim {
            return Err(shape_err(format!(
                "rope_n_rot={n_rot}: expected an even number in 2..={head_dim} (head_dim)"
            )));
        }
        for (name, v) in [
            ("rope_freq_base", freq_base),
            ("rope_freq_scale", freq_scale),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(shape_err(format!(
                    "{name}={v}: expected a finite number > 0"
                )));
            }
        }
        let f = RopeFreq {
            n_rot,
            freq_base,
            freq_scale,
        };
        Ok(if code == Self::NORM_CODE {
            Rope::Norm(f)
        } else {
            Rope::Neox(f)
        })
    }

    /// Rotate one head's vector `x` (post-RoPE at some position) by `delta` positions, in place:
    /// what the same pre-RoPE vector would be at that position plus `delta`. A no-op for
    /// [`Rope::Unknown`]. `x.len()` is the head size.
    pub fn shift(&self, x: &mut [f32], delta: i64) {
        let (f, neox) = match self {
            Rope::Unknown => return,
            Rope::Norm(f) => (f, false),
            Rope::Neox(f) => (f, true),
        };
        let half = f.n_rot / 2;
        let step = -2.0 * (f.freq_base as f64).ln() / f.n_rot as f64;
        for i in 0..half {
            // angles in f64: delta * theta reaches thousands of radians at long contexts
            let angle = delta as f64 * f.freq_scale as f64 * (step * i as f64).exp();
            let (sin, cos) = angle.sin_cos();
            let (a, b) = if neox {
                (i, i + half)
            } else {
                (2 * i, 2 * i + 1)
            };
            let (x0, x1) = (x[a] as f64, x[b] as f64);
            x[a] = (x0 * cos - x1 * sin) as f32;
            x[b] = (x0 * sin + x1 * cos) as f32;
        }
    }
}

impl Shape {
    /// Check the geometry; `kq_scale == 0` means `1/sqrt(head_dim)`.
    pub fn new(
        n_layer: usize,
        n_head: usize,
        n_head_kv: usize,
        head_dim: usize,
        kq_scale: f32,
    ) -> Result<Self> {
        if n_layer == 0 || n_head == 0 || n_head_kv == 0 || head_dim == 0 {
            return Err(shape_err(format!(
                "n_layer={n_layer}, n_head={n_head}, n_head_kv={n_head_kv}, head_dim={head_dim}: all must be > 0"
            )));
        }
        if n_head % n_head_kv != 0 {
            return Err(shape_err(format!(
                "n_head={n_head} is not a multiple of n_head_kv={n_head_kv}"
            )));
        }
        // bounds that keep every product below usize overflow and every buffer sane
        if n_layer > 4096 || n_head > 4096 || head_dim > 8192 {
            return Err(shape_err(format!(
                "n_layer={n_layer}, n_head={n_head}, head_dim={head_dim}: implausibly large"
            )));
        }
        if !kq_scale.is_finite() || kq_scale < 0.0 {
            return Err(shape_err(format!(
                "kq_scale={kq_scale} must be finite and >= 0"
            )));
        }
        let kq_scale = if kq_scale == 0.0 {
            1.0 / (head_dim as f32).sqrt()
        } else {
            kq_scale
        };
        Ok(Shape {
            n_layer,
            n_head,
            n_head_kv,
            head_dim,
            kq_scale,
            rope: Rope::Unknown,
        })
    }

    /// The same shape with the engine's rotary embedding (checked against the head size by
    /// [`Rope::from_code`]).
    pub fn with_rope(self, rope: Rope) -> Self {
        Shape { rope, ..self }
    }

    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.n_head / self.n_head_kv
    }

    /// Floats in one query row of one layer (all heads).
    pub fn q_row_len(&self) -> usize {
        self.n_head * self.head_dim
    }
}

/// Where the engine keeps a layer's K. The CPU path dereferences only `Host` memory; a device
/// address is handed to the backend of that device, never read on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Memory {
    /// host memory
    #[default]
    Host,
    /// memory of CUDA device `ordinal` (the runtime's device number)
    Cuda(u32),
}

/// K of one layer: row `r` starts at `base + r * row_stride`; KV head `g` of a row starts at
/// element `g * head_dim`.
#[derive(Debug, Clone, Copy)]
pub struct KeyLayer {
    /// start of row 0
    pub base: *const u8,
    /// bytes between rows
    pub row_stride: usize,
    /// element type
    pub dtype: Dtype,
    /// host or device memory
    pub memory: Memory,
}

// SAFETY: a KeyLayer is a read-only view; the caller guarantees the memory stays valid and
// unmodified for the duration of the call that carries it.
unsafe impl Send for KeyLayer {}
unsafe impl Sync for KeyLayer {}

/// Host-memory K of every layer for the cells of one sequence.
#[derive(Debug, Clone)]
pub struct Keys<'a> {
    /// one entry per layer
    pub layers: Vec<KeyLayer>,
    /// row index of each cell (same in every layer)
    pub rows: &'a [u32],
}

impl Keys<'_> {
    /// Where every layer's K lives: `Some(memory)` when all layers agree, `None` when they do
    /// not (a partly offloaded cache), or `Some(Host)` for no layers.
    pub fn memory(&self) -> Option<Memory> {
        let first = self.layers.first().map_or(Memory::Host, |l| l.memory);
        self.layers
            .iter()
            .all(|l| l.memory == first)
            .then_some(first)
    }

    /// Check strides against the shape. Row indices are the caller's promise: they are not
    /// bounds-checked here because the buffer length is not known.
    pub fn validate(&self, shape: &Shape) -> Result<()> {
        if self.layers.len() != shape.n_layer {
            return Err(shape_err(format!(
                "{} key layers given, shape has n_layer={}",
                self.layers.len(),
                shape.n_layer
            )));
        }
        for (il, l) in self.layers.iter().enumerate() {
            if l.base.is_null() {
                return Err(Error::NullArgument("layers[].k"));
            }
            let need = shape.n_head_kv * shape.head_dim * l.dtype.size();
            if l.row_stride < need {
                return Err(shape_err(format!(
                    "layer {il}: k_row_stride={} is smaller than one row ({need} bytes = n_head_kv*head_dim*{})",
                    l.row_stride,
                    l.dtype.size()
                )));
            }
        }
        Ok(())
    }

    /// Copy KV head `g` of layer `il` for every cell into `out` as f32, transposed
    /// `[head_dim][n_cells]` (the layout the CPU kernels stream over). Fails on NaN/Inf, and on
    /// K that is not in host memory (a device address is never dereferenced here).
    pub fn gather_head_t(
        &self,
        shape: &Shape,
        il: usize,
        g: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let d = shape.head_dim;
        let n = self.rows.len();
        let layer = self.layers[il];
        if layer.memory != Memory::Host {
            return Err(shape_err(format!(
                "layer {il}: K is in {:?} memory, the CPU path reads host memory only",
                layer.memory
            )));
        }
        out.clear();
        out.resize(n * d, 0.0);
        let esz = layer.dtype.size();
        // rows are converted into a small row-major tile, then written out transposed a tile
        // at a time, so each store is a contiguous run instead of a stride-n scatter
        const TILE: usize = 16;
        let mut tile = vec![0.0f32; TILE * d];
        let mut bits = vec![0u16; d];
        for t0 in (0..n).step_by(TILE) {
            let rows = &self.rows[t0..(t0 + TILE).min(n)];
            for (ti, &r) in rows.iter().enumerate() {
                let row = &mut tile[ti * d..(ti + 1) * d];
                // SAFETY: the caller promised `rows` index valid rows of `row_stride` bytes,
                // each holding n_head_kv*head_dim elements (row_stride checked in validate()).
                let src = unsafe { layer.base.add(r as usize * layer.row_stride + g * d * esz) };
                match layer.dtype {
                    Dtype::F32 => unsafe {
                        std::ptr::copy_nonoverlapping(src, row.as_mut_ptr() as *mut u8, d * 4);
                    },
                    Dtype::F16 | Dtype::Bf16 => {
                        unsafe {
                            std::ptr::copy_nonoverlapping(src, bits.as_mut_ptr() as *mut u8, d * 2)
                        };
                        if layer.dtype == Dtype::F16 {
                            half::slice::HalfFloatSliceExt::convert_to_f32_slice(
                                half::slice::HalfBitsSliceExt::reinterpret_cast::<half::f16>(
                                    bits.as_slice(),
                                ),
                                row,
                            );
                        } else {
                            half::slice::HalfFloatSliceExt::convert_to_f32_slice(
                                half::slice::HalfBitsSliceExt::reinterpret_cast::<half::bf16>(
                                    bits.as_slice(),
                                ),
                                row,
                            );
                        }
                    }
                }
                if row.iter().any(|v| !v.is_finite()) {
                    return Err(Error::NonFinite {
                        what: "keys",
                        layer: il,
                        row: t0 + ti,
                    });
                }
            }
            for c in 0..d {
                let dst = &mut out[c * n + t0..c * n + t0 + rows.len()];
                for (ti, v) in dst.iter_mut().enumerate() {
                    *v = tile[ti * d + c];
                }
            }
        }
        Ok(())
    }
}

/// Owned K for tests and the reference: `[n_layer][n_cells][n_head_kv*head_dim]` f32.
#[derive(Debug, Clone)]
pub struct OwnedKeys {
    /// the values
    pub data: Vec<f32>,
    /// cells per layer
    pub n_cells: usize,
    /// row identity mapping
    pub rows: Vec<u32>,
}

impl OwnedKeys {
    /// Wrap a flat buffer.
    pub fn new(shape: &Shape, n_cells: usize, data: Vec<f32>) -> Result<Self> {
        let need = shape.n_layer * n_cells * shape.n_head_kv * shape.head_dim;
        if data.len() != need {
            return Err(shape_err(format!(
                "keys: {} values, expected {need}",
                data.len()
            )));
        }
        Ok(OwnedKeys {
            data,
            n_cells,
            rows: (0..n_cells as u32).collect(),
        })
    }

    /// Borrow as [`Keys`].
    pub fn view(&self, shape: &Shape) -> Keys<'_> {
        let row = shape.n_head_kv * shape.head_dim;
        let layers = (0..shape.n_layer)
            .map(|il| KeyLayer {
                base: self.data[il * self.n_cells * row..].as_ptr() as *const u8,
                row_stride: row * 4,
                dtype: Dtype::F32,
                memory: Memory::Host,
            })
            .collect();
        Keys {
            layers,
            rows: &self.rows,
        }
    }

    /// Element accessor (layer, cell, kv head, dim).
    pub fn at(&self, shape: &Shape, il: usize, cell: usize, g: usize, k: usize) -> f32 {
        let row = shape.n_head_kv * shape.head_dim;
        self.data[il * self.n_cells * row + cell * row + g * shape.head_dim + k]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4)
    }

    #[test]
    fn rope_shift_composes_and_uses_the_engine_angles() {
        let f = RopeFreq {
            n_rot: 8,
            freq_base: 100.0,
            freq_scale: 0.5,
        };
        // head_dim 10 with n_rot 8: the last two dimensions are not rotated
        let v: Vec<f32> = (0..10).map(|i| (i as f32 * 0.7).sin() + 0.1).collect();
        for (rope, pair1) in [(Rope::Norm(f), (2, 3)), (Rope::Neox(f), (1, 5))] {
            let mut a = v.clone();
            rope.shift(&mut a, 37);
            rope.shift(&mut a, -12);
            let mut b = v.clone();
            rope.shift(&mut b, 25);
            assert!(close(&a, &b), "{rope:?}: shifts do not compose");
            rope.shift(&mut b, -25);
            assert!(close(&b, &v), "{rope:?}: no round trip");
            assert_eq!(&a[8..], &v[8..], "{rope:?}: rotated past n_rot");
            // pair 1 turns by delta * freq_scale * freq_base^(-2/n_rot)
            let angle = 25.0f64 * 0.5 * 100f64.powf(-2.0 / 8.0);
            let (x0, x1) = (v[pair1.0] as f64, v[pair1.1] as f64);
            let want = [
                x0 * angle.cos() - x1 * angle.sin(),
                x0 * angle.sin() + x1 * angle.cos(),
            ];
            assert!((a[pair1.0] as f64 - want[0]).abs() < 1e-4, "{rope:?}");
            assert!((a[pair1.1] as f64 - want[1]).abs() < 1e-4, "{rope:?}");
        }
        let mut u = v.clone();
        Rope::Unknown.shift(&mut u, 1000);
        assert_eq!(u, v);
    }

    #[test]
    fn rope_codes_are_checked() {
        assert_eq!(Rope::from_code(0, 0, 0.0, 0.0, 64).unwrap(), Rope::Unknown);
        assert!(Rope::from_code(3, 64, 1e4, 1.0, 64).is_err());
        assert!(Rope::from_code(1, 66, 1e4, 1.0, 64).is_err());
        assert!(Rope::from_code(1, 63, 1e4, 1.0, 64).is_err());
        assert!(Rope::from_code(2, 64, f32::INFINITY, 1.0, 64).is_err());
        assert!(Rope::from_code(2, 64, 1e4, -1.0, 64).is_err());
        assert!(matches!(
            Rope::from_code(2, 32, 1e4, 1.0, 64).unwrap(),
            Rope::Neox(RopeFreq { n_rot: 32, .. })
        ));
    }
}
