//! The engine on ONNX graphs of known maths ([`SyntheticModel`]): loading and its
//! errors, what the graphs compute through tract, plan caching, model
//! fingerprints, memory banks and concurrent use.

// This crate is `no_std`; the engine is `std` code.
use std::prelude::rust_2024::*;
use std::vec;

use std::sync::Arc;

use ndarray::{Array3, Axis};

use super::testing::SyntheticModel;
use super::*;
use crate::embedding::StageShape;
use crate::irisemb::{self, Payload};
use crate::pipeline::segment_with;
use crate::preprocess::{resample_image, target_geometry};
use crate::test_support::{TempDir, colin};

const SPACING: f64 = 6.0;

fn model_dir(fingerprint_byte: u8) -> (TempDir, SyntheticModel) {
    let dir = TempDir::new("model");
    let synthetic = SyntheticModel::new(SPACING, fingerprint_byte);
    synthetic.write(dir.path()).expect("writes");
    (dir, synthetic)
}

fn thalamus_and_caudate() -> Vec<TaskClass> {
    vec![
        TaskClass::new(77, "Thalamus_L"),
        TaskClass::new(78, "Thalamus_R"),
        TaskClass::new(71, "Caudate_L"),
    ]
}

/// `f` of the synthetic task encoder: `mean_j(c_2j^2) * mean(P_4(x)^2)` for
/// the normalised reference crop `x` (16^3, pooled to 4^3).
fn feature_energy(synthetic: &SyntheticModel, crop: &Array3<f32>) -> f32 {
    let mut pooled = Array3::<f64>::zeros((4, 4, 4));
    for ((d, h, w), &v) in crop.indexed_iter() {
        pooled[[d / 4, h / 4, w / 4]] += f64::from(v) / 64.0;
    }
    let energy = pooled.iter().map(|p| p * p).sum::<f64>() / 64.0;
    let scales = &synthetic.scales[2];
    let c2 = scales.iter().map(|c| f64::from(c * c)).sum::<f64>() / scales.len() as f64;
    (c2 * energy) as f32
}

#[test]
fn model_is_send_and_sync() {
    fn shared<T: Send + Sync>() {}
    shared::<Model>();
    shared::<Features>();
}

#[test]
fn loads_a_model_folder() {
    let (dir, synthetic) = model_dir(0x11);
    let model = Model::load(dir.path()).expect("loads");
    let manifest = model.manifest();
    assert_eq!(manifest.name, "synthetic");
    assert_eq!(manifest.patch_size, synthetic.patch);
    assert_eq!(manifest.stages.len(), 3);
    assert_eq!(model.fingerprint().to_string(), synthetic.fingerprint);
    assert_eq!(model.memory_bank().expect("no bank"), None);
    assert!(model.planned_class_counts().is_empty(), "plans are lazy");
}

#[test]
fn broken_model_folders_name_the_file() {
    let (dir, synthetic) = model_dir(0x11);
    // The encoder's graph where the decoder should be: wrong inputs.
    std::fs::copy(dir.join("encoder.onnx"), dir.join("decoder.onnx")).expect("copy");
    let err = Model::load(dir.path())
        .expect_err("wrong graph")
        .to_string();
    assert!(
        err.contains("decoder.onnx") && err.contains("inputs are [\"image\"]"),
        "{err}"
    );
    std::fs::remove_file(dir.join("decoder.onnx")).expect("remove");
    let err = Model::load(dir.path())
        .expect_err("missing graph")
        .to_string();
    assert!(
        err.contains("decoder.onnx: the graph file is missing"),
        "{err}"
    );
    std::fs::write(dir.join("decoder.onnx"), b"not protobuf").expect("write");
    let err = Model::load(dir.path()).expect_err("garbage").to_string();
    assert!(
        err.contains("decoder.onnx: cannot read the ONNX graph"),
        "{err}"
    );

    // Graphs for a 16^3 patch under a manifest that says 32^3.
    let other = TempDir::new("patch");
    synthetic.write(other.path()).expect("writes");
    let text = std::fs::read_to_string(other.join("manifest.json")).expect("manifest");
    let mut manifest = super::ManifestFile::parse(&text).expect("parses");
    assert_eq!(manifest.patch_size, [16, 16, 16]);
    manifest.patch_size = [32, 16, 16];
    std::fs::write(other.join("manifest.json"), manifest.to_json()).expect("manifest");
    let err = Model::load(other.path()).expect_err("patch").to_string();
    assert!(
        err.contains("encoder.onnx: input `image` is declared"),
        "{err}"
    );
}

#[test]
fn encode_task_runs_the_graphs_on_the_reference_crop() {
    let Some((image, labels)) = colin() else {
        return;
    };
    let (dir, synthetic) = model_dir(0x11);
    let model = Model::load(dir.path()).expect("loads");
    for classes in [&thalamus_and_caudate()[..1], &thalamus_and_caudate()[..]] {
        let task = model
            .encode_task(&image, &labels, classes, &EncodeOptions::default())
            .expect("encodes");
        assert_eq!(task.model(), model.fingerprint());
        assert_eq!(task.stage_shapes(), model.manifest().stages.as_slice());
        let pre = task.preprocessing();
        assert_eq!(pre.patch, [16; 3]);
        assert_eq!(pre.spacing_mm, [6.0; 3]);
        assert_eq!(pre.intensity, IntensityPolicy::MR);

        let wanted: Vec<u16> = classes.iter().map(|c| c.label).collect();
        let input = prepare_reference(
            &image,
            &labels,
            &wanted,
            SPACING,
            [16; 3],
            None,
            &Limits::default(),
        )
        .expect("prepared");
        let f = feature_energy(&synthetic, input.image.data());
        let voxels = input.image.data().len();
        assert_eq!(task.classes().len(), classes.len());
        for (k, (class, want)) in task.classes().iter().zip(classes).enumerate() {
            assert_eq!(class.label(), u32::from(want.label));
            assert_eq!(class.name(), want.name);
            assert_eq!(class.provenance(), Provenance::OneShot);
            let mask = &input.masks[k * voxels..][..voxels];
            let m = mask.iter().sum::<f32>() / voxels as f32;
            assert!(m > 0.0);
            for (s, stage) in class.stages().iter().enumerate() {
                assert_eq!(stage.len(), synthetic.tokens_init[s].len());
                for (got, w) in stage.iter().zip(&synthetic.tokens_init[s]) {
                    let want = (m + f) * w;
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "class {k} stage {s}: {got} vs {want}"
                    );
                }
            }
        }
    }
    // Classes go through the task encoder one at a time: one class through
    // the one-class plan, two through it cut around the masks; no plan for
    // another class count.
    assert_eq!(model.task_encoder.planned(), [1]);
}

