//! UniFFI's Swift generator: Swift sources, the C header and a modulemap
//! for an xcframework. See `mesh-ffi/bindgen.sh`.

fn main() {
    uniffi::uniffi_bindgen_swift()
}
