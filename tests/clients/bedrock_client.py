"""An unmodified app using boto3's `bedrock-runtime` client with its default
endpoint (bedrock-runtime.us-east-1.amazonaws.com) and credentials from the
environment, trusting the node CA through AWS_CA_BUNDLE. Each argument is
`call=modelId` (call: converse, converse_stream, invoke, invoke_stream),
or `sleep=seconds` (a pause between calls, recorded as nothing).
Prints one JSON line with what the SDK saw of each call: the text, the usage
as the SDK parsed it, or the error code, message and status it raised."""
import json
import sys
import time

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

client = boto3.client(
    "bedrock-runtime",
    region_name="us-east-1",
    config=Config(retries={"max_attempts": 1}, connect_timeout=10, read_timeout=30),
)
messages = [{"role": "user", "content": [{"text": "Say hello"}]}]
anthropic_body = json.dumps(
    {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Say hello"}],
    }
)


def converse(model):
    r = client.converse(modelId=model, messages=messages)
    return {"text": r["output"]["message"]["content"][0]["text"], "usage": r["usage"]}


def converse_stream(model):
    r = client.converse_stream(modelId=model, messages=messages)
    text, usage = "", None
    for e in r["stream"]:
        if "contentBlockDelta" in e:
            text += e["contentBlockDelta"]["delta"]["text"]
        if "metadata" in e:
            usage = e["metadata"]["usage"]
    return {"text": text, "usage": usage}


def invoke(model):
    r = client.invoke_model(
        modelId=model, body=anthropic_body, contentType="application/json", accept="application/json"
    )
    b = json.loads(r["body"].read())
    return {"text": b["content"][0]["text"], "usage": b["usage"]}


def invoke_stream(model):
    r = client.invoke_model_with_response_stream(
        modelId=model, body=anthropic_body, contentType="application/json", accept="application/json"
    )
    text, usage = "", None
    for e in r["body"]:
        c = json.loads(e["chunk"]["bytes"])
        if c.get("type") == "content_block_delta":
            text += c["delta"]["text"]
        if "amazon-bedrock-invocationMetrics" in c:
            usage = c["amazon-bedrock-invocationMetrics"]
    return {"text": text, "usage": usage}


calls = {"converse": converse, "converse_stream": converse_stream, "invoke": invoke, "invoke_stream": invoke_stream}
out = []
for spec in sys.argv[1:]:
    kind, model = spec.split("=", 1)
    if kind == "sleep":
        time.sleep(float(model))
        continue
    try:
        seen = calls[kind](model)
    except ClientError as e:
        seen = {
            "error": e.response["Error"]["Code"],
            "message": e.response["Error"]["Message"],
            "status": e.response["ResponseMetadata"]["HTTPStatusCode"],
        }
    seen["call"] = spec
    out.append(seen)
print(json.dumps({"calls": out}))
