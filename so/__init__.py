"""SO: few-shot adaptation of CLIP with Sparse Optimization. `from so import SO` needs torch alone.

so.optim (the optimizer) -> so.rule (the rule for one tensor, the reference) and so.batched (the
fast path); so.draws and so.flat_index serve both. The CLIP side (so.model, so.methods, so.lora)
needs the `clip` extra.
"""
from so.optim import SO, step_in_backward
from so.rule import so_update

__all__ = ["SO", "so_update", "step_in_backward"]
