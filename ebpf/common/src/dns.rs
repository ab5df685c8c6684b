//! DNS responses as the kernel program reads them, shared with userspace so
//! the parser the kernel runs is the parser the tests and fuzzers run.
//!
//! Hand-written on purpose: it must compile for `bpfel-unknown-none`
//! (no_std, no allocation) and pass the verifier, so every loop is bounded
//! by a constant and every read goes through [`Packet::load`], which fails
//! instead of reading past the packet. It reads only what learning needs:
//! a standard response with one question, whose A/AAAA answers (after any
//! CNAME chain in the same answer section) are addresses of the name asked.

use crate::v4_mapped;

/// Longest question name kept, in wire form (length-prefixed labels and the
/// final zero). Provider names are far shorter; longer names are ignored.
pub const NAME_MAX: usize = 128;
/// Answers looked at per response (a CNAME chain plus a few addresses).
pub const MAX_ANSWERS: usize = 16;
/// Labels walked per answer owner name before giving up.
const MAX_LABELS: usize = 32;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;

/// Bytes of a packet, read at an offset; `None` past its end.
pub trait Packet {
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;
}

impl Packet for [u8] {
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.get(offset..offset.checked_add(N)?)?.try_into().ok()
    }
}

/// A question name in wire form, lowercased and zero-padded: the key of
/// the `DNS_NAMES` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DnsName {
    pub wire: [u8; NAME_MAX],
}

impl Default for DnsName {
    fn default() -> Self {
        Self {
            wire: [0; NAME_MAX],
        }
    }
}

impl DnsName {
    /// `api.openai.com` → `\x03api\x06openai\x03com\x00`, lowercased.
    /// `None` for names that do not fit or have an empty/overlong label.
    pub fn encode(host: &str) -> Option<Self> {
        let host = host.strip_suffix('.').unwrap_or(host);
        let mut out = Self::default();
        let mut at = 0;
        for label in host.split('.') {
            let b = label.as_bytes();
            if b.is_empty() || b.len() > 63 || at + 1 + b.len() + 1 > NAME_MAX {
                return None;
            }
            out.wire[at] = b.len() as u8;
            for (i, c) in b.iter().enumerate() {
                out.wire[at + 1 + i] = c.to_ascii_lowercase();
            }
            at += 1 + b.len();
        }
        Some(out)
    }
}

/// Whether an answered address may be learned as a provider's: never
/// loopback, link-local (cloud metadata lives there), unspecified,
/// multicast or broadcast. A forged answer could otherwise make the agent,
/// which dials from the node, reach the node's own services for a pod.
#[inline(always)]
pub fn learnable(ip: &[u8; 16]) -> bool {
    if crate::is_v4_mapped(ip) {
        let a = [ip[12], ip[13], ip[14], ip[15]];
        return !(a[0] == 0 || a[0] == 127 || (a[0] == 169 && a[1] == 254) || a[0] >= 224);
    }
    let unspecified_or_loopback = ip[..15].iter().all(|b| *b == 0) && ip[15] <= 1;
    let link_local = ip[0] == 0xfe && ip[1] & 0xc0 == 0x80;
    let multicast = ip[0] == 0xff;
    !(unspecified_or_loopback || link_local || multicast)
}

/// How long a learned answer stays valid, before the grace: its TTL clamped
/// to `[min, max]` (`max` 0: no upper bound beyond `min`). The upper bound
/// keeps an answer with a week-long TTL from outliving the provider's move.
#[inline(always)]
pub fn learned_ttl(ttl: u32, min: u32, max: u32) -> u32 {
    let max = if max < min { min } else { max };
    if ttl < min {
        min
    } else if ttl > max {
        max
    } else {
        ttl
    }
}

/// One address answer: IPv4-mapped for A records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    pub ip: [u8; 16],
    pub ttl: u32,
}

