//! The `.irisemb` task-embedding file format, version 1.
//!
//! One file holds a [`TaskEmbedding`]: the model fingerprint, the
//! preprocessing, the stage shapes, a class table (label, provenance, UTF-8
//! name) and the values of every class and stage as `f32` or `f16`, little
//! endian. The full byte layout is specified in `docs/irisemb.md`; in short:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `IRISEMB\0` |
//! | 8 | 2 | version, `u16` = 1 |
//! | 10 | 1 | payload type: 1 = `f32`, 2 = `f16` |
//! | 11 | 5 | reserved, zero |
//! | 16 | 8 | file length in bytes, `u64` |
//! | 24 | 4 | reserved, zero |
//! | 28 | 4 | header CRC-32 of bytes 0..28 |
//! | 32 | .. | body: fingerprint, preprocessing, counts, stage shapes, class table, zero padding to a multiple of 4, payload |
//! | len-4 | 4 | file CRC-32 of bytes 0..len-4 |
//!
//! [`read`] checks, in this order: magic, version (so a file from a newer
//! version says so, whatever its checksum layout), header CRC, file length
//! (so a cut file says "truncated" and an overlong one "trailing bytes"),
//! file CRC (any flipped byte), then every field. Every count read from the
//! file is checked against the bytes that remain before anything is
//! allocated, and reading never panics.
//!
//! ```
//! use iris_core::embedding::*;
//! use iris_core::irisemb::{self, Payload};
//! use iris_core::preprocess::IntensityPolicy;
//!
//! let model = ModelFingerprint::new([3; 32]);
//! let preprocessing = Preprocessing {
//!     spacing_mm: [1.5; 3],
//!     patch: [128; 3],
//!     intensity: IntensityPolicy::Ct { min_hu: -991.0, max_hu: 500.0 },
//! };
//! let liver = ClassEmbedding::new(6, "liver", Provenance::OneShot, vec![vec![0.25; 11 * 4]])?;
//! let shapes = vec![StageShape { tokens: 11, channels: 4 }];
//! let task = TaskEmbedding::new(model, preprocessing, shapes, vec![liver])?;
//!
//! let bytes = irisemb::write(&task, Payload::F16)?;
//! let back = irisemb::read_for_model(&bytes, &model)?;
//! assert_eq!(back, task); // 0.25 is exact in f16
//! # Ok::<(), iris_core::Error>(())
//! ```

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use half::f16;

use crate::embedding::{
    ClassEmbedding, MAX_CLASSES, MAX_NAME_BYTES, MAX_STAGES, ModelFingerprint, Preprocessing,
    Provenance, StageShape, TaskEmbedding,
};
use crate::error::{Error, FormatError, Result};
use crate::preprocess::IntensityPolicy;

/// The first 8 bytes of every `.irisemb` file.
pub const MAGIC: [u8; 8] = *b"IRISEMB\0";
/// The format version this library writes and reads.
pub const VERSION: u16 = 1;
/// Size of the fixed header, bytes 0..32.
pub const HEADER_LEN: usize = 32;
/// Offset of the header CRC-32 (which covers bytes `0..HEADER_CRC_OFFSET`).
pub const HEADER_CRC_OFFSET: usize = 28;
/// Offset of the `u64` file length.
pub const FILE_LEN_OFFSET: usize = 16;

/// Bytes of a class-table entry before its name.
const CLASS_ENTRY_LEN: usize = 24;

/// How stage values are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    /// IEEE 754 binary32, exact.
    F32,
    /// IEEE 754 binary16: half the size, about 3 significant digits, values
    /// up to 65504 in magnitude.
    F16,
}

impl Payload {
    fn code(self) -> u8 {
        match self {
            Payload::F32 => 1,
            Payload::F16 => 2,
        }
    }

    fn size(self) -> usize {
        match self {
            Payload::F32 => 4,
            Payload::F16 => 2,
        }
    }
}

fn crc(bytes: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(bytes);
    hasher.finalize()
}

