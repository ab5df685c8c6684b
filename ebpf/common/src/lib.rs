//! The contract between Tollgate's kernel programs and its agent.
//!
//! Every map key and value lives here once, `#[repr(C)]`, with explicit padding so
//! that both compilers agree on the layout and the kernel never hashes
//! uninitialised bytes. Byte order is part of each field's name:
//! `_be` fields hold network byte order exactly as on the wire, plain integer
//! fields hold host order.
//!
//! IPv4 addresses are stored as IPv4-mapped IPv6 (`::ffff:a.b.c.d`) so one key
//! type serves both families and a v4-mapped connect from an `AF_INET6` socket
//! finds the same provider entry as a plain IPv4 connect.
#![no_std]

pub mod dns;

/// Names of the maps, shared so the agent never spells one differently.
pub mod map_names {
    pub const PROVIDERS: &str = "PROVIDERS";
    pub const SOCKETS: &str = "SOCKETS";
    pub const ORIG_DST: &str = "ORIG_DST";
    pub const OPT_OUT: &str = "OPT_OUT";
    pub const SETTINGS: &str = "SETTINGS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const DNS_NAMES: &str = "DNS_NAMES";
    pub const LEARNED: &str = "LEARNED";
    pub const CGROUP_NETNS: &str = "CGROUP_NETNS";
    pub const RESOLVERS: &str = "RESOLVERS";
    pub const TLS_CALLS: &str = "TLS_CALLS";
    pub const TLS_SSL: &str = "TLS_SSL";
    pub const CAPTURE: &str = "CAPTURE";
    pub const TLS_EVENTS: &str = "TLS_EVENTS";
    pub const TLS_SCRATCH: &str = "TLS_SCRATCH";
    pub const TLS_SOCKS: &str = "TLS_SOCKS";
    pub const LAST_SSL: &str = "LAST_SSL";
    pub const BLOCKED: &str = "BLOCKED";
    pub const SOCK_BY_ADDR: &str = "SOCK_BY_ADDR";
}

/// Names of the programs inside the object.
pub mod program_names {
    pub const CONNECT4: &str = "tollgate_connect4";
    pub const CONNECT6: &str = "tollgate_connect6";
    pub const SOCK_OPS: &str = "tollgate_sock_ops";
    pub const GETPEERNAME4: &str = "tollgate_getpeername4";
    pub const GETPEERNAME6: &str = "tollgate_getpeername6";
    pub const SENDMSG4: &str = "tollgate_sendmsg4";
    pub const SENDMSG6: &str = "tollgate_sendmsg6";
    pub const DNS_INGRESS: &str = "tollgate_dns_ingress";
    /// Uprobes on a TLS library's plaintext calls (module `tls` of the programs).
    pub const TLS_WRITE: &str = "tollgate_tls_write";
    pub const TLS_WRITE_EX: &str = "tollgate_tls_write_ex";
    pub const TLS_READ: &str = "tollgate_tls_read";
    pub const TLS_READ_EX: &str = "tollgate_tls_read_ex";
    pub const TLS_HANDSHAKE: &str = "tollgate_tls_handshake";
    pub const TLS_RETURN: &str = "tollgate_tls_return";
    /// sk_msg on redirected sockets: which socket a TLS call writes to.
    pub const TLS_SK_MSG: &str = "tollgate_tls_sk_msg";
}

