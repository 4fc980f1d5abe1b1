"""A real OHIF viewer for the tests: OHIF's prebuilt app from the npm registry, served with Orthanc's
DICOMweb from one origin (Orthanc 1.10 sends no CORS headers), driven in Debian's Chromium by
Playwright from PyPI (never ``playwright install``).

OHIF is downloaded once (``npm pack @ohif/app@3.13.2``) into ``$AINODE_CACHE`` (default
``~/.cache/ainode``), outside the repository.
"""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import tarfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

OHIF_VERSION = "3.13.2"
CHROMIUM = Path("/usr/bin/chromium")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
CACHE = Path(os.environ.get("AINODE_CACHE", Path.home() / ".cache" / "ainode"))

APP_CONFIG = """window.config = {
  routerBasename: null,
  extensions: [],
  modes: [],
  showStudyList: true,
  showErrorDetails: 'always',
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Orthanc (test PACS)', name: 'orthanc',
      wadoUriRoot: '/dicom-web', qidoRoot: '/dicom-web', wadoRoot: '/dicom-web',
      qidoSupportsIncludeField: false, imageRendering: 'wadors', thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true, supportsFuzzyMatching: false, supportsWildcard: true,
      omitQuotationForMultipartRequest: true, bulkDataURI: { enabled: true },
    },
  }],
};
"""


def ohif_dist() -> Path:
    """The prebuilt OHIF ``dist/`` folder, downloaded from the npm registry on first use."""
    root = CACHE / f"ohif-{OHIF_VERSION}"
    dist = root / "package" / "dist"
    if (dist / "index.html").exists():
        return dist
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["npm", "pack", f"@ohif/app@{OHIF_VERSION}", "--silent"], cwd=root, check=True,
                   capture_output=True, timeout=600)  # fmt: skip
    with tarfile.open(root / f"ohif-app-{OHIF_VERSION}.tgz") as archive:
        archive.extractall(root, filter="data")
    return dist


def viewer_available() -> str | None:
    """Why the viewer tests cannot run here, or ``None``."""
    if not CHROMIUM.exists():
        return "Debian's chromium is not installed"
    if not DICOMWEB_PLUGIN.exists():
        return "orthanc-dicomweb is not installed"
    if shutil.which("npm") is None:
        return "npm is not installed"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed"
    return None


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves OHIF's files; ``/dicom-web/`` goes to Orthanc; unknown paths get ``index.html``."""

    orthanc = ""
    dist = Path()

    def log_message(self, format: str, *args: object) -> None:
        return

    def _proxy(self) -> None:
        request = urllib.request.Request(self.orthanc + self.path, method=self.command)
        for key in ("Accept", "Content-Type", "Range"):
            if self.headers.get(key):
                request.add_header(key, self.headers[key])
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                body, status, headers = response.read(), response.status, response.headers
        except urllib.error.HTTPError as exc:
            body, status, headers = exc.read(), exc.code, exc.headers
        self.send_response(status)
        for key in ("Content-Type",):
            if headers.get(key):
                self.send_header(key, headers[key])
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.startswith("/dicom-web/"):
            return self._proxy()
        if self.path.split("?")[0] == "/app-config.js":
            body = APP_CONFIG.encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/javascript")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return None
        local = self.dist / self.path.split("?")[0].lstrip("/")
        if not local.is_file():
            self.path = "/index.html"
        return super().do_GET()

    def translate_path(self, path: str) -> str:
        return str(self.dist / path.split("?")[0].lstrip("/"))


@contextmanager
def serve_ohif(orthanc_http_port: int) -> Iterator[str]:
    """Serve OHIF + Orthanc's DICOMweb on one loopback origin; yields its base URL."""
    handler = type("Handler", (_Handler,), {"orthanc": f"http://127.0.0.1:{orthanc_http_port}", "dist": ohif_dist()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
