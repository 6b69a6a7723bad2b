"""Study metadata is cached in the background once ingest goes quiet: the first viewer reads the cache."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import httpx
from pydicom import dcmread

from tests.data import patient, write_ct
from tests.scu import store_files
from tests.services import VnpacsService


def test_metadata_is_cached_after_ingest_goes_quiet(embedded: VnpacsService, tmp_path: Path) -> None:
    files = [write_ct(tmp_path, who=patient("Đỗ^Thị Hà", "WARM-1"), study="warm", index=i) for i in range(1, 6)]
    assert all(s.Status == 0 for s in store_files(embedded.dicom_port, files).values())
    study_uid = str(dcmread(files[0]).StudyInstanceUID)
    db = sqlite3.connect(Path(embedded.env["VNPACS_DATA_DIR"]) / "index.db")
    shas = [r[0] for r in db.execute(
        "SELECT i.sha256 FROM instance i JOIN series se ON i.series_pk = se.pk JOIN study st ON se.study_pk = st.pk"
        " WHERE st.study_instance_uid = ?", (study_uid,))]  # fmt: skip
    assert len(shas) == 5
    marks = ",".join("?" * len(shas))
    deadline = time.monotonic() + 15
    cached = 0
    while time.monotonic() < deadline:
        cached = db.execute(f"SELECT count(*) FROM metadata_cache WHERE sha256 IN ({marks})", shas).fetchone()[0]
        if cached == 5:
            break
        time.sleep(0.2)
    assert cached == 5, "metadata not warmed without any request"
    # What the cache serves is what the objects hold.
    r = httpx.get(f"{embedded.base_url}/dicom-web/studies/{study_uid}/metadata", timeout=30)
    assert r.status_code == 200
    names = {item["00100010"]["Value"][0]["Alphabetic"] for item in r.json()}
    assert names == {"Đỗ^Thị Hà"}
    assert sorted(item["00080018"]["Value"][0] for item in r.json()) == sorted(
        str(dcmread(f).SOPInstanceUID) for f in files
    )