/// Capacity of the maps. Each number is a bound on kernel memory, not a tuning knob:
pub mod capacity {
    /// Provider (address, port) pairs. A provider resolves to a handful of
    /// addresses per family; 4096 leaves room for hundreds of configured hosts.
    pub const PROVIDERS: u32 = 4096;
    /// Redirected sockets by socket cookie: read by sock_ops at the SYN and by
    /// getpeername for the life of the socket. LRU, because the kernel tells no
    /// program when a socket closes: old records are evicted, never leaked.
    /// Cookies are never reused, so an evicted or stale record cannot be
    /// mistaken for a new socket's.
    pub const SOCKETS: u32 = 65536;
    /// Redirected connections the proxy has not accepted yet (LRU for the same reason).
    pub const ORIG_DST: u32 = 65536;
    /// Opted-out cgroups (a pod's cgroup opts out all its containers).
    pub const OPT_OUT: u32 = 4096;
    /// Provider host names whose DNS answers are learned.
    pub const DNS_NAMES: u32 = 1024;
    /// Provider (address, port) pairs learned from workloads' DNS answers,
    /// per namespace. LRU: a flood of answers evicts the oldest, never fails
    /// the insert.
    pub const LEARNED: u32 = 16384;
    /// Governed cgroups and the network namespace of each (written by the
    /// agent's scan): a node runs a few hundred containers.
    pub const CGROUP_NETNS: u32 = 16384;
    /// Resolvers whose answers are learned, per namespace.
    pub const RESOLVERS: u32 = 4096;
    /// TLS calls in progress (one per thread inside SSL_read/SSL_write).
    pub const TLS_CALLS: u32 = 16384;
    /// TLS sessions whose socket is known.
    pub const TLS_SSL: u32 = 65536;
    /// Connections whose plaintext is captured.
    pub const CAPTURE: u32 = 16384;
    /// Workload cgroups whose provider connections are refused (a budget
    /// their uprobe-read calls spent).
    pub const BLOCKED: u32 = 4096;
}

/// Reading the plaintext of TLS connections the agent relays (pods that do
/// not trust the node CA) at their TLS library.
pub mod tls {
    /// Plaintext bytes per ring-buffer record.
    pub const CHUNK: usize = 16 * 1024;
    /// Records one SSL_write/SSL_read may fill: a call of up to 1 MiB is
    /// captured whole, the rest of a longer one is counted as lost.
    pub const MAX_CHUNKS_PER_CALL: u32 = 64;
    /// Plaintext captured per connection at most (both directions); past
    /// it the connection's bytes are counted, not read.
    pub const MAX_BYTES_PER_CONNECTION: u64 = 64 << 20;
    /// The ring buffer's size.
    pub const RING_BYTES: u32 = 8 << 20;
    /// What the workload sent (its requests).
    pub const DIR_WRITE: u8 = 0;
    /// What the workload received (the provider's answers).
    pub const DIR_READ: u8 = 1;
    /// A call that moves no plaintext (`SSL_do_handshake`): it only tells
    /// which socket a session uses.
    pub const DIR_NONE: u8 = 2;
}

/// Ports learned per provider address (the provider's configured `ports`).
pub const MAX_LEARNED_PORTS: usize = 4;

/// Maximum cgroup depth (below the cgroup2 root) at which an opt-out is
/// honoured. Kubelet's deepest layout is
/// `kubepods.slice/kubepods-burstable.slice/…-pod<uid>.slice/cri-containerd-<id>.scope`
/// (4), under a node that may itself be nested a few levels; 12 covers that with
/// room and keeps the verifier's unrolled loop small.
pub const MAX_OPT_OUT_DEPTH: u32 = 12;

/// IPv6 or IPv4-mapped address in network byte order, plus a host-order port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ProviderKey {
    pub ip_be: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 2],
}

/// A provider address learned from a DNS answer, valid only for
/// connections from the network namespace that received the answer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct LearnedKey {
    pub netns_cookie: u64,
    /// IPv6 or IPv4-mapped, network byte order.
    pub ip_be: [u8; 16],
    /// Host order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// A resolver whose answers a namespace learns from: `netns_cookie` 0
/// stands for every namespace (`dns.workload_resolvers`, the cluster DNS).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ResolverKey {
    pub netns_cookie: u64,
    /// IPv6 or IPv4-mapped, network byte order.
    pub ip_be: [u8; 16],
}

