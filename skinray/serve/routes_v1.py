"""The ingress's FastAPI application: the /v1 routes, health, and the pieces every route shares.

POST /v1/predict         one image: raw bytes (image/*, application/octet-stream) or multipart
POST /v1/predict/batch   several images in one multipart request: one result or error each
POST /v1/explain         one image: the answer and its Grad-CAM overlay (PNG: base64 in JSON,
                         or the PNG itself for `Accept: image/png`)
GET  /                   the upload page (page/: plain HTML, CSS and JavaScript)
GET  /v1/model           classes, version, members, validation metrics
GET  /healthz, /readyz   alive; ready once every model is loaded and answered its warm-up
/v2/...                  the Open Inference Protocol (routes_oip.py)
GET  /docs, /openapi.json   OpenAPI (with serve.docs: true)
"""

from __future__ import annotations

import base64
import html
import json
import logging
import time
from pathlib import Path
from urllib.parse import quote

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from skinray.data.decode import DecodeError
from skinray.serve.guards import (
    ApiError,
    BodyLimit,
    error_response,
    is_loopback,
    not_ready,
    request_id,
    sticky_key,
    timed,
)
from skinray.serve.ingress import Service, since_ms

log = logging.getLogger(__name__)

IMAGE_TYPES = ("image/", "application/octet-stream")
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1"]
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
            },
        },
    }
}
BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            }
        },
    }
}


class Probability(BaseModel):
    label: str
    probability: float


class Answer(BaseModel):
    label: str
    confidence: float
    top_k: list[Probability]
    differential: list[str] | None  # the conditions that remain possible (None: the model has no sets)
    abstained: bool
    reason: str | None  # why not answered: "uncertain, refer" or "not like the images this model knows"
    out_of_distribution: bool
    ood_score: float | None  # None: the model has no out-of-distribution check
    model_version: str
    latency_ms: float


class Explanation(Answer):
    explained_label: str
    explanation_png: str  # base64


class BatchItem(BaseModel):
    filename: str
    label: str | None = None
    confidence: float | None = None
    top_k: list[Probability] | None = None
    differential: list[str] | None = None
    abstained: bool | None = None
    reason: str | None = None
    out_of_distribution: bool | None = None
    ood_score: float | None = None
    error: str | None = None


class BatchAnswer(BaseModel):
    results: list[BatchItem]
    model_version: str
    latency_ms: float


def make_app(service: Service) -> FastAPI:
    from skinray.serve.routes_oip import oip_router

    cfg = service.cfg
    # The interactive docs load scripts from a CDN, so they are off unless serve.docs asks for them.
    docs = (
        {"docs_url": "/docs", "redoc_url": "/redoc", "openapi_url": "/openapi.json"}
        if cfg.docs
        else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    )
    app = FastAPI(
        title="skinray",
        version="1",
        description="Skin-disease image classification: an ensemble "
        "of calibrated CNNs. Send an image, get the label, its confidence and the top classes.",
        **docs,
    )

    def check_key(request: Request) -> None:
        service.keys.check(request)

    authorized = Depends(check_key)

    @app.post("/v1/predict", response_model=Answer, dependencies=[authorized], openapi_extra=IMAGE_BODY)
    async def predict(request: Request):
        """One image -> its label, confidence, top classes and whether the ensemble abstains."""
        started = time.perf_counter()
        files = await read_images(request, cfg.max_images)
        if len(files) != 1:
            raise ApiError(422, f"/v1/predict takes one image, got {len(files)}: use /v1/predict/batch")
        (views,) = await service.decode([files[0][1]])
        if isinstance(views, DecodeError):
            raise ApiError(400, f"not a readable image: {views.reason}")
        _, (answer,), arm = await service.respond(
            [views], [_input(files[0][1])], started, "/v1/predict", request_id(request), sticky_key(request)
        )
        request.state.model_version = arm.version
        return {**answer, "model_version": arm.version, "latency_ms": since_ms(started)}

    @app.post(
        "/v1/predict/batch",
        response_model=BatchAnswer,
        response_model_exclude_none=True,
        dependencies=[authorized],
        openapi_extra=BATCH_BODY,
    )
    async def predict_batch(request: Request):
        """Several images (multipart) -> one result per image, or the reason it has none."""
        started = time.perf_counter()
        if _content_type(request) != "multipart/form-data":
            raise ApiError(415, "send the images as a multipart/form-data upload (one file part per image)")
        files = await read_images(request, cfg.max_images)
        decoded = await service.decode([data for _, data in files])
        good = [v for v in decoded if not isinstance(v, DecodeError)]
        inputs = [_input(data) for (_, data), v in zip(files, decoded) if not isinstance(v, DecodeError)]
        _, answered, arm = await service.respond(
            good, inputs, started, "/v1/predict/batch", request_id(request), sticky_key(request)
        )
        request.state.model_version = arm.version
        answers = iter(answered)
        results = [
            {"filename": name, "error": f"not a readable image: {v.reason}"}
            if isinstance(v, DecodeError)
            else {"filename": name, **next(answers)}
            for (name, _), v in zip(files, decoded)
        ]
        return {
            "results": results,
            "model_version": arm.version,
            "latency_ms": since_ms(started),
        }

    @app.post(
        "/v1/explain",
        response_model=Explanation,
        dependencies=[authorized],
        openapi_extra={**IMAGE_BODY, "responses": {"200": {"content": {"image/png": {}}}}},
    )
    async def explain(request: Request):
        """One image -> its answer and where the models found the evidence for it (Grad-CAM over the
        photo, with a legend): base64 PNG in JSON, or the PNG itself when the client accepts only
        image/png (the answer then comes in X-Skinray-* headers)."""
        started = time.perf_counter()
        files = await read_images(request, cfg.max_images)
        if len(files) != 1:
            raise ApiError(422, f"/v1/explain takes one image, got {len(files)}")
        try:
            image, views = await service.decode_photo(files[0][1])
        except DecodeError as exc:
            raise ApiError(400, f"not a readable image: {exc.reason}") from None
        answer, picture, arm = await service.explain(image, views, sticky_key(request))
        service.log("/v1/explain", request_id(request), [answer], [_input(files[0][1])], started, arm)
        request.state.model_version = arm.version
        answer = {**answer, "model_version": arm.version, "latency_ms": since_ms(started)}
        if _wants_png(request):
            return Response(
                picture,
                media_type="image/png",
                headers={
                    "X-Skinray-Label": quote(answer["label"]),
                    "X-Skinray-Confidence": f"{answer['confidence']:.6f}",
                    "X-Skinray-Abstained": str(answer["abstained"]).lower(),
                    "X-Skinray-Differential": quote(json.dumps(answer["differential"])),
                    "X-Skinray-Model-Version": quote(answer["model_version"]),
                },
            )
        return {
            **answer,
            "explained_label": answer["label"],
            "explanation_png": base64.b64encode(picture).decode(),
        }

    @app.get("/v1/model", dependencies=[authorized])
    async def model():
        """The classes, version, members and validation metrics of the served bundle."""
        return service.model_info()

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if await service.ready():
            return {"ready": True}
        return not_ready()

    _page_routes(app)
    app.include_router(oip_router(service, authorized))
    _install_guards(app, service)
    return app


