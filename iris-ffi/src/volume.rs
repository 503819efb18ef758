//! `IrisVolume`: volumes libiris reads from NIfTI files and owns; writing
//! label maps; Dice of two label maps.

use core::ffi::c_char;

use iris_core::labels::label_value;
use iris_core::metrics::dice_per_class;
use iris_core::nifti::{self, NiftiInfo};
use iris_core::pipeline::Limits;
use iris_core::volume::{Geometry, Image, LabelMap, Volume};

use crate::args;
use crate::model;
use crate::status::{Failure, FfiResult, IrisStatus, guard};
use crate::view::{IrisDataType, IrisVolumeView, check_view};

/// A volume read by libiris: an intensity image (`float` voxels) or a label
/// map (`uint16_t` voxels), with its grid and the header it came from.
/// Opaque; made by `iris_volume_read_nifti`, looked at through
/// `iris_volume_view`, freed with `iris_volume_free`. Never modified after
/// it is made, so it may be read from several threads at once.
pub struct IrisVolume {
    voxels: Voxels,
    /// The affine, row-major, for `IrisVolumeView::affine` to point at.
    affine: [f64; 16],
    info: NiftiInfo,
}

enum Voxels {
    Image(Image),
    Labels(LabelMap),
}

impl IrisVolume {
    fn geometry(&self) -> &Geometry {
        match &self.voxels {
            Voxels::Image(v) => v.geometry(),
            Voxels::Labels(v) => v.geometry(),
        }
    }
}

/// `volume` with its voxels contiguous in C order, so a view can point at them.
fn contiguous<T: Clone>(volume: Volume<T>) -> FfiResult<Volume<T>> {
    if volume.data().is_standard_layout() {
        return Ok(volume);
    }
    let (data, geometry) = volume.into_parts();
    Ok(Volume::with_geometry(
        data.as_standard_layout().into_owned(),
        geometry,
    )?)
}

/// Reads a NIfTI-1 file (`.nii`, `.nii.gz`, `.hdr`/`.img`) into a volume
/// libiris owns.
///
/// `as_labels`: 0 reads an intensity image (voxels as `float`, scaled by
/// `scl_slope`/`scl_inter`); 1 reads a label map (voxels as `uint16_t`; every
/// value must be an integer in 0..65535). The axes become `[D, H, W] =
/// [k, j, i]` and the affine (sform, else qform, as nibabel) maps
/// `[d, h, w, 1]` to RAS+ mm. On success `*out` is a new volume that the
/// caller owns and frees with `iris_volume_free`; on failure `*out` is NULL.
///
/// Returns `IRIS_OK`, `IRIS_ERROR_NULL_POINTER`, `IRIS_ERROR_INVALID_ARGUMENT`,
/// `IRIS_ERROR_IO`, `IRIS_ERROR_FORMAT`, `IRIS_ERROR_TOO_LARGE`.
///
/// The volume (raw and decoded voxels together) may take up to 4 GiB; more
/// is `IRIS_ERROR_TOO_LARGE`, decided from the header before any voxel is
/// read. `iris_volume_read_nifti_with` sets another budget.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_volume_read_nifti(
    path: *const c_char,
    as_labels: u32,
    out: *mut *mut IrisVolume,
) -> IrisStatus {
    // SAFETY: forwarded; NULL options are the defaults.
    unsafe { iris_volume_read_nifti_with(path, as_labels, core::ptr::null(), out) }
}

/// Settings of `iris_volume_read_nifti_with`. Initialise with
/// `iris_read_options_default`, then change fields. ABI 0.3.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IrisReadOptions {
    /// `sizeof(IrisReadOptions)` (set by the `_default` function).
    pub struct_size: u32,
    /// Must be zero.
    pub reserved0: u32,
    /// Most bytes reading may take (the file's voxels as stored plus the
    /// decoded volume), checked against the header before any voxel is
    /// read: more is `IRIS_ERROR_TOO_LARGE` with the size needed. 0 (the
    /// default): 4 GiB.
    pub memory_budget: u64,
    /// Must be zero (room for later fields).
    pub reserved: [u64; 6],
}

impl args::Versioned for IrisReadOptions {
    const NAME: &'static str = "IrisReadOptions";
}

