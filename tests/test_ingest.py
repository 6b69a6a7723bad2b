"""The ingest path itself: concurrent stores share index commits and none is lost or doubled."""

from __future__ import annotations

import threading
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import delete, event, func, select

from storage.blobstore import FileBlobStore
from storage.db import make_engine, upgrade
from storage.ingest import Archive
from storage.models import Instance, Series, Study
from tests.data import write_ct
from tests.scu import pydicom_files


def test_concurrent_stores_share_commits_and_each_object_is_indexed_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'index.db'}"
    upgrade(url)
    engine = make_engine(url)
    archive = Archive(engine, FileBlobStore(tmp_path / "blobs"))
    commits: list[int] = []  # one index transaction per batch, whichever path commits it
    run_batch = archive._committer._run_batch
    archive._committer._run_batch = lambda jobs: (commits.append(len(jobs)), run_batch(jobs))[1]  # type: ignore[func-returns-value]
    files = [write_ct(tmp_path / "in", study="group", series=f"se{i % 3}", index=i) for i in range(1, 61)]
    outcomes: list[str] = []
    lock = threading.Lock()

    def store(paths: list[Path]) -> None:
        for path in paths:
            result = archive.ingest_file(path)
            with lock:
                outcomes.append(result.outcome)

    # Eight threads, each also re-sending a file another thread sends: duplicates inside one batch.
    groups = [files[i::8] + [files[(i * 7) % 60]] for i in range(8)]
    threads = [threading.Thread(target=store, args=(g,)) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)

    assert sorted(set(outcomes)) == ["duplicate", "stored"]
    assert outcomes.count("stored") == 60
    with engine.connect() as conn:
        assert conn.execute(select(func.count(Instance.pk))).scalar_one() == 60
        assert conn.execute(select(func.count(Series.pk))).scalar_one() == 3
        assert conn.execute(select(func.count(Study.pk))).scalar_one() == 1
    assert len(commits) < len(outcomes), "concurrent stores should have shared commits"


def test_new_objects_of_a_known_series_are_indexed_by_the_driver_and_everything_else_as_before(tmp_path: Path) -> None:
    """SQLite: a new object of a series whose rows are cached is indexed at the driver level (`_index_cached`); the
    first object of a series, an identical object sent again, a different object under the same SOP Instance UID
    and an object whose blob a deleter removed meanwhile go through `_index_many`, with their usual outcomes. Rows
    written either way read back the same, and the series counts stay right."""
    from sqlalchemy import insert

    from storage.blobstore import blob_key_for
    from storage.models import BlobDeletion, InstanceConflict, utcnow

    url = f"sqlite:///{tmp_path / 'index.db'}"
    upgrade(url)
    engine = make_engine(url)
    archive = Archive(engine, FileBlobStore(tmp_path / "blobs"))
    general: list[int] = []
    index_many = archive._index_many
    archive._index_many = lambda jobs: (general.append(len(jobs)), index_many(jobs))[1]  # type: ignore[method-assign,func-returns-value]

    first = write_ct(tmp_path / "a", series="known", index=1)
    second = write_ct(tmp_path / "a", series="known", index=2)
    assert archive.ingest_file(first).outcome == "stored"
    assert general == [1], "the first object of a series creates its rows"
    stored = archive.ingest_file(second)
    assert stored.outcome == "stored"
    assert general == [1], "a new object of a known series is indexed by the driver"

    assert archive.ingest_file(second).outcome == "duplicate"
    assert general == [1, 1]
    changed = write_ct(tmp_path / "b", series="known", index=2, InstitutionName="Bệnh viện khác")
    assert archive.ingest_file(changed).outcome == "conflict"
    assert general == [1, 1, 1]

    third = write_ct(tmp_path / "a", series="known", index=3)
    blob_key = blob_key_for(archive.ingest_file(third).sha256)
    fourth = write_ct(tmp_path / "c", series="known", index=3)  # the same bytes, sent again after a deletion
    with engine.begin() as conn:
        conn.execute(delete(Instance).where(Instance.blob_key == blob_key))
        conn.execute(insert(BlobDeletion).values(blob_key=blob_key, deleted_at=utcnow()))
    archive.blobs.delete(blob_key)
    assert archive.ingest_file(fourth).outcome == "stored"
    assert general == [1, 1, 1, 1], "a blob noted as deleted is written again by the general path"
    assert archive.blobs.exists(blob_key)

    with engine.connect() as conn:
        rows = {
            row.sop_instance_uid: row
            for row in conn.execute(select(Instance.sop_instance_uid, Instance.received_at, Instance.blob_key))
        }
        raw_times = [value for (value,) in conn.exec_driver_sql("SELECT received_at FROM instance ORDER BY pk")]
        count = conn.execute(select(Series.number_of_series_related_instances)).scalar_one()
        conflicts = conn.execute(select(func.count(InstanceConflict.pk))).scalar_one()
    assert len(rows) == 3 and count == 3 and conflicts == 1
    assert all(row.received_at is not None for row in rows.values())
    # The driver-level row (the second object) stores its time exactly as SQLAlchemy writes the others.
    assert len({len(value) for value in raw_times}) == 1 and all(value[4] == "-" for value in raw_times), raw_times
    assert rows[stored.sop_instance_uid].blob_key == blob_key_for(stored.sha256)


