"""The FastAPI app: screening, plain prediction, health, info and metrics for one guarded model.

`create_app(guard, config)` builds the app; all its state (batchers, metrics registry, worker thread)
belongs to that app. Forward passes run one at a time in one worker thread, so the guard's probe hooks
and the model are never used by two batches at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from malex import __version__
from malex.errors import ConfigError
from malex.guard import Guard, Screening
from malex.guard.fingerprint import model_fingerprint
from malex.guard.guard import in_sample_guard_scores
from malex.models.inference import predict
from malex.serve.access import AccessMiddleware
from malex.serve.batcher import MicroBatcher
from malex.serve.config import ServeConfig
from malex.serve.decode import decode_inputs, read_body
from malex.serve.errors import HTTP_CODES, ClientAborted, ServiceError, error_document
from malex.serve.limits import body_limits
from malex.serve.media import CONTENT_TYPES, check_content_type
from malex.serve.metrics import MetricsMiddleware, ServeMetrics
from malex.serve.schemas import (
    ErrorResponse,
    GuardInfo,
    HealthResponse,
    InfoResponse,
    ModelInfo,
    PredictResponse,
    ScreenResponse,
    ServeInfo,
    json_inputs_schema,
)

log = logging.getLogger("malex.serve")

#: bodies larger than this are decoded in a worker thread, off the event loop
_DECODE_INLINE_BYTES = 256 * 1024

#: the error statuses of /v1/screen and /v1/predict in the OpenAPI schema
_REQUEST_ERRORS = (400, 401, 408, 413, 415, 422, 503)

_BINARY = {"schema": {"type": "string", "format": "binary"}}


def _inputs_body(shape: tuple[int, int, int]) -> dict:
    """The OpenAPI request body of /v1/screen and /v1/predict, with examples for this model's inputs."""
    image = np.full(shape, 0.5).tolist()
    return {
        "requestBody": {
            "required": True,
            "description": "One input or a batch: .npy bytes (application/x-npy or application/octet-stream; "
                           "uint8 0..255 or float in [0, 1]), one PNG or JPEG image of the model's size, or JSON "
                           "(nested arrays, or an object with `inputs` and `dtype`).",
            "content": {
                "application/x-npy": _BINARY,
                "application/octet-stream": _BINARY,
                "image/png": _BINARY,
                "image/jpeg": _BINARY,
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/JsonInputs"},
                    "examples": {
                        "one image": {"summary": f"one {shape} image as floats",
                                      "value": {"inputs": image, "dtype": "float32"}},
                        "a batch": {"summary": "a batch of two, as a bare array", "value": [image, image]},
                    },
                },
            },
        }
    }


def _errors(*statuses: int) -> dict:
    descriptions = {400: "The body cannot be read (corrupt .npy, image or JSON; empty body), or a Host header "
                         "the service does not answer for",
                    401: "No API key, or a wrong one (when the service requires one)",
                    408: "The body did not arrive within the request-read timeout",
                    413: "Too large: body bytes, JSON elements, inputs in one request, or image pixels",
                    415: "A content type the service does not read",
                    422: "Readable inputs of the wrong shape, dtype or values, or a bad query parameter",
                    503: "Too many inputs waiting; retry after the Retry-After seconds"}
    return {s: {"model": ErrorResponse, "description": descriptions[s]} for s in statuses}


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _take(s: Screening, start: int, stop: int) -> Screening:
    """The part of a batch's screening that belongs to inputs start..stop."""
    return Screening(s.prediction[start:stop], s.verdict[start:stop], s.guard_score[start:stop],
                     {k: v[start:stop] for k, v in s.scores.items()}, {k: v[start:stop] for k, v in s.pvalues.items()})


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_document(status, code, message), status_code=status, headers=headers)


def _calibration_fpr(guard: Guard) -> float:
    """Share of the clean calibration inputs that the guard's threshold flags (each against the others)."""
    return float(guard.threshold_.flags(in_sample_guard_scores(guard.calibration_scores_, guard.config.combination)).mean())


def _info(guard: Guard, config: ServeConfig, description: dict | None, limits: dict[str, int]) -> InfoResponse:
    described = guard.describe()  # raises NotFittedError for an unfitted guard
    desc = description or {}
    return InfoResponse(
        model=ModelInfo(arch=desc.get("arch"), input_shape=list(guard.input_shape),
                        num_classes=desc.get("num_classes", getattr(guard.model, "num_classes", None)),
                        fingerprint=model_fingerprint(guard.model)),
        guard=GuardInfo(detectors=described["detectors"], fpr=described["fpr"], threshold=described["threshold"],
                        calibration_fpr=_calibration_fpr(guard), n_calibration=described["n_calibration"]),
        serve=ServeInfo(protect=config.protect, predict_endpoint=config.predict_endpoint, max_batch=config.max_batch,
                        max_wait_ms=config.max_wait_ms, max_body_bytes=max(limits.values()), body_limits=limits,
                        max_queue=config.max_queue, content_types=list(CONTENT_TYPES)),
    )