/// What the agent knows about a provider address.
/// One thread's TLS call in progress, from the uprobe at its entry to the
/// one at its return.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TlsCall {
    /// The `SSL *` (an address in the process, never dereferenced).
    pub ssl: u64,
    /// The plaintext buffer.
    pub buf: u64,
    /// `SSL_write_ex`/`SSL_read_ex`: where the byte count is written; 0
    /// for `SSL_write`/`SSL_read`, which return it.
    pub len_ptr: u64,
    pub dir: u8,
    pub _pad: [u8; 7],
}

/// A TLS session, by process.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SslKey {
    pub ssl: u64,
    pub tgid: u32,
    pub _pad: u32,
}

/// A captured connection's account (CAPTURE, by socket cookie): the agent
/// inserts it zeroed when it relays the connection, the programs count.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CaptureState {
    /// Plaintext bytes delivered to the ring buffer.
    pub captured: u64,
    /// Plaintext bytes not delivered, by direction (ring buffer full, the
    /// connection's or the call's bound reached).
    pub lost: [u64; 2],
}

/// The header of one ring-buffer record; `len` plaintext bytes follow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TlsChunkHeader {
    /// The workload's socket.
    pub cookie: u64,
    /// Bytes of this direction lost before this record (cumulative): a
    /// reader that sees it grow knows its stream has a hole.
    pub lost_before: u64,
    pub tgid: u32,
    pub len: u32,
    pub dir: u8,
    pub _pad: [u8; 7],
}

/// Per-CPU scratch space a record is built in.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsScratch {
    pub hdr: TlsChunkHeader,
    pub data: [u8; tls::CHUNK],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ProviderValue {
    /// Index of the provider in the agent's config (for attribution and metrics).
    pub provider_id: u32,
    pub _pad: u32,
}

/// A provider host name to learn from DNS answers, and where its
/// addresses are dialled.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DnsNameValue {
    pub provider_id: u32,
    /// Host-order ports; the first `port_count` are used.
    pub ports: [u16; MAX_LEARNED_PORTS],
    pub port_count: u32,
}

/// A provider address learned from a DNS answer, valid until `expires_ns`
/// (CLOCK_MONOTONIC, as `bpf_ktime_get_ns`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LearnedValue {
    pub provider_id: u32,
    pub _pad: u32,
    pub expires_ns: u64,
}

/// One redirected connection as recorded at connect() time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnInfo {
    /// Original destination (IPv4-mapped for IPv4), network byte order.
    pub orig_ip_be: [u8; 16],
    /// Original destination port, host order.
    pub orig_port: u16,
    /// `AF_INET` or `AF_INET6` of the connecting socket.
    pub family: u16,
    pub provider_id: u32,
    /// cgroup v2 id (inode of the cgroup directory) of the connecting task.
    pub cgroup_id: u64,
    /// Cookie of the network namespace the socket lives in.
    pub netns_cookie: u64,
    /// The workload socket's own cookie (what TLS capture is keyed by).
    pub socket_cookie: u64,
    /// Thread-group id (process id) in the initial PID namespace.
    pub tgid: u32,
    pub _pad: u32,
    /// Task command name, NUL-padded.
    pub comm: [u8; 16],
}

/// Where the proxy finds a connection's record: the client's side of the
/// connection as the accepted socket's peer address shows it, in the namespace
/// whose loopback listener accepted it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct OrigDstKey {
    pub netns_cookie: u64,
    /// Client (local) address of the redirected socket, IPv4-mapped for IPv4, network order.
    pub ip_be: [u8; 16],
    /// Client (local) port, host order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Runtime settings the agent writes into the single-slot `SETTINGS` array.
