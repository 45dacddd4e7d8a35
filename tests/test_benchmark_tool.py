"""tools/benchmark.py: the statistics and the JSON keys, on hand-made per-round times (no timing)."""

import importlib.util
import os

import pytest

_spec = importlib.util.spec_from_file_location(
    "mdkd_benchmark_tool", os.path.join(os.path.dirname(__file__), "..", "tools", "benchmark.py"))
B = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(B)


def test_quartiles_and_per_round_ratios():
    assert B.quartiles([3.0]) == (3.0, 3.0, 3.0)
    assert B.quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    # round i of both steps shares the machine's load: ratios 2, 2, 2 despite a 10x drift
    med, iqr = B.ratio_stats([2.0, 20.0, 4.0], [1.0, 10.0, 2.0])
    assert med == 2.0 and iqr == [2.0, 2.0]


def _steps_raw():
    t = {"plain": [1.0, 2.0, 1.0], "kd": [1.3, 2.8, 1.4], "kd_off": [1.9, 3.8, 1.9],
         "teacher": [0.25, 0.6, 0.3], "teacher_off": [0.5, 1.2, 0.6],
         "joint": [1.2, 2.4, 1.3], "joint_off": [1.6, 3.0, 1.6],
         "kd_cached": [1.1, 2.0, 1.1], "kd_cache_miss": [1.5, 3.0, 1.5], "joint_cached": [1.05, 2.2, 1.1]}
    return {"times": t, "latency": {"student": [0.1, 0.1], "baseline": [0.1, 0.1]},
            "flops": {"plain": 10e9, "kd": 20e9, "joint": 15e9, "teacher": 8e9},
            "peak_gflops": {"float32": 100.0, "bfloat16": 400.0}, "teacher_bf16": False,
            "peak_mem_mb": 1000.0}


def test_summarize_uses_the_one_plain_step_as_denominator():
    out = B.summarize({"steps": _steps_raw()})
    assert out["kd_step_ratio"] == pytest.approx(1.4)  # ratios 1.3, 1.4, 1.4
    assert out["kd_step_ratio_iqr"] == pytest.approx([1.35, 1.4])
    assert out["joint_teacher_step_ratio"] == pytest.approx(1.2)  # 1.2, 1.2, 1.3
    assert out["kd_floor_ratio"] == pytest.approx(2.8 / 2.6)  # 1.04, 1.0769, 1.0769
    assert out["teacher_forward_speedup"] == pytest.approx(2.0)
    assert out["kd_step_cached_ratio"] == pytest.approx(1.1)  # 1.1, 1.0, 1.1
    assert out["kd_step_cache_miss_ratio"] == pytest.approx(1.5)
    assert out["joint_teacher_step_cached_ratio"] == pytest.approx(1.1)  # 1.05, 1.1, 1.1
    assert out["student_latency_ratio"] == 1.0
    assert out["plain_step_s"] == 1.0
    # FLOPs / median time / peak: plain 10 GFLOP / 1 s / 100 GFLOP/s
    assert out["step_fraction_of_peak"]["plain"] == pytest.approx(0.1)
    assert out["step_fraction_of_peak"]["kd"] == pytest.approx(20 / 1.4 / 100)
    assert out["teacher_fraction_of_peak"] == pytest.approx(8 / 0.3 / 100)
    assert out["peak_gflops_fp32"] == 100.0 and out["peak_gflops_bf16"] == 400.0


def test_scaling_row_and_table():
    joint = {"times": {"plain": [1.0, 1.0], "joint": [1.5, 1.7]}, "peak_mem_mb": 900.0, "base_mem_mb": 400.0}
    kd = {"times": {"plain": [1.0, 2.0], "kd": [1.5, 3.0], "teacher": [0.4, 0.8]},
          "peak_mem_mb": 1000.0, "base_mem_mb": 450.0}
    row = B.scaling_row(3, 256, joint, kd)
    assert row["joint_ratio"] == pytest.approx(1.6) and row["kd_ratio"] == pytest.approx(1.5)
    assert row["teacher_forward_ratio"] == pytest.approx(0.4)
    assert row["joint_step_mem_mb"] == 500.0 and row["kd_step_mem_mb"] == 550.0
    table = B.scaling_table([row])
    assert table.splitlines()[2].startswith("| 3 | 256 | 1.500 |")


def test_scaling_plot_writes_a_png(tmp_path):
    joint = {"times": {"plain": [1.0], "joint": [1.5]}, "peak_mem_mb": 900.0, "base_mem_mb": 400.0}
    kd = {"times": {"plain": [1.0], "kd": [1.5], "teacher": [0.4]}, "peak_mem_mb": 1000.0, "base_mem_mb": 450.0}
    rows = [B.scaling_row(n, px, joint, kd) for px in (256, 512) for n in (1, 3)]
    path = tmp_path / "scaling.png"
    B.scaling_plot(rows, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interleave_reverses_the_order_every_round():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    times = B._interleave(fns, iters=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("cba") + list("abc")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_peak_gflops_shrinks_the_matmul_to_its_time_budget(monkeypatch):
    sizes = []
    import torch

    def randn(*shape, **kw):
        sizes.append(shape[0])
        return torch.ones(*shape, **kw)

    monkeypatch.setattr(torch, "randn", randn)
    assert B.peak_gflops("float32", n=1024, repeats=2, budget_s=1e-9) > 0  # nothing fits: 256
    assert set(sizes) == {256}
