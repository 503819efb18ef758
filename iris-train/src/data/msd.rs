//! Datasets in the Medical Segmentation Decathlon (MSD) or nnU-Net v2
//! layout, so that users can train on their own image+label pairs:
//!
//! ```text
//! Dataset/
//!   dataset.json
//!   imagesTr/  case_0000.nii.gz ...   (nnU-Net v2: `_XXXX` channel suffix)
//!              case.nii.gz ...        (MSD: listed in `training`)
//!   labelsTr/  case.nii.gz ...
//! ```
//!
//! `dataset.json` differs between the two:
//!
//! | field | MSD | nnU-Net v2 |
//! |---|---|---|
//! | labels | `{"0": "background", "1": "liver"}` (value → name) | `{"background": 0, "liver": 1}` (name → value) |
//! | channels | `modality`: `{"0": "CT"}` | `channel_names`: `{"0": "CT"}` |
//! | cases | `training`: `[{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]` | every file of `labelsTr/` with `file_ending` (default `.nii.gz`) |
//!
//! Both have `numTraining`, which must match the cases found.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use iris_core::nifti::{read_image, read_labels};
use iris_core::preprocess::{canonical, resample_image, resample_labels, target_geometry};
use serde_json::{Map, Value};

use super::atlas::{Source, Subject};
use super::{Error, Result};

/// One training case: its image channels and its label map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MsdCase {
    /// Case identifier (the label file name without its ending).
    pub id: String,
    /// Image file per channel, in channel order.
    pub channels: Vec<PathBuf>,
    /// Label map file.
    pub labels: PathBuf,
}

/// A dataset folder, checked: every listed file exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MsdDataset {
    /// The dataset folder.
    pub root: PathBuf,
    /// `name` from `dataset.json`, or the folder name.
    pub name: String,
    /// Foreground label values and their names (background excluded).
    pub classes: BTreeMap<u16, String>,
    /// Channel names in channel order (e.g. `["CT"]`, `["T1", "T2"]`).
    pub channel_names: Vec<String>,
    /// The training cases, sorted by id.
    pub cases: Vec<MsdCase>,
}

