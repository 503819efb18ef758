//! NIfTI-1 files: `.nii`, `.nii.gz` and `.hdr`/`.img` pairs in, `.nii` and
//! `.nii.gz` out (needs the `std` feature).
//!
//! # Axes
//! A NIfTI file stores voxels with `i` fastest, then `j`, then `k` (Fortran
//! order over `(i, j, k)`). That byte order *is* C order over `[k, j, i]`, so
//! volumes are read without any copy-transpose as `[D, H, W] = [k, j, i]`,
//! and the NIfTI affine (acting on `(i, j, k)`) becomes an [`Affine`] acting
//! on `[d, h, w] = (k, j, i)` by swapping its columns 0 and 2. Writing does
//! the reverse: a volume written and read back has identical voxels, and
//! its affine to `float32` precision (NIfTI stores affines as `float32`).
//!
//! # Rules (those of nibabel)
//! - Affine: the sform when `sform_code != 0`, else the qform (quaternion,
//!   `pixdim`, and `qfac` = -1 when `pixdim[0]` is -1, else 1) when
//!   `qform_code != 0`, else a
//!   `pixdim`-only fallback (x flipped, centred). When both are set and
//!   disagree by more than 1e-3 mm the sform is kept and
//!   [`NiftiInfo::warnings`] says so.
//! - Scaling: `value = scl_slope * stored + scl_inter`, unless `scl_slope` is
//!   0 or not finite (no scaling).
//! - Data types: `uint8`, `int8`, `int16`, `uint16`, `int32`, `uint32`,
//!   `float32`, `float64`; either byte order.
//! - Dimensions: 1-D to 3-D data, or more dimensions whose extra sizes are all
//!   1 (a 4-D file with one time point). A real time series is refused: pick
//!   one volume first.
//!
//! Outputs carry the affine as both sform and qform (the qform is left unset
//! when the affine has shear, which a quaternion cannot express), `pixdim`
//! matching the affine, units mm, and optionally the codes and description of
//! the file they were derived from (see [`write_image`]). Writes go to a
//! temporary file in the same folder that is renamed over the target, so a
//! failed write never leaves a half-written file.
//!
//! ```
//! use iris_core::nifti::{read_image, write_image};
//! use iris_core::volume::{Affine, Image};
//!
//! let dir = std::env::temp_dir().join(format!("iris-doc-nifti-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let path = dir.join("ramp.nii.gz");
//! let image = Image::from_vec([2, 3, 4], Affine::from_spacing([3.0, 1.0, 0.5]),
//!                             (0..24).map(|v| v as f32).collect())?;
//! write_image(&path, &image, None)?;
//! let (back, info) = read_image(&path)?;
//! assert_eq!(back.data(), image.data());
//! assert_eq!(back.geometry().spacing(), [3.0, 1.0, 0.5]);
//! assert!(info.warnings.is_empty());
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::bufread::MultiGzDecoder;
use ndarray::Array3;
use nifti::writer::WriterOptions;
use nifti::{Endianness, NiftiError, NiftiHeader};

use crate::error::{Error, Result};
use crate::pipeline::{Limits, size_text};
use crate::volume::{Affine, Geometry, Image, LabelMap, MAX_VOXELS, Volume};

/// Size of a NIfTI-1 header in bytes (`sizeof_hdr`).
const HEADER_LEN: usize = 348;
/// First byte of the voxels in a single-file NIfTI-1 without extensions.
const MIN_SINGLE_FILE_OFFSET: u64 = 352;
/// Largest dimension NIfTI-1 can store (`dim` is `int16`).
const MAX_DIM: usize = i16::MAX as usize;
/// sform/qform disagreement (mm, any matrix entry) that is reported.
const XFORM_TOLERANCE: f64 = 1e-3;
/// `xyzt_units` code for millimetres.
const UNITS_MM: u8 = 2;
/// `intent_code` NIFTI_INTENT_LABEL, written on label maps.
const INTENT_LABEL: i16 = 1002;
/// `sform_code`/`qform_code` NIFTI_XFORM_ALIGNED_ANAT, used when no source says otherwise.
const XFORM_ALIGNED: i16 = 2;

/// The voxel type stored in a NIfTI file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datatype {
    /// `uint8` (code 2).
    U8,
    /// `int8` (code 256).
    I8,
    /// `int16` (code 4).
    I16,
    /// `uint16` (code 512).
    U16,
    /// `int32` (code 8).
    I32,
    /// `uint32` (code 768).
    U32,
    /// `float32` (code 16).
    F32,
    /// `float64` (code 64).
    F64,
}

impl Datatype {
    const ALL: [Datatype; 8] = [
        Datatype::U8,
        Datatype::I8,
        Datatype::I16,
        Datatype::U16,
        Datatype::I32,
        Datatype::U32,
        Datatype::F32,
        Datatype::F64,
    ];

    /// The NIfTI `datatype` code.
    pub fn code(self) -> i16 {
        match self {
            Datatype::U8 => 2,
            Datatype::I8 => 256,
            Datatype::I16 => 4,
            Datatype::U16 => 512,
            Datatype::I32 => 8,
            Datatype::U32 => 768,
            Datatype::F32 => 16,
            Datatype::F64 => 64,
        }
    }

    /// Bytes per voxel.
    pub fn size(self) -> usize {
        match self {
            Datatype::U8 | Datatype::I8 => 1,
            Datatype::I16 | Datatype::U16 => 2,
            Datatype::I32 | Datatype::U32 | Datatype::F32 => 4,
            Datatype::F64 => 8,
        }
    }

    /// The type's name as numpy spells it (`"int16"`).
    pub fn name(self) -> &'static str {
        match self {
            Datatype::U8 => "uint8",
            Datatype::I8 => "int8",
            Datatype::I16 => "int16",
            Datatype::U16 => "uint16",
            Datatype::I32 => "int32",
            Datatype::U32 => "uint32",
            Datatype::F32 => "float32",
            Datatype::F64 => "float64",
        }
    }

    fn from_code(code: i16) -> Option<Datatype> {
        Datatype::ALL.into_iter().find(|d| d.code() == code)
    }
}

