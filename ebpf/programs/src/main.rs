//! Tollgate's kernel programs.
//!
//! * `connect4` / `connect6` (cgroup/connect4, cgroup/connect6): a TCP connect
//!   to a known provider (address, port) is rewritten to the proxy's loopback
//!   listener in the caller's own network namespace, and a record of who
//!   connected where is stored by socket cookie. A UDP connect to one is
//!   refused (QUIC falls back to TCP).
//! * `sendmsg4` / `sendmsg6`: an unconnected UDP datagram to a provider is refused.
//! * A workload cgroup in `BLOCKED` (its budget spent by calls read with TLS
//!   uprobes) has its provider connects refused (EPERM).
//!
//! The agent's own tasks are recognised by their cgroup (`Settings::agent_cgroup_id`),
//! which no pod can join; nothing a pod can set on a socket skips these hooks.
//! * `sock_ops` (TCP_CONNECT_CB): once the kernel has chosen the client's source
//!   port, the record is made findable by what the proxy sees on accept(): the
//!   peer address, in the listener's namespace.
//! * `getpeername4` / `getpeername6`: a redirected socket reports the original
//!   provider address, so applications that log or check their peer see what
//!   they asked for.
//!
//! * `dns_ingress` (cgroup_skb/ingress, module `dns`): provider addresses
//!   learned from the DNS answers workloads receive.
//! * `tls_*` (uprobes on a workload's TLS library) and `tcp_sendmsg` /
//!   `tcp_recvmsg` (fentry), module `tls`: the plaintext of provider
//!   connections the agent relays without terminating.
//!
//! Rules every program here follows: return quickly, never wait on userspace,
//! and treat missing data as "do nothing". The one exception to "do nothing"
//! is fail-closed, which the operator asked for explicitly.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_TCP_CONNECT_CB,
        bpf_sock_tuple,
    },
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
            bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_sk_lookup_tcp, bpf_sk_release,
        },
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
};
use tollgate_common::{
    ConnInfo, Counter, DnsNameValue, LearnedKey, LearnedValue, MAX_OPT_OUT_DEPTH, OrigDstKey,
    ProviderKey, ProviderValue, ResolverKey, Settings, capacity, dns::DnsName, is_v4_mapped,
    v4_mapped,
};

/// A socket's local address and port, as its key is filed, from a context
/// that names these fields alike (`bpf_sock_ops`, `sk_msg_md`; both report
/// `local_port` in host byte order, unlike `remote_port`). Every field is
/// read once, up front, with volatile loads: the verifier only accepts ctx
/// accesses at constant offsets, and LLVM would otherwise merge branches
/// into one load through a computed pointer ("dereference of modified ctx
/// ptr").
macro_rules! local_address {
    ($ctx:expr) => {{
        let p = $ctx;
        // SAFETY: `p` is the program's own context pointer; the loads are
        // of fields the verifier lets this program type read.
        let (family, local_ip4, local_port, remote_ip6, local_ip6) = unsafe {
            use core::ptr::{addr_of, read_volatile};
            (
                read_volatile(addr_of!((*p).family)),
                read_volatile(addr_of!((*p).local_ip4)),
                read_volatile(addr_of!((*p).local_port)),
                [
                    read_volatile(addr_of!((*p).remote_ip6[0])),
                    read_volatile(addr_of!((*p).remote_ip6[1])),
                    read_volatile(addr_of!((*p).remote_ip6[2])),
                    read_volatile(addr_of!((*p).remote_ip6[3])),
                ],
                [
                    read_volatile(addr_of!((*p).local_ip6[0])),
                    read_volatile(addr_of!((*p).local_ip6[1])),
                    read_volatile(addr_of!((*p).local_ip6[2])),
                    read_volatile(addr_of!((*p).local_ip6[3])),
                ],
            )
        };
        (
            crate::local_ip(family, local_ip4, remote_ip6, local_ip6),
            local_port as u16,
        )
    }};
}

mod dns;
mod tls;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

/// cgroup/connect* return codes: 1 lets the connect proceed, 0 fails it with EPERM.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

const LOOPBACK4: [u8; 4] = [127, 0, 0, 1];
const LOOPBACK6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

#[map(name = "PROVIDERS")]
static PROVIDERS: HashMap<ProviderKey, ProviderValue> =
    HashMap::with_max_entries(capacity::PROVIDERS, 0);

#[map(name = "SOCKETS")]
static SOCKETS: LruHashMap<u64, ConnInfo> = LruHashMap::with_max_entries(capacity::SOCKETS, 0);

#[map(name = "ORIG_DST")]
static ORIG_DST: LruHashMap<OrigDstKey, ConnInfo> =
    LruHashMap::with_max_entries(capacity::ORIG_DST, 0);

