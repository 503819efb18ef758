//! Property tests of resampling, orientation and crops on generated grids.

use iris_core::Error;
use iris_core::preprocess::{
    LabelSelection, canonical, crop_or_pad, label_bbox, reference_crop, resample_image,
    resample_labels, target_geometry,
};
use iris_core::volume::{Affine, Geometry, Image, LabelMap, Volume};
use ndarray::Array3;
use proptest::prelude::*;

/// Rotation by Euler angles (radians) about z, then y, then x.
fn rotation(angles: [f64; 3]) -> [[f64; 3]; 3] {
    let [a, b, c] = angles;
    let rz = [
        [a.cos(), -a.sin(), 0.0],
        [a.sin(), a.cos(), 0.0],
        [0.0, 0.0, 1.0],
    ];
    let ry = [
        [b.cos(), 0.0, b.sin()],
        [0.0, 1.0, 0.0],
        [-b.sin(), 0.0, b.cos()],
    ];
    let rx = [
        [1.0, 0.0, 0.0],
        [0.0, c.cos(), -c.sin()],
        [0.0, c.sin(), c.cos()],
    ];
    let mul = |p: [[f64; 3]; 3], q: [[f64; 3]; 3]| -> [[f64; 3]; 3] {
        std::array::from_fn(|r| std::array::from_fn(|k| (0..3).map(|i| p[r][i] * q[i][k]).sum()))
    };
    mul(rx, mul(ry, rz))
}

/// Voxel-to-world affine with direction cosines `rot`, `spacing` (mm per
/// `[d, h, w]` step) and voxel 0 at `origin`.
fn affine(rot: [[f64; 3]; 3], spacing: [f64; 3], origin: [f64; 3]) -> Affine {
    let mut m = Affine::IDENTITY.0;
    for r in 0..3 {
        for k in 0..3 {
            m[r][k] = rot[r][k] * spacing[k];
        }
        m[r][3] = origin[r];
    }
    Affine(m)
}

/// A grid of `shape` voxels of `spacing` with direction `rot`, placed so that
/// its centre is at `center` (mm).
fn centred_grid(
    shape: [usize; 3],
    rot: [[f64; 3]; 3],
    spacing: [f64; 3],
    center: [f64; 3],
) -> Geometry {
    let a = affine(rot, spacing, [0.0; 3]);
    let half = a.apply(shape.map(|n| (n as f64 - 1.0) / 2.0));
    let origin = std::array::from_fn(|r| center[r] - half[r]);
    Geometry::new(shape, affine(rot, spacing, origin)).expect("valid grid")
}

/// An image holding `f(world)` at every voxel.
fn sample(geometry: &Geometry, f: impl Fn([f64; 3]) -> f64) -> Image {
    let [d, h, w] = geometry.shape();
    let data = Array3::from_shape_fn((d, h, w), |(i, j, k)| {
        f(geometry.voxel_to_world([i as f64, j as f64, k as f64])) as f32
    });
    Image::with_geometry(data, *geometry).expect("same shape")
}

/// Whether a fractional source position lies within the source grid (to
/// within rounding of the world-to-voxel map).
fn inside(geometry: &Geometry, p: [f64; 3]) -> bool {
    (0..3).all(|a| p[a] >= -1e-9 && p[a] <= (geometry.shape()[a] - 1) as f64 + 1e-9)
}

/// Checks that `out` holds `f(world)` wherever its voxel lies inside `source`;
/// returns how many voxels were checked.
fn check_linear(
    source: &Geometry,
    out: &Image,
    f: &impl Fn([f64; 3]) -> f64,
    tol: f64,
) -> Result<usize, TestCaseError> {
    let mut checked = 0;
    for ((d, h, w), &v) in out.data().indexed_iter() {
        let world = out
            .geometry()
            .voxel_to_world([d as f64, h as f64, w as f64]);
        let p = source.world_to_voxel(world);
        if !inside(source, p) {
            continue;
        }
        let want = f(world);
        prop_assert!(
            (f64::from(v) - want).abs() <= tol,
            "voxel {:?}: got {v}, want {want} (source position {p:?})",
            [d, h, w]
        );
        checked += 1;
    }
    Ok(checked)
}

