//! Gate for tests that need root: skip with a reason, or fail under CI.

/// Returns true when the test may run. When it may not, prints why; with
/// `TOLLGATE_REQUIRE_PRIVILEGED=1` (CI) it panics instead, so a missing
/// privilege can never turn the real-kernel tests into silent passes.
pub fn require_privileged(test: &str) -> bool {
    let problem = if unsafe { libc::geteuid() } != 0 {
        Some("not running as root".to_string())
    } else if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        Some("kernel has no BTF (/sys/kernel/btf/vmlinux)".to_string())
    } else {
        which("ip")
            .err()
            .or_else(|| which("dnsmasq").err())
            .or_else(|| which("curl").err())
    };
    match problem {
        None => true,
        Some(why) => {
            if std::env::var("TOLLGATE_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
                panic!(
                    "{test}: TOLLGATE_REQUIRE_PRIVILEGED=1 but {why} (run `cargo xtask setup` as root)"
                );
            }
            eprintln!(
                "SKIPPED {test}: {why} (privileged real-kernel test; run as root via `cargo xtask test`)"
            );
            false
        }
    }
}

/// Returns true when every one of `paths` (programs, installed SDKs) is
/// there. When one is missing, says which and skips; with
/// `TOLLGATE_REQUIRE_PRIVILEGED=1` (CI) it panics instead, since `cargo xtask
/// setup` installs them all.
pub fn require_installed(test: &str, paths: &[&std::path::Path]) -> bool {
    let missing: Vec<_> = paths.iter().filter(|p| !p.exists()).collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("TOLLGATE_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{test}: {missing:?} missing: run `cargo xtask setup`");
    }
    eprintln!("SKIPPED {test}: {missing:?} missing (run `cargo xtask setup`)");
    false
}

fn which(tool: &str) -> Result<(), String> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| std::path::Path::new(d).join(tool).is_file());
    if found {
        Ok(())
    } else {
        Err(format!("`{tool}` is not installed"))
    }
}
