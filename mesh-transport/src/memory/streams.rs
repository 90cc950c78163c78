//! Streams and datagrams of the in-memory transport.
//!
//! Each direction of a stream is a flow: a buffer the writer fills and
//! the reader drains, with a flow-control window ([`STREAM_WINDOW`] unread
//! bytes per stream). On an unconstrained network a write lands in the
//! reader's buffer at once. Under [`MemoryNetwork::set_bandwidth`](super::MemoryNetwork::set_bandwidth)
//! writes queue, and one pump task per direction of a connection moves them
//! [`CHUNK`] bytes at a time at the link's rate, always from the
//! highest-priority stream with data queued (equal priorities take turns) —
//! so the order streams finish in shows their priorities, as on a congested
//! QUIC link.
//!
//! Under [`MemoryNetwork::set_stream_faults`](super::MemoryNetwork::set_stream_faults)
//! bytes reach the reader's buffer packet by packet when each is due (a
//! task per flow with bytes in flight moves them), in order within the
//! stream, so streams overtake one another and a lost packet holds up only
//! its own stream.
//!
//! Streams are reliable: the network's loss and latency settings apply to
//! messages and datagrams, not to streams. A crash breaks every stream of
//! the connection (reads and writes fail with `Closed`); a graceful close
//! lets buffered bytes be read, then reads fail with `Closed`.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use mesh_core::transport::{Priority, RecvStream, SendStream, StreamError};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Link, LinkState, MemoryNetwork};

/// Unread bytes (queued and delivered) a stream's writer may have
/// outstanding before `write_all` waits.
pub const STREAM_WINDOW: usize = 256 * 1024;
/// Bytes the pump of a constrained link moves per step (about a packet).
pub const CHUNK: usize = 1200;
/// The largest datagram (what fits a 1,280-byte IPv6 minimum MTU packet
/// with QUIC's overhead).
pub const MAX_DATAGRAM: usize = 1200;
/// Streams waiting to be accepted before `open_*` waits (the peer's limit
/// of open streams).
pub const ACCEPT_QUEUE: usize = 100;
/// Datagrams buffered for a reader; newer ones are dropped when full.
pub const DATAGRAM_QUEUE: usize = 256;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, Default)]
struct FlowState {
    /// Readable now.
    delivered: VecDeque<u8>,
    /// Written, waiting for the pump (constrained links only).
    queued: VecDeque<u8>,
    /// On their way under stream faults: packets and when each is due.
    timed: VecDeque<(Instant, Vec<u8>)>,
    /// Bytes in `timed`.
    timed_bytes: usize,
    /// When the last packet in `timed` is due (later ones never before).
    last_due: Option<Instant>,
    /// A task is moving `timed` into `delivered`.
    delivering: bool,
    /// The writer finished: after the buffers drain, the reader sees the end.
    finished: bool,
    /// The writer reset the stream with this code.
    reset: Option<u32>,
    /// The reader stopped the stream with this code.
    stopped: Option<u32>,
    priority: Priority,
}

/// One direction of a stream.
pub(super) struct Flow {
    state: Mutex<FlowState>,
    /// Wakes the reader and the writer on any change.
    changed: Notify,
}

impl Flow {
    fn new(priority: Priority) -> Arc<Flow> {
        Arc::new(Flow {
            state: Mutex::new(FlowState {
                priority,
                ..FlowState::default()
            }),
            changed: Notify::new(),
        })
    }

    fn update<R>(&self, f: impl FnOnce(&mut FlowState) -> R) -> R {
        let r = f(&mut lock(&self.state));
        self.changed.notify_waiters();
        r
    }

    /// Bytes arriving from the writer (or the pump): readable at once, or
    /// under stream faults packet by packet when each is due. Returns
    /// whether a delivery task must be started (see [`Flow::deliver`]).
    fn land(st: &mut FlowState, bytes: &[u8], network: &MemoryNetwork) -> bool {
        if st.timed.is_empty() && !network.stream_faults() {
            st.delivered.extend(bytes);
            return false;
        }
        for packet in bytes.chunks(CHUNK) {
            let due = network.packet_due().unwrap_or_else(Instant::now);
            // In order within the stream: never before the one ahead.
            let due = st.last_due.map_or(due, |last| due.max(last));
            st.last_due = Some(due);
            st.timed_bytes += packet.len();
            st.timed.push_back((due, packet.to_vec()));
        }
        !std::mem::replace(&mut st.delivering, true)
    }

