"""MONAI Model Zoo bundles, run by MONAI itself.

The bundle's ``configs/inference.json`` is read with :class:`monai.bundle.ConfigParser` (with the
declared overrides, e.g. a low-resolution switch); the node uses the bundle's own ``network_def``,
``preprocessing`` (without its file loader: the volume arrives as a ``MetaTensor`` in the geometry
the loader would have given), ``inferer`` (e.g. ``SlidingWindowInferer``) and ``postprocessing``
(activations, ``Invertd`` back onto the original grid, ``AsDiscreted``; without its file writer).
Nothing of MONAI's transforms is re-implemented here.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

import numpy as np
import numpy.typing as npt

from ainode_sdk.base import Device, Volume
from ainode_sdk.declared.compiled import Compiled
from ainode_sdk.declared.geometry import from_monai, to_metatensor
from ainode_sdk.declared.postprocess import run_postprocessing
from ainode_sdk.declared.spec import ModelDeclaration
from ainode_sdk.errors import ModelError

logger = logging.getLogger(__name__)

_FILE_IO = ("LoadImaged", "LoadImage", "SaveImaged", "SaveImage")


def _without_file_io(section: dict[str, Any]) -> dict[str, Any]:
    transforms = [t for t in section.get("transforms", []) if str(t.get("_target_", "")).split(".")[-1] not in _FILE_IO]
    return {**section, "transforms": transforms}


def bundle_parser(declaration: ModelDeclaration, device: Device) -> Any:
    """The bundle's inference configuration, parsed, with the declared overrides, the device and
    the bundle root set, and file loading/saving taken out of pre- and post-processing."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(declaration.path / "configs" / "inference.json"))
    parser.read_meta(str(declaration.path / "configs" / "metadata.json"))
    parser["bundle_root"] = str(declaration.path)
    for key, value in declaration.overrides.items():
        parser[key] = value
    parser["device"] = f"$torch.device('{_torch_device(device)}')"
    if "inferer" in parser and isinstance(parser["inferer"], dict) and "device" in parser["inferer"]:
        parser["inferer#device"] = f"$torch.device('{_torch_device(device)}')"
    parser["preprocessing"] = _without_file_io(parser["preprocessing"])
    parser["postprocessing"] = _without_file_io(parser["postprocessing"])
    return parser


def load_bundle_network(declaration: ModelDeclaration, parser: Any = None) -> Any:
    """The bundle's ``network_def`` with its weights loaded, in eval mode, on the CPU.

    Raises
    ------
    RuntimeError, KeyError, ValueError, TypeError, OSError
        The configuration does not build, or the weights do not fit its network (PyTorch's and
        MONAI's own errors).
    """
    import torch

    parser = parser if parser is not None else bundle_parser(declaration, "cpu")
    network = parser.get_parsed_content("network_def")
    state = torch.load(declaration.weights_path(), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    network.load_state_dict(state)
    return network.eval()


def _torch_device(device: Device) -> str:
    return "cuda:0" if device == "cuda" else device


class MonaiBundleRuntime:
    """A bundle's network with its weights, loaded once, and its transforms.

    Raises
    ------
    ModelError
        The bundle's configuration does not build, or the weights do not fit its network.
    """

    def __init__(self, declaration: ModelDeclaration, device: Device) -> None:
        self.declaration = declaration
        self.device = device
        try:
            parser = bundle_parser(declaration, device)
            self.preprocessing = parser.get_parsed_content("preprocessing")
            self.inferer = parser.get_parsed_content("inferer")
            self.postprocessing = parser.get_parsed_content("postprocessing")
        except (RuntimeError, KeyError, ValueError, TypeError, OSError) as exc:
            raise ModelError(f"bundle {declaration.path.name}: {exc}") from exc
        self.network: Any = None
        self.predictor: Any = None
        self.runtime_used = f"torch ({'declared' if declaration.runtime == 'native' else 'kept'})"
        if declaration.runtime != "native" and device == "cpu":
            self._compile()  # before PyTorch's copy of the weights is made: not made at all when it is used
        if self.predictor is None:
            try:
                self.network = load_bundle_network(declaration, parser).to(_torch_device(device))
            except (RuntimeError, KeyError, ValueError, TypeError, OSError) as exc:
                raise ModelError(f"bundle {declaration.path.name}: {exc}") from exc
            self.predictor = self.network
        self.memory_bytes = (
            sum(p.numel() * p.element_size() for p in self.network.parameters())
            if self.network is not None
            else declaration.weights_path().stat().st_size
        )

    def _compile(self) -> None:
        """Run the network by the declared runtime when it agrees with PyTorch (:mod:`.compiled`)."""
        from ainode_sdk.declared.compiled import compile_model
        from ainode_sdk.declared.spec import file_sha256

        roi = tuple(int(v) for v in getattr(self.inferer, "roi_size", ()) or ())
        if len(roi) != 3:
            self.runtime_used = "torch (the inferer has no 3D window to compile for)"
            return
        channels = int(self.declaration.bundle_metadata().get("network_data_format", {}).get("inputs", {})
                       .get("image", {}).get("num_channels", 1))  # fmt: skip
        batch = int(getattr(self.inferer, "sw_batch_size", 1) or 1)
        sha = self.declaration.sha256 or file_sha256(self.declaration.weights_path())
        compiled, why = compile_model(self.declaration, (batch, channels, *roi), sha)
        if compiled is None:
            logger.warning("model %s runs on PyTorch: %s", self.declaration.path.name, why)
            self.runtime_used = f"torch ({why})"
            return
        logger.info("model %s runs on %s", self.declaration.path.name, why)
        self.predictor, self.runtime_used = compiled, why

    def infer(self, volume: Volume) -> tuple[npt.NDArray[np.int32], dict[str, float]]:
        """Labels ``(slices, rows, columns)`` on the volume's own grid, and seconds per stage."""
        import time

        import torch

        t: dict[str, float] = {}
        start = time.perf_counter()
        data = self.preprocessing({"image": to_metatensor(volume)})
        t["preprocess_s"] = time.perf_counter() - start
        start = time.perf_counter()
        autocast = (
            torch.autocast("cuda", dtype=torch.float16)
            if self.declaration.half_precision and self.device == "cuda"
            else nullcontext()
        )
        with torch.no_grad(), autocast:
            image = data["image"].to(_torch_device(self.device))
            data["pred"] = self.inferer(image[None], self.predictor)[0]
        if isinstance(self.predictor, Compiled):
            self.predictor.release()  # the compiled runtime's working memory, not held through post-processing
        t["inference_s"] = time.perf_counter() - start
        start = time.perf_counter()
        data["pred"] = data["pred"].float()
        out = run_postprocessing(self.postprocessing, data)
        labels = out["pred"]
        labels = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
        if labels.ndim == 4:  # (channel, x, y, z) after AsDiscreted(argmax)
            labels = labels[0]
        t["postprocess_s"] = time.perf_counter() - start
        return from_monai(np.rint(labels).astype(np.int32)), t
