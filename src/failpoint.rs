//! A failpoint for tests of hosts: `KVC_FAILPOINT=plan:N` makes the N-th plan call of the process
//! (counted from 1, over every evictor) panic before it reads or changes anything, so the C
//! boundary returns `KVC_STATUS_PANIC` with the message "kvc failpoint: ..." and the evictor stays
//! usable. The variable is read once, at the first plan call. Meant for tests of error handling in
//! engines (a policy that fails mid-generation); never set it in production.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The N of `KVC_FAILPOINT=plan:N`, or None.
fn plan_target() -> Option<u64> {
    static TARGET: OnceLock<Option<u64>> = OnceLock::new();
    *TARGET.get_or_init(|| parse(&std::env::var("KVC_FAILPOINT").ok()?))
}

fn parse(v: &str) -> Option<u64> {
    v.strip_prefix("plan:")?
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|&n| n > 0)
}

/// Count one plan call; panic if it is the one `KVC_FAILPOINT` names.
pub(crate) fn plan() {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let Some(target) = plan_target() else {
        return;
    };
    let n = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
    if n == target {
        panic!("kvc failpoint: plan call {n} fails (KVC_FAILPOINT=plan:{target}, for tests)");
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn parses_plan_n() {
        assert_eq!(parse("plan:3"), Some(3));
        assert_eq!(parse("plan: 12"), Some(12));
        assert_eq!(parse("plan:0"), None);
        assert_eq!(parse("plan:x"), None);
        assert_eq!(parse("due:1"), None);
        assert_eq!(parse(""), None);
    }
}
