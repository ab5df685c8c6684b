//! The agent's container image, built with Debian's `buildah` from
//! `deploy/image/Containerfile` (`FROM scratch`): base images cannot be
//! pulled here, and need not be — the context's rootfs holds the binary, the
//! shared libraries `ldd` says it links, and the CA bundle. Used by
//! `cargo xtask image` (release binary) and the image test (debug binary).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

pub fn containerfile() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/image/Containerfile")
}

/// The files of the image's root: `binary` as /usr/local/bin/tollgate, each
/// library `ldd` lists at its own path, the CA bundle.
pub fn rootfs_files(binary: &Path) -> Result<Vec<(PathBuf, PathBuf)>, String> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| format!("running ldd: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut files = vec![(
        binary.to_path_buf(),
        PathBuf::from("usr/local/bin/tollgate"),
    )];
    // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or `/lib64/ld-linux-x86-64.so.2 (0x…)`;
    // the vDSO has no file.
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(PathBuf::from);
        if let Some(p) = path {
            let inside = p.strip_prefix("/").unwrap().to_path_buf();
            files.push((p, inside));
        }
    }
    let bundle = PathBuf::from("/etc/ssl/certs/ca-certificates.crt");
    if bundle.exists() {
        files.push((bundle, PathBuf::from("etc/ssl/certs/ca-certificates.crt")));
    }
    Ok(files)
}

/// Build image `tag` from `binary`, in `work` (the build context).
pub fn build(binary: &Path, tag: &str, work: &Path) -> Result<(), String> {
    let rootfs = work.join("rootfs");
    let _ = std::fs::remove_dir_all(&rootfs);
    for (from, to) in rootfs_files(binary)? {
        let dest = rootfs.join(&to);
        std::fs::create_dir_all(dest.parent().unwrap()).map_err(|e| e.to_string())?;
        // Follow symlinks (libc.so.6 → libc-2.36.so): the image holds files.
        std::fs::copy(&from, &dest).map_err(|e| format!("copying {}: {e}", from.display()))?;
    }
    // Mount points the DaemonSet fills; present so a read-only root needs no mkdir.
    for dir in [
        "etc/tollgate",
        "host/cgroup",
        "sys",
        "proc",
        "var/log/tollgate",
        "var/lib/tollgate",
        "tmp",
    ] {
        std::fs::create_dir_all(rootfs.join(dir)).map_err(|e| e.to_string())?;
    }
    let out = Command::new("buildah")
        .args(["bud", "--quiet", "--layers=false", "-t", tag, "-f"])
        .arg(containerfile())
        .arg(work)
        .output()
        .map_err(|e| format!("running buildah (Debian's buildah package): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "buildah bud failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}
