//! The one way the proxy opens a connection to a provider: a socket made in
//! the workload's own network namespace (`egress`), connected from there.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use socket2::Domain;
use tokio::net::{TcpSocket, TcpStream};

use crate::{
    egress::{Egress, EgressError},
    netns::WorkloadNetns,
};

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
    #[error("opening a connection to provider {addr}: {source}")]
    Socket {
        addr: SocketAddr,
        source: EgressError,
    },
}

/// Opens provider connections from inside workload namespaces.
pub struct Dialer {
    egress: Egress,
    /// SO_MARK of the agent's own sockets.
    mark: u32,
    timeout: Duration,
}

impl Dialer {
    pub fn new(egress: Egress, mark: u32, timeout: Duration) -> Self {
        Self {
            egress,
            mark,
            timeout,
        }
    }

    /// Connect to `addr` from inside `netns`: the provider sees the
    /// workload's address and the workload's egress rules apply.
    pub async fn dial(
        &self,
        netns: &Arc<WorkloadNetns>,
        addr: SocketAddr,
    ) -> Result<TcpStream, DialError> {
        let connect = async {
            let s = self
                .egress
                .socket(netns, Domain::for_address(addr), self.mark)
                .await
                .map_err(|source| DialError::Socket { addr, source })?;
            let std_stream: std::net::TcpStream = s.into();
            TcpSocket::from_std_stream(std_stream)
                .connect(addr)
                .await
                .map_err(|source| DialError::Connect { addr, source })
        };
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(r) => r,
            Err(_) => Err(DialError::Timeout {
                addr,
                after: self.timeout,
            }),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}
