//! Waiting for storage batches to commit, off the async threads.
//!
//! An actor submits a batch ([`Storage::submit`](crate::storage::Storage::submit):
//! the storage writer groups the batches queued together into one
//! transaction and one flush) and hands the [`Pending`] to a [`Committer`]
//! with what to do afterwards; a thread of its own waits for each in
//! submission order and sends the outcome back on a channel the actor
//! selects on. The actor bounds how many it has in flight.

use tokio::sync::mpsc;

use super::NodeError;
use crate::storage::{Pending, StorageError};

/// Hands batches to the waiting thread.
#[derive(Debug)]
pub(crate) struct Committer<T> {
    jobs: std::sync::mpsc::Sender<(Pending, T)>,
}

/// A batch's outcome, with what was to be done after it.
pub(crate) type Outcome<T> = (T, Result<(), StorageError>);

impl<T: Send + 'static> Committer<T> {
    /// Starts the waiting thread `name`; outcomes arrive on the receiver.
    pub(crate) fn start(
        name: &str,
    ) -> Result<(Self, mpsc::UnboundedReceiver<Outcome<T>>), NodeError> {
        let (jobs, rx) = std::sync::mpsc::channel::<(Pending, T)>();
        let (done, outcomes) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while let Ok((pending, then)) = rx.recv() {
                    if done.send((then, pending.wait())).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| NodeError::Unavailable(format!("cannot start {name}: {e}")))?;
        Ok((Committer { jobs }, outcomes))
    }

    /// Waits for `pending`, then sends `then` back; false if the thread
    /// stopped.
    pub(crate) fn wait(&self, pending: Pending, then: T) -> bool {
        self.jobs.send((pending, then)).is_ok()
    }
}

/// Sends an actor the command `make` builds around a reply channel and
/// waits for the reply; `stopped` is the error when the actor is gone.
pub(crate) async fn ask<C, T>(
    inbox: &mpsc::Sender<C>,
    make: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> C,
    stopped: impl Fn() -> NodeError,
) -> Result<T, NodeError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    inbox.send(make(tx)).await.map_err(|_| stopped())?;
    rx.await.map_err(|_| stopped())
}
