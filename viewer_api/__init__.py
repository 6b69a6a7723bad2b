"""The bundled OHIF viewer at /viewer: its prebuilt dist (fetched by `make viewer`, never committed), served with
an app-config.js that points OHIF at this server's own /dicom-web.

OHIF's dist is built for the site root; here its absolute asset paths are rewritten to /viewer/ when index.html is
served, and its router is given /viewer as base. MPR needs cross-origin isolation, hence COOP/COEP on the pages.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

PREFIX = "/viewer"
DIST = Path(__file__).resolve().parent / "dist"
ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}

APP_CONFIG = """/** vnpacs: OHIF configured for this server's DICOMweb (same origin). */
window.config = {
  name: 'vnpacs',
  routerBasename: '/viewer',
  showStudyList: true,
  extensions: [],
  modes: [],
  investigationalUseDialog: { option: 'never' },
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  strictZSpacingForVolumeViewport: true,
  defaultDataSourceName: 'vnpacs',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'vnpacs',
      configuration: {
        friendlyName: 'vnpacs',
        name: 'vnpacs',
        wadoUriRoot: window.location.origin + '/wado',
        qidoRoot: window.location.origin + '/dicom-web',
        wadoRoot: window.location.origin + '/dicom-web',
        qidoSupportsIncludeField: true,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: true,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video,pdf',
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
"""

MISSING = """<!doctype html><html lang="vi"><head><meta charset="utf-8"><title>vnpacs – trình xem ảnh</title></head>
<body style="font-family:sans-serif;max-width:40em;margin:3em auto">
<h1>Trình xem ảnh OHIF chưa được cài đặt</h1>
<p>Máy chủ vẫn hoạt động bình thường (DICOM, DICOMweb). Để cài trình xem ảnh, chạy lệnh sau trong thư mục vnpacs:</p>
<pre>make viewer</pre>
<p lang="en">The OHIF viewer bundle is not installed. Everything else runs. Install it with <code>make viewer</code>
(it fetches the pinned @ohif/app dist from the npm registry).</p></body></html>"""


def _index_html(dist: Path) -> str:
    html = (dist / "index.html").read_text("utf-8")
    for attribute in ('href="/', 'src="/'):
        html = html.replace(attribute, attribute + "viewer/")
    return html.replace('window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{PREFIX}/"')


def router(dist: Path = DIST) -> APIRouter:
    api = APIRouter(tags=["Viewer"], include_in_schema=False)
    installed = (dist / "index.html").exists()
    index = _index_html(dist) if installed else MISSING

    @api.get(PREFIX)
    def viewer_root() -> Response:
        return RedirectResponse(f"{PREFIX}/")

    @api.get(PREFIX + "/app-config.js")
    def app_config() -> Response:
        return Response(APP_CONFIG, media_type="application/javascript", headers=ISOLATION)

    def asset(path: str) -> Response | None:
        candidate = (dist / path).resolve()
        if path and candidate.is_file() and dist in candidate.parents and candidate.name != "index.html":
            media = mimetypes.guess_type(candidate.name)[0] or "application/octet-stream"
            if candidate.suffix == ".wasm":
                media = "application/wasm"
            return FileResponse(candidate, media_type=media, headers=ISOLATION)
        return None

    @api.get(PREFIX + "/{path:path}")
    def viewer_file(path: str) -> Response:
        if not installed:
            return HTMLResponse(MISSING, status_code=503)
        found = asset(path)
        if found is not None:
            return found
        if "." in Path(path).name:
            return Response(status_code=404)
        # OHIF routes (/viewer/viewer?StudyInstanceUIDs=…, /viewer/) are the single-page app's own.
        return HTMLResponse(index, headers=ISOLATION)

    @api.get("/{path:path}")
    def root_asset(path: str) -> Response:
        """OHIF's webpack loads lazy chunks from the site root: serve those files there too (registered last)."""
        found = asset(path) if installed else None
        return found if found is not None else Response(status_code=404)

    return api