    /// Moves packets in flight into the reader's buffer as they fall due;
    /// ends when none are left.
    async fn deliver(self: Arc<Self>) {
        loop {
            let next = self.update(|st| {
                let now = Instant::now();
                while st.timed.front().is_some_and(|(due, _)| *due <= now) {
                    if let Some((_, packet)) = st.timed.pop_front() {
                        st.timed_bytes -= packet.len();
                        st.delivered.extend(packet);
                    }
                }
                let next = st.timed.front().map(|(due, _)| *due);
                if next.is_none() {
                    st.delivering = false;
                }
                next
            });
            match next {
                Some(due) => tokio::time::sleep_until(due).await,
                None => return,
            }
        }
    }

    /// Starts [`Flow::deliver`] when [`Flow::land`] asked for it.
    fn start_delivery(self: &Arc<Self>, start: bool) {
        if start {
            tokio::spawn(self.clone().deliver());
        }
    }
}

/// Waits for `flow` or the connection's link to change, having checked
/// nothing changed in between (the `Notify` is armed before `check`).
async fn wait_until<R>(
    flow: &Flow,
    link: &Link,
    mut check: impl FnMut(&mut FlowState, LinkState) -> Option<R>,
) -> R {
    let mut link_changed = link.changed.subscribe();
    loop {
        let notified = flow.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(r) = check(&mut lock(&flow.state), link.state()) {
            return r;
        }
        tokio::select! {
            _ = notified => {}
            // The caller holds the link, so its sender outlives this wait.
            _ = link_changed.changed() => {}
        }
    }
}

/// One direction of a connection: its flows and, on a constrained link,
/// the pump that moves their bytes.
pub(super) struct Pipe {
    flows: Mutex<Vec<Weak<Flow>>>,
    wake: Notify,
    pumping: AtomicBool,
    link: Arc<Link>,
    network: MemoryNetwork,
}

impl fmt::Debug for Pipe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipe").finish_non_exhaustive()
    }
}

impl Pipe {
    pub(super) fn new(link: Arc<Link>, network: MemoryNetwork) -> Arc<Pipe> {
        Arc::new(Pipe {
            flows: Mutex::new(Vec::new()),
            wake: Notify::new(),
            pumping: AtomicBool::new(false),
            link,
            network,
        })
    }

    fn add(&self, flow: &Arc<Flow>) {
        let mut flows = lock(&self.flows);
        flows.retain(|f| f.strong_count() > 0);
        flows.push(Arc::downgrade(flow));
    }

    /// Starts the pump if it is not running (the first queued write).
    fn kick(self: &Arc<Self>) {
        if !self.pumping.swap(true, Ordering::AcqRel) {
            let pipe = self.clone();
            tokio::spawn(async move { pipe.pump().await });
        }
        self.wake.notify_one();
    }

    /// The flow to serve next: the highest priority with bytes queued;
    /// among equals, the one after the last served.
    fn pick(&self, last: &mut usize) -> Option<Arc<Flow>> {
        let mut flows = lock(&self.flows);
        flows.retain(|f| f.strong_count() > 0);
        let n = flows.len();
        let mut best: Option<(Priority, usize, Arc<Flow>)> = None;
        for k in 0..n {
            let i = (*last + 1 + k) % n;
            let Some(flow) = flows[i].upgrade() else {
                continue;
            };
            let st = lock(&flow.state);
            if st.queued.is_empty() {
                continue;
            }
            let p = st.priority;
            drop(st);
            if best.as_ref().is_none_or(|(bp, _, _)| p > *bp) {
                best = Some((p, i, flow));
            }
        }
        best.map(|(_, i, flow)| {
            *last = i;
            flow
        })
    }

    async fn pump(self: Arc<Self>) {
        let mut last = 0usize;
        let mut link_changed = self.link.changed.subscribe();
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.link.state() == LinkState::Broken {
                return;
            }
            let Some(flow) = self.pick(&mut last) else {
                if self.link.state() != LinkState::Open {
                    return;
                }
                tokio::select! {
                    _ = notified => {}
                    _ = link_changed.changed() => {}
                }
                continue;
            };
            let (moved, start) = flow.update(|st| {
                let n = st.queued.len().min(CHUNK);
                let bytes: Vec<u8> = st.queued.drain(..n).collect();
                let start = Flow::land(st, &bytes, &self.network);
                (n, start)
            });
            flow.start_delivery(start);
            if let Some(rate) = self.network.bandwidth() {
                let secs = moved as f64 / rate as f64;
                tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            }
        }
    }
}

/// Makes the two ends of one direction of a stream.
pub(super) fn flow(pipe: &Arc<Pipe>, priority: Priority) -> (MemorySendStream, MemoryRecvStream) {
    let flow = Flow::new(priority);
    pipe.add(&flow);
    (
        MemorySendStream {
            flow: flow.clone(),
            pipe: pipe.clone(),
            done: false,
        },
        MemoryRecvStream {
            flow,
            link: pipe.link.clone(),
        },
    )
}

