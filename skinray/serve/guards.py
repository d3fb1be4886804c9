"""What every route shares: the body limit, API keys, JSON errors and the request metrics.

Errors are JSON `{"error": "what was wrong"}` with the status that says whose fault it was:
400 (unreadable input), 401 (no or a wrong API key), 404, 413 (too large), 415 (a body type the
route does not take), 422 (a malformed request), 503 with Retry-After (overloaded, a replica
unavailable or still loading), and 500 without details for anything unexpected (routes_v1).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import time
import uuid
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse

from skinray import UserError
from skinray.config import ServeConfig

KEYS_ENV = "SKINRAY_API_KEYS"
log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # overloaded: a replica frees up within a batch or two
LOADING_RETRY_AFTER_S = 5  # not ready: models take seconds to load


class ApiError(Exception):
    """An answer other than 200, raised anywhere below a route."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def overloaded(what: str) -> ApiError:
    return ApiError(503, f"{what} is at capacity: retry shortly", {"Retry-After": str(RETRY_AFTER_S)})


def unavailable(what: str) -> ApiError:
    return ApiError(
        503,
        f"{what} is unavailable (a replica is starting or being replaced): retry shortly",
        {"Retry-After": str(LOADING_RETRY_AFTER_S)},
    )


def not_ready() -> JSONResponse:
    """The readiness probes' answer while the model replicas load."""
    return error_response(503, "the models are not loaded yet", {"Retry-After": str(LOADING_RETRY_AFTER_S)})


# === The body limit ===


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes gets 413, and is never held whole.

    A declared Content-Length over the limit is refused before the route runs; a body without one
    (chunked) is counted as it arrives and refused at the chunk that crosses the limit. Before the
    413, the rest of the body is read and discarded, up to `drain` bytes in all (nginx's lingering
    close): a client that sends its whole body before it reads the answer, as Python's urllib
    does, then gets the 413 instead of a connection reset mid-upload. A body past `drain` is cut
    off with the 413 and the connection closed.
    """

    def __init__(self, app, limit: int, drain: int = 0):
        self.app, self.limit, self.drain = app, limit, drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            if int(declared) <= self.drain:
                await self._discard(receive, 0)
            return await self._refuse(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                if message.get("more_body", False):
                    await self._discard(receive, received)
                raise ApiError(413, self._message())
            return message

        await self.app(scope, counted, send)

    async def _discard(self, receive, already: int) -> None:
        """Reads and drops the rest of the body, `drain` bytes in all at the most."""
        total = already
        while total <= self.drain:
            message = await receive()
            if message["type"] != "http.request":
                return
            total += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    def _message(self) -> str:
        return f"request body over the limit of {self.limit / 2**20:g} MB (serve.max_request_mb)"

    async def _refuse(self, scope, receive, send):
        await error_response(413, self._message(), {"Connection": "close"})(scope, receive, send)


# === API keys ===


MIN_KEY_LENGTH = (
    32  # a key a client cannot guess: `python -c "import secrets; print(secrets.token_urlsafe(32))"`
)


def key_digests(cfg: ServeConfig) -> set[str]:
    """SHA-256 digests of the API keys in `serve.api_keys_file` and $SKINRAY_API_KEYS.

    Only digests travel to the ingress replicas (and into Serve's deployment state); the keys
    themselves stay where they were read. Fails closed: a keys file with no key in it, a key
    shorter than `MIN_KEY_LENGTH`, or no key at all on an address other machines reach (unless
    `serve.allow_unauthenticated`) is refused rather than served open.
    """
    keys = [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]
    if cfg.api_keys_file:
        path = Path(cfg.api_keys_file).expanduser()
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise UserError(f"cannot read serve.api_keys_file '{path}': {exc.strerror}") from None
        in_file = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not in_file:
            raise UserError(
                f"serve.api_keys_file '{path}' holds no key: refusing to serve every route openly "
                "(put one key per line, or leave serve.api_keys_file empty)"
            )
        keys += in_file
    short = sum(len(k) < MIN_KEY_LENGTH for k in keys)
    if short:
        raise UserError(
            f"{short} API key(s) shorter than {MIN_KEY_LENGTH} characters: make each with "
            '`python -c "import secrets; print(secrets.token_urlsafe(32))"`'
        )
    if not keys and not is_loopback(cfg.host):
        if not cfg.allow_unauthenticated:
            raise UserError(
                f"serve.host {cfg.host} is reachable from other machines and no API key is set: "
                f"set serve.api_keys_file or {KEYS_ENV}, or serve.allow_unauthenticated: true "
                "behind a gateway that authenticates"
            )
        log.warning(
            "serving on %s without API keys (serve.allow_unauthenticated): every route is open", cfg.host
        )
    return {digest(k) for k in keys}


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Keys:
    """Checks `Authorization: Bearer KEY` or `X-API-Key: KEY` against the keys' SHA-256 digests.

    Every digest is compared (in constant time) whatever matched, so timing says nothing about
    which key was close. The key itself is never logged or stored.
    """

    def __init__(self, digests: set[str]):
        self.digests = sorted(digests)

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def check(self, request: Request) -> None:
        if not self.digests:
            return
        presented = _presented_key(request)
        if presented is None:
            raise ApiError(
                401,
                "an API key is required: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                {"WWW-Authenticate": "Bearer"},
            )
        candidate = digest(presented)
        matched = False
        for known in self.digests:
            matched |= hmac.compare_digest(candidate, known)
        if not matched:
            raise ApiError(401, "the API key is not valid", {"WWW-Authenticate": "Bearer"})


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer " and header[7:].strip():
        return header[7:].strip()
    return request.headers.get("x-api-key") or None


def sticky_key(request: Request) -> str | None:
    """What keeps a client on one version (`serve.canary_percent`): its X-Request-Id when it sends
    one, else its API key; only ever hashed."""
    return request.headers.get("x-request-id") or _presented_key(request)


def request_id(request: Request) -> str:
    """The request's id: the client's X-Request-Id, else the one Serve's proxy gave it (and returns
    in the response's x-request-id header)."""
    from ray.serve.context import _get_serve_request_context

    given = request.headers.get("x-request-id") or _get_serve_request_context().request_id
    return given[:128] if given else uuid.uuid4().hex


# === Metrics (Ray's metrics API: scraped from each node's metrics endpoint) ===


LATENCY_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]