/// The question of the response whose DNS header is at `dns`, read into
/// `name` (which must start zeroed). Returns the offset of the answer
/// section and the answer count; `None` for anything but a successful
/// standard response with exactly one question.
#[inline(always)]
pub fn question<P: Packet + ?Sized>(p: &P, dns: usize, name: &mut DnsName) -> Option<(usize, u16)> {
    let h: [u8; 12] = p.load(dns)?;
    let is_response = h[2] & 0x80 != 0;
    let opcode = (h[2] >> 3) & 0x0f;
    let rcode = h[3] & 0x0f;
    let qdcount = u16::from_be_bytes([h[4], h[5]]);
    let ancount = u16::from_be_bytes([h[6], h[7]]);
    if !is_response || opcode != 0 || rcode != 0 || qdcount != 1 || ancount == 0 {
        return None;
    }
    let start = dns + 12;
    let mut label_at = 0usize;
    let mut end = 0usize;
    let mut i = 0usize;
    while i < NAME_MAX {
        let [b] = p.load::<1>(start + i)?;
        if i == label_at {
            if b == 0 {
                end = i + 1;
                break;
            }
            if b & 0xc0 != 0 {
                // A pointer or reserved label type in a question: not ours.
                return None;
            }
            label_at = i + 1 + b as usize;
            name.wire[i] = b;
        } else {
            name.wire[i] = b.to_ascii_lowercase();
        }
        i += 1;
    }
    if end == 0 {
        return None;
    }
    // QTYPE and QCLASS follow the name.
    Some((start + end + 4, ancount))
}

