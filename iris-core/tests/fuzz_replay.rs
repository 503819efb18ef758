//! The fuzz targets of iris-core run as ordinary tests: CI has no libFuzzer,
//! so each target's check (the same code as `fuzz/fuzz_targets/`) runs on
//! its committed corpus, `fuzz/seeds/<target>/` (seeds and every input a
//! fuzzer once found to fail), and on a fixed set of mutants of each seed.

#[path = "../../fuzz/checks/replay.rs"]
mod replay;

#[path = "../../fuzz/checks/irisemb.rs"]
mod irisemb;

#[path = "../../fuzz/checks/nifti_header.rs"]
mod nifti_header;

#[path = "../../fuzz/checks/nifti_gzip.rs"]
mod nifti_gzip;

#[test]
fn irisemb_corpus_and_mutants() {
    let runs = replay::replay("irisemb", irisemb::check, 2000);
    assert!(runs > 8000, "{runs}");
}

#[test]
fn nifti_header_corpus_and_mutants() {
    replay::replay("nifti_header", nifti_header::check, 500);
}

#[test]
fn nifti_gzip_corpus_and_mutants() {
    replay::replay("nifti_gzip", nifti_gzip::check, 500);
}

/// The committed gzip corpus holds both sides of the check: streams the
/// reader must read (several members, header fields, extra data) and
/// streams it must refuse (a wrong CRC or length, a cut, a flipped bit,
/// garbage after the last member), so a reader that accepted everything, or
/// nothing, fails here and not only under the fuzzer.
#[test]
fn nifti_gzip_corpus_holds_streams_to_read_and_to_refuse() {
    let refused = [
        "cut_trailer",
        "delete_in_member",
        "flip_crc",
        "flip_deflate",
        "insert_in_member",
        "isize_plus_one",
        "reserved_flag",
        "stored_byte_set",
        "trailing_garbage",
        "zero_crc",
    ];
    for (path, bytes) in replay::seeds("nifti_gzip") {
        let name = path.file_name().expect("a file name").to_string_lossy();
        let (base, gz) = nifti_gzip::stream(&bytes);
        let decoded = iris_core::nifti::decode_bytes(&gz);
        if refused.contains(&name.as_ref()) {
            assert!(decoded.is_err(), "{name} was read");
        } else {
            let want = iris_core::nifti::decode_bytes(base)
                .expect("a base decodes")
                .0;
            assert_eq!(decoded.expect(&name).0, want, "{name}");
        }
    }
}
