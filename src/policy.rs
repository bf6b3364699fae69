//! The named policies: each is a preset of scorer × budget rule × allocator with the papers'
//! defaults, and every parameter can be overridden with a `name=value` string.

use crate::budget::{Ada, Allocator, BudgetRule, DBudget, Dynamic, Fixed, Pyramid, Uniform, Vote};
use crate::error::{Error, Result};
use crate::score::{
    Accumulated, GVote, GqaReduce, KeyNorm, Position, PositionWithQueries, Scorer, WindowAttention,
};
use std::collections::BTreeMap;

/// Every policy name `--kv-policy` accepts.
pub const POLICY_NAMES: &[&str] = &[
    "none",
    "streaming",
    "h2o",
    "snapkv",
    "tova",
    "knorm",
    "pyramidkv",
    "dynamickv",
    "adakv",
    "dbudget",
    "gvote",
];

/// Where the keep sets apply (DESIGN.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    /// the same cells in every layer and head; cells are freed
    Token,
    /// a keep set per layer; cells no layer keeps are freed
    Layer,
    /// a keep set per (layer, KV head); cells no head keeps are freed
    Head,
}

/// One accepted parameter.
struct Spec {
    key: &'static str,
    default: &'static str,
    help: &'static str,
}

const fn p(key: &'static str, default: &'static str, help: &'static str) -> Spec {
    Spec { key, default, help }
}

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

/// Parameters of a policy (defaults from the papers; see ALGORITHMS.md).
fn specs(name: &str) -> Vec<Spec> {
    let common = [
        p("sinks", "4", "oldest cells always kept (attention sinks)"),
        p(
            "interval",
            "32",
            "during decode, run again after this many new tokens (0 = prefill only)",
        ),
        p(
            "granularity",
            DEFAULT_GRANULARITY,
            "token | layer | head: where the keep sets apply (layer/head: per-layer/per-head sets, re-packed)",
        ),
    ];
    let fixed = [
        p(
            "ratio",
            "0.5",
            "fraction of the tokens seen to evict (0 <= ratio < 1)",
        ),
        p("tokens", "", "cells to keep (overrides ratio)"),
    ];
    let gqa = p(
        "gqa",
        "mean",
        "reduce query heads of a GQA group: mean | max",
    );
    let mut v: Vec<Spec> = common.into_iter().collect();
    match name {
        "none" => return Vec::new(),
        "streaming" => {
            v.extend(fixed);
            v.push(p("window", "0", "newest cells always kept"));
        }
        "h2o" => {
            v.extend(fixed);
            v.extend([
                p(
                    "window",
                    "32",
                    "newest cells always kept; also query rows captured per call",
                ),
                gqa,
            ]);
        }
        "snapkv" | "pyramidkv" | "dynamickv" | "adakv" => {
            let (window, pooling) = match name {
                "pyramidkv" => ("8", "max"),
                "dynamickv" => ("8", "avg"),
                _ => ("32", "max"),
            };
            v.extend(fixed);
            v.extend([
                p(
                    "window",
                    window,
                    "observation window: newest queries scored against the cache, and kept",
                ),
                p(
                    "pool",
                    "7",
                    "pooling kernel along the sequence (odd; 1 = none)",
                ),
                p("pooling", pooling, "max | avg"),
                gqa,
            ]);
            match name {
                "pyramidkv" => v.push(p(
                    "beta",
                    "20",
                    "pyramid steepness: last layer gets budget/beta",
                )),
                "dynamickv" => v.push(p(
                    "max_ratio",
                    "10",
                    "cap of a layer's budget, in multiples of the average",
                )),
                "adakv" => {
                    v.push(p(
                        "alpha",
                        "0.2",
                        "uniform floor of each head's share (0..1)",
                    ));
                    v.push(p(
                        "layers",
                        "uniform",
                        "layer budgets under the head split: uniform | pyramid",
                    ));
                }
                _ => {}
            }
        }
        "tova" => {
            v.extend(fixed);
            v.extend([p("window", "1", "newest cells always kept"), gqa]);
        }
        "knorm" => {
            v.extend(fixed);
            v.push(p("window", "8", "newest cells always kept"));
        }
        "dbudget" => v.extend([
            p(
                "threshold",
                "0.01",
                "largest relative drop of the newest query's attention norm, per layer",
            ),
            p(
                "window",
                "8",
                "observation window for the ranking, and newest cells kept",
            ),
            p(
                "ranker",
                "window",
                "window (attention of the newest queries) | position (oldest first)",
            ),
            p("pool", "7", "max-pooling kernel of the window ranking along the sequence (odd; 1 = none): a needle's neighbours share its rank, so numbers and names survive whole"),
            gqa,
        ]),
        "gvote" => v.extend([
            p("p", "0.95", "nucleus mass each sampled query keeps"),
            p("samples", "8", "sampled future queries per head"),
            p(
                "quorum",
                "0.35",
                "fraction of (layer, KV head) units that must vote for a cell; 0 = union (keeps most)",
            ),
            p("seed", "0", "sampler seed"),
            p("pool", "7", "max-pooling kernel of the vote shares along the sequence (odd; 1 = none)"),
            p(
                "window",
                "32",
                "query rows the Gaussian is fitted to, and newest cells kept",
            ),
        ]),
        _ => return Vec::new(),
    }
    v
}

