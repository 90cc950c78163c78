use std::time::Duration;

use proptest::prelude::*;
use serde_bytes::ByteBuf;

use super::*;
use crate::crypto::{EncapsulatedKey, SealedBox};
use crate::identity::NodeKey;

const NOW: Timestamp = Timestamp::from_millis(1_700_000_000_000);

fn key(seed: u8) -> NodeKey {
    NodeKey::from_secret_bytes(&[seed; 32])
}

fn json(v: serde_json::Value) -> JsonText {
    JsonText::from_value(&v).unwrap()
}

/// One example of every payload kind. The match makes adding a variant
/// without extending this list a compile error.
fn one_of_each() -> Vec<Payload> {
    let id = MessageId([7; 16]);
    let node = key(9).node_id();
    let all = vec![
        Payload::Heartbeat(Heartbeat {
            seq: 3,
            metrics: HealthMetrics {
                latency_ms: Some(12.5),
                battery_percent: Some(80.0),
                thermal: Some(Thermal::Fair),
                ..Default::default()
            },
        }),
        Payload::Command(Command {
            command_id: id,
            name: "chat.send".into(),
            args: json(serde_json::json!({"text": "hi"})),
            timeout_ms: 30_000,
            usage: None,
        }),
        Payload::CommandResult(CommandResult {
            command_id: id,
            outcome: CommandOutcome::Err {
                code: "blocked_command".into(),
                message: "blocked by rule shell.*".into(),
            },
        }),
        Payload::Event(EventPayload {
            kind: "device.online".into(),
            data: JsonText::null(),
        }),
        Payload::PeerAnnounce(PeerAnnounce {
            node,
            name: "laptop".into(),
            addresses: vec![
                "127.0.0.1:4433".parse().unwrap(),
                "[::1]:4433".parse().unwrap(),
            ],
        }),
        Payload::PeerExchange(PeerExchange { peers: vec![] }),
        Payload::Pairing(PairingMessage::Request {
            request_id: id,
            device_id: "ios-1".into(),
            device_name: "Phone".into(),
            platform: Platform::Ios,
            pake: ByteBuf::from(vec![1, 2, 3]),
        }),
        Payload::Ack(Ack { ids: vec![id, id] }),
        Payload::DbSync(DbSync {
            table: "notes".into(),
            op: DbOp::Update,
            key: "n1".into(),
            row: json(serde_json::json!({"title": "t"})),
        }),
        Payload::FileChunk(FileChunk {
            transfer_id: id,
            index: 1,
            offset: 65_536,
            total_size: 200_000,
            chunk_hash: [3; 32],
            data: ByteBuf::from(vec![0xAB; 1000]),
        }),
        Payload::MediaFrame(MediaFrame {
            stream_id: 5,
            media_type: MediaType::Audio,
            codec: "opus".into(),
            sequence: 99,
            timestamp_us: 20_000,
            data: ByteBuf::from(vec![1; 160]),
        }),
        Payload::ConfigUpdate(ConfigUpdate {
            key: "heartbeat_interval".into(),
            value: json(serde_json::json!(30)),
            version: 2,
        }),
        Payload::Custom(CustomJson {
            app_type: "game.move".into(),
            data: json(serde_json::json!({"x": 1})),
        }),
        Payload::Sealed(SealedBox {
            enc: EncapsulatedKey([4; 32]),
            ciphertext: vec![5; 40],
        }),
        Payload::Session(SessionMessage::Hello { token: [6; 32] }),
        Payload::ReplicaSync(vec![7; 12]),
        Payload::LedgerSync(vec![8; 12]),
    ];
    for p in &all {
        match p {
            Payload::Heartbeat(_)
            | Payload::Command(_)
            | Payload::CommandResult(_)
            | Payload::Event(_)
            | Payload::PeerAnnounce(_)
            | Payload::PeerExchange(_)
            | Payload::Pairing(_)
            | Payload::Ack(_)
            | Payload::DbSync(_)
            | Payload::FileChunk(_)
            | Payload::MediaFrame(_)
            | Payload::ConfigUpdate(_)
            | Payload::Custom(_)
            | Payload::Sealed(_)
            | Payload::Session(_)
            | Payload::ReplicaSync(_)
            | Payload::LedgerSync(_) => {}
        }
    }
    all
}

