//! Arbitrary bytes as membership frames from a peer, and as SWIM packets
//! inside them, into a running mesh member: no input may panic it, and a
//! frame that parses re-encodes to bytes that parse to the same frame.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use mesh_core::clock::Timestamp;
use mesh_core::identity::NodeKey;
use mesh_core::mesh::wire::MeshFrame;
use mesh_core::mesh::{Mesh, MeshConfig};

fn mesh() -> &'static Mutex<Mesh> {
    static MESH: OnceLock<Mutex<Mesh>> = OnceLock::new();
    MESH.get_or_init(|| {
        let key = Arc::new(NodeKey::from_secret_bytes(&[1; 32]));
        let now = Timestamp::from_millis(1_700_000_000_000);
        let mut m = Mesh::new(key, MeshConfig::default(), "fuzz", vec![], 1, None, 1, now)
            .expect("a mesh");
        // A known peer, so frames from it reach every handler.
        let peer = NodeKey::from_secret_bytes(&[2; 32]);
        let id = mesh_core::mesh::member::MemberId::new(&peer, 1, "peer", vec![]).expect("an id");
        m.admit_joiner(&id, now).expect("admitted");
        Mutex::new(m)
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = MeshFrame::decode(data) {
        assert_eq!(MeshFrame::decode(&frame.encode()).ok(), Some(frame));
    }
    let peer = NodeKey::from_secret_bytes(&[2; 32]).node_id();
    let now = Timestamp::from_millis(1_700_000_000_000);
    let Ok(mut m) = mesh().lock() else { return };
    let _ = m.handle_frame(peer, data, now);
    let _ = m.handle_frame(peer, &MeshFrame::Swim(data.to_vec()).encode(), now);
    while m.poll_output().is_some() {}
});
