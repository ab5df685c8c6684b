//! The proxy's threads: each runs a tokio runtime of its own (the
//! current-thread scheduler), as nginx runs worker processes.
//!
//! Every workload namespace gets one listener per thread, all bound to the
//! proxy port with SO_REUSEPORT (`netns::bind_in_netns_of`). The kernel hands
//! each new connection to one of them, and from then on the connection, its
//! requests, the tasks they spawn and the provider connections they use
//! (`proxy::pooled` keeps idle ones per thread) stay on that listener's
//! thread. Calls run in parallel on every CPU, and none of them is handed
//! from one thread to another: no cross-thread wake-up per call, which on
//! the 2-CPU bench cost a work-stealing runtime a third more CPU per call
//! than one thread did (README "Performance").
//!
//! The control plane (scans, DNS, the kube watch, metrics, reloads) keeps
//! the main thread, so none of its work delays a call.
use std::{cell::Cell, future::Future, thread::JoinHandle as ThreadHandle, time::Duration};

use tokio::{runtime::Handle, sync::oneshot, task::JoinHandle};

thread_local! {
    /// This thread's worker index; 0 on threads that are not workers.
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The worker index of the calling thread (0 on any other thread): what
/// per-thread state, such as the idle provider connections, is keyed by.
pub fn current() -> usize {
    INDEX.with(Cell::get)
}

/// How long a stopping worker waits for its blocking tasks (a tokenizer's
/// count) before it lets them go.
const BLOCKING_GRACE: Duration = Duration::from_secs(1);

/// The running proxy threads.
pub struct Workers {
    workers: Vec<Worker>,
}

struct Worker {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<ThreadHandle<()>>,
}

impl Workers {
    /// Start `n` proxy threads (at least one), each driving its own runtime
    /// until the `Workers` are dropped.
    pub fn start(n: usize) -> std::io::Result<Self> {
        let mut workers = Vec::with_capacity(n.max(1));
        for index in 0..n.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            // One name for all (a thread name holds 15 bytes): tools that
            // sum CPU per thread name (`top -H`, the bench) show them as one.
            let thread = std::thread::Builder::new()
                .name("tollgate-proxy".into())
                .spawn(move || {
                    INDEX.with(|i| i.set(index));
                    // Tasks spawned on `handle` run while this drives the runtime.
                    let _ = runtime.block_on(stopped);
                    runtime.shutdown_timeout(BLOCKING_GRACE);
                })?;
            workers.push(Worker {
                handle,
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(Self { workers })
    }

    /// How many proxy threads run.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Run `task` on worker `index` (modulo their number).
    pub fn spawn<F>(&self, index: usize, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.workers[index % self.workers.len()].handle.spawn(task)
    }
}

impl Drop for Workers {
    /// Stop every thread: the tasks still on it are dropped there (a call's
    /// record is written as its body is dropped), then the thread is joined.
    fn drop(&mut self) {
        for w in &mut self.workers {
            if let Some(stop) = w.stop.take() {
                let _ = stop.send(());
            }
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_task_runs_on_its_own_worker_thread() {
        let workers = Workers::start(3).unwrap();
        assert_eq!(workers.len(), 3);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for i in 0..6 {
            let (index, name) = rt
                .block_on(workers.spawn(i, async {
                    // Spawned from a worker, a task stays on that worker.
                    tokio::spawn(async {
                        (current(), std::thread::current().name().map(str::to_string))
                    })
                    .await
                    .unwrap()
                }))
                .unwrap();
            assert_eq!(index, i % 3);
            assert_eq!(name.as_deref(), Some("tollgate-proxy"));
        }
        assert_eq!(current(), 0, "the test thread is not a worker");
    }

    #[test]
    fn dropping_the_workers_stops_their_threads_and_drops_their_tasks() {
        struct Dropped(std::sync::mpsc::Sender<()>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let workers = Workers::start(2).unwrap();
        for i in 0..2 {
            let guard = Dropped(tx.clone());
            workers.spawn(i, async move {
                let _guard = guard;
                std::future::pending::<()>().await;
            });
        }
        drop(tx);
        drop(workers);
        // Both tasks were dropped, and nothing else holds a sender.
        assert_eq!(rx.iter().count(), 2);
    }
}
