"""A batch job uploading its JSONL input with the official OpenAI Python
SDK: one file whose lines all ask for a mini model, one that also asks
for gpt-4o. Prints one JSON line: for each upload, None when it went
through, else the SDK's error."""
import io
import json

import openai

client = openai.OpenAI(api_key="sk-test-python-upload", max_retries=0, timeout=30)


def jsonl(models):
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": m, "messages": [{"role": "user", "content": "hi"}]},
        }
        for i, m in enumerate(models)
    ]
    return io.BytesIO("".join(json.dumps(l) + "\n" for l in lines).encode())


out = {}
for name, models in [("minis", ["gpt-4o-mini", "gpt-4o-mini"]), ("frontier", ["gpt-4o-mini", "gpt-4o"])]:
    try:
        client.files.create(file=(f"{name}.jsonl", jsonl(models)), purpose="batch")
        out[name] = None
    except openai.APIStatusError as e:
        out[name] = {"class": type(e).__name__, "status": e.status_code, "message": str(e)}
print(json.dumps(out))
