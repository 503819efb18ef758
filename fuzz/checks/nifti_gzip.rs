//! The `nifti_gzip` target's check: the gzip path of the NIfTI reader.
//!
//! A small committed `.nii` (the first byte picks which) is gzipped (the
//! second byte picks the level, how many members, and which optional header
//! fields), then the rest of the input is a list of edits to the compressed
//! bytes: bit flips and byte sets (counted from either end, so the trailer
//! is as easy to hit as the deflate data), cuts, a zeroed CRC, a wrong
//! length, extra members, garbage, insertions and deletions.
//!
//! Decoding must never panic, and the reader must agree with an independent
//! check of the gzip framing (raw inflate and crc32fast, member by member):
//! - it accepts only streams whose every member has the right CRC-32 and
//!   length, so a corrupted stream never decodes to other voxels;
//! - what it accepts decodes exactly as the decompressed bytes do (the
//!   original volume when those start with the original file);
//! - it accepts every well-formed stream of the original file (several
//!   members, empty members, optional header fields, data after the voxels).

use flate2::{Compression, Decompress, FlushDecompress, GzBuilder, Status};
use iris_core::nifti;

#[path = "input.rs"]
mod input;

use input::Input;

/// Small valid files from the `nifti_header` corpus: a float image and a
/// label map stored as `uint16`.
const BASES: [&[u8]; 2] = [
    include_bytes!("../seeds/nifti_header/ramp_f32.nii"),
    include_bytes!("../seeds/nifti_header/labels_u16.nii"),
];

pub fn check(data: &[u8]) {
    let (base, gz) = stream(data);
    let decoded = nifti::decode_bytes(&gz);
    if !gz.starts_with(&[0x1f, 0x8b]) {
        // Without the gzip magic the reader takes the bytes as a plain .nii
        // (the nifti_header target's ground): it only must not panic.
        return;
    }
    let content = gunzip_checked(&gz);
    match (decoded, content) {
        (Ok((image, _)), Some(content)) => {
            let expected = if content.starts_with(base) {
                nifti::decode_bytes(base).expect("a base file decodes").0
            } else {
                nifti::decode_bytes(&content)
                    .expect("what the reader decoded from gzip decodes uncompressed")
                    .0
            };
            assert_eq!(image, expected, "a gzip stream decoded to other voxels");
        }
        (Ok(_), None) => {
            panic!("the reader accepted a gzip stream with a wrong CRC, length or frame")
        }
        (Err(e), Some(content)) if content.starts_with(base) => {
            panic!("the reader refused a well-formed gzip stream of a valid file: {e}")
        }
        (Err(_), _) => {}
    }
}

/// The base file the input picks, and its gzip stream after the edits.
pub fn stream(data: &[u8]) -> (&'static [u8], Vec<u8>) {
    let mut input = Input::new(data);
    let base = BASES[usize::from(input.byte()) % BASES.len()];
    let mut gz = compress(base, input.byte());
    while !input.is_empty() {
        edit(&mut gz, &mut input);
    }
    (base, gz)
}

/// `base` gzipped as `framing` says: level 0 (stored), 1, 6 or 9 (bits 0-1);
/// 1 to 3 members (bits 2-3); an empty member at the end (bit 4); a file
/// name (bit 5); a comment and an extra field (bit 6).
fn compress(base: &[u8], framing: u8) -> Vec<u8> {
    let level = Compression::new([0, 1, 6, 9][usize::from(framing & 3)]);
    let members = 1 + usize::from(framing >> 2 & 3) % 3;
    let mut out = Vec::new();
    let mut parts: Vec<&[u8]> = base.chunks(base.len().div_ceil(members)).collect();
    if framing & 0x10 != 0 {
        parts.push(&[]);
    }
    for part in parts {
        let mut builder = GzBuilder::new();
        if framing & 0x20 != 0 {
            builder = builder.filename("ramp.nii");
        }
        if framing & 0x40 != 0 {
            builder = builder
                .comment("iris fuzz")
                .extra(vec![b'I', b'R', 2, 0, 1, 2]);
        }
        out.extend(gzip_with(builder, part, level));
    }
    out
}

fn gzip_with(builder: GzBuilder, bytes: &[u8], level: Compression) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = builder.write(Vec::new(), level);
    encoder.write_all(bytes).expect("writing to memory");
    encoder.finish().expect("writing to memory")
}

