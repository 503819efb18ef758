//! Context retrieval (`Model::retrieve`) on a tiny exported model and
//! phantom volumes: what it chooses is checked against similarities the
//! test computes itself through the engine's public API, and the final
//! segmentation against `Model::segment` with the embeddings it reports.

use iris_core::Error;
use iris_core::embedding::{Provenance, TaskEmbedding};
use iris_core::engine::{
    EncodeOptions, Model, PoolReference, RetrievalLevel, RetrieveOptions, SegmentOptions, TaskClass,
};
use iris_core::volume::{Image, LabelMap};
use iris_test_support::TempDir;
use iris_test_support::fixture::{self, phantom, query, reference};
use iris_tests::export_tiny_model;

struct Setup {
    _dir: TempDir,
    model: Model,
}

fn setup(seed: u64) -> Setup {
    let dir = TempDir::new("retrieval");
    export_tiny_model(dir.path(), seed);
    let model = Model::load(dir.path()).expect("model loads");
    Setup { _dir: dir, model }
}

fn classes() -> [TaskClass; 2] {
    [TaskClass::new(1, "ball"), TaskClass::new(2, "box")]
}

/// A reference like the fixture's, with the ball moved by `shift` voxels
/// and given radius.
fn variant(shift: f64, radius: f64) -> (Image, LabelMap) {
    let (image, _) = reference();
    phantom(
        [40, 40, 40],
        image.geometry().affine(),
        [20.0 + shift, 18.0 - shift, 21.0],
        radius,
        ([5, 26, 8], [14, 34, 30]),
    )
}

fn pool_of(model: &Model, pairs: &[(Image, LabelMap)]) -> Vec<PoolReference> {
    pairs
        .iter()
        .enumerate()
        .map(|(i, (image, labels))| {
            model
                .encode_pool_reference(
                    format!("ref{i}"),
                    image,
                    labels,
                    &classes(),
                    &EncodeOptions::default(),
                )
                .expect("encodes")
        })
        .collect()
}

fn no_components() -> SegmentOptions {
    SegmentOptions {
        largest_component: false,
        ..SegmentOptions::default()
    }
}

#[test]
fn object_level_picks_the_reference_whose_class_embedding_is_most_similar() {
    let Setup { model, .. } = setup(21);
    let pairs = [variant(0.0, 7.0), variant(3.0, 5.0), variant(-4.0, 9.0)];
    let encoded = pool_of(&model, &pairs);
    let (q, _) = query(2.0);
    let options = RetrieveOptions {
        top_k: 1,
        initial: 1,
        segment: no_components(),
        ..RetrieveOptions::default()
    };
    // The pool in two orders (the initial reference, index 1, is the same
    // in both): the same references must be chosen, by name.
    let mut chosen_names = Vec::new();
    for order in [[0, 1, 2], [2, 1, 0]] {
        let pool: Vec<PoolReference> = order.iter().map(|&i| encoded[i].clone()).collect();
        let result = model.retrieve(&q, &pool, &[], &options).expect("retrieves");

        // The same steps through the public API: a first pass with
        // reference 1, the query's predicted masks encoded, cosine
        // similarity to each reference's class.
        let first = model
            .segment(&q, &pool[1].task, &options.segment)
            .expect("segments");
        let present: Vec<TaskClass> = classes()
            .into_iter()
            .filter(|c| first.labels.count(c.label) > 0)
            .collect();
        assert!(!present.is_empty(), "the first pass labels something");
        let own = model
            .encode_task(
                &q,
                &first.labels,
                &present,
                &EncodeOptions {
                    intensity: Some(pool[1].task.preprocessing().intensity),
                    ..EncodeOptions::default()
                },
            )
            .expect("encodes the predictions");
        for choice in &result.choices {
            let Some(mine) = own.class(choice.label) else {
                // Not found by the first pass: every reference, no similarity.
                assert_eq!(choice.chosen.len(), pool.len());
                assert!(choice.chosen.iter().all(|r| r.similarity.is_nan()));
                continue;
            };
            let similarities: Vec<f32> = pool
                .iter()
                .map(|r| {
                    mine.similarity(r.task.class(choice.label).unwrap())
                        .unwrap()
                })
                .collect();
            let best = (0..pool.len())
                .max_by(|&a, &b| similarities[a].total_cmp(&similarities[b]))
                .unwrap();
            assert_eq!(choice.chosen.len(), 1);
            assert_eq!(choice.chosen[0].index, best, "{similarities:?}");
            assert_eq!(choice.chosen[0].similarity, similarities[best]);
            chosen_names.push((choice.label, pool[best].name.clone()));
            // With k = 1 the class embedding is the chosen reference's own.
            let used = result.task.class(choice.label).unwrap();
            let source = pool[best].task.class(choice.label).unwrap();
            assert_eq!(used.stages(), source.stages());
            assert_eq!(used.provenance(), Provenance::OneShot);
        }
        let again = model
            .segment(&q, &result.task, &options.segment)
            .expect("segments");
        assert_eq!(again.labels.data(), result.segmentation.labels.data());
    }
    let (first_order, second_order) = chosen_names.split_at(chosen_names.len() / 2);
    assert_eq!(first_order, second_order);
}

