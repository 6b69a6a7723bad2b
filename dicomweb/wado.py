"""WADO-RS (PS3.18 10.4): instances, metadata, frames and bulk data.

Objects go out as stored, byte for byte, streamed from the blob store; frames are cut from the stored pixel data
without decoding it. Transcoding is not there yet: a request for another transfer syntax gets 406 with the reason.
Metadata comes from a cache keyed by each object's SHA-256 and carries an ETag.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response, StreamingResponse
from pydicom import dcmread
from sqlalchemy.exc import SQLAlchemyError

from dicomweb import imaging
from dicomweb.lookup import stored_objects
from dicomweb.urls import base_url
from storage import metadata, pixels
from storage.blobstore import BlobStoreError
from storage.ingest import Archive
from storage.query import Level, StoredObject

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


def _frame_syntax(accept: list[MediaRange]) -> str | None:
    """Transfer syntax wanted for frames ('*' for as stored), None if octet-stream parts are not acceptable."""
    for media in accept:
        if media.media_type in ("*/*", "multipart/*", "application/octet-stream"):
            return media.params.get("transfer-syntax", EXPLICIT_VR_LITTLE_ENDIAN)
        if media.media_type == "multipart/related":
            part_type = media.params.get("type", "application/octet-stream").lower()
            if part_type in ("application/octet-stream", "*/*", "application/*"):
                return media.params.get("transfer-syntax", EXPLICIT_VR_LITTLE_ENDIAN)
    return None


def router(archive: Archive) -> APIRouter:
    api = APIRouter(tags=["WADO-RS"])

    def find_objects(level: Level, filters: dict[str, str]) -> list[StoredObject]:
        return stored_objects(archive, level, filters)

    def retrieve(request: Request, level: Level, filters: dict[str, str]) -> StreamingResponse:
        wanted = _wanted_syntax(parse_accept(request.headers.get("accept")))
        if wanted is None:
            raise HTTPException(406, 'retrieve answers multipart/related; type="application/dicom"')
        objects = find_objects(level, filters)
        transcode = {o.sop_instance_uid for o in objects if wanted not in ("*", o.transfer_syntax_uid)}
        if transcode and wanted != EXPLICIT_VR_LITTLE_ENDIAN:
            raise HTTPException(
                406, f"objects can be sent as stored (transfer-syntax=*) or in {EXPLICIT_VR_LITTLE_ENDIAN}"
            )
        boundary = uuid.uuid4().hex
        media = f'multipart/related; type="application/dicom"; boundary={boundary}'
        if transcode:
            # Decode up front, so a failure is a 406 and not a stream broken halfway.
            try:
                bodies = {
                    o.sop_instance_uid: _transcoded(archive, o) for o in objects if o.sop_instance_uid in transcode
                }
            except imaging.ImagingError as exc:
                raise HTTPException(406, f"{exc}; ask for transfer-syntax=* to get the objects as stored") from exc
            return StreamingResponse(_multipart(archive, objects, boundary, bodies), media_type=media)
        return StreamingResponse(_multipart(archive, objects, boundary), media_type=media)

    def metadata_of(request: Request, level: Level, filters: dict[str, str]) -> Response:
        objects = find_objects(level, filters)
        root = base_url(request)
        etag = '"' + hashlib.sha256("|".join([root, *(o.sha256 for o in objects)]).encode()).hexdigest()[:32] + '"'
        if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            return Response(status_code=304, headers={"ETag": etag})
        try:
            texts = metadata.headers(archive.engine, archive.blobs, objects)
        except (BlobStoreError, SQLAlchemyError) as exc:
            raise HTTPException(503, f"storage unavailable: {exc}") from exc
        body = ("[" + ",".join(texts) + "]").replace(metadata.ROOT, root)
        return Response(body.encode("utf-8"), media_type="application/dicom+json",
                        headers={"ETag": etag, "Cache-Control": "private, max-age=0, must-revalidate"})  # fmt: skip

    @api.get("/studies/{study}/metadata", summary="Study metadata")
    def study_metadata(request: Request, study: str) -> Response:
        return metadata_of(request, "STUDY", {"StudyInstanceUID": study})

    @api.get("/studies/{study}/series/{series}/metadata", summary="Series metadata")
    def series_metadata(request: Request, study: str, series: str) -> Response:
        return metadata_of(request, "SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": series})

    @api.get("/studies/{study}/series/{series}/instances/{instance}/metadata", summary="Instance metadata")
    def instance_metadata(request: Request, study: str, series: str, instance: str) -> Response:
        filters = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": instance}
        return metadata_of(request, "IMAGE", filters)

    def pixel_parts(request: Request, study: str, series: str, instance: str, numbers: list[int] | None) -> Response:
        filters = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": instance}
        [obj] = find_objects("IMAGE", filters)
        accept = parse_accept(request.headers.get("accept"))
        wanted = _frame_syntax(accept)
        if wanted is None:
            raise HTTPException(406, 'frames are answered as multipart/related; type="application/octet-stream"')
        try:
            with archive.blobs.local_file(obj.blob_key) as path:
                info = pixels.layout(path)
                wanted_numbers = list(numbers or range(1, info.number_of_frames + 1))
                decode = wanted != "*" and (info.encapsulated or obj.transfer_syntax_uid == "1.2.840.10008.1.2.2")
                if decode and wanted != EXPLICIT_VR_LITTLE_ENDIAN:
                    raise HTTPException(406, f"frames can be sent as stored or in {EXPLICIT_VR_LITTLE_ENDIAN}")
                if decode:
                    frames = [imaging.native_frame_bytes(path, n) for n in wanted_numbers]
                else:
                    with open(path, "rb") as fp:
                        frames = [pixels.read_frame(fp, info, n) for n in wanted_numbers]
        except IndexError as exc:
            raise HTTPException(404, str(exc)) from exc
        except imaging.ImagingError as exc:
            raise HTTPException(406, f"{exc}; ask for transfer-syntax=* to get the frames as stored") from exc
        except pixels.PixelDataError as exc:
            raise HTTPException(404, str(exc)) from exc
        except BlobStoreError as exc:
            raise HTTPException(503, f"storage unavailable: {exc}") from exc
        syntax = EXPLICIT_VR_LITTLE_ENDIAN if decode else obj.transfer_syntax_uid
        return _octet_parts(frames, f"application/octet-stream; transfer-syntax={syntax}")

    @api.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frame_list}", summary="Frames")
    def frames(request: Request, study: str, series: str, instance: str, frame_list: str) -> Response:
        try:
            numbers = [int(n) for n in frame_list.split(",") if n.strip()]
        except ValueError:
            raise HTTPException(400, f"frame numbers must be whole numbers: {frame_list}") from None
        if not numbers:
            raise HTTPException(400, "no frame number given")
        return pixel_parts(request, study, series, instance, numbers)

    @api.get("/studies/{study}/series/{series}/instances/{instance}/bulkdata/7FE00010", summary="Pixel data")
    def pixel_bulkdata(request: Request, study: str, series: str, instance: str) -> Response:
        return pixel_parts(request, study, series, instance, None)

    @api.get("/studies/{study}/series/{series}/instances/{instance}/bulkdata/{tag}", summary="Bulk data")
    def bulkdata(request: Request, study: str, series: str, instance: str, tag: str) -> Response:
        filters = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": instance}
        [obj] = find_objects("IMAGE", filters)
        try:
            number = int(tag, 16)
        except ValueError:
            raise HTTPException(400, f"not a tag: {tag}") from None
        try:
            with archive.blobs.local_file(obj.blob_key) as path:
                ds = dcmread(path, stop_before_pixels=True, specific_tags=[number])
                elem = ds.get(number)
                data = elem.value if elem is not None and isinstance(elem.value, bytes) else None
        except BlobStoreError as exc:
            raise HTTPException(503, f"storage unavailable: {exc}") from exc
        if data is None:
            raise HTTPException(404, f"no bulk data at tag {tag}")
        return _octet_parts([data], "application/octet-stream")

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


def _octet_parts(parts: list[bytes], part_type: str) -> Response:
    """A multipart/related response of octet-stream parts (frames, bulk data), each with its length."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        f"--{boundary}\r\nContent-Type: {part_type}\r\nContent-Length: {len(p)}\r\n\r\n".encode() + p + b"\r\n"
        for p in parts
    )
    body += f"--{boundary}--\r\n".encode()
    return Response(body, media_type=f'multipart/related; type="application/octet-stream"; boundary={boundary}')


def _transcoded(archive: Archive, obj: StoredObject) -> bytes:
    with archive.blobs.local_file(obj.blob_key) as path:
        return imaging.transcoded_to_explicit_le(path)


def _multipart(
    archive: Archive, objects: list[StoredObject], boundary: str, bodies: dict[str, bytes] | None = None
) -> Iterator[bytes]:
    for obj in objects:
        body = (bodies or {}).get(obj.sop_instance_uid)
        syntax = EXPLICIT_VR_LITTLE_ENDIAN if body is not None else obj.transfer_syntax_uid
        size = len(body) if body is not None else obj.size
        yield (
            f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={syntax}\r\n"
            f"Content-Length: {size}\r\n\r\n"
        ).encode("ascii")
        if body is not None:
            yield body
        else:
            try:
                with archive.blobs.open(obj.blob_key) as fp:
                    while chunk := fp.read(1024 * 1024):
                        yield chunk
            except BlobStoreError:
                # Headers are gone already: end the stream short, so the client sees a broken multipart body.
                return
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")
