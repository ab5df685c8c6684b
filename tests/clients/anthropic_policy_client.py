"""An unmodified app using the official Anthropic Python SDK under a policy:
a denied model, then more calls than a limit of 1 request a minute allows.
The SDK must raise its own exception classes from Tollgate's answers.
Prints one JSON line with what happened."""
import json

import anthropic

client = anthropic.Anthropic(api_key="sk-ant-test-policy", max_retries=0, timeout=20)
msgs = [{"role": "user", "content": "Hi"}]
out = {}
try:
    client.messages.create(model="claude-opus-4-1", max_tokens=16, messages=msgs)
except anthropic.PermissionDeniedError as e:
    out["denied"] = {"class": type(e).__name__, "status": e.status_code, "message": str(e)}
client.messages.create(model="claude-sonnet-4-5", max_tokens=16, messages=msgs)
try:
    client.messages.create(model="claude-sonnet-4-5", max_tokens=16, messages=msgs)
except anthropic.RateLimitError as e:
    out["limited"] = {
        "class": type(e).__name__,
        "status": e.status_code,
        "retry_after": e.response.headers.get("retry-after"),
        "limit": e.response.headers.get("anthropic-ratelimit-requests-limit"),
    }
print(json.dumps(out))
