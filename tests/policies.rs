//! Hand-computed golden cases, one or more per policy, on toy inputs small enough to check with
//! pen and paper (head_dim 2, `kq_scale = 1`, keys chosen so the attention is obvious), plus the
//! evictor's behaviour: when it runs, caps, rewinds and errors.
//!
//! Conventions of the toys: cell ids are `100 + position`, so an evicted set is written as the
//! positions it frees; `sinks=1 window=1` unless said otherwise, so the protected cells are
//! position 0 and the newest one.

mod common;

use kvcompress::backend::{Backend, Parallelism};
use kvcompress::budget::{
    walk_drops, Ada, Allocator, BudgetRule, DecideCtx, Fixed, Measure, Pyramid,
};
use kvcompress::score::ScoreGrid;
use kvcompress::state::{Carry, QueryRow, SeqState};
use kvcompress::{Error, Evictor, OwnedKeys, Policy, SeqInput, Shape};

const SEQ: i32 = 1;

fn shape(n_layer: usize, n_head: usize, n_head_kv: usize) -> Shape {
    Shape::new(n_layer, n_head, n_head_kv, 2, 1.0).unwrap()
}

fn ev(shape: Shape, name: &str, params: &[&str]) -> Evictor {
    let policy = Policy::parse(name, params).unwrap();
    Evictor::new(shape, policy, Parallelism::Serial, Backend::Cpu).unwrap()
}

/// K for cells at `pos`: `f(layer, position, kv_head)`.
fn keys(shape: &Shape, pos: &[i32], f: impl Fn(usize, i32, usize) -> [f32; 2]) -> OwnedKeys {
    let mut data = Vec::new();
    for l in 0..shape.n_layer {
        for &p in pos {
            for g in 0..shape.n_head_kv {
                data.extend_from_slice(&f(l, p, g));
            }
        }
    }
    OwnedKeys::new(shape, pos.len(), data).unwrap()
}

/// Query rows for `q_pos`, `[n_layer][n_q][n_head*2]`: `f(layer, query position, head)`.
fn queries(shape: &Shape, q_pos: &[i32], f: impl Fn(usize, i32, usize) -> [f32; 2]) -> Vec<f32> {
    let mut q = Vec::new();
    for l in 0..shape.n_layer {
        for &p in q_pos {
            for h in 0..shape.n_head {
                q.extend_from_slice(&f(l, p, h));
            }
        }
    }
    q
}

fn cells(pos: &[i32]) -> Vec<u32> {
    pos.iter().map(|&p| 100 + p as u32).collect()
}

fn input<'a>(cells: &'a [u32], pos: &'a [i32], max_cells: usize) -> SeqInput<'a> {
    SeqInput {
        seq_id: SEQ,
        cells,
        pos,
        max_cells,
        prompt_end: true,
        room: false,
    }
}

/// Plan and return the evicted positions.
fn evicted(e: &mut Evictor, pos: &[i32], k: Option<&OwnedKeys>, max_cells: usize) -> Vec<i32> {
    let c = cells(pos);
    let view = k.map(|k| k.view(e.shape()));
    let plan = e.plan(&input(&c, pos, max_cells), view.as_ref()).unwrap();
    assert!(plan.stats.ran);
    assert_eq!(plan.stats.n_evict, plan.evict.len());
    assert_eq!(plan.stats.n_keep + plan.stats.n_evict, pos.len());
    plan.evict.iter().map(|&c| c as i32 - 100).collect()
}

/// Positions a unit kept in the last plan.
fn unit_kept(e: &Evictor, layer: usize, g: usize) -> Vec<i32> {
    let (pos, keep) = e.unit_keep(SEQ, layer, g).unwrap();
    pos.iter()
        .zip(keep)
        .filter(|(_, &k)| k)
        .map(|(&p, _)| p)
        .collect()
}

fn range(n: i32) -> Vec<i32> {
    (0..n).collect()
}

// ---------------------------------------------------------------------------------------------
// none, streaming
// ---------------------------------------------------------------------------------------------

#[test]
fn none_never_runs_and_never_evicts() {
    let s = shape(1, 2, 1);
    let mut e = ev(s, "none", &[]);
    let pos = range(10);
    let c = cells(&pos);
    assert!(!e.due(&input(&c, &pos, 4)).unwrap());
    let plan = e.plan(&input(&c, &pos, 4), None).unwrap();
    assert!(plan.evict.is_empty());
    assert!(!plan.stats.ran);
    assert_eq!(plan.stats.n_keep, 10);
}

#[test]
fn streaming_keeps_sinks_and_the_newest() {
    // sinks {0,1} + the newest (9) are protected; 5 tokens leave room for 2 more: the newest
    // candidates 8 and 7. No keys needed.
    let mut e = ev(shape(1, 2, 1), "streaming", &["tokens=5", "sinks=2"]);
    assert_eq!(evicted(&mut e, &range(10), None, 0), vec![2, 3, 4, 5, 6]);
}

#[test]
fn streaming_ratio_counts_tokens_seen_not_cells_held() {
    // positions 0..17 were seen but only 10 cells are held
    let pos = [0, 1, 3, 5, 7, 9, 11, 13, 15, 17];
    let mut e = ev(shape(1, 2, 1), "streaming", &["ratio=0.75", "sinks=1"]);
    // n_seen = 18: keep ceil(0.25*18) = 5: 0 (sink) + newest 17 + 3 newest candidates 15,13,11
    assert_eq!(evicted(&mut e, &pos, None, 0), vec![1, 3, 5, 7, 9]);
}

#[test]
fn fixed_ratio_is_exact_for_decimal_ratios() {
    // 70% of 10 tokens is 7 evicted, 3 kept; 0.7 is not exact in f32 and a naive
    // ceil((1 - 0.7f32) * 10) gives 4
    let mut e = ev(shape(1, 2, 1), "streaming", &["ratio=0.7", "sinks=1"]);
    assert_eq!(
        evicted(&mut e, &range(10), None, 0),
        vec![1, 2, 3, 4, 5, 6, 7]
    );
    for (r, n, keep) in [
        (0.7f32, 10usize, 3usize),
        (0.3, 10, 7),
        (0.9, 10, 1),
        (0.29, 100, 71),
    ] {
        let rule = Fixed::Ratio(r);
        let grid = ScoreGrid {
            n_layer: 1,
            n_head_kv: 1,
            units: vec![vec![0.0; n]],
        };
        let pos: Vec<i32> = (0..n as i32).collect();
        let prot = vec![false; n];
        let d = rule.decide(&DecideCtx {
            shape: &shape(1, 1, 1),
            grid: &grid,
            evidence: &[],
            pos: &pos,
            protected: &prot,
            n_seen: n,
        });
        assert_eq!(d.budget, keep, "ratio {r} of {n}");
    }
}

// ---------------------------------------------------------------------------------------------
// h2o
// ---------------------------------------------------------------------------------------------

