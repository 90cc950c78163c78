//! Media streams in the runtime (R-XFER2), on the files connection between
//! a primary and a device: `MediaOpen` / `MediaClose` as control messages,
//! one QUIC uni stream per group (priority: audio above video above data,
//! newer groups above older), a group past its deadline reset rather than
//! delivered late. The sans-IO [`MediaSender`] and [`MediaReceiver`]
//! decide; this module only moves bytes.
//!
//! Backpressure: [`MediaOut::send`] never waits. A frame is refused
//! (`Ok(false)`) when the sender's bounds say so (too many groups or bytes
//! in flight; a video stream then waits for its next key frame) or when
//! the writer has 64 frames queued already (the link is slower than the
//! stream). On the receiving side frames wait for an app that is slow in a
//! queue of 256; beyond, they are dropped and counted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;

use super::files::{FilesRt, FilesSide};
use super::{NodeError, lock};
use crate::files::FileFrame;
use crate::identity::NodeId;
use crate::media::{
    FrameRecord, GroupHeader, MediaKind, MediaOpen, MediaReceiver, MediaSender, MediaStats,
    Received, ReceiverSettings, SenderSettings, StreamId, Submitted,
};
use crate::transport::{Connection, RecvStream, SendStream};

/// Frames queued for the writer before [`MediaOut::send`] refuses.
const OUT_QUEUE: usize = 64;
/// What waits for the app, per incoming stream.
const IN_QUEUE: usize = 256;
/// Incoming streams waiting to be taken by the app.
const INCOMING: usize = 16;
/// How long after a stream's close its last group may still come.
const CLOSE_GRACE: Duration = Duration::from_millis(300);
/// Media streams one peer may have open towards this node.
const STREAMS_PER_PEER: usize = 8;

/// One frame for the writer.
struct OutFrame {
    timestamp_us: u64,
    key: bool,
    payload: Vec<u8>,
}

/// A media stream this node sends. Dropping it (or [`MediaOut::close`])
/// ends the stream after what is queued.
#[derive(Debug)]
pub struct MediaOut {
    stream_id: StreamId,
    tx: mpsc::Sender<OutFrame>,
    counts: Arc<Mutex<(u64, u64)>>,
}

impl MediaOut {
    /// Hands a frame to the stream (timestamp in µs of the app's media
    /// clock; `key` for a key frame). `Ok(true)`: sent on its way;
    /// `Ok(false)`: dropped (the stream is congested: send less). Never
    /// waits.
    pub fn send(&self, timestamp_us: u64, key: bool, payload: Vec<u8>) -> Result<bool, NodeError> {
        if payload.len() > crate::media::MAX_FRAME_LEN {
            return Err(NodeError::Files {
                kind: super::FilesErrorKind::TooLarge,
                message: format!("a frame of {} bytes", payload.len()),
            });
        }
        match self.tx.try_send(OutFrame {
            timestamp_us,
            key,
            payload,
        }) {
            Ok(()) => Ok(true),
            Err(mpsc::error::TrySendError::Full(_)) => {
                lock(&self.counts).1 += 1;
                Ok(false)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(NodeError::Unavailable(format!(
                "media stream {} has ended",
                self.stream_id
            ))),
        }
    }

    /// Frames written to the link and frames dropped, so far (a frame is
    /// counted once the writer has handled it).
    pub fn counts(&self) -> (u64, u64) {
        *lock(&self.counts)
    }

    /// A handle to [`MediaOut::counts`] that stays valid after the stream
    /// ended (the writer counts what was queued as it goes).
    pub fn counter(&self) -> MediaOutCounter {
        MediaOutCounter(self.counts.clone())
    }

    /// Ends the stream once what is queued is written.
    pub fn close(self) {}
}

/// The counts of a [`MediaOut`] (see [`MediaOut::counter`]).
#[derive(Debug, Clone)]
pub struct MediaOutCounter(Arc<Mutex<(u64, u64)>>);

impl MediaOutCounter {
    /// Frames written to the link and frames dropped, so far.
    pub fn counts(&self) -> (u64, u64) {
        *lock(&self.0)
    }
}

/// A media stream coming in.
#[derive(Debug)]
pub struct MediaIn {
    /// Who sends it.
    pub from: NodeId,
    /// Its id.
    pub stream_id: StreamId,
    /// What it carries.
    pub kind: MediaKind,
    /// The codec label the sender gave.
    pub codec: String,
    rx: mpsc::Receiver<Received>,
    state: Arc<InStream>,
}

impl MediaIn {
    /// The next frame in order, or a gap given up (lost or too old);
    /// `None` once the stream has ended.
    pub async fn next(&mut self) -> Option<Received> {
        self.rx.recv().await
    }

    /// The receiver's counters.
    pub fn stats(&self) -> MediaStats {
        lock(&self.state.receiver).stats()
    }

