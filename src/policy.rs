//! The named policies: each is a preset of scorer × budget rule × allocator with the papers'
//! defaults, and every parameter can be overridden with a `name=value` string.
//!
//! [`PRESETS`] is the one policy table: each preset is declared once there, with its name, its
//! parameters (defaults, accepted ranges, help), whether its budget is user-set or adaptive and
//! how its stages are built. [`POLICY_NAMES`], `kvc_policy_names()`, [`Policy::describe`], the
//! property tests, the fuzz driver and the evaluation's policy lists (`eval/policies.json`,
//! written by [`table_json`]) all derive from it.

use crate::budget::{
    Ada, Allocator, BudgetRule, DBudget, Dynamic, Evidence, Fixed, Measure, Pyramid, Uniform, Vote,
};
use crate::error::{Error, Result};
use crate::score::{
    Accumulated, ContextAttention, GVote, GqaReduce, KeyNorm, Position, PositionWithQueries,
    QuerySel, Recon, Scorer, WindowAttention,
};
use std::collections::BTreeMap;

pub use crate::select::Granularity;

/// How a preset's total budget is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetKind {
    /// nothing is evicted (`none`): no parameters, no stages
    Off,
    /// user-set: `ratio=` (default) or `tokens=`
    Fixed,
    /// emerges from the input (no `ratio`/`tokens`)
    Adaptive,
}

impl BudgetKind {
    /// `off`, `fixed` or `adaptive`.
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetKind::Off => "off",
            BudgetKind::Fixed => "fixed",
            BudgetKind::Adaptive => "adaptive",
        }
    }
}

/// The values a parameter accepts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Range {
    /// an integer in `min..=max`
    Int {
        /// smallest
        min: usize,
        /// largest
        max: usize,
    },
    /// an odd integer in `min..=max` (a pooling kernel)
    OddInt {
        /// smallest
        min: usize,
        /// largest
        max: usize,
    },
    /// an integer in `min..=max`, or unset (empty)
    OptInt {
        /// smallest
        min: usize,
        /// largest
        max: usize,
    },
    /// any `u64`
    U64,
    /// a finite number between `lo` and `hi` (`inf` for none), each bound open or closed
    Num {
        /// lower bound
        lo: f32,
        /// the lower bound itself is excluded
        lo_open: bool,
        /// upper bound
        hi: f32,
        /// the upper bound itself is excluded
        hi_open: bool,
    },
    /// one of these words
    Choice(&'static [&'static str]),
}

impl Range {
    /// The range as text (`[0, 1)`, `1..=63`, `mean | max`).
    pub fn text(&self) -> String {
        match *self {
            Range::Int { min, max } | Range::OptInt { min, max } => format!("{min}..={max}"),
            Range::OddInt { min, max } => format!("odd {min}..={max}"),
            Range::U64 => format!("0..={}", u64::MAX),
            Range::Num {
                lo,
                lo_open,
                hi,
                hi_open,
            } => format!(
                "{}{lo}, {hi}{}",
                if lo_open { "(" } else { "[" },
                if hi_open { ")" } else { "]" }
            ),
            Range::Choice(o) => o.join(" | "),
        }
    }

    fn contains(&self, v: f32) -> bool {
        let Range::Num {
            lo,
            lo_open,
            hi,
            hi_open,
        } = *self
        else {
            return false;
        };
        (if lo_open { v > lo } else { v >= lo }) && (if hi_open { v < hi } else { v <= hi })
    }
}

/// One accepted parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Param {
    /// its name
    pub key: &'static str,
    /// its default value ("" = unset)
    pub default: &'static str,
    /// the values it accepts
    pub range: Range,
    /// one line of help
    pub help: &'static str,
}

const fn p(key: &'static str, default: &'static str, range: Range, help: &'static str) -> Param {
    Param {
        key,
        default,
        range,
        help,
    }
}

const fn num(lo: f32, lo_open: bool, hi: f32, hi_open: bool) -> Range {
    Range::Num {
        lo,
        lo_open,
        hi,
        hi_open,
    }
}

const WINDOW: Range = Range::Int { min: 0, max: 4096 };
const POOL: Range = Range::OddInt { min: 1, max: 63 };
const UNIT: Range = num(0.0, false, 1.0, false);
const AT_LEAST_1: Range = num(1.0, false, f32::INFINITY, true);

/// Default `granularity`: `token` for every policy, including the ones whose papers
/// keep per-layer (PyramidKV, DynamicKV) or per-head (Ada-KV) sets.
///
/// With `layer`/`head` llama.cpp masks each layer (head) to its own set and re-packs the rows
/// (patch 0004), so a sequence holds the largest layer's (head's) set. Measured on SmolLM2-135M
/// (`eval/run.py --preset granularity`, results/GRANULARITY.md): at equal cells held, `layer` lowers
/// the teacher-forced KL for snapkv (0.028 -> 0.018 at ratio 0.5), adakv (0.020 -> 0.018), dbudget
/// (0.0072 -> 0.0052) and gvote; pyramidkv and dynamickv hold ~all cells at `layer` (their largest
/// layer keeps nearly the whole prompt), and `head` holds more than `token` for adakv with a worse
/// KL. `token` stays the default because a re-packed sequence cannot be state-saved (llama-server
/// slot save and RAM prompt cache) nor truncated through its re-packed span (context shift), and
/// the gain rests on a small grid; `layer` is the opt-in for memory-bound single-shot use.
const DEFAULT_GRANULARITY: &str = "token";

