"""The training loop: few-shot training until the loss is low enough.

One iteration (so.clip.step.train_step): class prompts through the (truncated) text tower, a few-shot
image batch through the vision tower, logits = 100 * cosine, cross-entropy, optimizer and learning-rate
step. Training stops when the mean loss over a full pass of the few-shot set is below `stop_loss` (null:
never), at the budget (`max_iters`, or `iters_per_shot` x shots), or at the first non-finite loss (the
trial then records status "diverged"). The loop asks the method for what it needs (its schedule,
whether gradients are read inside backward) and knows nothing of the optimizer's type.
"""
import logging
import math
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from datasets.pipeline import TrainImages
from so.clip.head_kinds import epochs_for
from so.clip.runtime import autocast, compiled, grad_scaler
from so.clip.step import forward_loss, optimizer_step, train_step

log = logging.getLogger(__name__)

ETA_MIN = 1e-6  # the cosine's final learning rate (the released code's and CLIP-LoRA's)


def budget(cfg, method=None, examples=None):
    """The most training iterations: a head's method.epochs passes over its `examples` train images
    (the authors' schedule), else iters_per_shot x shots when set (the released code's rule), else
    max_iters."""
    if method is not None and method.epochs is not None:
        return epochs_for(method.epochs, cfg.shots) * pass_steps(examples, batch_size(cfg, method), method.drop_last)
    return cfg.iters_per_shot * cfg.shots if cfg.iters_per_shot else cfg.max_iters


def pass_steps(examples, per_batch, drop_last=False):
    """Steps in a pass over `examples`: with drop_last, full batches only (Dassl's loader, when there
    is at least one), else every batch."""
    return examples // per_batch if drop_last and examples >= per_batch else math.ceil(examples / per_batch)


def batch_size(cfg, method):
    """The method's own batch (a head's authors'), else batch_size."""
    return method.batch_size or cfg.batch_size


@dataclass
class Outcome:
    """How training ended."""
    iterations: int = 0
    stopped_early: bool = False
    final_loss: float | None = None  # the mean loss of the last full pass
    diverged_at: int | None = None  # the first iteration whose loss was not finite
    curve: list = field(default_factory=list)  # eval_every's points: iteration, top1, loss, lr


