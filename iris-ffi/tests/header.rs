//! `include/iris.h` is generated from this crate by cbindgen and checked in.
//!
//! - `header_is_current` regenerates it and fails when the checked-in file
//!   differs; `IRIS_BLESS=1 cargo test -p iris-ffi --test header` rewrites it.
//! - `header_compiles_as_c99_and_cxx11` compiles it with gcc and g++ under
//!   `-Wall -Wextra -Werror -pedantic`.
//! - `c_layout_matches_rust` compiles a C program that prints the size and
//!   field offsets of every struct and the value of every constant as the C
//!   compiler sees them, and compares them with Rust's.

use std::path::{Path, PathBuf};
use std::process::Command;

use iris::{
    IRIS_ABI_VERSION, IRIS_VERSION_MAJOR, IRIS_VERSION_MINOR, IRIS_VERSION_PATCH, IrisDataType,
    IrisEncodeOptions, IrisModality, IrisRetrievalLevel, IrisRetrieveOptions, IrisSegmentOptions,
    IrisStatus, IrisVolumeView,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn header() -> PathBuf {
    root().join("include").join("iris.h")
}

fn generate() -> String {
    let crate_dir = env!("CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(Path::new(crate_dir).join("cbindgen.toml"))
        .expect("iris-ffi/cbindgen.toml parses");
    let bindings = cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen parses iris-ffi");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("UTF-8 header")
}

#[test]
fn header_is_current() {
    let generated = generate();
    let path = header();
    if std::env::var_os("IRIS_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &generated).expect("write include/iris.h");
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    if checked_in != generated {
        let first = checked_in
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || "one is a prefix of the other".to_string(),
                |i| {
                    format!(
                        "first difference at line {}:\n  checked in: {:?}\n  generated:  {:?}",
                        i + 1,
                        checked_in.lines().nth(i).unwrap_or(""),
                        generated.lines().nth(i).unwrap_or("")
                    )
                },
            );
        panic!(
            "include/iris.h is out of date with iris-ffi ({first}).\n\
             Regenerate it with: IRIS_BLESS=1 cargo test -p iris-ffi --test header"
        );
    }
}

/// Runs `cmd`, failing the test with its output when it fails.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (gcc and g++ are required)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("iris-header-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

const STRICT: [&str; 4] = ["-Wall", "-Wextra", "-Werror", "-pedantic"];

#[test]
fn header_compiles_as_c99_and_cxx11() {
    let dir = scratch("compile");
    // Uses every type so that a declaration that only fails on use shows up.
    let source = r#"#include <string.h>
#include "iris.h"
int use_all(void);
int use_all(void) {
    IrisVolumeView v;
    IrisSegmentOptions s;
    IrisEncodeOptions e;
    IrisModel *m = NULL;
    IrisTask *t = NULL;
    IrisVolume *vol = NULL;
    IrisStatus st;
    memset(&v, 0, sizeof v);
    v.struct_size = sizeof v;
    v.dtype = IRIS_DATA_TYPE_F32;
    st = iris_segment_options_default(&s);
    s.modality = IRIS_MODALITY_CT;
    if (st == IRIS_OK) st = iris_encode_options_default(&e);
    if (st == IRIS_OK) st = iris_volume_view(vol, &v);
    iris_model_free(&m);
    iris_task_free(&t);
    iris_volume_free(&vol);
    return st == IRIS_OK && iris_check_abi(IRIS_ABI_VERSION) == IRIS_OK;
}
"#;
    let c = dir.join("use.c");
    let cpp = dir.join("use.cpp");
    std::fs::write(&c, source).expect("write");
    std::fs::write(&cpp, source).expect("write");
    let include = root().join("include");
    run(Command::new("gcc")
        .args(["-std=c99", "-fsyntax-only"])
        .args(STRICT)
        .arg("-I")
        .arg(&include)
        .arg(&c));
    run(Command::new("g++")
        .args(["-std=c++11", "-fsyntax-only"])
        .args(STRICT)
        .arg("-I")
        .arg(&include)
        .arg(&cpp));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn c_layout_matches_rust() {
    use core::mem::offset_of;

    let dir = scratch("layout");
    let program = r#"#include <stdio.h>
#include <stddef.h>
#include "iris.h"
#define SIZE(T) printf(#T " %zu\n", sizeof(T));
#define FIELD(T, f) printf(#T "." #f " %zu\n", offsetof(T, f));
#define VALUE(c) printf(#c " %ld\n", (long)(c));
int main(void) {
    SIZE(IrisVolumeView) FIELD(IrisVolumeView, dtype) FIELD(IrisVolumeView, dims)
    FIELD(IrisVolumeView, spacing_mm) FIELD(IrisVolumeView, affine) FIELD(IrisVolumeView, data)
    FIELD(IrisVolumeView, data_bytes)
    SIZE(IrisEncodeOptions) FIELD(IrisEncodeOptions, modality) FIELD(IrisEncodeOptions, reserved)
    SIZE(IrisSegmentOptions) FIELD(IrisSegmentOptions, modality) FIELD(IrisSegmentOptions, threshold)
    FIELD(IrisSegmentOptions, largest_component) FIELD(IrisSegmentOptions, overlap)
    FIELD(IrisSegmentOptions, progress) FIELD(IrisSegmentOptions, progress_user)
    FIELD(IrisSegmentOptions, reserved)
    SIZE(IrisRetrieveOptions) FIELD(IrisRetrieveOptions, level) FIELD(IrisRetrieveOptions, top_k)
    FIELD(IrisRetrieveOptions, initial) FIELD(IrisRetrieveOptions, reserved)
    VALUE(IRIS_RETRIEVAL_LEVEL_OBJECT) VALUE(IRIS_RETRIEVAL_LEVEL_IMAGE)
    SIZE(IrisStatus)
    VALUE(IRIS_OK) VALUE(IRIS_ERROR_NULL_POINTER) VALUE(IRIS_ERROR_BUFFER_TOO_SMALL)
    VALUE(IRIS_ERROR_MODEL_MISMATCH) VALUE(IRIS_ERROR_PANIC) VALUE(IRIS_ERROR_VERSION)
    VALUE(IRIS_ERROR_EMPTY_MASK)
    VALUE(IRIS_DATA_TYPE_U8) VALUE(IRIS_DATA_TYPE_U16) VALUE(IRIS_DATA_TYPE_F64)
    VALUE(IRIS_MODALITY_AUTO) VALUE(IRIS_MODALITY_MR)
    VALUE(IRIS_VERSION_MAJOR) VALUE(IRIS_VERSION_MINOR) VALUE(IRIS_VERSION_PATCH)
    VALUE(IRIS_ABI_VERSION)
    return 0;
}
"#;
    let source = dir.join("layout.c");
    let exe = dir.join("layout");
    std::fs::write(&source, program).expect("write");
    run(Command::new("gcc")
        .arg("-std=c99")
        .args(STRICT)
        .arg("-I")
        .arg(root().join("include"))
        .arg(&source)
        .arg("-o")
        .arg(&exe));
    let printed = run(&mut Command::new(&exe));
    let c: std::collections::HashMap<&str, u64> = printed
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k, v.parse().expect("number")))
        .collect();

    let rust: Vec<(&str, u64)> = vec![
        ("IrisVolumeView", size_of::<IrisVolumeView>() as u64),
        (
            "IrisVolumeView.dtype",
            offset_of!(IrisVolumeView, dtype) as u64,
        ),
        (
            "IrisVolumeView.dims",
            offset_of!(IrisVolumeView, dims) as u64,
        ),
        (
            "IrisVolumeView.spacing_mm",
            offset_of!(IrisVolumeView, spacing_mm) as u64,
        ),
        (
            "IrisVolumeView.affine",
            offset_of!(IrisVolumeView, affine) as u64,
        ),
        (
            "IrisVolumeView.data",
            offset_of!(IrisVolumeView, data) as u64,
        ),
        (
            "IrisVolumeView.data_bytes",
            offset_of!(IrisVolumeView, data_bytes) as u64,
        ),
        ("IrisEncodeOptions", size_of::<IrisEncodeOptions>() as u64),
        (
            "IrisEncodeOptions.modality",
            offset_of!(IrisEncodeOptions, modality) as u64,
        ),
        (
            "IrisEncodeOptions.reserved",
            offset_of!(IrisEncodeOptions, reserved) as u64,
        ),
        ("IrisSegmentOptions", size_of::<IrisSegmentOptions>() as u64),
        (
            "IrisSegmentOptions.modality",
            offset_of!(IrisSegmentOptions, modality) as u64,
        ),
        (
            "IrisSegmentOptions.threshold",
            offset_of!(IrisSegmentOptions, threshold) as u64,
        ),
        (
            "IrisSegmentOptions.largest_component",
            offset_of!(IrisSegmentOptions, largest_component) as u64,
        ),
        (
            "IrisSegmentOptions.overlap",
            offset_of!(IrisSegmentOptions, overlap) as u64,
        ),
        (
            "IrisSegmentOptions.progress",
            offset_of!(IrisSegmentOptions, progress) as u64,
        ),
        (
            "IrisSegmentOptions.progress_user",
            offset_of!(IrisSegmentOptions, progress_user) as u64,
        ),
        (
            "IrisSegmentOptions.reserved",
            offset_of!(IrisSegmentOptions, reserved) as u64,
        ),
        (
            "IrisRetrieveOptions",
            size_of::<IrisRetrieveOptions>() as u64,
        ),
        (
            "IrisRetrieveOptions.level",
            offset_of!(IrisRetrieveOptions, level) as u64,
        ),
        (
            "IrisRetrieveOptions.top_k",
            offset_of!(IrisRetrieveOptions, top_k) as u64,
        ),
        (
            "IrisRetrieveOptions.initial",
            offset_of!(IrisRetrieveOptions, initial) as u64,
        ),
        (
            "IrisRetrieveOptions.reserved",
            offset_of!(IrisRetrieveOptions, reserved) as u64,
        ),
        (
            "IRIS_RETRIEVAL_LEVEL_OBJECT",
            IrisRetrievalLevel::Object as u64,
        ),
        (
            "IRIS_RETRIEVAL_LEVEL_IMAGE",
            IrisRetrievalLevel::Image as u64,
        ),
        ("IrisStatus", size_of::<IrisStatus>() as u64),
        ("IRIS_OK", IrisStatus::IrisOk as u64),
        (
            "IRIS_ERROR_NULL_POINTER",
            IrisStatus::IrisErrorNullPointer as u64,
        ),
        (
            "IRIS_ERROR_BUFFER_TOO_SMALL",
            IrisStatus::IrisErrorBufferTooSmall as u64,
        ),
        (
            "IRIS_ERROR_MODEL_MISMATCH",
            IrisStatus::IrisErrorModelMismatch as u64,
        ),
        ("IRIS_ERROR_PANIC", IrisStatus::IrisErrorPanic as u64),
        ("IRIS_ERROR_VERSION", IrisStatus::IrisErrorVersion as u64),
        (
            "IRIS_ERROR_EMPTY_MASK",
            IrisStatus::IrisErrorEmptyMask as u64,
        ),
        ("IRIS_DATA_TYPE_U8", IrisDataType::U8 as u64),
        ("IRIS_DATA_TYPE_U16", IrisDataType::U16 as u64),
        ("IRIS_DATA_TYPE_F64", IrisDataType::F64 as u64),
        ("IRIS_MODALITY_AUTO", IrisModality::Auto as u64),
        ("IRIS_MODALITY_MR", IrisModality::Mr as u64),
        ("IRIS_VERSION_MAJOR", u64::from(IRIS_VERSION_MAJOR)),
        ("IRIS_VERSION_MINOR", u64::from(IRIS_VERSION_MINOR)),
        ("IRIS_VERSION_PATCH", u64::from(IRIS_VERSION_PATCH)),
        ("IRIS_ABI_VERSION", u64::from(IRIS_ABI_VERSION)),
    ];
    for (name, value) in rust {
        assert_eq!(
            c.get(name),
            Some(&value),
            "{name}: C sees {:?}, Rust {value}",
            c.get(name)
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