#[map(name = "OPT_OUT")]
static OPT_OUT: HashMap<u64, u8> = HashMap::with_max_entries(capacity::OPT_OUT, 0);

#[map(name = "SETTINGS")]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map(name = "DNS_NAMES")]
static DNS_NAMES: HashMap<DnsName, DnsNameValue> =
    HashMap::with_max_entries(capacity::DNS_NAMES, 0);

#[map(name = "LEARNED")]
static LEARNED: LruHashMap<LearnedKey, LearnedValue> =
    LruHashMap::with_max_entries(capacity::LEARNED, 0);

#[map(name = "CGROUP_NETNS")]
static CGROUP_NETNS: HashMap<u64, u64> = HashMap::with_max_entries(capacity::CGROUP_NETNS, 0);

#[map(name = "RESOLVERS")]
static RESOLVERS: HashMap<ResolverKey, u8> = HashMap::with_max_entries(capacity::RESOLVERS, 0);

/// Workload cgroups whose provider connections are refused: a budget their
/// calls, read at their TLS library, spent (`tls_uprobes`). Written by the
/// agent, which takes a cgroup out when its budget resets.
#[map(name = "BLOCKED")]
static BLOCKED: HashMap<u64, u8> = HashMap::with_max_entries(capacity::BLOCKED, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[inline(always)]
pub(crate) fn count(c: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(c as u32) {
        // Per-CPU slot: no other CPU writes it, a plain add is enough.
        unsafe { *slot += 1 };
    }
}

/// The destination a connect hook sees, normalised to the shared key form.
struct Dest {
    ip: [u8; 16],
    port: u16,
}

#[inline(always)]
fn ip6_from_words(words: [u32; 4]) -> [u8; 16] {
    // The words hold network byte order as laid out in memory; native-endian
    // bytes reproduce that layout exactly.
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

#[inline(always)]
fn words_from_ip6(ip: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([ip[0], ip[1], ip[2], ip[3]]),
        u32::from_ne_bytes([ip[4], ip[5], ip[6], ip[7]]),
        u32::from_ne_bytes([ip[8], ip[9], ip[10], ip[11]]),
        u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
    ]
}

#[inline(always)]
fn dest4(ctx: &SockAddrContext) -> Dest {
    let sa = unsafe { &*ctx.sock_addr };
    Dest {
        ip: v4_mapped(sa.user_ip4.to_ne_bytes()),
        port: u16::from_be(sa.user_port as u16),
    }
}

#[inline(always)]
fn dest6(ctx: &SockAddrContext) -> Dest {
    let sa = unsafe { &*ctx.sock_addr };
    Dest {
        ip: ip6_from_words([
            sa.user_ip6[0],
            sa.user_ip6[1],
            sa.user_ip6[2],
            sa.user_ip6[3],
        ]),
        port: u16::from_be(sa.user_port as u16),
    }
}

#[cgroup_sock_addr(connect4)]
pub fn tollgate_connect4(ctx: SockAddrContext) -> i32 {
    match unsafe { (*ctx.sock_addr).protocol } {
        IPPROTO_TCP => on_connect(&ctx, dest4(&ctx), AF_INET),
        IPPROTO_UDP => on_udp(&ctx, dest4(&ctx)),
        _ => ALLOW,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn tollgate_connect6(ctx: SockAddrContext) -> i32 {
    match unsafe { (*ctx.sock_addr).protocol } {
        IPPROTO_TCP => on_connect(&ctx, dest6(&ctx), AF_INET6),
        IPPROTO_UDP => on_udp(&ctx, dest6(&ctx)),
        _ => ALLOW,
    }
}

/// Unconnected UDP (`sendto`): the same refusal as a UDP connect.
#[cgroup_sock_addr(sendmsg4)]
pub fn tollgate_sendmsg4(ctx: SockAddrContext) -> i32 {
    on_udp(&ctx, dest4(&ctx))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn tollgate_sendmsg6(ctx: SockAddrContext) -> i32 {
    on_udp(&ctx, dest6(&ctx))
}

/// The provider a destination belongs to: configured, or learned from a
/// DNS answer this socket's namespace received.
#[inline(always)]
fn provider_of(ctx: &SockAddrContext, dest: &Dest) -> Option<u32> {
    let key = ProviderKey {
        ip_be: dest.ip,
        port: dest.port,
        _pad: [0; 2],
    };
    match unsafe { PROVIDERS.get(&key) } {
        Some(p) => Some(p.provider_id),
        None => learned(&LearnedKey {
            netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
            ip_be: dest.ip,
            port: dest.port,
            _pad: [0; 6],
        }),
    }
}

/// No heartbeat from the agent within its timeout: it counts as gone.
#[inline(always)]
fn agent_gone(settings: &Settings) -> bool {
    let now = unsafe { bpf_ktime_get_ns() };
    now.saturating_sub(settings.heartbeat_ns) > settings.heartbeat_timeout_ns
}

/// The agent's own tasks: recognised by their cgroup, which no pod can join.
#[inline(always)]
fn is_agent(settings: &Settings) -> bool {
    settings.agent_cgroup_id != 0
        && unsafe { bpf_get_current_cgroup_id() } == settings.agent_cgroup_id
}

/// UDP to a provider address (QUIC, HTTP/3) is refused, so the client falls
/// back to TCP, which is redirected: no request control can be skipped by
/// speaking HTTP/3. When the agent is gone the failure mode applies, as for TCP.
#[inline(always)]
fn on_udp(ctx: &SockAddrContext, dest: Dest) -> i32 {
    if provider_of(ctx, &dest).is_none() {
        return ALLOW;
    }
    let Some(settings) = SETTINGS.get(0) else {
        return ALLOW;
    };
    let settings = *settings;
    if settings.proxy_port == 0 || is_agent(&settings) {
        return ALLOW;
    }
    if opted_out() {
        count(Counter::OptedOut);
        return ALLOW;
    }
    if settings.fail_closed == 0 && agent_gone(&settings) {
        count(Counter::PassedStale);
        return ALLOW;
    }
    count(Counter::RefusedUdp);
    REFUSE
}

/// A provider address learned from a workload's DNS answer, if still valid.
#[inline(always)]
fn learned(key: &LearnedKey) -> Option<u32> {
    let v = unsafe { LEARNED.get(key) }?;
    let now = unsafe { bpf_ktime_get_ns() };
    (now < v.expires_ns).then_some(v.provider_id)
}

#[inline(always)]
fn on_connect(ctx: &SockAddrContext, dest: Dest, family: u16) -> i32 {
    // Not a provider: the common case, two hash lookups.
    let Some(provider_id) = provider_of(ctx, &dest) else {
        return ALLOW;
    };

    let Some(settings) = SETTINGS.get(0) else {
        return ALLOW;
    };
    let settings = *settings;
    if settings.proxy_port == 0 {
        return ALLOW; // agent has not finished configuring us.
    }

    // The agent's own connections (to providers, from inside the pod's
    // namespace): never loop.
    if is_agent(&settings) {
        return ALLOW;
    }

    if opted_out() {
        count(Counter::OptedOut);
        return ALLOW;
    }

    // A workload whose budget is spent (its calls were read at its TLS
    // library, so the proxy cannot refuse them one by one): refused here.
    if unsafe { BLOCKED.get(&bpf_get_current_cgroup_id()) }.is_some() {
        count(Counter::RefusedQuota);
        return REFUSE;
    }

    let fail = if settings.fail_closed != 0 {
        REFUSE
    } else {
        ALLOW
    };
    if agent_gone(&settings) {
        count(if fail == REFUSE {
            Counter::RefusedFailClosed
        } else {
            Counter::PassedStale
        });
        return fail;
    }

    // Is the proxy listening in this socket's network namespace? If not (pod
    // not yet set up, agent gone), redirecting would turn a working connect
    // into ECONNREFUSED; apply the failure mode instead.
    let mapped = is_v4_mapped(&dest.ip);
    if !proxy_listening(ctx, family == AF_INET || mapped, settings.proxy_port) {
        count(if fail == REFUSE {
            Counter::RefusedFailClosed
        } else {
            Counter::PassedNoListener
        });
        return fail;
    }

    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let mut info = ConnInfo {
        orig_ip_be: dest.ip,
        orig_port: dest.port,
        family,
        provider_id,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        socket_cookie: cookie,
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        _pad: 0,
        comm: [0; 16],
    };
    if let Ok(comm) = bpf_get_current_comm() {
        info.comm = comm;
    }
    if SOCKETS.insert(&cookie, &info, 0).is_err() {
        // Without a record the proxy could not tell where to go: leave the
        // connection alone rather than break it.
        count(Counter::RecordFailed);
        return ALLOW;
    }

    let sa = unsafe { &mut *ctx.sock_addr };
    let port_be = u32::from(settings.proxy_port.to_be());
    if family == AF_INET {
        sa.user_ip4 = u32::from_ne_bytes(LOOPBACK4);
    } else {
        let target = if mapped {
            v4_mapped(LOOPBACK4)
        } else {
            LOOPBACK6
        };
        let w = words_from_ip6(&target);
        sa.user_ip6[0] = w[0];
        sa.user_ip6[1] = w[1];
        sa.user_ip6[2] = w[2];
        sa.user_ip6[3] = w[3];
    }
    sa.user_port = port_be;
    count(Counter::Redirected);
    ALLOW
}

/// True when the calling task's cgroup or one of its ancestors is opted out.
#[inline(always)]
fn opted_out() -> bool {
    let own = unsafe { bpf_get_current_cgroup_id() };
    if unsafe { OPT_OUT.get(&own) }.is_some() {
        return true;
    }
    let mut level = 0;
    while level < MAX_OPT_OUT_DEPTH {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            break; // above the task's own depth: no more ancestors.
        }
        if unsafe { OPT_OUT.get(&id) }.is_some() {
            return true;
        }
        level += 1;
    }
    false
}

/// Look up a TCP listener on loopback:`port` in the socket's own namespace.
#[inline(always)]
fn proxy_listening(ctx: &SockAddrContext, v4: bool, port: u16) -> bool {
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size;
    if v4 {
        let t = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
        t.saddr = u32::from_ne_bytes(LOOPBACK4);
        t.daddr = u32::from_ne_bytes(LOOPBACK4);
        t.sport = 0;
        t.dport = port.to_be();
        size = core::mem::size_of_val(t) as u32;
    } else {
        let t = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
        t.saddr = words_from_ip6(&LOOPBACK6);
        t.daddr = words_from_ip6(&LOOPBACK6);
        t.sport = 0;
        t.dport = port.to_be();
        size = core::mem::size_of_val(t) as u32;
    }
    let sk = unsafe {
        bpf_sk_lookup_tcp(
            ctx.as_ptr(),
            &mut tuple,
            size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return false;
    }
    unsafe { bpf_sk_release(sk.cast()) };
    true
}

/// The local address a socket's key is filed under: a v4-mapped connect
/// runs the IPv4 path (the source is in `local_ip4`, and the proxy's IPv4
/// listener sees an IPv4 peer).
#[inline(always)]
pub(crate) fn local_ip(
    family: u32,
    local_ip4: u32,
    remote_ip6: [u32; 4],
    local_ip6: [u32; 4],
) -> [u8; 16] {
    if family == u32::from(AF_INET6) && !is_v4_mapped(&ip6_from_words(remote_ip6)) {
        ip6_from_words(local_ip6)
    } else {
        v4_mapped(local_ip4.to_ne_bytes())
    }
}

#[sock_ops]
pub fn tollgate_sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 1;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(info) = (unsafe { SOCKETS.get(&cookie) }) else {
        return 1; // not a socket we redirected.
    };
    let info = *info;
    let tls_uprobes = SETTINGS.get(0).is_some_and(|s| s.tls_uprobes != 0);
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // TLS uprobes: the socket joins the sockhash its sends are seen in.
        if tls_uprobes {
            let mut key = cookie;
            let _ = tls::TLS_SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, 0);
        }
        return 1;
    }
    let (local_ip, local_port) = local_address!(ctx.ops);
    let key = OrigDstKey {
        netns_cookie: info.netns_cookie,
        ip_be: local_ip,
        port: local_port,
        _pad: [0; 6],
    };
    if ORIG_DST.insert(&key, &info, 0).is_ok() {
        count(Counter::Recorded);
    } else {
        count(Counter::RecordFailed);
    }
    if tls_uprobes {
        let _ = tls::SOCK_BY_ADDR.insert(&key, &cookie, 0);
    }
    1
}

/// Report the original provider address to getpeername() on a redirected socket.
#[inline(always)]
fn on_getpeername(ctx: &SockAddrContext, v4: bool) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(info) = (unsafe { SOCKETS.get(&cookie) }) else {
        return ALLOW;
    };
    let info = *info;
    let sa = unsafe { &mut *ctx.sock_addr };
    if v4 {
        if !is_v4_mapped(&info.orig_ip_be) {
            return ALLOW;
        }
        let ip = &info.orig_ip_be;
        sa.user_ip4 = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
    } else {
        let w = words_from_ip6(&info.orig_ip_be);
        sa.user_ip6[0] = w[0];
        sa.user_ip6[1] = w[1];
        sa.user_ip6[2] = w[2];
        sa.user_ip6[3] = w[3];
    }
    sa.user_port = u32::from(info.orig_port.to_be());
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn tollgate_getpeername4(ctx: SockAddrContext) -> i32 {
    on_getpeername(&ctx, true)
}

#[cgroup_sock_addr(getpeername6)]
pub fn tollgate_getpeername6(ctx: SockAddrContext) -> i32 {
    on_getpeername(&ctx, false)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // eBPF programs cannot unwind; the verifier rejects any path that reaches here.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
