//! Plans of every policy over a deterministic corpus, as text: a refactoring of the pipeline
//! must leave them bit-identical. `KVC_PLAN_DUMP=/path cargo test --release --test plan_corpus`
//! writes the dump; without the variable the test only checks that the corpus runs.

mod common;

use common::{evictor, gen_case, kept_flags, Case, PATTERNS};
use kvcompress::{OwnedKeys, Shape, POLICY_NAMES};
use std::fmt::Write;

/// The rows `idx` of the case's cells, as their own key buffer.
fn sub_keys(c: &Case, idx: &[usize]) -> OwnedKeys {
    let s = c.shape;
    let row = s.n_head_kv * s.head_dim;
    let n = c.pos.len();
    let mut data = Vec::with_capacity(s.n_layer * idx.len() * row);
    for l in 0..s.n_layer {
        for &i in idx {
            let off = (l * n + i) * row;
            data.extend_from_slice(&c.keys.data[off..off + row]);
        }
    }
    OwnedKeys::new(&s, idx.len(), data).unwrap()
}

fn param_sets(name: &str) -> Vec<Vec<String>> {
    if name == "none" {
        return vec![vec![]];
    }
    let fixed = !matches!(name, "dbudget" | "gvote");
    let mut v: Vec<Vec<String>> = vec![
        vec![],
        vec!["granularity=layer".into()],
        vec!["granularity=head".into()],
        vec!["sinks=1".into(), "window=2".into(), "interval=1".into()],
    ];
    if fixed {
        v.push(vec!["tokens=6".into(), "interval=2".into()]);
        v.push(vec!["ratio=0.8".into(), "granularity=head".into()]);
    }
    match name {
        "dbudget" => {
            v.push(vec!["ranker=position".into()]);
            v.push(vec!["threshold=0.2".into(), "pool=1".into()]);
        }
        "gvote" => {
            v.push(vec!["quorum=0".into(), "seed=3".into()]);
            v.push(vec!["samples=2".into(), "p=0.5".into()]);
        }
        "h2o" => v.push(vec!["gqa=max".into(), "window=4".into()]),
        "snapkv" | "pyramidkv" | "dynamickv" | "adakv" => {
            v.push(vec!["pool=3".into(), "pooling=avg".into()]);
            if name == "adakv" {
                v.push(vec!["layers=pyramid".into(), "alpha=0.5".into()]);
            }
        }
        _ => {}
    }
    v
}

#[test]
fn plan_corpus() {
    let mut out = String::new();
    let shapes = [(1, 1, 1, 4), (2, 4, 2, 4), (3, 6, 2, 2), (2, 2, 1, 8)];
    for name in POLICY_NAMES {
        for params in param_sets(name) {
            let p: Vec<&str> = params.iter().map(String::as_str).collect();
            for (si, &(l, h, kv, d)) in shapes.iter().enumerate() {
                let shape = Shape::new(l, h, kv, d, 0.0).unwrap();
                for (pi, &pat) in PATTERNS.iter().enumerate() {
                    for seed in 0..3u64 {
                        for &cap in &[0usize, 9] {
                            let n = 6 + (seed as usize * 11 + si * 5) % 30;
                            let c = gen_case(shape, n, 1 + seed as usize * 3, pat, seed * 31 + 7);
                            let _ = writeln!(
                                out,
                                "# {name} {params:?} shape{si} pat{pi} seed{seed} cap{cap} n{n}"
                            );
                            run_case(&mut out, &c, name, &p, cap);
                        }
                    }
                }
            }
        }
    }
    if let Ok(path) = std::env::var("KVC_PLAN_DUMP") {
        std::fs::write(path, out).unwrap();
    }
}