/// Which header fields gave a file's voxel-to-world transform.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AffineSource {
    /// `srow_x/y/z` (`sform_code != 0`).
    Sform,
    /// The quaternion, offsets and `pixdim` (`qform_code != 0`, `sform_code == 0`).
    Qform,
    /// Neither code set: spacing from `pixdim`, x flipped, origin at the centre.
    Pixdim,
}

impl AffineSource {
    fn describe(self) -> &'static str {
        match self {
            AffineSource::Sform => "sform",
            AffineSource::Qform => "qform",
            AffineSource::Pixdim => "pixdim-only affine",
        }
    }
}

/// What a NIfTI header said beyond the voxels and geometry, and what was
/// questionable about it. Pass it to [`write_image`] / [`write_labels`] to
/// write an output "like" its source.
#[derive(Clone, Debug)]
pub struct NiftiInfo {
    /// The stored voxel type (before scaling).
    pub datatype: Datatype,
    /// Where the affine came from.
    pub affine_source: AffineSource,
    /// `sform_code` as stored.
    pub sform_code: i16,
    /// `qform_code` as stored.
    pub qform_code: i16,
    /// `(scl_slope, scl_inter)` when they were applied (`None`: values as stored).
    pub scaling: Option<(f64, f64)>,
    /// The `descrip` field, up to its first NUL.
    pub description: String,
    /// Things that were odd but readable (sform/qform disagreement, a
    /// quaternion that is not unit length, negative `pixdim`...), in words.
    pub warnings: Vec<String>,
    header: NiftiHeader,
}

/// Reads a NIfTI-1 file (`.nii`, `.nii.gz`, `.hdr[.gz]` with its `.img[.gz]`)
/// as a float image `[D, H, W] = [k, j, i]`, scaled by `scl_slope`/`scl_inter`.
///
/// # Errors
/// [`Error::Io`] when the file cannot be opened or read, [`Error::Nifti`]
/// (naming the file) for anything wrong with its contents,
/// [`Error::TooLarge`] (before reading the voxels) for more than
/// [`MAX_VOXELS`] voxels or a volume that would
/// take more than the default memory budget (4 GiB, raw bytes and decoded
/// volume together).
pub fn read_image(path: impl AsRef<Path>) -> Result<(Image, NiftiInfo)> {
    read_path(path.as_ref(), &Limits::default())
}

/// [`read_image`] with the caller's memory budget: a volume whose raw bytes
/// and decoded voxels together need more than `limits.memory_bytes` is
/// refused from its header, before any voxel is read. (`limits.windows`
/// does not apply to reading.)
///
/// ```no_run
/// use iris_core::nifti;
/// use iris_core::pipeline::Limits;
///
/// // A viewer that lends iris 512 MiB.
/// let limits = Limits { memory_bytes: 512 << 20, ..Limits::default() };
/// let (image, _info) = nifti::read_image_with("scan.nii.gz", &limits)?;
/// # Ok::<(), iris_core::Error>(())
/// ```
///
/// # Errors
/// As [`read_image`], with [`Error::TooLarge`] against `limits`.
pub fn read_image_with(path: impl AsRef<Path>, limits: &Limits) -> Result<(Image, NiftiInfo)> {
    read_path(path.as_ref(), limits)
}

/// Reads a NIfTI-1 label map (any stored type) as `u16` labels
/// `[D, H, W] = [k, j, i]`.
///
/// # Errors
/// As [`read_image`]; also [`Error::Nifti`] naming the first voxel whose
/// (scaled) value is not an integer in `0..=65535`.
pub fn read_labels(path: impl AsRef<Path>) -> Result<(LabelMap, NiftiInfo)> {
    read_path(path.as_ref(), &Limits::default())
}

/// [`read_labels`] with the caller's memory budget, as [`read_image_with`].
///
/// # Errors
/// As [`read_labels`], with [`Error::TooLarge`] against `limits`.
pub fn read_labels_with(path: impl AsRef<Path>, limits: &Limits) -> Result<(LabelMap, NiftiInfo)> {
    read_path(path.as_ref(), limits)
}

/// Parses a whole single-file NIfTI-1 (`.nii` bytes, gzip-compressed or not)
/// from memory, as [`read_image`] does. Never panics, whatever the bytes:
/// sizes are checked against [`MAX_VOXELS`], the
/// default memory budget and the bytes present before anything large is
/// allocated.
///
/// # Errors
/// [`Error::Nifti`] (with the path `<memory>`) describing the problem;
/// [`Error::TooLarge`] as [`read_image`].
pub fn decode_bytes(bytes: &[u8]) -> Result<(Image, NiftiInfo)> {
    decode_memory(bytes)
}

/// [`decode_bytes`] for a label map, with the checks of [`read_labels`].
///
/// # Errors
/// As [`decode_bytes`] and [`read_labels`].
pub fn decode_label_bytes(bytes: &[u8]) -> Result<(LabelMap, NiftiInfo)> {
    decode_memory(bytes)
}

/// Writes `image` as `float32` to `path` (`.nii` or `.nii.gz`, chosen by the
/// name), atomically. With `like`, the sform/qform codes, description, time
/// units and other acquisition fields are copied from that source header.
///
/// # Errors
/// [`Error::Nifti`] for an unsupported extension, a dimension above
/// 32767 or an affine that is not finite and invertible in single
/// precision; [`Error::Io`] when the file cannot be written.
pub fn write_image(path: impl AsRef<Path>, image: &Image, like: Option<&NiftiInfo>) -> Result<()> {
    let path = path.as_ref();
    let header = output_header(path, image.geometry(), like, 0)?;
    let data = image.data();
    write_atomic(path, |tmp| {
        WriterOptions::new(tmp)
            .reference_header(&header)
            .write_nifti(&data.t())
    })
}

