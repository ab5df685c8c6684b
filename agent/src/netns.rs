//! Loopback listeners inside each workload's network namespace.
//!
//! Why the proxy listens *inside* each namespace rather than on a node address:
//! a pod has its own network namespace and cannot reach the node's 127.0.0.1,
//! and a node address would depend on the CNI routing pod traffic to the node
//! and on NetworkPolicy allowing it. Like Istio ztunnel's in-pod mode, the agent
//! enters the namespace (setns on a short-lived thread), binds
//! `127.0.0.1:<port>` and `[::1]:<port>`, and returns; the socket keeps
//! belonging to that namespace. The kernel programs then always rewrite to
//! loopback, which every namespace has, and a connection's namespace is a
//! property of the listener that accepted it (its netns cookie is part of the
//! original-destination key).
//!
//! Namespaces are found by scanning the governed cgroup subtree: every process
//! there belongs to some namespace; new ones get listeners, vanished ones lose
//! them. Until a namespace has its listener, the kernel programs see no
//! listener there and apply the failure mode instead of redirecting into
//! nothing.
use std::{
    collections::HashMap,
    fs::File,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::PathBuf,
};

use socket2::{Domain, Protocol, Socket, Type};

/// Identity of a network namespace: (device, inode) of its nsfs file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

impl NetnsId {
    pub fn of_pid(pid: u32) -> std::io::Result<Self> {
        std::fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| Self::of(&m))
    }

    pub fn of_file(f: &File) -> std::io::Result<Self> {
        f.metadata().map(|m| Self::of(&m))
    }

    fn of(m: &std::fs::Metadata) -> Self {
        NetnsId {
            dev: m.dev(),
            ino: m.ino(),
        }
    }
}

/// A workload's network namespace, held open: where its listeners live and
/// where its provider connections are made (`egress`). Holding the file
/// keeps the namespace alive, so the agent drops it when the namespace
/// leaves the cgroup tree.
#[derive(Debug)]
pub struct WorkloadNetns {
    pub id: NetnsId,
    pub(crate) file: File,
}

impl WorkloadNetns {
    /// The network namespace of `pid`.
    pub fn open(pid: u32) -> Result<Self, NetnsError> {
        let open = || {
            let file = File::open(format!("/proc/{pid}/ns/net"))?;
            let id = NetnsId::of_file(&file)?;
            Ok(WorkloadNetns { id, file })
        };
        open().map_err(|source| NetnsError::Open { pid, source })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace of pid {pid}: {source}")]
    Open { pid: u32, source: std::io::Error },
    #[error(
        "cannot enter network namespace of pid {pid}: {source}\nhint: the agent needs CAP_SYS_ADMIN to open listeners inside workload namespaces"
    )]
    Enter { pid: u32, source: nix::Error },
    #[error("the thread binding listeners in the network namespace of pid {pid} failed")]
    Thread { pid: u32 },
    #[error(
        "cannot listen on {addr} in the network namespace of pid {pid}: {source}\nhint: another process in that namespace holds port {port}; set proxy.port to a free port"
    )]
    Bind {
        pid: u32,
        addr: SocketAddr,
        port: u16,
        source: std::io::Error,
    },
}

/// Listeners bound inside one namespace.
pub struct NsListeners {
    pub netns: std::sync::Arc<WorkloadNetns>,
    pub cookie: u64,
    pub v4: TcpListener,
    /// None when the namespace has no IPv6 loopback (IPv6 disabled).
    pub v6: Option<TcpListener>,
}

/// Bind the proxy listeners inside the network namespace of `pid`.
///
/// setns affects only the calling thread, so this runs on a fresh thread that
/// exits afterwards: no runtime worker ever changes namespace.
pub fn bind_in_netns_of(pid: u32, port: u16) -> Result<NsListeners, NetnsError> {
    let ns = WorkloadNetns::open(pid)?;
    let (v4, v6, cookie) = std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&ns.file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|source| NetnsError::Enter { pid, source })?;
            bind_here(pid, port)
        })
        .join()
        .unwrap_or(Err(NetnsError::Thread { pid }))
    })?;
    Ok(NsListeners {
        netns: std::sync::Arc::new(ns),
        cookie,
        v4,
        v6,
    })
}

