//! The C ABI called from Rust, through the exported functions themselves:
//! every error path answers with its status and a message, and nothing
//! crashes. (tests/c/abi_errors.c repeats the essentials through the real
//! shared library.)

use core::ffi::{CStr, c_char, c_void};
use core::ptr::{null, null_mut};
use std::ffi::CString;
use std::sync::{Arc, Barrier};

use iris_core::embedding::{
    ClassEmbedding, ModelFingerprint, Preprocessing, Provenance, StageShape, TaskEmbedding,
};
use iris_core::irisemb::{self, Payload};
use iris_core::preprocess::IntensityPolicy;

use super::*;
use crate::status::{Failure, guard};

#[path = "../tests/common/mod.rs"]
mod common;

use common::{expect, last_error};

/// A task of two classes (labels 1 "liver", 2 "spleen") made by `model`.
fn embedding(model: u8) -> TaskEmbedding {
    let shapes = vec![StageShape {
        tokens: 3,
        channels: 2,
    }];
    let class = |label: u32, name: &str, x: f32| {
        ClassEmbedding::new(label, name, Provenance::OneShot, vec![vec![x; 6]]).expect("valid")
    };
    TaskEmbedding::new(
        ModelFingerprint::new([model; 32]),
        Preprocessing {
            spacing_mm: [1.5; 3],
            patch: [32; 3],
            intensity: IntensityPolicy::CT,
        },
        shapes,
        vec![class(1, "liver", 1.0), class(2, "spleen", 3.0)],
    )
    .expect("valid")
}

/// Hands `embedding` to C through its `.irisemb` bytes.
fn task(embedding: &TaskEmbedding) -> *mut IrisTask {
    let bytes = irisemb::write(embedding, Payload::F32).expect("writable");
    let mut out = null_mut();
    // SAFETY: valid buffer and out-pointer.
    let status = unsafe { iris_task_load_buffer(bytes.as_ptr(), bytes.len(), &mut out) };
    expect(status, IrisStatus::IrisOk, &[]);
    out
}

fn free_task(mut t: *mut IrisTask) {
    // SAFETY: `t` came from iris_task_load_buffer.
    unsafe { iris_task_free(&mut t) };
    assert!(t.is_null());
}

/// A view of `data` (u8 voxels) with the given dims and 1 mm spacing.
fn view_u8(data: &[u8], dims: [u64; 3]) -> IrisVolumeView {
    IrisVolumeView {
        struct_size: size_of::<IrisVolumeView>() as u32,
        dtype: IrisDataType::U8 as u32,
        dims,
        spacing_mm: [1.0; 3],
        affine: null(),
        data: data.as_ptr().cast(),
        data_bytes: data.len() as u64,
    }
}

fn dice(a: &IrisVolumeView, b: &IrisVolumeView, label: u32) -> (IrisStatus, f64) {
    let mut out = -1.0;
    // SAFETY: valid views over live buffers and a valid out-pointer.
    let status = unsafe { iris_dice(a, b, label, &mut out) };
    (status, out)
}

#[test]
fn status_names_are_the_c_names() {
    let name = |s: i32| {
        // SAFETY: iris_status_name always returns a static string.
        unsafe { CStr::from_ptr(iris_status_name(s)) }
            .to_str()
            .expect("ascii")
            .to_string()
    };
    assert_eq!(name(0), "IRIS_OK");
    assert_eq!(
        name(IrisStatus::IrisErrorNullPointer as i32),
        "IRIS_ERROR_NULL_POINTER"
    );
    assert_eq!(
        name(IrisStatus::IrisErrorEmptyMask as i32),
        "IRIS_ERROR_EMPTY_MASK"
    );
    assert_eq!(name(13), "IRIS_ERROR_EMPTY_MASK");
    assert_eq!(name(14), "IRIS_ERROR_CANCELLED");
    assert_eq!(name(15), "IRIS_ERROR_UNKNOWN");
    assert_eq!(name(-1), "IRIS_ERROR_UNKNOWN");
    // The values are part of the ABI: never renumbered.
    let fixed = [
        (IrisStatus::IrisErrorInvalidArgument, 2),
        (IrisStatus::IrisErrorBufferTooSmall, 3),
        (IrisStatus::IrisErrorIo, 4),
        (IrisStatus::IrisErrorFormat, 5),
        (IrisStatus::IrisErrorModelMismatch, 6),
        (IrisStatus::IrisErrorShape, 7),
        (IrisStatus::IrisErrorInference, 8),
        (IrisStatus::IrisErrorPanic, 9),
        (IrisStatus::IrisErrorVersion, 10),
        (IrisStatus::IrisErrorTooLarge, 11),
        (IrisStatus::IrisErrorNonFinite, 12),
    ];
    for (status, value) in fixed {
        assert_eq!(status as i32, value);
        assert!(name(value).starts_with("IRIS_ERROR_"));
    }
}

