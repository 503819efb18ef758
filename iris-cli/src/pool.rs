//! `iris retrieve --pool DIR`: the references of a retrieval pool, from a
//! folder of images and label maps in the nnU-Net / Medical Segmentation
//! Decathlon layout, or from a folder of `.irisemb` files.
//!
//! - Images: `DIR/labelsTr/CASE.nii.gz` (or `.nii`) with its image
//!   `DIR/imagesTr/CASE_0000.nii.gz` (the first channel) or
//!   `DIR/imagesTr/CASE.nii.gz`; an optional `DIR/dataset.json` names the
//!   labels (`"labels"` as `{"1": "liver"}` or `{"liver": 1}`). Each case is
//!   encoded with its classes and its image descriptor, so both retrieval
//!   levels work.
//! - Embeddings: `DIR/NAME.irisemb`, as `iris encode` writes them; they
//!   keep no image, so object level only.
//!
//! A folder with `labelsTr/` is read as images (any `.irisemb` beside it is
//! not a reference). Names starting with `.` are ignored. References are
//! named by case or file stem and kept in sorted order.

use std::fs;
use std::path::{Path, PathBuf};

use iris_core::Model;
use iris_core::engine::{EncodeOptions, PoolReference, TaskClass};
use iris_core::labels::label_value;
use serde_json::Value;

use crate::claims::Claims;
use crate::failure::{BAD_INPUT, Failure, USAGE};
use crate::input::{read_pair, read_task_for_model};
use crate::output::progress_bar;
use crate::printable::printable;

const NIFTI: &[&str] = &[".nii.gz", ".nii"];
const EMBEDDING: &[&str] = &[".irisemb"];

/// The progress bar template over the cases of a pool.
const CASES: &str =
    "encoding the pool {bar:30} {pos}/{len} cases [{elapsed_precise} < {eta}] {msg}";

/// One labelled case of an image pool.
pub struct Case {
    name: String,
    image: PathBuf,
    labels: PathBuf,
}

/// What a pool folder holds, found but not read yet.
pub enum Layout {
    /// Images and label maps, and the label names of `dataset.json`.
    Images {
        /// The cases, sorted by name.
        cases: Vec<Case>,
        /// `(label, name)` from `dataset.json`; empty without one.
        names: Vec<(u32, String)>,
    },
    /// `.irisemb` files: `(stem, path)`, sorted by stem.
    Embeddings(Vec<(String, PathBuf)>),
}

/// A pool read and encoded.
pub struct Pool {
    /// The references, in sorted order of their names.
    pub references: Vec<PoolReference>,
    /// Label values to retrieve: those of `--classes`, or every label of
    /// the pool, ascending.
    pub classes: Vec<u32>,
    /// Cases left out because they have none of the classes.
    pub skipped: Vec<String>,
}

impl Layout {
    /// Looks at `dir` (see the [module docs](self)).
    ///
    /// # Errors
    /// [`BAD_INPUT`] naming the folder or file: no such folder, no
    /// reference in it, a case without its image, two files of one name, an
    /// unreadable `dataset.json`.
    pub fn scan(dir: &Path) -> Result<Layout, Failure> {
        if !dir.is_dir() {
            return Err(Failure::new(
                BAD_INPUT,
                format!("--pool {}: no such folder", dir.display()),
            ));
        }
        let labels_dir = dir.join("labelsTr");
        if !labels_dir.is_dir() {
            let files = list(dir, EMBEDDING)?;
            if files.is_empty() {
                return Err(Failure::new(
                    BAD_INPUT,
                    format!(
                        "--pool {}: the pool is empty: the folder holds neither labelsTr/ \
                         (images and label maps in the nnU-Net layout) nor .irisemb files",
                        dir.display()
                    ),
                ));
            }
            return Ok(Layout::Embeddings(files));
        }
        let label_files = list(&labels_dir, NIFTI)?;
        if label_files.is_empty() {
            return Err(Failure::new(
                BAD_INPUT,
                format!(
                    "--pool {}: the pool is empty: {} holds no label map (.nii.gz or .nii)",
                    dir.display(),
                    labels_dir.display()
                ),
            ));
        }
        let images = &dir.join("imagesTr");
        let cases = label_files
            .into_iter()
            .map(|(name, labels)| {
                let candidates: Vec<PathBuf> = [format!("{name}_0000"), name.clone()]
                    .iter()
                    .flat_map(|stem| {
                        NIFTI
                            .iter()
                            .map(move |ext| images.join(format!("{stem}{ext}")))
                    })
                    .collect();
                let image = candidates.iter().find(|p| p.is_file()).ok_or_else(|| {
                    Failure::new(
                        BAD_INPUT,
                        format!(
                            "{}: case {name:?} has no image: looked for {} and {}",
                            labels.display(),
                            candidates[0].display(),
                            candidates[2].display()
                        ),
                    )
                })?;
                Ok(Case {
                    image: image.clone(),
                    name,
                    labels,
                })
            })
            .collect::<Result<Vec<_>, Failure>>()?;
        let dataset = dir.join("dataset.json");
        let names = if dataset.is_file() {
            label_names(&dataset)?
        } else {
            Vec::new()
        };
        Ok(Layout::Images { cases, names })
    }

