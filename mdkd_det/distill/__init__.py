"""Stage-3 distillation: taps (capture), pure losses, schedules, adapters, distiller, mixin."""

from . import adapters, cls_adapter, rfdetr_adapter  # noqa: F401  (register the built-in KD adapters)
