//! The evictor: one model shape, one policy, the state of every sequence, and the pipeline run
//! that turns what the engine observed into an eviction plan.

use crate::backend::{self, Backend, Parallelism, UnitsIn};
use crate::budget::DecideCtx;
use crate::error::{shape_err, Error, Result};
use crate::policy::{Evict, Policy};
use crate::score::{QuerySel, Recon, ScoreGrid, Scorer};
use crate::select::{self, SelectIn, Selection};
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
    /// the engine needs room in the cache this sequence lives in (`KVC_SEQ_FLAG_ROOM`): give up
    /// what the policy would give up anyway (a verdict `evict=pressure` deferred, or the tokens
    /// decoded since the last run), without being squeezed below it
    pub room: bool,
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
    /// cells the rule would have kept but the engine's cap took (`max_cells`)
    pub n_squeezed: usize,
}

/// The eviction plan for one sequence.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// cells to free, ascending
    pub evict: Vec<u32>,
    /// counters
    pub stats: Stats,
}

/// Query rows per layer and ubatch a spread-sampling scorer asks the engine for: every row of a
/// ubatch up to this many (the library keeps only its sample of them).
pub(crate) const SPREAD_CAPTURE: usize = 4096;

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
            // every row of a ubatch: the sample is taken here, by position, so that it spreads
            // over the whole prompt whatever the engine's -b/-ub
            Some(QuerySel::Spread { .. }) => SPREAD_CAPTURE,
        }
    }

    /// The reconstruction pass the engine should run at a prompt's end (`ranker=recon`), or
    /// `None`. Not with `evict=pressure`: its prompt end plans nothing, so the pass would be
    /// paid for nothing.
    pub fn recon(&self) -> Option<Recon> {
        if self.policy.evict == Evict::Pressure {
            return None;
        }
        self.policy.scorer.as_ref().and_then(|s| s.recon())
    }

    /// Hand over the query rows of a reconstruction pass of a sequence: `q` is
    /// `[n_layer][n_q][n_head*head_dim]`, rows of positions after the sequence's end that
    /// attended to every cell it holds. The next plan of the sequence reads them (and the newest
    /// `window` rows) instead of the spread rows, then drops them. Beyond the scorer's cap every
    /// other row is dropped, so the sample stays even. Ignored when the policy asks for no pass.
    pub fn push_recon(&mut self, seq_id: i32, n_q: usize, q: &[f32]) -> Result<()> {
        self.check_query_block("reconstruction queries", n_q, q)?;
        let Some(recon) = self.recon() else {
            return Ok(());
        };
        let rows: Vec<QueryRow> = (0..n_q)
            .map(|i| QueryRow {
                // after the sequence's end: every cell is visible to it
                pos: i32::MAX,
                data: self.token_row(q, n_q, i),
            })
            .collect();
        let st = self.seqs.entry(seq_id).or_default();
        st.recon.extend(rows);
        while st.recon.len() > recon.cap.max(1) {
            let mut k = 0;
            st.recon.retain(|_| {
                k += 1;
                k % 2 == 1
            });
        }
        Ok(())
    }

    /// A block of query rows as the engine hands it over, `[n_layer][n_q][n_head*head_dim]`:
    /// the right size, and finite (a NaN would poison every score it touches).
    fn check_query_block(&self, what: &'static str, n_q: usize, q: &[f32]) -> Result<()> {
        let row = self.shape.q_row_len();
        let need = self.shape.n_layer * n_q * row;
        if q.len() != need {
            return Err(shape_err(format!(
                "{what}: {} floats, expected n_layer*n_q*n_head*head_dim = {}*{}*{} = {need}",
                q.len(),
                self.shape.n_layer,
                n_q,
                row
            )));
        }
        if let Some(bad) = q.iter().position(|v| !v.is_finite()) {
            let layer = bad / (n_q * row).max(1);
            let r = (bad % (n_q * row).max(1)) / row;
            return Err(Error::NonFinite {
                what,
                layer,
                row: r,
            });
        }
        Ok(())
    }

    /// Row `i` of a checked block, gathered token-major (every layer's row of that token), as the
    /// scorers read it.
    fn token_row(&self, q: &[f32], n_q: usize, i: usize) -> Box<[f32]> {
        let row = self.shape.q_row_len();
        let mut data = Vec::with_capacity(self.shape.n_layer * row);
        for l in 0..self.shape.n_layer {
            let off = (l * n_q + i) * row;
            data.extend_from_slice(&q[off..off + row]);
        }
        data.into_boxed_slice()
    }

    /// Query rows remembered per sequence. Scorers that read the newest rows need just those;
    /// accumulating scorers (H2O) read every row since their last run, so they also hold one
    /// decode interval. A row is `n_layer * n_head * head_dim` floats (512 KiB for an 8B model).
    fn ring_cap(&self) -> usize {
        match self.policy.scorer.as_ref().map(|s| s.queries()) {
            Some(QuerySel::Unconsumed) => self.q_window().max(1) + self.policy.interval,
            Some(QuerySel::Spread { newest, cap, .. }) => newest + cap,
            _ => self.q_window().max(1),
        }
    }

    /// Remember the newest query rows of a sequence. `q` is `[n_layer][n_q][n_head*head_dim]`.
    pub fn push_queries(&mut self, seq_id: i32, q_pos: &[i32], q: &[f32]) -> Result<()> {
        let n_q = q_pos.len();
        self.check_query_block("queries", n_q, q)?;
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
        if self.q_window() == 0 || n_q == 0 {
            return Ok(());
        }
        // a rewind shows in the call's lowest position, which the trimming below may drop
        self.seqs
            .entry(seq_id)
            .or_default()
            .rewind_if_before(q_pos[0]);
        let spread = match self.policy.scorer.as_ref().map(|s| s.queries()) {
            Some(QuerySel::Spread {
                stride,
                newest,
                cap,
            }) => Some((stride.max(1), newest, cap)),
            _ => None,
        };
        // keep only what the ring can hold, transposed to token-major rows
        let keep_from = n_q.saturating_sub(self.ring_cap());
        let wanted = |i: usize| match spread {
            Some((stride, newest, _)) => q_pos[i] as usize % stride == 0 || i + newest >= n_q,
            None => i >= keep_from,
        };
        let rows = (0..n_q)
            .filter(|&i| wanted(i))
            .map(|i| QueryRow {
                pos: q_pos[i],
                data: self.token_row(q, n_q, i),
            })
            .collect();
        let ring_cap = self.ring_cap();
        let st = self.seqs.entry(seq_id).or_default();
        match spread {
            Some((stride, newest, cap)) => st.push_spread(rows, stride, newest, cap),
            None => st.push(rows, ring_cap),
        }
        Ok(())
    }

    /// Whether the policy wants to run now: at the end of a prompt (logits after more than one
    /// new token), when the sequence holds more than `max_cells`, or every `interval` tokens
    /// during decode (one token per call); with `evict=pressure` only over `max_cells` or when
    /// the engine needs room (`room`) and tokens arrived since the last run.
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
        if n_new > 0 {
            st.mid_prompt = n_new > 1 && !s.prompt_end;
        }
        if s.max_cells > 0 && s.pos.len() > s.max_cells {
            return Ok(true);
        }
        let since = s.n_seen() as i64 - st.seen_at_last_run;
        // the engine needs room: the tokens that arrived since the last run are what the policy
        // would give up anyway. Judged like an interval run once the policy has run (an adaptive
        // rule re-cutting its own compressed cache would compound the loss, plan_target); the
        // first run of an `evict=pressure` sequence is the verdict its prompt's end deferred.
        // A prompt still being fed (chunk by chunk, by the server) has no question yet: only the
        // cap squeezes it
        if s.room && since > 0 && !st.mid_prompt {
            st.interval_run = st.last.is_some();
            return Ok(true);
        }
        if self.policy.evict == Evict::Pressure {
            // nothing is evicted until the engine needs room (the cap above, or `room`)
            return Ok(false);
        }
        // logits after several new tokens end a prompt (or a prompt chunk the engine wants
        // answered); logits after one token are an ordinary decode step
        if s.prompt_end && n_new > 1 {
            return Ok(true);
        }
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
    ///
    /// The steps: validate the view and K, pick the query rows the scorer reads, score every
    /// unit on the backend, let the rule decide the budget, bound it by the engine's cap
    /// ([`plan_target`]), allocate and select the keep sets ([`select::select`]), then remember
    /// what the next plan needs.
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
            return Ok(unchanged_plan(s));
        };
        let shape = self.shape;
        let keys = checked_keys(&shape, scorer, s, keys)?;
        let st = self.seqs.entry(s.seq_id).or_default();
        let max_pos = *s.pos.last().unwrap_or(&-1);
        st.truncate_after(max_pos);
        if n == 0 {
            return Ok(Plan::default());
        }
        let n_seen = s.n_seen();
        let policy = &self.policy;
        let prot = select::protected(s.pos, policy.sinks, policy.window);
        // a reconstruction pass ran: its rows (which see the whole context) and the newest window.
        // (A partial pass that also read the spread rows, so that the chunks it leaves out are
        // scored by the context's own queries, did worse: SmolLM2 needle-single 0/3 identical at
        // recon=0.25 against 1/3 without, results/README.)
        let queries: Vec<&QueryRow> = if scorer.recon().is_some() && !st.recon.is_empty() {
            st.recon
                .iter()
                .chain(
                    st.ring
                        .iter()
                        .skip(st.ring.len().saturating_sub(policy.window)),
                )
                .collect()
        } else {
            select_queries(st, scorer.queries())
        };
        let carry: Option<Vec<Vec<f32>>> = if scorer.carries() {
            st.carry.as_ref().map(|c| c.realign(s.pos))
        } else {
            None
        };
        let rule = policy.rule.as_ref();
        let (grid, evidence) = score(
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
        let decision = rule.decide(&DecideCtx {
            shape: &shape,
            grid: &grid,
            evidence: &evidence,
            pos: s.pos,
            protected: &prot,
            n_seen,
        });
        // a run that only makes room mid-prompt applies no verdict of the rule
        let capacity_only = s.max_cells > 0 && n > s.max_cells && !s.prompt_end;
        let since_verdict = if !rule.adaptive() || capacity_only {
            None
        } else if st.interval_run {
            Some(n_seen as i64 - st.seen_at_last_run)
        } else if st.seen_at_last_verdict > 0 && n_seen as i64 > st.seen_at_last_verdict {
            // a second prompt end (the question after its context, a chat's next turn): the cells
            // held were already judged once. (The same view planned again, with nothing new, is
            // the same verdict: a caller may repeat a plan and must get the same one.)
            Some(n_seen as i64 - st.seen_at_last_verdict)
        } else {
            None
        };
        let target = plan_target(&TargetIn {
            n,
            budget: decision.budget,
            max_cells: s.max_cells,
            prompt_end: s.prompt_end,
            adaptive_interval: since_verdict,
        });
        let cand: Vec<bool> = prot.iter().map(|p| !p).collect();
        let n_prot = prot.iter().filter(|&&p| p).count();
        let budgets = policy
            .allocator
            .allocate(&grid, &cand, target.saturating_sub(n_prot));
        let ranks: Vec<Vec<u32>> = self.par.map(grid.units.len(), |u| {
            select::unit_ranks(&grid.units[u], s.pos, &prot)
        });
        // the rule's ranking carries its verdict only when the cap left its budget alone
        let capped = target < decision.budget.min(n);
        let sel = select::select(SelectIn {
            grid: &grid,
            ranks: &ranks,
            budgets: &budgets,
            pos: s.pos,
            protected: &prot,
            target,
            max_cells: s.max_cells,
            granularity: policy.granularity,
            verdict: decision.ranking.filter(|_| !capped),
            uniform: policy.allocator.uniform(),
        });
        let evict = evicted_cells(s.cells, &sel.keep);
        if evict.len() > evict_cap {
            return Err(Error::BufferTooSmall {
                need: evict.len(),
                got: evict_cap,
            });
        }
        let newest_query = queries.last().map(|r| r.pos);
        remember(
            st,
            scorer.carries(),
            s.pos,
            &grid,
            newest_query,
            sel,
            n_seen,
        );
        // a reconstruction judges the context it was run on, once
        st.recon.clear();
        if !capacity_only {
            st.seen_at_last_verdict = n_seen as i64;
        }
        let n_keep = n - evict.len();
        Ok(Plan {
            stats: Stats {
                ran: true,
                n_cells: n,
                n_keep,
                n_evict: evict.len(),
                budget: decision.budget,
                n_seen,
                // the cap lowered the target below the rule's budget: the cells between what
                // the rule wanted (at most what is held) and what is kept
                n_squeezed: if capped {
                    decision.budget.min(n).saturating_sub(n_keep)
                } else {
                    0
                },
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

/// The plan of a policy that evicts nothing (`none`).
fn unchanged_plan(s: &SeqInput) -> Plan {
    let n = s.pos.len();
    Plan {
        evict: Vec::new(),
        stats: Stats {
            n_cells: n,
            n_keep: n,
            budget: n,
            n_seen: s.n_seen(),
            ..Default::default()
        },
    }
}

/// K for the scorer: required and checked against the view when it reads K, else unused.
fn checked_keys<'k>(
    shape: &Shape,
    scorer: &dyn Scorer,
    s: &SeqInput,
    keys: Option<&'k Keys<'k>>,
) -> Result<Option<&'k Keys<'k>>> {
    if !scorer.needs_keys() {
        return Ok(None);
    }
    let k = keys.ok_or(Error::NullArgument("seq.layers"))?;
    let n = s.pos.len();
    if k.rows.len() != n {
        return Err(shape_err(format!(
            "{} key rows for {n} cells",
            k.rows.len()
        )));
    }
    k.validate(shape)?;
    Ok(Some(k))
}

/// The remembered query rows the scorer reads, oldest first.
fn select_queries(st: &SeqState, sel: QuerySel) -> Vec<&QueryRow> {
    match sel {
        QuerySel::None => Vec::new(),
        QuerySel::Last(k) => st
            .ring
            .iter()
            .skip(st.ring.len().saturating_sub(k))
            .collect(),
        QuerySel::Unconsumed => st.ring.iter().filter(|r| r.pos > st.consumed).collect(),
        QuerySel::Spread { .. } => st.ring.iter().collect(),
    }
}

/// Every unit scored on `backend`: the score grid and the rule's evidence per unit (empty when
/// the rule reads none).
fn score(backend: Backend, inp: &UnitsIn) -> Result<(ScoreGrid, Vec<Vec<f32>>)> {
    let (units, evidence): (Vec<Vec<f32>>, Vec<Vec<f32>>) = backend::score_units(backend, inp)?
        .into_iter()
        .map(|(sc, ev)| (sc, ev.unwrap_or_default()))
        .unzip();
    let grid = ScoreGrid {
        n_layer: inp.shape.n_layer,
        n_head_kv: inp.shape.n_head_kv,
        units,
    };
    Ok((grid, evidence))
}

/// What [`plan_target`] bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetIn {
    /// cells held
    pub n: usize,
    /// cells the rule wants to keep
    pub budget: usize,
    /// the engine's cap (0 = none)
    pub max_cells: usize,
    /// the call ended a prompt (the policy's own verdict applies)
    pub prompt_end: bool,
    /// an adaptive rule judging cells it already judged (a decode-interval run, or a prompt end
    /// after an earlier one): the tokens seen since its last verdict (negative after a rewind
    /// below it, which counts as none)
    pub adaptive_interval: Option<i64>,
}

/// Cells a plan keeps: the rule's budget bounded by the cells held and by the engine's cap.
///
/// - over the cap in the middle of a prompt (a capacity-only run), the newest queries are the
///   prompt's own text, not what will be asked: free only what the cap demands and leave the
///   policy's verdict to the end of the prompt;
/// - a budget over the cap keeps the cap less 1/16 of it, so that the next tokens do not force a
///   run at every step;
/// - a decode-interval run of an adaptive rule judges an already compressed cache against its
///   own threshold, and re-cutting each interval would compound the loss: it frees at most what
///   arrived since the last run; the cap still binds (the C-API fuzzer found gvote keeping 21
///   cells with max_cells=1 when `due` flagged the interval run on an earlier view);
/// - so does a second prompt end (a question arriving after its context was compressed, a
///   chat's next turn): the rule's threshold is a loss budget for the whole sequence, and the
///   first cut already spent it, so the second run may choose which cells to keep (the question
///   now steers the ranking) but frees at most as many cells as arrived since, never going below
///   what the first cut left (measured, issue 16: dbudget cut a 2K needle prompt to 1759 cells,
///   then to 1470 when the question came).
pub fn plan_target(t: &TargetIn) -> usize {
    let cap_target = t.max_cells.saturating_sub(t.max_cells / 16);
    let over_cap = t.max_cells > 0 && t.n > t.max_cells;
    let mut target = t.budget.min(t.n);
    if (over_cap && !t.prompt_end) || (t.max_cells > 0 && target > t.max_cells) {
        target = cap_target;
    }
    if let Some(since) = t.adaptive_interval {
        let new_since = since.max(0) as usize;
        target = target.max(t.n.saturating_sub(new_since));
        if t.max_cells > 0 && target > t.max_cells {
            target = cap_target;
        }
    }
    target
}

/// Engine cells not kept, ascending.
fn evicted_cells(cells: &[u32], keep: &[bool]) -> Vec<u32> {
    let mut e: Vec<u32> = cells
        .iter()
        .zip(keep)
        .filter(|(_, &k)| !k)
        .map(|(&c, _)| c)
        .collect();
    e.sort_unstable();
    e
}

/// Remember what the next plan and the introspection calls need: the carried scores of the kept
/// cells (accumulating scorers) and the rows they consumed, when it ran, and its keep sets.
fn remember(
    st: &mut SeqState,
    carries: bool,
    pos: &[i32],
    grid: &ScoreGrid,
    newest_query: Option<i32>,
    sel: Selection,
    n_seen: usize,
) {
    let keep = &sel.keep;
    if carries {
        st.carry = Some(Carry {
            pos: pos
                .iter()
                .zip(keep)
                .filter(|(_, &k)| k)
                .map(|(&p, _)| p)
                .collect(),
            units: grid
                .units
                .iter()
                .map(|u| {
                    u.iter()
                        .zip(keep)
                        .filter(|(_, &k)| k)
                        .map(|(&v, _)| v)
                        .collect()
                })
                .collect(),
        });
        st.consumed = newest_query.unwrap_or(st.consumed);
    }
    st.seen_at_last_run = n_seen as i64;
    st.interval_run = false;
    st.last = Some(LastPlan {
        pos: pos.to_vec(),
        unit_keep: sel.unit_keep,
        layer_kept: sel.layer_kept,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(n: usize, budget: usize, max_cells: usize, prompt_end: bool) -> TargetIn {
        TargetIn {
            n,
            budget,
            max_cells,
            prompt_end,
            adaptive_interval: None,
        }
    }

    fn interval(mut x: TargetIn, since: i64) -> TargetIn {
        x.adaptive_interval = Some(since);
        x
    }

    /// `n_squeezed`: what the engine's cap took from the rule's budget, 0 without a cap or
    /// under a cap the budget fits (streaming reads no K, so no keys are needed)
    #[test]
    fn squeezed_counts_the_cells_the_cap_took_from_the_budget() {
        let shape = Shape::new(2, 2, 1, 4, 0.0).unwrap();
        let cells: Vec<u32> = (0..100).collect();
        let pos: Vec<i32> = (0..100).collect();
        let run = |max_cells: usize| {
            let policy = Policy::parse("streaming", &["ratio=0.5"]).unwrap();
            let mut ev = Evictor::new(shape, policy, Parallelism::new(1), Backend::Cpu).unwrap();
            let s = SeqInput {
                seq_id: 0,
                cells: &cells,
                pos: &pos,
                max_cells,
                prompt_end: true,
                room: false,
            };
            ev.plan(&s, None).unwrap().stats
        };
        let free = run(0);
        assert_eq!((free.budget, free.n_keep, free.n_squeezed), (50, 50, 0));
        let roomy = run(80);
        assert_eq!((roomy.n_keep, roomy.n_squeezed), (50, 0));
        let tight = run(20);
        assert_eq!(tight.budget, 50);
        assert_eq!(tight.n_keep, 19);
        assert_eq!(tight.n_squeezed, 50 - 19);
    }

    #[test]
    fn no_cap_keeps_the_budget_within_the_cells_held() {
        assert_eq!(plan_target(&t(100, 40, 0, true)), 40);
        assert_eq!(plan_target(&t(100, 40, 0, false)), 40);
        assert_eq!(plan_target(&t(30, 40, 0, true)), 30);
        assert_eq!(plan_target(&t(0, 0, 0, true)), 0);
    }

    #[test]
    fn a_budget_over_the_cap_keeps_the_cap_less_a_sixteenth() {
        assert_eq!(plan_target(&t(100, 80, 50, true)), 47);
        // at the cap exactly: unchanged
        assert_eq!(plan_target(&t(100, 50, 50, true)), 50);
        assert_eq!(plan_target(&t(100, 17, 16, true)), 15);
        // caps below 16 leave no headroom
        assert_eq!(plan_target(&t(100, 20, 15, true)), 15);
        assert_eq!(plan_target(&t(100, 20, 1, true)), 1);
    }

    #[test]
    fn a_capacity_run_mid_prompt_frees_only_what_the_cap_demands() {
        // over the cap, not a prompt end: the cap target even when the rule wants fewer cells
        assert_eq!(plan_target(&t(60, 10, 50, false)), 47);
        // the same view at a prompt end: the rule's verdict
        assert_eq!(plan_target(&t(60, 10, 50, true)), 10);
        // under the cap mid-prompt (an interval run): the rule's budget
        assert_eq!(plan_target(&t(40, 10, 50, false)), 10);
    }

    #[test]
    fn an_adaptive_interval_run_frees_at_most_the_new_tokens() {
        assert_eq!(plan_target(&interval(t(100, 20, 0, false), 5)), 95);
        // the rule keeps more than that: its budget
        assert_eq!(plan_target(&interval(t(100, 98, 0, false), 5)), 98);
        // more new tokens than cells: the rule's budget
        assert_eq!(plan_target(&interval(t(10, 4, 0, false), 50)), 4);
        // a rewind below the last run (negative): nothing new, nothing freed
        assert_eq!(plan_target(&interval(t(30, 4, 0, false), -7)), 30);
    }

    /// fuzz/regressions/c_api/interval-run-over-max-cells-*: `due` flagged an interval run on an
    /// earlier view, the plan's view is over max_cells=1, and gvote kept 21 cells.
    #[test]
    fn an_adaptive_interval_run_still_obeys_the_cap() {
        assert_eq!(plan_target(&interval(t(22, 22, 1, false), 1)), 1);
        assert_eq!(plan_target(&interval(t(22, 3, 1, false), 1)), 1);
        assert_eq!(plan_target(&interval(t(100, 20, 50, false), 5)), 47);
        // under the cap the interval bound stands
        assert_eq!(plan_target(&interval(t(40, 10, 50, false), 5)), 35);
    }
}