/// All zero (the state before the agent writes it) means "do nothing".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Settings {
    /// CLOCK_MONOTONIC nanoseconds (the clock of `bpf_ktime_get_ns`) of the agent's last heartbeat.
    pub heartbeat_ns: u64,
    /// After this many nanoseconds without a heartbeat the agent counts as gone.
    pub heartbeat_timeout_ns: u64,
    /// cgroup v2 id of the agent's own cgroup, 0 when the agent runs outside
    /// the governed subtree (its sockets never meet the hooks then). A
    /// connect or send by a task of this cgroup is the agent's own and is
    /// never redirected: a pod cannot place a task there, unlike a socket
    /// mark, which any process with CAP_NET_RAW can set.
    pub agent_cgroup_id: u64,
    /// Port of the proxy's loopback listeners (host order). 0 disables redirection.
    pub proxy_port: u16,
    /// 1: when the agent is gone, refuse provider connections (EPERM). 0: let them through.
    pub fail_closed: u8,
    /// TLS uprobes on: the sockets of redirected connections join
    /// `TLS_SOCKS`, so a TLS call's socket is known (`tls` module).
    pub tls_uprobes: u8,
    /// A learned address stays valid for TTL clamped to [this, `dns_max_ttl_s`] seconds…
    pub dns_min_ttl_s: u32,
    /// …plus this grace (applications keep answers a little past their TTL).
    pub dns_grace_s: u32,
    /// Upper bound of a learned address's TTL (0: the same as the lower bound).
    pub dns_max_ttl_s: u32,
}

/// Slots of the per-CPU `COUNTERS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Provider connection rewritten to the proxy.
    Redirected = 0,
    /// Provider connection let through: no live proxy listener in the socket's netns (fail-open).
    PassedNoListener = 1,
    /// Provider connection let through: heartbeat stale (fail-open).
    PassedStale = 2,
    /// Provider connection refused because the agent is gone (fail-closed).
    RefusedFailClosed = 3,
    /// Provider connection from an opted-out cgroup, untouched.
    OptedOut = 4,
    /// Connection record could not be stored (map full); connection passed through.
    RecordFailed = 5,
    /// sock_ops moved a record to `ORIG_DST`.
    Recorded = 6,
    /// A provider address (per port) learned or refreshed from a workload's DNS answer.
    DnsLearned = 7,
    /// UDP to a provider address (QUIC, HTTP/3) refused, so the client falls back to TCP.
    RefusedUdp = 8,
    /// A DNS answer for a provider name not learned: it came from no resolver
    /// of the receiving namespace (a forged answer), or from an ungoverned cgroup.
    DnsIgnored = 9,
    TlsChunks = 10,
    TlsSkipped = 11,
    TlsUnmapped = 12,
    TlsLost = 13,
    RefusedQuota = 14,
}

impl Counter {
    pub const COUNT: u32 = 15;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Redirected,
        Counter::PassedNoListener,
        Counter::PassedStale,
        Counter::RefusedFailClosed,
        Counter::OptedOut,
        Counter::RecordFailed,
        Counter::Recorded,
        Counter::DnsLearned,
        Counter::RefusedUdp,
        Counter::DnsIgnored,
        Counter::TlsChunks,
        Counter::TlsSkipped,
        Counter::TlsUnmapped,
        Counter::TlsLost,
        Counter::RefusedQuota,
    ];

    /// Stable label for metrics.
    pub const fn label(self) -> &'static str {
        match self {
            Counter::Redirected => "redirected",
            Counter::PassedNoListener => "passed_no_listener",
            Counter::PassedStale => "passed_stale_heartbeat",
            Counter::RefusedFailClosed => "refused_fail_closed",
            Counter::OptedOut => "opted_out",
            Counter::RecordFailed => "record_failed",
            Counter::Recorded => "recorded",
            Counter::DnsLearned => "dns_learned",
            Counter::RefusedUdp => "refused_udp",
            Counter::DnsIgnored => "dns_ignored",
            // Plaintext records delivered from captured connections.
            Counter::TlsChunks => "tls_chunks",
            // TLS calls on connections not captured: nothing was read.
            Counter::TlsSkipped => "tls_skipped",
            // TLS calls whose socket is not known (yet): nothing was read.
            Counter::TlsUnmapped => "tls_unmapped",
            // Plaintext of captured connections that could not be delivered.
            Counter::TlsLost => "tls_lost",
            // Provider connects refused: the cgroup's budget or limit is spent (TLS uprobes).
            Counter::RefusedQuota => "refused_quota",
        }
    }
}

