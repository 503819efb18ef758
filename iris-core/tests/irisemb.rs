//! `.irisemb` format and task-embedding maths, tested from the outside.
//!
//! The byte-level tests rely on the layout in `docs/irisemb.md`: magic at
//! 0..8, version at 8..10, header CRC at 28..32 over 0..28, file length at
//! 16..24, file CRC in the last 4 bytes over everything before them.

use iris_core::embedding::{
    ClassEmbedding, ModelFingerprint, Preprocessing, Provenance, StageShape, TaskEmbedding,
    cosine_similarity, top_k,
};
use iris_core::irisemb::{self, Payload};
use iris_core::preprocess::IntensityPolicy;
use iris_core::{Error, FormatError};
use proptest::prelude::*;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/no_std_smoke/fixture.irisemb"
);

fn ct() -> Preprocessing {
    Preprocessing {
        spacing_mm: [1.5, 1.5, 1.5],
        patch: [128, 128, 128],
        intensity: IntensityPolicy::Ct {
            min_hu: -991.0,
            max_hu: 500.0,
        },
    }
}

fn shape(tokens: u32, channels: u32) -> StageShape {
    StageShape { tokens, channels }
}

/// The small embedding committed as the no_std fixture: 2 stages, 2 classes.
fn fixture_embedding() -> TaskEmbedding {
    let shapes = vec![shape(3, 4), shape(3, 2)];
    let values = |seed: f32, n: usize| (0..n).map(|i| seed + i as f32 * 0.125).collect();
    let class = |label, name: &str, provenance, seed| {
        ClassEmbedding::new(
            label,
            name,
            provenance,
            vec![values(seed, 12), values(-seed, 6)],
        )
        .unwrap()
    };
    TaskEmbedding::new(
        ModelFingerprint::new(core::array::from_fn(|i| i as u8)),
        ct(),
        shapes,
        vec![
            class(1, "liver", Provenance::OneShot, 1.0),
            class(2, "spleen", Provenance::Ensemble { references: 3 }, -2.0),
        ],
    )
    .unwrap()
}

fn fixture_bytes() -> Vec<u8> {
    irisemb::write(&fixture_embedding(), Payload::F16).unwrap()
}

/// Recomputes both checksums, so that a deliberately edited field is what
/// the reader reports (as a fuzzer that knows the layout would do).
fn reseal(bytes: &mut [u8]) {
    let h = crc32fast::hash(&bytes[..28]);
    bytes[28..32].copy_from_slice(&h.to_le_bytes());
    let n = bytes.len();
    let f = crc32fast::hash(&bytes[..n - 4]);
    bytes[n - 4..].copy_from_slice(&f.to_le_bytes());
}

fn format_error(bytes: &[u8]) -> FormatError {
    match irisemb::read(bytes) {
        Err(Error::Format(e)) => e,
        other => panic!("expected a format error, got {other:?}"),
    }
}

/// The invalid field a reader names, and the byte offset it gives for it.
fn located(bytes: &[u8]) -> (&'static str, usize) {
    match format_error(bytes) {
        FormatError::InvalidField { field, offset, .. } => (field, offset),
        other => panic!("expected an invalid field, got {other:?}"),
    }
}

/// Offset of the payload (first stage value) of a file written by `irisemb::write`.
fn payload_offset(t: &TaskEmbedding, payload: Payload) -> usize {
    let size = if payload == Payload::F32 { 4 } else { 2 };
    let values: usize = t
        .stage_shapes()
        .iter()
        .map(|s| s.value_count().unwrap())
        .sum();
    fixture_len(t, payload) - 4 - t.classes().len() * values * size
}

fn fixture_len(t: &TaskEmbedding, payload: Payload) -> usize {
    irisemb::write(t, payload).unwrap().len()
}

