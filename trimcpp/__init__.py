"""trimcpp: keep the image rows a local LLaVA needs (TrimTokenator), so the first token comes sooner."""

from .selection import alignment_scores, available_backends, prune, split_budget

__all__ = ["alignment_scores", "available_backends", "prune", "split_budget"]
__version__ = "0.1.0"
