use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::events::{Received, Subscription};
use crate::registry::scopes;
use crate::storage::MemoryStorage;

const T0: Timestamp = Timestamp::from_millis(1_750_000_000_000);

struct Setup {
    primary_key: NodeKey,
    primary: PrimaryPairing,
    registry: Registry,
    events: EventBus,
    store: Arc<dyn Storage>,
}

fn setup() -> Setup {
    let primary_key = NodeKey::from_secret_bytes(&[100; 32]);
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let events = EventBus::new();
    let registry = Registry::new(store.clone(), events.clone());
    let primary = PrimaryPairing::new(
        primary_key.node_id(),
        store.clone(),
        registry.clone(),
        events.clone(),
        PairingConfig::default(),
    );
    Setup {
        primary_key,
        primary,
        registry,
        events,
        store,
    }
}

fn device(seed: u8, primary: NodeId) -> (NodeKey, DevicePairing, PairingMessage) {
    let key = NodeKey::from_secret_bytes(&[seed; 32]);
    let info = DeviceInfo {
        device_id: format!("hw-{seed}"),
        name: format!("Phone {seed}"),
        platform: Platform::Ios,
    };
    let (session, request) =
        DevicePairing::start(key.node_id(), primary, info, T0, &PairingConfig::default());
    (key, session, request)
}

fn events_of(sub: &mut Subscription) -> Vec<String> {
    let mut v = vec![];
    while let Some(Received::Event(e)) = sub.try_recv() {
        v.push(e.kind.clone());
    }
    v
}

/// Runs approve → challenge → device → answer → primary once.
fn attempt(
    s: &Setup,
    dev_key: &NodeKey,
    dev: &mut DevicePairing,
    request_id: &str,
    code: &PairingCode,
) -> (DeviceStep, Result<Paired, PairingError>) {
    let (to, challenge) = s.primary.approve(request_id, code, T0).unwrap();
    assert_eq!(to, dev_key.node_id());
    let step = dev
        .handle(s.primary_key.node_id(), challenge, dev_key, T0)
        .unwrap();
    let answer = match &step {
        DeviceStep::Send(m) | DeviceStep::CodeMismatch(m) => m.clone(),
        DeviceStep::Paired(_) => panic!("paired before the grant"),
    };
    let result = s.primary.on_message(dev_key.node_id(), answer, T0);
    (step, result)
}

#[test]
fn pairing_succeeds_end_to_end() {
    let s = setup();
    let mut sub = s.events.subscribe("pairing.*", 16).unwrap();
    let (dev_key, mut dev, request) = device(1, s.primary_key.node_id());
    assert_eq!(dev.code().as_str().len(), 6);
    let record = s
        .primary
        .on_request(dev_key.node_id(), request, T0)
        .unwrap();
    assert_eq!(record.status, PairingStatus::Pending);
    assert_eq!(record.device_name, "Phone 1");
    assert_eq!(s.primary.pending(T0).unwrap().len(), 1);

    let code = dev.code().clone();
    let (step, result) = attempt(&s, &dev_key, &mut dev, &record.request_id, &code);
    assert!(matches!(
        step,
        DeviceStep::Send(PairingMessage::Confirm { .. })
    ));
    let paired = result.unwrap();
    assert_eq!(paired.device.node, dev_key.node_id());

    let grant = match dev
        .handle(s.primary_key.node_id(), paired.reply, &dev_key, T0)
        .unwrap()
    {
        DeviceStep::Paired(g) => g,
        other => panic!("{other:?}"),
    };
    assert_eq!(grant.primary, s.primary_key.node_id());
    // The token works at the gate; the request is completed; events were published.
    s.registry
        .check(
            &dev_key.node_id(),
            grant.token.as_bytes(),
            scopes::COMMANDS_RUN,
        )
        .unwrap();
    let stored: PairingRequestRecord = s.store.load(&record.request_id).unwrap().unwrap();
    assert_eq!(stored.status, PairingStatus::Completed);
    assert!(s.primary.pending(T0).unwrap().is_empty());
    assert_eq!(
        events_of(&mut sub),
        ["pairing.request_received", "pairing.approved"]
    );
}

