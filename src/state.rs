//! Per-sequence memory of the library: recent query rows and carried scores, keyed by position so
//! they survive cells disappearing for reasons the library did not decide (the application
//! removed a range, the server rewound a slot).

use std::collections::VecDeque;

/// One captured query row: every layer's post-RoPE query for one token.
#[derive(Debug, Clone)]
pub struct QueryRow {
    /// position of the token that produced the query
    pub pos: i32,
    /// `[n_layer][n_head * head_dim]`
    pub data: Box<[f32]>,
}

/// Scores carried from one plan to the next (H2O's accumulated attention), aligned to `pos`.
#[derive(Debug, Clone, Default)]
pub struct Carry {
    /// positions the scores belong to, ascending
    pub pos: Vec<i32>,
    /// `[n_unit][pos.len()]`
    pub units: Vec<Vec<f32>>,
}

impl Carry {
    /// Forget the scores of positions above `max_pos`.
    pub fn truncate_after(&mut self, max_pos: i32) {
        let keep = self.pos.partition_point(|&p| p <= max_pos);
        self.pos.truncate(keep);
        self.units.iter_mut().for_each(|u| u.truncate(keep));
    }

    /// Re-align onto the positions held now: scores of vanished positions are dropped, new
    /// positions start at 0.
    pub fn realign(&self, pos: &[i32]) -> Vec<Vec<f32>> {
        self.units
            .iter()
            .map(|old| {
                let mut out = vec![0.0; pos.len()];
                let (mut i, mut j) = (0, 0);
                while i < self.pos.len() && j < pos.len() {
                    match self.pos[i].cmp(&pos[j]) {
                        std::cmp::Ordering::Less => i += 1,
                        std::cmp::Ordering::Greater => j += 1,
                        std::cmp::Ordering::Equal => {
                            out[j] = old[i];
                            i += 1;
                            j += 1;
                        }
                    }
                }
                out
            })
            .collect()
    }
}

/// What the last plan kept, for the finer granularities and for statistics.
#[derive(Debug, Clone, Default)]
pub struct LastPlan {
    /// positions held when the plan ran
    pub pos: Vec<i32>,
    /// per (layer, kv head) keep flags over `pos`, `[n_layer * n_head_kv][pos.len()]`
    pub unit_keep: Vec<Vec<bool>>,
    /// tokens kept per layer (token granularity: the same for every layer)
    pub layer_kept: Vec<u32>,
}

/// Everything the library remembers about one sequence.
#[derive(Debug, Clone)]
pub struct SeqState {
    /// newest query rows, oldest first
    pub ring: VecDeque<QueryRow>,
    /// queries with `pos <= consumed` were already folded into `carry`
    pub consumed: i32,
    /// carried scores
    pub carry: Option<Carry>,
    /// tokens seen (highest position + 1) when the policy last ran
    pub seen_at_last_run: i64,
    /// tokens seen when the policy last applied its own verdict (a prompt end or a decode
    /// interval, not a run that only made room mid-prompt); 0 = never
    pub seen_at_last_verdict: i64,
    /// highest position seen by the previous `due` call
    pub last_max_pos: i32,
    /// what the last plan kept
    pub last: Option<LastPlan>,
    /// the last `due` said yes only because the decode interval was reached
    pub interval_run: bool,
    /// the newest tokens were a prompt chunk without logits: the prompt goes on, its question
    /// is not known yet, so a request for room (`SeqInput::room`) does not run the verdict on it
    pub mid_prompt: bool,
    /// query rows of the engine's reconstruction pass after the prompt's end (`ranker=recon`),
    /// read by the next plan only, then dropped
    pub recon: Vec<QueryRow>,
}

impl Default for SeqState {
    fn default() -> Self {
        SeqState {
            ring: VecDeque::new(),
            consumed: -1,
            carry: None,
            seen_at_last_run: 0,
            seen_at_last_verdict: 0,
            last_max_pos: -1,
            last: None,
            interval_run: false,
            mid_prompt: false,
            recon: Vec::new(),
        }
    }
}

impl SeqState {
    /// Note that a call brings tokens from position `first` on. A position at or below the
    /// newest one known (the newest row, or the newest position `due` saw) means the sequence
    /// was rewound and is being decoded again from there: everything remembered from `first` on
    /// is dropped, and the next `due` counts every held cell as new (the rewind point itself
    /// may lie below `first`). Call it with the lowest position of a call even when only the
    /// newest rows are kept, or a rewind hidden in the dropped rows goes unseen.
    pub fn rewind_if_before(&mut self, first: i32) {
        let newest = self
            .ring
            .back()
            .map_or(self.last_max_pos, |r| r.pos.max(self.last_max_pos));
        if first <= newest {
            self.truncate_after(first - 1);
            self.last_max_pos = -1;
        }
    }

    /// Append query rows (ascending positions), detecting rewinds as
    /// [`rewind_if_before`](Self::rewind_if_before) does; the ring keeps the newest `cap`.
    pub fn push(&mut self, rows: Vec<QueryRow>, cap: usize) {
        for row in rows {
            self.rewind_if_before(row.pos);
            self.ring.push_back(row);
        }
        while self.ring.len() > cap.max(1) {
            self.ring.pop_front();
        }
    }

