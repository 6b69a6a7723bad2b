"""STOW-RS (PS3.18 10.5): multipart/related application/dicom uploads, through the same ingest path as C-STORE.

The body is streamed to spool files on disk, never held in memory. Parts are stored only once the whole multipart
body has been read and found well formed, so a malformed request stores nothing.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicomweb import dicomjson
from dicomweb.urls import base_url
from storage.ingest import Archive, IngestError, SOPClassMismatch, SOPInstanceMismatch
from storage.pixels import inflated_header, transfer_syntax

MAX_HEADER_BYTES = 16 * 1024
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
INVALID_SOP_INSTANCE = 0x0117


class MalformedMultipart(ValueError):
    pass


@dataclass
class Part:
    headers: dict[str, str]
    path: Path
    size: int = 0


@dataclass
class _Parser:
    """Incremental multipart/related parser writing each part's body to its own spool file."""

    boundary: bytes
    spool: Path
    parts: list[Part] = field(default_factory=list)
    _buffer: bytearray = field(default_factory=bytearray)
    _state: str = "preamble"
    _file: Any = None

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while self._step():
            pass

    def _step(self) -> bool:
        buf = self._buffer
        if self._state == "preamble":
            marker = b"--" + self.boundary
            index = buf.find(marker)
            if index < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    raise MalformedMultipart("no multipart boundary found")
                return False
            if len(buf) < index + len(marker) + 2:
                return False
            del buf[: index + len(marker)]
            return self._after_delimiter()
        if self._state == "headers":
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    raise MalformedMultipart("part headers too long")
                return False
            headers: dict[str, str] = {}
            for line in bytes(buf[:end]).decode("latin-1").split("\r\n"):
                if not line.strip():
                    continue
                name, sep, value = line.partition(":")
                if not sep:
                    raise MalformedMultipart(f"malformed part header {line!r}")
                headers[name.strip().lower()] = value.strip()
            del buf[: end + 4]
            fd, name = tempfile.mkstemp(dir=self.spool, suffix=".dcm")
            self._file = os.fdopen(fd, "wb")
            self.parts.append(Part(headers, Path(name)))
            self._state = "body"
            return True
        if self._state == "body":
            delimiter = b"\r\n--" + self.boundary
            index = buf.find(delimiter)
            if index < 0:
                keep = len(delimiter) + 2
                if len(buf) > keep:
                    self._write(bytes(buf[:-keep]))
                    del buf[:-keep]
                return False
            if len(buf) < index + len(delimiter) + 2:
                return False
            self._write(bytes(buf[:index]))
            self._file.close()
            self._file = None
            del buf[: index + len(delimiter)]
            return self._after_delimiter()
        return False

    def _after_delimiter(self) -> bool:
        buf = self._buffer
        if buf[:2] == b"--":
            self._state = "done"
            del buf[:]
            return False
        if buf[:2] != b"\r\n":
            raise MalformedMultipart("boundary not followed by CRLF")
        del buf[:2]
        self._state = "headers"
        return True

    def _write(self, data: bytes) -> None:
        if data:
            self._file.write(data)
            self.parts[-1].size += len(data)

    def finish(self) -> list[Part]:
        if self._state != "done":
            raise MalformedMultipart("multipart body ended before its closing boundary")
        return self.parts

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
        for part in self.parts:
            with contextlib.suppress(FileNotFoundError):
                part.path.unlink()


def _media_params(content_type: str) -> tuple[str, dict[str, str]]:
    pieces = [p.strip() for p in content_type.split(";")]
    params = {}
    for piece in pieces[1:]:
        name, _, value = piece.partition("=")
        params[name.strip().lower()] = value.strip().strip('"')
    return pieces[0].lower(), params


async def _spool(stream: AsyncIterator[bytes], boundary: str, spool: Path) -> list[Part]:
    parser = _Parser(boundary.encode("latin-1"), spool)
    try:
        async for chunk in stream:
            parser.feed(chunk)
        return parser.finish()
    except BaseException:
        parser.discard()
        raise


