"""Prefect glue: the pipeline flow, its served deployment, and building blocks for a team's own flows.

Nothing in the core imports this package; it imports the stages and the tracking package.
"""

from .blocks import evaluate_task, ingredient_task, soup_subflow, soup_task

__all__ = ["evaluate_task", "ingredient_task", "soup_subflow", "soup_task"]
