"""Declared models on the shared 64-slice chest CT: ainode's runtime against MONAI's own runner.

Per model (the spleen bundle; the wholeBody bundle's low-resolution path; seeded weights; and the
real trained 2D lung U-Net of ``../shared/models/lung_unet_small``, its TorchScript export as
``config/lung-unet.example.yaml`` declares it) and per runner, a fresh Python process:

- ``ainode``: the model as the node's worker runs it (:class:`ainode_sdk.declared.model.DeclaredModel`,
  in a process started with the C library settings the node gives its model processes:
  ``GLIBC_TUNABLES`` from :func:`node.process.huge_pages_for_children`): seconds in
  pre-processing, inference, post-processing (``Invertd``, argmax), measurement, and the SEG + SR
  build; peak RSS of that process (VmHWM).
- ``ainode-auto``: the same with ``runtime: auto`` (the network compiled by OpenVINO or ONNX
  Runtime, whichever is faster and agrees with PyTorch): loaded (and compiled) first, as the node's
  model worker keeps it, then timed on the study; its labels compared voxel by voxel with the
  PyTorch path's. The first load converts and checks (in a child process) and is timed as
  ``load_s``; the study then runs with what the node's worker holds.
- ``monai``: ``monai.bundle.run`` of the same bundle on the same volume (as NIfTI), its inferer
  timed by a subclass of the bundle's own inferer class; total seconds and peak RSS (bundles only),
  in a process started as a user starts MONAI (this environment, unchanged).

Issue 26's targets: ``auto`` inference ≤ 0.4x MONAI's own, whole job ≤ 0.5x, masks ≥ 99.9 %
(lung U-Net ≥ 99.99 %) voxel-identical to the PyTorch path, peak RSS no higher than PyTorch's.
Runs on ``cuda`` too when torch sees one.
Prints a table and writes ``bench/results/models.json``.

Usage: ``python bench/models.py [--runs 1] [--models spleen wholebody]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import status_mb, write_report  # noqa: E402

INFERER_SECONDS: list[float] = []


def timed_inferer(base: str) -> Any:
    """A subclass of MONAI's inferer class ``base`` that records the seconds of each call."""
    import monai.inferers

    parent = getattr(monai.inferers, base)

    class Timed(parent):  # type: ignore[misc,valid-type]
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = super().__call__(*args, **kwargs)
            INFERER_SECONDS.append(time.perf_counter() - start)
            return out

    return Timed


