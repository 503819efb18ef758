//! Everything that needs a model, on one of known maths (one test binary, as
//! each links the whole engine):
//! - the model functions of the C ABI, each result compared with the Rust
//!   API's on the same input (tract's proxy idea: one computation through
//!   both doors), and their error paths: another model's task, labels that
//!   do not fit, short buffers, a memory bank, several threads;
//! - the C and C++ programs against the libiris this test run built:
//!   tests/c/run.sh installs it (header, versioned .so, .a, iris.pc), builds
//!   tests/c/abi_errors.c, examples/c/segment.c (shared and static) and
//!   examples/cpp/viewer.cpp with gcc/g++ `-Wall -Wextra -Werror -pedantic`,
//!   runs them, and runs abi_errors and segment under valgrind (no invalid
//!   access, no leak); then the labels the C program wrote are compared,
//!   voxel for voxel, with those of the Rust API on the same files.

use core::ffi::{CStr, c_void};
use core::ptr::{null, null_mut};
use std::ffi::CString;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use iris::*;
use iris_core::engine::{
    EncodeOptions, Model, PoolReference, RetrievalLevel, RetrieveOptions, SegmentOptions, TaskClass,
};
use iris_core::irisemb::{self, Payload};
use iris_core::nifti;
use iris_core::volume::{Image, LabelMap, Volume};
use iris_test_support::TempDir;
use iris_test_support::fixture;

mod common;

use common::{expect, last_error};

/// A C view of a volume, with its affine copied into `affine`.
fn view<T: Copy>(
    volume: &Volume<T>,
    dtype: IrisDataType,
    affine: &mut [f64; 16],
) -> IrisVolumeView {
    let a = volume.geometry().affine().0;
    *affine = core::array::from_fn(|i| a[i / 4][i % 4]);
    let data = volume.data().as_slice().expect("standard layout");
    IrisVolumeView {
        struct_size: size_of::<IrisVolumeView>() as u32,
        dtype: dtype as u32,
        dims: volume.shape().map(|d| d as u64),
        spacing_mm: volume.geometry().spacing(),
        affine: affine.as_ptr(),
        data: data.as_ptr().cast(),
        data_bytes: size_of_val(data) as u64,
    }
}

fn load(dir: &std::path::Path) -> *mut IrisModel {
    let dir = CString::new(dir.to_str().expect("utf-8")).expect("no NUL");
    let mut model = null_mut();
    // SAFETY: a valid path and out-pointer.
    expect(
        unsafe { iris_model_load(dir.as_ptr(), &mut model) },
        IrisStatus::IrisOk,
        &[],
    );
    model
}

struct Inputs {
    image: Image,
    labels: LabelMap,
    query: Image,
}

fn inputs() -> Inputs {
    let (image, labels) = fixture::reference();
    let (query, _) = fixture::query(0.0);
    Inputs {
        image,
        labels,
        query,
    }
}

/// Encodes labels 1 and 2 through the C ABI.
fn encode(model: *const IrisModel, inputs: &Inputs, names: &[&CStr]) -> *mut IrisTask {
    let (mut a, mut b) = ([0.0; 16], [0.0; 16]);
    let image = view(&inputs.image, IrisDataType::F32, &mut a);
    let labels = view(&inputs.labels, IrisDataType::U16, &mut b);
    let values = [1u16, 2];
    let names: Vec<_> = names.iter().map(|n| n.as_ptr()).collect();
    let mut task = null_mut();
    // SAFETY: live views, two labels and two names (or NULL), a valid out-pointer.
    let status = unsafe {
        iris_task_encode(
            model,
            &image,
            &labels,
            values.as_ptr(),
            if names.is_empty() {
                null()
            } else {
                names.as_ptr()
            },
            2,
            null(),
            &mut task,
        )
    };
    expect(status, IrisStatus::IrisOk, &[]);
    task
}