/// Serialises `embedding` as a version-1 `.irisemb` byte stream.
///
/// # Errors
/// [`Error::InvalidArgument`] if `payload` is [`Payload::F16`] and a value
/// is too large in magnitude for `f16` (above 65504).
pub fn write(embedding: &TaskEmbedding, payload: Payload) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(payload.code());
    out.resize(HEADER_LEN, 0); // length and CRC are patched in at the end

    out.extend_from_slice(embedding.model().as_bytes());
    let pre = embedding.preprocessing();
    for s in pre.spacing_mm {
        out.extend_from_slice(&s.to_le_bytes());
    }
    for p in pre.patch {
        out.extend_from_slice(&p.to_le_bytes());
    }
    let (kind, a, b) = match pre.intensity {
        IntensityPolicy::Ct { min_hu, max_hu } => (1u8, min_hu, max_hu),
        IntensityPolicy::Percentile { low, high } => (2u8, low, high),
    };
    out.extend_from_slice(&[kind, 0, 0, 0]);
    out.extend_from_slice(&a.to_le_bytes());
    out.extend_from_slice(&b.to_le_bytes());
    // Counts are bounded by MAX_STAGES and MAX_CLASSES, so they fit in u32.
    out.extend_from_slice(&(embedding.stage_shapes().len() as u32).to_le_bytes());
    out.extend_from_slice(&(embedding.classes().len() as u32).to_le_bytes());
    for shape in embedding.stage_shapes() {
        out.extend_from_slice(&shape.tokens.to_le_bytes());
        out.extend_from_slice(&shape.channels.to_le_bytes());
    }
    for class in embedding.classes() {
        let (kind, a, b): (u8, u64, u32) = match class.provenance() {
            Provenance::OneShot => (1, 0, 0),
            Provenance::Ensemble { references } => (2, references.into(), 0),
            Provenance::MemoryBank { updates, momentum } => (3, updates, momentum.to_bits()),
            Provenance::Tuned { steps, references } => (4, steps.into(), references),
        };
        out.extend_from_slice(&class.label().to_le_bytes());
        out.extend_from_slice(&[kind, 0, 0, 0]);
        out.extend_from_slice(&a.to_le_bytes());
        out.extend_from_slice(&b.to_le_bytes());
        // Names are at most MAX_NAME_BYTES long.
        out.extend_from_slice(&(class.name().len() as u32).to_le_bytes());
        out.extend_from_slice(class.name().as_bytes());
    }
    out.resize(out.len().next_multiple_of(4), 0);
    for class in embedding.classes() {
        for &v in class.stages().iter().flatten() {
            match payload {
                Payload::F32 => out.extend_from_slice(&v.to_le_bytes()),
                Payload::F16 => {
                    let h = f16::from_f32(v);
                    if h.is_infinite() {
                        return Err(Error::invalid(
                            "payload",
                            format!(
                                "class {} holds {v}, beyond the f16 range (65504); write it as f32",
                                class.label()
                            ),
                        ));
                    }
                    out.extend_from_slice(&h.to_le_bytes());
                }
            }
        }
    }
    let len = out.len() + 4;
    out[FILE_LEN_OFFSET..FILE_LEN_OFFSET + 8].copy_from_slice(&(len as u64).to_le_bytes());
    let header_crc = crc(&out[..HEADER_CRC_OFFSET]);
    out[HEADER_CRC_OFFSET..HEADER_LEN].copy_from_slice(&header_crc.to_le_bytes());
    let file_crc = crc(&out);
    out.extend_from_slice(&file_crc.to_le_bytes());
    Ok(out)
}

/// Parses a `.irisemb` byte stream (no filesystem needed).
///
/// # Errors
/// [`Error::Format`] with the [`FormatError`] saying what is wrong:
/// truncated, bad magic, unsupported version, checksum mismatch, invalid
/// field (non-UTF-8 name, unknown payload type, zero stages, NaN...),
/// trailing bytes.
pub fn read(bytes: &[u8]) -> Result<TaskEmbedding> {
    Ok(parse(bytes)?)
}

