"""The DIMSE server against real peers (DCMTK tools and pynetdicom SCUs), embedded default configuration."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from tests.conftest import StartServer
from tests.data import patient, write_ct
from tests.scu import c_find, c_get, dataset_bytes, run_dcmtk, storage_corpus, store_files, study_identifier
from tests.services import VnpacsService, free_port


def cli(server: VnpacsService, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pacs", *args], env=server.env, capture_output=True, text=True, timeout=120
    )


def expected_refusal(path: Path) -> tuple[int, str] | None:
    """What the standard says the server must answer for a corpus file that is broken, None for a valid one."""
    meta, _ = split_dataset(path)
    ds = dcmread(path, stop_before_pixels=True)
    if str(meta.MediaStorageSOPInstanceUID) != str(ds.SOPInstanceUID):
        return 0x0117, "SOP Instance UID"  # sent under the meta's UID, the dataset names another instance
    if "truncated" in path.name or "too_short" in path.name:
        return 0xC000, "truncated"
    return None


# ---- verification and storage --------------------------------------------------------------------------------


def test_echoscu_gets_a_verification_response(embedded: VnpacsService) -> None:
    result = run_dcmtk("echoscu", "-aec", "VNPACS", "127.0.0.1", str(embedded.dicom_port))
    assert result.returncode == 0, result.stderr


def test_every_storable_test_file_is_stored_and_retrieved_with_identical_dataset_bytes(
    embedded: VnpacsService, tmp_path: Path
) -> None:
    corpus = storage_corpus()
    assert len(corpus) > 150, "pydicom test data and pydicom-data should give well over 150 storable files"
    statuses = store_files(embedded.dicom_port, [c.path for c in corpus])
    # pydicom ships some deliberately broken files: each must be refused with the standard status and a reason.
    expected_refusals = {c.path: expected_refusal(c.path) for c in corpus}
    outcomes = {}
    for path, status in statuses.items():
        expected = expected_refusals[path]
        if expected is None:
            outcomes[path.name] = (
                "ok" if status.Status == 0 else f"refused {status.Status:#06x} {status.get('ErrorComment')}"
            )
        else:
            code, words = expected
            good = status.Status == code and words in str(status.get("ErrorComment", ""))
            outcomes[path.name] = "ok" if good else f"expected {code:#06x} '{words}', got {status.Status:#06x}"
    wrong = {name: outcome for name, outcome in outcomes.items() if outcome != "ok"}
    assert not wrong, wrong
    assert sum(1 for e in expected_refusals.values() if e is None) > 150

    # The first object stored under a SOP Instance UID is the one served (keep-first policy).
    first: dict[str, Path] = {}
    for item in corpus:
        if expected_refusals[item.path] is None:
            first.setdefault(item.sop_instance_uid, item.path)
    pairs = sorted({(c.sop_class_uid, c.transfer_syntax_uid) for c in corpus})
    retrieved: dict[str, Path] = {}
    for start in range(0, len(pairs), 100):
        chunk = pairs[start : start + 100]
        classes = {sc for sc, _ in chunk}
        uids = [
            c.sop_instance_uid for c in corpus if c.sop_class_uid in classes and first.get(c.sop_instance_uid) == c.path
        ]
        for offset in range(0, len(uids), 200):
            ident = study_identifier("IMAGE", SOPInstanceUID=list(dict.fromkeys(uids[offset : offset + 200])))
            got, final = c_get(embedded.dicom_port, ident, chunk, tmp_path / "get")
            retrieved.update(got)
    missing = set(first) - set(retrieved)
    assert not missing, f"{len(missing)} stored objects not retrieved"
    mismatched = [uid for uid, path in first.items() if dataset_bytes(retrieved[uid]) != dataset_bytes(path)]
    assert not mismatched, f"dataset bytes differ after the round trip: {mismatched[:5]}"


def test_storescu_stores_vietnamese_names_and_findscu_finds_them_without_diacritics(
    embedded: VnpacsService, tmp_path: Path
) -> None:
    path = write_ct(tmp_path / "in", who=patient("Nguyễn^Văn An", "VN-FIND-1"), study="vnfind")
    stored = run_dcmtk("storescu", "-aec", "VNPACS", "127.0.0.1", str(embedded.dicom_port), str(path))
    assert stored.returncode == 0, stored.stderr

    out = tmp_path / "rsp"
    out.mkdir()
    found = subprocess.run(
        ["/usr/bin/findscu", "-S", "-aec", "VNPACS", "-X", "-od", str(out),
         "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientName=nguyen*", "-k", "PatientID=VN-FIND-1",
         "-k", "StudyInstanceUID", "-k", "SpecificCharacterSet",
         "127.0.0.1", str(embedded.dicom_port)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    responses = [dcmread(p, force=True) for p in sorted(out.iterdir())]
    assert len(responses) == 1
    assert responses[0].SpecificCharacterSet == "ISO_IR 192"
    assert str(responses[0].PatientName) == "Nguyễn^Văn An"


def test_dd_maps_to_d_in_name_matching(embedded: VnpacsService, tmp_path: Path) -> None:
    path = write_ct(tmp_path, who=patient("Đặng^Thị Đào", "VN-DD-1"), study="dd")
    assert store_files(embedded.dicom_port, [path])[path].Status == 0
    for query in ("dang^thi dao", "DANG*", "Đặng^Thị Đào", "*dao"):
        matches, final = c_find(embedded.dicom_port, study_identifier("STUDY", PatientName=query, PatientID=""))
        assert final == 0
        assert [m.PatientID for m in matches] == ["VN-DD-1"], query


# ---- C-FIND matching rules ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def query_set(embedded: VnpacsService, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three patients, four studies, series of two modalities, with controlled dates and accession numbers."""
    d = tmp_path_factory.mktemp("query-set")
    tran = patient("Trần^Thị Bình", "Q-TRAN", birth_date="19750315", sex="F")
    le = patient("Lê^Văn Cường", "Q-LE", birth_date="19900101")
    pham = patient("Phạm^Minh Đức", "Q-PHAM")
    files = {
        "tran1": write_ct(d, who=tran, study="q-tran-1", series="ct", StudyDate="20240110", AccessionNumber="ACC100",
                          StudyTime="083000"),
        "tran1b": write_ct(d, who=tran, study="q-tran-1", series="ct", index=2, StudyDate="20240110",
                           AccessionNumber="ACC100", StudyTime="083000"),
        "tran1mr": write_ct(d, who=tran, study="q-tran-1", series="mr", StudyDate="20240110", AccessionNumber="ACC100",
                            StudyTime="083000", Modality="MR", SeriesNumber=2),
        "tran2": write_ct(d, who=tran, study="q-tran-2", StudyDate="20240220", AccessionNumber="ACC101",
                          StudyTime="141500"),
        "le": write_ct(d, who=le, study="q-le", StudyDate="20231231", AccessionNumber="ACC200", StudyTime="235900"),
        "pham": write_ct(d, who=pham, study="q-pham", StudyDate="20240301", AccessionNumber="XYZ300",
                         StudyTime="000100"),
    }  # fmt: skip
    statuses = store_files(embedded.dicom_port, files.values())
    assert all(s.Status == 0 for s in statuses.values())
    return files


