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
    programs::{SkMsg, UProbe, uprobe::UProbeLinkId, uprobe::UProbeScope},
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
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        let mut made = Vec::new();
        let mut first_error = None;
        for (symbol, entry) in CALLS {
            for name in [entry, prog::TLS_RETURN] {
                let Some(Ok(p)) = ebpf.program_mut(name).map(<&mut UProbe>::try_from) else {
                    continue;
                };
                match p.attach(symbol, library, scope) {
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
