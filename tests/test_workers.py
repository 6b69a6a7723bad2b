"""Several DIMSE processes on one port (VNPACS_DIMSE_PROCESSES): associations spread over them, every object is
stored once and found, what a worker stores reaches the main process's reconciliation, and a dead worker is
replaced."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.conftest import StartServer
from tests.data import patient, write_ct
from tests.scu import c_find, store_files, study_identifier
from tests.services import VnpacsService
from tests.test_reconcile import orders_of, place, wait_status

SENDERS = 4


def _worker_pids(server: VnpacsService) -> set[int]:
    """The server's DIMSE worker processes: its children running the multiprocessing spawn entry point."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == server.pid and b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
            pids.add(int(entry.name))
    return pids


def _journal_lines(server: VnpacsService) -> dict[str, int]:
    folder = Path(server.env["VNPACS_DATA_DIR"]) / "journal"
    return {p.name: len(p.read_text().splitlines()) for p in folder.glob("*.log")}


def _push_in_parallel(server: VnpacsService, groups: list[list[Path]]) -> None:
    with ThreadPoolExecutor(len(groups)) as pool:
        results = list(pool.map(lambda files: store_files(server.dicom_port, files), groups))
    statuses = [status.Status for result in results for status in result.values()]
    assert len(statuses) == sum(len(g) for g in groups)
    assert all(s == 0 for s in statuses)


def _study_count(server: VnpacsService, study_uid: str) -> int:
    identifier = study_identifier("IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID="", SOPInstanceUID="")
    matches, final = c_find(server.dicom_port, identifier)
    assert final == 0
    return len(matches)


@pytest.mark.parametrize("configuration", ["fs-sqlite", "fs-pg"])
def test_associations_spread_over_processes_and_worker_stores_are_reconciled(
    configuration: str, start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(configuration, VNPACS_DIMSE_PROCESSES="2")
    assert len(_worker_pids(server)) == 1

    # One order per sender's study; whichever process takes an association, its study must link to its order,
    # which the reconciler in the main process only does if the worker handed the stored objects over.
    orders = orders_of(server) if configuration == "fs-sqlite" else None
    pks = {}
    groups: list[list[Path]] = []
    for s in range(SENDERS):
        accession = f"W{configuration[-2:]}{s}"
        if orders is not None:
            pks[s] = place(orders, f"WP-{configuration}-{s}", accession, "Trần^Thị Hoa", f"WK-{s}")
        who = patient("Trần^Thị Hoa", f"WK-{s}")
        groups.append(
            [write_ct(tmp_path, who=who, study=f"w-{s}", index=i, AccessionNumber=accession) for i in range(40)]
        )

    served_by_worker = 0
    for _round in range(3):  # which process wins each association is up to the kernel: repeat until both served
        _push_in_parallel(server, groups)
        lines = _journal_lines(server)
        served_by_worker = sum(n for name, n in lines.items() if "-dimse-" in name)
        if served_by_worker:
            break
    assert served_by_worker > 0, f"no association went to the worker process: {lines}"

    for group in groups:
        study_uid = str(dcmread(group[0]).StudyInstanceUID)
        assert _study_count(server, study_uid) == len(group)  # stored once each, whoever stored them
    if orders is not None:
        for pk in pks.values():
            assert wait_status(orders, pk, "IMAGES_AVAILABLE") == "IMAGES_AVAILABLE"


def _connections(pid: int, port: int, *, established_only: bool = True) -> int:
    """How many accepted TCP connections on local `port` process `pid` holds: its socket descriptors matched to the
    kernel's table of IPv4 connections, established ones or (`established_only=False`) any not yet closed."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port, state, inode = int(fields[1].split(":")[1], 16), fields[3], fields[9]
        if local_port == port and inode in inodes and (state == "01" if established_only else state != "0A"):
            count += 1  # 01: ESTABLISHED, 0A: LISTEN (the shared listening socket)
    return count


def test_associations_arriving_together_are_shared_evenly(start_server: StartServer) -> None:
    """Four modalities associating at the same moment get two DIMSE processes each, not three and one: a process
    counts the connections it has accepted and not yet started as busy, so the other one takes the next."""
    server = start_server("fs-sqlite", VNPACS_DIMSE_PROCESSES="2")
    processes = [server.pid, *_worker_pids(server)]
    assert len(processes) == 2
    start = threading.Barrier(SENDERS)

    def associate(_n: int) -> Any:
        ae = AE("SENDER")
        ae.add_requested_context(Verification)
        start.wait()
        return ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)

    for _round in range(3):
        with ThreadPoolExecutor(SENDERS) as pool:
            assocs = list(pool.map(associate, range(SENDERS)))
        try:
            assert all(a.is_established for a in assocs)
            counts = [_connections(pid, server.dicom_port) for pid in processes]
            assert counts == [2, 2], (_round, counts)
        finally:
            for a in assocs:
                a.release()
        deadline = time.monotonic() + 10  # the next round starts once the server has closed these connections
        while any(_connections(pid, server.dicom_port, established_only=False) for pid in processes):
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_a_killed_worker_is_replaced_and_serving_goes_on(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server("fs-sqlite", VNPACS_DIMSE_PROCESSES="2")
    (first,) = _worker_pids(server)
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 60
    replacement: set[int] = set()
    while time.monotonic() < deadline:
        replacement = _worker_pids(server) - {first}
        if replacement and any("-dimse-" in name for name in _journal_lines(server)):
            break
        time.sleep(0.2)
    assert replacement, "the killed worker was not replaced"

    files = [write_ct(tmp_path, who=patient("Lê^Văn Tám", "WK-K"), study="w-k", index=i) for i in range(8)]
    _push_in_parallel(server, [files[:4], files[4:]])
    assert _study_count(server, str(dcmread(files[0]).StudyInstanceUID)) == len(files)


def test_stopping_the_server_stops_its_workers_cleanly(start_server: StartServer) -> None:
    server = start_server("fs-sqlite", VNPACS_DIMSE_PROCESSES="3")
    workers = _worker_pids(server)
    assert len(workers) == 2
    server.stop()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    # Every process closed its runtime (no ingest journal is left behind) and nothing was logged as a crash.
    assert _journal_lines(server) == {}
    log = (Path(server.env["VNPACS_DATA_DIR"]).parent / "vnpacs.log").read_text()
    assert "Traceback" not in log