/// Listeners for IPv4 and (when the namespace has it) IPv6, and the namespace's cookie.
type Bound = (TcpListener, Option<TcpListener>, u64);

/// Bind in the calling thread's current namespace.
fn bind_here(pid: u32, port: u16) -> Result<Bound, NetnsError> {
    let v4addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v4 = listen(v4addr).map_err(|source| NetnsError::Bind {
        pid,
        addr: v4addr,
        port,
        source,
    })?;
    let v6addr = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    let v6 = match listen(v6addr) {
        Ok(l) => Some(l),
        // No ::1 in this namespace (IPv6 disabled): IPv6 provider connections
        // there find no listener and follow the failure mode.
        Err(e)
            if e.raw_os_error() == Some(libc::EADDRNOTAVAIL)
                || e.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
        {
            None
        }
        Err(source) => {
            return Err(NetnsError::Bind {
                pid,
                addr: v6addr,
                port,
                source,
            });
        }
    };
    let cookie = netns_cookie(&v4).map_err(|source| NetnsError::Bind {
        pid,
        addr: v4addr,
        port,
        source,
    })?;
    Ok((v4, v6, cookie))
}

/// Backlog of each listener: a burst of connects from one pod (an SDK opening
/// a pool) must not overflow it; 1024 matches net.core.somaxconn's default.
const BACKLOG: i32 = 1024;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    Ok(s.into())
}

/// SO_NETNS_COOKIE (Linux ≥ 5.14): the same cookie `bpf_get_netns_cookie` returns.
pub fn netns_cookie(sock: &impl AsRawFd) -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer to a u64 with its length.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// What a scan found: each namespace with one live pid in it and the cgroups seen there.
#[derive(Debug, Default)]
pub struct ScanResult {
    pub namespaces: HashMap<NetnsId, Found>,
}

/// One namespace of a scan.
#[derive(Debug, Default)]
pub struct Found {
    /// A live process in it.
    pub pid: u32,
    /// The cgroups (id, path) whose processes are in it.
    pub cgroups: Vec<(u64, PathBuf)>,
}

/// Group the processes of the governed cgroups by network namespace.
pub fn scan(entries: &[crate::cgroup::CgroupEntry]) -> ScanResult {
    let mut r = ScanResult::default();
    for e in entries {
        // One pid per cgroup is enough: containers of a pod share a namespace,
        // and a process that just exited is skipped for the next.
        for &pid in &e.pids {
            if let Ok(id) = NetnsId::of_pid(pid) {
                let slot = r.namespaces.entry(id).or_insert_with(|| Found {
                    pid,
                    cgroups: Vec::new(),
                });
                slot.cgroups.push((e.id, e.path.clone()));
                break;
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_in_own_namespace_and_reads_cookie() {
        // Port 0: any free port; this only exercises bind + cookie.
        let l = bind_here(std::process::id(), 0);
        match l {
            Ok((v4, _, cookie)) => {
                assert_ne!(cookie, 0);
                let own = netns_cookie(&v4).unwrap();
                assert_eq!(own, cookie);
            }
            // Kernels before 5.14 lack SO_NETNS_COOKIE; say so rather than pass silently.
            Err(e) => panic!("binding loopback listeners failed: {e}"),
        }
    }

    #[test]
    fn scan_groups_by_namespace() {
        let me = std::process::id();
        let entries = vec![
            crate::cgroup::CgroupEntry {
                id: 1,
                path: "/a".into(),
                pids: vec![u32::MAX, me],
            },
            crate::cgroup::CgroupEntry {
                id: 2,
                path: "/b".into(),
                pids: vec![me],
            },
            crate::cgroup::CgroupEntry {
                id: 3,
                path: "/c".into(),
                pids: vec![],
            },
        ];
        let r = scan(&entries);
        assert_eq!(r.namespaces.len(), 1);
        let found = r.namespaces.values().next().unwrap();
        assert_eq!(found.pid, me);
        assert_eq!(found.cgroups.len(), 2);
        assert_eq!(found.cgroups[0].0, 1);
    }
}
