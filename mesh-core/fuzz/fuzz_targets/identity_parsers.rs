//! Arbitrary input into the node id, fingerprint, key file, sealed box and
//! join token parsers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::crypto::{SealedBox, open};
use mesh_core::identity::{Fingerprint, NodeId, NodeKey};
use mesh_core::mesh::token::JoinToken;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(id) = text.parse::<NodeId>()
    {
        // Whatever parses prints back to something that parses to the same id.
        assert_eq!(id.to_string().parse::<NodeId>().ok(), Some(id));
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(fp) = text.parse::<Fingerprint>()
    {
        assert_eq!(fp.to_string().parse::<Fingerprint>().ok(), Some(fp));
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(token) = JoinToken::parse(text)
    {
        // A token that parses encodes to text that parses to the same token.
        assert_eq!(JoinToken::parse(&token.encode()).ok(), Some(token));
    }
    let _ = NodeKey::from_pem(data);
    if let Ok(sealed) = SealedBox::from_bytes(data) {
        let key = NodeKey::from_secret_bytes(&[1; 32]);
        let _ = open(&key, b"", &sealed);
    }
});
