"""GaLore (Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection"):
AdamW whose moments live in a rank-r projection of each matrix's gradient.

Each step, a 2-D parameter's gradient G (m x n) is projected onto its top-r singular subspace P,
recomputed from the gradient every `update_proj_gap` steps: R = G Vh_r^T (m x r) when m >= n, else
U_r^T G (r x n). Adam's moments are kept for R; the normalised update is projected back and scaled
by `scale`; weight decay is decoupled (AdamW). Other parameters take a plain AdamW step.

The projection is pytorch-optimizer's GaLoreProjector (the SVD and both projections); the loop is
the official galore-torch AdamW's, whose step counter starts at 0, so the projection is recomputed at
steps 0, gap, 2 gap, ... exactly every `update_proj_gap` steps. pytorch-optimizer's own GaLore counts
from 1 (recomputing at steps 1, gap, 2 gap: the first interval is one step short), and the official
package imports bitsandbytes and transformers; hence this loop of 20 lines.
"""
import math

import torch


class GaLore(torch.optim.Optimizer):
    def __init__(self, params, lr, rank, update_proj_gap, scale, betas=(0.9, 0.999), eps=1e-6,
                 weight_decay=0.0):
        if type(rank) is not int or rank < 1:
            raise ValueError(f"rank={rank!r}: expected an integer >= 1.")
        if type(update_proj_gap) is not int or update_proj_gap < 1:
            raise ValueError(f"update_proj_gap={update_proj_gap!r}: expected an integer >= 1.")
        super().__init__(params, dict(lr=lr, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                                      betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def projector(self, p):
        """The projector of matrix `p` (None for other shapes, and before its first step)."""
        return self.state[p].get("projector")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    if p.dim() == 2:
                        state["projector"] = _projector()(rank=group["rank"], scale=group["scale"],
                                                             update_proj_gap=group["update_proj_gap"])
                if p.dim() == 2:
                    grad = state["projector"].project(grad, state["step"])
                if "exp_avg" not in state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
                if p.dim() == 2:
                    update = state["projector"].project_back(update)
                step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                p.add_(update, alpha=-step_size)
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


def _projector():
    """pytorch-optimizer's GaLoreProjector, imported at the first step (seconds of imports): a config
    is checked by building the optimizer, before any model exists."""
    from pytorch_optimizer.optimizer.utils.galore import GaLoreProjector

    return GaLoreProjector