fn round_trip(payload: Payload) -> SignedEnvelope {
    let k = key(1);
    let signed = Envelope::new(k.node_id(), Destination::Broadcast, NOW, payload)
        .sign(&k)
        .unwrap();
    let frame = signed.to_frame().unwrap();
    assert_eq!(frame.len(), signed.frame_len());
    let (unverified, used) = decode_frame(&frame, DEFAULT_MAX_FRAME_LEN).unwrap();
    assert_eq!(used, frame.len());
    let verified = unverified.verify().unwrap();
    assert_eq!(verified, signed);
    verified
}

#[test]
fn every_payload_kind_round_trips() {
    let all = one_of_each();
    let kinds: std::collections::HashSet<_> = all.iter().map(Payload::kind).collect();
    assert_eq!(kinds.len(), 17);
    for p in all {
        round_trip(p);
    }
}

#[test]
fn file_chunk_bytes_are_raw_on_the_wire() {
    let data = vec![0x5A; 4096];
    let k = key(1);
    let frame = Envelope::new(
        k.node_id(),
        Destination::Broadcast,
        NOW,
        Payload::FileChunk(FileChunk {
            transfer_id: MessageId([0; 16]),
            index: 0,
            offset: 0,
            total_size: 4096,
            chunk_hash: [0; 32],
            data: ByteBuf::from(data.clone()),
        }),
    )
    .sign(&k)
    .unwrap()
    .to_frame()
    .unwrap();
    assert!(frame.windows(data.len()).any(|w| w == data.as_slice()));
    // Overhead: header, hop, signature, ids, keys: well under 200 bytes.
    assert!(frame.len() < data.len() + 200, "{}", frame.len());
}

#[test]
fn wrong_signature_is_refused() {
    let k = key(1);
    let mallory = key(2);
    let signed = Envelope::new(
        k.node_id(),
        Destination::Broadcast,
        NOW,
        Payload::Ack(Ack { ids: vec![] }),
    )
    .sign(&k)
    .unwrap();
    let mut frame = signed.to_frame().unwrap();
    // Replace the signature with Mallory's over the same bytes.
    let forged = mallory.sign(b"whatever");
    frame[FRAME_HEADER_LEN + 1..FRAME_HEADER_LEN + 65].copy_from_slice(&forged);
    let (unverified, _) = decode_frame(&frame, DEFAULT_MAX_FRAME_LEN).unwrap();
    assert_eq!(
        unverified.verify().unwrap_err(),
        VerifyError::BadSignature {
            from: k.node_id(),
            id: signed.envelope().id
        }
    );
}

#[test]
fn signing_with_another_key_is_refused() {
    let err = Envelope::new(
        key(1).node_id(),
        Destination::Broadcast,
        NOW,
        Payload::Ack(Ack { ids: vec![] }),
    )
    .sign(&key(2))
    .unwrap_err();
    assert!(matches!(err, EnvelopeError::SignerMismatch { .. }));
}

#[test]
fn the_hop_limit_is_covered_by_the_signature() {
    let k = key(1);
    let signed = Envelope::new(
        k.node_id(),
        Destination::Broadcast,
        NOW,
        Payload::Ack(Ack { ids: vec![] }),
    )
    .sign_with_hop_limit(&k, 3)
    .unwrap();
    let frame = signed.to_frame().unwrap();
    let back = decode_frame(&frame, DEFAULT_MAX_FRAME_LEN)
        .unwrap()
        .0
        .verify()
        .unwrap();
    assert_eq!(back.hop_limit(), 3);
    // Anyone changing it on the way breaks the signature.
    for hops in [0u8, 2, 4, 255] {
        let mut tampered = frame.clone();
        tampered[FRAME_HEADER_LEN] = hops;
        let (u, _) = decode_frame(&tampered, DEFAULT_MAX_FRAME_LEN).unwrap();
        assert!(matches!(u.verify(), Err(VerifyError::BadSignature { .. })));
    }
}

