//! Reliable delivery between mesh members, sans IO (R-MESH5, R-MESH6).
//!
//! A message travels as a [`Letter`]: sealed to its recipient, signed by
//! its sender, numbered per (sender, recipient). The sender's [`Outbox`]
//! keeps it (the runtime persists it first) and sends it again with
//! backoff and jitter until the recipient acknowledges it; when the
//! recipient is not reachable directly, or a few direct tries went
//! unanswered, it also hands the letter to relay members, whose
//! [`RelayStore`] holds it (bounded per recipient and in all, until its
//! expiry) and delivers it when the recipient is back. A recipient that
//! got a letter through a relay sends a receipt back, as a letter of its
//! own (so it too can travel through relays). The recipient drops
//! duplicates by sequence number ([`SeenWindow`]), so the application gets
//! each message once however often it was sent.

mod letter;
mod outbox;
mod relay;

pub use letter::{
    Contents, Letter, LetterError, LetterId, MAX_PAYLOAD_LEN, MAX_SEALED_LEN, Opened,
};
pub use outbox::{Outbox, OutboxEntry, RetryConfig, Send};
pub use relay::{RelayLimits, RelayRefusal, RelayStore};

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::transport::Protocol;

/// The delivery protocol's ALPN.
pub const DELIVER: Protocol = Protocol::new("mesh-sdk/deliver/1");
/// The largest delivery frame.
pub const MAX_DELIVERY_FRAME_LEN: usize = MAX_SEALED_LEN + 1024;
/// The most ids in one [`DeliveryFrame::Ack`] or [`DeliveryFrame::Stored`].
pub const MAX_IDS_PER_FRAME: usize = 256;

/// One message of a delivery connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryFrame {
    /// A letter: for the receiver, or for it to hold as a relay.
    Deliver(Letter),
    /// The receiver (the letters' recipient) has them.
    Ack(Vec<LetterId>),
    /// The receiver holds them as a relay.
    Stored(Vec<LetterId>),
}

/// Why a delivery frame is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeliveryFrameError {
    /// Longer than [`MAX_DELIVERY_FRAME_LEN`], or a sealed part over
    /// [`MAX_SEALED_LEN`].
    #[error("a delivery frame of {0} bytes is over the limit")]
    TooLarge(usize),
    /// Not a frame.
    #[error("not a delivery frame: {0}")]
    Malformed(String),
    /// Over [`MAX_IDS_PER_FRAME`].
    #[error("more than {MAX_IDS_PER_FRAME} letter ids in one frame")]
    TooManyIds,
}

impl DeliveryFrame {
    /// The frame's bytes.
    pub fn encode(&self) -> Vec<u8> {
        // Encoding plain data into a Vec cannot fail.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Parses one frame, refusing oversized ones and trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DeliveryFrameError> {
        if bytes.len() > MAX_DELIVERY_FRAME_LEN {
            return Err(DeliveryFrameError::TooLarge(bytes.len()));
        }
        let (frame, rest): (DeliveryFrame, _) = postcard::take_from_bytes(bytes)
            .map_err(|e| DeliveryFrameError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(DeliveryFrameError::Malformed("trailing bytes".into()));
        }
        match &frame {
            DeliveryFrame::Deliver(l) if l.sealed.len() > MAX_SEALED_LEN => {
                return Err(DeliveryFrameError::TooLarge(l.sealed.len()));
            }
            DeliveryFrame::Ack(ids) | DeliveryFrame::Stored(ids)
                if ids.len() > MAX_IDS_PER_FRAME =>
            {
                return Err(DeliveryFrameError::TooManyIds);
            }
            _ => {}
        }
        Ok(frame)
    }
}

/// Out-of-order sequence numbers remembered per sender.
pub const MAX_SEEN_AHEAD: usize = 4096;

/// The sequence numbers a recipient has taken from one sender: all up to
/// `upto`, and those in `above`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenWindow {
    /// Every number up to this one was taken.
    pub upto: u64,
    /// Numbers above `upto` taken (at most [`MAX_SEEN_AHEAD`]).
    pub above: BTreeSet<u64>,
}

/// What a recipient makes of a sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Not taken before: take it.
    New,
    /// Taken before: acknowledge it again, hand it to nobody.
    Duplicate,
    /// Too far ahead of a gap (the window is full): not taken now, the
    /// sender will try again.
    Later,
}

impl SeenWindow {
    /// Whether `seq` is new.
    pub fn check(&self, seq: u64) -> Seen {
        if seq <= self.upto || self.above.contains(&seq) {
            Seen::Duplicate
        } else if seq != self.upto + 1 && self.above.len() >= MAX_SEEN_AHEAD {
            Seen::Later
        } else {
            Seen::New
        }
    }

    /// Counts every number below `floor` as taken (the sender holds none
    /// of them any more).
    pub fn advance(&mut self, floor: u64) {
        let below = floor.saturating_sub(1);
        if below > self.upto {
            self.upto = below;
            self.above.retain(|s| *s > below);
            while self.above.remove(&(self.upto + 1)) {
                self.upto += 1;
            }
        }
    }

    /// Records `seq` as taken (after [`SeenWindow::check`] said new).
    pub fn take(&mut self, seq: u64) {
        if seq == self.upto + 1 {
            self.upto = seq;
            while self.above.remove(&(self.upto + 1)) {
                self.upto += 1;
            }
        } else if seq > self.upto {
            self.above.insert(seq);
        }
    }
}

#[cfg(test)]
mod tests;
