"""The Open Inference Protocol (KServe v2), so KServe and Triton clients work unchanged.

    GET  /v2                          server metadata
    GET  /v2/health/live, /v2/health/ready
    GET  /v2/models/skinray           model metadata (inputs, outputs, version)
    GET  /v2/models/skinray/ready
    POST /v2/models/skinray/infer     inputs: `image` BYTES [N] (encoded image files) or
                                      `pixels` UINT8 [N, H, W, 3]; outputs: `probabilities` FP32
                                      [N, classes], `label` BYTES [N], `abstained` BOOL [N], and
                                      for a bundle with differential sets `differential` BYTES [N]
                                      (a JSON list of labels per image, most probable first) and
                                      `in_set` BOOL [N, classes]; with an out-of-distribution
                                      check `out_of_distribution` BOOL [N], `ood_score` FP32 [N]

Tensors travel as JSON (`data`; BYTES elements as base64 strings, since JSON cannot carry raw
bytes) or with the binary tensor data extension: the JSON header's length in the
`Inference-Header-Content-Length` header, each binary tensor after it in input order
(`parameters.binary_data_size`), BYTES elements as a 4-byte little-endian length and the bytes.
Outputs are binary when the output asks (`parameters.binary_data`) or the request does
(`parameters.binary_data_output`), as `tritonclient.http` does by default.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
import time

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from skinray.data.decode import DecodeError
from skinray.serve.guards import ApiError, not_ready, request_id, sticky_key
from skinray.serve.ingress import Service

MODEL = "skinray"
HEADER = "Inference-Header-Content-Length"
INPUTS = {"image": "BYTES", "pixels": "UINT8"}
NUMERIC = {"UINT8": np.uint8, "FP32": np.float32, "BOOL": np.bool_}


def oip_router(service: Service, authorized) -> APIRouter:
    router = APIRouter(prefix="/v2", tags=["Open Inference Protocol"])
    versions = [v["version"] for v in service.split() if v["role"] != "shadow"]  # those that answer

    @router.get("")
    async def server_metadata():
        return {"name": "skinray", "version": "1", "extensions": ["binary_tensor_data"]}

    @router.get("/health/live")
    async def live():
        return {"live": True}

    @router.get("/health/ready")
    @router.get(f"/models/{MODEL}/ready")
    async def ready():
        if await service.ready():
            return {"ready": True}
        return not_ready()

    @router.get(f"/models/{MODEL}", dependencies=[authorized])
    async def metadata():
        return {
            "name": MODEL,
            "versions": versions,
            "platform": "skinray-ensemble",
            "inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [-1]},
                {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
            ],
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(service.predictor.classes)]},
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "abstained", "datatype": "BOOL", "shape": [-1]},
                *(
                    [
                        {"name": "differential", "datatype": "BYTES", "shape": [-1]},
                        {"name": "in_set", "datatype": "BOOL", "shape": [-1, len(service.predictor.classes)]},
                    ]
                    if service.predictor.set_threshold is not None
                    else []
                ),
                *(
                    [
                        {"name": "out_of_distribution", "datatype": "BOOL", "shape": [-1]},
                        {"name": "ood_score", "datatype": "FP32", "shape": [-1]},
                    ]
                    if service.predictor.ood_threshold is not None
                    else []
                ),
            ],
            "parameters": {"classes": service.predictor.classes},
        }

    @router.post(f"/models/{MODEL}/infer", dependencies=[authorized])
    async def infer(request: Request):
        request_json, tensors = parse_request(await request.body(), request.headers.get(HEADER))
        started = time.perf_counter()
        views = await _views(service, tensors)
        route, rid = f"/v2/models/{MODEL}/infer", request_id(request)
        prediction, answers, arm = await service.respond(
            views, _inputs(tensors), started, route, rid, sticky_key(request)
        )
        request.state.model_version = arm.version
        outputs = {
            "probabilities": ("FP32", prediction.probabilities),
            "label": ("BYTES", [a["label"].encode() for a in answers]),
            "abstained": ("BOOL", prediction.abstained),
        }
        if prediction.in_set is not None:
            outputs["differential"] = ("BYTES", [json.dumps(a["differential"]).encode() for a in answers])
            outputs["in_set"] = ("BOOL", prediction.in_set)
        if prediction.ood_scores is not None:
            outputs["out_of_distribution"] = ("BOOL", prediction.out_of_distribution)
            outputs["ood_score"] = ("FP32", prediction.ood_scores.astype(np.float32))
        body, header_length = encode_response(request_json, outputs, arm.version)
        if header_length is None:
            return JSONResponse(json.loads(body))
        return Response(body, media_type="application/octet-stream", headers={HEADER: str(header_length)})

    return router


async def _views(service: Service, tensors: dict) -> list[dict]:
    n_limit = service.cfg.max_images
    if "image" in tensors:
        images = tensors["image"]
        _check_count(len(images), n_limit)
        decoded = await service.decode(images)
        bad = [(i, v) for i, v in enumerate(decoded) if isinstance(v, DecodeError)]
        if bad:
            raise ApiError(400, "; ".join(f"image {i} is not a readable image: {v.reason}" for i, v in bad))
        return decoded
    pixels = tensors["pixels"]
    _check_count(len(pixels), n_limit)
    if pixels.shape[1] * pixels.shape[2] > service.cfg.max_pixels:
        raise ApiError(413, f"pixels of {pixels.shape[1]}x{pixels.shape[2]} exceed serve.max_pixels")
    return await service.pixel_views(pixels)


def _inputs(tensors: dict) -> list[tuple[int, bytes | None]]:
    """Each image's size and bytes, as the prediction log keeps them (a tensor of pixels: no file)."""
    if "image" in tensors:
        return [(len(data), data) for data in tensors["image"]]
    return [(p.nbytes, None) for p in tensors["pixels"]]


