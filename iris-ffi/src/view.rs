//! Volumes in caller memory: [`IrisVolumeView`] and its conversion to
//! `iris-core` images and label maps.

use core::ffi::c_void;

use iris_core::volume::{Affine, Geometry, Image, LabelMap, checked_voxel_count};

use crate::args::{self, Versioned};
use crate::status::{Failure, FfiResult, IrisStatus};

/// The type of the voxels of a volume (the `dtype` field of
/// `IrisVolumeView`), in native byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrisDataType {
    /// `uint8_t`.
    U8 = 1,
    /// `int16_t`.
    I16 = 2,
    /// `uint16_t`.
    U16 = 3,
    /// `int32_t`.
    I32 = 4,
    /// `float`.
    F32 = 5,
    /// `double`.
    F64 = 6,
}

impl IrisDataType {
    const ALL: [IrisDataType; 6] = [
        IrisDataType::U8,
        IrisDataType::I16,
        IrisDataType::U16,
        IrisDataType::I32,
        IrisDataType::F32,
        IrisDataType::F64,
    ];

    pub(crate) fn from_code(code: u32, name: &str) -> FfiResult<IrisDataType> {
        IrisDataType::ALL
            .into_iter()
            .find(|d| *d as u32 == code)
            .ok_or_else(|| {
                Failure::invalid(format!(
                    "`{name}` = {code} is not an IrisDataType (U8 = 1, I16 = 2, U16 = 3, I32 = 4, \
                     F32 = 5, F64 = 6)"
                ))
            })
    }

    /// Bytes per voxel.
    pub(crate) fn size(self) -> usize {
        match self {
            IrisDataType::U8 => 1,
            IrisDataType::I16 | IrisDataType::U16 => 2,
            IrisDataType::I32 | IrisDataType::F32 => 4,
            IrisDataType::F64 => 8,
        }
    }

    /// One voxel (`self.size()` bytes, native order) as `f64`, which holds
    /// every supported type exactly.
    fn value(self, c: &[u8]) -> f64 {
        fn arr<const N: usize>(c: &[u8]) -> [u8; N] {
            let mut a = [0u8; N];
            a.copy_from_slice(&c[..N]);
            a
        }
        match self {
            IrisDataType::U8 => f64::from(c[0]),
            IrisDataType::I16 => f64::from(i16::from_ne_bytes(arr(c))),
            IrisDataType::U16 => f64::from(u16::from_ne_bytes(arr(c))),
            IrisDataType::I32 => f64::from(i32::from_ne_bytes(arr(c))),
            IrisDataType::F32 => f64::from(f32::from_ne_bytes(arr(c))),
            IrisDataType::F64 => f64::from_ne_bytes(arr(c)),
        }
    }
}

/// A 3-D volume in memory that the caller owns: an intensity image or a
/// label map, described for libiris to read (or, from `iris_volume_view`,
/// a description of a volume libiris owns).
///
/// Axis order is C order `[D, H, W]`: `W` varies fastest in memory, so
/// voxel `[d, h, w]` is element `(d * H + h) * W + w`. For a NIfTI volume
/// `D, H, W` are its `k, j, i` axes (slices, rows, columns).
///
/// Set `struct_size` to `sizeof(IrisVolumeView)`: it lets later versions add
/// fields at the end without breaking programs built against this header.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IrisVolumeView {
    /// `sizeof(IrisVolumeView)`.
    pub struct_size: u32,
    /// An `IrisDataType` value: the type of every voxel, native byte order.
    pub dtype: u32,
    /// Size `[D, H, W]` in voxels, each at least 1 and at most 2^31 voxels
    /// in all.
    pub dims: [u64; 3],
    /// Voxel spacing in millimetres along `[D, H, W]`, finite and > 0.
    pub spacing_mm: [f64; 3],
    /// NULL for an axis-aligned grid with the origin at voxel 0 (the affine
    /// diag(spacing_mm)); otherwise 16 doubles, row-major, the 4x4 matrix
    /// mapping voxel `[d, h, w, 1]` to world RAS+ millimetres. Its columns
    /// must have the lengths of `spacing_mm` and its last row must be
    /// `0 0 0 1`. Borrowed: read during the call only.
    pub affine: *const f64,
    /// The voxels, `dims[0] * dims[1] * dims[2]` values of `dtype`, C order.
    /// Any alignment. Borrowed: read during the call only.
    pub data: *const c_void,
    /// Size of `data` in bytes: exactly voxels times the size of `dtype`.
    pub data_bytes: u64,
}

impl Versioned for IrisVolumeView {
    const NAME: &'static str = "IrisVolumeView";
}

/// Affine columns may differ from `spacing_mm` by this fraction.
const SPACING_TOLERANCE: f64 = 1e-4;

/// A checked view: its grid and a borrow of its voxel bytes.
pub(crate) struct CheckedView<'a> {
    pub(crate) geometry: Geometry,
    pub(crate) dtype: IrisDataType,
    pub(crate) bytes: &'a [u8],
}

