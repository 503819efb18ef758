//! Phantom volumes and a model folder of known maths, for tests that run
//! the engine, the C ABI or the `iris` command without a trained model: the
//! model is [`SyntheticModel`] (a 16^3 window at 6 mm whose graphs compute
//! simple functions), so these tests need neither burn nor a model file.

use std::path::{Path, PathBuf};

use iris_core::embedding::{ModelFingerprint, TaskEmbedding};
use iris_core::engine::testing::SyntheticModel;
use iris_core::engine::{EncodeOptions, Model, TaskClass};
use iris_core::irisemb::{self, Payload};
use iris_core::nifti;
use iris_core::volume::{Affine, Image, LabelMap};

use crate::files::{TempDir, data_file};

/// The spacing of [`model`]'s graphs, mm.
pub const MODEL_SPACING_MM: f64 = 6.0;

/// Writes a model folder of known maths into `dir`, its fingerprint 32
/// bytes of `fingerprint_byte` (different bytes: different models), and
/// returns that fingerprint.
///
/// # Panics
/// If the folder cannot be written.
pub fn model(dir: &Path, fingerprint_byte: u8) -> ModelFingerprint {
    named_model(dir, fingerprint_byte, "synthetic")
}

/// [`model`], with `name` in its manifest.
///
/// # Panics
/// If the folder cannot be written.
pub fn named_model(dir: &Path, fingerprint_byte: u8, name: &str) -> ModelFingerprint {
    let synthetic = SyntheticModel {
        name: name.into(),
        ..SyntheticModel::new(MODEL_SPACING_MM, fingerprint_byte)
    };
    synthetic.write(dir).expect("the synthetic model writes");
    *Model::load(dir)
        .expect("the synthetic model loads")
        .fingerprint()
}

/// Colin27 (`data/mricron/ch2.nii.gz`) and its AAL label map, or `None`
/// (with a message) when `data/` is absent; with `IRIS_REQUIRE_DATA=1`
/// their absence is an error.
///
/// # Panics
/// When the files are absent and `IRIS_REQUIRE_DATA=1`, or cannot be read.
pub fn colin() -> Option<(Image, LabelMap)> {
    let image = data_file("mricron/ch2.nii.gz")?;
    let labels = data_file("mricron/aal.nii.gz")?;
    let (image, _) = nifti::read_image(&image).expect("ch2 reads");
    let (labels, _) = nifti::read_labels(&labels).expect("aal reads");
    Some((image, labels))
}

/// A phantom on a `shape` grid placed by `affine`: a textured background
/// (fractional values), a ball of label 1 centred at voxel `ball` with
/// radius `radius` voxels, and a box of label 2 at `[lo, hi)` per axis.
///
/// # Panics
/// If `shape` and `affine` do not make a valid grid.
pub fn phantom(
    shape: [usize; 3],
    affine: Affine,
    ball: [f64; 3],
    radius: f64,
    boxed: ([usize; 3], [usize; 3]),
) -> (Image, LabelMap) {
    let mut voxels = Vec::new();
    let mut labels = Vec::new();
    for d in 0..shape[0] {
        for h in 0..shape[1] {
            for w in 0..shape[2] {
                let p = [d as f64, h as f64, w as f64];
                let r2: f64 = (0..3).map(|a| (p[a] - ball[a]).powi(2)).sum();
                let inside_box = (0..3).all(|a| (boxed.0[a]..boxed.1[a]).contains(&[d, h, w][a]));
                let texture = 20.0 * (0.7 * p[0]).sin() * (0.5 * p[1]).cos() + 0.25 * p[2];
                let (value, label) = if r2 <= radius * radius {
                    (700.0, 1)
                } else if inside_box {
                    (350.0, 2)
                } else {
                    (100.0, 0)
                };
                voxels.push((value + texture) as f32);
                labels.push(label);
            }
        }
    }
    (
        Image::from_vec(shape, affine, voxels).expect("valid image"),
        LabelMap::from_vec(shape, affine, labels).expect("valid labels"),
    )
}

