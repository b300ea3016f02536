"""The ASGI app: routes, errors as ``{"error": "..."}``, the API key, metrics and request logs.

Routes (all but the first three need ``Authorization: Bearer <key>`` when an API key is set)::

    GET  /                              the page: pick a model, drop a photo, see the verdict
    GET  /healthz                       the process is up
    GET  /readyz                        the models are loaded and their batchers run (503 otherwise)
    GET  /metrics                       Prometheus text format
    GET  /v1/models                     name, method, backbone, image size, threshold (active, its name, all
                                        named ones), fitted, checksum, runtime
    POST /v1/models/{name}/predict      the image as the raw body or a multipart file; ?heatmap=1;
                                        ?threshold_name=NAME judges at the model's threshold of that name
    POST /v1/models/{name}/reload       load the model file again and swap it in

No route reads a server path the client names: models are the ones given at start, by name.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import re
import signal
import threading
import time
from collections.abc import Mapping
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import defectscope

from ..errors import DefectscopeError
from ..version import __version__
from .batching import ModelSlot, QueueFull
from .metrics import Metrics
from .settings import Settings
from .uploads import ServeError, decode_image, image_bytes, read_body

log = logging.getLogger("defectscope.serve")

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""Model names: what fits in a URL path segment without escaping."""
RETRY_AFTER_S = 1
PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""The page runs its own inline script and talks to this server only; nothing loads from elsewhere."""


def check_name(name: str) -> str:
    """``name`` if it is a valid model name, else DefectscopeError saying what is allowed."""
    if not NAME_PATTERN.fullmatch(name):
        raise DefectscopeError(
            f"model name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (MODEL=NAME sets it)"
        )
    return name


def create_app(models: Mapping[str, defectscope.Model], settings: Settings | None = None) -> FastAPI:
    """An app serving ``models`` (name -> loaded model; reload reads each model's own file again).

    Raises DefectscopeError for no models or a name that is not allowed."""
    settings = settings or Settings()
    if not models:
        raise DefectscopeError("no models to serve")
    metrics = Metrics()
    slots = {
        check_name(name): ModelSlot(
            name,
            model,
            metrics,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
        )
        for name, model in models.items()
    }
    state: dict[str, Any] = {"ready": False, "tasks": set()}

    async def reload_all() -> None:
        for slot in slots.values():
            try:
                await slot.reload()
            except Exception as exc:  # logged; the old model stays
                log.error("reload model=%s failed, still serving the previous model: %s", slot.name, exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        for slot in slots.values():
            slot.start()
        sighup = (
            settings.handle_sighup
            and hasattr(signal, "SIGHUP")
            and threading.current_thread() is threading.main_thread()
        )
        if sighup:

            def on_sighup() -> None:
                log.info("SIGHUP: reloading %d model(s)", len(slots))
                task = loop.create_task(reload_all())
                state["tasks"].add(task)
                task.add_done_callback(state["tasks"].discard)

            loop.add_signal_handler(signal.SIGHUP, on_sighup)
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            if sighup:
                loop.remove_signal_handler(signal.SIGHUP)
            for slot in slots.values():
                await slot.stop()

    app = FastAPI(
        title="defectscope", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.slots = slots
    app.state.metrics = metrics
    app.state.settings = settings
    app.add_middleware(_Observe, metrics=metrics)
    _add_error_handlers(app)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ServeError(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                {"WWW-Authenticate": "Bearer"},
            )

    def slot_of(request: Request, name: str) -> ModelSlot:
        request.scope.setdefault("defectscope", {})["model"] = name
        slot = slots.get(name)
        if slot is None:
            known = ", ".join(repr(n) for n in slots)
            raise ServeError(404, f"unknown model {name!r}: this server has {known}")
        return slot

    # ------------------------------------------------------------------ open routes
    page = _page_template()

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        html = page.render(
            version=__version__, auth=settings.api_key is not None, max_body_mb=f"{settings.max_body_bytes / 2**20:.3g}"
        )
        return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff"})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if state["ready"] and all(slot.running for slot in slots.values()):
            return JSONResponse({"status": "ready"})
        return JSONResponse({"error": "not ready: starting or shutting down"}, status_code=503)

    # ------------------------------------------------------------------ routes behind the key
    api = APIRouter(dependencies=[Depends(authorize)])

    @api.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @api.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"models": [_describe(name, slot.model) for name, slot in slots.items()]}

    @api.post("/v1/models/{name}/predict")
    async def predict(
        name: str, request: Request, heatmap: bool = False, threshold_name: str | None = None
    ) -> JSONResponse:
        start = time.perf_counter()
        slot = slot_of(request, name)
        if threshold_name is not None:  # before the upload is read: an unknown name lists the model's names
            try:
                slot.model.named_threshold(threshold_name)
            except DefectscopeError as exc:
                raise ServeError(404, f"model {name!r}: {exc}") from None
        body = await read_body(request, settings.max_body_bytes)
        data, filename = await image_bytes(request, body)
        image = await run_in_threadpool(decode_image, data, filename, settings.max_pixels)
        del body, data
        try:
            future = slot.submit(image, maps=heatmap, threshold_name=threshold_name)
        except QueueFull as exc:
            raise ServeError(503, str(exc), {"Retry-After": str(RETRY_AFTER_S)}) from None
        except DefectscopeError as exc:  # a reload since the check above dropped the name
            raise ServeError(404, f"model {name!r}: {exc}") from None
        remaining = settings.timeout_s - (time.perf_counter() - start)
        try:
            result, batch = await asyncio.wait_for(future, max(remaining, 0.0))
        except asyncio.TimeoutError:
            raise ServeError(
                504, f"no answer within {settings.timeout_s:g} s, the server's limit (--timeout-s)"
            ) from None
        except DefectscopeError as exc:  # a reload while it waited dropped the threshold name
            raise ServeError(404, f"model {name!r}: {exc}") from None
        request.scope["defectscope"]["batch"] = batch
        if not result.ok:  # the API's message names the image by its place in the batch: name it as sent
            raise ServeError(400, _renamed(result.error, result.name, filename))
        answer: dict[str, Any] = {
            "model": name,
            "score": float(result.score),
            "judgement": int(result.judgement),
            "threshold": float(result.threshold),
            "threshold_name": threshold_name if threshold_name is not None else slot.model.threshold_name,
            "normalized_score": _float_or_none(result.normalized_score),
            "notes": list(result.notes),  # what the loader noticed: extra frames, transparency, odd ranges
        }
        if result.regions is not None:  # a model judged by region: what the judgement rests on
            answer["regions"] = dict(result.regions)
        if heatmap:
            answer["heatmap"] = await run_in_threadpool(_overlay_png_base64, result)
        answer["latency_ms"] = round(1000 * (time.perf_counter() - start), 2)
        return JSONResponse(answer)

    @api.post("/v1/models/{name}/reload")
    async def reload(name: str, request: Request) -> JSONResponse:
        slot = slot_of(request, name)
        old = slot.model.checksum
        try:
            model = await slot.reload()
        except Exception as exc:
            raise ServeError(500, f"reload failed, still serving the previous model (checksum {old}): {exc}") from None
        return JSONResponse({"model": name, "reloaded": True, "previous_checksum": old} | _describe(name, model))

    app.include_router(api)
    return app


def _describe(name: str, model: defectscope.Model) -> dict[str, Any]:
    info = model.info()
    return {
        "name": name,
        "method": info["method"],
        "backbone": info["backbone"],
        "image_size": info["image_size"],
        "layer_weighting": info["layer_weighting"],
        "threshold": info["threshold"],
        "threshold_name": info["threshold_name"],
        "thresholds": info["thresholds"],
        "fitted": info["fitted"],
        "checksum": info["checksum"],
        "runtime": info["runtime"],
        "runtime_reason": info["runtime_reason"],
    }


def _float_or_none(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def _renamed(error: str, api_name: str, name: str) -> str:
    prefix = f"{api_name}: "
    return f"{name}: {error[len(prefix) :]}" if error.startswith(prefix) else error


def _overlay_png_base64(result: defectscope.Result) -> str:
    """The result's overlay (heatmap over the photo, region outlined, legend strip) as base64 PNG."""
    buffer = io.BytesIO()
    Image.fromarray(result.overlay()).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _page_template() -> Any:
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("defectscope.serve", "templates"), autoescape=select_autoescape(["html"]))
    return env.get_template("index.html")


def _add_error_handlers(app: FastAPI) -> None:
    """Every answer other than 200 is ``{"error": "<one line>"}``."""

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> JSONResponse:
        request.scope.setdefault("defectscope", {})["error"] = exc.message
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        request.scope.setdefault("defectscope", {})["error"] = message
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()]
        message = "invalid request: " + "; ".join(parts)
        request.scope.setdefault("defectscope", {})["error"] = message
        return JSONResponse({"error": message}, status_code=422)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)


class _Observe:
    """ASGI middleware: counts and times every HTTP request by its route template and status, and
    logs one line per request (model, status, latency, batch size) at INFO."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        note = scope.setdefault("defectscope", {})

        async def observed_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            elapsed = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            error = f" error={json.dumps(note['error'])}" if "error" in note else ""
            log.info(
                "request method=%s route=%s model=%s status=%d latency_ms=%.1f batch=%s%s",
                scope["method"],
                route,
                note.get("model", "-"),
                status,
                1000 * elapsed,
                note.get("batch", "-"),
                error,
            )