/// Most spread query rows `ranker=context` remembers per sequence: a row is
/// `n_layer * n_head * head_dim` floats (69 KiB for SmolLM2-135M, 512 KiB for an 8B model), and
/// the plan's cost grows with rows x cells.
const CONTEXT_QUERY_CAP: usize = 1024;

/// Most reconstruction query rows `ranker=recon` reads at a prompt's end (a 2K context at the
/// default `recon_stride=4`; fewer than the spread rows' 1024, so the plan is bounded like
/// `ranker=context`'s).
const RECON_QUERY_CAP: usize = 512;

/// When a sequence gives up cells (common parameter `evict`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evict {
    /// at each prompt's end and every `interval` decoded tokens, whether or not the cache needs
    /// the room; also when the engine needs room (over its cap, or `KVC_SEQ_FLAG_ROOM`)
    Prompt,
    /// only when the engine needs room: the full cache's answers while memory allows. Under
    /// pressure the sequence first gives up what its policy would (the verdict its prompt's end
    /// deferred), then is squeezed by the engine's cap
    Pressure,
}

/// Parameters of every policy but `none`, first in every list.
const COMMON: &[Param] = &[
    p(
        "sinks",
        "4",
        Range::Int { min: 0, max: 1 << 20 },
        "oldest cells always kept (attention sinks)",
    ),
    p(
        "interval",
        "32",
        Range::Int { min: 0, max: 1 << 24 },
        "during decode, run again after this many new tokens (0 = prefill only)",
    ),
    p(
        "granularity",
        DEFAULT_GRANULARITY,
        Range::Choice(&["token", "layer", "head"]),
        "token | layer | head: where the keep sets apply (layer/head: per-layer/per-head sets, re-packed)",
    ),
    p(
        "evict",
        "prompt",
        Range::Choice(&["prompt", "pressure"]),
        "prompt | pressure: evict at each prompt's end and every interval, or only when the cache needs room (the full cache's answers while memory allows)",
    ),
];

/// Parameters of the user-set budget ([`BudgetKind::Fixed`]), after [`COMMON`].
const FIXED: &[Param] = &[
    p(
        "ratio",
        "0.5",
        num(0.0, false, 1.0, true),
        "fraction of the tokens seen to evict (0 <= ratio < 1)",
    ),
    p(
        "tokens",
        "",
        Range::OptInt {
            min: 1,
            max: u32::MAX as usize,
        },
        "cells to keep (overrides ratio)",
    ),
];

const GQA: Param = p(
    "gqa",
    "mean",
    Range::Choice(&["mean", "max"]),
    "reduce query heads of a GQA group: mean | max",
);
const KEPT_WINDOW_HELP: &str = "newest cells always kept";
const OBS_WINDOW_HELP: &str =
    "observation window: newest queries scored against the cache, and kept";
const POOL_HELP: &str = "pooling kernel along the sequence (odd; 1 = none)";
const POOLING: Range = Range::Choice(&["max", "avg"]);

/// The stages a preset builds.
type Stages = (Box<dyn Scorer>, Box<dyn BudgetRule>, Box<dyn Allocator>);

/// One named policy: declared once, everything else derives from it.
pub struct Preset {
    /// the name `--kv-policy` accepts
    pub name: &'static str,
    /// user-set or adaptive budget
    pub budget: BudgetKind,
    /// its own parameters, after [`COMMON`] (and [`FIXED`] for a fixed budget)
    pub own: &'static [Param],
    /// builds the stages from the resolved values and the observation window (`window`, >= 1)
    build: fn(&Values, usize) -> Result<Stages>,
}

impl std::fmt::Debug for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Preset({} {:?})", self.name, self.budget)
    }
}

impl Preset {
    /// Every parameter it accepts, in help order: common, fixed budget, its own.
    pub fn params(&self) -> Vec<Param> {
        match self.budget {
            BudgetKind::Off => Vec::new(),
            BudgetKind::Fixed => [COMMON, FIXED, self.own].concat(),
            BudgetKind::Adaptive => [COMMON, self.own].concat(),
        }
    }

    /// The preset called `name`.
    pub fn find(name: &str) -> Option<&'static Preset> {
        PRESETS.iter().find(|p| p.name == name)
    }
}

