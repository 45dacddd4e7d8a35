#!/usr/bin/env python
"""Write any registered dataset as COCO detection JSON.

Usage::

    python tools/convert_to_coco.py --dataset lung_pet_ct_dx_all --output lpcd.json
    python tools/convert_to_coco.py --dataset deeplesion_sample_lung_train --root /data --output dl.json
    python tools/convert_to_coco.py --dataset coco:/data/ann.json:/data/images --output copy.json

Built-in names are registered for ``--root`` (default ``$MDKD_DATASETS``). The JSON comes from
:func:`mdkd_det.data.datasets.coco.records_to_coco_dict`: boxes ``[x, y, w, h]`` px, annotation
ids from 1, image ids kept when they are integers, category ids mapped back to the source ids
when unambiguous. ``--relative-to DIR`` writes image paths relative to ``DIR`` (default: as
stored in the records). Exit status 2 with a one-line message on bad input (``DatasetError``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    """Run the converter; returns the exit status (0 ok, 2 dataset error)."""
    from mdkd_det.data.catalog import DatasetCatalog, MetadataCatalog
    from mdkd_det.data.datasets import records_to_coco_dict, register_builtin
    from mdkd_det.utils.errors import DatasetError

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, help="registered name or coco:<json>:<image_dir>")
    ap.add_argument("--root", default=None, help="data root (default $MDKD_DATASETS)")
    ap.add_argument("--output", required=True, help="COCO JSON to write")
    ap.add_argument("--relative-to", default=None,
                    help="write image file names relative to this folder")
    args = ap.parse_args(argv)
    try:
        register_builtin(args.root)
        records = DatasetCatalog.get(args.dataset)
        coco = records_to_coco_dict(records, MetadataCatalog.get(args.dataset),
                                    file_name_root=args.relative_to)
    except DatasetError as e:
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
