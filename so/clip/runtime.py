"""Where and how a trial computes: the seed, the device (and, with several GPUs, one no other trial
holds), the precision, TF32 matmuls, torch.compile. None of it changes what a trial computes beyond
floating-point rounding; all of it is set once per trial."""
import fcntl
import logging
import random
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from so.clip.config import ConfigError, choice

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


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
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={device!r}: expected auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device}: CUDA is not available on this machine (use device=cpu).")
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


def resolve_precision(precision, device):
    """auto: bf16 on CUDA, fp32 elsewhere."""
    choice("precision", precision, PRECISIONS)
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(precision, device):
    """bf16 or fp16 autocast over fp32 master weights, or plain fp32."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def check_precision(precision, reads_in_backward):
    """fp16 steps through a GradScaler, which unscales .grad after backward: it cannot follow an
    optimizer that reads the gradients inside backward. Known from the config alone."""
    choice("precision", precision, PRECISIONS)
    if precision == "fp16" and reads_in_backward:
        raise ConfigError("precision=fp16 steps through a GradScaler, which unscales the gradients after "
                          "backward; this optimizer takes them elsewhere (optimizer.step_in_backward=true and "
                          "optimizer.sparse_backward=true read them inside backward, mezo steps from forward "
                          "passes). Use precision=bf16 or fp32, or set step_in_backward and sparse_backward to false.")


def grad_scaler(precision, device, reads_in_backward):
    """fp16 needs a GradScaler (as CLIP-LoRA uses); None otherwise."""
    check_precision(precision, reads_in_backward)
    if resolve_precision(precision, device) != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def set_tf32(enabled):
    """TF32 matmuls on GPUs that have them, or full fp32 ones (torch's default, and the released
    code's); torch derives torch.backends.cuda.matmul.allow_tf32 from it. cuDNN convolutions (CLIP's
    patch embedding) keep torch's default, TF32 allowed."""
    torch.set_float32_matmul_precision("high" if enabled else "highest")


def compiled(fn, mode):
    """`fn` through torch.compile (forward and backward) unless mode is none. Where dynamo or the
    backend cannot compile, torch runs that part eagerly and logs why
    (torch._dynamo.config.suppress_errors): the trial goes on."""
    choice("compile", mode, COMPILE_MODES)
    if mode == "none":
        return fn
    torch._dynamo.reset()  # a new trial in the same process (a multirun) compiles afresh
    torch._dynamo.config.suppress_errors = True
    return torch.compile(fn, mode=mode)