/// The policy table.
pub const PRESETS: [Preset; 11] = [
    Preset {
        name: "none",
        budget: BudgetKind::Off,
        own: &[],
        build: |_, _| unreachable!("`none` builds no stages"),
    },
    Preset {
        name: "streaming",
        budget: BudgetKind::Fixed,
        own: &[p("window", "0", WINDOW, KEPT_WINDOW_HELP)],
        build: |v, _| Ok((Box::new(Position), Box::new(v.fixed()?), Box::new(Uniform))),
    },
    Preset {
        name: "h2o",
        budget: BudgetKind::Fixed,
        own: &[
            p(
                "window",
                "32",
                WINDOW,
                "newest cells always kept; also query rows captured per call",
            ),
            GQA,
        ],
        build: |v, _| {
            Ok((
                Box::new(Accumulated { gqa: v.gqa()? }),
                Box::new(v.fixed()?),
                Box::new(Uniform),
            ))
        },
    },
    Preset {
        name: "snapkv",
        budget: BudgetKind::Fixed,
        own: &[
            p("window", "32", WINDOW, OBS_WINDOW_HELP),
            p("pool", "7", POOL, POOL_HELP),
            p("pooling", "max", POOLING, "max | avg"),
            GQA,
        ],
        build: |v, w| Ok((v.window_attention(w)?, Box::new(v.fixed()?), Box::new(Uniform))),
    },
    Preset {
        name: "tova",
        budget: BudgetKind::Fixed,
        own: &[p("window", "1", WINDOW, KEPT_WINDOW_HELP), GQA],
        build: |v, _| {
            Ok((
                Box::new(WindowAttention {
                    window: 1,
                    kernel: 1,
                    max_pool: true,
                    gqa: v.gqa()?,
                }),
                Box::new(v.fixed()?),
                Box::new(Uniform),
            ))
        },
    },
    Preset {
        name: "knorm",
        budget: BudgetKind::Fixed,
        own: &[p("window", "8", WINDOW, KEPT_WINDOW_HELP)],
        build: |v, _| Ok((Box::new(KeyNorm), Box::new(v.fixed()?), Box::new(Uniform))),
    },
    Preset {
        name: "pyramidkv",
        budget: BudgetKind::Fixed,
        own: &[
            p("window", "8", WINDOW, OBS_WINDOW_HELP),
            p("pool", "7", POOL, POOL_HELP),
            p("pooling", "max", POOLING, "max | avg"),
            GQA,
            p(
                "beta",
                "20",
                AT_LEAST_1,
                "pyramid steepness: last layer gets budget/beta",
            ),
        ],
        build: |v, w| {
            let scorer = v.window_attention(w)?;
            let beta = v.f32("beta")?;
            Ok((scorer, Box::new(v.fixed()?), Box::new(Pyramid { beta })))
        },
    },
    Preset {
        name: "dynamickv",
        budget: BudgetKind::Fixed,
        own: &[
            p("window", "8", WINDOW, OBS_WINDOW_HELP),
            p("pool", "7", POOL, POOL_HELP),
            p("pooling", "avg", POOLING, "max | avg"),
            GQA,
            p(
                "max_ratio",
                "10",
                AT_LEAST_1,
                "cap of a layer's budget, in multiples of the average",
            ),
        ],
        build: |v, w| {
            let scorer = v.window_attention(w)?;
            let max_ratio = v.f32("max_ratio")?;
            Ok((scorer, Box::new(v.fixed()?), Box::new(Dynamic { max_ratio })))
        },
    },
    Preset {
        name: "adakv",
        budget: BudgetKind::Fixed,
        own: &[
            p("window", "32", WINDOW, OBS_WINDOW_HELP),
            p("pool", "7", POOL, POOL_HELP),
            p("pooling", "max", POOLING, "max | avg"),
            GQA,
            p(
                "alpha",
                "0.2",
                UNIT,
                "uniform floor of each head's share (0..1)",
            ),
            p(
                "layers",
                "uniform",
                Range::Choice(&["uniform", "pyramid"]),
                "layer budgets under the head split: uniform | pyramid",
            ),
        ],
        build: |v, w| {
            let scorer = v.window_attention(w)?;
            let alpha = v.f32("alpha")?;
            let layers: Box<dyn Allocator> = match v.choice("layers")? {
                "pyramid" => Box::new(Pyramid { beta: 20.0 }),
                _ => Box::new(Uniform),
            };
            Ok((scorer, Box::new(v.fixed()?), Box::new(Ada { alpha, layers })))
        },
    },
    Preset {
        name: "dbudget",
        budget: BudgetKind::Adaptive,
        own: &[
            p(
                "threshold",
                "0.01",
                num(0.0, true, 1.0, true),
                "largest relative drop of the newest query's attention norm, per layer",
            ),
            p(
                "measure",
                "norm",
                Range::Choice(&["norm", "mass"]),
                "what `threshold` bounds: norm (L2 of the attention, the paper's; ruled by the largest entries) | mass (the attention summed: also counts the many small entries a peaked head drops)",
            ),
            p(
                "window",
                "8",
                WINDOW,
                "observation window for the ranking, and newest cells kept",
            ),
            p(
                "ranker",
                "window",
                Range::Choice(&["window", "position", "context", "recon"]),
                "window (attention of the newest queries) | position (oldest first) | context (question-agnostic: the largest attention from queries spread over the whole sequence, which the norm rule then guards too) | recon (question-agnostic, KVzip: at a prompt's end, the largest attention from the queries of a teacher-forced reconstruction of the context, run by the engine after the sequence's end; costs `recon` of an extra prefill)",
            ),
            p("pool", "7", POOL, "max-pooling kernel of the window ranking along the sequence (odd; 1 = none): a needle's neighbours share its rank, so numbers and names survive whole"),
            GQA,
            p(
                "stride",
                "16",
                Range::Int { min: 1, max: 4096 },
                "ranker=context: one query every `stride` positions is read (at most 1024 per sequence, thinned by halves beyond)",
            ),
            p(
                "recon",
                "1",
                num(0.0, true, 1.0, false),
                "ranker=recon: fraction of the context's chunks reconstructed, evenly spread (1 = all: about one extra prefill)",
            ),
            p(
                "recon_stride",
                "4",
                Range::Int { min: 1, max: 4096 },
                "ranker=recon: one reconstruction query every `recon_stride` tokens is read (at most 512, thinned by halves beyond)",
            ),
        ],
        build: |v, w| {
            let ranker = v.choice("ranker")?;
            let (scorer, evidence): (Box<dyn Scorer>, Evidence) = match ranker {
                "position" => (Box::new(PositionWithQueries { window: w }), Evidence::Newest),
                "context" | "recon" => (
                    Box::new(ContextAttention {
                        stride: v.usize("stride")?,
                        window: w,
                        cap: CONTEXT_QUERY_CAP,
                        kernel: v.odd("pool")?,
                        gqa: v.gqa()?,
                        recon: if ranker == "recon" {
                            Some(Recon {
                                fraction: v.f32("recon")?,
                                stride: v.usize("recon_stride")?,
                                cap: RECON_QUERY_CAP,
                            })
                        } else {
                            None
                        },
                    }),
                    Evidence::MaxOverQueries,
                ),
                _ => (
                    Box::new(WindowAttention {
                        window: w,
                        kernel: v.odd("pool")?,
                        max_pool: true,
                        gqa: v.gqa()?,
                    }),
                    Evidence::Newest,
                ),
            };
            let threshold = v.f32("threshold")?;
            let measure = match v.choice("measure")? {
                "mass" => Measure::Mass,
                _ => Measure::Norm,
            };
            Ok((
                scorer,
                Box::new(DBudget {
                    threshold,
                    evidence,
                    measure,
                }),
                Box::new(Uniform),
            ))
        },
    },
    Preset {
        name: "gvote",
        budget: BudgetKind::Adaptive,
        own: &[
            p("p", "0.95", num(0.0, true, 1.0, false), "nucleus mass each sampled query keeps"),
            p(
                "samples",
                "8",
                Range::Int { min: 0, max: 1024 },
                "sampled future queries per head",
            ),
            p(
                "support",
                "0.5",
                UNIT,
                "share of a unit's samples whose nuclei must hold a cell for the unit to vote for it (the newest queries always vote); 0 = any sample",
            ),
            p(
                "quorum",
                "0.35",
                UNIT,
                "fraction of (layer, KV head) units that must vote for a cell; 0 = union (keeps most)",
            ),
            p("seed", "0", Range::U64, "sampler seed"),
            p("pool", "7", POOL, "max-pooling kernel of the vote shares along the sequence (odd; 1 = none)"),
            p(
                "window",
                "32",
                WINDOW,
                "query rows the Gaussian is fitted to, and newest cells kept",
            ),
        ],
        build: |v, w| {
            let scorer = GVote {
                window: w.max(2),
                p: v.f32("p")?,
                samples: v.usize("samples")?,
                support: v.f32("support")?,
                seed: v.u64("seed")?,
                kernel: v.odd("pool")?,
            };
            let quorum = v.f32("quorum")?;
            Ok((
                Box::new(scorer),
                Box::new(Vote { quorum }),
                Box::new(Uniform),
            ))
        },
    },
];