#[test]
fn wrong_code_is_an_error_and_five_void_the_request() {
    let s = setup();
    let mut sub = s.events.subscribe("pairing.expired", 16).unwrap();
    let (dev_key, mut dev, request) = device(1, s.primary_key.node_id());
    let rid = s
        .primary
        .on_request(dev_key.node_id(), request, T0)
        .unwrap()
        .request_id;
    let right = dev.code().clone();
    let wrong = PairingCode::parse(if right.as_str() == "000000" {
        "111111"
    } else {
        "000000"
    })
    .unwrap();
    for left in (1..=4).rev() {
        let (step, result) = attempt(&s, &dev_key, &mut dev, &rid, &wrong);
        assert!(matches!(
            step,
            DeviceStep::CodeMismatch(PairingMessage::Retry { .. })
        ));
        assert!(
            matches!(result, Err(PairingError::InvalidCode { attempts_left }) if attempts_left == left)
        );
    }
    let (_, result) = attempt(&s, &dev_key, &mut dev, &rid, &wrong);
    assert!(matches!(result, Err(PairingError::TooManyAttempts)));
    // Void: even the right code is refused now.
    assert!(matches!(
        s.primary.approve(&rid, &right, T0),
        Err(PairingError::TooManyAttempts)
    ));
    assert!(s.registry.get(&dev_key.node_id()).unwrap().is_none());
    assert_eq!(events_of(&mut sub), ["pairing.expired"]);
}

#[test]
fn a_mistyped_code_can_be_corrected() {
    let s = setup();
    let (dev_key, mut dev, request) = device(1, s.primary_key.node_id());
    let rid = s
        .primary
        .on_request(dev_key.node_id(), request, T0)
        .unwrap()
        .request_id;
    let right = dev.code().clone();
    let wrong = PairingCode::parse(if right.as_str() == "123456" {
        "654321"
    } else {
        "123456"
    })
    .unwrap();
    let (_, result) = attempt(&s, &dev_key, &mut dev, &rid, &wrong);
    assert!(matches!(
        result,
        Err(PairingError::InvalidCode { attempts_left: 4 })
    ));
    let (_, result) = attempt(&s, &dev_key, &mut dev, &rid, &right);
    let paired = result.unwrap();
    assert!(matches!(
        dev.handle(s.primary_key.node_id(), paired.reply, &dev_key, T0)
            .unwrap(),
        DeviceStep::Paired(_)
    ));
}

#[test]
fn requests_expire_through_the_clock() {
    let s = setup();
    let mut sub = s.events.subscribe("pairing.*", 16).unwrap();
    let (dev_key, mut dev, request) = device(1, s.primary_key.node_id());
    let rid = s
        .primary
        .on_request(dev_key.node_id(), request, T0)
        .unwrap()
        .request_id;
    let almost = T0 + Duration::from_secs(24 * 3600 - 1);
    assert_eq!(s.primary.pending(almost).unwrap().len(), 1);
    let later = T0 + Duration::from_secs(24 * 3600);
    assert!(matches!(
        s.primary.approve(&rid, dev.code(), later),
        Err(PairingError::Expired)
    ));
    assert!(s.primary.pending(later).unwrap().is_empty());
    assert_eq!(
        events_of(&mut sub),
        ["pairing.request_received", "pairing.expired"]
    );
    // The device's session expires too.
    let err = dev
        .handle(
            s.primary_key.node_id(),
            PairingMessage::Rejected {
                request_id: dev.request_id(),
                reason: None,
            },
            &dev_key,
            later,
        )
        .unwrap_err();
    assert!(matches!(err, PairingError::Expired));
}

#[test]
fn rejection_carries_the_reason_to_the_device() {
    let s = setup();
    let (dev_key, mut dev, request) = device(1, s.primary_key.node_id());
    let rid = s
        .primary
        .on_request(dev_key.node_id(), request, T0)
        .unwrap()
        .request_id;
    let (to, msg) = s
        .primary
        .reject(&rid, Some("not my phone".into()), T0)
        .unwrap();
    assert_eq!(to, dev_key.node_id());
    match dev.handle(s.primary_key.node_id(), msg, &dev_key, T0) {
        Err(PairingError::Rejected { reason }) => {
            assert_eq!(reason.as_deref(), Some("not my phone"))
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        s.primary.approve(&rid, dev.code(), T0),
        Err(PairingError::Rejected { .. })
    ));
    let err = s.primary.reject(&rid, None, T0).unwrap_err();
    assert!(err.to_string().contains("not my phone"), "{err}");
}

#[test]
fn already_paired_devices_must_unpair_first() {
    let s = setup();
    let (dev_key, mut dev, request) = device(1, s.primary_key.node_id());
    let rid = s
        .primary
        .on_request(dev_key.node_id(), request, T0)
        .unwrap()
        .request_id;
    let code = dev.code().clone();
    attempt(&s, &dev_key, &mut dev, &rid, &code).1.unwrap();
    // The same node again.
    let (_, _, again) = device(1, s.primary_key.node_id());
    let err = s
        .primary
        .on_request(dev_key.node_id(), again, T0)
        .unwrap_err();
    assert!(matches!(err, PairingError::AlreadyPaired(_)), "{err}");
    assert!(err.to_string().contains("unpair it first"));
    // Another node claiming the same hardware id.
    let other = NodeKey::from_secret_bytes(&[2; 32]);
    let (_, _, clone_req) = device(1, s.primary_key.node_id());
    assert!(matches!(
        s.primary.on_request(other.node_id(), clone_req, T0),
        Err(PairingError::AlreadyPaired(_))
    ));
    // After unpairing, pairing again works.
    s.registry.unpair(&dev_key.node_id(), T0).unwrap();
    let (_, _, fresh) = device(1, s.primary_key.node_id());
    s.primary.on_request(dev_key.node_id(), fresh, T0).unwrap();
}

