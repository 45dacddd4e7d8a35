"""Stage-3 distillation: taps (capture), pure losses, schedules, adapters, distiller, mixin."""
