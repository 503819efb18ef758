//! Sliding-window inference around the network: where the windows go
//! ([`WindowPlan`]), how much each voxel of a window counts
//! ([`GaussianWeights`]), and how window outputs become one label map in
//! little memory ([`Blender`]), in the spirit of MONAI's Splitter / Merger
//! and nnU-Net's `sliding_window_prediction.py`.
//!
//! ```
//! use iris_core::window::{BlendOptions, Blender, WindowPlan};
//! use ndarray::Array3;
//!
//! let image = Array3::<f32>::zeros((40, 30, 50));
//! let plan = WindowPlan::new([40, 30, 50], [32, 32, 32], 0.5)?;
//! let mut blender = Blender::new(&plan, &[1], BlendOptions::default())?;
//! for window in plan.windows() {
//!     let input = plan.extract(image.view(), window.index, 0.0)?; // [32, 32, 32]
//!     // probs = sigmoid(network(input)): here a constant 0.9 for one class.
//!     let probs = input.mapv(|_| 0.9f32);
//!     blender.add(window.index, probs.as_slice().unwrap())?;
//! }
//! let labels = blender.finish()?; // [40, 30, 50], all 1
//! assert!(labels.iter().all(|&l| l == 1));
//! # Ok::<(), iris_core::Error>(())
//! ```

mod blend;
mod plan;
mod weights;

pub use blend::{BlendOptions, Blender, Precision, ProbabilitySink};
pub use plan::{MAX_WINDOWS, Window, WindowPlan};
pub use weights::{GaussianWeights, SIGMA_SCALE};