const fn names<const N: usize>(t: &[Preset; N]) -> [&'static str; N] {
    let mut out = [""; N];
    let mut i = 0;
    while i < N {
        out[i] = t[i].name;
        i += 1;
    }
    out
}

const NAMES: [&str; PRESETS.len()] = names(&PRESETS);

/// Every policy name `--kv-policy` accepts, in table order.
pub const POLICY_NAMES: &[&str] = &NAMES;

/// The policy table as JSON (name, budget kind, parameters with default, range and help), for
/// tools outside Rust: `eval/policies.json` is this text (`cargo run --release --example
/// gen_policies` writes it, tests/policies.rs checks it is current).
pub fn table_json() -> String {
    fn q(s: &str) -> String {
        let mut o = String::from("\"");
        for c in s.chars() {
            match c {
                '"' => o.push_str("\\\""),
                '\\' => o.push_str("\\\\"),
                c => o.push(c),
            }
        }
        o.push('"');
        o
    }
    let mut s = String::from("[\n");
    for (i, pr) in PRESETS.iter().enumerate() {
        s.push_str(&format!(
            "  {{\"name\": {}, \"budget\": {}, \"params\": [",
            q(pr.name),
            q(pr.budget.as_str())
        ));
        let ps = pr.params();
        for (j, pa) in ps.iter().enumerate() {
            s.push_str(&format!(
                "\n    {{\"key\": {}, \"default\": {}, \"range\": {}, \"help\": {}}}{}",
                q(pa.key),
                q(pa.default),
                q(&pa.range.text()),
                q(pa.help),
                if j + 1 < ps.len() { "," } else { "\n  " }
            ));
        }
        s.push_str(if i + 1 < PRESETS.len() {
            "]},\n"
        } else {
            "]}\n"
        });
    }
    s.push_str("]\n");
    s
}

