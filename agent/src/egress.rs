//! Provider sockets made inside the workload's own network namespace.
//!
//! Why: a socket belongs to the network namespace its creator was in when it
//! called `socket()`, and keeps it for life. A connection the agent opens on a
//! pod's behalf is therefore created in that pod's namespace, as ztunnel's
//! in-pod mode does: it leaves with the pod's address, through the pod's
//! routes and the pod's egress rules (NetworkPolicy, nftables), and reaches
//! exactly what the pod could reach alone — never the node's own services.
//!
//! How: one thread of its own enters a namespace (`setns`), creates the
//! socket and returns to the agent's namespace before the next job. No
//! runtime worker ever changes namespace. If the thread cannot return, it
//! ends (a thread's namespace is its own) and the next job starts a fresh one.
//! `connect` and everything after run on the runtime as usual: only creation
//! needs the namespace.
use std::{
    fs::File,
    sync::{Arc, Mutex, mpsc},
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::{NetnsId, WorkloadNetns};

/// Why a socket could not be made in a workload's namespace.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error(
        "cannot enter the workload's network namespace to open its provider connection: {0}\nhint: the agent needs CAP_SYS_ADMIN (setns); the pod may also have just gone"
    )]
    Enter(nix::Error),
    #[error("cannot create a socket in the workload's network namespace: {0}")]
    Socket(std::io::Error),
    #[error("cannot start the thread that opens sockets in workload namespaces: {0}")]
    Thread(std::io::Error),
    #[error(
        "the thread that opens sockets in workload namespaces stopped; the next call starts a new one"
    )]
    Gone,
}

struct Job {
    netns: Arc<WorkloadNetns>,
    domain: Domain,
    mark: u32,
    reply: tokio::sync::oneshot::Sender<Result<Socket, EgressError>>,
}

/// Makes sockets inside workload namespaces (see the module docs).
pub struct Egress {
    home: Arc<Home>,
    jobs: Mutex<mpsc::Sender<Job>>,
}

/// The agent's own namespace, where the socket thread returns after each job.
struct Home {
    id: NetnsId,
    file: File,
}

impl Egress {
    /// Start the socket thread; the agent's current namespace is its home.
    pub fn start() -> Result<Self, EgressError> {
        let file = File::open("/proc/thread-self/ns/net").map_err(EgressError::Socket)?;
        let id = NetnsId::of_file(&file).map_err(EgressError::Socket)?;
        let home = Arc::new(Home { id, file });
        let jobs = spawn(home.clone())?;
        Ok(Self {
            home,
            jobs: Mutex::new(jobs),
        })
    }

    /// A non-blocking TCP socket for `domain`, created in `netns`, with
    /// `mark` set (the agent's own sockets carry it).
    pub async fn socket(
        &self,
        netns: &Arc<WorkloadNetns>,
        domain: Domain,
        mark: u32,
    ) -> Result<Socket, EgressError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job {
            netns: netns.clone(),
            domain,
            mark,
            reply,
        };
        let sender = self.sender();
        let job = match sender.send(job) {
            Ok(()) => return answer.await.unwrap_or(Err(EgressError::Gone)),
            // The thread ended (it could not return home): start another.
            Err(mpsc::SendError(job)) => job,
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job { reply, ..job };
        let fresh = spawn(self.home.clone())?;
        fresh.send(job).map_err(|_| EgressError::Gone)?;
        *self
            .jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
        answer.await.unwrap_or(Err(EgressError::Gone))
    }

    fn sender(&self) -> mpsc::Sender<Job> {
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

fn spawn(home: Arc<Home>) -> Result<mpsc::Sender<Job>, EgressError> {
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("tollgate-egress".into())
        .spawn(move || serve(&home, rx))
        .map_err(EgressError::Thread)?;
    Ok(tx)
}

fn serve(home: &Home, jobs: mpsc::Receiver<Job>) {
    use nix::sched::{CloneFlags, setns};
    for job in jobs {
        let away = job.netns.id != home.id;
        if away && let Err(e) = setns(&job.netns.file, CloneFlags::CLONE_NEWNET) {
            let _ = job.reply.send(Err(EgressError::Enter(e)));
            continue;
        }
        let made = make(job.domain, job.mark).map_err(EgressError::Socket);
        let _ = job.reply.send(made);
        if away && let Err(e) = setns(&home.file, CloneFlags::CLONE_NEWNET) {
            tracing::error!(error = %e, "the egress thread cannot return to the agent's namespace; ending it");
            return;
        }
    }
}

fn make(domain: Domain, mark: u32) -> std::io::Result<Socket> {
    let s = Socket::new(domain, Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    if mark != 0 {
        s.set_mark(mark)?;
    }
    s.set_nonblocking(true)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_socket_for_the_agents_own_namespace_is_made_there() {
        let egress = Egress::start().expect("egress thread");
        let own = Arc::new(WorkloadNetns::open(std::process::id()).unwrap());
        let s = egress
            .socket(&own, Domain::IPV4, 0)
            .await
            .expect("a socket");
        let here = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        assert_eq!(
            crate::netns::netns_cookie(&s).unwrap(),
            crate::netns::netns_cookie(&here).unwrap(),
            "made in the namespace asked for"
        );
        assert!(s.nonblocking().unwrap());
    }

    /// A namespace of its own (root only): the socket thread enters it, makes
    /// the socket there and comes back — the next socket is the agent's again.
    #[tokio::test]
    async fn a_socket_for_another_namespace_is_made_there_and_the_thread_returns() {
        let made = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
            let file = File::open("/proc/thread-self/ns/net")?;
            let id = NetnsId::of_file(&file)?;
            let probe = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            let cookie = crate::netns::netns_cookie(&probe)?;
            Ok::<_, std::io::Error>((WorkloadNetns { id, file }, cookie))
        })
        .join()
        .unwrap();
        let (other, other_cookie) = match made {
            Ok(m) => m,
            Err(e) if std::env::var("TOLLGATE_REQUIRE_PRIVILEGED").as_deref() != Ok("1") => {
                eprintln!("SKIP: creating a network namespace needs root ({e})");
                return;
            }
            Err(e) => panic!("creating a network namespace failed: {e}"),
        };
        let egress = Egress::start().expect("egress thread");
        let other = Arc::new(other);
        let there = egress.socket(&other, Domain::IPV4, 0).await.unwrap();
        assert_eq!(crate::netns::netns_cookie(&there).unwrap(), other_cookie);
        let own = Arc::new(WorkloadNetns::open(std::process::id()).unwrap());
        let back = egress.socket(&own, Domain::IPV6, 0).await.unwrap();
        let here = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        assert_eq!(
            crate::netns::netns_cookie(&back).unwrap(),
            crate::netns::netns_cookie(&here).unwrap(),
            "the thread came back to the agent's namespace"
        );
    }
}
