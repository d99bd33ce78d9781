"""SO: few-shot adaptation of CLIP with Sparse Optimization. `from so import SO` needs torch alone.

The package has three layers, each importing only those below it:
- so.files: atomic writes and the run-folder lock (standard library), shared with datasets/;
- the optimizer (torch only; what `pip install .` is for): so.optim (the SO class) -> so.rule (the
  rule for one tensor, the reference) and so.batched (the fast path); so.draws and so.flat_index
  serve both; so.sparse_grad computes the gradients SO reads, and only those, in backward;
- so.clip, the CLIP harness (the `clip` extra: open_clip, peft): models, what trains (methods), how it
  steps (optimizers), the runtime settings, the step, the trial's identity.
`import so` imports nothing until a name is asked for.
"""
__all__ = ["SO", "so_update", "step_in_backward"]


def __getattr__(name):  # PEP 562: torch is imported when SO is first used, not by `import so.files`
    if name in ("SO", "step_in_backward"):
        from so import optim

        return getattr(optim, name)
    if name == "so_update":
        from so.rule import so_update

        return so_update
    raise AttributeError(f"module 'so' has no attribute {name!r}")
