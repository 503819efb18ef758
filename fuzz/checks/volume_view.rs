//! The `volume_view` target's check: `IrisVolumeView`s built from fuzz bytes
//! (struct size, dtype, dims, spacing, affine with NaN, infinite, huge, zero
//! and negative entries, data size and alignment) through the C functions
//! that take views and need no model: `iris_dice` (two views) and
//! `iris_volume_write_nifti_labels`, whose file is read back with
//! `iris_volume_read_nifti` and `iris_volume_view`. (The model functions
//! check their views with the same code before they use the model.)
//!
//! Every call must return a status its documentation lists. The views never
//! lie about memory except in the one way the library must catch: the data
//! pointer always points into the fuzz buffer, and `data_bytes` is at most
//! the buffer's length unless it differs from what dims and dtype need (so
//! the library's own size check refuses it, as asserted). What succeeds
//! must make sense: a Dice score in [0, 1] (1 for a view against itself),
//! a written file that reads back with the same dims, voxels and placement.

use core::ffi::c_void;
use core::ptr::{null, null_mut};
use std::ffi::CString;
use std::sync::atomic::{AtomicU64, Ordering};

use iris::IrisStatus::{self, *};
use iris::{
    IrisVolumeView, iris_dice, iris_last_error, iris_volume_free, iris_volume_read_nifti,
    iris_volume_view, iris_volume_write_nifti_labels,
};

#[path = "input.rs"]
mod input;

use input::Input;

const VIEW_SIZE: u32 = size_of::<IrisVolumeView>() as u32;

pub fn check(data: &[u8]) {
    let mut input = Input::new(data);
    let a = Spec::read(&mut input);
    let b_mode = input.byte() % 4;
    let b = Spec::read(&mut input);
    let label = match input.byte() {
        n @ 0..0xf0 => u32::from(n % 8),
        _ => input.u32(),
    };
    let write_gz = input.byte() & 1 == 1;
    let voxels = Voxels::new(input.rest());

    let va = a.view(&voxels);
    let vb = b.view(&voxels);
    // The same label map described by a second struct.
    let copy = IrisVolumeView {
        struct_size: VIEW_SIZE,
        ..va
    };
    let (b_ptr, b_overclaims): (*const IrisVolumeView, bool) = match b_mode {
        0 => (&va, false),
        1 => (&vb, b.overclaims(&voxels)),
        2 => (&copy, false),
        _ => (null(), false),
    };
    let a_overclaims = a.overclaims(&voxels);
    dice(&va, b_ptr, label, a_overclaims || b_overclaims);
    write_labels(&va, &a, write_gz, a_overclaims);
}

/// The voxel bytes, twice: as the fuzz gave them, and one byte into a
/// second allocation so that a view can start unaligned.
struct Voxels {
    aligned: Vec<u8>,
    shifted: Vec<u8>,
}

impl Voxels {
    fn new(bytes: &[u8]) -> Voxels {
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(bytes);
        Voxels {
            aligned: bytes.to_vec(),
            shifted,
        }
    }

    fn get(&self, unaligned: bool) -> &[u8] {
        if unaligned {
            &self.shifted[1..]
        } else {
            &self.aligned
        }
    }
}

/// `iris_dice(a, b)`: a documented status; a score in [0, 1]; 1 when `b`
/// is `a`.
fn dice(a: &IrisVolumeView, b: *const IrisVolumeView, label: u32, overclaims: bool) {
    let mut score = f64::NAN;
    // SAFETY: the views point at live memory of at least what they claim,
    // or claim a size the library must refuse (`Spec::view`).
    let status = unsafe { iris_dice(a, b, label, &mut score) };
    expect_listed(
        "iris_dice",
        status,
        &[
            IrisOk,
            IrisErrorNullPointer,
            IrisErrorInvalidArgument,
            IrisErrorShape,
            IrisErrorBufferTooSmall,
            IrisErrorTooLarge,
            IrisErrorEmptyMask,
        ],
    );
    if status == IrisOk {
        assert!(
            !overclaims,
            "iris_dice read a view whose data_bytes is wrong"
        );
        assert!((0.0..=1.0).contains(&score), "Dice {score}");
        if same_label_map(a, b) {
            assert_eq!(score, 1.0, "Dice of a label map with itself");
        }
    }
}

