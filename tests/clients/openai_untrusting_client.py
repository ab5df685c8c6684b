"""An unmodified app using the official OpenAI Python SDK that trusts only the
provider's own CA (SSL_CERT_FILE), not the node CA: Tollgate cannot terminate
its TLS. The SDK keeps its default retries. Prints one JSON line with the
answers of two calls."""
import json

import openai

client = openai.OpenAI(api_key="sk-test-python-untrusting", timeout=20)
msgs = [{"role": "user", "content": "Say hello"}]
contents = []
for _ in range(2):
    r = client.chat.completions.create(model="gpt-4o-mini", messages=msgs)
    contents.append(r.choices[0].message.content)
print(json.dumps({"contents": contents}))
