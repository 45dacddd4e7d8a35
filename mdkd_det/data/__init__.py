"""Data: catalog, readers, datasets, augmentation, mapper, samplers and loaders."""

from . import datasets  # noqa: F401  (registers the built-in names and coco:<json>:<dir> with the catalog)
from .build import build_detection_test_loader, build_detection_train_loader, get_dataset_records
from .catalog import DatasetCatalog, MetadataCatalog
from .mapper import DatasetMapper

__all__ = ["DatasetCatalog", "MetadataCatalog", "DatasetMapper", "build_detection_train_loader",
           "build_detection_test_loader", "get_dataset_records"]