#[test]
fn encode_and_segment_match_the_rust_api() {
    let dir = TempDir::new("model-match");
    fixture::model(dir.path(), 3);
    let rust = Model::load(dir.path()).expect("loads");
    let model = load(dir.path());
    let inputs = inputs();

    let task = encode(model, &inputs, &[c"ball", c"box"]);
    let expected_task = fixture::encode(&rust, &inputs.image, &inputs.labels);
    // The task's values, read back through its bytes.
    let mut written = 0usize;
    let mut bytes = vec![0u8; 1 << 20];
    // SAFETY: a live task and buffer.
    let status =
        unsafe { iris_task_save_buffer(task, bytes.as_mut_ptr(), bytes.len(), &mut written) };
    expect(status, IrisStatus::IrisOk, &[]);
    let through_c = irisemb::read(&bytes[..written]).expect("valid");
    assert_eq!(through_c.classes().len(), 2);
    for (c, r) in through_c.classes().iter().zip(expected_task.classes()) {
        assert_eq!(
            c.stages(),
            r.stages(),
            "class {} embeds as the Rust API does",
            c.label()
        );
    }
    assert_eq!(through_c.classes()[1].name(), "box");
    // SAFETY: both live.
    expect(
        unsafe { iris_task_check_model(task, model) },
        IrisStatus::IrisOk,
        &[],
    );

    // Segment with probabilities; labels as uint8 and as uint16.
    let expected = rust
        .segment(
            &inputs.query,
            &expected_task,
            &SegmentOptions {
                probabilities: true,
                ..SegmentOptions::default()
            },
        )
        .expect("segments");
    let mut a = [0.0; 16];
    let query = view(&inputs.query, IrisDataType::F32, &mut a);
    let n = inputs.query.geometry().len();
    let mut labels8 = vec![0xAAu8; n + 1];
    let mut probabilities = vec![-1.0f32; 2 * n];
    let done = AtomicU64::new(0);
    unsafe extern "C" fn progress(_done: u64, _total: u64, user: *mut c_void) {
        // SAFETY: `user` is the AtomicU64 below, alive during iris_segment.
        unsafe { &*user.cast::<AtomicU64>() }.fetch_add(1, Ordering::Relaxed);
    }
    let mut options = core::mem::MaybeUninit::<IrisSegmentOptions>::uninit();
    // SAFETY: fills the struct.
    unsafe { iris_segment_options_default(options.as_mut_ptr()) };
    // SAFETY: initialised above.
    let mut options = unsafe { options.assume_init() };
    options.progress = Some(progress);
    options.progress_user = (&raw const done).cast_mut().cast();
    // SAFETY: live model, view, task; buffers of the stated sizes.
    let status = unsafe {
        iris_segment(
            model,
            &query,
            task,
            &options,
            IrisDataType::U8 as u32,
            labels8.as_mut_ptr().cast(),
            labels8.len() as u64,
            probabilities.as_mut_ptr(),
            probabilities.len() as u64,
        )
    };
    expect(status, IrisStatus::IrisOk, &[]);
    let want: Vec<u8> = expected.labels.data().iter().map(|&l| l as u8).collect();
    assert_eq!(&labels8[..n], want.as_slice());
    assert_eq!(labels8[n], 0xAA, "nothing written past the labels");
    let maps = expected.probabilities.expect("asked for");
    let want: Vec<f32> = maps.iter().flat_map(|m| m.data().iter().copied()).collect();
    assert_eq!(probabilities, want);
    assert_eq!(done.load(Ordering::Relaxed), expected.windows as u64);

    let mut labels16 = vec![0u16; n];
    // SAFETY: as above, no probabilities; NULL options.
    let status = unsafe {
        iris_segment(
            model,
            &query,
            task,
            null(),
            IrisDataType::U16 as u32,
            labels16.as_mut_ptr().cast(),
            (2 * n) as u64,
            null_mut(),
            0,
        )
    };
    expect(status, IrisStatus::IrisOk, &[]);
    let want: Vec<u16> = expected.labels.data().iter().copied().collect();
    assert_eq!(labels16, want);

    let (mut task, mut model) = (task, model);
    // SAFETY: both live; freed once.
    unsafe {
        iris_task_free(&mut task);
        iris_model_free(&mut model);
    }
    assert!(task.is_null() && model.is_null());
}

/// A viewer's cancel button: the `cancel` callback is asked before every
/// window; once it says stop, `iris_segment` returns IRIS_ERROR_CANCELLED,
/// decodes no further window and leaves the caller's buffers untouched.
#[test]
fn segment_stops_when_the_caller_cancels() {
    let dir = TempDir::new("model-cancel");
    fixture::model(dir.path(), 4);
    let model = load(dir.path());
    let inputs = inputs();
    let task = encode(model, &inputs, &[]);
    let mut a = [0.0; 16];
    let query = view(&inputs.query, IrisDataType::F32, &mut a);
    let n = inputs.query.geometry().len();

    /// Windows done so far; the cancel callback stops the run after 2.
    struct Run {
        done: AtomicU64,
        asked: AtomicU64,
    }
    unsafe extern "C" fn progress(_done: u64, _total: u64, user: *mut c_void) {
        // SAFETY: `user` is the Run below, alive during iris_segment.
        unsafe { &*user.cast::<Run>() }
            .done
            .fetch_add(1, Ordering::Relaxed);
    }
    unsafe extern "C" fn cancel(user: *mut c_void) -> core::ffi::c_int {
        // SAFETY: as above.
        let run = unsafe { &*user.cast::<Run>() };
        run.asked.fetch_add(1, Ordering::Relaxed);
        core::ffi::c_int::from(run.done.load(Ordering::Relaxed) >= 2)
    }
    let run = Run {
        done: AtomicU64::new(0),
        asked: AtomicU64::new(0),
    };
    let mut options = core::mem::MaybeUninit::<IrisSegmentOptions>::uninit();
    // SAFETY: fills the struct.
    unsafe { iris_segment_options_default(options.as_mut_ptr()) };
    // SAFETY: initialised above.
    let mut options = unsafe { options.assume_init() };
    let user = (&raw const run).cast_mut().cast();
    options.progress = Some(progress);
    options.progress_user = user;
    options.cancel = Some(cancel);
    options.cancel_user = user;
    let mut labels = vec![0xAAu8; n];
    let mut probabilities = vec![-1.0f32; 2 * n];
    // SAFETY: live model, view, task; buffers of the stated sizes.
    let status = unsafe {
        iris_segment(
            model,
            &query,
            task,
            &options,
            IrisDataType::U8 as u32,
            labels.as_mut_ptr().cast(),
            labels.len() as u64,
            probabilities.as_mut_ptr(),
            probabilities.len() as u64,
        )
    };
    expect(status, IrisStatus::IrisErrorCancelled, &["cancelled"]);
    assert_eq!(run.done.load(Ordering::Relaxed), 2, "no window after stop");
    assert_eq!(run.asked.load(Ordering::Relaxed), 3);
    assert!(labels.iter().all(|&l| l == 0xAA), "labels untouched");
    assert!(probabilities.iter().all(|&p| p == -1.0), "maps untouched");

    // A callback that never stops changes nothing.
    unsafe extern "C" fn never(_user: *mut c_void) -> core::ffi::c_int {
        0
    }
    options.cancel = Some(never);
    // SAFETY: as above.
    let status = unsafe {
        iris_segment(
            model,
            &query,
            task,
            &options,
            IrisDataType::U8 as u32,
            labels.as_mut_ptr().cast(),
            labels.len() as u64,
            null_mut(),
            0,
        )
    };
    expect(status, IrisStatus::IrisOk, &[]);
    let rust = Model::load(dir.path()).expect("loads");
    let expected = rust
        .segment(
            &inputs.query,
            &fixture::encode(&rust, &inputs.image, &inputs.labels),
            &SegmentOptions::default(),
        )
        .expect("segments");
    let want: Vec<u8> = expected.labels.data().iter().map(|&l| l as u8).collect();
    assert_eq!(labels, want);

    let (mut task, mut model) = (task, model);
    // SAFETY: both live; freed once.
    unsafe {
        iris_task_free(&mut task);
        iris_model_free(&mut model);
    }
}