#[test]
fn a_reference_made_from_the_query_itself_is_found_at_similarity_one() {
    let Setup { model, .. } = setup(22);
    let (q, _) = query(0.0);
    let decoys = [variant(2.0, 6.0), variant(-3.0, 8.0)];
    let mut pool = pool_of(&model, &decoys);
    let options = RetrieveOptions {
        top_k: 1,
        segment: no_components(),
        ..RetrieveOptions::default()
    };
    // What the first pass (reference 0) predicts on the query, encoded
    // as a reference in its own right and put last in the pool.
    let first = model
        .segment(&q, &pool[0].task, &options.segment)
        .expect("segments");
    let present: Vec<TaskClass> = classes()
        .into_iter()
        .filter(|c| first.labels.count(c.label) > 0)
        .collect();
    // Both classes found, so that retrieve's first pass (over the classes
    // asked for) is this one.
    assert_eq!(present.len(), 2, "the first pass finds both classes");
    let labels: Vec<u32> = present.iter().map(|c| u32::from(c.label)).collect();
    let intensity = Some(pool[0].task.preprocessing().intensity);
    let itself = model
        .encode_pool_reference(
            "the query",
            &q,
            &first.labels,
            &present,
            &EncodeOptions {
                intensity,
                ..EncodeOptions::default()
            },
        )
        .expect("encodes");
    pool.push(itself);

    let result = model
        .retrieve(&q, &pool, &labels, &options)
        .expect("retrieves");
    for choice in &result.choices {
        assert_eq!(choice.chosen[0].index, 2, "{choice:?}");
        assert!(
            (choice.chosen[0].similarity - 1.0).abs() < 1e-5,
            "{choice:?}"
        );
    }

    // Image level: the query's own image has descriptor similarity 1.
    let by_image = RetrieveOptions {
        level: RetrievalLevel::Image,
        ..options
    };
    let result = model
        .retrieve(&q, &pool, &labels, &by_image)
        .expect("retrieves");
    for choice in &result.choices {
        assert_eq!(choice.chosen[0].index, 2, "{choice:?}");
        assert!(
            (choice.chosen[0].similarity - 1.0).abs() < 1e-5,
            "{choice:?}"
        );
    }
}

