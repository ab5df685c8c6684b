//! What can go wrong loading and attaching the kernel programs, each with
//! what to do about it.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(
        "this agent binary was built without its eBPF programs (AYA_BUILD_SKIP was set)\n\
         hint: rebuild without AYA_BUILD_SKIP after `cargo xtask setup`"
    )]
    NoObject,
    #[error(
        "kernel BTF is missing (/sys/kernel/btf/vmlinux)\n\
         hint: Tollgate needs a kernel built with CONFIG_DEBUG_INFO_BTF=y (all major distributions since 2020)"
    )]
    NoBtf,
    #[error(
        "permission denied while {what}\n\
         hint: run as root, or grant CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_SYS_RESOURCE (see deploy/README.md)"
    )]
    Permission { what: String },
    #[error("loading the eBPF object failed: {0}")]
    Load(#[source] aya::EbpfError),
    #[error(
        "program {name} was rejected by the kernel: {source:#}\nhint: Tollgate needs Linux ≥ 5.15 with BTF; the verifier log above says why"
    )]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "program {name} was attached without a BPF link ({message})\nhint: Tollgate needs Linux ≥ 5.7 for link-based cgroup attachment"
    )]
    Link { name: &'static str, message: String },
    #[error(
        "TLS uprobes: program {name} could not be loaded: {source:#}\nhint: they need uprobes (CONFIG_UPROBE_EVENTS) and sockmap/sk_msg support in the kernel; set tls_uprobes.enabled: false to run without them"
    )]
    TlsUprobes {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("map {0} is missing from the eBPF object (agent and programs out of sync: rebuild)")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "bpffs at {path}: {message}\nhint: mount it with `mount -t bpf bpf /sys/fs/bpf` (fail-closed mode pins its programs there)"
    )]
    Bpffs { path: PathBuf, message: String },
}

impl BpfError {
    pub(super) fn program(name: &'static str, source: aya::programs::ProgramError) -> Self {
        if is_eperm(&source) {
            return BpfError::Permission {
                what: format!("loading/attaching program {name}"),
            };
        }
        BpfError::Program { name, source }
    }
}

pub(super) fn is_eperm(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            // Only EPERM means "not allowed"; the verifier rejects programs with EACCES.
            if io.raw_os_error() == Some(libc::EPERM) {
                return true;
            }
        }
        if err.to_string().contains("Operation not permitted") {
            return true;
        }
        cur = err.source();
    }
    false
}
