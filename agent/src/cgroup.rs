//! cgroup v2: where it is mounted, which subtree we govern, and what lives in it.
//!
//! A cgroup v2 id (what `bpf_get_current_cgroup_id` returns) is the inode
//! number of the cgroup's directory, so id → path is a walk of the subtree.
use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo)\n\
         hint: Tollgate needs the unified cgroup hierarchy; mount it with \
         `mount -t cgroup2 none /sys/fs/cgroup/unified` or boot with systemd.unified_cgroup_hierarchy=1"
    )]
    NoCgroup2,
    #[error(
        "cgroup root {path} is not inside the cgroup2 mount {mount}\nhint: set cgroup_root to a path under {mount}, or relative to it"
    )]
    OutsideMount { path: PathBuf, mount: PathBuf },
    #[error(
        "cannot create cgroup {path}: {source}\nhint: run as root (or with CAP_SYS_ADMIN) so the agent can create its host-mode slice"
    )]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cgroup root {path} does not exist\nhint: create it, or set cgroup_root: auto")]
    Missing { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Find the cgroup2 mount point. Hybrid hosts mount v1 controllers at
/// /sys/fs/cgroup and v2 at /sys/fs/cgroup/unified, so never assume a path.
/// `near`: an absolute `cgroup_root`; the cgroup2 mount that holds it wins
/// (in a DaemonSet the host's hierarchy is a hostPath at /host/cgroup,
/// beside the container's own at /sys/fs/cgroup).
pub fn cgroup2_mount(near: Option<&Path>) -> Result<PathBuf, CgroupError> {
    let text = fs::read_to_string("/proc/self/mountinfo").map_err(|source| CgroupError::Io {
        path: "/proc/self/mountinfo".into(),
        source,
    })?;
    pick_cgroup2_mount(&text, near).ok_or(CgroupError::NoCgroup2)
}

/// The cgroup2 mount holding `near` (the longest such), else the first.
fn pick_cgroup2_mount(text: &str, near: Option<&Path>) -> Option<PathBuf> {
    let mounts = cgroup2_mounts(text);
    near.and_then(|n| {
        mounts
            .iter()
            .filter(|m| n.starts_with(m))
            .max_by_key(|m| m.as_os_str().len())
            .cloned()
    })
    .or_else(|| mounts.into_iter().next())
}

/// mountinfo lines: `id parent maj:min root mountpoint opts [optional…] - fstype source superopts`.
fn cgroup2_mounts(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            if fstype != "cgroup2" {
                return None;
            }
            let mount = left.split_whitespace().nth(4)?;
            Some(PathBuf::from(unescape_mountinfo(mount)))
        })
        .collect()
}

#[cfg(test)]
fn find_cgroup2_in_mountinfo(text: &str) -> Option<PathBuf> {
    pick_cgroup2_mount(text, None)
}

/// mountinfo escapes space, tab, newline and backslash as octal `\NNN`.
fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v as char);
            i += 4;
            continue;
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

/// Candidate kubelet pod slices, in the order kubelet's drivers create them.
const KUBELET_ROOTS: [&str; 2] = ["kubepods.slice", "kubepods"];
/// Host-mode slice the agent creates when no kubelet slice exists.
pub const HOST_SLICE: &str = "tollgate.slice";

/// The governed subtree.
#[derive(Debug, Clone)]
pub struct CgroupRoot {
    pub mount: PathBuf,
    pub path: PathBuf,
    /// True when the agent chose (and possibly created) the host-mode slice.
    pub host_mode: bool,
}

impl CgroupRoot {
    /// Resolve `cgroup_root` from the config (`auto`, absolute, or relative to the mount).
    pub fn resolve(setting: &str, mount: &Path) -> Result<Self, CgroupError> {
        if setting == "auto" {
            for k in KUBELET_ROOTS {
                let p = mount.join(k);
                if p.is_dir() {
                    return Ok(Self {
                        mount: mount.into(),
                        path: p,
                        host_mode: false,
                    });
                }
            }
            let p = mount.join(HOST_SLICE);
            fs::create_dir_all(&p).map_err(|source| CgroupError::Create {
                path: p.clone(),
                source,
            })?;
            return Ok(Self {
                mount: mount.into(),
                path: p,
                host_mode: true,
            });
        }
        let p = if Path::new(setting).is_absolute() {
            PathBuf::from(setting)
        } else {
            mount.join(setting)
        };
        if !p.starts_with(mount) {
            return Err(CgroupError::OutsideMount {
                path: p,
                mount: mount.into(),
            });
        }
        if !p.is_dir() {
            if p.file_name().is_some_and(|n| n == HOST_SLICE) {
                fs::create_dir_all(&p).map_err(|source| CgroupError::Create {
                    path: p.clone(),
                    source,
                })?;
            } else {
                return Err(CgroupError::Missing { path: p });
            }
        }
        let host_mode = !KUBELET_ROOTS.iter().any(|k| p.ends_with(k));
        Ok(Self {
            mount: mount.into(),
            path: p,
            host_mode,
        })
    }

