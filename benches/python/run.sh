#!/usr/bin/env bash
# FFI overhead from Python against the release-ffi library (LTO):
#   bash benches/python/run.sh            (the figures in BENCHMARKS.md)
#   bash benches/python/run.sh --quick    (a small run to show the harness
#       works, against the debug library the binding tests already built;
#       its figures mean nothing)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$root/$target" ;; esac
if [ "${1:-}" = "--quick" ]; then
    out="$target/bindings-quick"
    bash mesh-ffi/bindgen.sh "$out" >/dev/null
    ls -l "$target/debug/libmesh_ffi.so" | awk '{ printf "libmesh_ffi.so (debug): %d bytes\n", $5 }'
else
    out="$target/bindings-release"
    bash mesh-ffi/bindgen.sh --release "$out" >/dev/null
    ls -l "$target/release-ffi/libmesh_ffi.so" | awk '{ printf "libmesh_ffi.so (release-ffi): %d bytes\n", $5 }'
fi
cd "$out"
PYTHONPATH=. PYTHONDONTWRITEBYTECODE=1 exec /usr/bin/python3 "$root/benches/python/ffi_overhead.py" "$@"
