"""The TLS uprobes benchmark's client: N chat calls over one kept-alive
HTTPS connection (Python's ssl, i.e. the system's OpenSSL), trusting only
the provider's own CA. Prints one JSON line: this process's CPU time
(user + system) and wall time per call, over the calls after the first
(the connection, its handshake and the probing stay out)."""
import http.client
import json
import ssl
import sys
import time

n = int(sys.argv[1])
ctx = ssl.create_default_context()
conn = http.client.HTTPSConnection("api.openai.com", 443, context=ctx, timeout=20)
body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]})
headers = {"content-type": "application/json", "authorization": "Bearer sk-test-bench"}


def call():
    conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        raise SystemExit(f"status {r.status}: {data[:200]!r}")


call()
cpu0, wall0 = time.process_time(), time.perf_counter()
for _ in range(n):
    call()
cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
print(json.dumps({"calls": n, "cpu_us_per_call": cpu / n * 1e6, "wall_us_per_call": wall / n * 1e6}))
