"""An app that does not trust the node CA: the official OpenAI SDK with its
defaults, trusting only the provider's own CA (SSL_CERT_FILE is the test
upstream CA). Tollgate relays its calls untouched and reads them at libssl.

  calls             three chat calls (JSON, streamed with usage, streamed
                    without); prints one JSON line with what it received.
  blocked N         N calls; prints "called", waits for a line on stdin,
                    then two more: one on the same (pooled) connection, one
                    on a new connection; prints one JSON line with each
                    outcome.
  local CERT KEY    one provider call (so the process is probed), prints
                    "probed", waits for a line on stdin, then 20 round trips
                    over a TLS connection to itself (not a provider); prints
                    one JSON line.
"""
import json
import socket
import ssl
import sys
import threading

import openai

client = openai.OpenAI(api_key="sk-test-uprobe-openai", max_retries=0, timeout=20)
msgs = [{"role": "user", "content": "Say hello"}]


def streamed(**extra):
    text, usage = "", None
    for chunk in client.chat.completions.create(
        model="gpt-4o-mini", messages=msgs, stream=True, **extra
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage.prompt_tokens
    return text, usage


def calls():
    r = client.chat.completions.create(model="gpt-4o-mini", messages=msgs)
    text, usage = streamed(stream_options={"include_usage": True})
    plain_text, plain_usage = streamed()
    print(json.dumps({
        "content": r.choices[0].message.content,
        "prompt_tokens": r.usage.prompt_tokens,
        "stream_text": text,
        "stream_prompt_tokens": usage,
        "plain_stream_text": plain_text,
        "plain_stream_usage": plain_usage,
    }))


def local(cert, key):
    client.chat.completions.create(model="gpt-4o-mini", messages=msgs)
    print("probed", flush=True)
    sys.stdin.readline()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as s:
            while data := s.recv(4096):
                s.sendall(data)

    t = threading.Thread(target=serve)
    t.start()
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    n = 0
    with client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", port))) as s:
        for i in range(20):
            msg = f"not-a-provider-secret-{i}".encode()
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                got += s.recv(4096)
            n += got == msg
    t.join()
    print(json.dumps({"local_round_trips": n}))


def outcome(call):
    try:
        call()
        return {"ok": True}
    except openai.APIConnectionError as e:
        cause = e.__cause__
        return {"ok": False, "error": type(cause).__name__, "message": str(cause)}


def blocked(n):
    one = lambda: client.chat.completions.create(model="gpt-4o-mini", messages=msgs)
    for _ in range(n):
        one()
    print("called", flush=True)
    sys.stdin.readline()
    pooled = outcome(one)
    fresh = outcome(one)
    print(json.dumps({"pooled": pooled, "fresh": fresh}))


if sys.argv[1] == "calls":
    calls()
elif sys.argv[1] == "blocked":
    blocked(int(sys.argv[2]))
else:
    local(sys.argv[2], sys.argv[3])
