#!/usr/bin/env python
"""Train and/or evaluate a detector from a config (detectron2's ``tools/train_net.py`` conventions).

Examples::

    # train (the demo), then evaluate on DATASETS.TEST
    tools/train_net.py --config-file configs/LungCT/faster_rcnn_R18_FPN_demo.yaml
    # resume an interrupted run exactly
    tools/train_net.py --config-file CFG --resume
    # evaluate a checkpoint on any COCO dataset given by path
    tools/train_net.py --config-file CFG --eval-only --coco-json ANN.json --coco-images DIR \\
        MODEL.WEIGHTS model_final.pth OUTPUT_DIR out
    # 2 processes on one machine (gloo on CPU, NCCL on GPU)
    tools/train_net.py --config-file CFG --num-gpus 2
"""

import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mdkd_det.engine.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
