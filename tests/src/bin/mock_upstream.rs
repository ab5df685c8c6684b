//! Mock provider endpoint for the test node, on hyper (HTTP/1.1 keep-alive
//! and, over TLS, h2 by ALPN, as real providers offer).
//!
//! * LLM calls (`mock_llm::respond`) get the providers' wire formats, pieces
//!   flushed one at a time, and the faults the tests ask for by model.
//! * Any other request gets JSON naming the TCP peer it saw, the address it
//!   was reached on, the request line, the Host (or h2 authority) and, over
//!   TLS, the server name: what the redirect tests check (a relayed
//!   connection arrives from the node's address, a direct one from the pod's).
//!
//! Every request it receives is also written as one JSON line to the
//! `--log` file (peer, listener, request line, host, server name, the
//! credential and model that arrived): the provider's own record, for
//! tests that must assert on what reached the provider.
//!
//! Usage: tollgate-mock-upstream [--cert PEM --key PEM] [--log FILE] ADDR:PORT... [tls:ADDR:PORT...]
//! `tls:` listeners speak TLS with the given certificate; the others speak
//! TLS to clients that start with a ClientHello (when a certificate is given;
//! else they answer it with a TLS alert) and plain HTTP to the rest.
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    Request, Response,
    body::{Bytes, Frame, Incoming},
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::{io::AsyncWriteExt, net::TcpListener};
use tokio_rustls::TlsAcceptor;
use tollgate_tests::mock_llm::{self, Fault, SENT_NS};

type Body = BoxBody<Bytes, std::io::Error>;

/// The test service account's key (`--google-sa-key`), read when a token
/// is asked for (a test writes it after the mock started).
static GOOGLE_SA_KEY: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// The `--log` file: one JSON line per request received.
static REQUEST_LOG: std::sync::OnceLock<std::sync::Mutex<std::fs::File>> =
    std::sync::OnceLock::new();

fn log_request(entry: &serde_json::Value) {
    use std::io::Write;
    if let Some(f) = REQUEST_LOG.get() {
        let mut f = f.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = writeln!(f, "{entry}");
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (mut cert, mut key, mut addrs) = (None, None, Vec::new());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--cert" => cert = args.next(),
            "--key" => key = args.next(),
            "--google-sa-key" => {
                let path = args.next().expect("--google-sa-key takes a file");
                let _ = GOOGLE_SA_KEY.set(path.into());
            }
            "--log" => {
                let path = args.next().expect("--log takes a file");
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .unwrap_or_else(|e| panic!("open {path}: {e}"));
                let _ = REQUEST_LOG.set(std::sync::Mutex::new(f));
            }
            _ => addrs.push(a),
        }
    }
    assert!(
        !addrs.is_empty(),
        "usage: tollgate-mock-upstream [--cert PEM --key PEM] [--log FILE] ADDR:PORT... [tls:ADDR:PORT...]"
    );
    let acceptor = cert.zip(key).map(|(c, k)| {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&c)
            .expect("cert file")
            .collect::<Result<_, _>>()
            .expect("cert PEM");
        let key = PrivateKeyDer::from_pem_file(&k).expect("key PEM");
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("certificate and key match");
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        TlsAcceptor::from(Arc::new(cfg))
    });
    let mut tasks = Vec::new();
    for spec in addrs {
        let (always_tls, addr) = match spec.strip_prefix("tls:") {
            Some(a) => (true, a.to_string()),
            None => (false, spec),
        };
        assert!(
            !always_tls || acceptor.is_some(),
            "tls: listeners need --cert and --key"
        );
        let tls = acceptor.clone();
        let addr: SocketAddr = addr
            .parse()
            .unwrap_or_else(|e| panic!("bad address {addr}: {e}"));
        let l = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((s, peer)) = l.accept().await else {
                    continue;
                };
                let _ = s.set_nodelay(true);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let mut first = [0u8; 1];
                    let hello = s
                        .peek(&mut first)
                        .await
                        .is_ok_and(|n| n == 1 && first[0] == 0x16);
                    match tls.filter(|_| always_tls || hello) {
                        Some(acc) => {
                            if let Ok(t) = acc.accept(s).await {
                                let sni = t.get_ref().1.server_name().map(str::to_owned);
                                serve(t, peer, addr, Some(sni.unwrap_or_default())).await;
                            }
                        }
                        // A ClientHello on a plaintext-only listener: a
                        // handshake_failure alert, so the client fails fast.
                        None if hello => {
                            let mut s = s;
                            let _ = s
                                .write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28])
                                .await;
                        }
                        None => serve(s, peer, addr, None).await,
                    }
                });
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn serve<S>(io: S, peer: SocketAddr, local: SocketAddr, sni: Option<String>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| answer(req, peer, local, sni.clone()));
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(io), svc)
        .await;
}

