"""Cached DICOM JSON headers of stored objects: computed once per object from its file, kept in the index.

The cache is keyed by the object's SHA-256, so a corrected or replaced object never meets a stale entry, and
every node shares it. Bulk data URIs are stored relative to a ROOT placeholder that the caller replaces with the
URL the client sees (reverse proxies differ per request). Each cached text starts with the version of the code that
computed it (FORMAT): a row from an older version is computed again and rewritten when read, never served.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.uid import DeflatedExplicitVRLittleEndian
from sqlalchemy import Engine, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError

from storage import pixels
from storage.blobstore import BlobStore, blob_key_for
from storage.ingest import IngestResult
from storage.models import MetadataCache, utcnow
from storage.query import StoredObject

log = logging.getLogger(__name__)

ROOT = "{{ROOT}}"
BULK_THRESHOLD = 1024
# Version of what header_json computes; raise it whenever its output changes. Rows from before versions existed
# (plain JSON, "{...") are version 1; they lack the pixel data of deflated objects.
FORMAT = 2
_STAMP = f"{FORMAT}:"


def _stamped(text: str) -> str:
    return _STAMP + text


def _current(row: str) -> str | None:
    """The JSON text of a cached row written in this FORMAT, None for an older one."""
    return row[len(_STAMP) :] if row.startswith(_STAMP) else None


def instance_path(obj: StoredObject) -> str:
    return f"/studies/{obj.study_instance_uid}/series/{obj.series_instance_uid}/instances/{obj.sop_instance_uid}"


def header_json(path: Path, obj: StoredObject) -> str:
    """The object's header as DICOM JSON text; large values and the pixel data as BulkDataURIs."""
    if obj.transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        ds, pixel_tag = pixels.inflated_header(path)  # only the header is inflated, whatever the object's size
        has_pixels = pixel_tag is not None
    else:
        with open(path, "rb") as fp:
            ds = dcmread(fp, stop_before_pixels=True, defer_size="1 KB")
            has_pixels = fp.read(4)[:2] in (b"\xe0\x7f", b"\x7f\xe0")
    base = ROOT + instance_path(obj)

    def bulk(elem: DataElement) -> str:
        return f"{base}/bulkdata/{int(elem.tag):08X}"

    body = ds.to_json_dict(bulk_data_threshold=BULK_THRESHOLD, bulk_data_element_handler=bulk,
                           suppress_invalid_tags=True)  # fmt: skip
    if has_pixels:
        vr = (
            "OW"
            if obj.transfer_syntax_uid in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", DeflatedExplicitVRLittleEndian)
            else "OB"
        )
        body["7FE00010"] = {"vr": vr, "BulkDataURI": f"{base}/bulkdata/7FE00010"}
    body["00083002"] = {"vr": "UI", "Value": [obj.transfer_syntax_uid]}  # AvailableTransferSyntaxUID
    return json.dumps(dict(sorted(body.items())), ensure_ascii=False, separators=(",", ":"))


def headers(
    engine: Engine,
    blobs: BlobStore,
    objects: Iterable[StoredObject],
    compute: Callable[[Path, StoredObject], str] = header_json,
) -> list[str]:
    """DICOM JSON texts (with the ROOT placeholder) of `objects`, in order: one query for the cached ones."""
    objects = list(objects)
    shas = list({o.sha256 for o in objects})
    cached: dict[str, str] = {}
    outdated: set[str] = set()
    with engine.connect() as conn:
        for start in range(0, len(shas), 500):
            part = shas[start : start + 500]
            rows = conn.execute(select(MetadataCache.sha256, MetadataCache.json).where(MetadataCache.sha256.in_(part)))
            for sha, row in rows:
                text = _current(row)
                if text is None:
                    outdated.add(sha)
                else:
                    cached[sha] = text
    missing = [o for o in objects if o.sha256 not in cached]
    fresh: dict[str, str] = {}
    for obj in missing:
        if obj.sha256 in fresh:
            continue
        with blobs.local_file(obj.blob_key) as path:
            fresh[obj.sha256] = compute(path, obj)
    rewrite = [{"key": k, "text": _stamped(v), "at": utcnow()} for k, v in fresh.items() if k in outdated]
    if rewrite:  # same content for every writer of a version: a race between nodes rewrites it alike
        with engine.begin() as conn:
            conn.execute(
                update(MetadataCache)
                .where(MetadataCache.sha256 == bindparam("key"))
                .values(json=bindparam("text"), created_at=bindparam("at")),
                rewrite,
            )
    new = [{"sha256": k, "json": _stamped(v)} for k, v in fresh.items() if k not in outdated]
    if new:
        try:
            with engine.begin() as conn:
                conn.execute(insert(MetadataCache), new)
        except IntegrityError:
            pass  # another request or node cached them first: same content by construction
    cached.update(fresh)
    return [cached[o.sha256] for o in objects]


class Warmer:
    """Computes the metadata of newly stored objects in the background, once ingest goes quiet.

    An Archive listener collects what arrived; when nothing new has arrived for `quiet` seconds the headers are
    computed and cached in batches, so the first viewer to open a fresh study reads the cache instead of every
    file, and a large push is never slowed by it.
    """

    def __init__(self, engine: Engine, blobs: BlobStore, *, quiet: float = 1.0, batch: int = 200) -> None:
        self.engine = engine
        self.blobs = blobs
        self.quiet = quiet
        self.batch = batch
        self._pending: dict[str, StoredObject] = {}
        self._lock = threading.Lock()
        self._arrived = threading.Event()
        self._stopping = threading.Event()
        self._last = 0.0
        self._thread: threading.Thread | None = None

    def notice(self, result: IngestResult) -> None:
        if result.outcome != "stored":
            return
        obj = StoredObject(
            sop_class_uid=result.sop_class_uid,
            sop_instance_uid=result.sop_instance_uid,
            transfer_syntax_uid=result.transfer_syntax_uid,
            blob_key=blob_key_for(result.sha256),
            size=result.size,
            sha256=result.sha256,
            study_instance_uid=result.study_instance_uid,
            series_instance_uid=result.series_instance_uid,
        )
        with self._lock:
            self._pending[obj.sha256] = obj
            self._last = time.monotonic()
        self._arrived.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="metadata-warmer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._arrived.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._arrived.wait()
            self._arrived.clear()
            while not self._stopping.is_set():
                with self._lock:
                    wait = self._last + self.quiet - time.monotonic()
                if wait <= 0:
                    break
                self._stopping.wait(wait)
            while not self._stopping.is_set():
                with self._lock:
                    if time.monotonic() - self._last < self.quiet:
                        self._arrived.set()  # objects are arriving again: wait for quiet once more
                        break
                    chunk = list(self._pending.values())[: self.batch]
                    for obj in chunk:
                        del self._pending[obj.sha256]
                if not chunk:
                    break
                try:
                    headers(self.engine, self.blobs, chunk)
                except Exception as exc:  # a failure only means the first request computes them itself
                    log.warning("metadata warming of %d object(s) skipped: %s", len(chunk), exc)
