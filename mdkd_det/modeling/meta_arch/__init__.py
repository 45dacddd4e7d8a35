"""Detector builders (registered in ``DETECTOR_REGISTRY``)."""

from . import faster_rcnn, segmenter  # noqa: F401