async fn answer(
    req: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
    sni: Option<String>,
) -> Result<Response<Body>, Infallible> {
    if req.uri().path().starts_with("/v1/realtime") && req.headers().contains_key("upgrade") {
        // `model=mock-late`: the 101 comes only after 30 s.
        if req
            .uri()
            .query()
            .is_some_and(|q| q.contains("model=mock-late"))
        {
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
        }
        return Ok(realtime(req, peer, local, sni));
    }
    if req.uri().path().starts_with("/model/") {
        return Ok(bedrock(req, peer, sni).await);
    }
    let p = req.uri().path();
    let token_post = matches!(p, "/token" | "/sts" | "/v1/token")
        || p.ends_with("/oauth2/v2.0/token")
        || p.ends_with(":generateAccessToken");
    let metadata = p.starts_with("/computeMetadata/");
    if (token_post && req.method() == hyper::Method::POST) || metadata {
        return Ok(token_service(req, peer, local).await);
    }
    let line = format!(
        "{} {} {:?}",
        req.method(),
        req.uri().path_and_query().map_or("/", |p| p.as_str()),
        req.version()
    );
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    let authorization = req.headers().contains_key("authorization");
    let req_headers = req.headers().clone();
    // The credential the provider received (test keys only), for injection tests.
    let credential = ["authorization", "x-api-key", "api-key", "x-goog-api-key"]
        .iter()
        .find_map(|h| req.headers().get(*h)?.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_default();
    // A token this mock issued must still be valid, as Google checks.
    let token_valid = tollgate_tests::mock_google::valid(&credential)
        .or_else(|| tollgate_tests::mock_entra::valid(&credential));
    let api_key = req.headers().contains_key("api-key");
    // 64 MiB bounds a misbehaving client (the abuse tests send 30 MiB).
    let body = http_body_util::Limited::new(req.into_body(), 64 << 20)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let parsed = serde_json::from_slice::<serde_json::Value>(&body).ok();
    let model = parsed.as_ref().and_then(|v| v.get("model").cloned());
    let stream_options = parsed
        .as_ref()
        .and_then(|v| v.get("stream_options").cloned());
    log_request(&serde_json::json!({
        "request": line,
        "peer": peer.to_string(),
        "local": local.to_string(),
        "host": host,
        "sni": sni,
        "credential": credential,
        "model": model,
        "stream_options": stream_options,
        "body_bytes": body.len(),
        "token_valid": token_valid,
        "api_key": api_key,
    }));
    if token_valid == Some(false) {
        let e = serde_json::json!({"error": {"code": 401, "status": "UNAUTHENTICATED",
            "message": "Request had invalid authentication credentials (the token expired)."}});
        return Ok(Response::builder()
            .status(401)
            .header("content-type", "application/json")
            .body(
                Full::new(Bytes::from(e.to_string()))
                    .map_err(|n| match n {})
                    .boxed(),
            )
            .unwrap());
    }
    if let Some(resp) = mock_llm::respond(&path, &body) {
        if resp.fault == mock_llm::Fault::LateHeaders {
            // `mock-late`: the response headers come only after a long think.
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
        }
        if resp.fault == mock_llm::Fault::Think {
            tokio::time::sleep(mock_llm::THINK).await;
        }
        // What arrived, for tests of policy rewrites: the model and output
        // limits the provider was asked for, and whether a key came along.
        let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let mut echo = vec![("x-mock-credential", credential)];
        for (h, name) in [
            ("x-mock-openai-project", "openai-project"),
            ("x-mock-drop-me", "x-drop-me"),
        ] {
            if let Some(v) = req_headers.get(name).and_then(|v| v.to_str().ok()) {
                echo.push((h, v.to_string()));
            }
        }
        for (h, field) in [
            ("x-mock-model", "model"),
            ("x-mock-max-tokens", "max_tokens"),
            ("x-mock-max-completion-tokens", "max_completion_tokens"),
        ] {
            if let Some(v) = req.get(field).filter(|v| !v.is_null()) {
                echo.push((h, v.to_string().trim_matches('"').to_string()));
            }
        }
        return Ok(stream(resp, echo));
    }
    let echo = serde_json::json!({
        "peer": peer.to_string(),
        "peer_ip": peer.ip().to_string(),
        "local": local.to_string(),
        "request": line,
        "host": host,
        "sni": sni,
        "saw_authorization": authorization,
    })
    .to_string();
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(echo)).map_err(|n| match n {}).boxed())
        .unwrap())
}

