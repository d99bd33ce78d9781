"""LoRA and DoRA on CLIP's attention with CLIP-LoRA's placement: one adapter each for q, k, v (and o).

peft puts a single adapter on the fused in_proj of nn.MultiheadAttention, and a weight parametrization
cannot express dropout on the adapter input, so each chosen attention becomes `SplitAttention` (q/k/v/out
nn.Linear layers, same outputs) and peft's LoRA/DoRA layers target those Linear layers.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}


class SplitAttention(nn.Module):
    """nn.MultiheadAttention (dropout 0, equal q/k/v widths) with q, k, v and out as separate Linear
    layers; the forward takes the arguments open_clip passes and returns (output, None)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn or mha.dropout:
            raise ValueError("SplitAttention supports nn.MultiheadAttention with kdim == vdim == embed_dim, "
                             "no bias_k/bias_v, no add_zero_attn and dropout 0 (as in CLIP).")
        width, bias = mha.embed_dim, mha.in_proj_bias is not None
        self.num_heads, self.batch_first = mha.num_heads, mha.batch_first
        weight, like = mha.in_proj_weight.detach(), dict(device=mha.in_proj_weight.device,
                                                         dtype=mha.in_proj_weight.dtype)
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            linear = nn.Linear(width, width, bias=bias, **like)
            with torch.no_grad():
                linear.weight.copy_(weight[i * width:(i + 1) * width])
                if bias:
                    linear.bias.copy_(mha.in_proj_bias[i * width:(i + 1) * width])
            setattr(self, name, linear)
        self.out_proj = nn.Linear(width, width, bias=mha.out_proj.bias is not None, **like)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())

    def forward(self, query, key, value, need_weights=False, attn_mask=None, key_padding_mask=None):
        if need_weights or key_padding_mask is not None:
            raise ValueError("SplitAttention returns no attention weights and takes no key_padding_mask.")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length, width = query.shape
        heads = lambda x: x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = ~attn_mask  # nn.MultiheadAttention: True = masked; SDPA: True = attends
            if attn_mask.dim() == 3:  # [batch * heads, L, S]
                attn_mask = attn_mask.view(batch, self.num_heads, length, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, width))
        return (out if self.batch_first else out.transpose(0, 1)), None


def add_adapters(model, blocks, targets, rank, alpha, dropout, dora):
    """Split the attention of each block named in `blocks` and add a LoRA (or DoRA) adapter to each
    of its `targets` (subset of q, k, v, o): scaling alpha / sqrt(rank), dropout on the adapter input,
    A kaiming-uniform, B zero (CLIP-LoRA). Returns the model, changed in place."""
    if not targets or set(targets) - TARGETS.keys():
        raise ValueError(f"method.targets={list(targets)}: expected a non-empty subset of {list(TARGETS)}.")
    for name in blocks:
        block = model.get_submodule(name)
        if not isinstance(block.attn, nn.MultiheadAttention):
            raise ValueError(f"{name}.attn is {type(block.attn).__name__}, expected nn.MultiheadAttention.")
        block.attn = SplitAttention(block.attn)
    from peft import LoraConfig, inject_adapter_in_model  # imported here: peft takes seconds to import

    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, use_rslora=True, use_dora=dora,
        init_lora_weights=True, bias="none",
        target_modules=[f"{name}.attn.{TARGETS[t]}" for name in blocks for t in targets],
    )
    return inject_adapter_in_model(config, model)


@torch.no_grad()
def merge_adapters(model):
    """Merge every LoRA/DoRA adapter into its weight (peft's merge) and turn each SplitAttention back
    into the nn.MultiheadAttention it came from: the model is open_clip's again, weights and names.
    Returns the model, changed in place."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, SplitAttention):
                setattr(module, name, _fused(child))
    return model


def _plain(layer):
    """A Linear layer or a peft LoRA layer around one, as a plain Linear with the adapter merged."""
    if hasattr(layer, "base_layer"):
        layer.merge(safe_merge=True)
        layer = layer.base_layer
    return layer


def _fused(split):
    """The nn.MultiheadAttention of a SplitAttention: q, k, v stacked into in_proj."""
    q, k, v, out = (_plain(getattr(split, name)) for name in ("q_proj", "k_proj", "v_proj", "out_proj"))
    width = q.weight.shape[1]
    mha = nn.MultiheadAttention(width, split.num_heads, bias=q.bias is not None, batch_first=split.batch_first,
                                device=q.weight.device, dtype=q.weight.dtype)
    mha.in_proj_weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
    if q.bias is not None:
        mha.in_proj_bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
    mha.out_proj.load_state_dict(out.state_dict())
    return mha.requires_grad_(False)
