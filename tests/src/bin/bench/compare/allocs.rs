//! With TOLLGATE_BENCH_ALLOCS=1: heap allocations per call, counted by
//! uprobes on a system's allocator entry points (`perf probe` + `perf
//! stat`) during one extra round of a scenario. Tollgate's allocator is
//! mimalloc linked into its executable (`mi_*_aligned`, what the Rust
//! crate calls); nginx and the floor use the C library's (`malloc`,
//! `calloc`, `realloc`, `posix_memalign`; nginx's pools take their blocks
//! from the last). Each hit costs a trap, so that round's figures are not
//! used.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

/// The probes' group in tracefs; removed after each count.
const GROUP: &str = "tgbench";

const MIMALLOC: &[&str] = &[
    "mi_malloc_aligned",
    "mi_zalloc_aligned",
    "mi_realloc_aligned",
];
const LIBC: &[&str] = &["malloc", "calloc", "realloc", "posix_memalign"];

pub struct Allocs {
    perf: std::process::Child,
    out: PathBuf,
    functions: Vec<&'static str>,
}

impl Allocs {
    pub fn wanted() -> bool {
        std::env::var_os("TOLLGATE_BENCH_ALLOCS").is_some()
    }

    /// Probe the allocator of `root`'s process tree and start counting.
    pub fn start(root: u32, name: &str, scenario: &str) -> Option<Self> {
        remove_probes();
        let (file, functions) = allocator(root).or_else(|| {
            eprintln!("TOLLGATE_BENCH_ALLOCS: no allocator found for {name} (pid {root})");
            None
        })?;
        for (i, f) in functions.iter().enumerate() {
            let added = Command::new("perf")
                .args(["probe", "-q", "-x"])
                .arg(&file)
                .arg("-a")
                .arg(format!("{GROUP}:a{i}={f}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if !added.is_ok_and(|s| s.success()) {
                eprintln!(
                    "TOLLGATE_BENCH_ALLOCS: perf probe {f} in {} failed (needs perf and uprobe events)",
                    file.display()
                );
                remove_probes();
                return None;
            }
        }
        let out = super::peers_dir().join(format!("allocs-{scenario}-{name}.csv"));
        let events: Vec<String> = (0..functions.len())
            .map(|i| format!("{GROUP}:a{i}"))
            .collect();
        let pids: Vec<String> = super::measure::tree(root)
            .iter()
            .map(u32::to_string)
            .collect();
        let perf = Command::new("perf")
            .args(["stat", "-x", ",", "-o"])
            .arg(&out)
            .args(["-e", &events.join(","), "-p", &pids.join(",")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| eprintln!("TOLLGATE_BENCH_ALLOCS: cannot run perf ({e})"))
            .ok()?;
        std::thread::sleep(Duration::from_millis(500)); // attached
        Some(Self {
            perf,
            out,
            functions,
        })
    }

    /// Stop counting and remove the probes; (allocator calls in all, per
    /// function, most frequent first).
    pub fn finish(mut self) -> Option<(u64, Vec<(String, u64)>)> {
        super::measure::interrupt(&mut self.perf);
        remove_probes();
        let counts = parse_perf_stat(&fs::read_to_string(&self.out).ok()?);
        let mut rows: Vec<(String, u64)> = self
            .functions
            .iter()
            .enumerate()
            .map(|(i, f)| {
                (
                    f.to_string(),
                    counts.get(&format!("{GROUP}:a{i}")).copied().unwrap_or(0),
                )
            })
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.1));
        Some((rows.iter().map(|r| r.1).sum(), rows))
    }
}

/// The file holding `pid`'s allocator and the functions to count there.
fn allocator(pid: u32) -> Option<(PathBuf, Vec<&'static str>)> {
    let exe = fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    if defines(&exe, MIMALLOC[0]) {
        return Some((exe, MIMALLOC.to_vec()));
    }
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let libc = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            Path::new(p)
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libc.so"))
        })?;
    Some((PathBuf::from(libc), LIBC.to_vec()))
}

/// Whether `file`'s symbol table defines `symbol` (`nm`, no demangling needed).
fn defines(file: &Path, symbol: &str) -> bool {
    Command::new("nm").arg(file).output().is_ok_and(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .any(|l| l.ends_with(&format!(" T {symbol}")))
    })
}

fn remove_probes() {
    let _ = Command::new("perf")
        .args(["probe", "-q", "-d", &format!("{GROUP}:*")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// `perf stat -x ,` lines: `count,unit,event,…`; comments and `<not
/// counted>` rows skipped.
fn parse_perf_stat(text: &str) -> std::collections::HashMap<String, u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            Some((f.get(2)?.to_string(), f.first()?.parse::<u64>().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn perf_stat_csv_is_read() {
        let text = "# started on Thu Dec  3 17:00:00 2026\n\n1234,,tgbench:a0,5000000000,100.00,,\n<not counted>,,tgbench:a1,0,100.00,,\n56,,tgbench:a2,5000000000,100.00,,\n";
        let c = super::parse_perf_stat(text);
        assert_eq!(c["tgbench:a0"], 1234);
        assert_eq!(c["tgbench:a2"], 56);
        assert!(!c.contains_key("tgbench:a1"));
    }
}
