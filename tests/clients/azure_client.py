"""An unmodified app using the OpenAI Python SDK's AzureOpenAI client with a
placeholder API key: one chat call and one streamed, trusting the node CA
through SSL_CERT_FILE. Prints what it got as one JSON line."""
import json

from openai import AzureOpenAI

client = AzureOpenAI(
    api_key="placeholder-azure-key",
    api_version="2024-10-21",
    azure_endpoint="https://tollgate-test.openai.azure.com",
    max_retries=0,
    timeout=30,
)
messages = [{"role": "user", "content": "Say hello"}]
r = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
out = {"content": r.choices[0].message.content, "prompt_tokens": r.usage.prompt_tokens}
text = ""
for chunk in client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
out["stream_text"] = text
print(json.dumps(out))
