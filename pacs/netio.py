"""Network I/O tuning for pynetdicom: TCP_NODELAY, event-driven reactors, byte-exact sends from stored files.

pynetdicom's DUL and association reactors poll: each loop that finds nothing to do sleeps 1 ms, so every PDU read,
every response sent and every received message waits for a sleep to end. Profiling a plain pynetdicom Storage SCP
shows that wait dominates the time per instance. Here the sleeps become waits on the things they poll for:
- the DUL thread waits in select() on its socket and on a wake-up pipe written when a primitive is queued to send;
- the association thread waits on an Event set when a DIMSE message or an ACSE primitive is queued for it.
Timeouts stay short, so anything not signalled (timers, kill flags) is still seen as before. The patches wrap
pynetdicom's own methods and queues; if its internals differ from what they expect, they are not applied and
pynetdicom keeps its stock behaviour.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import itertools
import logging
import os
import queue
import select
import socket
import struct
import sys
import tempfile
import threading
import time as _time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from pydicom.dataset import Dataset

from storage.ingest import HEAD_BYTES

log = logging.getLogger(__name__)

_IDLE_WAIT = 0.05  # seconds a reactor may sleep when nothing signals it; bounds timer/kill latency
_applied = False
_lock = threading.Lock()


class _NotifyingQueue(queue.Queue):  # type: ignore[type-arg]
    """A Queue that calls `notify` after each put, to wake a reactor waiting on it."""

    def __init__(self, notify: Callable[[], None]) -> None:
        super().__init__()
        self._notify = notify

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


class _MessageQueue(_NotifyingQueue):
    """The queue of received DIMSE messages, which serves a C-STORE request at once in the DUL thread.

    pynetdicom's DUL thread decodes a message and queues it; the association thread wakes up, runs the handler
    and queues the response; the DUL thread wakes up again to send it. For a Storage SCP those two hand-offs are
    a large part of the time per object. A peer sends its next request only after our response, so nothing
    is lost by running the C-STORE handler in the DUL thread: the response is sent as soon as the handler
    returns, by the same thread. Anything else (other messages, an association we requested, a reactor paused
    for a send_*() call, messages still waiting in the queue) takes the association thread as before.
    """

    def __init__(self, assoc: Any, c_store: type) -> None:
        super().__init__(_activity(assoc).set)
        self._assoc = assoc
        self._c_store: Any = c_store

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        assoc: Any = self._assoc
        primitive: Any
        context_id, primitive = item if isinstance(item, tuple) and len(item) == 2 else (None, None)
        if (
            type(primitive) is self._c_store
            and primitive.is_valid_request
            and assoc.is_acceptor
            and threading.current_thread() is assoc.dul
            and assoc._reactor_checkpoint.is_set()
            and not assoc._sent_release
            and self.empty()
        ):
            assoc._serve_request(primitive, context_id)
            return
        super().put(item, block, timeout)


def _activity(assoc: Any) -> threading.Event:
    event = getattr(assoc, "_vn_activity", None)
    if event is None:
        event = threading.Event()
        assoc._vn_activity = event
    return event  # type: ignore[no-any-return]


class _DulWake:
    """A self-pipe that makes the DUL thread's select() return when it has something to send."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)
        self.closed = False

    def wake(self) -> None:
        if not self.closed:
            try:
                os.write(self.w, b"\0")
            except (BlockingIOError, OSError):
                pass

    def drain(self) -> None:
        try:
            while os.read(self.r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.r)
            os.close(self.w)


class _ReactorTime:
    """Stands in for the `time` module inside pynetdicom's dul and association modules."""

    def __init__(self, dul_cls: type, assoc_cls: type) -> None:
        self._dul_cls = dul_cls
        self._assoc_cls = assoc_cls

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)

    def sleep(self, seconds: float) -> None:
        thread = threading.current_thread()
        if seconds >= 0.001 and seconds < 0.01:
            if isinstance(thread, self._dul_cls):
                return self._dul_wait(thread)
            if isinstance(thread, self._assoc_cls) and seconds == 0.001:
                event = _activity(thread)
                event.wait(_IDLE_WAIT)
                event.clear()
                return None
        _time.sleep(seconds)
        return None

    @staticmethod
    def _dul_wait(dul: Any) -> None:
        wake: _DulWake | None = getattr(dul, "_vn_wake", None)
        assoc_socket = getattr(dul, "socket", None)
        raw = getattr(assoc_socket, "socket", None) if assoc_socket is not None else None
        if wake is None or wake.closed or raw is None:
            _time.sleep(0.001)
            return
        try:
            readable, _, _ = select.select([raw, wake.r], [], [], _IDLE_WAIT)
        except (OSError, ValueError):
            _time.sleep(0.001)
            return
        if wake.r in readable:  # otherwise the pipe is empty: no read (and no EAGAIN) needed
            wake.drain()