/// Resolved `name=value` pairs of one policy.
struct Values {
    policy: String,
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

    fn usize(&self, key: &str, min: usize, max: usize) -> Result<usize> {
        let v: usize = self
            .raw(key)
            .parse()
            .map_err(|_| self.bad(key, format!("expected an integer in {min}..={max}")))?;
        if v < min || v > max {
            return Err(self.bad(key, format!("expected an integer in {min}..={max}")));
        }
        Ok(v)
    }

    fn f32(&self, key: &str, ok: impl Fn(f32) -> bool, range: &str) -> Result<f32> {
        let v: f32 = self
            .raw(key)
            .parse()
            .map_err(|_| self.bad(key, format!("expected a number in {range}")))?;
        if !v.is_finite() || !ok(v) {
            return Err(self.bad(key, format!("expected a number in {range}")));
        }
        Ok(v)
    }

    fn choice<'a>(&self, key: &str, options: &[&'a str]) -> Result<&'a str> {
        let v = self.raw(key);
        options
            .iter()
            .find(|o| **o == v)
            .copied()
            .ok_or_else(|| self.bad(key, format!("expected one of: {}", options.join(", "))))
    }

    fn gqa(&self) -> Result<GqaReduce> {
        Ok(match self.choice("gqa", &["mean", "max"])? {
            "max" => GqaReduce::Max,
            _ => GqaReduce::Mean,
        })
    }

    fn fixed(&self) -> Result<Fixed> {
        if !self.raw("tokens").is_empty() {
            if self.set.contains(&"ratio") {
                return Err(self.bad("tokens", "give either ratio or tokens, not both"));
            }
            return Ok(Fixed::Tokens(self.usize("tokens", 1, u32::MAX as usize)?));
        }
        Ok(Fixed::Ratio(self.f32(
            "ratio",
            |r| (0.0..1.0).contains(&r),
            "[0, 1)",
        )?))
    }
}

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
        let Some(&name) = POLICY_NAMES.iter().find(|n| **n == name) else {
            return Err(Error::UnknownPolicy(name.to_string()));
        };
        let specs = specs(name);
        let mut values = Values {
            policy: name.to_string(),
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
        Self::build(name, &values)
    }

    fn build(name: &'static str, v: &Values) -> Result<Policy> {
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
        if name == "none" {
            return Ok(Policy {
                name,
                scorer: None,
                rule: Box::new(Fixed::Ratio(0.0)),
                allocator: Box::new(Uniform),
                sinks: 0,
                window: 0,
                interval: 0,
                granularity: Granularity::Token,
                resolved,
            });
        }
        let sinks = v.usize("sinks", 0, 1 << 20)?;
        let interval = v.usize("interval", 0, 1 << 24)?;
        let window = v.usize("window", 0, 4096)?;
        let granularity = match v.choice("granularity", &["token", "layer", "head"])? {
            "layer" => Granularity::Layer,
            "head" => Granularity::Head,
            _ => Granularity::Token,
        };
        let pool = |v: &Values| -> Result<(usize, bool)> {
            Ok((
                odd_kernel(v)?,
                v.choice("pooling", &["max", "avg"])? == "max",
            ))
        };
        let obs_window = window.max(1);
        let (scorer, rule, allocator): (Box<dyn Scorer>, Box<dyn BudgetRule>, Box<dyn Allocator>) =
            match name {
                "streaming" => (Box::new(Position), Box::new(v.fixed()?), Box::new(Uniform)),
                "h2o" => (
                    Box::new(Accumulated { gqa: v.gqa()? }),
                    Box::new(v.fixed()?),
                    Box::new(Uniform),
                ),
                "tova" => (
                    Box::new(WindowAttention {
                        window: 1,
                        kernel: 1,
                        max_pool: true,
                        gqa: v.gqa()?,
                    }),
                    Box::new(v.fixed()?),
                    Box::new(Uniform),
                ),
                "knorm" => (Box::new(KeyNorm), Box::new(v.fixed()?), Box::new(Uniform)),
                "snapkv" | "pyramidkv" | "dynamickv" | "adakv" => {
                    let (kernel, max_pool) = pool(v)?;
                    let scorer = WindowAttention {
                        window: obs_window,
                        kernel,
                        max_pool,
                        gqa: v.gqa()?,
                    };
                    let allocator: Box<dyn Allocator> = match name {
                        "pyramidkv" => Box::new(Pyramid {
                            beta: v.f32("beta", |b| b >= 1.0, "[1, inf)")?,
                        }),
                        "dynamickv" => Box::new(Dynamic {
                            max_ratio: v.f32("max_ratio", |r| r >= 1.0, "[1, inf)")?,
                        }),
                        "adakv" => Box::new(Ada {
                            alpha: v.f32("alpha", |a| (0.0..=1.0).contains(&a), "[0, 1]")?,
                            layers: match v.choice("layers", &["uniform", "pyramid"])? {
                                "pyramid" => Box::new(Pyramid { beta: 20.0 }),
                                _ => Box::new(Uniform),
                            },
                        }),
                        _ => Box::new(Uniform),
                    };
                    (Box::new(scorer), Box::new(v.fixed()?), allocator)
                }
                "dbudget" => {
                    let scorer: Box<dyn Scorer> =
                        match v.choice("ranker", &["window", "position"])? {
                            "position" => Box::new(PositionWithQueries { window: obs_window }),
                            _ => Box::new(WindowAttention {
                                window: obs_window,
                                kernel: odd_kernel(v)?,
                                max_pool: true,
                                gqa: v.gqa()?,
                            }),
                        };
                    let threshold = v.f32("threshold", |t| t > 0.0 && t < 1.0, "(0, 1)")?;
                    (scorer, Box::new(DBudget { threshold }), Box::new(Uniform))
                }
                "gvote" => {
                    let scorer = GVote {
                        window: obs_window.max(2),
                        p: v.f32("p", |p| p > 0.0 && p <= 1.0, "(0, 1]")?,
                        samples: v.usize("samples", 0, 1024)?,
                        seed: v
                            .raw("seed")
                            .parse::<u64>()
                            .map_err(|_| v.bad("seed", "expected a non-negative integer"))?,
                        kernel: odd_kernel(v)?,
                    };
                    let quorum = v.f32("quorum", |q| (0.0..=1.0).contains(&q), "[0, 1]")?;
                    (
                        Box::new(scorer),
                        Box::new(Vote { quorum }),
                        Box::new(Uniform),
                    )
                }
                _ => unreachable!("every name in POLICY_NAMES is handled"),
            };
        Ok(Policy {
            name,
            scorer: Some(scorer),
            rule,
            allocator,
            sinks,
            window,
            interval,
            granularity,
            resolved,
        })
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
        if !POLICY_NAMES.contains(&name) {
            return None;
        }
        Some(
            specs(name)
                .iter()
                .map(|s| format!("{}={} ({})", s.key, s.default, s.help))
                .collect::<Vec<_>>()
                .join("\n"),
        )
    }
}

/// The `pool` parameter: an odd kernel size in 1..=63.
fn odd_kernel(v: &Values) -> Result<usize> {
    let k = v.usize("pool", 1, 63)?;
    if k % 2 == 0 {
        return Err(v.bad("pool", "expected an odd kernel size"));
    }
    Ok(k)
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

    #[test]
    fn overrides_show_in_description() {
        let p = Policy::parse("dbudget", &["threshold=0.05"]).unwrap();
        assert!(p.describe().contains("threshold=0.05"), "{}", p.describe());
    }
}
