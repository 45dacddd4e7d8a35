"""``DefaultPredictor``: one trained detector applied to CT slices (detectron2's counterpart).

Everything the evaluator does to an image is done here by the same code, so a slice predicted
here gets exactly the evaluator's detections:

- reading: :mod:`mdkd_det.data.io` (DICOM -> HU by the modality LUT, 16-bit PNG -> HU,
  JPEG/PNG -> grey), the reader chosen from the file by :func:`~mdkd_det.data.io.reader_for_path`;
- windowing and channel replication: the task's test mapper
  (:class:`~mdkd_det.data.DatasetMapper`: ``INPUT.WINDOW`` in HU, ``INPUT.CHANNELS``);
- normalisation (``MODEL.PIXEL_MEAN/STD``) and the *test* size (``INPUT.MIN/MAX_SIZE_TEST``):
  the model's own transform in eval mode (``TrainTestResizeTransform`` for Faster R-CNN, the
  fixed square ``MODEL.RFDETR.RESOLUTION`` for RF-DETR).

Source: detectron2 ``engine/defaults.py::DefaultPredictor`` (API shape only).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Union

import cv2
import numpy as np
import torch

from ..config import CfgNode
from ..data.io import hu_to_unit, reader_for_path
from ..modeling.build import build_model
from ..utils.errors import ConfigError, DatasetError
from .checkpointer import Checkpointer

__all__ = ["DefaultPredictor"]

#: ``kind`` values of :meth:`DefaultPredictor.__call__` for arrays.
ARRAY_KINDS = ("hu", "image", "unit")


class DefaultPredictor:
    """Build a detector from a config and weights and run it on single slices or batches.

    Args:
        cfg: a :class:`CfgNode`, a YAML path, or a model-zoo name
            (``"LungCT/mdkd_faster_rcnn_R18_cpu.yaml"``, :mod:`mdkd_det.model_zoo`). For a
            distilled student give the student's ``config.yaml`` (its ``KD.*`` keys are ignored:
            the student predicts alone) and its ``model_student.pth``.
        weights: checkpoint path; default ``cfg.MODEL.WEIGHTS``. ``model_final.pth``,
            ``model_best.pth``, ``model_student.pth`` (``{"model": state_dict}``) or a plain
            state dict; loaded strictly.
        device: ``"cpu"``/``"cuda"``; default ``MODEL.DEVICE``.
        score_thresh: drop detections scoring below this (default 0: keep what the model keeps,
            e.g. ``MODEL.ROI_HEADS.SCORE_THRESH_TEST``).

    Call:
        ``predictor(x, kind=None) -> {"boxes": FloatTensor[N, 4] xyxy in the input's pixels,
        "scores": FloatTensor[N], "labels": Int64Tensor[N] in 1..K (class index + 1, as
        torchvision; ``predictor.class_names[label - 1]`` is its name)}`` on the CPU, sorted by
        score (descending). ``x`` is one of:

        - a path (``str``/``os.PathLike``): DICOM (``.dcm`` or DICM magic), 16-bit PNG (HU =
          value - 32768, DeepLesion) or JPEG/PNG (already windowed, grey);
        - a dataset record dict (``file_name``, ``reader``, optional ``window``);
        - a numpy array / tensor ``[H, W]``: ``kind="hu"`` (HU; windowed with ``INPUT.WINDOW``),
          ``kind="image"`` (uint8 0..255, ``[H, W]`` or ``[H, W, 3]`` BGR as OpenCV reads), or
          ``kind="unit"`` (already windowed floats in [0, 1]). Default: ``"image"`` for uint8
          arrays, ``"hu"`` for every other dtype.

        :meth:`predict_batch` takes a list of such inputs and returns a list of such dicts.

    Raises:
        ConfigError: no weights (``MODEL.WEIGHTS`` empty: a predictor never runs a random
            model), a non-detection config, unknown array ``kind``.
        CheckpointError: missing or non-matching checkpoint (names the file).
        DatasetError: unreadable image (names the file), array of the wrong shape.
    """

    def __init__(self, cfg: Union[CfgNode, str, os.PathLike], weights: Optional[str] = None,
                 device: Optional[str] = None, score_thresh: float = 0.0) -> None:
        from ..model_zoo import load_config
        from ..tasks import get_task

        cfg = load_config(os.fspath(cfg)) if isinstance(cfg, (str, os.PathLike)) else cfg.clone()
        cfg.defrost()
        if weights is not None:
            cfg.MODEL.WEIGHTS = os.fspath(weights)
        if device is not None:
            cfg.MODEL.DEVICE = str(device)
        cfg.KD.ENABLED = False  # a distilled student predicts alone (its teacher is not needed)
        cfg.PIPELINE.ENABLED = False
        cfg.freeze()
        if not cfg.MODEL.WEIGHTS:
            raise ConfigError("MODEL.WEIGHTS is empty: DefaultPredictor needs trained weights "
                              "(model_final.pth, model_best.pth or model_student.pth)")
        task = get_task(cfg)
        if task.name != "detection":
            raise ConfigError(f"DefaultPredictor predicts boxes; the config's task is '{task.name}' "
                              f"(MODEL.META_ARCHITECTURE '{cfg.MODEL.META_ARCHITECTURE}')")
        self.cfg = cfg
        self.model = build_model(cfg)
        Checkpointer(self.model, cfg.OUTPUT_DIR, save_to_disk=False,
                     trust_checkpoints=cfg.MODEL.TRUST_CHECKPOINTS).load(cfg.MODEL.WEIGHTS, checkpointables=[])
        self.model.eval()  # eval mode = test size (INPUT.*_TEST), see TrainTestResizeTransform
        self.mapper = task.build_mapper(cfg, is_train=False)
        self.device = torch.device(cfg.MODEL.DEVICE)
        self.score_thresh = float(score_thresh)
        self.class_names = self._class_names(cfg)

    @staticmethod
    def _class_names(cfg: CfgNode) -> List[str]:
        from ..data.catalog import MetadataCatalog

        n = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
        for name in tuple(cfg.DATASETS.TEST) + tuple(cfg.DATASETS.TRAIN):
            try:
                classes = MetadataCatalog.get(name).get("thing_classes")
            except Exception:  # an unregistered name: fall back to generic names
                classes = None
            if classes and len(classes) == n:
                return list(classes)
        return [f"class_{i}" for i in range(n)] if n > 1 else ["lesion"]

    # --- input -> image tensor --------------------------------------------------------------
    def unit_image(self, x: Any, kind: Optional[str] = None) -> np.ndarray:
        """The windowed grey slice the model sees: float32 [H, W] in [0, 1] (see class doc).

        Raises:
            DatasetError: unreadable file (names it), array not [H, W] (or [H, W, 3] uint8).
            ConfigError: unknown ``kind``.
        """
        if isinstance(x, (str, os.PathLike)):
            path = os.fspath(x)
            return self.mapper.read({"file_name": path, "reader": reader_for_path(path)})
        if isinstance(x, dict):
            return self.mapper.read(x)
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        kind = kind or ("image" if arr.dtype == np.uint8 else "hu")
        if kind not in ARRAY_KINDS:
            raise ConfigError(f"DefaultPredictor: kind must be one of {ARRAY_KINDS}, got '{kind}'")
        if kind == "image" and arr.ndim == 3 and arr.shape[2] in (3, 4):
            arr = cv2.cvtColor(arr, cv2.COLOR_BGR2GRAY if arr.shape[2] == 3 else cv2.COLOR_BGRA2GRAY)
        if arr.ndim != 2:
            raise DatasetError(f"DefaultPredictor: expected one slice [H, W], got an array of shape {arr.shape}")
        if kind == "hu":
            return hu_to_unit(arr, *self.mapper.window)
        if kind == "image":
            return arr.astype(np.float32) / np.float32(255.0)
        return np.clip(arr.astype(np.float32), 0.0, 1.0)

    # --- prediction -------------------------------------------------------------------------
    @torch.inference_mode()
    def predict_batch(self, inputs: Sequence[Any], kind: Optional[str] = None) -> List[Dict[str, torch.Tensor]]:
        """Detections of each input (one model call for the whole batch); see the class doc."""
        images = [self.mapper.image_tensor(self.unit_image(x, kind)).to(self.device) for x in inputs]
        if not images:
            return []
        outputs = self.model(images)
        results = []
        for out in outputs:
            keep = out["scores"] >= self.score_thresh
            order = torch.argsort(out["scores"][keep], descending=True, stable=True)
            results.append({k: out[k][keep][order].detach().cpu() for k in ("boxes", "scores", "labels")})
        return results

    def __call__(self, x: Any, kind: Optional[str] = None) -> Dict[str, torch.Tensor]:
        return self.predict_batch([x], kind=kind)[0]
