//! Fuzz target for the `.irisemb` reader; the check is `checks/irisemb.rs`,
//! which `iris-core/tests/fuzz_replay.rs` also runs on the committed corpus.
#![no_main]

#[path = "../checks/irisemb.rs"]
mod irisemb;

libfuzzer_sys::fuzz_target!(|data: &[u8]| irisemb::check(data));
