//! Identity, sealing and wire-format throughput.
//!
//! Headline ratios (see BENCHMARKS.md): session seal / open of 64 KiB against raw
//! ChaCha20-Poly1305 on the same buffer in the same run; one-shot seal (which
//! adds an ephemeral X25519 agreement per message) against the same baseline;
//! frames encoded and decoded per second.
#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;

use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use mesh_core::clock::Timestamp;
use mesh_core::crypto::{self, Opener, Sealer};
use mesh_core::identity::NodeKey;
use mesh_core::wire::{
    DEFAULT_MAX_FRAME_LEN, Destination, Envelope, FileChunk, HealthMetrics, Heartbeat, MessageId,
    Payload, Thermal, decode_frame,
};

const SIZE: usize = 64 * 1024;
const NOW: Timestamp = Timestamp::from_millis(1_750_000_000_000);

fn signatures(c: &mut Criterion) {
    let key = NodeKey::from_secret_bytes(&[7; 32]);
    let id = key.node_id();
    let msg = [0x55u8; 64];
    let sig = key.sign(&msg);
    let mut g = c.benchmark_group("ed25519");
    g.throughput(Throughput::Elements(1));
    // Baselines: ed25519-dalek directly, key already parsed, strict verification.
    let raw_sk = SigningKey::from_bytes(&[7; 32]);
    let raw_vk = raw_sk.verifying_key();
    let raw_sig = Signature::from_bytes(&sig);
    g.bench_function("raw_dalek_sign_64B", |b| {
        b.iter(|| ed25519_dalek::Signer::sign(&raw_sk, black_box(&msg)))
    });
    g.bench_function("raw_dalek_verify_strict_64B", |b| {
        b.iter(|| raw_vk.verify_strict(black_box(&msg), &raw_sig).unwrap())
    });
    g.bench_function("sign_64B", |b| b.iter(|| key.sign(black_box(&msg))));
    g.bench_function("verify_64B", |b| {
        b.iter(|| id.verify(black_box(&msg), black_box(&sig)).unwrap())
    });

    const BATCH: usize = 64;
    let keys: Vec<SigningKey> = (0..BATCH as u8)
        .map(|i| SigningKey::from_bytes(&[i; 32]))
        .collect();
    let msgs: Vec<[u8; 64]> = (0..BATCH as u8).map(|i| [i; 64]).collect();
    let sigs: Vec<Signature> = keys
        .iter()
        .zip(&msgs)
        .map(|(k, m)| ed25519_dalek::Signer::sign(k, m))
        .collect();
    let vks: Vec<VerifyingKey> = keys.iter().map(SigningKey::verifying_key).collect();
    let refs: Vec<&[u8]> = msgs.iter().map(|m| &m[..]).collect();
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("verify_batch_64", |b| {
        b.iter(|| ed25519_dalek::verify_batch(black_box(&refs), &sigs, &vks).unwrap())
    });
    g.finish();
}

fn sealing(c: &mut Criterion) {
    let bob = NodeKey::from_secret_bytes(&[9; 32]);
    let plain = vec![0xA5u8; SIZE];
    let mut g = c.benchmark_group("seal_64KiB");
    g.throughput(Throughput::Bytes(SIZE as u64));

    // Baseline: raw ChaCha20-Poly1305, in place, fixed key and nonce.
    let raw = ChaCha20Poly1305::new(&Key::from([1u8; 32]));
    let nonce = Nonce::from([0u8; 12]);
    g.bench_function("raw_chacha20poly1305", |b| {
        let mut buf = plain.clone();
        b.iter(|| {
            raw.encrypt_inout_detached(&nonce, b"", buf.as_mut_slice().into())
                .unwrap()
        })
    });

    // Session form: one key agreement up front, then numbered messages.
    let (_, mut sealer) = Sealer::new(&bob.node_id(), b"bench").unwrap();
    g.bench_function("session_seal", |b| {
        b.iter_batched_ref(
            || {
                let mut v = Vec::with_capacity(SIZE + crypto::TAG_LEN);
                v.extend_from_slice(&plain);
                v
            },
            |buf| sealer.seal_in_place(b"", buf).unwrap(),
            BatchSize::LargeInput,
        )
    });

    // Each number opens once, so every iteration opens a freshly sealed message
    // (the sealing happens in the untimed setup).
    let (enc_open, mut sealer_for_open) = Sealer::new(&bob.node_id(), b"bench-open").unwrap();
    let mut opener = Opener::new(&bob, &enc_open, b"bench-open").unwrap();
    g.bench_function("session_open", |b| {
        b.iter_batched_ref(
            || sealer_for_open.seal(b"", &plain).unwrap(),
            |(seq, ct)| opener.open_in_place(*seq, b"", ct).unwrap(),
            BatchSize::LargeInput,
        )
    });

    // One-shot form: an ephemeral X25519 agreement per message.
    g.bench_function("oneshot_seal", |b| {
        b.iter(|| crypto::seal(&bob.node_id(), b"", black_box(&plain)).unwrap())
    });
    let sealed = crypto::seal(&bob.node_id(), b"", &plain).unwrap();
    g.bench_function("oneshot_open", |b| {
        b.iter(|| crypto::open(&bob, b"", black_box(&sealed)).unwrap())
    });
    g.finish();
}

fn frames(c: &mut Criterion) {
    let key = NodeKey::from_secret_bytes(&[3; 32]);
    let heartbeat = Payload::Heartbeat(Heartbeat {
        seq: 42,
        metrics: HealthMetrics {
            latency_ms: Some(12.0),
            battery_percent: Some(64.0),
            charging: Some(false),
            memory_percent: Some(41.0),
            cpu_percent: Some(17.0),
            disk_free_gb: Some(120.5),
            thermal: Some(Thermal::Nominal),
            ..Default::default()
        },
    });
    let chunk = Payload::FileChunk(FileChunk {
        transfer_id: MessageId([1; 16]),
        index: 3,
        offset: 3 * SIZE as u64,
        total_size: 10 * SIZE as u64,
        chunk_hash: [2; 32],
        data: serde_bytes::ByteBuf::from(vec![0x33; SIZE]),
    });
    for (name, payload) in [("heartbeat", heartbeat), ("file_chunk_64KiB", chunk)] {
        let signed = Envelope::new(key.node_id(), Destination::Broadcast, NOW, payload.clone())
            .sign(&key)
            .unwrap();
        let frame = signed.to_frame().unwrap();
        let mut g = c.benchmark_group(format!("frame_{name}"));
        g.throughput(Throughput::Elements(1));
        g.bench_function("encode", |b| {
            let mut out = Vec::with_capacity(frame.len());
            b.iter(|| {
                out.clear();
                signed.write_frame(&mut out, DEFAULT_MAX_FRAME_LEN).unwrap();
            })
        });
        g.bench_function("decode", |b| {
            b.iter(|| decode_frame(black_box(&frame), DEFAULT_MAX_FRAME_LEN).unwrap())
        });
        g.bench_function("sign_and_encode", |b| {
            b.iter_batched(
                || Envelope::new(key.node_id(), Destination::Broadcast, NOW, payload.clone()),
                |env| env.sign(&key).unwrap().to_frame().unwrap(),
                BatchSize::SmallInput,
            )
        });
        g.bench_function("decode_and_verify", |b| {
            b.iter(|| {
                decode_frame(black_box(&frame), DEFAULT_MAX_FRAME_LEN)
                    .unwrap()
                    .0
                    .verify()
                    .unwrap()
            })
        });
        g.finish();
    }
}

criterion_group!(benches, signatures, sealing, frames);
criterion_main!(benches);