/// Resolved `name=value` pairs of one policy, checked against the parameters' ranges as they
/// are read.
struct Values {
    policy: String,
    params: Vec<Param>,
    map: BTreeMap<&'static str, String>,
    set: Vec<&'static str>,
}

impl Values {
    fn bad(&self, key: &str, why: impl Into<String>) -> Error {
        Error::InvalidParamValue {
            name: key.to_string(),
            value: self.map[key].clone(),
            why: why.into(),
        }
    }

    fn raw(&self, key: &str) -> &str {
        self.map.get(key).map(String::as_str).unwrap_or("")
    }

    fn range(&self, key: &str) -> Range {
        self.params
            .iter()
            .find(|p| p.key == key)
            .map(|p| p.range)
            .unwrap_or_else(|| unreachable!("a preset reads `{key}`, which it does not declare"))
    }

    fn int_in(&self, key: &str, min: usize, max: usize) -> Result<usize> {
        let v: usize = self
            .raw(key)
            .parse()
            .map_err(|_| self.bad(key, format!("expected an integer in {min}..={max}")))?;
        if v < min || v > max {
            return Err(self.bad(key, format!("expected an integer in {min}..={max}")));
        }
        Ok(v)
    }

    fn usize(&self, key: &str) -> Result<usize> {
        match self.range(key) {
            Range::Int { min, max } | Range::OptInt { min, max } | Range::OddInt { min, max } => {
                self.int_in(key, min, max)
            }
            r => unreachable!("`{key}` is {r:?}, not an integer"),
        }
    }

    /// A pooling kernel: an odd integer in its range.
    fn odd(&self, key: &str) -> Result<usize> {
        let k = self.usize(key)?;
        if k % 2 == 0 {
            return Err(self.bad(key, "expected an odd kernel size"));
        }
        Ok(k)
    }

    fn u64(&self, key: &str) -> Result<u64> {
        self.raw(key)
            .parse::<u64>()
            .map_err(|_| self.bad(key, "expected a non-negative integer"))
    }

    fn f32(&self, key: &str) -> Result<f32> {
        let range = self.range(key);
        let text = range.text();
        let v: f32 = self
            .raw(key)
            .parse()
            .map_err(|_| self.bad(key, format!("expected a number in {text}")))?;
        if !v.is_finite() || !range.contains(v) {
            return Err(self.bad(key, format!("expected a number in {text}")));
        }
        Ok(v)
    }

    fn choice(&self, key: &str) -> Result<&'static str> {
        let Range::Choice(options) = self.range(key) else {
            unreachable!("`{key}` is not a choice")
        };
        let v = self.raw(key);
        options
            .iter()
            .find(|o| **o == v)
            .copied()
            .ok_or_else(|| self.bad(key, format!("expected one of: {}", options.join(", "))))
    }

    fn gqa(&self) -> Result<GqaReduce> {
        Ok(match self.choice("gqa")? {
            "max" => GqaReduce::Max,
            _ => GqaReduce::Mean,
        })
    }

    fn fixed(&self) -> Result<Fixed> {
        if !self.raw("tokens").is_empty() {
            if self.set.contains(&"ratio") {
                return Err(self.bad("tokens", "give either ratio or tokens, not both"));
            }
            return Ok(Fixed::Tokens(self.usize("tokens")?));
        }
        Ok(Fixed::Ratio(self.f32("ratio")?))
    }

    /// The SnapKV-family scorer: `pool`, `pooling`, `gqa` over an observation window `w`.
    fn window_attention(&self, w: usize) -> Result<Box<dyn Scorer>> {
        let kernel = self.odd("pool")?;
        let max_pool = self.choice("pooling")? == "max";
        Ok(Box::new(WindowAttention {
            window: w,
            kernel,
            max_pool,
            gqa: self.gqa()?,
        }))
    }
}

/// What a policy's plans cost, from its parameters alone (no model, no input), so that an engine
/// can bound what a client may ask for before anything runs.
///
/// The unit is one query row of every query head scored against every held key of every layer:
/// the Q·K work of decoding one token over the same cells. Every plan's work grows with the cells
/// held and the model's size the way this unit does, so one bound holds for every model and
/// cache size and reads as "a plan may cost the attention of N decoded tokens" (decoding also
/// pays the weights, so a unit is less than a decoded token).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Cost {
    /// the costliest plan (the prompt end, where the most query rows are read)
    pub per_plan: f32,
    /// decode plans' cost spread over the `interval` tokens between them (0 with `interval=0`)
    pub per_token: f32,
}

/// Bounds on [`Cost`]; 0 = no bound.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostLimit {
    /// largest [`Cost::per_plan`]
    pub per_plan: f32,
    /// largest [`Cost::per_token`]
    pub per_token: f32,
}

impl Default for CostLimit {
    /// The library's bounds (`kvc_params_default()`). Every policy at its defaults costs at most
    /// 137 units per plan and 4.3 per token (gvote); the bounds leave room for larger windows and
    /// samples and refuse the hostile request (gvote samples=1024 interval=1: 12 329
    /// units per plan and per token; 592 s for 32 tokens after a 2.8K prompt on SmolLM2-135M).
    fn default() -> Self {
        CostLimit {
            per_plan: 2048.0,
            per_token: 64.0,
        }
    }
}