/// Writes a label map to `path` (`.nii` or `.nii.gz`), atomically, as `uint8`
/// when every label is at most 255 and as `uint16` otherwise, with
/// `intent_code` NIFTI_INTENT_LABEL. `like` as for [`write_image`].
///
/// # Errors
/// As [`write_image`].
pub fn write_labels(
    path: impl AsRef<Path>,
    labels: &LabelMap,
    like: Option<&NiftiInfo>,
) -> Result<()> {
    let path = path.as_ref();
    let header = output_header(path, labels.geometry(), like, INTENT_LABEL)?;
    let data = labels.data();
    if data.iter().all(|&v| v <= u16::from(u8::MAX)) {
        let bytes: Array3<u8> = data.mapv(|v| u8::try_from(v).unwrap_or(u8::MAX));
        write_atomic(path, |tmp| {
            WriterOptions::new(tmp)
                .reference_header(&header)
                .write_nifti(&bytes.t())
        })
    } else {
        write_atomic(path, |tmp| {
            WriterOptions::new(tmp)
                .reference_header(&header)
                .write_nifti(&data.t())
        })
    }
}

// ---------------------------------------------------------------- reading

/// A voxel type a NIfTI volume can be read as.
trait Voxel: Sized {
    /// Converts a scaled value, or `None` when it cannot be represented.
    fn from_scaled(v: f64) -> Option<Self>;
    /// What `from_scaled` requires, for the error message.
    const REQUIREMENT: &'static str;
}

impl Voxel for f32 {
    fn from_scaled(v: f64) -> Option<f32> {
        Some(v as f32)
    }
    const REQUIREMENT: &'static str = "a number";
}

impl Voxel for u16 {
    fn from_scaled(v: f64) -> Option<u16> {
        (v.fract() == 0.0 && (0.0..=f64::from(u16::MAX)).contains(&v)).then_some(v as u16)
    }
    const REQUIREMENT: &'static str = "a label, i.e. an integer in 0..=65535";
}

fn nifti_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Nifti {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn io_error(path: &Path, source: io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn lower_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default()
}

fn read_path<T: Voxel>(path: &Path, limits: &Limits) -> Result<(Volume<T>, NiftiInfo)> {
    let name = lower_name(path);
    let is_pair_header = name.ends_with(".hdr") || name.ends_with(".hdr.gz");
    if !(name.ends_with(".nii") || name.ends_with(".nii.gz") || is_pair_header) {
        return Err(nifti_error(
            path,
            "unsupported file name: expected .nii, .nii.gz, .hdr or .hdr.gz",
        ));
    }
    let file = File::open(path).map_err(|e| io_error(path, e))?;
    let size = file.metadata().map_err(|e| io_error(path, e))?.len();
    let pair_header = is_pair_header.then_some(path);
    decode(path, BufReader::new(file), Some(size), pair_header, limits)
}

fn decode_memory<T: Voxel>(bytes: &[u8]) -> Result<(Volume<T>, NiftiInfo)> {
    let size = u64::try_from(bytes.len()).ok();
    decode(Path::new("<memory>"), bytes, size, None, &Limits::default())
}

/// Wraps `input` in a gzip decoder when it starts with the gzip magic; also
/// returns the byte count when the stream is not compressed and `size` is known.
fn maybe_gunzip<'a, R: BufRead + 'a>(
    mut input: R,
    size: Option<u64>,
) -> io::Result<(Box<dyn Read + 'a>, Option<u64>)> {
    if input.fill_buf()?.starts_with(&[0x1f, 0x8b]) {
        Ok((Box::new(MultiGzDecoder::new(input)), None))
    } else {
        Ok((Box::new(input), size))
    }
}

/// Decodes a NIfTI-1 stream (`size`: its length, when known). The voxels of
/// a `ni1` header are read from the `.img` next to `pair_header`, if given.
fn decode<'a, T: Voxel>(
    path: &Path,
    input: impl BufRead + 'a,
    size: Option<u64>,
    pair_header: Option<&Path>,
    limits: &Limits,
) -> Result<(Volume<T>, NiftiInfo)> {
    let fail = |reason: String| nifti_error(path, reason);
    let (mut stream, plain_size) =
        maybe_gunzip(input, size).map_err(|e| fail(format!("cannot read: {e}")))?;

    let mut raw_header = Vec::with_capacity(HEADER_LEN);
    (&mut stream)
        .take(HEADER_LEN as u64)
        .read_to_end(&mut raw_header)
        .map_err(|e| fail(format!("cannot read the header: {e}")))?;
    let Ok(raw_header) = <&[u8; HEADER_LEN]>::try_from(raw_header.as_slice()) else {
        return Err(fail(format!(
            "truncated: {} bytes, but a NIfTI-1 header alone is {HEADER_LEN} bytes",
            raw_header.len()
        )));
    };
    let header = parse_header(raw_header).map_err(fail)?;
    let mut warnings = Vec::new();
    let layout = Layout::of(&header, &mut warnings).map_err(fail)?;
    check_size::<T>(path, &layout, limits.memory_bytes)?;
    let (affine, affine_source) = affine_of(&header, &layout, &mut warnings).map_err(fail)?;

    let single_file = &header.magic == nifti::header::MAGIC_CODE_NIP1;
    let raw = match (single_file, pair_header) {
        (true, _) => {
            skip_to_voxels(&mut stream, HEADER_LEN as u64, &layout).map_err(fail)?;
            let available = plain_size.map(|s| s.saturating_sub(layout.offset));
            read_voxels(&mut stream, &layout, available).map_err(fail)?
        }
        (false, Some(header_path)) => read_pair_data(header_path, &layout)?,
        (false, None) => {
            return Err(fail(
                "this is the header of a .hdr/.img pair (magic \"ni1\"); its voxels are in \
                 the .img file: read it by a path ending in .hdr"
                    .into(),
            ));
        }
    };

    let mut voxels = Vec::new();
    voxels
        .try_reserve_exact(raw.len() / layout.datatype.size())
        .map_err(|e| {
            fail(format!(
                "cannot allocate the volume of {}: {e}",
                layout.describe()
            ))
        })?;
    convert::<T>(&raw, &layout, &mut voxels).map_err(|(index, value)| {
        let [_, nj, ni] = layout.shape;
        let (i, j, k) = (index % ni, (index / ni) % nj, index / (ni * nj));
        fail(format!(
            "voxel (i, j, k) = ({i}, {j}, {k}) holds {value}, which is not {}",
            T::REQUIREMENT
        ))
    })?;
    let volume = Volume::from_vec(layout.shape, affine, voxels).map_err(|e| {
        fail(format!(
            "the {} cannot be used: {e}",
            affine_source.describe()
        ))
    })?;
    let info = NiftiInfo {
        datatype: layout.datatype,
        affine_source,
        sform_code: header.sform_code,
        qform_code: header.qform_code,
        scaling: layout.scaling,
        description: text_field(&header.descrip),
        warnings,
        header,
    };
    Ok((volume, info))
}

