//! The EMA memory bank of task embeddings (the paper's "context ensemble
//! for training classes", section 7): one entry per class seen in training,
//! updated after every step with `T <- a T + (1 - a) T_new` from the
//! embedding the reference produced (detached); the first observation of a
//! class initialises its entry.
//!
//! Every class gets a stable global id (`u32`, from 1; 0 is background)
//! the first time it is [registered](MemoryBank::register); the id is the
//! class's label in the `.irisemb` file and the `key -> (id, name)` table
//! travels with the checkpoint. The maths is `iris-core`'s
//! [`TaskEmbedding::ema_update`]; this type adds the key table and binds
//! the entries to a model fingerprint only when it is written, since the
//! weights change at every step.

use std::collections::HashMap;
use std::path::Path;

use iris_core::embedding::{
    ClassEmbedding, ModelFingerprint, Preprocessing, Provenance, StageShape, TaskEmbedding,
};
use iris_core::irisemb::{self, Payload};
use iris_core::preprocess::IntensityPolicy;

use crate::data::ClassKey;
use crate::model::{IrisConfig, TaskTensors};

/// Fingerprint the entries carry while in memory; replaced by the real one
/// when the bank is written.
const UNBOUND: ModelFingerprint = ModelFingerprint::new([0; 32]);

/// Per-class task embeddings kept by exponential moving average.
#[derive(Clone, Debug)]
pub struct MemoryBank {
    momentum: f32,
    preprocessing: Preprocessing,
    stage_shapes: Vec<StageShape>,
    /// Class keys; the class of key `keys[i]` has id `i + 1`.
    keys: Vec<String>,
    /// Names written to `.irisemb`, `"<key> <name>"`, same order as `keys`.
    names: Vec<String>,
    ids: HashMap<String, u32>,
    /// The entries, labelled by id (`None` until the first observation).
    entries: Option<TaskEmbedding>,
}

impl MemoryBank {
    /// An empty bank for models of `config`, with momentum `a` in `[0, 1]`
    /// (paper 0.999, released code 0.99). Entries record the preprocessing
    /// of the training data: `config.spacing_mm`, `config.patch_size` and
    /// the MR intensity policy (2-98 percentile clip, then z-score).
    ///
    /// # Errors
    /// [`iris_core::Error::InvalidArgument`] for a momentum outside `[0, 1]`.
    pub fn new(config: &IrisConfig, momentum: f32) -> Result<Self, iris_core::Error> {
        if !(0.0..=1.0).contains(&momentum) {
            return Err(iris_core::Error::invalid(
                "bank momentum",
                format!("{momentum} is not in [0, 1]"),
            ));
        }
        Ok(MemoryBank {
            momentum,
            preprocessing: Preprocessing::isotropic(
                config.spacing_mm,
                config.patch_size,
                IntensityPolicy::MR,
            ),
            stage_shapes: config.stage_shapes(),
            keys: Vec::new(),
            names: Vec::new(),
            ids: HashMap::new(),
            entries: None,
        })
    }

    /// The EMA momentum `a`.
    pub fn momentum(&self) -> f32 {
        self.momentum
    }

    /// The id of `key`, registering it with the human-readable `name` if it
    /// is new (ids are given in registration order, from 1).
    pub fn register(&mut self, key: &ClassKey, name: &str) -> u32 {
        if let Some(&id) = self.ids.get(key.as_str()) {
            return id;
        }
        self.keys.push(key.as_str().to_string());
        self.names.push(format!("{key} {name}"));
        let id = self.keys.len() as u32;
        self.ids.insert(key.as_str().to_string(), id);
        id
    }

    /// The id of `key`, if registered.
    pub fn id(&self, key: &ClassKey) -> Option<u32> {
        self.ids.get(key.as_str()).copied()
    }

    /// The registered classes: `(id, key, name)` in id order (the name as
    /// written to `.irisemb`, `"<key> <name>"`).
    pub fn classes(&self) -> impl Iterator<Item = (u32, &str, &str)> {
        self.keys
            .iter()
            .zip(&self.names)
            .enumerate()
            .map(|(i, (k, n))| (i as u32 + 1, k.as_str(), n.as_str()))
    }

    /// The current entry of `key`, if it has been observed.
    pub fn entry(&self, key: &ClassKey) -> Option<&ClassEmbedding> {
        let id = self.id(key)?;
        self.entries.as_ref()?.class(id)
    }

    /// Number of classes with an entry.
    pub fn len(&self) -> usize {
        self.entries.as_ref().map_or(0, |e| e.classes().len())
    }

