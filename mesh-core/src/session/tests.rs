use std::time::Duration;

use super::*;
use crate::identity::NodeKey;
use crate::limits::{Rate, TokenBucket};
use crate::wire::{Ack, Command, JsonText};

fn t(ms: u64) -> Timestamp {
    Timestamp::from_millis(ms)
}

fn node() -> crate::identity::NodeId {
    NodeKey::from_secret_bytes(&[3; 32]).node_id()
}

fn hello() -> Payload {
    Payload::Session(SessionMessage::Hello { token: [7; 32] })
}

fn command() -> (MessageId, Payload) {
    let id = MessageId::random();
    (
        id,
        Payload::Command(Command {
            command_id: id,
            name: "notes.write".into(),
            args: JsonText::null(),
            timeout_ms: 1000,
            usage: None,
        }),
    )
}

fn ack() -> Payload {
    Payload::Ack(Ack { ids: vec![] })
}

fn drain(s: &mut DeviceSession) -> Vec<Output> {
    std::iter::from_fn(|| s.poll_output()).collect()
}

fn bucket(rate: Rate) -> TokenBucket {
    TokenBucket::new(rate, t(0))
}

fn open() -> DeviceSession {
    let mut s = DeviceSession::new(t(0), Duration::from_secs(5));
    let token = s.handle_hello(hello(), t(10), |token| {
        assert_eq!(token, &[7; 32]);
        Ok(())
    });
    assert_eq!(token, Some([7; 32]));
    assert_eq!(
        drain(&mut s),
        vec![
            Output::Opened,
            Output::Send(Payload::Session(SessionMessage::Welcome))
        ]
    );
    s
}

#[test]
fn a_hello_must_come_before_its_deadline() {
    let mut s = DeviceSession::new(t(1_000), Duration::from_secs(5));
    assert_eq!(s.poll_timeout(), Some(t(6_000)));
    s.handle_timeout(t(5_999));
    assert!(drain(&mut s).is_empty());
    s.handle_timeout(t(6_000));
    assert_eq!(
        drain(&mut s),
        vec![Output::Close {
            reason: ByeReason::HelloTimeout,
            send_bye: false
        }]
    );
    assert!(s.is_closed() && s.poll_timeout().is_none());
    // Nothing is taken after the end, a late hello included.
    assert_eq!(s.handle_hello(hello(), t(6_001), |_| Ok(())), None);
    assert!(drain(&mut s).is_empty());
}

#[test]
fn a_late_hello_is_refused_even_before_the_timer_fires() {
    let mut s = DeviceSession::new(t(0), Duration::from_secs(5));
    let called = std::cell::Cell::new(false);
    assert_eq!(
        s.handle_hello(hello(), t(9_000), |_| {
            called.set(true);
            Ok(())
        }),
        None
    );
    assert!(!called.get(), "the gate is not asked after the deadline");
    assert!(matches!(
        drain(&mut s)[..],
        [Output::Close {
            reason: ByeReason::HelloTimeout,
            ..
        }]
    ));
}

#[test]
fn a_first_message_that_is_not_a_hello_ends_the_session() {
    let mut s = DeviceSession::new(t(0), Duration::from_secs(5));
    assert_eq!(s.handle_hello(ack(), t(1), |_| Ok(())), None);
    assert_eq!(
        drain(&mut s),
        vec![Output::Close {
            reason: ByeReason::ProtocolViolation,
            send_bye: false
        }]
    );
}

#[test]
fn a_refused_hello_says_why_with_a_typed_reason() {
    for (err, reason) in [
        (AuthError::UnknownDevice(node()), ByeReason::Unpaired),
        (
            AuthError::Revoked {
                node: node(),
                at: t(1),
            },
            ByeReason::Revoked,
        ),
        (AuthError::BadToken(node()), ByeReason::BadToken),
        (AuthError::Storage("disk".into()), ByeReason::Storage),
    ] {
        let mut s = DeviceSession::new(t(0), Duration::from_secs(5));
        assert_eq!(s.handle_hello(hello(), t(1), |_| Err(err.clone())), None);
        assert_eq!(
            drain(&mut s),
            vec![Output::Close {
                reason: reason.clone(),
                send_bye: true
            }]
        );
        assert_eq!(reason.is_permanent(), reason != ByeReason::Storage);
    }
}

