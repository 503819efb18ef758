//! # iris-train
//!
//! The Iris model in burn and everything that makes its weights.