def create_app(guard: Guard, config: ServeConfig | None = None, description: dict | None = None) -> FastAPI:
    """The HTTP service for a fitted `guard` in front of its model (`guard.model`).

    `config` defaults to `ServeConfig()`; `description` is the model file's description (from
    `load_model`), shown by `GET /v1/info`. Give each app its own guard: forward passes of one app never
    overlap, but two apps sharing a guard could run its probe at the same time.
    """
    config = config or ServeConfig()
    if guard.input_shape is None or len(guard.input_shape) != 3:
        raise ConfigError("the guarded model has no (C, H, W) `input_shape`; the service needs it to read inputs")
    shape = tuple(int(s) for s in guard.input_shape)
    limits = body_limits(shape, config.max_batch, config.max_body_bytes)
    info = _info(guard, config, description, limits)
    metrics = ServeMetrics()
    batchers: dict[str, MicroBatcher] = {
        "screen": MicroBatcher(guard.screen, _take, max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
                               max_queue=config.max_queue, on_batch=metrics.batch_observer("screen"),
                               on_queue=metrics.queue_observer("screen")),
    }
    if config.predict_endpoint:
        batchers["predict"] = MicroBatcher(
            lambda x: predict(guard.model, x).numpy(), lambda r, a, b: r[a:b], max_batch=config.max_batch,
            max_wait_ms=config.max_wait_ms, max_queue=config.max_queue, on_batch=metrics.batch_observer("predict"),
            on_queue=metrics.queue_observer("predict"))

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="malex-forward")
        for batcher in batchers.values():
            await batcher.start(executor)
        try:
            yield
        finally:
            for batcher in batchers.values():
                await batcher.stop()
            executor.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="malex", version=__version__, lifespan=lifespan,
                  docs_url="/docs" if config.docs else None, redoc_url="/redoc" if config.docs else None,
                  description="Answers for an image classifier and screens every input for adversarial and "
                              "backdoor examples. Errors are JSON: `{status, code, message}`.")
    app.state.guard = guard
    app.state.config = config
    app.state.metrics = metrics
    app.state.batchers = batchers
    app.add_middleware(AccessMiddleware, config=config)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last: outermost, so refusals are counted too

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if isinstance(exc, ClientAborted):  # one line, no traceback; the answer goes nowhere
            client = request.client
            log.warning("client %s closed the connection during %s %s: %s", client.host if client else "?",
                        request.method, request.url.path, exc.message)
        headers = {503: {"Retry-After": "1"}, 408: {"Connection": "close"}}.get(exc.status)  # 408: body half-read
        return _error(exc.status, exc.code, exc.message, headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = ["{}: {}".format(".".join(map(str, e.get("loc", ()))), e.get("msg", "invalid")) for e in exc.errors()]
        return _error(422, "invalid_parameter", "; ".join(parts) or "invalid request parameters")

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error while answering a request")
        return _error(500, "internal_error", f"internal error ({type(exc).__name__}); the service keeps running")

    async def inputs_of(request: Request) -> torch.Tensor:
        content_type = request.headers.get("content-type")
        kind = check_content_type(content_type)
        body = await read_body(request, limits[kind], config.request_read_s)
        args = (body, content_type, shape)
        kwargs = {"max_batch": config.max_batch, "max_image_pixels": config.max_image_pixels}
        if len(body) > _DECODE_INLINE_BYTES:
            return await asyncio.to_thread(decode_inputs, *args, **kwargs)
        return decode_inputs(*args, **kwargs)

    @app.post("/v1/screen", response_model=ScreenResponse, responses=_errors(*_REQUEST_ERRORS),
              openapi_extra=_inputs_body(shape), summary="Screen inputs: prediction, verdict and detector scores")
    async def screen(request: Request, protect: bool = Query(
            False, description="Withhold the predictions of flagged inputs. A server started with --protect "
                              "always withholds them; this can only turn protection on.")) -> dict:
        x = await inputs_of(request)
        metrics.inputs.labels("/v1/screen").inc(int(x.shape[0]))
        result: Screening = await batchers["screen"].submit(x)
        withhold = config.protect or protect
        flagged = result.flagged
        rows = []
        for i in range(len(result)):
            held = bool(withhold and flagged[i])
            rows.append({
                "index": i, "prediction": None if held else int(result.prediction[i]), "withheld": held,
                "verdict": result.verdict[i], "flagged": bool(flagged[i]),
                "guard_score": _finite(result.guard_score[i]),
                "scores": {k: _finite(v[i]) for k, v in result.scores.items()},
                "pvalues": {k: _finite(v[i]) for k, v in result.pvalues.items()},
            })
            metrics.verdicts.labels(result.verdict[i]).inc()
        withheld = sum(r["withheld"] for r in rows)
        if withheld:
            metrics.withheld.inc(withheld)
        return {"protect": withhold, "threshold": info.guard.threshold, "results": rows}

    if config.predict_endpoint:
        @app.post("/v1/predict", response_model=PredictResponse, responses=_errors(*_REQUEST_ERRORS),
                  openapi_extra=_inputs_body(shape),
                  summary="The plain model's predictions, unscreened (for comparison)")
        async def predict_endpoint(request: Request) -> dict:
            x = await inputs_of(request)
            metrics.inputs.labels("/v1/predict").inc(int(x.shape[0]))
            labels: np.ndarray = await batchers["predict"].submit(x)
            return {"predictions": [int(v) for v in labels]}

    @app.get("/healthz", response_model=HealthResponse, summary="Liveness")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/info", response_model=InfoResponse, summary="Model, detectors, calibrated FPR and limits")
    async def get_info() -> InfoResponse:
        return info

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics",
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def get_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components["JsonInputs"] = json_inputs_schema(shape, config.max_batch)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