#[test]
fn top_k_over_the_whole_pool_is_the_context_ensemble() {
    let Setup { model, .. } = setup(23);
    let pairs = [variant(0.0, 7.0), variant(3.0, 5.0), variant(-4.0, 9.0)];
    let pool = pool_of(&model, &pairs);
    let (q, _) = query(1.0);
    let tasks: Vec<TaskEmbedding> = pool.iter().map(|r| r.task.clone()).collect();
    let ensemble = TaskEmbedding::ensemble(&tasks).expect("ensemble");
    for level in [RetrievalLevel::Object, RetrievalLevel::Image] {
        let options = RetrieveOptions {
            level,
            top_k: 10,
            ..RetrieveOptions::default()
        };
        let result = model
            .retrieve(&q, &pool, &[1, 2], &options)
            .expect("retrieves");
        for (used, expected) in result.task.classes().iter().zip(ensemble.classes()) {
            assert_eq!(used.label(), expected.label());
            assert_eq!(used.provenance(), Provenance::Ensemble { references: 3 });
            for (a, b) in used.stages().iter().zip(expected.stages()) {
                // Averaged in another order: equal to rounding.
                let diff = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f32::max);
                assert!(diff < 1e-6, "{level:?}: {diff}");
            }
        }
        assert_eq!(
            result.choices.iter().map(|c| c.chosen.len()).sum::<usize>(),
            6
        );
    }
}

#[test]
fn bad_pools_and_options_are_refused_with_the_reason() {
    let Setup { model, .. } = setup(24);
    let pool = pool_of(&model, &[variant(0.0, 7.0)]);
    let (q, _) = query(0.0);
    let defaults = RetrieveOptions::default();
    let reason = |r: Result<iris_core::engine::Retrieval, Error>| match r {
        Err(e) => e.to_string(),
        Ok(_) => panic!("accepted"),
    };

    assert!(reason(model.retrieve(&q, &[], &[], &defaults)).contains("pool holds 0"));
    let zero = RetrieveOptions {
        top_k: 0,
        ..RetrieveOptions::default()
    };
    assert!(reason(model.retrieve(&q, &pool, &[], &zero)).contains("top_k"));
    assert!(reason(model.retrieve(&q, &pool, &[7], &defaults)).contains("label 7"));
    assert!(reason(model.retrieve(&q, &pool, &[1, 1], &defaults)).contains("twice"));

    // Image level needs descriptors; a task file alone has none.
    let bare = vec![PoolReference {
        descriptor: None,
        ..pool[0].clone()
    }];
    let by_image = RetrieveOptions {
        level: RetrievalLevel::Image,
        ..RetrieveOptions::default()
    };
    let message = reason(model.retrieve(&q, &bare, &[], &by_image));
    assert!(
        message.contains("\"ref0\"") && message.contains("descriptor"),
        "{message}"
    );

    // A reference encoded by another model.
    let foreign = vec![PoolReference {
        task: fixture::foreign(&pool[0].task),
        ..pool[0].clone()
    }];
    assert!(matches!(
        model.retrieve(&q, &foreign, &[], &defaults),
        Err(Error::ModelMismatch { .. })
    ));
}

#[test]
fn a_reference_whose_classes_do_not_share_a_crop_is_encoded_class_by_class() {
    let Setup { model, .. } = setup(25);
    // 300 mm along d at 3 mm: the ball and the box lie further apart than
    // the tiny model's 192 mm patch.
    let (image, labels) = phantom(
        [100, 24, 24],
        iris_core::volume::Affine::from_spacing([3.0, 3.0, 3.0]),
        [10.0, 12.0, 12.0],
        5.0,
        ([82, 6, 6], [92, 18, 18]),
    );
    let options = EncodeOptions::default();
    assert!(
        model
            .encode_task(&image, &labels, &classes(), &options)
            .is_err(),
        "the two classes cannot share one crop"
    );
    let reference = model
        .encode_pool_reference("far apart", &image, &labels, &classes(), &options)
        .expect("encodes each class alone");
    for class in classes() {
        let alone = model
            .encode_task(&image, &labels, std::slice::from_ref(&class), &options)
            .expect("encodes");
        let got = reference.task.class(class.label.into()).expect("present");
        assert_eq!(got, &alone.classes()[0]);
    }
}