    /// Append query rows (ascending positions) for a scorer that reads rows spread over the whole
    /// sequence: the ring keeps the rows at multiples of `stride` and the newest `newest`; past
    /// `cap` spread rows, every other one is dropped (oldest first), so memory stays bounded on
    /// any length while the sample still covers the start of the sequence.
    pub fn push_spread(&mut self, rows: Vec<QueryRow>, stride: usize, newest: usize, cap: usize) {
        for row in rows {
            self.rewind_if_before(row.pos);
            self.ring.push_back(row);
        }
        let stride = stride.max(1) as i32;
        let n = self.ring.len();
        let tail = n.saturating_sub(newest);
        let mut i = 0;
        self.ring.retain(|r| {
            i += 1;
            i > tail || r.pos % stride == 0
        });
        let cap = cap.max(1);
        loop {
            let tail = self.ring.len().saturating_sub(newest);
            let spread = self
                .ring
                .iter()
                .take(tail)
                .filter(|r| r.pos % stride == 0)
                .count();
            if spread <= cap {
                break;
            }
            // drop every other spread row: the sample stays even and keeps covering the start
            let (mut i, mut k) = (0, 0);
            self.ring.retain(|r| {
                i += 1;
                if i > tail || r.pos % stride != 0 {
                    return true;
                }
                k += 1;
                k % 2 == 1
            });
        }
    }

    /// Forget what lies beyond `max_pos` (the sequence was truncated).
    pub fn truncate_after(&mut self, max_pos: i32) {
        while self.ring.back().is_some_and(|r| r.pos > max_pos) {
            self.ring.pop_back();
        }
        self.consumed = self.consumed.min(max_pos);
        if let Some(c) = &mut self.carry {
            c.truncate_after(max_pos);
        }
        if self.last_max_pos > max_pos {
            self.last_max_pos = max_pos;
        }
        if self.seen_at_last_run > max_pos as i64 + 1 {
            self.seen_at_last_run = max_pos as i64 + 1;
        }
        if self.seen_at_last_verdict > max_pos as i64 + 1 {
            self.seen_at_last_verdict = max_pos as i64 + 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pos: i32) -> QueryRow {
        QueryRow {
            pos,
            data: vec![pos as f32].into_boxed_slice(),
        }
    }

    #[test]
    fn ring_keeps_newest_and_handles_rewind() {
        let mut s = SeqState::default();
        s.push((0..10).map(row).collect(), 4);
        assert_eq!(
            s.ring.iter().map(|r| r.pos).collect::<Vec<_>>(),
            vec![6, 7, 8, 9]
        );
        s.push(vec![row(7)], 4);
        assert_eq!(s.ring.iter().map(|r| r.pos).collect::<Vec<_>>(), vec![6, 7]);
    }

    #[test]
    fn a_rewind_in_dropped_rows_is_seen_through_the_first_position() {
        let mut s = SeqState::default();
        s.push((0..20).map(row).collect(), 2);
        s.last_max_pos = 19;
        s.seen_at_last_run = 20;
        // the engine re-processes 6..20 but only rows 19 and 20 fit the ring
        s.rewind_if_before(6);
        s.push(vec![row(19), row(20)], 2);
        assert_eq!(s.last_max_pos, -1);
        assert_eq!(s.seen_at_last_run, 6);
        assert_eq!(
            s.ring.iter().map(|r| r.pos).collect::<Vec<_>>(),
            vec![19, 20]
        );
        // an ordinary next token is no rewind
        s.last_max_pos = 20;
        s.rewind_if_before(21);
        assert_eq!(s.last_max_pos, 20);
    }

    #[test]
    fn a_spread_ring_keeps_every_stride_and_the_newest_within_its_cap() {
        let mut s = SeqState::default();
        s.push_spread((0..100).map(row).collect(), 10, 3, 100);
        let pos: Vec<i32> = s.ring.iter().map(|r| r.pos).collect();
        assert_eq!(pos, vec![0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 97, 98, 99]);
        // the next call: the old newest rows that are off the stride go
        s.push_spread((100..105).map(row).collect(), 10, 3, 100);
        let pos: Vec<i32> = s.ring.iter().map(|r| r.pos).collect();
        assert_eq!(
            pos,
            vec![0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 102, 103, 104]
        );
        // over the cap: thinned by halves, the start of the sequence still sampled
        let mut s = SeqState::default();
        s.push_spread((0..1000).map(row).collect(), 1, 2, 100);
        let pos: Vec<i32> = s.ring.iter().map(|r| r.pos).collect();
        assert!(pos.len() <= 102, "{}", pos.len());
        assert_eq!(pos[0], 0);
        assert!(pos[pos.len() - 3] > 900, "{pos:?}");
        assert_eq!(&pos[pos.len() - 2..], &[998, 999]);
    }

    #[test]
    fn carry_realigns_by_position() {
        let c = Carry {
            pos: vec![1, 3, 5],
            units: vec![vec![10.0, 30.0, 50.0]],
        };
        assert_eq!(c.realign(&[0, 3, 5, 6]), vec![vec![0.0, 30.0, 50.0, 0.0]]);
    }
}
