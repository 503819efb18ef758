//! The arithmetic a model's convolutions run in.

use core::fmt;
use core::str::FromStr;
use std::prelude::rust_2024::*;

use crate::error::Error;

/// The arithmetic of a model's 3x3x3 convolutions ([`ModelOptions`]).
///
/// ```no_run
/// use iris_core::engine::{Model, ModelOptions, Precision};
///
/// let options = ModelOptions { precision: Precision::Bfloat16, ..Default::default() };
/// let model = Model::load_with("models/iris-tiny", &options)?;
/// // Bfloat16 where the CPU has AVX-512 BF16, Float32 elsewhere.
/// println!("running in {}", model.precision());
/// # Ok::<(), iris_core::Error>(())
/// ```
///
/// [`ModelOptions`]: super::ModelOptions
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// f32 throughout: the engine agrees with burn and onnxruntime to 1e-4.
    #[default]
    Float32,
    /// The products of the 3x3x3 convolutions that run by Winograd's
    /// algorithm (16 or more channels each side: most of a window's work)
    /// take their operands rounded to bfloat16 (8 significant bits) and
    /// sum them in f32; everything else stays f32. On CPUs with AVX-512
    /// BF16 (AMD Zen 4, Intel Sapphire Rapids and later) a full-size
    /// window ran about 1.3 times faster here; on models with random
    /// weights its probabilities differed from f32's by up to 0.04, and
    /// about 1 % of the voxels crossed 0.5 (`docs/benchmarks.md`): an
    /// option to validate on one's own data, not the default. On other
    /// CPUs the model runs in [`Precision::Float32`], which
    /// [`Model::precision`] reports.
    ///
    /// [`Model::precision`]: super::Model::precision
    Bfloat16,
}

impl Precision {
    /// The precision this CPU runs when `self` is asked for: `Bfloat16`
    /// only where the CPU has AVX-512 BF16 (and the engine's own kernels,
    /// AVX-512F).
    pub fn on_this_cpu(self) -> Precision {
        match self {
            Precision::Bfloat16 if has_bf16_products() => Precision::Bfloat16,
            _ => Precision::Float32,
        }
    }

    /// The name [`FromStr`] reads: `f32` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Float32 => "f32",
            Precision::Bfloat16 => "bf16",
        }
    }
}

/// Whether this CPU runs the bfloat16 products (AVX-512F, BW and BF16,
/// unless `IRIS_DIRECT_CONV=0` turns the engine's kernels off).
fn has_bf16_products() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::conv3d::available()
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = Error;

    /// `f32` or `bf16`.
    fn from_str(s: &str) -> Result<Precision, Error> {
        [Precision::Float32, Precision::Bfloat16]
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| Error::invalid("precision", std::format!("`{s}`: expected f32 or bf16")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_back_and_others_are_refused() {
        for p in [Precision::Float32, Precision::Bfloat16] {
            assert_eq!(p.name().parse::<Precision>().expect("parses"), p);
        }
        let err = "fp16".parse::<Precision>().expect_err("refused");
        assert!(err.to_string().contains("fp16"), "{err}");
        assert_eq!(Precision::Float32.on_this_cpu(), Precision::Float32);
    }
}
