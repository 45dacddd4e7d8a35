#!/usr/bin/env python
"""Write any registered dataset as COCO detection JSON.

Examples::

    # the Lung-PET-CT-Dx DICOM slices (file names stay .dcm; the coco: loader reads them back)
    tools/convert_to_coco.py --dataset lung_pet_ct_dx_all --output lpcd.json
    # a split exactly as a training config makes it (DATASETS.ROOT / SPLIT_SEED / SPLIT_FRACTIONS)
    tools/convert_to_coco.py --config-file configs/LungPet/mdkd_faster_rcnn_R18_demo.yaml \\
        --dataset lung_pet_ct_dx_test --output lpcd_test.json DATASETS.SPLIT_SEED 3
    tools/convert_to_coco.py --dataset deeplesion_sample_lung_train --root /data --output dl.json
    tools/convert_to_coco.py --dataset coco:/data/ann.json:/data/images --output copy.json

Built-in names are registered for the data root and split settings of ``--config-file`` with
its ``KEY VALUE`` overrides (``DATASETS.ROOT``, ``DATASETS.SPLIT_SEED``,
``DATASETS.SPLIT_FRACTIONS``), so a split matches the one that config trains on; ``--root``
overrides the root (default ``DATASETS.ROOT``, else ``$MDKD_DATASETS``). The JSON comes from
:func:`mdkd_det.data.datasets.coco.records_to_coco_dict`: boxes ``[x, y, w, h]`` px, annotation
ids from 1, image ids kept when they are integers, category ids mapped back to the source ids
when unambiguous. ``--relative-to DIR`` writes image paths relative to ``DIR`` (default: as
stored in the records). DICOM (``.dcm``) and 16-bit PNG file names load back through
``coco:<json>:<image_dir>`` (the loader picks the reader from the file). Exit status 2 with a
one-line message on bad input (``DatasetError``, ``ConfigError``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: Optional[List[str]] = None) -> int:
    """Run the converter; returns the exit status (0 ok, 2 bad dataset or config)."""
    from mdkd_det.config import get_cfg
    from mdkd_det.data.catalog import DatasetCatalog, MetadataCatalog
    from mdkd_det.data.datasets import records_to_coco_dict, register_builtin
    from mdkd_det.utils.env import dataset_root
    from mdkd_det.utils.errors import MdkdError

    doc = __doc__.split("\n\n")
    ap = argparse.ArgumentParser(description=doc[0], epilog="\n\n".join(doc[1:3]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, help="registered name or coco:<json>:<image_dir>")
    ap.add_argument("--config-file", default="", metavar="FILE",
                    help="training config whose DATASETS.ROOT / SPLIT_SEED / SPLIT_FRACTIONS to use")
    ap.add_argument("--root", default=None, help="data root (default DATASETS.ROOT, else $MDKD_DATASETS)")
    ap.add_argument("--output", required=True, help="COCO JSON to write")
    ap.add_argument("--relative-to", default=None,
                    help="write image file names relative to this folder")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = ap.parse_args(argv)
    try:
        cfg = get_cfg()
        if args.config_file:
            cfg.merge_from_file(args.config_file)
        if args.opts:
            cfg.merge_from_list(args.opts)
        register_builtin(args.root if args.root is not None else dataset_root(cfg),
                         split_seed=int(cfg.DATASETS.SPLIT_SEED),
                         split_fractions=tuple(cfg.DATASETS.SPLIT_FRACTIONS))
        records = DatasetCatalog.get(args.dataset)
        coco = records_to_coco_dict(records, MetadataCatalog.get(args.dataset),
                                    file_name_root=args.relative_to)
    except MdkdError as e:
        print(f"convert_to_coco: {e}", file=sys.stderr)
        return 2
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(coco, f)
    print(f"wrote {args.output}: {len(coco['images'])} images, {len(coco['annotations'])} boxes, "
          f"{len(coco['categories'])} categories")
    return 0


if __name__ == "__main__":
    sys.exit(main())
