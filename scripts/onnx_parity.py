#!/usr/bin/env python3
"""Check an exported Iris model folder with the reference ONNX tools.

    python3 scripts/onnx_parity.py MODEL_DIR [SPEC_JSON]

1. Reads MODEL_DIR/manifest.json and runs onnx.checker.check_model(full_check=True)
   (which includes strict shape inference) on each graph it names.
2. Checks each graph's input and output names against the ONNX contract
   (docs: iris-train/src/export/mod.rs).
3. With SPEC_JSON (written by iris-train/tests/export_parity.rs), runs each listed
   graph in onnxruntime on the given inputs and compares every output with the
   expected values (burn's) within the spec's tolerance.

SPEC_JSON: {"tolerance": 1e-4, "runs": [{"graph": "encoder", "inputs": {NAME: {"file": F,
"shape": [..]}}, "outputs": {NAME: {...}}}, ...]}; F is raw little-endian float32 in
the spec's folder.

Exits 0 when everything passes, 1 on any failure (with one line per problem).
Needs: pip install onnx onnxruntime numpy.
"""

import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort


def fail(message):
    print(f"onnx_parity: {message}", file=sys.stderr)
    sys.exit(1)


def expected_names(manifest):
    """The contract's input and output names of each graph."""
    stages = len(manifest["stages"])
    features = [f"features_{i}" for i in range(5)]
    tasks = [f"task_{s}" for s in range(stages)]
    return {
        "encoder": (["image"], features),
        "task_encoder": (features[5 - stages:] + ["masks"], tasks),
        "decoder": (features + tasks, ["logits"]),
    }


def read_array(folder, entry):
    data = np.fromfile(os.path.join(folder, entry["file"]), dtype="<f4")
    return data.reshape(entry["shape"])


def main():
    if len(sys.argv) not in (2, 3):
        fail("usage: onnx_parity.py MODEL_DIR [SPEC_JSON]")
    model_dir = sys.argv[1]
    with open(os.path.join(model_dir, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != "iris-model":
        fail(f"{model_dir}/manifest.json: format is {manifest.get('format')!r}, not 'iris-model'")

    paths = {}
    names = expected_names(manifest)
    for key, file in manifest["graphs"].items():
        path = os.path.join(model_dir, file)
        paths[key] = path
        onnx.checker.check_model(path, full_check=True)
        model = onnx.load(path)
        opset = {o.domain: o.version for o in model.opset_import}.get("", None)
        if opset != manifest["opset"]:
            fail(f"{file}: opset {opset}, manifest says {manifest['opset']}")
        found = ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
        if found != (names[key][0], names[key][1]):
            fail(f"{file}: inputs/outputs {found}, contract says {names[key]}")
        print(f"{file}: onnx.checker (full_check) passed, opset {opset}, inputs {found[0]}")

    if len(sys.argv) == 2:
        return
    spec_path = sys.argv[2]
    folder = os.path.dirname(os.path.abspath(spec_path))
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    tolerance = float(spec["tolerance"])
    worst_overall = 0.0
    for run in spec["runs"]:
        key = run["graph"]
        session = ort.InferenceSession(paths[key], providers=["CPUExecutionProvider"])
        feeds = {name: read_array(folder, entry) for name, entry in run["inputs"].items()}
        wanted = list(run["outputs"])
        results = session.run(wanted, feeds)
        for name, found in zip(wanted, results):
            expected = read_array(folder, run["outputs"][name])
            if found.shape != expected.shape:
                fail(f"{key} {name}: onnxruntime shape {found.shape}, burn {expected.shape}")
            diff = float(np.max(np.abs(found.astype(np.float64) - expected)))
            worst_overall = max(worst_overall, diff)
            print(f"{key} {name}: onnxruntime vs burn max abs diff {diff:.3e}")
            if not diff < tolerance:
                fail(f"{key} {name}: max abs diff {diff} exceeds {tolerance}")
    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}: all outputs within "
          f"{tolerance} (worst {worst_overall:.3e})")


if __name__ == "__main__":
    main()
