//! The `irisemb` target's check: `iris_core::irisemb::read`.
//!
//! Each input is read twice: as it is (exercising magic, version, length and
//! checksum handling), and with its header CRC, file length and file CRC
//! repaired (so that mutations reach the field parser behind the checksum,
//! which random bytes would almost never get past). Reading must never panic,
//! and whatever reads successfully must write and read back identically.

use iris_core::irisemb::{self, FILE_LEN_OFFSET, HEADER_CRC_OFFSET, HEADER_LEN, Payload};

pub fn check(data: &[u8]) {
    round_trip(data);
    if data.len() >= HEADER_LEN + 4 {
        let mut sealed = data.to_vec();
        let len = sealed.len();
        sealed[FILE_LEN_OFFSET..FILE_LEN_OFFSET + 8].copy_from_slice(&(len as u64).to_le_bytes());
        let header_crc = crc32fast::hash(&sealed[..HEADER_CRC_OFFSET]);
        sealed[HEADER_CRC_OFFSET..HEADER_LEN].copy_from_slice(&header_crc.to_le_bytes());
        let file_crc = crc32fast::hash(&sealed[..len - 4]);
        sealed[len - 4..].copy_from_slice(&file_crc.to_le_bytes());
        round_trip(&sealed);
    }
}

fn round_trip(bytes: &[u8]) {
    if let Ok(task) = irisemb::read(bytes) {
        let written = irisemb::write(&task, Payload::F32).expect("a read embedding is writable");
        let again = irisemb::read(&written).expect("a written embedding is readable");
        assert_eq!(again, task, "f32 round trip is exact");
    }
}
