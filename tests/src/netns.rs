//! Network namespaces as guards, and commands run inside them.
use std::{
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt},
    process::{Command, Output},
};

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> Self {
        // A leftover from a killed run would make `add` fail: remove it first.
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run_ok(Command::new("ip").args(["netns", "add", name]));
        let ns = Netns { name: name.into() };
        ns.ip("link set lo up");
        ns
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// `ip -n <ns> <args>` (whitespace-separated), asserting success.
    pub fn ip(&self, args: &str) {
        let mut c = Command::new("ip");
        c.arg("-n").arg(&self.name).args(args.split_whitespace());
        run_ok(&mut c);
    }

    /// `sysctl -w` inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let mut c = self.command("sh");
        c.args(["-c", &format!("echo {value} > {path}")]);
        run_ok(&mut c);
    }

    /// Wait up to `timeout` until a UDP socket listens on `addr` (`ip:port`)
    /// here, e.g. a DNS server that has started.
    pub fn wait_udp_listener(&self, addr: &str, timeout: std::time::Duration) -> bool {
        crate::process::wait_until(timeout, || {
            let out = self.command("ss").args(["-Hlun"]).output().ok()?;
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.split_whitespace().nth(3) == Some(addr))
                .then_some(())
        })
        .is_some()
    }

    /// A TCP listener bound inside this namespace by the calling process
    /// (a socket stays in the namespace it was created in, whichever thread
    /// later serves it): for test servers the namespace's processes reach.
    pub fn bind_tcp(&self, addr: &str) -> std::net::TcpListener {
        let addr = addr.to_string();
        self.enter(move || std::net::TcpListener::bind(&addr).expect("bind in netns"))
    }

    /// A UDP socket bound inside this namespace, like `bind_tcp`.
    pub fn bind_udp(&self, addr: &str) -> std::net::UdpSocket {
        let addr = addr.to_string();
        self.enter(move || std::net::UdpSocket::bind(&addr).expect("bind in netns"))
    }

    /// Run `f` on a thread of its own that has entered this namespace (the
    /// test's other threads stay where they are).
    fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            let ns = File::open(&path).expect("netns file exists");
            assert_eq!(
                unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
                0,
                "setns {path}"
            );
            f()
        })
        .join()
        .expect("netns thread")
    }

    /// A command that will run inside this namespace. Entered with setns(2)
    /// only: unlike `ip netns exec` it keeps the mount namespace, so the
    /// cgroup2 and bpffs mounts stay visible.
    pub fn command(&self, program: &str) -> Command {
        self.command_in_cgroup(program, None)
    }

    /// Same, and the child moves itself into `cgroup` before exec, so its
    /// very first connect() already runs under the cgroup's programs.
    pub fn command_in_cgroup(&self, program: &str, cgroup: Option<&std::path::Path>) -> Command {
        let ns = File::open(self.path()).expect("netns file exists");
        let procs = cgroup.map(|c| {
            std::ffi::CString::new(c.join("cgroup.procs").to_string_lossy().as_bytes()).unwrap()
        });
        let mut cmd = Command::new(program);
        unsafe {
            cmd.pre_exec(move || {
                // Only async-signal-safe calls here (we are between fork and exec).
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(path) = &procs {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let mut buf = [0u8; 16];
                    let n = fmt_u32(libc::getpid() as u32, &mut buf);
                    let w = libc::write(fd, buf.as_ptr().cast(), n);
                    libc::close(fd);
                    if w < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd
    }
}

/// Format without allocating (allocation is not async-signal-safe).
fn fmt_u32(mut v: u32, buf: &mut [u8; 16]) -> usize {
    let mut tmp = [0u8; 10];
    let mut i = 0;
    loop {
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        i += 1;
        if v == 0 {
            break;
        }
    }
    for j in 0..i {
        buf[j] = tmp[i - 1 - j];
    }
    i
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_pids() {
        let mut b = [0u8; 16];
        let n = super::fmt_u32(40213, &mut b);
        assert_eq!(&b[..n], b"40213");
        let n = super::fmt_u32(0, &mut b);
        assert_eq!(&b[..n], b"0");
    }
}