    /// Frames dropped because the app did not take them in time.
    pub fn dropped_unread(&self) -> u64 {
        *lock(&self.state.unread)
    }

    /// A handle to this stream's counters that can be read while another
    /// task waits in [`MediaIn::next`].
    pub fn counters(&self) -> MediaCounters {
        MediaCounters {
            state: self.state.clone(),
        }
    }
}

/// The counters of an incoming media stream (see [`MediaIn::counters`]).
#[derive(Debug, Clone)]
pub struct MediaCounters {
    state: Arc<InStream>,
}

impl MediaCounters {
    /// The receiver's counters.
    pub fn stats(&self) -> MediaStats {
        lock(&self.state.receiver).stats()
    }

    /// Frames dropped because the app did not take them in time.
    pub fn dropped_unread(&self) -> u64 {
        *lock(&self.state.unread)
    }
}

/// What the runtime keeps of an incoming stream.
#[derive(Debug)]
pub(super) struct InStream {
    receiver: Mutex<MediaReceiver>,
    /// To the app; taken when the stream ends (the app's `next` then
    /// returns `None` once it has read what is queued).
    tx: Mutex<Option<mpsc::Sender<Received>>>,
    unread: Mutex<u64>,
}

impl InStream {
    /// Hands what is ready to the app.
    fn flush(&self, ready: Vec<Received>) {
        let tx = lock(&self.tx);
        for r in ready {
            if tx.as_ref().is_none_or(|t| t.try_send(r).is_err()) {
                *lock(&self.unread) += 1;
            }
        }
    }

    fn ended(&self) -> bool {
        lock(&self.tx).as_ref().is_none_or(mpsc::Sender::is_closed)
    }
}

/// The media side of the files runtime.
#[derive(Debug, Default)]
pub(super) struct Media {
    incoming: Mutex<Option<mpsc::Sender<MediaIn>>>,
    streams: Mutex<HashMap<(NodeId, StreamId), Arc<InStream>>>,
}

fn now_ms(rt: &FilesRt) -> u64 {
    rt.now().as_millis()
}

impl FilesRt {
    /// Opens media stream `stream_id` to `to`.
    pub(super) async fn open_media(
        self: &Arc<Self>,
        to: NodeId,
        stream_id: StreamId,
        kind: MediaKind,
        codec: &str,
        settings: SenderSettings,
    ) -> Result<MediaOut, NodeError> {
        let open = MediaOpen {
            stream_id,
            kind,
            codec: codec.to_owned(),
        };
        MediaOpen::decode(&open.encode()).map_err(|e| NodeError::Files {
            kind: super::FilesErrorKind::InvalidArgument,
            message: e.to_string(),
        })?;
        if matches!(self.side(), FilesSide::Primary { .. }) {
            self.media_allowed(&to).await?;
        }
        let conn = self.connect(&to).await?;
        if !Self::send_frame(&conn, &FileFrame::MediaOpen(open)).await {
            return Err(NodeError::Unavailable("the connection went".into()));
        }
        let (tx, rx) = mpsc::channel(OUT_QUEUE);
        let counts = Arc::new(Mutex::new((0, 0)));
        let deadline_ms = settings.deadline_ms;
        let sender = MediaSender::new(stream_id, kind, settings);
        let writer = Writer {
            rt: Arc::downgrade(self),
            conn,
            stream_id,
            sender,
            counts: counts.clone(),
            current: None,
            expires_at: 0,
            deadline_ms,
        };
        self.spawn_task(writer.run(rx));
        Ok(MediaOut {
            stream_id,
            tx,
            counts,
        })
    }

    /// A primary: `peer` may exchange media (paired, unrevoked, holding
    /// `media:write`).
    async fn media_allowed(&self, peer: &NodeId) -> Result<(), NodeError> {
        let Some(media) = self.side().media_check() else {
            return Ok(());
        };
        let (media, peer) = (media.clone(), *peer);
        let ok = tokio::task::spawn_blocking(move || media(&peer))
            .await
            .unwrap_or(false);
        if ok {
            Ok(())
        } else {
            Err(NodeError::Files {
                kind: super::FilesErrorKind::Forbidden,
                message: format!(
                    "{peer} may not exchange media (it needs the {} scope)",
                    crate::registry::scopes::MEDIA_WRITE
                ),
            })
        }
    }

    /// Incoming media streams, from now on (one taker: a second call
    /// replaces the first).
    pub(super) fn media_incoming(&self) -> mpsc::Receiver<MediaIn> {
        let (tx, rx) = mpsc::channel(INCOMING);
        *lock(&self.media().incoming) = Some(tx);
        rx
    }

