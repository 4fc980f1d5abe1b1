"""Real peers for tests and benchmarks: data paths, free loopback ports, a node process, Orthanc, DCMTK.

No pytest here, so ``bench/`` scripts can use it too."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("AINODE_TEST_DATA", ROOT.parent / "shared" / "data"))
CT_SERIES = DATA / "ct_chest_lungpetctdx_A0001" / "series2_5mm_kernelL_lung"
CT_SOFT_SERIES = DATA / "ct_chest_lungpetctdx_A0001" / "series3_5mm_kernelB_mediastinal"
CT_MIDDLE = slice(16, 48)
"""The shared chest CT's middle 32 slices of 64 (both lungs in each; the same volume slices however
they are sorted): half a 3D bundle's windows, where a test needs the pipeline and not the whole chest."""
MR_SERIES = DATA / "mr_brain_siemens_t1sag_HFS" / "HFS_t1_fl2d_sag"
TRANSCODED = DATA / "ct_chest_derived_transcoded_A0001"
CT_PATIENT_NAME = "Lung_Dx-A0001"
AINODE = shutil.which("ainode", path=str(Path(sys.executable).parent)) or "ainode"
TOOL_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something listens on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port} after {timeout_s} s")


def wait_listening(port: int, timeout_s: float = 30.0) -> None:
    """Wait until a socket listens on ``port`` without connecting to it (a bare TCP connect upsets
    TLS servers that handle one connection at a time, like DCMTK storescp)."""
    needle = f":{port:04X} "
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as fh:
                if any(needle in line and line.split()[3] == "0A" for line in fh):
                    return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port} after {timeout_s} s")


def wait_until(predicate: Any, timeout_s: float, interval_s: float = 0.5) -> Any:
    """Poll ``predicate`` until it returns something truthy; return it or raise ``TimeoutError``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"condition not met within {timeout_s} s")


def flip_last_ciphertext_byte(path: Path, offset: int) -> None:
    """Tamper with the segment record at ``offset`` of ``path`` in place: its last ciphertext byte
    flipped, one ``pwrite`` (a whole-file rewrite could be read half-way by the node as records
    with no key slots, "deleted")."""
    from node.storage import segments

    length = segments.read_head(path, offset)[0]
    last = offset + segments.RECORD_HEAD + length - 1
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([os.pread(fd, 1, last)[0] ^ 0x01]), last)
    finally:
        os.close(fd)


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """Run dicom3tools' dciodvfy; return (errors, warnings)."""
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", check=False)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")], [line for line in lines if line.startswith("Warning")]


