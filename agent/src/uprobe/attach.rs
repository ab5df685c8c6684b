//! Which TLS library a workload process uses, and probing it.
//!
//! A container's libraries are its image's: the library is found in the
//! process's own memory map (`/proc/<pid>/maps`) and opened through its root
//! (`/proc/<pid>/root/...`), so a pod with its own `libssl` is probed at
//! that file. A process that maps no `libssl` is tried at its executable,
//! for OpenSSL linked in statically with its symbols exported (Node.js
//! release builds).
use std::path::{Path, PathBuf};

use crate::bpf::tls_probes::TlsProbes;

/// Probe `pid`'s TLS library; the library probed.
pub fn probe(probes: &TlsProbes, pid: u32) -> Result<PathBuf, String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| format!("reading /proc/{pid}/maps: {e}"))?;
    let mut tried = Vec::new();
    for library in candidates(&maps, pid) {
        match probes.attach(pid, &library) {
            Ok(n) if n > 0 => return Ok(library),
            Ok(_) => tried.push(format!("{}: nothing probed", library.display())),
            Err(e) => tried.push(e.to_string()),
        }
    }
    Err(if tried.is_empty() {
        "no TLS library mapped".into()
    } else {
        tried.join("; ")
    })
}

/// Where to look, in order: each `libssl` the process maps, then its
/// executable.
fn candidates(maps: &str, pid: u32) -> Vec<PathBuf> {
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut out: Vec<PathBuf> = Vec::new();
    for path in libssl_paths(maps) {
        let p = root.join(path.trim_start_matches('/'));
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out.push(PathBuf::from(format!("/proc/{pid}/exe")));
    out
}

/// The `libssl` files a memory map names (`/proc/<pid>/maps` text).
pub fn libssl_paths(maps: &str) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode pathname
        let Some(path) = line.split_whitespace().nth(5) else {
            continue;
        };
        let name = Path::new(path)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with("libssl.so") && !line.ends_with("(deleted)") && !out.contains(&path) {
            out.push(path);
        }
    }
    out
}

/// The process's start time (clock ticks since boot, `/proc/<pid>/stat`
/// field 22): tells a process from a later one with the same pid.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count
    // from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libssl_is_found_in_a_memory_map() {
        let maps = "\
55d0c0a00000-55d0c0a2c000 r--p 00000000 08:01 1234 /usr/bin/python3.11
7f1c2a000000-7f1c2a05a000 r--p 00000000 08:01 5678 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1c2a05a000-7f1c2a0e0000 r-xp 0005a000 08:01 5678 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1c2b000000-7f1c2b100000 r-xp 00000000 08:01 9999 /usr/lib/x86_64-linux-gnu/libcrypto.so.3
7f1c2c000000-7f1c2c001000 rw-p 00000000 00:00 0
7f1c2d000000-7f1c2d001000 r-xp 00000000 08:01 4321 /old/libssl.so.1.1 (deleted)
";
        assert_eq!(
            libssl_paths(maps),
            vec!["/usr/lib/x86_64-linux-gnu/libssl.so.3"]
        );
        let c = candidates(maps, 42);
        assert_eq!(
            c,
            vec![
                PathBuf::from("/proc/42/root/usr/lib/x86_64-linux-gnu/libssl.so.3"),
                PathBuf::from("/proc/42/exe"),
            ]
        );
    }

    #[test]
    fn start_time_reads_past_a_command_with_spaces() {
        let me = std::process::id();
        let t = start_time(me).expect("our own stat");
        assert!(t > 0);
        assert_eq!(start_time(me), Some(t), "stable for one process");
    }
}