/// Ranking and selecting the kept cells, once per plan of a policy that reads K (a sort of the
/// held cells per unit, pooling, the keep sets): ~27 rows in results/bench-plan.json (see
/// `score::gvote::BALLOT_COST`).
const SELECT_COST: f32 = 27.0;
/// A position ranking sorts no scores.
const POSITION_SELECT_COST: f32 = 1.0;
/// `granularity=layer|head`: one keep mask per layer (head) and the engine's re-pack, each about
/// one pass over the held rows.
const PER_UNIT_SETS_COST: f32 = 2.0;

/// A parsed policy: the three stages plus the knobs shared by all policies.
pub struct Policy {
    /// its name (one of [`POLICY_NAMES`])
    pub name: &'static str,
    /// stage 2; `None` for `none`
    pub scorer: Option<Box<dyn Scorer>>,
    /// stage 3, total
    pub rule: Box<dyn BudgetRule>,
    /// stage 3, spread
    pub allocator: Box<dyn Allocator>,
    /// oldest cells always kept
    pub sinks: usize,
    /// newest cells always kept; also the query rows wanted per call
    pub window: usize,
    /// decode cadence (new tokens between runs; 0 = prefill only)
    pub interval: usize,
    /// where the keep sets apply
    pub granularity: Granularity,
    /// when the sequence gives up cells
    pub evict: Evict,
    /// every parameter with its resolved value, for logs
    pub resolved: Vec<(String, String)>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.describe())
    }
}

impl Policy {
    /// Parse a policy name and `name=value` overrides.
    pub fn parse(name: &str, overrides: &[&str]) -> Result<Policy> {
        let Some(preset) = Preset::find(name) else {
            return Err(Error::UnknownPolicy(name.to_string()));
        };
        let specs = preset.params();
        let mut values = Values {
            policy: preset.name.to_string(),
            params: specs.clone(),
            map: BTreeMap::new(),
            set: Vec::new(),
        };
        for s in &specs {
            values.map.insert(s.key, s.default.to_string());
        }
        for kv in overrides {
            let (k, v) = kv.split_once('=').ok_or_else(|| Error::InvalidParamValue {
                name: kv.to_string(),
                value: String::new(),
                why: "expected name=value".into(),
            })?;
            let (k, v) = (k.trim(), v.trim());
            let Some(spec) = specs.iter().find(|s| s.key == k) else {
                return Err(Error::UnknownParam {
                    policy: values.policy.clone(),
                    name: k.to_string(),
                    accepted: if specs.is_empty() {
                        "none".into()
                    } else {
                        specs.iter().map(|s| s.key).collect::<Vec<_>>().join(", ")
                    },
                });
            };
            values.map.insert(spec.key, v.to_string());
            values.set.push(spec.key);
        }
        Self::build(preset, &values)
    }

    fn build(preset: &'static Preset, v: &Values) -> Result<Policy> {
        let name = preset.name;
        // `tokens` replaces `ratio` (parse refuses both): with tokens set the ratio is unused,
        // and printing it made `describe` a spec that does not parse back (found by the fuzzer)
        let tokens_set = !v.raw("tokens").is_empty();
        let resolved = v
            .map
            .iter()
            .filter(|(_, x)| !x.is_empty())
            .filter(|(k, _)| !tokens_set || **k != "ratio")
            .map(|(k, x)| (k.to_string(), x.clone()))
            .collect();
        if preset.budget == BudgetKind::Off {
            return Ok(Policy {
                name,
                scorer: None,
                rule: Box::new(Fixed::Ratio(0.0)),
                allocator: Box::new(Uniform),
                sinks: 0,
                window: 0,
                interval: 0,
                granularity: Granularity::Token,
                evict: Evict::Prompt,
                resolved,
            });
        }
        let sinks = v.usize("sinks")?;
        let interval = v.usize("interval")?;
        let window = v.usize("window")?;
        let granularity = match v.choice("granularity")? {
            "layer" => Granularity::Layer,
            "head" => Granularity::Head,
            _ => Granularity::Token,
        };
        let evict = match v.choice("evict")? {
            "pressure" => Evict::Pressure,
            _ => Evict::Prompt,
        };
        let (scorer, rule, allocator) = (preset.build)(v, window.max(1))?;
        Ok(Policy {
            name,
            scorer: Some(scorer),
            rule,
            allocator,
            sinks,
            window,
            interval,
            granularity,
            evict,
            resolved,
        })
    }

    /// What its plans cost ([`Cost`]).
    pub fn cost(&self) -> Cost {
        let Some(scorer) = self.scorer.as_deref() else {
            return Cost::default();
        };
        // query rows read at the prompt end and at a decode step: the newest `n`, or (H2O) every
        // row since the last run, which at decode is the interval
        let (prompt_rows, decode_rows) = match scorer.queries() {
            QuerySel::None => (0, 0),
            QuerySel::Last(n) => (n, n),
            QuerySel::Unconsumed => (self.window.max(1) + self.interval, self.interval.max(1)),
            // every plan reads the remembered spread rows: bounded by the ring's cap, whatever the
            // prompt's length
            QuerySel::Spread { newest, cap, .. } => (cap + newest, cap + newest),
        };
        let select = if scorer.needs_keys() {
            SELECT_COST
        } else {
            POSITION_SELECT_COST
        };
        let newest = if self.rule.needs_newest_attention() {
            1.0
        } else {
            0.0
        };
        let sets = if self.granularity == Granularity::Token {
            0.0
        } else {
            PER_UNIT_SETS_COST
        };
        let fixed = select + newest + sets;
        let per_token = if self.interval == 0 {
            0.0
        } else {
            (scorer.cost_units(decode_rows) + fixed) / self.interval as f32
        };
        Cost {
            per_plan: scorer.cost_units(prompt_rows) + fixed,
            per_token,
        }
    }

