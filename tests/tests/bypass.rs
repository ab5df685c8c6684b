//! Skipping the kernel hooks, attacked from a pod: a socket carrying the
//! agent's own socket mark is still redirected (the agent is recognised by
//! its cgroup, which no pod can join), and UDP to a provider address (QUIC,
//! HTTP/3) is refused so clients fall back to TCP. Asserted on what the far
//! side received: the mock's peer, and datagrams at the provider address.
use std::time::Duration;

use tollgate_tests::{
    node::governed_node,
    node::{PROVIDER_PORT, Route, UPSTREAM_V4, UPSTREAM_V6, route},
    pod::curl_answer,
};

/// The mark the agent is configured to put on its own connections: what a
/// hostile pod would copy.
const AGENT_MARK: u32 = 21575;

/// An HTTP/1.0 GET over a socket with SO_MARK set (the pod runs as root:
/// CAP_NET_ADMIN and CAP_NET_RAW), printed like `curl -w CURL_ENDS`.
const MARKED_CLIENT: &str = r#"
import socket, sys
ip, port, mark = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
s.settimeout(5)
s.connect((ip, port))
s.sendall(b"GET /v1/models HTTP/1.0\r\nHost: api.openai.com\r\n\r\n")
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
local = s.getsockname()
body = data.split(b"\r\n\r\n", 1)[1].decode()
sys.stdout.write(body + "\n" + local[0] + " " + str(local[1]))
"#;

#[test]
fn a_socket_with_the_agents_mark_is_still_redirected() {
    let Some(node) = governed_node(
        "a_socket_with_the_agents_mark_is_still_redirected",
        1,
        &format!("proxy: {{socket_mark: {AGENT_MARK}}}"),
    ) else {
        return;
    };
    let out = node.pods[0].python(
        MARKED_CLIENT,
        &[
            UPSTREAM_V4,
            &PROVIDER_PORT.to_string(),
            &AGENT_MARK.to_string(),
        ],
    );
    let answer = curl_answer(out.as_bytes()).unwrap();
    assert_eq!(
        route(&answer),
        Route::Agent,
        "a marked socket skipped the agent: {answer}"
    );
    let recs = node.wait_connections(1);
    assert_eq!(recs[0]["comm"], "python3", "{recs:?}");
}

/// Send one datagram with `sendto` and one over a connected socket to
/// (`ip`, `port`); print what each did: `sent` or `refused` (EPERM).
const UDP_CLIENT: &str = r#"
import socket, sys
ip, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in ip else socket.AF_INET
done = []
for connected in (False, True):
    u = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if connected:
            u.connect((ip, port))
            u.send(b"quic initial")
        else:
            u.sendto(b"quic initial", (ip, port))
        done.append("sent")
    except PermissionError:
        done.append("refused")
print(" ".join(done))
"#;

#[test]
fn udp_to_a_provider_address_is_refused() {
    let Some(node) = governed_node("udp_to_a_provider_address_is_refused", 1, "") else {
        return;
    };
    // What the provider's addresses receive over UDP: on the provider port,
    // and on a port no provider uses.
    let quic4 = node
        .upstream
        .bind_udp(&format!("{UPSTREAM_V4}:{PROVIDER_PORT}"));
    let quic6 = node
        .upstream
        .bind_udp(&format!("[{UPSTREAM_V6}]:{PROVIDER_PORT}"));
    let other = node.upstream.bind_udp(&format!("{UPSTREAM_V4}:4433"));
    let pod = &node.pods[0];
    let send = |ip: &str, port: u16| {
        pod.python(UDP_CLIENT, &[ip, &port.to_string()])
            .trim()
            .to_string()
    };
    assert_eq!(send(UPSTREAM_V4, PROVIDER_PORT), "refused refused");
    assert_eq!(send(UPSTREAM_V6, PROVIDER_PORT), "refused refused");
    assert_eq!(
        send(UPSTREAM_V4, 4433),
        "sent sent",
        "other UDP is untouched"
    );

    let received = |s: &std::net::UdpSocket| {
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut n = 0;
        let mut buf = [0u8; 64];
        while s.recv(&mut buf).is_ok() {
            n += 1;
        }
        n
    };
    assert_eq!(received(&other), 2, "the control datagrams arrived");
    assert_eq!(
        received(&quic4),
        0,
        "a datagram reached the provider (IPv4)"
    );
    assert_eq!(
        received(&quic6),
        0,
        "a datagram reached the provider (IPv6)"
    );
    let m = node.metrics();
    assert!(
        m.contains("tollgate_ebpf_events{event=\"refused_udp\"} 4"),
        "{m}"
    );
}