#[test]
fn replay_guard_refuses_replays_and_skew() {
    let k = key(1);
    let mut guard = ReplayGuard::new(ReplayConfig::default().max_skew(Duration::from_secs(60)));
    let make = |ts: Timestamp| {
        Envelope::new(
            k.node_id(),
            Destination::Broadcast,
            ts,
            Payload::Ack(Ack { ids: vec![] }),
        )
        .sign(&k)
        .unwrap()
    };
    let m = make(NOW);
    guard.admit(&m, NOW).unwrap();
    assert_eq!(
        guard.admit(&m, NOW + Duration::from_secs(1)).unwrap_err(),
        ReplayError::Replayed {
            from: k.node_id(),
            id: m.envelope().id
        }
    );
    // The edges of the window are inclusive.
    guard
        .admit(&make(NOW - Duration::from_secs(60)), NOW)
        .unwrap();
    guard
        .admit(&make(NOW + Duration::from_secs(60)), NOW)
        .unwrap();
    assert!(matches!(
        guard.admit(&make(NOW - Duration::from_millis(60_001)), NOW),
        Err(ReplayError::Stale { .. })
    ));
    assert!(matches!(
        guard.admit(&make(NOW + Duration::from_millis(60_001)), NOW),
        Err(ReplayError::FromFuture { .. })
    ));
    // Once out of the window an id is forgotten, and the old message is stale.
    let later = NOW + Duration::from_secs(120);
    assert!(matches!(
        guard.admit(&m, later),
        Err(ReplayError::Stale { .. })
    ));
    guard.admit(&make(later), later).unwrap();
    // Left: the message stamped NOW+60s (still inside the window) and the new one.
    assert_eq!(guard.len(), 2);
}

#[test]
fn the_same_id_from_two_senders_is_two_messages() {
    let a = key(1);
    let b = key(2);
    let id = MessageId([1; 16]);
    let mut guard = ReplayGuard::new(ReplayConfig::default());
    for k in [&a, &b] {
        let mut env = Envelope::new(
            k.node_id(),
            Destination::Broadcast,
            NOW,
            Payload::Ack(Ack { ids: vec![] }),
        );
        env.id = id;
        guard.admit(&env.sign(k).unwrap(), NOW).unwrap();
    }
}

#[test]
fn replay_guard_at_capacity_refuses_rather_than_forgets() {
    let k = key(1);
    let mut guard = ReplayGuard::new(ReplayConfig::default().capacity(3));
    let msgs: Vec<_> = (0..5)
        .map(|i| {
            Envelope::new(
                k.node_id(),
                Destination::Broadcast,
                NOW + Duration::from_millis(i),
                Payload::Ack(Ack { ids: vec![] }),
            )
            .sign(&k)
            .unwrap()
        })
        .collect();
    for m in &msgs[1..4] {
        guard.admit(m, NOW).unwrap();
    }
    // Admitting a fourth evicts the oldest (ts +1) and raises the floor past it.
    guard.admit(&msgs[4], NOW).unwrap();
    assert_eq!(guard.len(), 3);
    assert!(matches!(
        guard.admit(&msgs[1], NOW),
        Err(ReplayError::Stale { .. })
    ));
    assert!(matches!(
        guard.admit(&msgs[0], NOW),
        Err(ReplayError::Stale { .. })
    ));
    assert!(matches!(
        guard.admit(&msgs[2], NOW),
        Err(ReplayError::Replayed { .. })
    ));
}

