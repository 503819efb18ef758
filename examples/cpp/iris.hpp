// SPDX-License-Identifier: MIT OR Apache-2.0
//
// iris.hpp: a small C++17 wrapper over libiris's C API (include/iris.h).
//
// - Handles are std::unique_ptr with libiris's free functions as deleters,
//   so every object is released exactly once, also when an exception flies.
// - A failed call throws iris::Error, which carries the IrisStatus and
//   libiris's message for the calling thread.
// - Model is safe to share between threads: its const methods may run
//   concurrently (libiris documents IrisModel as thread-safe).
//
// Header-only; copy it next to iris.h. Link with -liris.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "iris.h"

namespace iris {

/// A libiris failure: the status code and the message libiris gave.
class Error : public std::runtime_error {
public:
    Error(IrisStatus status, const std::string &message)
        : std::runtime_error(message), status_(status) {}
    IrisStatus status() const noexcept { return status_; }

private:
    IrisStatus status_;
};

/// Throws Error unless `status` is IRIS_OK; `call` names the function.
inline void check(IrisStatus status, const char *call) {
    if (status != IRIS_OK) {
        throw Error(status, std::string(call) + ": " + iris_status_name(status) + ": " +
                                iris_last_error());
    }
}

/// Checks at start-up that the loaded libiris serves this header's ABI.
inline void check_abi() { check(iris_check_abi(IRIS_ABI_VERSION), "iris_check_abi"); }

namespace detail {
template <typename T, void (*Free)(T **)> struct Free_with {
    void operator()(T *p) const noexcept { Free(&p); }
};
} // namespace detail

/// An owning pointer to a libiris object.
template <typename T, void (*Free)(T **)>
using Handle = std::unique_ptr<T, detail::Free_with<T, Free>>;

/// Number of voxels a view describes.
inline std::uint64_t voxel_count(const IrisVolumeView &v) {
    return v.dims[0] * v.dims[1] * v.dims[2];
}

/// A view of caller memory; `data` must outlive its use.
template <typename T>
IrisVolumeView make_view(const T *data, IrisDataType dtype, const std::uint64_t dims[3],
                         const double spacing_mm[3], const double *affine = nullptr) {
    IrisVolumeView v{};
    v.struct_size = sizeof v;
    v.dtype = static_cast<std::uint32_t>(dtype);
    for (int i = 0; i < 3; ++i) {
        v.dims[i] = dims[i];
        v.spacing_mm[i] = spacing_mm[i];
    }
    v.affine = affine;
    v.data = data;
    v.data_bytes = voxel_count(v) * sizeof(T);
    return v;
}

/// A volume read and owned by libiris (image: float voxels; label map:
/// uint16_t voxels).
class Volume {
public:
    static Volume read_nifti(const std::string &path, bool labels) {
        IrisVolume *out = nullptr;
        check(iris_volume_read_nifti(path.c_str(), labels ? 1u : 0u, &out),
              "iris_volume_read_nifti");
        return Volume(out);
    }

    /// Its view; the pointers in it live as long as this Volume.
    IrisVolumeView view() const {
        IrisVolumeView v{};
        v.struct_size = sizeof v;
        check(iris_volume_view(handle_.get(), &v), "iris_volume_view");
        return v;
    }

    const IrisVolume *get() const noexcept { return handle_.get(); }

private:
    explicit Volume(IrisVolume *p) : handle_(p) {}
    Handle<IrisVolume, iris_volume_free> handle_;
};

/// A task embedding (one or more classes).
class Task {
public:
    struct Class {
        std::uint32_t label;
        std::string name;
    };

    static Task load(const std::string &path) {
        IrisTask *out = nullptr;
        check(iris_task_load(path.c_str(), &out), "iris_task_load");
        return Task(out);
    }

    static Task load(const std::vector<std::uint8_t> &bytes) {
        IrisTask *out = nullptr;
        check(iris_task_load_buffer(bytes.data(), bytes.size(), &out), "iris_task_load_buffer");
        return Task(out);
    }

    /// Context ensemble of tasks encoded from different references.
    static Task ensemble(const std::vector<const Task *> &parts) {
        std::vector<const IrisTask *> raw;
        for (const Task *t : parts) {
            raw.push_back(t->get());
        }
        IrisTask *out = nullptr;
        check(iris_task_ensemble(raw.data(), raw.size(), &out), "iris_task_ensemble");
        return Task(out);
    }

    void save(const std::string &path) const {
        check(iris_task_save(get(), path.c_str()), "iris_task_save");
    }