def curve_point(iteration, probe, window, steps, lr, model, device):
    """A point of the accuracy curve: top-1 from `probe` (under a forked RNG, so that training goes on
    with the random numbers it would have drawn without it), the mean loss of the `steps` iterations
    since the last point (None if not finite), the learning rate."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        top1 = probe()
    model.train()
    loss = float(window) / steps
    return {"iteration": iteration, "top1": top1, "loss": loss if math.isfinite(loss) else None, "lr": lr}


def train(cfg, model, prompts, method, train_x, device, wandb_run=None, update_counts=None, probe=None):
    """Run the loop until a full pass's mean loss is below stop_loss, the budget, or a non-finite
    loss; returns the Outcome. `update_counts` (so.clip.updates.UpdateCounts) counts what each SO step
    moved; `probe()`, the top-1 of the curve, runs every cfg.eval_every iterations. A head (a method on
    frozen image features) trains on its cached features for its epochs: no early stop."""
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer, head, per_batch = method.optimizer, method.head, batch_size(cfg, method)
    total = budget(cfg, method, len(train_x))
    scheduler = method.scheduler(total, ETA_MIN, pass_steps(len(train_x), per_batch, method.drop_last))
    scaler = grad_scaler(cfg.precision, device, method.reads_in_backward)
    stop_loss = None if method.epochs is not None else cfg.stop_loss
    model.train()
    if head is None:
        step = image_steps(cfg, model, prompts, method, train_x, device, generator, scaler)
        batches = lambda passes: torch.randperm(len(train_x), generator=generator).split(per_batch)  # noqa: E731
    else:
        step, batches = head_steps(cfg, model, method, device, generator, scaler)

    done = Outcome()
    window, steps = torch.zeros((), device=device), 0  # the losses since the last curve point
    last = None  # (iteration, loss) of the latest step, checked one step later: no wait on the GPU
    bar = tqdm(total=total, desc="train", leave=False, disable=None)  # disable=None: no bar when not a TTY (logs)
    passes = 0
    while done.iterations < total and not (done.stopped_early or done.diverged_at):
        pass_batches = batches(passes)
        loss_sum, seen, pass_size = torch.zeros((), device=device), 0, sum(len(b) for b in pass_batches)
        for batch in pass_batches:
            batch = batch.to(device)
            loss = step(batch)
            scheduler.step()
            if last is not None and not torch.isfinite(last[1]):
                done.diverged_at = last[0]
                break
            if update_counts is not None:
                update_counts.update()
            last = (done.iterations + 1, loss)
            loss_sum += loss * len(batch)
            seen += len(batch)
            done.iterations += 1
            bar.update()
            window, steps = window + loss, steps + 1
            if probe is not None and done.iterations % cfg.eval_every == 0:
                point = curve_point(done.iterations, probe, window, steps, scheduler.get_last_lr()[0], model,
                                    device)
                done.curve.append(point)
                window, steps = torch.zeros((), device=device), 0
                bar.set_postfix(top1=f"{point['top1']:.2f}", loss=point["loss"])
                if wandb_run is not None:
                    wandb_run.log({"eval/top1": point["top1"], "train/loss_since_eval": point["loss"],
                                   "lr": point["lr"]}, step=done.iterations)
            if done.iterations >= total:
                break
        if not done.diverged_at and seen == pass_size:  # a full pass: the early-stop rule reads its mean
            pass_loss = float(loss_sum) / seen
            if math.isfinite(pass_loss):
                done.final_loss = pass_loss
                bar.set_postfix(loss=f"{pass_loss:.4f}")
                if wandb_run is not None:
                    wandb_run.log({"train/loss": pass_loss, "lr": scheduler.get_last_lr()[0]},
                                  step=done.iterations)
                done.stopped_early = stop_loss is not None and pass_loss < stop_loss
        passes += 1
    bar.close()
    if not done.diverged_at and last is not None and not torch.isfinite(last[1]):
        done.diverged_at = last[0]
    if done.diverged_at:
        log.warning("DIVERGED: the loss of iteration %d is not finite (lr %.3g at the start). Training "
                    "stops here; results.json records status \"diverged\" and no accuracy.",
                    done.diverged_at, optimizer.param_groups[0]["initial_lr"])
    return done


def image_steps(cfg, model, prompts, method, train_x, device, generator, scaler):
    """step(batch) for a method that trains CLIP's own weights or adapters: the few-shot images
    augmented on the device (their crops drawn from `generator`), through both towers (the class
    embeddings computed once when the text tower does not train)."""
    preprocess = model.visual.preprocess_cfg
    images = TrainImages(train_x, device, model.visual.image_size, preprocess["mean"], preprocess["std"],
                         generator=generator, crop_from_original=cfg.crop_from_original)
    labels = torch.tensor([r.label for r in train_x], device=device)
    loss_fn = compiled(forward_loss, cfg.compile)
    fixed_text = None
    if not any(not name.startswith("visual.") for name in method.trainable):  # the text tower does not train
        with torch.no_grad(), autocast(cfg.precision, device):
            fixed_text = prompts.embeddings(model)
    return lambda batch: train_step(model, prompts, images.batch(batch), labels[batch], method.optimizer,  # noqa: E731
                                    cfg.precision, device, fixed_text, loss_fn, scaler, method.closure_step)


def head_steps(cfg, model, method, device, generator, scaler):
    """(step(batch), batches(passes)) for a head on its cached features, a bank of V views of N images
    indexed view * N + image: a pass shuffles the images of one view (the views in turn), or, with
    method.mix_views, draws its batches from the whole bank (CLAP's); drop_last keeps full batches."""
    views = method.head.task.train
    count, n = views.features.shape[:2]
    bank, labels = views.features.flatten(0, 1), views.labels.repeat(count)
    per_batch = batch_size(cfg, method)
    take = pass_steps(n, per_batch, method.drop_last) * per_batch

    def batches(passes):
        order = (torch.randperm(count * n, generator=generator) if method.mix_views else
                 torch.randperm(n, generator=generator) + (passes % count) * n)
        return order[:take].split(per_batch)

    def step(batch):
        return optimizer_step(lambda: method.head.loss(model, bank[batch], labels[batch]), method.optimizer,
                              cfg.precision, device, scaler)
    return step, batches
