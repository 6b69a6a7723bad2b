"""Which stored objects a DICOMweb request names, with the query engine's errors as HTTP statuses."""

from __future__ import annotations

from fastapi import HTTPException
from sqlalchemy.exc import SQLAlchemyError

from storage.ingest import Archive
from storage.query import Level, QueryError, StoredObject, objects_for

_NOUN = {"STUDY": "study", "SERIES": "series", "IMAGE": "instance"}


def stored_objects(archive: Archive, level: Level, filters: dict[str, str]) -> list[StoredObject]:
    """The objects under the given UIDs; 400 for a malformed query, 404 when none, 503 when the index is down."""
    try:
        with archive.engine.connect() as conn:
            objects = objects_for(conn, level, filters)
    except QueryError as exc:
        raise HTTPException(400, str(exc)) from exc
    except SQLAlchemyError as exc:
        raise HTTPException(503, "database unavailable") from exc
    if not objects:
        raise HTTPException(404, f"no such {_NOUN[level]}")
    return objects
