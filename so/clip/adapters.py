"""Adapters and probes on frozen image features, as their authors' code computes them:
gaopengcuhk/CLIP-Adapter (clip_adapter.py), gaopengcuhk/Tip-Adapter (main.py, utils.py),
geekyutao/TaskRes (trainers/taskres.py), jusiro/CLAP (trainers/adapters.py: ZS-LP and CLAP).

    CLIPAdapter  x' = ratio * MLP(x) + (1 - ratio) * x on the raw image feature, MLP = Linear(D, D/r),
                 ReLU, Linear(D/r, D), ReLU, no biases; cosine logits against the zero-shot classifier
    TipAdapter   100 f T^T + alpha exp(-beta (1 - f K^T)) L: T the zero-shot classifier, K the cache
                 keys (the mean of each train image's features over the views, normalised), L one-hot
                 labels; fine_tune: K trains (Tip-Adapter-F). alpha, beta: searched on the few-shot val
                 split after training (search=val, the authors') or the given values (search=fixed)
    TaskRes      cosine logits against T + alpha R, T the raw mean of the templates' text features,
                 R (zero at the start) trains
    LinearProbe  cosine logits against W, initialised to that T (ZS-LP); constraint=class_adaptive
                 adds CLAP's mean_c lambda_c ||W_c - T_c||^2, lambda_c the mean zero-shot probability of
                 class c over its train images' views (fixed, as the released runs: the "l2" constraint)
"""
import torch
import torch.nn.functional as F

from so.clip.heads import ClassHead, cosine_logits, fp32, text_means, zero_shot_weights
from so.clip.step import LOGIT_SCALE


class CLIPAdapter(ClassHead):
    def __init__(self, cfg, model, task):
        super().__init__(task)
        dim = task.train.features.shape[-1]
        self.ratio = cfg["ratio"]
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, dim // cfg["reduction"], bias=False), torch.nn.ReLU(),
                                       torch.nn.Linear(dim // cfg["reduction"], dim, bias=False), torch.nn.ReLU())
        self.register_buffer("text", zero_shot_weights(model, task.prompts), persistent=False)

    def scorer(self, model, prompts):
        self.same_classes(prompts)
        return fp32(lambda f: cosine_logits(self.ratio * self.mlp(f) + (1 - self.ratio) * f, self.text))


class TipAdapter(ClassHead):
    def __init__(self, cfg, model, task):
        super().__init__(task)
        self.search, self.scale, self.steps = cfg["search"], cfg["search_scale"], cfg["search_steps"]
        self.fine_tune = cfg["fine_tune"]
        keys = F.normalize(task.train.features.mean(dim=0), dim=-1)
        if self.fine_tune:  # Tip-Adapter-F: the keys train
            self.keys = torch.nn.Parameter(keys)
        else:
            self.register_buffer("cache_keys", keys, persistent=False)
        classes = len(task.prompts.classnames)
        self.register_buffer("values", F.one_hot(task.train.labels, classes).float(), persistent=False)
        self.register_buffer("text", zero_shot_weights(model, task.prompts), persistent=False)
        self.register_buffer("alpha", torch.tensor(float(cfg["alpha"])))
        self.register_buffer("beta", torch.tensor(float(cfg["beta"])))

    def parts(self, features):
        """(zero-shot logits, cache affinities) of image features."""
        f = F.normalize(features.float(), dim=-1)
        return LOGIT_SCALE * f @ self.text.T, f @ (self.keys if self.fine_tune else self.cache_keys).T

    def cache_logits(self, affinity, beta):
        return (-beta * (1 - affinity)).exp() @ self.values

    def scorer(self, model, prompts):
        self.same_classes(prompts)

        def logits(f):
            clip_logits, affinity = self.parts(f)
            return clip_logits + self.alpha * self.cache_logits(affinity, self.beta)
        return fp32(logits)

    @torch.no_grad()
    def after_training(self, model):
        """The authors' grid (utils.search_hp): beta_i = 0.1 + i (scale_beta - 0.1) / steps_beta, alpha
        likewise, the first best top-1 on the val split, beta in the outer loop; the cache logits are
        computed once per beta (the authors recompute them per alpha: the same numbers)."""
        if self.search == "fixed":
            return
        val = self.task.val
        clip_logits, affinity = self.parts(val.view(0))
        betas = [i * (self.scale[0] - 0.1) / self.steps[0] + 0.1 for i in range(self.steps[0])]
        alphas = [j * (self.scale[1] - 0.1) / self.steps[1] + 0.1 for j in range(self.steps[1])]
        best = (-1.0, self.alpha.item(), self.beta.item())
        for beta in betas:
            cache = self.cache_logits(affinity, beta)
            for alpha in alphas:
                top1 = (clip_logits + alpha * cache).argmax(dim=-1).eq(val.labels).float().mean().item()
                if top1 > best[0]:
                    best = (top1, alpha, beta)
        self.alpha.fill_(best[1])
        self.beta.fill_(best[2])

    def fitted(self):
        return {"alpha": self.alpha.item(), "beta": self.beta.item()}


class TaskRes(ClassHead):
    def __init__(self, cfg, model, task):
        super().__init__(task)
        self.alpha = cfg["alpha"]
        self.register_buffer("base", text_means(model, task.prompts), persistent=False)
        self.residual = torch.nn.Parameter(torch.zeros_like(self.base))

    def scorer(self, model, prompts):
        self.same_classes(prompts)
        return fp32(lambda f: cosine_logits(f, self.base + self.alpha * self.residual))


class LinearProbe(ClassHead):
    def __init__(self, cfg, model, task):
        super().__init__(task)
        base = text_means(model, task.prompts)
        self.weight = torch.nn.Parameter(base.clone())
        self.register_buffer("base", base, persistent=False)
        self.constrained = cfg["constraint"] == "class_adaptive"
        if self.constrained:  # lambda_c: the class's mean zero-shot probability over its views, a view at a time
            onehot = F.one_hot(task.train.labels, len(base)).float()
            with torch.no_grad():
                mass = sum((cosine_logits(view, base).softmax(dim=-1) * onehot).sum(dim=0) for view in task.train.features)
            self.register_buffer("penalty", mass / (onehot.sum(dim=0) * len(task.train.features)), persistent=False)

    def scorer(self, model, prompts):
        self.same_classes(prompts)
        return fp32(lambda f: cosine_logits(f, self.weight))

    def loss(self, model, features, labels):
        loss = super().loss(model, features, labels)
        if self.constrained:
            loss = loss + (self.penalty * (self.weight - self.base).pow(2).sum(dim=-1)).mean()
        return loss
