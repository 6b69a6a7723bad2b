"""Storage Commitment Push Model SCP against a real `vnpacs serve`: instances stored by C-STORE, commitment asked
with pynetdicom, the N-EVENT-REPORT received on the same association or on a new one to a pynetdicom SCU."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.data import patient, write_ct
from tests.ris_scu import (
    commitment_scu_listener,
    failures,
    reference_pairs,
    request_commitment,
    request_commitment_and_leave,
)
from tests.scu import store_files
from tests.services import VnpacsService, free_port, start_vnpacs

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
PUSH_MODEL = "1.2.840.10008.1.20.1"


@pytest.fixture(scope="module")
def listener_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, listener_port: int) -> Iterator[VnpacsService]:
    svc = start_vnpacs(
        {"VNPACS_COMMITMENT_AES": f"MODALITY1=127.0.0.1:{listener_port}"},
        tmp_path_factory.mktemp("commitment"),
    )
    try:
        yield svc
    finally:
        svc.stop()


def stored(server: VnpacsService, tmp_path: Path, study: str, count: int) -> list[tuple[str, str]]:
    paths = [write_ct(tmp_path / study, who=patient("Lý^Thị Mai", f"BN-{study}"), study=study, index=i) for i in
             range(1, count + 1)]  # fmt: skip
    statuses = store_files(server.dicom_port, paths)
    assert all(s.Status == 0 for s in statuses.values())
    return [(CT_IMAGE, str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)) for p in paths]


def test_report_on_the_same_association_lists_stored_and_failed_instances(
    server: VnpacsService, tmp_path: Path
) -> None:
    good = stored(server, tmp_path, "commit-same", 3)
    never_stored = (CT_IMAGE, generate_uid())
    wrong_class = (MR_IMAGE, good[2][1])  # stored, but as a CT image
    status, transaction, receiver = request_commitment(
        server.dicom_port, [*good[:2], never_stored, wrong_class], calling="MODALITY2", wait=True
    )
    assert status.Status == 0x0000
    event_type, info, sender = receiver.wait()
    assert event_type == 2  # failures exist
    assert info.TransactionUID == transaction
    assert sender == "MODALITY2"  # the report came back on our own association (we are its requestor)
    assert reference_pairs(info, "ReferencedSOPSequence") == good[:2]
    assert failures(info) == {never_stored[1]: 0x0112, wrong_class[1]: 0x0119}
    assert info.RetrieveAETitle == "VNPACS"


def test_all_committed_is_event_type_1(server: VnpacsService, tmp_path: Path) -> None:
    good = stored(server, tmp_path, "commit-all", 2)
    status, transaction, receiver = request_commitment(server.dicom_port, good, calling="MODALITY2", wait=True)
    assert status.Status == 0
    event_type, info, _ = receiver.wait()
    assert event_type == 1 and info.TransactionUID == transaction
    assert reference_pairs(info, "ReferencedSOPSequence") == good
    assert "FailedSOPSequence" not in info


def test_report_on_a_new_association_to_the_configured_ae(
    server: VnpacsService, tmp_path: Path, listener_port: int
) -> None:
    good = stored(server, tmp_path, "commit-new", 2)
    missing = (CT_IMAGE, generate_uid())
    with commitment_scu_listener("MODALITY1", listener_port) as listener:
        # The modality leaves right after its request: the report must come on a new association.
        transaction, early = request_commitment_and_leave(server.dicom_port, [*good, missing], calling="MODALITY1")
        event_type, info, sender = listener.wait()
    assert not early.reports
    assert sender == "VNPACS"  # the archive opened this association, under its own AE title
    # Role selection: the listener (acceptor) is the Storage Commitment SCU there, the archive the SCP.
    assert listener.roles == [(PUSH_MODEL, True, False)]
    assert event_type == 2 and info.TransactionUID == transaction
    assert reference_pairs(info, "ReferencedSOPSequence") == good
    assert failures(info) == {missing[1]: 0x0112}


def test_release_right_after_the_response_gets_exactly_one_report(
    server: VnpacsService, tmp_path: Path, listener_port: int
) -> None:
    """However the release races the report (same association or a new one), each transaction is reported once."""
    good = stored(server, tmp_path, "commit-race", 1)
    with commitment_scu_listener("MODALITY1", listener_port) as listener:
        transactions = []
        early_reports = []
        for _ in range(5):
            status, transaction, early = request_commitment(server.dicom_port, good, calling="MODALITY1", wait=False)
            assert status.Status == 0
            transactions.append(transaction)
            early_reports.append(early)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = [r[1].TransactionUID for r in listener.reports] + [
                r[1].TransactionUID for e in early_reports for r in e.reports
            ]
            if sorted(got) == sorted(transactions):
                break
            time.sleep(0.1)
    assert sorted(got) == sorted(transactions)


def test_a_report_refused_on_the_same_association_goes_again_on_a_new_one(
    server: VnpacsService, tmp_path: Path, listener_port: int
) -> None:
    good = stored(server, tmp_path, "commit-refused", 1)
    with commitment_scu_listener("MODALITY1", listener_port) as listener:
        status, transaction, same = request_commitment(
            server.dicom_port, good, calling="MODALITY1", wait=True, answer=0x0110
        )
        assert status.Status == 0 and same.reports[0][1].TransactionUID == transaction
        event_type, info, sender = listener.wait()
    assert (event_type, info.TransactionUID, sender) == (1, transaction, "VNPACS")


def test_report_to_a_remote_ae_added_with_the_cli(server: VnpacsService, tmp_path: Path) -> None:
    port = free_port()
    added = subprocess.run(
        [sys.executable, "-m", "pacs", "remote", "add", "ward-us", "--aet", "USWARD", "--host", "127.0.0.1",
         "--port", str(port)],
        env=server.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    good = stored(server, tmp_path, "commit-remote", 1)
    with commitment_scu_listener("USWARD", port) as listener:
        transaction, _ = request_commitment_and_leave(server.dicom_port, good, calling="USWARD")
        event_type, info, sender = listener.wait()
    assert (event_type, info.TransactionUID, sender) == (1, transaction, "VNPACS")
    assert reference_pairs(info, "ReferencedSOPSequence") == good


def test_an_instance_whose_blob_no_longer_verifies_is_not_committed(server: VnpacsService, tmp_path: Path) -> None:
    good = stored(server, tmp_path, "commit-corrupt", 2)
    data_dir = Path(server.env["VNPACS_DATA_DIR"])
    with sqlite3.connect(data_dir / "index.db") as conn:
        (key,) = conn.execute("SELECT blob_key FROM instance WHERE sop_instance_uid = ?", (good[1][1],)).fetchone()
    blob = data_dir / "blobs" / key
    os.chmod(blob, 0o644)
    raw = bytearray(blob.read_bytes())
    raw[-1] ^= 0xFF  # one flipped bit in the pixel data: same size, different hash
    blob.write_bytes(bytes(raw))
    status, _, receiver = request_commitment(server.dicom_port, good, calling="MODALITY2", wait=True)
    assert status.Status == 0
    event_type, info, _ = receiver.wait()
    assert event_type == 2
    assert reference_pairs(info, "ReferencedSOPSequence") == good[:1]
    assert failures(info) == {good[1][1]: 0x0110}


def test_unknown_ae_with_the_association_closed_gets_no_report_and_the_server_stays_up(
    server: VnpacsService, tmp_path: Path
) -> None:
    good = stored(server, tmp_path, "commit-unknown", 1)
    _, early = request_commitment_and_leave(server.dicom_port, good, calling="NOBODY")
    deadline = time.monotonic() + 10
    while "AE NOBODY is not configured" not in server.log_tail(200) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "AE NOBODY is not configured" in server.log_tail(200)
    assert not early.reports
    # The server still answers commitment requests.
    again, _, receiver = request_commitment(server.dicom_port, good, calling="MODALITY2", wait=True)
    assert again.Status == 0 and receiver.wait()[0] == 1


def test_malformed_requests_are_refused(server: VnpacsService) -> None:
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StorageCommitmentPushModel

    ae = AE(ae_title="MODALITY2")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="VNPACS")
    assert assoc.is_established
    try:
        no_transaction = Dataset()
        item = Dataset()
        item.ReferencedSOPClassUID = CT_IMAGE
        item.ReferencedSOPInstanceUID = generate_uid()
        no_transaction.ReferencedSOPSequence = [item]
        rsp, _ = assoc.send_n_action(no_transaction, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
        assert rsp.Status == 0x0115
        with_transaction = Dataset()
        with_transaction.TransactionUID = generate_uid()
        with_transaction.ReferencedSOPSequence = [item]
        rsp, _ = assoc.send_n_action(with_transaction, 2, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
        assert rsp.Status == 0x0123  # no such action type
        rsp, _ = assoc.send_n_action(with_transaction, 1, StorageCommitmentPushModel, generate_uid())
        assert rsp.Status == 0x0117  # not the well-known instance
    finally:
        assoc.release()
