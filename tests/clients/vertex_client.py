"""Unmodified apps on Google Vertex AI with the official SDKs and their
default endpoints: google-genai (`vertexai=True`, Gemini in us-central1)
and anthropic's AnthropicVertex (Claude in us-east5), each with a
placeholder OAuth token and trusting the node CA through SSL_CERT_FILE.
Prints one JSON line with what each call saw (text and usage as the SDK
parsed them, or the error it raised)."""
import json

import anthropic
from anthropic import AnthropicVertex
from google import genai
from google.oauth2.credentials import Credentials

token = "ya29.workload-placeholder"
out = {}
g = genai.Client(vertexai=True, project="tollgate-test", location="us-central1", credentials=Credentials(token=token))
r = g.models.generate_content(model="gemini-2.5-flash", contents="Say hello")
out["gemini"] = {"text": r.text, "prompt_tokens": r.usage_metadata.prompt_token_count}
text, usage = "", None
for chunk in g.models.generate_content_stream(model="gemini-2.5-flash", contents="Say hello"):
    text += chunk.text or ""
    usage = chunk.usage_metadata or usage
out["gemini_stream"] = {"text": text, "prompt_tokens": usage.prompt_token_count if usage else None}

a = AnthropicVertex(region="us-east5", project_id="tollgate-test", access_token=token, max_retries=0, timeout=30)
messages = [{"role": "user", "content": "Say hello"}]
m = a.messages.create(model="claude-sonnet-4-5@20250929", max_tokens=64, messages=messages)
out["claude"] = {"text": m.content[0].text, "output_tokens": m.usage.output_tokens}
with a.messages.stream(model="claude-sonnet-4-5@20250929", max_tokens=64, messages=messages) as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
out["claude_stream"] = {"text": text, "output_tokens": final.usage.output_tokens}
try:
    a.messages.create(model="claude-opus-4-1@20250805", max_tokens=64, messages=messages)
    out["denied"] = "not refused"
except anthropic.APIStatusError as e:
    out["denied"] = {"class": type(e).__name__, "status": e.status_code, "message": str(e)}
print(json.dumps(out))