def _check_count(n: int, limit: int) -> None:
    if n > limit:
        raise ApiError(413, f"{n} images in one request: at most {limit} (serve.max_images)")


# === Requests ===


def parse_request(body: bytes, header_length: str | None) -> tuple[dict, dict]:
    """The request's JSON and its one input tensor by name: a list of bytes (`image`) or a uint8 array."""
    json_part, binary = body, b""
    if header_length is not None:
        # ASCII digits only: "²".isdigit() is True, and int() refuses it.
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
            raise ApiError(400, f"{HEADER} {header_length!r} does not fit a body of {len(body)} bytes")
        json_part, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        request = json.loads(json_part)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the inference request is not JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "the inference request is JSON nested too deeply") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise ApiError(422, "an inference request is a JSON object with an 'inputs' list")
    _parameters(request, "the request")
    tensors, offset = {}, 0
    for entry in request["inputs"]:
        name, tensor, offset = _input(entry, binary, offset)
        tensors[name] = tensor
    if len(tensors) != 1:
        raise ApiError(422, f"send exactly one input, 'image' or 'pixels' (got {sorted(tensors) or 'none'})")
    if offset != len(binary):
        raise ApiError(
            400, f"{len(binary) - offset} bytes of binary data follow the tensors the request declares"
        )
    return request, tensors


