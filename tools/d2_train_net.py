#!/usr/bin/env python
"""Train and/or evaluate a detectron2 model on our datasets, with MDKD (detectron2's
``tools/train_net.py`` conventions: ``--config-file``, ``--eval-only``, ``--num-gpus``,
``--resume``, trailing ``KEY VALUE`` opts). Needs detectron2 (see README, "detectron2").

Examples: the MDKD flow on LungCT (README "detectron2" section)::

    # 1. teachers: a detectron2 target teacher (and/or our Stage-1 teachers, tools/train_net.py)
    tools/d2_train_net.py --config-file configs/Detectron2/faster_rcnn_R18_FPN_lungct.yaml
    # 2. joint teacher: FusionBackbone over the frozen teachers
    tools/d2_train_net.py --config-file configs/Detectron2/mdkd_joint_teacher_R18_lungct.yaml \\
        FUSION.TEACHER_FORMATS "('d2',)" FUSION.TEACHERS "('output/d2_lungct/target_teacher/model_final.pth',)" \\
        FUSION.TEACHER_CONFIGS "('configs/Detectron2/faster_rcnn_R18_FPN_lungct.yaml',)"
    # 3. student distilled from the joint teacher
    tools/d2_train_net.py --config-file configs/Detectron2/mdkd_student_R18_lungct.yaml
    # evaluate any checkpoint
    tools/d2_train_net.py --config-file CFG --eval-only MODEL.WEIGHTS path/model_final.pth

COCO AP of ``DATASETS.TEST`` (detectron2's ``COCOEvaluator``) is printed and written to
``OUTPUT_DIR/inference/<dataset>/`` and ``OUTPUT_DIR/metrics.json``.
"""

import logging
import os
import sys
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

try:
    from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
    from detectron2.config import get_cfg  # noqa: E402
    from detectron2.engine import default_argument_parser, default_setup, launch  # noqa: E402
    from detectron2.evaluation import verify_results  # noqa: E402
    from detectron2.utils import comm  # noqa: E402
    from detectron2.utils.logger import setup_logger  # noqa: E402

    from mdkd_det.d2 import MDKDTrainer, add_mdkd_config, register_mdkd_datasets  # noqa: E402
    from mdkd_det.d2.config import merge_d2_file  # noqa: E402
except ImportError as _e:  # detectron2 is optional and not on PyPI: one line, not a traceback
    if __name__ == "__main__":
        if any(a in ("-h", "--help") for a in sys.argv[1:]):
            print(__doc__)
            sys.exit(0)
        print(f"d2_train_net: error: detectron2 is not importable ({_e}); install it from source "
              "(README, 'detectron2 (optional)'), or run the same MDKD without it: tools/train_net.py",
              file=sys.stderr)
        sys.exit(2)
    raise

logger = logging.getLogger("mdkd_det.tools.d2_train_net")


def setup(args):
    """detectron2 config with our keys, merged from ``--config-file`` and the opts."""
    cfg = add_mdkd_config(get_cfg())
    merge_d2_file(cfg, args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="mdkd_det", abbrev_name="mdkd")
    register_mdkd_datasets(cfg)
    return cfg


def main(args):
    cfg = setup(args)
    t0 = time.perf_counter()
    if args.eval_only:
        model = MDKDTrainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        res = MDKDTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
    else:
        trainer = MDKDTrainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        res = trainer.train()
    logger.info("wall time %.1f s", time.perf_counter() - t0)
    return res


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
