//! UniFFI bindings of the mesh SDK for Swift, Kotlin and Python.
//!
//! **Status: not implemented yet.** This crate will wrap the node runtime in a
//! `MeshNode` object with UniFFI proc-macros (issue 9); it holds no logic of
//! its own. Until then it exports nothing.
// No `forbid(unsafe_code)` here: UniFFI's generated scaffolding needs `unsafe`.
#![warn(missing_docs)]
