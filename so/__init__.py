"""SO: few-shot adaptation of CLIP with Sparse Optimization. `from so import SO` needs torch alone.

so.optim (the optimizer) -> so.rule (the rule for one tensor, the reference) and so.batched (the
fast path); so.draws and so.flat_index serve both. The CLIP side (so.model, so.methods, so.lora)
needs the `clip` extra; so.runs (run folders) needs only the standard library, so `import so`
imports nothing until a name is asked for.
"""
__all__ = ["SO", "so_update", "step_in_backward"]


def __getattr__(name):  # PEP 562: torch is imported when SO is first used, not by `import so.runs`
    if name in ("SO", "step_in_backward"):
        from so import optim

        return getattr(optim, name)
    if name == "so_update":
        from so.rule import so_update

        return so_update
    raise AttributeError(f"module 'so' has no attribute {name!r}")
