//! Fuzz target for the C ABI's volume views; the check is
//! `checks/volume_view.rs`, which `iris-ffi/tests/fuzz_replay.rs` also runs
//! on the committed corpus.
#![no_main]

#[path = "../checks/volume_view.rs"]
mod volume_view;

libfuzzer_sys::fuzz_target!(|data: &[u8]| volume_view::check(data));
