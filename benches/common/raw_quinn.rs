//! Raw quinn on loopback with the same TLS (node keys as raw public keys,
//! ring) and transport settings as mesh-transport: the baseline the
//! transport and files benches compare against, in the same run.
#![allow(dead_code, unreachable_pub)] // each bench uses part of it

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mesh_core::identity::NodeKey;
use mesh_core::transport::Protocol;
use mesh_transport::quic::{QuicConfig, raw};

/// Bytes per write.
pub const MESSAGE: usize = 1 << 20;

pub fn key(seed: u8) -> Arc<NodeKey> {
    Arc::new(NodeKey::from_secret_bytes(&[seed; 32]))
}

pub fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

pub fn config() -> QuicConfig {
    QuicConfig::default()
}

pub struct RawPair {
    _server: quinn::Endpoint,
    _client: quinn::Endpoint,
    pub client_conn: quinn::Connection,
    pub server_conn: quinn::Connection,
}

pub async fn raw_pair() -> RawPair {
    let server =
        quinn::Endpoint::server(raw::server_config(key(1), &config()).unwrap(), localhost())
            .unwrap();
    let client = quinn::Endpoint::client(localhost()).unwrap();
    let addr = server.local_addr().unwrap();
    let cfg = raw::client_config(key(2), key(1).node_id(), Protocol::MESH, &config()).unwrap();
    let (c, s) = tokio::join!(
        async {
            client
                .connect_with(cfg, addr, raw::SERVER_NAME)
                .unwrap()
                .await
                .unwrap()
        },
        async { server.accept().await.unwrap().await.unwrap() }
    );
    RawPair {
        _server: server,
        _client: client,
        client_conn: c,
        server_conn: s,
    }
}

/// Seconds to move `total` bytes over one raw quinn stream.
pub async fn raw_transfer(total: usize) -> f64 {
    let pair = raw_pair().await;
    let server_conn = pair.server_conn.clone();
    let receiver = tokio::spawn(async move {
        let (_send, mut recv) = server_conn.accept_bi().await.unwrap();
        let mut got = 0;
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.unwrap() {
            got += chunk.bytes.len();
        }
        got
    });
    let payload = vec![0xA5u8; MESSAGE];
    let (mut send, _recv) = pair.client_conn.open_bi().await.unwrap();
    let start = Instant::now();
    for _ in 0..total / MESSAGE {
        send.write_all(&payload).await.unwrap();
    }
    send.finish().unwrap();
    assert_eq!(receiver.await.unwrap(), total);
    start.elapsed().as_secs_f64()
}
