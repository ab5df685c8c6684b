//! Kubelet-shaped cgroup v2 trees as guards.
use std::{
    fs,
    path::{Path, PathBuf},
};

/// The cgroup2 mount (hybrid hosts mount it at /sys/fs/cgroup/unified).
pub fn cgroup2_mount() -> PathBuf {
    let mi = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    mi.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            left.split_whitespace().nth(4).map(PathBuf::from)
        })
        .expect("a cgroup2 filesystem is mounted")
}

/// A cgroup subtree removed (processes killed, directories removed bottom-up) on drop.
pub struct CgroupTree {
    pub root: PathBuf,
}

impl CgroupTree {
    pub fn create(root: PathBuf) -> Self {
        let _ = remove_tree(&root);
        fs::create_dir_all(&root).unwrap_or_else(|e| panic!("mkdir {}: {e}", root.display()));
        CgroupTree { root }
    }

    pub fn mkdir(&self, rel: &str) -> PathBuf {
        let p = self.root.join(rel);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        p
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        let _ = remove_tree(&self.root);
    }
}

/// Kill everything in a cgroup subtree and remove it.
pub fn remove_tree(root: &Path) -> std::io::Result<()> {
    if !root.exists() {
        return Ok(());
    }
    let mut dirs = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)?.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
        dirs.push(d);
    }
    // cgroup.kill (5.14+) kills the whole subtree at once.
    let _ = fs::write(root.join("cgroup.kill"), "1");
    for _ in 0..100 {
        let busy = dirs.iter().any(|d| {
            fs::read_to_string(d.join("cgroup.procs")).is_ok_and(|s| !s.trim().is_empty())
        });
        if !busy {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Deepest first.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        let _ = fs::remove_dir(&d);
    }
    Ok(())
}
