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
//! With several proxy threads (`workers`) each namespace gets one listener
//! per thread on the same port (SO_REUSEPORT): a group whose kernel-side
//! steering program (`steer`) spreads new connections over exactly those
//! listeners, so a socket a workload adds to the group later is never
//! handed a connection.
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

/// Listeners bound inside one namespace: one per proxy thread and family.
pub struct NsListeners {
    pub netns: std::sync::Arc<WorkloadNetns>,
    pub cookie: u64,
    pub v4: Vec<TcpListener>,
    /// Empty when the namespace has no IPv6 loopback (IPv6 disabled).
    pub v6: Vec<TcpListener>,
}

/// Bind `per_family` proxy listeners for each address family inside the
/// network namespace of `pid`.
///
/// setns affects only the calling thread, so this runs on a fresh thread that
/// exits afterwards: no runtime worker ever changes namespace.
pub fn bind_in_netns_of(pid: u32, port: u16, per_family: usize) -> Result<NsListeners, NetnsError> {
    let ns = WorkloadNetns::open(pid)?;
    let (v4, v6, cookie) = std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&ns.file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|source| NetnsError::Enter { pid, source })?;
            bind_here(pid, port, per_family)
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
type Bound = (Vec<TcpListener>, Vec<TcpListener>, u64);

/// Bind in the calling thread's current namespace.
fn bind_here(pid: u32, port: u16, per_family: usize) -> Result<Bound, NetnsError> {
    let v4addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v4 = listen_group(v4addr, per_family).map_err(|source| NetnsError::Bind {
        pid,
        addr: v4addr,
        port,
        source,
    })?;
    let v6addr = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    let v6 = match listen_group(v6addr, per_family) {
        Ok(l) => l,
        // No ::1 in this namespace (IPv6 disabled): IPv6 provider connections
        // there find no listener and follow the failure mode.
        Err(e)
            if e.raw_os_error() == Some(libc::EADDRNOTAVAIL)
                || e.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
        {
            Vec::new()
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
    let cookie = netns_cookie(&v4[0]).map_err(|source| NetnsError::Bind {
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

/// `count` listeners (at least one) on `addr`; several share it as one
/// SO_REUSEPORT group, its connections spread over them by `steer`.
fn listen_group(addr: SocketAddr, count: usize) -> std::io::Result<Vec<TcpListener>> {
    let shared = count > 1;
    let first = listen(addr, shared)?;
    // Port 0 (tests): the others join the port the first was given.
    let addr = first.local_addr()?;
    let mut group = vec![first];
    for _ in 1..count {
        group.push(listen(addr, shared)?);
    }
    if shared {
        steer(&group[0], count as u32)?;
    }
    Ok(group)
}

fn listen(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    Ok(s.into())
}

/// Give the SO_REUSEPORT group of `listener` its steering program: a new
/// connection goes to listener `hash % count`, where `hash` is the flow hash
/// the connecting socket stamped on its SYN (random per connection). Without
/// it the kernel would choose among every socket in the group, including
/// one a workload running as the agent's user bound to the port later;
/// with it, only the first `count` (the agent's, which joined first) are
/// ever chosen. Classic BPF: the kernel takes it from an unprivileged
/// socket option, and three instructions need no toolchain.
fn steer(listener: &TcpListener, count: u32) -> std::io::Result<()> {
    let op = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let mut program = [
        // A = skb->hash (an ancillary load at SKF_AD_OFF + SKF_AD_RXHASH)
        op(
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
            (libc::SKF_AD_OFF + libc::SKF_AD_RXHASH) as u32,
        ),
        // A %= count
        op(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, count.max(1)),
        // the index of the listener in the group
        op(libc::BPF_RET | libc::BPF_A, 0),
    ];
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: a valid socket and a pointer to a sock_fprog whose filter
    // array outlives the call (the kernel copies it).
    let r = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
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
        let l = bind_here(std::process::id(), 0, 1);
        match l {
            Ok((v4, _, cookie)) => {
                assert_ne!(cookie, 0);
                let own = netns_cookie(&v4[0]).unwrap();
                assert_eq!(own, cookie);
            }
            // Kernels before 5.14 lack SO_NETNS_COOKIE; say so rather than pass silently.
            Err(e) => panic!("binding loopback listeners failed: {e}"),
        }
    }

    /// Which listener of `group` accepted each of `n` connections to it.
    fn accepted_by(group: &[TcpListener], n: usize) -> Vec<usize> {
        let addr = group[0].local_addr().unwrap();
        let mut counts = vec![0; group.len()];
        for _ in 0..n {
            let _client = std::net::TcpStream::connect(addr).unwrap();
            // The connection is in exactly one listener's queue by now.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            'found: loop {
                for (i, l) in group.iter().enumerate() {
                    if l.accept().is_ok() {
                        counts[i] += 1;
                        break 'found;
                    }
                }
                assert!(std::time::Instant::now() < deadline, "no listener accepted");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        counts
    }

    #[test]
    fn a_listener_group_spreads_connections_over_its_own_listeners_only() {
        let (v4, _, _) = bind_here(std::process::id(), 0, 2).unwrap();
        assert_eq!(v4.len(), 2);
        let port = v4[0].local_addr().unwrap().port();
        assert!(v4.iter().all(|l| l.local_addr().unwrap().port() == port));
        // A socket of the same user joining the group afterwards (what a
        // workload running as root could try in its own namespace).
        let late = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), true).unwrap();
        let mut all: Vec<TcpListener> = v4;
        all.push(late);
        let counts = accepted_by(&all, 64);
        assert_eq!(
            counts[2], 0,
            "the late socket was handed connections: {counts:?}"
        );
        assert!(
            counts[0] > 0 && counts[1] > 0,
            "both of the group's listeners take connections: {counts:?}"
        );
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
