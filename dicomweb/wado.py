"""WADO-RS (PS3.18 10.4): instances, metadata, frames and bulk data.

Objects go out as stored, byte for byte, streamed from the blob store (`transfer-syntax=*`, or the stored syntax);
frames are cut from the stored pixel data without decoding it (a deflated object's while inflating it). Another
transfer syntax is produced by transcoding (dicomweb.imaging: the uncompressed little-endian ones, and lossless
re-encoding into RLE, JPEG 2000 and JPEG-LS); anything else gets 406 with the reason. Metadata comes from a cache
keyed by each object's SHA-256 and carries an ETag.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response, StreamingResponse
from pydicom import dcmread
from sqlalchemy.exc import SQLAlchemyError

from dicomweb import imaging
from dicomweb.lookup import stored_objects
from dicomweb.urls import base_url
from storage import metadata, pixels
from storage.blobstore import BlobStoreError, FileBlobStore
from storage.ingest import Archive
from storage.query import Level, StoredObject

log = logging.getLogger(__name__)

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"


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


OCTET_STREAM = "application/octet-stream"
# Compressed frames' media types (PS3.18 8.7.3.5.2) with the transfer syntax each means when none is named.
FRAME_MEDIA = {
    "image/jpeg": "1.2.840.10008.1.2.4.50",
    "image/dicom-rle": "1.2.840.10008.1.2.5",
    "image/x-dicom-rle": "1.2.840.10008.1.2.5",
    "image/jls": "1.2.840.10008.1.2.4.80",
    "image/jp2": "1.2.840.10008.1.2.4.90",
    "image/jpx": "1.2.840.10008.1.2.4.92",
    "image/jphc": "1.2.840.10008.1.2.4.201",
}
_JPEG = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70")
_HTJ2K = ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203")
SYNTAX_MEDIA = {
    **dict.fromkeys(_JPEG, "image/jpeg"),
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    **dict.fromkeys(_HTJ2K, "image/jphc"),
}
# Frames asked in any of these are native little-endian bytes, answered as Explicit VR Little Endian: PS3.18 sends
# uncompressed frames as application/octet-stream in 1.2.840.10008.1.2.1, and the other two differ from it only in
# how the data set around the pixel data is encoded (implicit VRs, or the whole data set deflated), which frames
# cut out of it do not carry.
NATIVE_LE = (EXPLICIT_VR_LITTLE_ENDIAN, "1.2.840.10008.1.2", DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN)


def _frame_syntax(accept: list[MediaRange]) -> tuple[str, str] | None:
    """(part media type, transfer syntax) wanted for frames ('*' for as stored), None if nothing we answer fits.

    Frames come as application/octet-stream (native, or compressed as a `transfer-syntax` parameter says) or as
    the compressed media types (image/jp2, image/dicom-rle...).
    """
    for media in accept:
        kind = media.media_type
        if kind == "multipart/related":
            kind = media.params.get("type", OCTET_STREAM).lower()
        if kind in ("*/*", "multipart/*", "application/*", OCTET_STREAM):
            return OCTET_STREAM, media.params.get("transfer-syntax", EXPLICIT_VR_LITTLE_ENDIAN)
        if kind in FRAME_MEDIA:
            return kind, media.params.get("transfer-syntax", FRAME_MEDIA[kind])
    return None


class _Bodies:
    """Recently answered metadata bodies by ETag, bounded in bytes.

    The ETag hashes the metadata cache's format, the URL root and the SHA-256 of every object in the answer, so a
    body is found again only for exactly the same objects seen through the same root by code of the same format: an
    added, corrected or deleted instance is a new key.
    Reading a study's cached headers from the index and assembling them is most of a metadata request's time;
    viewers ask for the same study's metadata again and again.
    """

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, etag: str) -> bytes | None:
        with self._lock:
            body = self._items.get(etag)
            if body is not None:
                self._items.move_to_end(etag)
            return body

    def put(self, etag: str, body: bytes) -> None:
        if len(body) > self.max_bytes // 4:
            return
        with self._lock:
            if etag in self._items:
                return
            self._items[etag] = body
            self._size += len(body)
            while self._size > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._size -= len(old)


def router(archive: Archive) -> APIRouter:
    api = APIRouter(tags=["WADO-RS"])
    bodies = _Bodies()

    def find_objects(level: Level, filters: dict[str, str]) -> list[StoredObject]:
        return stored_objects(archive, level, filters)

    def retrieve(request: Request, level: Level, filters: dict[str, str]) -> StreamingResponse:
        wanted = _wanted_syntax(parse_accept(request.headers.get("accept")))
        if wanted is None:
            raise HTTPException(406, 'retrieve answers multipart/related; type="application/dicom"')
        objects = find_objects(level, filters)
        transcode = [o for o in objects if wanted not in ("*", o.transfer_syntax_uid)]
        ready: dict[str, bytes] = {}
        if transcode:
            problem = imaging.transcoding_problem(wanted)
            if problem:
                offer = ", ".join(imaging.transcodable_syntaxes())
                raise HTTPException(406, f"{problem}; objects can be sent as stored (transfer-syntax=*) or in {offer}")
            # The first one up front, so a failure is a 406 and not a stream broken halfway; the rest as they go.
            try:
                ready[transcode[0].sop_instance_uid] = _transcoded(archive, transcode[0], wanted)
            except imaging.ImagingError as exc:
                raise HTTPException(406, f"{exc}; ask for transfer-syntax=* to get the objects as stored") from exc
            except BlobStoreError as exc:
                raise HTTPException(503, f"storage unavailable: {exc}") from exc
        boundary = uuid.uuid4().hex
        media = f'multipart/related; type="application/dicom"; boundary={boundary}'
        parts: Iterator[memoryview] | AsyncIterator[bytes | memoryview]
        if not transcode and isinstance(archive.blobs, FileBlobStore):
            parts = _mapped_multipart(archive.blobs, objects, boundary)
        else:
            parts = _multipart(archive, objects, boundary, wanted, ready)
        headers = {}
        if not transcode:
            # Every part's size is known: a Content-Length spares the client parsing chunked framing (which costs
            # a Python client more than the bytes). A blob that cannot be read ends the body short, as before.
            headers["Content-Length"] = str(_multipart_length(objects, boundary))
        return StreamingResponse(parts, media_type=media, headers=headers)

    def metadata_of(request: Request, level: Level, filters: dict[str, str]) -> Response:
        objects = find_objects(level, filters)
        root = base_url(request)
        # The cache's format is in the ETag: a body computed by older code is neither revalidated nor kept.
        key = "|".join([f"v{metadata.FORMAT}", root, *(o.sha256 for o in objects)])
        etag = '"' + hashlib.sha256(key.encode()).hexdigest()[:32] + '"'
        if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            return Response(status_code=304, headers={"ETag": etag})
        body = bodies.get(etag)
        if body is None:
            try:
                texts = metadata.headers(archive.engine, archive.blobs, objects)
            except (BlobStoreError, SQLAlchemyError) as exc:
                raise HTTPException(503, f"storage unavailable: {exc}") from exc
            body = ("[" + ",".join(texts) + "]").replace(metadata.ROOT, root).encode("utf-8")
            bodies.put(etag, body)
        return Response(body, media_type="application/dicom+json",
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
        asked = _frame_syntax(accept)
        if asked is None:
            raise HTTPException(406, 'frames are answered as multipart/related; type="application/octet-stream" '
                                     "or a compressed image type (image/jp2, image/dicom-rle...)")  # fmt: skip
        media, wanted = asked
        stored = obj.transfer_syntax_uid
        if wanted not in ("*", stored, *NATIVE_LE):
            problem = imaging.transcoding_problem(wanted)
            if problem:
                offer = ", ".join(u for u in imaging.transcodable_syntaxes() if u not in imaging.NATIVE[1:])
                raise HTTPException(406, f"{problem}; frames can be sent as stored (transfer-syntax=*) or in {offer}")
        if (
            media != OCTET_STREAM
            and wanted not in ("*", stored)
            and SYNTAX_MEDIA.get(wanted) != SYNTAX_MEDIA[FRAME_MEDIA[media]]
        ):
            raise HTTPException(406, f"{media} frames cannot be in transfer syntax {wanted}")
        try:
            with archive.blobs.local_file(obj.blob_key) as path:
                if wanted not in ("*", stored, *NATIVE_LE):
                    syntax = wanted
                    frames = imaging.encoded_frames(path, numbers, wanted)
                elif stored == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
                    # Deflate compresses the whole data set, not the pixel data: a frame has no deflated form, and
                    # "as stored" (transfer-syntax=*, or the stored syntax named) means its native bytes, what a
                    # client needs and what the stored file holds once inflated, labelled Explicit VR Little Endian.
                    syntax = EXPLICIT_VR_LITTLE_ENDIAN
                    frames = pixels.inflated_frames(path, numbers)
                else:
                    info = pixels.layout(path)
                    wanted_numbers = list(numbers or range(1, info.number_of_frames + 1))
                    native_here = not info.encapsulated and info.little_endian
                    if wanted in ("*", stored) or native_here:
                        syntax = stored if wanted in ("*", stored) else EXPLICIT_VR_LITTLE_ENDIAN
                        with open(path, "rb") as fp:
                            frames = [pixels.read_frame(fp, info, n) for n in wanted_numbers]
                    else:
                        syntax = EXPLICIT_VR_LITTLE_ENDIAN
                        frames = imaging.native_frames(path, wanted_numbers)
        except IndexError as exc:
            raise HTTPException(404, str(exc)) from exc
        except imaging.NoPixelData as exc:
            raise HTTPException(404, str(exc)) from exc
        except imaging.ImagingError as exc:
            raise HTTPException(406, f"{exc}; ask for transfer-syntax=* to get the frames as stored") from exc
        except pixels.PixelDataError as exc:
            raise HTTPException(404, str(exc)) from exc
        except BlobStoreError as exc:
            raise HTTPException(503, f"storage unavailable: {exc}") from exc
        part_media = SYNTAX_MEDIA.get(syntax, OCTET_STREAM) if media != OCTET_STREAM else OCTET_STREAM
        return _octet_parts(frames, f"{part_media}; transfer-syntax={syntax}", part_media)

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
                if obj.transfer_syntax_uid == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
                    ds, _ = pixels.inflated_header(path)  # the header only, not the whole data set
                else:
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


def _octet_parts(parts: list[bytes], part_type: str, root_type: str = OCTET_STREAM) -> Response:
    """A multipart/related response of binary parts (frames, bulk data), each with its length."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        f"--{boundary}\r\nContent-Type: {part_type}\r\nContent-Length: {len(p)}\r\n\r\n".encode() + p + b"\r\n"
        for p in parts
    )
    body += f"--{boundary}--\r\n".encode()
    return Response(body, media_type=f'multipart/related; type="{root_type}"; boundary={boundary}')


