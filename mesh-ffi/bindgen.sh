#!/usr/bin/env bash
# Builds libmesh_ffi and generates its bindings into OUT (default
# target/bindings): Kotlin (uniffi/mesh_ffi/mesh_ffi.kt), Python
# (mesh_ffi.py, with the .so copied beside it) and Swift (sources, the C
# header and a modulemap under swift/).
#
#   mesh-ffi/bindgen.sh [--release] [OUT]    (--release: target/release-ffi, LTO)
#
# Honours CARGO_TARGET_DIR (default: target/ in the workspace).
#
# Generation reads the metadata UniFFI embeds in the library, so the library
# must keep its symbols (the release profile strips debuginfo only).
set -euo pipefail
cd "$(dirname "$0")/.."
# Cargo reads a relative CARGO_TARGET_DIR from here too.
target="${CARGO_TARGET_DIR:-target}"

profile=debug
cargo_profile=()
if [ "${1:-}" = "--release" ]; then
    # Cargo.toml's release-ffi profile: release with LTO, one codegen unit.
    profile=release-ffi
    cargo_profile=(--profile release-ffi)
    shift
fi
out="${1:-$target/bindings}"
lib="$target/$profile/libmesh_ffi.so"

# The library (cdylib + staticlib), then the generators: separate builds,
# since building only the binaries skips the cdylib.
cargo build --locked "${cargo_profile[@]}" -p mesh-ffi --lib
cargo build --locked -p mesh-ffi --features cli --bins

rm -rf "$out"
mkdir -p "$out/swift"
"$target/debug/uniffi-bindgen" generate --no-format --library "$lib" -l kotlin -l python -o "$out"
cp "$lib" "$out/"
"$target/debug/uniffi-bindgen-swift" --swift-sources --headers --modulemap \
    --module-name mesh_ffiFFI --modulemap-filename module.modulemap "$lib" "$out/swift"
echo "bindings in $out:"
find "$out" -type f | sort
