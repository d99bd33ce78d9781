"""Frozen-image-encoder methods (prompt learners, adapters, probes) train on CLIP's image features:
each few-shot train image is encoded once per augmented view (Tip-Adapter's "augment epochs"; the
training loop takes one view per pass, or, for CLAP, batches from all of them) and the few-shot val
split once, under the eval transform. The features are cached under <cache_dir>/features/, keyed by
the weights, the images, the views, the seed, the augmentation and the precision: every method of a
sweep cell encodes once.
"""
import logging
from pathlib import Path

import torch

from datasets.pipeline import TrainImages, test_loader
from datasets.test_cache import key as records_key
from so.clip.heads import Features, HeadTask
from so.clip.runtime import autocast, resolve_precision
from so.clip.step import Prompts
from so.files import content_key, save_atomic

log = logging.getLogger(__name__)
CHUNK = 256  # images augmented and encoded at once: the crops are drawn per chunk, so it is fixed
VERSION = 1  # of the cached features' recipe: part of the key


@torch.no_grad()
def train_views(model, records, views, seed, device, precision, crop_from_original=False, crop_scale=(0.08, 1.0)):
    """[views, N, D] features of the train records, each view under the harness's training augmentation
    (datasets.pipeline.TrainImages, crops of `crop_scale` of the area) drawn from a generator seeded
    with `seed`."""
    preprocess = model.visual.preprocess_cfg
    images = TrainImages(records, device, model.visual.image_size, preprocess["mean"], preprocess["std"],
                         generator=torch.Generator().manual_seed(seed), crop_from_original=crop_from_original,
                         scale=crop_scale)
    model.eval()
    out = []
    for _ in range(views):
        with autocast(precision, device):
            out.append(torch.cat([model.encode_image(images.batch(torch.arange(i, min(i + CHUNK, len(records)))))
                                  .float() for i in range(0, len(records), CHUNK)]))
    return torch.stack(out)


@torch.no_grad()
def eval_features(model, records, transform, device, precision, batch_size, num_workers):
    """[1, N, D] features of `records` under the eval transform."""
    model.eval()
    out = []
    for images, _ in test_loader(records, transform, batch_size, num_workers):
        with autocast(precision, device):
            out.append(model.encode_image(images.to(device)).float())
    return torch.cat(out)[None]


def cached(path, make):
    """torch.load(path) if it holds a tensor, else make() saved there (a cache: a failed write warns)."""
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError) as e:
            log.warning("%s cannot be read (%s): encoding again.", path, str(e).splitlines()[0])
    value = make()
    try:
        save_atomic(value.cpu(), path)
    except OSError as e:
        log.warning("features not cached at %s (%s).", path, e)
    return value


def encoded(model, records, cache_dir, weights_digest, device, precision, batch_size, *, views=None, seed=None,
            crop_from_original=False, crop_scale=(0.08, 1.0), transform=None, num_workers=0):
    """Features of `records`: `views` augmented views seeded with `seed`, or (views None) one view under
    the eval `transform`; from the cache when encoded before. Returns Features on `device`."""
    precision = resolve_precision(precision, device)
    how = (f"views={views} seed={seed} crop_from_original={crop_from_original} scale={tuple(crop_scale)}"
           if views is not None else f"eval {transform!r}")
    key = content_key(VERSION, weights_digest, records_key(records, "", ""), how, precision, device.type)
    path = Path(cache_dir).expanduser() / "features" / f"{key}.pt"
    if views is not None:
        features = cached(path, lambda: train_views(model, records, views, seed, device, precision,
                                                    crop_from_original, crop_scale))
    else:
        features = cached(path, lambda: eval_features(model, records, transform, device, precision, batch_size,
                                                      num_workers))
    return Features(features.to(device), torch.tensor([r.label for r in records], device=device))


def head_task(config, model, dataset, tokenizer, eval_transform, device, weights_digest):
    """The HeadTask of a trial (a resolved config): the class prompts, the train images' features under
    method.views augmented views, and the val split's under the eval transform when Tip-Adapter
    searches on it, each encoded once per content (cached)."""
    method = config["method"]
    common = {"cache_dir": config["paths"]["cache_dir"], "weights_digest": weights_digest, "device": device,
              "precision": config["precision"], "batch_size": config["eval_batch_size"]}
    train = encoded(model, dataset.train_x, views=method["views"], seed=config["seed"],
                    crop_from_original=config["crop_from_original"], crop_scale=method["crop_scale"], **common)
    val = None
    if method["kind"] == "tip_adapter" and method["search"] == "val":
        if not dataset.val:
            raise ValueError(f"method.search=val: dataset {dataset.name} has no val split to search alpha and beta "
                             "on; use method.search=fixed.")
        val = encoded(model, dataset.val, transform=eval_transform, num_workers=config["num_workers"], **common)
    return HeadTask(Prompts(dataset, tokenizer, device), train, val)