def _set_nodelay(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


class StoredFile(Dataset):
    """A stored object handed to C-GET/C-MOVE sub-operations: sent from its file, byte for byte.

    pynetdicom only yields Datasets to its sub-operations; this one carries the identifying UIDs and the path, and
    the patched `send_c_store` sends the file's dataset bytes unchanged when the peer accepted its transfer syntax.
    """

    def __init__(self, path: Path, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> None:
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid
        object.__setattr__(self, "_vn_path", path)
        object.__setattr__(self, "_vn_transfer_syntax", transfer_syntax_uid)

    @property
    def path(self) -> Path:
        return object.__getattribute__(self, "_vn_path")  # type: ignore[no-any-return]

    @property
    def transfer_syntax_uid(self) -> str:
        return object.__getattribute__(self, "_vn_transfer_syntax")  # type: ignore[no-any-return]


def apply() -> None:
    """Install the patches once per process (idempotent)."""
    global _applied
    with _lock:
        if _applied:
            return
        _applied = True
        from pynetdicom import (
            _config,
            association,
            dimse,
            dimse_messages,
            dimse_primitives,
            dul,
            evt,
            pdu_primitives,
            transport,
        )

        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.STORE_SEND_CHUNKED_DATASET = True
        # pynetdicom's default event handlers format every DIMSE message for INFO/DEBUG logs we do not emit.
        _config.LOG_HANDLER_LEVEL = "none"
        # pydicom's value validation runs regular expressions on every element set or read; the server neither
        # rewrites what it receives nor needs warnings about it, and ingest checks what it relies on itself.
        import pydicom.config

        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
        pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE

        # TCP_NODELAY on every socket pynetdicom accepts or opens (Nagle makes DIMSE crawl at ~20 inst/s).
        orig_socket_init = transport.AssociationSocket.__init__

        def socket_init(self: Any, *args: Any, **kwargs: Any) -> None:
            orig_socket_init(self, *args, **kwargs)
            _set_nodelay(self.socket)

        transport.AssociationSocket.__init__ = socket_init  # type: ignore[method-assign]

        orig_connect = transport.AssociationSocket.connect

        def connect(self: Any, primitive: Any) -> None:
            _set_nodelay(self.socket)
            orig_connect(self, primitive)

        transport.AssociationSocket.connect = connect  # type: ignore[method-assign]

        _patch_send_c_store(association)
        _patch_recv(transport)
        _patch_spool(dimse_messages)
        _patch_store_command(_config, dimse_messages, dimse_primitives, evt)
        _patch_send_store_response(dimse, evt, pdu_primitives, dimse_primitives)

        dul_cls = dul.DULServiceProvider
        assoc_cls = association.Association
        needed = [
            hasattr(dul_cls, "run_reactor"),
            hasattr(dul_cls, "kill_dul"),
            hasattr(dimse.DIMSEServiceProvider, "__init__"),
            hasattr(association, "time") and hasattr(dul, "time"),
        ]
        if not all(needed):
            log.warning("pynetdicom internals changed: reactor latency patches not applied")
            return

        orig_dul_init = dul_cls.__init__

        def dul_init(self: Any, assoc: Any) -> None:
            orig_dul_init(self, assoc)
            wake = _DulWake()
            self._vn_wake = wake
            self.to_provider_queue = _NotifyingQueue(wake.wake)
            event = _activity(assoc)
            self.to_user_queue = _NotifyingQueue(event.set)

        orig_run_reactor = dul_cls.run_reactor

        def run_reactor(self: Any) -> None:
            try:
                orig_run_reactor(self)
            finally:
                wake = getattr(self, "_vn_wake", None)
                if wake is not None:
                    wake.close()
                _discard_unfinished(self.assoc)
                _activity(self.assoc).set()

        orig_kill = dul_cls.kill_dul

        def kill_dul(self: Any) -> None:
            orig_kill(self)
            wake = getattr(self, "_vn_wake", None)
            if wake is not None:
                wake.wake()

        orig_dimse_init = dimse.DIMSEServiceProvider.__init__
        c_store = dimse_primitives.C_STORE

        def dimse_init(self: Any, assoc: Any) -> None:
            orig_dimse_init(self, assoc)
            self.msg_queue = _MessageQueue(assoc, c_store)

        _patch_p_data(dul, evt, pdu_primitives)
        dul_cls.__init__ = dul_init  # type: ignore[method-assign]
        dul_cls.run_reactor = run_reactor  # type: ignore[method-assign]
        dul_cls.kill_dul = kill_dul  # type: ignore[method-assign]
        dimse.DIMSEServiceProvider.__init__ = dimse_init  # type: ignore[method-assign]
        reactor_time = _ReactorTime(dul_cls, assoc_cls)
        dul.time = reactor_time  # type: ignore[assignment]
        association.time = reactor_time  # type: ignore[assignment]


def _patch_send_c_store(association: Any) -> None:
    from pydicom import dcmread

    orig_send = association.Association.send_c_store

    def send_c_store(self: Any, dataset: Any, *args: Any, **kwargs: Any) -> Dataset:
        if isinstance(dataset, StoredFile):
            accepted = {
                (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in self.accepted_contexts
                if cx.transfer_syntax
            }
            if (dataset.SOPClassUID, dataset.transfer_syntax_uid) in accepted:
                return orig_send(self, dataset.path, *args, **kwargs)  # type: ignore[no-any-return]
            # The peer wants another transfer syntax: decode and let pynetdicom convert where it can.
            return orig_send(self, dcmread(dataset.path), *args, **kwargs)  # type: ignore[no-any-return]
        return orig_send(self, dataset, *args, **kwargs)  # type: ignore[no-any-return]

    association.Association.send_c_store = send_c_store


_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def _quickack(sock: socket.socket) -> None:
    """ACK at once. A peer without TCP_NODELAY holds its next small segment (the dataset after the command) until
    our ACK arrives, and Linux delays ACKs up to 40 ms: every C-STORE from such a peer would wait that long. Linux
    clears the flag by itself, so it is set again after each PDU."""
    if _TCP_QUICKACK is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        except OSError:
            pass


def _patch_recv(transport: Any) -> None:
    """Read a whole PDU with one recv(MSG_WAITALL) instead of a Python loop of 4 KiB recv() calls.

    The bytes object recv() returns is filled by the kernel: no zeroed buffer to copy into first (a bytearray of
    each 128 KB PDU cost more instructions than the rest of its reading). A short read (the socket's timeout, a
    signal) is followed by more until the PDU is whole or the peer has closed."""
    cls = transport.AssociationSocket
    orig_recv = cls.recv

    def recv(self: Any, nr_bytes: int) -> bytes:
        sock = self.socket
        if sock is None or nr_bytes <= 0 or not isinstance(sock, socket.socket):
            return orig_recv(self, nr_bytes)  # type: ignore[no-any-return]
        data = sock.recv(nr_bytes, socket.MSG_WAITALL)
        if 0 < len(data) < nr_bytes:
            parts = [data]
            nr_read = len(data)
            while nr_read < nr_bytes:
                more = sock.recv(nr_bytes - nr_read, socket.MSG_WAITALL)
                if not more:
                    break  # connection closed: return what arrived, as pynetdicom does
                parts.append(more)
                nr_read += len(more)
            data = b"".join(parts)
        _quickack(sock)
        return data

    cls.recv = recv


# ---- received objects hashed and written back while they arrive ------------------------------------------------

_spool_digests: dict[str, _Spool] = {}
_spool_lock = threading.Lock()
_spool_names = itertools.count()


def _sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux's sync_file_range(SYNC_FILE_RANGE_WRITE): start writing a range back to disk without waiting for it."""
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    write = 2  # SYNC_FILE_RANGE_WRITE

    def start_writeback(fd: int, offset: int, nbytes: int) -> None:
        fn(fd, offset, nbytes, write)  # advisory: a failure only means the final fsync does all the work

    return start_writeback


_start_writeback = _sync_file_range()
_WRITEBACK_CHUNK = 256 * 1024


class _Spool:
    """Stands in for the temporary file pynetdicom spools a received C-STORE dataset to.

    While the fragments arrive, in the DUL thread that would otherwise wait on the network: the SHA-256 is computed,
    so ingest does not read the object again to hash it, and the kernel is asked to start writing the bytes to disk,
    so the fsync that makes the object durable before it is acknowledged finds little left to do. The file is a plain
    descriptor in the spool folder (the blob store's own temporary folder, so the object is adopted by a rename).
    """

    def __init__(self, *, suffix: str = ".dcm", dir: str | None = None, **_ignored: Any) -> None:  # noqa: A002
        directory = dir or tempfile.gettempdir()
        while True:
            name = os.path.join(directory, f"rx-{os.getpid()}-{next(_spool_names)}{suffix}")
            try:
                self._fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                break
            except FileExistsError:
                continue
        self.name = name
        self.file = self  # pynetdicom flushes `.file` after each fragment; writes here are unbuffered
        self._digest = hashlib.sha256()
        self._head = bytearray()  # the first HEAD_BYTES, which ingest parses the header from
        self._size = 0
        self._written_back = 0
        self._closed = False
        with _spool_lock:
            _spool_digests[name] = self

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        self._digest.update(view)
        total = len(view)
        if self._size < HEAD_BYTES:
            self._head += view[: HEAD_BYTES - self._size]
        done = 0
        while done < total:
            done += os.write(self._fd, view[done:])
        self._size += total
        if _start_writeback is not None and self._size - self._written_back >= _WRITEBACK_CHUNK:
            _start_writeback(self._fd, self._written_back, self._size - self._written_back)
            self._written_back = self._size
        return total

    def flush(self) -> None:
        return None

    def flush_to_disk_soon(self) -> None:
        """The last fragment is in: start writing back what is not yet on its way to the disk, without waiting.
        The blob store's fsync before the acknowledgement then finds the bytes written or nearly so. (An fdatasync
        here, in a background thread, cost a device cache flush of its own: 4.1 flushes per object instead of 3.1,
        measured from /proc/diskstats, and was no faster.)"""
        if _start_writeback is not None and self._size > self._written_back and not self._closed:
            _start_writeback(self._fd, self._written_back, self._size - self._written_back)
            self._written_back = self._size

    def close(self) -> None:
        with _spool_lock:
            _spool_digests.pop(self.name, None)
        if not self._closed:
            self._closed = True
            os.close(self._fd)


def _spool_of(message: Any) -> _Spool | None:
    """The spool file of a C-STORE data set being received into `message` (a DIMSE message), if any."""
    spool = getattr(message, "_data_set_file", None)
    return spool if isinstance(spool, _Spool) else None


def _discard_unfinished(assoc: Any) -> None:
    """The association has ended (released, aborted, connection lost): a C-STORE data set still being received
    will never be complete. pynetdicom removes a spool file only after the handler ran, so without this each
    interrupted transfer would leave its partial file in the spool folder and its descriptor open."""
    dimse = getattr(assoc, "dimse", None)
    spool = _spool_of(getattr(dimse, "message", None))
    if spool is None:
        return
    spool.close()
    with contextlib.suppress(OSError):
        os.unlink(spool.name)
    if dimse is not None:
        dimse.message = None
    log.info("a C-STORE data set interrupted by the end of its association was discarded")


class Spooled(NamedTuple):
    """What the spool learnt of a received object while it arrived."""

    sha256: str
    size: int
    head: bytes  # the first HEAD_BYTES (or all of a smaller object)


def spooled(path: Path) -> Spooled | None:
    """The SHA-256, size and first bytes of a spooled received object, if it was spooled here."""
    with _spool_lock:
        spool = _spool_digests.get(str(path))
    if spool is None:
        return None
    return Spooled(spool._digest.hexdigest(), spool._size, bytes(spool._head))


class _SpooledFileMeta:
    """What pynetdicom's create_file_meta gets for a spooled C-STORE: the values only, packed by `_write_file_meta`."""

    __slots__ = ("values",)

    def __init__(self, values: list[tuple[int, bytes, bytes]]) -> None:
        self.values = values


def _file_meta_element(elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 2, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", 2, elem, vr, len(value)) + value


def _patch_spool(dimse_messages: Any) -> None:
    """Spool received C-STORE datasets to `_Spool` files, their File Meta Information packed directly.

    pynetdicom writes each spooled object's File Meta Information through a pydicom FileMetaDataset; packing the
    same seven elements here gives identical bytes (a test compares them) in a fraction of the time.
    """
    if getattr(dimse_messages, "NamedTemporaryFile", None) is None:
        return
    dimse_messages.NamedTemporaryFile = _Spool
    message_cls = dimse_messages.DIMSEMessage
    orig_decode = message_cls.decode_msg

    def decode_msg(self: Any, primitive: Any, assoc: Any = None) -> bool:
        complete: bool = orig_decode(self, primitive, assoc)
        if complete:
            spool = _spool_of(self)
            if spool is not None:
                spool.flush_to_disk_soon()
        return complete

    message_cls.decode_msg = decode_msg
    orig_create = getattr(dimse_messages, "create_file_meta", None)
    orig_write = getattr(dimse_messages, "write_file_meta_info", None)
    if orig_create is None or orig_write is None:
        return
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

    implementation = [
        (0x0012, b"UI", _ui(str(PYNETDICOM_IMPLEMENTATION_UID))),
        (0x0013, b"SH", _text(PYNETDICOM_IMPLEMENTATION_VERSION)),
    ]

    def create_file_meta(*, sop_class_uid: Any, sop_instance_uid: Any, transfer_syntax: Any, **kwargs: Any) -> Any:
        if kwargs:
            return orig_create(
                sop_class_uid=sop_class_uid,
                sop_instance_uid=sop_instance_uid,
                transfer_syntax=transfer_syntax,
                **kwargs,
            )
        try:
            values = [
                (0x0001, b"OB", b"\x00\x01"),
                (0x0002, b"UI", _ui(str(sop_class_uid))),
                (0x0003, b"UI", _ui(str(sop_instance_uid))),
                (0x0010, b"UI", _ui(str(transfer_syntax))),
                *implementation,
            ]
        except UnicodeEncodeError:
            return orig_create(
                sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid, transfer_syntax=transfer_syntax
            )
        if any(len(value) > 0xFFFF for _, vr, value in values if vr != b"OB"):
            return orig_create(
                sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid, transfer_syntax=transfer_syntax
            )
        return _SpooledFileMeta(values)

    def write_file_meta_info(fp: Any, file_meta: Any, *args: Any, **kwargs: Any) -> None:
        if not isinstance(file_meta, _SpooledFileMeta):
            orig_write(fp, file_meta, *args, **kwargs)
            return
        body = b"".join(_file_meta_element(elem, vr, value) for elem, vr, value in file_meta.values)
        fp.write(_file_meta_element(0x0000, b"UL", struct.pack("<I", len(body))) + body)

    dimse_messages.create_file_meta = create_file_meta
    dimse_messages.write_file_meta_info = write_file_meta_info


# ---- C-STORE responses encoded directly ---------------------------------------------------------------------


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(text: str) -> bytes:
    """An ASCII text value (SH, LO) padded to even length with a space."""
    raw = text.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def encode_store_response(rsp: Any) -> bytes | None:
    """The command set of a C-STORE-RSP (PS3.7 9.3.1.2), Implicit VR Little Endian, or None to leave it to pydicom.

    pynetdicom builds every response through a pydicom Dataset, encoded twice to get the group length: most of
    the time a Storage SCP spends between the stored object and its answer. A C-STORE response has a fixed shape,
    so it is packed here; anything unusual (an Offending Element, a non-ASCII comment) takes pynetdicom's path.
    """
    try:
        sop_class = str(rsp.AffectedSOPClassUID or "")
        sop_instance = str(rsp.AffectedSOPInstanceUID or "")
        message_id = rsp.MessageIDBeingRespondedTo
        status_code = rsp.Status
        comment = rsp.ErrorComment
        if rsp.OffendingElement or message_id is None or status_code is None or not sop_class or not sop_instance:
            return None
        elements = [
            (0x0002, _ui(sop_class)),
            (0x0100, struct.pack("<H", 0x8001)),
            (0x0120, struct.pack("<H", int(message_id))),
            (0x0800, struct.pack("<H", 0x0101)),
            (0x0900, struct.pack("<H", int(status_code))),
        ]
        if comment:
            elements.append((0x0902, _text(str(comment))))
        elements.append((0x1000, _ui(sop_instance)))
    except (UnicodeEncodeError, ValueError, TypeError, struct.error):
        return None
    body = b"".join(struct.pack("<HHI", 0, elem, len(value)) + value for elem, value in elements)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def _quiet_data_transfer(dul: Any, watched: tuple[Any, ...]) -> bool:
    """The association is in Sta6 (data transfer) with no event waiting for its state machine and no handler bound
    to the `watched` events: where a P-DATA-TF may be handled outside pynetdicom's event loop, received or sent."""
    return (
        dul.state_machine.current_state == "Sta6"
        and dul.event_queue.empty()
        and not any(dul.assoc.get_handlers(event) for event in watched)
    )


def _send_directly(dul: Any, watched: tuple[Any, ...]) -> bool:
    """Whether a P-DATA-TF may be written to the socket at once, by the DUL thread itself, instead of queued for it.

    The C-STORE handler runs in the DUL thread (see `_MessageQueue`); queueing its response means waking that same
    thread through its pipe and a turn of its loop (select, pipe drain, queue, state machine) before action DT-1
    (Sta6 + Evt9, staying in Sta6) sends it. With nothing else queued for the peer or the state machine and no
    handler bound to the events that path would fire, sending it here is the same bytes in the same order."""
    return (
        _quiet_data_transfer(dul, watched)
        and dul.to_provider_queue.empty()
        and isinstance(getattr(dul.socket, "socket", None), socket.socket)
        and threading.current_thread() is dul
    )


def _patch_send_store_response(dimse: Any, evt: Any, pdu_primitives: Any, dimse_primitives: Any) -> None:
    c_store = dimse_primitives.C_STORE
    p_data = pdu_primitives.P_DATA
    dimse_sent = evt.EVT_DIMSE_SENT
    watched = (evt.EVT_PDU_SENT, evt.EVT_FSM_TRANSITION)
    orig_send_msg = dimse.DIMSEServiceProvider.send_msg

    def send_msg(self: Any, primitive: Any, context_id: int) -> None:
        if (
            type(primitive) is c_store
            and primitive.MessageIDBeingRespondedTo is not None
            and not self.assoc.get_handlers(dimse_sent)
        ):
            encoded = encode_store_response(primitive)
            if encoded is not None and len(encoded) + 7 <= (self.maximum_pdu_size or 2**31):
                dul = self.dul
                if _send_directly(dul, watched):
                    # PS3.8 9.3.5: P-DATA-TF, one PDV item: context ID, message control header (command, last).
                    item = bytes((context_id, 0x03)) + encoded
                    dul.socket.send(struct.pack(">BBLL", 0x04, 0, 4 + len(item), len(item)) + item)
                    return
                pdata = p_data()
                pdata.presentation_data_value_list = [[context_id, b"\x03" + encoded]]  # command, last fragment
                self.dul.send_pdu(pdata)
                return
        orig_send_msg(self, primitive, context_id)

    dimse.DIMSEServiceProvider.send_msg = send_msg


# ---- P-DATA-TF PDUs and C-STORE commands decoded directly ------------------------------------------------------


def split_pdvs(body: bytes | bytearray) -> list[list[Any]] | None:
    """The Presentation Data Value items of a P-DATA-TF PDU's body (PS3.8 9.3.5.1) as pynetdicom's P-DATA lists
    [context ID, message control header + fragment], or None when the items do not fill the body exactly (pynetdicom's
    own decoder then decides what is wrong). The fragments are views of `body`, not copies: DIMSE copies each one
    once, into the spool file or the message's buffer."""
    pdvs: list[list[Any]] = []
    view = memoryview(body)
    end = len(body)
    pos = 0
    while pos < end:
        if pos + 6 > end:
            return None
        (length,) = struct.unpack_from(">I", body, pos)
        if length < 2 or pos + 4 + length > end:
            return None
        pdvs.append([body[pos + 4], view[pos + 5 : pos + 4 + length]])
        pos += 4 + length
    return pdvs or None


def _patch_p_data(dul: Any, evt: Any, pdu_primitives: Any) -> None:
    """Hand the P-DATA-TF PDUs of an established association straight to DIMSE.

    For every PDU pynetdicom builds a PDU object and its items, copies the bytes twice, queues an event for its state
    machine and only then, in action DT-2 (Sta6 + Evt10, staying in Sta6), passes a P-DATA primitive to DIMSE. A 512 KB
    image is several PDUs. When the association is in Sta6 with no other event waiting and no handler bound to the
    events this skips (data and PDU received, state machine transitions), the PDU is split here and DT-2's work done
    at once: same primitive, same order, same state. Any other PDU, and any P-DATA-TF whose items do not parse,
    follows pynetdicom's path from the bytes already read.
    """
    cls = dul.DULServiceProvider
    if not hasattr(cls, "_read_pdu_data") or not hasattr(cls, "_decode_pdu"):
        return
    p_data = pdu_primitives.P_DATA
    watched = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV, evt.EVT_FSM_TRANSITION)

    def read_pdu_data(self: Any) -> None:
        while _read_one_pdu(self) and _more_of_a_dataset(self):
            # The rest of a C-STORE data set is already arriving: read it here rather than once per PDU round the
            # reactor loop (its sleep, two selects, a pipe drain, two empty-queue exceptions). Anything else, a
            # kill request, something to send, or a PDU that is not yet there returns to the loop.
            self._idle_timer.restart()

    def _more_of_a_dataset(self: Any) -> bool:
        return (
            _spool_of(self.assoc.dimse.message) is not None
            and not self._kill_thread
            and self.to_provider_queue.empty()  # something to send (an abort, say) goes first, as in the loop
            and self.socket.ready
        )

    def _read_one_pdu(self: Any) -> bool:
        """Read one PDU and act on it; True when it was a P-DATA-TF handed straight to DIMSE."""
        sock = self.socket
        try:
            head = sock.recv(6)
        except (OSError, TimeoutError):
            log.debug("connection closed before a PDU header was received")
            self.event_queue.put("Evt17")  # transport connection closed
            return False
        if len(head) != 6:
            self.event_queue.put("Evt17")
            return False
        pdu_type, _, length = struct.unpack(">BBL", head)
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            log.error("unknown PDU type 0x%02X received", pdu_type)
            self.event_queue.put("Evt19")  # unrecognised or invalid PDU
            return False
        try:
            body = sock.recv(length)
        except (OSError, TimeoutError):
            log.error("connection closed before the entire PDU was received")
            self.event_queue.put("Evt17")
            return False
        if len(body) != length:
            log.error("the received PDU is shorter than expected (%d of %d bytes)", 6 + len(body), 6 + length)
            self.event_queue.put("Evt17")
            return False
        if pdu_type == 0x04 and _quiet_data_transfer(self, watched):
            pdvs = split_pdvs(body)
            if pdvs is not None:
                primitive = p_data()
                # Set past the setter, which accepts only bytes: every reader (DIMSE's decode_msg, below) indexes
                # the fragment and slices it, which a memoryview does without a copy.
                primitive._presentation_data_value_list = pdvs
                self.assoc.dimse.receive_primitive(primitive)  # DT-2
                return True
        try:
            pdu, event = self._decode_pdu(head + body)
        except Exception as exc:
            log.error("unable to decode the received PDU: %s", exc)
            self.event_queue.put("Evt19")
            return False
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)
        return False

    cls._read_pdu_data = read_pdu_data


# The command elements a C-STORE-RQ may carry (PS3.7 9.3.1.1): tag -> (keyword of pynetdicom's C_STORE or None, VR).
_STORE_COMMAND = {
    0x0000: (None, "UL"),  # Command Group Length
    0x0002: ("AffectedSOPClassUID", "UI"),
    0x0100: (None, "US"),  # Command Field
    0x0110: ("MessageID", "US"),
    0x0700: ("Priority", "US"),
    0x0800: (None, "US"),  # Command Data Set Type
    0x1000: ("AffectedSOPInstanceUID", "UI"),
    0x1030: ("MoveOriginatorApplicationEntityTitle", "AE"),
    0x1031: ("MoveOriginatorMessageID", "US"),
}
_UID_CHARS = frozenset(b"0123456789.")


def decode_store_command(encoded: bytes) -> dict[str, Any] | None:
    """The parameters of a C-STORE-RQ command set (Implicit VR Little Endian) with a data set, as pydicom would
    convert them, or None for anything else or anything unusual: then pynetdicom decodes it."""
    values: dict[str, Any] = {}
    fields: dict[int, Any] = {}
    pos, end = 0, len(encoded)
    while pos < end:
        if pos + 8 > end:
            return None
        group, elem, length = struct.unpack_from("<HHI", encoded, pos)
        pos += 8
        spec = _STORE_COMMAND.get(elem)
        if group != 0 or spec is None or pos + length > end or elem in fields:
            return None
        raw = encoded[pos : pos + length]
        pos += length
        keyword, vr = spec
        value: Any
        if vr == "US":
            if length != 2:
                return None
            value = raw[0] | raw[1] << 8
        elif vr == "UL":
            if length != 4:
                return None
            value = int.from_bytes(raw, "little")
        elif vr == "UI":
            raw = raw.rstrip(b"\0 ")
            if not raw or not _UID_CHARS.issuperset(raw):
                return None
            value = raw.decode("ascii")
        else:  # AE
            text = raw.strip(b" ")
            if not text or not all(0x20 <= c < 0x7F and c != 0x5C for c in text):
                return None
            value = text.decode("ascii")
        fields[elem] = value
        if keyword is not None:
            values[keyword] = value
    if fields.get(0x0100) != 0x0001 or fields.get(0x0800, 0x0101) == 0x0101:
        return None  # not a C-STORE-RQ, or one without a data set
    if not {"AffectedSOPClassUID", "AffectedSOPInstanceUID", "MessageID", "Priority"} <= values.keys():
        return None
    return values


def _patch_store_command(config: Any, dimse_messages: Any, dimse_primitives: Any, evt: Any) -> None:
    """Decode C-STORE-RQ command sets without a pydicom Dataset.

    pynetdicom decodes every command set into a pydicom Dataset and then sets each of its elements, converted, on a
    new primitive. A C-STORE request has a fixed set of small elements, so the primitive is built from the bytes here,
    through the primitive's own validating setters; the object's spool file is opened as pynetdicom opens it. A
    command with any other element, or any value pydicom would convert differently, takes pynetdicom's path, and
    so does every message when a handler is bound to EVT_DIMSE_RECV (which is given the decoded command set).
    """
    message_cls = dimse_messages.DIMSEMessage
    store_rq = getattr(dimse_messages, "C_STORE_RQ", None)
    c_store = dimse_primitives.C_STORE
    if (
        store_rq is None
        or not hasattr(message_cls, "message_to_primitive")
        or getattr(dimse_messages, "NamedTemporaryFile", None) is None
        or getattr(dimse_messages, "write_file_meta_info", None) is None
        or getattr(dimse_messages, "create_file_meta", None) is None
    ):
        return
    dimse_recv = evt.EVT_DIMSE_RECV
    patched_decode = message_cls.decode_msg  # the spool wrapper, when installed
    orig_to_primitive = message_cls.message_to_primitive

    def start_store(self: Any, context_id: int, encoded: bytes, assoc: Any) -> bool:
        """Take a complete C-STORE-RQ command; False leaves it to pynetdicom."""
        if not config.STORE_RECV_CHUNKED_DATASET or assoc.get_handlers(dimse_recv):
            return False
        values = decode_store_command(encoded)
        if values is None:
            return False
        cx = assoc._accepted_cx.get(context_id)
        if cx is None or not cx.transfer_syntax:
            return False
        primitive = c_store()
        try:
            for keyword, value in values.items():
                setattr(primitive, keyword, value)
        except (ValueError, TypeError):
            return False  # pynetdicom's decoding raises the same and ends the association
        primitive.DataSet = io.BytesIO()
        primitive._context_id = context_id
        self.context_id = context_id
        self.__class__ = store_rq
        spool = dimse_messages.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")
        self._data_set_file = spool
        self._data_set_path = Path(spool.name)
        spool.write(b"\x00" * 128 + b"DICM")
        dimse_messages.write_file_meta_info(
            spool,
            dimse_messages.create_file_meta(
                sop_class_uid=primitive.AffectedSOPClassUID,
                sop_instance_uid=primitive.AffectedSOPInstanceUID,
                transfer_syntax=cx.transfer_syntax[0],
            ),
        )
        self._vn_primitive = primitive
        return True

    def decode_msg(self: Any, primitive: Any, assoc: Any = None) -> bool:
        pdvs = getattr(primitive, "presentation_data_value_list", None)
        if assoc is not None and pdvs and type(self) is message_cls and self.encoded_command_set.tell() == 0:
            context_id, data = pdvs[0]
            if data[0] & 3 == 3 and start_store(self, context_id, bytes(data[1:]), assoc):  # the whole command at once
                if len(pdvs) == 1:
                    return False  # the data set follows in later PDUs
                rest = primitive.__class__()
                rest.presentation_data_value_list = pdvs[1:]
                return patched_decode(self, rest, assoc)  # type: ignore[no-any-return]
        return patched_decode(self, primitive, assoc)  # type: ignore[no-any-return]

    def message_to_primitive(self: Any) -> Any:
        primitive = self.__dict__.pop("_vn_primitive", None)
        if primitive is None:
            return orig_to_primitive(self)
        primitive._dataset_path = self._data_set_path
        primitive._dataset_file = self._data_set_file
        return primitive

    message_cls.decode_msg = decode_msg
    message_cls.message_to_primitive = message_to_primitive