#[test]
fn messages_are_gated_by_the_scope_their_payload_needs() {
    let mut s = open();
    let mut rate = bucket(Rate::per_second(100.0, 100));
    let (id, cmd) = command();
    let mut asked = Vec::new();
    s.handle_message(
        cmd.clone(),
        t(20),
        |now| rate.try_take(now),
        |scope| {
            asked.push(scope);
            Ok(())
        },
    );
    s.handle_message(
        ack(),
        t(21),
        |now| rate.try_take(now),
        |scope| {
            asked.push(scope);
            Ok(())
        },
    );
    assert_eq!(asked, vec![scopes::COMMANDS_RUN, scopes::PRESENCE_WRITE]);
    assert_eq!(
        drain(&mut s),
        vec![Output::Deliver(cmd.clone()), Output::Deliver(ack())]
    );
    // Without commands:run, the command is refused and the session goes on.
    s.handle_message(
        cmd,
        t(22),
        |now| rate.try_take(now),
        |scope| {
            Err(AuthError::ScopeMissing {
                node: node(),
                scope: scope.into(),
            })
        },
    );
    assert!(matches!(
        &drain(&mut s)[..],
        [Output::Refuse { command_id: Some(c), code: refusals::SCOPE_MISSING, .. }] if *c == id
    ));
    assert!(s.is_open());
    // Without presence:write, the session ends.
    s.handle_message(
        ack(),
        t(23),
        |now| rate.try_take(now),
        |scope| {
            Err(AuthError::ScopeMissing {
                node: node(),
                scope: scope.into(),
            })
        },
    );
    assert_eq!(
        drain(&mut s),
        vec![Output::Close {
            reason: ByeReason::ScopeMissing,
            send_bye: true
        }]
    );
}

#[test]
fn a_token_rotated_away_mid_session_ends_it_for_a_reconnect() {
    let mut s = open();
    let mut rate = bucket(Rate::per_second(100.0, 100));
    s.handle_message(
        ack(),
        t(30),
        |now| rate.try_take(now),
        |_| Err(AuthError::BadToken(node())),
    );
    let out = drain(&mut s);
    assert_eq!(
        out,
        vec![Output::Close {
            reason: ByeReason::TokenRotated,
            send_bye: true
        }]
    );
    assert!(!ByeReason::TokenRotated.is_permanent());
    // Closed: later input does nothing, and the gate is not asked.
    s.handle_message(
        ack(),
        t(31),
        |now| rate.try_take(now),
        |_| panic!("asked after the end"),
    );
    assert!(drain(&mut s).is_empty());
}

#[test]
fn over_its_rate_a_device_is_refused_before_the_gate_is_asked() {
    // A burst of 2, refilling 1 per second.
    let mut s = open();
    let mut rate = bucket(Rate::per_second(1.0, 2));
    let mut gate_calls = 0;
    let mut outputs = Vec::new();
    for ms in [100, 101, 102] {
        let (_, cmd) = command();
        s.handle_message(
            cmd,
            t(ms),
            |now| rate.try_take(now),
            |_| {
                gate_calls += 1;
                Ok(())
            },
        );
        outputs.extend(drain(&mut s));
    }
    assert_eq!(gate_calls, 2);
    assert!(matches!(
        outputs[2],
        Output::Refuse {
            code: refusals::RATE_LIMITED,
            command_id: Some(_),
            ..
        }
    ));
    s.handle_message(
        ack(),
        t(103),
        |now| rate.try_take(now),
        |_| panic!("over the rate"),
    );
    assert!(matches!(
        drain(&mut s)[..],
        [Output::Refuse {
            command_id: None,
            code: refusals::RATE_LIMITED,
            ..
        }]
    ));
    // A second later the bucket has one token again (time passed in).
    s.handle_message(ack(), t(1_103), |now| rate.try_take(now), |_| Ok(()));
    assert_eq!(drain(&mut s), vec![Output::Deliver(ack())]);
}

#[test]
fn a_device_saying_goodbye_closes_without_a_bye_back() {
    let mut s = open();
    let mut rate = bucket(Rate::per_second(100.0, 100));
    let bye = Payload::Session(SessionMessage::Bye {
        reason: "shutdown".into(),
    });
    s.handle_message(bye, t(40), |now| rate.try_take(now), |_| Ok(()));
    assert_eq!(
        drain(&mut s),
        vec![Output::Close {
            reason: ByeReason::Shutdown,
            send_bye: false
        }]
    );
}

#[test]
fn the_primary_ends_a_session_once() {
    let mut s = open();
    s.end(ByeReason::Revoked);
    s.end(ByeReason::Shutdown);
    assert_eq!(
        drain(&mut s),
        vec![Output::Close {
            reason: ByeReason::Revoked,
            send_bye: true
        }]
    );
}

#[test]
fn bye_reasons_round_trip_their_wire_text() {
    for r in ByeReason::KNOWN {
        assert_eq!(ByeReason::parse(r.as_str()), r);
    }
    assert_eq!(
        ByeReason::parse("from_a_newer_sdk"),
        ByeReason::Other("from_a_newer_sdk".into())
    );
    assert!(!ByeReason::Other("x".into()).is_permanent());
}
