"""Weights & Biases logging that never hangs or prompts: offline unless an API key is configured."""
import logging
import netrc
import os

log = logging.getLogger(__name__)


def resolve_mode(mode):
    """auto -> online when WANDB_API_KEY or a ~/.netrc entry for api.wandb.ai exists, else offline.
    A WANDB_MODE environment variable wins over the config, as in wandb itself."""
    mode = os.environ.get("WANDB_MODE", mode)
    if mode not in ("auto", "online", "offline", "disabled", "dryrun", "run"):
        raise ValueError(f"logger.mode={mode!r}: expected auto, online, offline or disabled")
    if mode != "auto":
        return mode
    return "online" if _has_api_key() else "offline"


def _has_api_key():
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def start_run(cfg_logger, config, run_dir, name):
    """Return a wandb run, or None when logging is disabled."""
    mode = resolve_mode(cfg_logger.mode)
    if mode == "disabled":
        return None
    import wandb

    log.info("W&B mode: %s", mode)
    return wandb.init(
        project=cfg_logger.project,
        entity=cfg_logger.entity,
        group=cfg_logger.group,
        tags=list(cfg_logger.tags),
        name=name,
        config=config,
        dir=str(run_dir),
        mode=mode,
        settings=wandb.Settings(silent=True, init_timeout=60),
    )