class RequestMetrics:
    """Requests by route, status and version, their latency, the predicted classes and abstentions
    per version, canary fallbacks, and the shadow's agreement and failures."""

    def __init__(self):
        from ray.serve import metrics

        self.requests = metrics.Counter(
            "skinray_requests",
            "HTTP requests by route, status and the version that answered ('' for none)",
            tag_keys=("route", "status", "version"),
        )
        self.latency = metrics.Histogram(
            "skinray_request_latency_ms",
            "HTTP request latency (ms) by route and version",
            boundaries=LATENCY_MS,
            tag_keys=("route", "version"),
        )
        self.predictions = metrics.Counter(
            "skinray_predictions",
            "images answered, by predicted class, abstention, out-of-distribution refusal and version",
            tag_keys=("label", "abstained", "ood", "version"),
        )
        self.fallbacks = metrics.Counter(
            "skinray_canary_fallbacks",
            "requests the canary could not answer, answered by the stable version",
            tag_keys=("version",),
        )
        self.shadow = metrics.Counter(
            "skinray_shadow_answers",
            "images the shadow scored, by whether its label agreed with the answer's ('error': it failed)",
            tag_keys=("version", "agreed"),
        )

        self.validation = metrics.Gauge(
            "skinray_validation_rate",
            "a served version's rates on its validation images (the bundle's reference): what the "
            "served abstention and out-of-distribution rates are compared with",
            tag_keys=("version", "rate"),
        )

    def reference(self, version: str, reference: dict) -> None:
        """Exports a version's validation rates (`abstained`, `out_of_distribution`) for the alerts."""
        for rate in ("abstained", "out_of_distribution"):
            if reference.get(rate) is not None:
                self.validation.set(reference[rate], {"version": version, "rate": rate})

    def observe(self, route: str, status: int, seconds: float, version: str = "") -> None:
        self.requests.inc(1, {"route": route, "status": str(status), "version": version})
        self.latency.observe(seconds * 1000, {"route": route, "version": version})

    def predicted(self, label: str, abstained: bool, version: str, ood: bool = False) -> None:
        tags = {"label": label, "abstained": _flag(abstained), "ood": _flag(ood), "version": version}
        self.predictions.inc(1, tags)

    def fallback(self, version: str) -> None:
        self.fallbacks.inc(1, {"version": version})

    def shadow_agreed(self, version: str, agreed: bool) -> None:
        self.shadow.inc(1, {"version": version, "agreed": _flag(agreed)})

    def shadow_failed(self, version: str) -> None:
        self.shadow.inc(1, {"version": version, "agreed": "error"})


def _flag(value: bool) -> str:
    return str(bool(value)).lower()


def batch_size_histogram():
    from ray.serve import metrics

    return metrics.Histogram(
        "skinray_batch_size",
        "images per model call (dynamic batching)",
        boundaries=[1, 2, 4, 8, 16, 32, 64, 128],
    )


def timed(metrics: RequestMetrics):
    """HTTP middleware: every response counted by its route template and status."""

    async def middleware(request: Request, call_next):
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            version = getattr(request.state, "model_version", "")  # set by the route that answered
            metrics.observe(
                getattr(route, "path", "unmatched"), status, time.perf_counter() - started, version
            )

    return middleware
