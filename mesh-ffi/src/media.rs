//! Media streams on [`MeshNode`]: open a stream to a peer and push frames
//! ([`MediaSender`]), take the streams peers open ([`MediaInbox`]) and read
//! their frames in order with gaps reported ([`MediaReceiver`]). The SDK
//! carries frames; the app encodes and decodes them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::media::{MediaKind, Received};
use mesh_core::node::{MediaCounters, MediaIn, MediaOut, MediaOutCounter};
use tokio::sync::{Mutex as AsyncMutex, mpsc};

use crate::error::MeshError;
use crate::node::MeshNode;

/// What a media stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum MediaType {
    /// Audio: small frames, sent first.
    Audio,
    /// Video: a group starts at each key frame.
    Video,
    /// Anything else the app streams.
    Data,
}

impl From<MediaType> for MediaKind {
    fn from(t: MediaType) -> Self {
        match t {
            MediaType::Audio => MediaKind::Audio,
            MediaType::Video => MediaKind::Video,
            MediaType::Data => MediaKind::Data,
        }
    }
}

impl From<MediaKind> for MediaType {
    fn from(k: MediaKind) -> Self {
        match k {
            MediaKind::Audio => MediaType::Audio,
            MediaKind::Video => MediaType::Video,
            MediaKind::Data => MediaType::Data,
        }
    }
}

/// One frame of a stream.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct MediaFrame {
    /// Its sequence number (from 0, one per frame the sender sent).
    pub seq: u64,
    /// Its timestamp, µs of the sender's media clock.
    pub timestamp_us: u64,
    /// Whether it is a key frame.
    pub key: bool,
    /// The app's bytes.
    pub payload: Vec<u8>,
}

/// What [`MediaReceiver::next`] yields, in sequence order.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum MediaItem {
    /// The next frame.
    Frame {
        /// The frame.
        frame: MediaFrame,
    },
    /// Frames `from .. from + count` were given up (lost, or waited for
    /// past the jitter window).
    Gap {
        /// The first missing sequence number.
        from: u64,
        /// How many.
        count: u64,
    },
}

/// A receiver's counters.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct MediaStreamStats {
    /// Frames that arrived (once each).
    pub received: u64,
    /// Frames yielded in order.
    pub delivered: u64,
    /// Frames given up that never arrived (exact once the stream ended).
    pub lost: u64,
    /// Frames that arrived after their turn (dropped).
    pub late: u64,
    /// Frames dropped because their deadline had passed.
    pub too_old: u64,
    /// Frames that arrived twice.
    pub duplicates: u64,
    /// Inter-arrival jitter, ms (RFC 3550).
    pub jitter_ms: f64,
    /// Frames dropped because the app did not read them in time.
    pub dropped_unread: u64,
}

/// What a sender has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Record)]
pub struct MediaSendCounts {
    /// Frames handed on.
    pub sent: u64,
    /// Frames refused because the stream was congested.
    pub dropped: u64,
}

/// A media stream this node sends. Frames go with [`MediaSender::send`];
/// [`MediaSender::end`] ends the stream once what is queued is written.
#[derive(Debug, uniffi::Object)]
pub struct MediaSender {
    stream_id: u32,
    out: Mutex<Option<MediaOut>>,
    counter: MediaOutCounter,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[uniffi::export]
impl MediaSender {
    /// The stream's id.
    pub fn stream_id(&self) -> u32 {
        self.stream_id
    }

    /// Hands a frame to the stream (`timestamp_us`: the app's media clock;
    /// `key`: a key frame, which starts a video group). Returns `true` when
    /// it is on its way, `false` when it was dropped because the stream is
    /// congested (send less: lower the bitrate, or wait for a key frame).
    /// Never waits. `MeshError.File(too_large)` for a frame over 1 MiB,
    /// `Unavailable` once the stream has ended.
    pub fn send(&self, timestamp_us: u64, key: bool, payload: Vec<u8>) -> Result<bool, MeshError> {
        let out = lock(&self.out);
        let out = out.as_ref().ok_or_else(|| {
            MeshError::unavailable(format!("media stream {} has ended", self.stream_id))
        })?;
        Ok(out.send(timestamp_us, key, payload)?)
    }

    /// Frames written to the link and frames dropped so far (a frame is
    /// counted once the stream's writer has handled it, also after `end`).
    pub fn counts(&self) -> MediaSendCounts {
        let (sent, dropped) = self.counter.counts();
        MediaSendCounts { sent, dropped }
    }

    /// Ends the stream after what is queued (the receiver's `next` then
    /// returns null once it has read everything). Idempotent. (Named
    /// `end`: Kotlin objects already have `close`, which frees the handle.)
    pub fn end(&self) {
        lock(&self.out).take();
    }
}

/// A media stream coming in from a peer.
#[derive(Debug, uniffi::Object)]
pub struct MediaReceiver {
    from: String,
    stream_id: u32,
    media_type: MediaType,
    codec: String,
    stream: AsyncMutex<MediaIn>,
    counters: MediaCounters,
    handle: tokio::runtime::Handle,
}

/// Waits at most `timeout_ms` (0: not at all) for `fut` on `handle`.
async fn within<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    timeout_ms: u64,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<Option<T>, MeshError> {
    let waited = handle
        .spawn(async move {
            tokio::time::timeout(Duration::from_millis(timeout_ms), fut)
                .await
                .ok()
        })
        .await
        .map_err(|e| MeshError::Internal {
            detail: format!("the wait did not finish: {e}"),
        })?;
    Ok(waited)
}

#[uniffi::export(async_runtime = "tokio")]
impl MediaReceiver {
    /// The sending peer's node id.
    pub fn peer(&self) -> String {
        self.from.clone()
    }