fn text_field(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end])
        .trim_end()
        .to_string()
}

/// Checks the size and magic fields, then parses with the `nifti` crate.
fn parse_header(raw: &[u8; HEADER_LEN]) -> core::result::Result<NiftiHeader, String> {
    let first = [raw[0], raw[1], raw[2], raw[3]];
    let (le, be) = (i32::from_le_bytes(first), i32::from_be_bytes(first));
    if le == 540 || be == 540 {
        return Err("this is a NIfTI-2 file (sizeof_hdr 540); only NIfTI-1 is supported".into());
    }
    if le != HEADER_LEN as i32 && be != HEADER_LEN as i32 {
        return Err(format!(
            "not a NIfTI-1 file: sizeof_hdr is {le} (expected {HEADER_LEN})"
        ));
    }
    let magic = &raw[344..348];
    if magic != nifti::header::MAGIC_CODE_NIP1 && magic != nifti::header::MAGIC_CODE_NI1 {
        return Err(format!(
            "not a NIfTI-1 file: magic is {:?} (expected \"n+1\" or \"ni1\"; ANALYZE 7.5 \
             files are not supported)",
            String::from_utf8_lossy(magic)
        ));
    }
    let header = NiftiHeader::from_reader(&raw[..]).map_err(|e| format!("invalid header: {e}"))?;
    if header.sizeof_hdr != HEADER_LEN as i32 {
        return Err(format!(
            "inconsistent byte order: dim[0] suggests {:?} but sizeof_hdr reads {} that way",
            header.endianness, header.sizeof_hdr
        ));
    }
    Ok(header)
}

/// Shape, type and placement of the voxel data, validated.
struct Layout {
    /// `[k, j, i]` sizes.
    shape: [usize; 3],
    datatype: Datatype,
    big_endian: bool,
    /// Byte offset of the first voxel in its stream.
    offset: u64,
    /// Bytes of voxel data.
    len: usize,
    scaling: Option<(f64, f64)>,
}

impl Layout {
    fn of(h: &NiftiHeader, warnings: &mut Vec<String>) -> core::result::Result<Layout, String> {
        let ndim = usize::from(h.dim[0]);
        if !(1..=7).contains(&ndim) {
            return Err(format!("dim[0] is {}; expected 1 to 7", h.dim[0]));
        }
        let dims = &h.dim[1..=ndim];
        for (axis, &n) in dims.iter().enumerate() {
            // `dim` is int16 on disk; the crate reads it unsigned.
            if n == 0 || usize::from(n) > MAX_DIM {
                return Err(format!(
                    "dim[{}] is {}; every dimension must be at least 1",
                    axis + 1,
                    n as i16
                ));
            }
        }
        if dims.iter().skip(3).any(|&n| n != 1) {
            return Err(format!(
                "{ndim}-D data of size {dims:?}: only one 3-D volume can be read \
                 (dim[4..] must be 1); extract a single volume first"
            ));
        }
        let size = |axis: usize| dims.get(axis).map_or(1, |&n| usize::from(n));
        let shape = [size(2), size(1), size(0)];
        // Sized, not refused, here: `decode` checks it against the limits.
        let count = shape.iter().fold(1usize, |acc, &n| acc.saturating_mul(n));

        let datatype = Datatype::from_code(h.datatype).ok_or_else(|| {
            let name = h
                .data_type()
                .map_or_else(|_| "unknown".to_string(), |t| format!("{t:?}"));
            format!(
                "datatype {} ({name}) is not supported; iris reads {}",
                h.datatype,
                Datatype::ALL.map(Datatype::name).join(", ")
            )
        })?;
        if i64::from(h.bitpix) != 8 * datatype.size() as i64 {
            warnings.push(format!(
                "bitpix is {} but datatype {} has {} bits; the datatype was used",
                h.bitpix,
                datatype.name(),
                8 * datatype.size()
            ));
        }
        let len = count.saturating_mul(datatype.size());

        let v = h.vox_offset;
        if !v.is_finite() || v < 0.0 || v.fract() != 0.0 || v > u32::MAX as f32 {
            return Err(format!("vox_offset is {v}, which is not a byte offset"));
        }
        let mut offset = v as u64;
        if &h.magic == nifti::header::MAGIC_CODE_NIP1 && offset < MIN_SINGLE_FILE_OFFSET {
            warnings.push(format!(
                "vox_offset is {offset}, below the minimum of {MIN_SINGLE_FILE_OFFSET} for a \
                 single file; the voxels were read from byte {MIN_SINGLE_FILE_OFFSET}"
            ));
            offset = MIN_SINGLE_FILE_OFFSET;
        }

        let slope = f64::from(h.scl_slope);
        let inter = f64::from(h.scl_inter);
        let scaling = if slope == 0.0 || !slope.is_finite() || (slope == 1.0 && inter == 0.0) {
            None
        } else if !inter.is_finite() {
            return Err(format!(
                "scl_slope is {slope} but scl_inter is {inter}, which is not finite"
            ));
        } else {
            Some((slope, inter))
        };

        let space_units = h.xyzt_units & 0o7;
        if space_units != 0 && space_units != UNITS_MM {
            warnings.push(format!(
                "spatial units code is {space_units}, not millimetres (2); the affine was \
                 taken as millimetres, as nibabel does"
            ));
        }
        Ok(Layout {
            shape,
            datatype,
            big_endian: h.endianness == Endianness::Big,
            offset,
            len,
            scaling,
        })
    }

