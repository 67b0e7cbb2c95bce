"""`km train`: build data, model, loggers and trainer from a config; fit; resume; test.

The one place a run is assembled. Models only implement `EpisodeModel`; data modules only
serve episodes; everything about run directories, checkpoints and logging happens here.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from km.callbacks import AtomicCheckpointIO, DebugSigkill, EpochSeed, EpochSummary, SampleGrid, seed_all
from km.config import apply_overrides, group_choices, to_dict, to_yaml, typed
from km.models import MODELS, EpisodeModel
from km.runs import (
    RunError,
    RunLock,
    atomic_write_text,
    last_checkpoint,
    load_checkpoint,
    locate,
    new_run_id,
    read_meta,
    resolve_resume,
    truncate_metrics,
    write_meta,
)


def quiet_lightning() -> None:
    """Keep the console for our own messages: Lightning's tips and PossibleUserWarnings off."""
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*Experiment logs directory.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*is deprecated.*", category=DeprecationWarning)


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    import inspect

    from datamodules import DATAMODULES
    from km.config import ConfigError, DataConfig

    cls = DATAMODULES.get(cfg.data.name)
    if cls is None:
        raise ConfigError(f"unknown data set '{cfg.data.name}'; valid: {', '.join(sorted(DATAMODULES))}")
    accepted = {n for c in cls.__mro__ for n in inspect.signature(c.__init__).parameters} if cls else set()
    kw: dict[str, Any] = {}
    for k, v in to_dict(cfg.data).items():
        if k == "name" or (k == "val_size" and v is None):
            continue
        if k in accepted:
            kw[k] = v
        elif v != getattr(DataConfig, k):
            raise ConfigError(f"data.{k}={v} does not apply to {cfg.data.name}")
    return cls(seed=cfg.seed, **kw)


def build_model(cfg: DictConfig, image_shape: tuple[int, int, int], likelihood: str) -> EpisodeModel:
    cls = MODELS[cfg.model.name][0]
    model_cfg = OmegaConf.to_object(cfg.model)  # the model's dataclass, nested ones (kl_weights) included
    net = OmegaConf.to_object(cfg.net)
    model = cls(model_cfg, net, image_shape, likelihood)
    model.km_config = to_dict(cfg)
    model.is_samples = cfg.eval.is_samples
    model.heldout_targets = cfg.eval.heldout_targets
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
    src_head = MODELS[src_model][0].z_head if src_model in MODELS else None
    pairs = [(k, k) for k in weights if k.split(".", 1)[0] in ("encoder", "decoder")]
    if src_head and model.z_head:
        pairs += [(f"{src_head}.{p}", f"{model.z_head}.{p}") for p in ("weight", "bias")]
    own = model.state_dict()
    missing = [d for _, d in pairs if d not in own] + [k for k in own if k.split(".", 1)[0] in ("encoder", "decoder")
                                                       and k not in weights]
    bad = [f"{d} {tuple(weights[s].shape)} -> {tuple(own[d].shape)}" for s, d in pairs
           if d in own and weights[s].shape != own[d].shape]
    if missing or bad:
        hint = (f" (source run: net={src_cfg.get('net')}, model.code_dim={(src_cfg.get('model') or {}).get('code_dim')})"
                if src_cfg else "")
        raise RunError(f"init_from={source}: the nets do not match{hint}: "
                       + "; ".join((bad + [f"{k} missing" for k in missing])[:4]) + " - use the same net and code_dim")
    with torch.no_grad():
        for s, d in pairs:
            own[d].copy_(weights[s])
    heads = f", {src_head} -> {model.z_head}" if src_head and model.z_head else ""
    return ckpt, f"initialised encoder, decoder{heads} from {ckpt} ({src_model or 'unknown model'}, {len(pairs)} tensors)"


def plain_batches_for_memoryless(cfg: DictConfig) -> None:
    """A model without an episode-level latent (VAE) trains on iid batches: `data.episodes=class` groups
    a minibatch into few classes, which handicaps such a model and biases any comparison against it.
    Test episodes (`data.eval_episodes`) are untouched, so every model is scored on the same episodes."""
    if not MODELS[cfg.model.name][0].episodic and str(cfg.data.episodes) == "class":
        cfg.data.episodes = "iid"
        print(f"model={cfg.model.name} has no episode memory: it trains on iid batches "
              "(data.episodes=class applies to memory models only)", file=sys.stderr)


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(cfg_mode: str | None) -> str:
    """Explicit config > WANDB_MODE > online iff credentials are present, else offline."""
    if cfg_mode:
        return cfg_mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if _wandb_has_credentials() else "offline"


