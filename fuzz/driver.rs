//! The C-API fuzz driver: decodes a byte string into a sequence of calls to the `extern "C"`
//! functions of kvcompress, made with raw pointers exactly as a C caller would, and checks what
//! the header promises after each one. Shared by the libFuzzer target
//! (`fuzz/fuzz_targets/c_api.rs`) and the plain `cargo test` replay of every input kept in
//! `fuzz/regressions/` (`tests/fuzz_regressions.rs`), so a fixed crash stays fixed without the
//! fuzzer.
//!
//! What counts as a bug (the driver panics, which libFuzzer reports as a crash):
//! - `KVC_STATUS_PANIC` from any call: the library caught its own panic;
//! - an output written on failure, or past the length the caller gave (canaries);
//! - a plan that breaks its contract: more cells than the buffer holds, not ascending, cells not
//!   in the view, the newest cell or position 0 evicted, more than `max(max_cells, 2)` cells
//!   left, stats that do not add up, or a `BUFFER_TOO_SMALL` plan that fails again with
//!   `evict_cap = n_cells`; `layer_kept`/`keep_mask` right after it that disagree with it;
//! - a `describe` string that does not parse back into the same policy;
//! - a string that is not NUL-terminated inside its buffer, an empty `last_error` after a failure;
//! - a policy that `kvc_policy_check` rejects but `kvc_evictor_init` accepts (or with another
//!   status), on a valid shape.
//!
//! Lies: where the API can check (NULL pointers, shapes, dtypes, strides against the shape,
//! positions, capacities, lengths of `counts`/`mask`, NaN/Inf), the driver lies to it. Where the
//! header says it trusts the caller (the length of `q`, `q_pos`, `cells`, `pos`, `k_rows`,
//! `layers`, and that K holds every row it is told about), every buffer is allocated to the size
//! it claims, and no smaller: a read past it is the library's bug, and AddressSanitizer (on by
//! default in scripts/fuzz.sh) sees it. Freeing twice is documented as undefined and never done.

#![allow(clippy::missing_safety_doc, clippy::needless_range_loop)]

use kvcompress::ffi::*;
use std::ffi::{c_char, CStr, CString};
use std::ptr;

/// Most calls one input makes after creating an evictor.
const MAX_OPS: usize = 48;
/// Bounds that keep one execution fast (the library itself accepts far larger shapes; those are
/// exercised with calls that need no buffers of that size).
const MAX_CELLS: usize = 96;
const MAX_Q: usize = 12;
/// `n_layer * n_head * head_dim` above this: a "large" shape, driven without Q or K buffers.
const SMALL_SHAPE: usize = 1 << 12;
const CANARY: u8 = 0xA5;
const EVICT_SENTINEL: u32 = 0xDEAD_BEEF;

/// A byte reader that yields zeros once the input is used up.
pub struct Bytes<'a> {
    d: &'a [u8],
    i: usize,
}

impl<'a> Bytes<'a> {
    pub fn new(d: &'a [u8]) -> Self {
        Bytes { d, i: 0 }
    }
    fn done(&self) -> bool {
        self.i >= self.d.len()
    }
    fn u8(&mut self) -> u8 {
        let v = self.d.get(self.i).copied().unwrap_or(0);
        self.i += 1;
        v
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    /// `0..n` (n > 0)
    fn below(&mut self, n: usize) -> usize {
        if n <= 256 {
            self.u8() as usize % n
        } else {
            self.u32() as usize % n
        }
    }
    /// True once in `one_in` (>= 2); false once the input is used up.
    fn chance(&mut self, one_in: u8) -> bool {
        self.u8() % one_in == one_in - 1
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let s = self.i.min(self.d.len());
        let e = (s + n).min(self.d.len());
        self.i += n;
        &self.d[s..e]
    }
    /// A float: mostly small and finite, sometimes extreme, sometimes NaN/Inf.
    fn f32(&mut self) -> f32 {
        match self.u8() {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => f32::NEG_INFINITY,
            3 => f32::MAX,
            4 => -f32::MAX,
            5 => f32::MIN_POSITIVE / 4.0, // subnormal
            6 => -0.0,
            7 => 1e30,
            8 => f32::from_bits(self.u32()),
            _ => (self.u8() as i8) as f32 / 16.0,
        }
    }
}

/// `KVC_FUZZ_TRACE=1`: print every call and its status (to read what a crash input does).
fn trace() -> bool {
    static T: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *T.get_or_init(|| std::env::var_os("KVC_FUZZ_TRACE").is_some())
}

/// Bulk data (K and Q) from a few input bytes: a xorshift stream in one of a few value ranges,
/// so one input byte does not go to each float.
struct Data {
    state: u64,
    scale: f32,
}

impl Data {
    fn new(b: &mut Bytes) -> Self {
        let scale = match b.u8() % 8 {
            0 => 0.0,   // all zeros: ties everywhere
            1 => 1e-30, // underflow in q.k
            2 => 1e4,   // large logits (softmax overflow if unguarded)
            3 => 3e19,  // q.k overflows f32 to Inf in the library
            _ => 1.0,
        };
        Data {
            state: (b.u32() as u64) << 1 | 1,
            scale,
        }
    }
    fn next(&mut self) -> f32 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * self.scale
    }
}

fn check_status(call: &str, st: kvc_status) {
    if trace() {
        eprintln!("kvc fuzz: {call} -> {st}");
    }
    assert_ne!(
        st, KVC_STATUS_PANIC,
        "{call}: the library caught a panic (KVC_STATUS_PANIC)"
    );
    // every status the library returns has its own text
    let s = unsafe { CStr::from_ptr(kvc_status_str(st)) };
    assert_ne!(s.to_bytes(), b"unknown status code", "{call}: status {st}");
}

/// A string the library hands back must be a valid C string; returns its bytes.
fn c_bytes<'a>(p: *const c_char, what: &str) -> &'a [u8] {
    assert!(!p.is_null(), "{what}: NULL string");
    unsafe { CStr::from_ptr(p) }.to_bytes()
}

/// A caller-owned message buffer (`err`, `describe`), with canaries after `len`.
struct MsgBuf {
    data: Vec<u8>,
    len: usize,
    null: bool,
}

const TAIL: usize = 8;

