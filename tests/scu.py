"""Test-side DICOM clients (pynetdicom SCUs and DCMTK wrappers) and the test corpus."""

from __future__ import annotations

import os
import subprocess
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, build_context, build_role, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

DCMTK = Path("/usr/bin")

# Send files' dataset bytes unchanged and spool received objects to disk: byte-exact on both sides.
_config.STORE_SEND_CHUNKED_DATASET = True
_config.STORE_RECV_CHUNKED_DATASET = True


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def run_dcmtk(tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DCMTK / tool), *args], capture_output=True, text=True, timeout=timeout, env=dcmtk_env())


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file, without preamble and File Meta: what travels over DIMSE."""
    _, offset = split_dataset(path)
    with open(path, "rb") as fp:
        fp.seek(offset)
        return fp.read()


@dataclass(frozen=True)
class Corpus:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


@cache
def pydicom_files() -> tuple[Path, ...]:
    """Every file of pydicom's test data and of pydicom-data. Listed once per run: each listing tries to download the
    few files pydicom-data 1.0 lacks, seconds when offline."""
    from pydicom.data import get_testdata_files

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = get_testdata_files()
    return tuple(sorted(path for path in map(Path, set(names)) if path.is_file()))


@cache
def storage_corpus() -> tuple[Corpus, ...]:
    """Every file of pydicom's test data and of pydicom-data that is a storable Part 10 object."""
    items = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in pydicom_files():
            try:
                ds = dcmread(path, stop_before_pixels=True)
                uids = [
                    str(ds.get(k, ""))
                    for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
                ]
                ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
            except Exception:
                continue
            if not all(uids) or not ts or any(len(u) > 64 or not set(u) <= set("0123456789.") for u in uids):
                continue
            items.append(Corpus(path, uids[0], uids[1], ts))
    return tuple(items)


def storage_ae(aet: str = "TESTSCU") -> AE:
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    return ae


def store_files(
    port: int, paths: Iterable[Path], *, called: str = "VNPACS", calling: str = "TESTSCU", host: str = "127.0.0.1"
) -> dict[Path, Dataset]:
    """C-STORE each file over one association (contexts grouped by SOP class and transfer syntax)."""
    paths = list(paths)
    metas = {}
    for p in paths:
        meta, _ = split_dataset(p)
        metas[p] = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
    pairs = sorted(set(metas.values()))
    results: dict[Path, Dataset] = {}
    for start in range(0, len(pairs), 120):
        chunk = set(pairs[start : start + 120])
        ae = storage_ae(calling)
        ae.requested_contexts = [build_context(sc, [ts]) for sc, ts in sorted(chunk)]
        assoc = ae.associate(host, port, ae_title=called)
        assert assoc.is_established, "association with vnpacs refused"
        try:
            for p in paths:
                if metas[p] in chunk:
                    results[p] = assoc.send_c_store(p)
        finally:
            assoc.release()
    return results


def c_find(
    port: int,
    identifier: Dataset,
    *,
    model: Any = StudyRootQueryRetrieveInformationModelFind,
    called: str = "VNPACS",
    calling: str = "TESTSCU",
) -> tuple[list[Dataset], int]:
    ae = storage_ae(calling)
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    matches: list[Dataset] = []
    final = -1
    try:
        for status, ds in assoc.send_c_find(identifier, model):
            if status is None:
                break
            if status.Status in (0xFF00, 0xFF01):
                matches.append(ds)
            else:
                final = status.Status
    finally:
        assoc.release()
    return matches, final


def c_get(
    port: int, identifier: Dataset, storage_pairs: list[tuple[str, str]], out_dir: Path, *, called: str = "VNPACS"
) -> tuple[dict[str, Path], int]:
    """C-GET into `out_dir`; returns {SOP Instance UID: received file} (bytes as received) and the final status."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GetModel

    out_dir.mkdir(parents=True, exist_ok=True)
    received: dict[str, Path] = {}

    def on_store(event: Any) -> int:
        target = out_dir / f"{event.request.AffectedSOPInstanceUID}.dcm"
        os.replace(event.dataset_path, target)
        received[str(event.request.AffectedSOPInstanceUID)] = target
        return 0x0000

    ae = storage_ae("GETSCU")
    ae.add_requested_context(GetModel)
    for sop_class, ts in sorted(set(storage_pairs))[:120]:
        ae.add_requested_context(sop_class, [ts])
    roles = [build_role(sop_class, scp_role=True) for sop_class in sorted({sc for sc, _ in storage_pairs})]
    assoc = ae.associate("127.0.0.1", port, ae_title=called, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    final = -1
    try:
        for status, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet):
            if status is not None and status.Status not in (0xFF00,):
                final = status.Status
    finally:
        assoc.release()
    return received, final


def study_identifier(level: str = "STUDY", **keys: Any) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def multipart_parts(response: httpx.Response) -> list[bytes]:
    """The bodies of a multipart/related answer, in order."""
    boundary = response.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    parts = []
    for chunk in response.content.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        headers, _, body = chunk.partition(b"\r\n\r\n")
        parts.append(body[:-2] if body.endswith(b"\r\n") else body)
    return parts


# ---- transfers cut off in the middle of an object --------------------------------------------------------------


def start_partial_store(
    port: int, sop_class: str, sop_instance: str, transfer_syntax: str, data_set: bytes, *, called: str = "ANY-SCP"
) -> Any:
    """Associate and send a C-STORE's command and its data set's first three fragments (16 KiB PDUs), the rest never:
    a modality cut off in the middle of an object. Returns the established association for `cut_off`."""
    import io

    from pynetdicom import AE
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu import P_DATA_TF

    scu = AE("CUTSCU")
    scu.add_requested_context(sop_class, transfer_syntax)
    assoc = scu.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    rq = C_STORE()
    rq.MessageID = 1
    rq.AffectedSOPClassUID = sop_class
    rq.AffectedSOPInstanceUID = sop_instance
    rq.Priority = 0
    rq.DataSet = io.BytesIO(data_set)
    message = C_STORE_RQ()
    message.primitive_to_message(rq)
    pdus = list(message.encode_msg(assoc.accepted_contexts[0].context_id, 16_384))
    assert len(pdus) > 8, "the object must be several PDUs long"
    for primitive in pdus[:4]:
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        assoc.dul.socket.socket.sendall(pdu.encode())
    return assoc


def cut_off(assoc: Any, ending: str) -> None:
    """End a `start_partial_store` association: an A-ABORT, or the connection dropped without one."""
    if ending != "abort":
        assoc.dul.socket.socket.shutdown(2)
        assoc.dul.socket.socket.close()
    assoc.abort()  # after a dropped connection this only ends the SCU's own reactor: nothing reaches the peer


def descriptors_on(path: Path, pid: int | str = "self") -> list[str]:
    """The file descriptors process `pid` holds open on `path` (unlinked or not)."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith(str(path)):  # "(deleted)" is appended once unlinked
                found.append(fd.name)
        except OSError:
            continue
    return found