/// IPv4 `a.b.c.d` as IPv4-mapped IPv6 bytes.
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// True for `::ffff:a.b.c.d`.
pub const fn is_v4_mapped(ip: &[u8; 16]) -> bool {
    ip[0] == 0
        && ip[1] == 0
        && ip[2] == 0
        && ip[3] == 0
        && ip[4] == 0
        && ip[5] == 0
        && ip[6] == 0
        && ip[7] == 0
        && ip[8] == 0
        && ip[9] == 0
        && ip[10] == 0xff
        && ip[11] == 0xff
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all types are #[repr(C)], Copy, contain only integers and byte
    // arrays, and carry explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for super::ProviderKey {}
    unsafe impl aya::Pod for super::ProviderValue {}
    unsafe impl aya::Pod for super::ConnInfo {}
    unsafe impl aya::Pod for super::OrigDstKey {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::DnsNameValue {}
    unsafe impl aya::Pod for super::LearnedValue {}
    unsafe impl aya::Pod for super::LearnedKey {}
    unsafe impl aya::Pod for super::ResolverKey {}
    unsafe impl aya::Pod for super::dns::DnsName {}
    unsafe impl aya::Pod for super::TlsCall {}
    unsafe impl aya::Pod for super::SslKey {}
    unsafe impl aya::Pod for super::CaptureState {}
    unsafe impl aya::Pod for super::TlsChunkHeader {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        // Sizes equal the sum of the declared fields: no hidden padding that the
        // kernel would hash as garbage.
        assert_eq!(size_of::<ProviderKey>(), 16 + 2 + 2);
        assert_eq!(size_of::<ProviderValue>(), 8);
        assert_eq!(
            size_of::<ConnInfo>(),
            16 + 2 + 2 + 4 + 8 + 8 + 8 + 4 + 4 + 16
        );
        assert_eq!(size_of::<OrigDstKey>(), 8 + 16 + 2 + 6);
        assert_eq!(size_of::<Settings>(), 8 + 8 + 8 + 2 + 1 + 1 + 4 + 4 + 4);
        assert_eq!(size_of::<DnsNameValue>(), 4 + 2 * MAX_LEARNED_PORTS + 4);
        assert_eq!(size_of::<LearnedValue>(), 4 + 4 + 8);
        assert_eq!(size_of::<LearnedKey>(), 8 + 16 + 2 + 6);
        assert_eq!(size_of::<ResolverKey>(), 8 + 16);
        assert_eq!(size_of::<TlsCall>(), 8 * 3 + 1 + 7);
        assert_eq!(size_of::<SslKey>(), 8 + 4 + 4);
        assert_eq!(size_of::<CaptureState>(), 8 * 3);
        assert_eq!(size_of::<TlsChunkHeader>(), 8 + 8 + 4 + 4 + 1 + 7);
        assert_eq!(
            size_of::<TlsScratch>(),
            size_of::<TlsChunkHeader>() + tls::CHUNK
        );
        assert_eq!(size_of::<dns::DnsName>(), dns::NAME_MAX);
    }

    #[test]
    fn v4_mapping_round_trips() {
        let m = v4_mapped([10, 1, 2, 3]);
        assert!(is_v4_mapped(&m));
        assert_eq!(&m[12..], &[10, 1, 2, 3]);
        assert!(!is_v4_mapped(&[0; 16]));
        assert_eq!(Counter::ALL.len() as u32, Counter::COUNT);
    }
}