def test_index_text_read_from_raw_bytes_equals_pydicoms_conversion() -> None:
    """Ingest reads string and integer attributes straight from their bytes (a fraction of pydicom's per-element
    cost). For every top-level string, IS and US attribute of every file of pydicom's test data and of pydicom-data,
    charset files with ISO 2022 escapes, GB18030 and legacy single-byte sets included, the value equals the one
    pydicom's own conversion gives."""
    from pydicom import dcmread
    from pydicom.datadict import dictionary_VR, keyword_for_tag

    from storage.ingest import _int, _int_slow, _str, _str_slow

    vrs = {"AS", "CS", "DA", "DT", "TM", "UI", "SH", "LO", "UC", "ST", "LT", "UT"}
    checked, files = 0, 0
    for path in _corpus():
        try:
            fast = dcmread(path, stop_before_pixels=True, defer_size="1 MB")
            slow = dcmread(path, stop_before_pixels=True, defer_size="1 MB")
        except Exception:
            continue  # not readable at all: ingest refuses it before reading attributes
        files += 1
        for tag in list(fast.keys()):
            keyword = keyword_for_tag(tag)
            if not keyword or tag.is_private:
                continue
            if dictionary_VR(tag) in vrs:
                assert _str(fast, keyword, 1024) == _str_slow(slow, keyword, 1024), (path, keyword)
            elif dictionary_VR(tag) in ("IS", "US"):
                assert _int(fast, keyword) == _int_slow(slow, keyword), (path, keyword)
            else:
                continue
            checked += 1
    assert files > 100 and checked > 2000, (files, checked)

    # Padding inside multi-valued text, NULs, Vietnamese in UTF-8 and in a legacy set: none of the files has them.
    import io

    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    crafted = {
        "ISO_IR 192": b"\xc4\x90\xe1\xbb\x97 V\xc4\x83n \\Khoa C\xc4\x90HA ",
        "ISO_IR 100": b"Cardiologie \\Radiologie\x00",
    }
    for charset, institution in crafted.items():
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.file_meta.MediaStorageSOPInstanceUID = "1.2.840.99.1"
        ds.SpecificCharacterSet = charset
        ds.add_new(0x00080080, "LO", institution)  # InstitutionName, multi-valued here
        ds.add_new(0x00081030, "LO", institution.split(b"\\")[0])  # StudyDescription
        ds.add_new(0x00080008, "CS", b"ORIGINAL \\PRIMARY ")  # ImageType
        ds.add_new(0x00204000, "LT", institution + b" \x00")  # ImageComments
        ds.add_new(0x00080020, "DA", b"20261201-20261206")  # StudyDate, a range
        ds.add_new(0x0020000D, "UI", b"1.2.840.99\x00")  # StudyInstanceUID
        ds.add_new(0x00200013, "IS", b"+0042 \\7")  # InstanceNumber
        ds.add_new(0x00200011, "IS", b"3.0")  # SeriesNumber, not an integer string
        ds.add_new(0x00280010, "US", 512)  # Rows
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        for keyword in ("InstitutionName", "StudyDescription", "ImageType", "ImageComments", "StudyDate",
                        "StudyInstanceUID"):  # fmt: skip
            fast, slow = (dcmread(io.BytesIO(buffer.getvalue())) for _ in range(2))
            assert _str(fast, keyword, 1024) == _str_slow(slow, keyword, 1024), (charset, keyword)
        for keyword in ("InstanceNumber", "SeriesNumber", "Rows"):
            fast, slow = (dcmread(io.BytesIO(buffer.getvalue())) for _ in range(2))
            assert _int(fast, keyword) == _int_slow(slow, keyword), (charset, keyword)
        assert _int(dcmread(io.BytesIO(buffer.getvalue())), "InstanceNumber") == 42


def _corpus() -> list[Path]:
    """pydicom's test data, pydicom-data and pydicom's charset files (ISO 2022 escapes, GB18030, legacy sets)."""
    from pydicom.data import get_charset_files

    return sorted({*pydicom_files(), *(Path(p) for p in get_charset_files("*.dcm"))})


