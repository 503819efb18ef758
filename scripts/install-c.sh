#!/usr/bin/env bash
# Installs libiris like a C library (the layout cargo-c's `cargo cinstall`
# gives, without needing cargo-c):
#
#   PREFIX/include/iris.h
#   PREFIX/lib/libiris.so.X.Y.Z, libiris.so.0 -> it (the soname), libiris.so -> libiris.so.0
#   PREFIX/lib/libiris.a
#   PREFIX/lib/pkgconfig/iris.pc
#
#   scripts/install-c.sh PREFIX                    # cargo build --release -p iris-ffi, then install
#   IRIS_BUILD_DIR=target/debug scripts/install-c.sh PREFIX   # install an existing build
#
# Then: cc app.c $(pkg-config --cflags --libs iris), with PKG_CONFIG_PATH=PREFIX/lib/pkgconfig
# when PREFIX is not a system prefix; static: link PREFIX/lib/libiris.a and
# $(pkg-config --static --libs iris) less -liris.
set -euo pipefail
if [ $# -ne 1 ]; then
    echo "usage: scripts/install-c.sh PREFIX" >&2
    exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
prefix=$(cd "$1" && pwd)

if [ -n "${IRIS_BUILD_DIR:-}" ]; then
    build=$(cd "$IRIS_BUILD_DIR" && pwd)
else
    (cd "$root" && cargo build --release -p iris-ffi)
    build="${CARGO_TARGET_DIR:-$root/target}/release"
fi
for f in libiris.so libiris.a; do
    [ -f "$build/$f" ] || { echo "install-c.sh: $build/$f is missing" >&2; exit 1; }
done

# Versions come from the header, the single source of truth for the ABI.
header="$root/include/iris.h"
define() { awk -v name="$1" '$1 == "#define" && $2 == name { print $3 }' "$header"; }
version="$(define IRIS_VERSION_MAJOR).$(define IRIS_VERSION_MINOR).$(define IRIS_VERSION_PATCH)"
abi_major=$(define IRIS_ABI_VERSION_MAJOR)
soname="libiris.so.$abi_major"
if ! readelf -d "$build/libiris.so" | grep -q "SONAME.*\[$soname\]"; then
    echo "install-c.sh: $build/libiris.so does not have the soname $soname" >&2
    exit 1
fi

install -d "$prefix/include" "$prefix/lib/pkgconfig"
install -m 644 "$header" "$prefix/include/iris.h"
# Debug sections are left out, as distributions install libraries (a debug
# build's are over a gigabyte; symbols stay, so backtraces keep names).
strip --strip-debug -o "$prefix/lib/libiris.so.$version" "$build/libiris.so"
chmod 755 "$prefix/lib/libiris.so.$version"
ln -sfn "libiris.so.$version" "$prefix/lib/$soname"
ln -sfn "$soname" "$prefix/lib/libiris.so"
strip --strip-debug -o "$prefix/lib/libiris.a" "$build/libiris.a"
chmod 644 "$prefix/lib/libiris.a"

# What the static library needs from the system, as printed for x86_64 and
# aarch64 Linux (glibc) by:
#   cargo rustc -p iris-ffi --lib --crate-type staticlib -- --print native-static-libs
# tests/c/run.sh links a program against libiris.a with exactly this list.
# -z noexecstack: tract-linalg's assembly kernels carry no .note.GNU-stack
# section, so without it the linker would give the program an executable stack.
libs_private="-Wl,-z,noexecstack -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"

cat > "$prefix/lib/pkgconfig/iris.pc" <<EOF
prefix=$prefix
exec_prefix=\${prefix}
libdir=\${exec_prefix}/lib
includedir=\${prefix}/include

Name: iris
Description: iris: in-context 3-D medical image segmentation (C ABI)
Version: $version
Libs: -L\${libdir} -liris
Libs.private: $libs_private
Cflags: -I\${includedir}
EOF
echo "installed libiris $version (ABI $abi_major, $soname) into $prefix"
