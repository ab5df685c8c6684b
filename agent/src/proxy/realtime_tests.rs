use super::*;

fn req(
    version: Version,
    method: http::Method,
    upgrade: Option<&str>,
    protocol: Option<&'static str>,
) -> Request<()> {
    let mut r = Request::builder().version(version).method(method);
    if let Some(u) = upgrade {
        r = r.header(header::UPGRADE, u);
    }
    let mut r = r.body(()).unwrap();
    if let Some(p) = protocol {
        r.extensions_mut()
            .insert(hyper::ext::Protocol::from_static(p));
    }
    r
}

#[test]
fn handshakes_are_told_apart() {
    use http::Method as M;
    let h1 = Version::HTTP_11;
    let h2 = Version::HTTP_2;
    let cases = [
        (
            req(h1, M::GET, Some("websocket"), None),
            Some(Handshake::Upgrade),
        ),
        (
            req(h1, M::GET, Some("WebSocket"), None),
            Some(Handshake::Upgrade),
        ),
        (req(h1, M::GET, Some("h2c"), None), None),
        (req(h1, M::POST, Some("websocket"), None), None),
        (req(h1, M::GET, None, None), None),
        (
            req(h2, M::CONNECT, None, Some("websocket")),
            Some(Handshake::ExtendedConnect),
        ),
        // A plain CONNECT (a tunnel) or another protocol is no session.
        (req(h2, M::CONNECT, None, None), None),
        (req(h2, M::CONNECT, None, Some("webtransport")), None),
        // An h1 Upgrade header means nothing on h2.
        (req(h2, M::GET, Some("websocket"), None), None),
        (req(h1, M::CONNECT, None, Some("websocket")), None),
    ];
    for (r, want) in cases {
        assert_eq!(handshake(&r), want, "{} {:?}", r.method(), r.version());
    }
}

#[test]
fn the_provider_is_asked_with_an_upgrade_and_never_offered_extensions() {
    let mut client = HeaderMap::new();
    client.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    client.insert(
        header::SEC_WEBSOCKET_KEY,
        HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
    );
    client.insert(
        header::SEC_WEBSOCKET_EXTENSIONS,
        HeaderValue::from_static("permessage-deflate; client_max_window_bits"),
    );
    let mut h1 = client.clone();
    assert_eq!(
        upstream_headers(Handshake::Upgrade, &mut h1, "api.openai.com"),
        None
    );
    assert!(!h1.contains_key(header::SEC_WEBSOCKET_EXTENSIONS));
    assert_eq!(
        h1[header::SEC_WEBSOCKET_KEY],
        "dGhlIHNhbXBsZSBub25jZQ==",
        "the client's own key"
    );

    let mut h2 = HeaderMap::new();
    h2.insert(
        header::SEC_WEBSOCKET_VERSION,
        HeaderValue::from_static("13"),
    );
    h2.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
    h2.insert(
        header::SEC_WEBSOCKET_EXTENSIONS,
        HeaderValue::from_static("permessage-deflate"),
    );
    let key = upstream_headers(Handshake::ExtendedConnect, &mut h2, "api.openai.com").unwrap();
    assert_eq!(h2[header::HOST], "api.openai.com");
    assert_eq!(h2[header::UPGRADE], "websocket");
    assert_eq!(h2[header::CONNECTION], "Upgrade");
    assert_eq!(h2[header::SEC_WEBSOCKET_VERSION], "13");
    assert_eq!(h2[header::SEC_WEBSOCKET_KEY].to_str().unwrap(), key);
    assert_eq!(h2[header::AUTHORIZATION], "Bearer k");
    assert!(!h2.contains_key(header::SEC_WEBSOCKET_EXTENSIONS));
    // A fresh key each time (16 random bytes, base64).
    let again = upstream_headers(Handshake::ExtendedConnect, &mut HeaderMap::new(), "h").unwrap();
    assert_ne!(key, again);
    assert_eq!(key.len(), 24);
}

#[test]
fn an_extended_connect_is_answered_200_without_the_upgrade_headers() {
    let resp = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        .header("x-request-id", "req_1")
        .body(())
        .unwrap();
    let (parts, _) = resp.into_parts();
    let mut h1 = parts.clone();
    client_answer(Handshake::Upgrade, &mut h1);
    assert_eq!(h1.status, StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(h1.headers.len(), 4);
    let mut h2 = parts;
    client_answer(Handshake::ExtendedConnect, &mut h2);
    assert_eq!(h2.status, StatusCode::OK);
    let names: Vec<_> = h2.headers.keys().map(|k| k.as_str()).collect();
    assert_eq!(names, ["x-request-id"]);
}
