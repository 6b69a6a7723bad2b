"""The query engine's computed keys on both index databases: counts stay right through every way rows change."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, delete, insert, select, update

from storage.blobstore import FileBlobStore
from storage.db import make_engine, upgrade
from storage.ingest import Archive
from storage.models import Instance, Series
from storage.query import find, objects_for
from tests.data import patient, write_ct
from tests.services import index_database

COUNTS = ["NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "ModalitiesInStudy"]


@pytest.fixture(params=["sqlite", "postgresql"])
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with index_database(request.param, tmp_path) as url:
        yield url


def _counts(engine: Engine, study: str) -> dict[str, object]:
    with engine.connect() as conn:
        (row,) = find(conn, "STUDY", {"AccessionNumber": study}, COUNTS).rows
        series = find(conn, "SERIES", {"AccessionNumber": study}, ["Modality", "NumberOfSeriesRelatedInstances"]).rows
        (who,) = find(conn, "PATIENT", {"PatientID": "BN-COUNT"}, ["NumberOfPatientRelatedInstances"]).rows
    return {
        "study": (row["NumberOfStudyRelatedSeries"], row["NumberOfStudyRelatedInstances"], row["ModalitiesInStudy"]),
        "series": sorted((s["Modality"], s["NumberOfSeriesRelatedInstances"]) for s in series),
        "patient": who["NumberOfPatientRelatedInstances"],
    }


def test_instance_counts_follow_stores_duplicates_moves_and_deletes(index_url: str, tmp_path: Path) -> None:
    upgrade(index_url)
    engine = make_engine(index_url)
    archive = Archive(engine, FileBlobStore(tmp_path / "blobs"))
    who = patient(patient_id="BN-COUNT")
    ct = [write_ct(tmp_path / "in", who=who, series="ct", index=i, AccessionNumber="A1") for i in range(1, 5)]
    mr = [write_ct(tmp_path / "in", who=who, series="mr", index=i, AccessionNumber="A1", Modality="MR") for i in (1, 2)]
    for path in ct + mr + ct[:2]:  # the last two are duplicates: counted once
        archive.ingest_file(path)
    assert _counts(engine, "A1") == {"study": (2, 6, ["CT", "MR"]), "series": [("CT", 4), ("MR", 2)], "patient": 6}

    with engine.begin() as conn:  # one statement moving an instance, one inserting two (PostgreSQL: per statement)
        ct_pk, mr_pk = (conn.execute(select(Series.pk).order_by(Series.pk)).scalars().all())[:2]
        moved = conn.execute(select(Instance.pk).where(Instance.series_pk == ct_pk).limit(1)).scalar_one()
        conn.execute(update(Instance).where(Instance.pk == moved).values(series_pk=mr_pk))
        template = conn.execute(select(Instance).where(Instance.pk == moved)).mappings().one()
        rows = [
            {**{k: v for k, v in template.items() if k != "pk"}, "sop_instance_uid": f"1.2.3.{i}", "series_pk": mr_pk}
            for i in (1, 2)
        ]
        conn.execute(insert(Instance), rows)
    assert _counts(engine, "A1") == {"study": (2, 8, ["CT", "MR"]), "series": [("CT", 3), ("MR", 5)], "patient": 8}

    with engine.begin() as conn:
        conn.execute(delete(Instance).where(Instance.sop_instance_uid.in_(["1.2.3.1", "1.2.3.2"])))
        ct_uid = conn.execute(select(Series.series_instance_uid).where(Series.pk == ct_pk)).scalar_one()
    with engine.connect() as conn:
        ct_objects = objects_for(conn, "SERIES", {"SeriesInstanceUID": ct_uid})
    assert archive.delete(ct_objects[:2]) == 2
    assert _counts(engine, "A1") == {"study": (2, 4, ["CT", "MR"]), "series": [("CT", 1), ("MR", 3)], "patient": 4}
    engine.dispose()


def test_upgrade_counts_the_instances_already_stored(index_url: str, tmp_path: Path) -> None:
    upgrade(index_url, "0002")
    engine = make_engine(index_url)
    archive = Archive(engine, FileBlobStore(tmp_path / "blobs"))
    # Today's ingest on yesterday's schema: without the deletion guard, whose table (0004) does not exist yet.
    guard = archive._guard_blobs
    archive._guard_blobs = lambda conn, jobs: None  # type: ignore[method-assign]
    who = patient(patient_id="BN-COUNT")
    for i in range(1, 4):
        archive.ingest_file(write_ct(tmp_path / "in", who=who, index=i, AccessionNumber="A2"))
    upgrade(index_url)
    archive._guard_blobs = guard  # type: ignore[method-assign]
    archive.ingest_file(write_ct(tmp_path / "in", who=who, index=4, AccessionNumber="A2"))
    assert _counts(engine, "A2") == {"study": (1, 4, ["CT"]), "series": [("CT", 4)], "patient": 4}
    engine.dispose()
