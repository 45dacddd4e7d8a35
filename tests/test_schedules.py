"""Tests for mdkd_det.distill.schedules: the reference values of paper_notes C4, C20-C22, C34."""

import pytest

from mdkd_det.distill.schedules import (
    AdversarialLambda,
    BetaRamp,
    ConstantCurriculum,
    CosineCurriculum,
    LinearCurriculum,
    TemperatureAnneal,
    build_schedule,
)
from mdkd_det.utils.errors import ConfigError

TOL = 1e-4


@pytest.mark.parametrize(
    "rho,value",
    [(0, 0.0), (0.05, 0.2449), (0.1, 0.4621), (0.2, 0.7616), (0.5, 0.9866), (1, 0.9999)],
)
def test_adversarial_lambda_reference(rho, value):
    assert AdversarialLambda()(rho) == pytest.approx(value, abs=TOL)
    # ADVERSARIAL.LAMBDA_MAX scales the whole schedule (bounded lambda)
    assert AdversarialLambda(max_value=0.1)(rho) == pytest.approx(0.1 * value, abs=TOL / 10)


def test_adversarial_lambda_bad_max_value():
    from mdkd_det.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="max_value"):
        AdversarialLambda(max_value=-0.5)


@pytest.mark.parametrize(
    "epoch,value", [(0, 0.0), (5, 0.0), (6, 0.1), (10, 0.5), (14, 0.9), (15, 1.0), (40, 1.0)]
)
def test_linear_curriculum_reference(epoch, value):
    assert LinearCurriculum(warmup=5, ramp=10)(epoch) == pytest.approx(value, abs=TOL)


@pytest.mark.parametrize(
    "epoch,value", [(0, 0.0), (4.9, 0.0), (6, 0.0245), (10, 0.5), (15, 1.0), (30, 1.0)]
)
def test_cosine_curriculum_reference(epoch, value):
    assert CosineCurriculum(warmup=5, ramp=10)(epoch) == pytest.approx(value, abs=TOL)


@pytest.mark.parametrize(
    "epoch,value",
    [(0, 2.0), (5, 1.8), (10, 1.62), (20, 1.3122), (50, 0.6974), (65, 0.5084), (70, 0.5)],
)
def test_temperature_anneal_reference(epoch, value):
    assert TemperatureAnneal()(epoch) == pytest.approx(value, abs=TOL)


def test_temperature_float_vs_integer_division():
    # A7: float division reaches the floor from epoch 66, integer division only from 70
    assert TemperatureAnneal()(66) == 0.5
    assert TemperatureAnneal(integer_division=True)(66) == pytest.approx(2 * 0.9**13, abs=TOL)
    assert TemperatureAnneal(integer_division=True)(7) == pytest.approx(1.8, abs=TOL)


@pytest.mark.parametrize("epoch,value", [(0, 0.1), (5, 0.1), (10, 0.3), (15, 0.5), (99, 0.5)])
def test_beta_ramp_reference(epoch, value):
    assert BetaRamp()(epoch) == pytest.approx(value, abs=TOL)


def test_max_value_and_constant():
    assert LinearCurriculum(max_value=0.5)(10) == pytest.approx(0.25)
    assert CosineCurriculum(max_value=2.0)(10) == pytest.approx(1.0)
    assert ConstantCurriculum(0.5)(123.0) == 0.5
    assert LinearCurriculum(warmup=5, ramp=0)(4.99) == 0.0
    assert LinearCurriculum(warmup=5, ramp=0)(5) == 1.0


def test_build_schedule():
    s = build_schedule("cosine", WARMUP=2, ramp=4)
    assert isinstance(s, CosineCurriculum) and s(4) == pytest.approx(0.5)
    assert build_schedule("adversarial", gamma=10)(0.1) == pytest.approx(0.4621, abs=TOL)
    assert build_schedule("temperature")(5) == pytest.approx(1.8, abs=TOL)
    with pytest.raises(ConfigError, match="known:.*cosine"):
        build_schedule("exponential")
    with pytest.raises(ConfigError, match="no argument 'rampp'"):
        build_schedule("linear", rampp=3)
    with pytest.raises(ConfigError, match="ramp"):
        build_schedule("linear", ramp=-1)
    with pytest.raises(ConfigError, match="decay"):
        TemperatureAnneal(decay=1.5)