#[test]
fn versions_pack_the_crate_version() {
    let v = iris_version();
    let parts: Vec<u32> = env!("CARGO_PKG_VERSION")
        .split('.')
        .map(|p| p.parse().expect("number"))
        .collect();
    assert_eq!(v, (parts[0] << 16) | (parts[1] << 8) | parts[2]);
    // SAFETY: static NUL-terminated string.
    let text = unsafe { CStr::from_ptr(iris_version_string()) };
    assert_eq!(text.to_str(), Ok(env!("CARGO_PKG_VERSION")));
    assert_eq!(iris_abi_version(), IRIS_ABI_VERSION);
}

#[test]
fn abi_check_accepts_older_minors_and_refuses_the_rest() {
    expect(iris_check_abi(IRIS_ABI_VERSION), IrisStatus::IrisOk, &[]);
    let (major, minor) = (IRIS_ABI_VERSION_MAJOR, IRIS_ABI_VERSION_MINOR);
    expect(iris_check_abi(major << 16), IrisStatus::IrisOk, &[]);
    expect(
        iris_check_abi((major << 16) | (minor + 1)),
        IrisStatus::IrisErrorVersion,
        &[
            &format!("ABI {major}.{}", minor + 1),
            &format!("{major}.{minor}"),
        ],
    );
    expect(
        iris_check_abi(((major + 1) << 16) | minor),
        IrisStatus::IrisErrorVersion,
        &["same major"],
    );
}

#[test]
fn a_panic_becomes_a_status_with_its_message() {
    let status = guard(|| panic!("boom at voxel 7"));
    expect(
        status,
        IrisStatus::IrisErrorPanic,
        &["panic", "boom at voxel 7"],
    );
    let status = guard(|| Err(Failure::invalid("plain failure")));
    expect(
        status,
        IrisStatus::IrisErrorInvalidArgument,
        &["plain failure"],
    );
}

#[test]
fn null_pointers_are_errors_and_outputs_are_nulled() {
    let mut out = core::ptr::dangling_mut::<IrisTask>();
    // SAFETY: NULL arguments are part of the contract being tested.
    let status = unsafe { iris_task_load(null(), &mut out) };
    expect(status, IrisStatus::IrisErrorNullPointer, &["`path`"]);
    assert!(out.is_null(), "a failed constructor must set *out = NULL");

    // SAFETY: as above.
    let status = unsafe { iris_task_load(c"x.irisemb".as_ptr(), null_mut()) };
    expect(status, IrisStatus::IrisErrorNullPointer, &["`out`"]);
    // SAFETY: as above.
    let status = unsafe { iris_model_load(null(), &mut null_mut()) };
    expect(status, IrisStatus::IrisErrorNullPointer, &["`dir`"]);
    // SAFETY: as above.
    let status = unsafe { iris_task_load_buffer(null(), 10, &mut out) };
    expect(status, IrisStatus::IrisErrorNullPointer, &["`data`"]);
    let mut count = 0usize;
    // SAFETY: as above.
    let status = unsafe { iris_task_num_classes(null(), &mut count) };
    expect(status, IrisStatus::IrisErrorNullPointer, &["`task`"]);
    let data = [0u8; 8];
    let v = view_u8(&data, [2, 2, 2]);
    // SAFETY: as above.
    let status = unsafe { iris_dice(&v, null(), 1, &mut 0.0) };
    expect(status, IrisStatus::IrisErrorNullPointer, &["`b`"]);
    // SAFETY: as above.
    let status = unsafe { iris_dice(&v, &v, 1, null_mut()) };
    expect(status, IrisStatus::IrisErrorNullPointer, &["`dice`"]);
    let mut view = v;
    view.data = null();
    // SAFETY: as above.
    let status = unsafe { iris_dice(&view, &v, 1, &mut 0.0) };
    expect(status, IrisStatus::IrisErrorNullPointer, &["`a.data`"]);
    // SAFETY: as above.
    let status = unsafe { iris_segment_options_default(null_mut()) };
    expect(status, IrisStatus::IrisErrorNullPointer, &["`options`"]);
    // SAFETY: as above.
    let status =
        unsafe { iris_segment(null(), &v, null(), null(), 1, null_mut(), 0, null_mut(), 0) };
    expect(status, IrisStatus::IrisErrorNullPointer, &["`model`"]);
}

