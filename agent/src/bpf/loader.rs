//! Load the programs, attach them to the governed cgroup, detach them.
//!
//! Attachment uses BPF links (`bpf_link_create`, kernel ≥ 5.7). Cgroup links
//! are always multi-attach (the kernel rejects the BPF_F_ALLOW_MULTI flag on
//! link_create, so aya's mode must be `Single`, i.e. flags 0), so Tollgate coexists with other cgroup programs (CNIs,
//! systemd) and a restarted agent can attach its new programs *before* the old
//! ones go: no connect() ever runs unwatched during a restart.
//!
//! Lifetime, by failure mode:
//! * fail-open: links are held only by the agent's file descriptors. If the
//!   agent dies for any reason, the kernel detaches the programs at once and
//!   provider connections go direct.
//! * fail-closed: links are also pinned in bpffs, so the programs outlive the
//!   agent; with no heartbeat and no listener they refuse provider connections
//!   until an agent is back. `tollgate detach` removes them.
use std::{
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use tollgate_common::{map_names, program_names as prog};

use super::{
    OBJECT,
    error::{BpfError, is_eperm},
    maps::Maps,
    tls_probes::{self, TlsProbes},
};

pub struct LoadOptions<'a> {
    pub cgroup: &'a Path,
    /// Pin links here (fail-closed). `None`: links live and die with the agent.
    pub pin_dir: Option<&'a Path>,
    /// Load the TLS uprobe programs (`tls_uprobes.enabled`).
    pub tls_uprobes: bool,
}

/// The programs, attached. Dropping it detaches them unless they are pinned.
pub struct Attached {
    _ebpf: std::sync::Arc<std::sync::Mutex<Ebpf>>,
    links: Vec<FdLink>,
    pinned: Vec<PinnedLink>,
    pub maps: std::sync::Arc<Maps>,
    /// With `tls_uprobes`: the probes, and their ring buffer (taken once by
    /// the reader).
    pub tls: Option<(std::sync::Arc<TlsProbes>, Option<RingBuf<MapData>>)>,
    pin_run_dir: Option<PathBuf>,
}

/// Attach a loaded program to the cgroup and keep its link as an owned
/// `FdLink`. aya's program types share no attach trait, so one macro body
/// serves both kinds.
macro_rules! attach_link {
    ($ty:ty, $program:expr, $cgroup:expr, $name:expr) => {{
        let p = <&mut $ty>::try_from($program).expect("type checked at load");
        p.attach($cgroup, CgroupAttachMode::Single)
            .and_then(|id| p.take_link(id))
            .map_err(|e| BpfError::program($name, e))
            .and_then(|l| {
                FdLink::try_from(l).map_err(|e| BpfError::Link {
                    name: $name,
                    message: e.to_string(),
                })
            })
    }};
}

const PROGRAMS: [(&str, Kind); 8] = [
    // DNS learning first: an answer arriving while the rest attach is learned.
    (prog::DNS_INGRESS, Kind::SkbIngress),
    (prog::CONNECT4, Kind::SockAddr),
    (prog::CONNECT6, Kind::SockAddr),
    (prog::SOCK_OPS, Kind::SockOps),
    (prog::GETPEERNAME4, Kind::SockAddr),
    (prog::GETPEERNAME6, Kind::SockAddr),
    (prog::SENDMSG4, Kind::SockAddr),
    (prog::SENDMSG6, Kind::SockAddr),
];

#[derive(Clone, Copy)]
enum Kind {
    SockAddr,
    SockOps,
    SkbIngress,
}

impl Attached {
    pub fn load(opts: LoadOptions<'_>) -> Result<Self, BpfError> {
        if OBJECT.is_empty() {
            return Err(BpfError::NoObject);
        }
        if !Path::new("/sys/kernel/btf/vmlinux").exists() {
            return Err(BpfError::NoBtf);
        }
        // Maps need locked memory on kernels before 5.11 (memcg accounting came later).
        raise_memlock();
        let mut loader = EbpfLoader::new();
        if !opts.tls_uprobes {
            // Unused: the smallest sizes the kernel takes.
            loader
                .map_max_entries(map_names::TLS_EVENTS, 4096)
                .map_max_entries(map_names::TLS_SSL, 1)
                .map_max_entries(map_names::TLS_CALLS, 1)
                .map_max_entries(map_names::LAST_SSL, 1)
                .map_max_entries(map_names::CAPTURE, 1)
                .map_max_entries(map_names::TLS_SOCKS, 1)
                .map_max_entries(map_names::SOCK_BY_ADDR, 1);
        }
        let mut ebpf = loader.load(OBJECT).map_err(|e| {
            if is_eperm(&e) {
                BpfError::Permission {
                    what: "loading the eBPF object (creating maps)".into(),
                }
            } else {
                BpfError::Load(e)
            }
        })?;
        let cgroup = fs::File::open(opts.cgroup).map_err(|source| BpfError::Cgroup {
            path: opts.cgroup.into(),
            source,
        })?;

        // Load every program before attaching any: a verifier rejection then
        // leaves the node untouched.
        for (name, kind) in PROGRAMS {
            let p = ebpf.program_mut(name).ok_or_else(|| BpfError::Program {
                name,
                source: aya::programs::ProgramError::NotLoaded,
            })?;
            let r = match kind {
                Kind::SockAddr => <&mut CgroupSockAddr>::try_from(p).and_then(|p| p.load()),
                Kind::SockOps => <&mut SockOps>::try_from(p).and_then(|p| p.load()),
                Kind::SkbIngress => <&mut CgroupSkb>::try_from(p).and_then(|p| p.load()),
            };
            r.map_err(|e| BpfError::program(name, e))?;
        }
        let maps = Maps::take(&mut ebpf)?;
        let tls_maps = if opts.tls_uprobes {
            let socks = tls_probes::load(&mut ebpf)?;
            Some((tls_probes::take_maps(&mut ebpf)?, socks))
        } else {
            None
        };

        let mut links = Vec::new();
        for (name, kind) in PROGRAMS {
            let p = ebpf.program_mut(name).ok_or(BpfError::Program {
                name,
                source: aya::programs::ProgramError::NotLoaded,
            })?;
            let cg = cgroup.as_fd();
            let link = match kind {
                Kind::SockAddr => attach_link!(CgroupSockAddr, p, cg, name),
                Kind::SockOps => attach_link!(SockOps, p, cg, name),
                Kind::SkbIngress => {
                    let p = <&mut CgroupSkb>::try_from(p).expect("type checked at load");
                    p.attach(cg, CgroupSkbAttachType::Ingress, CgroupAttachMode::Single)
                        .and_then(|id| p.take_link(id))
                        .map_err(|e| BpfError::program(name, e))
                        .and_then(|l| {
                            FdLink::try_from(l).map_err(|e| BpfError::Link {
                                name,
                                message: e.to_string(),
                            })
                        })
                }
            };
            links.push(link?);
        }

        let ebpf = std::sync::Arc::new(std::sync::Mutex::new(ebpf));
        let tls = tls_maps.map(|((capture, ring), socks)| {
            (
                std::sync::Arc::new(TlsProbes::new(ebpf.clone(), (capture, socks))),
                Some(ring),
            )
        });
        let mut attached = Attached {
            _ebpf: ebpf,
            tls,
            links,
            pinned: Vec::new(),
            maps: std::sync::Arc::new(maps),
            pin_run_dir: None,
        };
        if let Some(dir) = opts.pin_dir {
            attached.pin(dir)?;
        }
        Ok(attached)
    }

