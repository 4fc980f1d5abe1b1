"""Routing rule evaluation: 100 rules against one series header (issue target: under 1 ms).

Timed as the router runs them: the header is prepared once, then every rule is checked (the
fast boolean path; explanations for dry runs use ``evaluate``). The rules mix every operator and
combinator on keywords of the real chest CT header; none matches, so every rule is evaluated in
full (the worst case for first_match). Prints a table and writes ``bench/results/rules.json``.

Usage: ``python bench/rules.py [--rules 100] [--repeats 2000]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402

from bench.report import write_report  # noqa: E402
from node.conditions import evaluate, header_of, keywords_of, matches, parse_condition, prepare  # noqa: E402
from tests.peers import CT_SERIES, series_files  # noqa: E402


def rule(i: int) -> dict[str, object]:
    """The i-th rule: a different mix of operators, never matching the chest CT."""
    return {
        "all": [
            {"Modality": {"in": ["CT", "MR", "PT"]}},
            {"any": [{"BodyPartExamined": {"exists": True}}, {"SliceThickness": {"le": 5.0 + i}}]},
            {"not": {"StudyDescription": {"regex": f"^brain{i}$", "ignore_case": True}}},
            {"ImageType": {"contains": "AXIAL"}},
            {"calling_ae_title": {"ne": f"SCANNER{i}"}},
            {"SeriesNumber": {"gt": 1000 + i}},  # false: the rule fails at its last test
        ]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rules.json")
    args = parser.parse_args()
    conditions = [parse_condition(rule(i)) for i in range(args.rules)]
    ds = pydicom.dcmread(series_files(CT_SERIES)[0], stop_before_pixels=True)
    keywords = set().union(*(keywords_of(c) for c in conditions))
    header = header_of(ds, keywords, "PACS", "AINODE")
    assert not any(evaluate(c, header).matched for c in conditions)
    samples = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        prepared = prepare(header)  # once per series, as the router does
        for condition in conditions:
            matches(condition, prepared)
        samples.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(100):
        header_of(ds, keywords, "PACS", "AINODE")
    extract_ms = (time.perf_counter() - start) * 10
    figures = {
        "rules": args.rules,
        "evaluate_all_ms_median": statistics.median(samples) * 1000,
        "evaluate_all_ms_p99": sorted(samples)[int(0.99 * len(samples))] * 1000,
        "header_extraction_ms": extract_ms,
    }
    print(f"{args.rules} rules against one CT series header, {args.repeats} repeats")
    for key, value in figures.items():
        print(f"  {key:<26}{value:>10.4f}" if isinstance(value, float) else f"  {key:<26}{value:>10}")
    write_report(args.out, "rules", figures=figures)


if __name__ == "__main__":
    main()
