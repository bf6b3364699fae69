//! Scorers that need no queries.

use super::{DeviceScore, QuerySel, Scorer, UnitCtx};

/// StreamingLLM: newer is more important; with the always-kept sinks this keeps
/// "sinks + most recent".
#[derive(Debug, Clone, Default)]
pub struct Position;

impl Scorer for Position {
    fn queries(&self) -> QuerySel {
        QuerySel::None
    }
    fn needs_keys(&self) -> bool {
        false
    }
    fn score_unit(&self, u: &UnitCtx) -> Vec<f32> {
        u.pos.iter().map(|&p| p as f32).collect()
    }
    fn device(&self) -> DeviceScore {
        DeviceScore::Position
    }
}

/// Key norm (kvpress `KnormPress`): keys with a small L2 norm draw attention and are kept,
/// so the score is `-||k||`.
#[derive(Debug, Clone, Default)]
pub struct KeyNorm;

impl Scorer for KeyNorm {
    fn queries(&self) -> QuerySel {
        QuerySel::None
    }
    fn score_unit(&self, u: &UnitCtx) -> Vec<f32> {
        // keys are transposed, `[head_dim][n]`: accumulate one dimension at a time
        let n = u.n();
        let mut sq = vec![0.0f32; n];
        for dim in u.keys.chunks_exact(n.max(1)).take(u.shape.head_dim) {
            sq.iter_mut().zip(dim).for_each(|(s, v)| *s += v * v);
        }
        sq.iter().map(|s| -s.sqrt()).collect()
    }
    fn device(&self) -> DeviceScore {
        DeviceScore::KeyNorm
    }
}

/// The position ranking (oldest first) that still asks for the newest `window` query rows,
/// because a rule measures their attention (DBudgetKV's `ranker=position`, ReFreeKV v3/v4).
#[derive(Debug, Clone)]
pub struct PositionWithQueries {
    /// query rows wanted per call
    pub window: usize,
}

impl Scorer for PositionWithQueries {
    fn queries(&self) -> QuerySel {
        QuerySel::Last(self.window)
    }
    /// the rows are the rule's (it adds its own cost), the ranking reads none
    fn cost_units(&self, _rows: usize) -> f32 {
        0.0
    }
    fn score_unit(&self, u: &UnitCtx) -> Vec<f32> {
        u.pos.iter().map(|&p| p as f32).collect()
    }
    fn device(&self) -> DeviceScore {
        DeviceScore::Position
    }
}
