"""An unmodified MCP client (the official MCP Python SDK's `Client`) of a
remote MCP server, run in a pod: it trusts the node CA only through
SSL_CERT_FILE. It lists the server's tools, calls each tool named on the
command line, reads a resource and gets a prompt, and prints one JSON line
of what it saw (errors included: a refused call raises `MCPError`).

A URL ending in /sse is the older HTTP+SSE transport. The whole run is
bounded (60 s): a call whose answer never comes fails the test instead of
hanging it.

usage: mcp_client.py URL TOOL[:TIMES]...
"""
import asyncio
import json
import sys

from mcp import Client
from mcp.client.sse import sse_client


async def main():
    url, calls = sys.argv[1], sys.argv[2:]
    out = {"calls": []}
    transport = sse_client(url) if url.endswith("/sse") else url
    async with Client(transport) as client:
        tools = await client.list_tools()
        out["tools"] = sorted(t.name for t in tools.tools)
        for spec in calls:
            tool, _, times = spec.partition(":")
            for _ in range(int(times or 1)):
                args = {"add": {"a": 1, "b": 2}, "read_file": {"path": "README.md"}}.get(
                    tool, {"name": "prod"}
                )
                try:
                    r = await client.call_tool(tool, args)
                    out["calls"].append(
                        {"tool": tool, "text": r.content[0].text, "is_error": r.is_error}
                    )
                except Exception as e:  # the SDK's MCPError for a JSON-RPC error
                    out["calls"].append(
                        {"tool": tool, "error": type(e).__name__, "message": str(e)}
                    )
        res = await client.read_resource("notes://today")
        out["resource"] = res.contents[0].text
        prompt = await client.get_prompt("review", {"code": "x = 1"})
        out["prompt"] = prompt.messages[0].content.text
    print(json.dumps(out))


asyncio.run(asyncio.wait_for(main(), 60))