impl MsgBuf {
    fn new(b: &mut Bytes) -> Self {
        let null = b.chance(8);
        let len = match b.u8() % 6 {
            0 => 0,
            1 => 1,
            2 => 2 + b.below(16),
            _ => 64 + b.below(256),
        };
        MsgBuf {
            data: vec![CANARY; len + TAIL],
            len,
            null,
        }
    }
    fn ptr(&mut self) -> *mut c_char {
        if self.null {
            ptr::null_mut()
        } else {
            self.data.as_mut_ptr() as *mut c_char
        }
    }
    /// Canaries intact; NUL inside the buffer when anything was written. Returns the text.
    fn check(&self, what: &str, written: bool) -> Option<&[u8]> {
        assert!(
            self.data[self.len..].iter().all(|&c| c == CANARY),
            "{what}: wrote past the {} bytes given",
            self.len
        );
        if self.null || self.len == 0 {
            assert!(
                self.data.iter().all(|&c| c == CANARY),
                "{what}: wrote to a 0-length buffer"
            );
            return None;
        }
        if !written {
            return None;
        }
        let nul = self.data[..self.len]
            .iter()
            .position(|&c| c == 0)
            .unwrap_or_else(|| panic!("{what}: no NUL inside the {} bytes given", self.len));
        Some(&self.data[..nul])
    }
    /// The `err` of a call: "" on success, a message on failure (when one character fits).
    fn check_message(&self, call: &str, st: kvc_status) {
        if let Some(msg) = self.check(call, true) {
            if st == KVC_STATUS_OK {
                assert!(msg.is_empty(), "{call}: OK with a message");
            } else if self.len > 1 {
                assert!(!msg.is_empty(), "{call}: status {st} without a message");
            }
        }
    }
}

/// Strings for `kv` overrides and policy names: valid, garbage, non-UTF-8, NULL.
///
/// KEYS and VALID keep their order (the fuzzer's byte-to-choice mapping, which the committed
/// seeds and regressions rely on); tests/fuzz_regressions.rs checks them against the policy
/// table, so a new parameter fails `cargo test` until it is listed here.
pub const KEYS: &[&str] = &[
    "sinks",
    "interval",
    "granularity",
    "ratio",
    "tokens",
    "window",
    "pool",
    "pooling",
    "gqa",
    "beta",
    "max_ratio",
    "alpha",
    "layers",
    "threshold",
    "ranker",
    "p",
    "samples",
    "quorum",
    "seed",
    "stride",
    "evict",
    "recon",
    "recon_stride",
    "support",
    "measure",
];
const VALUES: &[&str] = &[
    "0",
    "1",
    "2",
    "3",
    "4",
    "7",
    "8",
    "32",
    "-1",
    "0.5",
    "0.01",
    "0.99",
    "1.0",
    "1.5",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "infinity",
    "1e309",
    "-1e309",
    "1e-45",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "-0",
    "+3",
    " 5 ",
    "0x10",
    "",
    "=",
    "1e",
    "token",
    "layer",
    "head",
    "max",
    "avg",
    "mean",
    "uniform",
    "pyramid",
    "window",
    "position",
    "2147483647",
    "-2147483648",
    "0.0",
    "1e-300",
    "3.4e38",
    "100000000",
];
// the library's own list, so a new policy is fuzzed without touching this file
const NAMES: &[&str] = kvcompress::POLICY_NAMES;

fn garbage(b: &mut Bytes) -> Vec<u8> {
    let n = b.below(24);
    b.take(n).iter().copied().filter(|&c| c != 0).collect()
}

fn policy_name(b: &mut Bytes) -> Option<CString> {
    let bytes = match b.u8() % 16 {
        0 => return None,
        1 => garbage(b),
        2 => {
            // a real name, mangled (case, whitespace, suffix, non-UTF-8)
            let mut v = NAMES[b.below(NAMES.len())].as_bytes().to_vec();
            match b.u8() % 4 {
                0 => v.make_ascii_uppercase(),
                1 => v.push(b' '),
                2 => v.push(0xff),
                _ => v.truncate(v.len() / 2),
            }
            v
        }
        _ => NAMES[b.below(NAMES.len())].as_bytes().to_vec(),
    };
    Some(CString::new(bytes).expect("no NUL"))
}

fn override_str(b: &mut Bytes) -> Option<CString> {
    let bytes: Vec<u8> = match b.u8() % 16 {
        0 => return None,
        1 => garbage(b),
        2 => {
            let mut v = KEYS[b.below(KEYS.len())].as_bytes().to_vec();
            v.push(b'=');
            v.extend(garbage(b));
            v
        }
        3 => {
            // a number of any size and form
            let k = KEYS[b.below(KEYS.len())];
            let v = match b.u8() % 4 {
                0 => format!("{}", b.u32() as i32),
                1 => format!("{}", b.f32()),
                2 => format!(
                    "{:e}",
                    f64::from_bits(((b.u32() as u64) << 32) | b.u32() as u64)
                ),
                _ => format!("{}", ((b.u32() as u64) << 32) | b.u32() as u64),
            };
            format!("{k}={v}").into_bytes()
        }
        4 => KEYS[b.below(KEYS.len())].as_bytes().to_vec(), // no '='
        5 => format!(
            " {} = {} ",
            KEYS[b.below(KEYS.len())],
            VALUES[b.below(VALUES.len())]
        )
        .into_bytes(),
        6..=9 => format!(
            "{}={}",
            KEYS[b.below(KEYS.len())],
            VALUES[b.below(VALUES.len())]
        )
        .into_bytes(),
        _ => {
            // a key with a value it accepts (or its edge), so valid combinations are common
            let (k, vals) = VALID[b.below(VALID.len())];
            format!("{k}={}", vals[b.below(vals.len())]).into_bytes()
        }
    };
    Some(CString::new(bytes).expect("no NUL"))
}

/// Every key with values it accepts, edges included.
pub const VALID: &[(&str, &[&str])] = &[
    ("sinks", &["0", "1", "4", "64", "1048576"]),
    ("interval", &["0", "1", "2", "32", "16777216"]),
    ("granularity", &["token", "layer", "head"]),
    ("ratio", &["0", "0.1", "0.5", "0.9", "0.999"]),
    ("tokens", &["1", "2", "8", "64", "4294967295"]),
    ("window", &["0", "1", "8", "32", "4096"]),
    ("pool", &["1", "3", "7", "63"]),
    ("pooling", &["max", "avg"]),
    ("gqa", &["mean", "max"]),
    ("beta", &["1", "20", "1e30"]),
    ("max_ratio", &["1", "10", "1e30"]),
    ("alpha", &["0", "0.2", "1"]),
    ("layers", &["uniform", "pyramid"]),
    ("threshold", &["0.0001", "0.01", "0.5", "0.9999"]),
    ("ranker", &["window", "position", "context", "recon"]),
    ("p", &["0.01", "0.5", "0.95", "1"]),
    ("samples", &["0", "1", "8", "1024"]),
    ("quorum", &["0", "0.35", "1"]),
    ("seed", &["0", "1", "18446744073709551615"]),
    ("stride", &["1", "16", "4096"]),
    ("evict", &["prompt", "pressure"]),
    ("recon", &["0.0001", "0.5", "1"]),
    ("recon_stride", &["1", "4", "4096"]),
    ("support", &["0", "0.5", "1"]),
    ("measure", &["norm", "mass"]),
];

