//! The evictor: one model shape, one policy, the state of every sequence, and the pipeline run
//! that turns what the engine observed into an eviction plan.

use crate::backend::{self, Backend, Parallelism, UnitsIn};
use crate::budget::DecideCtx;
use crate::error::{shape_err, Error, Result};
use crate::policy::{Granularity, Policy};
use crate::score::{QuerySel, ScoreGrid};
use crate::select;
use crate::state::{Carry, LastPlan, QueryRow, SeqState};
use crate::view::{Keys, Shape};
use std::collections::HashMap;

/// The cells one sequence holds right now.
#[derive(Debug, Clone, Copy)]
pub struct SeqInput<'a> {
    /// engine sequence id
    pub seq_id: i32,
    /// engine cell ids, echoed in the plan
    pub cells: &'a [u32],
    /// positions, strictly ascending
    pub pos: &'a [i32],
    /// at most this many cells after the plan (0 = no cap)
    pub max_cells: usize,
    /// the call that just ran produced logits for the sequence (a prompt end when it also added
    /// more than one token)
    pub prompt_end: bool,
}

impl SeqInput<'_> {
    fn validate(&self) -> Result<()> {
        if self.cells.len() != self.pos.len() {
            return Err(shape_err(format!(
                "{} cells but {} positions",
                self.cells.len(),
                self.pos.len()
            )));
        }
        if let Some(i) = self.pos.windows(2).position(|w| w[0] >= w[1]) {
            return Err(shape_err(format!(
                "positions must be strictly ascending: pos[{i}]={} then pos[{}]={}",
                self.pos[i],
                i + 1,
                self.pos[i + 1]
            )));
        }
        if self.pos.first().is_some_and(|&p| p < 0) {
            return Err(shape_err("positions must be >= 0"));
        }
        Ok(())
    }

    /// Tokens seen: highest position + 1.
    pub fn n_seen(&self) -> usize {
        self.pos.last().map_or(0, |&p| p as usize + 1)
    }
}

/// Counters of one plan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// the policy ran
    pub ran: bool,
    /// cells before
    pub n_cells: usize,
    /// cells after
    pub n_keep: usize,
    /// cells freed
    pub n_evict: usize,
    /// cells the policy's own rule wanted (before the cap)
    pub budget: usize,
    /// tokens seen by the sequence
    pub n_seen: usize,
}

/// The eviction plan for one sequence.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// cells to free, ascending
    pub evict: Vec<u32>,
    /// counters
    pub stats: Stats,
}

/// Shape + policy + per-sequence state.
pub struct Evictor {
    shape: Shape,
    policy: Policy,
    par: Parallelism,
    backend: Backend,
    seqs: HashMap<i32, SeqState>,
}