/// A small volume whose header asks for gigabytes (80^3 voxels of 80 mm:
/// 1067^3 at the model's 6 mm) or hours is refused with
/// IRIS_ERROR_TOO_LARGE before anything is allocated or run, by encode and
/// segment alike; the budget and the window limit are the caller's.
#[test]
fn what_a_header_asks_is_bounded() {
    let dir = TempDir::new("model-limits");
    fixture::model(dir.path(), 4);
    let model = load(dir.path());
    let inputs = inputs();
    let task = encode(model, &inputs, &[]);
    let affine = iris_core::volume::Affine::from_spacing([80.0; 3]);
    let huge = Image::from_vec([80; 3], affine, vec![1.0; 80 * 80 * 80]).expect("valid");
    let mut a = [0.0; 16];
    let query = view(&huge, IrisDataType::F32, &mut a);
    let mut labels = vec![0u8; 80 * 80 * 80];
    let segment = |options: &IrisSegmentOptions, labels: &mut [u8]| {
        // SAFETY: live model, view and task; a buffer of the stated size.
        unsafe {
            iris_segment(
                model,
                &query,
                task,
                options,
                IrisDataType::U8 as u32,
                labels.as_mut_ptr().cast(),
                labels.len() as u64,
                null_mut(),
                0,
            )
        }
    };
    let mut options = core::mem::MaybeUninit::<IrisSegmentOptions>::uninit();
    // SAFETY: fills the struct.
    unsafe { iris_segment_options_default(options.as_mut_ptr()) };
    // SAFETY: initialised above.
    let mut options = unsafe { options.assume_init() };
    expect(
        segment(&options, &mut labels),
        IrisStatus::IrisErrorTooLarge,
        &["windows", "limit of 10000"],
    );
    options.max_windows = u64::MAX;
    expect(
        segment(&options, &mut labels),
        IrisStatus::IrisErrorTooLarge,
        &["[1067, 1067, 1067]", "budget of 4.00 GiB"],
    );
    // The phantom query (about 0.6 MiB) fits the defaults, not 64 KiB.
    let (mut b, small) = ([0.0; 16], fixture::query(0.0).0);
    let small_view = view(&small, IrisDataType::F32, &mut b);
    let mut small_labels = vec![0u8; small.geometry().len()];
    options.memory_budget = 1 << 16;
    // SAFETY: as above.
    let status = unsafe {
        iris_segment(
            model,
            &small_view,
            task,
            &options,
            IrisDataType::U8 as u32,
            small_labels.as_mut_ptr().cast(),
            small_labels.len() as u64,
            null_mut(),
            0,
        )
    };
    expect(
        status,
        IrisStatus::IrisErrorTooLarge,
        &["budget of 64.00 KiB"],
    );

    // Encoding a reference with the same header is refused the same way.
    let huge_labels = LabelMap::from_vec([80; 3], affine, vec![1; 80 * 80 * 80]).expect("valid");
    let (mut c, mut d) = ([0.0; 16], [0.0; 16]);
    let image = view(&huge, IrisDataType::F32, &mut c);
    let label_view = view(&huge_labels, IrisDataType::U16, &mut d);
    let mut encoded = null_mut();
    // SAFETY: live views, one label, NULL names and options, a valid out-pointer.
    let status = unsafe {
        iris_task_encode(
            model,
            &image,
            &label_view,
            [1u16].as_ptr(),
            null(),
            1,
            null(),
            &mut encoded,
        )
    };
    expect(status, IrisStatus::IrisErrorTooLarge, &["reference", "GiB"]);
    assert!(encoded.is_null());

    let (mut task, mut model) = (task, model);
    // SAFETY: both live; freed once.
    unsafe {
        iris_task_free(&mut task);
        iris_model_free(&mut model);
    }
}