#[test]
fn free_accepts_null_and_nulls_the_pointer() {
    // SAFETY: NULL and pointers to NULL are allowed.
    unsafe {
        iris_task_free(null_mut());
        iris_model_free(null_mut());
        iris_volume_free(null_mut());
        let mut t: *mut IrisTask = null_mut();
        iris_task_free(&mut t);
        let mut m: *mut IrisModel = null_mut();
        iris_model_free(&mut m);
    }
    free_task(task(&embedding(1)));
}

#[test]
fn views_with_bad_dims_sizes_and_fields_are_refused() {
    let data = [1u8; 64];
    let good = view_u8(&data, [4, 4, 4]);
    assert_eq!(dice(&good, &good, 1), (IrisStatus::IrisOk, 1.0));

    let mut zero = good;
    zero.dims = [4, 0, 4];
    let (status, _) = dice(&zero, &good, 1);
    expect(
        status,
        IrisStatus::IrisErrorInvalidArgument,
        &["a.dims", "dimension 1 is zero"],
    );

    let mut overflow = good;
    overflow.dims = [u64::MAX, 2, 2];
    let (status, _) = dice(&overflow, &good, 1);
    expect(status, IrisStatus::IrisErrorTooLarge, &["a.dims"]);
    overflow.dims = [1 << 20, 1 << 20, 4]; // 2^42 voxels: above the 2^31 limit
    let (status, _) = dice(&good, &overflow, 1);
    expect(status, IrisStatus::IrisErrorTooLarge, &["b.dims"]);

    let mut short = good;
    short.data_bytes = 63;
    let (status, _) = dice(&good, &short, 1);
    expect(
        status,
        IrisStatus::IrisErrorBufferTooSmall,
        &["b.data", "expected 64 bytes, got 63"],
    );

    let mut long = good;
    long.dims = [4, 4, 2];
    let (status, _) = dice(&long, &good, 1);
    expect(
        status,
        IrisStatus::IrisErrorInvalidArgument,
        &["exactly 32 bytes"],
    );

    let mut old = good;
    old.struct_size = 16;
    let (status, _) = dice(&old, &good, 1);
    expect(
        status,
        IrisStatus::IrisErrorInvalidArgument,
        &["struct_size` is 16"],
    );

    let mut dtype = good;
    dtype.dtype = 99;
    let (status, _) = dice(&dtype, &good, 1);
    expect(
        status,
        IrisStatus::IrisErrorInvalidArgument,
        &["a.dtype", "99"],
    );

    let mut spacing = good;
    spacing.spacing_mm = [1.0, f64::NAN, 1.0];
    let (status, _) = dice(&spacing, &good, 1);
    expect(
        status,
        IrisStatus::IrisErrorInvalidArgument,
        &["spacing_mm"],
    );

    let (status, _) = dice(&good, &good, 70_000);
    expect(
        status,
        IrisStatus::IrisErrorInvalidArgument,
        &["70000", "16-bit label map"],
    );
}

#[test]
fn affines_must_agree_with_spacing() {
    let data = [1u8; 8];
    let mut a = view_u8(&data, [2, 2, 2]);
    a.spacing_mm = [2.0, 1.0, 1.0];
    // Voxel axis d along world y, 2 mm; h along x; w along z; an origin.
    let rotated: [f64; 16] = [
        0.0, 1.0, 0.0, -10.0, //
        2.0, 0.0, 0.0, 5.0, //
        0.0, 0.0, 1.0, 0.0, //
        0.0, 0.0, 0.0, 1.0,
    ];
    a.affine = rotated.as_ptr();
    assert_eq!(dice(&a, &a, 1), (IrisStatus::IrisOk, 1.0));

    let b = view_u8(&data, [2, 2, 2]);
    let (status, _) = dice(&a, &b, 1);
    expect(
        status,
        IrisStatus::IrisErrorInvalidArgument,
        &["affine", "grids differ"],
    );

    let mut wrong = a;
    wrong.spacing_mm = [1.0, 1.0, 1.0];
    let (status, _) = dice(&wrong, &a, 1);
    expect(
        status,
        IrisStatus::IrisErrorInvalidArgument,
        &["column 0 has length 2", "must agree"],
    );

    let mut last_row = rotated;
    last_row[15] = 2.0;
    let mut bad = a;
    bad.affine = last_row.as_ptr();
    let (status, _) = dice(&bad, &a, 1);
    expect(
        status,
        IrisStatus::IrisErrorInvalidArgument,
        &["last row 0 0 0 1"],
    );
}