def _transcoded(archive: Archive, obj: StoredObject, syntax: str) -> bytes:
    with archive.blobs.local_file(obj.blob_key) as path:
        return imaging.transcoded(path, syntax)


_BATCH_BYTES = 8 * 1024 * 1024


class _Batches:
    """Collects a multipart body into buffers of a few MB, each handed on whole.

    Starlette runs each step of a synchronous body iterator in a worker thread, so one step per part header, body
    and CRLF would cost more than the bytes themselves. Stored objects are read straight into the buffer
    (`readinto`): the bytes are copied once, from the page cache, on their way to the socket. A buffer is never
    written again once handed on (the transport may still hold it).
    """

    def __init__(self) -> None:
        self._new()

    def _new(self) -> None:
        self.buffer = bytearray(_BATCH_BYTES)
        self.view = memoryview(self.buffer)
        self.used = 0

    def take(self) -> memoryview:
        full = self.view[: self.used]
        self._new()
        return full

    def add(self, data: bytes) -> Iterator[memoryview]:
        pos = 0
        while pos < len(data):
            n = min(len(data) - pos, _BATCH_BYTES - self.used)
            self.view[self.used : self.used + n] = data[pos : pos + n]
            self.used += n
            pos += n
            if self.used == _BATCH_BYTES:
                yield self.take()

    def add_file(self, fp: BinaryIO) -> Iterator[memoryview]:
        readinto = getattr(fp, "readinto", None)
        while True:
            if readinto is not None:
                n = readinto(self.view[self.used :])
                if not n:
                    return
                self.used += n
                if self.used == _BATCH_BYTES:
                    yield self.take()
            else:
                chunk = fp.read(_BATCH_BYTES - self.used)
                if not chunk:
                    return
                yield from self.add(chunk)


