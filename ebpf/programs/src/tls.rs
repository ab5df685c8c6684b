//! The plaintext of provider connections the agent relays without
//! terminating (pods that do not trust the node CA), read at the workload's
//! TLS library.
//!
//! * Uprobes at the entry of `SSL_write`, `SSL_write_ex`, `SSL_read` and
//!   `SSL_read_ex` note the call (`TLS_CALLS`, by thread): its `SSL *`, its
//!   buffer, where `_ex` writes its byte count. The agent attaches them only
//!   to processes of governed pods whose provider connections it relays.
//! * `sk_msg` on the sockets of redirected connections (they join the
//!   sockhash `TLS_SOCKS` when established, see `sock_ops`): a thread inside
//!   `SSL_write` sending on one of them is writing that session's bytes, so
//!   the socket is the session's (`TLS_SSL`; reads use what writes learned:
//!   a client writes before it reads). A runtime that encrypts into memory
//!   and sends afterwards (Node.js: its TLS calls never touch the socket)
//!   is served by `LAST_SSL`: the first send of a redirected socket after a
//!   thread's call on a session with no socket yet is that session's (its
//!   ClientHello, sent after the call that made it). This needs no
//!   knowledge of OpenSSL's structures, which change between versions, nor
//!   fentry/kprobes, which locked-down kernels refuse.
//! * The uretprobe at the call's return: if the session's socket is one the
//!   agent relays and asked to capture (`CAPTURE`, by socket cookie), the
//!   bytes the call moved are copied into the ring buffer (`TLS_EVENTS`) in
//!   records of at most `tls::CHUNK` bytes. Any other session is left
//!   unread: nothing a pod sends to anyone else is ever copied.
//!
//! Bounded: one call gives at most `MAX_CHUNKS_PER_CALL` records, one
//! connection at most `MAX_BYTES_PER_CONNECTION` bytes; what is not
//! delivered (those bounds, a full ring buffer) is counted per direction and
//! announced in the next record's header, so the reader knows of the hole.
use aya_ebpf::{
    EbpfContext,
    bindings::sk_action::SK_PASS,
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_user, bpf_probe_read_user_buf,
        generated::bpf_get_netns_cookie,
    },
    macros::{map, sk_msg, uprobe, uretprobe},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash},
    programs::{ProbeContext, RetProbeContext, SkMsgContext},
};
use tollgate_common::{
    CaptureState, Counter, OrigDstKey, SslKey, TlsCall, TlsChunkHeader, TlsScratch, capacity,
    tls::{
        self, CHUNK, DIR_NONE, DIR_READ, DIR_WRITE, MAX_BYTES_PER_CONNECTION, MAX_CHUNKS_PER_CALL,
    },
};

use crate::count;

/// LRU: a thread that never returns from its call (it exited inside it)
/// leaves an entry that must not fill the map for everyone else.
#[map(name = "TLS_CALLS")]
static TLS_CALLS: LruHashMap<u64, TlsCall> = LruHashMap::with_max_entries(capacity::TLS_CALLS, 0);

#[map(name = "TLS_SSL")]
static TLS_SSL: LruHashMap<SslKey, u64> = LruHashMap::with_max_entries(capacity::TLS_SSL, 0);

#[map(name = "CAPTURE")]
static CAPTURE: HashMap<u64, CaptureState> = HashMap::with_max_entries(capacity::CAPTURE, 0);

#[map(name = "TLS_EVENTS")]
static TLS_EVENTS: RingBuf = RingBuf::with_byte_size(tls::RING_BYTES, 0);

/// Redirected sockets, by cookie (`sock_ops` adds them when established;
/// the kernel removes them when they close): where `sk_msg` runs.
#[map(name = "TLS_SOCKS")]
pub(crate) static TLS_SOCKS: SockHash<u64> = SockHash::with_max_entries(capacity::CAPTURE, 0);

/// Redirected sockets' cookies by namespace and local address (`sock_ops`
/// files them at connect): how `sk_msg` names the socket it runs for.
#[map(name = "SOCK_BY_ADDR")]
pub(crate) static SOCK_BY_ADDR: LruHashMap<OrigDstKey, u64> =
    LruHashMap::with_max_entries(capacity::CAPTURE, 0);

/// Per thread: its last TLS call on a session with no socket yet (for a
/// write, `len_ptr` holds the bytes it wrote, read once the socket is known).
#[map(name = "LAST_SSL")]
static LAST_SSL: LruHashMap<u64, TlsCall> = LruHashMap::with_max_entries(capacity::TLS_CALLS, 0);