def storescu(
    port: int, files: list[Path], calling: str = "STORESCU", called: str = "AINODE", extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Send files with DCMTK storescu (proposing only what is sent; ``extra`` options, e.g. ``-xy``
    to propose JPEG baseline, since storescu cannot transcode JPEG itself)."""
    cmd = ["storescu", "-R", *extra, "-aet", calling, "-aec", called, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, env=TOOL_ENV, timeout=120, check=False)


def start_storescu(port: int, files: list[Path], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start DCMTK storescu (calling STORESCU, called AINODE) in the background, for concurrent
    senders; collect its outcome with ``communicate()``."""
    return subprocess.Popen(
        ["storescu", "-aet", "STORESCU", "-aec", "AINODE", "127.0.0.1", str(port), *map(str, files)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or TOOL_ENV,
    )  # fmt: skip


def run_python(code: str) -> None:
    """Run ``code`` in a fresh interpreter (this one's); fails the test with its standard error if
    it does not exit 0 (a probe of what importing a module does to the process)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def series_files(folder: Path) -> list[Path]:
    """The ``.dcm`` files of a folder, sorted."""
    return sorted(folder.glob("*.dcm"))


@dataclass
class NodeProcess:
    """An ``ainode serve`` subprocess with its configuration and captured log."""

    config_path: Path
    data_dir: Path
    port: int
    ae_title: str
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)
    env: dict[str, str] = field(default_factory=dict)
    _index: Any = field(default=None, repr=False)

    def index(self) -> Any:
        """The node's index, read from this process: polling it costs no ``ainode`` start-up."""
        if self._index is None:
            from node.storage.index import Index

            url = (yaml.safe_load(self.config_path.read_text()).get("storage") or {}).get("database_url")
            self._index = Index.for_data_dir(self.data_dir, 5.0, url)
        return self._index

    def studies(self) -> str:
        """What ``ainode studies list`` prints, read from the index here."""
        from node.cli.admin import study_line

        return "".join(study_line(s) + "\n" for s in self.index().studies())

    def job_state(self, job_id: int) -> str | None:
        """The state of a job in the ledger (``None``: no such job yet)."""
        job = self.index().job(job_id)
        return None if job is None else str(job.state)

    def stored_sop_instance_uids(self) -> set[str]:
        """The SOP Instance UID of every instance the index names, read back (decrypted) from the
        store: what the node holds and will analyse."""
        import pydicom

        from node.settings.config import EnvKeySource
        from node.storage.keys import load_key_provider
        from node.storage.store import ObjectStore

        keys = load_key_provider(EnvKeySource(provider="env", variable="AINODE_TEST_KEY"))
        store = ObjectStore(self.data_dir / "store", keys)
        uids = set()
        for study in self.index().studies():
            for row in self.index().instances(study.study_key):
                ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(store.get(row.object_id)), stop_before_pixels=True)
                uids.add(str(ds.SOPInstanceUID))
        return uids

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run another ``ainode`` subcommand with this node's configuration."""
        return subprocess.run(
            [AINODE, *args, "--config", str(self.config_path)], capture_output=True, text=True, check=False
        )

    def log(self) -> str:
        """Everything the node logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_warm(self, timeout_s: float = 60) -> None:
        """Wait until the node's start-up warm-up is over (the algorithm process server and the
        result build's tables loaded): what a memory figure measures from here is the test's own."""
        wait_until(lambda: "algorithm process server ready" in self.log() or None, timeout_s)

    def kill(self) -> None:
        """SIGKILL (a crash): no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def node_config(
    tmp_path: Path,
    *,
    peers: list[dict[str, Any]],
    destinations: dict[str, Any],
    routes: list[dict[str, Any]],
    port: int | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Write a node configuration into ``tmp_path`` and return its path and content."""
    port = port or free_port()
    config = {
        "node": {"ae_title": "AINODE", "host": "127.0.0.1", "port": port, "data_dir": str(tmp_path / "data")},
        "keys": {"provider": "env", "variable": "AINODE_TEST_KEY"},
        "peers": peers,
        "destinations": destinations,
        "routes": routes,
    }
    path = tmp_path / "ainode.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, config


def pacs_node_config(
    tmp_path: Path,
    pacs: Any,
    node_port: int,
    routes: list[dict[str, Any]],
    destination: dict[str, Any] | None = None,
    models: dict[str, Any] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """A node on ``node_port`` that Orthanc ``pacs`` forwards to and whose ``routes`` deliver to it
    (destination ``pacs``, with ``destination``'s extra settings; ``models`` declared)."""
    config_path, config = node_config(
        tmp_path, port=node_port, peers=[{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}],
        destinations={"pacs": {"type": "dicom", "peer": "PACS", **(destination or {})}},
        routes=[{**r, "destinations": ["pacs"]} for r in routes],
    )  # fmt: skip
    if models:
        config["models"] = models
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config_path, config


LUNG_ROUTE = {
    "name": "chest-ct-lung-density",
    "match": {"Modality": "CT", "StudyDescription": {"regex": "chest|thorax", "ignore_case": True}},
    "algorithms": ["lung-ct-density"],
    "completion": {"quiet_period_s": 1.0},
}


def folder_node_config(tmp_path: Path, route: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any], Path]:
    """A node that accepts DCMTK's STORESCU and writes results of ``route`` (the lung route by
    default) into a folder; returns the config path, the config and the results folder."""
    results = tmp_path / "results"
    config_path, config = node_config(
        tmp_path,
        peers=[{"ae_title": "STORESCU"}],
        destinations={"folder": {"type": "folder", "path": str(results)}},
        routes=[{**(route or LUNG_ROUTE), "destinations": ["folder"]}],
    )
    return config_path, config, results


@dataclass
class Orthanc:
    """A real Orthanc (Debian package) on loopback ports, used as the PACS."""

    dicom_port: int
    http_port: int
    ae_title: str
    proc: subprocess.Popen[bytes]
    credentials: tuple[str, str] | None = None
    """A registered user when Orthanc's HTTP authentication is on."""

    def rest(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Any:
        """Call Orthanc's REST API; JSON in and out (bytes out for ``/file``)."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        if self.credentials is not None:
            token = base64.b64encode(":".join(self.credentials).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=120) as response:
            payload = response.read()
        return payload if path.endswith("/file") else json.loads(payload or b"null")

    def stop(self) -> None:
        """SIGTERM and wait (Orthanc takes a few seconds to exit)."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_orthanc(
    root: Path,
    node_ae_title: str,
    node_port: int,
    dicom_port: int | None = None,
    http_port: int | None = None,
    lua_scripts: list[Path] | None = None,
    plugins: list[Path] | None = None,
    users: dict[str, str] | None = None,
    dicomweb_servers: dict[str, Any] | None = None,
) -> Orthanc:
    """Start Orthanc in ``root`` knowing ainode as modality ``ainode`` at ``node_port`` (with
    ``plugins``, e.g. DICOMweb, served at ``/dicom-web/``)."""
    root.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = dicom_port or free_port(), http_port or free_port()
    config = {
        "Name": "ainode-test-pacs",
        "DicomAet": "PACS",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": users or {},
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "DicomAlwaysAllowStore": True,
        "DicomCheckCalledAet": False,
        "DicomModalities": {"ainode": {"AET": node_ae_title, "Host": "127.0.0.1", "Port": node_port}},
        "Plugins": [str(p) for p in plugins or []],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": dicomweb_servers or {}},
        "LuaScripts": [str(p) for p in lua_scripts or []],
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(["/usr/sbin/Orthanc", str(root / "orthanc.json")], stdout=log, stderr=log, env=TOOL_ENV)
    wait_for_port(http_port, 60, proc)
    wait_for_port(dicom_port, 60, proc)
    return Orthanc(dicom_port, http_port, "PACS", proc, next(iter(users.items())) if users else None)


def start_node_process(config_path: Path, config: dict[str, Any], env: dict[str, str], log_path: Path) -> NodeProcess:
    """Start ``ainode serve`` and wait until it listens."""
    node = NodeProcess(
        config_path=config_path,
        data_dir=Path(config["node"]["data_dir"]),
        port=int(config["node"]["port"]),
        ae_title=config["node"]["ae_title"],
        log_path=log_path,
        env={**os.environ, **env},
    )
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    node.proc = subprocess.Popen([AINODE, "serve", "--config", str(config_path)], stdout=log, stderr=log, env=node.env)
    STARTED.append(weakref.ref(node))
    wait_for_port(node.port, 60, node.proc)
    return node


STARTED: list[weakref.ref[NodeProcess]] = []
"""The nodes this test process started, while their tests hold them (a failing test's report
shows what the live ones logged; a weak reference: a finished test's node and its index go)."""


def log_problems(node: NodeProcess, lines: int = 40) -> str:
    """The last ``lines`` warnings, errors and tracebacks in ``node``'s log."""
    wanted = [
        line for line in node.log().splitlines()
        if any(word in line for word in ("WARNING", "ERROR", "CRITICAL", "Traceback", "Error:", "Exception"))
    ]  # fmt: skip
    return "\n".join(wanted[-lines:])


def make_studies(source: Path, count: int, out: Path) -> list[list[Path]]:
    """``count`` copies of the series in ``source`` as distinct studies (new Study, Series and SOP
    Instance UIDs, derived from the originals), written under ``out``; returns the files of each."""
    import pydicom
    from pydicom.uid import generate_uid

    originals = [pydicom.dcmread(p) for p in series_files(source)]
    studies = []
    for n in range(count):
        folder = out / f"study{n:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        study_uid = generate_uid(entropy_srcs=[str(originals[0].StudyInstanceUID), str(n)])
        series_uid = generate_uid(entropy_srcs=[str(originals[0].SeriesInstanceUID), str(n)])
        files = []
        for i, ds in enumerate(originals):
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(n), str(i), study_uid])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            path = folder / f"{i:04d}.dcm"
            ds.save_as(path)
            files.append(path)
        studies.append(files)
    return studies


def make_tall_series(source: Path, slices: int, out: Path, tag: str = "tall") -> list[Path]:
    """A series of ``slices`` instances built from the series in ``source`` for benchmarks: its
    slices repeated in order along the slice normal, each placed one slice spacing further on (so
    the volume geometry stays consistent), with new UIDs derived from ``tag``; written under ``out``."""
    import numpy as np
    import pydicom
    from pydicom.uid import generate_uid

    originals = sorted(
        (pydicom.dcmread(p) for p in series_files(source)), key=lambda d: float(d.ImagePositionPatient[2])
    )
    start = np.array([float(v) for v in originals[0].ImagePositionPatient])
    step = np.array([float(v) for v in originals[1].ImagePositionPatient]) - start
    study_uid = generate_uid(entropy_srcs=[str(originals[0].StudyInstanceUID), tag, str(slices)])
    series_uid = generate_uid(entropy_srcs=[str(originals[0].SeriesInstanceUID), tag, str(slices)])
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(slices):
        ds = originals[i % len(originals)]
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[study_uid, str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [f"{v:.3f}" for v in start + i * step]
        ds.SliceLocation = f"{(start + i * step)[2]:.3f}"
        ds.InstanceNumber = i + 1
        path = out / f"{i:04d}.dcm"
        ds.save_as(path)
        files.append(path)
    return files


def peak_rss_growth(pid: int, action: Any, settle_s: float = 0.5) -> tuple[float, Any]:
    """The largest growth (MB) of process ``pid``'s resident memory while ``action()`` runs (sampled
    every 20 ms, and for ``settle_s`` after), and what ``action`` returned."""
    import threading

    import psutil

    process = psutil.Process(pid)
    time.sleep(settle_s)
    base = process.memory_info().rss
    peak, done = base, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = action()
        time.sleep(settle_s)
    finally:
        done.set()
        sampler.join()
    return (peak - base) / 1e6, result
