//! The one place where the compute backend is chosen.

use burn::tensor::Device;

/// The device models run on, chosen from cargo features: CUDA (`cuda`)
/// first, then Vulkan (`vulkan`), else the pure-Rust CPU backend `flex`
/// (always built; its thread count follows `RAYON_NUM_THREADS`).
///
/// Gradients are off; training calls [`Device::autodiff`] on the result.
pub fn select_device() -> Device {
    #[cfg(feature = "cuda")]
    {
        Device::cuda(0)
    }
    #[cfg(all(feature = "vulkan", not(feature = "cuda")))]
    {
        Device::vulkan(Default::default())
    }
    #[cfg(not(any(feature = "cuda", feature = "vulkan")))]
    {
        Device::flex()
    }
}