def _part_header(boundary: str, syntax: str, size: int) -> bytes:
    return (
        f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={syntax}\r\nContent-Length: {size}\r\n\r\n"
    ).encode("ascii")


def _multipart_length(objects: list[StoredObject], boundary: str) -> int:
    """Bytes of the multipart body `_multipart` sends for `objects` as stored."""
    parts = sum(len(_part_header(boundary, o.transfer_syntax_uid, o.size)) + o.size + 2 for o in objects)
    return parts + len(f"--{boundary}--\r\n")


_MAP_GROUP_BYTES = 16 * 1024 * 1024
_FIRST_GROUP_BYTES = 1024 * 1024
_Piece = bytes | tuple[str, int, int, int]  # literal bytes, or (blob key, offset, length, object size)


def _map_pieces(blobs: FileBlobStore, pieces: list[_Piece]) -> list[bytes | memoryview]:
    """In a worker thread: each piece of a file as a memory map already paged in; stops at the first blob that
    cannot be read (the caller then ends the body short)."""
    out: list[bytes | memoryview] = []
    for piece in pieces:
        if isinstance(piece, bytes):
            out.append(piece)
            continue
        key, offset, length, size = piece
        try:
            out.append(blobs.map_range(key, offset, length, size))
        except BlobStoreError as exc:
            log.error("retrieve stopped at %s: %s", key, exc)
            break
    return out