/// Prompt on all but the last 3 cells, then a decode step that adds them one row of queries
/// at a time (due + plan where due).
fn run_case(out: &mut String, c: &Case, name: &str, p: &[&str], cap: usize) {
    let mut ev = evictor(c.shape, name, p, 2);
    let n = c.pos.len();
    let m = n - 3.min(n - 1);
    let idx: Vec<usize> = (0..m).collect();
    let keys = sub_keys(c, &idx);
    let (qp, q) = c.last_queries(8);
    // queries at or before the prompt's end only
    let nq = qp.iter().filter(|&&x| x <= c.pos[m - 1]).count();
    let row = c.shape.q_row_len();
    let all = qp.len();
    let mut qq = Vec::new();
    for l in 0..c.shape.n_layer {
        qq.extend_from_slice(&q[l * all * row..(l * all + nq) * row]);
    }
    ev.push_queries(7, &qp[..nq], &qq).unwrap();
    let view = kvcompress::SeqInput {
        seq_id: 7,
        cells: &c.cells[..m],
        pos: &c.pos[..m],
        max_cells: cap,
        prompt_end: true,
        room: false,
    };
    let due = ev.due(&view).unwrap();
    let plan = ev.plan(&view, Some(&keys.view(&c.shape))).unwrap();
    let _ = writeln!(out, "p due={due} {:?} {:?}", plan.evict, plan.stats);
    let _ = writeln!(out, "  layer_kept {:?}", ev.layer_kept(7));
    for li in 0..c.shape.n_layer {
        for g in 0..c.shape.n_head_kv {
            let _ = writeln!(out, "  uk {li} {g} {:?}", ev.unit_keep(7, li, g));
        }
    }
    let keep = kept_flags(&c.cells[..m], &plan);
    let mut held: Vec<usize> = (0..m).filter(|&i| keep[i]).collect();
    for i in m..n {
        held.push(i);
        let keys = sub_keys(c, &held);
        let cells: Vec<u32> = held.iter().map(|&i| c.cells[i]).collect();
        let pos: Vec<i32> = held.iter().map(|&i| c.pos[i]).collect();
        // one query row at the new position: the newest captured row, reused
        let mut q1 = Vec::new();
        for l in 0..c.shape.n_layer {
            q1.extend_from_slice(&q[(l * all + all - 1) * row..(l * all + all) * row]);
        }
        ev.push_queries(7, &[c.pos[i]], &q1).unwrap();
        let view = kvcompress::SeqInput {
            seq_id: 7,
            cells: &cells,
            pos: &pos,
            max_cells: cap,
            prompt_end: false,
            room: false,
        };
        let due = ev.due(&view).unwrap();
        if !due {
            let _ = writeln!(out, "d {i} not due");
            continue;
        }
        let plan = ev.plan(&view, Some(&keys.view(&c.shape))).unwrap();
        let _ = writeln!(out, "d {i} {:?} {:?}", plan.evict, plan.stats);
        let _ = writeln!(out, "  layer_kept {:?}", ev.layer_kept(7));
        let kf = kept_flags(&cells, &plan);
        held = held
            .iter()
            .zip(&kf)
            .filter(|(_, &k)| k)
            .map(|(&i, _)| i)
            .collect();
    }
}

/// llama.cpp hands over queries already multiplied by the attention's scale and says kq_scale = 1
/// (patch 0014: gemma3 scales Q itself, so the library's 1/sqrt(head_dim) scaled it twice). Where
/// the scale is a power of two (SmolLM2: 1/8) the products are the same bit for bit, so every
/// policy must plan exactly as it did with unscaled queries and the default scale.
#[test]
fn prescaled_queries_plan_identically() {
    for name in POLICY_NAMES {
        for params in param_sets(name) {
            let p: Vec<&str> = params.iter().map(String::as_str).collect();
            for &(l, h, kv, d) in &[(2, 4, 2, 4), (2, 2, 1, 16)] {
                let scale = 1.0 / (d as f32).sqrt();
                let default = Shape::new(l, h, kv, d, 0.0).unwrap();
                let given = Shape::new(l, h, kv, d, 1.0).unwrap();
                for (pi, &pat) in PATTERNS.iter().enumerate() {
                    for seed in 0..2u64 {
                        let n = 8 + seed as usize * 13;
                        let a = gen_case(default, n, 4, pat, seed * 17 + 5);
                        let mut b = gen_case(given, n, 4, pat, seed * 17 + 5);
                        b.q.iter_mut().for_each(|x| *x *= scale);
                        let (mut pa, mut pb) = (String::new(), String::new());
                        run_case(&mut pa, &a, name, &p, 0);
                        run_case(&mut pb, &b, name, &p, 0);
                        assert_eq!(pa, pb, "{name} {params:?} d={d} pat{pi} seed{seed}");
                    }
                }
            }
        }
    }
}
