//! UniFFI's bindings generator (Kotlin, Python, Swift), built from the same
//! uniffi version as the library: `cargo run -p mesh-ffi --features cli
//! --bin uniffi-bindgen -- generate --library …`. See `mesh-ffi/bindgen.sh`.

fn main() {
    uniffi::uniffi_bindgen_main()
}
