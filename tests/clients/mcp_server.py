"""A remote MCP server built with the official MCP Python SDK (`mcp` on
PyPI), serving streamable HTTP over TLS, for the MCP tests: three tools,
one resource and one prompt. Every tool it runs is appended to the log
file (one JSON line per call): the server's own record of what reached it.

usage: mcp_server.py HOST PORT CERT KEY LOG [streamable-http|sse]

`sse` serves the older HTTP+SSE transport (GET /sse, POST /messages/).
"""
import json
import sys

import uvicorn
from mcp.server import MCPServer

host, port, cert, key, log = sys.argv[1:6]
transport = sys.argv[6] if len(sys.argv) > 6 else "streamable-http"
server = MCPServer("tollgate-test-tools")


def ran(tool, **args):
    with open(log, "a") as f:
        f.write(json.dumps({"tool": tool, "arguments": args}) + "\n")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two numbers."""
    ran("add", a=a, b=b)
    return a + b


@server.tool()
def read_file(path: str) -> str:
    """Read a file of the repository."""
    ran("read_file", path=path)
    return f"contents of {path}"


@server.tool()
def delete_repo(name: str) -> str:
    """Delete a repository."""
    ran("delete_repo", name=name)
    return f"deleted {name}"


@server.resource("notes://{name}")
def note(name: str) -> str:
    """A note by name."""
    return f"note {name}"


@server.prompt()
def review(code: str) -> str:
    """Review some code."""
    return f"Please review: {code}"


uvicorn.run(
    # Bound to a test address, not loopback: the SDK's DNS-rebinding guard
    # (Host must be localhost) is for local servers.
    server.sse_app(host=host) if transport == "sse" else server.streamable_http_app(host=host),
    host=host,
    port=int(port),
    ssl_certfile=cert,
    ssl_keyfile=key,
    log_level="warning",
)