/// Applies the edit the next input bytes describe.
fn edit(gz: &mut Vec<u8>, input: &mut Input) {
    let op = input.byte();
    let len = gz.len();
    // A position counted from the start, or (high bit) from the end.
    let mut at = || {
        let p = usize::from(input.u16());
        let n = p & 0x7fff;
        if len == 0 {
            0
        } else if p & 0x8000 != 0 {
            len - 1 - n % len
        } else {
            n % len
        }
    };
    match op % 9 {
        0 if len > 0 => {
            let i = at();
            gz[i] ^= 1 << (input.byte() & 7);
        }
        1 if len > 0 => {
            let i = at();
            gz[i] = input.byte();
        }
        2 => {
            let i = at();
            gz.truncate(i);
        }
        3 if len >= 8 => gz[len - 8..len - 4].fill(0),
        4 if len >= 4 => {
            let size = u32::from_le_bytes(gz[len - 4..].try_into().expect("4 bytes"));
            gz[len - 4..].copy_from_slice(&size.wrapping_add(1).to_le_bytes());
        }
        5 => {
            let n = usize::from(input.byte() % 64);
            gz.extend(gzip_with(
                GzBuilder::new(),
                input.take(n),
                Compression::default(),
            ));
        }
        6 => {
            let n = usize::from(input.byte() % 16);
            gz.extend_from_slice(input.take(n));
        }
        7 => {
            let i = at();
            let n = usize::from(input.byte() % 16);
            gz.splice(i..i, input.take(n).iter().copied());
        }
        _ if len > 0 => {
            let i = at();
            let n = 1 + usize::from(input.byte() % 16);
            gz.drain(i..(i + n).min(len));
        }
        _ => {}
    }
}

/// The decompressed bytes of `gz` when it is a sequence of well-formed gzip
/// members (RFC 1952) whose every CRC-32 and length match, checked with raw
/// inflate and crc32fast rather than the reader's gzip decoder; else `None`.
pub fn gunzip_checked(mut gz: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    while !gz.is_empty() {
        let used = member(gz, &mut out)?;
        gz = &gz[used..];
    }
    Some(out)
}

/// Decompresses the member at the start of `gz` onto `out`; returns its
/// length in bytes.
fn member(gz: &[u8], out: &mut Vec<u8>) -> Option<usize> {
    const FHCRC: u8 = 2;
    const FEXTRA: u8 = 4;
    const FNAME: u8 = 8;
    const FCOMMENT: u8 = 16;
    // RFC 1952: a decoder must refuse a member with a reserved flag set.
    const RESERVED: u8 = 0xe0;
    if gz.len() < 10 || gz[..3] != [0x1f, 0x8b, 8] || gz[3] & RESERVED != 0 {
        return None;
    }
    let flags = gz[3];
    let mut at = 10;
    if flags & FEXTRA != 0 {
        let xlen = gz.get(at..at + 2)?;
        at += 2 + usize::from(u16::from_le_bytes([xlen[0], xlen[1]]));
    }
    for field in [FNAME, FCOMMENT] {
        if flags & field != 0 {
            at += gz.get(at..)?.iter().position(|&b| b == 0)? + 1;
        }
    }
    if flags & FHCRC != 0 {
        at += 2;
    }
    let body = gz.get(at..)?;
    let start = out.len();
    let mut inflate = Decompress::new(false);
    loop {
        out.reserve(4096);
        let (read, written) = (inflate.total_in(), inflate.total_out());
        let rest = body.get(usize::try_from(read).ok()?..)?;
        // Not `Finish`: with it miniz_oxide refuses some valid streams that
        // it inflates fine a piece at a time, as the reader's decoder does.
        match inflate
            .decompress_vec(rest, out, FlushDecompress::None)
            .ok()?
        {
            Status::StreamEnd => break,
            _ if inflate.total_in() == read && inflate.total_out() == written => return None,
            _ => {}
        }
    }
    at += usize::try_from(inflate.total_in()).ok()?;
    let trailer = gz.get(at..at + 8)?;
    let crc = u32::from_le_bytes(trailer[..4].try_into().ok()?);
    let size = u32::from_le_bytes(trailer[4..].try_into().ok()?);
    let content = &out[start..];
    (crc32fast::hash(content) == crc && content.len() as u32 == size).then_some(at + 8)
}
