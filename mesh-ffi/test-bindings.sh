#!/usr/bin/env bash
# The bindings' own tests, against the real library:
#   * Python: the generated module beside libmesh_ffi.so, under pytest;
#   * Kotlin: the generated Kotlin plus tests/kotlin/MeshTest.kt compiled
#     with kotlinc and run on the JVM through JNA;
#   * Swift: no Swift compiler exists for this machine, so the generated
#     header is checked with `clang -fsyntax-only` and a C program links
#     statically against libmesh_ffi.a and checks what the Swift expects.
# Missing tools are installed (apt when root; kotlinc from npm into
# target/tools). Exits non-zero if any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
# Honours CARGO_TARGET_DIR (relative to the workspace, as cargo reads it here).
target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$root/$target" ;; esac
tools="$target/tools"
out="$target/bindings"
kotlinc_version=2.4.20

need_apt=()
command -v java >/dev/null 2>&1 && command -v javac >/dev/null 2>&1 || need_apt+=(default-jdk-headless)
[ -f /usr/share/java/jna.jar ] || need_apt+=(libjna-java)
command -v clang >/dev/null 2>&1 || need_apt+=(clang)
/usr/bin/python3 -c 'import pytest' >/dev/null 2>&1 || need_apt+=(python3-pytest)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing ${need_apt[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    else
        echo "missing: ${need_apt[*]} (install them with apt, or run as root)" >&2
        exit 1
    fi
fi
K="$tools/node_modules/kotlin-compiler"
if [ ! -x "$K/bin/kotlinc" ]; then
    echo "installing kotlin-compiler@$kotlinc_version from npm into $tools"
    mkdir -p "$tools"
    npm install --silent --no-audit --no-fund --prefix "$tools" "kotlin-compiler@$kotlinc_version" >/dev/null
fi
JNA=/usr/share/java/jna.jar
CO="$K/lib/kotlinx-coroutines-core-jvm.jar"
STDLIB="$K/lib/kotlin-stdlib.jar"

bash mesh-ffi/bindgen.sh "$out" >/dev/null
failed=0

echo "::: Python"
py="$out/python-test"
rm -rf "$py" && mkdir -p "$py"
cp "$out/mesh_ffi.py" "$out/libmesh_ffi.so" mesh-ffi/tests/python/test_mesh_ffi.py "$py/"
(cd "$py" && /usr/bin/python3 -m pytest -q -p no:cacheprovider test_mesh_ffi.py) || failed=1

echo "::: Kotlin"
kt="$out/kotlin-test"
rm -rf "$kt" && mkdir -p "$kt"
if "$K/bin/kotlinc" -nowarn "$out/uniffi/mesh_ffi/mesh_ffi.kt" mesh-ffi/tests/kotlin/MeshTest.kt \
    -cp "$CO:$JNA" -d "$kt/test.jar"; then
    java -Djna.library.path="$out" -cp "$kt/test.jar:$STDLIB:$CO:$JNA" MeshTestKt || failed=1
else
    echo "the Kotlin bindings or the test do not compile" >&2
    failed=1
fi

echo "::: Swift (header and C ABI; no Swift compiler here)"
sw="$out/swift"
clang -fsyntax-only -Wno-pragma-once-outside-header -x c "$sw/mesh_ffiFFI.h" || failed=1
contract=$(sed -n 's/.*let bindings_contract_version = \([0-9]*\).*/\1/p' "$sw/mesh_ffi.swift")
checksum=$(sed -n 's/.*uniffi_mesh_ffi_checksum_method_meshnode_node_id() != \([0-9]*\).*/\1/p' "$sw/mesh_ffi.swift")
cargo build --locked -q -p mesh-ffi --lib
if clang -I"$sw" -DEXPECTED_CONTRACT="$contract" -DEXPECTED_CHECKSUM="$checksum" \
    mesh-ffi/tests/c/abi_check.c "$target/debug/libmesh_ffi.a" \
    -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc -o "$sw/abi_check"; then
    "$sw/abi_check" || failed=1
else
    echo "the C program does not link against libmesh_ffi.a" >&2
    failed=1
fi

if [ "$failed" = 0 ]; then
    echo "bindings: all passed"
else
    echo "bindings: FAILED" >&2
fi
exit "$failed"
