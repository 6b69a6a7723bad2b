"""What pacs.netio encodes and decodes in pynetdicom's place is what pynetdicom itself encodes and decodes."""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, StoragePresentationContexts, dimse_messages, dsutils, evt
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from pacs import netio

netio.apply()

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


def _pynetdicom_command_set(rsp: C_STORE) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    fragments = [pdv.presentation_data_value_list[0][1] for pdv in message.encode_msg(1, 131072)]
    return b"".join(fragment[1:] for fragment in fragments)


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "status_code", "comment"),
    [
        (CT, "1.2.3.4", 0x0000, None),  # even-length UIDs
        (MR, "1.2.3.45", 0xA700, "storage unavailable, retry later"),  # odd-length instance UID, even comment
        ("1.2", "1.23", 0xC000, "odd"),  # odd comment padded with a space
        (CT, "1.2.826.0.1.3680043.8.498.1", 0xB000, None),
    ],
)
def test_store_response_packed_as_pynetdicom_encodes_it(
    sop_class: str, sop_instance: str, status_code: int, comment: str | None
) -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status_code
    if comment:
        rsp.ErrorComment = comment
    assert netio.encode_store_response(rsp) == _pynetdicom_command_set(rsp)


def test_store_response_with_offending_element_left_to_pynetdicom() -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 1
    rsp.AffectedSOPClassUID = CT
    rsp.AffectedSOPInstanceUID = "1.2.3"
    rsp.Status = 0xA900
    rsp.OffendingElement = [0x00080016]
    assert netio.encode_store_response(rsp) is None


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "transfer_syntax"),
    [
        (CT, "1.2.3.4.5", "1.2.840.10008.1.2.1"),
        (MR, "1.2.3.45", "1.2.840.10008.1.2"),
        (CT, "1.2.3", "1.2.840.10008.1.2.4.50"),
    ],
)
def test_spooled_file_meta_packed_as_pydicom_writes_it(sop_class: str, sop_instance: str, transfer_syntax: str) -> None:
    expected = DicomBytesIO()
    write_file_meta_info(
        expected,
        dsutils.create_file_meta(
            sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=transfer_syntax
        ),
    )
    packed = io.BytesIO()
    dimse_messages.write_file_meta_info(
        packed,
        dimse_messages.create_file_meta(
            sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=transfer_syntax
        ),
    )
    assert packed.getvalue() == expected.getvalue()


# ---- C-STORE requests decoded without pynetdicom's PDU objects and command Datasets ---------------------------


def _store_request(
    sop_class: str, sop_instance: str, *, message_id: int = 3, priority: int = 0, **extra: object
) -> C_STORE:
    rq = C_STORE()
    rq.MessageID = message_id
    rq.AffectedSOPClassUID = sop_class
    rq.AffectedSOPInstanceUID = sop_instance
    rq.Priority = priority
    for keyword, value in extra.items():
        setattr(rq, keyword, value)
    rq.DataSet = io.BytesIO(b"\x08\x00\x18\x00\x00\x00\x00\x00")
    return rq


def _encoded_store_command(rq: C_STORE) -> bytes:
    message = C_STORE_RQ()
    message.primitive_to_message(rq)
    fragments = [pdv.presentation_data_value_list[0][1] for pdv in message.encode_msg(1, 131072)]
    return b"".join(fragment[1:] for fragment in fragments if fragment[0] & 1)


def _pynetdicom_store_parameters(encoded: bytes) -> dict[str, object]:
    """What pynetdicom's own decoding sets on the primitive, for the parameters a C-STORE request carries."""
    message = C_STORE_RQ()
    message.command_set = dsutils.decode(io.BytesIO(encoded), True, True)
    primitive = message.message_to_primitive()
    keywords = ("AffectedSOPClassUID", "AffectedSOPInstanceUID", "MessageID", "Priority",
                "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID")  # fmt: skip
    return {k: getattr(primitive, k) for k in keywords if getattr(primitive, k) is not None}


