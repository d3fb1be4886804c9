"""The Open Inference Protocol's request parser and response encoder, from client input alone: any
body gives a parsed request or a 4xx naming the problem, never another exception (a 500).
The same inputs over HTTP are in test_serve.py."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skinray.serve.guards import ApiError
from skinray.serve.routes_oip import encode_response, parse_request

OUTPUTS = {
    "probabilities": ("FP32", np.zeros((1, 3), np.float32)),
    "label": ("BYTES", [b"a"]),
    "abstained": ("BOOL", np.zeros(1, bool)),
}
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)
shapes = st.lists(st.one_of(st.integers(-3, 2**40), st.booleans(), st.text(max_size=2)), max_size=5)
inputs = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["image", "pixels", "other"]) | json_values,
        "datatype": st.sampled_from(["BYTES", "UINT8", "FP32"]) | json_values,
        "shape": shapes | st.sampled_from([[1, 2, 2, 3], [1, 0, 4, 3], [2**40, 2**40, 2**40, 3], [1]]),
    },
    optional={
        "data": st.lists(
            st.integers(-5, 300) | st.floats() | st.booleans() | st.text(max_size=4), max_size=12
        )
        | json_values,
        "parameters": json_values
        | st.fixed_dictionaries({"binary_data_size": st.integers(-5, 64) | json_values}),
    },
)
requests_ = st.fixed_dictionaries(
    {"inputs": st.lists(inputs, max_size=3)},
    optional={
        "outputs": json_values
        | st.lists(
            st.fixed_dictionaries(
                {"name": st.sampled_from(sorted(OUTPUTS)) | json_values}, optional={"parameters": json_values}
            )
        ),
        "parameters": json_values,
        "id": json_values,
    },
)


def _answers_or_refuses(body: bytes, header: str | None = None):
    try:
        request, tensors = parse_request(body, header)
        encode_response(request, OUTPUTS, "v1")
    except ApiError as exc:
        assert 400 <= exc.status < 500 and exc.message
        return None
    (tensor,) = tensors.values()
    if isinstance(tensor, np.ndarray):  # pixels: uint8 [N, H, W, 3] with real images
        assert (
            tensor.dtype == np.uint8 and tensor.ndim == 4 and (len(tensor) == 0 or min(tensor.shape[1:3]) > 0)
        )
    return tensors


@SETTINGS
@given(json_values)
def test_any_json_is_parsed_or_refused(value):
    _answers_or_refuses(json.dumps(value).encode())


@SETTINGS
@given(requests_)
def test_any_request_shaped_json_is_parsed_or_refused(request):
    _answers_or_refuses(json.dumps(request).encode())


@SETTINGS
@given(requests_, st.binary(max_size=64), st.text(max_size=6))
def test_binary_tensors_and_any_header_length_are_parsed_or_refused(request, binary, header):
    head = json.dumps(request).encode()
    _answers_or_refuses(head + binary, str(len(head)))
    _answers_or_refuses(head + binary, header)


@pytest.mark.parametrize(
    "body, header, status, reason",
    [
        (b'{"inputs": []}', "\u00b2", 400, "does not fit"),  # "²".isdigit() is True
        (b"[" * 100_000 + b"]" * 100_000, None, 400, "nested too deeply"),
        (
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "pixels",
                            "datatype": "UINT8",
                            "shape": [1, 1, 1, 3],
                            "data": [1, 2, 3],
                            "parameters": [1],
                        }
                    ]
                }
            ).encode(),
            None,
            422,
            "must be a JSON object",
        ),
        (
            json.dumps(
                {
                    "inputs": [
                        {"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [1, 2, 300]}
                    ]
                }
            ).encode(),
            None,
            422,
            "[0, 255]",
        ),
        (
            json.dumps(
                {
                    "inputs": [
                        {"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [1.5, 2, 3]}
                    ]
                }
            ).encode(),
            None,
            422,
            "integers",
        ),
        (
            json.dumps(
                {
                    "inputs": [
                        {"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [True, 2, 3]}
                    ]
                }
            ).encode(),
            None,
            422,
            "integers",
        ),
        (
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "pixels",
                            "datatype": "UINT8",
                            "shape": [1, 1, 1, 3],
                            "data": ["1", "2", "3"],
                        }
                    ]
                }
            ).encode(),
            None,
            422,
            "integers",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 0, 5, 3], "data": []}]}
            ).encode(),
            None,
            422,
            "height and a width",
        ),
        (
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "pixels",
                            "datatype": "UINT8",
                            "shape": [2**31, 2**31, 2**31, 3],
                            "data": [1, 2, 3],
                        }
                    ]
                }
            ).encode(),
            None,
            400,
            "3 values for shape",
        ),
        (
            json.dumps({"inputs": [{"name": ["pixels"], "datatype": "UINT8", "shape": [1]}]}).encode(),
            None,
            422,
            "unknown input",
        ),
    ],
)
def test_each_body_that_reached_a_500_is_a_4xx_naming_the_problem(body, header, status, reason):
    with pytest.raises(ApiError) as caught:
        request, _ = parse_request(body, header)
        encode_response(request, OUTPUTS, "v1")
    assert caught.value.status == status and reason in caught.value.message


def test_a_list_of_output_parameters_is_refused_not_crashed():
    request = {"inputs": [], "outputs": [{"name": "label", "parameters": [True]}]}
    with pytest.raises(ApiError, match="must be a JSON object"):
        encode_response(request, OUTPUTS, "v1")
