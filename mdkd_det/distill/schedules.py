"""Schedules of MDKD: curriculum factor cf, Con temperature t, beta ramp and adversarial lambda.

Small immutable callables, ``schedule(x) -> float``. The argument ``x`` is documented per class:

- *epoch* schedules (cf, t, beta) take a **0-based epoch count as a float** (epochs completed
  before the current one; a fractional value such as ``epoch + it / iters_per_epoch`` gives a
  per-iteration update) — decision A7 (float division, 0-based);
- :class:`AdversarialLambda` takes the **training progress** rho in [0, 1]
  (``global_step / planned_total_steps``, C4).

Reference values of the paper notes (C4, C20, C21, C22, C34) are unit tested.
:func:`build_schedule` builds one from a config name and keyword arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict

from ..utils.errors import ConfigError

__all__ = [
    "LinearCurriculum",
    "CosineCurriculum",
    "ConstantCurriculum",
    "TemperatureAnneal",
    "BetaRamp",
    "AdversarialLambda",
    "SCHEDULES",
    "build_schedule",
]


def _num(cls: str, name: str, value: float, *, minimum: float = None, positive: bool = False):
    """Validate a finite number (optionally >= minimum or > 0); raise ConfigError otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value >= minimum
    if ok and positive:
        ok = value > 0
    if not ok:
        bound = " >= %g" % minimum if minimum is not None else (" > 0" if positive else "")
        raise ConfigError(f"{cls}: {name} must be a finite number{bound}, got {value!r}")


