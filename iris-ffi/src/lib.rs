//! # libiris
//!
//! The C ABI of iris, built as `libiris.so` and `libiris.a` over
//! [`iris_core`]. The functions themselves arrive with the C ABI work; this
//! crate exists so the workspace layout, library name and crate types are
//! fixed from the start.
