//! Length-limited lists in the wire format.
//!
//! A list's length prefix is attacker-controlled. serde pre-sizes vectors from
//! it (up to 1 MiB), so a 100-byte frame could make the decoder allocate far
//! more than the frame. Each list in the format therefore has a fixed maximum
//! length, checked before anything is allocated when decoding, and when
//! encoding so that a node never sends what its peers would refuse.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};
use serde::ser::{self, Serialize, Serializer};

/// Serializes `v`, refusing more than `N` elements.
pub(super) fn serialize<S, T, const N: usize>(v: &[T], s: S) -> Result<S::Ok, S::Error>
where
    S: Serializer,
    T: Serialize,
{
    if v.len() > N {
        return Err(ser::Error::custom(format_args!(
            "list of {} elements exceeds the wire limit of {N}",
            v.len()
        )));
    }
    v.serialize(s)
}

/// Deserializes a list of at most `N` elements without trusting its length prefix.
pub(super) fn deserialize<'de, D, T, const N: usize>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Bounded<T, const N: usize>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for Bounded<T, N> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a list of at most {N} elements")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            if let Some(n) = seq.size_hint()
                && n > N
            {
                return Err(de::Error::invalid_length(n, &self));
            }
            // Grow as elements actually decode; never pre-size from the prefix.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(8));
            while let Some(item) = seq.next_element()? {
                if out.len() == N {
                    return Err(de::Error::invalid_length(N + 1, &self));
                }
                out.push(item);
            }
            Ok(out)
        }
    }

    d.deserialize_seq(Bounded::<T, N>(PhantomData))
}
