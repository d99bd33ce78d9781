"""Prompt learners, as their authors' code builds them (KaiyangZhou/CoOp trainers/coop.py and
cocoop.py, htyao89/KgCoOp trainers/kgcoop.py): learnable context vectors in the text tower's input.

Every class's prompt is "<SOS> ctx_1 ... ctx_n <class name tokens> . <EOS>": the context is one [n_ctx,
width] tensor shared by all classes (unified context, class token at the end). It starts as the
embedding of `ctx_init` ("a photo of a") or, when null, from N(0, 0.02) (CoOp's 16 tokens). CoCoOp
adds to every context token a bias that a meta-net (Linear(D, D/16), ReLU, Linear(D/16, width))
computes from the normalised image feature; KgCoOp adds kg_weight x (1 - mean cosine between the
learned class embeddings and the hand-crafted prompts'), as its code (the paper's squared distance
is twice that for unit vectors).
"""
import torch
import torch.nn.functional as F

from so.clip.config import ConfigError
from so.clip.heads import Head, cosine_logits, zero_shot_weights
from so.clip.model import encode_embeddings, tokenize
from so.clip.step import LOGIT_SCALE


class CoOp(Head):
    def __init__(self, cfg, model, task):
        super().__init__(task)
        self.n_ctx, self.ctx_init, self.kg_weight = cfg["n_ctx"], cfg["ctx_init"], cfg.get("kg_weight", 0)
        self.tokenizer, self.tokens = task.prompts.tokenizer, {}  # class names -> their prompts' tokens
        width = model.token_embedding.weight.shape[1]
        if self.ctx_init is None:
            ctx = torch.empty(self.n_ctx, width).normal_(std=0.02)
        else:
            tokens = self.tokenizer([self.ctx_init])[0]
            words = int(tokens.argmax()) - 1  # the tokens between SOS and EOT
            if words != self.n_ctx:
                raise ConfigError(f"method.ctx_init={self.ctx_init!r} is {words} tokens; method.n_ctx={self.n_ctx} "
                                  f"must equal it (or set method.ctx_init=null for random context).")
            with torch.no_grad():
                ctx = model.token_embedding(tokens[None].to(model.token_embedding.weight.device))[0, 1:1 + words]
        self.ctx = torch.nn.Parameter(ctx.detach().clone().float())
        if self.kg_weight:  # KgCoOp's anchor: the hand-crafted prompts' class embeddings
            self.register_buffer("anchor", zero_shot_weights(model, task.prompts), persistent=False)

    def class_tokens(self, prompts):
        """Tokens of "<placeholder context> <class name>." per class of `prompts`, on its device."""
        names = tuple(prompts.classnames)
        if names not in self.tokens:
            placeholder = " ".join(["X"] * self.n_ctx)
            self.tokens[names] = tokenize(self.tokenizer, [f"{placeholder} {name}." for name in names],
                                          prompts.tokens.device)
        return self.tokens[names]

    def prompt_embeddings(self, model, tokens, ctx):
        """[C, L, width] token embeddings with `ctx` ([n_ctx, width], or [B, n_ctx, width] for one set per
        image: [B, C, L, width]) in the context slots."""
        with torch.no_grad():
            embedded = model.token_embedding(tokens)
        prefix, suffix = embedded[:, :1], embedded[:, 1 + self.n_ctx:]
        if ctx.dim() == 2:
            return torch.cat([prefix, ctx.expand(len(tokens), -1, -1).to(prefix.dtype), suffix], dim=1)
        b, c = len(ctx), len(tokens)
        return torch.cat([prefix.expand(b, -1, -1, -1), ctx[:, None].expand(-1, c, -1, -1).to(prefix.dtype),
                          suffix.expand(b, -1, -1, -1)], dim=2)

    def text_features(self, model, tokens):
        return encode_embeddings(model, self.prompt_embeddings(model, tokens, self.ctx), tokens.argmax(dim=-1))

    def scorer(self, model, prompts):
        text = self.text_features(model, self.class_tokens(prompts))
        return lambda features: cosine_logits(features, text)

    def loss(self, model, features, labels):
        text = self.text_features(model, self.class_tokens(self.task.prompts))
        loss = F.cross_entropy(cosine_logits(features, text), labels)
        if self.kg_weight:
            loss = loss + self.kg_weight * (1 - F.cosine_similarity(text.float(), self.anchor, dim=1, eps=1e-7).mean())
        return loss


class CoCoOp(CoOp):
    CHUNK = 4096  # prompts through the text tower at once when scoring (images x classes)

    def __init__(self, cfg, model, task):
        super().__init__(cfg, model, task)  # no kg_weight key: CoOp's context alone
        dim, width = task.train.features.shape[-1], self.ctx.shape[1]
        self.meta_net = torch.nn.Sequential(torch.nn.Linear(dim, dim // 16), torch.nn.ReLU(inplace=True),
                                            torch.nn.Linear(dim // 16, width))

    def per_image_logits(self, model, tokens, features):
        """[B, C] logits, each image against its own prompts."""
        image = F.normalize(features.float(), dim=-1)
        ctx = self.ctx[None] + self.meta_net(image)[:, None]  # [B, n_ctx, width]
        embedded = self.prompt_embeddings(model, tokens, ctx)  # [B, C, L, width]
        b, c = embedded.shape[:2]
        text = encode_embeddings(model, embedded.flatten(0, 1), tokens.argmax(dim=-1).repeat(b)).view(b, c, -1)
        with torch.autocast(text.device.type, enabled=False):  # the logits in fp32, as every head's
            return LOGIT_SCALE * torch.einsum("bd,bcd->bc", image, text.float())

    def scorer(self, model, prompts):
        tokens = self.class_tokens(prompts)
        per_chunk = max(1, self.CHUNK // len(tokens))
        return lambda features: torch.cat([self.per_image_logits(model, tokens, f)
                                           for f in features.split(per_chunk)])

    def loss(self, model, features, labels):
        return F.cross_entropy(self.per_image_logits(model, self.class_tokens(self.task.prompts), features), labels)