/// The sending half of an in-memory stream. Dropping it finishes the
/// stream (as quinn does).
pub struct MemorySendStream {
    flow: Arc<Flow>,
    pipe: Arc<Pipe>,
    /// Finished or reset by this side.
    done: bool,
}

impl fmt::Debug for MemorySendStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySendStream")
            .field("priority", &lock(&self.flow.state).priority)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl SendStream for MemorySendStream {
    async fn write_all(&mut self, data: &[u8]) -> Result<(), StreamError> {
        if self.done {
            return Err(StreamError::Finished);
        }
        let constrained = self.pipe.network.bandwidth().is_some();
        let network = &self.pipe.network;
        let mut written = 0;
        while written < data.len() {
            let (n, start) = wait_until(&self.flow, &self.pipe.link, |st, link| {
                if let Some(code) = st.stopped {
                    return Some(Err(StreamError::Stopped(code)));
                }
                if link != LinkState::Open {
                    return Some(Err(StreamError::Closed));
                }
                let unread = st.delivered.len() + st.queued.len() + st.timed_bytes;
                let room = STREAM_WINDOW.saturating_sub(unread);
                if room == 0 {
                    return None;
                }
                let n = room.min(data.len() - written);
                let chunk = &data[written..written + n];
                let start = if constrained {
                    st.queued.extend(chunk);
                    false
                } else {
                    Flow::land(st, chunk, network)
                };
                Some(Ok((n, start)))
            })
            .await?;
            self.flow.start_delivery(start);
            self.flow.changed.notify_waiters();
            if constrained {
                self.pipe.kick();
            }
            written += n;
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), StreamError> {
        if self.done {
            return Err(StreamError::Finished);
        }
        self.done = true;
        self.flow.update(|st| st.finished = true);
        Ok(())
    }

    fn reset(&mut self, code: u32) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        self.flow.update(|st| {
            st.reset = Some(code);
            st.queued.clear();
            st.delivered.clear();
            st.timed.clear();
            st.timed_bytes = 0;
        });
    }

    fn set_priority(&mut self, priority: Priority) -> Result<(), StreamError> {
        if self.done {
            return Err(StreamError::Finished);
        }
        self.flow.update(|st| st.priority = priority);
        Ok(())
    }
}

impl Drop for MemorySendStream {
    fn drop(&mut self) {
        if !self.done {
            self.flow.update(|st| st.finished = true);
        }
    }
}

/// The receiving half of an in-memory stream. Dropping it stops the stream
/// with code 0.
pub struct MemoryRecvStream {
    flow: Arc<Flow>,
    link: Arc<Link>,
}

impl fmt::Debug for MemoryRecvStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRecvStream").finish_non_exhaustive()
    }
}

#[async_trait]
impl RecvStream for MemoryRecvStream {
    async fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, StreamError> {
        if buf.is_empty() {
            return Ok(Some(0));
        }
        let n = wait_until(&self.flow, &self.link, |st, link| {
            if let Some(code) = st.reset {
                return Some(Err(StreamError::Reset(code)));
            }
            if link == LinkState::Broken {
                return Some(Err(StreamError::Closed));
            }
            if !st.delivered.is_empty() {
                let n = st.delivered.len().min(buf.len());
                for (slot, b) in buf.iter_mut().zip(st.delivered.drain(..n)) {
                    *slot = b;
                }
                return Some(Ok(Some(n)));
            }
            let in_flight = !st.queued.is_empty() || !st.timed.is_empty();
            if st.finished && !in_flight {
                return Some(Ok(None));
            }
            // Closed gracefully: what the pump still holds arrives first.
            if link == LinkState::Closed && !in_flight {
                return Some(Err(StreamError::Closed));
            }
            None
        })
        .await?;
        // Room in the window for the writer.
        self.flow.changed.notify_waiters();
        Ok(n)
    }

    fn stop(&mut self, code: u32) {
        self.flow.update(|st| {
            st.stopped.get_or_insert(code);
            st.delivered.clear();
            st.queued.clear();
            st.timed.clear();
            st.timed_bytes = 0;
        });
    }
}

impl Drop for MemoryRecvStream {
    fn drop(&mut self) {
        let done = {
            let st = lock(&self.flow.state);
            st.reset.is_some()
                || (st.finished
                    && st.delivered.is_empty()
                    && st.queued.is_empty()
                    && st.timed.is_empty())
        };
        if !done {
            self.stop(0);
        }
    }
}
