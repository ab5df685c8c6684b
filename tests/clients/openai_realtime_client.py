"""An unmodified voice/text app using the official OpenAI Python SDK's
Realtime client (WebSocket) with its default URL: for each model given, a
session that asks for `responses` text responses. Prints one JSON line with
what each session saw: the text of each response, the error events, and how
the session ended."""
import json
import sys

import openai

client = openai.OpenAI(api_key="sk-test-python-realtime", max_retries=0, timeout=30)
sessions = []
for spec in sys.argv[1:]:
    model, responses = spec.split(":")
    seen = {"model": model, "texts": [], "errors": [], "closed": None, "session_model": None}
    try:
        with client.realtime.connect(model=model) as conn:

            def read_until_done():
                text = ""
                for event in conn:
                    if event.type == "session.created":
                        seen["session_model"] = event.session.model
                    elif event.type == "response.output_text.delta":
                        text += event.delta
                    elif event.type == "error":
                        seen["errors"].append({"code": event.error.code, "message": event.error.message})
                    elif event.type == "response.done":
                        return text
                return None  # the server closed the session

            conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
            for _ in range(int(responses)):
                try:
                    conn.conversation.item.create(
                        item={
                            "type": "message",
                            "role": "user",
                            "content": [{"type": "input_text", "text": "Say hi"}],
                        }
                    )
                    conn.response.create()
                except Exception as e:
                    # Closed under us: what it sent before closing is still to be read.
                    seen["closed"] = f"{type(e).__name__}: {e}"
                    try:
                        read_until_done()
                    except Exception:
                        pass
                    break
                text = read_until_done()
                if text is None:
                    break
                seen["texts"].append(text)
    except Exception as e:  # the session ended under us: say how
        seen["closed"] = seen["closed"] or f"{type(e).__name__}: {e}"
    sessions.append(seen)
print(json.dumps({"sessions": sessions}))