    std::vector<std::uint8_t> save() const {
        std::size_t needed = 0;
        IrisStatus status = iris_task_save_buffer(get(), nullptr, 0, &needed);
        if (status != IRIS_ERROR_BUFFER_TOO_SMALL) {
            check(status, "iris_task_save_buffer");
        }
        std::vector<std::uint8_t> bytes(needed);
        check(iris_task_save_buffer(get(), bytes.data(), bytes.size(), &needed),
              "iris_task_save_buffer");
        bytes.resize(needed);
        return bytes;
    }

    std::size_t size() const {
        std::size_t n = 0;
        check(iris_task_num_classes(get(), &n), "iris_task_num_classes");
        return n;
    }

    Class at(std::size_t index) const {
        Class c{0, std::string()};
        std::size_t needed = 0;
        IrisStatus status = iris_task_class(get(), index, &c.label, nullptr, 0, &needed);
        if (status != IRIS_ERROR_BUFFER_TOO_SMALL) {
            check(status, "iris_task_class");
        }
        std::vector<char> name(needed);
        check(iris_task_class(get(), index, &c.label, name.data(), name.size(), nullptr),
              "iris_task_class");
        c.name = name.data();
        return c;
    }

    Task select(const std::vector<std::uint32_t> &labels) const {
        IrisTask *out = nullptr;
        check(iris_task_select_labels(get(), labels.data(), labels.size(), &out),
              "iris_task_select_labels");
        return Task(out);
    }

    const IrisTask *get() const noexcept { return handle_.get(); }

private:
    friend class Model;
    explicit Task(IrisTask *p) : handle_(p) {}
    Handle<IrisTask, iris_task_free> handle_;
};

/// A loaded model. Its const methods may be called from several threads.
class Model {
public:
    static Model load(const std::string &dir) {
        IrisModel *out = nullptr;
        check(iris_model_load(dir.c_str(), &out), "iris_model_load");
        return Model(out);
    }

    /// Loads with the model's own pool of `threads` threads (0: one per
    /// core), on which all of its work runs.
    static Model load(const std::string &dir, std::uint32_t threads) {
        IrisModelOptions options;
        check(iris_model_options_default(&options), "iris_model_options_default");
        options.threads = threads;
        IrisModel *out = nullptr;
        check(iris_model_load_with(dir.c_str(), &options, &out), "iris_model_load_with");
        return Model(out);
    }

    /// Threads of the model's pool.
    std::uint32_t threads() const {
        std::uint32_t out = 0;
        check(iris_model_threads(handle_.get(), &out), "iris_model_threads");
        return out;
    }

    /// Encodes `labels` (non-zero values of `label_map`) from a reference.
    Task encode(const IrisVolumeView &image, const IrisVolumeView &label_map,
                const std::vector<std::uint16_t> &labels,
                const std::vector<std::string> &names = {},
                const IrisEncodeOptions *options = nullptr) const {
        std::vector<const char *> raw;
        for (const std::string &n : names) {
            raw.push_back(n.c_str());
        }
        if (!raw.empty() && raw.size() != labels.size()) {
            throw Error(IRIS_ERROR_INVALID_ARGUMENT, "encode: one name per label, or none");
        }
        IrisTask *out = nullptr;
        check(iris_task_encode(handle_.get(), &image, &label_map, labels.data(),
                               raw.empty() ? nullptr : raw.data(), labels.size(), options, &out),
              "iris_task_encode");
        return Task(out);
    }

    /// Segments `query`: one uint16_t label per voxel, C order [D, H, W].
    /// With `probabilities`, also the per-class probabilities [K, D, H, W].
    std::vector<std::uint16_t> segment(const IrisVolumeView &query, const Task &task,
                                       const IrisSegmentOptions *options = nullptr,
                                       std::vector<float> *probabilities = nullptr) const {
        std::vector<std::uint16_t> labels(voxel_count(query));
        float *p = nullptr;
        std::uint64_t p_count = 0;
        if (probabilities != nullptr) {
            probabilities->assign(voxel_count(query) * task.size(), 0.0f);
            p = probabilities->data();
            p_count = probabilities->size();
        }
        check(iris_segment(handle_.get(), &query, task.get(), options, IRIS_DATA_TYPE_U16,
                           labels.data(), labels.size() * sizeof(std::uint16_t), p, p_count),
              "iris_segment");
        return labels;
    }

    Task memory_bank() const {
        IrisTask *out = nullptr;
        check(iris_model_memory_bank(handle_.get(), &out), "iris_model_memory_bank");
        return Task(out);
    }

    const IrisModel *get() const noexcept { return handle_.get(); }

private:
    explicit Model(IrisModel *p) : handle_(p) {}
    Handle<IrisModel, iris_model_free> handle_;
};

/// Dice of `label` between two label maps on the same grid.
inline double dice(const IrisVolumeView &a, const IrisVolumeView &b, std::uint32_t label) {
    double d = 0.0;
    check(iris_dice(&a, &b, label, &d), "iris_dice");
    return d;
}

} // namespace iris