impl Evictor {
    /// A new evictor. CUDA is refused unless the `cuda` feature can open a device.
    pub fn new(shape: Shape, policy: Policy, par: Parallelism, backend: Backend) -> Result<Self> {
        backend::probe(backend)?;
        Ok(Evictor {
            shape,
            policy,
            par,
            backend,
            seqs: HashMap::new(),
        })
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The model shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// Query rows per layer and decode call the engine should capture.
    pub fn q_window(&self) -> usize {
        match self.policy.scorer.as_ref().map(|s| s.queries()) {
            None | Some(QuerySel::None) => 0,
            Some(QuerySel::Last(n)) => n,
            Some(QuerySel::Unconsumed) => self.policy.window.max(1),
        }
    }

    /// Query rows remembered per sequence. Scorers that read the newest rows need just those;
    /// accumulating scorers (H2O) read every row since their last run, so they also hold one
    /// decode interval. A row is `n_layer * n_head * head_dim` floats (512 KiB for an 8B model).
    fn ring_cap(&self) -> usize {
        match self.policy.scorer.as_ref().map(|s| s.queries()) {
            Some(QuerySel::Unconsumed) => self.q_window().max(1) + self.policy.interval,
            _ => self.q_window().max(1),
        }
    }

    /// Remember the newest query rows of a sequence. `q` is `[n_layer][n_q][n_head*head_dim]`.
    pub fn push_queries(&mut self, seq_id: i32, q_pos: &[i32], q: &[f32]) -> Result<()> {
        let n_q = q_pos.len();
        let row = self.shape.q_row_len();
        let need = self.shape.n_layer * n_q * row;
        if q.len() != need {
            return Err(shape_err(format!(
                "queries: {} floats, expected n_layer*n_q*n_head*head_dim = {}*{}*{} = {need}",
                q.len(),
                self.shape.n_layer,
                n_q,
                row
            )));
        }
        if let Some(i) = q_pos.windows(2).position(|w| w[0] >= w[1]) {
            return Err(shape_err(format!(
                "q_pos must be strictly ascending (index {i})"
            )));
        }
        // like the cells' positions: a negative one is no llama_pos (and would underflow the
        // rewind bound)
        if q_pos.first().is_some_and(|&p| p < 0) {
            return Err(shape_err(format!(
                "q_pos must be >= 0 (q_pos[0]={})",
                q_pos[0]
            )));
        }
        if let Some(bad) = q.iter().position(|v| !v.is_finite()) {
            let layer = bad / (n_q * row).max(1);
            let r = (bad % (n_q * row).max(1)) / row;
            return Err(Error::NonFinite {
                what: "queries",
                layer,
                row: r,
            });
        }
        if self.q_window() == 0 || n_q == 0 {
            return Ok(());
        }
        // a rewind shows in the call's lowest position, which the trimming below may drop
        self.seqs
            .entry(seq_id)
            .or_default()
            .rewind_if_before(q_pos[0]);
        // keep only what the ring can hold, transposed to token-major rows
        let keep_from = n_q.saturating_sub(self.ring_cap());
        let rows = (keep_from..n_q)
            .map(|i| {
                let mut data = Vec::with_capacity(self.shape.n_layer * row);
                for l in 0..self.shape.n_layer {
                    let off = (l * n_q + i) * row;
                    data.extend_from_slice(&q[off..off + row]);
                }
                QueryRow {
                    pos: q_pos[i],
                    data: data.into_boxed_slice(),
                }
            })
            .collect();
        let cap = self.ring_cap();
        self.seqs.entry(seq_id).or_default().push(rows, cap);
        Ok(())
    }

    /// Whether the policy wants to run now: at the end of a prompt (logits after more than one
    /// new token), when the sequence holds more than `max_cells`, or every `interval` tokens
    /// during decode (one token per call).
    pub fn due(&mut self, s: &SeqInput) -> Result<bool> {
        s.validate()?;
        if self.policy.scorer.is_none() || s.pos.is_empty() {
            return Ok(false);
        }
        let interval = self.policy.interval;
        let st = self.seqs.entry(s.seq_id).or_default();
        let max_pos = *s.pos.last().unwrap_or(&-1);
        // a sequence that now ends below what it reached before was rewound and re-filled
        // (the server re-processing a prompt): everything after the rewind point is new, and
        // the library cannot tell where that point was, so the whole view counts as new
        let rewound = max_pos < st.last_max_pos;
        if rewound {
            st.truncate_after(max_pos);
        }
        let n_new = if rewound {
            s.pos.len()
        } else {
            s.pos
                .iter()
                .rev()
                .take_while(|&&p| p > st.last_max_pos)
                .count()
        };
        st.last_max_pos = max_pos;
        st.interval_run = false;
        if s.max_cells > 0 && s.pos.len() > s.max_cells {
            return Ok(true);
        }
        // logits after several new tokens end a prompt (or a prompt chunk the engine wants
        // answered); logits after one token are an ordinary decode step
        if s.prompt_end && n_new > 1 {
            return Ok(true);
        }
        let since = s.n_seen() as i64 - st.seen_at_last_run;
        st.interval_run = interval > 0 && n_new <= 1 && since >= interval as i64;
        Ok(st.interval_run)
    }

    /// Run the policy on one sequence. `keys` may be `None` only for policies that read no K.
    pub fn plan(&mut self, s: &SeqInput, keys: Option<&Keys>) -> Result<Plan> {
        self.plan_bounded(s, keys, usize::MAX)
    }

    /// [`plan`](Self::plan) for a caller that can take at most `evict_cap` evicted cells: a
    /// larger plan fails with [`Error::BufferTooSmall`] *before* anything is remembered, so the
    /// same call can be repeated with a larger buffer.
    pub fn plan_bounded(
        &mut self,
        s: &SeqInput,
        keys: Option<&Keys>,
        evict_cap: usize,
    ) -> Result<Plan> {
        crate::failpoint::plan();
        s.validate()?;
        let n = s.pos.len();
        let Some(scorer) = self.policy.scorer.as_deref() else {
            return Ok(Plan {
                evict: Vec::new(),
                stats: Stats {
                    n_cells: n,
                    n_keep: n,
                    budget: n,
                    n_seen: s.n_seen(),
                    ..Default::default()
                },
            });
        };
        let shape = self.shape;
        let keys = if scorer.needs_keys() {
            let k = keys.ok_or(Error::NullArgument("seq.layers"))?;
            if k.rows.len() != n {
                return Err(shape_err(format!(
                    "{} key rows for {n} cells",
                    k.rows.len()
                )));
            }
            k.validate(&shape)?;
            Some(k)
        } else {
            None
        };
        let st = self.seqs.entry(s.seq_id).or_default();
        let max_pos = *s.pos.last().unwrap_or(&-1);
        st.truncate_after(max_pos);
        if n == 0 {
            return Ok(Plan::default());
        }
        let n_seen = s.n_seen();
        let prot = select::protected(s.pos, self.policy.sinks, self.policy.window);
        let queries: Vec<&QueryRow> = match scorer.queries() {
            QuerySel::None => Vec::new(),
            QuerySel::Last(k) => st
                .ring
                .iter()
                .skip(st.ring.len().saturating_sub(k))
                .collect(),
            QuerySel::Unconsumed => st.ring.iter().filter(|r| r.pos > st.consumed).collect(),
        };
        let carry: Option<Vec<Vec<f32>>> = if scorer.carries() {
            st.carry.as_ref().map(|c| c.realign(s.pos))
        } else {
            None
        };
        let rule = self.policy.rule.as_ref();
        let out = backend::score_units(
            self.backend,
            &UnitsIn {
                scorer,
                rule,
                shape: &shape,
                keys,
                pos: s.pos,
                queries: &queries,
                carry: carry.as_deref(),
                protected: &prot,
                par: &self.par,
            },
        )?;
        let (units, evidence): (Vec<Vec<f32>>, Vec<Vec<f32>>) = out
            .into_iter()
            .map(|(sc, ev)| (sc, ev.unwrap_or_default()))
            .unzip();
        let grid = ScoreGrid {
            n_layer: shape.n_layer,
            n_head_kv: shape.n_head_kv,
            units,
        };
        let decision = rule.decide(&DecideCtx {
            shape: &shape,
            grid: &grid,
            evidence: &evidence,
            pos: s.pos,
            protected: &prot,
            n_seen,
        });
        // leave some room under the cap so the next tokens do not force a run at every step
        let cap_target = s.max_cells.saturating_sub(s.max_cells / 16);
        let over_cap = s.max_cells > 0 && n > s.max_cells;
        let mut target = decision.budget.min(n);
        if over_cap && !s.prompt_end {
            // a capacity-only run in the middle of a prompt: the newest queries are the
            // prompt's own text, not what will be asked, so free only what the cap demands and
            // leave the policy's own verdict to the end of the prompt
            target = cap_target;
        } else if s.max_cells > 0 && target > s.max_cells {
            target = cap_target;
        }
        if st.interval_run && rule.adaptive() {
            // a decode-interval run of an adaptive rule judges an already compressed cache
            // against its own threshold; re-cutting each interval would compound the loss, so
            // it frees at most what arrived since the last run: memory stays bounded at the
            // size the prompt settled on, and the newest tokens compete with the old ones
            let new_since = (n_seen as i64 - st.seen_at_last_run).max(0) as usize;
            target = target.max(n.saturating_sub(new_since));
            // the engine's cap still binds: `due` flagged this interval run on an earlier view,
            // and a plan on a view over `max_cells` must still leave at most that many cells
            // (found by the C-API fuzzer: gvote kept 21 cells with max_cells=1)
            if s.max_cells > 0 && target > s.max_cells {
                target = cap_target;
            }
        }
        let cand: Vec<bool> = prot.iter().map(|p| !p).collect();
        let n_prot = prot.iter().filter(|&&p| p).count();
        let per_unit = target.saturating_sub(n_prot);
        let budgets = self.policy.allocator.allocate(&grid, &cand, per_unit);
        let ranks: Vec<Vec<u32>> = self.par.map(grid.units.len(), |u| {
            select::unit_ranks(&grid.units[u], s.pos, &prot)
        });
        let mut unit_keep: Vec<Vec<bool>> = ranks
            .iter()
            .zip(&budgets)
            .map(|(r, &b)| select::keep_from_ranks(r, &prot, b))
            .collect();
        if self.policy.granularity == Granularity::Layer {
            // one keep set per layer, shared by its KV heads (a per-layer mask): the cells ranked
            // by the mean of the heads' scores, the layer's budget the mean of theirs
            let h = shape.n_head_kv;
            for l in 0..shape.n_layer {
                let units = l * h..(l + 1) * h;
                let mean: Vec<f32> = (0..n)
                    .map(|i| units.clone().map(|u| grid.units[u][i]).sum::<f32>() / h as f32)
                    .collect();
                let b = (budgets[units.clone()].iter().sum::<usize>() + h / 2) / h;
                let k = select::unit_keep(&mean, s.pos, &prot, b);
                for u in units {
                    unit_keep[u].clone_from(&k);
                }
            }
        }
        let keep = match self.policy.granularity {
            Granularity::Token => {
                // an adaptive rule's ranking carries its verdict (which cells its budget
                // covers); when the cap binds below that budget the verdict does not apply, and
                // cells rank by their best rank in any unit like every uniform policy
                let capped = target < decision.budget.min(n);
                let ranking = match decision.ranking {
                    Some(r) if !capped => r,
                    _ if self.policy.allocator.uniform() => {
                        select::best_rank_ranking(&ranks, &grid.token_mean())
                    }
                    _ => select::votes_ranking(&unit_keep, &grid.token_mean()),
                };
                select::project(&ranking, s.pos, &prot, target)
            }
            // finer granularities free only what no unit keeps; when that union is over the
            // engine's cap, the cells most units keep win and the unit sets are trimmed to them
            Granularity::Layer | Granularity::Head => {
                let mut k = select::pinned(s.pos);
                for uk in &unit_keep {
                    k.iter_mut().zip(uk).for_each(|(a, &b)| *a |= b);
                }
                let held = k.iter().filter(|&&x| x).count();
                if s.max_cells > 0 && held > s.max_cells {
                    let ranking = select::votes_ranking(&unit_keep, &grid.token_mean());
                    k = select::project(&ranking, s.pos, &prot, target.min(s.max_cells));
                    for uk in &mut unit_keep {
                        uk.iter_mut().zip(&k).for_each(|(a, &b)| *a &= b);
                    }
                }
                k
            }
        };
        let layer_kept = (0..shape.n_layer)
            .map(|l| match self.policy.granularity {
                Granularity::Token => keep.iter().filter(|&&k| k).count() as u32,
                _ => (0..n)
                    .filter(|&i| {
                        (0..shape.n_head_kv).any(|g| unit_keep[l * shape.n_head_kv + g][i])
                    })
                    .count() as u32,
            })
            .collect();
        let evict: Vec<u32> = {
            let mut e: Vec<u32> = s
                .cells
                .iter()
                .zip(&keep)
                .filter(|(_, &k)| !k)
                .map(|(&c, _)| c)
                .collect();
            e.sort_unstable();
            e
        };
        if evict.len() > evict_cap {
            return Err(Error::BufferTooSmall {
                need: evict.len(),
                got: evict_cap,
            });
        }
        // remember
        let kept_pos: Vec<i32> = s
            .pos
            .iter()
            .zip(&keep)
            .filter(|(_, &k)| k)
            .map(|(&p, _)| p)
            .collect();
        if scorer.carries() {
            st.carry = Some(Carry {
                pos: kept_pos.clone(),
                units: grid
                    .units
                    .iter()
                    .map(|u| {
                        u.iter()
                            .zip(&keep)
                            .filter(|(_, &k)| k)
                            .map(|(&v, _)| v)
                            .collect()
                    })
                    .collect(),
            });
            st.consumed = queries.last().map_or(st.consumed, |r| r.pos);
        }
        st.seen_at_last_run = n_seen as i64;
        st.interval_run = false;
        st.last = Some(LastPlan {
            pos: s.pos.to_vec(),
            unit_keep,
            layer_kept,
        });
        let n_keep = n - evict.len();
        Ok(Plan {
            stats: Stats {
                ran: true,
                n_cells: n,
                n_keep,
                n_evict: evict.len(),
                budget: decision.budget,
                n_seen,
            },
            evict,
        })
    }

    /// Drop everything remembered about a sequence.
    pub fn forget(&mut self, seq_id: i32) {
        self.seqs.remove(&seq_id);
    }

    /// Cells kept per layer by the last plan of a sequence.
    pub fn layer_kept(&self, seq_id: i32) -> Option<&[u32]> {
        self.seqs
            .get(&seq_id)?
            .last
            .as_ref()
            .map(|l| l.layer_kept.as_slice())
    }

    /// Keep flags of one (layer, KV head) from the last plan, over the positions it saw.
    pub fn unit_keep(
        &self,
        seq_id: i32,
        layer: usize,
        kv_head: usize,
    ) -> Option<(&[i32], &[bool])> {
        let last = self.seqs.get(&seq_id)?.last.as_ref()?;
        let u = last.unit_keep.get(layer * self.shape.n_head_kv + kv_head)?;
        Some((&last.pos, u))
    }
}
