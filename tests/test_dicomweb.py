"""QIDO-RS and WADO-RS against the running server, data loaded over DIMSE (one archive, one query engine)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from tests.data import patient, write_ct
from tests.scu import dataset_bytes, multipart_parts, storage_corpus, store_files
from tests.services import VnpacsService

PN, PATIENT_ID, STUDY_UID, STUDY_DESC = "00100010", "00100020", "0020000D", "00081030"


@pytest.fixture(scope="module")
def loaded(embedded: VnpacsService, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("web")
    an = patient("Nguyễn^Văn An", "WEB-1")
    files = {
        "ct1": write_ct(d, who=an, study="web-1", series="a", index=1, StudyDate="20240105", AccessionNumber="W1"),
        "ct2": write_ct(d, who=an, study="web-1", series="a", index=2, StudyDate="20240105", AccessionNumber="W1"),
        "mr": write_ct(d, who=an, study="web-1", series="b", index=1, StudyDate="20240105", AccessionNumber="W1",
                       Modality="MR"),
        "other": write_ct(d, who=patient("Trần^Thị Bình", "WEB-2"), study="web-2", StudyDate="20240210",
                          AccessionNumber="W2"),
    }  # fmt: skip
    jpeg = next(c.path for c in storage_corpus() if c.path.name == "JPEG2000.dcm")
    files["jpeg"] = jpeg
    assert all(s.Status == 0 for s in store_files(embedded.dicom_port, files.values()).values())
    return files


def qido(server: VnpacsService, path: str, **params: object) -> httpx.Response:
    return httpx.get(f"{server.base_url}/dicom-web{path}", params=params, timeout=30)  # type: ignore[arg-type]


def value(item: dict, tag: str) -> object:  # type: ignore[type-arg]
    return item.get(tag, {}).get("Value", [None])[0]


def test_qido_finds_a_vietnamese_name_without_diacritics(embedded: VnpacsService, loaded: dict[str, Path]) -> None:
    response = qido(embedded, "/studies", PatientName="nguyen*")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/dicom+json")
    [study] = response.json()
    assert value(study, PN) == {"Alphabetic": "Nguyễn^Văn An"}
    assert study[PN]["vr"] == "PN"
    assert value(study, "00080005") == "ISO_IR 192"
    assert study["00080061"]["Value"] == ["CT", "MR"]  # ModalitiesInStudy
    assert value(study, "00201206") == 2 and value(study, "00201208") == 3  # series and instance counts
    uid = str(dcmread(loaded["ct1"]).StudyInstanceUID)
    assert value(study, STUDY_UID) == uid
    assert value(study, "00081190") == f"{embedded.base_url}/dicom-web/studies/{uid}"


def test_qido_takes_tags_includefield_and_fuzzy_matching(embedded: VnpacsService, loaded: dict[str, Path]) -> None:
    [study] = qido(embedded, "/studies", **{PATIENT_ID: "WEB-2", "includefield": STUDY_DESC}).json()
    assert value(study, STUDY_DESC)
    fuzzy = qido(embedded, "/studies", PatientName="thi binh", fuzzymatching="true").json()
    assert [value(s, PATIENT_ID) for s in fuzzy] == ["WEB-2"]
    by_date = qido(embedded, "/studies", StudyDate="20240101-20240131", PatientID="WEB-*").json()
    assert [value(s, PATIENT_ID) for s in by_date] == ["WEB-1"]


def test_qido_limit_offset_and_warning(embedded: VnpacsService, loaded: dict[str, Path]) -> None:
    first = qido(embedded, "/studies", PatientID="WEB-*", limit=1)
    assert len(first.json()) == 1
    assert "additional results" in first.headers["warning"]
    second = qido(embedded, "/studies", PatientID="WEB-*", limit=1, offset=1)
    assert len(second.json()) == 1 and "warning" not in second.headers
    assert value(first.json()[0], STUDY_UID) != value(second.json()[0], STUDY_UID)


def test_qido_series_and_instances(embedded: VnpacsService, loaded: dict[str, Path]) -> None:
    uid = str(dcmread(loaded["ct1"]).StudyInstanceUID)
    series = qido(embedded, f"/studies/{uid}/series").json()
    assert sorted((value(s, "00080060"), value(s, "00201209")) for s in series) == [("CT", 2), ("MR", 1)]
    ct = next(s for s in series if value(s, "00080060") == "CT")
    instances = qido(embedded, f"/studies/{uid}/series/{value(ct, '0020000E')}/instances").json()
    assert len(instances) == 2 and all(value(i, "00280010") == 64 for i in instances)  # Rows as a number
    assert len(qido(embedded, f"/studies/{uid}/instances").json()) == 3


def test_qido_bad_input_is_a_400_with_a_reason(embedded: VnpacsService) -> None:
    bad_date = qido(embedded, "/studies", StudyDate="2024-01")
    assert bad_date.status_code == 400 and "date" in bad_date.json()["detail"]
    assert qido(embedded, "/studies", limit="many").status_code == 400
    assert qido(embedded, "/studies", **{"99999999": "x"}).status_code == 400


def test_wado_rs_returns_stored_instances_byte_exact(embedded: VnpacsService, loaded: dict[str, Path]) -> None:
    ds = dcmread(loaded["ct1"])
    url = f"{embedded.base_url}/dicom-web/studies/{ds.StudyInstanceUID}"
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    response = httpx.get(url, headers={"Accept": accept}, timeout=30)
    assert response.status_code == 200
    parts = multipart_parts(response)
    assert len(parts) == 3
    sent = {dataset_bytes(loaded[k]) for k in ("ct1", "ct2", "mr")}
    received = set()
    for i, body in enumerate(parts):
        path = Path(f"/tmp/vnpacs-wado-{i}.dcm")
        path.write_bytes(body)
        received.add(dataset_bytes(path))
        path.unlink()
    assert received == sent


def test_wado_rs_refuses_what_it_cannot_give(embedded: VnpacsService, loaded: dict[str, Path]) -> None:
    jpeg = dcmread(loaded["jpeg"], stop_before_pixels=True)
    url = (f"{embedded.base_url}/dicom-web/studies/{jpeg.StudyInstanceUID}/series/{jpeg.SeriesInstanceUID}"
           f"/instances/{jpeg.SOPInstanceUID}")  # fmt: skip
    baseline = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    unsatisfiable = httpx.get(url, headers={"Accept": baseline}, timeout=30)  # no encoder into JPEG here
    assert unsatisfiable.status_code == 406 and "transfer-syntax=*" in unsatisfiable.json()["detail"]
    as_stored = httpx.get(url, headers={"Accept": "multipart/related; type=application/dicom; transfer-syntax=*"})
    assert as_stored.status_code == 200 and len(multipart_parts(as_stored)) == 1
    assert httpx.get(url, headers={"Accept": "image/png"}).status_code == 406
    missing = httpx.get(f"{embedded.base_url}/dicom-web/studies/1.2.3.4.5", headers={"Accept": "*/*"})
    assert missing.status_code == 404


def test_retrieve_urls_follow_the_reverse_proxy(embedded: VnpacsService, loaded: dict[str, Path]) -> None:
    response = httpx.get(
        f"{embedded.base_url}/dicom-web/studies",
        params={"PatientID": "WEB-2"},
        headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "pacs.benhvien.vn", "X-Forwarded-Prefix": "/pacs"},
    )
    [study] = response.json()
    assert str(value(study, "00081190")).startswith("https://pacs.benhvien.vn/pacs/dicom-web/studies/")


# ---- STOW-RS ---------------------------------------------------------------------------------------------------------


def multipart(parts: list[tuple[str, bytes]], boundary: str = "vnpacs-test-boundary") -> tuple[bytes, str]:
    body = b"".join(f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n" for ctype, data in parts)
    return body + f"--{boundary}--\r\n".encode(), f'multipart/related; type="application/dicom"; boundary={boundary}'


def stow(server: VnpacsService, body: bytes, content_type: str, path: str = "/studies") -> httpx.Response:
    return httpx.post(f"{server.base_url}/dicom-web{path}", content=body, headers={"Content-Type": content_type},
                      timeout=120)  # fmt: skip


def test_stow_stores_through_the_same_ingest_path_and_qido_and_wado_see_it(
    embedded: VnpacsService, tmp_path: Path
) -> None:
    files = [write_ct(tmp_path, who=patient("Võ^Thị Yến", "STOW-1"), study="stow", index=i) for i in (1, 2)]
    body, ctype = multipart([("application/dicom", f.read_bytes()) for f in files])
    response = stow(embedded, body, ctype)
    assert response.status_code == 200, response.text
    refs = response.json()["00081199"]["Value"]
    assert {r["00081155"]["Value"][0] for r in refs} == {str(dcmread(f).SOPInstanceUID) for f in files}
    [study] = qido(embedded, "/studies", PatientName="vo^thi yen").json()
    assert value(study, "00201208") == 2
    ds = dcmread(files[0])
    url = (f"{embedded.base_url}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
           f"/instances/{ds.SOPInstanceUID}")  # fmt: skip
    got = httpx.get(url, headers={"Accept": "multipart/related; type=application/dicom; transfer-syntax=*"})
    assert multipart_parts(got)[0] == files[0].read_bytes()  # STOW keeps the uploaded Part 10 file byte for byte


def test_stow_partial_failure_is_202_with_reasons(embedded: VnpacsService, tmp_path: Path) -> None:
    good = write_ct(tmp_path, study="stow-partial", index=1)
    truncated = good.read_bytes()[:-3000]
    body, ctype = multipart([("application/dicom", good.read_bytes()), ("application/dicom", truncated),
                             ("text/plain", b"ghi chu")])  # fmt: skip
    response = stow(embedded, body, ctype)
    assert response.status_code == 202
    reasons = [f["00081197"]["Value"][0] for f in response.json()["00081198"]["Value"]]
    assert reasons == [0xC000, 0xC000]
    assert "truncated" in response.headers["warning"]
    assert len(response.json()["00081199"]["Value"]) == 1


def test_stow_all_failed_is_409_and_bad_requests_are_4xx(embedded: VnpacsService, tmp_path: Path) -> None:
    other_study = write_ct(tmp_path, study="stow-elsewhere", index=1)
    body, ctype = multipart([("application/dicom", other_study.read_bytes())])
    wrong_study = stow(embedded, body, ctype, "/studies/1.2.3.999")
    assert wrong_study.status_code == 409
    assert wrong_study.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]

    assert stow(embedded, b"not json", "application/json").status_code == 415
    unclosed, ctype = multipart([("application/dicom", other_study.read_bytes())])
    truncated_body = stow(embedded, unclosed[:-30], ctype)
    assert truncated_body.status_code == 400 and "closing boundary" in truncated_body.json()["detail"]
    uid = str(dcmread(other_study).SOPInstanceUID)
    assert qido(embedded, "/instances", SOPInstanceUID=uid).json() == []  # nothing half-stored
    assert stow(embedded, b"", 'multipart/related; type="application/dicom"').status_code == 400  # no boundary
    assert httpx.get(f"{embedded.base_url}/health").status_code == 200


def test_stow_streams_a_large_upload_without_holding_it_in_memory(start_server: object, tmp_path: Path) -> None:
    from pacs.synthetic import make_multiframe
    from tests.services import vm_hwm_bytes

    server = start_server("fs-sqlite")  # type: ignore[operator]
    big = make_multiframe(tmp_path / "big.dcm", target_bytes=300 * 1024 * 1024, rows=256, cols=256)
    boundary = "big-boundary"

    def body():  # type: ignore[no-untyped-def]
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        with open(big, "rb") as fp:
            while chunk := fp.read(1024 * 1024):
                yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    response = httpx.post(f"{server.base_url}/dicom-web/studies", content=body(), timeout=300,
                          headers={"Content-Type": content_type})  # fmt: skip
    assert response.status_code == 200, response.text
    assert vm_hwm_bytes(server.pid) < 300 * 1024 * 1024

    # And back, as stored: streamed in buffers of a few MB, the object byte for byte, memory still bounded.
    study = dcmread(big, stop_before_pixels=True).StudyInstanceUID
    received = tmp_path / "retrieved.multipart"
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    with httpx.stream("GET", f"{server.base_url}/dicom-web/studies/{study}", headers={"Accept": accept},
                      timeout=300) as streamed, open(received, "wb") as out:  # fmt: skip
        assert streamed.status_code == 200
        assert int(streamed.headers["content-length"]) > big.stat().st_size
        for chunk in streamed.iter_bytes(1024 * 1024):
            out.write(chunk)
    assert received.stat().st_size == int(streamed.headers["content-length"])
    with open(received, "rb") as got, open(big, "rb") as sent:
        head = got.read(4096)
        start = head.index(b"\r\n\r\n") + 4
        assert b"Content-Length: %d" % big.stat().st_size in head[:start]
        got.seek(start)
        while chunk := sent.read(8 * 1024 * 1024):
            assert got.read(len(chunk)) == chunk
        assert got.read() == b"\r\n--" + streamed.headers["content-type"].split("boundary=")[1].encode() + b"--\r\n"
    assert vm_hwm_bytes(server.pid) < 300 * 1024 * 1024
    big.unlink()


# ---- metadata, frames, bulk data ------------------------------------------------------------------------------------


def test_series_metadata_equals_the_stored_headers_and_its_bulk_data_uris_resolve(
    embedded: VnpacsService, loaded: dict[str, Path]
) -> None:
    ds = dcmread(loaded["ct1"])
    url = f"{embedded.base_url}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/metadata"
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/dicom+json")
    items = {value(i, "00080018"): i for i in response.json()}
    assert set(items) == {str(dcmread(loaded[k]).SOPInstanceUID) for k in ("ct1", "ct2")}
    item = items[str(ds.SOPInstanceUID)]
    assert value(item, PN) == {"Alphabetic": "Nguyễn^Văn An"}
    assert value(item, "00280010") == ds.Rows and value(item, "00200013") == ds.InstanceNumber
    assert item["00280030"]["Value"] == [float(v) for v in ds.PixelSpacing]
    pixel_uri = item["7FE00010"]["BulkDataURI"]
    assert pixel_uri.startswith(embedded.base_url)
    pixel = httpx.get(pixel_uri, headers={"Accept": "multipart/related; type=application/octet-stream"})
    assert pixel.status_code == 200 and multipart_parts(pixel) == [ds.PixelData]

    etag = response.headers["etag"]
    again = httpx.get(url, headers={"If-None-Match": etag})
    assert again.status_code == 304


def test_frames_are_the_stored_pixel_data(embedded: VnpacsService, loaded: dict[str, Path], tmp_path: Path) -> None:
    from pacs.synthetic import make_multiframe

    multi = make_multiframe(tmp_path / "multi.dcm", target_bytes=6 * 128 * 128 * 2, rows=128, cols=128)
    assert store_files(embedded.dicom_port, [multi])[multi].Status == 0
    ds = dcmread(multi)
    base = (f"{embedded.base_url}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")  # fmt: skip
    frame_size = ds.Rows * ds.Columns * ds.BitsAllocated // 8
    octet = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    got = httpx.get(f"{base}/frames/2,4", headers={"Accept": octet})
    assert got.status_code == 200
    assert multipart_parts(got) == [
        ds.PixelData[frame_size : 2 * frame_size],
        ds.PixelData[3 * frame_size : 4 * frame_size],
    ]
    assert httpx.get(f"{base}/frames/99", headers={"Accept": octet}).status_code == 404

    jpeg = dcmread(loaded["jpeg"])
    jbase = (f"{embedded.base_url}/dicom-web/studies/{jpeg.StudyInstanceUID}/series/{jpeg.SeriesInstanceUID}"
             f"/instances/{jpeg.SOPInstanceUID}")  # fmt: skip
    compressed = httpx.get(f"{jbase}/frames/1", headers={"Accept": octet})
    assert compressed.status_code == 200
    from pydicom.encaps import generate_frames

    assert multipart_parts(compressed)[0] == next(generate_frames(jpeg.PixelData, number_of_frames=1))
    assert f"transfer-syntax={jpeg.file_meta.TransferSyntaxUID}" in compressed.text[:400]  # says what it is
    wants_jpeg = 'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.4.50'
    assert httpx.get(f"{jbase}/frames/1", headers={"Accept": wants_jpeg}).status_code == 406


# ---- rendered, thumbnails, transcoding -------------------------------------------------------------------------------


def _instance_url(server: VnpacsService, path: Path) -> str:
    ds = dcmread(path, stop_before_pixels=True)
    return (f"{server.base_url}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")  # fmt: skip


def test_rendered_png_applies_rescale_and_the_requested_window(
    embedded: VnpacsService, loaded: dict[str, Path]
) -> None:
    import io

    import numpy as np
    from PIL import Image

    ds = dcmread(loaded["ct1"])
    response = httpx.get(_instance_url(embedded, loaded["ct1"]) + "/rendered",
                         params={"window": "40,400", "accept": "image/png"})  # fmt: skip
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    got = np.asarray(Image.open(io.BytesIO(response.content)), dtype=np.float64)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.clip((hu - (40 - 200)) / 400, 0, 1) * 255
    assert got.shape == expected.shape
    assert np.abs(got - expected).mean() < 1.0
    assert got.std() > 5  # an image, not a blank


def test_thumbnails_and_jpeg(embedded: VnpacsService, loaded: dict[str, Path]) -> None:
    import io

    import numpy as np
    from PIL import Image

    ds = dcmread(loaded["jpeg"], stop_before_pixels=True)
    for url in (
        _instance_url(embedded, loaded["jpeg"]) + "/thumbnail",
        f"{embedded.base_url}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/thumbnail",
        f"{embedded.base_url}/dicom-web/studies/{ds.StudyInstanceUID}/thumbnail",
    ):
        response = httpx.get(url, headers={"Accept": "image/jpeg"})
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg", url
        image = Image.open(io.BytesIO(response.content))
        assert max(image.size) <= 128 and np.asarray(image).std() > 5
    assert (
        httpx.get(_instance_url(embedded, loaded["ct1"]) + "/rendered", params={"window": "40,-1"}).status_code == 400
    )
    assert (
        httpx.get(_instance_url(embedded, loaded["ct1"]) + "/rendered", headers={"Accept": "image/gif"}).status_code
        == 406
    )


def test_rendered_series_is_one_image_per_instance_in_instance_number_order(
    embedded: VnpacsService, tmp_path: Path
) -> None:
    import io
    import random

    import numpy as np
    from PIL import Image

    numbers = [3, 1, 4, 2, 5]
    random.Random(3).shuffle(numbers)  # stored in another order than their instance numbers
    files = {n: write_ct(tmp_path, who=patient("Lý^Thị Hoa", "REND-S"), study="rendered-series", index=n)
             for n in numbers}  # fmt: skip
    assert all(s.Status == 0 for s in store_files(embedded.dicom_port, files.values()).values())
    ds = dcmread(files[1], stop_before_pixels=True)
    url = f"{embedded.base_url}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/rendered"

    def windowed(n: int) -> np.ndarray:
        source = dcmread(files[n])
        hu = source.pixel_array * float(source.RescaleSlope) + float(source.RescaleIntercept)
        return np.clip((hu - (40 - 200)) / 400, 0, 1) * 255

    png = httpx.get(url, params={"window": "40,400"}, headers={"Accept": 'multipart/related; type="image/png"'})
    assert png.status_code == 200, png.text
    assert png.headers["content-type"].startswith('multipart/related; type="image/png"')
    parts = [np.asarray(Image.open(io.BytesIO(body)), dtype=np.float64) for body in multipart_parts(png)]
    assert len(parts) == 5
    for n, got in zip(sorted(numbers), parts, strict=True):
        assert got.shape == (64, 64)
        distance = {m: float(np.abs(got - np.floor(windowed(m))).mean()) for m in numbers}
        assert distance[n] < 0.05 and min(distance, key=distance.__getitem__) == n, (n, distance)  # it, no other
    locations = [line.split(b": ", 1)[1].strip().decode() for line in png.content.splitlines()
                 if line.startswith(b"Content-Location")]  # fmt: skip
    assert [loc.split("/instances/")[1] for loc in locations] == [
        f"{dcmread(files[n], stop_before_pixels=True).SOPInstanceUID}/rendered" for n in sorted(numbers)
    ]

    jpeg = httpx.get(url, params={"viewport": "32,32"})  # JPEG unless asked otherwise; parameters apply to every part
    assert jpeg.status_code == 200 and 'type="image/jpeg"' in jpeg.headers["content-type"]
    images = [Image.open(io.BytesIO(body)) for body in multipart_parts(jpeg)]
    assert [image.format for image in images] == ["JPEG"] * 5 and all(image.size == (32, 32) for image in images)
    means = [float(np.asarray(image, dtype=np.float64).mean()) for image in images]
    for n, mean in zip(sorted(numbers), means, strict=True):  # the file's own window, as an instance render uses
        single = httpx.get(_instance_url(embedded, files[n]) + "/rendered", params={"viewport": "32,32"})
        assert abs(mean - np.asarray(Image.open(io.BytesIO(single.content)), dtype=np.float64).mean()) < 1.0
    assert httpx.get(url, headers={"Accept": 'multipart/related; type="image/gif"'}).status_code == 406
    missing = f"{embedded.base_url}/dicom-web/studies/{ds.StudyInstanceUID}/series/1.2.3.4/rendered"
    assert httpx.get(missing).status_code == 404


def test_compressed_objects_are_transcoded_when_the_client_cannot_decode(
    embedded: VnpacsService, loaded: dict[str, Path], tmp_path: Path
) -> None:
    import numpy as np

    original = dcmread(loaded["jpeg"])
    url = _instance_url(embedded, loaded["jpeg"])
    response = httpx.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'}, timeout=60)
    assert response.status_code == 200
    out = tmp_path / "explicit.dcm"
    out.write_bytes(multipart_parts(response)[0])
    transcoded = dcmread(out)
    assert transcoded.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert transcoded.SOPInstanceUID == original.SOPInstanceUID  # a lossless conversion keeps the instance's identity
    assert np.array_equal(transcoded.pixel_array, original.pixel_array)

    frame = httpx.get(url + "/frames/1", headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    assert frame.status_code == 200
    assert (
        multipart_parts(frame)[0] == original.pixel_array.astype(original.pixel_array.dtype.newbyteorder("<")).tobytes()
    )


# ---- transcoding to other transfer syntaxes -------------------------------------------------------------------------

LOSSLESS_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000, reversible
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
]


@pytest.fixture(scope="module")
def sources(embedded: VnpacsService, loaded: dict[str, Path]) -> dict[str, Path]:
    """Stored objects of every kind a transcoder meets: native signed CT, big endian, JPEG 2000, colour JPEG
    baseline (YBR), multi-frame RLE."""
    corpus = {}
    for c in storage_corpus():
        corpus.setdefault(c.path.name, c.path)
    picked = {"ct": loaded["ct1"], "j2k": loaded["jpeg"], "big-endian": corpus["MR_small_bigendian.dcm"],
              "ybr-jpeg": corpus["SC_rgb_jpeg_dcmtk.dcm"], "multiframe-rle": corpus["emri_small_RLE.dcm"]}  # fmt: skip
    assert all(s.Status == 0 for s in store_files(embedded.dicom_port, picked.values()).values())
    return picked


def _dicom_accept(syntax: str) -> dict[str, str]:
    return {"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={syntax}'}


@pytest.mark.parametrize("syntax", LOSSLESS_SYNTAXES)
def test_retrieve_transcodes_to_each_lossless_syntax_and_the_pixels_survive(
    embedded: VnpacsService, sources: dict[str, Path], syntax: str, tmp_path: Path
) -> None:
    import subprocess

    import numpy as np
    from pydicom.uid import UID

    for name, path in sources.items():
        original = dcmread(path)
        response = httpx.get(_instance_url(embedded, path), headers=_dicom_accept(syntax), timeout=60)
        assert response.status_code == 200, (name, response.text)
        assert f"application/dicom; transfer-syntax={syntax}".encode() in response.content[:200], name
        out = tmp_path / f"{name}.dcm"
        out.write_bytes(multipart_parts(response)[0])
        got = dcmread(out)
        assert got.file_meta.TransferSyntaxUID == syntax, name
        assert got.SOPInstanceUID == original.SOPInstanceUID and got.PatientName == original.PatientName, name
        assert np.array_equal(got.pixel_array, original.pixel_array), name  # decodes back to the same pixels
        if UID(syntax).is_compressed:
            assert got["PixelData"].is_undefined_length, name  # really encapsulated, not relabelled
        # DCMTK, an independent parser, reads the whole file (deflated ones included)...
        dump = subprocess.run(["dcmdump", "-q", "+E", str(out)], capture_output=True, text=True, timeout=60)
        assert dump.returncode == 0 and "E:" not in dump.stderr, (name, dump.stderr)
        decoder = {"1.2.840.10008.1.2.5": "dcmdrle", "1.2.840.10008.1.2.4.80": "dcmdjpls"}.get(syntax)
        if decoder:  # ...and decodes RLE and JPEG-LS with its own codecs to the same pixels
            native = tmp_path / f"{name}-{decoder}.dcm"
            subprocess.run([decoder, str(out), str(native)], check=True, capture_output=True, timeout=60)
            assert np.array_equal(dcmread(native).pixel_array, original.pixel_array), name


def test_whole_study_in_rle_with_dicomweb_client(embedded: VnpacsService, loaded: dict[str, Path]) -> None:
    import numpy as np
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(f"{embedded.base_url}/dicom-web")
    study = str(dcmread(loaded["ct1"]).StudyInstanceUID)
    got = client.retrieve_study(study, media_types=(("application/dicom", "1.2.840.10008.1.2.5"),))
    originals = {str(ds.SOPInstanceUID): ds for ds in (dcmread(loaded[k]) for k in ("ct1", "ct2", "mr"))}
    assert sorted(str(ds.SOPInstanceUID) for ds in got) == sorted(originals)
    for ds in got:
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"
        assert np.array_equal(ds.pixel_array, originals[str(ds.SOPInstanceUID)].pixel_array)


def test_transfer_syntaxes_without_an_encoder_are_a_406_with_the_reason(
    embedded: VnpacsService, sources: dict[str, Path]
) -> None:
    url = _instance_url(embedded, sources["ct"])
    lossy = httpx.get(url, headers=_dicom_accept("1.2.840.10008.1.2.4.50"))
    assert lossy.status_code == 406
    assert "no encoder into JPEG Baseline" in lossy.json()["detail"] and "1.2.840.10008.1.2.5" in lossy.json()["detail"]
    unknown = httpx.get(url, headers=_dicom_accept("1.2.3.4"))
    assert unknown.status_code == 406 and "not a transfer syntax" in unknown.json()["detail"]
    near_lossless = httpx.get(url, headers=_dicom_accept("1.2.840.10008.1.2.4.81"))
    assert near_lossless.status_code == 406 and "1.2.840.10008.1.2.4.80" in near_lossless.json()["detail"]


def _decoded(header_of: Path, frames: list[bytes], syntax: str) -> list[object]:
    """Compressed frames decoded by pydicom, under the stored object's own image attributes."""
    from pydicom.encaps import encapsulate

    ds = dcmread(header_of, stop_before_pixels=True)
    ds.NumberOfFrames = len(frames)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    array = ds.pixel_array
    return list(array) if len(frames) > 1 else [array]