/// Keys of the H2O toy: 3 points right (x = 8), 5 points up (y = 8), 9 points left (x = -8).
fn h2o_key(p: i32) -> [f32; 2] {
    match p {
        3 => [8.0, 0.0],
        5 => [0.0, 8.0],
        9 => [-8.0, 0.0],
        _ => [0.0, 0.0],
    }
}

#[test]
fn h2o_accumulates_and_carries_scores_across_plans() {
    let s = shape(1, 2, 1);
    let params = ["tokens=4", "sinks=1", "window=1", "interval=4"];
    let mut e = ev(s, "h2o", &params);
    // plan 1: the query at 8 looks right (cell 3 gets ~0.997), the query at 9 looks up (cell 5
    // gets ~0.997); everything else gets ~e^-8. Budget 4 = {0, 9} + the 2 best: 3 and 5.
    let pos = range(10);
    let k = keys(&s, &pos, |_, p, _| h2o_key(p));
    let q = queries(
        &s,
        &[8, 9],
        |_, p, _| if p == 8 { [1.0, 0.0] } else { [0.0, 1.0] },
    );
    e.push_queries(SEQ, &[8, 9], &q).unwrap();
    assert_eq!(evicted(&mut e, &pos, Some(&k), 0), vec![1, 2, 4, 6, 7, 8]);

    // plan 2: token 10 arrives; its query pays 0.7 to cell 9 and 0.3 to cell 5, nothing to 3.
    // With the carried scores: 5 = 0.997 + 0.3, 3 = 0.997, 9 = 0.7 -> 9 goes.
    let pos2 = vec![0, 3, 5, 9, 10];
    let k2 = keys(&s, &pos2, |_, p, _| h2o_key(p));
    let a = 1.0 + (7.0f32 / 3.0).ln() / 8.0;
    let q2 = queries(&s, &[10], |_, _, _| [-a, 1.0]);
    e.push_queries(SEQ, &[10], &q2).unwrap();
    assert_eq!(evicted(&mut e, &pos2, Some(&k2), 0), vec![9]);

    // without the history (a fresh evictor) the same query alone evicts 3 instead
    let mut fresh = ev(s, "h2o", &params);
    fresh.push_queries(SEQ, &[10], &q2).unwrap();
    assert_eq!(evicted(&mut fresh, &pos2, Some(&k2), 0), vec![3]);
}

/// The rewind toy: timeline A makes position 8 a heavy hitter; the sequence is rewound to
/// position 5 and positions 6..9 are decoded again with other content. Nothing of timeline A
/// beyond position 5 may survive: the new cell at position 8 must start from zero.
fn rewind_case(call_due_at_rewind: bool) -> Vec<i32> {
    let s = shape(1, 1, 1);
    let mut e = ev(s, "h2o", &["tokens=4", "sinks=1", "window=1", "interval=4"]);
    let pos = range(10);
    let k = keys(
        &s,
        &pos,
        |_, p, _| if p == 8 { [8.0, 0.0] } else { [0.0, 0.0] },
    );
    let q = queries(&s, &[8, 9], |_, _, _| [1.0, 0.0]);
    e.push_queries(SEQ, &[8, 9], &q).unwrap();
    // {0, 9} + the 2 best: 8 (~2.0) and then the oldest-seen ties... all equal, newest: 7
    assert_eq!(evicted(&mut e, &pos, Some(&k), 0), vec![1, 2, 3, 4, 5, 6]);

    // the engine rewinds to position 5: of the kept cells only position 0 survives
    if call_due_at_rewind {
        let p = vec![0];
        let c = cells(&p);
        let _ = e.due(&input(&c, &p, 0)).unwrap();
    }
    // positions 6..9 decoded again: 6 points up, the others are plain; the queries look up
    let pos2 = vec![0, 6, 7, 8, 9];
    let k2 = keys(
        &s,
        &pos2,
        |_, p, _| if p == 6 { [0.0, 8.0] } else { [0.0, 0.0] },
    );
    let q2 = queries(&s, &[6, 7, 8, 9], |_, _, _| [0.0, 1.0]);
    e.push_queries(SEQ, &[6, 7, 8, 9], &q2).unwrap();
    evicted(&mut e, &pos2, Some(&k2), 0)
}

#[test]
fn rewind_drops_carried_scores_beyond_the_rewind_point() {
    // fresh scores: 6 ~ 4 (every query), 7 ~ 3e-4 * 3 rows, 8 ~ 3e-4 * 2 rows: keep 6 and 7.
    // A stale carry for position 8 (~2.0 from timeline A) would keep 8 and evict 7.
    assert_eq!(rewind_case(false), vec![8]);
    assert_eq!(rewind_case(true), vec![8]);
}

