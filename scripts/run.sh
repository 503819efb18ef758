#!/usr/bin/env bash
# The main job on a fresh machine: fetch real anatomy, build, run.
#
# Until the inference engine and a trained model ship (see the open issues),
# this runs the model-free baseline that every iris result is compared with:
# the AAL atlas of the Colin27 brain copied onto the MNI152 brain by world
# position. Output: data/out/aal_on_mni152.nii.gz and a table of label volumes.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-data.sh
cargo build --release --quiet -p iris-core --example position_copy
mkdir -p data/out
target/release/examples/position_copy \
    data/mricron/aal.nii.gz \
    data/mni152/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz \
    data/out/aal_on_mni152.nii.gz
