//! Security-relevant changes land in the audit ledger in the same storage
//! batch as the change: pairing approved and rejected, unpair, revoke, token
//! rotation. A change whose batch fails leaves neither the change nor a record.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use mesh_core::clock::Timestamp;
use mesh_core::events::EventBus;
use mesh_core::identity::NodeKey;
use mesh_core::ledger::{Body, Ledger, record_types};
use mesh_core::pairing::{DeviceInfo, DevicePairing, DeviceStep, PairingConfig, PrimaryPairing};
use mesh_core::registry::Registry;
use mesh_core::storage::{MemoryStorage, Storage, StorageError, Table, Visitor, Write};
use mesh_core::wire::Platform;
use mesh_ledger::{LedgerConfig, SignedLedger, verify_ledger};

const T0: Timestamp = Timestamp::from_millis(1_750_000_000_000);

/// A store whose writes can be made to fail, to show atomicity.
#[derive(Debug, Default)]
struct Flaky {
    inner: MemoryStorage,
    fail: AtomicBool,
}

impl Storage for Flaky {
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.get(table, key)
    }
    fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        self.inner.list(table)
    }
    fn apply(&self, batch: &[Write]) -> Result<(), StorageError> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(StorageError::Backend("disk full (simulated)".into()));
        }
        self.inner.apply(batch)
    }
    fn scan_range(
        &self,
        table: Table,
        start: &str,
        end: &str,
        limit: usize,
        visit: &mut Visitor<'_>,
    ) -> Result<(), StorageError> {
        self.inner.scan_range(table, start, end, limit, visit)
    }
}

struct Primary {
    store: Arc<Flaky>,
    key: Arc<NodeKey>,
    ledger: Arc<SignedLedger>,
    registry: Registry,
    pairing: PrimaryPairing,
}

fn primary() -> Primary {
    let store = Arc::new(Flaky::default());
    let dyn_store: Arc<dyn Storage> = store.clone();
    let key = Arc::new(NodeKey::from_secret_bytes(&[1; 32]));
    let ledger = Arc::new(
        SignedLedger::open(dyn_store.clone(), key.clone(), LedgerConfig::default()).unwrap(),
    );
    let events = EventBus::new();
    let registry = Registry::new(dyn_store.clone(), events.clone()).with_ledger(ledger.clone());
    let pairing = PrimaryPairing::new(
        key.node_id(),
        dyn_store,
        registry.clone(),
        events,
        PairingConfig::default(),
    );
    Primary {
        store,
        key,
        ledger,
        registry,
        pairing,
    }
}

fn types(p: &Primary) -> Vec<String> {
    p.ledger
        .view()
        .records(0, 100)
        .unwrap()
        .into_iter()
        .map(|r| r.record_type)
        .collect()
}

/// Runs the whole pairing exchange with the right code.
fn pair(p: &Primary, seed: u8) -> NodeKey {
    let dev = NodeKey::from_secret_bytes(&[seed; 32]);
    let info = DeviceInfo {
        device_id: format!("hw-{seed}"),
        name: format!("Worker {seed}"),
        platform: Platform::Desktop,
    };
    let (mut session, request) = DevicePairing::start(
        dev.node_id(),
        p.key.node_id(),
        info,
        T0,
        &PairingConfig::default(),
    );
    let record = p.pairing.on_request(dev.node_id(), request, T0).unwrap();
    let (_, challenge) = p
        .pairing
        .approve(&record.request_id, &session.code().clone(), T0)
        .unwrap();
    let DeviceStep::Send(confirm) = session
        .handle(p.key.node_id(), challenge, &dev, T0)
        .unwrap()
    else {
        panic!("the code was right")
    };
    let paired = p.pairing.on_message(dev.node_id(), confirm, T0).unwrap();
    assert!(matches!(
        session
            .handle(p.key.node_id(), paired.reply, &dev, T0)
            .unwrap(),
        DeviceStep::Paired(_)
    ));
    dev
}

#[test]
fn every_security_change_is_in_the_ledger_with_it() {
    let p = primary();
    let a = pair(&p, 2);
    let b = pair(&p, 3);
    let c = pair(&p, 4);
    // A rejected request.
    let dev = NodeKey::from_secret_bytes(&[5; 32]);
    let info = DeviceInfo {
        device_id: "hw-5".into(),
        name: "Stranger".into(),
        platform: Platform::Android,
    };
    let (_, request) = DevicePairing::start(
        dev.node_id(),
        p.key.node_id(),
        info,
        T0,
        &PairingConfig::default(),
    );
    let rejected = p.pairing.on_request(dev.node_id(), request, T0).unwrap();
    p.pairing
        .reject(&rejected.request_id, Some("not ours".into()), T0)
        .unwrap();

    p.registry.rotate_token(&a.node_id(), T0).unwrap();
    p.registry.revoke(&b.node_id(), T0).unwrap();
    p.registry.unpair(&c.node_id(), T0).unwrap();
    assert_eq!(
        types(&p),
        [
            record_types::PAIRING_APPROVED,
            record_types::PAIRING_APPROVED,
            record_types::PAIRING_APPROVED,
            record_types::PAIRING_REJECTED,
            record_types::TOKEN_ROTATED,
            record_types::DEVICE_REVOKED,
            record_types::DEVICE_UNPAIRED,
        ]
    );
    let records = p.ledger.view().records(0, 100).unwrap();
    let Body::Json(body) = &records[6].body else {
        panic!("JSON body")
    };
    let body: serde_json::Value = serde_json::from_str(body.as_str()).unwrap();
    assert_eq!(body["node"], c.node_id().to_string());
    assert_eq!(body["device_id"], "hw-4");
    assert!(records.iter().all(|r| r.actor == p.key.node_id()));
    p.ledger.checkpoint(T0).unwrap();
    let report = verify_ledger(p.store.as_ref(), &p.key.node_id(), None).unwrap();
    assert!(report.ok(), "{report:?}");
}

#[test]
fn a_failed_batch_leaves_neither_the_change_nor_its_record() {
    let p = primary();
    let a = pair(&p, 2);
    let before = p.ledger.len();
    p.store.fail.store(true, Ordering::Relaxed);
    assert!(p.registry.revoke(&a.node_id(), T0).is_err());
    assert!(p.registry.unpair(&a.node_id(), T0).is_err());
    p.store.fail.store(false, Ordering::Relaxed);
    // Not revoked, still paired, nothing recorded; and the ledger carries on.
    let device = p.registry.get(&a.node_id()).unwrap().unwrap();
    assert!(device.revoked_at.is_none());
    assert_eq!(p.ledger.len(), before);
    p.registry.revoke(&a.node_id(), T0).unwrap();
    assert_eq!(p.ledger.len(), before + 1);
    assert!(
        verify_ledger(p.store.as_ref(), &p.key.node_id(), None)
            .unwrap()
            .ok()
    );
}