@pytest.mark.parametrize(
    "rq",
    [
        _store_request(CT, "1.2.3.4"),
        _store_request(MR, "1.2.3.45", message_id=65535, priority=2),  # odd-length UID padded with a NUL
        _store_request(
            CT,
            "1.2.826.0.1.3680043.8.498.1",
            priority=1,
            MoveOriginatorApplicationEntityTitle="WS1",
            MoveOriginatorMessageID=9,
        ),  # fmt: skip
        _store_request(CT, "1.2.3", MoveOriginatorApplicationEntityTitle="  PACS AE ", MoveOriginatorMessageID=0),
    ],
)
def test_store_command_decoded_as_pynetdicom_decodes_it(rq: C_STORE) -> None:
    encoded = _encoded_store_command(rq)
    decoded = netio.decode_store_command(encoded)
    assert decoded is not None
    expected = _pynetdicom_store_parameters(encoded)
    assert decoded == {k: str(v) if k.endswith("UID") else v for k, v in expected.items()}
    primitive = C_STORE()  # the values pass the primitive's own validation as they are
    for keyword, value in decoded.items():
        setattr(primitive, keyword, value)
    assert {k: getattr(primitive, k) for k in expected} == expected


def _element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, elem, len(value)) + value


def _command(*elements: bytes) -> bytes:
    body = b"".join(elements)
    return _element(0x0000, struct.pack("<I", len(body))) + body


_STORE_ELEMENTS = {
    0x0002: _element(0x0002, b"1.2.840.10008.5.1.4.1.1.2\x00"),
    0x0100: _element(0x0100, b"\x01\x00"),
    0x0110: _element(0x0110, b"\x05\x00"),
    0x0700: _element(0x0700, b"\x00\x00"),
    0x0800: _element(0x0800, b"\x02\x02"),
    0x1000: _element(0x1000, b"1.2.3.4"),
}


def _store_command_with(**replace: bytes) -> bytes:
    elements = dict(_STORE_ELEMENTS)
    for name, value in replace.items():
        elem = int(name[1:], 16)
        if value:
            elements[elem] = value
        else:
            del elements[elem]
    return _command(*(elements[k] for k in sorted(elements)))


def test_crafted_store_command_is_decoded() -> None:
    assert netio.decode_store_command(_store_command_with()) == {
        "AffectedSOPClassUID": CT,
        "AffectedSOPInstanceUID": "1.2.3.4",
        "MessageID": 5,
        "Priority": 0,
    }


@pytest.mark.parametrize(
    "encoded",
    [
        _store_command_with(e0902=_element(0x0902, b"comment ")),  # an element a C-STORE request does not carry
        _store_command_with(e0100=_element(0x0100, b"\x30\x00")),  # a C-ECHO request
        _store_command_with(e0800=_element(0x0800, b"\x01\x01")),  # no data set
        _store_command_with(e0700=_element(0x0700, b"\x00\x00\x01\x00")),  # Priority with two values
        _store_command_with(e1000=_element(0x1000, b"1.2.3.x")),  # not a UID
        _store_command_with(e1000=_element(0x1000, b"")),  # empty UID
        _store_command_with(e1000=b""),  # no SOP Instance UID
        _store_command_with(e0110=b""),  # no Message ID
        _store_command_with(e1030=_element(0x1030, "TRẠM".encode())),  # non-ASCII AE title
        _store_command_with(e1030=_element(0x1030, b"A\\B ")),  # AE with a value delimiter
        _store_command_with()[:-3],  # truncated value
        _store_command_with() + _element(0x0110, b"\x06\x00"),  # an element twice
        _store_command_with() + b"\x08\x00\x05\x00",  # a group other than 0000, truncated
    ],
)
def test_unusual_store_commands_are_left_to_pynetdicom(encoded: bytes) -> None:
    assert netio.decode_store_command(encoded) is None


def test_pdvs_split_as_pynetdicom_decodes_them() -> None:
    pdu = P_DATA_TF()
    pdu.decode(
        b"\x04\x00"
        + struct.pack(">I", 6 + 5 + 6 + 9 + 6 + 2)
        + struct.pack(">IB", 6, 1) + b"\x03abcd"
        + struct.pack(">IB", 10, 3) + b"\x00efghijkl"
        + struct.pack(">IB", 3, 5) + b"\x02z"
    )  # fmt: skip
    body = bytearray(pdu.encode()[6:])  # as the receiver reads it
    pdvs = netio.split_pdvs(body)
    assert pdvs == [list(pdv) for pdv in pdu.to_primitive().presentation_data_value_list]
    # The fragments are views of the PDU as read, not copies of it.
    assert all(isinstance(data, memoryview) and data.obj is body for _, data in pdvs)


@pytest.mark.parametrize(
    "body",
    [
        b"",  # no item
        struct.pack(">IB", 1, 1),  # an item too short to hold a control header
        struct.pack(">IB", 9, 1) + b"\x03abc",  # an item longer than the PDU
        struct.pack(">IB", 4, 1) + b"\x03abc" + b"\x00\x00",  # bytes after the last item
    ],
)
def test_malformed_pdvs_are_left_to_pynetdicom(body: bytes) -> None:
    assert netio.split_pdvs(body) is None


