"""DIMSE worker processes: several processes of one `vnpacs serve` accept associations on one listening socket.

pynetdicom runs every association in Python threads, so one process uses one core however many modalities send at
once; with several associations the threads mostly wait for each other's interpreter lock. `serve` with
VNPACS_DIMSE_PROCESSES=N binds the DICOM port once and serves it from itself and N-1 spawned processes. Each accepts
what it is first to pick up (a busy process is slower to wake, so work spreads by itself), stores through the same
ingest path into the same index and blob store, and sends what it stored back to the main process, whose listeners
(reconciliation, metadata warming) see every object as if it had arrived there. A worker that dies is started again.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from typing import Any

from pacs.settings import Settings
from storage.ingest import Archive, IngestResult

log = logging.getLogger(__name__)

_context = multiprocessing.get_context("spawn")
_RESPAWN_CHECK = 1.0  # seconds between checks that every worker is alive


def dimse_processes(settings: Settings) -> int:
    """VNPACS_DIMSE_PROCESSES, where 0 means one per core, at most four."""
    if settings.dimse_processes > 0:
        return settings.dimse_processes
    return max(1, min(os.cpu_count() or 1, 4))


def shared_listener(host: str, port: int, backlog: int = 128) -> socket.socket:
    """The DICOM port, bound and listening once, non-blocking so that a process that lost the race to a connection
    does not wait in accept()."""
    listener = socket.create_server((host, port), backlog=backlog)
    listener.setblocking(False)
    return listener


class AssociationLoad:
    """Active associations of each DIMSE process in shared memory (slot 0: the main process)."""

    def __init__(self, slots: Any, index: int) -> None:
        self.slots = slots
        self.index = index

    def publish(self, active: int) -> None:
        self.slots[self.index] = active

    def may_accept(self, active: int) -> bool:
        self.slots[self.index] = active
        return active <= min(self.slots[:])


def _run_worker(
    settings: Settings,
    listener: socket.socket,
    results: Queue[IngestResult | None],
    ready: Any,
    slots: Any,
    index: int,
) -> None:
    """A worker's whole life: DIMSE services on the shared listener until the main process stops it or goes away."""
    from pacs.app import build_dimse, build_runtime, receive_tmp_dir
    from pacs.cli import configure_logging

    _die_with_parent()
    configure_logging(settings.log_level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    parent = os.getppid()
    runtime = build_runtime(settings, migrate=False, journal="dimse")
    # The main process emptied the spool folder and recovered interrupted writes before starting any worker.
    tempfile.tempdir = str(receive_tmp_dir(runtime))
    runtime.archive.listeners.append(results.put)
    dimse = build_dimse(runtime)
    slots[index] = 0
    dimse.start(listener, AssociationLoad(slots, index))
    ready.set()
    log.info("DIMSE worker %d serving %s", os.getpid(), listener.getsockname())
    try:
        while not stop.wait(_RESPAWN_CHECK):
            if os.getppid() != parent:  # the main process is gone: so are we
                break
    finally:
        dimse.stop()
        runtime.close()
        log.info("DIMSE worker %d stopped", os.getpid())


def _die_with_parent() -> None:
    """Linux: be killed the moment the main process dies (kill -9 included), so no orphan keeps the DICOM port
    open against the next start; what was in flight is recovered like any crash (the ingest journal)."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class DimseWorkers:
    """Starts, watches and stops the worker processes, and hands their stores to this process's archive listeners."""

    def __init__(self, settings: Settings, listener: socket.socket, archive: Archive, count: int) -> None:
        self.settings = settings
        self.listener = listener
        self.archive = archive
        self.count = count
        self.results: Queue[IngestResult | None] = _context.Queue()
        self.slots = _context.Array("i", count + 1, lock=False)  # single int writes: no lock needed
        self.load = AssociationLoad(self.slots, 0)
        self.processes: list[SpawnProcess] = []
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def _spawn(self, index: int) -> tuple[SpawnProcess, Any]:
        ready = _context.Event()
        process = _context.Process(
            target=_run_worker,
            args=(self.settings, self.listener, self.results, ready, self.slots, index),
            name="vnpacs-dimse",
            daemon=True,
        )
        process.start()
        return process, ready

    def start(self, timeout: float = 120.0) -> None:
        """Start the workers and wait until each serves (or has died), so a ready server is ready at full width."""
        spawned = [self._spawn(i + 1) for i in range(self.count)]
        self.processes = [process for process, _ in spawned]
        deadline = time.monotonic() + timeout
        for process, ready in spawned:
            while not ready.wait(0.2) and process.is_alive() and time.monotonic() < deadline:
                pass
            if not ready.is_set():
                log.error("DIMSE worker %s did not start (exit code %s)", process.pid, process.exitcode)
        for target, name in ((self._forward, "dimse-results"), (self._watch, "dimse-watch")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _forward(self) -> None:
        while True:
            try:
                result = self.results.get()
            except (EOFError, OSError):
                return
            if result is None:
                return
            self.archive.notify(result)

    def _watch(self) -> None:
        while not self._stopping.wait(_RESPAWN_CHECK):
            for i, process in enumerate(self.processes):
                if not process.is_alive() and not self._stopping.is_set():
                    log.error("DIMSE worker %s exited with %s; starting another", process.pid, process.exitcode)
                    self.slots[i + 1] = 0
                    self.processes[i] = self._spawn(i + 1)[0]

    def stop(self, timeout: float = 10.0) -> None:
        log.info("stopping %d DIMSE worker(s)", len(self.processes))
        self._stopping.set()
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join(1)
        with contextlib.suppress(Exception):
            self.results.put(None)
        for thread in self._threads:
            thread.join(2)
