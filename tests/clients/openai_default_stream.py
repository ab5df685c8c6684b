"""An app calling the official OpenAI Python SDK the way most apps do:
stream=True without stream_options, reading choices[0] of every chunk
(a usage-only chunk, with no choices, would raise IndexError here).
Prints what it parsed and the raw stream of a second, identical call."""
import json

import openai

client = openai.OpenAI(api_key="sk-test-python-default", max_retries=0, timeout=20)
msgs = [{"role": "user", "content": "Say hello"}]
text = ""
chunks = 0
for chunk in client.chat.completions.create(model="gpt-4o-mini", messages=msgs, stream=True):
    text += chunk.choices[0].delta.content or ""
    chunks += 1
    if chunk.usage is not None:
        raise SystemExit(f"a chunk carried usage the app did not ask for: {chunk}")
with client.chat.completions.with_streaming_response.create(
    model="gpt-4o-mini", messages=msgs, stream=True
) as r:
    raw = b"".join(r.iter_bytes()).decode()
print(json.dumps({"text": text, "chunks": chunks, "raw": raw}))