/// [`read`], then [`TaskEmbedding::ensure_model`] against the fingerprint of
/// the model in use.
///
/// # Errors
/// As [`read`], and [`Error::ModelMismatch`] for an embedding made by
/// another model.
pub fn read_for_model(bytes: &[u8], model: &ModelFingerprint) -> Result<TaskEmbedding> {
    let embedding = read(bytes)?;
    embedding.ensure_model(model)?;
    Ok(embedding)
}

/// A little-endian cursor that never reads past its end.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, section: &'static str) -> Result<&'a [u8], FormatError> {
        let available = self.bytes.len() - self.pos;
        if n > available {
            return Err(FormatError::Truncated {
                section,
                offset: self.pos,
                needed: n,
                available,
            });
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, section: &'static str) -> Result<[u8; N], FormatError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, section)?);
        Ok(out)
    }

    fn u8(&mut self, section: &'static str) -> Result<u8, FormatError> {
        Ok(self.array::<1>(section)?[0])
    }

    fn u32(&mut self, section: &'static str) -> Result<u32, FormatError> {
        self.array(section).map(u32::from_le_bytes)
    }

    fn u64(&mut self, section: &'static str) -> Result<u64, FormatError> {
        self.array(section).map(u64::from_le_bytes)
    }

    /// A finite `f32`.
    fn f32(&mut self, field: &'static str) -> Result<f32, FormatError> {
        let offset = self.pos;
        let v = f32::from_le_bytes(self.array(field)?);
        if !v.is_finite() {
            return Err(invalid(field, offset, format!("{v} is not finite")));
        }
        Ok(v)
    }

    /// `n` bytes that must all be zero.
    fn reserved(&mut self, n: usize, field: &'static str) -> Result<(), FormatError> {
        let offset = self.pos;
        let bytes = self.take(n, field)?;
        if bytes.iter().any(|&b| b != 0) {
            return Err(invalid(
                field,
                offset,
                format!("must be zero, found {bytes:02x?}"),
            ));
        }
        Ok(())
    }

    /// Fails unless `count * unit` bytes remain: called before any
    /// allocation sized by `count`.
    fn ensure(&self, count: usize, unit: usize, section: &'static str) -> Result<(), FormatError> {
        let available = self.bytes.len() - self.pos;
        match count.checked_mul(unit) {
            Some(needed) if needed <= available => Ok(()),
            needed => Err(FormatError::Truncated {
                section,
                offset: self.pos,
                needed: needed.unwrap_or(usize::MAX),
                available,
            }),
        }
    }
}

fn invalid(field: &'static str, offset: usize, reason: String) -> FormatError {
    FormatError::InvalidField {
        field,
        offset,
        reason,
    }
}

/// Turns a validation error of [`crate::embedding`] into a field error at `offset`.
fn field_error(e: Error, offset: usize) -> FormatError {
    match e {
        Error::InvalidArgument { name, reason } => invalid(name, offset, reason),
        other => invalid("embedding", offset, format!("{other}")),
    }
}

