"""The demo's workload: an unmodified app using the official OpenAI Python
SDK with its default base URL (https://api.openai.com) and default retries
(which honour retry-after). argv: MODEL CALLS [stream]; with `stream` the
last call is streamed. Prints one JSON line: answers, errors, seconds."""
import json
import sys
import time

import openai

model, calls = sys.argv[1], int(sys.argv[2])
stream_last = "stream" in sys.argv[3:]
client = openai.OpenAI(api_key="sk-demo-key", timeout=30)
msgs = [{"role": "user", "content": "Summarise this week's incident reports in one line."}]
out = {"ok": 0, "errors": [], "seconds": 0.0}
start = time.monotonic()
for i in range(calls):
    try:
        if stream_last and i == calls - 1:
            text = "".join(
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(model=model, messages=msgs, stream=True)
                if c.choices
            )
        else:
            text = client.chat.completions.create(model=model, messages=msgs).choices[0].message.content
        out["ok"] += 1
        out["answer"] = text
    except openai.APIStatusError as e:
        out["errors"].append({"class": type(e).__name__, "status": e.status_code, "message": e.message})
out["seconds"] = round(time.monotonic() - start, 2)
print(json.dumps(out))
