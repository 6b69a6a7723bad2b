"""The bundled OHIF viewer in a real browser (Debian chromium driven by Playwright) against the real server."""

from __future__ import annotations

import io
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import jwt
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, Response, sync_playwright

from pacs.synthetic import generate_ct_studies
from tests.conftest import StartServer
from tests.scu import store_files
from tests.services import VnpacsService

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync", "--disable-quic"]  # fmt: skip


@pytest.fixture(scope="module")
def viewer_server(tmp_path_factory: pytest.TempPathFactory) -> VnpacsService:
    import viewer_api
    from tests.services import start_vnpacs

    assert (viewer_api.DIST / "index.html").exists(), "OHIF dist missing: `make viewer` installs it"
    assert Path(CHROMIUM).exists(), "Debian chromium missing: `make test` installs it"
    server = start_vnpacs({}, tmp_path_factory.mktemp("viewer"))
    files = generate_ct_studies(tmp_path_factory.mktemp("ct"), studies=1, series_per_study=1, slices=6, rows=256,
                                cols=256, seed=7)  # fmt: skip
    assert all(s.Status == 0 for s in store_files(server.dicom_port, files).values())
    yield server  # type: ignore[misc]
    server.stop()


def _canvas_stats(page: Page) -> float:
    canvas = page.locator("canvas").first
    image = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("L"), dtype=np.float64)
    return float(image.std())


def _image_spread(page: Page) -> float:
    """Wait (30 s at most) for the first viewport to draw an image; its pixel spread (0 for a blank canvas)."""
    page.locator("canvas").first.wait_for(timeout=30_000)
    deadline = time.monotonic() + 30
    spread = 0.0
    while time.monotonic() < deadline:
        spread = _canvas_stats(page)
        if spread > 20:
            break
        time.sleep(0.5)
    return spread


def test_ohif_lists_the_vietnamese_study_and_renders_its_images(viewer_server: VnpacsService, artifacts: Path) -> None:
    studies = httpx.get(f"{viewer_server.base_url}/dicom-web/studies").json()
    name = studies[0]["00100010"]["Value"][0]["Alphabetic"]
    family = name.split("^")[0]
    uid = studies[0]["0020000D"]["Value"][0]
    assert not family.isascii()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{viewer_server.base_url}/viewer/")
            page.get_by_text(family).first.wait_for(timeout=30_000)  # the list shows the name, diacritics intact
            page.screenshot(path=str(artifacts / "viewer-study-list.png"))

            page.goto(f"{viewer_server.base_url}/viewer/viewer?StudyInstanceUIDs={uid}")
            spread = _image_spread(page)
            page.screenshot(path=str(artifacts / "viewer-study.png"))
            assert spread > 20, f"the viewport stayed blank (pixel spread {spread:.1f})"
        finally:
            browser.close()


def test_viewer_without_its_bundle_says_how_to_install_it(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server("fs-sqlite", VNPACS_VIEWER_DIR=str(tmp_path / "no-ohif-here"))
    page = httpx.get(f"{server.base_url}/viewer/")
    assert page.status_code == 503 and "make viewer" in page.text and "chưa được cài đặt" in page.text
    assert httpx.get(f"{server.base_url}/dicom-web/studies").status_code == 200  # everything else runs


SECRET = "bi-mat-cua-benh-vien-dai-hon-32-byte"


def test_ohif_in_token_mode_sends_the_token_with_every_dicomweb_request(
    start_server: StartServer, tmp_path: Path, artifacts: Path
) -> None:
    server = start_server("fs-sqlite", VNPACS_AUTH="token", VNPACS_JWT_SECRET=SECRET)
    files = generate_ct_studies(tmp_path / "ct", studies=1, series_per_study=1, slices=4, rows=256, cols=256, seed=11)
    assert all(s.Status == 0 for s in store_files(server.dicom_port, files).values())
    token = jwt.encode({"sub": "bs.lan", "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
    studies_url = f"{server.base_url}/dicom-web/studies"
    assert httpx.get(studies_url).status_code == 401  # the data needs the token...
    for path in ("/viewer/", "/viewer/app-config.js", "/viewer/viewer?StudyInstanceUIDs=1.2.3"):
        assert httpx.get(server.base_url + path).status_code == 200, path  # ...the viewer's own files do not
    [study] = httpx.get(studies_url, headers={"Authorization": f"Bearer {token}"}).json()
    family = study["00100010"]["Value"][0]["Alphabetic"].split("^")[0]
    uid = study["0020000D"]["Value"][0]
    assert not family.isascii()

    seen: list[tuple[str, int, str]] = []  # path, status, Authorization header sent

    def record(response: Response) -> None:
        path = urlsplit(response.url).path
        if path.startswith(("/dicom-web", "/wado")):
            seen.append((path, response.status, response.request.headers.get("authorization", "")))

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("response", record)
            page.goto(f"{server.base_url}/viewer/?token={token}")
            page.get_by_text(family).first.wait_for(timeout=30_000)
            assert "token" not in page.url  # taken out of the address bar (history, screenshots, shoulder surfing)
            page.screenshot(path=str(artifacts / "viewer-token-study-list.png"))

            # A new page load without the token in the address: the tab kept it.
            page.goto(f"{server.base_url}/viewer/viewer?StudyInstanceUIDs={uid}")
            spread = _image_spread(page)
            page.screenshot(path=str(artifacts / "viewer-token-study.png"))
            assert spread > 20, f"the viewport stayed blank (pixel spread {spread:.1f})"
            assert seen and all(status < 400 for _, status, _ in seen), [s for s in seen if s[1] >= 400]
            assert all(auth == f"Bearer {token}" for _, _, auth in seen)
            paths = [path for path, _, _ in seen]  # the list, the study's metadata and its pixels all went through
            assert "/dicom-web/studies" in paths and any(p.endswith("/metadata") for p in paths), paths
            assert any("/frames/" in p for p in paths), paths

            # A fresh browser without a token: DICOMweb says 401 and the page says why.
            stranger = browser.new_page(viewport={"width": 1400, "height": 900})
            refused: list[int] = []
            stranger.on("response", lambda r: refused.append(r.status) if "/dicom-web/" in r.url else None)
            stranger.goto(f"{server.base_url}/viewer/")
            notice = stranger.locator("#vnpacs-unauthorized")
            notice.wait_for(timeout=30_000)
            assert "401" in notice.inner_text() and refused and set(refused) == {401}
            assert stranger.get_by_text(family).count() == 0
            stranger.screenshot(path=str(artifacts / "viewer-token-missing.png"))

            # The token may come in the fragment instead, which no server or proxy log ever sees.
            by_fragment = browser.new_page(viewport={"width": 1400, "height": 900})
            by_fragment.goto(f"{server.base_url}/viewer/#token={token}")
            by_fragment.get_by_text(family).first.wait_for(timeout=30_000)
            assert "token" not in by_fragment.url
        finally:
            browser.close()