fn spacing3() -> impl Strategy<Value = [f64; 3]> {
    [0.4f64..3.0, 0.4f64..3.0, 0.4f64..3.0]
}

fn shape3(lo: usize, hi: usize) -> impl Strategy<Value = [usize; 3]> {
    [lo..hi, lo..hi, lo..hi]
}

fn angles() -> impl Strategy<Value = [f64; 3]> {
    [-3.2f64..3.2, -1.5f64..1.5, -3.2f64..3.2]
}

fn linear() -> impl Strategy<Value = ([f64; 3], f64)> {
    ([-5.0f64..5.0, -5.0f64..5.0, -5.0f64..5.0], -100.0f64..100.0)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Trilinear resampling reproduces a linear function of world position
    /// exactly (to f32 rounding) on grids that share axes, up or down.
    #[test]
    fn linear_functions_survive_axis_aligned_resampling(
        shape in shape3(2, 14),
        spacing in spacing3(),
        rot in angles(),
        new_spacing in 0.3f64..4.0,
        (coef, offset) in linear(),
    ) {
        let source = centred_grid(shape, rotation(rot), spacing, [10.0, -20.0, 30.0]);
        let f = |p: [f64; 3]| coef[0] * p[0] + coef[1] * p[1] + coef[2] * p[2] + offset;
        let image = sample(&source, f);
        let target = target_geometry(&source, new_spacing).expect("valid spacing");
        let out = resample_image(&image, &target).expect("resampled");
        let scale = image.data().iter().fold(1.0f64, |m, &v| m.max(f64::from(v).abs()));
        let checked = check_linear(&source, &out, &f, 2e-5 * scale)?;
        // Voxel 0 coincides with the source's voxel 0: always inside.
        prop_assert!(checked >= 1);
    }

    /// The same on a rotated target grid (the general per-voxel path).
    #[test]
    fn linear_functions_survive_oblique_resampling(
        shape in shape3(3, 14),
        spacing in spacing3(),
        rot in angles(),
        target_shape in shape3(2, 16),
        target_spacing in spacing3(),
        target_rot in angles(),
        (coef, offset) in linear(),
    ) {
        let center = [5.0, 7.0, -3.0];
        let source = centred_grid(shape, rotation(rot), spacing, center);
        let target = centred_grid(target_shape, rotation(target_rot), target_spacing, center);
        let f = |p: [f64; 3]| coef[0] * p[0] + coef[1] * p[1] + coef[2] * p[2] + offset;
        let image = sample(&source, f);
        let out = resample_image(&image, &target).expect("resampled");
        let scale = image.data().iter().fold(1.0f64, |m, &v| m.max(f64::from(v).abs()));
        check_linear(&source, &out, &f, 2e-5 * scale)?;
    }

    /// Resampling onto the source's own grid changes nothing, bit for bit.
    #[test]
    fn resampling_to_the_same_grid_is_the_identity(
        shape in shape3(1, 10),
        spacing in spacing3(),
        rot in angles(),
        seed in any::<u64>(),
    ) {
        let geometry = centred_grid(shape, rotation(rot), spacing, [1.0, 2.0, 3.0]);
        let mut state = seed;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            state >> 33
        };
        let [d, h, w] = shape;
        let image = Image::with_geometry(Array3::from_shape_fn((d, h, w), |_| next() as f32 - 2e9), geometry)
            .expect("same shape");
        let labels = LabelMap::with_geometry(Array3::from_shape_fn((d, h, w), |_| (next() % 7) as u16), geometry)
            .expect("same shape");
        prop_assert_eq!(resample_image(&image, &geometry).expect("ok"), image);
        prop_assert_eq!(resample_labels(&labels, &geometry).expect("ok"), labels);
    }

    /// Nearest-neighbour label resampling takes the value of the source voxel
    /// whose centre is nearest, so only existing labels (or 0 outside) appear.
    #[test]
    fn nearest_takes_the_nearest_source_voxel(
        shape in shape3(2, 10),
        spacing in spacing3(),
        rot in angles(),
        target_shape in shape3(2, 14),
        target_spacing in spacing3(),
        target_rot in angles(),
        seed in any::<u64>(),
    ) {
        let source = centred_grid(shape, rotation(rot), spacing, [0.0; 3]);
        let target = centred_grid(target_shape, rotation(target_rot), target_spacing, [0.5, -0.5, 1.0]);
        let palette = [3u16, 17, 250, 4000];
        let [d, h, w] = shape;
        let labels = LabelMap::with_geometry(
            Array3::from_shape_fn((d, h, w), |(i, j, k)| {
                palette[((seed >> ((i * 7 + j * 3 + k) % 60)) % 4) as usize]
            }),
            source,
        ).expect("same shape");
        let out = resample_labels(&labels, &target).expect("resampled");
        for ((i, j, k), &v) in out.data().indexed_iter() {
            prop_assert!(v == 0 || palette.contains(&v), "value {v} not in the source");
            let p = source.world_to_voxel(target.voxel_to_world([i as f64, j as f64, k as f64]));
            if p.iter().any(|x| (x - x.floor() - 0.5).abs() < 1e-6) {
                continue; // a tie: either neighbour is right
            }
            let r = p.map(|x| x.round());
            let want = if (0..3).all(|a| r[a] >= 0.0 && r[a] < shape[a] as f64) {
                labels.data()[[r[0] as usize, r[1] as usize, r[2] as usize]]
            } else {
                0
            };
            prop_assert_eq!(v, want, "target voxel {:?} at source {:?}", [i, j, k], p);
        }
    }

    /// Labels taken to a grid twice as fine and back are unchanged: the way
    /// back is the same function with the original geometry as target.
    #[test]
    fn labels_round_trip_through_a_finer_grid(
        shape in shape3(1, 10),
        spacing in [0.5f64..2.0, 0.5f64..2.0, 0.5f64..2.0],
        rot in angles(),
        seed in any::<u64>(),
    ) {
        let iso = spacing[0];
        let source = centred_grid(shape, rotation(rot), [iso; 3], [0.0; 3]);
        let [d, h, w] = shape;
        let labels = LabelMap::with_geometry(
            Array3::from_shape_fn((d, h, w), |(i, j, k)| ((seed >> ((i + 2 * j + 5 * k) % 61)) & 3) as u16),
            source,
        ).expect("same shape");
        let fine = target_geometry(&source, iso / 2.0).expect("valid");
        let there = resample_labels(&labels, &fine).expect("resampled");
        prop_assert_eq!(resample_labels(&there, &source).expect("resampled back"), labels);
    }

    /// A crop keeps every voxel at its world position, and pads with `fill`.
    #[test]
    fn crop_preserves_world_positions(
        start in [-8isize..10, -8isize..10, -8isize..10],
        size in shape3(1, 14),
        rot in angles(),
        spacing in spacing3(),
    ) {
        let source = centred_grid([6, 7, 8], rotation(rot), spacing, [3.0, -4.0, 5.0]);
        let vol = Volume::with_geometry(Array3::from_shape_fn((6, 7, 8), |(d, h, w)| (d * 100 + h * 10 + w) as i32), source)
            .expect("same shape");
        let crop = crop_or_pad(&vol, start, size, -1).expect("cropped");
        prop_assert_eq!(crop.shape(), size);
        for ((d, h, w), &v) in crop.data().indexed_iter() {
            let s = [d as isize + start[0], h as isize + start[1], w as isize + start[2]];
            let src_inside = (0..3).all(|a| s[a] >= 0 && s[a] < source.shape()[a] as isize);
            let want = if src_inside { (s[0] * 100 + s[1] * 10 + s[2]) as i32 } else { -1 };
            prop_assert_eq!(v, want);
            let here = crop.geometry().voxel_to_world([d as f64, h as f64, w as f64]);
            let there = source.voxel_to_world(s.map(|x| x as f64));
            for a in 0..3 {
                prop_assert!((here[a] - there[a]).abs() < 1e-9);
            }
        }
    }

    /// The reference crop is centred on the label's bounding box centre
    /// and cut identically from image and mask.
    #[test]
    fn reference_crop_is_centred_on_the_label(
        lo in [0usize..20, 0usize..20, 0usize..20],
        len in [1usize..12, 1usize..12, 1usize..12],
        patch in shape3(1, 24),
    ) {
        let shape = [32, 30, 28];
        let hi: [usize; 3] = std::array::from_fn(|a| (lo[a] + len[a] - 1).min(shape[a] - 1));
        let geometry = Geometry::new(shape, Affine::from_spacing([1.5, 1.5, 1.5])).expect("valid");
        let code = |d: usize, h: usize, w: usize| (d * 1000 + h * 40 + w + 1) as f32;
        let image = Image::with_geometry(Array3::from_shape_fn((32, 30, 28), |(d, h, w)| code(d, h, w)), geometry)
            .expect("same shape");
        // Label 5 fills the box; its corners are label 9 to check selection.
        let labels = LabelMap::with_geometry(
            Array3::from_shape_fn((32, 30, 28), |(d, h, w)| {
                let p = [d, h, w];
                if (0..3).all(|a| p[a] >= lo[a] && p[a] <= hi[a]) { 5 } else { 0 }
            }),
            geometry,
        ).expect("same shape");
        let crop = reference_crop(&image, &labels, &LabelSelection::Values(&[5]), patch).expect("cropped");
        let bbox = label_bbox(&labels, &LabelSelection::AnyNonZero).expect("not empty");
        prop_assert_eq!(bbox.min, lo);
        prop_assert_eq!(bbox.max, hi);
        let center = bbox.center();
        for a in 0..3 {
            // Python's round((lo + hi) / 2): the centre is within half a voxel.
            prop_assert!((2 * center[a]).abs_diff(lo[a] + hi[a]) <= 1);
            prop_assert_eq!(crop.start[a], center[a] as isize - (patch[a] / 2) as isize);
        }
        prop_assert_eq!(crop.image.shape(), patch);
        prop_assert_eq!(crop.mask.shape(), patch);
        let mut inside_voxels = 0;
        for ((d, h, w), &v) in crop.image.data().indexed_iter() {
            let s = [d as isize + crop.start[0], h as isize + crop.start[1], w as isize + crop.start[2]];
            let m = crop.mask.data()[[d, h, w]];
            if (0..3).all(|a| s[a] >= 0 && s[a] < shape[a] as isize) {
                let s = s.map(|x| x as usize);
                prop_assert_eq!(v, code(s[0], s[1], s[2]));
                prop_assert_eq!(m, u16::from(labels.data()[[s[0], s[1], s[2]]] == 5));
            } else {
                prop_assert_eq!((v, m), (0.0, 0));
            }
            inside_voxels += usize::from(m == 1);
        }
        prop_assert_eq!(crop.foreground_voxels, inside_voxels);
        // The centre voxel of the box sits at patch / 2 in the crop.
        let c = center;
        prop_assert_eq!(crop.image.data()[[patch[0] / 2, patch[1] / 2, patch[2] / 2]], code(c[0], c[1], c[2]));
    }
}

