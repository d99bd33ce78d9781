"""Accuracy curves during training (eval_every, eval_subset) and aggregate.py's curve plot."""
import json

import pytest

import trial
from tests.test_aggregate import aggregate, aggregate_module, write
from tests.test_main import DEMO, main_py, results


def test_eval_subset_is_the_same_images_for_the_same_seed():
    records = list(range(100))
    a, b, c = (trial.eval_subset(records, 10, seed) for seed in (1, 1, 2))
    assert a == b and a != c and len(a) == 10 == len(set(a)) and a == sorted(a)  # indices, in split order
    assert trial.eval_subset(records, 0, 1) == trial.eval_subset(records, 100, 1) == records  # all of them


@pytest.mark.slow
def test_the_curve_is_at_the_iterations_asked_and_changes_nothing_else(tmp_path):
    """LoRA (dropout draws from the global RNG) with a curve point every 2 of 6 iterations, on a subset
    of 20 test images; the same trial without the curve ends identically."""
    common = [*DEMO, "method=lora", "max_iters=6", "stop_loss=0"]
    main_py(tmp_path, *common, "name=curve", "eval_every=2", "eval_subset=20")
    main_py(tmp_path, *common, "name=plain")
    main_py(tmp_path, *common, "name=zero", "eval_every=0")
    found = {path.split("/")[0]: res for path, res in results(tmp_path).items()}
    curve = found["curve"]["curve"]
    assert [p["iteration"] for p in curve] == [2, 4, 6] and found["curve"]["curve_images"] == 20
    assert all(0 <= p["top1"] <= 100 and p["top1"] == round(p["top1"] * 20 / 100) * 5 for p in curve)
    assert all(p["loss"] > 0 for p in curve) and curve[0]["lr"] > curve[1]["lr"] > curve[2]["lr"]
    plain, zero = found["plain"], found["zero"]
    assert "curve" not in plain and "curve" not in zero
    skip = {"config", "name", "train_seconds", "curve", "curve_images"}
    assert {k: v for k, v in zero.items() if k not in skip} == {k: v for k, v in plain.items() if k not in skip}
    assert {k: v for k, v in found["curve"].items() if k not in skip} == \
        {k: v for k, v in plain.items() if k not in skip}  # the same training: same loss, same top-1


def curves_sweep(out):
    """lora and so on dtd, 2 seeds, curves at 10, 20, 30; lora rises then falls, so rises."""
    for seed in (1, 2):
        for method, top1s in (("lora", (60, 70, 50)), ("so", (55, 60, 65))):
            curve = [{"iteration": 10 * (i + 1), "top1": t + seed, "loss": 1.0, "lr": 1e-3} for i, t in enumerate(top1s)]
            write(out, "study", "dtd", method, 4, seed, top1s[-1] + seed, curve=curve, curve_images=100)
        write(out, "study", "dtd", "adam", 4, seed, 40.0)  # no curve: not drawn


def test_aggregate_draws_accuracy_against_iterations_per_method(tmp_path, capsys):
    out = tmp_path / "out"
    curves_sweep(out)
    aggregate(capsys, out)
    table = aggregate_module.pd.read_csv(out / "aggregate" / "curves.csv")
    lora = table[table["row"] == "lora"].sort_values("iteration")
    assert lora["iteration"].tolist() == [10, 20, 30] and lora["mean"].tolist() == [61.5, 71.5, 51.5]
    assert lora["std"].round(4).tolist() == [0.7071] * 3 and set(table["row"]) == {"lora", "so"}
    assert (out / "aggregate" / "curves_4shot.png").is_file()
    fig = aggregate_module.plot_curves(table, ["dtd"], 4)
    (ax,) = [a for a in fig.axes if a.get_visible() and a.lines]
    assert ax.get_title() == "dtd" and ax.get_xlabel() == "iteration" and ax.get_ylabel() == "top-1 (%)"
    assert sorted(line.get_label() for line in ax.lines) == ["lora", "so"]
    lines = {line.get_label(): line for line in ax.lines}
    assert list(lines["lora"].get_ydata()) == [61.5, 71.5, 51.5]


def test_no_curves_no_curve_files(tmp_path, capsys):
    out = tmp_path / "out"
    write(out, "t", "dtd", "so", 1, 1, 50.0)
    aggregate(capsys, out)
    assert not list((out / "aggregate").glob("curves*"))