/// Policy name and overrides, owned, plus the pointer arrays C would pass.
struct PolicyArgs {
    name: Option<CString>,
    kv: Vec<Option<CString>>,
    kv_ptrs: Vec<*const c_char>,
    kv_null: bool,
}

impl PolicyArgs {
    fn new(b: &mut Bytes) -> Self {
        let name = policy_name(b);
        let n = match b.u8() % 8 {
            0..=2 => 0,
            3..=5 => 1 + b.below(3),
            _ => b.below(8),
        };
        let kv: Vec<Option<CString>> = (0..n).map(|_| override_str(b)).collect();
        let kv_ptrs = kv
            .iter()
            .map(|s| s.as_ref().map_or(ptr::null(), |s| s.as_ptr()))
            .collect();
        let kv_null = n > 0 && b.chance(16);
        PolicyArgs {
            name,
            kv,
            kv_ptrs,
            kv_null,
        }
    }
    fn name_ptr(&self) -> *const c_char {
        self.name.as_ref().map_or(ptr::null(), |s| s.as_ptr())
    }
    fn kv_ptr(&self) -> *const *const c_char {
        if self.kv_null || self.kv.is_empty() {
            ptr::null()
        } else {
            self.kv_ptrs.as_ptr()
        }
    }
}

/// The shape handed to `kvc_evictor_init`.
fn params(b: &mut Bytes) -> kvc_params {
    let mut p = kvc_params_default();
    assert_eq!(p.abi_version, KVC_ABI_VERSION);
    assert_eq!(kvc_abi_version(), KVC_ABI_VERSION);
    let small = |b: &mut Bytes, max: usize| -> u32 {
        match b.u8() % 32 {
            0 => 0,
            1 => b.u32(),
            2 => 4096 + b.below(8) as u32,
            _ => 1 + b.below(max) as u32,
        }
    };
    p.n_layer = small(b, 3);
    p.n_head_kv = small(b, 2);
    // usually a multiple of n_head_kv (grouped-query attention), sometimes not
    p.n_head = if b.chance(8) {
        small(b, 8)
    } else {
        p.n_head_kv.wrapping_mul(1 + b.below(4) as u32)
    };
    p.head_dim = small(b, 8);
    p.kq_scale = if b.chance(4) { b.f32() } else { 0.0 };
    p.backend = match b.u8() % 16 {
        0 => KVC_BACKEND_CUDA,
        1 => b.u32(),
        2..=8 => KVC_BACKEND_AUTO,
        _ => KVC_BACKEND_CPU,
    };
    p.n_threads = match b.u8() % 16 {
        0 => 0,
        1 => 2,
        _ => 1,
    };
    // the cost bounds: mostly the defaults, sometimes none or tight. Derived from the shape,
    // not read from the input: a new read would shift the byte mapping of every stored
    // regression input (invalid bounds: tests/policies.rs)
    match (p.n_layer ^ p.n_head ^ p.head_dim) % 8 {
        0 => (p.max_plan_cost, p.max_token_cost) = (0.0, 0.0),
        1 => (p.max_plan_cost, p.max_token_cost) = ((p.head_dim % 64) as f32, 0.5),
        _ => {}
    }
    // the rotary embedding (ABI 4): also derived from the shape, for the same reason; valid,
    // absent, or refused (an unknown type, an odd or too large n_rot, a bad base)
    let rope = match (p.n_layer ^ p.n_head_kv ^ p.head_dim.rotate_left(3)) % 8 {
        0 | 1 => Some((KVC_ROPE_NORM, p.head_dim & !1, 1e4, 1.0)),
        2 => Some((KVC_ROPE_NEOX, 2, 1e6, 0.25)),
        3 => Some((KVC_ROPE_NEOX, p.head_dim.wrapping_add(2), 1e4, 1.0)),
        4 => Some((KVC_ROPE_NORM, p.head_dim & !1, f32::NAN, 1.0)),
        5 => Some((9, 0, 0.0, 0.0)),
        _ => None,
    };
    if let Some(r) = rope {
        (
            p.rope_type,
            p.rope_n_rot,
            p.rope_freq_base,
            p.rope_freq_scale,
        ) = r;
    }
    if b.chance(32) {
        p.abi_version = b.u32();
    }
    p
}

fn rope_ok(p: &kvc_params) -> bool {
    p.rope_type == KVC_ROPE_UNKNOWN
        || ((p.rope_type == KVC_ROPE_NORM || p.rope_type == KVC_ROPE_NEOX)
            && p.rope_n_rot > 0
            && p.rope_n_rot % 2 == 0
            && p.rope_n_rot <= p.head_dim
            && p.rope_freq_base.is_finite()
            && p.rope_freq_base > 0.0
            && p.rope_freq_scale.is_finite()
            && p.rope_freq_scale > 0.0)
}

fn shape_ok(p: &kvc_params) -> bool {
    p.n_layer > 0
        && p.n_head > 0
        && p.n_head_kv > 0
        && p.head_dim > 0
        && p.n_head % p.n_head_kv == 0
        && p.n_layer <= 4096
        && p.n_head <= 4096
        && p.head_dim <= 8192
        && p.kq_scale.is_finite()
        && p.kq_scale >= 0.0
        && p.abi_version == KVC_ABI_VERSION
        && (p.backend == KVC_BACKEND_CPU || p.backend == KVC_BACKEND_AUTO)
        && rope_ok(p)
}

/// One cell the engine holds for a sequence.
#[derive(Clone, Copy)]
struct Cell {
    id: u32,
    pos: i32,
}

/// What the driver (the "engine") knows about one sequence.
#[derive(Default, Clone)]
struct Seq {
    cells: Vec<Cell>,
    next_pos: i32,
    /// n_cells of the last successful plan (for keep_mask)
    last_plan_n: Option<usize>,
}

struct Driver<'a> {
    b: Bytes<'a>,
    ev: *mut kvc_evictor,
    p: kvc_params,
    policy: Vec<u8>,
    /// `granularity=` of the policy, from `describe`
    granularity: Vec<u8>,
    seqs: [Seq; 3],
    next_cell: u32,
}

const SEQ_IDS: [i32; 3] = [0, 1, -7];