#[test]
fn sealed_envelope_is_readable_only_by_the_recipient() {
    let alice = key(1);
    let bob = key(2);
    let relay = key(3);
    let inner = Payload::Command(Command {
        command_id: MessageId([1; 16]),
        name: "config".into(),
        args: JsonText::null(),
        timeout_ms: 1000,
        usage: None,
    });
    let env = Envelope::new_sealed(alice.node_id(), bob.node_id(), NOW, &inner).unwrap();
    let signed = env.sign(&alice).unwrap();
    let frame = signed.to_frame().unwrap();
    let received = decode_frame(&frame, DEFAULT_MAX_FRAME_LEN)
        .unwrap()
        .0
        .verify()
        .unwrap();
    assert_eq!(received.envelope().open_sealed(&bob).unwrap(), inner);
    assert!(matches!(
        received.envelope().open_sealed(&relay),
        Err(EnvelopeError::Crypto(crate::crypto::CryptoError::Decrypt))
    ));
    // The box moved into another envelope (new id) no longer opens.
    let mut moved = received.envelope().clone();
    moved.id = MessageId::random();
    assert!(moved.open_sealed(&bob).is_err());
    // A plain payload is not sealed.
    assert_eq!(
        round_trip(Payload::Ack(Ack { ids: vec![] }))
            .envelope()
            .open_sealed(&bob),
        Err(EnvelopeError::NotSealed)
    );
}

#[test]
fn oversize_frames_are_refused_both_ways() {
    let k = key(1);
    let big = Envelope::new(
        k.node_id(),
        Destination::Broadcast,
        NOW,
        Payload::Custom(CustomJson {
            app_type: "x".into(),
            data: JsonText::new(format!("\"{}\"", "a".repeat(2000))).unwrap(),
        }),
    )
    .sign(&k)
    .unwrap();
    let mut out = Vec::new();
    assert!(matches!(
        big.write_frame(&mut out, 1000),
        Err(EnvelopeError::TooLarge { .. })
    ));
    assert!(out.is_empty());
    let frame = big.to_frame().unwrap();
    assert_eq!(
        decode_frame(&frame, 1000).unwrap_err(),
        DecodeError::FrameTooLarge {
            len: frame.len() - FRAME_HEADER_LEN,
            max: 1000
        }
    );
    let mut header = vec![FRAME_VERSION];
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        decode_frame(&header, usize::MAX),
        Err(DecodeError::FrameTooLarge {
            max: MAX_FRAME_LEN_LIMIT,
            ..
        })
    ));
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
    let (used, res) = dec.feed(&header);
    assert_eq!(used, FRAME_HEADER_LEN);
    assert!(res.unwrap().unwrap_err().is_fatal());
    assert!(matches!(
        dec.feed(&frame),
        (0, Some(Err(DecodeError::Poisoned)))
    ));
}

