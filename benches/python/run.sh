#!/usr/bin/env bash
# FFI overhead from Python against the release-ffi library (LTO):
#   bash benches/python/run.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$root/$target" ;; esac
bash mesh-ffi/bindgen.sh --release "$target/bindings-release" >/dev/null
ls -l "$target/release-ffi/libmesh_ffi.so" | awk '{ printf "libmesh_ffi.so (release-ffi): %d bytes\n", $5 }'
cd "$target/bindings-release"
PYTHONPATH=. PYTHONDONTWRITEBYTECODE=1 exec /usr/bin/python3 "$root/benches/python/ffi_overhead.py" "$@"