def make_loggers(cfg: DictConfig, run_dir: Path, wandb_id: str) -> list[Any]:
    from pytorch_lightning.loggers import CSVLogger
    from pytorch_lightning.loggers.csv_logs import ExperimentWriter

    class AppendingWriter(ExperimentWriter):
        """Lightning's CSV writer deletes an existing metrics.csv; a resumed run appends to it."""

        def _check_log_dir_exists(self) -> None:
            if self._fs.isfile(self.metrics_file_path):
                with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                    self.metrics_keys = sorted(next(csv.reader(f), []))

    csv_logger = CSVLogger(save_dir=str(run_dir), name="", version="")
    csv_logger._experiment = AppendingWriter(log_dir=str(run_dir))
    loggers: list[Any] = [csv_logger]
    mode = wandb_mode(str(cfg.logger.mode) if cfg.logger.mode else None) if cfg.logger.wandb else "disabled"
    if mode == "disabled" or os.environ.get("LOCAL_RANK", "0") != "0":
        return loggers
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    def make(m: str) -> WandbLogger:
        os.environ["WANDB_MODE"] = m
        lg = WandbLogger(
            project=cfg.logger.project, entity=cfg.logger.entity, name=f"{cfg.name}/{cfg.run_id}",
            id=wandb_id, save_dir=str(run_dir), offline=(m == "offline"), resume="allow",
            tags=list(cfg.logger.tags), config=to_dict(cfg),
            settings=wandb.Settings(console="off", init_timeout=60, silent=True),
        )
        lg._wandb_init.pop("anonymous", None)  # Lightning passes a key wandb now warns about
        _ = lg.experiment  # start now so a failure falls back here, not mid-training
        return lg

    try:
        lg = make(mode)
    except Exception as e:  # noqa: BLE001 - W&B must never stop a run
        print(f"W&B {mode} failed ({type(e).__name__}: {str(e)[:120]}); logging offline instead", file=sys.stderr)
        lg = make("offline")
    loggers.append(lg)
    return loggers


def prepare_run(cfg: DictConfig, overrides: list[str] | None = None) -> tuple[DictConfig, Path, Path | None]:
    """Decide the run directory and whether we continue from a checkpoint."""
    runs_dir = Path(cfg.runs_dir)
    resumed = resolve_resume(cfg.resume, runs_dir, cfg.name, cfg.run_id) if cfg.resume else None
    if resumed:
        run_dir, ckpt = resumed
        saved = run_dir / "config.yaml"
        if not saved.exists():
            raise RunError(f"cannot resume {run_dir}: config.yaml is missing")
        keep = [o for o in (overrides or []) if o.split("=", 1)[0].lstrip("+~") not in ("resume", "run_id", "name")]
        cfg = apply_overrides(typed(OmegaConf.load(saved)), keep, read_meta(run_dir).get("choices"))
        cfg.resume = None
        return cfg, run_dir, ckpt
    if cfg.run_id is None:
        # Lightning's DDP launcher re-executes this command once per rank: the workers take the
        # launcher's id from KM_RUN_ID so every rank lands in the same run dir. (Under SLURM or
        # torchrun every rank is started independently: give run_id=... explicitly there.)
        cfg.run_id = new_run_id() if is_rank_zero() else os.environ["KM_RUN_ID"]
    os.environ["KM_RUN_ID"] = cfg.run_id
    run_dir = runs_dir / cfg.name / cfg.run_id
    if last_checkpoint(run_dir) and is_rank_zero():
        raise RunError(f"{run_dir} already holds a run; continue it with resume={run_dir} or pick another run_id")
    return cfg, run_dir, None


def is_rank_zero() -> bool:
    """True in the launching process (and in rank 0 under SLURM / torchrun)."""
    return all(os.environ.get(v, "0") == "0" for v in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))


