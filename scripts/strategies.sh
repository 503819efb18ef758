#!/usr/bin/env bash
# Regenerates docs/strategies.md, .csv and .png: the inference strategies of
# the paper's figure 4 (issue 6) on one task (TASK, by default the held-out
# AAL structures; OUT names the files) — one-shot,
# context ensembles, object- vs image-level retrieval at several top-k, and
# in-context tuning on 1, 3 and 5 cases.
#
#   scripts/strategies.sh [MODEL_DIR]      (default: models/iris-tiny)
#   TASK=seen-aal-colin27-to-mni152 OUT=docs/strategies-seen scripts/strategies.sh
#
# MODEL_DIR is a model folder that also holds its training checkpoint
# (MODEL_DIR/checkpoint, as shipped), which `iris-train tune` needs.
# The plot needs matplotlib (`python3 -m pip install matplotlib==3.9.2`);
# without it the table and CSV are still written.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-models/iris-tiny}
steps=${TUNE_STEPS:-50}
task=${TASK:-aal-colin27-to-mni152}
out=${OUT:-docs/strategies}
scripts/fetch-data.sh
cargo build --release --quiet -p iris-eval -p iris-train
pool=$(mktemp -d)
trap 'rm -rf "$pool"' EXIT

# The pool (nnU-Net layout) and the one-shot embedding for tuning.
target/release/iris-eval strategies --task "$task" --model "$model" --out "$pool/untuned.md" \
    --write-pool "$pool/cases"
tuned=()
for n in 1 3 5; do
    images=$(find "$pool/cases/imagesTr" -name '*.nii.gz' | sort | head -n "$n" | paste -sd,)
    labels=$(find "$pool/cases/labelsTr" -name '*.nii.gz' | sort | head -n "$n" | paste -sd,)
    target/release/iris-train tune --checkpoint "$model" --task "$pool/cases/reference.irisemb" \
        --images "$images" --labels "$labels" --steps "$steps" --out "$pool/tuned-$n.irisemb"
    tuned+=(--tuned "$n=$pool/tuned-$n.irisemb")
done
target/release/iris-eval strategies --task "$task" --model "$model" --out "$out.md" "${tuned[@]}"
if python3 -c 'import matplotlib' 2>/dev/null; then
    python3 scripts/plot_strategies.py "$out.csv" "$out.png"
else
    echo "matplotlib missing: $out.png not redrawn" >&2
fi
