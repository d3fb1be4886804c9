"""Helpers of the tests that talk to the Serve endpoint (test_serve.py, test_page.py): a small
application's settings, deploying it on the shared cluster, the test API key, a plain JPEG."""

from __future__ import annotations

import io
import socket
from pathlib import Path

from PIL import Image

KEY = "skinray-test-key-8f2c41d7-5e0b9a63c1d24f7e"
ANOTHER_KEY = "skinray-another-key-0000-1111-2222-3333"
SMALL = {
    "cpus_per_replica": 0.5,
    "ingress_cpus": 0.25,
    "min_replicas": 1,
    "max_replicas": 1,
    "max_request_mb": 1,
    "max_images": 4,
}


# The open endpoint's ingress: room for (750 - 450) // 114 = 2 decodes of 6 MP at once.
FLOOD = {"max_pixels": 6_000_000, "ingress_memory_mb": 750}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(bundle: Path, name: str, prefix: str, **settings) -> None:
    from ray import serve

    from skinray.serve.app import build_app

    serve.run(
        build_app({"model": str(bundle), "serve": {**SMALL, **settings}}), name=name, route_prefix=prefix
    )


def jpeg(size=(64, 48), colour=(200, 80, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG")
    return buffer.getvalue()


async def asgi_request(app, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """One request straight into an ASGI application (no server, no HTTP client): (status, headers, body)."""
    sent, pending = [], [{"type": "http.request", "body": body, "more_body": False}]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1")]
        + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }

    async def receive():
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    try:
        await app(scope, receive, send)
    except (
        Exception
    ):  # Starlette re-raises an unexpected error after sending its answer, for the server's log
        pass
    start = next(m for m in sent if m["type"] == "http.response.start")
    return (
        start["status"],
        {k.decode(): v.decode() for k, v in start["headers"]},
        b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"),
    )
