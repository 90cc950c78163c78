//! Outgoing message links to other nodes (mesh members, sync peers): a
//! bounded queue per peer, drained by a writer task that dials the peer
//! pinned to its node id when it has no connection, optionally sends a
//! first frame on each new connection (the membership protocol's hello),
//! redials once when the peer closed the connection, and closes it when
//! idle.
//!
//! Frames over the queue's bound are dropped (the caller counts them):
//! the protocols over these links repair losses themselves (SWIM, lazy
//! push, anti-entropy).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{Core, lock};
use crate::identity::NodeId;
use crate::limits::{Rate, TokenBucket};
use crate::transport::{Connection, PeerAddr, Protocol};

/// Timings of a link.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LinkTiming {
    /// How long dialling one address may take.
    pub(crate) dial_timeout: Duration,
    /// After a failed dial, frames are dropped for this long.
    pub(crate) redial_after: Duration,
    /// A connection with nothing to send for this long is closed.
    pub(crate) idle_close: Duration,
}

/// Makes the first frame of each new connection (none: no first frame).
pub(crate) type FirstFrame = Box<dyn Fn() -> Option<Vec<u8>> + Send + Sync>;

/// One peer's queue; dropping it ends the writer.
#[derive(Debug)]
pub(crate) struct OutLink {
    tx: mpsc::Sender<Vec<u8>>,
    addrs: Arc<Mutex<Vec<PeerAddr>>>,
    /// Set when the addresses change: the writer drops its connection (to
    /// where the peer was) and dials again.
    moved: Arc<AtomicBool>,
}

impl OutLink {
    /// Starts a writer for `peer` on `protocol`, reached at `addrs`, with a
    /// queue of `queue` frames.
    pub(crate) fn start(
        core: &Arc<Core>,
        peer: NodeId,
        protocol: Protocol,
        addrs: Vec<PeerAddr>,
        timing: LinkTiming,
        first: Option<FirstFrame>,
        queue: usize,
    ) -> OutLink {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let addrs = Arc::new(Mutex::new(addrs));
        let moved = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            core: Arc::downgrade(core),
            peer,
            protocol,
            addrs: addrs.clone(),
            moved: moved.clone(),
            timing,
            first,
        };
        core.spawn(writer.run(rx));
        OutLink { tx, addrs, moved }
    }

    /// Queues `frame`; false if the queue is full (the frame is dropped).
    pub(crate) fn send(&self, frame: Vec<u8>) -> bool {
        self.tx.try_send(frame).is_ok()
    }

    /// Where the peer is reached from now on (ignored if empty).
    pub(crate) fn set_addrs(&self, addrs: Vec<PeerAddr>) {
        if addrs.is_empty() {
            return;
        }
        let mut current = lock(&self.addrs);
        if *current != addrs {
            *current = addrs;
            self.moved.store(true, Ordering::Release);
        }
    }
}

struct Writer {
    core: Weak<Core>,
    peer: NodeId,
    protocol: Protocol,
    addrs: Arc<Mutex<Vec<PeerAddr>>>,
    moved: Arc<AtomicBool>,
    timing: LinkTiming,
    first: Option<FirstFrame>,
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<Vec<u8>>) {
        let mut conn: Option<Box<dyn Connection>> = None;
        let mut down_until: Option<tokio::time::Instant> = None;
        loop {
            let frame = match tokio::time::timeout(self.timing.idle_close, rx.recv()).await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => {
                    if let Some(c) = conn.take() {
                        c.close();
                    }
                    continue;
                }
            };
            if self.moved.swap(false, Ordering::AcqRel) {
                // The peer moved (it restarted elsewhere): a connection to
                // where it was may look open for a long while.
                if let Some(c) = conn.take() {
                    c.close();
                }
                down_until = None;
            }
            if down_until.is_some_and(|t| tokio::time::Instant::now() < t) {
                continue;
            }
            // A connection the peer closed (it restarted, or dropped an
            // older connection of ours) fails the send: dial again once and
            // resend, so the frame is not lost to a stale connection.
            for _attempt in 0..2 {
                if conn.is_none() {
                    match self.dial().await {
                        Some(c) => {
                            down_until = None;
                            conn = Some(c);
                        }
                        None => {
                            down_until =
                                Some(tokio::time::Instant::now() + self.timing.redial_after);
                            break;
                        }
                    }
                }
                let Some(c) = &conn else { break };
                if c.send(frame.clone()).await.is_ok() {
                    break;
                }
                c.close();
                conn = None;
            }
        }
        if let Some(c) = conn {
            c.close();
        }
    }

    async fn dial(&self) -> Option<Box<dyn Connection>> {
        let core = self.core.upgrade()?;
        let addrs = lock(&self.addrs).clone();
        let first = match &self.first {
            Some(make) => Some(make()?),
            None => None,
        };
        for addr in addrs {
            let dial = core.connect(self.peer, &addr, self.protocol);
            if let Ok(Ok(c)) = tokio::time::timeout(self.timing.dial_timeout, dial).await {
                match &first {
                    Some(f) if c.send(f.clone()).await.is_err() => c.close(),
                    _ => return Some(c),
                }
            }
        }
        None
    }
}