    /// Path relative to the governed root (for opt-out globs and display).
    pub fn relative<'a>(&self, p: &'a Path) -> &'a Path {
        p.strip_prefix(&self.path).unwrap_or(p)
    }

    /// Path relative to the cgroup2 mount, as `/proc/<pid>/cgroup` shows it.
    pub fn from_mount<'a>(&self, p: &'a Path) -> &'a Path {
        p.strip_prefix(&self.mount).unwrap_or(p)
    }
}

/// The id the kernel reports for the cgroup at `path`.
pub fn cgroup_id(path: &Path) -> std::io::Result<u64> {
    Ok(fs::metadata(path)?.ino())
}

/// One cgroup of the governed subtree.
#[derive(Debug, Clone)]
pub struct CgroupEntry {
    pub id: u64,
    pub path: PathBuf,
    pub pids: Vec<u32>,
}

/// Walk `root` (inclusive). Cgroups that vanish mid-walk are skipped: pods
/// come and go while we look. Depth is bounded so a pathological tree cannot
/// make the scan unbounded; kubelet trees are 4 deep.
pub fn walk(root: &Path) -> Vec<CgroupEntry> {
    const MAX_DEPTH: usize = 16;
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(id) = cgroup_id(&dir) else { continue };
        let pids = read_pids(&dir);
        if depth < MAX_DEPTH
            && let Ok(rd) = fs::read_dir(&dir)
        {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
        out.push(CgroupEntry {
            id,
            path: dir,
            pids,
        });
    }
    out
}

/// The cgroup under `root` that process `pid` is directly in, if any: the
/// agent's own, when it runs inside the governed subtree (as a DaemonSet
/// pod under `kubepods` does). `pid` as this process sees it: with the
/// node's PID namespace (hostPID), the pid `cgroup.procs` lists.
pub fn own_cgroup(root: &Path, pid: u32) -> Option<CgroupEntry> {
    walk(root).into_iter().find(|e| e.pids.contains(&pid))
}

/// Processes directly in the cgroup (not its children).
pub fn read_pids(dir: &Path) -> Vec<u32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Find the path of cgroup `id` under `root`.
pub fn find_by_id(root: &Path, id: u64) -> Option<PathBuf> {
    walk(root).into_iter().find(|e| e.id == id).map(|e| e.path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_hybrid_host() {
        let mi = "\
25 1 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
30 25 0:27 / /sys/fs/cgroup/cpu rw,relatime shared:5 - cgroup cgroup rw,cpu
33 25 0:30 / /sys/fs/cgroup/unified rw,relatime shared:7 - cgroup2 cgroup2 rw
";
        assert_eq!(
            find_cgroup2_in_mountinfo(mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_cgroup2_on_unified_host_and_unescapes() {
        let mi = "29 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            find_cgroup2_in_mountinfo(mi),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let mi = "29 23 0:26 / /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_cgroup2_in_mountinfo(mi),
            Some(PathBuf::from("/mnt/my cg"))
        );
        assert_eq!(
            find_cgroup2_in_mountinfo("1 0 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }

    #[test]
    fn the_mount_holding_an_absolute_root_wins() {
        // A DaemonSet pod: its own cgroup namespace at /sys/fs/cgroup, the
        // host's hierarchy as a hostPath at /host/cgroup.
        let mi = "\
29 23 0:26 / /sys/fs/cgroup ro - cgroup2 cgroup2 rw
41 23 0:26 / /host/cgroup ro - cgroup2 cgroup2 rw
";
        assert_eq!(
            pick_cgroup2_mount(mi, Some(Path::new("/host/cgroup/kubepods.slice"))),
            Some(PathBuf::from("/host/cgroup"))
        );
        assert_eq!(
            pick_cgroup2_mount(mi, Some(Path::new("/elsewhere"))),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            pick_cgroup2_mount(mi, None),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn walk_lists_tree_with_ids() {
        let d = tempfile::tempdir().unwrap();
        let leaf = d.path().join("a/b");
        fs::create_dir_all(&leaf).unwrap();
        fs::write(leaf.join("cgroup.procs"), "12\n34\n").unwrap();
        let entries = walk(d.path());
        assert_eq!(entries.len(), 3);
        let b = entries.iter().find(|e| e.path == leaf).unwrap();
        assert_eq!(b.pids, vec![12, 34]);
        assert_eq!(find_by_id(d.path(), b.id), Some(leaf));
    }

    #[test]
    fn resolve_rejects_outside_and_missing() {
        let d = tempfile::tempdir().unwrap();
        let e = CgroupRoot::resolve("/etc", d.path()).unwrap_err();
        assert!(matches!(e, CgroupError::OutsideMount { .. }));
        let e = CgroupRoot::resolve("nope.slice", d.path()).unwrap_err();
        assert!(e.to_string().contains("does not exist"));
        let r = CgroupRoot::resolve("auto", d.path()).unwrap();
        assert!(r.host_mode && r.path.ends_with(HOST_SLICE));
        fs::create_dir(d.path().join("kubepods.slice")).unwrap();
        let r = CgroupRoot::resolve("auto", d.path()).unwrap();
        assert!(!r.host_mode);
    }
}