    fn describe(&self) -> String {
        let [k, j, i] = self.shape;
        format!(
            "{i}x{j}x{k} {} voxels ({} bytes) from byte {}",
            self.datatype.name(),
            self.len,
            self.offset
        )
    }
}

/// Discards `n` bytes; on a short stream returns how many were there.
/// Discards the `n` bytes before the voxels (`start` is the stream position
/// in the file, for the message).
fn skip_to_voxels(
    stream: &mut dyn Read,
    start: u64,
    layout: &Layout,
) -> core::result::Result<(), String> {
    let n = layout.offset.saturating_sub(start);
    match io::copy(&mut stream.take(n), &mut io::sink()) {
        Ok(got) if got == n => Ok(()),
        Ok(got) => Err(format!(
            "truncated: the data ends at byte {} but vox_offset puts the voxels at byte {}",
            start + got,
            layout.offset
        )),
        Err(e) => Err(format!("cannot read up to the voxels: {e}")),
    }
}

/// Reads exactly the voxel bytes of `layout`. Memory is reserved up front
/// (fallibly), only up to what `available` says is really there for a plain
/// file; a gzip stream's size was bounded by `check_size`.
fn read_voxels(
    stream: &mut dyn Read,
    layout: &Layout,
    available: Option<u64>,
) -> core::result::Result<Vec<u8>, String> {
    let mut raw = Vec::new();
    // What a plain file really holds, or (gzip) what `check_size` allowed.
    let reserve = available.map_or(layout.len, |a| {
        usize::try_from(a).map_or(layout.len, |a| a.min(layout.len))
    });
    raw.try_reserve_exact(reserve)
        .map_err(|e| format!("cannot allocate {}: {e}", layout.describe()))?;
    stream
        .take(layout.len as u64)
        .read_to_end(&mut raw)
        .map_err(|e| format!("cannot read the voxels: {e}"))?;
    if raw.len() < layout.len {
        return Err(format!(
            "truncated: the header promises {}, but only {} bytes follow",
            layout.describe(),
            raw.len()
        ));
    }
    // Read to the end: a gzip stream is only checked (its length and CRC)
    // there, and how much a decoder hands out before it notices a cut
    // depends on its backend.
    io::copy(stream, &mut io::sink()).map_err(|e| {
        format!("the data after the voxels cannot be read (a truncated or corrupt .gz?): {e}")
    })?;
    Ok(raw)
}

/// Reads the voxels of a `.hdr` from its `.img` (or `.img.gz`) sibling.
fn read_pair_data(header_path: &Path, layout: &Layout) -> Result<Vec<u8>> {
    let name = header_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // `read_path` checked that the name ends with .hdr or .hdr.gz (any case).
    let suffix = if lower_name(header_path).ends_with(".gz") {
        7
    } else {
        4
    };
    let stem = name
        .get(..name.len().saturating_sub(suffix))
        .unwrap_or_default();
    let candidates: [PathBuf; 2] =
        [".img", ".img.gz"].map(|ext| header_path.with_file_name(format!("{stem}{ext}")));
    let img = candidates.iter().find(|p| p.is_file()).ok_or_else(|| {
        nifti_error(
            header_path,
            format!(
                "the voxel file of this .hdr is missing (looked for {} and {})",
                candidates[0].display(),
                candidates[1].display()
            ),
        )
    })?;
    let file = File::open(img).map_err(|e| io_error(img, e))?;
    let size = file.metadata().map_err(|e| io_error(img, e))?.len();
    let fail = |reason: String| nifti_error(img, reason);
    let (mut stream, plain_size) = maybe_gunzip(BufReader::new(file), Some(size))
        .map_err(|e| fail(format!("cannot read: {e}")))?;
    skip_to_voxels(&mut stream, 0, layout).map_err(fail)?;
    let available = plain_size.map(|s| s.saturating_sub(layout.offset));
    read_voxels(&mut stream, layout, available).map_err(fail)
}

/// Decodes the raw bytes (C order over `[k, j, i]`), applies scaling and
/// converts to `T`, pushed onto `out` (reserved by the caller). On failure
/// returns the flat index and scaled value.
fn convert<T: Voxel>(
    raw: &[u8],
    layout: &Layout,
    out: &mut Vec<T>,
) -> core::result::Result<(), (usize, f64)> {
    let big = layout.big_endian;
    macro_rules! decode_as {
        ($t:ty, $scale:expr) => {{
            let (chunks, _) = raw.as_chunks::<{ core::mem::size_of::<$t>() }>();
            for (index, &b) in chunks.iter().enumerate() {
                let stored = if big {
                    <$t>::from_be_bytes(b)
                } else {
                    <$t>::from_le_bytes(b)
                };
                let v = $scale(stored as f64);
                match T::from_scaled(v) {
                    Some(voxel) => out.push(voxel),
                    None => return Err((index, v)),
                }
            }
        }};
    }
    macro_rules! decode_scaled {
        ($t:ty) => {
            match layout.scaling {
                Some((slope, inter)) => decode_as!($t, |v: f64| v * slope + inter),
                None => decode_as!($t, |v: f64| v),
            }
        };
    }
    match layout.datatype {
        Datatype::U8 => decode_scaled!(u8),
        Datatype::I8 => decode_scaled!(i8),
        Datatype::I16 => decode_scaled!(i16),
        Datatype::U16 => decode_scaled!(u16),
        Datatype::I32 => decode_scaled!(i32),
        Datatype::U32 => decode_scaled!(u32),
        Datatype::F32 => decode_scaled!(f32),
        Datatype::F64 => decode_scaled!(f64),
    }
    Ok(())
}