/// The synthetic decoder's `t_k`: the mean of class `k`'s deepest stage.
fn t_values(task: &TaskEmbedding) -> Vec<f32> {
    task.classes()
        .iter()
        .map(|c| c.stages()[0].iter().sum::<f32>() / c.stages()[0].len() as f32)
        .collect()
}

/// Colin27 at the model's spacing (canonical), so that labels and
/// probabilities stay on the grid the decisions are made on.
fn colin_at_model_spacing(image: &Image) -> Image {
    let grid = target_geometry(image.geometry(), SPACING).expect("grid");
    resample_image(image, &grid).expect("resample")
}

#[test]
fn segment_equals_the_graph_maths_in_the_pipeline() {
    let Some((image, labels)) = colin() else {
        return;
    };
    let (dir, synthetic) = model_dir(0x11);
    let model = Model::load(dir.path()).expect("loads");
    let query = colin_at_model_spacing(&image);
    let options = SegmentOptions {
        probabilities: true,
        largest_component: false,
        ..SegmentOptions::default()
    };
    for count in [1, 3] {
        let classes = &thalamus_and_caudate()[..count];
        let task = model
            .encode_task(&image, &labels, classes, &EncodeOptions::default())
            .expect("encodes");
        let got = model.segment(&query, &task, &options).expect("segments");
        let t = t_values(&task);
        let class_labels: Vec<u16> = classes.iter().map(|c| c.label).collect();
        let want = segment_with(
            &query,
            SPACING,
            [16; 3],
            &class_labels,
            IntensityPolicy::MR,
            &options,
            |window| {
                let values = window.as_standard_layout();
                Ok(synthetic.logits(values.as_slice().expect("contiguous"), &t))
            },
        )
        .expect("reference pipeline");
        assert_eq!(got.classes, want.classes);
        assert_eq!(got.windows, want.windows);
        assert_eq!(got.labels.geometry(), query.geometry());
        let probs = got.probabilities.expect("asked for");
        let want_probs = want.probabilities.expect("asked for");
        for (a, b) in probs.iter().zip(&want_probs) {
            let worst = a
                .data()
                .iter()
                .zip(b.data())
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 5e-4, "{worst}");
        }
        // Labels agree except where tract's rounding can flip a decision:
        // the best probability within 2e-3 of the threshold or of the runner-up.
        let mut differ = 0;
        for ((i, &a), &b) in got.labels.data().indexed_iter().zip(want.labels.data()) {
            if a != b {
                differ += 1;
                let mut p: Vec<f32> = probs.iter().map(|m| m.data()[i]).collect();
                p.sort_by(|x, y| y.total_cmp(x));
                let near = (p[0] - 0.5).abs() < 2e-3 || p.get(1).is_some_and(|q| p[0] - q < 2e-3);
                assert!(near, "label {a} vs {b} at {i:?}: {p:?}");
            }
        }
        assert!(differ * 1000 < query.data().len(), "{differ} labels differ");
        let present = got.labels.labels_present();
        assert!(!present.is_empty(), "some class is found");
        assert!(present.iter().all(|l| class_labels.contains(l)));
    }
    assert_eq!(model.planned_class_counts(), [1, 3]);
}

#[test]
fn plans_are_built_once_per_class_count() {
    let (dir, _) = model_dir(0x11);
    let model = Model::load(dir.path()).expect("loads");
    let first = model.decoder.plan(3, &model.executor).expect("plan");
    let again = model.decoder.plan(3, &model.executor).expect("plan");
    assert!(Arc::ptr_eq(&first, &again), "the cached plan is reused");
    for k in 1..=MAX_PLANS + 1 {
        model.decoder.plan(k, &model.executor).expect("plan");
    }
    // Nine class counts through a cache of eight: K = 1, the least recently
    // used, is dropped; K = 3 (cached, reused in the loop) stays.
    assert_eq!(
        model.planned_class_counts(),
        (2..=MAX_PLANS + 1).collect::<Vec<_>>()
    );
}