    /// A peer opened a media stream to this node.
    pub(super) async fn on_media_open(
        &self,
        peer: &NodeId,
        conn: &Arc<dyn Connection>,
        open: MediaOpen,
    ) {
        let refuse = |message: String| FileFrame::MediaRefuse {
            stream_id: open.stream_id,
            message,
        };
        if let Err(e) = self.media_allowed(peer).await {
            Self::send_frame(conn, &refuse(e.to_string())).await;
            return;
        }
        let taker = lock(&self.media().incoming).clone();
        let Some(taker) = taker else {
            Self::send_frame(conn, &refuse("this node takes no media".into())).await;
            return;
        };
        let (tx, rx) = mpsc::channel(IN_QUEUE);
        let state = Arc::new(InStream {
            receiver: Mutex::new(MediaReceiver::new(ReceiverSettings::default())),
            tx: Mutex::new(Some(tx)),
            unread: Mutex::new(0),
        });
        let taken = {
            let mut streams = lock(&self.media().streams);
            let mine = streams.keys().filter(|(p, _)| p == peer).count();
            if mine >= STREAMS_PER_PEER || streams.contains_key(&(*peer, open.stream_id)) {
                false
            } else {
                streams.insert((*peer, open.stream_id), state.clone());
                true
            }
        };
        if !taken {
            Self::send_frame(conn, &refuse("too many media streams".into())).await;
            return;
        }
        let incoming = MediaIn {
            from: *peer,
            stream_id: open.stream_id,
            kind: open.kind,
            codec: open.codec.clone(),
            rx,
            state: state.clone(),
        };
        if taker.try_send(incoming).is_err() {
            lock(&self.media().streams).remove(&(*peer, open.stream_id));
            Self::send_frame(conn, &refuse("the app takes no more streams".into())).await;
            return;
        }
        self.publish(
            "media.incoming",
            json!({
                "peer": peer.to_string(),
                "stream_id": open.stream_id,
                "kind": open.kind.as_str(),
                "codec": open.codec,
            }),
        );
        // Gaps are given up as the jitter window passes, frames or not.
        let weak = Arc::downgrade(&state);
        let clock = self.clock_handle();
        self.spawn_task(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            loop {
                tick.tick().await;
                let Some(s) = weak.upgrade() else { return };
                if s.ended() {
                    return;
                }
                let ready = lock(&s.receiver).poll(clock().as_millis());
                s.flush(ready);
            }
        });
    }

    /// A peer ended a media stream. Its last group may still be on its way
    /// (streams are not ordered with control messages): the stream ends a
    /// moment later.
    pub(super) fn on_media_close(self: &Arc<Self>, peer: &NodeId, stream_id: StreamId) {
        let (rt, peer) = (self.clone(), *peer);
        self.spawn_task(async move {
            tokio::time::sleep(CLOSE_GRACE).await;
            let gone = lock(&rt.media().streams).remove(&(peer, stream_id));
            if let Some(s) = gone {
                let ready = lock(&s.receiver).finish(now_ms(&rt));
                s.flush(ready);
                lock(&s.tx).take();
            }
        });
    }

    /// A group's uni stream from `peer`.
    pub(super) async fn on_media_group(&self, peer: NodeId, mut recv: Box<dyn RecvStream>) {
        let mut prefix = [0u8; 2];
        if read_exact(recv.as_mut(), &mut prefix).await.is_err() {
            return recv.stop(0);
        }
        let Ok(n) = GroupHeader::body_len(prefix) else {
            return recv.stop(0);
        };
        let mut body = vec![0u8; n];
        if read_exact(recv.as_mut(), &mut body).await.is_err() {
            return recv.stop(0);
        }
        let Ok(header) = GroupHeader::decode(&body) else {
            return recv.stop(0);
        };
        let Some(state) = lock(&self.media().streams)
            .get(&(peer, header.stream_id))
            .cloned()
        else {
            return recv.stop(0);
        };
        loop {
            let mut len = [0u8; 4];
            if read_exact(recv.as_mut(), &mut len).await.is_err() {
                return; // the end of the group (or it was reset)
            }
            let Ok(n) = FrameRecord::rest_len(len) else {
                return recv.stop(0);
            };
            let mut rest = vec![0u8; n];
            if read_exact(recv.as_mut(), &mut rest).await.is_err() {
                return;
            }
            let Ok(frame) = FrameRecord::decode(&rest) else {
                return recv.stop(0);
            };
            let now = now_ms(self);
            let ready = {
                let mut r = lock(&state.receiver);
                r.push(frame, header.deadline_ms, now);
                r.poll(now)
            };
            state.flush(ready);
        }
    }
}

