#!/usr/bin/env bash
# Builds the C and C++ programs against libiris and runs them on a tiny
# model; run by iris-ffi/tests/model.rs (`cargo test -p iris-ffi --test model
# c_and_cpp`), which exports the model, writes the volumes and afterwards
# compares the C program's labels with the Rust API's.
#
#   tests/c/run.sh BUILD_DIR MODEL_DIR DATA_DIR WORK_DIR
#
# BUILD_DIR holds libiris.so and libiris.a (e.g. target/debug); DATA_DIR
# holds ref.nii.gz, ref_labels.nii.gz, query.nii.gz, query_truth.nii.gz,
# query2.nii.gz and foreign.irisemb. Everything built or written goes to
# WORK_DIR. Steps:
#  1. install the build with scripts/install-c.sh into WORK_DIR/prefix
#     (header, versioned .so with its soname links, .a, iris.pc);
#  2. compile tests/c/abi_errors.c (C99), examples/c/segment.c (C99) and
#     examples/cpp/viewer.cpp (C++17) with -Wall -Wextra -Werror -pedantic
#     through pkg-config, and segment.c once more statically against
#     libiris.a with the Libs.private of iris.pc; then the same programs
#     through examples/c/Makefile and (where cmake is installed)
#     examples/c/CMakeLists.txt;
#  3. run abi_errors, segment (dynamic and static) and viewer;
#  4. run abi_errors and segment under valgrind: no invalid access, no leak.
set -euo pipefail
if [ $# -ne 4 ]; then
    echo "usage: tests/c/run.sh BUILD_DIR MODEL_DIR DATA_DIR WORK_DIR" >&2
    exit 2
fi
root=$(cd "$(dirname "$0")/../.." && pwd)
build=$1 model=$2 data=$3 work=$4
mkdir -p "$work"
step() { echo; echo "=== $*"; }

step "install into $work/prefix"
IRIS_BUILD_DIR="$build" "$root/scripts/install-c.sh" "$work/prefix"
prefix="$work/prefix"
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
cflags=$(pkg-config --cflags iris)
libs="$(pkg-config --libs iris) -Wl,-rpath,$prefix/lib"
readelf -d "$prefix/lib/libiris.so" | grep SONAME

step "compile (gcc -std=c99, g++ -std=c++17; -Wall -Wextra -Werror -pedantic)"
strict=(-Wall -Wextra -Werror -pedantic -g)
# shellcheck disable=SC2086 # pkg-config output is a list of words
gcc -std=c99 "${strict[@]}" -pthread $cflags "$root/tests/c/abi_errors.c" -o "$work/abi_errors" $libs
# shellcheck disable=SC2086
gcc -std=c99 "${strict[@]}" $cflags "$root/examples/c/segment.c" -o "$work/segment" $libs
# shellcheck disable=SC2086
g++ -std=c++17 "${strict[@]}" -pthread $cflags "$root/examples/cpp/viewer.cpp" -o "$work/viewer" $libs
# Static: libiris.a plus exactly what iris.pc's Libs.private lists.
private=$(pkg-config --static --libs iris | sed -e 's/-liris\b//')
# shellcheck disable=SC2086
gcc -std=c99 "${strict[@]}" $cflags "$root/examples/c/segment.c" "$prefix/lib/libiris.a" \
    $private -o "$work/segment_static"
if readelf -d "$work/segment_static" | grep -q 'NEEDED.*libiris'; then
    echo "segment_static links libiris dynamically" >&2
    exit 1
fi
if readelf -lW "$work/segment_static" | grep -q 'GNU_STACK.*RWE'; then
    echo "segment_static has an executable stack" >&2
    exit 1
fi
# The Makefile builds the same programs through pkg-config.
mkdir -p "$work/make"
make -s -C "$root/examples/c" CC=gcc CXX=g++ PREFIX="$prefix" OUT="$work/make"
# So does CMakeLists.txt, through CMake's pkg-config module (the README's recipe).
if command -v cmake >/dev/null; then
    cmake -S "$root/examples/c" -B "$work/cmake" -DCMAKE_PREFIX_PATH="$prefix" \
        -DCMAKE_C_COMPILER=gcc -DCMAKE_CXX_COMPILER=g++ >/dev/null
    cmake --build "$work/cmake" >/dev/null
    "$work/cmake/segment" "$model" "$data/ref.nii.gz" "$data/ref_labels.nii.gz" \
        "$data/query.nii.gz" "$work/segment_cmake.nii.gz" >/dev/null
    echo "cmake: segment and viewer built and segment ran"
else
    echo "cmake: not installed, CMakeLists.txt not built"
fi

step "abi_errors"
"$work/abi_errors" "$model" "$data"

step "segment (shared library)"
"$work/segment" "$model" "$data/ref.nii.gz" "$data/ref_labels.nii.gz" \
    "$data/query.nii.gz" "$work/segment.nii.gz" "$data/query_truth.nii.gz"

step "segment (static library)"
"$work/segment_static" "$model" "$data/ref.nii.gz" "$data/ref_labels.nii.gz" \
    "$data/query.nii.gz" "$work/segment_static.nii.gz"

step "viewer: three volumes on three threads, one model"
"$work/viewer" "$model" "$data/ref.nii.gz" "$data/ref_labels.nii.gz" 1 \
    "$data/query.nii.gz" "$data/query2.nii.gz" "$data/ref.nii.gz"

step "valgrind: abi_errors and segment"
# Any invalid read or write, use of uninitialised memory, or definitely or
# indirectly lost block fails the run. "Possibly lost" blocks are not
# counted: they are the per-thread state of threads still running at exit
# (the engine's rayon pool) and glibc's cache of joined threads' stacks.
# tests/c/valgrind.supp names the one third-party report that is ignored.
# (Add --track-origins=yes to see where an uninitialised value came from; it
# doubles the run time.)
vg=(valgrind --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,indirect
    --show-leak-kinds=definite,indirect --quiet --suppressions="$root/tests/c/valgrind.supp")
"${vg[@]}" "$work/abi_errors" "$model" "$data" >"$work/abi_errors.valgrind.out"
"${vg[@]}" "$work/segment" "$model" "$data/ref.nii.gz" "$data/ref_labels.nii.gz" \
    "$data/query.nii.gz" "$work/segment_valgrind.nii.gz" "$data/query_truth.nii.gz"
echo "valgrind: no errors, no leaks"
