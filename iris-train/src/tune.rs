//! In-context tuning (the paper's section 3.3): the task embedding alone is
//! optimised by gradient descent on the segmentation loss over a few
//! labelled cases, the model frozen, and the result is stored as a
//! `.irisemb` like any other task embedding.
//!
//! Each case (an image and its label map, same grid, any orientation and
//! spacing) is prepared as the engine prepares a reference
//! ([`iris_core::engine::prepare_reference`]): canonical
//! orientation, resampling to the model's spacing (trilinear image, nearest
//! labels), the patch-sized crop centred on the bounding box of all the
//! task's labels together, the crop normalised with the task's intensity
//! policy, and one binary mask per class of the task. The model being
//! frozen, each case goes through the encoder once ([`Iris::encode_query`]);
//! each step decodes every case with the current embedding, averages the
//! adaptive Dice + BCE loss of training ([`segmentation_loss`]) over the
//! cases and takes one Adam step on the embedding's tokens.
//!
//! The optimiser is burn's Adam on a small module holding the tokens (one
//! parameter per level); each case gets its own backward pass, with the
//! gradients summed, so memory holds one case's graph (besides every case's
//! encoder features) whatever the number of cases. The paper gives no
//! tuning settings; [`TuneOptions::default`] is 50 steps at learning rate
//! `1e-2`: the tokens leave the task encoder layer-normalised (root mean
//! square 1) and Adam moves each value by about the learning rate per
//! step, so 50 steps change them by at most half their scale (0.3 root
//! mean square on the `tiny` preset).
//!
//! ```no_run
//! use iris_core::{irisemb, nifti};
//! use iris_train::training::Trainer;
//! use iris_train::tune::{TuneOptions, tune};
//!
//! let device = iris_train::device::select_device();
//! let run = Trainer::resume("runs/small".as_ref(), &device)?;
//! let init = irisemb::read_file("thalamus.irisemb")?;
//! let (image, _) = nifti::read_image("case1.nii.gz")?;
//! let (labels, _) = nifti::read_labels("case1_labels.nii.gz")?;
//! let cases = vec![(image, labels)];
//! let tuned = tune(run.model(), &run.config().model, &init, &cases, &TuneOptions::default(), |step, loss| {
//!     println!("step {step}: loss {loss:.4}");
//! })?;
//! println!("loss {:.4} -> {:.4}", tuned.initial_loss, tuned.final_loss);
//! irisemb::write_file("thalamus-tuned.irisemb", &tuned.embedding, irisemb::Payload::F32)?;
//! # Ok::<(), iris_train::Error>(())
//! ```