def train(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Fit (or continue) a run, then evaluate its best checkpoint. Returns a summary dict.

    The launching process holds the run directory's lock (`RunLock`) from before it writes anything there
    until it returns: a second trainer on the same run is refused in one line (exit 2)."""
    quiet_lightning()
    cfg, run_dir, ckpt = prepare_run(cfg, overrides)
    if not is_rank_zero():  # DDP workers write through rank 0, which holds the lock
        return _train(cfg, overrides, run_dir, ckpt)
    with RunLock(run_dir):
        return _train(cfg, overrides, run_dir, ckpt)


def _train(cfg: DictConfig, overrides: list[str] | None, run_dir: Path, ckpt: Path | None) -> dict[str, Any]:
    plain_batches_for_memoryless(cfg)
    rank_zero = is_rank_zero()
    if rank_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
        meta = write_meta(run_dir, status="running", name=cfg.name, run_id=cfg.run_id, model=cfg.model.name,
                          data=cfg.data.name, seed=cfg.seed, pid=os.getpid())
        if ckpt is None:
            meta = write_meta(run_dir, choices=group_choices(overrides or []))
        wandb_id = meta.get("wandb_id") or cfg.run_id.replace("-", "")
        write_meta(run_dir, wandb_id=wandb_id)
    else:
        wandb_id = cfg.run_id.replace("-", "")
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)

    seed_all(cfg.seed)
    dm = build_datamodule(cfg)
    model = build_model(cfg, dm.image_shape, dm.likelihood)
    start_epoch = 0
    if cfg.init_from and ckpt is None:  # a resumed run restores its own weights below
        source, msg = init_weights_from(model, cfg.init_from)
        print(msg, file=sys.stderr)
        if rank_zero:
            write_meta(run_dir, init_from=str(source))
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        start_epoch = int(state.get("epoch", -1)) + 1
        if rank_zero:
            truncate_metrics(run_dir, start_epoch - 1)
        print(f"resuming {run_dir} from {ckpt.name} (epoch {start_epoch} of {cfg.trainer.max_epochs})", file=sys.stderr)

    trainer, grid = make_trainer(cfg, run_dir, wandb_id)
    t_fit = time.time()
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
    except BaseException as e:
        if rank_zero:
            last = last_checkpoint(run_dir)
            write_meta(run_dir, status="failed", error=f"{type(e).__name__}: {e}",
                       last_good_checkpoint=str(last) if last else None)
        _finish_wandb(trainer, failed=True)
        raise
    if rank_zero:  # wall time of training, summed over resumes (a killed attempt's time is not counted)
        spent = float(read_meta(run_dir).get("train_seconds") or 0.0)
        write_meta(run_dir, train_seconds=round(spent + time.time() - t_fit, 1), steps=trainer.global_step)
    if not trainer.is_global_zero:  # a DDP worker: rank 0 evaluates and reports
        return {"run_dir": str(run_dir), "rank": trainer.global_rank}
    summary: dict[str, Any] = {"run_dir": str(run_dir), "samples": str(grid.last_path) if grid.last_path else None}
    summary["val"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if cfg.test_after_fit and trainer.is_global_zero:
        from km.evaluate import evaluate

        summary["eval"] = evaluate(run_dir, split=str(cfg.eval.split), is_samples=cfg.eval.is_samples, dm=dm)
        _log_test_metrics(trainer, summary["eval"]["metrics"])
    _finish_wandb(trainer)
    write_meta(run_dir, status="finished", error=None)
    return summary


def _log_test_metrics(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """The test numbers of every protocol (eval.json) also go to the run's loggers (metrics.csv, W&B) at the
    last training step, so a W&B project has them too. Logging never stops a finished run."""
    for lg in trainer.loggers:
        try:
            lg.log_metrics(metrics, step=trainer.global_step)
            lg.save()
        except Exception as e:  # noqa: BLE001
            print(f"could not log test metrics to {type(lg).__name__}: {type(e).__name__}: {e}", file=sys.stderr)


def _finish_wandb(trainer: pl.Trainer, failed: bool = False) -> None:
    for lg in trainer.loggers:
        if type(lg).__name__ == "WandbLogger" and lg._experiment is not None:
            lg._experiment.finish(exit_code=1 if failed else 0)
            if lg._offline:
                print(f"W&B offline run saved; upload later with: wandb sync {lg._experiment.dir.rsplit('/files', 1)[0]}",
                      file=sys.stderr)


def make_trainer(cfg: DictConfig, run_dir: Path, wandb_id: str) -> tuple[pl.Trainer, SampleGrid]:
    from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar

    t = cfg.trainer
    grid = SampleGrid(run_dir / "samples")
    ckpt_dir = str(run_dir / "checkpoints")
    callbacks: list[pl.Callback] = [
        # the best epochs by the protocol's validation quantity (checkpoint.protocol / monitor)
        ModelCheckpoint(
            dirpath=ckpt_dir, filename="best-epoch{epoch:03d}", auto_insert_metric_name=False,
            monitor=OmegaConf.to_object(cfg.checkpoint).monitored(), mode="min", save_top_k=cfg.checkpoint.save_top_k,
            every_n_epochs=cfg.checkpoint.every_n_epochs, save_last=False,
        ),
        # last.ckpt: the true last state at every epoch end, whatever validation does (save_last=True on the
        # callback above writes it only when a top-k file is written, so a plateaued run's last.ckpt would stay
        # at its best epoch); no version counter, so a copied or moved run overwrites its own last.ckpt
        ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
                        enable_version_counter=False),
        EpochSeed(cfg.seed),
        grid,
    ]
    bar = str(t.progress_bar) if t.progress_bar != "auto" else ("rich" if sys.stderr.isatty() else "none")
    if bar == "rich":
        callbacks.append(RichProgressBar())
    else:
        callbacks.append(EpochSummary())
    if os.environ.get("KM_DEBUG_SIGKILL_AT_STEP"):
        callbacks.append(DebugSigkill(int(os.environ["KM_DEBUG_SIGKILL_AT_STEP"])))
    trainer = pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, num_nodes=t.num_nodes,
        precision=str(t.precision), max_epochs=t.max_epochs, max_steps=t.max_steps,
        gradient_clip_val=t.gradient_clip_val, limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=t.num_sanity_val_steps, log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic, callbacks=callbacks, logger=make_loggers(cfg, run_dir, wandb_id),
        plugins=[AtomicCheckpointIO()], enable_progress_bar=(bar == "rich"), enable_model_summary=False,
        default_root_dir=str(run_dir), use_distributed_sampler=False,
    )
    return trainer, grid