PAGE = Path(__file__).parent / "page"
PAGE_FILES = {
    "index.html": "text/html; charset=utf-8",
    "page.css": "text/css; charset=utf-8",
    "page.js": "text/javascript; charset=utf-8",
}
# The page runs only its own script and style, sends requests only to this server, and frames nothing.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data: blob:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; "
    "base-uri 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _page_routes(app: FastAPI) -> None:
    """The upload page: open to everyone (it holds no data); its requests carry the user's key.

    Its links are relative to a <base> set per request to where the application is mounted (Serve's
    route prefix arrives as the ASGI root_path), so it works at / and under any prefix alike.
    """
    pages = {name: (PAGE / name).read_bytes() for name in PAGE_FILES}

    @app.get("/", include_in_schema=False)
    async def index(request: Request):
        base = html.escape(request.scope.get("root_path", "").rstrip("/") + "/", quote=True)
        return Response(
            pages["index.html"].replace(b"__BASE__", base.encode()),
            media_type=PAGE_FILES["index.html"],
            headers=PAGE_HEADERS,
        )

    def static(name: str):
        async def serve_file():
            return Response(pages[name], media_type=PAGE_FILES[name], headers=PAGE_HEADERS)

        return serve_file

    for name in ("page.css", "page.js"):
        app.get(f"/{name}", include_in_schema=False)(static(name))


def _input(data: bytes) -> tuple[int, bytes]:
    return len(data), data


def _wants_png(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "image/png" in accept and "application/json" not in accept


def _install_guards(app: FastAPI, service: Service) -> None:
    app.add_middleware(
        BodyLimit, limit=int(service.cfg.max_request_mb * 2**20), drain=int(service.cfg.max_drain_mb * 2**20)
    )
    app.middleware("http")(timed(service.metrics))
    if is_loopback(service.cfg.host) and not service.keys.enabled:
        # Open on this machine only: a page elsewhere could still reach it through DNS rebinding
        # (its own name resolved to 127.0.0.1) unless the Host header must name this machine.
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_NAMES)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.error("unexpected error answering %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "the server could not answer this request; the error is in its log")

    @app.exception_handler(ApiError)
    async def api_error(_, exc: ApiError):
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        return error_response(
            422, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        )


# === Reading images from a request ===


async def read_images(request: Request, max_images: int) -> list[tuple[str, bytes]]:
    """(filename, bytes) of each image in the body: the raw body, or each file part of a multipart form."""
    kind = _content_type(request)
    if kind == "multipart/form-data":
        files = await _multipart_files(request, max_images)
    elif kind == "" or kind.startswith(IMAGE_TYPES):
        files = [("", await request.body())]
    elif kind == "application/json":
        raise ApiError(
            415,
            "a JSON body where an image is expected: send the image's bytes (Content-Type "
            "image/jpeg, image/png or application/octet-stream) or a multipart upload",
        )
    else:
        raise ApiError(415, f"unsupported content type '{kind}': send image bytes or a multipart upload")
    if not files or all(not data for _, data in files):
        raise ApiError(400, "empty body: no image was sent")
    return files


async def _multipart_files(request: Request, max_images: int) -> list[tuple[str, bytes]]:
    try:
        form = await request.form(max_files=max_images, max_fields=max_images)
    except (MultiPartException, HTTPException) as exc:  # Starlette raises the parser's errors as a 400
        message = getattr(exc, "detail", None) or str(exc)
        if message.startswith("Too many"):
            raise ApiError(413, f"{message} (serve.max_images)") from None
        raise ApiError(400, f"malformed multipart upload: {message}") from None
    files = [
        (part.filename or name, await part.read())
        for name, part in form.multi_items()
        if isinstance(part, UploadFile)
    ]
    if not files:
        raise ApiError(422, "the multipart upload has no file part")
    return files


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()
