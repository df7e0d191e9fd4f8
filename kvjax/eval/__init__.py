"""Evaluation: long-context task generators (:mod:`kvjax.eval.tasks`) and scoring rules (:mod:`kvjax.eval.scoring`)."""
from kvjax.eval.tasks import TASKS, Example, format_prompt, get_task

__all__ = ["TASKS", "Example", "format_prompt", "get_task"]
