"""Attribute correction of a stored study: corrected copies are written and served, the originals kept aside.

Every object of the study is rewritten with the new values and stored through the one ingest path, replacing the
served copy under the same SOP Instance UID; the earlier bytes stay in the blob store, listed in `instance_conflict`
with resolution 'replaced', so a correction can always be undone. Who asked for it and why is the caller's record.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select

from storage.blobstore import BlobStoreError
from storage.ingest import Archive, StorageUnavailable
from storage.models import Study
from storage.query import objects_for
from storage.text import nfc

# Keyword → maximum length: the patient and study attributes a correction may change.
CORRECTABLE = {
    "PatientName": 324,
    "PatientID": 64,
    "IssuerOfPatientID": 64,
    "PatientBirthDate": 8,
    "PatientSex": 16,
    "OtherPatientIDs": 64,
    "AccessionNumber": 16,
    "StudyID": 16,
    "StudyDescription": 64,
    "StudyDate": 8,
    "StudyTime": 16,
    "ReferringPhysicianName": 324,
}


class CorrectionError(ValueError):
    """A correction that cannot be applied (unknown attribute, bad value, unknown study)."""


class StudyNotFound(CorrectionError):
    pass


@dataclass
class Corrected:
    instances: int
    changes: dict[str, tuple[str, str]]  # keyword → (old, new) as read from the first object
    originals: list[dict[str, str]] = field(default_factory=list)  # sop_instance_uid, blob_key, sha256 kept aside


def _check(changes: dict[str, str]) -> dict[str, str]:
    clean: dict[str, str] = {}
    for keyword, value in changes.items():
        if keyword not in CORRECTABLE:
            raise CorrectionError(f"{keyword} cannot be corrected; correctable: {', '.join(CORRECTABLE)}")
        value = nfc(str(value).strip())
        if len(value) > CORRECTABLE[keyword]:
            raise CorrectionError(f"{keyword} is longer than {CORRECTABLE[keyword]} characters")
        if keyword.endswith("Date") and value and (len(value) != 8 or not value.isdigit()):
            raise CorrectionError(f"{keyword} must be YYYYMMDD, got {value!r}")
        if keyword == "PatientSex" and value not in ("", "M", "F", "O"):
            raise CorrectionError(f"PatientSex must be M, F or O, got {value!r}")
        if keyword == "PatientID" and not value:
            raise CorrectionError("PatientID cannot be emptied")
        clean[keyword] = value
    if not clean:
        raise CorrectionError("nothing to correct")
    return clean


def _decode_text(ds: Dataset) -> None:
    """Decode every element under the dataset's current character set (so it can switch to UTF-8), leaving deferred
    bulk values (pixel data) unread."""
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if raw is None or getattr(raw, "value", b"") is None:  # deferred: binary bulk data, written as read
            continue
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value:
                _decode_text(item)


def _apply(ds: Dataset, changes: dict[str, str]) -> None:
    needs_utf8 = any(not v.isascii() for v in changes.values())
    if needs_utf8 and "ISO_IR 192" not in str(ds.get("SpecificCharacterSet", "")):
        _decode_text(ds)
        ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword, value in changes.items():
        setattr(ds, keyword, value)


def correct_study(archive: Archive, study_uid: str, changes: dict[str, str], tmp_dir: Path) -> Corrected:
    """Rewrite every object of `study_uid` with `changes`; returns what changed and which copies were set aside.

    Stops at the first failure with the objects done so far already corrected; running the same correction again
    finishes it (objects already corrected are stored again as identical duplicates).
    """
    wanted = _check(changes)
    with archive.engine.connect() as conn:
        if conn.execute(select(Study.pk).where(Study.study_instance_uid == study_uid)).first() is None:
            raise StudyNotFound(f"no study {study_uid}")
        objects = objects_for(conn, "STUDY", {"StudyInstanceUID": study_uid})
    result = Corrected(instances=0, changes={})
    last: Dataset | None = None
    for obj in objects:
        with tempfile.NamedTemporaryFile(dir=tmp_dir, suffix=".dcm", delete=False) as out:
            target = Path(out.name)
        try:
            try:
                with archive.blobs.local_file(obj.blob_key) as path:
                    # Large values (pixel data) are not loaded: they are copied from the stored file as it is written.
                    ds = pydicom.dcmread(path, defer_size="256 KB")
                    if not result.changes:
                        result.changes = {k: (str(ds.get(k, "") or ""), v) for k, v in wanted.items()}
                    _apply(ds, wanted)
                    ds.save_as(target, enforce_file_format=True)
            except BlobStoreError as exc:
                raise StorageUnavailable(f"cannot read {obj.sop_instance_uid}: {exc}") from exc
            stored = archive.ingest_file(target, source="correction", adopt=True, replace_existing=True)
        finally:
            target.unlink(missing_ok=True)
        if stored.outcome == "conflict":
            result.originals.append(
                {"sop_instance_uid": obj.sop_instance_uid, "blob_key": obj.blob_key, "sha256": obj.sha256}
            )
        result.instances += 1
        last = ds
    if last is not None:
        archive.reindex_study(study_uid, last)
    return result