impl Driver<'_> {
    fn large(&self) -> bool {
        let p = &self.p;
        (p.n_layer as usize) * (p.n_head as usize) * (p.head_dim as usize) > SMALL_SHAPE
    }

    fn pick_seq(&mut self) -> (usize, i32) {
        let i = self.b.below(4);
        if i == 3 {
            // an id the driver does not track (never planned, or random)
            (
                0,
                if self.b.chance(2) {
                    12345
                } else {
                    self.b.u32() as i32
                },
            )
        } else {
            (i, SEQ_IDS[i])
        }
    }

    fn last_error_check(&self, st: kvc_status, call: &str) {
        let e = c_bytes(unsafe { kvc_evictor_last_error(self.ev) }, "last_error");
        if trace() && !e.is_empty() {
            eprintln!("kvc fuzz:   {}", String::from_utf8_lossy(e));
        }
        if st == KVC_STATUS_OK {
            assert!(
                e.is_empty(),
                "{call}: OK but last_error = {:?}",
                String::from_utf8_lossy(e)
            );
        } else {
            assert!(!e.is_empty(), "{call}: status {st} but last_error is empty");
        }
    }

    fn push_queries(&mut self) {
        let (si, seq_id) = self.pick_seq();
        let p = self.p;
        let row = (p.n_head as usize) * (p.head_dim as usize);
        let n_q = if self.large() {
            0
        } else {
            self.b.below(MAX_Q + 1)
        };
        // positions: usually the newest tokens of the tracked sequence, ascending
        let mut q_pos: Vec<i32> = match self.b.u8() % 8 {
            0 => (0..n_q).map(|_| self.b.u32() as i32).collect(),
            1 => (0..n_q as i32).rev().collect(),
            _ => {
                let end = self.seqs[si].next_pos.max(n_q as i32);
                (end - n_q as i32..end).collect()
            }
        };
        let wild = self.b.chance(16);
        let mut data = Data::new(&mut self.b);
        let mut q: Vec<f32> = (0..p.n_layer as usize * n_q * row)
            .map(|_| data.next())
            .collect();
        if wild && !q.is_empty() {
            let i = self.b.below(q.len());
            q[i] = self.b.f32();
        }
        let qp = if n_q > 0 && self.b.chance(16) {
            ptr::null()
        } else {
            q_pos.as_mut_ptr() as *const i32
        };
        let qq = if n_q > 0 && self.b.chance(16) {
            ptr::null()
        } else {
            q.as_ptr()
        };
        let st = unsafe { kvc_evictor_push_queries(self.ev, seq_id, n_q as u32, qp, qq) };
        check_status("push_queries", st);
        self.last_error_check(st, "push_queries");
    }

    /// The reconstruction pass the policy asks for, and sometimes its rows (the engine hands them
    /// over before the plan of a prompt's end; a lie now and then: NULL rows, a non-finite value).
    fn recon(&mut self) {
        let (mut fraction, mut stride) = (-1.0f32, 0u32);
        let st = unsafe { kvc_evictor_recon(self.ev, &mut fraction, &mut stride) };
        check_status("recon", st);
        assert_eq!(st, KVC_STATUS_OK, "recon");
        assert!(
            (0.0..=1.0).contains(&fraction) && stride >= 1,
            "recon {fraction} {stride}"
        );
        if !self.b.chance(2) {
            return;
        }
        let (_, seq_id) = self.pick_seq();
        let p = self.p;
        let row = (p.n_head as usize) * (p.head_dim as usize);
        let n_q = if self.large() {
            0
        } else {
            self.b.below(MAX_Q + 1)
        };
        let mut data = Data::new(&mut self.b);
        let mut q: Vec<f32> = (0..p.n_layer as usize * n_q * row)
            .map(|_| data.next())
            .collect();
        if self.b.chance(16) && !q.is_empty() {
            let i = self.b.below(q.len());
            q[i] = self.b.f32();
        }
        let qq = if n_q > 0 && self.b.chance(16) {
            ptr::null()
        } else {
            q.as_ptr()
        };
        let st = unsafe { kvc_evictor_push_recon(self.ev, seq_id, n_q as u32, qq) };
        check_status("push_recon", st);
        self.last_error_check(st, "push_recon");
    }

    /// A view of a sequence: usually what the engine holds after new tokens, sometimes a lie.
    /// Returns (cells, pos, k_rows or empty, max_cells, flags).
    fn view(&mut self, si: usize) -> (Vec<u32>, Vec<i32>, Vec<u32>, u32, u32) {
        let b = &mut self.b;
        let s = &mut self.seqs[si];
        match b.u8() % 8 {
            0 => {
                // rewind: the engine dropped the newest tokens
                let keep = if s.cells.is_empty() {
                    0
                } else {
                    b.below(s.cells.len() + 1)
                };
                s.cells.truncate(keep);
                s.next_pos = s.cells.last().map_or(0, |c| c.pos + 1);
            }
            1 => {
                // a prompt: many tokens
                let n = 1 + b.below(MAX_CELLS / 2);
                for _ in 0..n {
                    s.cells.push(Cell {
                        id: self.next_cell % 256,
                        pos: s.next_pos,
                    });
                    self.next_cell += 1;
                    s.next_pos += 1;
                }
            }
            2 => {} // nothing new
            _ => {
                let n = if b.chance(2) { 1 } else { b.below(4) };
                for _ in 0..n {
                    s.cells.push(Cell {
                        id: self.next_cell % 256,
                        pos: s.next_pos,
                    });
                    self.next_cell += 1;
                    s.next_pos += if b.chance(8) {
                        1 + b.below(1000) as i32
                    } else {
                        1
                    };
                }
            }
        }
        if s.cells.len() > MAX_CELLS {
            // the engine ran out of room: drop the oldest (a plan should have)
            let extra = s.cells.len() - MAX_CELLS;
            s.cells.drain(..extra);
        }
        let mut cells: Vec<u32> = s.cells.iter().map(|c| c.id).collect();
        let mut pos: Vec<i32> = s.cells.iter().map(|c| c.pos).collect();
        // lies the library must catch
        match b.u8() % 24 {
            0 if pos.len() > 1 => pos.swap(0, 1),
            1 if !pos.is_empty() => {
                let i = b.below(pos.len());
                pos[i] = b.u32() as i32;
            }
            2 if !pos.is_empty() => pos[0] = -1 - b.below(5) as i32,
            3 => {
                // fully random, ascending by construction half the time
                let n = b.below(MAX_CELLS);
                cells = (0..n).map(|_| b.u8() as u32).collect();
                pos = (0..n).map(|_| b.u16() as i32).collect();
                if b.chance(2) {
                    pos.sort_unstable();
                    pos.dedup();
                    cells.truncate(pos.len());
                }
            }
            4 if pos.len() > 1 => {
                let i = b.below(pos.len() - 1);
                pos[i + 1] = pos[i]; // a duplicate position
            }
            _ => {}
        }
        let k_rows = if b.chance(3) {
            // an explicit row map: any rows of the K buffer
            (0..cells.len()).map(|_| b.u8() as u32).collect()
        } else {
            Vec::new()
        };
        let max_cells = match b.u8() % 8 {
            0 => 1 + b.below(8) as u32,
            1 => b.below(MAX_CELLS) as u32,
            2 => b.u32(),
            _ => 0,
        };
        let flags = match b.u8() % 8 {
            0 => 0,
            1 => b.u32(),
            _ => KVC_SEQ_FLAG_PROMPT_END,
        };
        (cells, pos, k_rows, max_cells, flags)
    }

    fn due(&mut self) {
        let (si, seq_id) = self.pick_seq();
        let (cells, pos, k_rows, max_cells, flags) = self.view(si);
        let n = cells.len();
        let view = kvc_seq_view {
            seq_id,
            n_cells: n as u32,
            cells: if n > 0 && self.b.chance(32) {
                ptr::null()
            } else {
                cells.as_ptr()
            },
            pos: if n > 0 && self.b.chance(32) {
                ptr::null()
            } else {
                pos.as_ptr()
            },
            k_rows: if k_rows.is_empty() {
                ptr::null()
            } else {
                k_rows.as_ptr()
            },
            max_cells,
            flags,
            layers: ptr::null(),
        };
        let mut due: u8 = 0xAA;
        let seq_p: *const kvc_seq_view = if self.b.chance(32) {
            ptr::null()
        } else {
            &view
        };
        let due_p: *mut bool = if self.b.chance(32) {
            ptr::null_mut()
        } else {
            &mut due as *mut u8 as *mut bool
        };
        let st = unsafe { kvc_evictor_due(self.ev, seq_p, due_p) };
        check_status("due", st);
        self.last_error_check(st, "due");
        if st == KVC_STATUS_OK {
            assert!(due <= 1, "due: wrote {due} into a bool");
        } else {
            assert_eq!(due, 0xAA, "due: wrote the output on failure");
        }
    }

    fn plan(&mut self) {
        let (si, seq_id) = self.pick_seq();
        let tracked = SEQ_IDS.get(si) == Some(&seq_id);
        let (cells, pos, k_rows, max_cells, flags) = self.view(si);
        let n = cells.len();
        let p = self.p;
        let nl = p.n_layer as usize;
        let large = self.large();
        // K: one buffer per layer, exactly as many rows as the view addresses
        let rows_used: &[u32] = if k_rows.is_empty() { &cells } else { &k_rows };
        let n_rows = rows_used.iter().map(|&r| r as usize + 1).max().unwrap_or(0);
        let kv_len = (p.n_head_kv as usize).saturating_mul(p.head_dim as usize);
        let mut bufs: Vec<Vec<u8>> = Vec::new();
        let mut layers: Vec<kvc_layer_view> = Vec::new();
        let layers_mode = self.b.u8() % 32;
        let wild = self.b.chance(16);
        let mut data = Data::new(&mut self.b);
        if !large && layers_mode != 31 {
            for _ in 0..nl {
                // 30: F32 "in CUDA memory" (below); carved out of the F32 values so that the byte
                // mapping of the committed regressions stays as it was
                let dtype_byte = self.b.u8() % 32;
                let dtype = match dtype_byte {
                    31 => self.b.u32(),
                    1..=9 => KVC_DTYPE_F16,
                    10..=15 => KVC_DTYPE_BF16,
                    _ => KVC_DTYPE_F32,
                };
                let esz = if dtype == KVC_DTYPE_F32 { 4 } else { 2 };
                let need = kv_len * esz;
                let stride = match self.b.u8() % 32 {
                    31 => need.saturating_sub(1 + self.b.below(4)), // too small: must be refused
                    1..=4 => need + self.b.below(9),                // padded, maybe unaligned
                    30 => self.b.u32() as usize,                    // anything
                    _ => need,
                };
                // rows the contract requires: (n_rows - 1) * stride + one row; a stride the
                // library must refuse gets no more than n_rows * stride bytes, so a read anyway
                // runs past the buffer
                let bytes = if n_rows == 0 {
                    0
                } else if stride >= need {
                    (n_rows - 1)
                        .checked_mul(stride)
                        .and_then(|x| x.checked_add(need))
                        .filter(|&x| x <= 1 << 24)
                        .unwrap_or(usize::MAX)
                } else {
                    n_rows * stride
                };
                if bytes == usize::MAX {
                    // a stride too large to allocate for: no K for this call
                    bufs.clear();
                    layers.clear();
                    break;
                }
                let off = self.b.below(4); // unaligned base
                let mut buf = vec![0u8; off + bytes];
                let mut i = off;
                while i + esz <= buf.len() {
                    let v = data.next();
                    match esz {
                        4 => buf[i..i + 4].copy_from_slice(&v.to_le_bytes()),
                        _ => {
                            let h = if dtype == KVC_DTYPE_BF16 {
                                half::bf16::from_f32(v).to_bits()
                            } else {
                                half::f16::from_f32(v).to_bits()
                            };
                            buf[i..i + 2].copy_from_slice(&h.to_le_bytes());
                        }
                    }
                    i += esz;
                }
                if wild && buf.len() >= off + esz {
                    // one NaN/Inf somewhere (maybe in padding the library never reads)
                    let at = off + self.b.below((buf.len() - off) / esz) * esz;
                    let bad: &[u8] = match (esz, self.b.u8() % 2) {
                        (4, 0) => &[0, 0, 0xc0, 0x7f],
                        (4, _) => &[0, 0, 0x80, 0xff],
                        (_, 0) if dtype == KVC_DTYPE_F16 => &[0x00, 0x7c],
                        (_, _) if dtype == KVC_DTYPE_F16 => &[0x00, 0x7e],
                        (_, 0) => &[0x80, 0x7f],
                        (_, _) => &[0xc0, 0xff],
                    };
                    buf[at..at + esz].copy_from_slice(bad);
                }
                let k = if layers_mode == 30 || (n > 0 && self.b.chance(64)) {
                    ptr::null()
                } else {
                    buf[off..].as_ptr() as *const std::ffi::c_void
                };
                // now and then K "in device memory": an address the host must never read (the
                // fuzz build has no CUDA: refused with CUDA_UNAVAILABLE or INVALID_SHAPE); with a
                // stride that is a multiple of 7, a memory code that does not exist instead
                let (k, k_memory, k_device) = match (dtype_byte, stride % 7) {
                    (30, 0) => (k, stride as u32, 0),
                    (30, _) => (16usize as *const std::ffi::c_void, KVC_MEMORY_CUDA, 0),
                    _ => (k, KVC_MEMORY_HOST, 0),
                };
                layers.push(kvc_layer_view {
                    k,
                    k_row_stride: stride as u64,
                    k_dtype: dtype,
                    k_memory,
                    k_device,
                });
                bufs.push(buf);
            }
        }
        let view = kvc_seq_view {
            seq_id,
            n_cells: n as u32,
            cells: cells.as_ptr(),
            pos: pos.as_ptr(),
            k_rows: if k_rows.is_empty() {
                ptr::null()
            } else {
                k_rows.as_ptr()
            },
            max_cells,
            flags,
            layers: if layers.len() == nl && nl > 0 {
                layers.as_ptr()
            } else {
                ptr::null()
            },
        };
        let cap = match self.b.u8() % 8 {
            0 => 0,
            1 => self.b.below(n + 1),
            2 => n.saturating_sub(1),
            3 => n + 3,
            _ => n,
        };
        let evict_null = self.b.chance(32);
        let n_evict_null = self.b.chance(32);
        let stats_null = self.b.chance(4);
        let run = |ev: *mut kvc_evictor, cap: usize, evict_null: bool, n_evict_null: bool| {
            let mut evict = vec![EVICT_SENTINEL; cap + 4];
            let mut n_evict: usize = usize::MAX;
            let mut stats = kvc_stats {
                ran: 7,
                ..Default::default()
            };
            let st = unsafe {
                kvc_evictor_plan(
                    ev,
                    &view,
                    if evict_null {
                        ptr::null_mut()
                    } else {
                        evict.as_mut_ptr()
                    },
                    cap,
                    if n_evict_null {
                        ptr::null_mut()
                    } else {
                        &mut n_evict
                    },
                    if stats_null {
                        ptr::null_mut()
                    } else {
                        &mut stats
                    },
                )
            };
            check_status("plan", st);
            assert!(
                evict[cap..].iter().all(|&c| c == EVICT_SENTINEL),
                "plan: wrote past evict_cap={cap}"
            );
            (st, evict, n_evict, stats)
        };
        let (mut st, mut evict, mut n_evict, mut stats) =
            run(self.ev, cap, evict_null, n_evict_null);
        self.last_error_check(st, "plan");
        if st == KVC_STATUS_BUFFER_TOO_SMALL {
            assert!(
                cap < n,
                "plan: BUFFER_TOO_SMALL with evict_cap={cap} >= n_cells={n}"
            );
            // the header: `evict_cap >= seq->n_cells` always suffices, and the failed call
            // left the sequence as it was
            (st, evict, n_evict, stats) = run(self.ev, n, false, false);
            assert_eq!(
                st, KVC_STATUS_OK,
                "plan: BUFFER_TOO_SMALL, then status {st} with evict_cap = n_cells"
            );
        }
        if st != KVC_STATUS_OK {
            assert_eq!(n_evict, usize::MAX, "plan: wrote n_evict on failure");
            assert!(
                evict.iter().all(|&c| c == EVICT_SENTINEL),
                "plan: wrote evict on failure"
            );
            assert_eq!(stats.ran, 7, "plan: wrote stats on failure");
            return;
        }
        let ne = n_evict;
        assert!(ne <= n, "plan: {ne} evicted of {n} cells");
        let out = &evict[..ne];
        assert!(
            out.windows(2).all(|w| w[0] <= w[1]),
            "plan: evict not ascending: {out:?}"
        );
        for c in out {
            assert!(
                cells.contains(c),
                "plan: evicted cell {c} is not in the view"
            );
        }
        if let Some(last) = pos.iter().rposition(|_| true) {
            // the newest cell and position 0 are never evicted (cell ids are unique in
            // the tracked views; random views may repeat ids, so only those are checked)
            let unique = {
                let mut c = cells.clone();
                c.sort_unstable();
                c.windows(2).all(|w| w[0] != w[1])
            };
            if unique {
                assert!(!out.contains(&cells[last]), "plan: evicted the newest cell");
                if let Some(i0) = pos.iter().position(|&p| p == 0) {
                    assert!(!out.contains(&cells[i0]), "plan: evicted position 0");
                }
            }
        }
        if !stats_null {
            assert!(stats.ran <= 1, "plan: stats.ran = {}", stats.ran);
            assert_eq!(stats.n_evict as usize, ne, "plan: stats.n_evict");
            assert_eq!(stats.n_cells as usize, n, "plan: stats.n_cells");
            assert_eq!(
                stats.n_keep as usize + ne,
                n,
                "plan: n_keep + n_evict != n_cells"
            );
            // squeezed: cells the rule wanted and the cap took, so only under a cap
            assert!(
                stats.n_squeezed as usize <= ne && (max_cells > 0 || stats.n_squeezed == 0),
                "plan: n_squeezed {} with {ne} evicted, max_cells={max_cells}",
                stats.n_squeezed
            );
        }
        // the header: "the plan leaves at most this many cells"; position 0 and the newest
        // cell stay whatever the cap
        if !stats_null && stats.ran == 1 && max_cells > 0 {
            assert!(
                stats.n_keep <= max_cells.max(2),
                "plan kept {} cells, max_cells={max_cells} (n={n}, budget={}, policy {:?})",
                stats.n_keep,
                stats.budget,
                String::from_utf8_lossy(&self.policy)
            );
        }
        if !stats_null && stats.ran == 1 && !large {
            self.check_unit_sets(seq_id, &cells, out, stats.n_keep as usize);
        }
        if tracked && n > 0 {
            // the engine frees what the plan said, as llama.cpp does
            let s = &mut self.seqs[si];
            if s.cells.len() == n && s.cells.iter().zip(&cells).all(|(c, id)| c.id == *id) {
                s.cells.retain(|c| !out.contains(&c.id));
            }
            s.last_plan_n = Some(n);
        }
    }

    /// Right after a plan that ran: `layer_kept` and `keep_mask` describe that plan. With
    /// `granularity=token` every layer keeps the plan's cells; with `layer`/`head` a cell is
    /// freed only when no (layer, KV head) keeps it, and a layer keeps what any of its heads does.
    fn check_unit_sets(&mut self, seq_id: i32, cells: &[u32], evicted: &[u32], n_keep: usize) {
        let p = self.p;
        let (nl, nh) = (p.n_layer as usize, p.n_head_kv as usize);
        let n = cells.len();
        let mut counts = vec![u32::MAX; nl];
        let st = unsafe { kvc_evictor_layer_kept(self.ev, seq_id, counts.as_mut_ptr(), nl) };
        check_status("layer_kept(after plan)", st);
        assert_eq!(st, KVC_STATUS_OK, "layer_kept right after a plan that ran");
        let token = self.granularity == b"token";
        for (l, &c) in counts.iter().enumerate() {
            if token {
                assert_eq!(c as usize, n_keep, "layer_kept[{l}] with granularity=token");
            } else {
                assert!(
                    c as usize <= n_keep,
                    "layer_kept[{l}]={c} > n_keep={n_keep}"
                );
            }
        }
        let mut unique = cells.to_vec();
        unique.sort_unstable();
        unique.dedup();
        let freed: Vec<bool> = cells.iter().map(|c| evicted.contains(c)).collect();
        for l in 0..nl {
            let mut any = vec![false; n];
            for g in 0..nh {
                let mut mask = vec![CANARY; n];
                let st = unsafe {
                    kvc_evictor_keep_mask(self.ev, seq_id, l as u32, g as u32, mask.as_mut_ptr(), n)
                };
                check_status("keep_mask(after plan)", st);
                assert_eq!(st, KVC_STATUS_OK, "keep_mask right after a plan that ran");
                for i in 0..n {
                    assert!(mask[i] <= 1, "keep_mask: flag {}", mask[i]);
                    any[i] |= mask[i] == 1;
                    if !token && unique.len() == n {
                        assert!(
                            !(freed[i] && mask[i] == 1),
                            "plan freed cell {} that layer {l}, KV head {g} keeps",
                            cells[i]
                        );
                    }
                }
            }
            if !token {
                let kept = any.iter().filter(|&&k| k).count();
                assert_eq!(
                    kept, counts[l] as usize,
                    "layer_kept[{l}] vs its heads' masks"
                );
            }
        }
    }

    fn layer_kept(&mut self) {
        let (_, seq_id) = self.pick_seq();
        let nl = self.p.n_layer as usize;
        let len = match self.b.u8() % 4 {
            0 => nl.saturating_sub(1),
            1 => self.b.below(8),
            _ => nl,
        }
        .min(1 << 16);
        let mut counts = vec![u32::MAX; len + 4];
        let null = self.b.chance(16);
        let st = unsafe {
            kvc_evictor_layer_kept(
                self.ev,
                seq_id,
                if null {
                    ptr::null_mut()
                } else {
                    counts.as_mut_ptr()
                },
                len,
            )
        };
        check_status("layer_kept", st);
        self.last_error_check(st, "layer_kept");
        assert!(
            counts[len..].iter().all(|&c| c == u32::MAX),
            "layer_kept: wrote past n_layer"
        );
        if st != KVC_STATUS_OK {
            assert!(
                counts.iter().all(|&c| c == u32::MAX),
                "layer_kept: wrote on failure"
            );
        } else {
            assert!(len >= nl, "layer_kept: OK with {len} < n_layer={nl}");
        }
    }

    fn keep_mask(&mut self) {
        let (si, seq_id) = self.pick_seq();
        let p = self.p;
        let last_n = self.seqs[si].last_plan_n.unwrap_or(0);
        let layer = if self.b.chance(8) {
            self.b.u32()
        } else {
            self.b.below(p.n_layer.max(1) as usize) as u32
        };
        let kv_head = if self.b.chance(8) {
            self.b.u32()
        } else {
            self.b.below(p.n_head_kv.max(1) as usize) as u32
        };
        let n = match self.b.u8() % 4 {
            0 => self.b.below(MAX_CELLS),
            1 => last_n + 1,
            _ => last_n,
        };
        let mut mask = vec![CANARY; n + TAIL];
        let null = self.b.chance(16);
        let st = unsafe {
            kvc_evictor_keep_mask(
                self.ev,
                seq_id,
                layer,
                kv_head,
                if null {
                    ptr::null_mut()
                } else {
                    mask.as_mut_ptr()
                },
                n,
            )
        };
        check_status("keep_mask", st);
        self.last_error_check(st, "keep_mask");
        assert!(
            mask[n..].iter().all(|&c| c == CANARY),
            "keep_mask: wrote past n"
        );
        if st == KVC_STATUS_OK {
            assert!(
                mask[..n].iter().all(|&c| c <= 1),
                "keep_mask: flags not 0/1"
            );
        } else {
            assert!(
                mask.iter().all(|&c| c == CANARY),
                "keep_mask: wrote on failure"
            );
        }
    }

    fn describe(&mut self) {
        let mut buf = MsgBuf::new(&mut self.b);
        let full = unsafe { kvc_evictor_describe(self.ev, buf.ptr(), buf.len) };
        if let Some(text) = buf.check("describe", true) {
            assert_eq!(text.len(), full.min(buf.len - 1), "describe: length");
        }
        assert!(full > 0, "describe: empty");
        let mut whole = vec![0u8; full + 1];
        let again = unsafe {
            kvc_evictor_describe(self.ev, whole.as_mut_ptr() as *mut c_char, whole.len())
        };
        assert_eq!(again, full, "describe: length changed");
        assert!(
            whole.starts_with(&self.policy),
            "describe does not start with the policy name: {:?}",
            String::from_utf8_lossy(&whole)
        );
        if buf.len > 0 && !buf.null {
            assert!(
                whole.starts_with(&buf.data[..full.min(buf.len - 1)]),
                "describe: truncation differs"
            );
        }
        // what describe prints is a policy spec: fed back as name + overrides it is accepted
        // and describes itself the same way
        let text = &whole[..full];
        let mut parts = text.split(|&c| c == b' ');
        let name = CString::new(parts.next().unwrap_or_default()).expect("no NUL");
        let kv: Vec<CString> = parts.map(|x| CString::new(x).expect("no NUL")).collect();
        let kv_p: Vec<*const c_char> = kv.iter().map(|x| x.as_ptr()).collect();
        let mut err = [0u8; 256];
        let st = unsafe {
            kvc_policy_check(
                name.as_ptr(),
                kv_p.as_ptr(),
                kv_p.len(),
                err.as_mut_ptr() as *mut c_char,
                err.len(),
            )
        };
        check_status("policy_check(describe)", st);
        assert_eq!(
            st,
            KVC_STATUS_OK,
            "describe output {:?} is rejected: {:?}",
            String::from_utf8_lossy(text),
            unsafe { CStr::from_ptr(err.as_ptr() as *const c_char) }
        );
        let mut ev2 = ptr::null_mut();
        let st = unsafe {
            kvc_evictor_init(
                &self.p,
                name.as_ptr(),
                kv_p.as_ptr(),
                kv_p.len(),
                &mut ev2,
                ptr::null_mut(),
                0,
            )
        };
        check_status("init(describe)", st);
        assert_eq!(st, KVC_STATUS_OK, "init from describe output");
        let mut again = vec![0u8; full + 1];
        let n2 =
            unsafe { kvc_evictor_describe(ev2, again.as_mut_ptr() as *mut c_char, again.len()) };
        unsafe { kvc_evictor_free(ev2) };
        assert_eq!(
            &again[..n2.min(full)],
            text,
            "describe of the re-created policy differs"
        );
        assert_eq!(
            n2, full,
            "describe of the re-created policy differs in length"
        );
    }

    fn run(&mut self) {
        for _ in 0..MAX_OPS {
            if self.b.done() {
                break;
            }
            match self.b.u8() % 12 {
                0 | 1 => self.push_queries(),
                2 | 3 => self.due(),
                4..=6 => self.plan(),
                7 => {
                    let (si, seq_id) = self.pick_seq();
                    let st = unsafe { kvc_evictor_seq_forget(self.ev, seq_id) };
                    check_status("seq_forget", st);
                    assert_eq!(st, KVC_STATUS_OK, "seq_forget");
                    self.last_error_check(st, "seq_forget");
                    if SEQ_IDS.get(si) == Some(&seq_id) && self.b.chance(2) {
                        self.seqs[si] = Seq::default();
                    }
                }
                8 => self.layer_kept(),
                9 => self.keep_mask(),
                10 => self.describe(),
                _ => {
                    let w = unsafe { kvc_evictor_q_window(self.ev) };
                    assert!(w < 1 << 20, "q_window = {w}");
                    self.recon();
                }
            }
        }
    }
}

