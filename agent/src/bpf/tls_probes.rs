//! The kernel side of TLS uprobes (README "TLS uprobes"): load the programs
//! of `ebpf/programs/src/tls.rs`, attach the fentry pair node-wide, and the
//! uprobes to one process's TLS library at a time.
use std::{
    collections::HashMap,
    num::NonZeroU32,
    path::Path,
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, RingBuf, SockHash},
    programs::{
        SkMsg, UProbe,
        uprobe::{UProbeAttachLocation, UProbeLinkId, UProbeScope},
    },
};
use tollgate_common::{CaptureState, map_names, program_names as prog};

use super::error::BpfError;

/// The entry probe of each TLS call; every call's return goes to
/// `TLS_RETURN`. `_ex` variants write their count through a pointer.
const CALLS: [(&str, &str); 5] = [
    ("SSL_write", prog::TLS_WRITE),
    ("SSL_write_ex", prog::TLS_WRITE_EX),
    ("SSL_read", prog::TLS_READ),
    ("SSL_read_ex", prog::TLS_READ_EX),
    // Moves no plaintext; tells which socket a session uses.
    ("SSL_do_handshake", prog::TLS_HANDSHAKE),
];

/// Load the TLS programs: `sk_msg` attached to the sockhash of redirected
/// sockets, the uprobes loaded only (they are attached per process).
pub(super) fn load(ebpf: &mut Ebpf) -> Result<SockHash<MapData, u64>, BpfError> {
    for name in CALLS.iter().map(|(_, p)| *p).chain([prog::TLS_RETURN]) {
        let p: &mut UProbe = program(ebpf, name)?;
        p.load().map_err(|e| tls_error(name, e))?;
    }
    let socks: SockHash<MapData, u64> = super::maps::take(ebpf, map_names::TLS_SOCKS)?;
    let name = prog::TLS_SK_MSG;
    let p: &mut SkMsg = program(ebpf, name)?;
    p.load()
        .and_then(|()| p.attach(socks.fd()).map(drop))
        .map_err(|e| tls_error(name, e))?;
    Ok(socks)
}