#[test]
fn empty_masks_are_refused() {
    let geometry = Geometry::new([4, 4, 4], Affine::IDENTITY).expect("valid");
    let image = Image::with_geometry(Array3::zeros((4, 4, 4)), geometry).expect("ok");
    let mut labels = LabelMap::with_geometry(Array3::zeros((4, 4, 4)), geometry).expect("ok");
    assert!(matches!(
        reference_crop(&image, &labels, &LabelSelection::AnyNonZero, [2, 2, 2]),
        Err(Error::EmptyMask { label: 0 })
    ));
    labels.data_mut()[[1, 2, 3]] = 4;
    assert!(matches!(
        label_bbox(&labels, &LabelSelection::Values(&[0, 9, 7])),
        Err(Error::EmptyMask { label: 7 })
    ));
    let b = label_bbox(&labels, &LabelSelection::Values(&[4])).expect("label 4 present");
    assert_eq!((b.min, b.max, b.size()), ([1, 2, 3], [1, 2, 3], [1, 1, 1]));
}

#[test]
fn labels_on_another_grid_are_refused() {
    let image = Image::new(Array3::zeros((4, 4, 4)), Affine::IDENTITY).expect("ok");
    let shifted = LabelMap::new(
        Array3::from_elem((4, 4, 4), 1),
        Affine::from_spacing([1.0, 1.0, 2.0]),
    )
    .expect("ok");
    assert!(matches!(
        reference_crop(&image, &shifted, &LabelSelection::AnyNonZero, [2, 2, 2]),
        Err(Error::InvalidArgument { .. })
    ));
}

