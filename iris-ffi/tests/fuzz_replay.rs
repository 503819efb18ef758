//! The `volume_view` fuzz target runs as an ordinary test: CI has no
//! libFuzzer, so its check (the same code as `fuzz/fuzz_targets/`) runs on
//! the committed corpus, `fuzz/seeds/volume_view/` (seeds and every input a
//! fuzzer once found to fail), and on a fixed set of mutants of each seed.

#[path = "../../fuzz/checks/replay.rs"]
mod replay;

#[path = "../../fuzz/checks/volume_view.rs"]
mod volume_view;

#[test]
fn volume_view_corpus_and_mutants() {
    replay::replay("volume_view", volume_view::check, 300);
}