use burn::module::{Module, Param};
use burn::optim::{AdamConfig, GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use iris_core::embedding::{Provenance, TaskEmbedding};
use iris_core::engine::{Limits, prepare_reference};
use iris_core::volume::{Image, LabelMap};

use crate::error::Error;
use crate::export::DEFAULT_CLASSES_PER_FORWARD;
use crate::loss::segmentation_loss;
use crate::model::{Iris, IrisConfig, QueryFeatures, TaskTensors};
use crate::training::model_fingerprint;

/// Settings of [`tune`].
#[derive(Clone, Debug, PartialEq)]
pub struct TuneOptions {
    /// Adam steps (at least 1). Default 50.
    pub steps: usize,
    /// Adam learning rate (finite, > 0). Default `1e-2`.
    pub learning_rate: f64,
    /// Classes per decoder run while tuning (at least 1): the model's
    /// `classes_per_forward` at inference, so that the tuned tokens are
    /// optimised for the decoding they will meet
    /// ([`Iris::segment_grouped`]). Default
    /// [`DEFAULT_CLASSES_PER_FORWARD`], that of exported models.
    pub classes_per_forward: usize,
}

impl Default for TuneOptions {
    fn default() -> Self {
        TuneOptions {
            steps: 50,
            learning_rate: 1e-2,
            classes_per_forward: DEFAULT_CLASSES_PER_FORWARD,
        }
    }
}

impl TuneOptions {
    /// Checks the fields, naming the first one out of range.
    ///
    /// # Errors
    /// [`Error::Config`].
    pub fn validate(&self) -> Result<(), Error> {
        if self.steps == 0 || u32::try_from(self.steps).is_err() {
            return Err(Error::Config {
                field: "steps",
                expected: format!("between 1 and {}", u32::MAX),
                found: self.steps.to_string(),
            });
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(Error::Config {
                field: "learning_rate",
                expected: "a positive number".into(),
                found: self.learning_rate.to_string(),
            });
        }
        if self.classes_per_forward == 0 {
            return Err(Error::Config {
                field: "classes_per_forward",
                expected: "at least 1".into(),
                found: "0".into(),
            });
        }
        Ok(())
    }
}

/// What [`tune`] returns.
#[derive(Clone, Debug)]
pub struct Tuned {
    /// The tuned embedding: the starting embedding's fingerprint,
    /// preprocessing, labels and names, each class with provenance
    /// [`Provenance::Tuned`] `{ steps, references }`, where `references`
    /// are those behind the starting class (1 for one-shot, `n` for an
    /// ensemble of `n`) and steps add to those of an already tuned class.
    pub embedding: TaskEmbedding,
    /// Mean loss over the cases of the starting embedding.
    pub initial_loss: f32,
    /// Mean loss over the cases of the tuned embedding.
    pub final_loss: f32,
}

/// The tunable tokens: one parameter per level, `[1, K, T + 1, C_level]`.
#[derive(Module, Debug)]
struct Tokens {
    stages: Vec<Param<Tensor<4>>>,
}

impl Tokens {
    fn embedding(&self) -> TaskTensors {
        TaskTensors {
            stages: self.stages.iter().map(Param::val).collect(),
        }
    }
}

/// A case ready for the decoder: the encoded patch (the model is frozen,
/// so it is encoded once for every step) and masks `[1, K, D, H, W]`.
struct Case {
    features: QueryFeatures,
    masks: Tensor<5>,
}

/// Optimises the task embedding `init` on `cases` with the model frozen.
///
/// `model` may live on any device (with or without autodiff) and is not
/// changed; `config` must be the configuration it was built from. Each step
/// computes the mean loss over the cases of the current embedding, calls
/// `progress(step, loss)` (steps counted from 1; the loss of step 1 is the
/// starting embedding's), and takes one Adam step. The embedding's tokens,
/// per level `[1, K, T + 1, C_level]`, are the only values that change.
///
/// # Errors
/// [`Error::Config`] for bad `options`; an [`iris_core::Error`] (as
/// [`Error::Core`]) for: no case ([`InvalidArgument`](iris_core::Error::InvalidArgument)
/// `tuning cases`), an `init` made by another model ([`ModelMismatch`](iris_core::Error::ModelMismatch))
/// or for another patch or spacing, a class label that does not fit 16
/// bits, and any case that cannot be prepared (`tuning case`, naming the
/// case from 1: image and label map on different grids, NaN voxels, a
/// label of the task absent from its label map, a label lost at the
/// model's spacing or outside the crop); [`Error::Diverged`] for a NaN or
/// infinite loss.
pub fn tune(
    model: &Iris,
    config: &IrisConfig,
    init: &TaskEmbedding,
    cases: &[(Image, LabelMap)],
    options: &TuneOptions,
    mut progress: impl FnMut(usize, f32),
) -> Result<Tuned, Error> {
    options.validate()?;
    let device = model_device(model)?.autodiff();
    // `train` puts every weight on the autodiff backend (where the model's
    // convolution has its fast backward pass), `no_grad` freezes it.
    let frozen = model.clone().train().no_grad();
    let cases = prepare_cases(model, &frozen, config, init, cases, &device)?;
    let mut tokens = Tokens {
        stages: TaskTensors::from_core(init, &device)
            .stages
            .into_iter()
            .map(Param::from_tensor)
            .collect(),
    };
    let mut optimizer = AdamConfig::new().init();
    let n = cases.len() as f32;
    let mut initial_loss = f32::NAN;
    for step in 1..=options.steps {
        let embedding = tokens.embedding();
        let mut accumulator = GradientsAccumulator::<Tokens>::new();
        let mut loss_sum = 0.0;
        // One backward per case, so that only one case's graph is held.
        for case in &cases {
            let logits =
                frozen.decode_grouped(&case.features, &embedding, options.classes_per_forward)?;
            let loss = segmentation_loss(logits, case.masks.clone()) / n;
            loss_sum += loss.clone().into_scalar::<f32>();
            accumulator.accumulate(
                &tokens,
                GradientsParams::from_grads(loss.backward(), &tokens),
            );
        }
        if !loss_sum.is_finite() {
            return Err(Error::Diverged { loss: loss_sum });
        }
        if step == 1 {
            initial_loss = loss_sum;
        }
        progress(step, loss_sum);
        tokens = optimizer.step(options.learning_rate, tokens, accumulator.grads());
    }
    let tuned = TaskTensors {
        stages: tokens.stages.iter().map(|p| p.val().detach()).collect(),
    };
    let final_loss = mean_loss(&frozen, &tuned, &cases, options.classes_per_forward)?;
    if !final_loss.is_finite() {
        return Err(Error::Diverged { loss: final_loss });
    }
    // `steps` fits: checked by `validate`.
    let steps = options.steps as u32;
    let embedding = tuned.to_core(
        *init.model(),
        *init.preprocessing(),
        init.stage_shapes().to_vec(),
        init.classes().iter().map(|class| {
            let provenance = tuned_provenance(class.provenance(), steps);
            (class.label(), class.name(), provenance)
        }),
    )?;
    Ok(Tuned {
        embedding,
        initial_loss,
        final_loss,
    })
}

/// The provenance of a class tuned for `steps` from one of provenance
/// `start`: the references behind the starting point are kept (as the
/// `.irisemb` format records them: 1 for one-shot or a memory-bank entry,
/// `n` for an ensemble of `n`), and steps add up over repeated tuning.
fn tuned_provenance(start: Provenance, steps: u32) -> Provenance {
    match start {
        Provenance::OneShot | Provenance::MemoryBank { .. } => Provenance::Tuned {
            steps,
            references: 1,
        },
        Provenance::Ensemble { references } => Provenance::Tuned { steps, references },
        Provenance::Tuned {
            steps: before,
            references,
        } => Provenance::Tuned {
            steps: before.saturating_add(steps),
            references,
        },
    }
}

/// Mean segmentation loss (adaptive Dice + BCE, as in training and
/// [`tune`]) of the task embedding `task` over `cases`, each prepared as
/// [`tune`] prepares it and decoded `classes_per_forward` classes per run;
/// no gradients.
///
/// # Errors
/// As [`tune`] for `task` and `cases`; [`Error::Config`] when
/// `classes_per_forward` is 0.
pub fn loss_on_cases(
    model: &Iris,
    config: &IrisConfig,
    task: &TaskEmbedding,
    cases: &[(Image, LabelMap)],
    classes_per_forward: usize,
) -> Result<f32, Error> {
    // Everything on the plain backend, where `valid` puts the weights.
    let device = model_device(model)?.inner();
    let valid = model.valid();
    let cases = prepare_cases(model, &valid, config, task, cases, &device)?;
    mean_loss(
        &valid,
        &TaskTensors::from_core(task, &device),
        &cases,
        classes_per_forward,
    )
}

fn model_device(model: &Iris) -> Result<Device, Error> {
    model.devices().first().cloned().ok_or(Error::Config {
        field: "model",
        expected: "a model with parameters on a device".into(),
        found: "no device".into(),
    })
}

/// Mean loss of `embedding` over `cases`, `classes_per_forward` classes
/// per decoder run.
fn mean_loss(
    model: &Iris,
    embedding: &TaskTensors,
    cases: &[Case],
    classes_per_forward: usize,
) -> Result<f32, Error> {
    let mut sum = 0.0;
    for case in cases {
        let logits = model.decode_grouped(&case.features, embedding, classes_per_forward)?;
        sum += segmentation_loss(logits, case.masks.clone()).into_scalar::<f32>();
    }
    Ok(sum / cases.len() as f32)
}

/// Checks `task` against `model` and prepares every case on `device`,
/// encoded by `encoder` (`model` on the backend the cases will be decoded
/// on).
fn prepare_cases(
    model: &Iris,
    encoder: &Iris,
    config: &IrisConfig,
    task: &TaskEmbedding,
    cases: &[(Image, LabelMap)],
    device: &Device,
) -> Result<Vec<Case>, Error> {
    if cases.is_empty() || u32::try_from(cases.len()).is_err() {
        return Err(Error::invalid(
            "tuning cases",
            format!(
                "{} cases given, expected between 1 and {}",
                cases.len(),
                u32::MAX
            ),
        ));
    }
    task.ensure_model(&model_fingerprint(model, config))?;
    let preprocessing = task.preprocessing();
    preprocessing.check_geometry(config.spacing_mm, config.patch_size)?;
    let labels = task
        .classes()
        .iter()
        .map(|class| iris_core::labels::label_value(class.label()))
        .collect::<Result<Vec<_>, _>>()?;
    let [d, h, w] = config.patch_size;
    cases
        .iter()
        .enumerate()
        .map(|(i, (image, label_map))| {
            let input = prepare_reference(
                image,
                label_map,
                &labels,
                config.spacing_mm,
                config.patch_size,
                Some(preprocessing.intensity),
                &Limits::default(),
            )
            .map_err(|e| {
                Error::invalid(
                    "tuning case",
                    format!("case {} of {}: {e}", i + 1, cases.len()),
                )
            })?;
            let image = input.image.data().iter().copied().collect();
            let image = Tensor::from_data(TensorData::new(image, [1, 1, d, h, w]), device);
            Ok(Case {
                features: encoder.encode_query(image)?,
                masks: Tensor::from_data(
                    TensorData::new(input.masks, [1, labels.len(), d, h, w]),
                    device,
                ),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuning_keeps_the_references_behind_the_start_and_adds_up_steps() {
        let tuned = |start| tuned_provenance(start, 10);
        assert_eq!(
            tuned(Provenance::OneShot),
            Provenance::Tuned {
                steps: 10,
                references: 1
            }
        );
        assert_eq!(
            tuned(Provenance::Ensemble { references: 5 }),
            Provenance::Tuned {
                steps: 10,
                references: 5
            }
        );
        assert_eq!(
            tuned(Provenance::Tuned {
                steps: 7,
                references: 3
            }),
            Provenance::Tuned {
                steps: 17,
                references: 3
            }
        );
        assert_eq!(
            tuned(Provenance::MemoryBank {
                updates: 100,
                momentum: 0.99
            }),
            Provenance::Tuned {
                steps: 10,
                references: 1
            }
        );
    }
}
