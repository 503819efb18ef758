// SPDX-License-Identifier: MIT OR Apache-2.0
//
// viewer: what an image viewer does with libiris. One model is loaded once,
// with a pool of threads that leaves one core to the interface; a task is
// encoded from a reference; then several volumes are segmented at the same
// time, one std::thread each, all sharing that model, printing per volume
// the time and label counts. The program then segments every volume
// again, one after another, and checks that each concurrent result equals
// the sequential one (libiris models are thread-safe and deterministic).
//
//   viewer MODEL_DIR REF_IMAGE REF_LABELS LABEL QUERY_IMAGE [QUERY_IMAGE...]
//
// Exits 0 when every volume was segmented and the results agree.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "iris.hpp"

namespace {

// Windows decoded so far, over all threads (IrisProgressFn may be called
// from any thread).
std::atomic<std::uint64_t> windows_done{0};

extern "C" void count_window(std::uint64_t, std::uint64_t, void *user) {
    static_cast<std::atomic<std::uint64_t> *>(user)->fetch_add(1);
}

struct Job {
    std::string path;
    iris::Volume volume;
    std::vector<std::uint16_t> labels;
    double seconds = 0.0;
    std::exception_ptr error;
};

std::map<std::uint16_t, std::size_t> histogram(const std::vector<std::uint16_t> &labels) {
    std::map<std::uint16_t, std::size_t> counts;
    for (std::uint16_t l : labels) {
        ++counts[l];
    }
    return counts;
}

} // namespace

int main(int argc, char **argv) {
    if (argc < 6) {
        std::fprintf(stderr,
                     "usage: viewer MODEL_DIR REF_IMAGE REF_LABELS LABEL QUERY_IMAGE...\n");
        return 2;
    }
    try {
        iris::check_abi();
        // A viewer leaves a core to its interface: the model's pool (every
        // segmentation of every thread below runs on it) takes the others.
        const unsigned cores = std::thread::hardware_concurrency();
        const iris::Model model = iris::Model::load(argv[1], cores > 1 ? cores - 1 : 1);
        std::printf("model: %u thread(s) for %u core(s)\n", model.threads(), cores);
        const iris::Volume reference = iris::Volume::read_nifti(argv[2], false);
        const iris::Volume reference_labels = iris::Volume::read_nifti(argv[3], true);
        const auto label = static_cast<std::uint16_t>(std::strtoul(argv[4], nullptr, 10));
        const iris::Task task =
            model.encode(reference.view(), reference_labels.view(), {label}, {"target"});
        std::printf("task: %zu class(es), label %u \"%s\"\n", task.size(),
                    static_cast<unsigned>(task.at(0).label), task.at(0).name.c_str());

        IrisSegmentOptions options;
        iris::check(iris_segment_options_default(&options), "iris_segment_options_default");
        options.progress = count_window;
        options.progress_user = &windows_done;

        std::vector<Job> jobs;
        for (int i = 5; i < argc; ++i) {
            jobs.push_back(Job{argv[i], iris::Volume::read_nifti(argv[i], false), {}, 0.0, {}});
        }

        // One thread per volume, one shared model.
        std::vector<std::thread> threads;
        for (Job &job : jobs) {
            threads.emplace_back([&model, &task, &options, &job] {
                try {
                    const auto start = std::chrono::steady_clock::now();
                    job.labels = model.segment(job.volume.view(), task, &options);
                    job.seconds = std::chrono::duration<double>(
                                      std::chrono::steady_clock::now() - start)
                                      .count();
                } catch (...) {
                    job.error = std::current_exception();
                }
            });
        }
        for (std::thread &t : threads) {
            t.join();
        }
        for (Job &job : jobs) {
            if (job.error) {
                std::rethrow_exception(job.error);
            }
            std::printf("%s: %.2f s;", job.path.c_str(), job.seconds);
            for (const auto &[value, count] : histogram(job.labels)) {
                std::printf(" label %u: %zu voxels;", static_cast<unsigned>(value), count);
            }
            std::printf("\n");
        }
        std::printf("%llu windows decoded on %zu threads\n",
                    static_cast<unsigned long long>(windows_done.load()), jobs.size());

        // The same volumes one after another, to compare.
        for (const Job &job : jobs) {
            if (model.segment(job.volume.view(), task) != job.labels) {
                std::fprintf(stderr, "viewer: %s differs between threaded and sequential runs\n",
                             job.path.c_str());
                return 1;
            }
        }
        std::printf("threaded results equal the sequential run\n");
    } catch (const iris::Error &e) {
        std::fprintf(stderr, "viewer: %s\n", e.what());
        return 1;
    }
    return 0;
}