    /// Whether no class has an entry yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// EMA update with one task embedding of the model: `classes[k]` is the
    /// class of embedding class `k` (unregistered keys are registered with
    /// their key as name). Only batch item 0 is used.
    ///
    /// # Errors
    /// [`iris_core::Error::ShapeMismatch`] if the embedding's levels do not
    /// match the bank's stage shapes or `classes` has the wrong length;
    /// [`iris_core::Error::NonFinite`] for NaN or infinite values.
    pub fn observe(
        &mut self,
        classes: &[ClassKey],
        embedding: &TaskTensors,
    ) -> Result<(), iris_core::Error> {
        // A first observation is stored as it is, as `ema_update` stores a
        // class it does not hold yet.
        let provenance = match self.entries {
            Some(_) => Provenance::OneShot,
            None => Provenance::MemoryBank {
                updates: 0,
                momentum: self.momentum,
            },
        };
        let (preprocessing, stage_shapes) = (self.preprocessing, self.stage_shapes.clone());
        let observed = embedding.to_core(
            UNBOUND,
            preprocessing,
            stage_shapes,
            classes.iter().map(|key| {
                let id = self.register(key, key.as_str());
                (id, self.names[id as usize - 1].clone(), provenance)
            }),
        )?;
        match &mut self.entries {
            Some(entries) => entries.ema_update(&observed, self.momentum)?,
            None => self.entries = Some(observed),
        }
        Ok(())
    }

    /// The entries as an `iris-core` task embedding bound to `model`, or
    /// `None` while the bank is empty.
    ///
    /// # Errors
    /// As [`TaskEmbedding::new`] (cannot fail for a bank built by `observe`).
    pub fn to_embedding(
        &self,
        model: ModelFingerprint,
    ) -> Result<Option<TaskEmbedding>, iris_core::Error> {
        self.entries
            .as_ref()
            .map(|e| {
                TaskEmbedding::new(
                    model,
                    self.preprocessing,
                    self.stage_shapes.clone(),
                    e.classes().to_vec(),
                )
            })
            .transpose()
    }

    /// Writes the bank atomically to `path` as a `.irisemb` file (exact
    /// `f32` values) bound to `model`; writes nothing and returns `false`
    /// while the bank is empty.
    ///
    /// # Errors
    /// [`iris_core::Error::Io`] for filesystem errors.
    pub fn write(&self, path: &Path, model: ModelFingerprint) -> Result<bool, iris_core::Error> {
        match self.to_embedding(model)? {
            Some(embedding) => {
                irisemb::write_file(path, &embedding, Payload::F32)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Rebuilds a bank from its key table (`keys[i]` and `names[i]` are
    /// class id `i + 1`, names as [`classes`](Self::classes) gives them)
    /// and, when it had entries, its `.irisemb` file, which must have been
    /// written for `model`.
    ///
    /// # Errors
    /// [`iris_core::Error::InvalidArgument`] for a bad momentum, tables of
    /// different lengths, a repeated key, or an entry whose label or name
    /// is not in the table; [`iris_core::Error::ModelMismatch`] for a file
    /// of another model; I/O and format errors of the file.
    pub fn restore(
        config: &IrisConfig,
        momentum: f32,
        keys: Vec<String>,
        names: Vec<String>,
        file: Option<(&Path, ModelFingerprint)>,
    ) -> Result<Self, iris_core::Error> {
        let mut bank = MemoryBank::new(config, momentum)?;
        if keys.len() != names.len() {
            return Err(iris_core::Error::invalid(
                "bank class table",
                format!("{} keys but {} names", keys.len(), names.len()),
            ));
        }
        for (i, key) in keys.iter().enumerate() {
            if bank.ids.insert(key.clone(), i as u32 + 1).is_some() {
                return Err(iris_core::Error::invalid(
                    "bank class table",
                    format!("key {key:?} appears twice"),
                ));
            }
        }
        bank.keys = keys;
        bank.names = names;
        if let Some((path, model)) = file {
            let embedding = irisemb::read_file(path)?;
            embedding.ensure_model(&model)?;
            for class in embedding.classes() {
                let known = (class.label() as usize)
                    .checked_sub(1)
                    .and_then(|i| bank.names.get(i));
                if known.map(String::as_str) != Some(class.name()) {
                    return Err(iris_core::Error::invalid(
                        "bank entry",
                        format!(
                            "label {} ({:?}) of {} is not in the class table",
                            class.label(),
                            class.name(),
                            path.display()
                        ),
                    ));
                }
            }
            bank.entries = Some(TaskEmbedding::new(
                UNBOUND,
                bank.preprocessing,
                bank.stage_shapes.clone(),
                embedding.classes().to_vec(),
            )?);
        }
        Ok(bank)
    }

    /// The keys and names of the class table, in id order (what
    /// [`restore`](Self::restore) takes back).
    pub fn table(&self) -> (&[String], &[String]) {
        (&self.keys, &self.names)
    }
}
