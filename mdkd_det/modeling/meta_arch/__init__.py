"""Model builders (registered in ``META_ARCH_REGISTRY``): detectors and the image classifier."""

from . import classifier, faster_rcnn, rfdetr, segmenter  # noqa: F401