fn parse(bytes: &[u8]) -> Result<TaskEmbedding, FormatError> {
    // 1. Magic: a short prefix of the magic is a truncated file, not a foreign one.
    let magic_len = bytes.len().min(MAGIC.len());
    if bytes[..magic_len] != MAGIC[..magic_len] {
        return Err(FormatError::BadMagic {
            found: bytes[..magic_len].to_vec(),
        });
    }
    let mut r = Reader { bytes, pos: 0 };
    r.take(MAGIC.len(), "magic")?;
    // 2. Version, before any checksum whose layout may change with it.
    let version = u16::from_le_bytes(r.array("version")?);
    if version != VERSION {
        return Err(FormatError::UnsupportedVersion {
            found: version,
            supported: VERSION,
        });
    }
    // 3. Header CRC, so that the file length can be trusted.
    r.take(HEADER_LEN - r.pos, "header")?;
    let mut h = Reader {
        bytes: &bytes[..HEADER_LEN],
        pos: HEADER_CRC_OFFSET,
    };
    let stored = h.u32("header checksum")?;
    let computed = crc(&bytes[..HEADER_CRC_OFFSET]);
    if stored != computed {
        return Err(FormatError::ChecksumMismatch { stored, computed });
    }
    // 4. File length: truncated or trailing bytes.
    h.pos = MAGIC.len() + 2;
    let payload_code = h.u8("payload type")?;
    h.reserved(5, "reserved")?;
    let declared = h.u64("file length")?;
    h.reserved(4, "reserved")?;
    let min_len = (HEADER_LEN + 4) as u64;
    if declared < min_len {
        return Err(invalid(
            "file length",
            FILE_LEN_OFFSET,
            format!("{declared} is shorter than the {min_len}-byte minimum"),
        ));
    }
    if declared > bytes.len() as u64 {
        return Err(FormatError::Truncated {
            section: "file",
            offset: 0,
            needed: usize::try_from(declared).unwrap_or(usize::MAX),
            available: bytes.len(),
        });
    }
    // declared <= bytes.len(), so it fits in usize.
    let len = declared as usize;
    if len < bytes.len() {
        return Err(FormatError::TrailingBytes {
            offset: len,
            extra: bytes.len() - len,
        });
    }
    // 5. Whole-file CRC: any flipped byte.
    let body = &bytes[..len - 4];
    let stored = Reader {
        bytes,
        pos: len - 4,
    }
    .u32("file checksum")?;
    let computed = crc(body);
    if stored != computed {
        return Err(FormatError::ChecksumMismatch { stored, computed });
    }
    // 6. Fields.
    let payload = match payload_code {
        1 => Payload::F32,
        2 => Payload::F16,
        other => {
            return Err(invalid(
                "payload type",
                MAGIC.len() + 2,
                format!("{other} is neither 1 (f32) nor 2 (f16)"),
            ));
        }
    };
    let mut r = Reader {
        bytes: body,
        pos: HEADER_LEN,
    };
    parse_body(&mut r, payload)
}

