//! Scorers built on the attention the newest queries pay to each cell.

use super::{DeviceScore, GqaReduce, QuerySel, Recon, Scorer, UnitCtx};
use crate::kernels;

/// Attention mass from the last `window` queries, averaged over those rows, reduced over the
/// GQA group and optionally pooled along the sequence.
///
/// - SnapKV: window 32, max-pool kernel 7;
/// - TOVA: window 1, no pooling;
/// - the H2O ranking of ReFreeKV/DBudgetKV: window 8, no pooling.
#[derive(Debug, Clone)]
pub struct WindowAttention {
    /// query rows observed
    pub window: usize,
    /// pooling kernel (odd; 1 = none)
    pub kernel: usize,
    /// max pooling (true) or average
    pub max_pool: bool,
    /// group reduction
    pub gqa: GqaReduce,
}

impl Scorer for WindowAttention {
    fn queries(&self) -> QuerySel {
        QuerySel::Last(self.window)
    }
    fn score_unit(&self, u: &UnitCtx) -> Vec<f32> {
        let rows = u.queries.len().max(1) as f32;
        let mut per_head = u.received(u.queries);
        for h in &mut per_head {
            h.iter_mut().for_each(|v| *v /= rows);
        }
        let s = self.gqa.fold(&per_head);
        kernels::pool1d(&s, self.kernel, self.max_pool)
    }
    fn device(&self) -> DeviceScore {
        DeviceScore::Window {
            kernel: self.kernel,
            max_pool: self.max_pool,
            gqa: self.gqa,
        }
    }
}

/// H2O: attention mass received, accumulated over every query seen so far and carried from plan
/// to plan (decode steps included).
#[derive(Debug, Clone)]
pub struct Accumulated {
    /// group reduction
    pub gqa: GqaReduce,
}

impl Scorer for Accumulated {
    fn queries(&self) -> QuerySel {
        QuerySel::Unconsumed
    }
    fn carries(&self) -> bool {
        true
    }
    fn score_unit(&self, u: &UnitCtx) -> Vec<f32> {
        let fresh = self.gqa.fold(&u.received(u.queries));
        match u.carry {
            Some(c) => fresh.iter().zip(c).map(|(a, b)| a + b).collect(),
            None => fresh,
        }
    }
    fn device(&self) -> DeviceScore {
        DeviceScore::Accumulated { gqa: self.gqa }
    }
}

/// Question-agnostic importance: the largest attention a cell receives from queries spread over
/// the whole sequence (every `stride`-th position, plus the newest `window`), not only from the
/// prompt's last tokens.
///
/// KVzip (arXiv 2505.23416) scores a cell by the maximum attention it receives while the model
/// re-reads the context in a second, teacher-forced pass; this reads the queries the prompt's own
/// prefill already computed, so it costs no extra prefill. A fact nobody has asked about yet is
/// still attended by the text around and after it, which the last queries of a prompt do not see.
#[derive(Debug, Clone)]
pub struct ContextAttention {
    /// distance between sampled query positions
    pub stride: usize,
    /// newest query rows always read
    pub window: usize,
    /// most sampled rows remembered per sequence (bounds memory and plan time)
    pub cap: usize,
    /// pooling kernel (odd; 1 = none)
    pub kernel: usize,
    /// group reduction
    pub gqa: GqaReduce,
    /// `ranker=recon`: at a prompt's end, read the rows of a reconstruction pass (and the newest
    /// `window`) instead of the spread rows; the other plans read the spread rows
    pub recon: Option<Recon>,
}

impl Scorer for ContextAttention {
    fn queries(&self) -> QuerySel {
        QuerySel::Spread {
            stride: self.stride,
            newest: self.window,
            cap: self.cap,
        }
    }
    fn score_unit(&self, u: &UnitCtx) -> Vec<f32> {
        let s = self.gqa.fold(&u.received_max(u.queries));
        kernels::pool1d(&s, self.kernel, true)
    }
    fn recon(&self) -> Option<Recon> {
        self.recon
    }
    /// A plan reads either the spread rows or the reconstruction rows (with the newest window),
    /// whichever bound is larger.
    fn cost_units(&self, rows: usize) -> f32 {
        let recon = self.recon.map_or(0, |r| r.cap + self.window);
        rows.max(recon) as f32
    }
}
