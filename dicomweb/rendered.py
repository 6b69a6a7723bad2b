"""Rendered images and thumbnails (PS3.18 10.4.1.1.3, 10.4.1.1.4): JPEG or PNG, with window, viewport, quality.

A rendered series is multipart/related, one image part per instance (its first frame) in instance-number order;
instances without pixel data (reports, presentation states) have no rendered image and are left out.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse

from dicomweb.imaging import ImagingError, NoPixelData, RenderOptions, render
from dicomweb.lookup import stored_objects
from dicomweb.urls import base_url
from dicomweb.wado import parse_accept
from storage.blobstore import BlobStoreError
from storage.ingest import Archive
from storage.query import Level, StoredObject

log = logging.getLogger(__name__)

THUMBNAIL = (128, 128)
CACHE = {"Cache-Control": "private, max-age=3600"}
_TYPES = ("image/jpeg", "image/png")


def _options(request: Request, default_viewport: tuple[int, int] | None, multipart: bool = False) -> RenderOptions:
    """Rendering parameters of the request; `multipart` for a series, whose answer is multipart/related of images."""
    params = request.query_params
    wanted = params.get("accept") or request.headers.get("accept")
    media_type = "image/jpeg"
    for media in parse_accept(wanted):
        kind = media.media_type
        if multipart and kind in ("multipart/related", "multipart/*"):
            kind = media.params.get("type", "image/jpeg").lower()
        if kind in _TYPES:
            media_type = kind
            break
        if kind in ("*/*", "image/*"):
            break
    else:
        if wanted:
            what = 'multipart/related; type="image/jpeg" or "image/png"' if multipart else "image/jpeg or image/png"
            raise HTTPException(406, f"rendered images are {what}")
    try:
        quality = int(params.get("quality", "90"))
        window = None
        if params.get("window"):
            center, width, *function = params["window"].split(",")
            window = (float(center), float(width), function[0] if function else "linear")
            if window[1] <= 0:
                raise ValueError("window width must be positive")
        viewport = default_viewport
        if params.get("viewport"):
            vw, vh, *_ = params["viewport"].split(",")
            viewport = (int(vw), int(vh))
            if min(viewport) <= 0:
                raise ValueError("viewport must be positive")
    except ValueError as exc:
        raise HTTPException(400, f"bad rendering parameter: {exc}") from exc
    if not 1 <= quality <= 100:
        raise HTTPException(400, "quality is 1 to 100")
    return RenderOptions(media_type=media_type, quality=quality, window=window, viewport=viewport)


def router(archive: Archive) -> APIRouter:
    api = APIRouter(tags=["WADO-RS rendered"])

    def pick(level: Level, filters: dict[str, str]) -> StoredObject:
        """The instance to show: itself, or the middle instance of a series (first series of a study)."""
        objects = stored_objects(archive, level, filters)
        first_series = [o for o in objects if o.series_instance_uid == objects[0].series_instance_uid]
        return first_series[len(first_series) // 2]

    def draw(obj: StoredObject, frame: int, options: RenderOptions) -> bytes:
        with archive.blobs.local_file(obj.blob_key) as path:
            return render(path, frame, options)

    async def respond(request: Request, obj: StoredObject, frame: int, viewport: tuple[int, int] | None) -> Response:
        options = _options(request, viewport)
        try:
            image = await run_in_threadpool(draw, obj, frame, options)
        except IndexError as exc:
            raise HTTPException(404, str(exc)) from exc
        except ImagingError as exc:
            raise HTTPException(406, str(exc)) from exc
        except BlobStoreError as exc:
            raise HTTPException(503, f"storage unavailable: {exc}") from exc
        return Response(image, media_type=options.media_type, headers=CACHE)

    @api.get("/studies/{study}/series/{series}/rendered", summary="Rendered series")
    async def rendered_series(request: Request, study: str, series: str) -> Response:
        objects = stored_objects(archive, "SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": series})
        options = _options(request, None, multipart=True)
        root = base_url(request)

        def first_image() -> tuple[int, bytes]:
            """The first instance that has pixels, rendered: a bad request fails here, before any byte is sent."""
            for i, obj in enumerate(objects):
                try:
                    return i, draw(obj, 1, options)
                except NoPixelData:
                    continue
            raise NoPixelData("the series has no image to render")

        try:
            start, image = await run_in_threadpool(first_image)
        except ImagingError as exc:
            raise HTTPException(406, str(exc)) from exc
        except BlobStoreError as exc:
            raise HTTPException(503, f"storage unavailable: {exc}") from exc
        boundary = uuid.uuid4().hex

        def part(obj: StoredObject, body: bytes) -> bytes:
            location = f"{root}/studies/{study}/series/{series}/instances/{obj.sop_instance_uid}/rendered"
            head = (f"--{boundary}\r\nContent-Type: {options.media_type}\r\nContent-Location: {location}\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
            return head.encode() + body + b"\r\n"

        def parts() -> Iterator[bytes]:
            yield part(objects[start], image)
            for obj in objects[start + 1 :]:
                try:
                    yield part(obj, draw(obj, 1, options))
                except NoPixelData:
                    continue
                except (ImagingError, BlobStoreError) as exc:
                    # Headers are gone already: end the body short, so the client sees it is incomplete.
                    log.error("rendered series %s stopped at %s: %s", series, obj.sop_instance_uid, exc)
                    return
            yield f"--{boundary}--\r\n".encode()

        media = f'multipart/related; type="{options.media_type}"; boundary={boundary}'
        return StreamingResponse(parts(), media_type=media, headers=CACHE)

    def instance_filters(study: str, series: str, instance: str) -> dict[str, str]:
        return {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": instance}

    @api.get("/studies/{study}/series/{series}/instances/{instance}/rendered", summary="Rendered instance")
    async def rendered(request: Request, study: str, series: str, instance: str) -> Response:
        return await respond(request, pick("IMAGE", instance_filters(study, series, instance)), 1, None)

    @api.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/rendered", summary="Rendered frame")
    async def rendered_frame(request: Request, study: str, series: str, instance: str, frame: int) -> Response:
        return await respond(request, pick("IMAGE", instance_filters(study, series, instance)), frame, None)

    @api.get("/studies/{study}/series/{series}/instances/{instance}/thumbnail", summary="Instance thumbnail")
    async def thumbnail(request: Request, study: str, series: str, instance: str) -> Response:
        return await respond(request, pick("IMAGE", instance_filters(study, series, instance)), 1, THUMBNAIL)

    @api.get("/studies/{study}/series/{series}/thumbnail", summary="Series thumbnail")
    async def series_thumbnail(request: Request, study: str, series: str) -> Response:
        filters = {"StudyInstanceUID": study, "SeriesInstanceUID": series}
        return await respond(request, pick("SERIES", filters), 1, THUMBNAIL)

    @api.get("/studies/{study}/thumbnail", summary="Study thumbnail")
    async def study_thumbnail(request: Request, study: str) -> Response:
        return await respond(request, pick("STUDY", {"StudyInstanceUID": study}), 1, THUMBNAIL)

    return api