/// Calls that take no handle, and every call on a NULL handle.
fn handle_free_calls(b: &mut Bytes) {
    c_bytes(kvc_version(), "kvc_version");
    let names = c_bytes(kvc_policy_names(), "kvc_policy_names");
    for n in NAMES {
        assert!(
            names.split(|&c| c == b',').any(|x| x == n.as_bytes()),
            "kvc_policy_names lacks {n}"
        );
    }
    c_bytes(kvc_status_str(b.u32()), "kvc_status_str");
    let null = ptr::null_mut::<kvc_evictor>();
    unsafe {
        kvc_evictor_free(null);
        c_bytes(kvc_evictor_last_error(null), "last_error(NULL)");
        assert_eq!(kvc_evictor_describe(null, ptr::null_mut(), 0), 0);
        assert_eq!(kvc_evictor_q_window(null), 0);
        let mut due = false;
        let mut n_evict = 0usize;
        for st in [
            kvc_evictor_push_queries(null, 0, 0, ptr::null(), ptr::null()),
            kvc_evictor_push_recon(null, 0, 0, ptr::null()),
            kvc_evictor_recon(null, ptr::null_mut(), ptr::null_mut()),
            kvc_evictor_due(null, ptr::null(), &mut due),
            kvc_evictor_plan(
                null,
                ptr::null(),
                ptr::null_mut(),
                0,
                &mut n_evict,
                ptr::null_mut(),
            ),
            kvc_evictor_seq_forget(null, 0),
            kvc_evictor_layer_kept(null, 0, ptr::null_mut(), 0),
            kvc_evictor_keep_mask(null, 0, 0, 0, ptr::null_mut(), 0),
        ] {
            assert_eq!(st, KVC_STATUS_NULL_ARGUMENT, "a call on a NULL handle");
        }
    }
}