/// The token services: Google's (`mock_google`: the OAuth endpoint's JWT
/// bearer grant, STS, IAM Credentials' impersonation, the metadata
/// server), AWS STS (`mock_bedrock::sts`, AssumeRoleWithWebIdentity) and
/// Entra ID's (`mock_entra`, the client credentials grant); each grant
/// recorded with what it issued.
async fn token_service(
    req: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
) -> Response<Body> {
    use tollgate_tests::mock_google as google;
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let header = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (authorization, flavor) = (header("authorization"), header("metadata-flavor"));
    let body = http_body_util::Limited::new(req.into_body(), 1 << 20)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let json = |(status, answer): (u16, serde_json::Value)| {
        let issued = match &answer["accessToken"] {
            serde_json::Value::Null => answer["access_token"].clone(),
            impersonated => impersonated.clone(),
        };
        let refused = answer["error_description"].clone();
        (
            status,
            "application/json",
            answer.to_string(),
            issued,
            refused,
        )
    };
    let (status, content_type, answer, issued, refused) = match path.as_str() {
        p if p.starts_with("/computeMetadata/") => {
            json(google::metadata_token(p, flavor.as_deref()))
        }
        "/v1/token" => json(google::sts_exchange(&body)),
        p if p.ends_with(":generateAccessToken") => {
            json(google::impersonate(p, authorization.as_deref(), &body))
        }
        "/token" => {
            let key = GOOGLE_SA_KEY.get().and_then(|p| std::fs::read(p).ok());
            let audience = format!("https://{}/token", local.ip());
            json(tollgate_tests::mock_google::grant(
                &body,
                key.as_deref(),
                &audience,
            ))
        }
        "/sts" => {
            let (status, xml, issued) = tollgate_tests::mock_bedrock::sts(&body);
            (
                status,
                "text/xml",
                xml,
                issued.into(),
                serde_json::Value::Null,
            )
        }
        _ => json(tollgate_tests::mock_entra::grant(&path, &body)),
    };
    log_request(&serde_json::json!({
        "request": format!("{method} {path}"),
        "peer": peer.to_string(),
        "token_grant": status == 200,
        "issued": issued,
        "refused": refused,
    }));
    let mut resp = Response::builder()
        .status(status)
        .header("content-type", content_type);
    if path.starts_with("/computeMetadata/") {
        resp = resp.header("metadata-flavor", "Google");
    }
    resp.body(
        Full::new(Bytes::from(answer))
            .map_err(|n| match n {})
            .boxed(),
    )
    .unwrap()
}

