"""Heads: what a frozen-image-encoder method trains, on CLIP's cached image features (features.py).

A head is a torch module attached to the model as `model.head` (so that save_trained, load_trained
and the optimizer see its parameters by name: head.ctx, head.keys, ...). It scores image features
[B, D] against a class set (`scorer`), defines its training loss (`loss`: cross-entropy unless its
paper adds a term) and may fit values on the few-shot val split once training is over (Tip-Adapter's
alpha/beta search). The kinds (configs/method/; so/clip/prompt_learners.py and adapters.py define them,
so/clip/methods.py attaches them):

    coop          CoOp's learnable context (KgCoOp: with its hand-crafted-prompt regulariser)
    cocoop        CoCoOp: CoOp's context plus a meta-net bias conditioned on each image
    clip_adapter  a residual bottleneck MLP on the image features
    tip_adapter   Tip-Adapter's cache model (training-free), or Tip-Adapter-F's fine-tuned keys
    taskres       TaskRes: a learned residual on the zero-shot text classifier
    linear_probe  a linear probe initialised from the zero-shot classifier (ZS-LP), or CLAP's
                  class-adaptive constrained one
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from so.clip.model import encode_text
from so.clip.step import LOGIT_SCALE

@dataclass
class Features:
    """Image features [V, N, D] (V views of N images; V = 1 for the val split) and labels [N]."""
    features: torch.Tensor
    labels: torch.Tensor

    def view(self, index):
        """The features of view `index` (cycled)."""
        return self.features[index % len(self.features)]


@dataclass
class HeadTask:
    """What a head is built from: the class prompts (so.clip.step.Prompts) of the classes it trains
    on, the train images' features under `views` augmented views, the val split's (Tip-Adapter's search)."""
    prompts: object
    train: Features
    val: Features | None = None


class Head(torch.nn.Module):
    """Scores image features against a class set; a kind defines `scorer`, and `loss` when its paper
    adds a term to the cross-entropy."""

    def __init__(self, task):
        super().__init__()
        self.task = task  # not a module: its tensors stay out of the state dict

    def scorer(self, model, prompts):
        """A function: image features [B, D] -> logits [B, C] over the classes of `prompts`."""
        raise NotImplementedError

    def loss(self, model, features, labels):
        return F.cross_entropy(self.scorer(model, self.task.prompts)(features), labels)

    def after_training(self, model):
        """Values fitted once training is over (Tip-Adapter's search on the val split)."""

    def fitted(self):
        """{name: value} of what after_training fitted, for results.json."""
        return {}


class ClassHead(Head):
    """A head with one vector per training class: it scores those classes only."""

    def same_classes(self, prompts):
        if prompts.classnames != self.task.prompts.classnames:
            raise ValueError(f"{type(self).__name__} learns one vector per training class: it cannot score "
                             "other classes (base_to_novel needs a prompt learner: coop, cocoop, kgcoop).")


def cosine_logits(features, weights):
    """LOGIT_SCALE x the cosine of image features [B, D] and class vectors [C, D], in fp32."""
    with torch.autocast(features.device.type, enabled=False):
        return LOGIT_SCALE * F.normalize(features.float(), dim=-1) @ F.normalize(weights.float(), dim=-1).T


def fp32(fn):
    """`fn` of image features, run on fp32 features with autocast off: a head on features computes its
    logits in fp32 under any precision (as Tip-Adapter's search, TaskRes's and CLAP's heads do)."""
    def run(features):
        with torch.autocast(features.device.type, enabled=False):
            return fn(features.float())
    return run


@torch.no_grad()
def zero_shot_weights(model, prompts):
    """[C, D] zero-shot CLIP's classifier of `prompts` (normalised class embeddings), fp32."""
    return prompts.embeddings(model).float()


@torch.no_grad()
def text_means(model, prompts):
    """[C, D] per class, the raw (unnormalised) mean of its templates' text features: TaskRes's and
    CLAP's base classifier."""
    features = encode_text(model, prompts.tokens, normalize=False).float()
    return features.view(-1, prompts.num_templates, features.shape[-1]).mean(dim=1)