/// Mallory relays between the device and the primary. The transport
/// authenticates Mallory as Mallory, so the primary runs the exchange with
/// Mallory's id: even with the right code typed, the keys differ, both MACs
/// fail, both sides see it, and the request ends void. No token leaves.
#[test]
fn a_relaying_man_in_the_middle_without_the_code_fails() {
    let s = setup();
    let mallory = NodeKey::from_secret_bytes(&[66; 32]);
    let (dev_key, mut dev, request) = device(1, s.primary_key.node_id());
    let code = dev.code().clone();
    // Mallory forwards the device's request as its own.
    let record = s
        .primary
        .on_request(mallory.node_id(), request, T0)
        .unwrap();
    assert_eq!(record.device_node, mallory.node_id());
    let mut primary_saw = vec![];
    let mut device_saw = vec![];
    for _ in 0..5 {
        // The user types the correct code shown on the real device.
        let (to, challenge) = s.primary.approve(&record.request_id, &code, T0).unwrap();
        assert_eq!(to, mallory.node_id());
        // Mallory relays the challenge; the device sees it as from the primary
        // (say Mallory also tampers nothing): its check fails.
        let step = dev
            .handle(s.primary_key.node_id(), challenge, &dev_key, T0)
            .unwrap();
        let answer = match step {
            DeviceStep::CodeMismatch(m) => {
                device_saw.push("mismatch");
                m
            }
            other => panic!("the device must not confirm: {other:?}"),
        };
        // Mallory relays the retry back as itself.
        match s.primary.on_message(mallory.node_id(), answer, T0) {
            Err(PairingError::InvalidCode { .. }) => primary_saw.push("invalid"),
            Err(PairingError::TooManyAttempts) => primary_saw.push("void"),
            other => panic!("the primary must not pair: {other:?}"),
        }
    }
    assert_eq!(device_saw, ["mismatch"; 5]);
    assert_eq!(
        primary_saw,
        ["invalid", "invalid", "invalid", "invalid", "void"]
    );
    assert!(s.registry.list().unwrap().is_empty());

    // Mallory forging the device's confirmation does not work either: the
    // request is void, and a fresh one with a guessed MAC is refused.
    let (_, _, req2) = device(3, s.primary_key.node_id());
    let r2 = s.primary.on_request(mallory.node_id(), req2, T0).unwrap();
    let (_, _) = s.primary.approve(&r2.request_id, &code, T0).unwrap();
    let forged = PairingMessage::Confirm {
        request_id: parse_request_id(&r2.request_id).unwrap(),
        mac: [0u8; 32],
    };
    assert!(matches!(
        s.primary.on_message(mallory.node_id(), forged, T0),
        Err(PairingError::InvalidCode { attempts_left: 4 })
    ));
}

#[test]
fn messages_from_the_wrong_node_are_refused() {
    let s = setup();
    let (dev_key, mut dev, request) = device(1, s.primary_key.node_id());
    let rid = s
        .primary
        .on_request(dev_key.node_id(), request, T0)
        .unwrap()
        .request_id;
    let (_, challenge) = s.primary.approve(&rid, dev.code(), T0).unwrap();
    let impostor = NodeKey::from_secret_bytes(&[9; 32]).node_id();
    assert!(matches!(
        dev.handle(impostor, challenge.clone(), &dev_key, T0),
        Err(PairingError::WrongPeer { .. })
    ));
    let answer = match dev
        .handle(s.primary_key.node_id(), challenge, &dev_key, T0)
        .unwrap()
    {
        DeviceStep::Send(m) => m,
        other => panic!("{other:?}"),
    };
    assert!(matches!(
        s.primary.on_message(impostor, answer.clone(), T0),
        Err(PairingError::WrongPeer { .. })
    ));
    // The genuine answer still completes.
    s.primary.on_message(dev_key.node_id(), answer, T0).unwrap();
}

