"""Chains of model versions v1 -> v2 -> ... -> vK (``fct-versions``, ``make <dataset>-versions``).

:mod:`~fct_lightning.versions.plan` reads a version plan and lays out the fct-fit runs that train it;
:mod:`~fct_lightning.versions.matrix` computes the compatibility matrices on the evaluation split;
:mod:`~fct_lightning.versions.report` writes them as markdown and heat-maps.
"""

from fct_lightning.versions.matrix import evaluate_versions, matrices, scores
from fct_lightning.versions.plan import Plan, Step, Version, load_plan, parse_plan, plan_steps, run_steps, versions_dir
from fct_lightning.versions.report import markdown, update_rows, write_versions_report

__all__ = ["Plan", "Step", "Version", "evaluate_versions", "load_plan", "markdown", "matrices", "parse_plan",
           "plan_steps", "run_steps", "scores", "update_rows", "versions_dir", "write_versions_report"]