#[test]
fn embeddings_of_another_model_are_refused() {
    let Some((image, labels)) = colin() else {
        return;
    };
    let (dir_a, _) = model_dir(0x11);
    let (dir_b, _) = model_dir(0x22);
    let a = Model::load(dir_a.path()).expect("loads");
    let b = Model::load(dir_b.path()).expect("loads");
    let classes = &thalamus_and_caudate()[..1];
    let task = a
        .encode_task(&image, &labels, classes, &EncodeOptions::default())
        .expect("encodes");
    let query = colin_at_model_spacing(&image);
    let err = b
        .segment(&query, &task, &SegmentOptions::default())
        .expect_err("other model");
    assert!(matches!(err, Error::ModelMismatch { .. }), "{err}");
    let features = b
        .encode_window(query.data().slice(ndarray::s![..16, ..16, ..16]))
        .expect("features");
    assert!(matches!(
        b.decode_window(&features, &task),
        Err(Error::ModelMismatch { .. })
    ));

    // Same fingerprint, other stage shapes.
    let shapes = vec![StageShape {
        tokens: 2,
        channels: 2,
    }];
    let class =
        ClassEmbedding::new(1, "x", Provenance::OneShot, vec![vec![0.5; 4]]).expect("class");
    let odd = TaskEmbedding::new(*a.fingerprint(), *task.preprocessing(), shapes, vec![class])
        .expect("embedding");
    assert!(matches!(
        a.segment(&query, &odd, &SegmentOptions::default()),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn memory_bank_is_read_and_checked() {
    let Some((image, labels)) = colin() else {
        return;
    };
    let (dir, _) = model_dir(0x11);
    let text = std::fs::read_to_string(dir.join("manifest.json")).expect("manifest");
    let mut json: serde_json::Value = serde_json::from_str(&text).expect("json");
    json["memory_bank"] = "bank.irisemb".into();
    std::fs::write(dir.join("manifest.json"), json.to_string()).expect("manifest");
    let model = Model::load(dir.path()).expect("loads");
    assert!(matches!(model.memory_bank(), Err(Error::Io { .. })));

    let task = model
        .encode_task(
            &image,
            &labels,
            &thalamus_and_caudate(),
            &EncodeOptions::default(),
        )
        .expect("encodes");
    let bank_path = dir.join("bank.irisemb");
    irisemb::write_file(&bank_path, &task, Payload::F32).expect("write");
    assert_eq!(model.memory_bank().expect("bank"), Some(task.clone()));

    std::fs::write(&bank_path, b"IRISEMB?garbage").expect("write");
    let err = model.memory_bank().expect_err("damaged").to_string();
    assert!(err.contains("bank.irisemb: invalid memory bank"), "{err}");

    let (other_dir, _) = model_dir(0x22);
    let other = Model::load(other_dir.path()).expect("loads");
    let foreign = other
        .encode_task(
            &image,
            &labels,
            &thalamus_and_caudate()[..1],
            &EncodeOptions::default(),
        )
        .expect("encodes");
    irisemb::write_file(&bank_path, &foreign, Payload::F32).expect("write");
    assert!(matches!(
        model.memory_bank(),
        Err(Error::ModelMismatch { .. })
    ));
}

#[test]
fn two_threads_segment_like_one() {
    let Some((image, labels)) = colin() else {
        return;
    };
    let (dir, _) = model_dir(0x11);
    let model = Model::load(dir.path()).expect("loads");
    let one = model
        .encode_task(
            &image,
            &labels,
            &thalamus_and_caudate()[..1],
            &EncodeOptions::default(),
        )
        .expect("encodes");
    let three = model
        .encode_task(
            &image,
            &labels,
            &thalamus_and_caudate(),
            &EncodeOptions::default(),
        )
        .expect("encodes");
    let options = SegmentOptions {
        probabilities: true,
        ..SegmentOptions::default()
    };
    // The query at 1 mm: resampled on the way in and back on the way out.
    let alone: Vec<Segmentation> = [&one, &three]
        .iter()
        .map(|task| model.segment(&image, task, &options).expect("segments"))
        .collect();
    assert_eq!(alone[1].labels.geometry(), image.geometry());
    let fresh = Model::load(dir.path()).expect("loads");
    let together: Vec<Segmentation> = std::thread::scope(|scope| {
        let handles: Vec<_> = [&one, &three, &one, &three]
            .into_iter()
            .map(|task| {
                let (model, image, options) = (&fresh, &image, &options);
                scope.spawn(move || model.segment(image, task, options).expect("segments"))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    for (i, got) in together.iter().enumerate() {
        assert_eq!(got, &alone[i % 2], "thread {i}");
    }
}

#[test]
fn window_level_calls_check_their_input() {
    let (dir, _) = model_dir(0x11);
    let model = Model::load(dir.path()).expect("loads");
    let wrong = Array3::<f32>::zeros((16, 16, 8));
    assert!(matches!(
        model.encode_window(wrong.view()),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut nan = Array3::<f32>::zeros((16, 16, 16));
    nan[[1, 2, 3]] = f32::NAN;
    assert!(matches!(
        model.encode_window(nan.view()),
        Err(Error::NonFinite { count: 1, .. })
    ));
    let x = Array3::from_shape_fn((16, 16, 16), |(d, h, w)| {
        (d + 2 * h + 3 * w) as f32 / 50.0 - 1.0
    });
    let features = model.encode_window(x.view()).expect("features");
    assert_eq!(features.shapes()[4], [1, 2, 1, 1, 1]);
    let masks = ndarray::Array4::<f32>::zeros((2, 16, 16, 8));
    assert!(matches!(
        model.encode_masks(&features, masks.view()),
        Err(Error::ShapeMismatch { .. })
    ));
    let none = ndarray::Array4::<f32>::zeros((0, 16, 16, 16));
    assert!(matches!(
        model.encode_masks(&features, none.view()),
        Err(Error::InvalidArgument {
            name: "classes",
            ..
        })
    ));
    // encode_masks output shapes: one [K, tokens, channels] per stage.
    let masks = ndarray::Array4::<f32>::from_elem((2, 16, 16, 16), 1.0);
    let stages = model.encode_masks(&features, masks.view()).expect("stages");
    let shapes: Vec<_> = stages.iter().map(|s| s.dim()).collect();
    assert_eq!(shapes, [(2, 3, 2), (2, 3, 3), (2, 3, 4)]);
    assert!(stages[0].index_axis(Axis(0), 0) == stages[0].index_axis(Axis(0), 1));
}

/// The caller sets the size of a model's pool; the pool's size does not
/// change what the model computes.
#[test]
fn threads_are_the_callers_to_set() {
    let Some((image, labels)) = colin() else {
        return;
    };
    let (dir, _) = model_dir(0x11);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    assert_eq!(Model::load(dir.path()).expect("loads").threads(), cores);
    let segment = |threads| {
        let model = Model::load_with(
            dir.path(),
            &ModelOptions {
                threads,
                ..Default::default()
            },
        )
        .expect("loads");
        assert_eq!(model.threads(), threads);
        let task = model
            .encode_task(
                &image,
                &labels,
                &thalamus_and_caudate(),
                &EncodeOptions::default(),
            )
            .expect("encodes");
        let options = SegmentOptions {
            probabilities: true,
            ..SegmentOptions::default()
        };
        (
            task.clone(),
            model.segment(&image, &task, &options).expect("segments"),
        )
    };
    assert_eq!(segment(1), segment(3));
}

/// A model from its files' bytes is the model of its folder; what is wrong
/// with the bytes is named as `<memory>/<file>`.
#[test]
fn models_load_from_memory_buffers() {
    let Some((image, labels)) = colin() else {
        return;
    };
    let (dir, _) = model_dir(0x11);
    let read = |name: &str| std::fs::read(dir.join(name)).expect("reads");
    let (manifest, encoder) = (read("manifest.json"), read("encoder.onnx"));
    let (task_encoder, decoder) = (read("task_encoder.onnx"), read("decoder.onnx"));
    let buffers = ModelBuffers {
        manifest: &manifest,
        encoder: &encoder,
        task_encoder: &task_encoder,
        decoder: &decoder,
        memory_bank: None,
    };
    let from_folder = Model::load(dir.path()).expect("loads");
    let from_memory = Model::from_buffers(
        &buffers,
        &ModelOptions {
            threads: 1,
            ..Default::default()
        },
    )
    .expect("loads");
    assert_eq!(from_memory.fingerprint(), from_folder.fingerprint());
    assert_eq!(from_memory.threads(), 1);
    let classes = thalamus_and_caudate();
    let encode = |model: &Model| {
        model
            .encode_task(&image, &labels, &classes, &EncodeOptions::default())
            .expect("encodes")
    };
    let task = encode(&from_folder);
    assert_eq!(encode(&from_memory), task);
    let options = SegmentOptions::default();
    assert_eq!(
        from_memory
            .segment(&image, &task, &options)
            .expect("segments"),
        from_folder
            .segment(&image, &task, &options)
            .expect("segments")
    );

    let error = |buffers: &ModelBuffers<'_>| {
        Model::from_buffers(buffers, &ModelOptions::default())
            .expect_err("refused")
            .to_string()
    };
    let err = error(&ModelBuffers {
        decoder: &encoder,
        ..buffers
    });
    assert!(
        err.contains("<memory>/decoder.onnx") && err.contains("inputs are [\"image\"]"),
        "{err}"
    );
    let err = error(&ModelBuffers {
        task_encoder: b"not protobuf",
        ..buffers
    });
    assert!(
        err.contains("<memory>/task_encoder.onnx: cannot read the ONNX graph"),
        "{err}"
    );
    let err = error(&ModelBuffers {
        manifest: b"\xff{}",
        ..buffers
    });
    assert!(
        err.contains("<memory>/manifest.json") && err.contains("UTF-8"),
        "{err}"
    );

    // The memory bank: required when the manifest names it, refused when
    // it names none, and read from the bytes given.
    let bank = irisemb::write(&task, Payload::F32).expect("writes");
    let err = error(&ModelBuffers {
        memory_bank: Some(&bank),
        ..buffers
    });
    assert!(err.contains("names no memory bank"), "{err}");
    let mut json: serde_json::Value = serde_json::from_slice(&manifest).expect("json");
    json["memory_bank"] = "bank.irisemb".into();
    let with_bank = json.to_string().into_bytes();
    let err = error(&ModelBuffers {
        manifest: &with_bank,
        ..buffers
    });
    assert!(
        err.contains("bank.irisemb") && err.contains("no memory_bank bytes"),
        "{err}"
    );
    let model = Model::from_buffers(
        &ModelBuffers {
            manifest: &with_bank,
            memory_bank: Some(&bank),
            ..buffers
        },
        &ModelOptions::default(),
    )
    .expect("loads");
    assert_eq!(model.memory_bank().expect("bank"), Some(task));
}

/// Image-level retrieval's descriptor pass asks `cancel` before every
/// window, as segmenting does.
#[test]
fn descriptors_can_be_cancelled() {
    use core::sync::atomic::{AtomicUsize, Ordering};
    let Some((image, _)) = colin() else {
        return;
    };
    let (dir, _) = model_dir(0x11);
    let model = Model::load(dir.path()).expect("loads");
    let plain = model
        .image_descriptor(&image, &SegmentOptions::default())
        .expect("describes");
    let asked = Arc::new(AtomicUsize::new(0));
    let counting = |stop_at: usize| {
        let asked = Arc::clone(&asked);
        asked.store(0, Ordering::Relaxed);
        SegmentOptions {
            cancel: Some(Arc::new(move || {
                asked.fetch_add(1, Ordering::Relaxed) + 1 >= stop_at
            })),
            ..SegmentOptions::default()
        }
    };
    let never = model
        .image_descriptor(&image, &counting(usize::MAX))
        .expect("describes");
    assert_eq!(never, plain);
    let windows = asked.load(Ordering::Relaxed);
    assert!(windows > 1, "{windows} windows");
    let err = model
        .image_descriptor(&image, &counting(2))
        .expect_err("cancelled");
    assert!(matches!(err, Error::Cancelled), "{err}");
    assert_eq!(asked.load(Ordering::Relaxed), 2, "stopped at once");
}

#[test]
fn the_shipped_model_runs_the_engines_own_ops() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/iris-tiny");
    let model = Model::load(&dir).expect("models/iris-tiny loads");
    let count = |graph: &graphs::Graph, op: &str| {
        let plan = graph.plan(1, &model.executor).expect("plans");
        let nodes = plan.model().nodes();
        nodes.iter().filter(|n| n.op().name() == op).count()
    };
    for graph in [&model.encoder, &model.task_encoder, &model.decoder] {
        let norms = count(graph, "IrisInstanceNorm") + count(graph, "IrisInstanceNorm+Relu");
        assert!(norms > 0);
        assert_eq!(count(graph, "InstanceNorm"), 0);
        // Where the kernel runs, every 3x3x3 convolution is direct: those
        // on rows of at least MIN_WIDTH, and the task encoder's
        // one-output merges at every width (with the mask's norm, one op
        // for the levels).
        let direct = ["", "+Add", " Pair"]
            .map(|form| count(graph, &format!("IrisDirectConv3x3x3{form}")))
            .iter()
            .sum::<usize>()
            + 2 * count(graph, "IrisNormedMerges");
        if conv3d::available() {
            assert!(direct >= 2, "{direct} direct convolutions");
        } else {
            assert_eq!(direct, 0);
        }
    }
    // The task encoder's merge units, split by input channel: the mask's
    // parts (one norm, every level's convolution) are one op; each level's
    // features' part (its own norm and convolution) stays two.
    let kernels = usize::from(conv3d::available());
    let stages = model.manifest.stages.len();
    assert_eq!(count(&model.task_encoder, "IrisNormedMerges"), kernels);
    let merges = count(&model.task_encoder, "IrisDirectConv3x3x3+Add");
    assert_eq!(merges, kernels * stages);
    // In the image encoder and the decoder, every norm is followed by a
    // ReLU, and each is fused with it; residual blocks end in a direct
    // convolution that adds the block's input.
    for graph in [&model.encoder, &model.decoder] {
        assert_eq!(count(graph, "IrisInstanceNorm"), 0);
        assert_eq!(count(graph, "OptMaxByScalar"), 0);
        if conv3d::available() {
            assert!(count(graph, "IrisDirectConv3x3x3+Add") > 0);
        }
    }
    // The decoder doubles its size once per level above the deepest, each
    // time written after the level's skip features.
    assert_eq!(
        count(&model.decoder, "IrisUpsample3d+Concat"),
        manifest::LEVELS - 1
    );
    assert_eq!(count(&model.decoder, "IrisUpsample3d"), 0);
    assert_eq!(count(&model.decoder, "Resize"), 0);
    // The encoder halves its features' size as often, by the engine's
    // pooling.
    assert_eq!(count(&model.encoder, "IrisMaxPool2x"), manifest::LEVELS - 1);
    assert_eq!(count(&model.encoder, "OptMaxPool"), 0);
    // Each task stage normalises its context over the channels once, and
    // shuffles and unshuffles its features in one copy each; where the
    // engine's products run, the unshuffle is read by the squeeze that
    // follows it, without a copy.
    assert_eq!(count(&model.task_encoder, "IrisChannelNorm"), stages);
    assert_eq!(
        count(&model.task_encoder, "IrisPermute"),
        (2 - kernels) * stages
    );
    // Its 1x1x1 convolutions widen and narrow each level's features, and
    // each of its query blocks reads the level's voxels in one op.
    let pointwise = count(&model.task_encoder, "IrisPointwiseConv");
    assert_eq!(pointwise, kernels * stages);
    let squeezes = count(&model.task_encoder, "IrisUnshuffleSqueeze");
    assert_eq!(squeezes, kernels * stages);
    // Each squeeze reads its merged volume as it lies (`[1, 1, S, S, S]`),
    // not a reshape of it that tract would copy.
    let plan = model.task_encoder.plan(1, &model.executor).expect("plans");
    for node in plan.model().nodes() {
        if node.op().name() == "IrisUnshuffleSqueeze" {
            let fact = plan.model().outlet_fact(node.inputs[0]).expect("fact");
            assert_eq!(fact.rank(), 5, "{}: input {:?}", node.name, fact.shape);
        }
    }
    // The foreground mean pools the masks onto each level's grid (8^3,
    // 4^3, 2^3 here), one axis at a time: the rows of every level in one
    // op (8 + 4 + 2 columns of one mask), the planes past the second and
    // third axes where they hold 8 values or more (the second of 8^3, the
    // third of 8^3 and 4^3).
    let pooled = count(&model.task_encoder, "IrisRowProduct");
    assert_eq!(pooled, kernels * (1 + 3));
    let blocks = 2;
    let attention = count(&model.task_encoder, "IrisVoxelAttention");
    assert_eq!(attention, kernels * blocks * stages);
    assert!(count(&model.decoder, "IrisChannelNorm") > 0);
    // The classifier head's product of per-class rows and voxels.
    assert_eq!(count(&model.decoder, "IrisComputedPointwise"), kernels);
}

/// A pre-activation residual block as ONNX: `y = r + conv(relu(norm(
/// conv(relu(norm(x))))))`, 3x3x3 convolutions with `channels` channels
/// each way, over `[1, channels, 4, 4, 32]` (rows wide enough for the
/// engine's convolution). The residual `r` is `x`, or with `shortcut` a
/// convolution of the block's first normed input (as where the released
/// network's blocks change their channel count: its norms have no affine
/// parameters, so the shortcut's and the block's are one).
fn residual_block(channels: usize, shortcut: bool) -> Vec<u8> {
    use super::testing::{D, OnnxGraph, int, ints};
    let mut seed = 0x2545_f491_4f6c_dd1d_u64 ^ channels as u64;
    let mut draw = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    };
    let dims = [1, channels, 4, 4, 32].map(D::N);
    let mut g = OnnxGraph::default();
    let x = g.input("x", &dims);
    let mut unit = |g: &mut OnnxGraph, h: &str, normalise: bool| {
        let h = match normalise {
            true => {
                let scale = g.constant(&draw(channels, 1.0), &[channels]);
                let bias = g.constant(&draw(channels, 0.5), &[channels]);
                let norm = g.op("InstanceNormalization", &[h, &scale, &bias], vec![]);
                g.op("Relu", &[&norm], vec![])
            }
            false => h.to_string(),
        };
        let bound = 1.0 / ((27 * channels) as f32).sqrt();
        let kernel = g.constant(
            &draw(channels * channels * 27, bound),
            &[channels, channels, 3, 3, 3],
        );
        let conv_bias = g.constant(&draw(channels, 0.1), &[channels]);
        let attrs = vec![
            ints("kernel_shape", &[3, 3, 3]),
            ints("pads", &[1; 6]),
            int("group", 1),
        ];
        (h.clone(), g.op("Conv", &[&h, &kernel, &conv_bias], attrs))
    };
    let (normed, h) = unit(&mut g, &x, true);
    let residual = match shortcut {
        true => unit(&mut g, &normed, false).1,
        false => x.clone(),
    };
    let (_, h) = unit(&mut g, &h, true);
    let y = g.op("Add", &[&h, &residual], vec![]);
    g.output(&y, "y", &dims);
    g.into_bytes()
}

/// The graph in `bytes` (input `x` of `shape`, output `y` of `out`)
/// planned by the engine (in `precision`) and by tract alone and run on
/// one input: the engine's plan's ops (name and info), and the largest
/// difference of the two outputs relative to tract's largest value.
fn engine_against_tract(
    bytes: &[u8],
    shape: &[usize],
    out: &[usize],
    precision: Precision,
) -> (Vec<(String, String)>, f32) {
    use tract_onnx::prelude::{
        Framework, InferenceModelExt, IntoRunnable, IntoTValue, Tensor, tvec,
    };
    let x: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 3.0 + 0.25)
        .collect();
    let input = || Tensor::from_shape(shape, &x).expect("tensor").into_tvalue();
    let tract = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .expect("tract plans the graph");
    let want = tract.run(tvec!(input())).expect("tract runs");
    let port = |name: &str, shape: &[usize]| {
        graphs::Port::new(name, shape.iter().map(|&n| graphs::Dim::Fixed(n)).collect())
    };
    let source = graphs::Source::Bytes {
        name: "test-graph.onnx".into(),
        bytes,
    };
    let (inputs, outputs) = ([port("x", shape)], vec![port("y", out)]);
    let graph = graphs::Graph::load(source, &inputs, outputs, precision).expect("loads");
    let executor = graphs::executor(2).expect("threads");
    let plan = graph.plan(1, &executor).expect("plans");
    let ops = plan
        .model()
        .nodes()
        .iter()
        .map(|n| {
            let info = n.op().info().expect("info").join(" ");
            (n.op().name().to_string(), info)
        })
        .collect();
    let got = graph.run(&plan, tvec!(input())).expect("the engine runs");
    let (got, want) = (
        graphs::values(&graph, &got[0]).expect("f32"),
        graphs::values(&graph, &want[0]).expect("f32"),
    );
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    (ops, diff / scale)
}

#[test]
fn the_engines_own_ops_compute_what_tract_computes_on_a_residual_block() {
    // 8 channels: the direct kernel; 16: Winograd's, which also runs the
    // shortcut and the block's first convolution as one op.
    let cases = [
        (8, "direct", false),
        (16, "Winograd", false),
        (16, "Winograd", true),
    ];
    for (channels, algorithm, shortcut) in cases {
        let bytes = residual_block(channels, shortcut);
        let shape = [1, channels, 4, 4, 32];
        let (ops, diff) = engine_against_tract(&bytes, &shape, &shape, Precision::Float32);
        assert!(diff < 1e-5, "{channels} channels: relative max diff {diff}");
        // bfloat16 products, where the CPU runs them: Winograd's only.
        let rounded = Precision::Bfloat16.on_this_cpu() == Precision::Bfloat16;
        let (bf16_ops, bf16_diff) =
            engine_against_tract(&bytes, &shape, &shape, Precision::Bfloat16);
        let in_bf16 = bf16_ops
            .iter()
            .filter(|(_, info)| info.contains("bf16 products"));
        match (rounded, algorithm) {
            (true, "Winograd") => {
                assert!(in_bf16.count() > 0, "{bf16_ops:?}");
                assert!(
                    bf16_diff > 1e-5 && bf16_diff < 1e-2,
                    "{channels} channels: bf16 {bf16_diff}"
                );
            }
            _ => {
                assert_eq!(in_bf16.count(), 0, "{bf16_ops:?}");
                assert!(bf16_diff < 1e-5, "{channels} channels: bf16 {bf16_diff}");
            }
        }
        if conv3d::available() {
            // The block runs the fused ops, with the expected kernel.
            let named = |name: &str| ops.iter().filter(|(n, _)| n == name).count();
            assert_eq!(named("IrisInstanceNorm+Relu"), 2);
            let (pairs, alone) = if shortcut { (1, 0) } else { (0, 1) };
            assert_eq!(named("IrisDirectConv3x3x3 Pair"), pairs);
            assert_eq!(named("IrisDirectConv3x3x3"), alone);
            assert_eq!(named("IrisDirectConv3x3x3+Add"), 1);
            for (_, info) in ops.iter().filter(|(n, _)| n.starts_with("IrisDirectConv")) {
                assert!(info.contains(algorithm), "{channels} channels: {info}");
            }
        }
    }
}

/// The task encoder's context ops as the exporter writes them: `x` `[1, 4,
/// 4, 4, 4]` convolved 1x1x1 to 8 channels (with bias), its voxels'
/// channels normalised (`ReduceMean`, `Sub`, `Mul`, `ReduceMean`, `Add`,
/// `Sqrt`, `Div` over axis 1 of `[1, 8, 64]`), then shuffled by 2 to one
/// channel of `[8, 8, 8]` (an 8-D `Transpose`).
fn context_ops() -> Vec<u8> {
    use super::testing::{D, OnnxGraph, int, ints};
    let mut g = OnnxGraph::default();
    let x = g.input("x", &[1, 4, 4, 4, 4].map(D::N));
    let kernel: Vec<f32> = (0..32).map(|i| (i * 13 % 17) as f32 / 8.0 - 1.0).collect();
    let kernel = g.constant(&kernel, &[8, 4, 1, 1, 1]);
    let bias = g.constant(&[0.5, -0.25, 0.0, 1.0, -1.0, 0.125, 0.75, -0.5], &[8]);
    let attrs = vec![ints("kernel_shape", &[1, 1, 1]), int("group", 1)];
    let x = g.op("Conv", &[&x, &kernel, &bias], attrs);
    let flat = g.int64s(&[1, 8, 64]);
    let x = g.op("Reshape", &[&x, &flat], vec![]);
    let mean_over_channels = |g: &mut OnnxGraph, x: &str| {
        g.op(
            "ReduceMean",
            &[x],
            vec![ints("axes", &[1]), int("keepdims", 1)],
        )
    };
    let mean = mean_over_channels(&mut g, &x);
    let centred = g.op("Sub", &[&x, &mean], vec![]);
    let squares = g.op("Mul", &[&centred, &centred], vec![]);
    let variance = mean_over_channels(&mut g, &squares);
    let epsilon = g.constant(&[1e-5], &[]);
    let variance = g.op("Add", &[&variance, &epsilon], vec![]);
    let deviation = g.op("Sqrt", &[&variance], vec![]);
    let normed = g.op("Div", &[&centred, &deviation], vec![]);
    let split = g.int64s(&[1, 1, 2, 2, 2, 4, 4, 4]);
    let split = g.op("Reshape", &[&normed, &split], vec![]);
    let perm = ints("perm", &[0, 1, 5, 2, 6, 3, 7, 4]);
    let moved = g.op("Transpose", &[&split], vec![perm]);
    let joined = g.int64s(&[1, 1, 8, 8, 8]);
    let y = g.op("Reshape", &[&moved, &joined], vec![]);
    g.output(&y, "y", &[1, 1, 8, 8, 8].map(D::N));
    g.into_bytes()
}

#[test]
fn the_task_encoders_context_ops_compute_what_tract_computes() {
    let bytes = context_ops();
    let (ops, diff) = engine_against_tract(
        &bytes,
        &[1, 4, 4, 4, 4],
        &[1, 1, 8, 8, 8],
        Precision::Float32,
    );
    assert!(diff < 1e-5, "relative max diff {diff}");
    let named = |name: &str| ops.iter().filter(|(n, _)| n == name).count();
    let pointwise = usize::from(conv3d::available());
    assert_eq!(named("IrisPointwiseConv"), pointwise, "{ops:?}");
    // tract's four passes (sum, scaling, subtraction, `RmsNorm`) are one
    // op; its three `MoveAxis` copies one.
    assert_eq!(named("IrisChannelNorm"), 1, "{ops:?}");
    assert_eq!(named("RmsNorm") + named("MoveAxis"), 0, "{ops:?}");
    assert_eq!(named("IrisPermute"), 1, "{ops:?}");
}

/// The decoder's classifier head as the exporter writes it, over `x` `[1,
/// 6, 4, 4, 8]`: per-class rows computed from the input (here the channels'
/// means through a linear layer, scaled by a constant per class, `[1, K,
/// 6]`), then `MatMul` with
/// the voxels `[1, 6, 128]`, reshaped to `[1, K, 4, 4, 8]`.
fn classifier_head(classes: usize) -> Vec<u8> {
    use super::testing::{D, OnnxGraph, int, ints};
    let mut g = OnnxGraph::default();
    let x = g.input("x", &[1, 6, 4, 4, 8].map(D::N));
    let means = g.op(
        "ReduceMean",
        &[&x],
        vec![ints("axes", &[2, 3, 4]), int("keepdims", 0)],
    );
    let mixing: Vec<f32> = (0..36).map(|i| (i % 5) as f32 - 1.5).collect();
    let mixing = g.constant(&mixing, &[6, 6]);
    let means = g.op("MatMul", &[&means, &mixing], vec![]);
    let axes = g.int64s(&[1]);
    let means = g.op("Unsqueeze", &[&means, &axes], vec![]);
    let scales: Vec<f32> = (0..classes * 6).map(|i| (i % 7) as f32 - 2.5).collect();
    let scales = g.constant(&scales, &[classes, 6]);
    let rows = g.op("Mul", &[&means, &scales], vec![]);
    let flat = g.int64s(&[0, 6, 128]);
    let voxels = g.op("Reshape", &[&x, &flat], vec![]);
    let logits = g.op("MatMul", &[&rows, &voxels], vec![]);
    let shape = g.int64s(&[0, -1, 4, 4, 8]);
    let y = g.op("Reshape", &[&logits, &shape], vec![]);
    g.output(&y, "y", &[1, classes, 4, 4, 8].map(D::N));
    g.into_bytes()
}

#[test]
fn the_classifier_heads_product_computes_what_tract_computes() {
    // One class (tract's sum drops the rows' axis), a few, and more than a
    // register block of rows.
    for classes in [1, 3, 11] {
        let bytes = classifier_head(classes);
        let out = [1, classes, 4, 4, 8];
        let (ops, diff) = engine_against_tract(&bytes, &[1, 6, 4, 4, 8], &out, Precision::Float32);
        assert!(diff < 1e-5, "{classes} classes: relative max diff {diff}");
        let named = |name: &str| ops.iter().filter(|(n, _)| n == name).count();
        let kernels = usize::from(conv3d::available());
        assert_eq!(named("IrisComputedPointwise"), kernels, "{ops:?}");
    }
}

#[test]
fn the_shipped_graphs_compute_in_the_engines_ops_what_tract_computes() {
    use tract_onnx::prelude::{
        Datum, Framework, InferenceFact, InferenceModelExt, IntoRunnable, IntoTValue, TValue, TVec,
        Tensor,
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/iris-tiny");
    let model = Model::load(&dir).expect("models/iris-tiny loads");
    for graph in [&model.encoder, &model.task_encoder, &model.decoder] {
        // Values in [-1, 1]; masks of zeros and ones.
        let inputs: TVec<TValue> = graph
            .inputs()
            .iter()
            .enumerate()
            .map(|(i, port)| {
                let shape = port.shape(1);
                let values: Vec<f32> = (0..shape.iter().product::<usize>())
                    .map(|j| match port.name.as_str() {
                        "masks" => f32::from(u8::from((j * 7 + i) % 5 < 2)),
                        _ => ((j * 7919 + i * 31) % 1013) as f32 / 506.5 - 1.0,
                    })
                    .collect();
                Tensor::from_shape(&shape, &values)
                    .expect("tensor")
                    .into_tvalue()
            })
            .collect();
        let mut tract = tract_onnx::onnx()
            .model_for_path(graph.path())
            .expect("tract reads the graph");
        for (i, input) in inputs.iter().enumerate() {
            let fact = InferenceFact::dt_shape(f32::datum_type(), input.shape());
            tract.set_input_fact(i, fact).expect("input fact");
        }
        let want = tract
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .and_then(|plan| plan.run(inputs.clone()))
            .expect("tract runs the graph");
        let plan = graph.plan(1, &model.executor).expect("the engine plans");
        let got = plan.run(inputs).expect("the engine runs");
        assert_eq!(got.len(), want.len());
        for (k, (got, want)) in got.iter().zip(&want).enumerate() {
            let (got, want) = (
                graphs::values(graph, got).expect("f32"),
                graphs::values(graph, want).expect("f32"),
            );
            assert_eq!(got.len(), want.len());
            let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            let diff = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(
                diff / scale < 1e-4,
                "{}: output {k} differs by {diff} x {scale}",
                graph.path().display()
            );
        }
    }
}

/// A model runs in the precision asked for where the CPU has it, in f32
/// elsewhere, and says which (what bfloat16 computes: the residual-block
/// test above and `conv3d`'s).
#[test]
fn a_model_says_which_precision_it_runs() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/iris-tiny");
    for precision in [Precision::Float32, Precision::Bfloat16] {
        let options = ModelOptions {
            precision,
            ..ModelOptions::default()
        };
        let model = Model::load_with(&dir, &options).expect("models/iris-tiny loads");
        assert_eq!(model.precision(), precision.on_this_cpu());
    }
    assert_eq!(
        Model::load(&dir).expect("loads").precision(),
        Precision::Float32
    );
}

#[test]
fn the_task_encoder_runs_what_the_masks_do_not_change_once() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/iris-tiny");
    let model = Model::load(&dir).expect("models/iris-tiny loads");
    let [d, h, w] = model.manifest.patch_size;
    let window = Array3::from_shape_fn((d, h, w), |(z, y, x)| {
        ((z * 31 + y * 7 + x * 3) % 97) as f32 / 48.5 - 1.0
    });
    let features = model.encode_window(window.view()).expect("encodes");
    // More classes than one run takes: runs of 9 and 8.
    let k = graphs::CLASSES_PER_RUN + 1;
    let masks = ndarray::Array4::from_shape_fn((k, d, h, w), |(k, z, y, x)| {
        f32::from(u8::from((z + 2 * y + 3 * x + 5 * k) % 7 < 2 + k % 4))
    });
    let got = model
        .encode_masks(&features, masks.view())
        .expect("encodes the masks");
    let mask_tensor = |class: usize| {
        let mask = masks.index_axis(Axis(0), class);
        let mask = mask.as_standard_layout();
        graphs::tensor(&[1, 1, d, h, w], mask.as_slice().unwrap_or_default())
    };
    // Every stage of class `class` of `got` against `outputs`, one class's:
    // the queries' products for several classes sum in another order than
    // for one (f32 rounding, some 1e-7 of the values).
    let check = |class: usize, outputs: &[tract_onnx::prelude::TValue]| {
        for (stage, value) in got.iter().zip(outputs) {
            let want = graphs::values(&model.task_encoder, value).expect("f32");
            let got = stage.index_axis(Axis(0), class);
            let got = got.as_slice().expect("standard");
            assert_eq!(got.len(), want.len());
            let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            for (a, b) in got.iter().zip(want) {
                assert!((a - b).abs() <= 1e-5 * scale, "class {class}: {a} vs {b}");
            }
        }
    };
    // The whole one-class plan, once per class.
    let plan = model.task_encoder.plan(1, &model.executor).expect("plans");
    let feed = |mask| {
        let inputs = model.feed(&model.task_encoder, &features.levels, &[], Some(mask));
        inputs.expect("inputs")
    };
    for class in 0..k {
        let inputs = feed(mask_tensor(class).expect("tensor"));
        check(class, &model.task_encoder.run(&plan, inputs).expect("runs"));
    }
    // Class by class through the one-class plan cut around the masks (where
    // the engine's attention is not in the plan): the same values.
    let split = model
        .task_encoder
        .split_plan("masks", &model.executor)
        .expect("plans");
    let input = model.task_encoder.inputs().len() - 1;
    let mut others = feed(mask_tensor(0).expect("tensor"));
    others.remove(input);
    let shared = model
        .task_encoder
        .run_part(&split.shared, others)
        .expect("runs");
    let class_values = |range: std::ops::Range<usize>| mask_tensor(range.start);
    let one_by_one = model
        .task_encoder
        .run_one_by_one(&split, &shared, 0..k, &class_values)
        .expect("runs");
    for (class, outputs) in one_by_one.iter().enumerate() {
        check(class, outputs);
    }
    let ops = |plan: &Arc<tract_onnx::prelude::TypedRunnableModel>, name: &str| {
        let nodes = plan.model().nodes();
        nodes.iter().filter(|n| n.op().name() == name).count()
    };
    let stages = model.manifest.stages.len();
    // Where the engine's attention is in the plan: every level's widening
    // of the features in the one-class shared part, their narrowing after
    // each class's merge in the voxel part, the queries' blocks and their
    // attention in the part run for all classes at once.
    let plan = model
        .task_encoder
        .classes_plan(input, 3, &model.executor)
        .expect("plans");
    match plan {
        Some(plan) => {
            let (shared, each) = (&plan.per_class.shared, &plan.per_class.each);
            assert_eq!(ops(shared, "IrisPointwiseConv"), stages);
            assert_eq!(ops(each, "IrisPointwiseConv"), 0);
            assert_eq!(ops(each, "IrisUnshuffleSqueeze"), stages);
            assert_eq!(ops(each, "IrisVoxelAttention"), 0);
            assert_eq!(ops(&plan.rest, "IrisUnshuffleSqueeze"), 0);
            // Each reads the queries and every class's voxels where they lie.
            let nodes = plan.rest.model().nodes();
            let attentions = nodes
                .iter()
                .filter(|n| n.op().name() == "IrisVoxelAttention" && n.inputs.len() == 1 + 3);
            assert_eq!(attentions.count(), 2 * stages);
            // Each level's context voxels, and the masks for their pooling.
            assert_eq!(plan.per_class.boundary.len(), stages + 1);
        }
        None => assert!(!conv3d::available(), "the plan is cut by class"),
    }
    // The one-class plan cut around the masks.
    if conv3d::available() {
        assert_eq!(ops(&split.shared, "IrisPointwiseConv"), stages);
        assert_eq!(ops(&split.varying, "IrisPointwiseConv"), 0);
        assert_eq!(ops(&split.varying, "IrisUnshuffleSqueeze"), stages);
    }
    assert_eq!(ops(&split.shared, "IrisVoxelAttention"), 0);
}
