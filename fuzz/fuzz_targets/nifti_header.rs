//! Fuzz target for NIfTI-1 parsing from memory; the check is
//! `checks/nifti_header.rs`, which `iris-core/tests/fuzz_replay.rs` also runs
//! on the committed corpus.
#![no_main]

#[path = "../checks/nifti_header.rs"]
mod nifti_header;

libfuzzer_sys::fuzz_target!(|data: &[u8]| nifti_header::check(data));