def test_header_parsed_from_bytes_equals_dcmread() -> None:
    """Ingest parses the File Meta Information itself and hands the data set to pydicom's `read_dataset`, skipping
    dcmread's conversion of every meta element. For every file of pydicom's test data, pydicom-data and the charset
    files, the result equals what dcmread(stop_before_pixels=True) reads: the same raw elements at the same offsets,
    the same File Meta values, encoding and character set, stopped at the same place; a file dcmread cannot read is
    not read either, and whatever the fast parse leaves (no preamble, deflated, an implicit VR meta group) goes to
    dcmread."""
    import io

    from pydicom import dcmread
    from pydicom.dataelem import RawDataElement

    from storage.ingest import HEAD_BYTES, _parse_head_fast

    fast_files = fallback_files = 0
    for path in _corpus():
        head = path.read_bytes()[:HEAD_BYTES]
        try:
            ref_mem = io.BytesIO(head)
            ref = dcmread(ref_mem, stop_before_pixels=True, defer_size="1 MB")
        except Exception:
            ref = None
        try:
            parsed = _parse_head_fast(head)
        except Exception:
            assert ref is None, path  # the fast parse fails only where dcmread fails too
            continue
        if parsed is None:
            fallback_files += 1
            continue
        assert ref is not None, path
        fast_files += 1
        ds, mem = parsed
        assert mem.tell() == ref_mem.tell(), path
        assert ds._dict.keys() == ref._dict.keys(), path
        for tag, element in ref._dict.items():
            if isinstance(element, RawDataElement):  # tag, VR, length, bytes and offset
                assert ds._dict[tag] == element, (path, tag)
            else:  # dcmread converts (0008,0005) to read the character set: the converted values equal
                assert ds[tag] == element, (path, tag)
        assert ds.original_encoding == ref.original_encoding, path
        assert ds.original_character_set == ref.original_character_set, path
        assert sorted(ds.file_meta.keys()) == sorted(ref.file_meta.keys()), path
        for element in ref.file_meta:
            assert ds.file_meta[element.tag].value == element.value, (path, element.tag)
            assert ds.file_meta[element.tag].VR == element.VR, (path, element.tag)
    assert fast_files > 120 and fallback_files > 5, (fast_files, fallback_files)


def test_header_from_received_bytes_equals_header_from_file(tmp_path: Path) -> None:
    """The DIMSE receiver keeps each object's first bytes and its digest; ingest then checks the header without
    opening the file. For every corpus file, and for truncated copies of an image and of a small object, the
    result is the file path's: the same elements, transfer syntax, digest and size, or the same refusal."""
    import hashlib

    from storage.ingest import HEAD_BYTES, IngestError, read_header

    big = write_ct(tmp_path, index=1, size=256)  # 128 KB of pixel data: its header ends within HEAD_BYTES
    data = big.read_bytes()
    cases = [*_corpus(), big]
    for cut, name in ((len(data) - 1000, "cut-pixels.dcm"), (HEAD_BYTES - 10, "cut-head.dcm"), (700, "cut-tiny.dcm")):
        (tmp_path / name).write_bytes(data[:cut])
        cases.append(tmp_path / name)
    from_head = 0
    for path in cases:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest(), len(data)
        try:
            expected = read_header(path, digest)
        except IngestError as exc:
            expected_error: str | None = exc.message
        else:
            expected_error = None
        missing = tmp_path / "not-there.dcm"  # the head path must not need the file
        try:
            got = read_header(missing, digest, data[:HEAD_BYTES])
        except IngestError as exc:
            if "cannot read object" not in exc.message:
                assert exc.message == expected_error, path
                from_head += 1
            continue  # needed the file: encapsulated pixels or a header beyond the head
        assert expected_error is None, path
        from_head += 1
        assert got.ds._dict.keys() == expected.ds._dict.keys(), path
        assert (got.transfer_syntax_uid, got.sha256, got.size) == (
            expected.transfer_syntax_uid,
            expected.sha256,
            expected.size,
        ), path
    assert from_head > 100, from_head
    with_pixels_cut = tmp_path / "cut-pixels.dcm"
    data = with_pixels_cut.read_bytes()
    try:
        read_header(tmp_path / "not-there.dcm", (hashlib.sha256(data).hexdigest(), len(data)), data[:HEAD_BYTES])
    except IngestError as exc:
        assert "truncated Pixel Data" in exc.message
    else:
        raise AssertionError("a truncated image was accepted")


