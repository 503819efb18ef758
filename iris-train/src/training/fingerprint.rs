//! The model fingerprint ([`model_fingerprint`]) that binds task
//! embeddings to exact weights.

use burn::prelude::*;
use sha2::{Digest, Sha256};

use crate::model::{Iris, IrisConfig};

/// SHA-256 fingerprint of a model's exact weights and configuration, the
/// value `.irisemb` files carry to refuse embeddings of other weights.
///
/// The digest covers, in this order (all integers little-endian):
/// 1. `u64` byte length of the configuration JSON, then the JSON itself:
///    `serde_json::to_vec(config)` (compact, fields in declaration order);
/// 2. for each float parameter in `burn`'s `Module::visit` order (the
///    order of the fields of `Iris` and its sub-modules, depth first):
///    `u32` rank, each dimension as `u64`, then every value as `f32`
///    little-endian bytes in row-major (C) order.
///
/// An exporter that does not run this crate must reproduce exactly this
/// byte stream (or rewrite the fingerprint of the banks it ships).
pub fn model_fingerprint(
    model: &Iris,
    config: &IrisConfig,
) -> iris_core::embedding::ModelFingerprint {
    struct Hasher(Sha256);
    impl burn::module::ModuleVisitor for Hasher {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            let tensor = param.val();
            self.0.update((D as u32).to_le_bytes());
            for dim in tensor.dims() {
                self.0.update((dim as u64).to_le_bytes());
            }
            let data = tensor.into_data();
            let mut bytes = Vec::with_capacity(data.num_elements() * 4);
            for v in data.iter::<f32>() {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            self.0.update(&bytes);
        }
    }
    // Serialising a derived `Config` of numbers cannot fail.
    let json = serde_json::to_vec(config).unwrap_or_default();
    let mut hasher = Hasher(Sha256::new());
    hasher.0.update((json.len() as u64).to_le_bytes());
    hasher.0.update(&json);
    model.visit(&mut hasher);
    iris_core::embedding::ModelFingerprint::new(hasher.0.finalize().into())
}
