//! The `nifti_header` target's check: NIfTI-1 parsing from memory (`.nii`
//! bytes, plain or gzip-compressed): header fields, dimensions, offsets,
//! scaling, affines.
//!
//! Whatever the bytes, decoding must return `Ok` or `Err`, never panic or
//! allocate more than the input can back (libFuzzer's `-malloc_limit_mb`
//! catches the latter), and what it returns is self-consistent.

pub fn check(data: &[u8]) {
    if let Ok((image, info)) = iris_core::nifti::decode_bytes(data) {
        let shape = image.shape();
        assert_eq!(image.data().len(), shape.iter().product::<usize>());
        assert!(image.geometry().affine().inverse().is_some());
        assert!(info.datatype.size() > 0);
    }
    if let Ok((labels, _)) = iris_core::nifti::decode_label_bytes(data) {
        assert_eq!(
            labels.data().len(),
            labels.shape().iter().product::<usize>()
        );
    }
}
