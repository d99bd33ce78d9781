"""How often SO updated each weight: per-entry counters read from the optimizer's state.

At step t SO moves every entry of U_t = S_{t-1} ∪ G_t (the kept set before the step and the gradient
support), so after each step U_t is read from state["kept"] of the previous step and state["support"].
Opt-in (count_updates=true): one int32 counter per trainable weight, 4 bytes per entry.
"""
import torch

from so.files import save_atomic


class UpdateCounts:
    def __init__(self, optimizer, names):
        """`names` maps each parameter of the SO `optimizer` to its name (as in named_parameters())."""
        self.optimizer = optimizer
        self.names = names
        self.counts = {p: torch.zeros(p.numel(), dtype=torch.int32, device=p.device) for p in names}
        self.kept = {p: torch.empty(0, dtype=torch.int64, device=p.device) for p in names}
        self.steps = {p: 0 for p in names}

    @torch.no_grad()
    def update(self):
        """Count the entries each parameter's latest step moved; call once after every iteration."""
        for p, counts in self.counts.items():
            state = self.optimizer.state.get(p, {})
            if "support" not in state:
                raise ValueError(f"{self.names[p]}: no SO sparse state (count_updates needs method=so "
                                 "without dense groups)")
            if state["step"] == self.steps[p]:
                continue  # no step this iteration (no gradient)
            if state["step"] != self.steps[p] + 1:
                raise RuntimeError(f"{self.names[p]}: UpdateCounts.update() missed a step")
            moved = torch.cat([self.kept[p], state["support"]]).unique()
            counts[moved] += 1
            self.kept[p], self.steps[p] = state["kept"].clone(), state["step"]

    def save(self, path):
        """{name: int32 counts shaped like the parameter} -> `path`."""
        save_atomic({self.names[p]: c.view(p.shape).cpu() for p, c in self.counts.items()}, path)
