//! The decentralised mesh of nodes (issue 15): join tokens first; membership,
//! gossip, scoring and blocklists build on them.
//!
//! * [`token`]: join tokens (R-MESH1): their text, the issuer's record of
//!   each (the secret's digest only), and the issuer's decision on a
//!   presented secret ([`token::redeem`]), sans-IO.

pub mod token;
