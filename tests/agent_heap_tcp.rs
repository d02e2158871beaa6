//! Agent heap budget over TCP; see `tests/heap/mod.rs`.

mod common;
mod heap;

#[test]
fn agent_heap_stays_within_budget_while_a_step_writes_one_gib() {
    heap::check(false);
}
