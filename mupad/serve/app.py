"""The FastAPI app of `mupad serve`: routes, the request-body limit and error statuses.

    GET  /                            the page (only the checkpoint's conditions appear)
    GET  /app.js, /app.css            its script and style (nothing from a CDN or the network)
    GET  /api/info                    checkpoint, conditions, limits, defaults, bundled tiles
    GET  /api/tiles/<class>/<file>    a bundled Kather tile (the picker's preview)
    POST /api/generate                multipart form (fields: service.FORM_FIELDS) ->
                                      {"job", "seed", "modalities", "images": [{"seed",
                                      "png_url", "sidecar_url", ...}], "elapsed_s"}
    GET  /api/jobs/<job>/<file>       a generated seed<s>_0.png or its sidecar seed<s>_0.json

Statuses: 400 unusable input (JSON {"detail": what to change}), 400 a Host header other
than the allowed ones (DNS rebinding), 403 a cross-origin POST, 404, 413 a body over the
limit (refused from Content-Length, or as soon as a streamed body passes it, before it is
read), 503 the generation queue is full, 500 JSON without a traceback (logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mupad.optional import require_extra

# This module is the `serve` extra's: without it, importing it is one line naming the extra.
require_extra("fastapi", extra="serve", needed_for="mupad serve")
require_extra("starlette", extra="serve", needed_for="mupad serve")
require_extra("python_multipart", extra="serve", needed_for="mupad serve")

from fastapi import FastAPI, HTTPException, Request  # noqa: E402
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402
from starlette.datastructures import Headers, MutableHeaders, UploadFile  # noqa: E402
from starlette.types import ASGIApp, Message, Receive, Scope, Send  # noqa: E402

from mupad.applications.generation_model import GenerationSettings, resolve_device
from mupad.errors import MupadError
from mupad.serve.page import SCRIPT, STYLE, render_page
from mupad.serve.service import (
    FORM_FIELDS,
    JOB_ID,
    UPLOAD_SUFFIXES,
    BusyError,
    GenerationService,
    Job,
    RequestError,
    SavedUpload,
    ServeLimits,
    upload_suffix,
)

logger = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
_OUTPUT_NAME = re.compile(r"seed[0-9]+_0\.(png|json)")  # FlatLayout names of service records
_CHUNK = 1 << 20
_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'self'"
    ),
}


class _BodyTooLarge(Exception):
    """Raised from `receive` when the streamed body passes the limit (caught below)."""


class BodySizeLimit:
    """Refuses request bodies over `max_bytes` with 413 before the app reads them: at once
    from Content-Length, or as soon as the streamed body passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit_mb = self.max_bytes / 2**20
        message = f"the request is larger than the upload limit of {limit_mb:g} MB"
        too_large = JSONResponse({"detail": message}, status_code=413)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            bad = JSONResponse({"detail": "bad Content-Length header"}, status_code=400)
            await (too_large if length.isdigit() else bad)(scope, receive, send)
            return
        received = 0
        started = False

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, watched)
        except _BodyTooLarge:
            if started:
                raise
            await too_large(scope, receive, send)


class HostCheck:
    """Answers 400 to a Host header naming another host: a page of another site whose name
    was made to resolve to this machine (DNS rebinding) cannot use the app."""

    def __init__(self, app: ASGIApp, allowed: Sequence[str]) -> None:
        self.app = app
        self.allowed = {host.lower() for host in allowed}

    def _allowed(self, header: str) -> bool:
        if "*" in self.allowed:
            return True
        try:
            return urlsplit(f"//{header}").hostname in self.allowed  # drops port, [ ] of IPv6
        except ValueError:
            return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._allowed(Headers(scope=scope).get("host", "")):
            await JSONResponse({"detail": "invalid Host header"}, 400)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class SecurityHeaders:
    """Adds `_HEADERS` (no sniffing, no framing, this origin only) to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, with_headers)


def _check_origin(request: Request) -> None:
    """Refuse form posts from other sites' pages (they could start generations here)."""
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        raise HTTPException(403, f"cross-origin request from {origin} refused")


def _save_upload(upload: UploadFile, path: Path) -> None:
    """Copy a spooled upload to `path` (blocking file I/O: run it off the event loop)."""
    upload.file.seek(0)
    with open(path, "wb") as handle:
        shutil.copyfileobj(upload.file, handle, _CHUNK)