#[test]
fn seq_state_truncation_forgets_everything_beyond_the_point() {
    let mut st = SeqState::default();
    st.push(
        (0..6)
            .map(|p| QueryRow {
                pos: p,
                data: vec![0.0].into_boxed_slice(),
            })
            .collect(),
        8,
    );
    st.consumed = 5;
    st.carry = Some(Carry {
        pos: vec![0, 2, 4, 5],
        units: vec![vec![1.0, 2.0, 3.0, 4.0]],
    });
    st.truncate_after(3);
    assert_eq!(st.consumed, 3);
    assert_eq!(
        st.ring.iter().map(|r| r.pos).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    // re-decoding positions 4 and 5 must not find the old scores
    let carry = st.carry.as_ref().map(|c| c.realign(&[0, 2, 4, 5]));
    assert_eq!(carry, Some(vec![vec![1.0, 2.0, 0.0, 0.0]]));
}

// ---------------------------------------------------------------------------------------------
// snapkv, tova, knorm
// ---------------------------------------------------------------------------------------------

/// Cell 4 points right; every query of the window looks right.
fn snap_toy(pool: &str) -> Vec<i32> {
    let s = shape(1, 2, 1);
    let pos = range(10);
    let k = keys(
        &s,
        &pos,
        |_, p, _| if p == 4 { [10.0, 0.0] } else { [0.0, 0.0] },
    );
    let q = queries(&s, &[8, 9], |_, _, _| [10.0, 0.0]);
    let mut e = ev(
        s,
        "snapkv",
        &["tokens=6", "sinks=1", "window=2", pool, "pooling=max"],
    );
    e.push_queries(SEQ, &[8, 9], &q).unwrap();
    evicted(&mut e, &pos, Some(&k), 0)
}

#[test]
fn snapkv_pooling_keeps_the_neighbours_of_a_hot_cell() {
    // protected: 0 (sink), 8 and 9 (window 2); 6 - 3 = 3 candidates stay.
    // pool 3 (max): cells 3, 4, 5 all score ~1, the rest e^-100 -> keep 3, 4, 5
    assert_eq!(snap_toy("pool=3"), vec![1, 2, 6, 7]);
    // no pooling: 4, then equal scores keep the newer cells: 7, 6
    assert_eq!(snap_toy("pool=1"), vec![1, 2, 3, 5]);
}

#[test]
fn tova_listens_to_the_newest_query_only() {
    let s = shape(1, 2, 1);
    let pos = range(10);
    // 2 points right, 5 points up; older queries look right, the newest looks up
    let k = keys(&s, &pos, |_, p, _| match p {
        2 => [8.0, 0.0],
        5 => [0.0, 8.0],
        _ => [0.0, 0.0],
    });
    let q = queries(&s, &[6, 7, 8, 9], |_, p, _| {
        if p == 9 {
            [0.0, 1.0]
        } else {
            [1.0, 0.0]
        }
    });
    let mut e = ev(s, "tova", &["tokens=3", "sinks=1"]);
    e.push_queries(SEQ, &[6, 7, 8, 9], &q).unwrap();
    // {0, 9} + 1: cell 5
    assert_eq!(
        evicted(&mut e, &pos, Some(&k), 0),
        vec![1, 2, 3, 4, 6, 7, 8]
    );
}

#[test]
fn knorm_keeps_the_smallest_keys() {
    let s = shape(1, 2, 1);
    let pos = range(10);
    // norms: position p has norm |p - 4.5| * 2 except 0 and 9 (protected)
    let k = keys(&s, &pos, |_, p, _| [(p as f32 - 4.5) * 2.0, 0.0]);
    let mut e = ev(s, "knorm", &["tokens=5", "sinks=1", "window=1"]);
    // candidates 1..8, norms 7,5,3,1,1,3,5,7: keep 4 and 5 (norm 1), then norm 3: 3 and 6
    // (exactly equal) -> only one fits: the newer, 6
    assert_eq!(evicted(&mut e, &pos, Some(&k), 0), vec![1, 2, 3, 7, 8]);
}

// ---------------------------------------------------------------------------------------------
// pyramidkv, dynamickv, adakv
// ---------------------------------------------------------------------------------------------

/// Layer 0: the logit of cell p is p (query right, key (p, 0)), a strict ranking 8 > 7 > ... > 1.
/// Layer 1: cell 3 (logit 10) and cell 6 (logit 9), all else 0.
fn pyramid_toy(extra: &[&str]) -> (Evictor, Vec<i32>) {
    let s = shape(2, 2, 1);
    let pos = range(10);
    let k = keys(&s, &pos, |l, p, _| match (l, p) {
        (0, p) => [p as f32, 0.0],
        (1, 3) => [0.0, 10.0],
        (1, 6) => [0.0, 9.0],
        _ => [0.0, 0.0],
    });
    let q = queries(
        &s,
        &[9],
        |l, _, _| if l == 0 { [1.0, 0.0] } else { [0.0, 1.0] },
    );
    let mut p = vec!["tokens=6", "sinks=1", "window=1", "pool=1", "beta=2"];
    p.extend_from_slice(extra);
    let mut e = ev(s, "pyramidkv", &p);
    e.push_queries(SEQ, &[9], &q).unwrap();
    let gone = evicted(&mut e, &pos, Some(&k), 0);
    (e, gone)
}

#[test]
fn pyramidkv_gives_the_first_layer_more() {
    let (e, ev_pos) = pyramid_toy(&[]);
    // per-unit average 4: layer 0 gets 2*4 - 4/2 = 6, layer 1 gets 4/2 = 2
    assert_eq!(unit_kept(&e, 0, 0), vec![0, 3, 4, 5, 6, 7, 8, 9]);
    assert_eq!(unit_kept(&e, 1, 0), vec![0, 3, 6, 9]);
    // votes: 3 and 6 twice, 4 5 7 8 once -> 3, 6, then by mean score: 8, 7
    assert_eq!(ev_pos, vec![1, 2, 4, 5]);
    assert_eq!(e.layer_kept(SEQ).unwrap(), &[6, 6]);
    // the schedule itself
    let p = Pyramid { beta: 2.0 };
    assert_eq!(p.layer_budgets(2, 4, 8), vec![6, 2]);
    assert_eq!(p.layer_budgets(3, 4, 8), vec![6, 4, 2]);
    // capped by the candidates: max = 8, min = 2*6 - 8 = 4
    assert_eq!(p.layer_budgets(2, 6, 8), vec![8, 4]);
}

#[test]
fn layer_granularity_frees_only_what_no_layer_keeps() {
    let (e, ev_pos) = pyramid_toy(&["granularity=layer"]);
    // the same unit keep sets; their union is {0, 3..9}
    assert_eq!(unit_kept(&e, 1, 0), vec![0, 3, 6, 9]);
    assert_eq!(ev_pos, vec![1, 2]);
    assert_eq!(e.layer_kept(SEQ).unwrap(), &[8, 4]);
}

#[test]
fn layer_granularity_shares_one_set_per_layer() {
    // 1 layer, 2 KV heads: head 0 prefers the newest cells, head 1 cell 4 alone
    let s = shape(1, 2, 2);
    let pos = range(10);
    let k = keys(&s, &pos, |_, p, g| match g {
        0 => [p as f32 * 0.5, 0.0],
        _ if p == 4 => [10.0, 0.0],
        _ => [0.0, 0.0],
    });
    let q = queries(&s, &[9], |_, _, _| [1.0, 0.0]);
    let run = |gran: &str| {
        let mut e = ev(
            s,
            "snapkv",
            &["tokens=5", "sinks=1", "window=1", "pool=1", gran],
        );
        e.push_queries(SEQ, &[9], &q).unwrap();
        let gone = evicted(&mut e, &pos, Some(&k), 0);
        (e, gone)
    };
    let (head, _) = run("granularity=head");
    assert_ne!(unit_kept(&head, 0, 0), unit_kept(&head, 0, 1));
    let (layer, gone) = run("granularity=layer");
    // both heads hold the same set: protected 0 and 9, then the best 3 by mean score
    assert_eq!(unit_kept(&layer, 0, 0), unit_kept(&layer, 0, 1));
    assert_eq!(unit_kept(&layer, 0, 0).len(), 5);
    assert_eq!(layer.layer_kept(SEQ).unwrap(), &[5]);
    assert_eq!(gone.len(), 5);
}

#[test]
fn dynamickv_moves_budget_to_the_layer_with_spread_attention() {
    let s = shape(2, 2, 1);
    let pos = range(10);
    // layer 0: all keys 0 -> the query spreads 0.1 over all 10 cells (flat)
    // layer 1: cell 4 takes ~all the mass (peaked)
    let k = keys(&s, &pos, |l, p, _| {
        if l == 1 && p == 4 {
            [10.0, 0.0]
        } else {
            [0.0, 0.0]
        }
    });
    let q = queries(&s, &[9], |_, _, _| [1.0, 0.0]);
    let mut e = ev(
        s,
        "dynamickv",
        &["tokens=5", "sinks=1", "window=1", "pool=1"],
    );
    e.push_queries(SEQ, &[9], &q).unwrap();
    let ev_pos = evicted(&mut e, &pos, Some(&k), 0);
    // average 3 per layer = 6 in all; the model-wide top 6 = cell 4 of layer 1 + 5 flat cells
    // of layer 0 -> layer 0 keeps 5 (ties: newest), layer 1 keeps 1
    assert_eq!(unit_kept(&e, 0, 0), vec![0, 4, 5, 6, 7, 8, 9]);
    assert_eq!(unit_kept(&e, 1, 0), vec![0, 4, 9]);
    // projection to 5 tokens: 4 (two votes), then the newest of the single votes: 8, 7
    assert_eq!(ev_pos, vec![1, 2, 3, 5, 6]);
}

fn ada_toy(alpha: &str) -> Evictor {
    // 1 layer, 2 KV heads (no GQA): head 0 flat (keys 0), head 1 peaked at cell 4
    let s = shape(1, 2, 2);
    let pos = range(10);
    let k = keys(&s, &pos, |_, p, g| {
        if g == 1 && p == 4 {
            [10.0, 0.0]
        } else {
            [0.0, 0.0]
        }
    });
    let q = queries(&s, &[9], |_, _, _| [1.0, 0.0]);
    let mut e = ev(
        s,
        "adakv",
        &["tokens=6", "sinks=1", "window=1", "pool=1", alpha],
    );
    e.push_queries(SEQ, &[9], &q).unwrap();
    evicted(&mut e, &pos, Some(&k), 0);
    e
}

#[test]
fn adakv_splits_a_layer_budget_between_heads() {
    // per head 4, 8 in the layer; the global top 8 = cell 4 of head 1 + 7 flat cells of head 0
    // alpha 0: counts as they are, [7, 1]
    let e = ada_toy("alpha=0");
    assert_eq!(unit_kept(&e, 0, 0), vec![0, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert_eq!(unit_kept(&e, 0, 1), vec![0, 4, 9]);
    // alpha 0.5: round(7*0.5 + 2) = 6, round(1*0.5 + 2) = 3, 9 > 8 -> the larger gives one: [5, 3]
    let e = ada_toy("alpha=0.5");
    assert_eq!(unit_kept(&e, 0, 0).len(), 2 + 5);
    assert_eq!(unit_kept(&e, 0, 1).len(), 2 + 3);
    // head 1's 3: cell 4 then the newest ties 8, 7
    assert_eq!(unit_kept(&e, 0, 1), vec![0, 4, 7, 8, 9]);
    // alpha 1: uniform
    let e = ada_toy("alpha=1");
    assert_eq!(unit_kept(&e, 0, 0).len(), 2 + 4);
    assert_eq!(unit_kept(&e, 0, 1).len(), 2 + 4);
}

#[test]
fn ada_allocator_directly() {
    // 2 layers x 2 heads over 6 cells; candidates 1..4. Head scores (already normalized):
    let grid = ScoreGrid {
        n_layer: 2,
        n_head_kv: 2,
        units: vec![
            vec![0.0, 0.25, 0.25, 0.25, 0.25, 0.0], // flat
            vec![0.0, 0.97, 0.01, 0.01, 0.01, 0.0], // peaked
            vec![0.0, 0.1, 0.2, 0.3, 0.4, 0.0],
            vec![0.0, 0.1, 0.2, 0.3, 0.4, 0.0],
        ],
    };
    let cand = [false, true, true, true, true, false];
    let uni = |alpha| Ada {
        alpha,
        layers: Box::new(kvcompress::budget::Uniform),
    };
    // layer 0, budget 2 per head: top 4 of {.25 x4, .97, .01 x3} = .97 + three .25 -> [3, 1]
    assert_eq!(uni(0.0).allocate(&grid, &cand, 2), vec![3, 1, 2, 2]);
    // alpha 1 is uniform
    assert_eq!(uni(1.0).allocate(&grid, &cand, 2), vec![2, 2, 2, 2]);
    // more than the candidates: clamped to 4 each
    assert_eq!(uni(0.2).allocate(&grid, &cand, 9), vec![4, 4, 4, 4]);
    // pyramid layers (beta 2): layer budgets 3 and 1 per head; layer 0's top 6 = .97, four
    // .25 and one .01 of the peaked head -> [4, 2]; layer 1's top 2: one .4 each -> [1, 1]
    let pyr = Ada {
        alpha: 0.0,
        layers: Box::new(Pyramid { beta: 2.0 }),
    };
    assert_eq!(pyr.allocate(&grid, &cand, 2), vec![4, 2, 1, 1]);
}

// ---------------------------------------------------------------------------------------------
// dbudget
// ---------------------------------------------------------------------------------------------

/// The newest query pays attention proportional to w: w = 1 for cells 1..4, sqrt(24) for
/// 5..8 (and 1 for the protected 0 and 9). Squared candidate mass: 4 * 1 + 4 * 24 = 100.
/// Evicting the oldest first, the retained norm is sqrt(100 - i) for i <= 4 cells, then
/// sqrt(72): drops 0.0050, 0.0101, 0.0151, 0.0202, then 0.1515.
fn dbudget_toy(threshold: &str, param: &str) -> Vec<i32> {
    let s = shape(1, 1, 1);
    let pos = range(10);
    let hot = 24f32.sqrt().ln();
    let k = keys(&s, &pos, |_, p, _| {
        if (5..=8).contains(&p) {
            [hot, 0.0]
        } else {
            [0.0, 0.0]
        }
    });
    let q = queries(&s, &[9], |_, _, _| [1.0, 0.0]);
    let mut e = ev(s, "dbudget", &[threshold, param, "sinks=1", "window=1"]);
    e.push_queries(SEQ, &[9], &q).unwrap();
    evicted(&mut e, &pos, Some(&k), 0)
}

#[test]
fn dbudget_cuts_exactly_where_the_drop_passes_the_threshold() {
    for ranker in ["ranker=position", "ranker=window"] {
        assert_eq!(dbudget_toy("threshold=0.003", ranker), Vec::<i32>::new());
        assert_eq!(dbudget_toy("threshold=0.006", ranker), vec![1]);
        assert_eq!(dbudget_toy("threshold=0.012", ranker), vec![1, 2]);
        assert_eq!(dbudget_toy("threshold=0.0155", ranker), vec![1, 2, 3]);
        assert_eq!(dbudget_toy("threshold=0.05", ranker), vec![1, 2, 3, 4]);
        assert_eq!(dbudget_toy("threshold=0.16", ranker), vec![1, 2, 3, 4, 5]);
    }
}

/// `measure=mass` bounds the attention mass lost, not its L2 norm. On the toy the candidates hold
/// 1, 1, 1, 1 and four times √24 (mass 23.6): the four small cells are 17 % of the mass but 2 % of
/// the norm, so at `threshold=0.05` the norm frees all four and the mass one (4.2 %).
#[test]
fn dbudget_measure_mass_counts_the_small_entries_the_norm_ignores() {
    assert_eq!(
        dbudget_toy("threshold=0.05", "measure=norm"),
        vec![1, 2, 3, 4]
    );
    assert_eq!(dbudget_toy("threshold=0.05", "measure=mass"), vec![1]);
    assert_eq!(dbudget_toy("threshold=0.09", "measure=mass"), vec![1, 2]);
    assert_eq!(
        dbudget_toy("threshold=0.17", "measure=mass"),
        vec![1, 2, 3, 4]
    );
}

/// A needle (cell 3) that only a query in the middle of the context attends to (the one at
/// position 4); the newest query attends to cells 5..8. `ranker=window` reads the newest query
/// and frees the needle; `ranker=context` reads every `stride`-th query too (0, 4, 8 and the
/// newest), scores each cell by the largest attention it received and keeps it.
fn needle_toy(ranker: &str) -> (Vec<i32>, usize) {
    let s = shape(1, 1, 1);
    let pos = range(10);
    let hot = 20f32.ln();
    let k = keys(&s, &pos, |_, p, _| match p {
        3 => [hot, 0.0],
        5..=8 => [0.0, hot],
        _ => [0.0, 0.0],
    });
    let q = queries(
        &s,
        &pos,
        |_, p, _| if p == 4 { [1.0, 0.0] } else { [0.0, 1.0] },
    );
    let mut e = ev(
        s,
        "dbudget",
        &[
            "threshold=0.05",
            ranker,
            "stride=4",
            "pool=1",
            "sinks=1",
            "window=1",
        ],
    );
    e.push_queries(SEQ, &pos, &q).unwrap();
    (evicted(&mut e, &pos, Some(&k), 0), e.q_window())
}

#[test]
fn dbudget_ranker_context_keeps_what_the_middle_of_the_context_attends_to() {
    let (window, q_window) = needle_toy("ranker=window");
    assert!(window.contains(&3), "{window:?}");
    assert_eq!(q_window, 1);
    let (context, q_window) = needle_toy("ranker=context");
    assert!(!context.contains(&3) && context.contains(&1), "{context:?}");
    // every row of a ubatch (up to 4096) is captured; the library keeps its sample
    assert_eq!(q_window, 4096);
}

/// Issue 16: a question arriving after its context was compressed must not compound the first
/// cut. First cut at threshold 0.5 on the dbudget toy frees positions 1..=6 (4 cells held). Then
/// two tokens arrive (10, 11) whose query spreads its attention evenly over 7, 8, 9 and away from
/// 10: on that view alone the rule frees three cells (10, 7, 8), but a second prompt end frees
/// at most what arrived since the first verdict: two.
#[test]
fn a_second_prompt_end_frees_at_most_what_arrived_since_the_first() {
    let s = shape(1, 1, 1);
    let hot = 24f32.sqrt().ln();
    let key = |_: usize, p: i32, _: usize| match p {
        5..=8 => [hot, 0.0],
        10 | 11 => [0.0, -5.0],
        _ => [0.0, 0.0],
    };
    let params = ["threshold=0.5", "pool=1", "sinks=1", "window=1"];
    let mut e = ev(s, "dbudget", &params);
    let pos = range(10);
    e.push_queries(SEQ, &[9], &queries(&s, &[9], |_, _, _| [1.0, 0.0]))
        .unwrap();
    assert_eq!(
        evicted(&mut e, &pos, Some(&keys(&s, &pos, key)), 0),
        vec![1, 2, 3, 4, 5, 6]
    );

    let pos2 = vec![0, 7, 8, 9, 10, 11];
    let k2 = keys(&s, &pos2, key);
    let q2 = queries(&s, &[10, 11], |_, _, _| [0.0, 1.0]);
    // the same view on a fresh evictor (no earlier verdict): the rule alone frees three
    let mut fresh = ev(s, "dbudget", &params);
    fresh.push_queries(SEQ, &[10, 11], &q2).unwrap();
    assert_eq!(evicted(&mut fresh, &pos2, Some(&k2), 0), vec![7, 8, 10]);
    // after the first cut: two, as many as arrived
    e.push_queries(SEQ, &[10, 11], &q2).unwrap();
    let second = evicted(&mut e, &pos2, Some(&k2), 0);
    assert_eq!(second.len(), 2, "{second:?}");
    // the cap still binds
    let mut e = ev(s, "dbudget", &params);
    e.push_queries(SEQ, &[9], &queries(&s, &[9], |_, _, _| [1.0, 0.0]))
        .unwrap();
    evicted(&mut e, &pos, Some(&keys(&s, &pos, key)), 0);
    e.push_queries(SEQ, &[10, 11], &q2).unwrap();
    assert_eq!(evicted(&mut e, &pos2, Some(&k2), 3).len(), 3);
}

#[test]
fn walk_drops_matches_the_hand_computation() {
    // one layer, one head, 6 cells; squared attention of candidates 1..4 = 1, 1, 24, 24 (sum 50)
    let ev = vec![vec![0.0, 1.0, 1.0, 24.0, 24.0, 0.0]];
    let d = walk_drops(Measure::Norm, 1, 1, 1, 6, &ev, &[1, 2, 3, 4]);
    let want = [
        0.0,
        1.0 - (49.0f64 / 50.0).sqrt(),
        1.0 - (48.0f64 / 50.0).sqrt(),
        1.0 - (24.0f64 / 50.0).sqrt(),
        1.0,
    ];
    assert_eq!(d.len(), 5);
    for (a, b) in d.iter().zip(want) {
        assert!((a - b).abs() < 1e-12, "{d:?}");
    }
    // two layers: the worse layer decides; a layer with no candidate mass never constrains
    let ev = vec![vec![0.0, 1.0, 0.0, 1.0], vec![0.0; 4]];
    let d = walk_drops(Measure::Norm, 2, 1, 1, 4, &ev, &[2, 1]);
    assert_eq!(d[1], 0.0);
    assert!((d[2] - (1.0 - 0.5f64.sqrt())).abs() < 1e-12);
    // the mass measure sums the attention itself (square roots of the evidence): 1, 1, √24, √24.
    // Dropping the two small cells costs 2/(2+2√24) = 17 % of the mass but 2 % of the L2 norm
    let ev = vec![vec![0.0, 1.0, 1.0, 24.0, 24.0, 0.0]];
    let d = walk_drops(Measure::Mass, 1, 1, 1, 6, &ev, &[1, 2, 3, 4]);
    let total = 2.0 + 2.0 * 24.0f64.sqrt();
    let want = [
        0.0,
        1.0 / total,
        2.0 / total,
        (2.0 + 24.0f64.sqrt()) / total,
        1.0,
    ];
    for (a, b) in d.iter().zip(want) {
        assert!((a - b).abs() < 1e-12, "{d:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// gvote
// ---------------------------------------------------------------------------------------------

#[test]
fn gvote_keeps_the_union_of_the_newest_querys_nuclei() {
    let s = shape(1, 2, 1);
    let pos = range(10);
    // 3 points right (logit 5 for head 0); 5 and 6 point up (logits 5 and 5.1 for head 1)
    let k = keys(&s, &pos, |_, p, _| match p {
        3 => [5.0, 0.0],
        5 => [0.0, 5.0],
        6 => [0.0, 5.1],
        _ => [0.0, 0.0],
    });
    // head 0 looks right, head 1 up; the older row looks elsewhere and must not matter
    let q = queries(&s, &[8, 9], |_, p, h| match (p, h) {
        (9, 0) => [1.0, 0.0],
        (9, _) => [0.0, 1.0],
        _ => [-1.0, -1.0],
    });
    // head 0: a3 = e^5 / (e^5 + 9) = 0.943 -> {3} for any p <= 0.943
    // head 1: a6 = e^5.1 / (e^5 + e^5.1 + 8) = 0.512, a5 = 0.463
    let run = |p: &str| {
        let mut e = ev(
            s,
            "gvote",
            &["samples=0", p, "sinks=1", "window=1", "quorum=0", "pool=1"],
        );
        e.push_queries(SEQ, &[8, 9], &q).unwrap();
        evicted(&mut e, &pos, Some(&k), 0)
    };
    // p = 0.9: head 1 needs 6 and 5 -> union {3, 5, 6} (+ protected 0, 9)
    assert_eq!(run("p=0.9"), vec![1, 2, 4, 7, 8]);
    // p = 0.52: 0.512 is not enough, still {6, 5}
    assert_eq!(run("p=0.52"), vec![1, 2, 4, 7, 8]);
    // p = 0.5: 6 alone reaches it -> union {3, 6}
    assert_eq!(run("p=0.5"), vec![1, 2, 4, 5, 7, 8]);
    // p = 0.95: head 0 needs more than 3: the 9 other cells tie at 0.0063 each and the
    // nucleus stops as soon as the mass reaches p: two cells more (which ones is a tie)
    let gone = run("p=0.95");
    assert_eq!(gone.len(), 4, "{gone:?}");
}

#[test]
fn gvote_quorum_one_keeps_what_every_unit_votes_for() {
    // 2 KV heads: head 0 wants {3}, head 1 wants {3, 5}; quorum 1 needs both units
    let s = shape(1, 2, 2);
    let pos = range(10);
    let k = keys(&s, &pos, |_, p, g| match (p, g) {
        (3, 0) => [8.0, 0.0],
        (3, 1) | (5, 1) => [8.0, 0.0],
        _ => [0.0, 0.0],
    });
    let q = queries(&s, &[8, 9], |_, _, _| [1.0, 0.0]);
    let run = |quorum: &str| {
        let mut e = ev(
            s,
            "gvote",
            &[
                "samples=0",
                "p=0.9",
                "sinks=1",
                "window=1",
                quorum,
                "pool=1",
            ],
        );
        e.push_queries(SEQ, &[8, 9], &q).unwrap();
        evicted(&mut e, &pos, Some(&k), 0)
    };
    assert_eq!(run("quorum=0"), vec![1, 2, 4, 6, 7, 8]);
    assert_eq!(run("quorum=1"), vec![1, 2, 4, 5, 6, 7, 8]);
}

// ---------------------------------------------------------------------------------------------
// behaviour: due, caps, errors
// ---------------------------------------------------------------------------------------------

fn due(e: &mut Evictor, pos: &[i32], max_cells: usize, prompt_end: bool) -> bool {
    let c = cells(pos);
    e.due(&SeqInput {
        seq_id: SEQ,
        cells: &c,
        pos,
        max_cells,
        prompt_end,
        room: false,
    })
    .unwrap()
}

#[test]
fn due_fires_at_prompt_end_on_overflow_and_every_interval() {
    let s = shape(1, 2, 1);
    let mut e = ev(s, "streaming", &["tokens=6", "sinks=1", "interval=4"]);
    // a prompt in two chunks: not due mid-prompt, due at its end
    assert!(!due(&mut e, &range(5), 0, false));
    assert!(due(&mut e, &range(10), 0, true));
    let gone = evicted(&mut e, &range(10), None, 0);
    let kept: Vec<i32> = range(10)
        .into_iter()
        .filter(|p| !gone.contains(p))
        .collect();
    assert_eq!(kept, vec![0, 5, 6, 7, 8, 9]);
    // decode: due again after 4 new tokens, not before
    let mut held = kept.clone();
    for (step, p) in (10..18).enumerate() {
        held.push(p);
        let d = due(&mut e, &held, 0, false);
        assert_eq!(d, step == 3 || step == 7, "token {p}");
        if d {
            let gone = evicted(&mut e, &held, None, 0);
            held.retain(|p| !gone.contains(p));
        }
    }
    // over max_cells: due even mid-prompt
    let mut e = ev(s, "streaming", &["tokens=6", "sinks=1", "interval=4"]);
    assert!(due(&mut e, &range(12), 10, false));
    // interval 0: prefill only
    let mut e = ev(s, "streaming", &["tokens=6", "sinks=1", "interval=0"]);
    assert!(due(&mut e, &range(10), 0, true));
    evicted(&mut e, &range(10), None, 0);
    for p in 10..80 {
        assert!(!due(&mut e, &[0, 6, 7, 8, 9, p], 0, false));
    }
}

/// The engine rewinds a sequence to position 5 and processes a new prompt tail 6..11, which
/// ends below the highest position seen before (19): the policy must run at its end.
fn due_after_rewind(name: &str) -> bool {
    due_after_rewind_to(name, 12)
}

/// The same with a tail `6..end`.
fn due_after_rewind_to(name: &str, end: i32) -> bool {
    let s = shape(1, 2, 1);
    let mut p = vec!["tokens=6", "sinks=1", "window=1"];
    if name == "snapkv" {
        p.push("pool=1");
    }
    let mut e = ev(s, name, &p);
    let pos = range(20);
    let k = keys(&s, &pos, |_, p, _| [p as f32 / 10.0, 1.0]);
    let q = queries(&s, &pos, |_, _, _| [1.0, 0.0]);
    e.push_queries(SEQ, &pos, &q).unwrap();
    assert!(due(&mut e, &pos, 0, true));
    let gone = evicted(&mut e, &pos, Some(&k), 0);
    // rewind to 5, then the new tail 6..11
    let mut held: Vec<i32> = pos
        .iter()
        .copied()
        .filter(|p| !gone.contains(p) && *p <= 5)
        .collect();
    held.extend(6..end);
    let tail: Vec<i32> = (6..end).collect();
    e.push_queries(SEQ, &tail, &queries(&s, &tail, |_, _, _| [0.0, 1.0]))
        .unwrap();
    due(&mut e, &held, 0, true)
}

#[test]
fn due_fires_at_the_end_of_a_prompt_after_a_rewind() {
    assert!(due_after_rewind("snapkv"));
    assert!(due_after_rewind("h2o"));
}

#[test]
fn due_fires_at_the_end_of_a_prompt_after_a_rewind_without_queries() {
    assert!(due_after_rewind("streaming"));
    assert!(due_after_rewind("knorm"));
}

#[test]
// the rows a call pushes must reach the state even when the ring keeps fewer of them: the
// lowest one is what reveals the rewind
fn due_fires_after_a_rewind_whose_tail_passes_the_old_end() {
    assert!(due_after_rewind_to("tova", 21));
    assert!(due_after_rewind_to("snapkv", 21));
}

#[test]
fn max_cells_caps_the_plan_with_headroom() {
    let s = shape(1, 2, 1);
    // the policy would keep 40 of 48; the engine allows 32 -> 32 - 32/16 = 30
    let mut e = ev(s, "streaming", &["tokens=40", "sinks=4"]);
    let pos = range(48);
    let gone = evicted(&mut e, &pos, None, 32);
    assert_eq!(gone.len(), 48 - 30);
    assert_eq!(gone, (4..22).collect::<Vec<_>>());
    // below the policy's own budget the cap does nothing
    let mut e = ev(s, "streaming", &["tokens=20", "sinks=4"]);
    assert_eq!(evicted(&mut e, &pos, None, 32).len(), 28);
    // even a cap of 1 keeps position 0 and the newest
    let mut e = ev(s, "streaming", &["tokens=20", "sinks=4"]);
    assert_eq!(evicted(&mut e, &pos, None, 1), (1..47).collect::<Vec<_>>());
}

#[test]
fn max_cells_caps_finer_granularities_too() {
    // 2 KV heads that want disjoint cells; tokens=4 per head -> the union is larger than 4
    let s = shape(1, 2, 2);
    let pos = range(12);
    let k = keys(&s, &pos, |_, p, g| {
        if (g == 0 && p < 6) || (g == 1 && p >= 6) {
            [p as f32, 0.0]
        } else {
            [0.0, 0.0]
        }
    });
    let q = queries(&s, &[11], |_, _, _| [1.0, 0.0]);
    let mut e = ev(
        s,
        "snapkv",
        &[
            "tokens=12",
            "sinks=1",
            "window=1",
            "pool=1",
            "granularity=head",
        ],
    );
    e.push_queries(SEQ, &[11], &q).unwrap();
    let gone = evicted(&mut e, &pos, Some(&k), 6);
    assert!(
        pos.len() - gone.len() <= 6,
        "kept {}",
        pos.len() - gone.len()
    );
}

#[test]
fn non_finite_queries_and_keys_are_refused() {
    let s = shape(2, 2, 1);
    let mut e = ev(s, "snapkv", &["tokens=4", "window=1", "sinks=1", "pool=1"]);
    let mut q = queries(&s, &[8, 9], |_, _, _| [1.0, 0.0]);
    // layer 1, row 1 (position 9), head 0
    let bad = 2 * 4 + 4;
    q[bad] = f32::NAN;
    match e.push_queries(SEQ, &[8, 9], &q) {
        Err(Error::NonFinite { what, layer, row }) => {
            assert_eq!((what, layer, row), ("queries", 1, 1));
        }
        other => panic!("{other:?}"),
    }
    q[bad] = f32::INFINITY;
    assert!(matches!(
        e.push_queries(SEQ, &[8, 9], &q),
        Err(Error::NonFinite { .. })
    ));
    q[bad] = 1.0;
    e.push_queries(SEQ, &[8, 9], &q).unwrap();
    let pos = range(10);
    let k = keys(&s, &pos, |l, p, _| {
        if l == 1 && p == 3 {
            [f32::NAN, 0.0]
        } else {
            [1.0, 0.0]
        }
    });
    let c = cells(&pos);
    match e.plan(&input(&c, &pos, 0), Some(&k.view(&s))) {
        Err(Error::NonFinite { what, layer, row }) => {
            assert_eq!((what, layer, row), ("keys", 1, 3));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_parameters_name_the_problem() {
    assert!(matches!(
        Policy::parse("lru", &[]),
        Err(Error::UnknownPolicy(n)) if n == "lru"
    ));
    assert!(matches!(
        Policy::parse("snapkv", &["colour=red"]),
        Err(Error::UnknownParam { name, policy, .. }) if name == "colour" && policy == "snapkv"
    ));
    assert!(matches!(
        Policy::parse("gvote", &["ratio=0.5"]),
        Err(Error::UnknownParam { name, .. }) if name == "ratio"
    ));
    for (policy, kv, key) in [
        ("snapkv", "ratio=1.5", "ratio"),
        ("h2o", "ratio=-0.1", "ratio"),
        ("snapkv", "window=-3", "window"),
        ("streaming", "tokens=0", "tokens"),
        ("dbudget", "threshold=0", "threshold"),
        ("dbudget", "threshold=1", "threshold"),
        ("gvote", "p=0", "p"),
        ("gvote", "quorum=2", "quorum"),
        ("adakv", "alpha=1.5", "alpha"),
        ("pyramidkv", "beta=0.5", "beta"),
        ("snapkv", "pool=4", "pool"),
        ("snapkv", "pooling=min", "pooling"),
        ("h2o", "gqa=median", "gqa"),
        ("tova", "granularity=cell", "granularity"),
        ("knorm", "ratio=nan", "ratio"),
    ] {
        match Policy::parse(policy, &[kv]) {
            Err(Error::InvalidParamValue { name, .. }) => assert_eq!(name, key, "{policy} {kv}"),
            other => panic!("{policy} {kv}: {other:?}"),
        }
    }
}

#[test]
fn shape_and_position_errors() {
    let s = shape(1, 2, 1);
    let mut e = ev(s, "streaming", &["tokens=4"]);
    let c = cells(&[0, 2, 1]);
    assert!(matches!(
        e.plan(&input(&c, &[0, 2, 1], 0), None),
        Err(Error::InvalidShape(_))
    ));
    // wrong query length
    assert!(matches!(
        ev(s, "snapkv", &[]).push_queries(SEQ, &[9], &[0.0; 3]),
        Err(Error::InvalidShape(_))
    ));
    // negative query positions (the fuzzer's i32::MIN underflowed the rewind bound)
    for bad in [-1, i32::MIN] {
        let q = queries(&s, &[bad], |_, _, _| [1.0, 0.0]);
        match ev(s, "snapkv", &[]).push_queries(SEQ, &[bad], &q) {
            Err(Error::InvalidShape(m)) => assert!(m.contains("q_pos must be >= 0"), "{m}"),
            r => panic!("q_pos [{bad}]: {r:?}"),
        }
    }
    // attention policies need K
    let pos = range(4);
    let c = cells(&pos);
    assert!(matches!(
        ev(s, "snapkv", &[]).plan(&input(&c, &pos, 0), None),
        Err(Error::NullArgument(_))
    ));
}

/// eval/policies.json is the policy table as `kvcompress::policy::table_json` writes it
/// (regenerate with `cargo run --release --example gen_policies`).
#[test]
fn eval_policy_table_is_current() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("eval/policies.json");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == kvcompress::policy::table_json(),
        "{} is stale: run `cargo run --release --example gen_policies`",
        path.display()
    );
}

// ---------------------------------------------------------------------------------------------
// evict=pressure and KVC_SEQ_FLAG_ROOM: the engine asks for room across resident sequences
// ---------------------------------------------------------------------------------------------

fn view<'a>(
    c: &'a [u32],
    pos: &'a [i32],
    max_cells: usize,
    prompt_end: bool,
    room: bool,
) -> SeqInput<'a> {
    SeqInput {
        seq_id: SEQ,
        cells: c,
        pos,
        max_cells,
        prompt_end,
        room,
    }
}

/// A 16-token prompt whose last two queries attend to a few scattered positions.
fn pressure_toy(s: &Shape) -> (Vec<i32>, OwnedKeys, Vec<i32>, Vec<f32>) {
    let pos = range(16);
    let k = keys(s, &pos, |_, p, _| {
        if p % 3 == 1 {
            [4.0, 0.0]
        } else {
            [0.0, (p % 5) as f32 * 0.3]
        }
    });
    let q_pos = vec![14, 15];
    let q = queries(s, &q_pos, |_, p, h| {
        [1.0 + (p + h as i32) as f32 * 0.1, 0.5]
    });
    (pos, k, q_pos, q)
}

#[test]
fn evict_pressure_defers_the_prompt_verdict_until_room_is_needed() {
    let s = shape(1, 2, 1);
    let params = ["ratio=0.5", "sinks=1", "window=2", "pool=1", "interval=4"];
    let (pos, k, q_pos, q) = pressure_toy(&s);
    let c = cells(&pos);

    // the default: the verdict at the prompt's end
    let mut a = ev(s, "snapkv", &params);
    a.push_queries(SEQ, &q_pos, &q).unwrap();
    assert!(a.due(&view(&c, &pos, 0, true, false)).unwrap());
    let verdict = a
        .plan(&view(&c, &pos, 0, true, false), Some(&k.view(&s)))
        .unwrap();
    assert_eq!(
        verdict.evict.len(),
        8,
        "the toy must evict, or this test proves nothing"
    );

    let mut b = ev(s, "snapkv", &[&params[..], &["evict=pressure"]].concat());
    b.push_queries(SEQ, &q_pos, &q).unwrap();
    // not at the prompt's end, not at the interval
    assert!(!b.due(&view(&c, &pos, 0, true, false)).unwrap());
    let mut held = pos.clone();
    for p in 16..24 {
        held.push(p);
        let ch = cells(&held);
        assert!(
            !b.due(&view(&ch, &held, 0, false, false)).unwrap(),
            "token {p}"
        );
    }
    // room is needed later, no queries arrived since (an idle sequence): the verdict the prompt's
    // end deferred, from the queries the library remembered
    let (c16, p16) = (cells(&pos), pos.clone());
    let mut b = ev(s, "snapkv", &[&params[..], &["evict=pressure"]].concat());
    b.push_queries(SEQ, &q_pos, &q).unwrap();
    assert!(!b.due(&view(&c16, &p16, 0, true, false)).unwrap());
    assert!(b.due(&view(&c16, &p16, 16, false, true)).unwrap());
    let later = b
        .plan(&view(&c16, &p16, 16, false, true), Some(&k.view(&s)))
        .unwrap();
    assert_eq!(later.evict, verdict.evict);
    assert_eq!(
        later.stats.n_keep, later.stats.budget,
        "not squeezed: its own verdict"
    );
    // given, it is not asked again until tokens arrive
    let kept: Vec<i32> = p16
        .iter()
        .copied()
        .filter(|p| !later.evict.contains(&(100 + *p as u32)))
        .collect();
    let ck = cells(&kept);
    assert!(!b.due(&view(&ck, &kept, 8, false, true)).unwrap());
    // over the engine's cap it is squeezed below its budget, and the stats say so
    assert!(b.due(&view(&ck, &kept, 4, false, false)).unwrap());
    let kk = keys(&s, &kept, |_, p, _| {
        if p % 3 == 1 {
            [4.0, 0.0]
        } else {
            [0.0, (p % 5) as f32 * 0.3]
        }
    });
    let sq = b
        .plan(&view(&ck, &kept, 4, false, false), Some(&kk.view(&s)))
        .unwrap();
    assert_eq!(sq.stats.n_keep, 4);
    assert!(
        sq.stats.budget > sq.stats.n_keep,
        "budget {} keep {}",
        sq.stats.budget,
        sq.stats.n_keep
    );
}

#[test]
fn room_on_a_prompt_mode_sequence_gives_only_what_arrived_since_its_last_run() {
    let s = shape(1, 2, 1);
    let (pos, k, q_pos, q) = pressure_toy(&s);
    let c = cells(&pos);
    let mut e = ev(
        s,
        "snapkv",
        &["ratio=0.5", "sinks=1", "window=2", "pool=1", "interval=0"],
    );
    e.push_queries(SEQ, &q_pos, &q).unwrap();
    assert!(e.due(&view(&c, &pos, 0, true, false)).unwrap());
    let plan = e
        .plan(&view(&c, &pos, 0, true, false), Some(&k.view(&s)))
        .unwrap();
    let mut held: Vec<i32> = pos
        .iter()
        .copied()
        .filter(|p| !plan.evict.contains(&(100 + *p as u32)))
        .collect();
    // idle since its verdict: nothing to give
    let ch = cells(&held);
    assert!(!e.due(&view(&ch, &held, held.len(), false, true)).unwrap());
    // decoded tokens since (interval=0: never judged): room asks the policy about them
    // decode steps, one token with logits each
    for p in 16..20 {
        held.push(p);
        let ch = cells(&held);
        assert!(
            !e.due(&view(&ch, &held, 0, true, false)).unwrap(),
            "token {p}"
        );
    }
    let ch = cells(&held);
    assert!(e.due(&view(&ch, &held, held.len(), false, true)).unwrap());
}

#[test]
fn room_does_not_judge_a_prompt_that_is_still_being_fed() {
    let s = shape(1, 2, 1);
    let mut e = ev(s, "snapkv", &["ratio=0.5", "sinks=1", "window=2", "pool=1"]);
    let (pos, _, _, _) = pressure_toy(&s);
    let c = cells(&pos);
    // a chunk without logits: the prompt goes on
    assert!(!e.due(&view(&c, &pos, 0, false, false)).unwrap());
    assert!(!e.due(&view(&c, &pos, 16, false, true)).unwrap());
    // its end: due (prompt mode), and room alone would have been enough
    let mut more = pos.clone();
    more.extend(16..20);
    let cm = cells(&more);
    assert!(e.due(&view(&cm, &more, 20, true, true)).unwrap());
}
