//! The node-wide bound on request bodies held in memory.
//!
//! Each terminated request is read whole (the model decides policy), up to
//! `tls.max_request_body`; without a shared bound, many connections × many
//! h2 streams × that size is memory nobody agreed to. Every body reserves
//! what it holds from one budget (`tls.max_buffered_bytes`) as it arrives,
//! frame by frame, and gives it back when the request is done with it
//! (dropped after the provider answered or the call was refused). A body
//! that would pass the bound is refused with a provider-shaped 503 and
//! `retry-after`: the workload's SDK waits and tries again, other calls go on.
use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

/// The shared budget.
#[derive(Debug)]
pub struct BodyBudget {
    in_use: AtomicUsize,
    limit: usize,
}

impl BodyBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            in_use: AtomicUsize::new(0),
            limit,
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes held by all requests now.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    /// An empty reservation that grows with the body it accounts for.
    pub fn reservation(self: &Arc<Self>) -> Reservation {
        Reservation {
            budget: self.clone(),
            held: 0,
        }
    }
}

/// Bytes one request holds; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<BodyBudget>,
    held: usize,
}

impl Reservation {
    /// Take `n` more bytes, or nothing when that would pass the limit.
    pub fn grow(&mut self, n: usize) -> bool {
        let b = &self.budget;
        let taken = b
            .in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= b.limit)
            })
            .is_ok();
        if taken {
            self.held += n;
        }
        taken
    }

    pub fn held(&self) -> usize {
        self.held
    }

    /// Give back everything held; the reservation can grow again.
    pub fn release(&mut self) {
        self.budget.in_use.fetch_sub(self.held, Ordering::AcqRel);
        self.held = 0;
    }

    /// The node-wide limit this reservation counts against.
    pub fn limit(&self) -> usize {
        self.budget.limit
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_share_one_limit_and_give_back_on_drop() {
        let budget = BodyBudget::new(100);
        let mut a = budget.reservation();
        let mut b = budget.reservation();
        assert!(a.grow(60));
        assert!(!b.grow(41), "over the shared limit");
        assert!(b.grow(40));
        assert_eq!(budget.in_use(), 100);
        assert!(!a.grow(1));
        drop(a);
        assert_eq!(budget.in_use(), 40);
        assert!(b.grow(60), "freed bytes serve the next body");
        assert_eq!(b.held(), 100);
        b.release();
        assert_eq!((b.held(), budget.in_use()), (0, 0));
        assert!(b.grow(10), "a released reservation grows again");
        drop(b);
        assert_eq!(budget.in_use(), 0);
        assert!(!budget.reservation().grow(usize::MAX), "no overflow");
    }
}