def test_frames_are_re_encoded_in_a_requested_compressed_syntax(
    embedded: VnpacsService, sources: dict[str, Path]
) -> None:
    import numpy as np
    from pydicom.encaps import generate_frames

    multi = dcmread(sources["multiframe-rle"])
    url = _instance_url(embedded, sources["multiframe-rle"])
    jp2 = httpx.get(f"{url}/frames/2,5", headers={"Accept": 'multipart/related; type="image/jp2"'})
    assert jp2.status_code == 200, jp2.text
    assert jp2.headers["content-type"].startswith('multipart/related; type="image/jp2"')
    assert b"Content-Type: image/jp2; transfer-syntax=1.2.840.10008.1.2.4.90" in jp2.content[:200]
    parts = multipart_parts(jp2)
    assert all(p[:4] == b"\xff\x4f\xff\x51" for p in parts)  # JPEG 2000 codestreams
    decoded = _decoded(sources["multiframe-rle"], parts, "1.2.840.10008.1.2.4.90")
    assert all(np.array_equal(d, multi.pixel_array[i]) for d, i in zip(decoded, (1, 4), strict=True))

    # Asking for the stored syntax sends the stored frames, not a re-encoding.
    rle = httpx.get(f"{url}/frames/3", headers={"Accept": 'multipart/related; type="image/dicom-rle"'})
    assert rle.status_code == 200 and b"Content-Type: image/dicom-rle" in rle.content[:200]
    stored = list(generate_frames(multi.PixelData, number_of_frames=int(multi.NumberOfFrames)))
    assert multipart_parts(rle) == [stored[2]]

    ct = dcmread(sources["ct"])
    ct_url = _instance_url(embedded, sources["ct"])
    octet_rle = 'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.5'
    as_rle = httpx.get(f"{ct_url}/frames/1", headers={"Accept": octet_rle})
    assert as_rle.status_code == 200
    assert b"application/octet-stream; transfer-syntax=1.2.840.10008.1.2.5" in as_rle.content[:200]
    [frame] = multipart_parts(as_rle)
    assert frame != ct.PixelData
    assert np.array_equal(_decoded(sources["ct"], [frame], "1.2.840.10008.1.2.5")[0], ct.pixel_array)

    jp2_as_rle = 'multipart/related; type="image/jp2"; transfer-syntax=1.2.840.10008.1.2.5'
    mismatch = httpx.get(f"{ct_url}/frames/1", headers={"Accept": jp2_as_rle})
    assert mismatch.status_code == 406
    ybr = httpx.get(f"{_instance_url(embedded, sources['ybr-jpeg'])}/frames/1",
                    headers={"Accept": 'multipart/related; type="image/dicom-rle"'})  # fmt: skip
    assert ybr.status_code == 406 and "colour space" in ybr.json()["detail"]
    assert httpx.get(f"{ct_url}/frames/9", headers={"Accept": 'multipart/related; type="image/jp2"'}).status_code == 404