/// A TLS program the kernel refused: say how to run without them (a
/// permission problem stays one).
fn tls_error(name: &'static str, source: aya::programs::ProgramError) -> BpfError {
    match BpfError::program(name, source) {
        BpfError::Program { name, source } => BpfError::TlsUprobes { name, source },
        other => other,
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, BpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or(BpfError::Program {
        name,
        source: aya::programs::ProgramError::NotLoaded,
    })?;
    p.try_into().map_err(|e| BpfError::program(name, e))
}

/// What the agent holds of the TLS programs: the object (to attach uprobes
/// to processes as they appear), the capture list, the ring buffer.
pub struct TlsProbes {
    ebpf: Arc<Mutex<Ebpf>>,
    /// Links by process, to detach when it is gone.
    links: Mutex<HashMap<u32, Vec<(&'static str, UProbeLinkId)>>>,
    pub capture: Mutex<BpfHashMap<MapData, u64, CaptureState>>,
    /// TLS call offsets by library file (device, inode).
    offsets: Mutex<OffsetCache>,
    /// The sockhash `sk_msg` is attached to (kept open with it).
    _socks: SockHash<MapData, u64>,
}

/// Why a process could not be probed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{library}: it exports none of SSL_write, SSL_read ({detail})")]
    NoSymbols { library: String, detail: String },
    #[error("attaching uprobes to {library} in process {pid}: {source}")]
    Attach {
        library: String,
        pid: u32,
        #[source]
        source: aya::programs::ProgramError,
    },
}

impl TlsProbes {
    pub(super) fn new(ebpf: Arc<Mutex<Ebpf>>, (capture, socks): Kept) -> Self {
        Self {
            ebpf,
            links: Mutex::default(),
            offsets: Mutex::default(),
            capture: Mutex::new(capture),
            _socks: socks,
        }
    }

    /// Attach the TLS uprobes to `library` (a path the agent can open, e.g.
    /// under `/proc/<pid>/root`) for process `pid` only. Symbols a library
    /// lacks (`SSL_write_ex` before OpenSSL 1.1.1) are skipped; none at all
    /// is an error. Returns how many calls were probed.
    pub fn attach(&self, pid: u32, library: &Path) -> Result<usize, ProbeError> {
        let Some(scope) = NonZeroU32::new(pid).map(UProbeScope::OneProcess) else {
            return Ok(0);
        };
        let offsets = self.offsets(library)?;
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        let mut made = Vec::new();
        let mut first_error = None;
        for (symbol, entry) in CALLS {
            let Some(&offset) = offsets.get(symbol) else {
                continue; // not in this library (SSL_write_ex before 1.1.1)
            };
            for name in [entry, prog::TLS_RETURN] {
                let Some(Ok(p)) = ebpf.program_mut(name).map(<&mut UProbe>::try_from) else {
                    continue;
                };
                match p.attach(UProbeAttachLocation::AbsoluteOffset(offset), library, scope) {
                    Ok(id) => made.push((name, id)),
                    Err(e) => {
                        first_error.get_or_insert(e);
                        break; // no entry probe: no return probe either
                    }
                }
            }
        }
        drop(ebpf);
        let probed = made.len() / 2;
        if made.is_empty() {
            let library = library.display().to_string();
            return Err(match first_error {
                Some(source @ aya::programs::ProgramError::UProbeError(_)) => {
                    ProbeError::NoSymbols {
                        library,
                        detail: format!("{source:#}"),
                    }
                }
                Some(source) => ProbeError::Attach {
                    library,
                    pid,
                    source,
                },
                None => ProbeError::NoSymbols {
                    library,
                    detail: "no program".into(),
                },
            });
        }
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(pid)
            .or_default()
            .extend(made);
        Ok(probed)
    }

    /// The file offsets of the TLS calls in `library`, read once per file
    /// (device and inode: every process of an image shares its libssl).
    /// Read here rather than by aya per attach point: aya re-reads the file
    /// for each symbol; for the 100 MB Node.js executable probing took
    /// about 500 ms that way and about 250 ms now, of which the attaches
    /// are most (a second process of the same image skips the reading).
    fn offsets(&self, library: &Path) -> Result<Arc<HashMap<&'static str, u64>>, ProbeError> {
        use std::os::unix::fs::MetadataExt;
        let no_symbols = |detail: String| ProbeError::NoSymbols {
            library: library.display().to_string(),
            detail,
        };
        let meta = std::fs::metadata(library).map_err(|e| no_symbols(e.to_string()))?;
        let file = (meta.dev(), meta.ino());
        if let Some(known) = self.lock_offsets().get(&file) {
            return Ok(known.clone());
        }
        let found = Arc::new(symbol_offsets(library).map_err(no_symbols)?);
        if found.is_empty() {
            return Err(no_symbols("no SSL_* symbol defined".into()));
        }
        self.lock_offsets().insert(file, found.clone());
        Ok(found)
    }

    fn lock_offsets(&self) -> std::sync::MutexGuard<'_, OffsetCache> {
        self.offsets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Detach what was attached for `pid` (it exited).
    pub fn detach(&self, pid: u32) {
        let Some(links) = self
            .links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid)
        else {
            return;
        };
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        for (name, id) in links {
            if let Some(Ok(p)) = ebpf.program_mut(name).map(<&mut UProbe>::try_from) {
                let _ = p.detach(id);
            }
        }
    }

    /// Processes with probes attached.
    pub fn probed(&self) -> Vec<u32> {
        let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        links.keys().copied().collect()
    }

    /// Start capturing the connection with socket `cookie`.
    pub fn capture(&self, cookie: u64) -> Result<(), aya::maps::MapError> {
        let mut m = self.capture.lock().unwrap_or_else(|e| e.into_inner());
        m.insert(cookie, CaptureState::default(), 0)
    }

    /// Stop capturing it; what it captured and lost.
    pub fn release(&self, cookie: u64) -> Option<CaptureState> {
        let mut m = self.capture.lock().unwrap_or_else(|e| e.into_inner());
        let state = m.get(&cookie, 0).ok();
        let _ = m.remove(&cookie);
        state
    }
}