#[test]
fn a_task_of_another_model_is_refused() {
    let dir = TempDir::new("model-mismatch");
    fixture::model(dir.path(), 5);
    let model = load(dir.path());
    let inputs = inputs();
    let own = encode(model, &inputs, &[]);
    // The same classes with another model's fingerprint, through a buffer.
    let mut bytes = vec![0u8; 1 << 20];
    let mut written = 0;
    // SAFETY: a live task and buffer.
    unsafe { iris_task_save_buffer(own, bytes.as_mut_ptr(), bytes.len(), &mut written) };
    let foreign = fixture::foreign(&irisemb::read(&bytes[..written]).expect("valid"));
    let foreign_bytes = irisemb::write(&foreign, Payload::F16).expect("writable");
    let mut other = null_mut();
    // SAFETY: a live buffer.
    let status =
        unsafe { iris_task_load_buffer(foreign_bytes.as_ptr(), foreign_bytes.len(), &mut other) };
    expect(status, IrisStatus::IrisOk, &[]);

    // SAFETY: live handles.
    let status = unsafe { iris_task_check_model(other, model) };
    expect(
        status,
        IrisStatus::IrisErrorModelMismatch,
        &["eeee", "another model"],
    );
    let mut a = [0.0; 16];
    let query = view(&inputs.query, IrisDataType::F32, &mut a);
    let n = inputs.query.geometry().len();
    let mut labels = vec![0u16; n];
    // SAFETY: live handles and buffers.
    let status = unsafe {
        iris_segment(
            model,
            &query,
            other,
            null(),
            3,
            labels.as_mut_ptr().cast(),
            2 * n as u64,
            null_mut(),
            0,
        )
    };
    expect(status, IrisStatus::IrisErrorModelMismatch, &["re-encode"]);
    let pair = [own.cast_const(), other.cast_const()];
    let mut merged = null_mut();
    // SAFETY: two live tasks.
    let status = unsafe { iris_task_ensemble(pair.as_ptr(), 2, &mut merged) };
    expect(status, IrisStatus::IrisErrorModelMismatch, &[]);

    let (mut own, mut other, mut model) = (own, other, model);
    // SAFETY: live handles, freed once.
    unsafe {
        iris_task_free(&mut own);
        iris_task_free(&mut other);
        iris_model_free(&mut model);
    }
}

#[test]
fn segment_checks_outputs_before_running() {
    let dir = TempDir::new("model-outputs");
    fixture::model(dir.path(), 6);
    let model = load(dir.path());
    let inputs = inputs();
    let task = encode(model, &inputs, &[]);
    let mut a = [0.0; 16];
    let query = view(&inputs.query, IrisDataType::F32, &mut a);
    let n = inputs.query.geometry().len() as u64;
    let mut labels = vec![0u16; n as usize];
    let mut one = 0f32;
    let run = |dtype: u32, bytes: u64, p: *mut f32, count: u64, out: *mut c_void| {
        // SAFETY: live handles; every size is checked before anything is written.
        unsafe { iris_segment(model, &query, task, null(), dtype, out, bytes, p, count) }
    };
    let out = labels.as_mut_ptr().cast();
    expect(
        run(3, 2 * n - 1, null_mut(), 0, out),
        IrisStatus::IrisErrorBufferTooSmall,
        &[&format!("expected {} bytes, got {}", 2 * n, 2 * n - 1)],
    );
    expect(
        run(3, 2 * n, null_mut(), 0, null_mut()),
        IrisStatus::IrisErrorNullPointer,
        &["labels_out"],
    );
    expect(
        run(3, 2 * n, &mut one, 1, out),
        IrisStatus::IrisErrorBufferTooSmall,
        &[&format!("expected {} floats", 2 * n)],
    );
    expect(
        run(3, 2 * n, null_mut(), 5, out),
        IrisStatus::IrisErrorNullPointer,
        &["probabilities_out"],
    );
    expect(
        run(5, 4 * n, null_mut(), 0, out),
        IrisStatus::IrisErrorInvalidArgument,
        &["label_dtype"],
    );
    expect(
        run(42, 4 * n, null_mut(), 0, out),
        IrisStatus::IrisErrorInvalidArgument,
        &["label_dtype` = 42"],
    );
    assert!(labels.iter().all(|&l| l == 0), "nothing was written");

    // A class labelled 300 does not fit uint8 labels.
    let mut bytes = vec![0u8; 1 << 20];
    let mut written = 0;
    // SAFETY: a live task and buffer.
    unsafe { iris_task_save_buffer(task, bytes.as_mut_ptr(), bytes.len(), &mut written) };
    let own = irisemb::read(&bytes[..written]).expect("valid");
    let mut class = own.classes()[0].clone();
    class = iris_core::embedding::ClassEmbedding::new(
        300,
        "big",
        class.provenance(),
        class.stages().to_vec(),
    )
    .expect("valid");
    let big = iris_core::embedding::TaskEmbedding::new(
        *own.model(),
        *own.preprocessing(),
        own.stage_shapes().to_vec(),
        vec![class],
    )
    .expect("valid");
    let big_bytes = irisemb::write(&big, Payload::F32).expect("writable");
    let mut big_task = null_mut();
    // SAFETY: a live buffer.
    unsafe { iris_task_load_buffer(big_bytes.as_ptr(), big_bytes.len(), &mut big_task) };
    // SAFETY: live handles and buffers.
    let status = unsafe {
        iris_segment(
            model,
            &query,
            big_task,
            null(),
            1,
            labels.as_mut_ptr().cast(),
            n,
            null_mut(),
            0,
        )
    };
    expect(
        status,
        IrisStatus::IrisErrorInvalidArgument,
        &["label 300", "IRIS_DATA_TYPE_U16"],
    );

    let mut options = core::mem::MaybeUninit::<IrisSegmentOptions>::uninit();
    // SAFETY: fills the struct.
    unsafe { iris_segment_options_default(options.as_mut_ptr()) };
    // SAFETY: initialised above.
    let mut options = unsafe { options.assume_init() };
    options.modality = 9;
    // SAFETY: live handles and buffers.
    let status = unsafe {
        iris_segment(
            model,
            &query,
            task,
            &options,
            3,
            labels.as_mut_ptr().cast(),
            2 * n,
            null_mut(),
            0,
        )
    };
    expect(
        status,
        IrisStatus::IrisErrorInvalidArgument,
        &["modality` is 9"],
    );

    let (mut task, mut big_task, mut model) = (task, big_task, model);
    // SAFETY: live handles, freed once.
    unsafe {
        iris_task_free(&mut task);
        iris_task_free(&mut big_task);
        iris_model_free(&mut model);
    }
}