async def _mapped_multipart(
    blobs: FileBlobStore, objects: list[StoredObject], boundary: str
) -> AsyncIterator[bytes | memoryview]:
    """The multipart body of stored objects from the filesystem, handed to the socket straight from the page cache.

    Objects are memory-mapped (and paged in) in a worker thread, a group of a few MB ahead of the one the event loop
    writes to the socket, so the only copy of the bytes is the kernel's into the socket. Large objects are mapped in
    windows, so memory stays bounded whatever the object size. A blob that cannot be read ends the body short.
    """
    plan: list[_Piece] = []
    literal = b""
    for obj in objects:
        literal += _part_header(boundary, obj.transfer_syntax_uid, obj.size)
        plan.append(literal)
        for offset in range(0, obj.size, _MAP_GROUP_BYTES):
            plan.append((obj.blob_key, offset, min(_MAP_GROUP_BYTES, obj.size - offset), obj.size))
        literal = b"\r\n"
    plan.append(literal + f"--{boundary}--\r\n".encode("ascii"))
    # Groups of pieces to map at once: a small first one, so the first bytes leave at once, then larger ones.
    groups: list[tuple[int, int]] = []
    start, budget = 0, _FIRST_GROUP_BYTES
    while start < len(plan):
        end, mapped = start, 0
        while end < len(plan) and mapped < budget:
            piece = plan[end]
            mapped += 0 if isinstance(piece, bytes) else piece[2]
            end += 1
        groups.append((start, end))
        start, budget = end, _MAP_GROUP_BYTES
    # While the loop writes one group, a worker thread maps and pages in the next.
    loop = asyncio.get_running_loop()
    pending = loop.run_in_executor(None, _map_pieces, blobs, plan[groups[0][0] : groups[0][1]])
    for index, (start, end) in enumerate(groups):
        group = await pending
        if index + 1 < len(groups):
            after = groups[index + 1]
            pending = loop.run_in_executor(None, _map_pieces, blobs, plan[after[0] : after[1]])
        for data in group:
            yield data
        if len(group) < end - start:
            return


def _multipart(
    archive: Archive, objects: list[StoredObject], boundary: str, wanted: str, ready: dict[str, bytes]
) -> Iterator[memoryview]:
    batches = _Batches()
    for obj in objects:
        body = None
        if wanted not in ("*", obj.transfer_syntax_uid):
            try:
                body = ready.pop(obj.sop_instance_uid, None) or _transcoded(archive, obj, wanted)
            except (imaging.ImagingError, BlobStoreError) as exc:
                # Headers are gone already: end the stream short, so the client sees a broken multipart body.
                log.error("retrieve in %s stopped at %s: %s", wanted, obj.sop_instance_uid, exc)
                yield batches.take()
                return
        syntax = wanted if body is not None else obj.transfer_syntax_uid
        size = len(body) if body is not None else obj.size
        yield from batches.add(_part_header(boundary, syntax, size))
        if body is not None:
            yield from batches.add(body)
        else:
            try:
                with archive.blobs.open(obj.blob_key) as fp:
                    yield from batches.add_file(fp)
            except BlobStoreError:
                # Headers are gone already: end the stream short, so the client sees a broken multipart body.
                yield batches.take()
                return
        yield from batches.add(b"\r\n")
    yield from batches.add(f"--{boundary}--\r\n".encode("ascii"))
    if batches.used:
        yield batches.take()