/// A connection and its number.
type Numbered = (u64, Arc<dyn Connection>);

/// Incoming connections of one protocol, at most a few per peer (a new
/// one closes the oldest), whose frames are forwarded to an actor at most
/// at a rate per connection.
#[derive(Debug, Default)]
pub(crate) struct Incoming {
    conns: Mutex<HashMap<NodeId, Vec<Numbered>>>,
    next: AtomicU64,
}

impl Incoming {
    /// Serves `conn` until it ends, or its peer stops being `admitted`:
    /// each frame within `rate` goes to `forward` (which says whether the
    /// actor still runs); frames over it are counted in `dropped`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn serve<F, Fut>(
        &self,
        core: &Core,
        conn: Arc<dyn Connection>,
        per_peer: usize,
        rate: Rate,
        admitted: impl Fn(&NodeId) -> bool,
        dropped: &AtomicU64,
        mut forward: F,
    ) where
        F: FnMut(NodeId, Option<PeerAddr>, Vec<u8>) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let from = conn.remote_node();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        {
            let mut conns = lock(&self.conns);
            let list = conns.entry(from).or_default();
            list.push((id, conn.clone()));
            while list.len() > per_peer.max(1) {
                let (_, old) = list.remove(0);
                old.close();
            }
        }
        let mut bucket = TokenBucket::new(rate, core.now());
        while let Ok(bytes) = conn.recv().await {
            if !admitted(&from) {
                break;
            }
            if !bucket.try_take(core.now()) {
                dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if !forward(from, conn.remote_addr(), bytes).await {
                break;
            }
        }
        conn.close();
        let mut conns = lock(&self.conns);
        if let Some(list) = conns.get_mut(&from) {
            list.retain(|(i, _)| *i != id);
            if list.is_empty() {
                conns.remove(&from);
            }
        }
    }
}

/// A runtime that serves one protocol to mesh members only
/// ([`MemberService`]).
#[async_trait::async_trait]
pub(crate) trait MembersOnly: Send + Sync + 'static {
    /// Whether `peer` may connect (a member, not blocked).
    fn admits(&self, peer: &NodeId) -> bool;
    /// Serves one admitted connection until it ends.
    async fn serve_member(self: Arc<Self>, conn: Arc<dyn Connection>);
}

/// The protocol handler of a [`MembersOnly`] runtime: admits what it
/// admits, serves with it while it runs.
pub(crate) struct MemberService<T> {
    rt: Weak<T>,
    name: &'static str,
}

impl<T> std::fmt::Debug for MemberService<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl<T: MembersOnly> MemberService<T> {
    /// `protocol` served by `rt`, as a handler.
    pub(crate) fn handler(
        rt: &Arc<T>,
        protocol: Protocol,
        name: &'static str,
    ) -> (Protocol, Arc<dyn super::protocols::ProtocolHandler>) {
        (
            protocol,
            Arc::new(MemberService {
                rt: Arc::downgrade(rt),
                name,
            }),
        )
    }
}

#[async_trait::async_trait]
impl<T: MembersOnly> super::protocols::ProtocolHandler for MemberService<T> {
    fn admit(&self, peer: &NodeId) -> bool {
        self.rt.upgrade().is_some_and(|rt| rt.admits(peer))
    }

    async fn serve(&self, conn: Arc<dyn Connection>) {
        match self.rt.upgrade() {
            Some(rt) => rt.serve_member(conn).await,
            None => conn.close(),
        }
    }
}