@pytest.fixture()
def receiver() -> Iterator[tuple[int, list[bytes], AE]]:
    """A pynetdicom Storage SCP in this process, with the patches applied: the spooled objects' bytes."""
    received: list[bytes] = []

    def on_store(event: evt.Event) -> int:
        received.append(Path(event.dataset_path).read_bytes())
        return 0x0000

    ae = AE("NETIO")
    ae.supported_contexts = StoragePresentationContexts
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield server.server_address[1], received, ae
    finally:
        server.shutdown()


def _send(port: int, datasets: list[Dataset], max_pdu: int) -> list[int]:
    scu = AE("SCU")
    scu.maximum_pdu_size = max_pdu
    scu.add_requested_context(CT, ExplicitVRLittleEndian)
    assoc = scu.associate("127.0.0.1", port)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _ct(n: int, nbytes: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.77.{n}"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.77"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.77.0"
    ds.PatientName = "Nguyễn^Văn An"
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.BitsAllocated = 8
    ds.PixelData = bytes(range(256)) * (nbytes // 256)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


@pytest.mark.parametrize("watched", [False, True])
def test_received_objects_identical_on_either_path(
    receiver: tuple[int, list[bytes], AE], monkeypatch: pytest.MonkeyPatch, watched: bool
) -> None:
    """P-DATA-TF PDUs skip pynetdicom's PDU decoding and the C-STORE commands its Dataset decoding, unless someone
    watches the events they skip: either way the spooled objects are the same bytes."""
    port, received, ae = receiver
    decoded: list[int] = []
    commands: list[str] = []
    orig_decode_pdu = DULServiceProvider._decode_pdu
    orig_decode = dsutils.decode

    def count_pdu(self: DULServiceProvider, bytestream: bytearray) -> tuple[object, str]:
        decoded.append(bytestream[0])
        return orig_decode_pdu(self, bytestream)  # type: ignore[return-value]

    def count_command(*args: object, **kwargs: object) -> Dataset:
        command = orig_decode(*args, **kwargs)  # type: ignore[arg-type]
        if command.CommandField == 0x0001:  # C-STORE-RQ (the responses the SCU here decodes are not counted)
            commands.append(command.AffectedSOPInstanceUID)
        return command

    monkeypatch.setattr(DULServiceProvider, "_decode_pdu", count_pdu)
    monkeypatch.setattr(dimse_messages, "decode", count_command)
    if watched:
        for event in (evt.EVT_PDU_RECV, evt.EVT_DIMSE_RECV):
            ae._servers[0].bind(event, lambda event: None)
    datasets = [_ct(n, nbytes) for n, nbytes in enumerate([256, 40_000, 300_000])]
    assert _send(port, datasets, max_pdu=16_384) == [0, 0, 0]
    p_data_decoded = decoded.count(0x04)
    if watched:
        assert p_data_decoded > 20 and len(commands) == 3  # every P-DATA-TF and command through pynetdicom
    else:
        assert p_data_decoded == 0 and commands == []
    assert decoded.count(0x01) == 1  # the A-ASSOCIATE-RQ always takes pynetdicom's path
    expected = []
    for ds in datasets:
        fp = DicomBytesIO()
        ds.save_as(fp, enforce_file_format=False)
        expected.append(fp.getvalue())
    # The spool holds pynetdicom's File Meta Information and the data set as sent.
    assert [b[b.index(b"\x08\x00\x05\x00") :] for b in received] == [
        e[e.index(b"\x08\x00\x05\x00") :] for e in expected
    ]
    assert all(b[128:132] == b"DICM" for b in received)


@pytest.mark.parametrize("watched", [False, True])
def test_store_responses_sent_at_once_are_the_bytes_pynetdicom_sends(
    receiver: tuple[int, list[bytes], AE], monkeypatch: pytest.MonkeyPatch, watched: bool
) -> None:
    """The handler's thread writes a C-STORE response to the socket itself rather than queueing it for the
    reactor, unless a handler watches the events that path skips: the same PDUs reach the peer either way."""
    port, _, ae = receiver
    queued: list[P_DATA] = []
    orig_send_pdu = DULServiceProvider.send_pdu

    def count(self: DULServiceProvider, primitive: object) -> None:
        if self.assoc.is_acceptor and isinstance(primitive, P_DATA):
            queued.append(primitive)
        orig_send_pdu(self, primitive)  # type: ignore[arg-type]

    monkeypatch.setattr(DULServiceProvider, "send_pdu", count)
    if watched:
        ae._servers[0].bind(evt.EVT_PDU_SENT, lambda event: None)
    raw: list[bytes] = []
    scu = AE("SCU")
    scu.add_requested_context(CT, ExplicitVRLittleEndian)
    assoc = scu.associate("127.0.0.1", port, evt_handlers=[(evt.EVT_DATA_RECV, lambda e: raw.append(bytes(e.data)))])
    assert assoc.is_established
    datasets = [_ct(n, nbytes) for n, nbytes in enumerate([256, 300_000])]
    try:
        assert [int(assoc.send_c_store(ds).Status) for ds in datasets] == [0, 0]
    finally:
        assoc.release()
    expected = []
    for ds in datasets:
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = 1  # send_c_store's default message ID
        rsp.AffectedSOPClassUID = CT
        rsp.AffectedSOPInstanceUID = ds.SOPInstanceUID
        rsp.Status = 0x0000
        message = C_STORE_RSP()
        message.primitive_to_message(rsp)
        expected.extend(P_DATA_TF(p_data).encode() for p_data in message.encode_msg(1, 131072))
    assert [pdu for pdu in raw if pdu[0] == 0x04] == expected
    assert len(queued) == (2 if watched else 0)


def test_receiving_starts_writeback_but_never_waits_on_the_disk(
    receiver: tuple[int, list[bytes], AE], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool asks the kernel to start writing each object back as it arrives and when its last fragment is in;
    it never flushes. Durability is the blob store's single fsync of the object and of its directory, before the
    acknowledgement: a flush here as well cost the disk a cache flush of its own for every object."""
    port, received, _ = receiver
    flushes: list[str] = []
    writebacks: list[tuple[int, int]] = []
    for name in ("fsync", "fdatasync"):
        monkeypatch.setattr(netio.os, name, lambda fd, name=name: flushes.append(name))
    start = netio._start_writeback
    if start is not None:

        def counted(fd: int, offset: int, nbytes: int) -> None:
            writebacks.append((offset, nbytes))
            start(fd, offset, nbytes)

        monkeypatch.setattr(netio, "_start_writeback", counted)
    assert _send(port, [_ct(1, 600_000), _ct(2, 256)], max_pdu=65_536) == [0, 0]
    assert len(received) == 2
    assert flushes == []
    if start is not None:  # Linux: every byte of both objects was handed to writeback, each range once
        assert sum(n for _, n in writebacks) == sum(len(b) for b in received)


@pytest.mark.parametrize("ending", ["abort", "connection lost"])
def test_a_transfer_interrupted_mid_data_set_leaves_no_file_and_no_descriptor(
    receiver: tuple[int, list[bytes], AE], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """A modality that aborts, or whose network drops, in the middle of an object's data set: the object is not
    handed to the handler, its spool file is removed and its descriptor closed when the association ends (a server
    that runs for months would otherwise fill its spool folder and run out of descriptors), and the next
    association stores normally."""
    import tempfile
    import time

    from tests.scu import cut_off, descriptors_on, start_partial_store

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    port, received, _ = receiver
    ds = _ct(90, 300_000)
    encoded = DicomBytesIO()
    ds.save_as(encoded, enforce_file_format=False)
    data_set = encoded.getvalue()[encoded.getvalue().index(b"\x08\x00\x05\x00") :]

    assoc = start_partial_store(port, CT, ds.SOPInstanceUID, ExplicitVRLittleEndian, data_set)
    spooled: list[Path] = []
    deadline = time.monotonic() + 10
    while not spooled and time.monotonic() < deadline:
        spooled = list(tmp_path.glob("*.dcm"))
        time.sleep(0.02)
    assert spooled, "the server started spooling the object"
    assert descriptors_on(spooled[0]), "the spool holds the partial object open"
    cut_off(assoc, ending)
    deadline = time.monotonic() + 10
    while list(tmp_path.glob("*.dcm")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert list(tmp_path.glob("*.dcm")) == []
    assert not [name for name in netio._spool_digests if name.startswith(str(tmp_path))]
    assert descriptors_on(spooled[0]) == []
    assert received == []

    assert _send(port, [_ct(91, 300_000)], max_pdu=16_384) == [0]
    assert len(received) == 1