def router(archive: Archive, spool: Path) -> APIRouter:
    api = APIRouter(tags=["STOW-RS"])

    async def store(request: Request, study: str | None) -> JSONResponse:
        media, params = _media_params(request.headers.get("content-type", ""))
        if media != "multipart/related":
            raise HTTPException(415, 'STOW-RS takes multipart/related; type="application/dicom"')
        part_type = params.get("type", "application/dicom").lower()
        if part_type != "application/dicom":
            raise HTTPException(415, f"part type {part_type} is not supported; send application/dicom")
        boundary = params.get("boundary")
        if not boundary:
            raise HTTPException(400, "multipart/related without a boundary")
        spool.mkdir(parents=True, exist_ok=True)
        try:
            parts = await _spool(request.stream(), boundary, spool)
        except MalformedMultipart as exc:
            raise HTTPException(400, f"malformed multipart body: {exc}") from exc
        if not parts:
            raise HTTPException(400, "the multipart body holds no part")
        stored, failed = await run_in_threadpool(_ingest_parts, archive, parts, study)
        root = base_url(request)
        body: dict[str, Any] = {}
        if study:
            body["RetrieveURL"] = f"{root}/studies/{study}"
        body["ReferencedSOPSequence"] = [
            {
                "ReferencedSOPClassUID": sop_class,
                "ReferencedSOPInstanceUID": sop_uid,
                "RetrieveURL": f"{root}/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}",
            }
            for sop_class, sop_uid, study_uid, series_uid in stored
        ]
        if failed:
            body["FailedSOPSequence"] = [
                {"ReferencedSOPClassUID": c, "ReferencedSOPInstanceUID": i, "FailureReason": reason}
                for c, i, reason, _ in failed
            ]
        if not failed:
            code = 200
        elif stored:
            code = 202
        elif all(reason == OUT_OF_RESOURCES for _, _, reason, _ in failed):
            code = 503
        else:
            code = 409
        headers = {}
        if failed:
            reasons = "; ".join(sorted({message for *_, message in failed}))[:900]
            headers["Warning"] = f'299 vnpacs "{reasons}"'.replace("\n", " ")
        return JSONResponse(dicomjson.dataset(body), status_code=code, media_type="application/dicom+json",
                            headers=headers)  # fmt: skip

    @api.post("/studies", summary="Store instances (STOW-RS)")
    async def post_studies(request: Request) -> JSONResponse:
        return await store(request, None)

    @api.post("/studies/{study}", summary="Store instances of one study (STOW-RS)")
    async def post_study(request: Request, study: str) -> JSONResponse:
        return await store(request, study)

    return api


def _ingest_parts(
    archive: Archive, parts: list[Part], study: str | None
) -> tuple[list[tuple[str, str, str, str]], list[tuple[str, str, int, str]]]:
    stored: list[tuple[str, str, str, str]] = []
    failed: list[tuple[str, str, int, str]] = []
    for part in parts:
        try:
            sop_class, sop_uid, study_uid = _identify(part.path)
            content_type = part.headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
            if content_type != "application/dicom":
                failed.append((sop_class, sop_uid, CANNOT_UNDERSTAND, f"part of type {content_type} is not DICOM"))
                continue
            if study is not None and study_uid != study:
                failed.append((sop_class, sop_uid, DOES_NOT_MATCH, "instance belongs to another study"))
                continue
            try:
                result = archive.ingest_file(part.path, source="stow", adopt=True)
            except SOPClassMismatch as exc:
                failed.append((sop_class, sop_uid, DOES_NOT_MATCH, exc.message))
            except SOPInstanceMismatch as exc:
                failed.append((sop_class, sop_uid, INVALID_SOP_INSTANCE, exc.message))
            except IngestError as exc:
                reason = OUT_OF_RESOURCES if exc.kind == "unavailable" else CANNOT_UNDERSTAND
                failed.append((sop_class, sop_uid, reason, exc.message))
            else:
                stored.append(
                    (result.sop_class_uid, result.sop_instance_uid, result.study_instance_uid,
                     result.series_instance_uid)
                )  # fmt: skip
        finally:
            with contextlib.suppress(FileNotFoundError):
                part.path.unlink()
    return stored, failed


def _identify(path: Path) -> tuple[str, str, str]:
    """SOP Class, SOP Instance and Study UIDs for the response and the study check ('' where unreadable)."""
    try:
        with open(path, "rb") as fp:
            if transfer_syntax(fp) == DeflatedExplicitVRLittleEndian:  # inflate the header only, not the data set
                ds, _ = inflated_header(path)
            else:
                ds = dcmread(fp, stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"])  # fmt: skip
        return str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", "")), str(ds.get("StudyInstanceUID", ""))
    except Exception:
        return "", "", ""
