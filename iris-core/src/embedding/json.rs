//! A task embedding described as JSON: what `iris inspect --json` prints and
//! Python's `iris.inspect` returns (one owner, so the two cannot drift).

use alloc::string::ToString;
use alloc::vec::Vec;

use serde_json::{Value, json};

use super::{Provenance, TaskEmbedding};
use crate::preprocess::IntensityPolicy;

impl TaskEmbedding {
    /// The embedding described as JSON, without the embeddings themselves:
    /// the model fingerprint, the preprocessing, the stage shapes and each
    /// class's label, name and provenance.
    ///
    /// ```
    /// use iris_core::embedding::{
    ///     ClassEmbedding, ModelFingerprint, Preprocessing, Provenance, StageShape, TaskEmbedding,
    /// };
    /// use iris_core::preprocess::IntensityPolicy;
    ///
    /// let pre = Preprocessing::isotropic(1.5, [128; 3], IntensityPolicy::CT);
    /// let stages = vec![StageShape { tokens: 1, channels: 2 }];
    /// let class = ClassEmbedding::new(1, "liver", Provenance::OneShot, vec![vec![0.5, 0.5]])?;
    /// let task = TaskEmbedding::new(ModelFingerprint::new([7; 32]), pre, stages, vec![class])?;
    ///
    /// let json = task.describe_json();
    /// assert_eq!(json["preprocessing"]["intensity"]["policy"], "ct");
    /// assert_eq!(json["classes"][0]["name"], "liver");
    /// assert_eq!(json["classes"][0]["provenance"]["kind"], "one-shot");
    /// # Ok::<(), iris_core::Error>(())
    /// ```
    pub fn describe_json(&self) -> Value {
        let pre = self.preprocessing();
        json!({
            "model": self.model().to_string(),
            "preprocessing": {
                "spacing_mm": pre.spacing_mm,
                "patch": pre.patch,
                "intensity": intensity_json(&pre.intensity),
            },
            "stages": self.stage_shapes().iter()
                .map(|s| json!({ "tokens": s.tokens, "channels": s.channels }))
                .collect::<Vec<_>>(),
            "classes": self.classes().iter()
                .map(|c| json!({
                    "label": c.label(),
                    "name": c.name(),
                    "provenance": provenance_json(c.provenance()),
                }))
                .collect::<Vec<_>>(),
        })
    }
}

fn intensity_json(policy: &IntensityPolicy) -> Value {
    match *policy {
        IntensityPolicy::Ct { min_hu, max_hu } => {
            json!({ "policy": "ct", "min_hu": min_hu, "max_hu": max_hu })
        }
        IntensityPolicy::Percentile { low, high } => {
            json!({ "policy": "percentile", "low": low, "high": high })
        }
    }
}

fn provenance_json(provenance: Provenance) -> Value {
    match provenance {
        Provenance::OneShot => json!({ "kind": "one-shot" }),
        Provenance::Ensemble { references } => {
            json!({ "kind": "ensemble", "references": references })
        }
        Provenance::MemoryBank { updates, momentum } => {
            json!({ "kind": "memory-bank", "updates": updates, "momentum": momentum })
        }
        Provenance::Tuned { steps, references } => {
            json!({ "kind": "tuned", "steps": steps, "references": references })
        }
    }
}