#[test]
fn memory_bank_is_read_when_the_model_ships_one() {
    let dir = TempDir::new("model-bank");
    fixture::model(dir.path(), 8);
    let model = load(dir.path());
    let mut bank = core::ptr::dangling_mut::<IrisTask>();
    // SAFETY: live model, valid out-pointer.
    let status = unsafe { iris_model_memory_bank(model, &mut bank) };
    expect(
        status,
        IrisStatus::IrisErrorInvalidArgument,
        &["no memory bank"],
    );
    assert!(bank.is_null());

    // Ship the reference's classes as the model's memory bank.
    let inputs = inputs();
    let task = encode(model, &inputs, &[c"ball", c"box"]);
    let file =
        CString::new(dir.join("memory_bank.irisemb").to_str().expect("utf-8")).expect("no NUL");
    // SAFETY: live task and path.
    expect(
        unsafe { iris_task_save(task, file.as_ptr()) },
        IrisStatus::IrisOk,
        &[],
    );
    let manifest = dir.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    let text = text.replacen('{', "{\n  \"memory_bank\": \"memory_bank.irisemb\",", 1);
    std::fs::write(&manifest, text).expect("manifest");
    let mut with_bank = load(dir.path());
    // SAFETY: as above.
    let status = unsafe { iris_model_memory_bank(with_bank, &mut bank) };
    expect(status, IrisStatus::IrisOk, &[]);
    let mut picked = null_mut();
    let names = [c"box".as_ptr()];
    // SAFETY: a live bank and one name.
    let status = unsafe { iris_task_select_names(bank, names.as_ptr(), 1, &mut picked) };
    expect(status, IrisStatus::IrisOk, &[]);
    let (mut label, mut count) = (0u32, 0usize);
    // SAFETY: a live task.
    unsafe {
        iris_task_num_classes(picked, &mut count);
        iris_task_class(picked, 0, &mut label, null_mut(), 0, null_mut());
    }
    assert_eq!((count, label), (1, 2));

    let (mut model, mut task, mut bank, mut picked) = (model, task, bank, picked);
    // SAFETY: live handles, freed once.
    unsafe {
        iris_task_free(&mut picked);
        iris_task_free(&mut bank);
        iris_task_free(&mut task);
        iris_model_free(&mut with_bank);
        iris_model_free(&mut model);
    }
}

