//! A Realtime client that opens its WebSocket over HTTP/2 with an extended
//! CONNECT (RFC 8441, `:protocol = websocket`), as a workload on hyper's h2
//! client does: one connection (ALPN h2), one stream for the session, and
//! on it the Realtime events — `session.update`, then for each response a
//! user message and `response.create`, reading until `response.done`. It
//! offers permessage-deflate, which must not be negotiated. Prints one JSON
//! line with what it saw: status, ALPN, extensions, texts, error events,
//! how it ended.
//!
//! Usage: tollgate-realtime-h2-client CA HOST MODEL RESPONSES
//! (MODEL `--tunnel`: a plain CONNECT to HOST:443 instead, printing its answer)
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, protocol::Role},
};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [ca, host, model, responses] = args.as_slice() else {
        eprintln!("usage: tollgate-realtime-h2-client CA HOST MODEL RESPONSES");
        std::process::exit(2);
    };
    let responses: usize = responses.parse().expect("RESPONSES is a count");
    let mut seen = json!({"texts": [], "errors": [], "closed": null});
    let run = session(ca, host, model, responses, &mut seen);
    match tokio::time::timeout(Duration::from_secs(30), run).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => seen["closed"] = e.to_string().into(),
        Err(_) => seen["closed"] = "timed out after 30 s".into(),
    }
    println!("{seen}");
}

async fn session(
    ca: &str,
    host: &str,
    model: &str,
    responses: usize,
    seen: &mut Value,
) -> Result<(), Error> {
    // `--tunnel` for MODEL: a plain CONNECT to the host (no :protocol), a
    // tunnel the proxy must refuse.
    let tunnel = model == "--tunnel";
    let tcp = tokio::net::TcpStream::connect((host, 443)).await?;
    let name = ServerName::try_from(host.to_string())?;
    let tls = tollgate_tests::tls_client::connector(ca, &[b"h2"])
        .connect(name, tcp)
        .await?;
    let alpn = tls
        .get_ref()
        .1
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    seen["alpn"] = alpn.into();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    // Extended CONNECT may be sent once the server's SETTINGS allowed it,
    // which can arrive after the handshake: h2 refuses such a request
    // locally, and the client tries again as one waiting for them would.
    let mut tries = 0;
    let resp = loop {
        let uri = match tunnel {
            true => format!("{host}:443"),
            false => format!("https://{host}/v1/realtime?model={model}"),
        };
        let mut req = hyper::Request::builder()
            .method(hyper::Method::CONNECT)
            .version(hyper::Version::HTTP_2)
            .uri(uri)
            .header("authorization", "Bearer sk-test-h2-realtime")
            .header("sec-websocket-version", "13")
            .header(
                "sec-websocket-extensions",
                "permessage-deflate; client_max_window_bits",
            )
            .body(Empty::<Bytes>::new())?;
        if !tunnel {
            req.extensions_mut()
                .insert(hyper::ext::Protocol::from_static("websocket"));
        }
        match sender.send_request(req).await {
            Ok(r) => break r,
            Err(_) if tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    seen["status"] = resp.status().as_u16().into();
    seen["extensions"] = resp
        .headers()
        .get("sec-websocket-extensions")
        .and_then(|v| v.to_str().ok())
        .into();
    if resp.status() != hyper::StatusCode::OK {
        let body = resp.into_body().collect().await?.to_bytes();
        seen["body"] = String::from_utf8_lossy(&body).into_owned().into();
        return Ok(());
    }
    let io = hyper::upgrade::on(resp).await?;
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Client, None).await;
    let send = |v: Value| Message::text(v.to_string());
    ws.send(send(json!({"type": "session.update",
        "session": {"type": "realtime", "output_modalities": ["text"]}})))
        .await?;
    for _ in 0..responses {
        let item = json!({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "Say hi"}]}});
        let asked = async {
            ws.send(send(item)).await?;
            ws.send(send(json!({"type": "response.create"}))).await
        };
        if let Err(e) = asked.await {
            // Closed under us: what the server sent before closing is
            // still to be read.
            seen["send_failed"] = e.to_string().into();
        }
        match read_response(&mut ws, seen).await? {
            Some(text) => seen["texts"].as_array_mut().unwrap().push(text.into()),
            None => return Ok(()),
        }
    }
    ws.close(None).await?;
    Ok(())
}

/// Read events until `response.done` (its text) or the end of the session
/// (None, with how it ended in `closed`).
async fn read_response<S>(
    ws: &mut WebSocketStream<S>,
    seen: &mut Value,
) -> Result<Option<String>, Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut text = String::new();
    loop {
        let t = match ws.next().await {
            None => {
                seen["closed"] = "the server ended the stream".into();
                return Ok(None);
            }
            Some(Err(e)) => {
                seen["closed"] = e.to_string().into();
                return Ok(None);
            }
            Some(Ok(Message::Close(f))) => {
                seen["closed"] = format!("close {f:?}").into();
                return Ok(None);
            }
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(_)) => continue,
        };
        let v: Value = serde_json::from_str(t.as_str())?;
        match v["type"].as_str().unwrap_or_default() {
            "session.created" => seen["session_model"] = v["session"]["model"].clone(),
            "response.output_text.delta" => text += v["delta"].as_str().unwrap_or_default(),
            "error" => seen["errors"]
                .as_array_mut()
                .unwrap()
                .push(v["error"].clone()),
            "response.done" => return Ok(Some(text)),
            _ => {}
        }
    }
}