#[test]
fn fixture_is_in_sync() {
    let bytes = fixture_bytes();
    if std::env::var_os("IRIS_BLESS").is_some() {
        std::fs::write(FIXTURE, &bytes).unwrap();
    }
    let committed = std::fs::read(FIXTURE)
        .expect("fixture missing: run `IRIS_BLESS=1 cargo test -p iris-core --test irisemb`");
    assert_eq!(
        committed, bytes,
        "tests/no_std_smoke/fixture.irisemb is stale: run \
         `IRIS_BLESS=1 cargo test -p iris-core --test irisemb fixture`"
    );
    assert_eq!(irisemb::read(&committed).unwrap(), fixture_embedding());
}

#[test]
fn layout_matches_the_specification() {
    let bytes = fixture_bytes();
    assert_eq!(&bytes[..8], b"IRISEMB\0");
    assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), 1);
    assert_eq!(bytes[10], 2, "f16 payload code");
    let len = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    assert_eq!(len as usize, bytes.len());
    assert_eq!(
        u32::from_le_bytes(bytes[28..32].try_into().unwrap()),
        crc32fast::hash(&bytes[..28])
    );
    let n = bytes.len();
    assert_eq!(
        u32::from_le_bytes(bytes[n - 4..].try_into().unwrap()),
        crc32fast::hash(&bytes[..n - 4])
    );
    assert_eq!(
        &bytes[32..64],
        &core::array::from_fn::<u8, 32, _>(|i| i as u8)
    );
    // 2 classes x (12 + 6) values x 2 bytes, 4-aligned.
    let start = payload_offset(&fixture_embedding(), Payload::F16);
    assert_eq!(start % 4, 0);
    assert_eq!(n - 4 - start, 2 * 18 * 2);
    // First value of class 1, stage 0 is 1.0 = 0x3c00 in f16.
    assert_eq!(&bytes[start..start + 2], &[0x00, 0x3c]);
}

#[test]
fn iris_sized_embedding_has_the_documented_size() {
    let stages = StageShape::IRIS
        .iter()
        .map(|s| vec![0.5; s.value_count().unwrap()])
        .collect();
    let class = ClassEmbedding::new(1, "liver", Provenance::OneShot, stages).unwrap();
    let t = TaskEmbedding::new(
        ModelFingerprint::new([0; 32]),
        ct(),
        StageShape::IRIS.to_vec(),
        vec![class],
    )
    .unwrap();
    // docs/irisemb.md: 32 + 76 + 3*8 + (24 + 5) + 3 padding + 9856 values + 4.
    assert_eq!(fixture_len(&t, Payload::F32), 168 + 9856 * 4);
    assert_eq!(fixture_len(&t, Payload::F16), 168 + 9856 * 2);
}

#[test]
fn every_truncation_is_reported_as_truncated() {
    for payload in [Payload::F32, Payload::F16] {
        let bytes = irisemb::write(&fixture_embedding(), payload).unwrap();
        for n in 0..bytes.len() {
            match format_error(&bytes[..n]) {
                FormatError::Truncated { available, .. } => {
                    assert!(available <= n, "prefix {n}: available {available}")
                }
                other => panic!("prefix of {n} bytes: {other:?}"),
            }
        }
    }
}

#[test]
fn every_single_byte_corruption_is_rejected_with_the_right_error() {
    let bytes = fixture_bytes();
    for i in 0..bytes.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut bad = bytes.clone();
            bad[i] ^= mask;
            let e = format_error(&bad);
            let ok = match i {
                0..8 => matches!(e, FormatError::BadMagic { .. }),
                8..10 => matches!(e, FormatError::UnsupportedVersion { supported: 1, .. }),
                _ => matches!(e, FormatError::ChecksumMismatch { .. }),
            };
            assert!(ok, "byte {i} ^ {mask:#04x}: {e:?}");
            // Every message is readable text.
            assert!(!e.to_string().is_empty());
        }
    }
}

