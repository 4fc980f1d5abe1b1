"""Build time and size of each kind of result object for lung-ct-density on the shared CT (64
slices) and on a 500-slice series made of it, one kind at a time, median of ``--repeats``.

Prints a table and writes ``bench/results/objects.json``.

Usage: ``python bench/objects.py [--slices 64 500] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402

from ainode_sdk.base import Volume  # noqa: E402
from bench.report import write_report  # noqa: E402
from lung_ct_density import LungCtDensity  # noqa: E402
from node.dicomio import encode  # noqa: E402
from node.jobs.volume import load_volume  # noqa: E402
from node.results import RESULT_KINDS, build_results  # noqa: E402
from tests.peers import CT_SERIES, make_tall_series, series_files  # noqa: E402


def lung_series(slices: int, folder: Path) -> tuple[Volume, list[pydicom.Dataset]]:
    """The shared chest CT (``slices`` > 64: made taller in ``folder``) as the analysis sees it:
    its volume and its source headers in slice order, without the attribute de-identification drops."""
    files = series_files(CT_SERIES) if slices <= 64 else make_tall_series(CT_SERIES, slices, folder)
    datasets = [pydicom.dcmread(f) for f in files]
    for ds in datasets:
        ds.pop("ReferencedStudySequence", None)  # as the de-identification leaves them
    return load_volume(datasets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, nargs="+", default=[64, 500])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "objects.json")
    args = parser.parse_args()
    figures: dict[str, dict[str, dict[str, float]]] = {}
    for slices in args.slices:
        with tempfile.TemporaryDirectory() as tmp:
            volume, sources = lung_series(slices, Path(tmp))
        result = LungCtDensity().run(volume, "cpu")
        row: dict[str, dict[str, float]] = {}
        for kind in RESULT_KINDS:
            runs = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                built = build_results(sources, result, LungCtDensity.spec, lambda k: pydicom.uid.generate_uid(),
                                      "AINODE", kinds=(kind,), volume=volume)  # fmt: skip
                runs.append(time.perf_counter() - start)
            size = sum(len(encode(ds)) for ds in built) / 1e6
            row[kind] = {"seconds_median": statistics.median(runs), "megabytes": size, "objects": len(built)}
            print(f"{slices:>4} slices  {kind:<11} {statistics.median(runs):6.2f} s  {size:7.2f} MB  ({len(built)})")
        figures[str(len(sources))] = row
    write_report(args.out, "objects", figures=figures)


if __name__ == "__main__":
    main()