/// Refuses, before any voxel is read, a volume past
/// [`MAX_VOXELS`](crate::volume::MAX_VOXELS) or one whose raw bytes and
/// decoded `T` volume together would pass `budget` bytes: a 1 MB `.nii.gz`
/// can claim 1024^3 voxels.
fn check_size<T>(path: &Path, layout: &Layout, budget: u64) -> Result<()> {
    let count: u128 = layout.shape.iter().map(|&n| n as u128).product();
    let [k, j, i] = layout.shape;
    let what = |detail: String| Error::TooLarge {
        what: "NIfTI volume",
        detail: format!("{}: {i}x{j}x{k} voxels {detail}", path.display()),
    };
    if count > MAX_VOXELS as u128 {
        return Err(what(format!("are more than the {MAX_VOXELS} iris reads")));
    }
    let bytes = count * (layout.datatype.size() + size_of::<T>()) as u128;
    if bytes > u128::from(budget) {
        return Err(what(format!(
            "of {} need about {} to read, over the budget of {}",
            layout.datatype.name(),
            size_text(bytes),
            size_text(u128::from(budget))
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------- affines

type Mat3 = [[f64; 3]; 3];

/// The header's affine (acting on `(i, j, k)`) converted to ours (acting on
/// `[d, h, w] = (k, j, i)`).
fn affine_of(
    h: &NiftiHeader,
    layout: &Layout,
    warnings: &mut Vec<String>,
) -> core::result::Result<(Affine, AffineSource), String> {
    let (matrix, source) = if h.sform_code != 0 {
        let sform = sform_matrix(h);
        if h.qform_code != 0 {
            let qform = qform_matrix(h, warnings);
            let diff = max_difference(&sform, &qform);
            // NaN (a broken qform) counts as disagreement.
            if diff.partial_cmp(&XFORM_TOLERANCE) != Some(core::cmp::Ordering::Less) {
                warnings.push(format!(
                    "sform (code {}) and qform (code {}) disagree by up to {diff:.4} mm; \
                     the sform was used, as nibabel does",
                    h.sform_code, h.qform_code
                ));
            }
        }
        (sform, AffineSource::Sform)
    } else if h.qform_code != 0 {
        (qform_matrix(h, warnings), AffineSource::Qform)
    } else {
        warnings.push(
            "neither sform nor qform is set: the affine comes from pixdim alone \
             (x flipped, origin at the centre, as nibabel does); orientation is a guess"
                .into(),
        );
        (pixdim_matrix(h, layout), AffineSource::Pixdim)
    };
    Ok((swap_ik(&matrix), source))
}

/// Exchanges columns 0 and 2: converts between NIfTI `(i, j, k)` and iris
/// `[d, h, w] = (k, j, i)` affines (the map is its own inverse).
fn swap_ik(m: &Affine) -> Affine {
    let mut out = *m;
    for row in &mut out.0 {
        row.swap(0, 2);
    }
    out
}

fn max_difference(a: &Affine, b: &Affine) -> f64 {
    a.0.iter()
        .flatten()
        .zip(b.0.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |m, d| if d > m || d.is_nan() { d } else { m })
}

fn sform_matrix(h: &NiftiHeader) -> Affine {
    let row = |r: [f32; 4]| r.map(f64::from);
    Affine([
        row(h.srow_x),
        row(h.srow_y),
        row(h.srow_z),
        [0.0, 0.0, 0.0, 1.0],
    ])
}

/// The qform as nibabel computes it: `R(quaternion) * diag(dx, dy, qfac * dz)`.
fn qform_matrix(h: &NiftiHeader, warnings: &mut Vec<String>) -> Affine {
    let mut bcd = [h.quatern_b, h.quatern_c, h.quatern_d].map(f64::from);
    let norm2: f64 = bcd.iter().map(|v| v * v).sum();
    let w = if norm2 <= 1.0 {
        (1.0 - norm2).sqrt()
    } else {
        if norm2 - 1.0 > 3.0 * f64::from(f32::EPSILON) {
            warnings.push(format!(
                "qform quaternion (b, c, d) = {bcd:?} is longer than 1; it was normalised"
            ));
            let n = norm2.sqrt();
            bcd = bcd.map(|v| v / n);
        }
        0.0
    };
    let rotation = quaternion_to_matrix([w, bcd[0], bcd[1], bcd[2]]);

    let mut zooms = [h.pixdim[1], h.pixdim[2], h.pixdim[3]].map(f64::from);
    if zooms.iter().any(|&z| z < 0.0) {
        warnings.push(format!(
            "pixdim[1..4] = {zooms:?} has negative values; their absolute values were used"
        ));
        zooms = zooms.map(f64::abs);
    }
    let qfac = if h.pixdim[0] == -1.0 {
        -1.0
    } else {
        if h.pixdim[0] != 1.0 {
            warnings.push(format!(
                "pixdim[0] (qfac) is {}; taken as 1, as nibabel does",
                h.pixdim[0]
            ));
        }
        1.0
    };
    zooms[2] *= qfac;
    let offset = [h.quatern_x, h.quatern_y, h.quatern_z].map(f64::from);
    let mut m = Affine::IDENTITY.0;
    for r in 0..3 {
        for c in 0..3 {
            m[r][c] = rotation[r][c] * zooms[c];
        }
        m[r][3] = offset[r];
    }
    Affine(m)
}

/// nibabel's fallback: `diag(-dx, dy, dz)` with the volume centred on the origin.
fn pixdim_matrix(h: &NiftiHeader, layout: &Layout) -> Affine {
    let [k, j, i] = layout.shape;
    let sizes = [i, j, k];
    let mut m = Affine::IDENTITY.0;
    for axis in 0..3 {
        let zoom = if axis < usize::from(h.dim[0]) {
            f64::from(h.pixdim[axis + 1]).abs()
        } else {
            1.0
        };
        let signed = if axis == 0 { -zoom } else { zoom };
        m[axis][axis] = signed;
        m[axis][3] = -((sizes[axis] as f64 - 1.0) / 2.0) * signed;
    }
    Affine(m)
}

/// Rotation matrix of the quaternion `[w, x, y, z]` (normalised here).
fn quaternion_to_matrix([w, x, y, z]: [f64; 4]) -> Mat3 {
    let n = w * w + x * x + y * y + z * z;
    if n < f64::EPSILON {
        return [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    }
    let s = 2.0 / n;
    let (xs, ys, zs) = (x * s, y * s, z * s);
    let (wx, wy, wz) = (w * xs, w * ys, w * zs);
    let (xx, xy, xz) = (x * xs, x * ys, x * zs);
    let (yy, yz, zz) = (y * ys, y * zs, z * zs);
    [
        [1.0 - (yy + zz), xy - wz, xz + wy],
        [xy + wz, 1.0 - (xx + zz), yz - wx],
        [xz - wy, yz + wx, 1.0 - (xx + yy)],
    ]
}

/// Quaternion `[w, x, y, z]` (w >= 0) of a rotation matrix (Shepperd's method).
fn matrix_to_quaternion(m: &Mat3) -> [f64; 4] {
    let trace = m[0][0] + m[1][1] + m[2][2];
    let q = if trace > 0.0 {
        let s = 0.5 / (trace + 1.0).sqrt();
        [
            0.25 / s,
            (m[2][1] - m[1][2]) * s,
            (m[0][2] - m[2][0]) * s,
            (m[1][0] - m[0][1]) * s,
        ]
    } else if m[0][0] > m[1][1] && m[0][0] > m[2][2] {
        let s = 2.0 * (1.0 + m[0][0] - m[1][1] - m[2][2]).sqrt();
        [
            (m[2][1] - m[1][2]) / s,
            0.25 * s,
            (m[0][1] + m[1][0]) / s,
            (m[0][2] + m[2][0]) / s,
        ]
    } else if m[1][1] > m[2][2] {
        let s = 2.0 * (1.0 + m[1][1] - m[0][0] - m[2][2]).sqrt();
        [
            (m[0][2] - m[2][0]) / s,
            (m[0][1] + m[1][0]) / s,
            0.25 * s,
            (m[1][2] + m[2][1]) / s,
        ]
    } else {
        let s = 2.0 * (1.0 + m[2][2] - m[0][0] - m[1][1]).sqrt();
        [
            (m[1][0] - m[0][1]) / s,
            (m[0][2] + m[2][0]) / s,
            (m[1][2] + m[2][1]) / s,
            0.25 * s,
        ]
    };
    let n = q.iter().map(|v| v * v).sum::<f64>().sqrt();
    let sign = if q[0] < 0.0 { -1.0 } else { 1.0 };
    q.map(|v| sign * v / n)
}

/// `m` as the linear part of an affine without translation.
fn linear(m: &Mat3) -> Affine {
    let mut a = Affine::IDENTITY;
    for (row, m_row) in a.0.iter_mut().zip(m) {
        row[..3].copy_from_slice(m_row);
    }
    a
}

/// The orthogonal matrix closest to `m` (its polar factor), by Newton's
/// iteration `X <- (X + X^-T) / 2`; `m` must be invertible.
fn nearest_rotation(m: &Mat3) -> Mat3 {
    let mut x = *m;
    for _ in 0..100 {
        let Some(inv) = linear(&x).inverse() else {
            break;
        };
        let next: Mat3 =
            core::array::from_fn(|r| core::array::from_fn(|c| 0.5 * (x[r][c] + inv.0[c][r])));
        let change = (0..9)
            .map(|n| (next[n / 3][n % 3] - x[n / 3][n % 3]).abs())
            .fold(0.0, f64::max);
        x = next;
        if change < 1e-14 {
            break;
        }
    }
    x
}

/// Sets `pixdim[0..4]`, the quaternion and the offsets from a NIfTI affine
/// (acting on `(i, j, k)`), as nibabel's `set_qform` does. Returns false when
/// the affine has shear, which the qform cannot hold exactly.
fn set_qform(h: &mut NiftiHeader, m: &Affine) -> bool {
    let zooms = swap_ik(m).spacing();
    let zooms = [zooms[2], zooms[1], zooms[0]];
    let mut r: Mat3 = core::array::from_fn(|row| core::array::from_fn(|c| m.0[row][c] / zooms[c]));
    let qfac = if linear(&r).determinant() > 0.0 {
        1.0
    } else {
        for row in &mut r {
            row[2] = -row[2];
        }
        -1.0
    };
    let [_, b, c, d] = matrix_to_quaternion(&nearest_rotation(&r));
    h.pixdim[0] = qfac;
    for (pixdim, zoom) in h.pixdim[1..4].iter_mut().zip(zooms) {
        *pixdim = zoom as f32;
    }
    h.quatern_b = b as f32;
    h.quatern_c = c as f32;
    h.quatern_d = d as f32;
    h.quatern_x = m.0[0][3] as f32;
    h.quatern_y = m.0[1][3] as f32;
    h.quatern_z = m.0[2][3] as f32;
    let mut ignored = Vec::new();
    max_difference(&qform_matrix(h, &mut ignored), m) <= XFORM_TOLERANCE
}

// ---------------------------------------------------------------- writing

/// The header written for a volume on `geometry`: affine in sform and qform,
/// units mm, and the rest from `like` (or defaults).
fn output_header(
    path: &Path,
    geometry: &Geometry,
    like: Option<&NiftiInfo>,
    intent_code: i16,
) -> Result<NiftiHeader> {
    if let Some(n) = geometry.shape().into_iter().find(|&n| n > MAX_DIM) {
        return Err(nifti_error(
            path,
            format!(
                "shape {:?} has a dimension of {n}, above the NIfTI-1 limit of {MAX_DIM}",
                geometry.shape()
            ),
        ));
    }
    let mut h = match like {
        Some(info) => info.header.clone(),
        None => {
            let mut h = NiftiHeader::default();
            h.set_description_str("iris")
                .map_err(|e| nifti_error(path, e.to_string()))?;
            h
        }
    };
    let m = swap_ik(&geometry.affine());
    let row = |r: usize| m.0[r].map(|v| v as f32);
    // NIfTI keeps the affine in single precision: one that overflows or
    // becomes singular there would be written but could never be read back.
    let stored = Affine(core::array::from_fn(|r| match r {
        3 => m.0[3],
        _ => row(r).map(f64::from),
    }));
    if !stored.is_valid() || stored.inverse().is_none() {
        return Err(nifti_error(
            path,
            format!(
                "the affine {:?} does not fit NIfTI's single precision (as float32 it is not \
                 finite and invertible)",
                geometry.affine().0
            ),
        ));
    }
    (h.srow_x, h.srow_y, h.srow_z) = (row(0), row(1), row(2));
    let qform_exact = set_qform(&mut h, &m);
    let (sform_code, qform_code) = match like {
        Some(info) => {
            let s = [info.sform_code, info.qform_code, XFORM_ALIGNED]
                .into_iter()
                .find(|&c| c != 0)
                .unwrap_or(XFORM_ALIGNED);
            let q = if info.qform_code != 0 {
                info.qform_code
            } else {
                s
            };
            (s, q)
        }
        None => (XFORM_ALIGNED, XFORM_ALIGNED),
    };
    h.sform_code = sform_code;
    h.qform_code = if qform_exact { qform_code } else { 0 };
    h.xyzt_units = (h.xyzt_units & 0o70) | UNITS_MM;
    h.intent_code = intent_code;
    (h.intent_p1, h.intent_p2, h.intent_p3) = (0.0, 0.0, 0.0);
    h.intent_name = [0; 16];
    (h.cal_min, h.cal_max, h.glmin, h.glmax) = (0.0, 0.0, 0, 0);
    h.sizeof_hdr = HEADER_LEN as i32;
    h.endianness = Endianness::Little;
    Ok(h)
}

/// Temporary files of this process get distinct names.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Runs `write` on a temporary file next to `path`, then renames it over
/// `path`; on any failure the temporary file is removed.
fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> nifti::Result<()>) -> Result<()> {
    let name = lower_name(path);
    let extension = if name.ends_with(".nii.gz") {
        "nii.gz"
    } else if name.ends_with(".nii") {
        "nii"
    } else {
        return Err(nifti_error(
            path,
            "unsupported output name: expected .nii or .nii.gz",
        ));
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // The nifti crate rewrites the extension, so the name has no other dot.
    let tmp = dir.join(format!(
        ".iris-tmp-{}-{}.{extension}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = write(&tmp)
        .map_err(|e| match e {
            NiftiError::Io(source) => io_error(path, source),
            other => nifti_error(path, format!("cannot write: {other}")),
        })
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| io_error(path, e)));
    if result.is_err() {
        // Best effort: the file may not exist if creating it failed.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rotation(axis: usize, degrees: f64) -> Mat3 {
        let (s, c) = degrees.to_radians().sin_cos();
        let (a, b) = ((axis + 1) % 3, (axis + 2) % 3);
        let mut m = [[0.0; 3]; 3];
        m[axis][axis] = 1.0;
        m[a][a] = c;
        m[b][b] = c;
        m[a][b] = -s;
        m[b][a] = s;
        m
    }

    fn mul(a: &Mat3, b: &Mat3) -> Mat3 {
        core::array::from_fn(|r| core::array::from_fn(|c| (0..3).map(|k| a[r][k] * b[k][c]).sum()))
    }

    fn close(a: &Mat3, b: &Mat3, tol: f64) -> bool {
        (0..9).all(|n| (a[n / 3][n % 3] - b[n / 3][n % 3]).abs() < tol)
    }

    #[test]
    fn quaternions_round_trip_rotations_including_half_turns() {
        let half_turn_z = [[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]];
        let oblique = mul(
            &rotation(0, 20.0),
            &mul(&rotation(1, -35.0), &rotation(2, 170.0)),
        );
        for m in [rotation(2, 0.0), half_turn_z, rotation(0, 180.0), oblique] {
            let q = matrix_to_quaternion(&m);
            assert!(q[0] >= 0.0);
            assert!(close(&quaternion_to_matrix(q), &m, 1e-12), "{m:?} -> {q:?}");
        }
    }

    #[test]
    fn nearest_rotation_removes_shear_and_keeps_rotations() {
        let r = mul(&rotation(1, 30.0), &rotation(2, 10.0));
        assert!(close(&nearest_rotation(&r), &r, 1e-12));
        let mut sheared = r;
        sheared[0][1] += 0.05;
        let p = nearest_rotation(&sheared);
        let ptp = mul(
            &core::array::from_fn(|i| core::array::from_fn(|j| p[j][i])),
            &p,
        );
        assert!(close(&ptp, &rotation(0, 0.0), 1e-12));
        assert!(close(&p, &r, 0.05));
    }

    #[test]
    fn swap_ik_is_an_involution_that_moves_columns() {
        let m = Affine([
            [1.0, 2.0, 3.0, 4.0],
            [5.0, 6.0, 7.0, 8.0],
            [9.0, 10.0, 11.0, 12.0],
            [0.0, 0.0, 0.0, 1.0],
        ]);
        let s = swap_ik(&m);
        assert_eq!(s.0[0], [3.0, 2.0, 1.0, 4.0]);
        assert_eq!(swap_ik(&s), m);
    }
}
