"""The sweep scripts: --dry-run trial lists (exact lines and counts), the multiruns they launch, errors."""
import os
import subprocess

import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ELEVEN = ["imagenet", "sun397", "fgvc_aircraft", "eurosat", "stanford_cars", "food101", "oxford_pets",
          "oxford_flowers", "caltech101", "dtd", "ucf101"]  # the paper's column order
LIST_VARS = ("DATA", "DATASETS", "METHODS", "SHOTS", "SEEDS", "NAME", "VARIANTS", "DENSITIES", "REFRESH_EVERY",
             "METHOD", "PYTHON", "PROTOCOL", "TARGETS")


def script(name, *args, check=True, **env):
    clean = {k: v for k, v in os.environ.items() if k not in LIST_VARS}
    proc = subprocess.run(["bash", f"scripts/{name}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**clean, **env})
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout + proc.stderr)
    return proc


def trials(name, *args, **env):
    return script(name, "--dry-run", *args, **env).stdout.splitlines()


def test_main_table_lists_825_trained_and_11_zeroshot_trials():
    proc = script("main_table.sh", "--dry-run")
    lines = proc.stdout.splitlines()
    assert len(lines) == 836 and len(set(lines)) == 836
    zeroshot = [line for line in lines if "method=zeroshot" in line]
    assert zeroshot == [f"name=main_table dataset={d} method=zeroshot shots=1 seed=1" for d in ELEVEN]
    expected = {f"name=main_table dataset={d} method={m} shots={k} seed={s}"
                for d in ELEVEN for m in ("so", "relora", "lora", "galore", "adam") for k in (1, 2, 4, 8, 16)
                for s in (1, 2, 3)}
    assert set(lines) - set(zeroshot) == expected
    assert "836 trials in all (dry run: nothing launched)." in proc.stderr


def test_main_table_takes_lists_and_overrides_from_the_environment():
    proc = script("main_table.sh", "--dry-run", "max_iters=5", "paths.data_root=/data", DATASETS="dtd eurosat",
                  METHODS="adam zeroshot", SHOTS="2 4", SEEDS="7", NAME="mine")
    assert proc.stdout.splitlines() == [
        "name=mine dataset=dtd method=zeroshot shots=2 seed=7",
        "name=mine dataset=eurosat method=zeroshot shots=2 seed=7",
        "name=mine dataset=dtd method=adam shots=2 seed=7",
        "name=mine dataset=dtd method=adam shots=4 seed=7",
        "name=mine dataset=eurosat method=adam shots=2 seed=7",
        "name=mine dataset=eurosat method=adam shots=4 seed=7"]
    assert "paths.data_root: /data" in proc.stderr and "extra overrides for every trial: max_iters=5 paths.data_root=/data" in proc.stderr


def test_main_table_launches_one_multirun_per_group():
    proc = script("main_table.sh", "hydra/launcher=slurm", PYTHON="echo", DATASETS="dtd eurosat",
                  METHODS="so zeroshot lora", SHOTS="1 16", SEEDS="1 2 3")
    assert proc.stdout.splitlines() == [
        "main.py -m name=main_table dataset=dtd,eurosat method=zeroshot shots=1 seed=1 hydra/launcher=slurm",
        "main.py -m name=main_table dataset=dtd,eurosat method=so,lora shots=1,16 seed=1,2,3 hydra/launcher=slurm"]
    assert "Launching 2 trials: echo main.py -m" in proc.stderr and "26 trials in all." in proc.stderr


def test_ablations_list_the_papers_rows_one_variant_per_experiment_name():
    lines = trials("ablations.sh")
    assert len(lines) == 7 * 11 * 2 * 3  # variants x datasets x shots (1 and 4) x seeds
    assert {line.split(" shots=")[1] for line in lines} == {f"{k} seed={s}" for k in (1, 4) for s in (1, 2, 3)}
    small = trials("ablations.sh", DATASETS="dtd", SHOTS="4", SEEDS="1")
    assert small == [
        "name=ablations/adam dataset=dtd method=adam shots=4 seed=1",
        "name=ablations/moment_dense dataset=dtd method=so optimizer.moment_selection=dense shots=4 seed=1",
        "name=ablations/so dataset=dtd method=so shots=4 seed=1",
        "name=ablations/grad_topk dataset=dtd method=so optimizer.grad_selection=topk shots=4 seed=1",
        "name=ablations/moment_random dataset=dtd method=so optimizer.moment_selection=random shots=4 seed=1",
        "name=ablations/support_static dataset=dtd method=so optimizer.support=static shots=4 seed=1",
        "name=ablations/no_momentum dataset=dtd method=so optimizer.momentum=false shots=4 seed=1"]
    proc = script("ablations.sh", PYTHON="echo", VARIANTS="no_momentum", DATASETS="dtd ucf101", SHOTS="1 4")
    assert proc.stdout.splitlines() == [
        "main.py -m name=ablations/no_momentum dataset=dtd,ucf101 method=so optimizer.momentum=false shots=1,4 seed=1,2,3"]


@pytest.mark.parametrize("protocol, methods", [("official_so", ["so_reference_cli"]), ("clip_lora", ["lora"])])
def test_main_table_under_each_preset_lists_its_trials(protocol, methods):
    proc = script("main_table.sh", "--dry-run", PROTOCOL=protocol)
    lines = proc.stdout.splitlines()
    trained = {f"name=main_table_{protocol} dataset={d} method={m} protocol={protocol} shots={k} seed={s}"
               for d in ELEVEN for m in methods for k in (1, 2, 4, 8, 16) for s in (1, 2, 3)}
    zeroshot = [f"name=main_table_{protocol} dataset={d} method=zeroshot protocol={protocol} shots=1 seed=1"
                for d in ELEVEN] if protocol == "official_so" else []
    assert lines == zeroshot + sorted(trained, key=lines.index)
    assert set(lines) == trained | set(zeroshot)
    assert f"{len(lines)} trials in all (dry run: nothing launched)." in proc.stderr
    launched = script("main_table.sh", PYTHON="echo", PROTOCOL=protocol, DATASETS="dtd", SHOTS="4", SEEDS="3")
    assert launched.stdout.splitlines()[-1] == (f"main.py -m name=main_table_{protocol} dataset=dtd "
                                                f"method={methods[0]} protocol={protocol} shots=4 seed=3")


def test_main_table_rejects_an_unknown_protocol():
    proc = script("main_table.sh", "--dry-run", check=False, PROTOCOL="dassl")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "unknown PROTOCOL 'dassl' (expected one of:" in proc.stderr and "official_so" in proc.stderr


def test_sensitivity_lists_the_density_by_refresh_grid():
    lines = trials("sensitivity.sh")
    assert len(lines) == 5 * 5 * 3 * 1 * 3
    assert lines[0] == ("name=sensitivity/density1e-5_refresh1 dataset=dtd method=so optimizer.density=1e-5 "
                        "optimizer.refresh_every=1 shots=4 seed=1")
    small = trials("sensitivity.sh", DENSITIES="5e-4 1e-3", REFRESH_EVERY="10", DATASETS="dtd", SEEDS="2")
    assert small == [
        "name=sensitivity/density5e-4_refresh10 dataset=dtd method=so optimizer.density=5e-4 optimizer.refresh_every=10 shots=4 seed=2",
        "name=sensitivity/density1e-3_refresh10 dataset=dtd method=so optimizer.density=1e-3 optimizer.refresh_every=10 shots=4 seed=2"]


def test_help_and_bad_arguments():
    for name in ("main_table.sh", "ablations.sh", "sensitivity.sh"):
        proc = script(name, "--help")
        assert proc.stdout.splitlines()[0] and f"Usage: scripts/{name} [--dry-run]" in proc.stdout
        assert "#" not in proc.stdout.split("Usage")[0]
        bad = script(name, "--dry-rn", check=False)
        assert bad.returncode == 2 and "unknown option '--dry-rn'" in bad.stderr and bad.stdout == ""
        bad = script(name, "dtd", check=False)
        assert bad.returncode == 2 and "'dtd' is not a Hydra override (expected key=value" in bad.stderr
    bad = script("ablations.sh", "--dry-run", VARIANTS="so no_such", check=False)
    assert bad.returncode == 2 and bad.stdout == ""
    assert ("unknown variant 'no_such' in VARIANTS (expected some of: adam moment_dense so grad_topk "
            "moment_random support_static no_momentum)") in bad.stderr


@pytest.mark.slow  # launches the multiruns
def test_a_failed_multirun_is_reported_and_the_others_still_run():
    proc = script("ablations.sh", PYTHON="false", VARIANTS="so no_momentum", DATASETS="dtd", check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("Launching") == 2
    assert "Multiruns with failed trials: ablations/so ablations/no_momentum. Re-run the same command" in proc.stderr


def test_base_to_novel_lists_every_dataset_at_16_shots_with_the_key():
    lines = trials("base_to_novel.sh")
    methods = ("so", "relora", "lora", "galore", "adam")
    expected = {f"name=base_to_novel dataset={d} method={m} base_to_novel=true shots=16 seed={s}"
                for d in ELEVEN for m in methods for s in (1, 2, 3)}
    zeroshot = [f"name=base_to_novel dataset={d} method=zeroshot base_to_novel=true shots=16 seed=1" for d in ELEVEN]
    assert lines[:11] == zeroshot and set(lines[11:]) == expected and len(lines) == 11 + len(expected)


def test_the_loaders_the_configs_and_the_sweeps_read_one_list_of_the_eleven():
    from hydra.core.config_store import ConfigStore

    import datasets
    import main  # noqa: F401  (registers the datasets' configs)
    from datasets import catalog

    assert list(catalog.BENCHMARKS) == ELEVEN and list(datasets.LOADERS)[:11] == ELEVEN
    configs = {name.removesuffix(".yaml") for name in ConfigStore.instance().list("dataset")}
    assert set(ELEVEN) < configs == set(datasets.LOADERS)
    listed = script("main_table.sh", "--dry-run", METHODS="zeroshot").stdout.splitlines()
    assert [line.split()[1].removeprefix("dataset=") for line in listed] == ELEVEN


def test_dg_table_trains_on_imagenet_then_evaluates_each_target():
    lines = trials("dg_table.sh", METHODS="so zeroshot", SEEDS="1 2")
    targets = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
    trained_from = "trained_from=${paths.out_root}/${name}/imagenet/${method.label}/${shots}shot/seed${seed}"
    assert lines == (
        [f"name=dg_table dataset={d} method=zeroshot shots=16 seed=1" for d in ("imagenet", *targets)]
        + [f"name=dg_table dataset=imagenet method=so save=true shots=16 seed={s}" for s in (1, 2)]
        + [f"name=dg_table dataset={d} method=so eval_only=true {trained_from} shots=16 seed={s}"
           for d in targets for s in (1, 2)])


def test_the_word_baselines_stands_for_the_fields_table():
    lines = trials("main_table.sh", DATASETS="dtd", SHOTS="4", SEEDS="1", METHODS="so baselines zeroshot")
    methods = [line.split("method=")[1].split()[0] for line in lines]
    assert methods == ["zeroshot", "so", "coop", "coop4", "cocoop", "kgcoop", "clip_adapter", "tip_adapter",
                       "tip_adapter_f", "taskres", "lp", "clap"]
    assert len(trials("sandbox_table.sh", METHODS="baselines")) == 2 * 10 * 3 * 3