type OffsetCache = HashMap<(u64, u64), Arc<HashMap<&'static str, u64>>>;

/// Where each of `CALLS` starts in the file `library`: a defined symbol
/// (dynamic table first, then the full one), its address translated to a
/// file offset as the kernel's uprobes want it (as aya does). The file is
/// read whole once (a ReadCache was slower: the symbol tables are large).
fn symbol_offsets(library: &Path) -> Result<HashMap<&'static str, u64>, String> {
    use object::{Object, ObjectKind, ObjectSection, ObjectSymbol};
    let data = std::fs::read(library).map_err(|e| e.to_string())?;
    let obj = object::File::parse(&*data).map_err(|e| e.to_string())?;
    let translate = matches!(obj.kind(), ObjectKind::Dynamic | ObjectKind::Executable);
    let mut out = HashMap::new();
    for sym in obj.dynamic_symbols().chain(obj.symbols()) {
        if sym.is_undefined() {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        let Some(&(symbol, _)) = CALLS.iter().find(|(s, _)| *s == name) else {
            continue;
        };
        if out.contains_key(symbol) {
            continue;
        }
        let offset = if translate {
            let Some(section) = sym
                .section_index()
                .and_then(|i| obj.section_by_index(i).ok())
            else {
                continue;
            };
            let Some((file_offset, _)) = section.file_range() else {
                continue;
            };
            sym.address() - section.address() + file_offset
        } else {
            sym.address()
        };
        out.insert(symbol, offset);
        if out.len() == CALLS.len() {
            break;
        }
    }
    Ok(out)
}

/// The capture list and the ring buffer, out of the loaded object.
pub(super) type TlsMaps = (BpfHashMap<MapData, u64, CaptureState>, RingBuf<MapData>);

/// What `TlsProbes` keeps: the capture list and the sockhash.
pub(super) type Kept = (
    BpfHashMap<MapData, u64, CaptureState>,
    SockHash<MapData, u64>,
);

pub(super) fn take_maps(ebpf: &mut Ebpf) -> Result<TlsMaps, BpfError> {
    Ok((
        super::maps::take(ebpf, map_names::CAPTURE)?,
        super::maps::take(ebpf, map_names::TLS_EVENTS)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_calls_are_found_in_a_libssl_and_nowhere_else() {
        let libssl = Path::new("/usr/lib/x86_64-linux-gnu/libssl.so.3");
        if libssl.exists() {
            let found = symbol_offsets(libssl).unwrap();
            let size = std::fs::metadata(libssl).unwrap().len();
            for symbol in [
                "SSL_write",
                "SSL_read",
                "SSL_write_ex",
                "SSL_read_ex",
                "SSL_do_handshake",
            ] {
                let at = found
                    .get(symbol)
                    .copied()
                    .unwrap_or_else(|| panic!("{symbol}: {found:?}"));
                assert!(at > 0 && at < size, "{symbol} at {at}");
            }
            let distinct: std::collections::HashSet<_> = found.values().collect();
            assert_eq!(
                distinct.len(),
                found.len(),
                "one offset per call: {found:?}"
            );
        } else {
            println!("skipped the libssl half: {} is not here", libssl.display());
        }
        // This test binary imports no OpenSSL: nothing defined to probe.
        let me = std::env::current_exe().unwrap();
        assert!(symbol_offsets(&me).unwrap().is_empty());
    }
}
