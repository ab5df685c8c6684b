//! Checks that turn obscure kernel errors into instructions.

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "tollgate run needs privileges it does not have (missing: {missing})\n\
         hint: run as root, or give the process CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_ADMIN and \
         CAP_SYS_RESOURCE (see deploy/README.md)"
    )]
    Privileges { missing: String },
}

/// Capabilities the agent uses, with why:
/// BPF/PERFMON load programs and maps; NET_ADMIN sets SO_MARK on upstream
/// sockets; SYS_ADMIN enters workload network namespaces (setns) and attaches
/// to cgroups; SYS_RESOURCE raises RLIMIT_MEMLOCK on older kernels.
const NEEDED: [(u32, &str); 4] = [
    (39, "CAP_BPF"),
    (12, "CAP_NET_ADMIN"),
    (21, "CAP_SYS_ADMIN"),
    (38, "CAP_PERFMON"),
];

pub fn check_privileges() -> Result<(), PreflightError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let missing: Vec<&str> = NEEDED
        .iter()
        .filter(|(bit, _)| eff & (1u64 << bit) == 0)
        .map(|(_, n)| *n)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PreflightError::Privileges {
            missing: missing.join(", "),
        })
    }
}

/// Raise the open-files soft limit to the hard one. Every proxied call holds
/// at least one descriptor (two while its provider connection is not
/// pooled); the usual soft limit of 1024 would cap a node at a few hundred
/// concurrent calls, failing accept() with EMFILE.
pub fn raise_nofile_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit struct.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l) == 0
        }
    };
    if raised {
        tracing::debug!(limit = l.rlim_cur, "open files limit");
    } else {
        tracing::warn!(
            "could not raise the open files limit; busy nodes may refuse connections (raise LimitNOFILE)"
        );
    }
}