    /// Whether the references will have image descriptors (image-level
    /// retrieval needs them).
    pub fn has_descriptors(&self) -> bool {
        matches!(self, Layout::Images { .. })
    }

    /// `"images"` or `"embeddings"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Layout::Images { .. } => "images",
            Layout::Embeddings(_) => "embeddings",
        }
    }

    /// Claims the files of the pool in `dir` as inputs, so that no output
    /// replaces one: the images, label maps and `dataset.json`, or the
    /// `.irisemb` files.
    pub fn claim(&self, dir: &Path, claims: &mut Claims) {
        match self {
            Layout::Images { cases, .. } => {
                for case in cases {
                    claims.input("a --pool file", &case.image);
                    claims.input("a --pool file", &case.labels);
                }
                claims.input("a --pool file", &dir.join("dataset.json"));
            }
            Layout::Embeddings(files) => {
                for (_, path) in files {
                    claims.input("a --pool file", path);
                }
            }
        }
    }

    /// The reference names, sorted.
    pub fn names(&self) -> Vec<&str> {
        match self {
            Layout::Images { cases, .. } => cases.iter().map(|c| c.name.as_str()).collect(),
            Layout::Embeddings(files) => files.iter().map(|(name, _)| name.as_str()).collect(),
        }
    }

    /// Reads the pool in `dir` for `model`: each case encoded with the
    /// classes of `keys` it has (label values or names; every label it
    /// has when `keys` is empty) and `modality`, with a progress bar and
    /// a note on stderr per case skipped (none when `quiet`); or each
    /// `.irisemb` file read and checked against the model.
    ///
    /// # Errors
    /// [`USAGE`] for a class that is neither a number nor a known name, or
    /// one given twice; as [`read_pair`] and [`Failure::input`] for a case
    /// or file that cannot be read or encoded (naming it); [`BAD_INPUT`]
    /// when no case has any of the classes.
    pub fn load(
        &self,
        dir: &Path,
        model: &Model,
        keys: &[String],
        options: &EncodeOptions,
        quiet: bool,
    ) -> Result<Pool, Failure> {
        let (cases, names) = match self {
            Layout::Embeddings(files) => return load_embeddings(dir, files, model, keys),
            Layout::Images { cases, names } => (cases, names),
        };
        let source = if names.is_empty() {
            format!("{} (no dataset.json names its labels)", dir.display())
        } else {
            dir.join("dataset.json").display().to_string()
        };
        let wanted = resolve(keys, names, &source)?;
        let bar = progress_bar(quiet, CASES);
        bar.set_length(cases.len() as u64);
        let mut pool = Pool {
            references: Vec::new(),
            classes: wanted.clone(),
            skipped: Vec::new(),
        };
        for case in cases {
            bar.set_message(case.name.clone());
            let (image, labels) = read_pair(&case.image, &case.labels, &options.limits)?;
            let present = labels.labels_present();
            let chosen: Vec<u16> = if keys.is_empty() {
                present
            } else {
                wanted
                    .iter()
                    .filter_map(|&l| label_value(l).ok())
                    .filter(|l| present.binary_search(l).is_ok())
                    .collect()
            };
            if chosen.is_empty() {
                if !quiet {
                    bar.suspend(|| {
                        eprintln!(
                            "iris: skipping case {:?}: {} has {}",
                            case.name,
                            case.labels.display(),
                            if keys.is_empty() {
                                "no non-zero label".to_string()
                            } else {
                                format!("none of the classes {}", list_labels(&wanted))
                            }
                        );
                    });
                }
                pool.skipped.push(case.name.clone());
                bar.inc(1);
                continue;
            }
            let classes: Vec<TaskClass> = chosen
                .iter()
                .map(|&label| TaskClass::new(label, name_of(names, label.into())))
                .collect();
            let reference = model
                .encode_pool_reference(case.name.clone(), &image, &labels, &classes, options)
                .map_err(|e| Failure::input(&case.labels, e))?;
            pool.references.push(reference);
            bar.inc(1);
        }
        bar.finish_and_clear();
        if pool.references.is_empty() {
            let what = if keys.is_empty() {
                "no case has a non-zero label".to_string()
            } else {
                format!("no case has any of the classes {}", list_labels(&wanted))
            };
            return Err(Failure::new(
                BAD_INPUT,
                format!("--pool {}: the pool is empty: {what}", dir.display()),
            ));
        }
        if keys.is_empty() {
            pool.classes = every_label(&pool.references);
        }
        Ok(pool)
    }
}

