"""An unmodified batch job using the official OpenAI Python SDK under a
policy that allows chat only: a chat call, then a JSONL upload and a batch
creation, as the SDK's docs show them. Prints one JSON line with what
happened."""
import io
import json

import openai

client = openai.OpenAI(api_key="sk-test-python-batch", max_retries=0, timeout=30)
out = {}
r = client.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello"}]
)
out["chat"] = r.choices[0].message.content


def refused(call):
    try:
        call()
        return None
    except openai.PermissionDeniedError as e:
        return {"class": type(e).__name__, "status": e.status_code, "message": str(e)}


line = {
    "custom_id": "r1",
    "method": "POST",
    "url": "/v1/chat/completions",
    "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
}
upload = io.BytesIO((json.dumps(line) + "\n").encode())
out["upload"] = refused(
    lambda: client.files.create(file=("batch.jsonl", upload), purpose="batch")
)
out["batch"] = refused(
    lambda: client.batches.create(
        input_file_id="file-abc123",
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
)
print(json.dumps(out))