#[test]
fn dice_reads_every_label_type() {
    // label 1: a = {0, 1}, b = {1, 2}: Dice 2 * 1 / (2 + 2) = 0.5.
    let a: [i16; 4] = [1, 1, 0, 5];
    let b: [f32; 4] = [0.0, 1.0, 1.0, 5.0];
    let mut va = view_u8(&[], [1, 2, 2]);
    va.dtype = IrisDataType::I16 as u32;
    va.data = a.as_ptr().cast();
    va.data_bytes = 8;
    let mut vb = va;
    vb.dtype = IrisDataType::F32 as u32;
    vb.data = b.as_ptr().cast();
    vb.data_bytes = 16;
    assert_eq!(dice(&va, &vb, 1), (IrisStatus::IrisOk, 0.5));
    assert_eq!(dice(&va, &vb, 5), (IrisStatus::IrisOk, 1.0));
    let (status, _) = dice(&va, &vb, 3);
    expect(
        status,
        IrisStatus::IrisErrorEmptyMask,
        &["label 3", "undefined"],
    );

    let negative: [i16; 4] = [1, -2, 0, 5];
    va.data = negative.as_ptr().cast();
    let (status, _) = dice(&va, &vb, 1);
    expect(
        status,
        IrisStatus::IrisErrorInvalidArgument,
        &["voxel [0, 0, 1] is -2"],
    );
    let fraction: [f32; 4] = [0.0, 1.0, 1.5, 5.0];
    vb.data = fraction.as_ptr().cast();
    va.data = a.as_ptr().cast();
    let (status, _) = dice(&va, &vb, 1);
    expect(
        status,
        IrisStatus::IrisErrorInvalidArgument,
        &["voxel [0, 1, 0] is 1.5"],
    );

    let other = [1u8; 8];
    let (status, _) = dice(&va, &view_u8(&other, [2, 2, 2]), 1);
    expect(
        status,
        IrisStatus::IrisErrorShape,
        &["[1, 2, 2]", "[2, 2, 2]"],
    );
}

#[test]
fn damaged_embedding_buffers_are_format_errors() {
    let bytes = irisemb::write(&embedding(1), Payload::F16).expect("writable");
    let mut out = core::ptr::dangling_mut::<IrisTask>();
    // Every truncation, the empty buffer included, is refused without a crash.
    for len in 0..bytes.len() {
        // SAFETY: `len` bytes of a live buffer.
        let status = unsafe { iris_task_load_buffer(bytes.as_ptr(), len, &mut out) };
        expect(
            status,
            IrisStatus::IrisErrorFormat,
            &["invalid .irisemb data"],
        );
        assert!(out.is_null());
    }
    // SAFETY: NULL with size 0 is an empty buffer.
    let status = unsafe { iris_task_load_buffer(null(), 0, &mut out) };
    expect(status, IrisStatus::IrisErrorFormat, &["truncated"]);
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x10;
    // SAFETY: a live buffer.
    let status = unsafe { iris_task_load_buffer(flipped.as_ptr(), flipped.len(), &mut out) };
    expect(status, IrisStatus::IrisErrorFormat, &["checksum"]);
    let mut magic = bytes.clone();
    magic[0] = b'X';
    // SAFETY: a live buffer.
    let status = unsafe { iris_task_load_buffer(magic.as_ptr(), magic.len(), &mut out) };
    expect(status, IrisStatus::IrisErrorFormat, &["magic"]);
}

#[test]
fn save_buffer_reports_the_size_needed_and_round_trips() {
    let original = embedding(4);
    let t = task(&original);
    let mut written = 7usize;
    // SAFETY: a size query: NULL buffer with capacity 0.
    let status = unsafe { iris_task_save_buffer(t, null_mut(), 0, &mut written) };
    let needed = irisemb::write(&original, Payload::F32)
        .expect("writable")
        .len();
    expect(
        status,
        IrisStatus::IrisErrorBufferTooSmall,
        &[&format!("expected {needed} bytes, got 0")],
    );
    assert_eq!(written, needed);
    let mut buffer = vec![0u8; needed - 1];
    // SAFETY: a live buffer one byte short.
    let status =
        unsafe { iris_task_save_buffer(t, buffer.as_mut_ptr(), buffer.len(), &mut written) };
    expect(status, IrisStatus::IrisErrorBufferTooSmall, &[]);
    assert_eq!(written, needed);

    buffer.resize(needed + 10, 0xAA);
    // SAFETY: a live buffer larger than needed.
    let status =
        unsafe { iris_task_save_buffer(t, buffer.as_mut_ptr(), buffer.len(), &mut written) };
    expect(status, IrisStatus::IrisOk, &[]);
    assert_eq!(written, needed);
    assert_eq!(irisemb::read(&buffer[..written]).expect("valid"), original);
    assert_eq!(buffer[needed], 0xAA, "nothing written past `written`");
    // SAFETY: NULL `written` is an error.
    let status = unsafe { iris_task_save_buffer(t, buffer.as_mut_ptr(), buffer.len(), null_mut()) };
    expect(status, IrisStatus::IrisErrorNullPointer, &["`written`"]);
    free_task(t);
}