/// An embedding pool: each file read and checked against `model`.
fn load_embeddings(
    dir: &Path,
    files: &[(String, PathBuf)],
    model: &Model,
    keys: &[String],
) -> Result<Pool, Failure> {
    let references = files
        .iter()
        .map(|(name, path)| {
            Ok(PoolReference {
                name: name.clone(),
                task: read_task_for_model(path, model)?,
                descriptor: None,
            })
        })
        .collect::<Result<Vec<_>, Failure>>()?;
    let mut names: Vec<(u32, String)> = Vec::new();
    for class in references.iter().flat_map(|r| r.task.classes()) {
        if !class.name().is_empty() && !names.iter().any(|(_, n)| n == class.name()) {
            names.push((class.label(), class.name().to_string()));
        }
    }
    let source = format!("the .irisemb files of {}", dir.display());
    let classes = match resolve(keys, &names, &source)? {
        none if none.is_empty() => every_label(&references),
        some => some,
    };
    Ok(Pool {
        references,
        classes,
        skipped: Vec::new(),
    })
}

/// Every label of the pool, ascending.
fn every_label(references: &[PoolReference]) -> Vec<u32> {
    let mut all: Vec<u32> = references
        .iter()
        .flat_map(|r| r.task.classes().iter().map(|c| c.label()))
        .collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// The label values of `keys`: numbers as they are, names through `names`
/// (found in `source`).
fn resolve(keys: &[String], names: &[(u32, String)], source: &str) -> Result<Vec<u32>, Failure> {
    let mut labels: Vec<u32> = Vec::with_capacity(keys.len());
    for key in keys {
        let found = key.parse::<u32>().ok().or_else(|| {
            names
                .iter()
                .find(|(_, name)| name == key)
                .map(|&(label, _)| label)
        });
        let Some(label) = found else {
            let known: Vec<_> = names.iter().take(40).map(|(_, n)| printable(n)).collect();
            let known = if known.is_empty() {
                String::new()
            } else {
                format!(" (names: {})", known.join(", "))
            };
            return Err(Failure::new(
                USAGE,
                format!(
                    "--classes {key:?}: neither a label value nor a class name of {source}{known}"
                ),
            ));
        };
        if labels.contains(&label) {
            return Err(Failure::new(
                USAGE,
                format!("--classes lists label {label} twice"),
            ));
        }
        labels.push(label);
    }
    Ok(labels)
}

/// The name of `label` in `names`, or none.
fn name_of(names: &[(u32, String)], label: u32) -> String {
    names
        .iter()
        .find(|&&(l, _)| l == label)
        .map_or_else(String::new, |(_, name)| name.clone())
}

fn list_labels(labels: &[u32]) -> String {
    labels
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The files of `dir` whose names end with one of `extensions` (any case;
/// the first that matches is cut off), as `(stem, path)` sorted by stem;
/// hidden files (`.name`) left out.
fn list(dir: &Path, extensions: &[&str]) -> Result<Vec<(String, PathBuf)>, Failure> {
    let unreadable =
        |e: std::io::Error| Failure::new(BAD_INPUT, format!("--pool {}: {e}", dir.display()));
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(unreadable)? {
        let path = entry.map_err(unreadable)?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let lower = name.to_lowercase();
        let Some(ext) = extensions.iter().find(|e| lower.ends_with(*e)) else {
            continue;
        };
        if name.starts_with('.') || !path.is_file() {
            continue;
        }
        files.push((name[..name.len() - ext.len()].to_string(), path));
    }
    files.sort();
    if let Some(pair) = files.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(Failure::new(
            BAD_INPUT,
            format!(
                "--pool: {} and {} name the same reference {:?}",
                pair[0].1.display(),
                pair[1].1.display(),
                pair[0].0
            ),
        ));
    }
    Ok(files)
}

/// Largest `dataset.json` read (nnU-Net's and MSD's list every case, a few
/// MB for the largest datasets): an endless file is refused unread.
const MAX_DATASET_JSON_BYTES: u64 = 64 << 20;

/// `(label, name)` of the `"labels"` of a `dataset.json`, either layout:
/// MSD's `{"0": "background", "1": "liver"}` or nnU-Net v2's
/// `{"background": 0, "liver": 1}` (region lists are left out); label 0
/// left out.
fn label_names(path: &Path) -> Result<Vec<(u32, String)>, Failure> {
    use std::io::Read;
    let bad = |e: String| Failure::new(BAD_INPUT, format!("{}: {e}", path.display()));
    let too_large = || {
        bad(format!(
            "more than {MAX_DATASET_JSON_BYTES} bytes: not a dataset description"
        ))
    };
    let file = fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    if file
        .metadata()
        .is_ok_and(|m| m.len() > MAX_DATASET_JSON_BYTES)
    {
        return Err(too_large());
    }
    // The length is checked again on what is read, for files whose size is
    // not known in advance.
    let mut text = String::new();
    file.take(MAX_DATASET_JSON_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| bad(e.to_string()))?;
    if text.len() as u64 > MAX_DATASET_JSON_BYTES {
        return Err(too_large());
    }
    let value: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let Some(labels) = value.get("labels").and_then(Value::as_object) else {
        return Ok(Vec::new());
    };
    let mut names: Vec<(u32, String)> = labels
        .iter()
        .filter_map(|(key, value)| match (key.parse::<u32>(), value) {
            (Ok(label), Value::String(name)) => Some((label, name.clone())),
            (Err(_), Value::Number(n)) => n
                .as_u64()
                .and_then(|l| u32::try_from(l).ok())
                .map(|label| (label, key.clone())),
            _ => None,
        })
        .filter(|&(label, _)| label != 0)
        .collect();
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_json_names_labels_in_either_layout() {
        let dir = std::env::temp_dir().join(format!("iris-cli-dataset-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dataset.json");
        fs::write(
            &path,
            r#"{"labels": {"0": "background", "2": "spleen", "1": "liver"}}"#,
        )
        .unwrap();
        let msd = label_names(&path).unwrap();
        fs::write(
            &path,
            r#"{"labels": {"background": 0, "liver": 1, "spleen": 2, "whole": [1, 2]}}"#,
        )
        .unwrap();
        let v2 = label_names(&path).unwrap();
        let want = [(1, "liver".to_string()), (2, "spleen".to_string())];
        assert_eq!((msd.as_slice(), v2.as_slice()), (&want[..], &want[..]));
        fs::write(&path, "{ not json").unwrap();
        let e = label_names(&path).unwrap_err();
        assert_eq!(e.code, BAD_INPUT);
        assert!(
            e.message.contains("dataset.json: not JSON"),
            "{}",
            e.message
        );
        // A file larger than any dataset description (sparse: no disk used)
        // is refused without being read.
        fs::File::create(&path)
            .and_then(|f| f.set_len(MAX_DATASET_JSON_BYTES + 1))
            .unwrap();
        let e = label_names(&path).unwrap_err();
        assert_eq!(e.code, BAD_INPUT);
        assert!(
            e.message.contains("dataset.json: more than 67108864 bytes"),
            "{}",
            e.message
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn classes_resolve_by_value_or_name_once_each() {
        let names = [(1, "liver".to_string()), (5, "spleen".to_string())];
        assert_eq!(
            resolve(&["spleen".into(), "3".into()], &names, "d").unwrap(),
            [5, 3]
        );
        let e = resolve(&["kidney".into()], &names, "d/dataset.json").unwrap_err();
        assert_eq!(e.code, USAGE);
        assert!(
            e.message.contains("\"kidney\"") && e.message.contains("liver, spleen"),
            "{}",
            e.message
        );
        let e = resolve(&["1".into(), "liver".into()], &names, "d").unwrap_err();
        assert!(e.message.contains("label 1 twice"), "{}", e.message);
    }
}
