"""An unmodified app using the official OpenAI Python SDK with its defaults
(https://api.openai.com/v1). It trusts the node CA only through SSL_CERT_FILE.
Prints one JSON line with what it received."""
import json

import openai

client = openai.OpenAI(api_key="sk-test-python-openai", max_retries=0, timeout=20)
msgs = [{"role": "user", "content": "Say hello"}]
r = client.chat.completions.create(model="gpt-4o-mini", messages=msgs)
text = ""
usage = None
for chunk in client.chat.completions.create(
    model="gpt-4o-mini", messages=msgs, stream=True, stream_options={"include_usage": True}
):
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.usage:
        usage = chunk.usage.prompt_tokens
print(json.dumps({
    "content": r.choices[0].message.content,
    "prompt_tokens": r.usage.prompt_tokens,
    "stream_text": text,
    "stream_prompt_tokens": usage,
}))