def _accessions(port: int, **keys: object) -> list[str]:
    ident = study_identifier("STUDY", **{"AccessionNumber": "", **keys})
    matches, final = c_find(port, ident)
    assert final == 0
    return sorted(str(m.AccessionNumber) for m in matches)


@pytest.mark.usefixtures("query_set")
class TestCFindMatching:
    def test_single_value_matching(self, embedded: VnpacsService) -> None:
        assert _accessions(embedded.dicom_port, AccessionNumber="ACC200") == ["ACC200"]

    def test_wildcards_star_and_question_mark(self, embedded: VnpacsService) -> None:
        assert _accessions(embedded.dicom_port, AccessionNumber="ACC1*") == ["ACC100", "ACC101"]
        assert _accessions(embedded.dicom_port, AccessionNumber="ACC?00") == ["ACC100", "ACC200"]

    def test_date_ranges(self, embedded: VnpacsService) -> None:
        port = embedded.dicom_port
        assert _accessions(port, StudyDate="20240101-20240229", PatientID="Q-*") == ["ACC100", "ACC101"]
        assert _accessions(port, StudyDate="20240220-", PatientID="Q-*") == ["ACC101", "XYZ300"]
        assert _accessions(port, StudyDate="-20231231", PatientID="Q-*") == ["ACC200"]

    def test_time_range(self, embedded: VnpacsService) -> None:
        assert _accessions(embedded.dicom_port, StudyTime="0800-1500", PatientID="Q-*") == ["ACC100", "ACC101"]

    def test_uid_list_matching(self, embedded: VnpacsService, query_set: dict[str, Path]) -> None:
        uids = [str(dcmread(query_set[k]).StudyInstanceUID) for k in ("le", "pham")]
        assert _accessions(embedded.dicom_port, StudyInstanceUID=uids) == ["ACC200", "XYZ300"]

    def test_person_name_is_case_and_accent_insensitive(self, embedded: VnpacsService) -> None:
        assert _accessions(embedded.dicom_port, PatientName="TRAN^THI BINH") == ["ACC100", "ACC101"]
        assert _accessions(embedded.dicom_port, PatientName="pham*") == ["XYZ300"]

    def test_universal_matching_returns_the_key(self, embedded: VnpacsService) -> None:
        matches, final = c_find(
            embedded.dicom_port,
            study_identifier("STUDY", PatientID="Q-LE", PatientName="", PatientBirthDate="", StudyDescription=""),
        )
        assert final == 0 and len(matches) == 1
        assert str(matches[0].PatientName) == "Lê^Văn Cường"
        assert matches[0].PatientBirthDate == "19900101"
        assert matches[0].StudyDescription

    def test_computed_study_attributes(self, embedded: VnpacsService) -> None:
        matches, _ = c_find(
            embedded.dicom_port,
            study_identifier("STUDY", AccessionNumber="ACC100", ModalitiesInStudy="", NumberOfStudyRelatedSeries="",
                             NumberOfStudyRelatedInstances=""),
        )  # fmt: skip
        assert len(matches) == 1
        assert list(matches[0].ModalitiesInStudy) == ["CT", "MR"]
        assert int(matches[0].NumberOfStudyRelatedSeries) == 2
        assert int(matches[0].NumberOfStudyRelatedInstances) == 3

    def test_modalities_in_study_matching(self, embedded: VnpacsService) -> None:
        assert _accessions(embedded.dicom_port, ModalitiesInStudy="MR", PatientID="Q-*") == ["ACC100"]

    def test_series_and_image_levels(self, embedded: VnpacsService, query_set: dict[str, Path]) -> None:
        study_uid = str(dcmread(query_set["tran1"]).StudyInstanceUID)
        series, final = c_find(
            embedded.dicom_port,
            study_identifier("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID="", Modality="",
                             NumberOfSeriesRelatedInstances=""),
        )  # fmt: skip
        assert final == 0
        assert sorted((s.Modality, int(s.NumberOfSeriesRelatedInstances)) for s in series) == [("CT", 2), ("MR", 1)]
        ct_series = next(s.SeriesInstanceUID for s in series if s.Modality == "CT")
        images, final = c_find(
            embedded.dicom_port,
            study_identifier("IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=ct_series, SOPInstanceUID="",
                             InstanceNumber=""),
        )  # fmt: skip
        assert final == 0
        expected = sorted(int(dcmread(query_set[k]).InstanceNumber) for k in ("tran1", "tran1b"))
        assert sorted(int(i.InstanceNumber) for i in images) == expected

    def test_patient_root_patient_level(self, embedded: VnpacsService) -> None:
        matches, final = c_find(
            embedded.dicom_port,
            study_identifier("PATIENT", PatientID="Q-TRAN", PatientName="", NumberOfPatientRelatedStudies="",
                             OtherPatientIDsSequence=[]),
            model=PatientRootQueryRetrieveInformationModelFind,
        )  # fmt: skip
        assert final == 0 and len(matches) == 1
        assert int(matches[0].NumberOfPatientRelatedStudies) == 2
        issuers = {(i.PatientID, i.IssuerOfPatientID) for i in matches[0].OtherPatientIDsSequence}
        assert ("001080012345", "VN-CCCD") in issuers or any(i[1] for i in issuers)

    def test_malformed_query_gets_a_failure_status(self, embedded: VnpacsService) -> None:
        _, final = c_find(embedded.dicom_port, study_identifier("STUDY", StudyDate="2024-01-01-02"))
        assert final == 0xA900
        _, final = c_find(embedded.dicom_port, study_identifier("NOLEVEL", PatientID=""))
        assert final == 0xA900