/// A model and phantom volumes on disk (see [`fixture`]).
#[derive(Debug)]
pub struct Fixture {
    /// Holds everything; removed on drop.
    pub root: TempDir,
    /// The model folder.
    pub model: PathBuf,
    /// The volumes and embeddings [`fixture`] lists.
    pub data: PathBuf,
}

impl Fixture {
    /// `name` in the data folder.
    pub fn file(&self, name: &str) -> PathBuf {
        self.data.join(name)
    }
}

/// The reference (40^3 voxels of 3 mm) and its labels.
pub fn reference() -> (Image, LabelMap) {
    let mut affine = Affine::from_spacing([3.0, 3.0, 3.0]);
    affine.0[0][3] = -60.0;
    affine.0[1][3] = -60.0;
    affine.0[2][3] = -60.0;
    phantom(
        [40, 40, 40],
        affine,
        [20.0, 18.0, 21.0],
        7.0,
        ([5, 26, 8], [14, 34, 30]),
    )
}

/// A query on another grid (anisotropic, axis d flipped) with the ball and
/// box elsewhere, and its true labels.
pub fn query(shift: f64) -> (Image, LabelMap) {
    let affine = Affine([
        [-3.5, 0.0, 0.0, 60.0],
        [0.0, 2.5, 0.0, -50.0],
        [0.0, 0.0, 3.0, -55.0 + shift],
        [0.0, 0.0, 0.0, 1.0],
    ]);
    phantom(
        [36, 44, 40],
        affine,
        [17.0, 20.0 + shift, 19.0],
        6.0,
        ([4, 30, 6], [12, 40, 26]),
    )
}

/// Writes the model of known maths ([`model`], fingerprint byte 7) into
/// `<root>/model` and writes into
/// `<root>/data` ref.nii.gz, ref_labels.nii.gz, query.nii.gz,
/// query_truth.nii.gz, query2.nii.gz and foreign.irisemb (the reference's
/// task with another model's fingerprint).
///
/// # Panics
/// If a file cannot be written.
pub fn fixture(name: &str) -> Fixture {
    let root = TempDir::new(name);
    let model = root.join("model");
    let data = root.join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    self::model(&model, 7);

    let (image, labels) = reference();
    nifti::write_image(data.join("ref.nii.gz"), &image, None).expect("write");
    nifti::write_labels(data.join("ref_labels.nii.gz"), &labels, None).expect("write");
    let (q, truth) = query(0.0);
    nifti::write_image(data.join("query.nii.gz"), &q, None).expect("write");
    nifti::write_labels(data.join("query_truth.nii.gz"), &truth, None).expect("write");
    let (q2, _) = query(4.0);
    nifti::write_image(data.join("query2.nii.gz"), &q2, None).expect("write");

    let own = encode(&Model::load(&model).expect("model loads"), &image, &labels);
    irisemb::write_file(data.join("foreign.irisemb"), &foreign(&own), Payload::F32).expect("write");
    Fixture { root, model, data }
}

/// Labels 1 and 2 of the reference, as segment.c encodes them (no names,
/// default options).
///
/// # Panics
/// If encoding fails.
pub fn encode(model: &Model, image: &Image, labels: &LabelMap) -> TaskEmbedding {
    let classes = [TaskClass::new(1, ""), TaskClass::new(2, "")];
    model
        .encode_task(image, labels, &classes, &EncodeOptions::default())
        .expect("encodes")
}

/// `task` as if another model had made it.
///
/// # Panics
/// Never for a valid `task`.
pub fn foreign(task: &TaskEmbedding) -> TaskEmbedding {
    TaskEmbedding::new(
        ModelFingerprint::new([0xee; 32]),
        *task.preprocessing(),
        task.stage_shapes().to_vec(),
        task.classes().to_vec(),
    )
    .expect("valid")
}
