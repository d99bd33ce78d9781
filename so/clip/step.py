"""One training iteration of the harness, and what it needs: class prompts tokenized once, the
loss of a batch (logits = 100 x cosine, cross-entropy), the optimizer step."""
import torch.nn.functional as F

from so.clip.model import class_embeddings, tokenize
from so.clip.runtime import autocast

LOGIT_SCALE = 100.0  # CLIP's learned temperature at the end of pretraining, fixed as in the paper


class Prompts:
    """Class prompts tokenized once per trial; their embeddings with or without grad."""

    def __init__(self, dataset, tokenizer, device):
        self.classnames, self.tokenizer = list(dataset.classnames), tokenizer
        self.num_templates = len(dataset.templates)
        prompts = [t.format(c) for c in dataset.classnames for t in dataset.templates]
        self.tokens = tokenize(tokenizer, prompts, device)

    def embeddings(self, model):
        return class_embeddings(model, self.tokens, self.num_templates)


def forward_loss(model, prompts, images, labels, text=None):
    """The loss of one batch; `text` holds fixed class embeddings when the text tower does not
    train."""
    if text is None:
        text = prompts.embeddings(model)
    image = F.normalize(model.encode_image(images), dim=-1)
    return F.cross_entropy(LOGIT_SCALE * image @ text.T, labels)


def train_step(model, prompts, images, labels, optimizer, precision, device, text=None,
               loss_fn=forward_loss, scaler=None, closure_step=False):
    """One iteration; `text` holds fixed class embeddings when the text tower does not train;
    `loss_fn`: forward_loss or its compiled version (so.clip.runtime.compiled); `scaler`: fp16's
    GradScaler; `closure_step`: the optimizer evaluates the loss itself (MeZO), from a closure."""
    return optimizer_step(lambda: loss_fn(model, prompts, images, labels, text), optimizer, precision, device,
                          scaler, closure_step)


def optimizer_step(loss_of, optimizer, precision, device, scaler=None, closure_step=False):
    """Backward of `loss_of()` (under autocast) and one optimizer step; returns the loss, detached."""
    def closure():
        with autocast(precision, device):
            return loss_of()

    if closure_step:
        loss = optimizer.step(closure)
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    loss = closure()
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
