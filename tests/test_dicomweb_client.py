"""Conformance with the dicomweb-client library (an independent DICOMweb implementation) against the server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread

from tests.data import patient, write_ct
from tests.scu import storage_corpus
from tests.services import VnpacsService


@pytest.fixture(scope="module")
def client(embedded: VnpacsService) -> DICOMwebClient:
    return DICOMwebClient(url=f"{embedded.base_url}/dicom-web")


def test_stow_qido_wado_round_trip_with_dicomweb_client(client: DICOMwebClient, tmp_path: Path) -> None:
    paths = [write_ct(tmp_path, who=patient("Đỗ^Minh Khôi", "DWC-1"), study="dwc", index=i) for i in (1, 2, 3)]
    datasets = [dcmread(p) for p in paths]
    client.store_instances(datasets=datasets)

    studies = client.search_for_studies(search_filters={"PatientName": "do^minh*"})
    assert [s["00100020"]["Value"][0] for s in studies] == ["DWC-1"]
    uid = datasets[0].StudyInstanceUID
    series = client.search_for_series(study_instance_uid=uid)
    assert len(series) == 1
    instances = client.search_for_instances(study_instance_uid=uid)
    assert len(instances) == 3

    fetched = client.retrieve_study(uid)
    by_uid = {ds.SOPInstanceUID: ds for ds in fetched}
    for original in datasets:
        assert by_uid[original.SOPInstanceUID] == original  # same attributes and values

    ds = datasets[0]
    metadata = client.retrieve_series_metadata(uid, ds.SeriesInstanceUID)
    assert {m["00080018"]["Value"][0] for m in metadata} == {d.SOPInstanceUID for d in datasets}
    [frame] = client.retrieve_instance_frames(uid, ds.SeriesInstanceUID, ds.SOPInstanceUID, frame_numbers=[1])
    assert np.frombuffer(frame, dtype=np.int16).reshape(ds.Rows, ds.Columns).tolist() == ds.pixel_array.tolist()


def test_dicomweb_client_reads_a_compressed_object_as_stored(client: DICOMwebClient) -> None:
    jpeg = next(c.path for c in storage_corpus() if c.path.name == "JPEG2000.dcm")
    original = dcmread(jpeg)
    client.store_instances(datasets=[original])
    [frame] = client.retrieve_instance_frames(
        original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID, frame_numbers=[1],
        media_types=(("application/octet-stream", "*"),),
    )  # fmt: skip
    assert len(frame) > 0 and frame[:2] == b"\xff\x4f"  # a JPEG 2000 codestream, passed through undecoded