#[map(name = "TLS_SCRATCH")]
static TLS_SCRATCH: PerCpuArray<TlsScratch> = PerCpuArray::with_max_entries(1, 0);

const HEADER: usize = core::mem::size_of::<TlsChunkHeader>();

/// Data waiting in the ring past which a record wakes the reader at once;
/// below it the reader finds the records on its next tick. A wake-up per
/// record costs the workload's thread a cross-CPU interrupt each time.
const WAKE_AT: u64 = 1 << 20;

#[inline(always)]
fn wakeup() -> u64 {
    const BPF_RB_AVAIL_DATA: u64 = 0;
    const BPF_RB_NO_WAKEUP: u64 = 1;
    const BPF_RB_FORCE_WAKEUP: u64 = 2;
    if TLS_EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKE_AT {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

#[uprobe]
pub fn tollgate_tls_write(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIR_WRITE, false)
}

#[uprobe]
pub fn tollgate_tls_write_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIR_WRITE, true)
}

#[uprobe]
pub fn tollgate_tls_read(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIR_READ, false)
}

#[uprobe]
pub fn tollgate_tls_read_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIR_READ, true)
}

#[uprobe]
pub fn tollgate_tls_handshake(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIR_NONE, false)
}

/// `SSL_write(ssl, buf, num)`, `SSL_write_ex(ssl, buf, num, *written)`, and
/// the same for reads: note the call until it returns.
#[inline(always)]
fn enter(ctx: &ProbeContext, dir: u8, ex: bool) -> u32 {
    let Some(ssl) = ctx.arg::<u64>(0) else {
        return 0;
    };
    let buf = if dir == DIR_NONE {
        0
    } else {
        ctx.arg::<u64>(1).unwrap_or(0)
    };
    let len_ptr = if ex {
        ctx.arg::<u64>(3).unwrap_or(0)
    } else {
        0
    };
    if ex && len_ptr == 0 {
        return 0; // the count would be nowhere to read
    }
    let call = TlsCall {
        ssl,
        buf,
        len_ptr,
        dir,
        _pad: [0; 7],
    };
    let _ = TLS_CALLS.insert(&bpf_get_current_pid_tgid(), &call, 0);
    0
}

#[sk_msg]
pub fn tollgate_tls_sk_msg(ctx: SkMsgContext) -> u32 {
    on_send(&ctx);
    SK_PASS
}

/// A redirected socket sends: if the thread is inside a TLS call, that
/// call's session writes to this socket. Every send on these sockets costs
/// one lookup; it never changes what is sent.
#[inline(always)]
fn on_send(ctx: &SkMsgContext) {
    let id = bpf_get_current_pid_tgid();
    // Inside a TLS call: its session. Else the session of this thread's
    // last call that had no socket yet, once.
    let (ssl, pending) = match unsafe { TLS_CALLS.get(&id) } {
        Some(call) => (call.ssl, None),
        None => match unsafe { LAST_SSL.get(&id) }.copied() {
            Some(last) => (last.ssl, Some(last)),
            None => return,
        },
    };
    // The socket as `sock_ops` filed it: its namespace and local address.
    let (local_ip, local_port) = local_address!(ctx.msg);
    let key = OrigDstKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        ip_be: local_ip,
        port: local_port,
        _pad: [0; 6],
    };
    let Some(cookie) = (unsafe { SOCK_BY_ADDR.get(&key) }).copied() else {
        return;
    };
    let key = SslKey {
        ssl,
        tgid: (id >> 32) as u32,
        _pad: 0,
    };
    let Some(last) = pending else {
        let _ = TLS_SSL.insert(&key, &cookie, 0);
        return;
    };
    let _ = LAST_SSL.remove(&id);
    if unsafe { TLS_SSL.get(&key) }.is_some() {
        return; // known already: this is another session's send
    }
    let _ = TLS_SSL.insert(&key, &cookie, 0);
    // The write that preceded this send, still in the writer's buffer
    // (the runtime sends its ciphertext before it lets go of it).
    if last.dir == DIR_WRITE && last.len_ptr > 0 {
        capture(&last, last.len_ptr, cookie, key.tgid);
    }
}

