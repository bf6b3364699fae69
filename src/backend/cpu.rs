//! CPU backend: K in host memory, each unit gathered and scored by the stage code itself
//! ([`Scorer::score_unit`](crate::score::Scorer::score_unit),
//! [`BudgetRule::unit_evidence`](crate::budget::BudgetRule::unit_evidence)), units in parallel.

use super::{UnitOut, UnitsIn};
use crate::error::Result;
use crate::score::UnitCtx;

/// Scores (and evidence) of every unit, in unit order.
pub fn score_units(inp: &UnitsIn) -> Result<Vec<UnitOut>> {
    let shape = inp.shape;
    let n_units = shape.n_layer * shape.n_head_kv;
    let results: Vec<Result<UnitOut>> = inp.par.map(n_units, |u| {
        let (layer, kv_head) = (u / shape.n_head_kv, u % shape.n_head_kv);
        let mut buf = Vec::new();
        if let Some(k) = inp.keys {
            k.gather_head_t(shape, layer, kv_head, &mut buf)?;
        }
        let ctx = UnitCtx {
            shape,
            layer,
            kv_head,
            keys: &buf,
            pos: inp.pos,
            queries: inp.queries,
            carry: inp.carry.map(|c| c[u].as_slice()),
            protected: inp.protected,
        };
        Ok((inp.scorer.score_unit(&ctx), inp.rule.unit_evidence(&ctx)))
    });
    results.into_iter().collect()
}
