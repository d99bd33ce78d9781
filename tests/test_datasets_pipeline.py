"""The image pipeline: train images decoded once and augmented on the device; the test loader."""
import math

import open_clip
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop

import datasets
from datasets import pipeline
from datasets.base import Record
from datasets.pipeline import TrainImages, crop_params

MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
S = 32


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A few gradient images of different sizes (one larger than the decode cap)."""
    root = tmp_path_factory.mktemp("images")
    records = []
    for i, (w, h) in enumerate([(50, 40), (40, 60), (33, 33), (300, 200)]):
        y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        rgb = torch.stack([x * 255 // w, y * 255 // h, (x + y + 40 * i) % 256]).to(torch.uint8)
        Image.fromarray(rgb.permute(1, 2, 0).numpy()).save(root / f"{i}.png")
        records.append(Record(str(root / f"{i}.png"), i, f"class {i}"))
    return records


def test_batch_shape_determinism_and_decode_cap(images):
    make = lambda seed: TrainImages(images, "cpu", S, MEAN, STD, torch.Generator().manual_seed(seed))
    a, b, c = make(0), make(0), make(1)
    assert len(a) == 4 and a.on_device
    assert a.heights.tolist() == [40, 60, 33, 2 * S] and a.widths.tolist() == [50, 40, 33, 96]  # 300x200 capped
    idx = torch.tensor([0, 3, 1, 1, 2])
    x = a.batch(idx)
    assert x.shape == (5, 3, S, S) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert torch.equal(x, b.batch(idx)) and not torch.equal(x, c.batch(idx))
    assert not torch.equal(a.batch(idx), x)  # fresh parameters every call


def test_batch_equals_torchvision_resized_crop_flip_and_normalize(images):
    train = TrainImages(images, "cpu", S, MEAN, STD, torch.Generator().manual_seed(3))
    replay = torch.Generator()
    idx = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    flips = []
    for _ in range(3):
        replay.set_state(train.generator.get_state())
        top, left, h, w = crop_params(train.heights[idx], train.widths[idx], replay)
        flip = torch.rand(len(idx), generator=replay) < 0.5
        flips += flip.tolist()
        got = train.batch(idx)
        for b, i in enumerate(idx.tolist()):
            ref = TF.resized_crop(train.images[i], top[b].item(), left[b].item(), h[b].item(), w[b].item(),
                                  [S, S], InterpolationMode.BICUBIC, antialias=True)  # uint8, as PIL
            ref = TF.horizontal_flip(ref) if flip[b] else ref
            ref = TF.normalize(ref / 255, MEAN, STD)
            torch.testing.assert_close(got[b], ref, atol=1.01 / 255 / min(STD), rtol=0)  # one grey level
    assert any(flips) and not all(flips)


def test_crop_from_original_crops_the_full_resolution_image(images):
    """crop_from_original=True (the released code's crops): the 300x200 image stays whole, and a crop of
    it is taken from its own pixels, not from the 96x64 reduction."""
    train = TrainImages(images, "cpu", S, MEAN, STD, torch.Generator().manual_seed(5), crop_from_original=True)
    assert train.heights.tolist() == [40, 60, 33, 200] and train.widths.tolist() == [50, 40, 33, 300]
    original = pipeline.decode(images[3].path)
    assert torch.equal(train.images[3], original)
    replay = torch.Generator()
    replay.set_state(train.generator.get_state())
    idx = torch.tensor([3, 3, 3, 3])
    top, left, h, w = crop_params(train.heights[idx], train.widths[idx], replay)
    flip = torch.rand(len(idx), generator=replay) < 0.5
    got = train.batch(idx)
    for b in range(len(idx)):
        ref = TF.resized_crop(original, top[b].item(), left[b].item(), h[b].item(), w[b].item(), [S, S],
                              InterpolationMode.BICUBIC, antialias=True)
        ref = TF.normalize((TF.horizontal_flip(ref) if flip[b] else ref) / 255, MEAN, STD)
        torch.testing.assert_close(got[b], ref, atol=1.01 / 255 / min(STD), rtol=0)
    reduced = TrainImages(images, "cpu", S, MEAN, STD, torch.Generator().manual_seed(5))
    assert not torch.allclose(reduced.batch(idx), got, atol=0.1)  # the same crops, fewer source pixels


def test_crop_parameters_follow_torchvision_distribution():
    n = 8000
    top, left, h, w = crop_params(torch.full((n,), 375), torch.full((n,), 500), torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    ref = torch.tensor([RandomResizedCrop.get_params(torch.empty(3, 375, 500), [0.08, 1.0], [3 / 4, 4 / 3])
                        for _ in range(n)], dtype=torch.float64)
    for ours, theirs in zip((top, left, h, w), ref.T):  # means within 4 standard errors, stds within 3%
        ours = ours.double()
        assert abs(ours.mean() - theirs.mean()) < 4 * theirs.std() * math.sqrt(2 / n)
        assert abs(ours.std() / theirs.std() - 1) < 0.03
    area = (h * w).double() / (375 * 500)
    assert area.min() >= 0.079 and area.max() <= 1.0
    assert ((w / h).double().log().abs() <= math.log(4 / 3) + 0.02).all()
    assert ((top + h) <= 375).all() and ((left + w) <= 500).all() and (top >= 0).all() and (left >= 0).all()
    # A strip no crop fits in: torchvision's centre-crop fallback.
    strip = torch.empty(3, 1000, 10)
    assert [t.item() for t in crop_params(torch.tensor([1000]), torch.tensor([10]), torch.Generator())] == \
        list(RandomResizedCrop.get_params(strip, [0.08, 1.0], [3 / 4, 4 / 3]))


def test_constant_image_normalizes_to_the_expected_value(tmp_path):
    Image.new("RGB", (70, 45), (255, 128, 0)).save(tmp_path / "c.jpg", quality=100)
    x = TrainImages([Record(str(tmp_path / "c.jpg"), 0, "c")], "cpu", S, MEAN, STD).batch(torch.zeros(4, dtype=int))
    expected = torch.tensor([(v / 255 - m) / s for v, m, s in zip((255, 128, 0), MEAN, STD)])
    torch.testing.assert_close(x.mean((0, 2, 3)), expected, atol=0.02, rtol=0)


def test_bad_arguments(images):
    with pytest.raises(ValueError, match="image_size must be a positive int or a square"):
        TrainImages(images, "cpu", (32, 48), MEAN, STD)
    with pytest.raises(ValueError, match="at least one record"):
        TrainImages([], "cpu", S, MEAN, STD)
    assert TrainImages(images[:1], "cpu", (S, S), MEAN, STD).size == S


def test_test_loader_with_open_clip_eval_transform(tmp_path):
    ds = datasets.build_dataset("synthetic", tmp_path / "synthetic", 1, 1, tmp_path)
    transform = open_clip.image_transform(S, is_train=False, mean=MEAN, std=STD)
    records = ds.test[:10]
    batches = list(pipeline.test_loader(records, transform, batch_size=4, num_workers=2))
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, S, S), (4, 3, S, S), (2, 3, S, S)]
    assert torch.cat([y for _, y in batches]).tolist() == [r.label for r in records]
    torch.testing.assert_close(batches[0][0][1], transform(Image.open(records[1].path)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_match_cpu_on_device_and_pinned(images, monkeypatch):
    cpu = TrainImages(images, "cpu", S, MEAN, STD, torch.Generator().manual_seed(0))
    gpu = TrainImages(images, "cuda", S, MEAN, STD, torch.Generator().manual_seed(0))
    monkeypatch.setattr(pipeline, "DEVICE_SHARE", 0.0)
    pinned = TrainImages(images, "cuda", S, MEAN, STD, torch.Generator().manual_seed(0))
    assert gpu.on_device and not pinned.on_device and pinned.images[0].is_pinned()
    idx = torch.tensor([3, 2, 1, 0])
    ref = cpu.batch(idx)
    for other in (gpu, pinned):
        x = other.batch(idx)
        assert x.device.type == "cuda"
        torch.testing.assert_close(x.cpu(), ref, atol=1e-3, rtol=0)