#[test]
fn unknown_requests_and_tampered_grants() {
    let s = setup();
    assert!(matches!(
        s.primary.approve(
            "00112233445566778899aabbccddeeff",
            &PairingCode::generate(),
            T0
        ),
        Err(PairingError::UnknownRequest(_))
    ));
    let (dev_key, mut dev, request) = device(1, s.primary_key.node_id());
    let rid = s
        .primary
        .on_request(dev_key.node_id(), request, T0)
        .unwrap()
        .request_id;
    let code = dev.code().clone();
    let paired = attempt(&s, &dev_key, &mut dev, &rid, &code).1.unwrap();
    let PairingMessage::Approved {
        request_id,
        mut sealed,
    } = paired.reply
    else {
        panic!()
    };
    sealed.ciphertext[0] ^= 1;
    assert!(matches!(
        dev.handle(
            s.primary_key.node_id(),
            PairingMessage::Approved { request_id, sealed },
            &dev_key,
            T0
        ),
        Err(PairingError::Grant(_))
    ));
}

#[test]
fn a_restarted_primary_can_still_approve() {
    let s = setup();
    let (dev_key, mut dev, request) = device(1, s.primary_key.node_id());
    let rid = s
        .primary
        .on_request(dev_key.node_id(), request, T0)
        .unwrap()
        .request_id;
    // A new PrimaryPairing over the same storage, as after a restart.
    let restarted = PrimaryPairing::new(
        s.primary_key.node_id(),
        s.store.clone(),
        s.registry.clone(),
        s.events.clone(),
        PairingConfig::default(),
    );
    let (_, challenge) = restarted.approve(&rid, dev.code(), T0).unwrap();
    let DeviceStep::Send(confirm) = dev
        .handle(s.primary_key.node_id(), challenge, &dev_key, T0)
        .unwrap()
    else {
        panic!()
    };
    restarted
        .on_message(dev_key.node_id(), confirm, T0)
        .unwrap();
}

#[test]
fn codes_are_six_digits_and_never_debug_printed() {
    for _ in 0..100 {
        let c = PairingCode::generate();
        assert!(c.as_str().len() == 6 && c.as_str().bytes().all(|b| b.is_ascii_digit()));
        assert_eq!(format!("{c:?}"), "PairingCode(******)");
    }
    assert_eq!(PairingCode::parse("123 456").unwrap().as_str(), "123456");
    assert_eq!(PairingCode::parse("123-456").unwrap().as_str(), "123456");
    for bad in ["12345", "1234567", "12a456", ""] {
        assert!(PairingCode::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn key_confirmation_fails_closed_when_the_mac_cannot_be_computed() {
    // HKDF refuses a pseudo-random key shorter than its hash: no MAC, and
    // no all-zero MAC that both sides would "agree" on.
    assert!(confirm_mac(&[7u8; 8], b"device", b"transcript").is_none());
    assert!(!mac_matches(
        &[7u8; 8],
        b"device",
        b"transcript",
        &[0u8; 32]
    ));
    let good = confirm_mac(&[7u8; 32], b"device", b"transcript").unwrap();
    assert!(mac_matches(&[7u8; 32], b"device", b"transcript", &good));
    assert!(!mac_matches(&[7u8; 32], b"primary", b"transcript", &good));
}

#[test]
fn a_rogue_primary_gets_five_wrong_challenges_and_no_more() {
    // A primary that does not void requests (the first mDNS advertiser a
    // worker finds, say) trying code after code.
    let s = setup();
    let rogue = PrimaryPairing::new(
        s.primary_key.node_id(),
        s.store.clone(),
        s.registry.clone(),
        s.events.clone(),
        PairingConfig {
            max_attempts: 200,
            ..PairingConfig::default()
        },
    );
    let primary = s.primary_key.node_id();
    let (key, mut dev, request) = device(9, primary);
    rogue.on_request(key.node_id(), request, T0).unwrap();
    let rid = dev.request_id().to_string();
    let mut mismatches = 0;
    for guess in 0..20u32 {
        let code = PairingCode::parse(&format!("{guess:06}")).unwrap();
        if code.as_str() == dev.code().as_str() {
            continue;
        }
        let (_, challenge) = rogue.approve(&rid, &code, T0).unwrap();
        match dev.handle(primary, challenge, &key, T0) {
            Ok(DeviceStep::CodeMismatch(retry)) => {
                mismatches += 1;
                assert!(matches!(
                    rogue.on_message(key.node_id(), retry, T0),
                    Err(PairingError::InvalidCode { .. })
                ));
            }
            Err(PairingError::TooManyAttempts) => {
                assert_eq!(mismatches, 5, "five wrong challenges void the attempt");
                assert_eq!(dev.attempts_left(), 0);
                // And it stays void, whatever comes next.
                let (_, again) = rogue
                    .approve(&rid, &PairingCode::parse(dev.code().as_str()).unwrap(), T0)
                    .unwrap();
                assert!(matches!(
                    dev.handle(primary, again, &key, T0),
                    Err(PairingError::TooManyAttempts)
                ));
                return;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    panic!("the device kept answering a rogue primary");
}
