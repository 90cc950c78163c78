//! Arbitrary text as a policy document, a context document and an hour window.
//!
//! Invariants: nothing panics; a policy that compiles resolves any command
//! deterministically; a decision's JSON always has the contract's fields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_policy::{Context, ContextDocument, HourWindow, Policy};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(w) = HourWindow::parse(text) {
        // What parses prints back to itself.
        assert_eq!(HourWindow::parse(&w.to_string()).ok(), Some(w));
    }
    let ctx = ContextDocument::from_json(text)
        .and_then(|d| d.into_context(1_700_000_000_000))
        .unwrap_or_else(|_| Context::at(1_700_000_000_000));
    if let Ok(policy) = Policy::from_json(text) {
        for command in ["", "chat.send", "a.b.c", text] {
            let d = policy.resolve(command, &ctx);
            assert_eq!(d, policy.resolve(command, &ctx));
            let j = d.to_json();
            assert!(j["decision"].is_string() && j["reason"].is_string() && j["message"].is_string());
        }
    }
});
