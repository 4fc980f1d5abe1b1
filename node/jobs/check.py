"""``ainode algorithms check``: a plugin author's or model deployer's check of one algorithm.

Runs one algorithm (Python plugin or declared model) on a series the way the node does — the series
de-identified with a throwaway key, the volume loaded, the algorithm run in its own process — then
validates what it returned (mask and label-map shapes, codes, UCUM units, measurement groups),
writes every result object it gives (SEG, planar and segment SR, GSPS, key images) and runs
dciodvfy on them when it is installed.
"""

from __future__ import annotations

import dataclasses
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from ainode_sdk import errors as sdk
from ainode_sdk.registry import Registry
from ainode_sdk.validate import validate_result
from node.deid import InstanceDeidentifier
from node.deid.pseudonyms import Pseudonymizer, derive_uid
from node.errors import InvalidInstanceError
from node.jobs.isolation import SharedVolume, unpack_result
from node.jobs.model_workers import ModelWorkers
from node.jobs.runner import algorithm_params, run_algorithm
from node.jobs.volume import load_volume
from node.paths import path_under
from node.results import RESULT_KINDS, build_results, result_kind
from node.results.air import has_air_equipment
from node.settings.config import Deidentification
from node.uids import check_instance_uids, check_uid


@dataclass
class CheckReport:
    """The verdict of one check: problems found (none: it passes) and the files written."""

    problems: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Whether nothing was wrong."""
        return not self.problems


def _series(folder: Path) -> tuple[dict[str, list[Dataset]], int]:
    """The DICOM files under ``folder`` by Series Instance UID (checked: PS3.5 9.1), and how many
    files were passed over (not DICOM, or UIDs that are not UIDs)."""
    series: dict[str, list[Dataset]] = {}
    passed_over = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = dcmread(path)
            _study, series_uid, _sop = check_instance_uids(ds)
        except (InvalidDicomError, OSError, EOFError, ValueError, InvalidInstanceError):
            passed_over += 1
            continue
        series.setdefault(series_uid, []).append(ds)
    return series, passed_over


def check_algorithm(registry: Registry, name: str, series: Path, out: Path, timeout_s: float = 3600) -> CheckReport:
    """Run ``name`` on the series in ``series`` and write its results into ``out`` (see the module
    docstring). A folder that holds several series has each run in turn, its results written into
    ``out/series-N`` (N: the series' place, by Series Number), the report naming each."""
    found, passed_over = _series(series)
    if not found:
        return CheckReport(problems=[f"{series}: no DICOM files"])
    if len(found) == 1:
        report = _check_series(registry, name, next(iter(found.values())), out, timeout_s)
    else:
        report = CheckReport(notes=[f"{series}: {len(found)} series found; each is checked on its own"])
        ordered = sorted(
            found.values(), key=lambda d: (int(d[0].get("SeriesNumber") or 0), str(d[0].SeriesInstanceUID))
        )
        for n, datasets in enumerate(ordered, 1):
            first = datasets[0]
            what = f"series {n} ({first.get('Modality', '?')}, Series Number {first.get('SeriesNumber', '?')}, " \
                f"{len(datasets)} instances)"  # fmt: skip
            one = _check_series(registry, name, datasets, path_under(out, f"series-{n}"), timeout_s)
            report.notes += [f"{what}: {note}" for note in one.notes] + [f"{what}: {'PASS' if one.passed else 'FAIL'}"]
            report.problems += [f"{what}: {problem}" for problem in one.problems]
            report.written += one.written
    if passed_over:
        report.notes.append(f"{passed_over} file(s) passed over: not DICOM, or with UIDs that are not UIDs")
    return report


def _check_series(registry: Registry, name: str, datasets: list[Dataset], out: Path, timeout_s: float) -> CheckReport:
    """:func:`check_algorithm` on one series."""
    report = CheckReport()
    algorithm = registry.get(name)
    spec = algorithm.spec
    key = secrets.token_bytes(32)
    deid = InstanceDeidentifier(Pseudonymizer(key, "check"), Deidentification())
    for ds in datasets:
        deid(ds)
    declared = registry.declaration(name)
    with SharedVolume() as shared, tempfile.TemporaryDirectory() as run_dir:
        volume, slices = load_volume(datasets, allocate=shared.allocate)
        workers = ModelWorkers(Path(run_dir))
        try:
            params = algorithm_params(registry, name, {}, "its defaults") if declared is None else None
            packed, timings = run_algorithm(registry, name, params, volume, shared, workers, timeout_s=timeout_s)
            result = unpack_result(packed)
        except sdk.SeriesRefused as exc:
            report.notes.append(f"refused the series: {exc.reason}")
            return report
        finally:
            workers.stop()
        if declared is not None:
            steps = {k.removeprefix("model_"): v for k, v in timings.items() if k != "model_loads"}
            report.notes.append("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in steps.items()))
            spec = dataclasses.replace(spec, weights_sha256=result.parameters.get("weights_sha256"))
        report.problems += validate_result(result, volume)
        if report.problems:
            return report
        study, series_uid = str(slices[0].StudyInstanceUID), str(slices[0].SeriesInstanceUID)
        built = build_results(  # every kind of object, so that the administrator sees what each viewer gets
            slices, result, spec, lambda kind: derive_uid(study, series_uid, spec.name, kind), "AINODE",
            kinds=RESULT_KINDS, volume=volume,
        )  # fmt: skip
        del volume
    out.mkdir(parents=True, exist_ok=True)
    for obj in built:
        path = path_under(out, f"{result_kind(obj)}_{check_uid(obj.SOPInstanceUID, 'SOP Instance UID')}.dcm")
        obj.save_as(path, enforce_file_format=True)
        report.written.append(path)
        if not has_air_equipment(obj, spec):
            report.problems.append(f"{path.name}: no IHE AIR Contributing Equipment item for {spec.name}")
        if shutil.which("dciodvfy"):
            checked = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
            errors = [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]
            report.problems += [f"{path.name}: dciodvfy {line}" for line in errors]
            report.notes.append(f"{path.name}: dciodvfy {len(errors)} error(s)")
        else:
            report.notes.append("dciodvfy not installed: objects not validated")
    return report