/// Writes one outgoing stream's groups.
struct Writer {
    rt: Weak<FilesRt>,
    conn: Arc<dyn Connection>,
    stream_id: StreamId,
    sender: MediaSender,
    counts: Arc<Mutex<(u64, u64)>>,
    /// The group being written and its stream.
    current: Option<(u64, Box<dyn SendStream>)>,
    /// When the current group expires (ms).
    expires_at: u64,
    deadline_ms: u32,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<OutFrame>) {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tokio::select! {
                frame = rx.recv() => match frame {
                    Some(f) => {
                        if !self.write(f).await {
                            break;
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => self.expire(),
            }
        }
        if let Some((_, mut s)) = self.current.take() {
            let _ = s.finish().await;
        }
        FilesRt::send_frame(
            &self.conn,
            &FileFrame::MediaClose {
                stream_id: self.stream_id,
            },
        )
        .await;
    }

    fn now_ms(&self) -> u64 {
        self.rt.upgrade().map_or(0, |rt| now_ms(&rt))
    }

    /// Groups past their deadline: their streams are reset.
    fn expire(&mut self) {
        let now = self.now_ms();
        for g in self.sender.expired(now) {
            if self.current.as_ref().is_some_and(|(c, _)| *c == g)
                && let Some((_, mut s)) = self.current.take()
            {
                s.reset(0);
            }
        }
    }

    /// Writes one frame; `false` once the connection is gone.
    async fn write(&mut self, f: OutFrame) -> bool {
        let now = self.now_ms();
        let submitted = match self.sender.submit(f.timestamp_us, f.key, f.payload, now) {
            Ok(s) => s,
            Err(_) => {
                lock(&self.counts).1 += 1;
                return true;
            }
        };
        let Submitted::Send { plan, bytes, .. } = submitted else {
            lock(&self.counts).1 += 1;
            return true;
        };
        if let Some(header) = plan.header {
            if let Some((g, mut s)) = self.current.take() {
                let _ = s.finish().await;
                self.sender.finished(g);
            }
            let Ok(mut s) = self.conn.open_uni(plan.priority).await else {
                return false;
            };
            if s.write_all(&header.encode()).await.is_err() {
                return false;
            }
            self.current = Some((plan.group, s));
        }
        // The group lives as long as its newest frame is of use.
        self.expires_at = now + u64::from(self.deadline_ms);
        let left = Duration::from_millis(self.expires_at.saturating_sub(now));
        match &mut self.current {
            Some((g, s)) if *g == plan.group => {
                // A write the link cannot take before the group's deadline
                // is given up: the group is reset, not delivered late.
                match tokio::time::timeout(left, s.write_all(&bytes)).await {
                    Ok(Ok(())) => lock(&self.counts).0 += 1,
                    Ok(Err(_)) => {
                        self.current = None;
                        lock(&self.counts).1 += 1;
                        return !self.conn_gone();
                    }
                    Err(_) => {
                        if let Some((g, mut s)) = self.current.take() {
                            s.reset(0);
                            self.sender.finished(g);
                        }
                        lock(&self.counts).1 += 1;
                    }
                }
            }
            // Its group expired meanwhile.
            _ => lock(&self.counts).1 += 1,
        }
        true
    }

    fn conn_gone(&self) -> bool {
        self.rt.upgrade().is_none_or(|rt| !rt.is_conn(&self.conn))
    }
}

async fn read_exact(recv: &mut dyn RecvStream, buf: &mut [u8]) -> Result<(), ()> {
    let mut at = 0;
    while at < buf.len() {
        match tokio::time::timeout(Duration::from_secs(30), recv.read(&mut buf[at..])).await {
            Ok(Ok(Some(n))) if n > 0 => at += n,
            _ => return Err(()),
        }
    }
    Ok(())
}

impl super::Node {
    /// Opens media stream `stream_id` of `kind` (codec label `codec`, for
    /// the app) to `to` (a worker: its primary; a primary: a device holding
    /// `media:write`), with the kind's default grouping, deadline and
    /// bounds. Frames go with [`MediaOut::send`].
    pub async fn open_media(
        &self,
        to: NodeId,
        stream_id: StreamId,
        kind: MediaKind,
        codec: &str,
    ) -> Result<MediaOut, NodeError> {
        self.open_media_with(to, stream_id, kind, codec, SenderSettings::for_kind(kind))
            .await
    }

    /// [`Node::open_media`](super::Node::open_media) with settings of the caller's.
    pub async fn open_media_with(
        &self,
        to: NodeId,
        stream_id: StreamId,
        kind: MediaKind,
        codec: &str,
        settings: SenderSettings,
    ) -> Result<MediaOut, NodeError> {
        self.files_rt()?
            .open_media(to, stream_id, kind, codec, settings)
            .await
    }

    /// Media streams that peers open to this node, from now on (without a
    /// taker, streams are refused).
    pub fn media_incoming(&self) -> Result<mpsc::Receiver<MediaIn>, NodeError> {
        Ok(self.files_rt()?.media_incoming())
    }
}