#[test]
fn decode_errors_are_typed() {
    assert_eq!(
        decode_frame(&[1, 0], DEFAULT_MAX_FRAME_LEN).unwrap_err(),
        DecodeError::Truncated { needed: 5, got: 2 }
    );
    assert_eq!(
        decode_frame(&[9, 0, 0, 0, 0], DEFAULT_MAX_FRAME_LEN).unwrap_err(),
        DecodeError::UnsupportedVersion(9)
    );
    assert_eq!(
        decode_frame(&[1, 0, 0, 0, 10, 1], DEFAULT_MAX_FRAME_LEN).unwrap_err(),
        DecodeError::Truncated { needed: 15, got: 6 }
    );
    assert_eq!(
        decode_frame(&[1, 0, 0, 0, 3, 1, 2, 3], DEFAULT_MAX_FRAME_LEN).unwrap_err(),
        DecodeError::Truncated { needed: 65, got: 3 }
    );
    // A valid frame with an extra byte inside the body.
    let signed = round_trip(Payload::Ack(Ack { ids: vec![] }));
    let mut frame = signed.to_frame().unwrap();
    frame.push(0);
    let len = (frame.len() - FRAME_HEADER_LEN) as u32;
    frame[1..5].copy_from_slice(&len.to_be_bytes());
    assert_eq!(
        decode_frame(&frame, DEFAULT_MAX_FRAME_LEN).unwrap_err(),
        DecodeError::TrailingBytes(1)
    );
    // A payload variant this version does not know.
    let mut body = vec![0u8; 65];
    let mut env = postcard::to_allocvec(signed.envelope()).unwrap();
    let payload_tag_pos = 16 + 32 + 1; // id, from, Destination::Broadcast tag
    let ts_len = postcard::to_allocvec(&signed.envelope().timestamp)
        .unwrap()
        .len();
    env[payload_tag_pos + ts_len] = 99;
    body.append(&mut env);
    let mut frame = vec![FRAME_VERSION];
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    assert!(matches!(
        decode_frame(&frame, DEFAULT_MAX_FRAME_LEN),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn streaming_decoder_handles_byte_at_a_time() {
    let frames: Vec<_> = one_of_each()
        .into_iter()
        .map(|p| {
            let k = key(1);
            Envelope::new(k.node_id(), Destination::Broadcast, NOW, p)
                .sign(&k)
                .unwrap()
        })
        .collect();
    let mut stream = Vec::new();
    for f in &frames {
        f.write_frame(&mut stream, DEFAULT_MAX_FRAME_LEN).unwrap();
    }
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
    let mut got = Vec::new();
    for b in &stream {
        let (used, res) = dec.feed(std::slice::from_ref(b));
        assert_eq!(used, 1);
        if let Some(r) = res {
            got.push(r.unwrap().verify().unwrap());
        }
    }
    assert_eq!(got, frames);
    assert_eq!(dec.buffered(), 0);
}

fn arb_json() -> impl Strategy<Value = JsonText> {
    prop_oneof![
        Just(JsonText::null()),
        any::<i64>().prop_map(|n| json(serde_json::json!(n))),
        ".{0,20}".prop_map(|s| json(serde_json::json!({ "s": s }))),
    ]
}

fn arb_bytes(max: usize) -> impl Strategy<Value = ByteBuf> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(ByteBuf::from)
}

fn arb_id() -> impl Strategy<Value = MessageId> {
    any::<[u8; 16]>().prop_map(MessageId)
}

fn arb_node() -> impl Strategy<Value = NodeId> {
    any::<[u8; 32]>().prop_map(|s| NodeKey::from_secret_bytes(&s).node_id())
}

fn arb_f64() -> impl Strategy<Value = Option<f64>> {
    proptest::option::of(-1e9f64..1e9)
}

fn arb_thermal() -> impl Strategy<Value = Thermal> {
    prop_oneof![
        Just(Thermal::Nominal),
        Just(Thermal::Fair),
        Just(Thermal::Serious),
        Just(Thermal::Critical)
    ]
}

fn arb_announce() -> impl Strategy<Value = PeerAnnounce> {
    // Scope ids and flow labels are host-local and not carried (see `PeerAnnounce`).
    let addr = any::<std::net::SocketAddr>().prop_map(|mut a| {
        if let std::net::SocketAddr::V6(v6) = &mut a {
            v6.set_scope_id(0);
            v6.set_flowinfo(0);
        }
        a
    });
    (arb_node(), ".{0,16}", proptest::collection::vec(addr, 0..3)).prop_map(
        |(node, name, addresses)| PeerAnnounce {
            node,
            name,
            addresses,
        },
    )
}

fn arb_pairing() -> impl Strategy<Value = PairingMessage> {
    let platform = prop_oneof![
        Just(Platform::Desktop),
        Just(Platform::Ios),
        Just(Platform::Android),
        Just(Platform::Web)
    ];
    prop_oneof![
        (arb_id(), ".{0,12}", ".{0,12}", platform, arb_bytes(64)).prop_map(
            |(request_id, device_id, device_name, platform, pake)| PairingMessage::Request {
                request_id,
                device_id,
                device_name,
                platform,
                pake
            }
        ),
        (arb_id(), arb_bytes(64), any::<[u8; 32]>()).prop_map(|(request_id, pake, mac)| {
            PairingMessage::Challenge {
                request_id,
                pake,
                mac,
            }
        }),
        (arb_id(), arb_bytes(64))
            .prop_map(|(request_id, pake)| PairingMessage::Retry { request_id, pake }),
        (arb_id(), any::<[u8; 32]>())
            .prop_map(|(request_id, mac)| PairingMessage::Confirm { request_id, mac }),
        (
            arb_id(),
            any::<[u8; 32]>(),
            proptest::collection::vec(any::<u8>(), 16..80)
        )
            .prop_map(|(request_id, enc, ciphertext)| PairingMessage::Approved {
                request_id,
                sealed: SealedBox {
                    enc: EncapsulatedKey(enc),
                    ciphertext
                }
            }),
        (arb_id(), proptest::option::of(".{0,20}"))
            .prop_map(|(request_id, reason)| PairingMessage::Rejected { request_id, reason }),
    ]
}

fn arb_payload() -> impl Strategy<Value = Payload> {
    let metrics = (
        (
            arb_f64(),
            arb_f64(),
            proptest::option::of(any::<bool>()),
            arb_f64(),
            arb_f64(),
        ),
        (
            arb_f64(),
            arb_f64(),
            proptest::option::of(any::<u64>()),
            proptest::option::of(arb_thermal()),
            proptest::option::of(any::<bool>()),
        ),
    )
        .prop_map(|((l, b, c, m, cpu), (d, s, p, t, lp))| HealthMetrics {
            latency_ms: l,
            battery_percent: b,
            charging: c,
            memory_percent: m,
            cpu_percent: cpu,
            disk_free_gb: d,
            sync_lag_ms: s,
            messages_pending: p,
            thermal: t,
            low_power_mode: lp,
        });
    let media_type = prop_oneof![
        Just(MediaType::Audio),
        Just(MediaType::Video),
        Just(MediaType::Data)
    ];
    let db_op = prop_oneof![Just(DbOp::Insert), Just(DbOp::Update), Just(DbOp::Delete)];
    prop_oneof![
        (any::<[u8; 32]>(), ".{0,12}", 0u8..3).prop_map(|(token, reason, which)| {
            Payload::Session(match which {
                0 => SessionMessage::Hello { token },
                1 => SessionMessage::Welcome,
                _ => SessionMessage::Bye { reason },
            })
        }),
        (any::<u64>(), metrics)
            .prop_map(|(seq, metrics)| Payload::Heartbeat(Heartbeat { seq, metrics })),
        (
            arb_id(),
            "[a-z.]{1,20}",
            arb_json(),
            any::<u32>(),
            proptest::option::of((
                proptest::option::of(0.0f64..1e6),
                proptest::option::of(any::<u64>()),
                any::<bool>()
            ))
        )
            .prop_map(|(command_id, name, args, timeout_ms, usage)| {
                Payload::Command(Command {
                    command_id,
                    name,
                    args,
                    timeout_ms,
                    usage: usage.map(|(cost, tokens, large)| CommandUsage {
                        cost,
                        tokens,
                        job_size: Some(if large {
                            JobSize::Large
                        } else {
                            JobSize::Small
                        }),
                    }),
                })
            }),
        (arb_id(), arb_json(), any::<bool>(), ".{0,10}").prop_map(|(command_id, v, ok, msg)| {
            Payload::CommandResult(CommandResult {
                command_id,
                outcome: if ok {
                    CommandOutcome::Ok(v)
                } else {
                    CommandOutcome::Err {
                        code: "x".into(),
                        message: msg,
                    }
                },
            })
        }),
        ("[a-z.]{1,20}", arb_json())
            .prop_map(|(kind, data)| Payload::Event(EventPayload { kind, data })),
        arb_announce().prop_map(Payload::PeerAnnounce),
        proptest::collection::vec(arb_announce(), 0..3)
            .prop_map(|peers| Payload::PeerExchange(PeerExchange { peers })),
        arb_pairing().prop_map(Payload::Pairing),
        proptest::collection::vec(arb_id(), 0..5).prop_map(|ids| Payload::Ack(Ack { ids })),
        (".{0,10}", db_op, ".{0,10}", arb_json()).prop_map(
            |(table, op, key, row)| Payload::DbSync(DbSync {
                table,
                op,
                key,
                row
            })
        ),
        (
            arb_id(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<[u8; 32]>(),
            arb_bytes(2048)
        )
            .prop_map(
                |(transfer_id, index, offset, total_size, chunk_hash, data)| Payload::FileChunk(
                    FileChunk {
                        transfer_id,
                        index,
                        offset,
                        total_size,
                        chunk_hash,
                        data
                    }
                )
            ),
        (
            any::<u64>(),
            media_type,
            "[a-z0-9]{0,8}",
            any::<u64>(),
            any::<u64>(),
            arb_bytes(512)
        )
            .prop_map(
                |(stream_id, media_type, codec, sequence, timestamp_us, data)| Payload::MediaFrame(
                    MediaFrame {
                        stream_id,
                        media_type,
                        codec,
                        sequence,
                        timestamp_us,
                        data
                    }
                )
            ),
        (".{0,10}", arb_json(), any::<u64>()).prop_map(|(key, value, version)| {
            Payload::ConfigUpdate(ConfigUpdate {
                key,
                value,
                version,
            })
        }),
        (".{0,10}", arb_json())
            .prop_map(|(app_type, data)| Payload::Custom(CustomJson { app_type, data })),
        (
            any::<[u8; 32]>(),
            proptest::collection::vec(any::<u8>(), 16..100)
        )
            .prop_map(|(enc, ciphertext)| Payload::Sealed(SealedBox {
                enc: EncapsulatedKey(enc),
                ciphertext
            })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn prop_every_payload_round_trips(
        payload in arb_payload(),
        to in proptest::option::of(arb_node()),
        ts in any::<u64>(),
        hops in any::<u8>(),
    ) {
        let k = key(1);
        let to = to.map_or(Destination::Broadcast, Destination::Node);
        let signed = Envelope::new(k.node_id(), to, Timestamp::from_millis(ts), payload)
            .sign_with_hop_limit(&k, hops)
            .unwrap();
        let frame = signed.to_frame().unwrap();
        let (u, used) = decode_frame(&frame, DEFAULT_MAX_FRAME_LEN).unwrap();
        prop_assert_eq!(used, frame.len());
        prop_assert_eq!(u.verify().unwrap(), signed);
    }

    #[test]
    fn prop_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096), max in 0usize..8192) {
        let _ = decode_frame(&bytes, max);
        let mut dec = FrameDecoder::new(max);
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let (used, res) = dec.feed(rest);
            prop_assert!(dec.buffered() <= FRAME_HEADER_LEN + max);
            if used == 0 {
                prop_assert!(matches!(res, Some(Err(DecodeError::Poisoned))));
                break;
            }
            rest = &rest[used..];
        }
    }

    #[test]
    fn prop_arbitrary_body_behind_valid_header_never_panics(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut frame = vec![FRAME_VERSION];
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(&body);
        if let Ok((u, _)) = decode_frame(&frame, DEFAULT_MAX_FRAME_LEN) {
            prop_assert!(u.verify().is_err());
        }
    }

    /// Flipping any byte of the signed part is caught: either the frame no
    /// longer decodes, or the signature fails. Never a valid, different message.
    #[test]
    fn prop_tampered_frames_are_caught(payload in arb_payload(), pos in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let k = key(1);
        let signed = Envelope::new(k.node_id(), Destination::Broadcast, NOW, payload).sign(&k).unwrap();
        let mut frame = signed.to_frame().unwrap();
        // Everything after the header, the hop limit included.
        let start = FRAME_HEADER_LEN;
        let i = start + pos.index(frame.len() - start);
        frame[i] ^= flip;
        match decode_frame(&frame, DEFAULT_MAX_FRAME_LEN) {
            Err(_) => {}
            Ok((u, _)) => prop_assert!(u.verify().is_err()),
        }
    }

    #[test]
    fn prop_stream_split_anywhere(payloads in proptest::collection::vec(arb_payload(), 1..5), cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8)) {
        let k = key(1);
        let frames: Vec<_> = payloads
            .into_iter()
            .map(|p| Envelope::new(k.node_id(), Destination::Broadcast, NOW, p).sign(&k).unwrap())
            .collect();
        let mut stream = Vec::new();
        for f in &frames {
            f.write_frame(&mut stream, DEFAULT_MAX_FRAME_LEN).unwrap();
        }
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len())).collect();
        points.push(stream.len());
        points.sort_unstable();
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        let mut got = Vec::new();
        let mut start = 0;
        for end in points {
            let mut rest = &stream[start..end];
            while !rest.is_empty() {
                let (used, res) = dec.feed(rest);
                rest = &rest[used..];
                if let Some(r) = res {
                    got.push(r.unwrap().verify().unwrap());
                }
            }
            start = end;
        }
        prop_assert_eq!(got, frames);
    }
}

