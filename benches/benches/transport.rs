//! The QUIC transport against raw quinn on loopback, in the same run, with the
//! same TLS (node keys as raw public keys, ring) and transport settings:
//!
//! 1. one-stream transfer of 1 GiB in 1 MiB messages (ours: `Connection::send`
//!    / `recv`; raw: `write_all` of the same buffers / `read_chunk`), and the
//!    same bytes over one of our application streams (`open_uni`,
//!    `write_all`, `read`);
//! 2. round trip of a 64-byte message, p50 / p99 (ours: send + recv through
//!    an echoing peer; raw: the same on one bidirectional stream);
//! 3. handshakes per second with mutual authentication (ours: `connect` +
//!    `accept`, which includes the admission confirmation; raw: quinn's
//!    handshake alone).
//!
//! Each transfer runs five times, alternating raw and ours; the medians are
//! compared. `cargo test --benches` runs a small version of each.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_benches::percentile;
use mesh_core::transport::{AdmitAll, Connection, Protocol, Transport};
use mesh_transport::quic::{QuicTransport, raw};

#[path = "../common/raw_quinn.rs"]
mod raw_quinn;
use raw_quinn::{MESSAGE, config, key, localhost, raw_pair, raw_transfer};

fn transport(seed: u8) -> QuicTransport {
    QuicTransport::bind(key(seed), localhost(), Arc::new(AdmitAll), config()).unwrap()
}

async fn our_pair() -> (
    QuicTransport,
    QuicTransport,
    Box<dyn Connection>,
    Box<dyn Connection>,
) {
    let (server, client) = (transport(1), transport(2));
    let addr = server.addr();
    let (c, s) = tokio::join!(
        client.connect(server.local_node(), &addr, Protocol::MESH),
        server.accept()
    );
    (server, client, c.unwrap(), s.unwrap())
}

/// Seconds to move `total` bytes through our transport.
async fn our_transfer(total: usize) -> f64 {
    let (_server, _client, c, s) = our_pair().await;
    let payload = vec![0xA5u8; MESSAGE];
    let receiver = tokio::spawn(async move {
        let mut got = 0;
        while got < total {
            got += s.recv().await.unwrap().len();
        }
        got
    });
    let start = Instant::now();
    for _ in 0..total / MESSAGE {
        c.send(payload.clone()).await.unwrap();
    }
    assert_eq!(receiver.await.unwrap(), total);
    start.elapsed().as_secs_f64()
}

/// Seconds to move `total` bytes over one application stream of ours
/// (`Connection::open_uni`, `SendStream::write_all`, `RecvStream::read`).
async fn our_stream_transfer(total: usize) -> f64 {
    // Streams are carried by registered protocols (files, media), not by
    // the device session.
    const BULK: Protocol = Protocol::new("mesh-sdk-bench/bulk/1");
    let (server, client) = (transport(1), transport(2));
    server.serve(&[BULK], Arc::new(AdmitAll)).unwrap();
    let addr = server.addr();
    let (c, s) = tokio::join!(
        client.connect(server.local_node(), &addr, BULK),
        server.accept()
    );
    let (c, s) = (c.unwrap(), s.unwrap());
    let receiver = tokio::spawn(async move {
        let mesh_core::transport::IncomingStream::Uni(mut recv) = s.accept_stream().await.unwrap()
        else {
            panic!("a unidirectional stream");
        };
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0;
        while let Some(n) = recv.read(&mut buf).await.unwrap() {
            got += n;
        }
        got
    });
    let payload = vec![0xA5u8; MESSAGE];
    let mut send = c.open_uni(0).await.unwrap();
    let start = Instant::now();
    for _ in 0..total / MESSAGE {
        send.write_all(&payload).await.unwrap();
    }
    send.finish().await.unwrap();
    assert_eq!(receiver.await.unwrap(), total);
    start.elapsed().as_secs_f64()
}

async fn our_rtts(n: usize) -> Vec<Duration> {
    let (_server, _client, c, s) = our_pair().await;
    let echo = tokio::spawn(async move {
        while let Ok(m) = s.recv().await {
            if s.send(m).await.is_err() {
                break;
            }
        }
    });
    let mut out = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let t = Instant::now();
        c.send(vec![7u8; 64]).await.unwrap();
        assert_eq!(c.recv().await.unwrap().len(), 64);
        if i >= n / 10 {
            out.push(t.elapsed());
        }
    }
    c.close();
    let _ = echo.await;
    out.sort_unstable();
    out
}

