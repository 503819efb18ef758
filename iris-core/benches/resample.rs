//! Resampling (and reorientation, normalisation) timings on a brain-sized volume (181 x 217 x 181 at 1 mm, the
//! size of the Colin27 and MNI templates), printed as the best of a few runs.
//!
//! Run with `cargo bench -p iris-core --bench resample` (release build).

use std::hint::black_box;
use std::time::{Duration, Instant};

use iris_core::preprocess::{
    IntensityPolicy, canonical, resample_image, resample_labels, target_geometry,
};
use iris_core::volume::{Affine, Geometry, Image};
use ndarray::Array3;

const RUNS: usize = 5;

fn best_of<T>(mut f: impl FnMut() -> T) -> Duration {
    (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            black_box(f());
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn report(what: &str, from: &Geometry, to: &Geometry, time: Duration) {
    let voxels = to.len() as f64;
    println!(
        "{what:<34} {:?} -> {:?}: {:>8.1} ms ({:.1} Mvoxel/s out)",
        from.shape(),
        to.shape(),
        time.as_secs_f64() * 1e3,
        voxels / time.as_secs_f64() / 1e6
    );
}

fn main() -> Result<(), iris_core::Error> {
    let shape = (181, 217, 181);
    // Canonical 1 mm grid in our [d, h, w] order: d -> +z, h -> +y, w -> +x.
    let affine = Affine([
        [0.0, 0.0, 1.0, -90.0],
        [0.0, 1.0, 0.0, -126.0],
        [1.0, 0.0, 0.0, -72.0],
        [0.0, 0.0, 0.0, 1.0],
    ]);
    let image = Image::new(
        Array3::from_shape_fn(shape, |(d, h, w)| ((d * 7 + h * 3 + w) % 251) as f32),
        affine,
    )?;
    let labels = image.map(|&v| (v as u16) % 117);
    let source = *image.geometry();
    println!("best of {RUNS} runs, one thread");

    for spacing in [1.5, 3.0] {
        let target = target_geometry(&source, spacing)?;
        let t = best_of(|| resample_image(&image, &target));
        report(
            &format!("image trilinear to {spacing} mm"),
            &source,
            &target,
            t,
        );
        let t = best_of(|| resample_labels(&labels, &target));
        report(
            &format!("labels nearest to {spacing} mm"),
            &source,
            &target,
            t,
        );
    }

    // The way back: model-grid labels to the original grid.
    let coarse = target_geometry(&source, 1.5)?;
    let predicted = resample_labels(&labels, &coarse)?;
    let t = best_of(|| resample_labels(&predicted, &source));
    report("labels nearest 1.5 mm back to 1 mm", &coarse, &source, t);

    // An oblique target (10 degrees about z) takes the per-voxel path.
    let (s, c) = (10f64.to_radians().sin(), 10f64.to_radians().cos());
    let mut m = coarse.affine();
    for row in 0..3 {
        let (d, w) = (m.0[row][0], m.0[row][2]);
        m.0[row][0] = c * d - s * w;
        m.0[row][2] = s * d + c * w;
    }
    let oblique = Geometry::new(coarse.shape(), m)?;
    let t = best_of(|| resample_image(&image, &oblique));
    report("image trilinear, oblique 1.5 mm", &source, &oblique, t);
    let t = best_of(|| resample_labels(&labels, &oblique));
    report("labels nearest, oblique 1.5 mm", &source, &oblique, t);

    // Reorientation of the same volume stored LPI (all three axes flipped).
    let mut lpi = affine;
    for row in lpi.0.iter_mut().take(3) {
        for v in row.iter_mut().take(3) {
            *v = -*v;
        }
    }
    let flipped = Image::new(image.data().clone(), lpi)?;
    let t = best_of(|| canonical(&flipped));
    report("canonical (3 flips)", &source, &source, t);

    // Intensity normalisation of the 1 mm volume (MR selects two percentiles).
    for (name, policy) in [("CT", IntensityPolicy::CT), ("MR", IntensityPolicy::MR)] {
        let t = best_of(|| policy.normalize(&image));
        report(&format!("normalize {name}"), &source, &source, t);
    }
    Ok(())
}