/// Call `f` with each A/AAAA answer of class IN among the first
/// [`MAX_ANSWERS`] answers starting at `offset`; stops at the first
/// malformed or truncated record.
#[inline(always)]
pub fn answers<P: Packet + ?Sized, F: FnMut(&Answer)>(
    p: &P,
    mut offset: usize,
    count: u16,
    mut f: F,
) {
    let mut k = 0usize;
    while k < MAX_ANSWERS {
        if k >= count as usize {
            return;
        }
        k += 1;
        // The owner name: usually a pointer to the question; else labels
        // ending in a zero or a pointer.
        let mut skipped = false;
        let mut n = 0usize;
        while n < MAX_LABELS {
            n += 1;
            let Some([l]) = p.load::<1>(offset) else {
                return;
            };
            if l & 0xc0 == 0xc0 {
                offset += 2;
                skipped = true;
                break;
            }
            if l & 0xc0 != 0 {
                return;
            }
            offset += 1;
            if l == 0 {
                skipped = true;
                break;
            }
            offset += l as usize;
        }
        if !skipped {
            return;
        }
        let Some(rr) = p.load::<10>(offset) else {
            return;
        };
        let rtype = u16::from_be_bytes([rr[0], rr[1]]);
        let class = u16::from_be_bytes([rr[2], rr[3]]);
        let ttl = u32::from_be_bytes([rr[4], rr[5], rr[6], rr[7]]);
        let rdlen = u16::from_be_bytes([rr[8], rr[9]]) as usize;
        offset += 10;
        if class == CLASS_IN {
            if rtype == TYPE_A && rdlen == 4 {
                if let Some(a) = p.load::<4>(offset) {
                    f(&Answer {
                        ip: v4_mapped(a),
                        ttl,
                    });
                }
            } else if rtype == TYPE_AAAA
                && rdlen == 16
                && let Some(ip) = p.load::<16>(offset)
            {
                f(&Answer { ip, ttl });
            }
        }
        offset += rdlen;
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    #[test]
    fn learned_ttl_is_clamped_both_ways() {
        for (ttl, min, max, want) in [
            (0, 30, 300, 30),
            (60, 30, 300, 60),
            (604_800, 30, 300, 300),
            (604_800, 30, 0, 30),
            (10, 30, 10, 30),
        ] {
            assert_eq!(learned_ttl(ttl, min, max), want, "{ttl} in [{min}, {max}]");
        }
    }

    /// A response to `q` with a CNAME to `edge.cdn.test`, then the given A
    /// and AAAA records (owner names compressed to the CNAME's target).
    fn response(q: &str, v4: &[[u8; 4]], v6: &[[u8; 16]]) -> Vec<u8> {
        let mut p = Vec::new();
        let an = 1 + v4.len() + v6.len();
        p.extend_from_slice(&[0x12, 0x34, 0x81, 0x80, 0, 1, 0, an as u8, 0, 0, 0, 0]);
        let qn = DnsName::encode(q).unwrap();
        let qlen = qn.wire.iter().position(|b| *b == 0).unwrap() + 1;
        // Mixed case on the wire (0x20 randomisation): still matches.
        let mut wire = qn.wire[..qlen].to_vec();
        wire[1] = wire[1].to_ascii_uppercase();
        p.extend_from_slice(&wire);
        p.extend_from_slice(&[0, 1, 0, 1]);
        // CNAME: owner = pointer to the question (offset 12).
        let target = DnsName::encode("edge.cdn.test").unwrap();
        let tlen = target.wire.iter().position(|b| *b == 0).unwrap() + 1;
        p.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, tlen as u8]);
        let target_at = p.len();
        p.extend_from_slice(&target.wire[..tlen]);
        for a in v4 {
            p.extend_from_slice(&[0xc0, target_at as u8, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
            p.extend_from_slice(a);
        }
        for a in v6 {
            p.extend_from_slice(&[0xc0, target_at as u8, 0, 28, 0, 1, 0, 0, 1, 0, 0, 16]);
            p.extend_from_slice(a);
        }
        p
    }

    fn learn(p: &[u8]) -> Option<(DnsName, Vec<Answer>)> {
        let mut name = DnsName::default();
        let (at, an) = question(p, 0, &mut name)?;
        let mut out = Vec::new();
        answers(p, at, an, |a| out.push(*a));
        Some((name, out))
    }

    #[test]
    fn cname_chain_answers_belong_to_the_question() {
        let v6 = [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let p = response("api.openai.com", &[[10, 77, 0, 3], [10, 77, 0, 9]], &[v6]);
        let (name, got) = learn(&p).unwrap();
        assert_eq!(name, DnsName::encode("API.openai.com").unwrap());
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].ip, v4_mapped([10, 77, 0, 3]));
        assert_eq!(got[0].ttl, 30);
        assert_eq!(got[2].ip, v6);
        assert_eq!(got[2].ttl, 256);
    }

    #[test]
    fn queries_errors_and_truncation_learn_nothing_or_what_is_whole() {
        let p = response("api.openai.com", &[[10, 77, 0, 3], [10, 77, 0, 9]], &[]);
        let mut query = p.clone();
        query[2] &= 0x7f;
        assert!(learn(&query).is_none(), "a query, not a response");
        let mut nx = p.clone();
        nx[3] |= 3;
        assert!(learn(&nx).is_none(), "NXDOMAIN");
        // Cut in the middle of the second address: the first one only.
        let (_, got) = learn(&p[..p.len() - 2]).unwrap();
        assert_eq!(got.len(), 1);
        // Every prefix parses without a panic.
        for n in 0..p.len() {
            let _ = learn(&p[..n]);
        }
    }

    /// Found by `cargo xtask fuzz` (dns_answer): label octets may be zero;
    /// the name key must still end where its labels say, zero-padded after.
    #[test]
    fn zero_octets_inside_labels() {
        let p: &[u8] = &[
            0x12, 0x34, 0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 0, 3, b'a', b'p', b'i', 6, b'o', b'p',
            b'e', b'n', b'a', b'i', 0x12, 0x2c, 0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 0, 3, b'a', b'p',
            b'i', 6, b'o', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, b'p', b'e', b'n', b'a', b'i',
            3, b'A', b'c', b'o', b'm', 0x12, 0, 3, b'c', b'o', b'm', 0x12, 0,
        ];
        let mut name = DnsName::default();
        let _ = question(p, 0, &mut name);
        let mut at = 0;
        while name.wire[at] != 0 {
            at += 1 + name.wire[at] as usize;
        }
        assert!(name.wire[at..].iter().all(|b| *b == 0));
        assert_ne!(name, DnsName::encode("api.openai.com").unwrap());
    }

    #[test]
    fn node_local_addresses_are_never_learned() {
        for bad in [
            [127, 0, 0, 1],
            [169, 254, 169, 254],
            [0, 0, 0, 0],
            [224, 0, 0, 1],
            [255; 4],
        ] {
            assert!(!learnable(&v4_mapped(bad)), "{bad:?}");
        }
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        assert!(!learnable(&v6), "::1");
        assert!(!learnable(&[
            0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1
        ]));
        assert!(!learnable(&[
            0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1
        ]));
        assert!(
            learnable(&v4_mapped([10, 77, 0, 3])),
            "private ranges: private endpoints"
        );
        assert!(learnable(&v4_mapped([162, 159, 140, 245])));
        assert!(learnable(&[
            0x26, 0x06, 0x47, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1
        ]));
    }

    #[test]
    fn encoding_bounds() {
        assert!(DnsName::encode("a..b").is_none());
        assert!(DnsName::encode(&"x".repeat(64)).is_none());
        assert!(DnsName::encode(&["abcdefghij"; 12].join(".")).is_none());
        assert_eq!(
            DnsName::encode("api.openai.com."),
            DnsName::encode("api.openai.com")
        );
    }
}
