"""SO's weight gradients computed only where SO reads them.

With a random gradient support, SO reads each weight's gradient at M = density x N entries of the
step's support. For y = x W^T + b the gradient at entry (i, j) of W is the sum over tokens of
dy[t, i] * x[t, j]: `sparse_backward(model, optimizer)` makes the backward of every nn.Linear and
nn.MultiheadAttention whose weights the SO optimizer steps compute exactly that, from the saved input
and the output gradient, and hand the M values to the optimizer; no dense weight gradient is ever
made for them, which removes the weight-gradient GEMM (a third of a linear layer's arithmetic). The
input and bias gradients are computed as before. Where the step needs the whole gradient (a dense
group, a topk support at its redraw), the backward computes it densely for that step.

    handle = sparse_backward(model, optimizer)   # the modules whose weights the optimizer steps
    loss.backward(); optimizer.step(); optimizer.zero_grad()
    handle.remove()

The same updates as the dense backward to float rounding: the products are summed in fp32 (under
bf16 autocast, the dense GEMM rounds the weight gradient to bf16; this does not). Not for
torch.amp.GradScaler, which unscales .grad after backward. Under torch.compile these layers are not
traced (each is a graph break): they call the optimizer inside backward. Written by hand: no library
computes a weight gradient at a given set of entries.
"""
import torch
import torch.nn.functional as F
from torch import nn

PRODUCTS = 1 << 24  # the most token x entry products gathered at once (64 MiB in fp32)


def grad_at_entries(dy, x, support, weight):
    """The gradient of y = x W^T at the flat entries `support` of W (in W's memory order), fp32:
    for entry (i, j), sum over tokens of dy[t, i] * x[t, j]."""
    from so.optim import memory_order

    dy, x = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    order = memory_order(weight)
    coords = torch.unravel_index(support, tuple(weight.shape[d] for d in order))
    rows, cols = coords[order.index(0)], coords[order.index(1)]
    chunk = max(1, PRODUCTS // max(1, dy.shape[0]))
    return torch.cat([(dy[:, rows[s:s + chunk]].float() * x[:, cols[s:s + chunk]].float()).sum(0)
                      for s in range(0, support.numel(), chunk)]) if support.numel() else dy.new_zeros(0).float()


class SparseWeightGrad(torch.autograd.Function):
    """F.linear(x, weight, bias) whose backward gives `optimizer` the weight's gradient at its
    support (SO.backward_support) instead of a dense one. Autocast is applied as F.linear would."""

    @staticmethod
    def forward(ctx, x, weight, bias, optimizer):
        device = x.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            x, bias = x.to(dtype), None if bias is None else bias.to(dtype)
            computed = weight.to(dtype)
        else:
            computed = weight
        with torch.autocast(device, enabled=False):
            y = F.linear(x, computed, bias)
        ctx.save_for_backward(x, computed)
        ctx.weight, ctx.optimizer, ctx.has_bias = weight, optimizer, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, computed = ctx.saved_tensors
        dx = dy @ computed if ctx.needs_input_grad[0] else None
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        dw = None
        if ctx.needs_input_grad[1]:
            support = ctx.optimizer.backward_support(ctx.weight)
            if support is None:  # the step needs the whole gradient
                dw = dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])
            else:
                ctx.optimizer.add_grad_at_support(ctx.weight, grad_at_entries(dy, x, support, ctx.weight))
        return dx, dw, db, None


@torch.compiler.disable  # calls the optimizer inside backward: torch.compile leaves these layers eager
def linear(module, x, weight, bias):
    """F.linear, with the weight's gradient at its support when the module's SO optimizer steps it."""
    if id(weight) not in module._so_weights or not weight.requires_grad:
        return F.linear(x, weight, bias)
    return SparseWeightGrad.apply(x, weight, bias, module._so_optimizer)


class ProjectedLinear(nn.Linear):
    """nn.Linear computed by self.project(x, weight, bias) (F.linear here): what sparse_backward and
    so.clip.mezo change."""

    def forward(self, x):
        return self.project(x, self.weight, self.bias)

    def project(self, x, weight, bias):
        return F.linear(x, weight, bias)


class ProjectedAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention with its input and output projections computed by self.project(x, weight,
    bias), for self-attention (query, key and value the same tensor) without attention weights or a key
    padding mask, as CLIP calls it; any other call runs nn.MultiheadAttention's own forward."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if (need_weights or key_padding_mask is not None or not (query is key is value) or is_causal
                or not self._qkv_same_embed_dim or self.bias_k is not None or self.add_zero_attn):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        x = query if self.batch_first else query.transpose(0, 1)
        batch, length, width = x.shape
        heads = lambda t: t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = map(heads, self.project(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # nn.MultiheadAttention: True = masked
                attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill_(attn_mask, float("-inf"))
            if attn_mask.dim() == 3:  # [batch * heads, L, S]
                attn_mask = attn_mask.view(batch, self.num_heads, length, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = self.project(out.transpose(1, 2).reshape(batch, length, width), self.out_proj.weight,
                           self.out_proj.bias)
        return (out if self.batch_first else out.transpose(0, 1)), None

    def project(self, x, weight, bias):
        return F.linear(x, weight, bias)


class SparseGradLinear(ProjectedLinear):
    """nn.Linear whose weight's gradient is computed at SO's support (see the module docstring)."""

    def project(self, x, weight, bias):
        return linear(self, x, weight, bias)


class SparseGradMultiheadAttention(ProjectedAttention):
    """nn.MultiheadAttention whose in_proj_weight and out_proj.weight gradients are computed at SO's
    support (ProjectedAttention says for which calls)."""

    def project(self, x, weight, bias):
        return linear(self, x, weight, bias)


class Swapped:
    """Layers whose class was swapped, with the attributes set on them; .remove() restores them."""

    def __init__(self, modules, attributes):
        self.modules, self.attributes = modules, attributes

    def remove(self):
        for module, cls in self.modules:
            module.__class__ = cls
            for name in self.attributes:
                delattr(module, name)
        self.modules = []


def swap_layers(model, weights, linear_class, attention_class, **attributes):
    """Give every nn.Linear and nn.MultiheadAttention of `model` (those exact classes) that holds one
    of `weights` (a set of ids) the class `linear_class` / `attention_class`, and `attributes` plus
    _so_weights (the ids of its weights among them). Returns the Swapped handle."""
    swapped = []
    for module in model.modules():
        if type(module) is nn.MultiheadAttention:
            held, cls = (module.in_proj_weight, module.out_proj.weight), attention_class
        elif type(module) is nn.Linear:
            held, cls = (module.weight,), linear_class
        else:
            continue
        ids = {id(w) for w in held if w is not None} & weights
        if ids:
            swapped.append((module, type(module)))
            module.__class__ = cls
            for name, value in {**attributes, "_so_weights": ids}.items():
                setattr(module, name, value)
    return Swapped(swapped, [*attributes, "_so_weights"])


def sparse_backward(model, optimizer):
    """Make the backward of `model`'s nn.Linear and nn.MultiheadAttention layers (those exact
    classes) whose weights `optimizer` (an SO) steps compute those weights' gradients at the step's
    support only. Call it before the forward; returns a handle with .remove(), which restores them."""
    from so.optim import SO

    if not isinstance(optimizer, SO):
        raise TypeError(f"sparse_backward needs an SO optimizer, got {type(optimizer).__name__}")
    stepped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return swap_layers(model, stepped, SparseGradLinear, SparseGradMultiheadAttention, _so_optimizer=optimizer)
