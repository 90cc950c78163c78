use std::net::SocketAddr;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::identity::NodeKey;

const T: Timestamp = Timestamp::from_millis(1_750_000_000_000);

fn issuer() -> NodeId {
    NodeKey::from_secret_bytes(&[5; 32]).node_id()
}

fn joiner(seed: u8) -> NodeId {
    NodeKey::from_secret_bytes(&[seed; 32]).node_id()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn token() -> JoinToken {
    JoinToken::generate(issuer(), &[addr("192.168.1.20:4433")], T, DEFAULT_TOKEN_TTL)
}

#[test]
fn a_token_round_trips_through_its_text() {
    let t = JoinToken::generate(
        issuer(),
        &[
            addr("192.168.1.20:4433"),
            addr("[fe80::1%3]:4433"),
            addr("[2001:db8::7]:9"),
        ],
        T,
        DEFAULT_TOKEN_TTL,
    );
    let text = t.encode();
    assert!(text.starts_with(TOKEN_PREFIX));
    let back = JoinToken::parse(&text).unwrap();
    assert_eq!(back, t);
    // The link-local scope survives (it is what makes the address usable).
    assert_eq!(back.addresses[1], addr("[fe80::1%3]:4433"));
    assert_eq!(back.expires_at, T + DEFAULT_TOKEN_TTL);
    // Pasted with whitespace around it.
    assert_eq!(JoinToken::parse(&format!("  {}\n", &*text)).unwrap(), t);
    assert_eq!(text.parse::<JoinToken>().unwrap().id(), t.id());
}

#[test]
fn the_largest_token_fits_in_256_characters() {
    let many: Vec<SocketAddr> = (0..10)
        .map(|i| addr(&format!("[fe80::ffff:ffff:ffff:{i:x}%4294967295]:65535")))
        .collect();
    let t = JoinToken::generate(issuer(), &many, T, DEFAULT_TOKEN_TTL);
    assert_eq!(
        t.addresses.len(),
        MAX_TOKEN_ADDRESSES,
        "extra addresses are left out"
    );
    let text = t.encode();
    assert!(text.len() <= MAX_TOKEN_LEN, "{} characters", text.len());
    assert_eq!(JoinToken::parse(&text).unwrap(), t);
}

#[test]
fn the_secret_is_never_printed_and_the_record_keeps_only_its_digest() {
    let t = token();
    let secret_hex = data_encoding::HEXLOWER.encode(t.secret().expose());
    let shown = format!("{t:?} {:?} {:?}", t.secret(), t.secret().digest());
    assert!(!shown.contains(&secret_hex), "{shown}");
    let record = t.record(T);
    assert_eq!(record.id, t.id());
    assert_eq!(record.id.len(), 16);
    assert_eq!(record.secret_hash, t.secret().digest().0);
    assert!(!format!("{record:?}").contains(&secret_hex));
    assert_eq!((record.used_by, record.revoked_at), (None, None));
}

#[test]
fn bad_text_is_a_typed_error_and_always_token_invalid() {
    let text = token().encode().to_string();
    let body = &text[TOKEN_PREFIX.len()..];
    type Expect = fn(&TokenError) -> bool;
    let cases: Vec<(String, Expect)> = vec![
        (String::new(), |e| *e == TokenError::NotAToken),
        ("mj2.".to_owned() + body, |e| *e == TokenError::NotAToken),
        (format!("{TOKEN_PREFIX}{body}="), |e| {
            *e == TokenError::NotAToken
        }),
        ("x".repeat(MAX_TOKEN_LEN + 1), |e| {
            matches!(e, TokenError::TooLong(_))
        }),
        (text[..text.len() - 3].to_owned(), |e| {
            matches!(
                e,
                TokenError::Checksum | TokenError::NotAToken | TokenError::Length
            )
        }),
        (format!("{TOKEN_PREFIX}AAAA"), |e| {
            *e == TokenError::Length || *e == TokenError::Checksum
        }),
    ];
    for (input, expected) in cases {
        let e = JoinToken::parse(&input).unwrap_err();
        assert!(expected(&e), "{input:?}: {e:?}");
        assert_eq!(e.code(), "token_invalid");
    }
    // Any one character changed is caught (by the checksum or the decoder).
    for i in TOKEN_PREFIX.len()..text.len() {
        let mut edited = text.clone().into_bytes();
        edited[i] = if edited[i] == b'A' { b'B' } else { b'A' };
        let edited = String::from_utf8(edited).unwrap();
        if let Ok(t) = JoinToken::parse(&edited) {
            // Only the unused low bits of the last character may change
            // without changing the bytes.
            assert_eq!(t.encode().as_str(), text, "edit at {i} went unnoticed");
        }
    }
}

/// A token whose fields are valid but whose structure is not, with a
/// correct checksum (as an attacker would make it).
fn forged(content: &[u8]) -> String {
    let mut b = content.to_vec();
    b.extend_from_slice(&checksum(content));
    format!(
        "{TOKEN_PREFIX}{}",
        data_encoding::BASE64URL_NOPAD.encode(&b)
    )
}

#[test]
fn well_checksummed_nonsense_is_refused_by_structure() {
    let mut base = vec![VERSION];
    base.extend_from_slice(issuer().as_bytes());
    base.extend_from_slice(&T.as_millis().to_be_bytes());
    base.extend_from_slice(&[9; 16]);
    let mut version = base.clone();
    version[0] = 2;
    assert_eq!(
        JoinToken::parse(&forged(&version)),
        Err(TokenError::Version(2))
    );
    let mut none = base.clone();
    none.push(0);
    assert_eq!(
        JoinToken::parse(&forged(&none)),
        Err(TokenError::Addresses(0))
    );
    let mut five = base.clone();
    five.push(5);
    assert_eq!(
        JoinToken::parse(&forged(&five)),
        Err(TokenError::Addresses(5))
    );
    let mut family = base.clone();
    family.extend_from_slice(&[1, 7, 1, 2, 3, 4, 0, 80]);
    assert_eq!(
        JoinToken::parse(&forged(&family)),
        Err(TokenError::Family(7))
    );
    let mut short = base.clone();
    short.extend_from_slice(&[1, 4, 1, 2]);
    assert_eq!(JoinToken::parse(&forged(&short)), Err(TokenError::Length));
    let mut long = base.clone();
    long.extend_from_slice(&[1, 4, 1, 2, 3, 4, 0, 80, 0]);
    assert_eq!(JoinToken::parse(&forged(&long)), Err(TokenError::Length));
    let mut good = base.clone();
    good.extend_from_slice(&[1, 4, 1, 2, 3, 4, 0, 80]);
    assert_eq!(
        JoinToken::parse(&forged(&good)).unwrap().addresses,
        vec![addr("1.2.3.4:80")]
    );
}

#[test]
fn the_issuer_redeems_a_token_once_and_judges_by_its_own_record() {
    let t = token();
    let record = t.record(T);
    let now = T + Duration::from_secs(60);
    // A secret that is not this token's: invalid, whatever the record says.
    let wrong = JoinSecret::from_bytes([0; 16]);
    assert_eq!(
        redeem(Some(&record), &wrong, joiner(1), now),
        Err(JoinRefusal::Invalid)
    );
    assert_eq!(
        redeem(None, t.secret(), joiner(1), now),
        Err(JoinRefusal::Invalid)
    );
    // The first redemption marks it used by the joiner.
    let used = redeem(Some(&record), t.secret(), joiner(1), now).unwrap();
    assert_eq!((used.used_by, used.used_at), (Some(joiner(1)), Some(now)));
    // Another node cannot use it again; the same node may ask again.
    assert_eq!(
        redeem(Some(&used), t.secret(), joiner(2), now),
        Err(JoinRefusal::Used)
    );
    assert_eq!(
        redeem(Some(&used), t.secret(), joiner(1), now),
        Ok(used.clone())
    );
    // Expired by the issuer's record (the token's own field is a hint).
    let late = T + DEFAULT_TOKEN_TTL;
    assert_eq!(
        redeem(Some(&record), t.secret(), joiner(1), late),
        Err(JoinRefusal::Expired)
    );
    // Revoked beats everything else once the secret is right.
    let revoked = JoinTokenRecord {
        revoked_at: Some(now),
        ..record.clone()
    };
    assert_eq!(
        redeem(Some(&revoked), t.secret(), joiner(1), now),
        Err(JoinRefusal::Revoked)
    );
    assert_eq!(
        redeem(Some(&revoked), &wrong, joiner(1), now),
        Err(JoinRefusal::Invalid)
    );
    for r in [
        JoinRefusal::Invalid,
        JoinRefusal::Expired,
        JoinRefusal::Used,
        JoinRefusal::Revoked,
    ] {
        assert_eq!(JoinRefusal::from_code(r.code()), Some(r));
    }
    assert_eq!(
        [
            JoinRefusal::Invalid,
            JoinRefusal::Expired,
            JoinRefusal::Used,
            JoinRefusal::Revoked
        ]
        .map(|r| r.code()),
        [
            "token_invalid",
            "token_expired",
            "token_used",
            "token_revoked"
        ]
    );
}

proptest! {
    #[test]
    fn no_text_makes_the_parser_panic(s in ".{0,300}") {
        let _ = JoinToken::parse(&s);
    }

    #[test]
    fn no_token_body_makes_the_parser_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = JoinToken::parse(&forged(&bytes));
    }

    #[test]
    fn every_token_round_trips(
        ms in any::<u64>(),
        v4 in proptest::collection::vec((any::<[u8; 4]>(), any::<u16>()), 0..3),
        v6 in proptest::collection::vec((any::<[u8; 16]>(), any::<u16>(), any::<u32>()), 0..3),
    ) {
        let mut addrs: Vec<SocketAddr> = v4.into_iter().map(|(ip, p)| SocketAddr::from((ip, p))).collect();
        addrs.extend(v6.into_iter().map(|(ip, p, s)| SocketAddr::V6(SocketAddrV6::new(ip.into(), p, 0, s))));
        prop_assume!(!addrs.is_empty());
        let t = JoinToken::generate(issuer(), &addrs, Timestamp::from_millis(0), Duration::ZERO);
        let t = JoinToken { expires_at: Timestamp::from_millis(ms), ..t };
        let text = t.encode();
        prop_assert!(text.len() <= MAX_TOKEN_LEN);
        prop_assert_eq!(JoinToken::parse(&text).unwrap(), t);
    }
}