#[test]
fn save_and_load_a_file() {
    let dir = std::env::temp_dir().join(format!("iris-ffi-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = CString::new(dir.join("t.irisemb").to_str().expect("utf-8")).expect("no NUL");
    let original = embedding(2);
    let t = task(&original);
    // SAFETY: valid task and path.
    expect(
        unsafe { iris_task_save(t, path.as_ptr()) },
        IrisStatus::IrisOk,
        &[],
    );
    let mut back = null_mut();
    // SAFETY: valid path and out-pointer.
    expect(
        unsafe { iris_task_load(path.as_ptr(), &mut back) },
        IrisStatus::IrisOk,
        &[],
    );
    // SAFETY: `back` is a live task.
    assert_eq!(unsafe { &(*back).embedding }, &original);
    free_task(back);
    free_task(t);

    let missing =
        CString::new(dir.join("missing.irisemb").to_str().expect("utf-8")).expect("no NUL");
    // SAFETY: valid path and out-pointer.
    let status = unsafe { iris_task_load(missing.as_ptr(), &mut back) };
    expect(status, IrisStatus::IrisErrorIo, &["missing.irisemb"]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn ensemble_checks_models_and_entries() {
    let (a, b, other) = (
        task(&embedding(1)),
        task(&embedding(1)),
        task(&embedding(9)),
    );
    let mut out = null_mut();
    let pair = [a.cast_const(), b.cast_const()];
    // SAFETY: two live tasks.
    expect(
        unsafe { iris_task_ensemble(pair.as_ptr(), 2, &mut out) },
        IrisStatus::IrisOk,
        &[],
    );
    // SAFETY: `out` is a live task.
    let provenance = unsafe { (*out).embedding.classes()[0].provenance() };
    assert_eq!(provenance, Provenance::Ensemble { references: 2 });
    free_task(out);

    let mixed = [a.cast_const(), other.cast_const()];
    // SAFETY: two live tasks.
    let status = unsafe { iris_task_ensemble(mixed.as_ptr(), 2, &mut out) };
    expect(
        status,
        IrisStatus::IrisErrorModelMismatch,
        &["0909", "0101"],
    );
    let holes = [a.cast_const(), null()];
    // SAFETY: the second entry is NULL, which must be reported.
    let status = unsafe { iris_task_ensemble(holes.as_ptr(), 2, &mut out) };
    expect(status, IrisStatus::IrisErrorNullPointer, &["`tasks[1]`"]);
    // SAFETY: count 0.
    let status = unsafe { iris_task_ensemble(pair.as_ptr(), 0, &mut out) };
    expect(status, IrisStatus::IrisErrorInvalidArgument, &["count"]);
    for t in [a, b, other] {
        free_task(t);
    }
}

#[test]
fn select_and_inspect_classes() {
    let bank = task(&embedding(3));
    let mut count = 0usize;
    // SAFETY: live task and out-pointer.
    expect(
        unsafe { iris_task_num_classes(bank, &mut count) },
        IrisStatus::IrisOk,
        &[],
    );
    assert_eq!(count, 2);

    let mut picked = null_mut();
    let names = [c"spleen".as_ptr()];
    // SAFETY: one live name.
    let status = unsafe { iris_task_select_names(bank, names.as_ptr(), 1, &mut picked) };
    expect(status, IrisStatus::IrisOk, &[]);
    let mut label = 0u32;
    let mut name = [0 as c_char; 16];
    let mut size = 0usize;
    // SAFETY: live task and buffers of the stated sizes.
    let status =
        unsafe { iris_task_class(picked, 0, &mut label, name.as_mut_ptr(), 16, &mut size) };
    expect(status, IrisStatus::IrisOk, &[]);
    // SAFETY: NUL-terminated by iris_task_class.
    assert_eq!(unsafe { CStr::from_ptr(name.as_ptr()) }, c"spleen");
    assert_eq!((label, size), (2, 7));
    // SAFETY: a buffer of 6 bytes is too small for "spleen\0".
    let status = unsafe { iris_task_class(picked, 0, &mut label, name.as_mut_ptr(), 6, &mut size) };
    expect(
        status,
        IrisStatus::IrisErrorBufferTooSmall,
        &["expected 7 bytes, got 6"],
    );
    assert_eq!(size, 7);
    // SAFETY: index out of range.
    let status = unsafe { iris_task_class(picked, 1, &mut label, null_mut(), 0, null_mut()) };
    expect(
        status,
        IrisStatus::IrisErrorInvalidArgument,
        &["index` 1", "1 classes"],
    );
    free_task(picked);

    let labels = [2u32, 7];
    // SAFETY: two labels.
    let status = unsafe { iris_task_select_labels(bank, labels.as_ptr(), 2, &mut picked) };
    expect(
        status,
        IrisStatus::IrisErrorInvalidArgument,
        &["label 7", "\"liver\"", "\"spleen\""],
    );
    assert!(picked.is_null());
    let bad = [c"ok".as_ptr(), c"\xff".as_ptr()];
    // SAFETY: the second name is not UTF-8.
    let status = unsafe { iris_task_select_names(bank, bad.as_ptr(), 2, &mut picked) };
    expect(
        status,
        IrisStatus::IrisErrorInvalidArgument,
        &["names[1]", "UTF-8"],
    );
    free_task(bank);
}

#[test]
fn options_defaults_and_their_checks() {
    let mut o = core::mem::MaybeUninit::<IrisSegmentOptions>::uninit();
    // SAFETY: writes the whole struct.
    expect(
        unsafe { iris_segment_options_default(o.as_mut_ptr()) },
        IrisStatus::IrisOk,
        &[],
    );
    // SAFETY: initialised by the call above.
    let o = unsafe { o.assume_init() };
    assert_eq!(o.struct_size as usize, size_of::<IrisSegmentOptions>());
    assert_eq!(
        (o.modality, o.threshold, o.largest_component, o.overlap),
        (0, 0.5, 1, 0.5)
    );
    assert!(o.progress.is_none() && o.cancel.is_none() && o.reserved == [0; 3]);
    assert_eq!(
        (o.memory_budget, o.max_windows, o.classes_per_forward),
        (0, 0, 0),
        "0: the defaults"
    );
    // ABI 0.2 took `cancel` out of reserved words: the size is ABI 0.1's.
    assert_eq!(size_of::<IrisSegmentOptions>(), 104);
    let mut e = core::mem::MaybeUninit::<IrisEncodeOptions>::uninit();
    // SAFETY: writes the whole struct.
    expect(
        unsafe { iris_encode_options_default(e.as_mut_ptr()) },
        IrisStatus::IrisOk,
        &[],
    );
    // SAFETY: initialised by the call above.
    let e = unsafe { e.assume_init() };
    assert_eq!(e.struct_size as usize, size_of::<IrisEncodeOptions>());
    // ABI 0.2 took `memory_budget` out of a reserved word.
    assert_eq!(size_of::<IrisEncodeOptions>(), 72);
    // ABI 0.3's structs, frozen from now on (fields come from reserved words).
    assert_eq!(size_of::<IrisReadOptions>(), 64);
    assert_eq!(size_of::<IrisModelOptions>(), 64);
    // ABI 0.4 took `precision` out of 0.3's first reserved word: a 0.3
    // caller's zeros read as f32.
    assert_eq!(core::mem::offset_of!(IrisModelOptions, precision), 8);
    assert_eq!(size_of::<IrisModelBuffers>(), 120);
    assert_eq!(e.memory_budget, 0);
    assert!(crate::args::check_reserved(&e.reserved, "options").is_ok());
    let mut reserved = e.reserved;
    reserved[3] = 1;
    let failure = crate::args::check_reserved(&reserved, "options").expect_err("non-zero");
    assert!(
        failure.message.contains("options.reserved[3]"),
        "{}",
        failure.message
    );
}

#[test]
fn errors_are_kept_per_thread() {
    let barrier = Arc::new(Barrier::new(2));
    let worker = |name: &'static CStr, barrier: Arc<Barrier>| {
        std::thread::spawn(move || {
            let mut out = null_mut();
            // SAFETY: a path to a file that does not exist.
            let status = unsafe { iris_task_load(name.as_ptr(), &mut out) };
            assert_eq!(status, IrisStatus::IrisErrorIo);
            // Both threads have failed before either reads its message.
            barrier.wait();
            let message = last_error();
            barrier.wait();
            message
        })
    };
    let a = worker(c"/nonexistent/first.irisemb", barrier.clone());
    let b = worker(c"/nonexistent/second.irisemb", barrier);
    let (a, b) = (a.join().expect("thread"), b.join().expect("thread"));
    assert!(a.contains("first.irisemb") && !a.contains("second"), "{a}");
    assert!(b.contains("second.irisemb") && !b.contains("first"), "{b}");
    // A thread with no failure has an empty message.
    let fresh = std::thread::spawn(last_error).join().expect("thread");
    assert_eq!(fresh, "");
}

#[test]
fn nifti_labels_round_trip_through_a_library_volume() {
    let dir = std::env::temp_dir().join(format!("iris-ffi-nifti-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = CString::new(dir.join("labels.nii.gz").to_str().expect("utf-8")).expect("no NUL");
    let labels: Vec<u16> = (0..24).map(|v| (v % 5) * 100).collect(); // up to 400: stored as uint16
    let affine: [f64; 16] = [
        -2.0, 0.0, 0.0, 90.0, //
        0.0, 1.0, 0.0, -120.0, //
        0.0, 0.0, 0.5, -60.0, //
        0.0, 0.0, 0.0, 1.0,
    ];
    let view = IrisVolumeView {
        struct_size: size_of::<IrisVolumeView>() as u32,
        dtype: IrisDataType::U16 as u32,
        dims: [2, 3, 4],
        spacing_mm: [2.0, 1.0, 0.5],
        affine: affine.as_ptr(),
        data: labels.as_ptr().cast::<c_void>(),
        data_bytes: 48,
    };
    // SAFETY: a valid path and view; `like` may be NULL.
    let status = unsafe { iris_volume_write_nifti_labels(path.as_ptr(), &view, null()) };
    expect(status, IrisStatus::IrisOk, &[]);

    let mut volume = null_mut();
    // SAFETY: a valid path and out-pointer.
    expect(
        unsafe { iris_volume_read_nifti(path.as_ptr(), 1, &mut volume) },
        IrisStatus::IrisOk,
        &[],
    );
    let mut back = core::mem::MaybeUninit::<IrisVolumeView>::uninit();
    // SAFETY: only struct_size is set, as the contract allows.
    unsafe { (*back.as_mut_ptr()).struct_size = size_of::<IrisVolumeView>() as u32 };
    // SAFETY: a live volume and a caller struct with struct_size set.
    expect(
        unsafe { iris_volume_view(volume, back.as_mut_ptr()) },
        IrisStatus::IrisOk,
        &[],
    );
    // SAFETY: every field was written by iris_volume_view.
    let back = unsafe { back.assume_init() };
    assert_eq!(
        (back.dtype, back.dims, back.data_bytes),
        (IrisDataType::U16 as u32, [2, 3, 4], 48)
    );
    assert_eq!(back.spacing_mm, [2.0, 1.0, 0.5]);
    // SAFETY: the view's pointers are valid until the volume is freed.
    let (voxels, got_affine) = unsafe {
        (
            core::slice::from_raw_parts(back.data.cast::<u16>(), 24),
            core::slice::from_raw_parts(back.affine, 16),
        )
    };
    assert_eq!(voxels, labels.as_slice());
    assert_eq!(got_affine, affine.as_slice());
    // The library's own view is accepted as input.
    assert_eq!(dice(&back, &view, 300), (IrisStatus::IrisOk, 1.0));

    // SAFETY: reading as an image; then bad flags and a missing file.
    unsafe {
        let mut image = null_mut();
        expect(
            iris_volume_read_nifti(path.as_ptr(), 0, &mut image),
            IrisStatus::IrisOk,
            &[],
        );
        iris_volume_free(&mut image);
        assert!(image.is_null());
        let status = iris_volume_read_nifti(path.as_ptr(), 2, &mut image);
        expect(
            status,
            IrisStatus::IrisErrorInvalidArgument,
            &["as_labels` is 2"],
        );
        let status = iris_volume_read_nifti(c"/nonexistent/x.nii".as_ptr(), 0, &mut image);
        expect(status, IrisStatus::IrisErrorIo, &["/nonexistent/x.nii"]);
        // A header that claims 32767^3 voxels, or 1024^3 (6 GiB to read as
        // floats): too large, not a format error, before a voxel is read.
        let mut plain = std::fs::read(dir.join("labels.nii.gz")).expect("written");
        plain = iris_core::nifti::decode_label_bytes(&plain)
            .map(|(labels, _)| {
                let file = dir.join("plain.nii");
                iris_core::nifti::write_labels(&file, &labels, None).expect("writes");
                std::fs::read(file).expect("written")
            })
            .expect("reads");
        for (side, words) in [(32767i16, "more than"), (1024, "GiB")] {
            for axis in 1..=3 {
                plain[40 + 2 * axis..42 + 2 * axis].copy_from_slice(&side.to_le_bytes());
            }
            let huge = dir.join(format!("huge-{side}.nii"));
            std::fs::write(&huge, &plain).expect("writes");
            let huge = CString::new(huge.to_str().expect("utf-8")).expect("no NUL");
            let status = iris_volume_read_nifti(huge.as_ptr(), 0, &mut image);
            expect(status, IrisStatus::IrisErrorTooLarge, &["huge-", words]);
            assert!(image.is_null());
        }
        // The caller's budget: 64 bytes refuses this small file from its
        // header; the default reads it; malformed options are refused.
        let mut options = core::mem::zeroed::<IrisReadOptions>();
        expect(
            iris_read_options_default(&mut options),
            IrisStatus::IrisOk,
            &[],
        );
        assert_eq!(options.memory_budget, 0);
        options.memory_budget = 64;
        let status = iris_volume_read_nifti_with(path.as_ptr(), 1, &options, &mut image);
        expect(
            status,
            IrisStatus::IrisErrorTooLarge,
            &["labels.nii.gz", "over the budget of"],
        );
        assert!(image.is_null());
        options.memory_budget = 0;
        let status = iris_volume_read_nifti_with(path.as_ptr(), 1, &options, &mut image);
        expect(status, IrisStatus::IrisOk, &[]);
        iris_volume_free(&mut image);
        let status = iris_volume_read_nifti_with(path.as_ptr(), 1, null(), &mut image);
        expect(status, IrisStatus::IrisOk, &[]);
        iris_volume_free(&mut image);
        options.reserved[5] = 1;
        let status = iris_volume_read_nifti_with(path.as_ptr(), 1, &options, &mut image);
        expect(
            status,
            IrisStatus::IrisErrorInvalidArgument,
            &["reserved[5]"],
        );
        options.reserved[5] = 0;
        options.struct_size = 8;
        let status = iris_volume_read_nifti_with(path.as_ptr(), 1, &options, &mut image);
        expect(
            status,
            IrisStatus::IrisErrorInvalidArgument,
            &["struct_size` is 8"],
        );
        assert!(image.is_null());
        let mut small = back;
        small.struct_size = 8;
        let status = iris_volume_view(volume, &mut small);
        expect(
            status,
            IrisStatus::IrisErrorInvalidArgument,
            &["struct_size` is 8"],
        );
        iris_volume_free(&mut volume);
    }
    assert!(volume.is_null());
    std::fs::remove_dir_all(&dir).ok();
}

/// `classes_per_forward` reaches the engine: one class per decoder run plans
/// the decoder for one class only, and the labels are those of one run for
/// all classes (the model of known maths decodes classes independently).
#[test]
fn classes_per_forward_groups_the_decoder_runs() {
    use iris_test_support::{TempDir, fixture};
    let dir = TempDir::new("ffi-groups");
    fixture::model(dir.path(), 3);
    let path = CString::new(dir.path().to_str().expect("utf-8")).expect("no NUL");
    let mut model = null_mut();
    // SAFETY: a valid path and out-pointer.
    expect(
        unsafe { iris_model_load(path.as_ptr(), &mut model) },
        IrisStatus::IrisOk,
        &[],
    );
    // SAFETY: loaded above, freed at the end.
    let rust = unsafe { &(*model).model };
    let (image, labels) = fixture::reference();
    let task = task(&fixture::encode(rust, &image, &labels));
    let (query, _) = fixture::query(0.0);
    let a = query.geometry().affine().0;
    let affine: [f64; 16] = core::array::from_fn(|i| a[i / 4][i % 4]);
    let data = query.data().as_slice().expect("standard layout");
    let view = IrisVolumeView {
        struct_size: size_of::<IrisVolumeView>() as u32,
        dtype: IrisDataType::F32 as u32,
        dims: query.shape().map(|d| d as u64),
        spacing_mm: query.geometry().spacing(),
        affine: affine.as_ptr(),
        data: data.as_ptr().cast(),
        data_bytes: size_of_val(data) as u64,
    };
    let segment = |per_run: u64| {
        let mut options = core::mem::MaybeUninit::<IrisSegmentOptions>::uninit();
        // SAFETY: fills the struct.
        unsafe { iris_segment_options_default(options.as_mut_ptr()) };
        // SAFETY: initialised above.
        let mut options = unsafe { options.assume_init() };
        options.classes_per_forward = per_run;
        let mut out = vec![0u8; data.len()];
        // SAFETY: live model, view and task; a buffer of the stated size.
        let status = unsafe {
            iris_segment(
                model,
                &view,
                task,
                &options,
                IrisDataType::U8 as u32,
                out.as_mut_ptr().cast(),
                out.len() as u64,
                null_mut(),
                0,
            )
        };
        expect(status, IrisStatus::IrisOk, &[]);
        out
    };
    let grouped = segment(1);
    assert_eq!(rust.planned_class_counts(), [1], "one class per run");
    let together = segment(0);
    assert_eq!(rust.planned_class_counts(), [1, 2], "0: all in one run");
    assert_eq!(grouped, together);
    free_task(task);
    // SAFETY: loaded above; freed once.
    unsafe { iris_model_free(&mut model) };
}