/// One fuzz input, start to end.
pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    handle_free_calls(&mut b);

    let args = PolicyArgs::new(&mut b);
    if trace() {
        eprintln!("kvc fuzz: policy {:?} overrides {:?}", args.name, args.kv);
    }
    let mut err = MsgBuf::new(&mut b);
    let check = unsafe {
        kvc_policy_check(
            args.name_ptr(),
            args.kv_ptr(),
            args.kv.len(),
            err.ptr(),
            err.len,
        )
    };
    check_status("policy_check", check);
    err.check_message("policy_check", check);

    // the cost of a policy is known without a model, for every policy check accepts
    let mut cost = kvc_cost {
        per_plan: -1.0,
        per_token: -1.0,
    };
    let cost_st = unsafe {
        kvc_policy_cost(
            args.name_ptr(),
            args.kv_ptr(),
            args.kv.len(),
            &mut cost,
            ptr::null_mut(),
            0,
        )
    };
    check_status("policy_cost", cost_st);
    assert_eq!(cost_st, check, "policy_cost and policy_check disagree");
    if cost_st == KVC_STATUS_OK {
        assert!(
            cost.per_plan.is_finite()
                && cost.per_plan >= 0.0
                && cost.per_token.is_finite()
                && cost.per_token >= 0.0,
            "policy_cost: {cost:?}"
        );
    }

    let p = params(&mut b);
    let mut err = MsgBuf::new(&mut b);
    let sentinel = 0x10 as *mut kvc_evictor;
    let mut out = sentinel;
    let params_null = b.chance(64);
    let out_null = b.chance(64);
    let st = unsafe {
        kvc_evictor_init(
            if params_null { ptr::null() } else { &p },
            args.name_ptr(),
            args.kv_ptr(),
            args.kv.len(),
            if out_null { ptr::null_mut() } else { &mut out },
            err.ptr(),
            err.len,
        )
    };
    check_status("init", st);
    err.check_message("init", st);
    if shape_ok(&p) && !params_null && !out_null && check != KVC_STATUS_OK {
        assert_eq!(
            st, check,
            "init and policy_check disagree on the same policy"
        );
    }
    if st != KVC_STATUS_OK {
        assert_eq!(out, sentinel, "init: wrote *out on failure");
        return;
    }
    assert!(
        !out.is_null() && out != sentinel,
        "init: OK without a handle"
    );
    assert_eq!(
        check, KVC_STATUS_OK,
        "init accepted a policy that policy_check rejects"
    );
    // an accepted policy is within the bounds it was created with
    if cost_st == KVC_STATUS_OK {
        for (c, limit) in [
            (cost.per_plan, p.max_plan_cost),
            (cost.per_token, p.max_token_cost),
        ] {
            assert!(
                limit == 0.0 || c <= limit,
                "init accepted cost {cost:?} over the bounds {} / {}",
                p.max_plan_cost,
                p.max_token_cost
            );
        }
    }

    let granularity = {
        let mut buf = vec![0u8; 1024];
        let n = unsafe { kvc_evictor_describe(out, buf.as_mut_ptr() as *mut c_char, buf.len()) };
        let text = &buf[..n.min(buf.len() - 1)];
        text.split(|&c| c == b' ')
            .find_map(|w| w.strip_prefix(b"granularity="))
            .unwrap_or(b"token")
            .to_vec()
    };
    let mut d = Driver {
        granularity,
        b,
        ev: out,
        p,
        policy: args
            .name
            .as_ref()
            .map(|n| n.as_bytes().to_vec())
            .unwrap_or_default(),
        seqs: Default::default(),
        next_cell: 0,
    };
    d.run();
    // freed exactly once; a second free is undefined and never tried
    unsafe { kvc_evictor_free(d.ev) };
}