/// Fills `options` with the defaults of every field (including
/// `struct_size`). ABI 0.3.
///
/// Returns `IRIS_OK` or `IRIS_ERROR_NULL_POINTER`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_read_options_default(options: *mut IrisReadOptions) -> IrisStatus {
    guard(|| {
        // SAFETY: `options` is valid or NULL per this function's contract
        // (a caller struct of this header's size; written, not read).
        let options = unsafe { args::borrow_mut(options, "options") }?;
        *options = IrisReadOptions {
            struct_size: size_of::<IrisReadOptions>() as u32,
            reserved0: 0,
            memory_budget: 0,
            reserved: [0; 6],
        };
        Ok(())
    })
}

/// `iris_volume_read_nifti` with settings: `options` (nullable; NULL for the
/// defaults) sets the memory budget reading may use. ABI 0.3.
///
/// Returns as `iris_volume_read_nifti`; `IRIS_ERROR_INVALID_ARGUMENT` for
/// options with a wrong `struct_size` or non-zero reserved fields.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_volume_read_nifti_with(
    path: *const c_char,
    as_labels: u32,
    options: *const IrisReadOptions,
    out: *mut *mut IrisVolume,
) -> IrisStatus {
    guard(|| {
        // SAFETY: pointers are valid or NULL per this function's contract.
        let slot = unsafe { args::out_handle(out, "out") }?;
        // SAFETY: as above.
        let path = unsafe { args::path(path, "path") }?;
        let mut limits = Limits::default();
        if !options.is_null() {
            // SAFETY: a non-NULL `options` is a valid struct (the caller's guarantee).
            let o = unsafe { args::versioned(options, "options") }?;
            if o.reserved0 != 0 {
                return Err(Failure::invalid(format!(
                    "`options.reserved0` is {}, expected 0 (initialise the struct with \
                     iris_read_options_default)",
                    o.reserved0
                )));
            }
            args::check_reserved(&o.reserved, "options")?;
            limits = model::limits(o.memory_budget, 0);
        }
        let (voxels, info) = match as_labels {
            0 => {
                let (image, info) = nifti::read_image_with(&path, &limits)?;
                (Voxels::Image(contiguous(image)?), info)
            }
            1 => {
                let (labels, info) = nifti::read_labels_with(&path, &limits)?;
                (Voxels::Labels(contiguous(labels)?), info)
            }
            other => {
                return Err(Failure::invalid(format!(
                    "`as_labels` is {other}, expected 0 (image) or 1 (label map)"
                )));
            }
        };
        let mut volume = IrisVolume {
            voxels,
            affine: [0.0; 16],
            info,
        };
        let a = volume.geometry().affine().0;
        volume.affine = core::array::from_fn(|i| a[i / 4][i % 4]);
        args::give(slot, volume);
        Ok(())
    })
}

/// Describes a volume libiris owns, to read its voxels or to pass it to any
/// function that takes an `IrisVolumeView`.
///
/// `out`: a caller struct whose `struct_size` the caller has set to
/// `sizeof(IrisVolumeView)`; every other field is written. `dtype` is
/// `IRIS_DATA_TYPE_F32` for an image and `IRIS_DATA_TYPE_U16` for a label
/// map. Ownership: `out->data` and `out->affine` point into `volume`; they
/// are borrowed, read-only, and valid until `iris_volume_free(&volume)`.
///
/// Returns `IRIS_OK`, `IRIS_ERROR_NULL_POINTER`, `IRIS_ERROR_INVALID_ARGUMENT`
/// (`struct_size` too small).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_volume_view(
    volume: *const IrisVolume,
    out: *mut IrisVolumeView,
) -> IrisStatus {
    guard(|| {
        // SAFETY: `out` is valid or NULL per this function's contract; its
        // `struct_size` says whether it is large enough to be written.
        unsafe { args::check_size(out.cast_const(), "out") }?;
        // SAFETY: as above.
        let out = unsafe { args::borrow_mut(out, "out") }?;
        // SAFETY: `volume` is valid or NULL per this function's contract.
        let volume = unsafe { args::borrow(volume, "volume") }?;
        let (dtype, data, data_bytes) = match &volume.voxels {
            Voxels::Image(v) => (
                IrisDataType::F32,
                v.data().as_ptr().cast(),
                v.data().len() * size_of::<f32>(),
            ),
            Voxels::Labels(v) => (
                IrisDataType::U16,
                v.data().as_ptr().cast(),
                v.data().len() * size_of::<u16>(),
            ),
        };
        let geometry = volume.geometry();
        out.dtype = dtype as u32;
        out.dims = geometry.shape().map(|d| d as u64);
        out.spacing_mm = geometry.spacing();
        out.affine = volume.affine.as_ptr();
        out.data = data;
        out.data_bytes = data_bytes as u64;
        Ok(())
    })
}