# ---- deflated and JPEG-LS objects -----------------------------------------------------------------------------------


def _own_copy(path: Path, out: Path, syntax: str | None = None) -> Path:
    """`path` under UIDs of its own (pydicom's variants of one image share theirs), optionally written in `syntax`;
    compressed pixel data is copied as it is."""
    from pacs.synthetic import synthetic_uid

    ds = dcmread(path)
    ds.StudyInstanceUID = synthetic_uid("codec-study", out.name)
    ds.SeriesInstanceUID = synthetic_uid("codec-series", out.name)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = synthetic_uid("codec-sop", out.name)
    if syntax:
        ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.fixture(scope="module")
def codecs(embedded: VnpacsService, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Stored objects in Deflated Explicit VR Little Endian (one frame, and ten) and in JPEG-LS (lossless, one frame
    and ten; near-lossless)."""
    from pydicom.data import get_testdata_file

    d = tmp_path_factory.mktemp("codecs")
    corpus = {}
    for c in storage_corpus():
        corpus.setdefault(c.path.name, c.path)
    picked = {
        "deflated": corpus["image_dfl.dcm"],
        "deflated-multiframe": _own_copy(corpus["emri_small.dcm"], d / "deflated-multiframe.dcm",
                                         "1.2.840.10008.1.2.1.99"),
        "jls": _own_copy(corpus["MR_small_jpeg_ls_lossless.dcm"], d / "jls.dcm"),
        "jls-multiframe": _own_copy(corpus["emri_small_jpeg_ls_lossless.dcm"], d / "jls-multiframe.dcm"),
        "jls-near": _own_copy(Path(str(get_testdata_file("JPEGLSNearLossless_16.dcm"))), d / "jls-near.dcm"),
    }  # fmt: skip
    assert dcmread(picked["deflated-multiframe"]).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99"
    assert all(s.Status == 0 for s in store_files(embedded.dicom_port, picked.values()).values())
    return picked


def _native(array: object) -> bytes:
    import numpy as np

    a = np.asarray(array)
    return np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"))).tobytes()


@pytest.mark.parametrize("syntax", ["*", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", None])
def test_frames_of_a_deflated_object_are_its_native_pixel_data(
    embedded: VnpacsService, codecs: dict[str, Path], syntax: str | None
) -> None:
    accept = 'multipart/related; type="application/octet-stream"' + (f"; transfer-syntax={syntax}" if syntax else "")
    multi = dcmread(codecs["deflated-multiframe"])
    url = _instance_url(embedded, codecs["deflated-multiframe"])
    got = httpx.get(f"{url}/frames/2,4,10", headers={"Accept": accept})
    assert got.status_code == 200, got.text
    # The deflate covers the whole data set, not the frames: every way of asking gets the native bytes, named so.
    assert b"Content-Type: application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1\r\n" in got.content[:200]
    assert multipart_parts(got) == [_native(multi.pixel_array[i]) for i in (1, 3, 9)]
    assert httpx.get(f"{url}/frames/11", headers={"Accept": accept}).status_code == 404

    single = dcmread(codecs["deflated"])
    one = httpx.get(f"{_instance_url(embedded, codecs['deflated'])}/frames/1", headers={"Accept": accept})
    assert one.status_code == 200 and multipart_parts(one) == [_native(single.pixel_array)]


def test_a_deflated_object_has_its_pixel_data_rendered_and_re_encoded_frames(
    embedded: VnpacsService, codecs: dict[str, Path], tmp_path: Path
) -> None:
    import io

    import numpy as np
    from PIL import Image

    ds = dcmread(codecs["deflated"])
    url = _instance_url(embedded, codecs["deflated"])
    [item] = httpx.get(f"{url}/metadata").json()  # the pixel data's bulk data URI resolves to the whole of it
    pixel = httpx.get(
        item["7FE00010"]["BulkDataURI"], headers={"Accept": "multipart/related; type=application/octet-stream"}
    )
    assert pixel.status_code == 200 and multipart_parts(pixel) == [ds.PixelData]

    rendered = httpx.get(f"{url}/rendered", params={"window": "128,256", "accept": "image/png"})
    assert rendered.status_code == 200, rendered.text
    got = np.asarray(Image.open(io.BytesIO(rendered.content)), dtype=np.float64)
    expected = np.clip(ds.pixel_array / 256, 0, 1) * 255  # window 0..256, no rescale in this file
    assert got.shape == expected.shape and np.abs(got - expected).mean() < 1.0 and got.std() > 5
    multi = codecs["deflated-multiframe"]
    for path in (f"{url}/thumbnail", f"{_instance_url(embedded, multi)}/frames/3/rendered"):
        image = httpx.get(path, headers={"Accept": "image/jpeg"})
        assert image.status_code == 200 and image.content[:2] == b"\xff\xd8", path

    rle = httpx.get(f"{_instance_url(embedded, multi)}/frames/3,7",
                    headers={"Accept": 'multipart/related; type="image/dicom-rle"'})  # fmt: skip
    assert rle.status_code == 200, rle.text
    decoded = _decoded(multi, multipart_parts(rle), "1.2.840.10008.1.2.5")
    assert all(np.array_equal(d, dcmread(multi).pixel_array[i]) for d, i in zip(decoded, (2, 6), strict=True))

    explicit = httpx.get(url, headers=_dicom_accept("1.2.840.10008.1.2.1"), timeout=60)
    assert explicit.status_code == 200
    out = tmp_path / "inflated.dcm"
    out.write_bytes(multipart_parts(explicit)[0])
    assert dcmread(out).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert np.array_equal(dcmread(out).pixel_array, ds.pixel_array)


@pytest.mark.parametrize("name", ["jls", "jls-multiframe", "jls-near"])
def test_stored_jpeg_ls_objects_are_decoded_for_frames_and_rendered(
    embedded: VnpacsService, codecs: dict[str, Path], name: str
) -> None:
    import io

    import numpy as np
    from PIL import Image
    from pydicom.encaps import generate_frames

    ds = dcmread(codecs[name])
    count = int(ds.get("NumberOfFrames", 1) or 1)
    arrays = list(ds.pixel_array) if count > 1 else [ds.pixel_array]
    last = count
    url = _instance_url(embedded, codecs[name])
    native = httpx.get(
        f"{url}/frames/1,{last}", headers={"Accept": 'multipart/related; type="application/octet-stream"'}
    )
    assert native.status_code == 200, native.text
    assert multipart_parts(native) == [_native(arrays[0]), _native(arrays[last - 1])]

    as_stored = httpx.get(
        f"{url}/frames/{last}", headers={"Accept": 'multipart/related; type="image/jls"; transfer-syntax=*'}
    )
    assert as_stored.status_code == 200 and b"Content-Type: image/jls" in as_stored.content[:200]
    assert multipart_parts(as_stored) == [list(generate_frames(ds.PixelData, number_of_frames=count))[last - 1]]

    rendered = httpx.get(f"{url}/frames/{last}/rendered", params={"accept": "image/png"})
    assert rendered.status_code == 200, rendered.text
    image = np.asarray(Image.open(io.BytesIO(rendered.content)))
    assert image.shape == arrays[0].shape and image.std() > 5


def test_jpeg_ls_near_lossless_is_transcoded_losslessly_to_jpeg_ls_lossless(
    embedded: VnpacsService, codecs: dict[str, Path], tmp_path: Path
) -> None:
    import subprocess

    import numpy as np

    original = dcmread(codecs["jls-near"])
    response = httpx.get(_instance_url(embedded, codecs["jls-near"]), headers=_dicom_accept("1.2.840.10008.1.2.4.80"))
    assert response.status_code == 200, response.text
    out = tmp_path / "lossless.dcm"
    out.write_bytes(multipart_parts(response)[0])
    got = dcmread(out)
    assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80" and got["PixelData"].is_undefined_length
    assert np.array_equal(got.pixel_array, original.pixel_array)  # the near-lossless pixels, kept exactly
    native = tmp_path / "dcmdjpls.dcm"
    subprocess.run(["dcmdjpls", str(out), str(native)], check=True, capture_output=True, timeout=60)
    assert np.array_equal(dcmread(native).pixel_array, original.pixel_array)

    ct_url = _instance_url(embedded, codecs["deflated-multiframe"])
    jls = httpx.get(f"{ct_url}/frames/5", headers={"Accept": 'multipart/related; type="image/jls"'})
    assert jls.status_code == 200 and b"Content-Type: image/jls; transfer-syntax=1.2.840.10008.1.2.4.80" in jls.content
    [frame] = multipart_parts(jls)
    assert frame[:2] == b"\xff\xd8"  # a JPEG-LS codestream
    decoded = _decoded(codecs["deflated-multiframe"], [frame], "1.2.840.10008.1.2.4.80")[0]
    assert np.array_equal(decoded, dcmread(codecs["deflated-multiframe"]).pixel_array[4])


# ---- WADO-URI, DELETE, CORS ------------------------------------------------------------------------------------------


def test_wado_uri_returns_the_object_or_a_rendered_image(embedded: VnpacsService, loaded: dict[str, Path]) -> None:
    ds = dcmread(loaded["other"], stop_before_pixels=True)
    params = {"requestType": "WADO", "studyUID": ds.StudyInstanceUID, "seriesUID": ds.SeriesInstanceUID,
              "objectUID": ds.SOPInstanceUID}  # fmt: skip
    as_dicom = httpx.get(f"{embedded.base_url}/wado", params={**params, "contentType": "application/dicom"})
    assert as_dicom.status_code == 200 and as_dicom.headers["content-type"] == "application/dicom"
    out = Path("/tmp/vnpacs-wado-uri.dcm")
    out.write_bytes(as_dicom.content)
    assert dataset_bytes(out) == dataset_bytes(loaded["other"])
    out.unlink()
    image = httpx.get(f"{embedded.base_url}/wado", params=params)  # image/jpeg by default
    assert image.status_code == 200 and image.content[:2] == b"\xff\xd8"
    assert httpx.get(f"{embedded.base_url}/wado", params={"requestType": "WADO"}).status_code == 400
    assert httpx.get(f"{embedded.base_url}/wado", params={**params, "objectUID": "1.2.3"}).status_code == 404


def test_delete_removes_index_rows_and_blobs_together(embedded: VnpacsService, tmp_path: Path) -> None:
    import sqlite3
    import subprocess
    import sys

    files = [write_ct(tmp_path, who=patient("Bùi^Xóa", "DEL-1"), study="del", series=s, index=i)
             for s in ("a", "b") for i in (1, 2)]  # fmt: skip
    assert all(s.Status == 0 for s in store_files(embedded.dicom_port, files).values())
    ds = dcmread(files[0], stop_before_pixels=True)
    db = sqlite3.connect(Path(embedded.env["VNPACS_DATA_DIR"]) / "index.db")
    keys = [k for (k,) in db.execute("SELECT blob_key FROM instance i JOIN series s ON i.series_pk = s.pk "
                                     "WHERE s.series_instance_uid = ?", (str(ds.SeriesInstanceUID),))]  # fmt: skip
    assert len(keys) == 2
    url = f"{embedded.base_url}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
    deleted = httpx.delete(url)
    assert deleted.status_code == 200 and deleted.json() == {"deleted_instances": 2}
    assert not any((Path(embedded.env["VNPACS_DATA_DIR"]) / "blobs" / k).exists() for k in keys)
    [study] = qido(embedded, "/studies", PatientID="DEL-1").json()
    assert value(study, "00201206") == 1 and value(study, "00201208") == 2
    assert httpx.delete(url).status_code == 404
    assert httpx.delete(f"{embedded.base_url}/dicom-web/studies/{ds.StudyInstanceUID}").status_code == 200
    assert qido(embedded, "/studies", PatientID="DEL-1").json() == []
    verify = subprocess.run([sys.executable, "-m", "pacs", "verify"], env=embedded.env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert verify.returncode == 0, verify.stdout


def test_cors_is_off_by_default_and_follows_the_allow_list(embedded: VnpacsService, start_server: object) -> None:
    preflight = {"Origin": "http://viewer.benhvien.vn", "Access-Control-Request-Method": "GET"}
    closed = httpx.options(f"{embedded.base_url}/dicom-web/studies", headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    server = start_server("fs-sqlite", VNPACS_CORS_ORIGINS="http://viewer.benhvien.vn")  # type: ignore[operator]
    opened = httpx.options(f"{server.base_url}/dicom-web/studies", headers=preflight)
    assert opened.headers["access-control-allow-origin"] == "http://viewer.benhvien.vn"
    other = httpx.options(
        f"{server.base_url}/dicom-web/studies", headers={**preflight, "Origin": "http://evil.example"}
    )
    assert other.headers.get("access-control-allow-origin") != "http://evil.example"
