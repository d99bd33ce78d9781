"""Building CLIP with open_clip, and the exact truncated text encoder.

`build_clip(name, pretrained)` returns (model, eval_transform, tokenizer). `pretrained` is an
open_clip tag (e.g. "openai"), a local weights file (.safetensors, .bin, .pth, or OpenAI's TorchScript
.pt), or None for random weights. Hub tags fail fast offline and point to the local-file option.
"""
import logging
import os
import socket
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.pretrained import get_pretrained_cfg

log = logging.getLogger(__name__)

open_clip.add_model_config(Path(__file__).parent / "model_configs")  # registers "so-tiny" and "so-sandbox"

LOCAL_FILE_HINT = (
    "Download the weights once on a machine with network and pass the file instead: "
    "model.pretrained=/path/to/ViT-B-16.pt (OpenAI's TorchScript file) or "
    "/path/to/open_clip_model.safetensors."
)


def build_clip(name, pretrained=None, device="cpu"):
    """Create an open_clip CLIP model in fp32 with its eval transform and tokenizer."""
    weights_only = True
    if pretrained is not None:
        pretrained = os.path.expanduser(str(pretrained))
        if not os.path.isfile(pretrained):
            pretrained = _resolve_tag(name, pretrained)
    if pretrained is not None and pretrained.endswith(".pt"):
        # OpenAI's original checkpoints are TorchScript archives, which torch.load can only open with
        # weights_only=False (arbitrary unpickling): allowed for that file type alone.
        log.warning("Loading %s with weights_only=False (OpenAI TorchScript checkpoint).", pretrained)
        weights_only = False
    model, _, eval_transform = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, device=device, weights_only=weights_only
    )
    if getattr(model, "text_pool_type", None) != "argmax" or not hasattr(model, "attn_mask"):
        raise ValueError(f"model.name={name}: expected a CLIP with a causal text tower pooled at EOT.")
    return model, eval_transform, open_clip.get_tokenizer(name)


def _resolve_tag(name, tag):
    """Return the cached weights file of an open_clip tag, downloading it only when reachable."""
    cfg = get_pretrained_cfg(name, tag)
    if not cfg:
        raise ValueError(
            f"model.pretrained={tag!r} is neither a file nor an open_clip tag of {name} "
            f"(tags: {open_clip.list_pretrained_tags_by_model(name)}). {LOCAL_FILE_HINT}"
        )
    cached = _cached_hub_file(cfg["hf_hub"])
    if cached:
        return cached
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"
        raise RuntimeError(
            f"Cannot fetch the weights of {name} tag {tag!r}: they are not in the Hugging Face cache "
            f"and the hub is unreachable (HF_HUB_OFFLINE=1). {LOCAL_FILE_HINT}"
        )
    return open_clip.download_pretrained(cfg)


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


def tokenize(tokenizer, prompts, device):
    """Tokenize once per trial, cut after the last EOT: CLIP's causal text tower pooled at EOT gives
    the same features for the first max(EOT position)+1 tokens as for all 77."""
    tokens = tokenizer(prompts)
    length = int(tokens.argmax(dim=-1).max()) + 1
    return tokens[:, :length].to(device)


def encode_text(model, tokens, normalize=True):
    """open_clip's CLIP.encode_text on tokens of any length <= context_length, attention and
    positional embedding sliced to that length (open_clip has no option for this)."""
    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def class_embeddings(model, tokens, num_templates):
    """Class text embeddings [C, D]: per class, the normalized mean over its templates' features.
    `tokens` holds C * num_templates prompts, class-major."""
    features = encode_text(model, tokens)
    features = features.view(-1, num_templates, features.shape[-1])
    return F.normalize(features.mean(dim=1), dim=-1)
