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
///
/// The seeds that edit a member's header or trailer are refused whatever
/// deflate encoder made the stream. Edits inside the deflate data land on
/// bytes that depend on flate2's backend, which follows the features of the
/// whole build (miniz_oxide alone, zlib-rs in the workspace): there the
/// independent check decides, and the reader must agree with it.
#[test]
fn nifti_gzip_corpus_holds_streams_to_read_and_to_refuse() {
    let framing = [
        "cut_trailer",
        "flip_crc",
        "isize_plus_one",
        "reserved_flag",
        "trailing_garbage",
        "zero_crc",
    ];
    let (mut read, mut refused_in_data) = (0, 0);
    for (path, bytes) in replay::seeds("nifti_gzip") {
        let name = path.file_name().expect("a file name").to_string_lossy();
        let (_, gz) = nifti_gzip::stream(&bytes);
        let verdict = nifti_gzip::gunzip_checked(&gz);
        if framing.contains(&name.as_ref()) {
            assert!(verdict.is_none(), "{name}: the independent check read it");
            assert!(
                iris_core::nifti::decode_bytes(&gz).is_err(),
                "{name} was read"
            );
            continue;
        }
        // The reader reads exactly what the independent check accepts, to
        // the voxels of the file inside.
        nifti_gzip::check(&bytes);
        match verdict {
            Some(_) => read += 1,
            None => refused_in_data += 1,
        }
    }
    assert!(read >= 5, "{read} seeds the reader must read");
    assert!(
        refused_in_data >= 1,
        "no seed with damaged deflate data to refuse"
    );
}
