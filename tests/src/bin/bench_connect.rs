//! Times connect() in a loop; run by `tollgate-bench` inside a test pod.
//!
//! Usage: tollgate-bench-connect (local | ADDR:PORT) COUNT
//! `local`: connect to a listener on 127.0.0.1 that a child process of
//! this one accepts on (as the proxy accepts in the agent for a redirected
//! connect: the timing process does no accepting in either case).
//! Prints one JSON object: count, p50_ns, p90_ns, p99_ns, mean_ns, errors.
//!
//! Internal: tollgate-bench-connect accept — listen on 127.0.0.1:0, print
//! the port, accept until stdin closes.
use std::{
    io::{BufRead, BufReader, Read},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

fn main() {
    let mut args = std::env::args().skip(1);
    let target = args.next().expect("target: local or ADDR:PORT");
    if target == "accept" {
        accept();
        return;
    }
    let count: usize = args.next().and_then(|c| c.parse().ok()).expect("COUNT");
    let (addr, _acceptor) = if target == "local" {
        let (addr, child) = local_listener();
        (addr, Some(Acceptor(child)))
    } else {
        (target.parse::<SocketAddr>().expect("ADDR:PORT"), None)
    };
    let mut samples = Vec::with_capacity(count);
    let mut errors = 0usize;
    // Bounded by count and by time (60 s), whichever comes first.
    let deadline = Instant::now() + Duration::from_secs(60);
    for _ in 0..count {
        if Instant::now() > deadline {
            break;
        }
        let t = Instant::now();
        match TcpStream::connect(addr) {
            Ok(s) => {
                samples.push(t.elapsed().as_nanos() as u64);
                // RST on close: no TIME_WAIT pile-up across thousands of connects.
                let _ = socket_linger0(&s);
            }
            Err(_) => errors += 1,
        }
    }
    samples.sort_unstable();
    let pct = |p: f64| {
        samples
            .get(((samples.len() as f64 * p) as usize).min(samples.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let mean = if samples.is_empty() {
        0
    } else {
        samples.iter().sum::<u64>() / samples.len() as u64
    };
    println!(
        "{{\"count\":{},\"p50_ns\":{},\"p90_ns\":{},\"p99_ns\":{},\"mean_ns\":{mean},\"errors\":{errors}}}",
        samples.len(),
        pct(0.50),
        pct(0.90),
        pct(0.99)
    );
}

/// The accepting child, killed when the timing ends.
struct Acceptor(Child);

impl Drop for Acceptor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `accept` in a child process; the address it listens on.
fn local_listener() -> (SocketAddr, Child) {
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .arg("accept")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the accepting child");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("child stdout"))
        .read_line(&mut line)
        .expect("the child's port");
    let port: u16 = line.trim().parse().expect("a port");
    (SocketAddr::from(([127, 0, 0, 1], port)), child)
}

/// The child: listen, print the port, accept until the parent goes.
fn accept() {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind local listener");
    // std listens with a backlog of 128; a full accept queue drops SYNs
    // and turns a 10 µs connect into a 1 s retry. listen() again raises it.
    // SAFETY: valid listening fd.
    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 4096) };
    println!("{}", l.local_addr().unwrap().port());
    // Ends with the parent: its stdin closes, or the parent kills it.
    std::thread::spawn(|| {
        let _ = std::io::stdin().read(&mut [0u8; 1]);
        std::process::exit(0);
    });
    // Wait for the client's reset before dropping: the side that closes
    // first sits in TIME_WAIT, and a later connect reusing that 4-tuple
    // stalls a second on SYN retry. The client closes with RST, so neither
    // side waits.
    for mut s in l.incoming().flatten() {
        let _ = s.read(&mut [0u8; 1]);
    }
}

fn socket_linger0(s: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and a pointer to an initialised linger struct with its size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
