#!/usr/bin/env bash
# The main job on a fresh machine: fetch real anatomy, build, and segment 12
# structures of the MNI152 brain (thalamus, caudate, putamen, pallidum,
# hippocampus, amygdala; left and right) from one reference brain, Colin27
# with the AAL atlas, with the model shipped in models/. Training never saw
# these 12 structures. Prints Dice per structure against the approximate
# truth (AAL3 mapped to AAL by name), beside the position-copy baseline,
# and writes:
#   data/out/mni152_structures.nii.gz   the label map (AAL values)
#   data/out/mni152_structures.png      a preview (three orthogonal slices)
#   data/out/mni152_truth.nii.gz        the approximate truth
#   data/out/aal_on_mni152.nii.gz       the position-copy baseline
# IRIS_MODEL=DIR picks another model folder.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${IRIS_MODEL:-models/iris-tiny}
structures=37,38,41,42,71,72,73,74,75,76,77,78
names=Hippocampus_L,Hippocampus_R,Amygdala_L,Amygdala_R,Caudate_L,Caudate_R,Putamen_L,Putamen_R,Pallidum_L,Pallidum_R,Thalamus_L,Thalamus_R
colin=data/mricron/ch2.nii.gz
aal=data/mricron/aal.nii.gz
mni=data/mni152/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz

scripts/fetch-data.sh
cargo build --release --quiet -p iris-cli -p iris-eval
cargo build --release --quiet -p iris-core --example position_copy
mkdir -p data/out

echo "== iris segment: $model, reference Colin27 + AAL, query MNI152"
time target/release/iris segment --model "$model" --image "$mni" \
    --ref-image "$colin" --ref-label "$aal" --classes "$structures" --names "$names" \
    --out data/out/mni152_structures.nii.gz --preview data/out/mni152_structures.png

target/release/iris-eval truth --task aal-colin27-to-mni152 --out data/out/mni152_truth.nii.gz
echo
echo "== Dice per structure, iris (truth approximate: AAL3 mapped to AAL by name)"
target/release/iris eval --pred data/out/mni152_structures.nii.gz \
    --truth data/out/mni152_truth.nii.gz --classes "$structures"

target/release/examples/position_copy "$aal" "$mni" data/out/aal_on_mni152.nii.gz >/dev/null
echo
echo "== Dice per structure, position-copy baseline (no model: AAL copied by world position)"
target/release/iris eval --pred data/out/aal_on_mni152.nii.gz \
    --truth data/out/mni152_truth.nii.gz --classes "$structures"
