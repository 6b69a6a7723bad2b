"""WADO-RS retrieve (PS3.18 10.4) of studies, series and instances as multipart/related application/dicom.

Objects go out as stored, byte for byte, streamed from the blob store. Transcoding is not there yet: a request
whose transfer syntax differs from the stored one gets 406 with the reason.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import SQLAlchemyError

from storage.blobstore import BlobStoreError
from storage.ingest import Archive
from storage.query import Level, QueryError, StoredObject, objects_for

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


@dataclass(frozen=True)
class MediaRange:
    media_type: str
    params: dict[str, str]
    q: float


def parse_accept(header: str | None) -> list[MediaRange]:
    """Media ranges of an Accept header, best first; parameters may be quoted or not, q-values honoured."""
    ranges: list[MediaRange] = []
    for part in (header or "*/*").split(","):
        pieces = [p.strip() for p in part.split(";") if p.strip()]
        if not pieces:
            continue
        params: dict[str, str] = {}
        for piece in pieces[1:]:
            name, _, value = piece.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 1.0
        ranges.append(MediaRange(pieces[0].lower(), params, q))
    return sorted((r for r in ranges if r.q > 0), key=lambda r: -r.q)


def _wanted_syntax(accept: list[MediaRange]) -> str | None:
    """The transfer syntax asked for ('*' for as stored), or None if nothing acceptable is offered."""
    for media in accept:
        if media.media_type in ("*/*", "multipart/*"):
            return EXPLICIT_VR_LITTLE_ENDIAN
        if media.media_type == "multipart/related":
            part_type = media.params.get("type", "application/dicom").lower()
            if part_type in ("application/dicom", "application/*", "*/*"):
                return media.params.get("transfer-syntax", EXPLICIT_VR_LITTLE_ENDIAN)
        if media.media_type == "application/dicom":
            return media.params.get("transfer-syntax", EXPLICIT_VR_LITTLE_ENDIAN)
    return None


def router(archive: Archive) -> APIRouter:
    api = APIRouter(tags=["WADO-RS"])

    def retrieve(request: Request, level: Level, filters: dict[str, str]) -> StreamingResponse:
        wanted = _wanted_syntax(parse_accept(request.headers.get("accept")))
        if wanted is None:
            raise HTTPException(406, 'retrieve answers multipart/related; type="application/dicom"')
        try:
            with archive.engine.connect() as conn:
                objects = objects_for(conn, level, filters)
        except QueryError as exc:
            raise HTTPException(400, str(exc)) from exc
        except SQLAlchemyError as exc:
            raise HTTPException(503, "database unavailable") from exc
        if not objects:
            raise HTTPException(404, "no such " + {"STUDY": "study", "SERIES": "series", "IMAGE": "instance"}[level])
        if wanted != "*":
            other = sorted({o.transfer_syntax_uid for o in objects if o.transfer_syntax_uid != wanted})
            if other:
                raise HTTPException(
                    406,
                    f"stored in {', '.join(other)}; transcoding to {wanted} is not available yet: "
                    "ask for transfer-syntax=* to get the objects as stored",
                )
        boundary = uuid.uuid4().hex
        media = f'multipart/related; type="application/dicom"; boundary={boundary}'
        return StreamingResponse(_multipart(archive, objects, boundary), media_type=media)

    @api.get("/studies/{study}", summary="Retrieve a study")
    def study(request: Request, study: str) -> StreamingResponse:
        return retrieve(request, "STUDY", {"StudyInstanceUID": study})

    @api.get("/studies/{study}/series/{series}", summary="Retrieve a series")
    def series(request: Request, study: str, series: str) -> StreamingResponse:
        return retrieve(request, "SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": series})

    @api.get("/studies/{study}/series/{series}/instances/{instance}", summary="Retrieve an instance")
    def instance(request: Request, study: str, series: str, instance: str) -> StreamingResponse:
        filters = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": instance}
        return retrieve(request, "IMAGE", filters)

    return api


def _multipart(archive: Archive, objects: list[StoredObject], boundary: str) -> Iterator[bytes]:
    for obj in objects:
        yield (
            f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={obj.transfer_syntax_uid}\r\n"
            f"Content-Length: {obj.size}\r\n\r\n"
        ).encode("ascii")
        try:
            with archive.blobs.open(obj.blob_key) as fp:
                while chunk := fp.read(1024 * 1024):
                    yield chunk
        except BlobStoreError:
            # Headers are gone already: end the stream short, so the client sees a broken multipart body.
            return
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")
