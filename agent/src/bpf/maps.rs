//! Typed access to the maps shared with the kernel programs.
use std::{
    collections::HashSet,
    hash::Hash,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
};
use tollgate_common::{
    ConnInfo, Counter, DnsNameValue, LearnedKey, LearnedValue, OrigDstKey, ProviderKey,
    ProviderValue, ResolverKey, Settings, dns::DnsName, is_v4_mapped, map_names, v4_mapped,
};

use super::error::BpfError;

pub struct Maps {
    providers: Mutex<HashMap<MapData, ProviderKey, ProviderValue>>,
    orig_dst: Mutex<HashMap<MapData, OrigDstKey, ConnInfo>>,
    opt_out: Mutex<Synced<u64, u8>>,
    settings: Mutex<Array<MapData, Settings>>,
    counters: PerCpuArray<MapData, u64>,
    dns_names: Mutex<HashMap<MapData, DnsName, DnsNameValue>>,
    learned: Mutex<HashMap<MapData, LearnedKey, LearnedValue>>,
    cgroup_netns: Mutex<Synced<u64, u64>>,
    resolvers: Mutex<Synced<ResolverKey, u8>>,
    blocked: Mutex<Synced<u64, u8>>,
}

/// A redirected connection's record, as the proxy needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrigDst {
    pub dest: SocketAddr,
    pub provider_id: u32,
    pub cgroup_id: u64,
    pub tgid: u32,
    pub comm: String,
    /// The workload socket's cookie (TLS capture's key).
    pub socket_cookie: u64,
}

impl From<ConnInfo> for OrigDst {
    fn from(c: ConnInfo) -> Self {
        let comm_len = c.comm.iter().position(|&b| b == 0).unwrap_or(c.comm.len());
        OrigDst {
            dest: SocketAddr::new(ip_from_key(c.orig_ip_be), c.orig_port),
            provider_id: c.provider_id,
            cgroup_id: c.cgroup_id,
            tgid: c.tgid,
            socket_cookie: c.socket_cookie,
            comm: String::from_utf8_lossy(&c.comm[..comm_len]).into_owned(),
        }
    }
}

/// IPv4 as IPv4-mapped, IPv6 as is: the key form shared with the programs.
pub fn ip_to_key(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        // A v4-mapped IPv6 address's octets already are the mapped form.
        IpAddr::V6(v6) => v6.octets(),
    }
}

pub fn ip_from_key(b: [u8; 16]) -> IpAddr {
    if is_v4_mapped(&b) {
        IpAddr::from([b[12], b[13], b[14], b[15]])
    } else {
        IpAddr::from(b)
    }
}

pub(super) fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(BpfError::MissingMap(name))?;
    T::try_from(map).map_err(|source| BpfError::Map { name, source })
}

