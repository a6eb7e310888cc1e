"""``padmoe plan``: per-rank memory and communication of a Switch PAD-MoE run on a cluster (see planner.py)."""

from pad_moe.plan.planner import PlanError, PlanRequest, parse_bytes, plan, plan_main

__all__ = ["PlanError", "PlanRequest", "parse_bytes", "plan", "plan_main"]