    /// The stream's id.
    pub fn stream_id(&self) -> u32 {
        self.stream_id
    }

    /// What it carries.
    pub fn media_type(&self) -> MediaType {
        self.media_type
    }

    /// The codec label the sender gave.
    pub fn codec(&self) -> String {
        self.codec.clone()
    }

    /// The next frame in order, or a gap given up; null once the stream
    /// has ended and everything was read. `MeshError.Timeout` if nothing
    /// comes within `timeout_ms`.
    pub async fn next(self: Arc<Self>, timeout_ms: u64) -> Result<Option<MediaItem>, MeshError> {
        let me = self.clone();
        let got = within(&self.handle, timeout_ms, async move {
            me.stream.lock().await.next().await
        })
        .await?;
        let Some(item) = got else {
            return Err(MeshError::Timeout {
                detail: format!("no media within {timeout_ms} ms"),
            });
        };
        Ok(item.map(|r| match r {
            Received::Frame(f) => MediaItem::Frame {
                frame: MediaFrame {
                    seq: f.seq,
                    timestamp_us: f.timestamp_us,
                    key: f.key,
                    payload: f.payload,
                },
            },
            Received::Gap { from, count } => MediaItem::Gap { from, count },
        }))
    }

    /// The receiver's counters so far (exact once `next` returned null).
    pub fn stats(&self) -> MediaStreamStats {
        let st = self.counters.stats();
        MediaStreamStats {
            received: st.received,
            delivered: st.delivered,
            lost: st.lost,
            late: st.late,
            too_old: st.too_old,
            duplicates: st.duplicates,
            jitter_ms: st.jitter_ms,
            dropped_unread: self.counters.dropped_unread(),
        }
    }
}

/// The media streams peers open to this node, from the moment it was
/// made (without one, streams are refused). Only the newest inbox of a
/// node receives.
#[derive(Debug, uniffi::Object)]
pub struct MediaInbox {
    incoming: AsyncMutex<mpsc::Receiver<MediaIn>>,
    handle: tokio::runtime::Handle,
}

#[uniffi::export(async_runtime = "tokio")]
impl MediaInbox {
    /// The next stream a peer opens. `MeshError.Timeout` if none comes
    /// within `timeout_ms`; `Unavailable` once the node stopped or a newer
    /// inbox took over.
    pub async fn next(self: Arc<Self>, timeout_ms: u64) -> Result<Arc<MediaReceiver>, MeshError> {
        let me = self.clone();
        let got = within(&self.handle, timeout_ms, async move {
            me.incoming.lock().await.recv().await
        })
        .await?;
        match got {
            None => Err(MeshError::Timeout {
                detail: format!("no media stream within {timeout_ms} ms"),
            }),
            Some(None) => Err(MeshError::unavailable(
                "the inbox is closed (the node stopped, or a newer inbox took over)",
            )),
            Some(Some(stream)) => Ok(Arc::new(MediaReceiver {
                from: stream.from.to_string(),
                stream_id: stream.stream_id,
                media_type: stream.kind.into(),
                codec: stream.codec.clone(),
                counters: stream.counters(),
                stream: AsyncMutex::new(stream),
                handle: self.handle.clone(),
            })),
        }
    }
}

#[uniffi::export(async_runtime = "tokio")]
impl MeshNode {
    /// Opens media stream `stream_id` carrying `media_type` (codec label
    /// `codec`, for the app) to `to` (a worker: its primary's node id; the
    /// primary: a device holding `media:write`), with the type's default
    /// grouping, deadline and bounds. `MeshError.File(forbidden)` without
    /// the scope.
    pub async fn open_media(
        &self,
        to: String,
        stream_id: u32,
        media_type: MediaType,
        codec: String,
    ) -> Result<Arc<MediaSender>, MeshError> {
        let to = to
            .trim()
            .parse()
            .map_err(|e| MeshError::invalid(format!("node id {to:?}: {e}")))?;
        let out = self
            .run(move |node| async move {
                Ok(node
                    .open_media(to, stream_id, media_type.into(), &codec)
                    .await?)
            })
            .await?;
        Ok(Arc::new(MediaSender {
            stream_id,
            counter: out.counter(),
            out: Mutex::new(Some(out)),
        }))
    }

    /// Starts taking the media streams peers open to this node (a newer
    /// inbox replaces an older one).
    pub fn media_inbox(&self) -> Result<Arc<MediaInbox>, MeshError> {
        Ok(Arc::new(MediaInbox {
            incoming: AsyncMutex::new(self.node()?.media_incoming()?),
            handle: self.runtime_handle(),
        }))
    }
}
