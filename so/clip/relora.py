"""ReLoRA (Lialin et al., 2023, "ReLoRA: High-Rank Training Through Low-Rank Updates"): LoRA whose
factors are merged into the frozen weights and restarted every `reset_every` updates, so that the sum
of the low-rank updates can reach a high rank.

No well-kept package implements ReLoRA for arbitrary torch modules, so it is written here, on the
LoRA layers of so/clip/lora.py, in the order of the ReLoRA authors' training loop (Guitaricet/relora):
the update at the schedule's restart point (step k * reset_every, learning rate 0) comes first; right
after it (update k * reset_every + 1, k >= 1)
  1. merge: W += B A * scaling, for every adapter;
  2. re-initialise A (kaiming-uniform, a = sqrt(5)) and B (zero), as at the start;
  3. magnitude-prune the factors' Adam moments: in each moment tensor, the entries whose magnitude is
     at or below its `prune_ratio` quantile become zero (1: a full reset);
then the learning rate warms up again, linearly over `restart_warmup` updates (the jagged cosine).

ReLoRA's code prunes the two moments independently (`prune_together=False`). Then an entry can keep
its first moment m and lose its second v; at the next step A's gradient is zero (B = 0), so Adam's
update there is m / eps, which on CLIP's factors moves A by thousands at once. `prune_together=True`
(the default here) also zeroes m wherever v was pruned.

The restarts belong to what trains (method=relora): `Restarts` counts the updates of whatever optimizer
steps the factors (a post-step hook) and prunes its moments, so any optimizer that keeps Adam's
exp_avg and exp_avg_sq per factor works (adamw, the preset's; adam; galore).
"""
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from so.clip.config import ConfigError

ADAPTER = "default"  # the adapter name peft gives so/clip/lora.py's adapters


@torch.no_grad()
def magnitude_prune_(tensor, ratio):
    """Zero, in place, the entries of `tensor` whose magnitude is at or below its `ratio` quantile."""
    if ratio > 0:
        magnitude = tensor.abs()
        threshold = torch.quantile(magnitude.flatten().float(), ratio).to(tensor.dtype)
        tensor.mul_(magnitude > threshold)


def jagged_cosine(step, total, reset_every, restart_warmup, floor):
    """The learning-rate factor at `step`: the harness's cosine from 1 down to `floor` over `total`
    steps; from each restart point (step k * reset_every, k >= 1) a linear warm-up from 0 over
    `restart_warmup` steps, to the cosine's value where the warm-up ends (ReLoRA's cosine_restarts)."""
    cosine = lambda s: floor + (1 - floor) * (1 + math.cos(math.pi * min(s, total) / total)) / 2  # noqa: E731
    restarts, into = divmod(step, reset_every)
    if restarts >= 1 and into < restart_warmup:
        return into / restart_warmup * cosine(restarts * reset_every + restart_warmup)
    return cosine(step)


class Restarts:
    """ReLoRA's merge, re-initialisation and moment pruning of LoRA `adapters` (peft LoRA layers) after
    update k * reset_every + 1, k >= 1, counted by a post-step hook on `optimizer` (any optimizer that
    keeps Adam's exp_avg and exp_avg_sq per factor), and its jagged cosine (`scheduler`)."""

    def __init__(self, adapters, optimizer, reset_every, restart_warmup, prune_ratio, prune_together=True):
        check_restarts(reset_every, restart_warmup, prune_ratio)
        self.adapters, self.optimizer = list(adapters), optimizer
        self.reset_every, self.restart_warmup, self.prune_ratio = reset_every, restart_warmup, prune_ratio
        self.prune_together = prune_together
        self.updates = 0  # optimizer steps taken
        self.resets = 0
        optimizer.register_step_post_hook(self.after_step)

    def after_step(self, optimizer, args, kwargs):
        self.updates += 1
        if self.updates > self.reset_every and (self.updates - 1) % self.reset_every == 0:
            self.reset()

    @torch.no_grad()
    def reset(self):
        """Merge every adapter into its frozen weight, re-initialise it, prune its moments."""
        for layer in self.adapters:
            layer.base_layer.weight += layer.get_delta_weight(ADAPTER)
            layer.reset_lora_parameters(ADAPTER, init_lora_weights=True)
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state[p]
                if "exp_avg" not in state:
                    continue
                magnitude_prune_(state["exp_avg"], self.prune_ratio)
                magnitude_prune_(state["exp_avg_sq"], self.prune_ratio)
                if self.prune_together:
                    state["exp_avg"].mul_(state["exp_avg_sq"] != 0)
        self.resets += 1

    def scheduler(self, total, eta_min):
        """The jagged cosine over `total` steps, down to the learning rate `eta_min`."""
        return LambdaLR(self.optimizer, [lambda step, floor=eta_min / g["lr"]: jagged_cosine(
            step, total, self.reset_every, self.restart_warmup, floor) for g in self.optimizer.param_groups])


def check_restarts(reset_every, restart_warmup, prune_ratio):
    """The restart settings' values, named as the method's keys."""
    if type(reset_every) is not int or reset_every < 1:
        raise ConfigError(f"method.reset_every={reset_every!r}: expected an integer >= 1.")
    if type(restart_warmup) is not int or not 0 <= restart_warmup < reset_every:
        raise ConfigError(f"method.restart_warmup={restart_warmup!r}: expected an integer in [0, reset_every).")
    if isinstance(prune_ratio, bool) or not isinstance(prune_ratio, (int, float)) or not 0 <= prune_ratio <= 1:
        raise ConfigError(f"method.prune_ratio={prune_ratio!r}: expected a fraction in [0, 1].")