async def _read_form(request: Request, job: Job) -> tuple[dict[str, str], dict[str, SavedUpload]]:
    """Text fields, and uploads copied into the job's inputs folder."""
    fields: dict[str, str] = {}
    uploads: dict[str, SavedUpload] = {}
    async with request.form(max_files=len(UPLOAD_SUFFIXES), max_fields=len(FORM_FIELDS)) as form:
        for name, value in form.multi_items():
            if name in fields or name in uploads:
                raise RequestError(f"field {name!r} is given twice")
            if not isinstance(value, UploadFile):
                fields[name] = value
                continue
            if not value.filename and not value.size:
                continue  # an empty file input
            path = job.inputs / f"{name}{upload_suffix(name, value.filename or '')}"
            await run_in_threadpool(_save_upload, value, path)
            if path.stat().st_size == 0:
                raise RequestError(f"the uploaded file {value.filename!r} is empty")
            uploads[name] = SavedUpload(name, str(value.filename), path)
    return fields, uploads


def create_app(
    checkpoint: Path,
    *,
    limits: ServeLimits | None = None,
    out: Path | None = None,
    allowed_hosts: Sequence[str] = LOCAL_HOSTS,
    **settings: Any,
) -> FastAPI:
    """The app for one checkpoint, loaded now (once, encoders included). `settings`:
    GenerationSettings fields (device, text_encoder, image_encoder, latents, model_mpp,
    rna_pathways, ...). `allowed_hosts`: Host headers served (DNS-rebinding guard; ("*",)
    when bound to a public address). Outputs go to `out`/<job>/, or to a temporary folder
    removed at shutdown."""
    limits = limits or ServeLimits()
    settings["device"] = resolve_device(settings.get("device", "auto"))
    generation = GenerationSettings(checkpoint=str(checkpoint), **settings)
    temporary = out is None
    root = Path(tempfile.mkdtemp(prefix="mupad-serve-")) if out is None else Path(out)
    try:
        service = GenerationService(generation, root, limits)
    except BaseException:  # a checkpoint that does not load leaves no temporary folder
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
        raise
    info = service.describe()
    page = render_page(info)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()
        if temporary:
            shutil.rmtree(root, ignore_errors=True)

    app = FastAPI(title="mupad serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        logger.exception("mupad serve: request failed", exc_info=error)
        return JSONResponse({"detail": "internal error; see the server log"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/app.js")
    def script() -> Response:
        return Response(SCRIPT, media_type="text/javascript")

    @app.get("/app.css")
    def style() -> Response:
        return Response(STYLE, media_type="text/css")

    @app.get("/api/info")
    def api_info() -> dict[str, Any]:
        return info

    @app.get("/api/tiles/{tile_class}/{name}")
    def tile(tile_class: str, name: str) -> FileResponse:
        path = service.tiles.get(f"{tile_class}/{name}")
        if path is None:
            raise HTTPException(404, "no such bundled tile")
        return FileResponse(path)

    @app.get("/api/jobs/{job_id}/{name}")
    def job_file(job_id: str, name: str) -> FileResponse:
        ok = JOB_ID.fullmatch(job_id) and _OUTPUT_NAME.fullmatch(name)
        path = service.job_file(job_id, name) if ok else None
        if path is None:
            raise HTTPException(404, "no such generated file (old results are removed)")
        kind = "image/png" if name.endswith(".png") else "application/json"
        return FileResponse(path, media_type=kind)

    @app.post("/api/generate")
    async def api_generate(request: Request) -> JSONResponse:
        _check_origin(request)
        job = service.new_job()
        uploads: dict[str, SavedUpload] = {}
        try:
            fields, uploads = await _read_form(request, job)
            prepared = await run_in_threadpool(service.prepare, fields, uploads)
            # The single worker thread runs it: off the event loop, one at a time.
            result = await asyncio.wrap_future(service.submit(job, prepared))
        except BusyError as error:
            service.discard(job)
            return JSONResponse({"detail": str(error)}, status_code=503)
        except (MupadError, FileNotFoundError) as error:  # unusable input: 400
            service.discard(job)
            return JSONResponse({"detail": service.user_message(error, uploads)}, status_code=400)
        except BaseException:
            service.discard(job)
            raise
        body = result.to_dict()
        for image in body["images"]:
            image["png_url"] = f"/api/jobs/{job.id}/{image['png']}"
            image["sidecar_url"] = f"/api/jobs/{job.id}/{image['sidecar']}"
        return JSONResponse(body)

    app.add_middleware(SecurityHeaders)
    app.add_middleware(HostCheck, allowed=allowed_hosts)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_upload_bytes)  # outermost
    return app