#[test]
fn wrong_version_is_reported_before_the_checksum() {
    let mut bytes = fixture_bytes();
    bytes[8..10].copy_from_slice(&2u16.to_le_bytes());
    // A future version may lay out its checksums differently: even garbage
    // after the version must still say "unsupported version".
    for b in &mut bytes[10..] {
        *b = 0xaa;
    }
    assert_eq!(
        format_error(&bytes),
        FormatError::UnsupportedVersion {
            found: 2,
            supported: 1
        }
    );
    assert!(
        Error::from(format_error(&bytes))
            .to_string()
            .contains("version 2")
    );
}

#[test]
fn foreign_file_and_trailing_bytes() {
    assert!(matches!(
        format_error(b"\x89PNG\r\n\x1a\n and more"),
        FormatError::BadMagic { .. }
    ));
    let mut bytes = fixture_bytes();
    bytes.push(0);
    assert_eq!(
        format_error(&bytes),
        FormatError::TrailingBytes {
            offset: bytes.len() - 1,
            extra: 1
        }
    );
}

/// `read_file` reads no more than the header declares: an endless device
/// is refused after its first bytes, a header claiming more than the file
/// holds is a truncated file, and extra bytes after the declared end are
/// counted, as `read` does on a slice.
#[test]
fn files_are_read_no_further_than_their_header_declares() {
    let read_file_error = |path: &std::path::Path| match irisemb::read_file(path) {
        Err(Error::Format(e)) => e,
        other => panic!("expected a format error, got {other:?}"),
    };
    let zero = std::path::Path::new("/dev/zero");
    if zero.exists() {
        assert!(matches!(
            read_file_error(zero),
            FormatError::BadMagic { .. }
        ));
    }
    let dir = std::env::temp_dir().join(format!("irisemb-bounded-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("task.irisemb");
    let bytes = fixture_bytes();
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(irisemb::read_file(&path).unwrap(), fixture_embedding());

    let mut claims_more = bytes.clone();
    claims_more[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    reseal(&mut claims_more);
    std::fs::write(&path, &claims_more).unwrap();
    assert!(matches!(
        read_file_error(&path),
        FormatError::Truncated {
            section: "file",
            ..
        }
    ));

    let mut trailing = bytes.clone();
    trailing.extend([0; 5]);
    std::fs::write(&path, &trailing).unwrap();
    assert_eq!(
        read_file_error(&path),
        FormatError::TrailingBytes {
            offset: bytes.len(),
            extra: 5
        }
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn wrong_model_is_a_model_mismatch() {
    let bytes = fixture_bytes();
    let right = ModelFingerprint::new(core::array::from_fn(|i| i as u8));
    assert!(irisemb::read_for_model(&bytes, &right).is_ok());
    let wrong = ModelFingerprint::new([0xee; 32]);
    match irisemb::read_for_model(&bytes, &wrong) {
        Err(Error::ModelMismatch { expected, found }) => {
            assert_eq!(expected, "ee".repeat(32));
            assert_eq!(found, right.to_string());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn invalid_fields_with_valid_checksums_are_named() {
    let base = fixture_bytes();
    let t = fixture_embedding();
    let edit = |at: usize, new: &[u8]| {
        let mut b = base.clone();
        b[at..at + new.len()].copy_from_slice(new);
        reseal(&mut b);
        b
    };
    // Header and preprocessing.
    assert_eq!(located(&edit(10, &[3])), ("payload type", 10));
    assert_eq!(located(&edit(11, &[1])), ("reserved", 11));
    assert_eq!(located(&edit(16, &8u64.to_le_bytes())), ("file length", 16));
    assert_eq!(
        located(&edit(64, &f32::NAN.to_le_bytes())),
        ("spacing_mm", 64)
    );
    assert_eq!(
        located(&edit(64, &(-1f32).to_le_bytes())),
        ("spacing_mm", 64)
    );
    assert_eq!(located(&edit(76, &0u32.to_le_bytes())), ("patch", 76));
    assert_eq!(located(&edit(88, &[9])), ("intensity kind", 88));
    assert_eq!(located(&edit(92, &600f32.to_le_bytes())), ("intensity", 92));
    // Counts (stage count at 100, class count at 104).
    assert_eq!(
        located(&edit(100, &0u32.to_le_bytes())),
        ("stage count", 100)
    );
    assert_eq!(
        located(&edit(100, &u32::MAX.to_le_bytes())),
        ("stage count", 100)
    );
    assert_eq!(
        located(&edit(104, &0u32.to_le_bytes())),
        ("class count", 104)
    );
    assert_eq!(
        located(&edit(104, &u32::MAX.to_le_bytes())),
        ("class count", 104)
    );
    // A large but allowed class count is refused before any allocation.
    assert!(matches!(
        format_error(&edit(104, &60_000u32.to_le_bytes())),
        FormatError::Truncated {
            section: "class table",
            ..
        }
    ));
    // Stage shapes at 108: zero tokens, and a product beyond the limit.
    assert_eq!(
        located(&edit(108, &0u32.to_le_bytes())),
        ("stage shape", 108)
    );
    assert_eq!(
        located(&edit(
            108,
            &[u32::MAX.to_le_bytes(), u32::MAX.to_le_bytes()].concat()
        )),
        ("stage shape", 108)
    );
    // Class table at 124: label, provenance kind, provenance values, name length, name.
    assert_eq!(located(&edit(128, &[7])), ("provenance", 128));
    // A value that does not fit its kind names the provenance field (kind first).
    assert_eq!(
        located(&edit(132, &5u64.to_le_bytes())),
        ("provenance", 128)
    );
    assert_eq!(
        located(&edit(144, &4096u32.to_le_bytes())),
        ("class name length", 144)
    );
    assert_eq!(located(&edit(148, &[0xff])), ("class name", 148));
    // Both classes with label 1: the second entry (after "liver") is named.
    let second = 124 + 24 + 5;
    assert_eq!(
        located(&edit(second, &1u32.to_le_bytes())),
        ("class label", second)
    );
    // Payload: NaN and infinity in f16.
    let p = payload_offset(&t, Payload::F16);
    assert_eq!(located(&edit(p, &[0x00, 0x7e])), ("payload", p));
    assert_eq!(located(&edit(p + 2, &[0x00, 0x7c])), ("payload", p + 2));
}

#[test]
fn f16_overflow_is_refused_on_write() {
    let class = ClassEmbedding::new(1, "x", Provenance::OneShot, vec![vec![1e5]]).unwrap();
    let t = TaskEmbedding::new(
        ModelFingerprint::new([0; 32]),
        ct(),
        vec![shape(1, 1)],
        vec![class],
    )
    .unwrap();
    assert!(irisemb::write(&t, Payload::F16).is_err());
    let back = irisemb::read(&irisemb::write(&t, Payload::F32).unwrap()).unwrap();
    assert_eq!(back, t);
}

/// A bank of `n` classes of the released model's shape, label `10 + i`.
fn memory_bank(n: u32) -> TaskEmbedding {
    let classes = (0..n)
        .map(|i| {
            let stages = StageShape::IRIS
                .iter()
                .enumerate()
                .map(|(s, sh)| {
                    (0..sh.value_count().unwrap())
                        .map(|j| ((i as usize * 31 + s * 7 + j) % 97) as f32 / 97.0 - 0.5)
                        .collect()
                })
                .collect();
            let provenance = Provenance::MemoryBank {
                updates: u64::from(i) * 1000,
                momentum: 0.99,
            };
            ClassEmbedding::new(10 + i, format!("class-{i}-é"), provenance, stages).unwrap()
        })
        .collect();
    TaskEmbedding::new(
        ModelFingerprint::new([5; 32]),
        ct(),
        StageShape::IRIS.to_vec(),
        classes,
    )
    .unwrap()
}

#[test]
fn memory_bank_round_trips_and_selects() {
    let bank = memory_bank(73);
    let bytes = irisemb::write(&bank, Payload::F32).unwrap();
    let back = irisemb::read(&bytes).unwrap();
    assert_eq!(back, bank);
    let picked = back.select_labels(&[50, 12]).unwrap();
    assert_eq!(picked.classes().len(), 2);
    assert_eq!(picked.classes()[0], *bank.class(50).unwrap());
    assert_eq!(picked.classes()[1].name(), "class-2-é");
    let by_name = back.select_names(&["class-40-é"]).unwrap();
    assert_eq!(by_name.classes()[0].label(), 50);
    let err = back.select_labels(&[3]).unwrap_err().to_string();
    assert!(
        err.contains("label 3") && err.contains("10 (\"class-0-é\")") && err.contains("41 more"),
        "{err}"
    );
}

#[test]
fn merged_files_round_trip() {
    let bank = memory_bank(4);
    let a = bank.select_labels(&[10, 11]).unwrap();
    let b = bank.select_labels(&[12, 13]).unwrap();
    let merged = a.merge(b).unwrap();
    assert_eq!(merged, bank);
    assert_eq!(
        irisemb::read(&irisemb::write(&merged, Payload::F32).unwrap()).unwrap(),
        bank
    );
}

#[test]
fn files_are_written_atomically() {
    let dir = std::env::temp_dir().join(format!("irisemb-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("task.irisemb");
    std::fs::write(&path, b"old contents").unwrap();
    irisemb::write_file(&path, &fixture_embedding(), Payload::F32).unwrap();
    assert_eq!(irisemb::read_file(&path).unwrap(), fixture_embedding());
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["task.irisemb"], "no temporary file left behind");
    let missing = dir.join("no-such-dir").join("task.irisemb");
    assert!(matches!(
        irisemb::write_file(&missing, &fixture_embedding(), Payload::F32),
        Err(Error::Io { .. })
    ));
    assert!(matches!(
        irisemb::read_file(&missing),
        Err(Error::Io { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

fn arb_provenance() -> impl Strategy<Value = Provenance> {
    prop_oneof![
        Just(Provenance::OneShot),
        (1u32..).prop_map(|references| Provenance::Ensemble { references }),
        (any::<u64>(), 0f32..=1.0)
            .prop_map(|(updates, momentum)| Provenance::MemoryBank { updates, momentum }),
        (any::<u32>(), 1u32..)
            .prop_map(|(steps, references)| Provenance::Tuned { steps, references }),
    ]
}

fn arb_preprocessing() -> impl Strategy<Value = Preprocessing> {
    let intensity = prop_oneof![
        (-2000f32..0.0, 0f32..3000.0)
            .prop_map(|(min_hu, max_hu)| IntensityPolicy::Ct { min_hu, max_hu }),
        (0f32..50.0, 50.5f32..=100.0)
            .prop_map(|(low, high)| IntensityPolicy::Percentile { low, high }),
    ];
    (
        prop::array::uniform3(0.1f32..10.0),
        prop::array::uniform3(1u32..512),
        intensity,
    )
        .prop_map(|(spacing_mm, patch, intensity)| Preprocessing {
            spacing_mm,
            patch,
            intensity,
        })
}

/// Random valid embeddings: 1-3 stages, 1-4 classes with distinct labels.
fn arb_task() -> impl Strategy<Value = TaskEmbedding> {
    let shapes = prop::collection::vec((1u32..4, 1u32..5), 1..4);
    (shapes, 1usize..5, any::<[u8; 32]>(), arb_preprocessing()).prop_flat_map(
        |(shapes, n_classes, fp, pre)| {
            let lens: Vec<usize> = shapes.iter().map(|&(t, c)| (t * c) as usize).collect();
            let stages = lens
                .iter()
                .map(|&n| prop::collection::vec(-1000f32..1000.0, n))
                .collect::<Vec<_>>();
            let class = (any::<u32>(), "\\PC{0,12}", arb_provenance(), stages);
            prop::collection::vec(class, n_classes).prop_filter_map(
                "labels must be distinct",
                move |classes| {
                    let classes = classes
                        .into_iter()
                        .map(|(l, n, p, s)| ClassEmbedding::new(l, n, p, s).unwrap())
                        .collect();
                    let shapes = shapes.iter().map(|&(t, c)| shape(t, c)).collect();
                    TaskEmbedding::new(ModelFingerprint::new(fp), pre, shapes, classes).ok()
                },
            )
        },
    )
}

proptest! {
    #[test]
    fn f32_round_trip_is_exact(t in arb_task()) {
        let back = irisemb::read(&irisemb::write(&t, Payload::F32).unwrap()).unwrap();
        prop_assert_eq!(back, t);
    }

    #[test]
    fn f16_round_trip_is_within_half_precision(t in arb_task()) {
        let back = irisemb::read(&irisemb::write(&t, Payload::F16).unwrap()).unwrap();
        prop_assert_eq!(back.model(), t.model());
        prop_assert_eq!(back.preprocessing(), t.preprocessing());
        prop_assert_eq!(back.stage_shapes(), t.stage_shapes());
        for (b, a) in back.classes().iter().zip(t.classes()) {
            prop_assert_eq!((b.label(), b.name(), b.provenance()), (a.label(), a.name(), a.provenance()));
            for (x, y) in b.stages().iter().flatten().zip(a.stages().iter().flatten()) {
                // Round to nearest with an 11-bit significand; 2^-25 below the normal range.
                let tolerance = y.abs() * 2f32.powi(-11) + 2f32.powi(-25);
                prop_assert!((x - y).abs() <= tolerance, "{} vs {}", x, y);
            }
        }
    }

    #[test]
    fn resealed_random_edits_never_panic(
        t in arb_task(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        // Edits with checksums repaired reach the field parser; any result is
        // fine except a panic, and a success must be a valid embedding again.
        let mut bytes = irisemb::write(&t, Payload::F32).unwrap();
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        reseal(&mut bytes);
        if let Ok(back) = irisemb::read(&bytes) {
            let again = irisemb::read(&irisemb::write(&back, Payload::F32).unwrap()).unwrap();
            prop_assert_eq!(again, back);
        }
    }

    #[test]
    fn ensemble_equals_the_weighted_mean_of_references(
        refs in prop::collection::vec(prop::collection::vec(-10f32..10.0, 6), 2..7),
        split in any::<prop::sample::Index>(),
    ) {
        // Ensemble the first k references, then merge with the others one by
        // one: the result must be the plain mean of all references.
        let k = 1 + split.index(refs.len() - 1);
        let one = |v: &Vec<f32>| task_of(Provenance::OneShot, v.clone());
        let head = TaskEmbedding::ensemble(&refs[..k].iter().map(one).collect::<Vec<_>>()).unwrap();
        let mut parts = vec![head];
        parts.extend(refs[k..].iter().map(one));
        let all = TaskEmbedding::ensemble(&parts).unwrap();
        let class = &all.classes()[0];
        prop_assert_eq!(class.provenance(), Provenance::Ensemble { references: refs.len() as u32 });
        for (j, got) in class.stages()[0].iter().enumerate() {
            let mean = refs.iter().map(|r| f64::from(r[j])).sum::<f64>() / refs.len() as f64;
            prop_assert!((f64::from(*got) - mean).abs() <= 1e-5, "{} vs {}", got, mean);
        }
    }

    #[test]
    fn ema_matches_the_recurrence(
        start in prop::collection::vec(-10f32..10.0, 6),
        steps in prop::collection::vec(prop::collection::vec(-10f32..10.0, 6), 1..6),
        a in 0f32..=1.0,
    ) {
        let mut bank = task_of(Provenance::OneShot, start.clone());
        let mut expected: Vec<f64> = start.iter().map(|&v| f64::from(v)).collect();
        for step in &steps {
            bank.ema_update(&task_of(Provenance::OneShot, step.clone()), a).unwrap();
            for (e, &n) in expected.iter_mut().zip(step) {
                *e = f64::from(a) * *e + (1.0 - f64::from(a)) * f64::from(n);
            }
        }
        let class = &bank.classes()[0];
        prop_assert_eq!(class.provenance(), Provenance::MemoryBank { updates: steps.len() as u64, momentum: a });
        for (got, want) in class.stages()[0].iter().zip(&expected) {
            prop_assert!((f64::from(*got) - want).abs() <= 1e-4, "{} vs {}", got, want);
        }
    }

    #[test]
    fn cosine_of_vectors_at_a_known_angle(theta in 0f64..std::f64::consts::PI, r1 in 0.01f32..100.0, r2 in 0.01f32..100.0) {
        // a = r1 (cos t, sin t, 0), b = r2 (1, 0, 0): cosine is cos t.
        let a = [r1 * theta.cos() as f32, r1 * theta.sin() as f32, 0.0];
        let b = [r2, 0.0, 0.0];
        let c = cosine_similarity(&a, &b).unwrap();
        prop_assert!((f64::from(c) - theta.cos()).abs() < 1e-6);
    }
}

/// A one-class, one-stage (`[2, 3]`) task embedding holding `values`.
fn task_of(provenance: Provenance, values: Vec<f32>) -> TaskEmbedding {
    let class = ClassEmbedding::new(4, "kidney", provenance, vec![values]).unwrap();
    TaskEmbedding::new(
        ModelFingerprint::new([8; 32]),
        ct(),
        vec![shape(2, 3)],
        vec![class],
    )
    .unwrap()
}

#[test]
fn top_k_orders_by_angle_keeps_ties_and_handles_edge_cases() {
    // Query along x; pool entries at known angles (degrees), one zero vector,
    // and two entries at the same angle (a tie).
    let class = |label, v: [f32; 2]| {
        ClassEmbedding::new(label, "", Provenance::OneShot, vec![v.to_vec()]).unwrap()
    };
    let at = |label, deg: f32, r: f32| {
        let t = deg.to_radians();
        class(label, [r * t.cos(), r * t.sin()])
    };
    let query = class(0, [3.0, 0.0]);
    let pool = [
        at(1, 80.0, 1.0),
        at(2, 10.0, 5.0),
        class(3, [0.0, 0.0]),
        at(4, 170.0, 2.0),
        class(5, [1.0, 1.0]),
        class(6, [1.0, -1.0]),
    ];
    let got = top_k(&query, &pool, 4).unwrap();
    let order: Vec<usize> = got.iter().map(|r| r.index).collect();
    assert_eq!(
        order,
        [1, 4, 5, 0],
        "10°, then the ±45° tie in pool order, then 80°"
    );
    assert!((got[0].similarity - 10f32.to_radians().cos()).abs() < 1e-6);
    assert_eq!(got[1].similarity, got[2].similarity);
    let all = top_k(&query, &pool, 100).unwrap();
    assert_eq!(all.len(), pool.len());
    assert_eq!(
        all[4].index, 2,
        "the zero vector scores 0, between 80° and 170°"
    );
    assert_eq!(all[4].similarity, 0.0);
    assert_eq!(all[5].index, 3);
    assert!(all.iter().all(|r| r.similarity.is_finite()));
    assert!(top_k(&query, &pool, 0).unwrap().is_empty());
    assert!(top_k(&query, &pool[..0], 3).unwrap().is_empty());
    let wrong = ClassEmbedding::new(9, "", Provenance::OneShot, vec![vec![1.0; 3]]).unwrap();
    assert!(matches!(
        top_k(&query, [&wrong], 1),
        Err(Error::ShapeMismatch { .. })
    ));
}
