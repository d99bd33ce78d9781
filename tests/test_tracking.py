import pytest
from omegaconf import OmegaConf

from so.clip.tracking import resolve_mode, start_run


@pytest.fixture
def no_wandb_env(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))


def test_auto_mode_is_offline_without_key_and_online_with_one(no_wandb_env, monkeypatch):
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"


def test_bad_mode_names_the_key(no_wandb_env):
    with pytest.raises(ValueError, match="logger.mode='sometimes'"):
        resolve_mode("sometimes")


def test_disabled_returns_none(no_wandb_env, tmp_path):
    cfg = OmegaConf.create({"mode": "disabled"})
    assert start_run(cfg, {}, tmp_path, "x") is None


def test_offline_run_is_written(no_wandb_env, tmp_path):
    cfg = OmegaConf.create({"mode": "auto", "project": "so-clip-test", "entity": None,
                            "group": "synthetic-1shot-so", "tags": ["seed1", "test"]})
    run = start_run(cfg, {"shots": 1}, tmp_path, "synthetic-so-1shot-seed1")
    run.log({"train/loss": 0.5}, step=1)
    run.summary["top1"] = 42.0
    run.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
