"""Building a run's pieces from its config: the data module, the model, a warm start; the one place `km train`,
`km eval`, `km sample` and the studies get them from (so training and evaluation never import each other)."""

from __future__ import annotations

import inspect
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from km.config import ConfigError, DataConfig, to_dict
from km.models import EpisodeModel, model_class
from km.runs import RunError, load_checkpoint, locate
from km.schema import CONFIGS


def quiet_lightning() -> None:
    """Keep the console for our own messages: Lightning's info logs (GPU/TPU available, model summary) off.

    Warnings stay visible. The one filtered is not ours to fix: Lightning 2.6's CombinedLoader builds
    ``torch.utils._pytree.LeafSpec()``, which torch >= 2.14 deprecates (pytorch_lightning/utilities/_pytree.py);
    it fires once per fit whatever the data, and only that module's instance is filtered."""
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*LeafSpec.*", module=r"pytorch_lightning\.utilities\._pytree")


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """The data module of `cfg.data` (nothing loaded yet); options a data set does not take are refused unless
    they keep their defaults."""
    from datamodules import DATAMODULES
    from datamodules import build_datamodule as by_name

    cls = DATAMODULES.get(cfg.data.name)
    if cls is None:
        raise ConfigError(f"unknown data set '{cfg.data.name}'; valid: {', '.join(sorted(DATAMODULES))}")
    accepted = {n for c in cls.__mro__ for n in inspect.signature(c.__init__).parameters}
    kw: dict[str, Any] = {}
    for k, v in to_dict(cfg.data).items():
        if k == "name" or (k == "val_size" and v is None):
            continue
        if k in accepted:
            kw[k] = v
        elif v != getattr(DataConfig, k):
            raise ConfigError(f"data.{k}={v} does not apply to {cfg.data.name}")
    return by_name(cfg.data.name, seed=cfg.seed, **kw)


def build_model(cfg: DictConfig, image_shape: tuple[int, int, int], likelihood: str) -> EpisodeModel:
    cls = model_class(cfg.model.name)
    model_cfg = OmegaConf.to_object(cfg.model)  # the model's dataclass, nested ones (kl_weights) included
    net = OmegaConf.to_object(cfg.net)
    model = cls(model_cfg, net, image_shape, likelihood)
    model.km_config = to_dict(cfg)
    model.is_samples = cfg.eval.is_samples
    model.heldout_targets = cfg.eval.heldout_targets
    if cfg.trainer.compile:
        from km.compiling import known_backends

        backends = known_backends()
        if cfg.trainer.compile_backend not in backends:
            raise ConfigError(
                f"bad value for 'trainer.compile_backend': {cfg.trainer.compile_backend} "
                f"(torch.compile knows: {', '.join(backends)})"
            )
        model.compile_steps(str(cfg.trainer.compile_backend))
    return model


def init_weights_from(model: EpisodeModel, source: str) -> tuple[Path, str]:
    """Warm start: copy the shared perception nets (encoder, decoder) and the bottom-up z head
    (`EpisodeModel.z_head`, e.g. VAE `q_z` -> KM `q_z_bottom`) from another run's checkpoint.
    Everything else (memory, addressing, ...) keeps its fresh initialisation. Returns (checkpoint, summary line)."""
    _, ckpt = locate(source)
    try:
        state = load_checkpoint(ckpt)
    except RunError as e:
        raise RunError(f"init_from={source}: {e}") from None
    weights = state["state_dict"]
    src_cfg = state.get("km_config") or {}  # the source run's resolved config
    src_model = (src_cfg.get("model") or {}).get("name")
    src_head = model_class(src_model).z_head if src_model in CONFIGS else None
    pairs = [(k, k) for k in weights if k.split(".", 1)[0] in ("encoder", "decoder")]
    if src_head and model.z_head:
        pairs += [(f"{src_head}.{p}", f"{model.z_head}.{p}") for p in ("weight", "bias")]
    own = model.state_dict()
    missing = [d for _, d in pairs if d not in own] + [
        k for k in own if k.split(".", 1)[0] in ("encoder", "decoder") and k not in weights
    ]
    bad = [
        f"{d} {tuple(weights[s].shape)} -> {tuple(own[d].shape)}"
        for s, d in pairs
        if d in own and weights[s].shape != own[d].shape
    ]
    if missing or bad:
        hint = (
            f" (source run: net={src_cfg.get('net')}, model.code_dim={(src_cfg.get('model') or {}).get('code_dim')})"
            if src_cfg
            else ""
        )
        raise RunError(
            f"init_from={source}: the nets do not match{hint}: "
            + "; ".join((bad + [f"{k} missing" for k in missing])[:4])
            + " - use the same net and code_dim"
        )
    with torch.no_grad():
        for s, d in pairs:
            own[d].copy_(weights[s])
    heads = f", {src_head} -> {model.z_head}" if src_head and model.z_head else ""
    return (
        ckpt,
        f"initialised encoder, decoder{heads} from {ckpt} ({src_model or 'unknown model'}, {len(pairs)} tensors)",
    )


def plain_batches_for_memoryless(cfg: DictConfig) -> None:
    """A model without an episode-level latent (VAE) trains on iid batches: `data.episodes=class` (or mixed) groups
    a minibatch into few classes, which handicaps such a model and biases any comparison against it.
    Test episodes (`data.eval_episodes`) are untouched, so every model is scored on the same episodes."""
    if not model_class(cfg.model.name).episodic and str(cfg.data.episodes) in ("class", "mixed"):
        was = str(cfg.data.episodes)
        cfg.data.episodes = "iid"
        print(
            f"model={cfg.model.name} has no episode memory: it trains on iid batches "
            f"(data.episodes={was} applies to memory models only)",
            file=sys.stderr,
        )
