//! A real `redis-server` (Debian package) for the shared-state tests,
//! listening on a unix socket only: reachable from every test node's agent
//! (they share the file system, not a network), reachable from nowhere else.
use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use crate::process::{Proc, wait_until};

pub struct RedisServer {
    proc: Option<Proc>,
    pub socket: PathBuf,
    dir: PathBuf,
}

impl RedisServer {
    pub fn start(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tgt-redis-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("redis.sock");
        let proc = Proc::spawn(
            "redis-server",
            Command::new("redis-server")
                .args([
                    "--port",
                    "0",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--unixsocketperm",
                    "700",
                ])
                .arg("--unixsocket")
                .arg(&socket)
                .arg("--dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        let up = wait_until(Duration::from_secs(5), || socket.exists().then_some(()));
        assert!(
            up.is_some(),
            "redis-server did not start (is the redis-server package installed? `cargo xtask setup`)"
        );
        Self {
            proc: Some(proc),
            socket,
            dir,
        }
    }

    /// `unix://…`, for `state.redis_url`.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Kill it now (the outage case).
    pub fn stop(&mut self) {
        self.proc.take();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.proc.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
