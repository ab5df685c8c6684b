"""An unmodified app using the official OpenAI Python SDK under a policy:
a denied model, then more calls than its rate limit allows. The SDK's own
retry logic (max_retries=2) must honour Tollgate's 429 and retry-after.
Prints one JSON line with what happened."""
import json
import time

import openai

client = openai.OpenAI(api_key="sk-test-python-policy", max_retries=2, timeout=30)
msgs = [{"role": "user", "content": "Say hello"}]
out = {}
try:
    client.chat.completions.create(model="gpt-4o", messages=msgs)
    out["denied"] = None
except openai.PermissionDeniedError as e:
    out["denied"] = {"class": type(e).__name__, "status": e.status_code, "message": str(e)}

durations = []
for _ in range(3):
    t = time.monotonic()
    r = client.chat.completions.create(model="gpt-4o-mini", messages=msgs)
    durations.append(time.monotonic() - t)
    out["content"] = r.choices[0].message.content
out["durations"] = durations
print(json.dumps(out))