def _parameters(entry: dict, what: str) -> dict:
    """An entry's `parameters`: an object, or absent."""
    parameters = entry.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise ApiError(422, f"'parameters' of {what} must be a JSON object, not {type(parameters).__name__}")
    return parameters


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _input(entry, binary: bytes, offset: int):
    name = entry.get("name") if isinstance(entry, dict) else None
    if not isinstance(name, str) or name not in INPUTS:
        raise ApiError(
            422,
            f"unknown input {name if isinstance(entry, dict) else entry!r:.100}: "
            "send 'image' (BYTES) or 'pixels' (UINT8)",
        )
    datatype, shape = entry.get("datatype"), entry.get("shape")
    if datatype != INPUTS[name]:
        raise ApiError(422, f"input '{name}' must have datatype {INPUTS[name]}, not {datatype!r:.40}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ApiError(422, f"input '{name}' needs a shape: a list of non-negative integers")
    size = _parameters(entry, f"input '{name}'").get("binary_data_size")
    if size is not None:
        if not _is_count(size) or offset + size > len(binary):
            raise ApiError(
                400, f"input '{name}' declares {size!r} binary bytes; the body has {len(binary) - offset}"
            )
        raw, offset = binary[offset : offset + size], offset + size
        return (
            name,
            (
                _bytes_elements(raw, shape)
                if name == "image"
                else _pixels(np.frombuffer(raw, np.uint8), shape)
            ),
            offset,
        )
    if "data" not in entry:
        raise ApiError(422, f"input '{name}' has neither 'data' nor parameters.binary_data_size")
    if name == "image":
        return name, _base64_elements(entry["data"], shape), offset
    _pixel_shape(shape)
    try:
        values = np.asarray(entry["data"], dtype=object).reshape(-1)
    except (ValueError, TypeError, RecursionError):
        values = None
    # Each one an integer, checked as JSON gave it: NumPy would turn floats, booleans and numeric
    # strings into pixels silently, and wrap integers past 255.
    if values is None or not all(type(v) is int and 0 <= v <= 255 for v in values):
        raise ApiError(422, "input 'pixels' data must be integers in [0, 255]")
    return name, _pixels(values.astype(np.uint8), shape), offset


def _pixel_shape(shape: list[int]) -> None:
    if len(shape) != 4 or shape[3] != 3:
        raise ApiError(422, f"input 'pixels' has shape {shape}: expected [N, height, width, 3]")
    if shape[0] and (shape[1] == 0 or shape[2] == 0):
        raise ApiError(422, f"input 'pixels' has shape {shape}: an image needs a height and a width")


def _pixels(values: np.ndarray, shape: list[int]) -> np.ndarray:
    _pixel_shape(shape)
    if values.size != math.prod(shape):  # Python's integers: a product of huge sides cannot wrap around
        raise ApiError(400, f"input 'pixels' has {values.size} values for shape {shape}")
    return values.reshape(shape)


def _count(shape: list[int]) -> int:
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise ApiError(422, f"input 'image' has shape {shape}: expected [N] (or [N, 1])")
    return shape[0]


def _bytes_elements(raw: bytes, shape: list[int]) -> list[bytes]:
    """The binary BYTES format: each element a 4-byte little-endian length, then its bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ApiError(400, "input 'image': binary data ends inside an element's length")
        (length,) = struct.unpack_from("<I", raw, offset)
        if offset + 4 + length > len(raw):
            raise ApiError(400, "input 'image': an element's length runs past its binary data")
        items.append(raw[offset + 4 : offset + 4 + length])
        offset += 4 + length
    if len(items) != _count(shape):
        raise ApiError(400, f"input 'image' has {len(items)} elements for shape {shape}")
    return items


def _base64_elements(data, shape: list[int]) -> list[bytes]:
    if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
        raise ApiError(422, "input 'image' data in JSON must be a list of base64 strings")
    if len(data) != _count(shape):
        raise ApiError(400, f"input 'image' has {len(data)} elements for shape {shape}")
    try:
        return [base64.b64decode(d, validate=True) for d in data]
    except binascii.Error as exc:
        raise ApiError(422, f"input 'image' data is not base64: {exc}") from None


# === Responses ===


def encode_response(request: dict, outputs: dict, version: str) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the length of its JSON header."""
    wanted = request.get("outputs")
    if wanted is None:
        binary_all = bool(_parameters(request, "the request").get("binary_data_output", False))
        wanted = [{"name": name, "parameters": {"binary_data": binary_all}} for name in outputs]
    if not isinstance(wanted, list) or not all(
        isinstance(w, dict) and isinstance(w.get("name"), str) and w["name"] in outputs for w in wanted
    ):
        raise ApiError(422, f"requested outputs must be among {', '.join(outputs)}")
    entries, chunks = [], []
    for w in wanted:
        datatype, value = outputs[w["name"]]
        entry = {
            "name": w["name"],
            "datatype": datatype,
            "shape": list(np.shape(value)) if datatype != "BYTES" else [len(value)],
        }
        if _parameters(w, f"output '{w['name']}'").get("binary_data", False):
            raw = (
                b"".join(struct.pack("<I", len(v)) + v for v in value)
                if datatype == "BYTES"
                else np.ascontiguousarray(value, NUMERIC[datatype]).tobytes()
            )
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = (
                [v.decode() for v in value]
                if datatype == "BYTES"
                else np.asarray(value, NUMERIC[datatype]).reshape(-1).tolist()
            )
        entries.append(entry)
    response = {"model_name": MODEL, "model_version": version, "outputs": entries}
    if "id" in request:
        response["id"] = request["id"]
    header = json.dumps(response).encode()
    return (header + b"".join(chunks), len(header)) if chunks else (header, None)
