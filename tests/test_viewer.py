"""The bundled OHIF viewer in a real browser (Debian chromium driven by Playwright) against the real server."""

from __future__ import annotations

import io
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, sync_playwright

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
            page.locator("canvas").first.wait_for(timeout=30_000)
            deadline = time.monotonic() + 30
            spread = 0.0
            while time.monotonic() < deadline:
                spread = _canvas_stats(page)
                if spread > 20:
                    break
                time.sleep(0.5)
            page.screenshot(path=str(artifacts / "viewer-study.png"))
            assert spread > 20, f"the viewport stayed blank (pixel spread {spread:.1f})"
        finally:
            browser.close()


def test_viewer_without_its_bundle_says_how_to_install_it(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server("fs-sqlite", VNPACS_VIEWER_DIR=str(tmp_path / "no-ohif-here"))
    page = httpx.get(f"{server.base_url}/viewer/")
    assert page.status_code == 503 and "make viewer" in page.text and "chưa được cài đặt" in page.text
    assert httpx.get(f"{server.base_url}/dicom-web/studies").status_code == 200  # everything else runs
