"""Modeling: registries, backbones, fusion, detectors, domain-adversarial heads."""

from .registry import BACKBONE_REGISTRY, META_ARCH_REGISTRY  # noqa: F401
from . import backbone, fusion, meta_arch, seg  # noqa: F401  (register built-ins)
from .build import backbone_init_key, build_model  # noqa: F401,E402


def __getattr__(name):  # PEP 562: deprecated DETECTOR_REGISTRY (issue 14), one release
    if name == "DETECTOR_REGISTRY":
        from . import registry

        return registry.DETECTOR_REGISTRY
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