async fn raw_rtts(n: usize) -> Vec<Duration> {
    let pair = raw_pair().await;
    let server_conn = pair.server_conn.clone();
    let echo = tokio::spawn(async move {
        let (mut send, mut recv) = server_conn.accept_bi().await.unwrap();
        let mut buf = [0u8; 64];
        while recv.read_exact(&mut buf).await.is_ok() {
            if send.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    let (mut send, mut recv) = pair.client_conn.open_bi().await.unwrap();
    let mut out = Vec::with_capacity(n);
    let mut buf = [0u8; 64];
    for i in 0..n + n / 10 {
        let t = Instant::now();
        send.write_all(&[7u8; 64]).await.unwrap();
        recv.read_exact(&mut buf).await.unwrap();
        if i >= n / 10 {
            out.push(t.elapsed());
        }
    }
    send.finish().unwrap();
    let _ = echo.await;
    out.sort_unstable();
    out
}

/// Handshakes per second through `connect` + `accept`.
async fn our_handshakes(n: usize) -> f64 {
    let (server, client) = (transport(1), transport(2));
    let addr = server.addr();
    let start = Instant::now();
    for _ in 0..n {
        let (c, s) = tokio::join!(
            client.connect(server.local_node(), &addr, Protocol::MESH),
            server.accept()
        );
        drop((c.unwrap(), s.unwrap()));
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Handshakes per second of raw quinn with the same TLS settings.
async fn raw_handshakes(n: usize) -> f64 {
    let server =
        quinn::Endpoint::server(raw::server_config(key(1), &config()).unwrap(), localhost())
            .unwrap();
    let client = quinn::Endpoint::client(localhost()).unwrap();
    let addr = server.local_addr().unwrap();
    let cfg = raw::client_config(key(2), key(1).node_id(), Protocol::MESH, &config()).unwrap();
    let start = Instant::now();
    for _ in 0..n {
        let (c, s) = tokio::join!(
            async {
                client
                    .connect_with(cfg.clone(), addr, raw::SERVER_NAME)
                    .unwrap()
                    .await
                    .unwrap()
            },
            async { server.accept().await.unwrap().await.unwrap() }
        );
        drop((c, s));
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: then
    // run a small version, to show the harness works.
    let quick = std::env::args().all(|a| a != "--bench");
    let (total, rounds, pings, handshakes) = if quick {
        (8 * MESSAGE, 1, 200, 20)
    } else {
        (1024 * MESSAGE, 5, 10_000, 1_000)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let gb = |secs: f64| total as f64 / secs / 1e9;
        let (mut raw_s, mut our_s, mut stream_s) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            raw_s.push(raw_transfer(total).await);
            our_s.push(our_transfer(total).await);
            stream_s.push(our_stream_transfer(total).await);
        }
        let (raw_m, our_m) = (median(raw_s.clone()), median(our_s.clone()));
        println!(
            "## one-stream transfer, {} MiB in {} KiB messages",
            total >> 20,
            MESSAGE >> 10
        );
        println!(
            "raw quinn: {}",
            raw_s
                .iter()
                .map(|s| format!("{:.3} GB/s", gb(*s)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "ours:      {}",
            our_s
                .iter()
                .map(|s| format!("{:.3} GB/s", gb(*s)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "median: raw {:.3} GB/s, ours {:.3} GB/s, ratio ours/raw {:.3}",
            gb(raw_m),
            gb(our_m),
            raw_m / our_m
        );
        let stream_m = median(stream_s.clone());
        println!(
            "ours, one application stream (open_uni, 4 MiB window): {} — median {:.3} GB/s, ratio to raw {:.3}",
            stream_s
                .iter()
                .map(|s| format!("{:.3} GB/s", gb(*s)))
                .collect::<Vec<_>>()
                .join(", "),
            gb(stream_m),
            raw_m / stream_m
        );

        let (raw_r, our_r) = (raw_rtts(pings).await, our_rtts(pings).await);
        println!("## round trip, 64 B, {pings} samples after warm-up");
        for (name, r) in [("raw quinn", &raw_r), ("ours", &our_r)] {
            println!(
                "{name}: p50 {:.1} µs, p99 {:.1} µs",
                percentile(r, 0.5).as_secs_f64() * 1e6,
                percentile(r, 0.99).as_secs_f64() * 1e6
            );
        }
        println!(
            "ratio of p50 (raw/ours, 1.0 = same): {:.3}",
            percentile(&raw_r, 0.5).as_secs_f64() / percentile(&our_r, 0.5).as_secs_f64()
        );

        let (raw_h, our_h) = (
            raw_handshakes(handshakes).await,
            our_handshakes(handshakes).await,
        );
        println!("## handshakes with mutual authentication, {handshakes} sequential");
        println!("raw quinn: {raw_h:.0}/s ({:.3} ms each)", 1e3 / raw_h);
        println!(
            "ours:      {our_h:.0}/s ({:.3} ms each, incl. admission confirmation)",
            1e3 / our_h
        );
        println!("ratio ours/raw: {:.3}", our_h / raw_h);
    });
}
