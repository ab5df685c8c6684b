//! The mock provider's Realtime API (`/v1/realtime` over WebSocket), with
//! the real event shapes of OpenAI's GA Realtime API: `session.created`
//! first, `session.updated` for each `session.update`, and for each
//! `response.create` a text response (`response.created`, output text
//! deltas, `response.done` with usage in the Realtime terms). The usage is
//! a constant here, so tests assert that what Tollgate recorded equals
//! what the provider reported.
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, protocol::Role},
};

pub const REALTIME_MODEL: &str = "gpt-realtime-2025-08-28";
/// Each response's usage: 180 input (60 text, 120 audio, 64 of the audio
/// cached), 73 output (13 text, 60 audio).
pub fn response_usage() -> serde_json::Value {
    serde_json::json!({
        "total_tokens": 253, "input_tokens": 180, "output_tokens": 73,
        "input_token_details": {
            "text_tokens": 60, "audio_tokens": 120, "image_tokens": 0, "cached_tokens": 64,
            "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 64, "image_tokens": 0}
        },
        "output_token_details": {"text_tokens": 13, "audio_tokens": 60}
    })
}
pub const RESPONSE_WORDS: [&str; 3] = ["Hi", " over", " realtime"];

/// Serve one upgraded session until the client closes it. `log` gets each
/// client event's type and each response.done sent (the provider's record).
pub async fn serve<S>(io: S, model: String, log: impl Fn(serde_json::Value))
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
    let mut n = 0u64;
    let mut event = |v: serde_json::Value| {
        n += 1;
        let mut v = v;
        v["event_id"] = format!("event_mock_{n}").into();
        Message::text(v.to_string())
    };
    let session = serde_json::json!({
        "type": "realtime", "object": "realtime.session", "id": "sess_mock1",
        "model": model, "output_modalities": ["audio"]
    });
    if ws
        .send(event(
            serde_json::json!({"type": "session.created", "session": session}),
        ))
        .await
        .is_err()
    {
        return;
    }
    let mut responses = 0;
    while let Some(Ok(m)) = ws.next().await {
        let Message::Text(t) = m else {
            if m.is_close() {
                break;
            }
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
        let kind = v["type"].as_str().unwrap_or_default().to_string();
        log(serde_json::json!({"realtime_client_event": kind}));
        let out: Vec<serde_json::Value> = match kind.as_str() {
            "session.update" => {
                let mut s = session.clone();
                if let Some(m) = v["session"]["output_modalities"].as_array() {
                    s["output_modalities"] = m.clone().into();
                }
                vec![serde_json::json!({"type": "session.updated", "session": s})]
            }
            "conversation.item.create" => vec![serde_json::json!({
                "type": "conversation.item.added", "previous_item_id": null, "item": v["item"]
            })],
            "response.create" => {
                responses += 1;
                let id = format!("resp_mock{responses}");
                let text: String = RESPONSE_WORDS.concat();
                let mut out = vec![serde_json::json!({"type": "response.created", "response": {
                    "object": "realtime.response", "id": id, "status": "in_progress", "output": []
                }})];
                for w in RESPONSE_WORDS {
                    out.push(serde_json::json!({
                        "type": "response.output_text.delta", "response_id": id,
                        "item_id": "item_mock", "output_index": 0, "content_index": 0, "delta": w
                    }));
                }
                out.push(serde_json::json!({
                    "type": "response.output_text.done", "response_id": id, "item_id": "item_mock",
                    "output_index": 0, "content_index": 0, "text": text
                }));
                out.push(serde_json::json!({"type": "response.done", "response": {
                    "object": "realtime.response", "id": id, "status": "completed",
                    "output": [{"id": "item_mock", "type": "message", "role": "assistant",
                                "content": [{"type": "output_text", "text": text}]}],
                    "usage": response_usage()
                }}));
                log(serde_json::json!({"realtime_response_done": id}));
                out
            }
            _ => vec![],
        };
        for v in out {
            if ws.send(event(v)).await.is_err() {
                return;
            }
        }
    }
    let _ = ws.close(None).await;
}
