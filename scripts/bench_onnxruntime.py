#!/usr/bin/env python3
"""Times the three graphs of an Iris model folder in onnxruntime (CPU).

The same measurements as part 1 of `iris-core/benches/engine.rs` (tract), on
the same pinned input shapes (batch 1, the model's patch, K classes), so the
two can be compared on one machine:

    python3 scripts/bench_onnxruntime.py MODEL_DIR [--threads 2] [--runs 5] [--classes 1,15]
        [--graphs encoder,task_encoder,decoder]

Prints one row per graph and class count: the first run (onnxruntime plans
when the session is created, so this is only the first execution) and the
median of `--runs` runs. The task encoder is timed two ways: one run with all
K masks (the graph folds classes into its batch), and K one-class runs, which
is how the engine runs it in tract. `--graphs` times only some of the three
(the encoder still runs once, untimed, for the features the others read), as
a name filter after `--` does for the criterion bench. Ends with the
process's peak resident memory (`ru_maxrss`). Needs numpy and onnxruntime
(scripts/test.sh installs them); not run by CI.
"""

import argparse
import json
import pathlib
import resource
import sys
import time

import numpy as np
import onnxruntime as ort

from bench_common import balls, timed


GRAPHS = ("encoder", "task_encoder", "decoder")


def session(path, threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    start = time.perf_counter()
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sess, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=pathlib.Path, help="model folder (manifest.json + 3 graphs)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per row (default 5)")
    parser.add_argument("--classes", default="1,15", help="class counts K (default 1,15)")
    parser.add_argument(
        "--graphs",
        default=",".join(GRAPHS),
        help="graphs to time, comma-separated (default all three)",
    )
    args = parser.parse_args()

    manifest_path = args.model / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        patch = [int(n) for n in manifest["patch_size"]]
        graphs = manifest["graphs"]
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"{manifest_path}: cannot read the model manifest: {e}")
    try:
        classes = [int(k) for k in args.classes.split(",")]
    except ValueError:
        sys.exit(f"--classes {args.classes!r}: expected comma-separated integers")
    if args.runs < 1 or args.threads < 1 or any(k < 1 for k in classes):
        sys.exit("--runs, --threads and every class count must be at least 1")
    timed_graphs = args.graphs.split(",")
    unknown = [g for g in timed_graphs if g not in GRAPHS]
    if unknown:
        sys.exit(f"--graphs {args.graphs!r}: unknown {unknown}, expected some of {list(GRAPHS)}")

    sessions = {}
    for name in GRAPHS:
        sessions[name], seconds = session(args.model / graphs[name], args.threads)
        print(f"{name:<13} session created (graph optimised) in {seconds:.2f} s")
    print(
        f"onnxruntime {ort.__version__}, CPU, {args.threads} intra-op thread(s); "
        f"model {manifest.get('name')!r}, patch {patch}, {manifest.get('spacing_mm')} mm; "
        f"median of {args.runs} run(s)\n"
    )

    rows = []
    rng = np.random.default_rng(0)
    image = rng.uniform(-1.7, 1.7, size=[1, 1, *patch]).astype(np.float32)
    encoder = sessions["encoder"]
    names = [o.name for o in encoder.get_outputs()]
    if "encoder" in timed_graphs:
        first, med, out = timed(lambda: encoder.run(None, {"image": image}), args.runs)
        rows.append(("encoder", "-", "one window", first, med))
    else:
        out = encoder.run(None, {"image": image})
    features = dict(zip(names, out))

    task_encoder = sessions["task_encoder"]
    task_inputs = [i.name for i in task_encoder.get_inputs()]
    task_names = [o.name for o in task_encoder.get_outputs()]
    decoder = sessions["decoder"]
    for k in classes:
        if "task_encoder" not in timed_graphs and "decoder" not in timed_graphs:
            break
        masks = balls(k, patch)

        def encode(m):
            feed = {n: (m if n == "masks" else features[n]) for n in task_inputs}
            return task_encoder.run(None, feed)

        if "task_encoder" not in timed_graphs:
            out = encode(masks)
        else:
            first, med, out = timed(lambda: encode(masks), args.runs)
            rows.append(("task encoder", k, f"one run, K = {k}", first, med))
        if k > 1 and "task_encoder" in timed_graphs:
            def one_by_one():
                return [encode(masks[:, c : c + 1]) for c in range(k)]

            first1, med1, _ = timed(one_by_one, args.runs)
            rows.append(("task encoder", k, f"{k} one-class runs", first1, med1))
        if "decoder" in timed_graphs:
            feed = dict(features)
            feed.update(zip(task_names, out))
            first, med, _ = timed(lambda: decoder.run(None, feed), args.runs)
            rows.append(("decoder", k, "one window, all K", first, med))

    print(f"{'graph':<13} {'K':>3}  {'what':<20} {'first run':>10} {'median':>10}")
    for graph, k, what, first, med in rows:
        print(f"{graph:<13} {k!s:>3}  {what:<20} {first:>9.4f}s {med:>9.4f}s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(f"\npeak RSS of this process (ru_maxrss, Python and onnxruntime included): {peak:.0f} MiB")


if __name__ == "__main__":
    main()
