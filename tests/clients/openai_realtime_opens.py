"""Open N Realtime sessions one after another with the official OpenAI
Python SDK (its `websockets` client, 3 s open timeout), each read up to its
`session.created` and closed; then one plain TLS connection to the same host
that reads a response and says whether the server sent a TLS 1.3 session
ticket. Prints one JSON line: opened, failures (index and error), ticket."""
import json
import socket
import ssl
import sys
import time

import openai

n = int(sys.argv[1])
client = openai.OpenAI(api_key="sk-test-python-realtime", max_retries=0, timeout=10)
opened, failures = 0, []
deadline = time.monotonic() + 60
for i in range(n):
    if time.monotonic() > deadline:
        failures.append({"index": i, "error": "out of time"})
        break
    try:
        with client.realtime.connect(
            model="gpt-realtime", websocket_connection_options={"open_timeout": 3}
        ) as conn:
            event = conn.recv()
            if event.type == "session.created":
                opened += 1
            else:
                failures.append({"index": i, "error": f"first event {event.type}"})
    except Exception as e:
        failures.append({"index": i, "error": f"{type(e).__name__}: {e}"})

ctx = ssl.create_default_context()
with socket.create_connection(("api.openai.com", 443), timeout=10) as raw:
    with ctx.wrap_socket(raw, server_hostname="api.openai.com") as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\nConnection: close\r\n\r\n")
        while s.recv(65536):
            pass
        ticket = s.session is not None and s.session.has_ticket
        version = s.version()
print(json.dumps({"opened": opened, "failures": failures, "ticket": ticket, "tls": version}))
