"""An unmodified app using the official Anthropic Python SDK with its defaults
(https://api.anthropic.com). It trusts the node CA only through SSL_CERT_FILE.
Prints one JSON line with what it received."""
import json

import anthropic

client = anthropic.Anthropic(api_key="sk-ant-test-python", max_retries=0, timeout=20)
msgs = [{"role": "user", "content": "Hi"}]
m = client.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=msgs)
with client.messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=msgs) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
print(json.dumps({
    "content": m.content[0].text,
    "output_tokens": m.usage.output_tokens,
    "stream_text": text,
    "stream_output_tokens": final.usage.output_tokens,
}))