/// The grid a view describes (dims, spacing, affine), checked.
pub(crate) fn view_geometry(view: &IrisVolumeView, name: &str) -> FfiResult<Geometry> {
    if let Some(axis) = view.dims.iter().position(|&d| d == 0) {
        return Err(Failure::invalid(format!(
            "`{name}.dims` = {:?}: dimension {axis} is zero",
            view.dims
        )));
    }
    let too_large = || {
        Failure::new(
            IrisStatus::IrisErrorTooLarge,
            format!("`{name}.dims` = {:?} is too large", view.dims),
        )
    };
    let mut shape = [0usize; 3];
    for (s, &d) in shape.iter_mut().zip(&view.dims) {
        *s = usize::try_from(d).map_err(|_| too_large())?;
    }
    checked_voxel_count(shape)
        .map_err(|e| Failure::new(IrisStatus::IrisErrorTooLarge, format!("`{name}.dims`: {e}")))?;
    let spacing = view.spacing_mm;
    if !spacing.iter().all(|s| s.is_finite() && *s > 0.0) {
        return Err(Failure::invalid(format!(
            "`{name}.spacing_mm` = {spacing:?}: every spacing must be finite and > 0"
        )));
    }
    let affine = if view.affine.is_null() {
        Affine::from_spacing(spacing)
    } else {
        // SAFETY: a non-NULL `affine` points to 16 doubles (IrisVolumeView's contract).
        let values = unsafe { args::slice(view.affine, 16, "affine") }?;
        let affine = Affine(core::array::from_fn(|r| {
            core::array::from_fn(|c| values[r * 4 + c])
        }));
        check_affine(&affine, spacing, name)?;
        affine
    };
    Ok(Geometry::new(shape, affine)?)
}

fn check_affine(affine: &Affine, spacing: [f64; 3], name: &str) -> FfiResult {
    if !affine.is_valid() {
        return Err(Failure::invalid(format!(
            "`{name}.affine` = {:?}: entries must be finite and the last row 0 0 0 1",
            affine.0
        )));
    }
    let columns = affine.spacing();
    for axis in 0..3 {
        if (columns[axis] - spacing[axis]).abs() > SPACING_TOLERANCE * spacing[axis] {
            return Err(Failure::invalid(format!(
                "`{name}.affine` column {axis} has length {} mm but `{name}.spacing_mm[{axis}]` is \
                 {} mm: they must agree",
                columns[axis], spacing[axis]
            )));
        }
    }
    Ok(())
}

/// Checks a caller's view (NULL, `struct_size`, dtype, dims, spacing,
/// affine, data size) and borrows its bytes.
///
/// # Safety
/// A non-NULL `view` must point to an `IrisVolumeView` whose `affine` and
/// `data` pointers, when non-NULL, point to what its fields say.
pub(crate) unsafe fn check_view<'a>(
    view: *const IrisVolumeView,
    name: &str,
) -> FfiResult<CheckedView<'a>> {
    // SAFETY: forwarded to the caller.
    let v = unsafe { args::versioned(view, name) }?;
    let dtype = IrisDataType::from_code(v.dtype, &format!("{name}.dtype"))?;
    let geometry = view_geometry(&v, name)?;
    let expected = (geometry.len() as u64)
        .checked_mul(dtype.size() as u64)
        .ok_or_else(|| {
            Failure::new(
                IrisStatus::IrisErrorTooLarge,
                format!("`{name}` is too large"),
            )
        })?;
    if v.data_bytes < expected {
        return Err(Failure::too_small(
            &format!("{name}.data"),
            expected,
            v.data_bytes,
            "bytes",
        ));
    }
    if v.data_bytes > expected {
        return Err(Failure::invalid(format!(
            "`{name}.data_bytes` is {}, expected exactly {expected} bytes ({:?} voxels of {} bytes): \
             check dims and dtype",
            v.data_bytes,
            v.dims,
            dtype.size()
        )));
    }
    let len = args::length(expected, &format!("{name}.data_bytes"))?;
    // SAFETY: `data` points to `data_bytes` (= len) readable bytes (the view's contract).
    let bytes = unsafe { args::slice(v.data.cast::<u8>(), len, &format!("{name}.data")) }?;
    Ok(CheckedView {
        geometry,
        dtype,
        bytes,
    })
}

impl CheckedView<'_> {
    fn values(&self) -> impl Iterator<Item = f64> + '_ {
        self.bytes
            .chunks_exact(self.dtype.size())
            .map(|c| self.dtype.value(c))
    }

    /// The voxels as an intensity image (`float`; `double` is rounded).
    pub(crate) fn to_image(&self) -> FfiResult<Image> {
        let voxels = self.values().map(|v| v as f32).collect();
        Ok(Image::from_vec(
            self.geometry.shape(),
            self.geometry.affine(),
            voxels,
        )?)
    }

    /// The voxels as a label map: every value must be an integer in
    /// `0..=65535`; the first that is not is named.
    pub(crate) fn to_labels(&self, name: &str) -> FfiResult<LabelMap> {
        let mut voxels = Vec::with_capacity(self.geometry.len());
        for (i, v) in self.values().enumerate() {
            if !(v.fract() == 0.0 && (0.0..=65535.0).contains(&v)) {
                let [_, h, w] = self.geometry.shape();
                return Err(Failure::invalid(format!(
                    "`{name}` voxel [{}, {}, {}] is {v}: labels must be integers in 0..=65535",
                    i / (h * w),
                    i / w % h,
                    i % w
                )));
            }
            voxels.push(v as u16);
        }
        Ok(LabelMap::from_vec(
            self.geometry.shape(),
            self.geometry.affine(),
            voxels,
        )?)
    }
}