/// The Bedrock runtime (`mock_bedrock`): the signature checked as AWS
/// would, then Bedrock's answer for the action; recorded with the access key
/// that signed it (or why the signature failed) and the model.
async fn bedrock(req: Request<Incoming>, peer: SocketAddr, sni: Option<String>) -> Response<Body> {
    use tollgate_tests::mock_bedrock as b;
    let (parts, body) = req.into_parts();
    let body = http_body_util::Limited::new(body, 64 << 20)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let authority = parts.uri.authority().map(|a| a.to_string());
    let signed = b::verify(
        parts.method.as_str(),
        &path,
        &parts.headers,
        authority.as_deref(),
        &body,
    );
    let header = |n: &str| {
        parts
            .headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let call = b::call(&path);
    let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    log_request(&serde_json::json!({
        "request": format!("{} {path} {:?}", parts.method, parts.version),
        "peer": peer.to_string(),
        "sni": sni,
        "host": header("host").or(authority.clone()),
        "bedrock": call.as_ref().map(|c| c.action),
        "model": call.as_ref().map(|c| c.model.clone()),
        "signed_by": signed.as_ref().ok(),
        "signature_error": signed.as_ref().err(),
        "credential": header("authorization").filter(|a| a.starts_with("Bearer ")),
        "max_tokens": parsed.pointer("/inferenceConfig/maxTokens").or(parsed.get("max_tokens")),
        "body_bytes": body.len(),
    }));
    let json = |status: u16, v: serde_json::Value, extra: &[(&str, String)]| {
        let mut r = Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .header("x-amzn-requestid", "mock-bedrock-request-1");
        for (k, v) in extra {
            r = r.header(*k, v.as_str());
        }
        r.body(
            Full::new(Bytes::from(v.to_string()))
                .map_err(|n| match n {})
                .boxed(),
        )
        .unwrap()
    };
    // A Bedrock API key (Bearer) is taken as it comes: the tests' keys.
    let bearer = header("authorization").is_some_and(|a| a.starts_with("Bearer ABSK"));
    if let (Err(why), false) = (&signed, bearer) {
        let err = serde_json::json!({"message": why});
        return json(403, err, &[("x-amzn-errortype", "InvalidSignatureException:http://internal.amazon.com/coral/com.amazon.coral.service/".into())]);
    }
    let Some(call) = call else {
        return json(
            404,
            serde_json::json!({"message": "unknown operation"}),
            &[],
        );
    };
    if call.model == b::THROTTLED {
        let err =
            serde_json::json!({"message": "Too many requests, please wait before trying again."});
        return json(
            429,
            err,
            &[(
                "x-amzn-errortype",
                "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/".into(),
            )],
        );
    }
    let frames = match call.action {
        "converse" => return json(200, b::converse_json(), &[]),
        "invoke" => {
            let counts = [
                (
                    "x-amzn-bedrock-input-token-count",
                    b::INPUT_TOKENS.to_string(),
                ),
                (
                    "x-amzn-bedrock-output-token-count",
                    b::OUTPUT_TOKENS.to_string(),
                ),
                (
                    "x-amzn-bedrock-cache-read-input-token-count",
                    b::CACHED_TOKENS.to_string(),
                ),
            ];
            return json(200, b::invoke_json(&call.model), &counts);
        }
        "converse-stream" => b::converse_stream(),
        "invoke-with-response-stream" => b::invoke_stream(&call.model),
        _ => {
            return json(
                404,
                serde_json::json!({"message": "unknown operation"}),
                &[],
            );
        }
    };
    let chunks = futures::stream::iter(
        frames
            .into_iter()
            .map(|f| Ok::<_, std::io::Error>(Frame::data(Bytes::from(f)))),
    );
    Response::builder()
        .status(200)
        .header("content-type", "application/vnd.amazon.eventstream")
        .header("x-amzn-requestid", "mock-bedrock-request-1")
        .body(http_body_util::StreamBody::new(chunks).boxed())
        .unwrap()
}

/// A Realtime session: the WebSocket handshake's answer, and the session
/// served on the upgraded connection (`mock_realtime`).
fn realtime(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
    sni: Option<String>,
) -> Response<Body> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    log_request(&serde_json::json!({
        "request": format!("{} {path} {:?}", req.method(), req.version()),
        "peer": peer.to_string(),
        "local": local.to_string(),
        "host": header("host"),
        "sni": sni,
        "credential": header("authorization"),
        "upgrade": header("upgrade"),
        "extensions": header("sec-websocket-extensions"),
    }));
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(
        header("sec-websocket-key").as_bytes(),
    );
    let model = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix("model="))
        .unwrap_or(tollgate_tests::mock_realtime::REALTIME_MODEL)
        .to_string();
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(io) = upgrade.await {
            tollgate_tests::mock_realtime::serve(TokioIo::new(io), model, |e| log_request(&e))
                .await;
        }
    });
    Response::builder()
        .status(101)
        .header("upgrade", "websocket")
        .header("connection", "Upgrade")
        .header("sec-websocket-accept", accept)
        .header("x-request-id", "req_mock_realtime")
        .body(Full::new(Bytes::new()).map_err(|n| match n {}).boxed())
        .unwrap()
}

/// An LLM answer, written piece by piece as the provider would stream it
/// (no content-length: chunked on h1, DATA frames on h2).
fn stream(resp: mock_llm::MockResponse, echo: Vec<(&'static str, String)>) -> Response<Body> {
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(1);
    tokio::spawn(async move {
        for (i, c) in resp.chunks.into_iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(resp.chunk_delay).await;
            }
            // `mock-timed`: each piece says when it left (CLOCK_MONOTONIC, the
            // same clock in every namespace), so a client can time the relay.
            let c = c.replace(SENT_NS, &mock_llm::monotonic_ns().to_string());
            if tx.send(Frame::data(Bytes::from(c))).await.is_err() {
                return;
            }
        }
        if resp.fault != Fault::None {
            // Let the last piece reach the wire before the fault strikes.
            tokio::time::sleep(resp.chunk_delay).await;
        }
        match resp.fault {
            // Abort: the connection (h1) or stream (h2) ends without its end marker.
            Fault::Cut => tx.abort(std::io::Error::other("mock-cut")),
            Fault::Stall => tokio::time::sleep(std::time::Duration::from_secs(30)).await,
            Fault::None | Fault::LateHeaders | Fault::Think => {}
        }
    });
    let mut r = Response::builder()
        .status(resp.status)
        .header("content-type", resp.content_type)
        .header("x-request-id", "req_mock");
    for (h, v) in echo {
        r = r.header(h, v);
    }
    r.body(body.boxed()).unwrap()
}