impl MsdDataset {
    /// Reads and checks `root/dataset.json` and the files it implies.
    ///
    /// # Errors
    /// [`Error::Dataset`] naming the file: a missing or unreadable
    /// `dataset.json`, invalid JSON, a missing or malformed `labels` or
    /// channel map, a `training` entry or image file that does not exist,
    /// or a case count that differs from `numTraining`.
    pub fn open(root: impl AsRef<Path>) -> Result<MsdDataset> {
        let root = root.as_ref().to_path_buf();
        let json_path = root.join("dataset.json");
        let text = std::fs::read_to_string(&json_path)
            .map_err(|e| Error::dataset(&json_path, format!("cannot read: {e}")))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| Error::dataset(&json_path, format!("invalid JSON: {e}")))?;
        let Value::Object(json) = json else {
            return Err(Error::dataset(&json_path, "top level is not a JSON object"));
        };
        let bad = |reason: String| Error::dataset(&json_path, reason);
        let name = match json.get("name") {
            Some(Value::String(n)) if !n.is_empty() => n.clone(),
            _ => root
                .file_name()
                .map_or_else(|| "dataset".into(), |n| n.to_string_lossy().into_owned()),
        }
        .replace(':', "_");
        let classes = parse_labels(json.get("labels")).map_err(bad)?;
        let channels_field = if json.contains_key("channel_names") {
            "channel_names"
        } else {
            "modality"
        };
        let channel_names =
            parse_channels(json.get(channels_field), channels_field).map_err(bad)?;
        let cases = match json.get("training") {
            Some(list) => msd_cases(&root, list, channel_names.len()).map_err(bad)?,
            None => nnunet_cases(&root, &json, channel_names.len())?,
        };
        if cases.is_empty() {
            return Err(bad("no training cases".into()));
        }
        for case in &cases {
            for file in case.channels.iter().chain([&case.labels]) {
                if !file.is_file() {
                    return Err(Error::dataset(
                        file,
                        format!(
                            "missing file of case {:?} listed by {}",
                            case.id,
                            json_path.display()
                        ),
                    ));
                }
            }
        }
        if let Some(n) = json.get("numTraining")
            && n.as_u64() != Some(cases.len() as u64)
        {
            return Err(bad(format!(
                "numTraining is {n} but {} training cases were found",
                cases.len()
            )));
        }
        Ok(MsdDataset {
            root,
            name,
            classes,
            channel_names,
            cases,
        })
    }

    /// Loads every case as a [`Subject`] of one [`Source`] named after the
    /// dataset: image channel `channel` and labels in RAS+, resampled to
    /// `spacing_mm` (image trilinear, labels nearest). No class is held out.
    ///
    /// # Errors
    /// [`Error::Core`] for an unreadable NIfTI (naming it), an image and
    /// label map on different grids, or an invalid spacing;
    /// [`Error::Dataset`] for a channel that does not exist or a label
    /// value that `dataset.json` does not name (naming the label file).
    pub fn load_source(&self, spacing_mm: f64, channel: usize) -> Result<Source> {
        if channel >= self.channel_names.len() {
            return Err(Error::dataset(
                self.root.join("dataset.json"),
                format!(
                    "channel {channel} requested, the dataset has {}",
                    self.channel_names.len()
                ),
            ));
        }
        let subjects = self
            .cases
            .iter()
            .map(|case| {
                let (image, _) = read_image(&case.channels[channel])?;
                let (labels, _) = read_labels(&case.labels)?;
                image.ensure_same_grid(&labels, "label map vs image")?;
                if let Some(v) = labels
                    .labels_present()
                    .into_iter()
                    .find(|v| *v != 0 && !self.classes.contains_key(v))
                {
                    return Err(Error::dataset(
                        &case.labels,
                        format!("label value {v} is not named in dataset.json `labels`"),
                    ));
                }
                let (image, _) = canonical(&image)?;
                let (labels, _) = canonical(&labels)?;
                let grid = target_geometry(labels.geometry(), spacing_mm)?;
                Subject::new(
                    resample_labels(&labels, &grid)?.into_parts().0,
                    Some(resample_image(&image, &grid)?.into_parts().0),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Source::new(self.name.clone(), &self.classes, subjects, |_, _| false)
    }
}

/// `labels` in either direction; background (0) dropped.
fn parse_labels(labels: Option<&Value>) -> std::result::Result<BTreeMap<u16, String>, String> {
    let Some(Value::Object(map)) = labels else {
        return Err("`labels` is missing or not an object".into());
    };
    let mut out = BTreeMap::new();
    for (key, value) in map {
        let (v, name) = match (key.parse::<u16>(), value) {
            // MSD: "1": "liver".
            (Ok(v), Value::String(name)) => (v, name.clone()),
            // nnU-Net v2: "liver": 1.
            (_, Value::Number(n)) => match n.as_u64().and_then(|n| u16::try_from(n).ok()) {
                Some(v) => (v, key.clone()),
                None => {
                    return Err(format!(
                        "`labels`: {key:?} has value {n}, not a label in 0-65535"
                    ));
                }
            },
            (_, Value::Array(_)) => {
                return Err(format!(
                    "`labels`: {key:?} is a region (a list of labels); region-based training is not supported"
                ));
            }
            _ => {
                return Err(format!(
                    "`labels`: entry {key:?}: {value} is neither `\"value\": \"name\"` nor `\"name\": value`"
                ));
            }
        };
        if v != 0 && out.insert(v, name).is_some() {
            return Err(format!("`labels`: value {v} is named twice"));
        }
    }
    if out.is_empty() {
        return Err("`labels` names no foreground class".into());
    }
    Ok(out)
}

/// `modality` / `channel_names`: `{"0": name, "1": name}` with keys 0..n.
fn parse_channels(
    channels: Option<&Value>,
    field: &str,
) -> std::result::Result<Vec<String>, String> {
    let Some(Value::Object(map)) = channels else {
        return Err(format!(
            "`{field}` (or `channel_names` / `modality`) is missing or not an object"
        ));
    };
    let mut names = vec![None; map.len()];
    for (key, value) in map {
        let slot = key.parse::<usize>().ok().and_then(|i| names.get_mut(i));
        match (slot, value) {
            (Some(slot), Value::String(name)) => *slot = Some(name.clone()),
            _ => {
                return Err(format!(
                    "`{field}`: entry {key:?}: {value} (keys must be 0..{} and values strings)",
                    map.len()
                ));
            }
        }
    }
    if names.is_empty() {
        return Err(format!("`{field}` names no channel"));
    }
    Ok(names.into_iter().flatten().collect())
}

/// MSD `training` list. Single-channel files are used as they are; with
/// several channels MSD stores 4-D images, which are not supported.
fn msd_cases(
    root: &Path,
    list: &Value,
    channels: usize,
) -> std::result::Result<Vec<MsdCase>, String> {
    let Value::Array(list) = list else {
        return Err("`training` is not a list".into());
    };
    if channels != 1 {
        return Err(format!(
            "MSD layout with {channels} channels stores 4-D images, which are not supported; convert to the nnU-Net v2 layout (one file per channel)"
        ));
    }
    let mut cases = list
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let field = |name: &str| match entry.get(name) {
                Some(Value::String(p)) => Ok(root.join(p.trim_start_matches("./"))),
                _ => Err(format!("`training[{i}].{name}` is missing or not a string")),
            };
            let labels = field("label")?;
            Ok(MsdCase {
                id: case_id(&labels, ".nii.gz"),
                channels: vec![field("image")?],
                labels,
            })
        })
        .collect::<std::result::Result<Vec<_>, String>>()?;
    cases.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(cases)
}

/// nnU-Net v2: every label file, with `imagesTr/{id}_{XXXX}{ending}` per channel.
fn nnunet_cases(root: &Path, json: &Map<String, Value>, channels: usize) -> Result<Vec<MsdCase>> {
    let ending = match json.get("file_ending") {
        Some(Value::String(e)) => e.clone(),
        _ => ".nii.gz".into(),
    };
    let labels_dir = root.join("labelsTr");
    let entries = std::fs::read_dir(&labels_dir)
        .map_err(|e| Error::dataset(&labels_dir, format!("cannot list label files: {e}")))?;
    let mut cases = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::dataset(&labels_dir, format!("cannot list: {e}")))?;
        let labels = entry.path();
        let file = entry.file_name().to_string_lossy().into_owned();
        if file.starts_with('.') || !file.ends_with(&ending) {
            continue;
        }
        let id = case_id(&labels, &ending);
        let channels = (0..channels)
            .map(|c| root.join("imagesTr").join(format!("{id}_{c:04}{ending}")))
            .collect();
        cases.push(MsdCase {
            id,
            channels,
            labels,
        });
    }
    cases.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(cases)
}

/// The file name without `ending` (or without its extension).
fn case_id(path: &Path, ending: &str) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.strip_suffix(ending) {
        Some(id) => id.to_string(),
        None => name.split('.').next().unwrap_or_default().to_string(),
    }
}
