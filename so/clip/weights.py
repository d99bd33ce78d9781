"""CLIP weights: from an open_clip tag (Hugging Face cache, or the hub when reachable) or a local file,
read without running code that a file may carry.

The format is read from the file's content, not its name: a TorchScript archive (OpenAI's own
ViT-B-16.pt) is opened with torch.jit.load, which deserialises tensors and TorchScript code but no
Python objects; safetensors with safetensors; anything else with torch.load(weights_only=True). Only
model.allow_unsafe_pickle=true lets torch.load unpickle arbitrary objects, which can run code.
"""
import logging
import os
import pickle
import socket
import zipfile

import open_clip
import torch
from open_clip.pretrained import get_pretrained_cfg

log = logging.getLogger(__name__)

LOCAL_FILE_HINT = (
    "Download the weights once on a machine with network and pass the file instead: "
    "model.pretrained=/path/to/ViT-B-16.pt (OpenAI's TorchScript file) or "
    "/path/to/open_clip_model.safetensors."
)
TORCHSCRIPT_EXTRAS = ("input_resolution", "context_length", "vocab_size")  # ints, not weights
PREPROCESS_KEYS = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation",
                   "resize_mode": "image_resize_mode"}


def resolve(name, pretrained):
    """(weights file, open_clip preprocess overrides) for model.pretrained, a file or a tag."""
    path = os.path.expanduser(str(pretrained))
    if os.path.isfile(path):
        return path, {}
    cfg = get_pretrained_cfg(name, str(pretrained))
    if not cfg:
        raise FileNotFoundError(
            f"model.pretrained={pretrained!r} is neither a file nor an open_clip tag of {name} "
            f"(tags: {open_clip.list_pretrained_tags_by_model(name)}). {LOCAL_FILE_HINT}")
    preprocess = {PREPROCESS_KEYS[k]: cfg[k] for k in PREPROCESS_KEYS if cfg.get(k)}
    cached = _cached_hub_file(cfg["hf_hub"])
    if cached:
        return cached, preprocess
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if offline or not _hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # nothing later in this process waits on the hub
        why = "your environment sets HF_HUB_OFFLINE=1" if offline else "huggingface.co cannot be reached"
        raise FileNotFoundError(f"Cannot fetch the weights of {name} tag {pretrained!r}: they are not in the "
                                f"Hugging Face cache and {why}. {LOCAL_FILE_HINT}")
    return open_clip.download_pretrained(cfg), preprocess


def read_state_dict(path, allow_unsafe_pickle=False):
    """The tensors of a weights file, by its content: TorchScript, safetensors or torch.save. A file
    that cannot be read as what it looks like is named, with what it was read as."""
    if _is_torchscript(path):
        state = _read(path, "a TorchScript archive", lambda: torch.jit.load(path, map_location="cpu").state_dict())
        for key in TORCHSCRIPT_EXTRAS:
            state.pop(key, None)
    elif _is_safetensors(path):
        from safetensors.torch import load_file

        state = _read(path, "a safetensors file", lambda: load_file(path))
    else:
        if allow_unsafe_pickle:
            log.warning("Loading %s with weights_only=False (model.allow_unsafe_pickle=true): the file "
                        "can run code.", path)
        state = _read(path, "a torch.save file", lambda: torch.load(path, map_location="cpu",
                                                                    weights_only=not allow_unsafe_pickle))
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (names -> tensors), got {type(state).__name__}.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _read(path, what, read):
    """read(), its errors turned into one that names the file and what it was read as."""
    try:
        return read()
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0]
        if "weights_only" not in str(e) and "Unsupported global" not in str(e):
            raise ValueError(f"{path}: not a weights file: read as {what}, it fails ({reason}).") from None
        raise ValueError(f"{path}: holds Python objects besides tensors, which are not loaded "
                         f"because unpickling them can run code ({reason}). A file you trust "
                         "loads with model.allow_unsafe_pickle=true.") from None
    except Exception as e:  # torch.jit, safetensors and the unpickler raise many types for a bad file
        lines = str(e).strip().splitlines()
        reason = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
        raise ValueError(f"{path}: not a weights file: read as {what}, it fails ({reason}). Download it "
                         "again, or pass the file it should be.") from None


def load_into(model, state, path, name):
    """Copy `state` into `model`; a file of another architecture names the first tensor that
    does not fit."""
    own = model.state_dict()
    transient = {n for n, _ in model.named_buffers()} - own.keys()  # attn_mask: TorchScript keeps it
    state = {k: v for k, v in state.items() if k not in transient}
    if "logit_scale" in state and state["logit_scale"].ndim != own["logit_scale"].ndim:
        state["logit_scale"] = state["logit_scale"].reshape(own["logit_scale"].shape)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        first = (f"{wrong[0]}: file {tuple(state[wrong[0]].shape)}, model {tuple(own[wrong[0]].shape)}"
                 if wrong else f"{(missing or unexpected)[0]}: {'missing from the file' if missing else 'not in the model'}")
        raise ValueError(f"{path} does not fit model.name={name}: first mismatch {first} "
                         f"({len(wrong)} tensors of another shape, {len(missing)} missing, "
                         f"{len(unexpected)} unexpected). Is model.name the architecture of this file?")
    model.load_state_dict(state)


def _is_torchscript(path):
    """torch.jit.save archives hold constants.pkl; torch.save archives do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in archive.namelist())


def _is_safetensors(path):
    """8 bytes of little-endian header length, then the JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


def _cached_hub_file(hf_hub):
    from huggingface_hub import try_to_load_from_cache

    repo_id, filename = os.path.split(hf_hub)
    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for filename in names:
        path = try_to_load_from_cache(repo_id, filename)
        if isinstance(path, str):
            return path
    return None


def _hub_reachable(timeout=3.0):
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False
