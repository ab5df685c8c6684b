"""Steady load for the soak test: THREADS keep-alive HTTPS clients (stdlib
only, trusting the node CA) sending chat calls to the provider, alternating
streamed and non-streamed, at RATE calls/s in total for SECONDS (and at most
RATE*SECONDS calls). Prints one JSON line: calls, ok, errors (with the first
few), streamed calls."""
import http.client
import json
import ssl
import sys
import threading
import time

ca, host, port, rate, seconds = sys.argv[1:6]
port, rate, seconds = int(port), float(rate), float(seconds)
THREADS = 8
ctx = ssl.create_default_context(cafile=ca)
lock = threading.Lock()
stats = {"calls": 0, "ok": 0, "errors": 0, "streamed": 0, "first_errors": []}
deadline = time.monotonic() + seconds
budget = int(rate * seconds)


def worker(i):
    interval = THREADS / rate
    c = None
    n = 0
    nxt = time.monotonic() + i * interval / THREADS
    while True:
        with lock:
            if time.monotonic() >= deadline or stats["calls"] >= budget:
                return
            stats["calls"] += 1
        n += 1
        stream = n % 2 == 0
        body = json.dumps({"model": "gpt-4o-mini", "stream": stream,
                           "stream_options": {"include_usage": True} if stream else None,
                           "messages": [{"role": "user", "content": "soak"}]})
        try:
            if c is None:
                # The pod's /etc/hosts sends the provider name to the provider.
                c = http.client.HTTPSConnection(host, port, context=ctx, timeout=20)
            c.request("POST", "/v1/chat/completions", body,
                      {"content-type": "application/json", "authorization": "Bearer sk-soak"})
            r = c.getresponse()
            data = r.read()
            ok = r.status == 200 and (b"[DONE]" in data if stream else b"usage" in data)
            with lock:
                if ok:
                    stats["ok"] += 1
                    stats["streamed"] += stream
                else:
                    stats["errors"] += 1
                    if len(stats["first_errors"]) < 5:
                        stats["first_errors"].append(f"{r.status}: {data[:200]!r}")
        except Exception as e:  # noqa: BLE001 - every failure is counted and shown
            c = None
            with lock:
                stats["errors"] += 1
                if len(stats["first_errors"]) < 5:
                    stats["first_errors"].append(repr(e))
        nxt += interval
        pause = nxt - time.monotonic()
        if pause > 0:
            time.sleep(pause)


threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(stats))
