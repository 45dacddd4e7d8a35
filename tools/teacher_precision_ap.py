#!/usr/bin/env python
"""AP of a trained teacher with the ``FROZEN_TEACHER`` speed switches on vs off (issue 11).

The switches change how a frozen teacher is run (:class:`mdkd_det.modeling.frozen_teacher.
TeacherRuntime`); FOLD_BN and CHANNELS_LAST are exact to fp32 rounding, BF16 is not. The issue
admits bf16 only if the teacher's AP moves by less than 0.2 points. This tool evaluates one
trained stage (its ``config.yaml`` and checkpoint) three times on ``--dataset``:

``fp32``            as trained;
``exact``           FOLD_BN + CHANNELS_LAST + INFERENCE_MODE;
``exact+bf16``      the same plus bf16 autocast;
``int8`` (``--int8``)  post-training static int8 quantisation of the backbone (``torch.ao``
                    FX graph mode, x86 backend, per-channel weights; calibrated on the first
                    ``--calib-images`` images of the stage's ``DATASETS.TRAIN[0]`` at test size).
                    A measurement for a possible ``FROZEN_TEACHER.INT8`` switch (not in the
                    package: docs/benchmarks.md "int8 teacher"); plain detectors only.

The switches act on the backbone, where the KD losses read the teacher: a plain detector's
``backbone.forward`` runs inside the runtime (its maps cast back to fp32, heads in fp32, so box
decoding is not done in bf16); a joint teacher is rebuilt with ``FROZEN_TEACHER.*`` set, so its
``FusionBackbone`` runs its frozen teachers with them (fusion ops and heads in fp32).

    python tools/teacher_precision_ap.py --stage-dir RUN/target_teacher --dataset lungct_disjoint_val

Prints one line per variant (COCO AP / AP50 in percent, faster-coco-eval) and writes them as
JSON with ``--json``. Raises the usual one-line errors for a missing stage or dataset.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from mdkd_det.config import get_cfg  # noqa: E402
from mdkd_det.engine.defaults import do_test  # noqa: E402
from mdkd_det.modeling.build import build_model  # noqa: E402
from mdkd_det.modeling.frozen_teacher import TeacherRuntime  # noqa: E402
from mdkd_det.utils.checkpoint_io import load_model_state  # noqa: E402
from mdkd_det.utils.device import cpu_has_native_bf16  # noqa: E402

VARIANTS = {
    "fp32": None,
    "exact": TeacherRuntime(fold_bn=True, channels_last=True, inference_mode=True),
    "exact+bf16": TeacherRuntime(fold_bn=True, channels_last=True, inference_mode=True, bf16=True),
}


def _runtime_backbone(model: torch.nn.Module, rt: TeacherRuntime) -> None:
    """Run ``model.backbone`` inside ``rt`` (prepared in place); its maps leave as fp32."""
    rt.prepare(model)
    forward = model.backbone.forward

    def run(x):
        with rt.context():
            maps = forward(rt.input(x))
        return type(maps)((k, v.float().contiguous()) for k, v in maps.items())

    model.backbone.forward = run


def _int8_backbone(model: torch.nn.Module, cfg, calib_images: int) -> None:
    """Quantise ``model.backbone.body`` in place to int8 (``torch.ao.quantization`` FX
    post-training static quantisation, x86 backend), calibrated by running ``model`` (eval) on
    the first ``calib_images`` images of ``cfg.DATASETS.TRAIN[0]`` (test-time mapper)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from mdkd_det.data.build import build_detection_test_loader, get_dataset_records

    torch.backends.quantized.engine = "x86"
    body = model.backbone.body
    example = torch.zeros(1, 3, int(cfg.INPUT.MAX_SIZE_TEST), int(cfg.INPUT.MAX_SIZE_TEST))
    model.backbone.body = prepare_fx(body, get_default_qconfig_mapping("x86"), example_inputs=(example,))
    name = cfg.DATASETS.TRAIN[0]
    records = get_dataset_records(cfg, [name])[:calib_images]
    with torch.no_grad():
        for batch in build_detection_test_loader(cfg, name, records=records, batch_size=4):
            model([d["image"] for d in batch])
    model.backbone.body = convert_fx(model.backbone.body)


def evaluate(stage_dir: str, dataset: str, weights: str = "model_best.pth", out_dir: str = "",
             int8_calib_images: int = 0) -> dict:
    """``{variant: {"AP": float, "AP50": float}}`` of the stage in ``stage_dir`` on ``dataset``;
    with ``int8_calib_images`` > 0 also the ``int8`` variant (plain detectors only)."""
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(stage_dir, "config.yaml"))
    cfg.DATASETS.TEST = (dataset,)
    cfg.TEST.VIS_NUM = 0
    path = os.path.join(stage_dir, weights)
    fusion = cfg.MODEL.BACKBONE.NAME == "fusion"
    results = {}
    base = build_model(cfg)
    base.load_state_dict(load_model_state(path))
    for name, rt in VARIANTS.items():
        if rt is not None and rt.bf16 and not cpu_has_native_bf16():
            print(f"{name}: skipped (this CPU has no native bf16; emulated bf16 is ~500x slower, D11.1)")
            continue
        if fusion and rt is not None:  # the FusionBackbone applies FROZEN_TEACHER.* itself
            c = cfg.clone()
            c.FROZEN_TEACHER.FOLD_BN, c.FROZEN_TEACHER.CHANNELS_LAST = rt.fold_bn, rt.channels_last
            c.FROZEN_TEACHER.INFERENCE_MODE, c.FROZEN_TEACHER.BF16 = rt.inference_mode, rt.bf16
            model = build_model(c)
            model.load_state_dict(load_model_state(path))
        else:
            model = copy.deepcopy(base)
        model.eval()
        if rt is not None and not fusion:
            _runtime_backbone(model, rt)
        out = os.path.join(out_dir or os.path.join(stage_dir, "teacher_precision"), name)
        bbox = do_test(cfg, model, output_dir=out)[dataset]["bbox"]
        results[name] = {"AP": float(bbox["AP"]), "AP50": float(bbox["AP50"])}
        print(f"{name}: AP {results[name]['AP']:.2f} AP50 {results[name]['AP50']:.2f}", flush=True)
    if int8_calib_images > 0 and not fusion:
        model = copy.deepcopy(base).eval()
        _int8_backbone(model, cfg, int8_calib_images)
        out = os.path.join(out_dir or os.path.join(stage_dir, "teacher_precision"), "int8")
        with torch.inference_mode():
            bbox = do_test(cfg, model, output_dir=out)[dataset]["bbox"]
        results["int8"] = {"AP": float(bbox["AP"]), "AP50": float(bbox["AP50"])}
        print(f"int8: AP {results['int8']['AP']:.2f} AP50 {results['int8']['AP50']:.2f}", flush=True)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage-dir", required=True, help="a pipeline stage folder (config.yaml + weights)")
    ap.add_argument("--dataset", required=True, help="registered dataset name to evaluate on")
    ap.add_argument("--weights", default="model_best.pth", help="checkpoint file in --stage-dir")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument("--int8", action="store_true", help="also the int8 variant (plain detectors)")
    ap.add_argument("--calib-images", type=int, default=32, help="int8 calibration images")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = evaluate(args.stage_dir, args.dataset, args.weights,
                   int8_calib_images=args.calib_images if args.int8 else 0)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
