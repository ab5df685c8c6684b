//! The one way the proxy opens a connection to a provider.
use std::{net::SocketAddr, time::Duration};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

/// Why a provider connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connecting to provider {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to provider {addr} timed out after {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
}

/// Connect to the provider with the agent's mark set, so the kernel programs
/// leave this socket alone even if the agent runs inside a governed cgroup.
pub async fn dial(addr: SocketAddr, mark: u32, timeout: Duration) -> Result<TcpStream, DialError> {
    let connect = async {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_mark(mark)?;
        s.set_nonblocking(true)?;
        let std_stream: std::net::TcpStream = s.into();
        TcpSocket::from_std_stream(std_stream).connect(addr).await
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(source)) => Err(DialError::Connect { addr, source }),
        Err(_) => Err(DialError::Timeout {
            addr,
            after: timeout,
        }),
    }
}
