"""The service's request and response models (they make the OpenAPI schema)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


def _array(dims: list[tuple[int, int]], item: dict) -> dict:
    """Nested arrays with (min, max) items per level, innermost `item`."""
    schema = item
    for low, high in reversed(dims):
        schema = {"type": "array", "items": schema, "minItems": low, "maxItems": high}
    return schema


def _layouts(shape: tuple[int, int, int], max_batch: int, item: dict) -> dict:
    """Every array layout the service reads for (C, H, W) images: one image or a batch of 1..max_batch."""
    c, h, w = ((n, n) for n in shape)
    n = (1, max_batch)
    layouts = {
        "one image (C, H, W)": [c, h, w],
        "one image (H, W, C)": [h, w, c],
        "a batch (N, C, H, W)": [n, c, h, w],
        "a batch (N, H, W, C)": [n, h, w, c],
    }
    if shape[0] == 1:
        layouts["one grey image (H, W)"] = [h, w]
        layouts["a batch of grey images (N, H, W)"] = [n, h, w]
    return {"anyOf": [{**_array(dims, item), "title": title} for title, dims in layouts.items()]}


def json_inputs_schema(shape: tuple[int, int, int], max_batch: int) -> dict:
    """The JSON request body for a model taking `shape` images: a bare array of floats in [0, 1], or
    {"inputs": ..., "dtype": "float32"} with floats, or {"inputs": ..., "dtype": "uint8"} with 0..255."""
    floats = _layouts(shape, max_batch, {"type": "number", "minimum": 0, "maximum": 1})
    whole = _layouts(shape, max_batch, {"type": "integer", "minimum": 0, "maximum": 255})
    return {
        "title": "JsonInputs",
        "description": 'A bare array of floats in [0, 1], or {"inputs": ..., "dtype": "float32"} with floats, '
                       'or {"inputs": ..., "dtype": "uint8"} with whole numbers 0..255',
        "anyOf": [
            {**floats, "title": "floats in [0, 1]"},
            {"type": "object", "title": "float32 inputs", "additionalProperties": False, "required": ["inputs"],
             "properties": {"inputs": floats, "dtype": {"const": "float32", "default": "float32"}}},
            {"type": "object", "title": "uint8 inputs", "additionalProperties": False,
             "required": ["inputs", "dtype"], "properties": {"inputs": whole, "dtype": {"const": "uint8"}}},
        ],
    }


class ErrorResponse(BaseModel):
    """Every error: the HTTP status, a stable short code, and what was wrong and what was expected."""

    status: int = Field(description="The HTTP status, repeated")
    code: str = Field(description="A stable name: corrupt_npy, corrupt_image, invalid_json, invalid_shape, "
                      "invalid_dtype, invalid_input, empty_body, body_too_large, batch_too_large, "
                      "image_too_large, too_many_elements, request_timeout, unsupported_media_type, "
                      "invalid_parameter, invalid_host, unauthorized, bad_request, not_found, "
                      "method_not_allowed, overloaded, too_many_connections, client_closed_request, internal_error")
    message: str


class ScreenResult(BaseModel):
    """The guard's answer for one input. Scores that are not finite are given as null."""

    index: int = Field(description="Position of the input in the request")
    prediction: int | None = Field(description="The model's predicted class; null when withheld")
    withheld: bool = Field(description="True when protect mode withheld the prediction of a flagged input")
    verdict: Literal["benign", "adversarial", "backdoor"]
    flagged: bool
    guard_score: float | None = Field(description="The guard's combined score; flagged above the threshold")
    scores: dict[str, float | None] = Field(description="Per detector: its score (higher = more suspicious)")
    pvalues: dict[str, float | None] = Field(description="Per detector: conformal p-value against clean inputs")


class ScreenResponse(BaseModel):
    """One result per input, in request order."""

    protect: bool = Field(description="Whether predictions of flagged inputs were withheld")
    threshold: float = Field(description="Guard scores above this are flagged")
    results: list[ScreenResult]


class PredictResponse(BaseModel):
    """The plain model's predicted class per input, unscreened."""

    predictions: list[int]


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ModelInfo(BaseModel):
    arch: str | None
    input_shape: list[int] = Field(description="(C, H, W) of one input")
    num_classes: int | None
    fingerprint: str = Field(description="SHA-256 of the model's weights")


class GuardInfo(BaseModel):
    detectors: list[str]
    fpr: float = Field(description="Target false-positive rate the guard was calibrated for")
    calibration_fpr: float = Field(description="Share of the clean calibration inputs the guard flags")
    threshold: float
    n_calibration: int = Field(description="Clean inputs the threshold was calibrated on")


class ServeInfo(BaseModel):
    protect: bool
    predict_endpoint: bool
    max_batch: int
    max_wait_ms: float
    max_body_bytes: int = Field(description="Largest body of any content type")
    body_limits: dict[str, int] = Field(description="Largest body per content type")
    max_queue: int
    content_types: list[str]


class InfoResponse(BaseModel):
    model: ModelInfo
    guard: GuardInfo
    serve: ServeInfo