#[test]
fn list_lengths_are_bounded_both_ways() {
    let k = key(1);
    let announce = PeerAnnounce {
        node: k.node_id(),
        name: "n".into(),
        addresses: vec!["127.0.0.1:1".parse().unwrap(); 17],
    };
    let err = Envelope::new(
        k.node_id(),
        Destination::Broadcast,
        NOW,
        Payload::PeerAnnounce(announce.clone()),
    )
    .sign(&k)
    .unwrap_err();
    assert!(
        matches!(err, EnvelopeError::Encode(ref m) if m.contains("16 addresses")),
        "{err}"
    );
    // 16 is fine.
    let mut ok = announce;
    ok.addresses.truncate(16);
    round_trip(Payload::PeerAnnounce(ok));
    // Frames whose Ack claims more ids than allowed are refused: with the data
    // present (the limit speaks) and without it (the input ends).
    let empty_ack = postcard::to_allocvec(&Envelope::new(
        k.node_id(),
        Destination::Broadcast,
        NOW,
        Payload::Ack(Ack { ids: vec![] }),
    ))
    .unwrap();
    let frame_with = |tail: &[u8]| {
        let mut env = empty_ack.clone();
        assert_eq!(env.pop(), Some(0)); // the empty list's length
        env.extend_from_slice(tail);
        let mut body = vec![0u8; 65];
        body.extend_from_slice(&env);
        let mut frame = vec![FRAME_VERSION];
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(&body);
        frame
    };
    let mut over = vec![0x81, 0x08]; // varint 1025
    over.extend_from_slice(&[0u8; 1025 * 16]);
    let huge = frame_with(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
    assert!(matches!(
        decode_frame(&huge, DEFAULT_MAX_FRAME_LEN),
        Err(DecodeError::Malformed(_))
    ));
    match decode_frame(&frame_with(&over), DEFAULT_MAX_FRAME_LEN) {
        Err(DecodeError::Malformed(m)) => assert!(m.contains("1024 ack ids"), "{m}"),
        other => panic!("{other:?}"),
    }
}

/// The fuzzer's seed corpus (`mesh-core/fuzz/seeds/frame_decoder`) holds one
/// valid frame per payload kind, behind the target's 2-byte prefix. This test
/// fails when they no longer decode (the format changed); regenerate with
/// `MESH_REGEN_FUZZ_SEEDS=1 cargo test -p mesh-core --lib fuzz_seeds`.
#[test]
fn fuzz_seeds_are_current() {
    const PREFIX: [u8; 2] = [0xff, 0x07]; // frame limit 255 * 64 bytes, 7-byte chunks
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/frame_decoder");
    if std::env::var_os("MESH_REGEN_FUZZ_SEEDS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        let k = key(1);
        for (i, p) in one_of_each().into_iter().enumerate() {
            let name = format!("{i:02}_{}.bin", p.kind());
            let env = Envelope::new(k.node_id(), Destination::Node(key(2).node_id()), NOW, p);
            let mut out = PREFIX.to_vec();
            env.sign(&k)
                .unwrap()
                .write_frame(&mut out, DEFAULT_MAX_FRAME_LEN)
                .unwrap();
            std::fs::write(dir.join(name), out).unwrap();
        }
    }
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert_eq!(bytes[..2], PREFIX);
        let max = usize::from(PREFIX[0]) * 64;
        let (u, used) = decode_frame(&bytes[2..], max).unwrap();
        assert_eq!(used, bytes.len() - 2);
        u.verify().unwrap();
        count += 1;
    }
    assert_eq!(count, one_of_each().len());
}