class TimedSlidingWindowInferer:
    """Instantiated by the bundle config in place of ``SlidingWindowInferer`` (same arguments)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return timed_inferer("SlidingWindowInferer")(*args, **kwargs)


def _setup(model: str, work: Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    from tests.models import LOWRES, SNOMED_MAPPING, SPLEEN, WHOLE_BODY, seeded_bundle, spleen_declaration

    if model == "lung-unet":
        import yaml

        config = yaml.safe_load((ROOT / "config" / "lung-unet.example.yaml").read_text())
        declaration = config["models"]["lung-unet-ts"]
        return ROOT, {**declaration, "path": str(ROOT / declaration["path"])}, {}
    if model == "spleen":
        bundle = work / SPLEEN.name
        if not bundle.exists():
            seeded_bundle(SPLEEN, work)
        return bundle, spleen_declaration(bundle), {}
    bundle = work / WHOLE_BODY.name
    if not bundle.exists():
        seeded_bundle(WHOLE_BODY, work, overrides=LOWRES, favour=(2, 3, 5, 6, 13, 14, 15, 16, 17, 22, 60, 61))
    declaration = {"type": "monai_bundle", "path": str(bundle), "overrides": LOWRES,
                   "label_mapping": str(SNOMED_MAPPING), "measurements": ["volume", "mean"]}  # fmt: skip
    return bundle, declaration, LOWRES


def one(model: str, runner: str, device: str, work: Path) -> dict[str, Any]:
    """One run in this process (the child side)."""
    import pydicom

    from node.jobs.volume import load_volume
    from tests.peers import CT_SERIES, series_files

    bundle, declaration, overrides = _setup(model, work)
    datasets = [pydicom.dcmread(p) for p in series_files(CT_SERIES)]
    for ds in datasets:
        ds.pop("ReferencedStudySequence", None)  # as the node's de-identification does
    volume, slices = load_volume(datasets)
    if runner == "monai":
        from tests.models import monai_reference

        start = time.perf_counter()
        inferer = {"inferer#_target_": "bench.models.TimedSlidingWindowInferer"}
        monai_reference(bundle, volume, work / f"monai-{model}-{device}", {**overrides, **inferer,
                        "device": f"$torch.device('{'cuda:0' if device == 'cuda' else 'cpu'}')"})  # fmt: skip
        import bench.models as loaded_by_monai  # the module MONAI's config imported (this one runs as __main__)

        return {"total_s": time.perf_counter() - start, "inference_s": sum(loaded_by_monai.INFERER_SECONDS)}
    import os

    import numpy as np

    from ainode_sdk.declared.model import DeclaredModel
    from ainode_sdk.declared.spec import ModelDeclaration
    from node.results import build_results

    os.environ["AINODE_MODEL_CACHE"] = str(work / "compiled")
    if runner == "ainode-auto":
        declaration = {**declaration, "runtime": "auto"}
    algorithm = DeclaredModel(model, ModelDeclaration.model_validate(declaration))
    load_s = 0.0
    if runner == "ainode-auto":  # the node loads (and compiles) a model once, then keeps it for every study
        start = time.perf_counter()
        algorithm.cache.get(model, algorithm.declaration, device)  # type: ignore[arg-type]
        load_s = time.perf_counter() - start
    start = time.perf_counter()
    result = algorithm.run(volume, device)  # type: ignore[arg-type]
    total = time.perf_counter() - start
    labels = np.zeros(volume.voxels.shape, np.uint16)
    if result.label_map is not None:
        labels = result.label_map.astype(np.uint16)
    else:
        for number, segment in enumerate(result.segments, 1):
            labels[segment.mask] = number
    np.save(work / f"labels-{model}-{device}-{runner}.npy", labels)
    start = time.perf_counter()
    build_results(slices, result, algorithm.spec, lambda kind: pydicom.uid.generate_uid(), "AINODE")
    held = algorithm.cache.loaded.get(model)
    used = getattr(held.runtime, "runtime_used", "torch") if held is not None else "?"
    return {**algorithm.last_timings, "build_s": time.perf_counter() - start, "total_s": total,
            "load_s": load_s, "segments": len(result.segments), "runtime": used}  # fmt: skip


def _ratios(rows: list[dict[str, Any]], work: Path, model: str, device: str) -> dict[str, Any]:
    """Per model and device: inference and whole-job time against MONAI's own runner, and how many
    voxels the compiled runtime labels as the PyTorch path does."""
    import numpy as np

    def best(runner: str, key: str) -> float:
        return float(min(r[key] for r in rows if (r["model"], r["device"], r["runner"]) == (model, device, runner)))

    same = np.load(work / f"labels-{model}-{device}-ainode.npy") == np.load(
        work / f"labels-{model}-{device}-ainode-auto.npy"
    )
    auto = next(r for r in rows if (r["model"], r["device"], r["runner"]) == (model, device, "ainode-auto"))
    against = {}
    if any(r["runner"] == "monai" and r["model"] == model for r in rows):
        against = {
            "torch_inference_vs_monai": round(best("ainode", "inference_s") / best("monai", "inference_s"), 3),
            "auto_inference_vs_monai": round(best("ainode-auto", "inference_s") / best("monai", "inference_s"), 3),
            "auto_total_vs_monai": round(best("ainode-auto", "total_s") / best("monai", "total_s"), 3),
        }
    return {
        **against,
        "auto_inference_vs_torch": round(best("ainode-auto", "inference_s") / best("ainode", "inference_s"), 3),
        "auto_voxels_identical_to_torch": round(float(same.mean()), 6),
        "auto_runtime": auto["runtime"],
        "auto_peak_rss_mb": auto["peak_rss_mb"],
        "torch_peak_rss_mb": min(
            r["peak_rss_mb"] or 0 for r in rows if (r["model"], r["device"], r["runner"]) == (model, device, "ainode")
        ),
    }


def model_process_env() -> dict[str, str]:
    """This environment as the node passes it to its model processes (the forkserver's children
    inherit the ``GLIBC_TUNABLES`` of :func:`node.process.huge_pages_for_children`, which glibc
    reads when a process starts)."""
    import os

    from node.process import with_huge_pages

    return {**os.environ, "GLIBC_TUNABLES": with_huge_pages(os.environ.get("GLIBC_TUNABLES", ""))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["spleen", "wholebody", "lung-unet"])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "RUNNER", "DEVICE", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, runner, device, work = args.child
        figures = one(model, runner, device, Path(work))
        figures["peak_rss_mb"] = status_mb("self", "VmHWM")
        import resource

        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the conversion check, when one ran
        figures["check_peak_rss_mb"] = round(children) if children else None
        print(json.dumps(figures))
        return 0
    import torch

    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for device in devices:
                for runner in ("ainode", "ainode-auto") + (("monai",) if model != "lung-unet" else ()):
                    for run in range(args.runs):
                        done = subprocess.run(
                            [sys.executable, __file__, "--child", model, runner, device, tmp],
                            capture_output=True, text=True, check=True, cwd=ROOT,
                            env=model_process_env() if runner != "monai" else None,
                        )  # fmt: skip
                        figures = json.loads(done.stdout.strip().splitlines()[-1])
                        rows.append({"model": model, "device": device, "runner": runner, "run": run, **figures})
        print(f"{'model':<10} {'device':<6} {'runner':<11} {'pre s':>7} {'infer s':>8} {'post s':>7} "
              f"{'build s':>8} {'total s':>8} {'peak MB':>8}")  # fmt: skip
        for r in rows:
            print(
                f"{r['model']:<10} {r['device']:<6} {r['runner']:<11} {r.get('preprocess_s', 0):>7.2f} "
                f"{r['inference_s']:>8.2f} {r.get('postprocess_s', 0):>7.2f} {r.get('build_s', 0):>8.2f} "
                f"{r['total_s']:>8.2f} {r['peak_rss_mb'] or 0:>8.0f}"
            )
        ratios = {f"{m}/{d}": _ratios(rows, Path(tmp), m, d) for m in args.models for d in devices}
    for key, figures in ratios.items():
        print(f"{key}: {json.dumps(figures)}")
    write_report(ROOT / "bench" / "results" / "models.json", "models", rows=rows, ratios=ratios)
    return 0


if __name__ == "__main__":
    sys.exit(main())