#[test]
fn one_model_segments_from_several_threads() {
    let dir = TempDir::new("model-threads");
    fixture::model(dir.path(), 9);
    let model = load(dir.path());
    let inputs = inputs();
    let task = encode(model, &inputs, &[]);
    let queries: Vec<Image> = (0..3)
        .map(|i| fixture::query(f64::from(i) * 3.0).0)
        .collect();

    // Raw pointers are not Send; the C contract makes both shareable.
    let (m, t) = (model as usize, task as usize);
    let segment = move |query: &Image| {
        let mut a = [0.0; 16];
        let v = view(query, IrisDataType::F32, &mut a);
        let mut labels = vec![0u16; query.geometry().len()];
        // SAFETY: the model and task outlive the threads (joined below).
        let status = unsafe {
            iris_segment(
                m as *const IrisModel,
                &v,
                t as *const IrisTask,
                null(),
                3,
                labels.as_mut_ptr().cast(),
                (2 * labels.len()) as u64,
                null_mut(),
                0,
            )
        };
        assert_eq!(status, IrisStatus::IrisOk, "{}", last_error());
        labels
    };
    let sequential: Vec<Vec<u16>> = queries.iter().map(segment).collect();
    let parallel: Vec<Vec<u16>> = std::thread::scope(|s| {
        let handles: Vec<_> = queries
            .iter()
            .map(|q| s.spawn(move || segment(q)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    assert_eq!(parallel, sequential);

    let (mut task, mut model) = (task, model);
    // SAFETY: live handles, freed once.
    unsafe {
        iris_task_free(&mut task);
        iris_model_free(&mut model);
    }
}

/// `target/<profile>/deps`: where cargo builds libiris.so and libiris.a,
/// next to this test binary (`cargo test` builds every crate type of the
/// library there, and copies none of them up to `target/<profile>`).
fn build_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().expect("target/<profile>/deps").to_path_buf();
    for lib in ["libiris.so", "libiris.a"] {
        assert!(
            dir.join(lib).is_file(),
            "{} is missing: cargo builds it with the tests",
            dir.join(lib).display()
        );
    }
    dir
}

#[test]
fn c_and_cpp_programs_build_run_and_match_the_rust_api() {
    let files = fixture::fixture("c-programs");
    let work = files.root.join("work");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/c/run.sh");
    let output = Command::new("bash")
        .arg(&script)
        .arg(build_dir())
        .arg(&files.model)
        .arg(&files.data)
        .arg(&work)
        .output()
        .expect("bash runs tests/c/run.sh");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "tests/c/run.sh failed:\n{log}");
    assert!(
        log.contains("abi_errors: ") && log.contains(" 0 failed"),
        "{log}"
    );
    assert!(
        log.contains("threaded results equal the sequential run"),
        "{log}"
    );
    assert!(
        log.contains("label 1: Dice") && log.contains("label 2: Dice"),
        "{log}"
    );

    // The Rust API on the same files.
    let model = Model::load(&files.model).expect("model loads");
    let (image, _) = nifti::read_image(files.file("ref.nii.gz")).expect("read");
    let (labels, _) = nifti::read_labels(files.file("ref_labels.nii.gz")).expect("read");
    let (query, _) = nifti::read_image(files.file("query.nii.gz")).expect("read");
    let task = fixture::encode(&model, &image, &labels);
    let expected = model
        .segment(&query, &task, &SegmentOptions::default())
        .expect("segments");
    // The CMake build runs where cmake is installed (it is on CI).
    let cmake = log.contains("cmake: segment and viewer built");
    let names = [
        "segment.nii.gz",
        "segment_static.nii.gz",
        "segment_cmake.nii.gz",
    ];
    for name in &names[..if cmake { 3 } else { 2 }] {
        let (written, _) = nifti::read_labels(work.join(name)).expect("C output");
        assert_eq!(written.data(), expected.labels.data(), "{name}");
        query
            .geometry()
            .ensure_same(written.geometry(), name)
            .expect("the C output lies on the query's grid");
    }
    // Under valgrind the labels are not compared voxel for voxel: its
    // virtual CPU has no AVX-512, so tract picks other matrix kernels, and
    // an untrained model's probabilities sit close enough to the threshold
    // for rounding to move voxels. The run must still write a label map of
    // the task's classes on the query's grid.
    let (written, _) = nifti::read_labels(work.join("segment_valgrind.nii.gz")).expect("C output");
    query
        .geometry()
        .ensure_same(written.geometry(), "segment_valgrind.nii.gz")
        .expect("the C output lies on the query's grid");
    assert!(
        written.data().iter().all(|&l| l <= 2),
        "labels 0, 1, 2 only"
    );
}

/// Adds the reference `(image, labels)` to `pool` through the C ABI under
/// `name`, encoding labels 1 and 2.
fn add_reference(
    pool: *mut IrisPool,
    model: *const IrisModel,
    name: &CStr,
    image: &Image,
    labels: &LabelMap,
) {
    let (mut a, mut b) = ([0.0; 16], [0.0; 16]);
    let image = view(image, IrisDataType::F32, &mut a);
    let labels = view(labels, IrisDataType::U16, &mut b);
    let values = [1u16, 2];
    // SAFETY: live handles and views, two labels, no names.
    let status = unsafe {
        iris_pool_add_reference(
            pool,
            model,
            name.as_ptr(),
            &image,
            &labels,
            values.as_ptr(),
            null(),
            2,
            null(),
        )
    };
    expect(status, IrisStatus::IrisOk, &[]);
}

#[test]
fn retrieve_matches_the_rust_api_at_both_levels() {
    let dir = TempDir::new("model-retrieve");
    fixture::model(dir.path(), 12);
    let model = load(dir.path());
    let rust = Model::load(dir.path()).expect("loads");
    let (ref_image, ref_labels) = fixture::reference();
    let (other_image, other_labels) = fixture::query(3.0);
    let (query, _) = fixture::query(0.0);

    let mut pool = null_mut();
    // SAFETY: a valid out-pointer.
    expect(unsafe { iris_pool_new(&mut pool) }, IrisStatus::IrisOk, &[]);
    add_reference(pool, model, c"atlas", &ref_image, &ref_labels);
    add_reference(pool, model, c"other", &other_image, &other_labels);
    let mut size = 0;
    // SAFETY: live pool, valid out-pointer.
    unsafe { iris_pool_size(pool, &mut size) };
    assert_eq!(size, 2);
    let classes = [TaskClass::new(1, ""), TaskClass::new(2, "")];
    let expected_pool: Vec<PoolReference> = [
        ("atlas", &ref_image, &ref_labels),
        ("other", &other_image, &other_labels),
    ]
    .into_iter()
    .map(|(name, image, labels)| {
        rust.encode_pool_reference(name, image, labels, &classes, &EncodeOptions::default())
            .expect("encodes")
    })
    .collect();

    let mut a = [0.0; 16];
    let query_view = view(&query, IrisDataType::F32, &mut a);
    let n = query.geometry().len();
    for (level, c_level) in [
        (RetrievalLevel::Object, IrisRetrievalLevel::Object),
        (RetrievalLevel::Image, IrisRetrievalLevel::Image),
    ] {
        let mut options = core::mem::MaybeUninit::<IrisRetrieveOptions>::uninit();
        // SAFETY: fills the struct.
        unsafe { iris_retrieve_options_default(options.as_mut_ptr()) };
        // SAFETY: initialised above.
        let mut options = unsafe { options.assume_init() };
        options.level = c_level as u32;
        options.top_k = 1;
        let mut labels = vec![0u8; n];
        let mut probabilities = vec![0f32; 2 * n];
        let mut task = null_mut();
        // SAFETY: live handles and buffers of the sizes given.
        let status = unsafe {
            iris_retrieve(
                model,
                pool,
                &query_view,
                null(),
                0,
                &options,
                null(),
                IrisDataType::U8 as u32,
                labels.as_mut_ptr().cast(),
                n as u64,
                probabilities.as_mut_ptr(),
                2 * n as u64,
                &mut task,
            )
        };
        expect(status, IrisStatus::IrisOk, &[]);

        let settings = RetrieveOptions {
            level,
            top_k: 1,
            segment: SegmentOptions {
                probabilities: true,
                ..SegmentOptions::default()
            },
            ..RetrieveOptions::default()
        };
        let expected = rust
            .retrieve(&query, &expected_pool, &[], &settings)
            .expect("retrieves");
        let want: Vec<u8> = expected
            .segmentation
            .labels
            .data()
            .iter()
            .map(|&l| l as u8)
            .collect();
        assert_eq!(labels, want, "{level:?}");
        let maps = expected.segmentation.probabilities.expect("asked for");
        let want: Vec<f32> = maps.iter().flat_map(|m| m.data().iter().copied()).collect();
        assert_eq!(probabilities, want, "{level:?}");
        let mut bytes = vec![0u8; 1 << 20];
        let mut written = 0;
        // SAFETY: a live task and buffer.
        unsafe { iris_task_save_buffer(task, bytes.as_mut_ptr(), bytes.len(), &mut written) };
        assert_eq!(
            irisemb::read(&bytes[..written]).expect("valid"),
            expected.task
        );
        // SAFETY: a live task, freed once.
        unsafe { iris_task_free(&mut task) };
    }

    // Errors: each answered with its code and a message naming the cause.
    let mut labels = vec![0u8; n];
    let run = |pool: *const IrisPool,
               options: *const IrisRetrieveOptions,
               bytes: u64,
               labels: &mut [u8]| {
        let mut task = null_mut();
        // SAFETY: live handles; sizes are checked before anything is written.
        let status = unsafe {
            iris_retrieve(
                model,
                pool,
                &query_view,
                null(),
                0,
                options,
                null(),
                1,
                labels.as_mut_ptr().cast(),
                bytes,
                null_mut(),
                0,
                &mut task,
            )
        };
        if status == IrisStatus::IrisOk {
            // SAFETY: the task this call made, freed once.
            unsafe { iris_task_free(&mut task) };
        }
        assert!(task.is_null(), "no task left on failure");
        status
    };
    expect(
        run(null(), null(), n as u64, &mut labels),
        IrisStatus::IrisErrorNullPointer,
        &["`pool` is NULL"],
    );
    expect(
        run(pool, null(), n as u64 - 1, &mut labels),
        IrisStatus::IrisErrorBufferTooSmall,
        &["labels_out"],
    );
    let mut options = core::mem::MaybeUninit::<IrisRetrieveOptions>::uninit();
    // SAFETY: fills the struct.
    unsafe { iris_retrieve_options_default(options.as_mut_ptr()) };
    // SAFETY: initialised above.
    let defaults = unsafe { options.assume_init() };
    for (options, words) in [
        (
            IrisRetrieveOptions {
                top_k: 0,
                ..defaults
            },
            "top_k` is 0",
        ),
        (
            IrisRetrieveOptions {
                initial: 2,
                ..defaults
            },
            "pool holds 2",
        ),
        (
            IrisRetrieveOptions {
                level: 7,
                ..defaults
            },
            "level` is 7",
        ),
        (
            IrisRetrieveOptions {
                struct_size: 8,
                ..defaults
            },
            "struct_size` is 8",
        ),
    ] {
        expect(
            run(pool, &options, n as u64, &mut labels),
            IrisStatus::IrisErrorInvalidArgument,
            &[words],
        );
    }
    let mut empty = null_mut();
    // SAFETY: a valid out-pointer.
    unsafe { iris_pool_new(&mut empty) };
    expect(
        run(empty, null(), n as u64, &mut labels),
        IrisStatus::IrisErrorInvalidArgument,
        &["pool holds 0"],
    );
    // A task alone has no image descriptor: object level only.
    let mut task = encode(model, &inputs(), &[]);
    // SAFETY: live handles.
    expect(
        unsafe { iris_pool_add_task(empty, c"file".as_ptr(), task) },
        IrisStatus::IrisOk,
        &[],
    );
    let by_image = IrisRetrieveOptions {
        level: IrisRetrievalLevel::Image as u32,
        ..defaults
    };
    expect(
        run(empty, &by_image, n as u64, &mut labels),
        IrisStatus::IrisErrorInvalidArgument,
        &["\"file\"", "descriptor"],
    );
    expect(
        run(empty, null(), n as u64, &mut labels),
        IrisStatus::IrisOk,
        &[],
    );

    let mut model = model;
    // SAFETY: live handles, each freed once; freeing NULL is allowed.
    unsafe {
        iris_task_free(&mut task);
        iris_pool_free(&mut empty);
        iris_pool_free(&mut pool);
        iris_pool_free(&mut pool);
        iris_model_free(&mut model);
    }
    assert!(pool.is_null() && empty.is_null());
}

/// The task of `model` for labels 1 and 2 of `inputs`, as `.irisemb` bytes.
fn task_bytes(model: *const IrisModel, inputs: &Inputs) -> Vec<u8> {
    let mut task = encode(model, inputs, &[]);
    let mut bytes = vec![0u8; 1 << 20];
    let mut written = 0;
    // SAFETY: a live task and buffer; the task is freed once.
    unsafe {
        let status = iris_task_save_buffer(task, bytes.as_mut_ptr(), bytes.len(), &mut written);
        expect(status, IrisStatus::IrisOk, &[]);
        iris_task_free(&mut task);
    }
    bytes.truncate(written);
    bytes
}

/// A viewer sets the model's threads, and loads a model from memory (the
/// same model as its folder); bad buffers and options are named.
#[test]
fn models_load_with_threads_and_from_buffers() {
    let dir = TempDir::new("model-buffers");
    fixture::model(dir.path(), 7);
    let inputs = inputs();
    let folder = load(dir.path());
    let expected = task_bytes(folder, &inputs);

    let path = CString::new(dir.path().to_str().expect("utf-8")).expect("no NUL");
    // SAFETY: zeroed plain data, filled by the _default function.
    let mut options: IrisModelOptions = unsafe { core::mem::zeroed() };
    // SAFETY: a valid struct.
    expect(
        unsafe { iris_model_options_default(&mut options) },
        IrisStatus::IrisOk,
        &[],
    );
    assert_eq!(options.threads, 0);
    options.threads = 2;
    let mut threaded = null_mut();
    // SAFETY: a valid path, options and out-pointer.
    let status = unsafe { iris_model_load_with(path.as_ptr(), &options, &mut threaded) };
    expect(status, IrisStatus::IrisOk, &[]);
    let mut threads = 0;
    // SAFETY: a live model and a valid out-pointer.
    expect(
        unsafe { iris_model_threads(threaded, &mut threads) },
        IrisStatus::IrisOk,
        &[],
    );
    assert_eq!(threads, 2);
    assert_eq!(task_bytes(threaded, &inputs), expected);

    let read = |name: &str| std::fs::read(dir.join(name)).expect("reads");
    let files = [
        read("manifest.json"),
        read("encoder.onnx"),
        read("task_encoder.onnx"),
        read("decoder.onnx"),
    ];
    let buffers = IrisModelBuffers {
        struct_size: size_of::<IrisModelBuffers>() as u32,
        reserved0: 0,
        manifest: files[0].as_ptr(),
        manifest_len: files[0].len(),
        encoder: files[1].as_ptr(),
        encoder_len: files[1].len(),
        task_encoder: files[2].as_ptr(),
        task_encoder_len: files[2].len(),
        decoder: files[3].as_ptr(),
        decoder_len: files[3].len(),
        memory_bank: null(),
        memory_bank_len: 0,
        reserved: [0; 4],
    };
    let load_buffers = |buffers: &IrisModelBuffers, options: *const IrisModelOptions| {
        let mut model = null_mut();
        // SAFETY: the buffers point to `files`, alive for the call.
        let status = unsafe { iris_model_load_buffers(buffers, options, &mut model) };
        (status, model)
    };
    let (status, mut memory) = load_buffers(&buffers, &options);
    expect(status, IrisStatus::IrisOk, &[]);
    assert_eq!(task_bytes(memory, &inputs), expected);

    let refused = |buffers: IrisModelBuffers, status: IrisStatus, words: &[&str]| {
        let (got, model) = load_buffers(&buffers, null());
        expect(got, status, words);
        assert!(model.is_null());
    };
    refused(
        IrisModelBuffers {
            decoder: null(),
            ..buffers
        },
        IrisStatus::IrisErrorNullPointer,
        &["buffers.decoder"],
    );
    refused(
        IrisModelBuffers {
            decoder_len: 0,
            ..buffers
        },
        IrisStatus::IrisErrorFormat,
        &["<memory>/decoder.onnx"],
    );
    refused(
        IrisModelBuffers {
            struct_size: 8,
            ..buffers
        },
        IrisStatus::IrisErrorInvalidArgument,
        &["struct_size` is 8"],
    );
    refused(
        IrisModelBuffers {
            memory_bank: files[0].as_ptr(),
            memory_bank_len: 4,
            ..buffers
        },
        IrisStatus::IrisErrorFormat,
        &["names no memory bank"],
    );
    options.reserved[0] = 1;
    let (status, model) = load_buffers(&buffers, &options);
    expect(
        status,
        IrisStatus::IrisErrorInvalidArgument,
        &["reserved[0]"],
    );
    assert!(model.is_null());

    let (mut folder, mut threaded) = (folder, threaded);
    // SAFETY: live handles, freed once.
    unsafe {
        iris_model_free(&mut folder);
        iris_model_free(&mut threaded);
        iris_model_free(&mut memory);
    }
}
