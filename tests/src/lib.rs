//! Helpers shared by the integration tests and their helper binaries.
#![forbid(unsafe_code)]

use sha2::{Digest, Sha256};

/// Number of records the crash writer commits per batch.
pub const CRASH_BATCH: usize = 3;

/// The document the crash writer stores for batch `seq`, part `part`: a
/// payload and a checksum over both, so a torn record would be detected.
pub fn crash_record(seq: u64, part: usize) -> serde_json::Value {
    let payload = format!("{seq}:{part}:").repeat(40);
    serde_json::json!({ "seq": seq, "part": part, "payload": payload, "check": checksum(seq, part, &payload) })
}

/// The checksum stored in a crash record.
pub fn checksum(seq: u64, part: usize, payload: &str) -> String {
    let digest = Sha256::new()
        .chain_update(seq.to_be_bytes())
        .chain_update((part as u64).to_be_bytes())
        .chain_update(payload.as_bytes())
        .finalize();
    data_encoding::HEXLOWER.encode(&digest)
}

/// The key of a crash record.
pub fn crash_key(seq: u64, part: usize) -> String {
    format!("{seq:010}-{part}")
}

/// Entries the ledger writer appends per transaction (group commit).
pub const LEDGER_GROUP: u64 = 8;

/// The key the ledger writer signs with.
pub fn ledger_key() -> mesh_core::identity::NodeKey {
    mesh_core::identity::NodeKey::from_secret_bytes(&[0x4c; 32])
}

/// Entry number `n` of the ledger writer: its body names its number, so the
/// test can check each acknowledged entry is there and intact.
pub fn ledger_entry(n: u64, actor: mesh_core::identity::NodeId) -> mesh_core::ledger::Entry {
    mesh_core::ledger::Entry::json(
        mesh_core::ledger::record_types::COMMAND_DECIDED,
        actor,
        &serde_json::json!({ "n": n, "command": format!("job.{}", n % 13), "decision": "allow" }),
    )
}