/// Whether `b` describes the same voxels on the same grid as `a`.
fn same_label_map(a: &IrisVolumeView, b: *const IrisVolumeView) -> bool {
    // SAFETY: `b` is NULL or a live view.
    unsafe { b.as_ref() }.is_some_and(|b| {
        a.dtype == b.dtype
            && a.dims == b.dims
            && a.data == b.data
            && a.data_bytes == b.data_bytes
            && a.affine == b.affine
            && a.spacing_mm.map(f64::to_bits) == b.spacing_mm.map(f64::to_bits)
    })
}

/// Temporary files of this process get distinct names.
static FILES: AtomicU64 = AtomicU64::new(0);

/// `iris_volume_write_nifti_labels`: a documented status; what it writes
/// reads back as the same label map.
fn write_labels(view: &IrisVolumeView, spec: &Spec, gz: bool, overclaims: bool) {
    let path = std::env::temp_dir().join(format!(
        "iris-fuzz-volume-view-{}-{}.{}",
        std::process::id(),
        FILES.fetch_add(1, Ordering::Relaxed),
        if gz { "nii.gz" } else { "nii" }
    ));
    let c_path = CString::new(path.to_str().expect("a UTF-8 temp dir")).expect("no NUL");
    // SAFETY: as in `dice`; a valid path; `like` may be NULL.
    let status = unsafe { iris_volume_write_nifti_labels(c_path.as_ptr(), view, null()) };
    expect_listed(
        "iris_volume_write_nifti_labels",
        status,
        &[
            IrisOk,
            IrisErrorNullPointer,
            IrisErrorInvalidArgument,
            IrisErrorBufferTooSmall,
            IrisErrorTooLarge,
            IrisErrorIo,
            IrisErrorFormat,
        ],
    );
    if status != IrisOk {
        return;
    }
    assert!(!overclaims, "a view whose data_bytes is wrong was written");
    let mut volume = null_mut();
    // SAFETY: a valid path and out-pointer.
    let status = unsafe { iris_volume_read_nifti(c_path.as_ptr(), 1, &mut volume) };
    let _ = std::fs::remove_file(&path);
    assert_eq!(status, IrisOk, "reading back: {}", last_error());
    let mut back = IrisVolumeView {
        struct_size: VIEW_SIZE,
        dtype: 0,
        dims: [0; 3],
        spacing_mm: [0.0; 3],
        affine: null(),
        data: null(),
        data_bytes: 0,
    };
    // SAFETY: a live volume and a view struct of this header's size.
    assert_eq!(unsafe { iris_volume_view(volume, &mut back) }, IrisOk);
    assert_eq!(back.dims, view.dims, "dims read back");
    let count = view.dims.iter().product::<u64>() as usize;
    // SAFETY: a label map's view points at `count` u16 voxels it owns.
    let got = unsafe { core::slice::from_raw_parts(back.data.cast::<u16>(), count) };
    let want = spec.voxels(view);
    assert!(
        got.iter().map(|&v| f64::from(v)).eq(want),
        "voxels read back"
    );
    // SAFETY: a volume's view has a 16-double affine, and so does a written
    // view (`Spec::affine_of`).
    let (got, want) = unsafe {
        (
            core::slice::from_raw_parts(back.affine, 16),
            spec.affine_of(view),
        )
    };
    for (g, w) in got.iter().zip(want) {
        // NIfTI keeps the affine in single precision.
        assert!(
            (g - w).abs() <= 1e-6 * w.abs().max(1.0),
            "affine {got:?} read back for {want:?}"
        );
    }
    // SAFETY: `volume` came from iris_volume_read_nifti.
    unsafe { iris_volume_free(&mut volume) };
}

fn expect_listed(function: &str, status: IrisStatus, listed: &[IrisStatus]) {
    assert!(
        listed.contains(&status),
        "{function} returned {status:?}, which its documentation does not list: {}",
        last_error()
    );
}