/// Canonical orientation, then resampling, then the way back, as the engine
/// does: a label map predicted on the model grid returns to the input grid.
#[test]
fn reorient_resample_and_back() {
    // Sagittal stack: `d` along -x, `h` along +z, `w` along -y; 1.1 x 0.9 x 1.3 mm.
    let m = Affine([
        [-1.1, 0.0, 0.0, 40.0],
        [0.0, 0.0, -1.3, 30.0],
        [0.0, 0.9, 0.0, -20.0],
        [0.0, 0.0, 0.0, 1.0],
    ]);
    let shape = (12, 15, 11);
    let labels = LabelMap::new(
        Array3::from_shape_fn(shape, |(d, h, w)| {
            u16::from(d > 3 && h < 9 && w % 5 != 0) * 2
        }),
        m,
    )
    .expect("valid");
    let (ras, plan) = canonical(&labels).expect("plan");
    assert_eq!(ras.shape(), [15, 11, 12]);
    // Twice as fine, then back: identity on the canonical grid, then undo.
    let iso = target_geometry(ras.geometry(), 0.45).expect("valid");
    let model = resample_labels(&ras, &iso).expect("resampled");
    let back = resample_labels(&model, ras.geometry()).expect("resampled back");
    assert_eq!(plan.undo(&back).expect("canonical grid"), labels);
}

