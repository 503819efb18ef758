//! Fuzz target for the gzip path of the NIfTI reader; the check is
//! `checks/nifti_gzip.rs`, which `iris-core/tests/fuzz_replay.rs` also runs
//! on the committed corpus.
#![no_main]

#[path = "../checks/nifti_gzip.rs"]
mod nifti_gzip;

libfuzzer_sys::fuzz_target!(|data: &[u8]| nifti_gzip::check(data));
