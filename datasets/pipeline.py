"""The image pipeline: train images decoded once and augmented on the training device; test streamed.

TrainImages decodes the k-shot images once per trial into uint8 tensors and applies CLIP's few-shot
training augmentation per batch on the device: RandomResizedCrop(S, scale=(0.08, 1) unless told, ratio=(3/4, 4/3),
bicubic) + horizontal flip + normalisation, with per-image parameters from a seeded torch.Generator.
Crop parameters are drawn for the whole batch at once (same distribution as torchvision's
RandomResizedCrop.get_params); each crop is then resized with F.interpolate(bicubic, antialias=True),
which is torchvision's tensor resized_crop (on CPU with uint8 rounding, as PIL). One interpolate per image rather than one
grid_sample over a padded batch: most crops are downscaled, grid_sample cannot antialias (aliasing on
every such crop, unlike the PIL pipeline of the reference), and B small kernels cost little next to a
ViT step (scripts/bench_data.py measures it).
"""
import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor

SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
ATTEMPTS = 10  # as torchvision: 10 tries at a valid crop, then a centre crop
DEVICE_SHARE = 0.25  # keep the train images on the GPU when they take at most this share of free memory
HINT = "see DATASETS.md#missing-or-unreadable-images"


def read_image(path):
    """The image at `path` as RGB; an error naming the file when it is missing or cannot be decoded."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} is missing ({HINT})") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise OSError(f"cannot read image {path}: {e} ({HINT})") from e


def decode(path, max_side=None):
    """uint8 [3, H, W]; images whose shorter side exceeds `max_side` are reduced to it (PIL bicubic)."""
    image = read_image(path)
    w, h = image.size
    if max_side is not None and min(w, h) > max_side:
        s = max_side / min(w, h)
        image = image.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
    return pil_to_tensor(image).contiguous()


def square_size(image_size):
    """S from open_clip's visual.image_size (an int or an (S, S) pair)."""
    size = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size, image_size)
    if len(size) != 2 or size[0] != size[1] or int(size[0]) != size[0] or size[0] < 1:
        raise ValueError(f"image_size must be a positive int or a square (S, S) pair, got {image_size!r}")
    return int(size[0])


def crop_params(heights, widths, generator, scale=SCALE):
    """Per image (top, left, h, w) with torchvision RandomResizedCrop's distribution (area share in
    `scale`), all drawn at once."""
    n = len(heights)
    H, W = heights.double()[:, None], widths.double()[:, None]
    area = H * W * torch.empty(n, ATTEMPTS, dtype=torch.float64).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n, ATTEMPTS, dtype=torch.float64).uniform_(math.log(RATIO[0]), math.log(RATIO[1]),
                                                                      generator=generator)
    aspect = log_ratio.exp()
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.int().argmax(1, keepdim=True)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    # Fallback when no attempt fits: the largest centre crop with the ratio clamped to RATIO.
    H, W = H[:, 0], W[:, 0]
    in_ratio = W / H
    fw = torch.where(in_ratio < RATIO[0], W, torch.where(in_ratio > RATIO[1], (H * RATIO[1]).round(), W))
    fh = torch.where(in_ratio < RATIO[0], (W / RATIO[0]).round(), H)
    found = ok.any(1)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    u = torch.rand(n, 2, dtype=torch.float64, generator=generator)
    top = torch.where(found, (u[:, 0] * (H - h + 1)).floor(), ((H - h) / 2).floor())
    left = torch.where(found, (u[:, 1] * (W - w + 1)).floor(), ((W - w) / 2).floor())
    return [t.long() for t in (top, left, h, w)]


class TrainImages:
    """The few-shot train images, decoded once; `batch(indices)` returns augmented [B, 3, S, S] floats
    on `device`. Labels are the caller's: records[i].label.

    Images whose shorter side exceeds 2*S (448 for S=224) are reduced to it at decode: crops of at
    least ~1/4 of the image are downscaled to S anyway, so only the smallest crops of large images
    see fewer source pixels, and memory stays bounded (16 shots x 1000 classes fits).
    crop_from_original=True keeps every image as it is (the released code crops the original), at
    the memory of the full-resolution images."""

    def __init__(self, records, device, image_size, mean, std, generator=None, crop_from_original=False,
                 scale=SCALE):
        if len(records) == 0:
            raise ValueError("TrainImages needs at least one record")
        self.size = square_size(image_size)
        self.device = torch.device(device)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std must hold 3 values (std > 0), got {mean!r}, {std!r}")
        if generator is None:  # derived from the global seed, so main.py's seeding fixes it
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        if generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
        self.generator, self.scale = generator, tuple(scale)
        max_side = None if crop_from_original else 2 * self.size
        with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
            images = list(pool.map(lambda r: decode(r.path, max_side), records))
        self.heights = torch.tensor([im.shape[1] for im in images])
        self.widths = torch.tensor([im.shape[2] for im in images])
        self.nbytes = sum(im.numel() for im in images)
        self.on_device = self.device.type != "cuda" or \
            self.nbytes <= DEVICE_SHARE * torch.cuda.mem_get_info(self.device)[0]
        self.images = [im.to(self.device) if self.on_device else im.pin_memory() for im in images]
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(shape) * 255
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(shape) * 255

    def __len__(self):
        return len(self.images)

    def batch(self, indices):
        indices = torch.as_tensor(indices, dtype=torch.long).cpu()
        top, left, h, w = crop_params(self.heights[indices], self.widths[indices], self.generator, self.scale)
        flip = torch.rand(len(indices), generator=self.generator) < 0.5
        out = torch.empty(len(indices), 3, self.size, self.size, device=self.device)
        for b, (i, t, l, hh, ww) in enumerate(zip(*(x.tolist() for x in (indices, top, left, h, w)))):
            crop = self.images[i][None, :, t:t + hh, l:l + ww].to(self.device, non_blocking=True)
            if crop.device.type != "cpu":  # CUDA's kernel needs floats; the CPU one takes uint8 (PIL-like, faster)
                crop = crop.float()
            out[b] = F.interpolate(crop, size=(self.size, self.size), mode="bicubic", align_corners=False,
                                   antialias=True)[0]
        out.clamp_(0, 255)
        out = torch.where(flip.to(self.device)[:, None, None, None], out.flip(-1), out)
        return out.sub_(self.mean).div_(self.std)


class ImageRecords(Dataset):
    """(transform(image), label) per record."""

    def __init__(self, records, transform):
        self.records, self.transform = records, transform

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        return self.transform(read_image(r.path)), r.label


def test_loader(records, transform, batch_size, num_workers):
    """Batches of (images, labels) in record order; `transform` is open_clip's eval preprocess. The
    loader's own generator seeds its workers: an evaluation draws nothing from torch's global one, so
    training goes on with the same random numbers whether an evaluation ran or a cached result was used."""
    return DataLoader(ImageRecords(records, transform), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(0))


test_loader.__test__ = False  # not a test, for pytest modules that import it
