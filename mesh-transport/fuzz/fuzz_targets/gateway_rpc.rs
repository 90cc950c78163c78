//! Arbitrary text as a WebSocket message to the gateway: parsed and
//! dispatched, as the admin and as an anonymous caller, against a running
//! primary (in-memory transport and storage). No input may panic or hang;
//! every answer is JSON-RPC 2.0 (a response object, or an array of them),
//! and an error carries a code in the documented ranges.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mesh_core::identity::NodeKey;
use mesh_core::node::{Node, NodeConfig, Role};
use mesh_core::storage::{MemoryStorage, Storage};
use mesh_transport::gateway::{Gateway, GatewayConfig, LocalSocket};
use mesh_transport::memory::MemoryNetwork;
use serde_json::Value;

struct Fixture {
    rt: tokio::runtime::Runtime,
    admin: LocalSocket,
    anonymous: LocalSocket,
    _gateway: Gateway,
    _dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (gateway, admin, anonymous) = rt.block_on(async {
            let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
            let key = Arc::new(NodeKey::generate());
            let net = MemoryNetwork::new(1);
            let admission = Arc::new(mesh_core::node::RegistryAdmission::new(store.clone()));
            let transport = Arc::new(net.endpoint(key.node_id(), "primary", admission).unwrap());
            let node = Node::builder(key, store, transport, NodeConfig::new(Role::Primary, "fuzz", "fuzz-1"))
                .policy(Arc::new(mesh_policy::runtime::RuntimePolicy::new()))
                .start_primary()
                .unwrap();
            let gateway = Gateway::start(node, GatewayConfig::new("127.0.0.1:0".parse().unwrap(), dir.path()))
                .await
                .unwrap();
            let (admin, anonymous) = (gateway.local_socket(true), gateway.local_socket(false));
            (gateway, admin, anonymous)
        });
        Fixture { rt, admin, anonymous, _gateway: gateway, _dir: dir }
    })
}

fn check_response(v: &Value) {
    let o = v.as_object().expect("a response is an object");
    assert_eq!(o.get("jsonrpc"), Some(&Value::String("2.0".into())));
    assert!(o.contains_key("id"));
    match (o.get("result"), o.get("error")) {
        (Some(_), None) => {}
        (None, Some(e)) => {
            let code = e["code"].as_i64().expect("an error code");
            assert!((-32700..=-32000).contains(&code), "code {code}");
            assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
        other => panic!("neither result nor error: {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let f = fixture();
    for socket in [&f.anonymous, &f.admin] {
        let answer = f.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(2), socket.message(text)).await
        });
        // A method that legitimately waits (nodes.discover with a timeout)
        // may run out the clock; that is not a failure.
        let Ok(Some(answer)) = answer else { continue };
        let v: Value = serde_json::from_str(&answer).expect("answers are JSON");
        match &v {
            Value::Array(items) => {
                assert!(!items.is_empty());
                items.iter().for_each(check_response);
            }
            other => check_response(other),
        }
    }
});