impl Maps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, BpfError> {
        Ok(Maps {
            providers: Mutex::new(take(ebpf, map_names::PROVIDERS)?),
            orig_dst: Mutex::new(take(ebpf, map_names::ORIG_DST)?),
            opt_out: Mutex::new(Synced::new(take(ebpf, map_names::OPT_OUT)?)),
            settings: Mutex::new(take(ebpf, map_names::SETTINGS)?),
            counters: take(ebpf, map_names::COUNTERS)?,
            dns_names: Mutex::new(take(ebpf, map_names::DNS_NAMES)?),
            learned: Mutex::new(take(ebpf, map_names::LEARNED)?),
            cgroup_netns: Mutex::new(Synced::new(take(ebpf, map_names::CGROUP_NETNS)?)),
            resolvers: Mutex::new(Synced::new(take(ebpf, map_names::RESOLVERS)?)),
            blocked: Mutex::new(Synced::new(take(ebpf, map_names::BLOCKED)?)),
        })
    }

    pub fn write_settings(&self, s: Settings) -> Result<(), MapError> {
        self.settings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .set(0, s, 0)
    }

    pub fn read_settings(&self) -> Result<Settings, MapError> {
        self.settings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&0, 0)
    }

    /// Find (and consume) the record of an accepted connection.
    pub fn take_orig_dst(&self, netns_cookie: u64, peer: SocketAddr) -> Option<OrigDst> {
        let key = OrigDstKey {
            netns_cookie,
            ip_be: ip_to_key(peer.ip()),
            port: peer.port(),
            _pad: [0; 6],
        };
        let mut map = self
            .orig_dst
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let info = map.get(&key, 0).ok()?;
        // The record has served its purpose; free the slot rather than wait for LRU.
        let _ = map.remove(&key);
        Some(info.into())
    }

    /// Make the provider map equal `want` (address → provider id). Returns
    /// (inserted, removed); stops at the first error (e.g. map full).
    pub fn sync_providers(
        &self,
        want: &std::collections::HashMap<ProviderKey, u32>,
    ) -> Result<(usize, usize), MapError> {
        let mut map = self
            .providers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let have: HashSet<ProviderKey> = map.keys().filter_map(Result::ok).collect();
        let mut removed = 0;
        for k in have.iter().filter(|k| !want.contains_key(k)) {
            map.remove(k)?;
            removed += 1;
        }
        let mut inserted = 0;
        for (k, id) in want {
            let v = ProviderValue {
                provider_id: *id,
                _pad: 0,
            };
            if map.get(k, 0).ok() != Some(v) {
                map.insert(*k, v, 0)?;
                inserted += 1;
            }
        }
        Ok((inserted, removed))
    }

    pub fn provider_count(&self) -> usize {
        self.providers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .count()
    }

    /// Make the learned-name set equal `want` (written once at start; the
    /// provider list does not change without a restart).
    pub fn set_dns_names(&self, want: &[(DnsName, DnsNameValue)]) -> Result<(), MapError> {
        let mut map = self
            .dns_names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let have: Vec<DnsName> = map.keys().filter_map(Result::ok).collect();
        for k in &have {
            map.remove(k)?;
        }
        for (k, v) in want {
            map.insert(*k, *v, 0)?;
        }
        Ok(())
    }

    /// Provider (address, port) pairs learned from DNS answers and still
    /// valid at `now_ns` (CLOCK_MONOTONIC).
    pub fn learned(&self, now_ns: u64) -> Vec<(SocketAddr, u32)> {
        let map = self
            .learned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.expires_ns > now_ns)
            .map(|(k, v)| (SocketAddr::new(ip_from_key(k.ip_be), k.port), v.provider_id))
            .collect()
    }

    /// Make the opt-out set equal `want` (cgroup ids).
    pub fn sync_opt_out(&self, want: &HashSet<u64>) -> Result<(), MapError> {
        sync_set(&self.opt_out, want)
    }

    /// Make the governed-cgroup → network-namespace map equal `want`: DNS
    /// answers are learned for the namespace of the cgroup that received them.
    pub fn sync_cgroup_netns(
        &self,
        want: &std::collections::HashMap<u64, u64>,
    ) -> Result<(), MapError> {
        sync(&self.cgroup_netns, want)
    }

    /// Make the resolver set equal `want`: (namespace cookie or 0 for every
    /// namespace, resolver address).
    pub fn sync_resolvers(&self, want: &HashSet<(u64, IpAddr)>) -> Result<(), MapError> {
        let want: std::collections::HashMap<ResolverKey, u8> = want
            .iter()
            .map(|(netns_cookie, ip)| {
                let key = ResolverKey {
                    netns_cookie: *netns_cookie,
                    ip_be: ip_to_key(*ip),
                };
                (key, 1)
            })
            .collect();
        sync(&self.resolvers, &want)
    }

    /// Make BLOCKED hold exactly these cgroups: their provider connects
    /// are refused.
    pub fn sync_blocked(&self, cgroups: &HashSet<u64>) -> Result<(), MapError> {
        sync_set(&self.blocked, cgroups)
    }

    /// Sum of a kernel counter over all CPUs.
    pub fn counter(&self, c: Counter) -> u64 {
        self.counters
            .get(&(c as u32), 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }
}

/// A kernel hash map only the agent writes (the programs only read it),
/// with what the agent last wrote to it: the scan syncs these maps every
/// few hundred milliseconds, and an unchanged set costs no syscall.
struct Synced<K, V> {
    map: HashMap<MapData, K, V>,
    /// What the map holds, as last synced; None before the first sync or
    /// after a failed one (then the map itself is read).
    written: Option<std::collections::HashMap<K, V>>,
}

impl<K, V> Synced<K, V> {
    fn new(map: HashMap<MapData, K, V>) -> Self {
        Self { map, written: None }
    }
}

/// A set of cgroup ids as a map of flags.
fn sync_set(synced: &Mutex<Synced<u64, u8>>, want: &HashSet<u64>) -> Result<(), MapError> {
    let want: std::collections::HashMap<u64, u8> = want.iter().map(|k| (*k, 1)).collect();
    sync(synced, &want)
}

/// Make a kernel hash map hold exactly `want`: stale keys removed, missing
/// or changed ones written. The lock is held for map calls only.
fn sync<K, V>(
    synced: &Mutex<Synced<K, V>>,
    want: &std::collections::HashMap<K, V>,
) -> Result<(), MapError>
where
    K: aya::Pod + Eq + Hash,
    V: aya::Pod + PartialEq,
{
    let mut s = synced
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if s.written.as_ref() == Some(want) {
        return Ok(());
    }
    let have = match s.written.take() {
        Some(w) => w,
        None => s.map.iter().filter_map(Result::ok).collect(),
    };
    for k in have.keys().filter(|k| !want.contains_key(k)) {
        s.map.remove(k)?;
    }
    for (k, v) in want {
        if have.get(k) != Some(v) {
            s.map.insert(*k, *v, 0)?;
        }
    }
    s.written = Some(want.clone());
    Ok(())
}

pub fn provider_key(ip: IpAddr, port: u16) -> ProviderKey {
    ProviderKey {
        ip_be: ip_to_key(ip),
        port,
        _pad: [0; 2],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_normalise_v4_and_mapped() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(ip_to_key(v4), ip_to_key(mapped));
        assert_eq!(ip_from_key(ip_to_key(v4)), v4);
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(ip_from_key(ip_to_key(v6)), v6);
    }

    #[test]
    fn conn_info_converts() {
        let mut c = ConnInfo {
            orig_ip_be: v4_mapped([1, 2, 3, 4]),
            orig_port: 443,
            ..ConnInfo::default()
        };
        c.comm[..4].copy_from_slice(b"curl");
        let o = OrigDst::from(c);
        assert_eq!(o.dest, "1.2.3.4:443".parse().unwrap());
        assert_eq!(o.comm, "curl");
    }
}