fn last_error() -> String {
    // SAFETY: iris_last_error returns a NUL-terminated string.
    unsafe { core::ffi::CStr::from_ptr(iris_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// One view's fields as the fuzz bytes choose them. Zero bytes give a valid
/// `uint8` view of the whole buffer, `1 x 1 x len`.
struct Spec {
    struct_size: u32,
    dtype: u32,
    dims: [u64; 3],
    /// `dims[2]` is set to fill the buffer.
    fit: bool,
    spacing: [f64; 3],
    affine: Option<[f64; 16]>,
    null_data: bool,
    unaligned: bool,
    /// How `data_bytes` relates to what dims and dtype need.
    data_bytes: DataBytes,
}

enum DataBytes {
    Needed,
    Buffer,
    NeededMinusOne,
    NeededPlusOne,
    Raw(u64),
}

impl Spec {
    fn read(input: &mut Input) -> Spec {
        let struct_size = match input.byte() {
            0..0xf0 => VIEW_SIZE,
            n => [
                0,
                4,
                VIEW_SIZE - 8,
                VIEW_SIZE - 1,
                VIEW_SIZE + 1,
                VIEW_SIZE + 64,
                u32::MAX,
            ]
            .get(usize::from(n - 0xf0))
            .copied()
            .unwrap_or_else(|| input.u32()),
        };
        let dtype = match input.byte() {
            n @ 0..0xf0 => 1 + u32::from(n % 6),
            n => [0, 7, 8, 255, u32::MAX]
                .get(usize::from(n - 0xf0))
                .copied()
                .unwrap_or_else(|| input.u32()),
        };
        let fit = input.byte() < 0x80;
        let dims = [(); 3].map(|()| match input.byte() {
            n @ 0..0xf0 => 1 + u64::from(n % 8),
            n => [0, 1 << 31, (1 << 31) + 1, 1 << 32, 1 << 63, u64::MAX, 32768]
                .get(usize::from(n - 0xf0))
                .copied()
                .unwrap_or_else(|| input.u64()),
        });
        let spacing = [(); 3].map(|()| value(input, [1.0, 0.5, 2.0, 0.75, 3.0, 1.25, 0.1, 7.0]));
        let affine = affine(input, spacing);
        let data = input.byte();
        let data_bytes = match input.byte() {
            0..0xc0 => DataBytes::Needed,
            0xc0..0xe0 => DataBytes::Buffer,
            0xe0..0xf0 => DataBytes::NeededMinusOne,
            0xf0..0xf8 => DataBytes::NeededPlusOne,
            _ => DataBytes::Raw(input.u64()),
        };
        Spec {
            struct_size,
            dtype,
            dims,
            fit,
            spacing,
            affine,
            null_data: data == 0xff,
            unaligned: data & 1 == 1,
            data_bytes,
        }
    }

    /// Bytes per voxel of a valid dtype.
    fn size(&self) -> Option<u64> {
        [1, 2, 2, 4, 4, 8]
            .get(usize::try_from(self.dtype).ok()?.checked_sub(1)?)
            .copied()
    }

    fn dims(&self, buffer_len: u64) -> [u64; 3] {
        let mut dims = self.dims;
        if self.fit {
            let per_row = dims[0]
                .checked_mul(dims[1])
                .and_then(|n| n.checked_mul(self.size().unwrap_or(1)));
            dims[2] = per_row.map_or(1, |n| (buffer_len / n.max(1)).max(1));
        }
        dims
    }

    /// What dims and dtype need, when both are valid and the product fits.
    fn needed(&self, dims: [u64; 3]) -> Option<u128> {
        dims.iter().try_fold(u128::from(self.size()?), |n, &d| {
            n.checked_mul(u128::from(d))
        })
    }

    /// A view of `voxels`: see the module's note on memory.
    fn view(&self, voxels: &Voxels) -> IrisVolumeView {
        let buffer = voxels.get(self.unaligned);
        let len = buffer.len() as u64;
        let dims = self.dims(len);
        let needed = self.needed(dims);
        let clamp = |n: u128| u64::try_from(n).unwrap_or(u64::MAX);
        let mut data_bytes = match self.data_bytes {
            DataBytes::Needed => needed.map_or(len, clamp),
            DataBytes::Buffer => len,
            DataBytes::NeededMinusOne => needed.map_or(len, |n| clamp(n.saturating_sub(1))),
            DataBytes::NeededPlusOne => needed.map_or(len, |n| clamp(n + 1)),
            DataBytes::Raw(n) => n,
        };
        if data_bytes > len && needed == Some(u128::from(data_bytes)) {
            // Right for the shape but more than there is: the library could
            // not tell, so never claim it.
            data_bytes = len;
        }
        IrisVolumeView {
            struct_size: self.struct_size,
            dtype: self.dtype,
            dims,
            spacing_mm: self.spacing,
            affine: self.affine.as_ref().map_or(null(), |a| a.as_ptr()),
            data: if self.null_data {
                null()
            } else {
                buffer.as_ptr().cast::<c_void>()
            },
            data_bytes,
        }
    }

    /// Whether the view of `voxels` claims more bytes than it has (the
    /// library must refuse it).
    fn overclaims(&self, voxels: &Voxels) -> bool {
        self.view(voxels).data_bytes > voxels.get(self.unaligned).len() as u64
    }

    /// A written view's voxels as numbers, read as the library reads them.
    fn voxels(&self, view: &IrisVolumeView) -> impl Iterator<Item = f64> {
        let size = self.size().expect("a written view has a valid dtype") as usize;
        // SAFETY: a view the library wrote holds data_bytes readable bytes.
        let bytes = unsafe {
            core::slice::from_raw_parts(view.data.cast::<u8>(), view.data_bytes as usize)
        };
        let dtype = self.dtype;
        bytes.chunks_exact(size).map(move |c| match dtype {
            1 => f64::from(c[0]),
            2 => f64::from(i16::from_ne_bytes([c[0], c[1]])),
            3 => f64::from(u16::from_ne_bytes([c[0], c[1]])),
            4 => f64::from(i32::from_ne_bytes([c[0], c[1], c[2], c[3]])),
            5 => f64::from(f32::from_ne_bytes([c[0], c[1], c[2], c[3]])),
            _ => f64::from_ne_bytes(c.try_into().expect("8 bytes")),
        })
    }

    /// The affine a view stands for, row-major.
    fn affine_of(&self, view: &IrisVolumeView) -> [f64; 16] {
        self.affine.unwrap_or_else(|| {
            let mut a = [0.0; 16];
            for axis in 0..3 {
                a[axis * 5] = view.spacing_mm[axis];
            }
            a[15] = 1.0;
            a
        })
    }
}

/// A number: mostly one of `usual`, else an edge case or raw bits.
fn value(input: &mut Input, usual: [f64; 8]) -> f64 {
    match input.byte() {
        n @ 0..0xc0 => usual[usize::from(n % 8)],
        n => [
            0.0,
            -0.0,
            -1.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN_POSITIVE,
            5e-324,
            1e-300,
            1e300,
            f64::MAX,
            1e-5,
            1e12,
            -1e12,
        ]
        .get(usize::from(n - 0xc0))
        .copied()
        .unwrap_or_else(|| f64::from_bits(input.u64())),
    }
}

/// NULL (the spacing's diagonal), or 16 doubles: axis-aligned with an
/// offset, axes permuted and flipped, rotated, one entry replaced, two
/// columns parallel (not invertible), a bad last row, or every entry chosen.
fn affine(input: &mut Input, spacing: [f64; 3]) -> Option<[f64; 16]> {
    let offsets = [-100.0, 0.0, 12.5, -7.25, 300.0, 1.0, -1.0, 0.5];
    let mode = input.byte() % 8;
    if mode == 0 || mode == 7 {
        return None;
    }
    let mut columns = [[0.0; 3]; 3];
    for (axis, column) in columns.iter_mut().enumerate() {
        column[axis] = spacing[axis];
    }
    match mode {
        2 => {
            // A permutation of the world axes, with flips.
            let perm = [
                [0, 1, 2],
                [0, 2, 1],
                [1, 0, 2],
                [1, 2, 0],
                [2, 0, 1],
                [2, 1, 0],
            ][usize::from(input.byte() % 6)];
            let signs = input.byte();
            for axis in 0..3 {
                columns[axis] = [0.0; 3];
                let sign = if signs >> axis & 1 == 1 { -1.0 } else { 1.0 };
                columns[axis][perm[axis]] = sign * spacing[axis];
            }
        }
        3 => {
            let angle = f64::from(input.byte()) * core::f64::consts::PI / 128.0;
            let (s, c) = angle.sin_cos();
            columns[0] = [c * spacing[0], s * spacing[0], 0.0];
            columns[1] = [-s * spacing[1], c * spacing[1], 0.0];
        }
        5 => columns[1] = [spacing[1], 0.0, 0.0],
        _ => {}
    }
    let mut a = [0.0; 16];
    for (col, column) in columns.iter().enumerate() {
        for row in 0..3 {
            a[row * 4 + col] = column[row];
        }
    }
    for row in 0..3 {
        a[row * 4 + 3] = value(input, offsets);
    }
    a[15] = 1.0;
    match mode {
        4 => a[usize::from(input.byte() % 16)] = value(input, offsets),
        6 => a[12 + usize::from(input.byte() % 3)] = value(input, offsets),
        1 if input.byte() == 0xff => a = [(); 16].map(|()| value(input, offsets)),
        _ => {}
    }
    Some(a)
}
