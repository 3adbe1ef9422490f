"""The HTTP API of srt-serve (FastAPI; OpenAPI docs at /docs) and the page it serves at /.

Every answer that is not a result is a status and a one-line reason in `detail`: an unknown
image 404, an upload that is no image 400 (413 when too big in bytes, pixels or model input),
a full queue 503, a bad parameter 422. A request never reaches a traceback, and no answer shows
the server's paths. /docs (Swagger UI) and /redoc are served from fastapi-offline's own copies
(no CDN: an air-gapped cluster sees them too).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline import __version__
from pipeline.commands.service.batching import Batcher, Busy
from pipeline.commands.service.catalog import Catalog, ServiceError, public

STATIC = Path(__file__).resolve().parent / "static"
MAX_K = 1000
SEARCH_QUEUE = 4096  # query vectors waiting for a search: bounds memory, never the model
FORM_OVERHEAD = 64 << 10  # multipart headers around an upload, in bytes
DETAIL_CHARACTERS = 500  # the longest reason an answer gives


class Bound:
    """At most `limit` requests of one kind at once (each runs the model); one more is refused."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit, self.what, self.running, self.lock = limit, what, 0, threading.Lock()

    def __enter__(self) -> None:
        with self.lock:
            if self.running >= self.limit:
                raise ServiceError(503, f"{self.limit} {self.what} are being drawn (--max-concurrent); try again shortly")
            self.running += 1

    def __exit__(self, *_: object) -> None:
        with self.lock:
            self.running -= 1


def detail(text: str) -> dict[str, str]:
    """An answer's reason: one line, without the server's paths, cut at DETAIL_CHARACTERS."""
    line = public(" ".join(text.split()))
    return {"detail": line if len(line) <= DETAIL_CHARACTERS else line[: DETAIL_CHARACTERS - 3] + "..."}


class BodyLimit:
    """413 for a request body over `limit` bytes: before reading it when its Content-Length says so,
    else (chunked) as soon as it grows past the limit. Pure ASGI: nothing added per request."""

    def __init__(self, app: ASGIApp, limit: int, detail: str) -> None:
        self.app, self.limit, self.detail = app, limit, detail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            await JSONResponse({"detail": self.detail}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def bounded() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, self.detail)
            return message

        await self.app(scope, bounded, send)


def create_app(catalog: Catalog, *, max_upload_bytes: int = 20 << 20, max_concurrent: int = 8) -> FastAPI:
    """The service over `catalog`: uploads up to `max_upload_bytes`, at most `max_concurrent`
    uploaded images waiting for the model, and at most as many feature pictures drawn at once
    (more are answered 503)."""
    app: FastAPI = FastAPIOffline(
        title="srt-serve",
        version=__version__,
        description="Search SRT feature indexes by image and look at the neighbours and their feature maps.",
        static_url="/docs-assets",
    )
    drawing = Bound(max_concurrent, "feature pictures")
    searches = Batcher(catalog.search, bound=SEARCH_QUEUE, name="srt-serve-search")
    uploads = Batcher(catalog.describe, bound=max_concurrent, name="srt-serve-model")
    app.state.searches, app.state.uploads = searches, uploads
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(ServiceError)
    async def refused(_: Request, error: ServiceError) -> JSONResponse:
        return JSONResponse(detail(str(error)), status_code=error.status)

    @app.exception_handler(Busy)
    async def busy(_: Request, error: Busy) -> JSONResponse:
        return JSONResponse(detail(str(error)), status_code=503)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or e['loc'][0]}: {e['msg']}" for e in error.errors())
        return JSONResponse(detail(problems), status_code=422)

    app.add_middleware(BodyLimit, limit=max_upload_bytes + FORM_OVERHEAD, detail=f"the request is over {max_upload_bytes} bytes, the largest upload (--max-upload-mb)")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:  # unknown routes, methods; chunked bodies too large
        return JSONResponse(detail(str(error.detail)), status_code=error.status_code, headers=error.headers)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/indexes", summary="The indexes served")
    async def indexes() -> list[dict]:
        return [
            {"name": s.name, "vectors": s.index.index.ntotal, "descriptor": s.index.sidecar["descriptor"], "pictures": s.has_pictures}
            for s in catalog.served.values()
        ]

    @app.get("/api/summary", summary="What an index's store holds and how it was made")
    def summary(index: str | None = None) -> dict:
        return catalog.summary(catalog.get(index))

    @app.get("/api/search", summary="Neighbours of an image of the store (image_id, URI or file name)", response_class=JSONResponse)
    async def search_stored(image: str, k: int = Query(10, ge=1, le=MAX_K), index: str | None = None) -> JSONResponse:
        served = catalog.get(index)
        if served.index.keeps_vectors:  # in memory: answered on the event loop
            image_id, vector = catalog.stored_query(served, image)
        else:  # read from the store
            image_id, vector = await run_in_threadpool(catalog.stored_query, served, image)
        results = await asyncio.wrap_future(searches.submit((served.name, vector, k)))
        return JSONResponse({"index": served.name, "query": image_id, "results": results})  # plain JSON already

    @app.post("/api/search", summary="Neighbours of an uploaded image, through the store's own model")
    async def search_upload(image: UploadFile = File(...), k: int = Query(10, ge=1, le=MAX_K), index: str | None = None) -> dict:
        served = catalog.get(index)
        blob = await image.read(max_upload_bytes + 1)
        if len(blob) > max_upload_bytes:
            raise ServiceError(413, f"the upload is over {max_upload_bytes} bytes (--max-upload-mb)")
        if not blob:
            raise ServiceError(400, "the upload is empty")
        prepared = await run_in_threadpool(catalog.prepare_upload, served, blob)
        vector = await asyncio.wrap_future(uploads.submit((served.name, prepared)))
        results = await asyncio.wrap_future(searches.submit((served.name, vector, k)))
        return {"index": served.name, "query": image.filename or "upload", "results": results}

    @app.get("/api/thumbnail", summary="A JPEG thumbnail of an image of the store", response_class=Response)
    def thumbnail(image: str, size: int = Query(192, ge=16, le=1024), index: str | None = None) -> Response:
        return Response(catalog.thumbnail(catalog.get(index), image, size), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/pictures", summary="Original | plain | SRT feature maps of an image of the store (PNG)", response_class=Response)
    def pictures(image: str, index: str | None = None) -> Response:
        served = catalog.get(index)
        with drawing:
            picture = catalog.pictures(served, image)
        return Response(picture, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    return app
