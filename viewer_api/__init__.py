"""The bundled OHIF viewer at /viewer: its prebuilt dist (fetched by `make viewer`, never committed), served with
an app-config.js that points OHIF at this server's own /dicom-web.

OHIF's dist is built for the site root; here its absolute asset paths are rewritten to /viewer/ when index.html is
served, and its router is given /viewer as base. MPR needs cross-origin isolation, hence COOP/COEP on the pages.

Token mode (`VNPACS_AUTH=token`): the viewer's files stay open, the data does not. Open the viewer with the JWT as
`/viewer/?token=…` or `/viewer/#token=…` (the fragment never reaches a server log); app-config.js takes it out of the
address bar, keeps it in the tab's sessionStorage (reloads and in-app navigation keep working, closing the tab
forgets it) and hands it to OHIF's user-authentication service, so every DICOMweb request OHIF makes (QIDO, metadata,
frames through the image loader, thumbnails, rendered media fetched into object URLs) carries
`Authorization: Bearer …`. A 401 puts a notice on the page saying the token is missing or expired.
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
(function () {
  // Token mode: the JWT comes as ?token= or #token=, leaves the address bar and stays for this tab only.
  var KEY = 'vnpacs.token';
  var url = new URL(window.location.href);
  var fragment = new URLSearchParams(url.hash.replace(/^#/, ''));
  var token = url.searchParams.get('token') || fragment.get('token');
  if (token) {
    try { window.sessionStorage.setItem(KEY, token); } catch (e) {}
    url.searchParams.delete('token');
    fragment.delete('token');
    url.hash = fragment.toString();
    window.history.replaceState(window.history.state, '', url.toString());
  } else {
    try { token = window.sessionStorage.getItem(KEY); } catch (e) {}
  }
  window.vnpacsAuthExtension = {
    id: 'vnpacs-token',
    preRegistration: function (context) {
      if (!token) {
        return;
      }
      context.servicesManager.services.userAuthenticationService.setServiceImplementation({
        getAuthorizationHeader: function () {
          return { Authorization: 'Bearer ' + token };
        },
      });
    },
  };
  window.vnpacsHttpError = function (error) {
    if (!error || error.status !== 401 || document.getElementById('vnpacs-unauthorized')) {
      return;
    }
    var notice = document.createElement('div');
    notice.id = 'vnpacs-unauthorized';
    notice.setAttribute('role', 'alert');
    notice.style.cssText = 'position:fixed;top:0;left:0;right:0;z-index:100000;padding:12px;text-align:center;' +
      'background:#7f1d1d;color:#fff;font:15px sans-serif';
    notice.textContent = token
      ? 'Mã truy cập (token) đã hết hạn hoặc không hợp lệ (HTTP 401). Hãy mở lại trình xem với token mới.'
      : 'Máy chủ yêu cầu mã truy cập (HTTP 401): mở trình xem với /viewer/?token=… hoặc /viewer/#token=…';
    document.body.appendChild(notice);
  };
})();
window.config = {
  name: 'vnpacs',
  routerBasename: '/viewer',
  showStudyList: true,
  extensions: [window.vnpacsAuthExtension],
  httpErrorHandler: window.vnpacsHttpError,
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
    dist = dist.resolve()  # a relative or symlinked VNPACS_VIEWER_DIR: assets resolve to paths under the real one
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
