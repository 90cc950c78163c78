//! Media streams (R-XFER2), sans-IO: the SDK carries frames, apps encode
//! and decode them.
//!
//! - [`wire`]: how a group of frames travels (one QUIC uni stream per
//!   group: a header, then length-prefixed frames) and the stream's opening
//!   message; every parser bounded and fuzzed.
//! - [`sender`]: [`MediaSender`] cuts frames into groups (a group is an
//!   independently decodable unit: a video GOP from a key frame, or a few
//!   hundred ms of audio), gives each a priority (audio above video above
//!   data, newer groups above older) and a deadline, and refuses frames
//!   once too much is in flight (backpressure: the app learns to drop).
//! - [`receiver`]: [`MediaReceiver`] puts frames back in order within a
//!   jitter window, reports gaps as lost and frames that came after their
//!   turn as late, never yields a frame older than its deadline, and keeps
//!   statistics (received, lost, late, too old, inter-arrival jitter).
//!
//! Time is passed in (milliseconds of a monotonic clock of the caller's);
//! nothing here sleeps or does I/O.

pub mod receiver;
pub mod sender;
pub mod wire;

pub use receiver::{MediaReceiver, MediaStats, Received, ReceiverSettings};
pub use sender::{GroupPlan, MediaSender, SenderSettings, Submitted};
pub use wire::{
    FrameRecord, GroupHeader, MAX_FRAME_LEN, MediaKind, MediaOpen, MediaWireError, StreamId,
};