    /// Its [`Cost`], or [`Error::TooCostly`] naming what to change when it exceeds `limit`.
    /// Refused, not degraded: a policy quietly run with other parameters would answer a client
    /// differently from what it asked for, and the client could not tell.
    pub fn check_cost(&self, limit: &CostLimit) -> Result<Cost> {
        let c = self.cost();
        let has = |k: &str| self.resolved.iter().any(|(key, _)| key == k);
        let drivers: Vec<&str> = ["samples", "window"]
            .into_iter()
            .filter(|k| has(k))
            .collect();
        let lower = if drivers.is_empty() {
            String::new()
        } else {
            format!("lower {}", drivers.join(" or "))
        };
        let too = |per: &'static str, cost: f32, limit: f32, hint: String| Error::TooCostly {
            policy: self.describe(),
            per,
            cost,
            limit,
            hint: if hint.is_empty() {
                hint
            } else {
                format!("; {hint}")
            },
        };
        if limit.per_plan > 0.0 && c.per_plan > limit.per_plan {
            return Err(too("plan", c.per_plan, limit.per_plan, lower));
        }
        if limit.per_token > 0.0 && c.per_token > limit.per_token {
            let raise = "raise interval (0 = at the prompt end only)";
            let hint = if lower.is_empty() {
                raise.to_string()
            } else {
                format!("{raise} or {lower}")
            };
            return Err(too("generated token", c.per_token, limit.per_token, hint));
        }
        Ok(c)
    }

    /// `name k=v k=v ...` with every resolved parameter.
    pub fn describe(&self) -> String {
        let mut s = self.name.to_string();
        for (k, v) in &self.resolved {
            s.push_str(&format!(" {k}={v}"));
        }
        s
    }

    /// Help text: each parameter with its default.
    pub fn help(name: &str) -> Option<String> {
        Some(
            Preset::find(name)?
                .params()
                .iter()
                .map(|s| format!("{}={} ({})", s.key, s.default, s.help))
                .collect::<Vec<_>>()
                .join("\n"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `describe` is a spec: name + its `k=v` words parse back to the same description, for
    /// every policy, with defaults and with `tokens` (which used to print an unused `ratio`
    /// beside it, which parse then refused: fuzz/regressions/c_api/describe-ratio-and-tokens-*).
    #[test]
    fn describe_parses_back_to_itself() {
        for name in POLICY_NAMES {
            let overrides: &[&[&str]] = if *name == "none" {
                &[&[]]
            } else {
                &[&[], &["tokens=8"], &["ratio=0.25"]]
            };
            for ov in overrides {
                // adaptive policies take no ratio/tokens
                let Ok(p) = Policy::parse(name, ov) else {
                    continue;
                };
                let d = p.describe();
                let mut words = d.split(' ');
                let n = words.next().unwrap();
                let kv: Vec<&str> = words.collect();
                let again = Policy::parse(n, &kv)
                    .unwrap_or_else(|e| panic!("{name} {ov:?}: {d:?} does not parse: {e}"));
                assert_eq!(again.describe(), d, "{name} {ov:?}");
            }
        }
        let d = Policy::parse("snapkv", &["tokens=8"]).unwrap().describe();
        assert!(d.contains("tokens=8") && !d.contains("ratio="), "{d}");
    }

    #[test]
    fn every_name_parses_with_defaults() {
        for name in POLICY_NAMES {
            let p = Policy::parse(name, &[]).unwrap();
            assert_eq!(p.name, *name);
        }
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(matches!(
            Policy::parse("nope", &[]),
            Err(Error::UnknownPolicy(_))
        ));
        let e = Policy::parse("snapkv", &["ratio=1.5"]).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidParamValue { name, .. } if name == "ratio"),
            "{e}"
        );
        let e = Policy::parse("snapkv", &["window=-3"]).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidParamValue { name, .. } if name == "window"),
            "{e}"
        );
        let e = Policy::parse("dbudget", &["ratio=0.5"]).unwrap_err();
        assert!(
            matches!(&e, Error::UnknownParam { name, .. } if name == "ratio"),
            "{e}"
        );
        assert!(Policy::parse("snapkv", &["pool=4"]).is_err());
        assert!(Policy::parse("snapkv", &["ratio=0.5", "tokens=10"]).is_err());
        assert!(Policy::parse("snapkv", &["noequals"]).is_err());
        assert!(Policy::parse("none", &["ratio=0.5"]).is_err());
    }

    /// The device recipe comes from the stage itself: dbudget's window ranker pools on CUDA as
    /// on the CPU (the hand-kept CUDA copy of the recipes scored it unpooled).
    #[test]
    fn device_recipe_is_the_stage_s() {
        use crate::score::DeviceScore;
        let p = Policy::parse("dbudget", &[]).unwrap();
        assert_eq!(
            p.scorer.as_ref().unwrap().device(),
            DeviceScore::Window {
                kernel: 7,
                max_pool: true,
                gqa: GqaReduce::Mean
            }
        );
        assert!(p.rule.needs_newest_attention());
        let p = Policy::parse("dbudget", &["ranker=position"]).unwrap();
        assert_eq!(p.scorer.as_ref().unwrap().device(), DeviceScore::Position);
        let p = Policy::parse("snapkv", &["pool=5", "pooling=avg", "gqa=max"]).unwrap();
        assert_eq!(
            p.scorer.as_ref().unwrap().device(),
            DeviceScore::Window {
                kernel: 5,
                max_pool: false,
                gqa: GqaReduce::Max
            }
        );
        assert!(!p.rule.needs_newest_attention());
        let p = Policy::parse("gvote", &[]).unwrap();
        assert_eq!(p.scorer.as_ref().unwrap().device(), DeviceScore::Host);
    }

    /// The cost is the policy's, from its parameters: the defaults fit the library's bounds,
    /// the cost drivers (samples, window, interval) move it, neutral knobs do not, and the
    /// issue's hostile request is refused with a message naming what to change.
    #[test]
    fn cost_follows_the_parameters_that_drive_it() {
        let limit = CostLimit::default();
        let cost = |name: &str, kv: &[&str]| Policy::parse(name, kv).unwrap().cost();
        for name in POLICY_NAMES {
            let c = Policy::parse(name, &[])
                .unwrap()
                .check_cost(&limit)
                .unwrap();
            assert!(c.per_plan <= 137.0 && c.per_token <= 4.3, "{name}: {c:?}");
        }
        assert_eq!(cost("none", &[]), Cost::default());
        let g = cost("gvote", &[]);
        assert_eq!(g.per_plan, 9.0 * 12.0 + 2.0 + 27.0);
        assert_eq!(g.per_token, g.per_plan / 32.0);
        assert!(cost("gvote", &["samples=64"]).per_plan > g.per_plan);
        assert_eq!(cost("gvote", &["interval=0"]).per_token, 0.0);
        assert_eq!(cost("gvote", &["interval=1"]).per_token, g.per_plan);
        assert_eq!(cost("gvote", &["quorum=0", "p=0.5", "seed=3"]), g);
        let s = cost("snapkv", &[]);
        assert_eq!(s.per_plan, 32.0 + 27.0);
        assert_eq!(cost("snapkv", &["ratio=0.2", "gqa=max"]), s);
        assert_eq!(cost("snapkv", &["window=64"]).per_plan, 64.0 + 27.0);
        assert_eq!(
            cost("snapkv", &["granularity=layer"]).per_plan,
            s.per_plan + 2.0
        );
        assert_eq!(cost("dbudget", &[]).per_plan, 8.0 + 27.0 + 1.0);
        assert_eq!(cost("dbudget", &["ranker=position"]).per_plan, 27.0 + 1.0);
        // the context ranker reads its remembered spread rows at every plan: bounded by the
        // ring's cap (not the prompt's length), and within the default bounds
        let ctx = Policy::parse("dbudget", &["ranker=context"])
            .unwrap()
            .check_cost(&limit)
            .unwrap();
        assert!(ctx.per_plan > cost("dbudget", &[]).per_plan, "{ctx:?}");
        // the reconstruction ranker reads its rows (at most 512) and the newest window, or the
        // spread rows at later plans: as bounded as ranker=context (the pass itself is at most one
        // more prefill of the request's own prompt)
        let rec = Policy::parse("dbudget", &["ranker=recon", "recon=0.25"])
            .unwrap()
            .check_cost(&limit)
            .unwrap();
        assert_eq!(rec.per_plan, ctx.per_plan, "{rec:?}");
        assert_eq!(cost("streaming", &[]).per_plan, 1.0);
        // H2O reads every row since its last run: the interval's rows at a decode step
        let h = cost("h2o", &["interval=4"]);
        assert_eq!(
            (h.per_plan, h.per_token),
            (32.0 + 4.0 + 27.0, (4.0 + 27.0) / 4.0)
        );

        let hostile = ["samples=1024", "window=4096", "interval=1"];
        let e = Policy::parse("gvote", &hostile)
            .unwrap()
            .check_cost(&limit)
            .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::TooCostly { per: "plan", .. }), "{msg}");
        assert!(
            msg.contains("12329.0 units per plan") && msg.contains("lower samples or window"),
            "{msg}"
        );
        let e = Policy::parse("gvote", &["samples=64", "interval=1"])
            .unwrap()
            .check_cost(&limit)
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::TooCostly {
                    per: "generated token",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("raise interval"), "{e}");
        let none = CostLimit {
            per_plan: 0.0,
            per_token: 0.0,
        };
        assert!(Policy::parse("gvote", &hostile)
            .unwrap()
            .check_cost(&none)
            .is_ok());
    }

    #[test]
    fn overrides_show_in_description() {
        let p = Policy::parse("dbudget", &["threshold=0.05"]).unwrap();
        assert!(p.describe().contains("threshold=0.05"), "{}", p.describe());
    }
}
