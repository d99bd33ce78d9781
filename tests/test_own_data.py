"""Your own data in, your adapted model out, in three commands: train on a folder of images, export the
adapted CLIP, predict; the exported file reloads through open_clip alone and predicts what predict.py
predicts, with the run's top-1 on its test split."""
import csv
import json
import subprocess
import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import so.clip.model  # noqa: F401  (registers the tiny model's open_clip config, as export.py says)
from datasets.pipeline import read_image
from tests.test_folder import image_folder
from tests.test_main import ROOT, main_py, results

pytestmark = pytest.mark.slow  # main.py and the scripts in subprocesses


def script(*args):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@torch.no_grad()
def open_clip_alone(path, name, classnames, templates, images):
    """Probabilities [N, C] from open_clip's own model, transform and tokenizer, the exported file's weights."""
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(path))
    tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    text = F.normalize(model.encode_text(tokenizer([t.format(c) for c in classnames for t in templates])), dim=-1)
    text = F.normalize(text.view(len(classnames), len(templates), -1).mean(1), dim=-1)
    image = F.normalize(model.encode_image(torch.stack([preprocess(read_image(p)) for p in images])), dim=-1)
    return (100 * image @ text.T).softmax(dim=-1)


def test_train_export_predict_on_a_folder_of_your_images(tmp_path):
    data = image_folder(tmp_path / "my_products", per_class=12)
    main_py(tmp_path, "dataset=folder", f"dataset.root={data}", "debug=fast", "shots=4", "save=true",
            "method=so,lora", "optimizer.lr=1e-2", "dataset.templates=ensemble7", "max_iters=8", multirun=True)
    runs = results(tmp_path)
    assert sorted(runs) == [f"debug/my_products/{m}/4shot/seed1/results.json" for m in ("lora", "so")]
    (split_file,) = (tmp_path / "cache" / "folder_splits").rglob("split_*.json")
    test = [data / rel for rel, _, _ in json.loads(split_file.read_text())["test"]]
    labels = torch.tensor([label for _, label, _ in json.loads(split_file.read_text())["test"]])
    for path, res in runs.items():
        run_dir = (tmp_path / "out" / path).parent
        assert res["classnames"] == ["blue bottle", "green box", "red mug"] and len(res["templates"]) == 7
        out = tmp_path / f"{res['method']}.safetensors"
        assert "open_clip.create_model_and_transforms('so-tiny'" in script("scripts/export.py", run_dir, out)
        with safe_open(out, "pt") as f:
            assert json.loads(f.metadata()["classnames"]) == res["classnames"]
        alone = open_clip_alone(out, "so-tiny", res["classnames"], res["templates"], test)
        assert 100 * float((alone.argmax(1) == labels).float().mean()) == pytest.approx(res["top1"])  # the run's
        script("scripts/predict.py", run_dir, data, "--top-k", "3", "--csv", tmp_path / "pred.csv")
        with open(tmp_path / "pred.csv") as f:
            rows = {(r["path"], r["class"]): float(r["probability"]) for r in csv.DictReader(f)}
        everything = sorted(p for p in data.rglob("*.jpg"))
        alone = open_clip_alone(out, "so-tiny", res["classnames"], res["templates"], everything)
        for path, probabilities in zip(everything, alone):
            for c, name in enumerate(res["classnames"]):
                assert rows[(str(path), name)] == pytest.approx(float(probabilities[c]), abs=1e-4)