fn parse_body(r: &mut Reader<'_>, payload: Payload) -> Result<TaskEmbedding, FormatError> {
    let model = ModelFingerprint::new(r.array("model fingerprint")?);
    let pre_offset = r.pos;
    let spacing_mm = [
        r.f32("spacing_mm")?,
        r.f32("spacing_mm")?,
        r.f32("spacing_mm")?,
    ];
    let patch = [r.u32("patch")?, r.u32("patch")?, r.u32("patch")?];
    let kind_offset = r.pos;
    let kind = r.u8("intensity kind")?;
    r.reserved(3, "reserved")?;
    let (a, b) = (r.f32("intensity")?, r.f32("intensity")?);
    let intensity = match kind {
        1 => IntensityPolicy::Ct {
            min_hu: a,
            max_hu: b,
        },
        2 => IntensityPolicy::Percentile { low: a, high: b },
        other => {
            return Err(invalid(
                "intensity kind",
                kind_offset,
                format!("{other} is neither 1 (CT) nor 2 (percentile)"),
            ));
        }
    };
    let preprocessing = Preprocessing {
        spacing_mm,
        patch,
        intensity,
    };
    preprocessing.validate().map_err(|e| {
        // Name the field that is wrong, not the start of the section.
        let at = match &e {
            Error::InvalidArgument { name: "patch", .. } => pre_offset + 12,
            Error::InvalidArgument {
                name: "intensity", ..
            } => kind_offset + 4,
            _ => pre_offset,
        };
        field_error(e, at)
    })?;

    let count_offset = r.pos;
    let stage_count = r.u32("stage count")? as usize;
    let class_count = r.u32("class count")? as usize;
    if stage_count == 0 || stage_count > MAX_STAGES {
        return Err(invalid(
            "stage count",
            count_offset,
            format!("{stage_count}, expected 1 to {MAX_STAGES}"),
        ));
    }
    if class_count == 0 || class_count > MAX_CLASSES {
        return Err(invalid(
            "class count",
            count_offset + 4,
            format!("{class_count}, expected 1 to {MAX_CLASSES}"),
        ));
    }

    r.ensure(stage_count, 8, "stage shapes")?;
    let mut shapes = Vec::with_capacity(stage_count);
    let mut lens = Vec::with_capacity(stage_count);
    for _ in 0..stage_count {
        let offset = r.pos;
        let shape = StageShape {
            tokens: r.u32("stage shape")?,
            channels: r.u32("stage shape")?,
        };
        lens.push(shape.value_count().map_err(|e| field_error(e, offset))?);
        shapes.push(shape);
    }

    r.ensure(class_count, CLASS_ENTRY_LEN, "class table")?;
    let mut table = Vec::with_capacity(class_count);
    for _ in 0..class_count {
        let entry = r.pos;
        let label = r.u32("class label")?;
        let kind = r.u8("provenance kind")?;
        r.reserved(3, "reserved")?;
        let a = r.u64("provenance")?;
        let b = r.u32("provenance")?;
        let to_u32 = |v: u64| {
            u32::try_from(v)
                .map_err(|_| invalid("provenance", entry + 8, format!("{v} exceeds u32")))
        };
        let provenance = match kind {
            1 if a == 0 && b == 0 => Provenance::OneShot,
            2 if b == 0 => Provenance::Ensemble {
                references: to_u32(a)?,
            },
            3 => Provenance::MemoryBank {
                updates: a,
                momentum: f32::from_bits(b),
            },
            4 => Provenance::Tuned {
                steps: to_u32(a)?,
                references: b,
            },
            _ => {
                return Err(invalid(
                    "provenance",
                    entry + 4,
                    format!("kind {kind} with values ({a}, {b}) is not a known provenance"),
                ));
            }
        };
        provenance
            .validate()
            .map_err(|e| field_error(e, entry + 4))?;
        let name_len = r.u32("class name length")? as usize;
        if name_len > MAX_NAME_BYTES {
            return Err(invalid(
                "class name length",
                entry + 20,
                format!("{name_len} bytes, at most {MAX_NAME_BYTES} allowed"),
            ));
        }
        let name_offset = r.pos;
        let name = core::str::from_utf8(r.take(name_len, "class name")?)
            .map_err(|e| invalid("class name", name_offset, format!("not UTF-8: {e}")))?;
        table.push((label, String::from(name), provenance, entry));
    }
    // Sorted by (label, offset), so a repeated label names its second entry,
    // in O(K log K) for a bank of many classes.
    let mut labels: Vec<(u32, usize)> = table.iter().map(|c| (c.0, c.3)).collect();
    labels.sort_unstable();
    if let Some(pair) = labels.windows(2).find(|p| p[0].0 == p[1].0) {
        return Err(invalid(
            "class label",
            pair[1].1,
            format!(
                "label {} is used twice (first by the entry at byte {})",
                pair[0].0, pair[0].1
            ),
        ));
    }
    let pad = r.pos.next_multiple_of(4) - r.pos;
    r.reserved(pad, "padding")?;

    // Each len is at most MAX_STAGE_VALUES and there are at most MAX_STAGES.
    let values_per_class: usize = lens.iter().sum();
    let per_class = values_per_class
        .checked_mul(payload.size())
        .ok_or_else(|| {
            invalid(
                "stage shapes",
                count_offset,
                String::from("payload size overflows"),
            )
        })?;
    r.ensure(class_count, per_class, "payload")?;
    let mut classes = Vec::with_capacity(class_count);
    for (label, name, provenance, _) in table {
        let mut stages = Vec::with_capacity(stage_count);
        for &n in &lens {
            let mut stage = Vec::with_capacity(n);
            for _ in 0..n {
                let offset = r.pos;
                let v = match payload {
                    Payload::F32 => f32::from_le_bytes(r.array("payload")?),
                    Payload::F16 => f16::from_le_bytes(r.array("payload")?).to_f32(),
                };
                if !v.is_finite() {
                    return Err(invalid(
                        "payload",
                        offset,
                        format!("class {label} holds {v}; values must be finite"),
                    ));
                }
                stage.push(v);
            }
            stages.push(stage);
        }
        let offset = r.pos;
        classes.push(
            ClassEmbedding::new(label, name, provenance, stages)
                .map_err(|e| field_error(e, offset))?,
        );
    }
    if r.pos != r.bytes.len() {
        return Err(FormatError::TrailingBytes {
            offset: r.pos,
            extra: r.bytes.len() - r.pos,
        });
    }
    TaskEmbedding::new(model, preprocessing, shapes, classes)
        .map_err(|e| field_error(e, count_offset))
}

