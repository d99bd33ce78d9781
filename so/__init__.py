"""SO: few-shot adaptation of CLIP with Sparse Optimization. `from so import SO` needs torch."""
from so.optim import SO, step_in_backward

__all__ = ["SO", "step_in_backward"]
