"""Detector builders (registered in ``DETECTOR_REGISTRY``)."""

from . import faster_rcnn, rfdetr  # noqa: F401
