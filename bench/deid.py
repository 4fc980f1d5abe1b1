"""De-identification throughput on the CT series, one core, disk I/O excluded.

Each instance is held in memory as its encoded bytes; one iteration decodes it (pydicom) and applies
the default profile (PS3.15 Annex E + options), as the pipeline does before handing the series to an
algorithm. Encoding the result again (what ``ainode deidentify`` adds before writing) is timed apart.
Prints a table and writes ``bench/results/deid.json``.

Usage: ``python bench/deid.py [--repeats 5]``
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import write_report  # noqa: E402
from node.deid import InstanceDeidentifier  # noqa: E402
from node.deid.pseudonyms import Pseudonymizer  # noqa: E402
from node.dicomio import configure_pydicom, decode, encode  # noqa: E402
from node.settings.config import Deidentification  # noqa: E402
from tests.peers import CT_SERIES, series_files  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "deid.json")
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    configure_pydicom()  # as the node runs
    blobs = [f.read_bytes() for f in series_files(CT_SERIES)]
    megabytes = sum(map(len, blobs)) / 1e6
    deid = InstanceDeidentifier(Pseudonymizer(secrets.token_bytes(32), "bench"), Deidentification())
    runs, encode_runs = [], []
    for _ in range(args.repeats):
        deid_s = encode_s = 0.0
        for blob in blobs:
            start = time.perf_counter()
            ds = decode(blob)
            deid(ds)
            middle = time.perf_counter()
            encode(ds)
            encode_s += time.perf_counter() - middle
            deid_s += middle - start
        runs.append(deid_s)
        encode_runs.append(encode_s)
    median = statistics.median(runs)
    figures = {
        "instances": len(blobs),
        "megabytes": round(megabytes, 1),
        "seconds_median": median,
        "instances_per_s": len(blobs) / median,
        "mb_per_s": megabytes / median,
        "ms_per_instance": 1000 * median / len(blobs),
        "encode_ms_per_instance": 1000 * statistics.median(encode_runs) / len(blobs),
    }
    print(f"de-identify CT ({len(blobs)} instances, {megabytes:.1f} MB), one core, median of {args.repeats}")
    for key, value in figures.items():
        print(f"  {key:<18}{value:>10.2f}" if isinstance(value, float) else f"  {key:<18}{value:>10}")
    write_report(args.out, "deid", figures=figures, runs_s=runs, encode_runs_s=encode_runs)


if __name__ == "__main__":
    main()