#[test]
fn bad_target_spacing_is_refused() {
    let g = Geometry::new([4, 4, 4], Affine::IDENTITY).expect("valid");
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            target_geometry(&g, bad),
            Err(Error::InvalidArgument { .. })
        ));
    }
    assert!(matches!(
        target_geometry(&g, 1e-9),
        Err(Error::TooLarge { .. })
    ));
}

/// When the machine (here: a 1 GiB address-space limit) cannot hold what a
/// resampling needs, the call returns `Error::TooLarge` instead of aborting
/// the process: an 8^3 image at 100 mm resampled to 1 mm asks for 800^3
/// floats (2 GiB), and 800^3 labels (1 GiB). The work runs in a child
/// process (this test binary, re-run under `ulimit -v`), because the limit
/// applies to a whole process.
#[test]
fn allocation_failure_is_an_error_not_an_abort() {
    const CHILD: &str = "IRIS_TEST_ALLOCATION_CHILD";
    let big = |spacing: f64| {
        let affine = Affine([
            [spacing, 0.0, 0.0, 0.0],
            [0.0, spacing, 0.0, 0.0],
            [0.0, 0.0, spacing, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]);
        Image::new(Array3::from_elem((8, 8, 8), 1.0), affine).expect("valid")
    };
    if std::env::var_os(CHILD).is_some() {
        let image = big(100.0);
        let target = target_geometry(image.geometry(), 1.0).expect("target");
        assert_eq!(target.shape(), [800, 800, 800]);
        let err = resample_image(&image, &target).expect_err("over the limit");
        assert!(matches!(err, Error::TooLarge { .. }), "{err}");
        assert!(err.to_string().contains("cannot allocate"), "{err}");
        let labels = image.map(|_| 1u16);
        let err = resample_labels(&labels, &target).expect_err("over the limit");
        assert!(matches!(err, Error::TooLarge { .. }), "{err}");
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    // Output captured: the child's own "test result" line is not this run's.
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -v 1048576 && exec "$0" "$@""#)
        .arg(exe)
        .args([
            "--exact",
            "allocation_failure_is_an_error_not_an_abort",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .expect("runs");
    assert!(
        child.status.success(),
        "the child failed or aborted: {}\n{}{}",
        child.status,
        String::from_utf8_lossy(&child.stdout),
        String::from_utf8_lossy(&child.stderr)
    );
}
