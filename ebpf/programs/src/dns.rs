//! `cgroup_skb/ingress`: learn provider addresses from the DNS answers that
//! workloads receive, before the application reads them.
//!
//! A UDP packet from port 53 whose single question is a configured provider
//! name (`DNS_NAMES`) has its A/AAAA answers — including those at the end
//! of a CNAME chain — stored in `LEARNED` for each of the provider's ports,
//! valid for the TTL clamped to [min TTL, max TTL] + grace. The connect
//! hooks consult `LEARNED` after `PROVIDERS`, so a pod's very first
//! connection to an address only its own resolver returned is redirected.
//!
//! Scoped to who asked: an answer is learned only when the receiving
//! socket's cgroup is a governed one (`CGROUP_NETNS`, written by the
//! agent's scan) and its source address is a resolver of that cgroup's
//! network namespace (`RESOLVERS`: the pod's nameservers, or the cluster
//! DNS for every namespace); it is stored under that namespace, so it
//! redirects only that namespace's connections. A pod that answers itself
//! teaches nothing. The packet is always let through: this program only watches.
use aya_ebpf::{
    helpers::generated::{bpf_ktime_get_ns, bpf_skb_cgroup_id},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use tollgate_common::{
    Counter, LearnedKey, LearnedValue, MAX_LEARNED_PORTS, ResolverKey,
    dns::{DnsName, Packet, answers, learnable, learned_ttl, question},
    v4_mapped,
};

use crate::{CGROUP_NETNS, DNS_NAMES, LEARNED, RESOLVERS, SETTINGS, count};

/// cgroup_skb return code: 1 delivers the packet.
const PASS: i32 = 1;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_UDP: u8 = 17;
const DNS_PORT: u16 = 53;

struct Skb<'a>(&'a SkBuffContext);

impl Packet for Skb<'_> {
    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.0.load::<[u8; N]>(offset).ok()
    }
}

#[cgroup_skb(ingress)]
pub fn tollgate_dns_ingress(ctx: SkBuffContext) -> i32 {
    let _ = learn(&ctx);
    PASS
}

/// The namespace of the receiving cgroup (0: not a governed one), and
/// whether `source` is a resolver of that namespace or of every namespace.
#[inline(always)]
fn scope(ctx: &SkBuffContext, source: [u8; 16]) -> (u64, bool) {
    let cgroup = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    let Some(netns_cookie) = (unsafe { CGROUP_NETNS.get(&cgroup) }).copied() else {
        return (0, false);
    };
    let mut key = ResolverKey {
        netns_cookie,
        ip_be: source,
    };
    if unsafe { RESOLVERS.get(&key) }.is_some() {
        return (netns_cookie, true);
    }
    key.netns_cookie = 0;
    (netns_cookie, unsafe { RESOLVERS.get(&key) }.is_some())
}

#[inline(always)]
fn learn(ctx: &SkBuffContext) -> Option<()> {
    let pkt = Skb(ctx);
    // cgroup skb data starts at the network header.
    let (udp, source) = match u16::from_be(ctx.skb.protocol() as u16) {
        ETH_P_IP => {
            let h: [u8; 10] = pkt.load(0)?;
            let frag = u16::from_be_bytes([h[6], h[7]]) & 0x3fff;
            if h[9] != IPPROTO_UDP || frag != 0 {
                return None;
            }
            (((h[0] & 0x0f) as usize) * 4, v4_mapped(pkt.load::<4>(12)?))
        }
        ETH_P_IPV6 => {
            // Extension headers before UDP are not followed (DNS answers
            // do not carry them in practice).
            let [next] = pkt.load::<1>(6)?;
            if next != IPPROTO_UDP {
                return None;
            }
            (40, pkt.load::<16>(8)?)
        }
        _ => return None,
    };
    let ports: [u8; 2] = pkt.load(udp)?;
    if u16::from_be_bytes(ports) != DNS_PORT {
        return None;
    }
    // Who received it, and did it come from one of their resolvers? Decided
    // before the name is read, so the keys' stack is free again by then.
    let (netns_cookie, from_resolver) = scope(ctx, source);
    let mut name = DnsName::default();
    let (at, count_answers) = question(&pkt, udp + 8, &mut name)?;
    let target = *unsafe { DNS_NAMES.get(&name) }?;
    if !from_resolver {
        count(Counter::DnsIgnored);
        return None;
    }
    let settings = *SETTINGS.get(0)?;
    let now = unsafe { bpf_ktime_get_ns() };
    answers(&pkt, at, count_answers, |a| {
        if !learnable(&a.ip) {
            return;
        }
        let ttl = learned_ttl(a.ttl, settings.dns_min_ttl_s, settings.dns_max_ttl_s);
        let value = LearnedValue {
            provider_id: target.provider_id,
            _pad: 0,
            expires_ns: now + (ttl as u64 + settings.dns_grace_s as u64) * 1_000_000_000,
        };
        let mut i = 0;
        while i < MAX_LEARNED_PORTS {
            if i as u32 >= target.port_count {
                break;
            }
            let key = LearnedKey {
                netns_cookie,
                ip_be: a.ip,
                port: target.ports[i],
                _pad: [0; 6],
            };
            if LEARNED.insert(&key, &value, 0).is_ok() {
                count(Counter::DnsLearned);
            }
            i += 1;
        }
    });
    Some(())
}
