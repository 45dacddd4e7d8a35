"""The MDKD stage runner (baselines -> Stage 1 -> 2 -> 3 -> results)."""

from .runner import STAGES, PipelineRunner, run_pipeline

__all__ = ["STAGES", "PipelineRunner", "run_pipeline"]
