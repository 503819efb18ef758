//! The windowed inference path end to end, through the public API only:
//! plan -> extract -> (a stand-in network) -> blend -> largest component -> Dice.

use iris_core::labels::keep_largest_components;
use iris_core::metrics::dice_per_class;
use iris_core::volume::{Affine, LabelMap};
use iris_core::window::{BlendOptions, Blender, WindowPlan};
use ndarray::{Array3, Zip};

/// Two balls: label 1 (large, centred) and label 2 (smaller), plus a stray
/// 2 x 2 x 2 cube of label 1 far from the rest.
fn truth(shape: [usize; 3]) -> Array3<u16> {
    let [d, h, w] = shape;
    Array3::from_shape_fn((d, h, w), |(z, y, x)| {
        let r2 = |c: [f32; 3]| {
            (z as f32 - c[0]).powi(2) + (y as f32 - c[1]).powi(2) + (x as f32 - c[2]).powi(2)
        };
        let centre = [d as f32 / 2.0, h as f32 / 2.0, w as f32 / 3.0];
        if r2(centre) < 8.0f32.powi(2) {
            1
        } else if r2([d as f32 / 2.0, h as f32 / 2.0, 0.8 * w as f32]) < 5.0f32.powi(2) {
            2
        } else if z < 2 && y < 2 && x < 2 {
            1
        } else {
            0
        }
    })
}

/// A stand-in for the network: per-class sigmoid of the input image, whose
/// voxel value is the label (0, 1 or 2); `[2, wd, wh, ww]`.
fn network(input: &Array3<f32>) -> Vec<f32> {
    let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
    [1.0f32, 2.0]
        .iter()
        .flat_map(|&class| {
            input
                .iter()
                .map(move |&v| sigmoid(8.0 * (0.5 - (v - class).abs())))
        })
        .collect()
}

fn segment(shape: [usize; 3], window: [usize; 3]) {
    let reference = truth(shape);
    let image = reference.mapv(f32::from);
    let plan = WindowPlan::new(shape, window, 0.5).expect("valid plan");
    let mut max_prob = 0.0f32;
    let mut blender = Blender::new(&plan, &[1, 2], BlendOptions::default())
        .expect("valid blender")
        .with_probability_sink(|_, _, block| {
            max_prob = block.iter().copied().fold(max_prob, f32::max);
        })
        .expect("no window added yet");
    for window in plan.windows() {
        let input = plan
            .extract(image.view(), window.index, 0.0)
            .expect("window inside plan");
        blender
            .add(window.index, &network(&input))
            .expect("valid output");
    }
    let mut labels = blender.finish().expect("all windows added");
    // The network is pointwise, so blending reproduces it: labels are exact.
    assert_eq!(labels, reference, "{shape:?} / {window:?}");
    assert!((max_prob - 1.0 / (1.0 + (-4.0f32).exp())).abs() < 1e-3);

    let summary = keep_largest_components(&mut labels).expect("valid");
    assert_eq!(summary[0].label, 1);
    assert_eq!((summary[0].components, summary[0].removed), (2, 8));
    let mut cleaned = reference.clone();
    Zip::indexed(&mut cleaned).for_each(|(z, y, x), v| {
        if z < 2 && y < 2 && x < 2 {
            *v = 0;
        }
    });
    let ours = LabelMap::new(labels, Affine::IDENTITY).expect("valid");
    let truth = LabelMap::new(cleaned, Affine::IDENTITY).expect("valid");
    let dice = dice_per_class(&ours, &truth, &[1, 2, 3]).expect("same grid");
    assert_eq!(dice, [Some(1.0), Some(1.0), None]);
}

#[test]
fn windows_larger_and_smaller_than_the_volume() {
    // Several windows along every axis, uneven steps.
    segment([37, 41, 52], [16, 16, 16]);
    // The volume is thinner than the window along d: padding, cropped back.
    segment([20, 41, 52], [24, 16, 32]);
}
