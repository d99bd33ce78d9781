"""The training harness: few-shot training until the loss is low enough, evaluation, results.json.

One iteration: class prompts through the (truncated) text tower, a few-shot image batch through the
vision tower, logits = 100 * cosine, cross-entropy, optimizer and cosine-LR step. Training stops when
the mean loss over a full pass of the few-shot set is below `stop_loss` (null: never), at the budget
(`max_iters`, or `iters_per_shot` x shots), or at the first non-finite loss (results.json then records
status "diverged").
"""
import fcntl
import logging
import math
import random
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from datasets.classes import base_and_novel, harmonic_mean
from datasets.pipeline import TrainImages, test_loader
from so.methods import load_trained, save_trained
from so.model import class_embeddings, tokenize
from so.optim import SO
from so.runs import finite, write_json_atomic
from so.tracking import start_run
from so.updates import UpdateCounts

log = logging.getLogger(__name__)

LOGIT_SCALE = 100.0  # CLIP's learned temperature at the end of pretraining, fixed as in the paper


def seed_everything(seed):
    """Python's, numpy's and torch's global generators, as every trial starts."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device):
    """auto: the GPU when there is one; with several, one no other trial on this machine holds."""
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", claim_gpu() if torch.cuda.device_count() > 1 else 0)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device}: CUDA is not available on this machine (use device=cpu)")
    return device


_claimed = {}  # device index -> open lock file, held until the process exits


def claim_gpu(poll_seconds=10):
    """Index of a GPU locked for this process (flock on a file per device uuid, so parallel trials of
    one sweep, or of two sweeps, never share a GPU; a crashed trial's lock goes with its process)."""
    while not _claimed:
        for index in range(torch.cuda.device_count()):
            uuid = torch.cuda.get_device_properties(index).uuid
            handle = open(Path(tempfile.gettempdir()) / f"so-clip-gpu-{uuid}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            _claimed[index] = handle
            break
        else:
            log.info("All %d GPUs are held by other trials; waiting.", torch.cuda.device_count())
            time.sleep(poll_seconds)
    return next(iter(_claimed))


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_precision(precision, device):
    """auto: bf16 on CUDA, fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(precision, device):
    """bf16 or fp16 autocast over fp32 master weights, or plain fp32."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def set_tf32(enabled):
    """TF32 matmuls on GPUs that have them, or full fp32 ones (torch's default, and the released
    code's); torch derives torch.backends.cuda.matmul.allow_tf32 from it. cuDNN convolutions (CLIP's
    patch embedding) keep torch's default, TF32 allowed."""
    torch.set_float32_matmul_precision("high" if enabled else "highest")


def budget(cfg):
    """The most training iterations: iters_per_shot x shots when set (the released code's rule),
    else max_iters."""
    return cfg.iters_per_shot * cfg.shots if cfg.iters_per_shot else cfg.max_iters


def schedule(optimizer, cfg):
    """The cosine learning rate over the whole budget, down to 1e-6 (the released code's and CLIP-LoRA's),
    or the optimizer's own schedule over it where it has one (ReLoRA's jagged cosine)."""
    if hasattr(optimizer, "scheduler"):
        return optimizer.scheduler(budget(cfg), eta_min=1e-6)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, budget(cfg), eta_min=1e-6)


class Prompts:
    """Class prompts tokenized once per trial; their embeddings with or without grad."""

    def __init__(self, dataset, tokenizer, device):
        self.num_templates = len(dataset.templates)
        prompts = [t.format(c) for c in dataset.classnames for t in dataset.templates]
        self.tokens = tokenize(tokenizer, prompts, device)

    def embeddings(self, model):
        return class_embeddings(model, self.tokens, self.num_templates)


@torch.no_grad()
def evaluate(model, prompts, loader, precision, device, desc):
    """Top-1 accuracy in percent over `loader`."""
    model.eval()
    with autocast(precision, device):
        text = prompts.embeddings(model)
        correct = total = 0
        for images, labels in tqdm(loader, desc=desc, leave=False):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            image = F.normalize(model.encode_image(images), dim=-1)
            correct += (image @ text.T).argmax(dim=-1).eq(labels).sum()
            total += labels.numel()
    return 100.0 * float(correct) / max(total, 1)


def forward_loss(model, prompts, images, labels, text=None):
    """The loss of one batch; `text` holds fixed class embeddings when the text tower does not
    train."""
    if text is None:
        text = prompts.embeddings(model)
    image = F.normalize(model.encode_image(images), dim=-1)
    return F.cross_entropy(LOGIT_SCALE * image @ text.T, labels)


COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


def compile_loss(mode):
    """forward_loss, through torch.compile (forward and backward) unless mode is none. Where
    dynamo or the backend cannot compile, torch runs that part eagerly and logs why
    (torch._dynamo.config.suppress_errors): the trial goes on."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile={mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    if mode == "none":
        return forward_loss
    torch._dynamo.reset()  # a new trial in the same process (a multirun) compiles afresh
    torch._dynamo.config.suppress_errors = True
    return torch.compile(forward_loss, mode=mode)


def train_step(model, prompts, images, labels, optimizer, precision, device, text=None,
               loss_fn=forward_loss, scaler=None):
    """One iteration; `text` holds fixed class embeddings when the text tower does not train;
    `loss_fn`: forward_loss or compile_loss's version of it; `scaler`: fp16's GradScaler."""
    with autocast(precision, device):
        loss = loss_fn(model, prompts, images, labels, text)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def grad_scaler(precision, device, optimizer):
    """fp16 needs a GradScaler (as CLIP-LoRA uses); it unscales .grad after backward, so it cannot
    follow SO reading the gradients inside backward."""
    if resolve_precision(precision, device) != "fp16":
        return None
    if isinstance(optimizer, SO) and optimizer.reads_in_backward:
        raise ValueError("precision=fp16 steps through a GradScaler, which unscales the gradients after "
                         "backward; SO reads them inside backward (method.step_in_backward=true). Use "
                         "precision=bf16 or fp32, or method.step_in_backward=false.")
    return torch.amp.GradScaler(device.type)


@dataclass
class Outcome:
    """How training ended."""
    iterations: int = 0
    stopped_early: bool = False
    final_loss: float | None = None  # the mean loss of the last full pass
    diverged_at: int | None = None  # the first iteration whose loss was not finite
    curve: list = field(default_factory=list)  # eval_every's points: iteration, top1, loss, lr


def eval_subset(records, size, seed):
    """`size` of the test records, drawn with random.Random(seed), in split order; all of them when
    size is 0 or not smaller than the split."""
    if not size or size >= len(records):
        return records
    return [records[i] for i in sorted(random.Random(seed).sample(range(len(records)), size))]


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
    """Run the loop until a full pass's mean loss is below stop_loss, max_iters, or a non-finite
    loss; returns the Outcome. `update_counts` (so.updates.UpdateCounts) counts what each SO step
    moved; `probe()`, the top-1 of the curve, runs every cfg.eval_every iterations."""
    preprocess = model.visual.preprocess_cfg
    generator = torch.Generator().manual_seed(cfg.seed)
    images = TrainImages(train_x, device, model.visual.image_size, preprocess["mean"], preprocess["std"],
                         generator=generator, crop_from_original=cfg.crop_from_original)
    labels = torch.tensor([r.label for r in train_x], device=device)
    optimizer = method.optimizer
    loss_fn = compile_loss(cfg.compile)
    total = budget(cfg)
    scheduler = schedule(optimizer, cfg)
    scaler = grad_scaler(cfg.precision, device, optimizer)
    text_trains = any(not name.startswith("visual.") for name in method.trainable)
    model.train()
    if not text_trains:
        with torch.no_grad(), autocast(cfg.precision, device):
            fixed_text = prompts.embeddings(model)

    done = Outcome()
    window, steps = torch.zeros((), device=device), 0  # the losses since the last curve point
    last = None  # (iteration, loss) of the latest step, checked one step later: no wait on the GPU
    bar = tqdm(total=total, desc="train", leave=False)
    while done.iterations < total and not (done.stopped_early or done.diverged_at):
        order = torch.randperm(len(train_x), generator=generator)
        loss_sum, seen = torch.zeros((), device=device), 0
        for batch in order.split(cfg.batch_size):
            batch = batch.to(device)
            loss = train_step(model, prompts, images.batch(batch), labels[batch], optimizer, cfg.precision,
                              device, None if text_trains else fixed_text, loss_fn, scaler)
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
        if not done.diverged_at and seen == len(train_x):  # a full pass: the early-stop rule reads its mean
            pass_loss = float(loss_sum) / seen
            if math.isfinite(pass_loss):
                done.final_loss = pass_loss
                bar.set_postfix(loss=f"{pass_loss:.4f}")
                if wandb_run is not None:
                    wandb_run.log({"train/loss": pass_loss, "lr": scheduler.get_last_lr()[0]},
                                  step=done.iterations)
                done.stopped_early = cfg.stop_loss is not None and pass_loss < cfg.stop_loss
    bar.close()
    if not done.diverged_at and last is not None and not torch.isfinite(last[1]):
        done.diverged_at = last[0]
    if done.diverged_at:
        log.warning("DIVERGED: the loss of iteration %d is not finite (lr %.3g at the start). Training "
                    "stops here; results.json records status \"diverged\" and no accuracy.",
                    done.diverged_at, scheduler.base_lrs[0])
    return done


def run(cfg, config, model, eval_transform, tokenizer, dataset, method, device, run_dir):
    """One trial: zero-shot eval, training, final eval; writes run_dir/results.json and returns it.
    `config` is the resolved config as a plain dict, recorded in results.json and W&B. With
    base_to_novel, training and `top1` are on the base classes, and the novel classes are evaluated too."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    wandb_run = start_run(cfg.logger, config, run_dir, f"{dataset.name}-{method.name}-{cfg.shots}shot-seed{cfg.seed}")
    dataset, novel = base_and_novel(dataset) if cfg.base_to_novel else (dataset, None)
    prompts = Prompts(dataset, tokenizer, device)
    loader = test_loader(dataset.test, eval_transform, cfg.eval_batch_size, cfg.num_workers)
    on_novel = None
    if novel is not None:
        novel_prompts = Prompts(novel, tokenizer, device)
        novel_loader = test_loader(novel.test, eval_transform, cfg.eval_batch_size, cfg.num_workers)
        on_novel = lambda desc: evaluate(model, novel_prompts, novel_loader, cfg.precision, device, desc)  # noqa: E731
    checkpoint = run_dir / "trained.pt"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    zeroshot_top1 = evaluate(model, prompts, loader, cfg.precision, device, "zero-shot eval")
    zeroshot_novel = on_novel("zero-shot eval, novel classes") if on_novel else None
    log.info("zero-shot top-1: %.2f", zeroshot_top1)
    done, seconds, probe, curve_images = Outcome(), 0.0, None, None
    if cfg.eval_every:  # the curve's top-1, on the whole test split or a seeded subset of it
        subset = eval_subset(dataset.test, cfg.eval_subset, cfg.seed)
        curve_images = len(subset)
        probe_loader = loader if subset is dataset.test else test_loader(subset, eval_transform,
                                                                         cfg.eval_batch_size, cfg.num_workers)
        probe = lambda: evaluate(model, prompts, probe_loader, cfg.precision, device, "curve eval")  # noqa: E731
    if cfg.eval_only:
        load_trained(method, model, Path(cfg.trained_from or run_dir) / "trained.pt")
    elif method.optimizer is not None:
        counts = None
        if cfg.count_updates and isinstance(method.optimizer, SO):
            counts = UpdateCounts(method.optimizer, {p: n for n, p in method.trainable.items()})
        elif cfg.count_updates:
            log.warning("count_updates=true ignored: method %s does not train with SO.", method.name)
        start = time.perf_counter()
        done = train(cfg, model, prompts, method, dataset.train_x, device, wandb_run, counts, probe)
        seconds = time.perf_counter() - start
        if cfg.save and not done.diverged_at:
            save_trained(method, model, checkpoint)
        if counts is not None:
            counts.save(run_dir / "update_counts.pt")
    top1 = novel_top1 = None
    if not done.diverged_at:
        top1 = evaluate(model, prompts, loader, cfg.precision, device, "final eval")
        novel_top1 = on_novel("final eval, novel classes") if on_novel else None
        log.info("final top-1: %.2f (%d iterations%s)", top1, done.iterations,
                 ", stopped early" if done.stopped_early else "")

    results = {
        "dataset": dataset.name,
        "shots": cfg.shots,
        "seed": cfg.seed,
        "method": method.name,
        "name": cfg.name,
        "status": "diverged" if done.diverged_at else "finished",
        "diverged_at": done.diverged_at,
        "zeroshot_top1": zeroshot_top1,
        "top1": top1,
        "iterations": done.iterations,
        "stopped_early": done.stopped_early,
        "final_loss": done.final_loss,
        "train_seconds": seconds,
        "trainable_params": method.trainable_params,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "device": str(device),
        "config": config,
    }
    if cfg.eval_every:
        results |= {"curve": done.curve, "curve_images": curve_images}
    if novel is not None:  # top1 and zeroshot_top1 are the base classes'
        results |= {"base_classes": len(dataset.classnames), "novel_classes": len(novel.classnames),
                    "zeroshot_novel_top1": zeroshot_novel, "novel_top1": novel_top1,
                    "zeroshot_hm": harmonic_mean(zeroshot_top1, zeroshot_novel),
                    "hm": None if top1 is None else harmonic_mean(top1, novel_top1)}
    write_json_atomic(run_dir / "results.json", results, indent=2)  # atomic, strict JSON
    if wandb_run is not None:
        wandb_run.summary.update({k: v for k, v in finite(results).items() if k != "config"})
        wandb_run.finish()
    return results
