"""Issue 5: mutated PDUs and data sets for a bounded time: no crash, no hang, no thread leak, and a
normal study still works afterwards."""

from __future__ import annotations

import random
import socket
import threading
import time
from pathlib import Path

import pytest

from .peers import CT_SERIES, folder_node_config, free_port, series_files, storescu, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FUZZ_SECONDS = 20.0


def _record_session(node_port: int, files: list[Path]) -> bytes:
    """Everything storescu sends to the node for ``files``, captured by a one-shot TCP proxy."""
    proxy_port = free_port()
    listener = socket.create_server(("127.0.0.1", proxy_port))
    captured = bytearray()

    def pipe(src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    captured.extend(data)
                dst.sendall(data)
        except OSError:
            pass  # one side closed: the session is over
        finally:
            dst.close()

    def serve() -> None:
        client, _ = listener.accept()
        upstream = socket.create_connection(("127.0.0.1", node_port))
        threads = [
            threading.Thread(target=pipe, args=(client, upstream, True)),
            threading.Thread(target=pipe, args=(upstream, client, False)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)

    server = threading.Thread(target=serve)
    server.start()
    sent = storescu(proxy_port, files)
    server.join(timeout=60)
    listener.close()
    assert sent.returncode == 0, sent.stderr
    return bytes(captured)


def _mutate(session: bytes, rng: random.Random) -> bytes:
    data = bytearray(session)
    kind = rng.random()
    if kind < 0.5:  # flip a few bytes anywhere
        for _ in range(rng.randint(1, 12)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind < 0.8:  # cut short
        data = data[: rng.randrange(1, len(data))]
    elif kind < 0.9:  # a valid start, then garbage
        cut = rng.randrange(1, min(len(data), 4096))
        data = data[:cut] + bytearray(rng.randbytes(rng.randint(1, 4096)))
    else:  # pure garbage, sometimes with a plausible PDU type
        data = bytearray(rng.randbytes(rng.randint(1, 2048)))
        data[0] = rng.choice([0x01, 0x04, 0x05, 0x07, data[0]])
    return bytes(data)


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no thread count")


def test_fuzzed_sessions_do_not_break_the_node(start_node, tmp_path):
    config_path, config, results = folder_node_config(tmp_path)
    config["node"]["network_timeout_s"] = 5.0  # a cut-off sender must not hold a thread for long
    config_path.write_text(__import__("yaml").safe_dump(config))
    node = start_node(config_path, config)
    files = series_files(CT_SERIES)
    session = _record_session(node.port, files[:2])
    assert session[0] == 0x01  # starts with the A-ASSOCIATE-RQ
    assert node.proc is not None
    # the baseline once the node is quiet: the recorded study's job has run (the job side's threads
    # are started) and its association has ended (in whichever receiver process took it)
    wait_until(lambda: node.job_state(1) not in (None, "pending", "running"), 120)
    time.sleep(1)
    baseline = _threads(node.proc.pid)

    rng = random.Random(2026)
    deadline = time.monotonic() + FUZZ_SECONDS
    sessions = 0
    while time.monotonic() < deadline:
        payload = _mutate(session, rng)
        with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
            sock.settimeout(0.3)
            try:
                sock.sendall(payload)
                while sock.recv(65536):
                    pass
            except OSError:
                pass  # reset, timeout: the node may drop a broken peer
        sessions += 1
        assert node.proc.poll() is None, "the node died"
    assert sessions > 50

    # no thread leak: associations of broken peers end within the network timeout
    wait_until(lambda: _threads(node.proc.pid) <= baseline + 2, 30, 0.5)
    # and a normal study still gets its results
    sent = storescu(node.port, files)
    assert sent.returncode == 0, sent.stderr
    wait_until(lambda: results.exists() and len(list(results.rglob("*.dcm"))) == 2, 180)
    assert '"C-STORE failed"' not in node.log()