#[uretprobe]
pub fn tollgate_tls_return(ctx: RetProbeContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let Some(call) = (unsafe { TLS_CALLS.get(&id) }).copied() else {
        return 0;
    };
    let _ = TLS_CALLS.remove(&id);
    let tgid = (id >> 32) as u32;
    let key = SslKey {
        ssl: call.ssl,
        tgid,
        _pad: 0,
    };
    // 0: no socket yet (cookies start at 1). A plain integer, not an
    // Option: LLVM spills an Option's undefined payload, which the
    // verifier refuses to read.
    let cookie = unsafe { TLS_SSL.get(&key) }.map_or(0, |c| *c);
    // The calls return `int`: the upper half of the register is not theirs.
    let ret = ctx.ret::<i64>() as i32;
    let mut moved: u64 = 0;
    if call.dir != DIR_NONE {
        if call.len_ptr != 0 {
            // `_ex`: 1 and the count written through the pointer.
            if ret == 1 {
                if let Ok(n) = unsafe { bpf_probe_read_user(call.len_ptr as *const u64) } {
                    moved = n;
                }
            }
        } else if ret > 0 {
            moved = ret as u64;
        }
    }
    if cookie == 0 {
        // No socket yet: the thread's next send on a redirected socket
        // tells it (a runtime that sends after the call), and a write's
        // bytes are read then, if that socket is captured.
        let pending = TlsCall {
            ssl: call.ssl,
            buf: call.buf,
            len_ptr: if call.dir == DIR_WRITE { moved } else { 0 },
            dir: call.dir,
            _pad: [0; 7],
        };
        let _ = LAST_SSL.insert(&id, &pending, 0);
        if moved > 0 {
            count(Counter::TlsUnmapped);
        }
        return 0;
    }
    if moved == 0 {
        return 0;
    }
    capture(&call, moved, cookie, tgid);
    0
}

/// `moved` bytes of `call` on the socket `cookie`: copied if the socket is
/// on the capture list, else only counted.
#[inline(always)]
fn capture(call: &TlsCall, moved: u64, cookie: u64, tgid: u32) {
    let Some(state) = CAPTURE.get_ptr_mut(&cookie) else {
        count(Counter::TlsSkipped);
        return;
    };
    let state = unsafe { &mut *state };
    emit(call, moved, cookie, tgid, state);
}

/// Copy the `moved` bytes at `call.buf` into the ring buffer: whole
/// records in a loop, then the tail. Every record in the loop has the same
/// length, so the verifier proves one iteration like the next instead of
/// following each possible length through every later one.
#[inline(always)]
fn emit(call: &TlsCall, moved: u64, cookie: u64, tgid: u32, state: &mut CaptureState) {
    let dir = (call.dir & 1) as usize;
    let Some(scratch) = TLS_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let scratch = unsafe { &mut *scratch };
    let whole = moved / CHUNK as u64;
    let mut i: u32 = 0;
    while i < MAX_CHUNKS_PER_CALL {
        if u64::from(i) >= whole {
            break;
        }
        let off = u64::from(i) * CHUNK as u64;
        i += 1;
        if !record(call, off, CHUNK, cookie, tgid, dir, scratch, state) {
            break;
        }
    }
    let tail = (moved % CHUNK as u64) as usize;
    let mut done = u64::from(i) * CHUNK as u64;
    if u64::from(i) == whole
        && tail > 0
        && record(call, done, tail, cookie, tgid, dir, scratch, state)
    {
        done += tail as u64;
    }
    if done < moved {
        state.lost[dir] += moved - done;
        count(Counter::TlsLost);
    }
}

/// One record of `len` bytes at `off`; false when the connection's bound
/// is reached (nothing more is read). Bytes the ring could not take are
/// counted as lost.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn record(
    call: &TlsCall,
    off: u64,
    len: usize,
    cookie: u64,
    tgid: u32,
    dir: usize,
    scratch: &mut TlsScratch,
    state: &mut CaptureState,
) -> bool {
    if state.captured >= MAX_BYTES_PER_CONNECTION || len > CHUNK || len == 0 {
        return false;
    }
    scratch.hdr = TlsChunkHeader {
        cookie,
        lost_before: state.lost[dir],
        tgid,
        len: len as u32,
        dir: call.dir,
        _pad: [0; 7],
    };
    let src = (call.buf + off) as *const u8;
    let read = unsafe { bpf_probe_read_user_buf(src, &mut scratch.data[..len]) };
    let sent = read.is_ok() && {
        let bytes = unsafe {
            core::slice::from_raw_parts((scratch as *const TlsScratch).cast::<u8>(), HEADER + len)
        };
        TLS_EVENTS.output::<[u8]>(bytes, wakeup()).is_ok()
    };
    if sent {
        state.captured += len as u64;
        count(Counter::TlsChunks);
    } else {
        state.lost[dir] += len as u64;
        count(Counter::TlsLost);
    }
    true
}
