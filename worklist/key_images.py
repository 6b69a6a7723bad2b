"""Key images: the instances (and frames) a radiologist marks on a report version, and their JPEGs for the HIS.

A version keeps them as JSON text (`ris_report_version.key_images`): `[{"sop_instance_uid": ..., "frame": n|null}]`,
in the order the doctor gave. Each must be an image of the report's study in the index. The JPEG is the same one
DICOMweb's /rendered gives (`storage.render`: default VOI window, 8-bit, quality 90), fitted inside `MAX_SIZE`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from storage.blobstore import BlobStore, BlobStoreError
from storage.models import Instance, Series, Study
from storage.render import ImagingError, RenderOptions, render

MAX_KEY_IMAGES = 32
MAX_SIZE = (1024, 1024)
JPEG = RenderOptions(media_type="image/jpeg", quality=90, viewport=MAX_SIZE)


class KeyImageError(ValueError):
    """A key image that is not an image of the report's study; `str()` says why."""


class KeyImageUnavailable(RuntimeError):
    """A key image that cannot be rendered now (storage unreachable, pixels that do not decode)."""


@dataclass(frozen=True)
class KeyImage:
    sop_instance_uid: str
    frame: int | None = None  # 1-based; None: the instance's (first) image

    def as_dict(self) -> dict[str, Any]:
        return {"sop_instance_uid": self.sop_instance_uid, "frame": self.frame}


def parse(raw: Any) -> list[KeyImage]:
    """Key images from API input (`[{"sop_instance_uid": "...", "frame": 1}]`), shape checked; KeyImageError."""
    if not isinstance(raw, list):
        raise KeyImageError("key_images must be a list")
    if len(raw) > MAX_KEY_IMAGES:
        raise KeyImageError(f"at most {MAX_KEY_IMAGES} key images")
    out: list[KeyImage] = []
    for i, item in enumerate(raw, 1):
        if isinstance(item, KeyImage):
            out.append(item)
            continue
        if not isinstance(item, dict) or set(item) - {"sop_instance_uid", "frame"}:
            raise KeyImageError(f"key image {i} must be {{sop_instance_uid, frame}}")
        uid, frame = item.get("sop_instance_uid"), item.get("frame")
        if not isinstance(uid, str) or not uid.strip():
            raise KeyImageError(f"key image {i} has no sop_instance_uid")
        if frame is not None and (isinstance(frame, bool) or not isinstance(frame, int) or frame < 1):
            raise KeyImageError(f"key image {i}: frame is a number from 1")
        out.append(KeyImage(uid.strip(), frame))
    if len(set(out)) != len(out):
        raise KeyImageError("the same key image is given twice")
    return out


def dumps(images: list[KeyImage]) -> str | None:
    """The column value: None for no key images (versions without them stay as they were)."""
    return json.dumps([k.as_dict() for k in images], separators=(",", ":")) if images else None


def loads(text: str | None) -> list[KeyImage]:
    return [KeyImage(d["sop_instance_uid"], d.get("frame")) for d in json.loads(text)] if text else []


def check(session: Session, study_instance_uid: str, images: list[KeyImage]) -> None:
    """KeyImageError unless every key image is an image (with pixels, frame in range) of the study in the index."""
    for k in images:
        row = session.execute(
            select(Instance, Study.study_instance_uid)
            .join(Series, Series.pk == Instance.series_pk)
            .join(Study, Study.pk == Series.study_pk)
            .where(Instance.sop_instance_uid == k.sop_instance_uid)
        ).first()
        if row is None:
            raise KeyImageError(f"key image {k.sop_instance_uid} is not a stored instance")
        instance, study_uid = row
        if study_uid != study_instance_uid:
            raise KeyImageError(f"key image {k.sop_instance_uid} belongs to another study ({study_uid})")
        if not instance.rows or not instance.columns:
            raise KeyImageError(f"key image {k.sop_instance_uid} is not an image (no pixel data)")
        frames = instance.number_of_frames or 1
        if k.frame is not None and k.frame > frames:
            raise KeyImageError(f"key image {k.sop_instance_uid}: frame {k.frame} out of 1..{frames}")


class KeyImages:
    """Renders key images from the archive's blobs."""

    def __init__(self, engine: Engine, blobs: BlobStore) -> None:
        self.engine = engine
        self.blobs = blobs

    def jpeg(self, image: KeyImage) -> bytes:
        """The key image as JPEG; KeyImageError if it is not stored, KeyImageUnavailable if it cannot be drawn."""
        with Session(self.engine) as session:
            key = session.execute(
                select(Instance.blob_key).where(Instance.sop_instance_uid == image.sop_instance_uid)
            ).scalar_one_or_none()
        if key is None:
            raise KeyImageError(f"key image {image.sop_instance_uid} is no longer stored")
        try:
            with self.blobs.local_file(key) as path:
                return render(path, image.frame or 1, JPEG)
        except (ImagingError, IndexError, BlobStoreError, OSError) as exc:
            raise KeyImageUnavailable(f"key image {image.sop_instance_uid} cannot be rendered: {exc}") from exc
