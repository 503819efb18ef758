#!/usr/bin/env bash
# Runs every fuzz target for a bounded time, where libFuzzer's tools exist
# (cargo-fuzz; stable Rust with RUSTC_BOOTSTRAP=1 for its -Z flags). CI runs
# the same checks without libFuzzer: see README.md.
#
#   fuzz/run.sh              # 60 s per target
#   fuzz/run.sh 30 volume_view nifti_gzip
#
# New inputs go to fuzz/corpus/<target>/ (git-ignored); the committed
# fuzz/seeds/<target>/ is read only. A crash stops its target and leaves
# the input in fuzz/artifacts/<target>/; the script then exits non-zero.
set -euo pipefail
cd "$(dirname "$0")"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is not installed (cargo install cargo-fuzz --locked)" >&2
    exit 2
fi
seconds=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    echo "=== $t (${seconds} s)"
    RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=4096 -print_final_stats=1 || status=$?
done
exit "$status"
