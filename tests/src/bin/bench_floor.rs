//! The bench's physical floor: the least a Rust TLS interceptor can do — a
//! rustls-terminating byte relay. Each client connection is accepted with
//! the provider's certificate, one upstream TLS connection is opened for it
//! (the provider's name, verified), and bytes are copied both ways until
//! either side closes: no HTTP parsing, no policy, no accounting, no log.
//! What Tollgate costs beyond this row is what LLM awareness costs.
//!
//! Usage: tollgate-bench-floor LISTEN CERT KEY UPSTREAM_ADDR UPSTREAM_NAME UPSTREAM_CA
use std::{net::SocketAddr, sync::Arc};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage =
        "usage: tollgate-bench-floor LISTEN CERT KEY UPSTREAM_ADDR UPSTREAM_NAME UPSTREAM_CA";
    let [listen, cert, key, upstream, name, ca] = args.as_slice() else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN is ADDR:PORT");
    let upstream: SocketAddr = upstream.parse().expect("UPSTREAM_ADDR is ADDR:PORT");
    let name = ServerName::try_from(name.clone()).expect("UPSTREAM_NAME");
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .expect("CERT")
        .map(|c| c.expect("CERT PEM"))
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).expect("KEY");
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("certificate and key");
    server.alpn_protocols = vec![b"http/1.1".to_vec()];

    let acceptor = TlsAcceptor::from(Arc::new(server));
    let connector = tollgate_tests::tls_client::connector(ca, &[b"http/1.1"]);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async move {
            let listener = TcpListener::bind(listen).await.expect("bind LISTEN");
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, connector, name) =
                    (acceptor.clone(), connector.clone(), name.clone());
                tokio::spawn(async move {
                    let _ = relay(tcp, acceptor, connector, upstream, name).await;
                });
            }
        });
}

async fn relay(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    upstream: SocketAddr,
    name: ServerName<'static>,
) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    let mut down = acceptor.accept(tcp).await?;
    let up = TcpStream::connect(upstream).await?;
    up.set_nodelay(true)?;
    let mut up = connector.connect(name, up).await?;
    tokio::io::copy_bidirectional(&mut down, &mut up).await?;
    Ok(())
}