/// Writes a label map to a NIfTI-1 file (`.nii` or `.nii.gz`, chosen by the
/// name), atomically, as `uint8` when every label is at most 255 and as
/// `uint16` otherwise, with `intent_code` NIFTI_INTENT_LABEL.
///
/// `labels`: any integer (or integral float) type with values in 0..65535,
/// placed by its own dims, spacing and affine (borrowed). `like`
/// (nullable): a volume read from NIfTI whose header codes and description
/// are copied (its geometry is not: pass the affine through `labels`).
///
/// Returns `IRIS_OK`, `IRIS_ERROR_NULL_POINTER`, `IRIS_ERROR_INVALID_ARGUMENT`,
/// `IRIS_ERROR_BUFFER_TOO_SMALL`, `IRIS_ERROR_TOO_LARGE`, `IRIS_ERROR_IO`,
/// `IRIS_ERROR_FORMAT` (e.g. a dimension above 32767 or another extension).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_volume_write_nifti_labels(
    path: *const c_char,
    labels: *const IrisVolumeView,
    like: *const IrisVolume,
) -> IrisStatus {
    guard(|| {
        // SAFETY: pointers are valid or NULL per this function's contract.
        let path = unsafe { args::path(path, "path") }?;
        // SAFETY: as above.
        let labels = unsafe { check_view(labels, "labels") }?.to_labels("labels")?;
        // SAFETY: `like` is NULL or a valid volume per this function's contract.
        let like = unsafe { like.as_ref() }.map(|v| &v.info);
        Ok(nifti::write_labels(&path, &labels, like)?)
    })
}

/// Dice coefficient `2 * |A and B| / (|A| + |B|)` of the voxels labelled
/// `label` in two label maps on the same grid (same dims; affines equal
/// within 1e-4 mm), into `*dice` (in [0, 1]).
///
/// `a`, `b`: label maps of any integer (or integral float) type, borrowed.
///
/// Returns `IRIS_OK`, `IRIS_ERROR_NULL_POINTER`, `IRIS_ERROR_INVALID_ARGUMENT`
/// (label above 65535, different placement), `IRIS_ERROR_SHAPE` (different
/// dims), `IRIS_ERROR_BUFFER_TOO_SMALL`, `IRIS_ERROR_TOO_LARGE` (dims past
/// 2^31 voxels), `IRIS_ERROR_EMPTY_MASK` (the label is
/// in neither map, so Dice is undefined: decide yourself whether that counts
/// as agreement).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_dice(
    a: *const IrisVolumeView,
    b: *const IrisVolumeView,
    label: u32,
    dice: *mut f64,
) -> IrisStatus {
    guard(|| {
        // SAFETY: pointers are valid or NULL per this function's contract.
        let dice = unsafe { args::borrow_mut(dice, "dice") }?;
        // SAFETY: as above.
        let a = unsafe { check_view(a, "a") }?.to_labels("a")?;
        // SAFETY: as above.
        let b = unsafe { check_view(b, "b") }?.to_labels("b")?;
        match dice_per_class(&a, &b, &[label_value(label)?])?
            .first()
            .copied()
            .flatten()
        {
            Some(score) => {
                *dice = score;
                Ok(())
            }
            None => Err(Failure::new(
                IrisStatus::IrisErrorEmptyMask,
                format!("label {label} is in neither label map: Dice is undefined"),
            )),
        }
    })
}

/// Frees a volume and sets `*volume` to NULL; views of it become invalid.
/// `volume == NULL` and `*volume == NULL` are allowed and do nothing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_volume_free(volume: *mut *mut IrisVolume) {
    guard(|| {
        // SAFETY: `volume` is NULL or points to NULL or a live volume (this function's contract).
        unsafe { args::free_handle(volume) };
        Ok(())
    });
}
