"""Building CLIP with open_clip, and the exact truncated text encoder.

`build_clip(name, pretrained)` returns (model, eval_transform, tokenizer). `pretrained` is an
open_clip tag (e.g. "openai"), a local weights file (OpenAI's TorchScript .pt, .safetensors, or a
torch.save state dict), or None for random weights; so.clip.weights reads it. Hub tags fail fast offline
and point to the local-file option.
"""
import hashlib
import logging
from contextlib import nullcontext
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from so.clip.weights import load_into, read_state_dict, resolve

open_clip.add_model_config(Path(__file__).parent / "model_configs")  # so-tiny, so-tiny-l14, so-sandbox


def build_clip(name, pretrained=None, device="cpu", allow_unsafe_pickle=False):
    """Create an open_clip CLIP model in fp32 with its eval transform and tokenizer; weights from
    `pretrained` (so.clip.weights reads them), random when None."""
    path, preprocess = (None, {}) if pretrained is None else resolve(name, pretrained)
    with _WeightsLoadedHere() if path else nullcontext():
        model, _, eval_transform = open_clip.create_model_and_transforms(name, device=device, **preprocess)
    if getattr(model, "text_pool_type", None) != "argmax" or not hasattr(model, "attn_mask"):
        raise ValueError(f"model.name={name}: expected a CLIP with a causal text tower pooled at EOT.")
    if path is not None:
        load_into(model, read_state_dict(path, allow_unsafe_pickle), path, name)
    return model, eval_transform, open_clip.get_tokenizer(name)


class _WeightsLoadedHere(logging.Filter):
    """Drops open_clip's "initialized randomly" warning while the weights are about to be loaded."""

    def filter(self, record):
        return not record.getMessage().startswith("No pretrained weights loaded")

    def __enter__(self):
        logging.getLogger().addFilter(self)

    def __exit__(self, *exc):
        logging.getLogger().removeFilter(self)


def tokenize(tokenizer, prompts, device):
    """Tokenize once per trial, cut after the last EOT: CLIP's causal text tower pooled at EOT gives
    the same features for the first max(EOT position)+1 tokens as for all 77."""
    tokens = tokenizer(prompts)
    length = int(tokens.argmax(dim=-1).max()) + 1
    return tokens[:, :length].to(device)


def encode_text(model, tokens, normalize=True):
    """open_clip's CLIP.encode_text on tokens of any length <= context_length, attention and
    positional embedding sliced to that length (open_clip has no option for this)."""
    return encode_embeddings(model, model.token_embedding(tokens), tokens.argmax(dim=-1), normalize)


def encode_embeddings(model, embeddings, eot, normalize=True):
    """The text tower on token embeddings [B, L, W] (a prompt learner's, with learned context in
    them), pooled at the positions `eot` [B] (the EOT tokens)."""
    length = embeddings.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = embeddings.to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot]
    x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def class_embeddings(model, tokens, num_templates):
    """Class text embeddings [C, D]: per class, the normalized mean over its templates' features.
    `tokens` holds C * num_templates prompts, class-major."""
    features = encode_text(model, tokens)
    features = features.view(-1, num_templates, features.shape[-1])
    return F.normalize(features.mean(dim=1), dim=-1)


def state_digest(model):
    """A content hash of the model's weights (names, dtypes, shapes, values): what a cached zero-shot
    result is keyed by."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b"")
    return digest.hexdigest()
