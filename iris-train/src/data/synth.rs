//! Synthetic contrast in the spirit of SynthSeg (Billot et al., 2023): an
//! image drawn from a label map alone, so that the network learns shapes,
//! not one scanner's intensities.
//!
//! A [`Contrast`] gives every label (background included) a random mean in
//! `[0, 1]` and a random standard deviation; each voxel is drawn from its
//! label's Gaussian; the image is multiplied by a smooth random bias field
//! `exp(b)`, `b` a coarse Gaussian grid upsampled trilinearly. The head
//! layers ([`SHELL_LABELS`]) sometimes take the background's intensities,
//! as in a skull-stripped scan. Blur, gamma,
//! normalisation, contrast, brightness and noise follow in
//! [`augment_intensity`](super::augment::augment_intensity).
//!
//! A contrast is a function of a seed and the label value only, so the
//! reference and query of an episode can share one (they are one modality
//! at inference) while each draws its own bias field and noise. A contrast
//! may also group labels into a few tissues of one intensity, as the
//! parcels of an atlas look alike in a real scan: then a class must be
//! found by its shape and position, not by a colour of its own.

use ndarray::{Array3, Zip};
use rand::rngs::ChaCha8Rng;
use rand::{Rng, RngExt, SeedableRng};
use rand_distr::StandardNormal;

use super::atlas::SHELL_LABELS;
use super::augment::{smooth_field, uniform};
use super::{Error, Result};

/// Ranges of the synthetic image model.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthConfig {
    /// Range of each label's mean intensity. Default `[0, 1]`.
    pub mean: [f32; 2],
    /// Range of each label's standard deviation. Default `[0, 0.1]`.
    pub std: [f32; 2],
    /// Standard deviation of the log bias field. Default 0.3.
    pub bias_std: f32,
    /// Control points per axis of the bias field (>= 2). Default 4.
    pub bias_grid: usize,
    /// Probability that the head layers ([`SHELL_LABELS`]) look like
    /// background, as in a skull-stripped scan. Default 0.3.
    pub strip_probability: f64,
    /// Probability that a contrast groups the labels into a few tissues
    /// that share an intensity. Default 0.5.
    pub tissue_probability: f64,
    /// Range of the number of tissues of a grouped contrast (>= 1).
    /// Default `[2, 6]`.
    pub tissues: [u32; 2],
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            mean: [0.0, 1.0],
            std: [0.0, 0.1],
            bias_std: 0.3,
            bias_grid: 4,
            strip_probability: 0.3,
            tissue_probability: 0.5,
            tissues: [2, 6],
        }
    }
}

impl SynthConfig {
    /// Checks the ranges.
    ///
    /// # Errors
    /// [`Error::Core`] naming the field.
    pub fn validate(&self) -> Result<()> {
        for (name, [lo, hi]) in [("synth.mean", self.mean), ("synth.std", self.std)] {
            if !(lo.is_finite() && hi.is_finite() && lo <= hi) || (name == "synth.std" && lo < 0.0)
            {
                return Err(Error::invalid(
                    name,
                    format!("[{lo}, {hi}] must be an increasing range (std >= 0)"),
                ));
            }
        }
        if !(self.bias_std.is_finite() && self.bias_std >= 0.0) {
            return Err(Error::invalid(
                "synth.bias_std",
                format!("{} must be >= 0", self.bias_std),
            ));
        }
        for (name, p) in [
            ("synth.strip_probability", self.strip_probability),
            ("synth.tissue_probability", self.tissue_probability),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(Error::invalid(name, format!("{p} is not a probability")));
            }
        }
        if self.tissues[0] == 0 || self.tissues[0] > self.tissues[1] {
            return Err(Error::invalid(
                "synth.tissues",
                format!("{:?} must be an increasing range from 1", self.tissues),
            ));
        }
        if self.bias_grid < 2 {
            return Err(Error::invalid(
                "synth.bias_grid",
                format!("{} must be at least 2", self.bias_grid),
            ));
        }
        Ok(())
    }
}

/// A label-to-intensity model: per label a Gaussian (mean, standard
/// deviation), a pure function of the contrast's seed and the label value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Contrast {
    seed: u64,
    /// Whether the head layers take the background's Gaussian.
    strip: bool,
    /// Labels are grouped into this many tissues (`None`: one each).
    tissues: Option<u32>,
}