    /// Pin every link under `dir/run-<pid>-<ns>` so the programs outlive us.
    fn pin(&mut self, dir: &Path) -> Result<(), BpfError> {
        ensure_bpffs(dir)?;
        let run = dir.join(format!(
            "run-{}-{}",
            std::process::id(),
            super::monotonic_ns()
        ));
        fs::create_dir_all(&run).map_err(|e| BpfError::Bpffs {
            path: run.clone(),
            message: e.to_string(),
        })?;
        for ((name, _), link) in PROGRAMS.iter().zip(std::mem::take(&mut self.links)) {
            let path = run.join(name);
            let pinned = link.pin(&path).map_err(|e| BpfError::Bpffs {
                path: path.clone(),
                message: e.to_string(),
            })?;
            self.pinned.push(pinned);
        }
        self.pin_run_dir = Some(run);
        Ok(())
    }

    /// Remove pins left by earlier runs (after ours are attached: no gap).
    /// Returns how many old runs were removed.
    pub fn remove_stale_pins(&self, dir: &Path) -> usize {
        let ours = self.pin_run_dir.as_deref();
        remove_runs(dir, |p| Some(p) != ours)
    }

    /// Detach now, pinned or not (clean shutdown in fail-open mode, `tollgate detach`).
    pub fn detach(mut self) {
        for p in self.pinned.drain(..) {
            if let Ok(link) = p.unpin() {
                drop(link);
            }
        }
        if let Some(run) = self.pin_run_dir.take() {
            let _ = fs::remove_dir(run);
        }
        self.links.clear();
    }

    pub fn is_pinned(&self) -> bool {
        !self.pinned.is_empty()
    }
}

/// Remove every pinned run under `dir`; what `tollgate detach` does.
pub fn detach_pinned(dir: &Path) -> usize {
    remove_runs(dir, |_| true)
}

fn remove_runs(dir: &Path, select: impl Fn(&Path) -> bool) -> usize {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    let mut n = 0;
    for e in rd.flatten() {
        let p = e.path();
        if !p
            .file_name()
            .is_some_and(|f| f.to_string_lossy().starts_with("run-"))
            || !select(&p)
        {
            continue;
        }
        // Removing the last reference to a pinned link detaches its program.
        if let Ok(files) = fs::read_dir(&p) {
            for f in files.flatten() {
                let _ = fs::remove_file(f.path());
            }
        }
        if fs::remove_dir(&p).is_ok() {
            n += 1;
        }
    }
    n
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Make sure `dir` is on a bpffs, mounting one at /sys/fs/bpf if none is.
fn ensure_bpffs(dir: &Path) -> Result<(), BpfError> {
    let mount_point = Path::new("/sys/fs/bpf");
    let on_bpffs =
        |p: &Path| nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
    if !on_bpffs(mount_point) && dir.starts_with(mount_point) {
        fs::create_dir_all(mount_point).map_err(|e| BpfError::Bpffs {
            path: mount_point.into(),
            message: e.to_string(),
        })?;
        nix::mount::mount(
            Some("bpf"),
            mount_point,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| BpfError::Bpffs {
            path: mount_point.into(),
            message: format!("mount failed: {e}"),
        })?;
    }
    fs::create_dir_all(dir).map_err(|e| BpfError::Bpffs {
        path: dir.into(),
        message: e.to_string(),
    })?;
    if !on_bpffs(dir) {
        return Err(BpfError::Bpffs {
            path: dir.into(),
            message: "not on a bpf filesystem".into(),
        });
    }
    Ok(())
}

fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid pointer to an initialised struct.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK (fine on kernels ≥ 5.11)");
    }
}
