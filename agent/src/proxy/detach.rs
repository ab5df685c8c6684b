//! A call's provider leg, run by the request's own task while its client
//! waits, and moved to a task of its own only if the client leaves (hyper
//! drops the request's future): a call the provider is already serving
//! still ends, is recorded and charged, without every call paying for a
//! spawned task, a channel and a wake-up across tasks.
use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::sync::oneshot;

/// A boxed future that can outlive the request it belongs to.
pub(super) type Leg<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Closed (`ClientHere::closed`) once the client has left.
pub(super) type ClientHere = oneshot::Sender<()>;

/// A leg polled in place; see the module's doc.
pub(super) struct Detachable<T: Send + 'static> {
    leg: Option<Leg<T>>,
    /// Dropped when the client leaves: the leg's `ClientHere` closes.
    client: Option<oneshot::Receiver<()>>,
    /// What becomes of the leg's output when nobody waits for it.
    orphaned: fn(T) -> Leg<()>,
}

impl<T: Send + 'static> Detachable<T> {
    /// `leg(here)` is the work; `here` closes when the client leaves.
    pub fn new(leg: impl FnOnce(ClientHere) -> Leg<T>, orphaned: fn(T) -> Leg<()>) -> Self {
        let (here, client) = oneshot::channel();
        Self {
            leg: Some(leg(here)),
            client: Some(client),
            orphaned,
        }
    }
}

impl<T: Send + 'static> Future for Detachable<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let Some(leg) = self.leg.as_mut() else {
            panic!("Detachable polled after it completed");
        };
        let out = std::task::ready!(leg.as_mut().poll(cx));
        self.leg = None;
        Poll::Ready(out)
    }
}

impl<T: Send + 'static> Drop for Detachable<T> {
    fn drop(&mut self) {
        let Some(leg) = self.leg.take() else {
            return; // finished: its output went to the client
        };
        self.client.take();
        let orphaned = self.orphaned;
        // Outside a runtime (it is shutting down) the leg goes with it.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { orphaned(leg.await).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A leg that waits `for_ms`, then says whether its client was still
    /// there; `seen` gets what the orphan handler is given.
    fn leg(for_ms: u64) -> impl FnOnce(ClientHere) -> Leg<bool> {
        move |here| {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(for_ms)).await;
                !here.is_closed()
            })
        }
    }

    static ORPHANS: std::sync::Mutex<Vec<bool>> = std::sync::Mutex::new(Vec::new());

    fn orphaned(client_was_here: bool) -> Leg<()> {
        Box::pin(async move { ORPHANS.lock().unwrap().push(client_was_here) })
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_leg_awaited_to_its_end_runs_in_place_and_one_dropped_ends_on_a_task() {
        // Awaited: its output comes back, the client was there, no orphan.
        assert!(Detachable::new(leg(10), orphaned).await);
        assert!(ORPHANS.lock().unwrap().is_empty());

        // Dropped half-way (the client left): it goes on, sees the client
        // gone, and its output goes to the orphan handler.
        let d = Detachable::new(leg(50), orphaned);
        assert!(
            tokio::time::timeout(Duration::from_millis(10), d)
                .await
                .is_err()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(*ORPHANS.lock().unwrap(), vec![false]);
    }
}