def _x(cls: str, x: float) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{cls}: argument must be a number, got {x!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{cls}: argument must be finite, got {x!r}")
    return x


def _ramp(e: float, warmup: float, ramp: float) -> float:
    """``min(1, max(0, (e - warmup) / ramp))``; a zero ramp is a step at ``warmup``."""
    if ramp == 0:
        return 1.0 if e >= warmup else 0.0
    return min(1.0, max(0.0, (e - warmup) / ramp))


@dataclass(frozen=True)
class LinearCurriculum:
    """Linear curriculum factor, paper C22 (segmentation, Table 1).

    ``cf(e) = min(1, max(0, (e - warmup) / ramp)) * max_value``; ``e`` = 0-based epoch (float).
    Paper values: warmup 5, ramp 10 -> cf(5)=0, cf(6)=0.1, cf(10)=0.5, cf(15)=1.

    Raises:
        ConfigError: negative/non-finite ``warmup``, ``ramp`` or ``max_value``.
    """

    warmup: float = 5
    ramp: float = 10
    max_value: float = 1.0

    def __post_init__(self):
        for n in ("warmup", "ramp", "max_value"):
            _num(type(self).__name__, n, getattr(self, n), minimum=0)

    def __call__(self, epoch: float) -> float:
        return _ramp(_x("LinearCurriculum", epoch), self.warmup, self.ramp) * self.max_value


@dataclass(frozen=True)
class CosineCurriculum(LinearCurriculum):
    """Cosine curriculum factor for detection, paper C34 / decision A26 (same fields and
    validation as :class:`LinearCurriculum`, cosine-shaped ramp).

    ``cf(e) = 0 if e < warmup else max_value * 0.5 * (1 - cos(pi * min(1, (e - warmup)/ramp)))``;
    ``e`` = 0-based epoch (float). warmup 5, ramp 10 -> cf(6)=0.0245, cf(10)=0.5, cf(15)=1.

    Raises:
        ConfigError: negative/non-finite ``warmup``, ``ramp`` or ``max_value``.
    """

    def __call__(self, epoch: float) -> float:
        r = _ramp(_x("CosineCurriculum", epoch), self.warmup, self.ramp)
        return self.max_value * 0.5 * (1.0 - math.cos(math.pi * r))


@dataclass(frozen=True)
class ConstantCurriculum:
    """Constant factor, ``cf(x) = value`` for any x (classification cf, A26; literal det cf=1).

    Raises:
        ConfigError: non-finite or negative ``value``.
    """

    value: float = 1.0

    def __post_init__(self):
        _num("ConstantCurriculum", "value", self.value, minimum=0)

    def __call__(self, x: float = 0.0) -> float:
        _x("ConstantCurriculum", x)
        return float(self.value)


@dataclass(frozen=True)
class TemperatureAnneal:
    """Annealed temperature of L_Con (segmentation), paper C20, float division per A7.

    ``t(e) = max(floor, t1 * decay ** (e / every))``; ``e`` = 0-based epoch (float).
    Defaults: t(0)=2.0, t(5)=1.8, t(10)=1.62, t(20)=1.3122, t(50)=0.6974, t(65)=0.5084,
    t(70)=0.5. ``integer_division=True`` uses ``e // every`` (the other reading of A7).

    Raises:
        ConfigError: ``t1``/``every`` not > 0, ``floor`` < 0, ``decay`` not in (0, 1].
    """

    t1: float = 2.0
    floor: float = 0.5
    decay: float = 0.9
    every: float = 5
    integer_division: bool = False

    def __post_init__(self):
        c = type(self).__name__
        _num(c, "t1", self.t1, positive=True)
        _num(c, "floor", self.floor, minimum=0)
        _num(c, "every", self.every, positive=True)
        _num(c, "decay", self.decay, positive=True)
        if self.decay > 1:
            raise ConfigError(f"{c}: decay must be in (0, 1], got {self.decay!r}")

    def __call__(self, epoch: float) -> float:
        e = max(0.0, _x("TemperatureAnneal", epoch))
        k = (e // self.every) if self.integer_division else (e / self.every)
        return max(self.floor, self.t1 * self.decay**k)


@dataclass(frozen=True)
class BetaRamp:
    """Ramp of the Con weight beta (segmentation), paper C21 (shape = proposal: linear).

    ``beta(e) = start + (end - start) * clip((e - warmup) / ramp, 0, 1)``; ``e`` = 0-based epoch.
    Defaults: beta(5)=0.1, beta(10)=0.3, beta(15)=0.5.

    Raises:
        ConfigError: non-finite ``start``/``end``, negative ``warmup``/``ramp``.
    """

    start: float = 0.1
    end: float = 0.5
    warmup: float = 5
    ramp: float = 10

    def __post_init__(self):
        c = type(self).__name__
        _num(c, "start", self.start)
        _num(c, "end", self.end)
        _num(c, "warmup", self.warmup, minimum=0)
        _num(c, "ramp", self.ramp, minimum=0)

    def __call__(self, epoch: float) -> float:
        r = _ramp(_x("BetaRamp", epoch), self.warmup, self.ramp)
        return self.start + (self.end - self.start) * r


@dataclass(frozen=True)
class AdversarialLambda:
    """Domain-adversarial weight lambda(rho) = max_value * (2 / (1 + exp(-gamma * rho)) - 1),
    paper C4 (with ``max_value = 1``: the DANN schedule of Ganin & Lempitsky, ICML 2015, and
    Ganin et al., JMLR 2016).

    ``rho`` = training progress in [0, 1] (``global_step / planned_total_steps``, C4 proposal);
    values outside [0, 1] are clipped. gamma = 10, max_value = 1: lambda(0)=0,
    lambda(0.1)=0.4621, lambda(0.5)=0.9866, lambda(1)=0.9999. ``max_value`` < 1 bounds the
    schedule (``ADVERSARIAL.LAMBDA_MAX``, decision in docs/fidelity.md).

    Raises:
        ConfigError: ``gamma`` or ``max_value`` not a finite number >= 0.
    """

    gamma: float = 10.0
    max_value: float = 1.0

    def __post_init__(self):
        _num("AdversarialLambda", "gamma", self.gamma, minimum=0)
        _num("AdversarialLambda", "max_value", self.max_value, minimum=0)

    def __call__(self, progress: float) -> float:
        rho = min(1.0, max(0.0, _x("AdversarialLambda", progress)))
        return self.max_value * (2.0 / (1.0 + math.exp(-self.gamma * rho)) - 1.0)


SCHEDULES: Dict[str, Callable[..., Callable[[float], float]]] = {
    "linear": LinearCurriculum,
    "cosine": CosineCurriculum,
    "constant": ConstantCurriculum,
    "temperature": TemperatureAnneal,
    "beta": BetaRamp,
    "adversarial": AdversarialLambda,
}


def build_schedule(kind: str, **kw) -> Callable[[float], float]:
    """Build a schedule by name (``SCHEDULES``) with keyword arguments of its class.

    Example: ``build_schedule("cosine", warmup=5, ramp=10, max_value=1.0)``.
    Keyword names are matched case-insensitively (so lower-cased config sub-keys work).

    Raises:
        ConfigError: unknown ``kind`` (lists the known names), unknown keyword, bad value.
    """
    key = str(kind).lower()
    if key not in SCHEDULES:
        raise ConfigError(f"unknown schedule {kind!r}; known: {sorted(SCHEDULES)}")
    cls = SCHEDULES[key]
    fields = cls.__dataclass_fields__
    args = {}
    for k, v in kw.items():
        name = k.lower()
        if name not in fields:
            raise ConfigError(
                f"schedule {kind!r} ({cls.__name__}) has no argument {k!r}; "
                f"arguments: {list(fields)}"
            )
        args[name] = v
    return cls(**args)
