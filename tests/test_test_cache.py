"""The test split decoded once (datasets.test_cache) and zero-shot computed once (trial.zeroshot_eval):
the same numbers as decoding in every trial, reused by content, rebuilt when the content changes."""
import os

import open_clip
import pytest
import torch
from PIL import Image

from datasets.base import Record
from datasets.pipeline import test_loader
from datasets.test_cache import TestImages
from tests.test_main import DEMO, main_py

CPU = torch.device("cpu")


@pytest.fixture
def records(tmp_path):
    out = []
    for i in range(7):
        path = tmp_path / "images" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        size = (40 + 7 * i, 31 + 5 * i)  # odd sizes: resize and centre crop both act
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=torch.Generator().manual_seed(i))
        Image.fromarray(pixels.to(torch.uint8).numpy()).save(path)
        out.append(Record(str(path), i % 3, f"class {i % 3}"))
    return out


@pytest.mark.parametrize("size", [32, 224])
def test_batches_are_the_dataloaders_bit_for_bit(records, tmp_path, size):
    transform = open_clip.image_transform(size, is_train=False)
    streamed = list(test_loader(records, transform, batch_size=3, num_workers=0))
    cached = list(TestImages.of("t", records, transform, 3, CPU, tmp_path / "cache"))
    assert len(cached) == len(streamed) == 3
    for (a, y), (b, z) in zip(streamed, cached):
        assert torch.equal(a, b) and torch.equal(y, z)
    (array,) = (tmp_path / "cache" / "test_images" / "t").glob("*.npy")
    assert array.stat().st_size >= 7 * 3 * size * size  # uint8, decoded once


def test_the_array_is_reused_until_an_image_changes(records, tmp_path, caplog):
    transform = open_clip.image_transform(32, is_train=False)
    caplog.set_level("INFO", logger="datasets.test_cache")
    TestImages.of("t", records, transform, 4, CPU, tmp_path)
    TestImages.of("t", records, transform, 4, CPU, tmp_path)
    assert [m.split(":")[1].split(" into")[0].split(" reused")[0].strip() for m in caplog.messages] == [
        "7 images decoded once", "7 decoded images"]
    Image.new("RGB", (50, 50), (255, 0, 0)).save(records[2].path)  # edited in place
    os.utime(records[2].path, ns=(1, 1))
    fresh = TestImages.of("t", records, transform, 4, CPU, tmp_path)
    assert "decoded once" in caplog.messages[-1] and len(list((tmp_path / "test_images" / "t").glob("*.npy"))) == 2
    red = next(iter(fresh.subset([2])))[0]
    assert torch.equal(red, next(iter(test_loader(records[2:3], transform, 1, 0)))[0])
    assert not list((tmp_path / "test_images" / "t").glob("*.tmp"))


def test_a_transform_of_another_shape_streams_the_images(records, tmp_path):
    assert TestImages.of("t", records, lambda image: image, 4, CPU, tmp_path) is None


@pytest.mark.slow  # main.py in a subprocess
def test_the_second_trial_of_a_dataset_reuses_zero_shot_and_the_decoded_split(tmp_path):
    def log(method, name="debug"):
        return (tmp_path / "out" / name / "synthetic" / method / "4shot" / "seed1" / "main.log").read_text()

    main_py(tmp_path, *DEMO, "method=so,adam", multirun=True)
    assert "decoded once into" in log("so") and "zero-shot eval: top-1" not in log("so")
    assert "decoded images reused from" in log("adam") and "zero-shot eval: top-1 17.50 reused from" in log("adam")
    main_py(tmp_path, *DEMO, "method=lora", "cache_test_split=false")  # streamed; zero-shot still reused
    assert "decoded" not in log("lora") and "zero-shot eval: top-1" in log("lora")
    main_py(tmp_path, *DEMO, "method=lora", "precision=bf16", "name=bf16")  # another precision: computed
    assert "zero-shot eval: top-1" not in log("lora", "bf16") and "decoded images reused" in log("lora", "bf16")


def test_a_cache_that_cannot_be_written_is_skipped_not_fatal(records, tmp_path, monkeypatch, caplog):
    """No space for the array (posix_fallocate fails): the images are streamed, the trial goes on."""
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    caplog.set_level("WARNING", logger="datasets.test_cache")
    transform = open_clip.image_transform(32, is_train=False)
    assert TestImages.of("t", records, transform, 4, CPU, tmp_path) is None
    assert "not cached" in caplog.text and "No space left on device" in caplog.text
    assert not list((tmp_path / "test_images" / "t").iterdir())  # no partial array, no temporary


def test_an_evaluation_draws_nothing_from_the_global_generator(records):
    """Whether zero-shot is evaluated or reused, LoRA's dropout draws the same numbers after it."""
    transform = open_clip.image_transform(32, is_train=False)
    torch.manual_seed(0)
    list(test_loader(records, transform, batch_size=3, num_workers=0))
    after_a_loader = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after_a_loader)