/// Reads a `.irisemb` file.
///
/// Reads the header first and then no more than the file length it
/// declares, so a device or a huge file that is not an `.irisemb`
/// (`/dev/zero`, a disk image) is refused after 32 bytes instead of being
/// read into memory.
///
/// # Errors
/// [`Error::Io`] if the file cannot be read, otherwise as [`read`].
#[cfg(feature = "std")]
pub fn read_file(path: impl AsRef<std::path::Path>) -> Result<TaskEmbedding> {
    use std::io::Read;

    let path = path.as_ref();
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    (&mut file)
        .take(HEADER_LEN as u64)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    let Some(declared) = declared_len(&bytes) else {
        // Not a valid header: `read` says what is wrong with it.
        return read(&bytes);
    };
    // The vector grows with the bytes actually there, never with the claim.
    (&mut file)
        .take(declared.saturating_sub(HEADER_LEN as u64))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 == declared {
        // Count what follows without keeping it (at most 1 GiB of it).
        let extra = std::io::copy(&mut file.take(1 << 30), &mut std::io::sink()).map_err(io)?;
        if extra > 0 {
            return Err(FormatError::TrailingBytes {
                offset: bytes.len(),
                extra: usize::try_from(extra).unwrap_or(usize::MAX),
            }
            .into());
        }
    }
    read(&bytes)
}

/// The file length a header declares, if `header` is a whole header with
/// the magic, the version and a matching header checksum.
#[cfg(feature = "std")]
fn declared_len(header: &[u8]) -> Option<u64> {
    let header: &[u8; HEADER_LEN] = header.try_into().ok()?;
    let field = |at: usize| header[at..at + 4].try_into().ok().map(u32::from_le_bytes);
    let valid = header[..MAGIC.len()] == MAGIC
        && u16::from_le_bytes([header[8], header[9]]) == VERSION
        && field(HEADER_CRC_OFFSET)? == crc(&header[..HEADER_CRC_OFFSET]);
    let len = header[FILE_LEN_OFFSET..FILE_LEN_OFFSET + 8].try_into().ok();
    valid.then_some(u64::from_le_bytes(len?))
}

/// Writes `embedding` to `path` atomically: the bytes go to a temporary file
/// in the same directory, which is synced and then renamed over `path`, so
/// `path` never holds a partial file.
///
/// # Errors
/// [`Error::Io`] for filesystem errors, otherwise as [`write()`].
#[cfg(feature = "std")]
pub fn write_file(
    path: impl AsRef<std::path::Path>,
    embedding: &TaskEmbedding,
    payload: Payload,
) -> Result<()> {
    use std::io::Write;

    let path = path.as_ref();
    let bytes = write(embedding, payload)?;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let name = path.file_name().ok_or_else(|| {
        Error::invalid("path", format!("{} does not name a file", path.display()))
    })?;
    // Unique per process and call, so concurrent writers never share a temporary.
    static NEXT: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}-{n}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(&bytes)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        // Best effort: the temporary file may not exist.
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}