def test_encapsulated_pixel_data_cut_short_is_refused_from_head_and_file(tmp_path: Path) -> None:
    """Compressed pixel data is walked fragment by fragment (never read): an object cut inside a fragment, or one
    whose fragments lack the sequence delimiter, is refused, whether ingest starts from the received bytes or the
    file; the whole object passes."""
    import hashlib

    from pydicom.data import get_testdata_file

    from storage.ingest import HEAD_BYTES, IngestError, read_header

    source = Path(str(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")))
    whole = source.read_bytes()
    delimiter = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    assert whole.endswith(delimiter)
    cases = {
        "whole": (whole, None),
        "cut-in-fragment": (whole[: len(whole) - 600], "truncated encapsulated Pixel Data fragment"),
        "no-delimiter": (whole[: -len(delimiter)], "truncated encapsulated Pixel Data (no sequence delimiter)"),
    }
    for name, (data, expected) in cases.items():
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(data)
        digest = hashlib.sha256(data).hexdigest(), len(data)
        for known_head in (None, data[:HEAD_BYTES]):
            try:
                header = read_header(path, digest, known_head)
            except IngestError as exc:
                assert exc.message == expected, (name, exc.message)
            else:
                assert expected is None, f"{name} was accepted"
                assert (header.transfer_syntax_uid, header.size) == ("1.2.840.10008.1.2.4.50", len(whole))


def test_two_nodes_filling_two_series_in_opposite_orders_never_deadlock(tmp_path: Path) -> None:
    """PostgreSQL: each instance row bumps its series row's count (a trigger), so a batch holds the lock of every
    series it has written to until it commits. Two nodes committing batches that fill the same two series in
    opposite orders would each hold one series and wait for the other's. Rows are written in one order by every
    writer, so the second node waits for the first instead: forced here by pausing each node after its first row
    until the other has written one too (which, with a single order, it cannot)."""
    import hashlib

    from storage.blobstore import blob_key_for
    from storage.ingest import _IndexJob, read_header
    from tests.services import index_database

    with index_database("pg", tmp_path) as url:
        upgrade(url)
        blobs = FileBlobStore(tmp_path / "blobs")
        nodes = [Archive(make_engine(url), blobs) for _ in range(2)]
        for series in ("A", "B"):  # both series exist before the race
            nodes[0].ingest_file(write_ct(tmp_path / "in", study="race", series=series, index=0))
        batches: list[list[_IndexJob]] = []
        for n, order in enumerate((("A", "B"), ("B", "A"))):
            jobs = []
            for series in order:
                path = write_ct(tmp_path / "in", study="race", series=series, index=10 * (n + 1) + ord(series))
                header = read_header(path)
                key = blob_key_for(hashlib.sha256(path.read_bytes()).hexdigest())
                blobs.put_file(key, path, header.size)
                ds = header.ds
                row = nodes[n]._instance_row(ds, header, key, "SCU", "test", ds.SOPClassUID, ds.SOPInstanceUID)
                jobs.append(_IndexJob(ds, row, ds.StudyInstanceUID, ds.SeriesInstanceUID, path))
            batches.append(jobs)

        both_wrote_one = threading.Barrier(2)
        first_row = threading.local()
        deadlocks: list[str] = []

        def pause_after_first_row(conn: object, cursor: object, statement: str, *args: object) -> None:
            if statement.startswith("INSERT INTO instance") and getattr(first_row, "pending", False):
                first_row.pending = False
                try:
                    both_wrote_one.wait(timeout=3)  # times out when the other node is (rightly) waiting for us
                except threading.BrokenBarrierError:
                    pass

        def note_deadlock(context: object) -> None:
            orig = getattr(context, "original_exception", None)
            if getattr(orig, "sqlstate", None) == "40P01":
                deadlocks.append(str(orig))

        for archive in nodes:
            event.listen(archive.engine, "after_cursor_execute", pause_after_first_row)
            event.listen(archive.engine, "handle_error", note_deadlock)

        def commit(archive: Archive, jobs: list[_IndexJob]) -> None:
            first_row.pending = True
            archive._index_batch(jobs)

        threads = [threading.Thread(target=commit, args=(nodes[n], batches[n])) for n in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not deadlocks, deadlocks
        assert [[job.outcome for job in jobs] for jobs in batches] == [["stored", "stored"], ["stored", "stored"]]
        with nodes[0].engine.connect() as conn:
            query = select(Series.series_instance_uid, Series.number_of_series_related_instances)
            counts = {uid: number for uid, number in conn.execute(query)}
        assert sorted(counts.values()) == [3, 3], counts
        for archive in nodes:
            archive.engine.dispose()
