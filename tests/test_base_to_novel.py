"""Base-to-novel (CoCoOp's protocol): the class split, the harmonic mean, a trial, the table."""
import pytest

import datasets
from datasets.classes import base_and_novel, harmonic_mean
from tests.fixtures_datasets import write_benchmark
from tests.test_aggregate import aggregate, write
from tests.test_main import DEMO, main_py, results


def test_the_first_half_of_the_classes_is_base_and_novel_is_relabelled(tmp_path):
    write_benchmark(tmp_path / "data", "dtd")  # 3 classes: ceil(3 / 2) = 2 base, 1 novel
    full = datasets.build_dataset("dtd", tmp_path / "data", 2, 1, tmp_path / "cache")
    base, novel = base_and_novel(full)
    assert base.classnames == full.classnames[:2] and novel.classnames == full.classnames[2:]
    # the few-shot images of an all-class run, restricted to the base classes
    assert [(r.path, r.label) for r in base.train_x] == [(r.path, r.label) for r in full.train_x if r.label < 2]
    assert [r.path for r in base.val] == [r.path for r in full.val if r.label < 2]
    assert [(r.path, r.label) for r in novel.test] == [(r.path, r.label - 2) for r in full.test if r.label == 2]
    assert {r.label for r in base.test} == {0, 1} and novel.train_x == [] and novel.val == []
    assert (base.shots, base.seed, base.templates) == (2, 1, full.templates)


def test_harmonic_mean():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140) and harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(50.0, 50.0) == 50.0


@pytest.mark.slow
def test_a_base_to_novel_trial_reports_base_novel_and_their_harmonic_mean(tmp_path):
    main_py(tmp_path, *DEMO, "method=lora", "base_to_novel=true", "name=b2n")
    (res,) = results(tmp_path).values()
    assert (res["base_classes"], res["novel_classes"]) == (4, 4)  # synthetic_shift: 8 classes
    for b, n, hm in (("top1", "novel_top1", "hm"), ("zeroshot_top1", "zeroshot_novel_top1", "zeroshot_hm")):
        assert res[hm] == pytest.approx(2 * res[b] * res[n] / (res[b] + res[n]))
    assert res["top1"] != res["novel_top1"] or res["zeroshot_top1"] != res["zeroshot_novel_top1"]


def test_aggregate_makes_the_base_novel_hm_table(tmp_path, capsys):
    out = tmp_path / "out"
    for seed, shift in ((1, -1.0), (2, 1.0)):
        write(out, "b2n", "dtd", "so", 16, seed, 80.0 + shift, novel_top1=60.0 + shift)
        write(out, "b2n", "eurosat", "so", 16, seed, 90.0, novel_top1=70.0)
    write(out, "b2n", "dtd", "adam", 16, 1, 40.0)  # not a base-to-novel trial: not in the table
    stdout = aggregate(capsys, out)
    table = (out / "aggregate" / "base_to_novel.csv").read_text().splitlines()
    assert table[0] == ("shots,row,eurosat base,eurosat novel,eurosat HM,dtd base,dtd novel,dtd HM,"
                        "Average base,Average novel,Average HM")
    hm = lambda b, n: round(2 * b * n / (b + n), 2)  # noqa: E731
    assert table[1] == f"16,so,90.0,70.0,{hm(90, 70)},80.0,60.0,{hm(80, 60)},85.0,65.0,{hm(85, 65)}"
    assert len(table) == 2 and "## 16-shot: base / novel / HM" in stdout
