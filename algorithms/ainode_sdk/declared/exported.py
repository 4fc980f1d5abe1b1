"""TorchScript and ONNX models with a declared pre-processing, run with MONAI's transforms.

A 2D model (``preprocessing.slices``) runs slice by slice in the stored orientation with MONAI's
``SliceInferer`` (see :meth:`_ExportedRuntime._infer_slices`); a 3D model as follows.

Pre-processing (orientation, resampling to a spacing, intensity window or normalisation), MONAI's
``sliding_window_inference``, activation, ``Invertd`` back onto the original grid, argmax or
threshold, and optionally the largest connected component of each label — in the same order as a
MONAI bundle's own post-processing, so an export of a bundle's network declared with the bundle's
pre-processing gives the bundle's masks.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from ainode_sdk.base import Device, Volume
from ainode_sdk.declared.geometry import from_monai, to_metatensor
from ainode_sdk.declared.postprocess import channels_innermost, run_postprocessing
from ainode_sdk.declared.spec import ModelDeclaration
from ainode_sdk.errors import ModelError

logger = logging.getLogger(__name__)


def _transforms(declaration: ModelDeclaration) -> tuple[Any, Any]:
    from monai import transforms as mt

    pre = declaration.preprocessing
    assert pre is not None
    steps: list[Any] = [mt.EnsureChannelFirstd(keys="image"), mt.Orientationd(keys="image", axcodes=pre.orientation)]
    if pre.spacing_mm is not None:
        steps.append(mt.Spacingd(keys="image", pixdim=list(pre.spacing_mm), mode="bilinear"))
    if pre.window_min is not None and pre.window_max is not None:
        steps.append(
            mt.ScaleIntensityRanged(
                keys="image", a_min=pre.window_min, a_max=pre.window_max, b_min=0.0, b_max=1.0, clip=pre.clip
            )
        )
    if pre.normalize != "none":
        steps.append(mt.NormalizeIntensityd(keys="image", nonzero=pre.normalize == "nonzero"))
    steps.append(mt.EnsureTyped(keys="image"))
    preprocessing = mt.Compose(steps)
    post = declaration.postprocessing
    after: list[Any] = []
    if post.activation != "none":
        after.append(
            mt.Activationsd(keys="pred", softmax=post.activation == "softmax", sigmoid=post.activation == "sigmoid")
        )
    after.append(
        mt.Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False, to_tensor=True)
    )
    if post.discretize == "argmax":
        after.append(mt.AsDiscreted(keys="pred", argmax=True))
    else:
        after.append(mt.AsDiscreted(keys="pred", threshold=post.threshold))
    if post.largest_component:
        labels = sorted(declaration.labels) or None
        after.append(mt.KeepLargestConnectedComponentd(keys="pred", applied_labels=labels, independent=True))
    return preprocessing, mt.Compose(after)


class _ExportedRuntime:
    """Shared by TorchScript and ONNX: declared transforms around a predictor."""

    def __init__(self, declaration: ModelDeclaration, device: Device) -> None:
        self.declaration = declaration
        self.device = device
        assert declaration.preprocessing is not None
        if not declaration.preprocessing.slices:
            self.preprocessing, self.postprocessing = _transforms(declaration)
        self.memory_bytes = declaration.weights_path().stat().st_size
        self.compiled: Any = None
        self.runtime_used = "onnxruntime" if declaration.type == "onnx" else "torch"

    def _compile(self) -> None:
        """Run the network by the declared ``runtime`` when the conversion agrees with the
        original (:mod:`.compiled`); the window batch is the declared one (a 2D model's
        ``slice_batch`` slices of ``matrix``; a 3D model's ``sw_batch_size`` windows of ``roi_size``)."""
        from ainode_sdk.declared.compiled import compile_model
        from ainode_sdk.declared.spec import file_sha256

        pre = self.declaration.preprocessing
        assert pre is not None
        if self.declaration.runtime == "native" or self.device != "cpu":
            return
        if pre.slices and pre.matrix is None:
            self.runtime_used += " (no declared matrix: no fixed window to compile for)"
            return
        window = (pre.sw_batch_size, 1, *pre.roi_size)
        if pre.slices and pre.matrix:
            window = (pre.slice_batch, 1, *pre.matrix)
        scale = pre.scale_intensity if pre.slices else None
        sha = self.declaration.sha256 or file_sha256(self.declaration.weights_path())
        compiled, why = compile_model(self.declaration, window, sha, (scale.b_min, scale.b_max) if scale else (0, 1))
        if compiled is None:
            logger.warning("model %s runs on %s: %s", self.declaration.path.name, self.runtime_used, why)
            self.runtime_used += f" ({why})"
            return
        logger.info("model %s runs on %s", self.declaration.path.name, why)
        self.compiled, self.runtime_used = compiled, why

    def _release(self) -> None:
        if self.compiled is not None:
            self.compiled.release()  # the compiled runtime's working memory, not held through post-processing

    def predict(self, batch: Any) -> Any:
        raise NotImplementedError

    def infer(self, volume: Volume) -> tuple[npt.NDArray[np.int32], dict[str, float]]:
        """Labels ``(slices, rows, columns)`` on the volume's own grid, and seconds per stage."""
        import torch
        from monai.inferers import sliding_window_inference

        pre = self.declaration.preprocessing
        assert pre is not None
        if pre.slices:
            return self._infer_slices(volume)
        t: dict[str, float] = {}
        start = time.perf_counter()
        data = self.preprocessing({"image": to_metatensor(volume)})
        t["preprocess_s"] = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            pred = sliding_window_inference(
                data["image"][None], roi_size=list(pre.roi_size), sw_batch_size=pre.sw_batch_size,
                predictor=self.predict, overlap=pre.overlap, mode=pre.mode,
            )  # fmt: skip
        data["pred"] = pred[0]
        self._release()
        t["inference_s"] = time.perf_counter() - start
        start = time.perf_counter()
        labels = run_postprocessing(self.postprocessing, data)["pred"]
        array = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
        t["postprocess_s"] = time.perf_counter() - start
        return from_monai(np.rint(array[0]).astype(np.int32)), t

    def _infer_slices(self, volume: Volume) -> tuple[npt.NDArray[np.int32], dict[str, float]]:
        """A 2D model (``preprocessing.slices``): the volume's axial slices in stored orientation,
        intensities scaled, resampled in-plane to the declared matrix, ``slice_batch`` slices per
        call (MONAI's ``SliceInferer``), the output resampled back and discretized."""
        import torch
        from monai import transforms as mt
        from monai.inferers import SliceInferer

        pre, post = self.declaration.preprocessing, self.declaration.postprocessing
        assert pre is not None
        t: dict[str, float] = {}
        start = time.perf_counter()
        image: Any = torch.from_numpy(np.ascontiguousarray(volume.voxels, dtype=np.float32))[None]  # (1, slices, r, c)
        if pre.scale_intensity is not None:
            s = pre.scale_intensity
            image = mt.ScaleIntensityRange(s.a_min, s.a_max, s.b_min, s.b_max, clip=s.clip)(image)
        slices, rows, columns = volume.voxels.shape
        matrix = tuple(pre.matrix) if pre.matrix is not None else (rows, columns)
        if matrix != (rows, columns):
            image = mt.Resize((slices, *matrix), mode="bilinear")(image)
        t["preprocess_s"] = time.perf_counter() - start
        start = time.perf_counter()
        inferer = SliceInferer(spatial_dim=0, roi_size=matrix, sw_batch_size=pre.slice_batch, progress=False)
        with torch.no_grad():
            pred: Any = inferer(torch.as_tensor(image)[None], self.predict)[0]  # (channels, slices, *matrix)
        self._release()
        t["inference_s"] = time.perf_counter() - start
        start = time.perf_counter()
        if post.activation != "none":
            pred = mt.Activations(sigmoid=post.activation == "sigmoid", softmax=post.activation == "softmax")(pred)
        if matrix != (rows, columns):
            pred = mt.Resize((slices, rows, columns), mode="bilinear")(pred)
        if post.discretize == "argmax":
            labels = mt.AsDiscrete(argmax=True)(channels_innermost(pred))
        else:
            labels = mt.AsDiscrete(threshold=post.threshold)(pred[:1])
        if post.largest_component:
            labels = mt.KeepLargestConnectedComponent(applied_labels=sorted(self.declaration.labels) or None)(labels)
        array = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
        t["postprocess_s"] = time.perf_counter() - start
        return np.rint(array[0]).astype(np.int32), t


class TorchScriptRuntime(_ExportedRuntime):
    """A TorchScript export, loaded once with ``torch.jit.load(path).eval()``."""

    def __init__(self, declaration: ModelDeclaration, device: Device) -> None:
        import torch

        super().__init__(declaration, device)
        self._compile()  # first: the original is not loaded at all when the compiled network is used
        self.module: Any = None
        if self.compiled is None:
            try:
                self.module = torch.jit.load(str(declaration.weights_path()), map_location=_torch_device(device)).eval()
            except (RuntimeError, ValueError) as exc:
                raise ModelError(f"TorchScript {declaration.path.name}: {exc}") from exc

    def predict(self, batch: Any) -> Any:
        """The module's output for a batch ``(n, channels, x, y, z)``."""
        import torch

        if self.compiled is not None:
            return self.compiled(batch)

        batch = batch.to(_torch_device(self.device))
        if self.declaration.half_precision and self.device == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                return self.module(batch).float()
        return self.module(batch)


class OnnxRuntime(_ExportedRuntime):
    """An ONNX model in onnxruntime (its CUDA provider on a GPU when installed)."""

    def __init__(self, declaration: ModelDeclaration, device: Device) -> None:
        import onnxruntime as ort

        super().__init__(declaration, device)
        self._compile()  # first: the original is not loaded at all when the compiled network is used
        self.session: Any = None
        if self.compiled is not None:
            return
        providers = ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(declaration.weights_path()), providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for a bad model
            raise ModelError(f"ONNX {declaration.path.name}: {exc}") from exc
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, batch: Any) -> Any:
        """The model's output for a batch ``(n, channels, x, y, z)``."""
        import torch

        if self.compiled is not None:
            return self.compiled(batch)

        out = self.session.run(None, {self.input_name: batch.detach().cpu().numpy().astype(np.float32)})[0]
        return torch.from_numpy(out)


def _torch_device(device: Device) -> str:
    return "cuda:0" if device == "cuda" else device
