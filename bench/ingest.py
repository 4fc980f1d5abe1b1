"""Ingest: DCMTK storescu -> (a) DCMTK storescp writing files, (b) Orthanc, (c) ainode (encrypted,
fsync'd), measured side by side in one run; ``--receivers ainode-console`` adds (d) ainode with its
console on and ``/metrics`` scraped every 5 s (the console's cost to ingest); ``scp-only`` adds
ainode's Storage SCP in one process storing nothing (``bench/null_scp.py``: what pynetdicom and the
header parse alone allow) and ``scp-durable`` the same SCP appending each instance to one file and
``fdatasync``-ing it before Success (the ceiling of any receiver that answers Success only once the
instance is on disk).

A 300-slice series is generated from the chest CT by repeating its slices with new UIDs. Runs are
interleaved, each in another order (a, b, c, then b, c, a, ...), with a fresh, empty receiver
each time and the file system synced before each timed send; TCP_NODELAY is set on every sender
and receiver. Reported per receiver (medians): MB/s and instances/s on one
association, the same with 4 concurrent associations, and associations per second when every
instance comes on its own association. Prints a table and writes ``bench/results/ingest.json``.

Usage: ``python bench/ingest.py [--runs 3] [--slices 300]``; before and after a change, in the same
runs: ``git worktree add /tmp/before REV`` and ``--receivers orthanc ainode-baseline ainode
--baseline /tmp/before`` (run from outside the checkout).
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import write_report  # noqa: E402
from tests.peers import (  # noqa: E402
    CT_SERIES,
    TOOL_ENV,
    free_port,
    make_studies,
    node_config,
    start_node_process,
    start_orthanc,
    wait_for_port,
    wait_until,
)

Receiver = Callable[[Path], tuple[int, str, Callable[[], None]]]  # work dir -> (port, called AE, stop)


def storescp(work: Path) -> tuple[int, str, Callable[[], None]]:
    port = free_port()
    out = work / "storescp"
    out.mkdir()
    proc = subprocess.Popen(
        ["storescp", "-od", str(out), "+xa", "-pdu", "131072", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=TOOL_ENV,
    )  # fmt: skip
    wait_for_port(port, 30, proc)  # type: ignore[arg-type]

    def stop() -> None:
        proc.terminate()
        proc.wait(30)

    return port, "STORESCP", stop


def orthanc(work: Path) -> tuple[int, str, Callable[[], None]]:
    pacs = start_orthanc(work / "orthanc", "AINODE", 1)
    return pacs.dicom_port, "PACS", pacs.stop


def scp_only(work: Path, durable: bool = False, phases: Path | None = None) -> tuple[int, str, Callable[[], None]]:
    """ainode's Storage SCP in one process, storing nothing (the receive path's ceiling) or, with
    ``durable``, appending each instance to one file and ``fdatasync``-ing it before Success (the
    ceiling of any receiver that keeps Success-after-durable); with ``phases``, pynetdicom's
    acceptance steps are timed and written there when it stops (``null_scp.py --phases``)."""
    port = free_port()
    extra = ["--durable", str(work)] if durable else []
    extra += ["--phases", str(phases)] if phases is not None else []
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "null_scp.py"), str(port), *extra],
        stdout=subprocess.DEVNULL, stderr=(work / "null_scp.log").open("w"),
    )  # fmt: skip
    wait_for_port(port, 60, proc)

    def stop() -> None:
        proc.terminate()
        proc.wait(30)

    return port, "AINODE", stop


def ainode(work: Path, console: bool = False, code: Path | None = None) -> tuple[int, str, Callable[[], None]]:
    config_path, config = node_config(work, peers=[{"ae_title": "STORESCU"}], destinations={}, routes=[])
    if console:
        config["console"] = {"host": "127.0.0.1", "port": free_port()}
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {"AINODE_TEST_KEY": base64.b64encode(secrets.token_bytes(32)).decode()}
    if code is not None:  # another checkout's node (its packages first on the path)
        env["PYTHONPATH"] = str(code)
    node = start_node_process(config_path, config, env, work / "node.log")
    receivers = int(config["node"].get("receivers", 2))
    # measure the running node, not its start: every receiver listening, the algorithm server's imports done
    wait_until(
        lambda: node.log().count("receiver ") >= receivers - 1 and "algorithm process server ready" in node.log(), 60
    )
    if not console:
        return node.port, "AINODE", node.stop
    done = threading.Event()

    def scrape() -> None:  # as Prometheus does, every 5 s
        while not done.wait(5.0):
            urllib.request.urlopen(f"http://127.0.0.1:{config['console']['port']}/metrics", timeout=30).read()

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()

    def stop() -> None:
        done.set()
        scraper.join(35)
        node.stop()

    return node.port, "AINODE", stop


RECEIVERS: dict[str, Receiver] = {
    "storescp": storescp, "orthanc": orthanc, "ainode": ainode, "ainode-console": partial(ainode, console=True),
    "scp-only": scp_only, "scp-durable": partial(scp_only, durable=True),
}  # fmt: skip


def send(port: int, called: str, files: list[Path], per_file: bool = False) -> None:
    base = ["storescu", "-aet", "STORESCU", "-aec", called, "-pdu", "131072", "127.0.0.1", str(port)]
    if per_file:
        for f in files:
            subprocess.run([*base, str(f)], check=True, capture_output=True, env=TOOL_ENV)
    else:
        subprocess.run([*base, *map(str, files)], check=True, capture_output=True, env=TOOL_ENV)


def measure(name: str, files: list[Path], one_per_assoc: list[Path], megabytes: float) -> dict[str, float]:
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix=f"ainode-ingest-{name}-") as tmp:
        port, called, stop = RECEIVERS[name](Path(tmp))
        try:
            os.sync()  # the previous receiver's unwritten pages are not this one's to flush
            start = time.perf_counter()
            send(port, called, files)
            seconds = time.perf_counter() - start
            figures["one_association_mb_s"] = megabytes / seconds
            figures["one_association_inst_s"] = len(files) / seconds
        finally:
            stop()
    with tempfile.TemporaryDirectory(prefix=f"ainode-ingest-{name}-") as tmp:
        port, called, stop = RECEIVERS[name](Path(tmp))
        try:
            quarters = [files[i::4] for i in range(4)]
            os.sync()
            start = time.perf_counter()
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda part: send(port, called, part), quarters))
            figures["four_associations_mb_s"] = megabytes / (time.perf_counter() - start)
            os.sync()  # nor are the four associations' pages the one-instance associations' to flush
            start = time.perf_counter()
            send(port, called, one_per_assoc, per_file=True)
            figures["associations_per_s"] = len(one_per_assoc) / (time.perf_counter() - start)
        finally:
            stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument(
        "--receivers", nargs="+", choices=[*RECEIVERS, "ainode-baseline"], default=["storescp", "orthanc", "ainode"]
    )
    parser.add_argument("--baseline", type=Path, help="a checkout of other code for receiver ainode-baseline")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ingest.json")
    args = parser.parse_args()
    if "ainode-baseline" in args.receivers:
        if args.baseline is None:
            parser.error("receiver ainode-baseline needs --baseline CHECKOUT (e.g. a git worktree)")
        RECEIVERS["ainode-baseline"] = partial(ainode, code=args.baseline.resolve())
    work = Path(tempfile.mkdtemp(prefix="ainode-ingest-data-"))
    try:
        copies = -(-args.slices // 64)
        files = [f for study in make_studies(CT_SERIES, copies, work) for f in study][: args.slices]
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        one_per_assoc = files[:40]
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in args.receivers}
        for run in range(args.runs):
            # interleaved, each run in another order: no receiver always follows the same one
            shift = run % len(args.receivers)
            for name in args.receivers[shift:] + args.receivers[:shift]:
                runs[name].append(measure(name, files, one_per_assoc, megabytes))
                print(f"run {run + 1}: {name} {runs[name][-1]['one_association_mb_s']:.0f} MB/s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    keys = list(next(iter(runs.values()))[0])
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in runs.items()}
    ratios = {
        f"ainode_over_{other}": medians["ainode"]["one_association_mb_s"] / medians[other]["one_association_mb_s"]
        for other in ("storescp", "orthanc", "scp-only", "scp-durable")
        if "ainode" in medians and other in medians
    }
    if "scp-durable" in medians and "scp-only" in medians:  # the durable guarantee's own ceiling
        ratios["scp-durable_over_scp-only"] = (
            medians["scp-durable"]["one_association_mb_s"] / medians["scp-only"]["one_association_mb_s"]
        )
    print(f"\n{args.slices} CT instances, {megabytes:.1f} MB; medians of {args.runs} interleaved runs")
    print(f"{'receiver':<10}" + "".join(f"{k:>26}" for k in keys))
    for name, m in medians.items():
        print(f"{name:<10}" + "".join(f"{m[k]:>26.1f}" for k in keys))
    print("ratios (one association):", ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    write_report(
        args.out, "ingest", instances=args.slices, megabytes=megabytes, cpus=os.cpu_count(),
        median=medians, ratios=ratios, runs=runs,
    )  # fmt: skip


if __name__ == "__main__":
    main()