# ---- retrieve -----------------------------------------------------------------------------------------------------


def test_movescu_sends_a_study_to_a_configured_destination_byte_exact(
    embedded: VnpacsService, query_set: dict[str, Path], tmp_path: Path
) -> None:
    port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    scp = subprocess.Popen(
        ["/usr/bin/storescp", "-aet", "DEST", "--bit-preserving", "-od", str(received), str(port)],
        env={"TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        added = cli(embedded, "remote", "add", "dest", "--aet", "DEST", "--host", "127.0.0.1", "--port", str(port))
        assert added.returncode == 0, added.stderr
        echo = cli(embedded, "remote", "echo", "dest")
        assert echo.returncode == 0, echo.stderr + echo.stdout
        study_uid = str(dcmread(query_set["tran1"]).StudyInstanceUID)
        moved = run_dcmtk(
            "movescu", "-S", "-aec", "VNPACS", "-aem", "DEST",
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
            "127.0.0.1", str(embedded.dicom_port),
        )  # fmt: skip
        assert moved.returncode == 0, moved.stderr
    finally:
        scp.terminate()
        scp.wait(10)
    got = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in received.iterdir()}
    sent = {str(dcmread(query_set[k]).SOPInstanceUID): query_set[k] for k in ("tran1", "tran1b", "tran1mr")}
    assert set(got) == set(sent)
    for uid, path in sent.items():
        assert dataset_bytes(got[uid]) == dataset_bytes(path)


def test_move_to_an_unknown_destination_is_refused(embedded: VnpacsService, query_set: dict[str, Path]) -> None:
    moved = run_dcmtk(
        "movescu", "-v", "-S", "-aec", "VNPACS", "-aem", "NOBODY",
        "-k", "QueryRetrieveLevel=STUDY", "-k", "AccessionNumber=ACC100", "127.0.0.1", str(embedded.dicom_port),
    )  # fmt: skip
    assert "Refused: MoveDestinationUnknown" in moved.stderr + moved.stdout


def test_getscu_retrieves_a_study(embedded: VnpacsService, query_set: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "get"
    out.mkdir()
    study_uid = str(dcmread(query_set["tran2"]).StudyInstanceUID)
    got = run_dcmtk(
        "getscu", "-S", "-aec", "VNPACS", "-od", str(out),
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", str(embedded.dicom_port),
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    files = list(out.iterdir())
    assert len(files) == 1
    assert dcmread(files[0]) == dcmread(query_set["tran2"])


def test_c_get_can_be_cancelled(embedded: VnpacsService, tmp_path: Path) -> None:
    from pynetdicom import AE, build_role, evt

    paths = [write_ct(tmp_path / "in", study="cancel", index=i) for i in range(1, 31)]
    assert all(s.Status == 0 for s in store_files(embedded.dicom_port, paths).values())
    study_uid = str(dcmread(paths[0]).StudyInstanceUID)
    holder: dict[str, object] = {}
    received: list[str] = []

    def on_store(event: object) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))  # type: ignore[attr-defined]
        if len(received) == 3:
            assoc = holder["assoc"]
            cx = next(
                c for c in assoc.accepted_contexts if c.abstract_syntax == StudyRootQueryRetrieveInformationModelGet
            )  # type: ignore[attr-defined]
            assoc.send_c_cancel(1, cx.context_id)  # type: ignore[attr-defined]
        return 0

    ae = AE(ae_title="CANCELSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", embedded.dicom_port, ae_title="VNPACS",
                         ext_neg=[build_role("1.2.840.10008.5.1.4.1.1.2", scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])  # fmt: skip
    holder["assoc"] = assoc
    responses = [
        s
        for s, _ in assoc.send_c_get(
            study_identifier("STUDY", StudyInstanceUID=study_uid), StudyRootQueryRetrieveInformationModelGet, msg_id=1
        )
        if s
    ]
    assoc.release()
    assert responses[-1].Status == 0xFE00
    pending = [int(r.NumberOfRemainingSuboperations) for r in responses if r.Status == 0xFF00]
    assert pending and pending[0] == 29 and pending == sorted(pending, reverse=True)  # counts go down
    assert int(responses[-1].NumberOfCompletedSuboperations) == len(received)
    assert 3 <= len(received) < 30


def test_c_move_reports_pending_counts_and_can_be_cancelled(embedded: VnpacsService, tmp_path: Path) -> None:
    """A workstation pulling a study it no longer needs cancels the C-MOVE: the sub-operations stop, the final
    response says Cancel (0xFE00) with the counts of what was sent, and the destination has exactly those."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelMove

    paths = [write_ct(tmp_path / "in", study="move-cancel", index=i) for i in range(1, 31)]
    assert all(s.Status == 0 for s in store_files(embedded.dicom_port, paths).values())
    study_uid = str(dcmread(paths[0]).StudyInstanceUID)

    arrived: list[str] = []

    def on_store(event: object) -> int:
        arrived.append(str(event.request.AffectedSOPInstanceUID))  # type: ignore[attr-defined]
        time.sleep(0.05)  # a slow workstation: the cancel arrives while sub-operations remain
        return 0

    destination = AE(ae_title="SLOWWS")
    destination.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    port = free_port()
    scp = destination.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        added = cli(embedded, "remote", "add", "slow-ws", "--aet", "SLOWWS", "--host", "127.0.0.1", "--port", str(port))
        assert added.returncode == 0, added.stderr
        ae = AE(ae_title="MOVESCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", embedded.dicom_port, ae_title="VNPACS")
        assert assoc.is_established
        (cx,) = assoc.accepted_contexts
        responses = []
        identifier = study_identifier("STUDY", StudyInstanceUID=study_uid)
        for response, _ in assoc.send_c_move(identifier, "SLOWWS", StudyRootQueryRetrieveInformationModelMove, 1):
            responses.append(response)
            if response and response.Status == 0xFF00 and int(response.NumberOfCompletedSuboperations) == 3:
                assoc.send_c_cancel(1, cx.context_id)
        assoc.release()
    finally:
        scp.shutdown()
    final = responses[-1]
    assert final.Status == 0xFE00, final
    pending = [r for r in responses if r.Status == 0xFF00]
    remaining = [int(r.NumberOfRemainingSuboperations) for r in pending]
    assert remaining[0] == 29 and remaining == sorted(remaining, reverse=True)
    assert [int(r.NumberOfCompletedSuboperations) for r in pending] == list(range(1, len(pending) + 1))
    assert int(final.NumberOfCompletedSuboperations) == len(arrived)
    assert int(final.NumberOfRemainingSuboperations) == 30 - len(arrived)
    assert 3 <= len(arrived) < 30 and len(set(arrived)) == len(arrived)


# ---- security and bad input ----------------------------------------------------------------------------------------


def test_unknown_calling_ae_is_rejected_when_an_allow_list_is_set(start_server: object) -> None:
    server = start_server("fs-sqlite", VNPACS_ALLOWED_AES="CT1,MR1")  # type: ignore[operator]
    good = run_dcmtk("echoscu", "-aet", "CT1", "-aec", "VNPACS", "127.0.0.1", str(server.dicom_port))
    bad = run_dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "VNPACS", "127.0.0.1", str(server.dicom_port))
    assert good.returncode == 0, good.stderr
    assert bad.returncode != 0
    assert "Calling AE Title Not Recognized" in bad.stderr or "rejected" in bad.stderr.lower()


def _count(port: int, **keys: object) -> int:
    matches, final = c_find(port, study_identifier("IMAGE", **{"SOPInstanceUID": "", **keys}))
    assert final == 0
    return len(matches)


def test_truncated_dataset_is_refused_with_an_error_comment_and_not_stored(
    embedded: VnpacsService, tmp_path: Path
) -> None:
    good = write_ct(tmp_path, study="trunc", size=128)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[: len(data) - 5000])
    status = store_files(embedded.dicom_port, [truncated])[truncated]
    assert 0xC000 <= status.Status <= 0xCFFF
    assert "truncated" in status.ErrorComment.lower()
    assert _count(embedded.dicom_port, SOPInstanceUID=str(dcmread(good).SOPInstanceUID)) == 0


def test_missing_uid_is_refused(embedded: VnpacsService, tmp_path: Path) -> None:
    path = write_ct(tmp_path, study="nouid")
    ds = dcmread(path)
    del ds.SeriesInstanceUID
    ds.save_as(path, enforce_file_format=True)
    status = store_files(embedded.dicom_port, [path])[path]
    assert 0xC000 <= status.Status <= 0xCFFF
    assert "SeriesInstanceUID" in status.ErrorComment
    assert _count(embedded.dicom_port, SOPInstanceUID=str(ds.SOPInstanceUID)) == 0


def test_dataset_not_matching_the_sop_class_is_refused(embedded: VnpacsService, tmp_path: Path) -> None:
    path = write_ct(tmp_path, study="mismatch")
    ds = dcmread(path)
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # sent as MR, the dataset says CT
    ds.save_as(path, enforce_file_format=False)
    status = store_files(embedded.dicom_port, [path])[path]
    assert status.Status == 0xA900
    assert "SOP Class" in status.ErrorComment
    assert _count(embedded.dicom_port, SOPInstanceUID=str(ds.SOPInstanceUID)) == 0


def test_garbage_after_a_valid_header_is_refused_and_the_server_keeps_serving(
    embedded: VnpacsService, tmp_path: Path
) -> None:
    path = write_ct(tmp_path, study="garbage")
    data = path.read_bytes()
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
    path.write_bytes(data[:meta_end] + bytes(range(256)) * 8)
    status = store_files(embedded.dicom_port, [path])[path]
    assert 0xC000 <= status.Status <= 0xCFFF
    assert status.ErrorComment
    assert run_dcmtk("echoscu", "-aec", "VNPACS", "127.0.0.1", str(embedded.dicom_port)).returncode == 0


def test_same_uid_with_different_bytes_keeps_the_first_and_the_second_recoverable(
    embedded: VnpacsService, tmp_path: Path
) -> None:
    first = write_ct(tmp_path / "a", study="dup", StudyDescription="Lần đầu")
    second = write_ct(tmp_path / "b", study="dup", StudyDescription="Lần hai")
    port = embedded.dicom_port
    assert store_files(port, [first])[first].Status == 0
    assert store_files(port, [first])[first].Status == 0  # identical: success, no second copy
    assert store_files(port, [second])[second].Status == 0  # different: kept aside, not served
    uid = str(dcmread(first).SOPInstanceUID)
    got, _ = c_get(port, study_identifier("IMAGE", SOPInstanceUID=uid),
                   [("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")], tmp_path / "get")  # fmt: skip
    assert dataset_bytes(got[uid]) == dataset_bytes(first)
    verify = cli(embedded, "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr  # the kept second copy is indexed, not an orphan


def test_parallel_associations_store_concurrently(embedded: VnpacsService, tmp_path: Path) -> None:
    groups = [[write_ct(tmp_path / str(g), study=f"par-{g}", index=i) for i in range(1, 26)] for g in range(4)]
    results: list[dict[Path, Dataset]] = []

    def push(paths: list[Path]) -> None:
        results.append(store_files(embedded.dicom_port, paths))

    threads = [threading.Thread(target=push, args=(g,)) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sum(len(r) for r in results) == 100
    assert all(s.Status == 0 for r in results for s in r.values())
    assert _count(embedded.dicom_port, StudyInstanceUID="", PatientID="BN0001", AccessionNumber="") >= 100


@pytest.mark.parametrize(
    ("name", "query", "expected"),
    [
        ("chrGerm.dcm", "aneas*", "Äneas^Rüdiger"),  # ISO_IR 100
        ("chrRuss.dcm", "люк*", "Люкceмбypг"),  # ISO_IR 144
        ("chrH31.dcm", "yamada*", "Yamada^Tarou=山田^太郎=やまだ^たろう"),  # ISO 2022 IR 87 with code extensions
    ],
)
def test_legacy_character_sets_are_decoded_and_answered_in_utf8(
    start_server: object, name: str, query: str, expected: str
) -> None:
    from pydicom.data import get_charset_files

    server = start_server("fs-sqlite")  # type: ignore[operator]
    path = Path(get_charset_files(name)[0])
    assert store_files(server.dicom_port, [path])[path].Status == 0
    matches, final = c_find(server.dicom_port, study_identifier("STUDY", PatientName=query))
    assert final == 0 and len(matches) == 1
    assert matches[0].SpecificCharacterSet == "ISO_IR 192"
    assert str(matches[0].PatientName) == expected


def test_replace_policy_serves_the_newcomer_and_keeps_the_earlier_copy(start_server: object, tmp_path: Path) -> None:
    server = start_server("fs-sqlite", VNPACS_DUPLICATE_POLICY="replace")  # type: ignore[operator]
    first = write_ct(tmp_path / "a", study="replace", StudyDescription="Bản gốc")
    second = write_ct(tmp_path / "b", study="replace", StudyDescription="Bản sửa")
    assert store_files(server.dicom_port, [first])[first].Status == 0
    assert store_files(server.dicom_port, [second])[second].Status == 0
    uid = str(dcmread(first).SOPInstanceUID)
    got, _ = c_get(server.dicom_port, study_identifier("IMAGE", SOPInstanceUID=uid),
                   [("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")], tmp_path / "get")  # fmt: skip
    assert dataset_bytes(got[uid]) == dataset_bytes(second)
    db = sqlite3.connect(Path(server.env["VNPACS_DATA_DIR"]) / "index.db")
    rows = db.execute(
        "SELECT resolution, blob_key FROM instance_conflict WHERE sop_instance_uid = ?", (uid,)
    ).fetchall()
    assert [r[0] for r in rows] == ["replaced"]
    kept = Path(server.env["VNPACS_DATA_DIR"]) / "blobs" / rows[0][1]
    assert dataset_bytes(kept) == dataset_bytes(first)  # the earlier copy is still there, byte for byte
    verify = cli(server, "verify")
    assert verify.returncode == 0, verify.stdout


def test_c_store_on_a_presentation_context_of_another_sop_class_is_refused(
    embedded: VnpacsService, tmp_path: Path
) -> None:
    from io import BytesIO

    from pynetdicom.dimse_primitives import C_STORE

    path = write_ct(tmp_path, study="wrong-context")
    mr, ct, ts = "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"
    ae = storage_ae_for_test()
    ae.add_requested_context(mr, [ts])
    assoc = ae.associate("127.0.0.1", embedded.dicom_port, ae_title="VNPACS")
    assert assoc.is_established
    try:
        context_id = assoc.accepted_contexts[0].context_id
        req = C_STORE()
        req.MessageID = 7
        req.AffectedSOPClassUID = ct  # a CT object on the MR context
        req.AffectedSOPInstanceUID = str(dcmread(path).SOPInstanceUID)
        req.Priority = 2
        req.DataSet = BytesIO(dataset_bytes(path))
        # Hold the requestor's reactor, as pynetdicom's own send_* methods do, so the answer comes to us.
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.001)
        assoc.dimse.send_msg(req, context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
    finally:
        assoc.release()
    assert rsp is not None and rsp.Status == 0xA900
    assert _count(embedded.dicom_port, SOPInstanceUID=req.AffectedSOPInstanceUID) == 0


def storage_ae_for_test():  # type: ignore[no-untyped-def]
    from tests.scu import storage_ae

    return storage_ae("CTXTEST")


def test_c_find_refuses_more_matches_than_the_cap(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server("fs-sqlite", VNPACS_MAX_FIND_RESULTS="2")
    files = [write_ct(tmp_path, who=patient(f"Bùi^Văn {c}", f"CAP-{c}"), study=f"cap-{c}") for c in "ABC"]
    assert all(s.Status == 0 for s in store_files(server.dicom_port, files).values())
    matches, final = c_find(server.dicom_port, study_identifier(PatientName="bui*", PatientID=None))
    assert final == 0xA700 and matches == []
    matches, final = c_find(server.dicom_port, study_identifier(PatientID="CAP-A"))
    assert final == 0 and [m.PatientID for m in matches] == ["CAP-A"]


@pytest.mark.parametrize("ending", ["abort", "connection lost"])
def test_a_transfer_cut_off_mid_object_leaves_nothing_behind_in_the_server(
    embedded: VnpacsService, tmp_path: Path, ending: str
) -> None:
    """A modality sends the command and part of an object's data set, then aborts or loses its network: `vnpacs
    serve` stores nothing, removes the partial spool file and closes its descriptor, and keeps serving."""
    from pydicom.filebase import DicomBytesIO

    from tests.scu import cut_off, descriptors_on, start_partial_store

    ds = dcmread(write_ct(tmp_path, study=f"cut-{ending}", size=512))
    encoded = DicomBytesIO()
    ds.save_as(encoded, enforce_file_format=False)
    body = encoded.getvalue()
    data_set = body[body.index(b"\x08\x00\x05\x00") :]
    spool_dir = Path(embedded.env["VNPACS_DATA_DIR"]) / "blobs" / ".tmp"
    before = set(spool_dir.iterdir())
    assert embedded.proc is not None
    pid = embedded.proc.pid

    assoc = start_partial_store(
        embedded.dicom_port,
        str(ds.SOPClassUID),
        str(ds.SOPInstanceUID),
        str(ds.file_meta.TransferSyntaxUID),
        data_set,
        called="VNPACS",
    )
    deadline = time.monotonic() + 10
    partial: list[Path] = []
    while not partial and time.monotonic() < deadline:
        partial = [p for p in spool_dir.iterdir() if p not in before]
        time.sleep(0.02)
    assert partial, "the server started spooling the object"
    assert descriptors_on(partial[0], pid), "the server holds the partial object open"
    cut_off(assoc, ending)
    deadline = time.monotonic() + 10
    while (partial[0].exists() or descriptors_on(partial[0], pid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not partial[0].exists()
    assert descriptors_on(partial[0], pid) == []
    assert _count(embedded.dicom_port, SOPInstanceUID=str(ds.SOPInstanceUID)) == 0
    assert store_files(embedded.dicom_port, [write_ct(tmp_path, study=f"after-{ending}")]).popitem()[1].Status == 0