impl Contrast {
    /// A random contrast of `config`.
    pub fn random(rng: &mut impl Rng, config: &SynthConfig) -> Contrast {
        let seed = rng.random();
        let strip = rng.random_bool(config.strip_probability);
        let tissues = rng.random_bool(config.tissue_probability).then(|| {
            rng.random_range(config.tissues[0]..=config.tissues[1].max(config.tissues[0]))
        });
        Contrast {
            seed,
            strip,
            tissues,
        }
    }

    /// The Gaussian of `label` (background, label 0, is always a tissue of
    /// its own).
    pub fn gaussian(&self, label: u16, config: &SynthConfig) -> (f32, f32) {
        let label = if self.strip && SHELL_LABELS.contains(&label) {
            0
        } else {
            label
        };
        let key = match self.tissues {
            Some(n) if label != 0 => {
                1 + mix(self.seed ^ 0x7469_7373, u64::from(label)) % u64::from(n)
            }
            _ => u64::from(label) << 32,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(mix(self.seed, key));
        (
            uniform(&mut rng, config.mean[0], config.mean[1]),
            uniform(&mut rng, config.std[0], config.std[1]),
        )
    }
}

/// SplitMix64 of `seed` and `value`: unrelated streams for nearby inputs.
fn mix(seed: u64, value: u64) -> u64 {
    let mut x = seed ^ value.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Draws a synthetic image `[D, H, W]` (same shape as `labels`, values
/// roughly in `[0, 1.5]`, not normalised) from a label map, with the
/// labels' Gaussians from `contrast` and the bias field and noise from
/// `rng`.
///
/// # Errors
/// [`Error::Core`] for an invalid `config` or an empty label map.
pub fn synthesize(
    labels: &Array3<u16>,
    contrast: &Contrast,
    rng: &mut impl Rng,
    config: &SynthConfig,
) -> Result<Array3<f32>> {
    config.validate()?;
    if labels.is_empty() {
        return Err(Error::invalid("labels", "empty label map"));
    }
    let mut present = vec![false; usize::from(u16::MAX) + 1];
    labels.iter().for_each(|&l| present[usize::from(l)] = true);
    let table: Vec<(f32, f32)> = present
        .iter()
        .enumerate()
        .map(|(l, &p)| {
            if p {
                contrast.gaussian(l as u16, config)
            } else {
                (0.0, 0.0)
            }
        })
        .collect();
    let (d, h, w) = labels.dim();
    let bias = if config.bias_std > 0.0 {
        let mut b = smooth_field(rng, [config.bias_grid; 3], [d, h, w], config.bias_std)?;
        b.mapv_inplace(f32::exp);
        Some(b)
    } else {
        None
    };
    let mut image = Array3::zeros((d, h, w));
    Zip::from(&mut image).and(labels).for_each(|v, &l| {
        let (mean, std) = table[usize::from(l)];
        *v = mean + std * rng.sample::<f32, _>(StandardNormal);
    });
    if let Some(b) = bias {
        image *= &b;
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A per-label contrast of `config` (no tissue groups) from `seed`.
    fn per_label(seed: u64, config: &SynthConfig) -> Contrast {
        let config = SynthConfig {
            tissue_probability: 0.0,
            ..config.clone()
        };
        Contrast::random(&mut ChaCha8Rng::seed_from_u64(seed), &config)
    }

    /// Mean of the image over slices `lo..hi` of the first axis.
    fn slab_mean(image: &Array3<f32>, lo: usize, hi: usize) -> f32 {
        image.slice(ndarray::s![lo..hi, .., ..]).mean().unwrap()
    }

    #[test]
    fn labels_get_their_own_gaussian() {
        let labels = Array3::from_shape_fn((20, 20, 20), |(d, _, _)| u16::from(d >= 10) * 3);
        let config = SynthConfig {
            bias_std: 0.0,
            ..SynthConfig::default()
        };
        let contrast = per_label(9, &config);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let image = synthesize(&labels, &contrast, &mut rng, &config).unwrap();
        let (a, b) = (slab_mean(&image, 0, 10), slab_mean(&image, 10, 20));
        let (m0, m3) = (
            contrast.gaussian(0, &config).0,
            contrast.gaussian(3, &config).0,
        );
        assert!((a - m0).abs() < 0.01, "{a} vs {m0}");
        assert!((b - m3).abs() < 0.01, "{b} vs {m3}");
        assert!((m0 - m3).abs() > 1e-3, "two labels, one mean: {m0}");
    }

    #[test]
    fn a_shared_contrast_gives_each_label_the_same_mean_in_both_images() {
        let labels = Array3::from_shape_fn((20, 10, 10), |(d, _, _)| (d / 5) as u16 * 7);
        let config = SynthConfig {
            bias_std: 0.0,
            ..SynthConfig::default()
        };
        let contrast = per_label(3, &config);
        let draw = |seed| {
            synthesize(
                &labels,
                &contrast,
                &mut ChaCha8Rng::seed_from_u64(seed),
                &config,
            )
            .unwrap()
        };
        let (first, second) = (draw(1), draw(2));
        assert_ne!(first, second, "the noise is the draw's own");
        for slab in 0..4 {
            let (a, b) = (
                slab_mean(&first, slab * 5, slab * 5 + 5),
                slab_mean(&second, slab * 5, slab * 5 + 5),
            );
            assert!((a - b).abs() < 0.02, "label {}: {a} vs {b}", slab * 7);
        }
        // Another contrast moves the labels' means.
        let other = per_label(4, &config);
        assert_ne!(other.gaussian(7, &config), contrast.gaussian(7, &config));
    }

    #[test]
    fn grouped_contrast_shares_intensities_between_labels() {
        let config = SynthConfig {
            tissue_probability: 1.0,
            tissues: [2, 2],
            ..SynthConfig::default()
        };
        let contrast = Contrast::random(&mut ChaCha8Rng::seed_from_u64(5), &config);
        let mut means: Vec<(f32, f32)> = (1..=40).map(|l| contrast.gaussian(l, &config)).collect();
        means.sort_by(|a, b| a.partial_cmp(b).unwrap());
        means.dedup();
        assert_eq!(means.len(), 2, "40 labels in 2 tissues: {means:?}");
        // Background keeps a Gaussian of its own.
        assert!(!means.contains(&contrast.gaussian(0, &config)));
        let per_label = per_label(5, &config);
        let distinct: std::collections::BTreeSet<u32> = (1..=40)
            .map(|l| per_label.gaussian(l, &config).0.to_bits())
            .collect();
        assert_eq!(distinct.len(), 40);
    }

    #[test]
    fn stripped_head_layers_look_like_background() {
        let labels = Array3::from_shape_fn(
            (20, 8, 8),
            |(d, _, _)| if d < 10 { 0 } else { SHELL_LABELS[1] },
        );
        let half_means = |strip: f64| {
            let config = SynthConfig {
                bias_std: 0.0,
                std: [0.0, 0.0],
                strip_probability: strip,
                ..SynthConfig::default()
            };
            let contrast = per_label(4, &config);
            let image = synthesize(
                &labels,
                &contrast,
                &mut ChaCha8Rng::seed_from_u64(4),
                &config,
            )
            .unwrap();
            (image[[0, 0, 0]], image[[19, 0, 0]])
        };
        let (bg, shell) = half_means(1.0);
        assert_eq!(bg, shell);
        let (bg, shell) = half_means(0.0);
        assert_ne!(bg, shell);
    }

    #[test]
    fn bias_field_is_positive_and_smooth() {
        let labels = Array3::zeros((16, 16, 16));
        let config = SynthConfig {
            mean: [1.0, 1.0],
            std: [0.0, 0.0],
            ..SynthConfig::default()
        };
        let contrast = per_label(2, &config);
        let image = synthesize(
            &labels,
            &contrast,
            &mut ChaCha8Rng::seed_from_u64(2),
            &config,
        )
        .unwrap();
        assert!(image.iter().all(|&v| v > 0.0));
        // Neighbouring voxels differ by far less than the field's range.
        let step = (0..15)
            .map(|i| (image[[i + 1, 8, 8]] - image[[i, 8, 8]]).abs())
            .fold(0.0, f32::max);
        let range = image.iter().fold(0.0f32, |m, &v| m.max(v))
            - image.iter().fold(f32::MAX, |m, &v| m.min(v));
        assert!(step < range / 3.0, "step {step}, range {range}");
    }
}
