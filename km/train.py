"""`km train`: build data, model, loggers and trainer from a config; fit; resume; test.

The one place a run is assembled. Models only implement `EpisodeModel`; data modules only
serve episodes; everything about run directories, checkpoints and logging happens here.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from km import wandb_env
from km.build import (  # noqa: F401 - re-exported: km.train.build_model etc. keep working
    build_datamodule,
    build_model,
    init_weights_from,
    plain_batches_for_memoryless,
    quiet_lightning,
)
from km.callbacks import (
    AtomicCheckpointIO,
    EpochSeed,
    EpochSummary,
    MetricsCSV,
    ProgressLines,
    RichEpochBar,
    SampleGrid,
    StopAt,
    seed_all,
)
from km.config import apply_overrides, group_choices, to_dict, to_yaml, typed
from km.models import EpisodeModel, NonFiniteLossError
from km.runs import (
    RunError,
    RunInterrupted,
    RunLock,
    atomic_write_text,
    interrupt_signal,
    last_checkpoint,
    load_checkpoint,
    mark_failed,
    new_run_id,
    read_meta,
    resolve_resume,
    sweep_temp_files,
    truncate_metrics,
    write_meta,
)
from km.threads import torch_threads


def tensorboard_logger(run_dir: Path) -> Any:
    """Lightning's TensorBoardLogger writing to <run_dir>/tensorboard/ (one events file per attempt, the same
    metric names as metrics.csv; a resumed run appends): `tensorboard --logdir runs/` shows every run."""
    from pytorch_lightning.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)


def make_loggers(cfg: DictConfig, run_dir: Path, wandb_id: str) -> list[Any]:
    """metrics.csv always (`MetricsCSV`); W&B unless disabled. The W&B run is started here with `wandb.init`
    and handed to Lightning's WandbLogger (its public `experiment=` argument), so a failure to start falls
    back to offline here, never mid-training."""
    loggers: list[Any] = [MetricsCSV(run_dir)]
    if cfg.logger.tensorboard and os.environ.get("LOCAL_RANK", "0") == "0":
        loggers.append(tensorboard_logger(run_dir))
    mode = wandb_env.mode(str(cfg.logger.mode) if cfg.logger.mode else None) if cfg.logger.wandb else "disabled"
    if mode == "disabled" or os.environ.get("LOCAL_RANK", "0") != "0":
        return loggers
    if mode == "online" and not wandb_env.reachable():
        host, port = wandb_env.server()
        print(f"W&B server {host}:{port} is unreachable; logging offline instead", file=sys.stderr)
        mode = "offline"
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    def make(m: str) -> WandbLogger:
        os.environ["WANDB_MODE"] = m
        run = wandb.init(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            name=f"{cfg.name}/{cfg.run_id}",
            id=wandb_id,
            dir=str(run_dir),
            mode=m,
            resume="allow",
            tags=list(cfg.logger.tags),
            config=to_dict(cfg),
            settings=wandb.Settings(console="off", init_timeout=60, silent=True),
        )
        return WandbLogger(experiment=run, save_dir=str(run_dir))

    try:
        lg = make(mode)
    except Exception as e:  # noqa: BLE001 - W&B must never stop a run
        print(f"W&B {mode} failed ({type(e).__name__}: {str(e)[:120]}); logging offline instead", file=sys.stderr)
        for end in (wandb.finish, wandb.teardown):  # the failed attempt keeps the run id "in use" until ended
            try:
                end()
            except Exception:  # noqa: BLE001, S110
                pass
        try:
            lg = make("offline")
        except Exception as e2:  # noqa: BLE001
            print(f"W&B offline failed too ({type(e2).__name__}: {str(e2)[:120]}); metrics.csv only", file=sys.stderr)
            return loggers
    loggers.append(lg)
    return loggers


# The keys a resumed run may change: budgets, logging, evaluation, the learning rate and clipping (the advice
# printed when a run diverges), where the data live and which devices train. Anything else would continue the
# run as a different experiment under its old name: refused in one line before anything is written.
RESUMABLE = (
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.gradient_clip_val",
    "trainer.log_every_n_steps",
    "trainer.progress_bar",
    "trainer.progress_interval",
    "trainer.num_threads",
    "trainer.limit_val_batches",
    "trainer.num_sanity_val_steps",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.strategy",
    "trainer.num_nodes",
    "trainer.compile",
    "trainer.compile_backend",
    "logger.",
    "eval.",
    "model.lr",
    "test_after_fit",
    "runs_dir",
    "data.data_dir",
    "data.test_episodes",
    "data.eval_episodes",
)


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE)


def prepare_run(cfg: DictConfig, overrides: list[str] | None = None) -> tuple[DictConfig, Path, Path | None]:
    """Decide the run directory and whether we continue from a checkpoint. Writes nothing."""
    from km.config import ConfigError
    from km.overrides import split_override

    runs_dir = Path(cfg.runs_dir)
    resumed = resolve_resume(cfg.resume, runs_dir, cfg.name, cfg.run_id) if cfg.resume else None
    if resumed:
        run_dir, ckpt = resumed
        saved = run_dir / "config.yaml"
        if not saved.exists():
            raise RunError(f"cannot resume {run_dir}: config.yaml is missing")
        try:
            saved_cfg = typed(OmegaConf.load(saved))
        except Exception as e:  # noqa: BLE001 - a damaged or foreign config.yaml: one line
            raise RunError(
                f"cannot resume {run_dir}: its config.yaml does not load ({str(e).splitlines()[0][:150]})"
            ) from None
        keep = [o for o in (overrides or []) if split_override(o)[0] not in ("resume", "run_id", "name")]
        cfg = apply_overrides(saved_cfg, keep, read_meta(run_dir).get("choices"))
        keys = {split_override(o)[0] for o in keep}  # group choices (model=, data=) were checked above
        keys = {k for k in keys if "." in k or k in ("seed", "init_from")}
        changed = sorted(
            k for k in keys if not _resumable(k) and OmegaConf.select(cfg, k) != OmegaConf.select(saved_cfg, k)
        )
        if changed:
            k = changed[0]
            raise ConfigError(
                f"resume: {k} cannot change when a run continues (saved {OmegaConf.select(saved_cfg, k)}, "
                f"given {OmegaConf.select(cfg, k)}); start a new run for that. A resumed run may change: "
                + ", ".join(r.rstrip(".") + ("*" if r.endswith(".") else "") for r in RESUMABLE)
            )
        cfg.resume = None
        check_writable_dir(run_dir)
        return cfg, run_dir, ckpt
    if cfg.run_id is None:
        # Lightning's DDP launcher re-executes this command once per rank: the workers take the
        # launcher's id from KM_RUN_ID so every rank lands in the same run dir. Under SLURM or
        # torchrun every rank is started independently: run_id=... must be given explicitly there.
        if is_rank_zero():
            cfg.run_id = new_run_id()
        elif os.environ.get("KM_RUN_ID"):
            cfg.run_id = os.environ["KM_RUN_ID"]
        else:
            raise ConfigError(
                "this process is a distributed worker (rank set by SLURM or torchrun) started without "
                "run_id: give every rank the same run_id=... so they share one run directory"
            )
    os.environ["KM_RUN_ID"] = cfg.run_id
    run_dir = runs_dir / cfg.name / cfg.run_id
    check_writable_dir(run_dir)
    if last_checkpoint(run_dir) and is_rank_zero():
        raise RunError(f"{run_dir} already holds a run; continue it with resume={run_dir} or pick another run_id")
    return cfg, run_dir, None


def check_trainer(cfg: DictConfig) -> None:
    """Values the schema cannot judge that Lightning would refuse with a traceback after the data loaded:
    a GPU accelerator without a CUDA device, an unknown strategy, TensorBoard logging without the package.
    ConfigError, before anything is written."""
    from pytorch_lightning.strategies import StrategyRegistry

    from km.config import ConfigError

    acc = str(cfg.trainer.accelerator)
    if acc in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={acc} but this machine has no CUDA device; use trainer=cpu "
            "(or trainer.accelerator=cpu, or auto)"
        )
    if cfg.logger.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(
                "logger.tensorboard needs the tensorboard package (pip install tensorboard; make setup installs it)"
            )
    strategy = str(cfg.trainer.strategy)
    known = ["auto", *sorted(StrategyRegistry.available_strategies())]
    if strategy not in known:
        raise ConfigError(f"bad value for 'trainer.strategy': {strategy} (valid: {', '.join(known)})")


def check_monitor(cfg: DictConfig, model: EpisodeModel, dm: pl.LightningDataModule) -> None:
    """A `checkpoint.monitor` the model never logs fails in Lightning after a whole epoch: check it first
    against the names one validation batch logs (a forward pass with the random state restored after it)."""
    from km.config import ConfigError

    monitor = cfg.checkpoint.monitor
    if not monitor or str(monitor).startswith("train/"):
        return
    batch = next(iter(dm.val_dataloader()))
    x = batch["x"][:1] if "x" in batch else dm.get_batch("val", batch["idx"][:1])["x"]
    with torch.random.fork_rng(), torch.no_grad():
        was = model.training
        model.eval()
        names = {"memory_conditional", "heldout"}
        out = model.episode_elbo(x)
        terms = ["neg_elbo", "recon", "kl", *out.parts, *out.extras]
        names |= set(terms) | {f"heldout_{k}" for k in terms if k != "neg_elbo"}
        model.train(was)
    logged = sorted(f"val/{n}" for n in names)
    if monitor not in logged:
        raise ConfigError(f"bad value for 'checkpoint.monitor': {monitor} (the model logs: {', '.join(logged)})")


def check_writable_dir(run_dir: Path) -> None:
    """The run directory can be a folder we write in: no part of its path is a plain file, and the nearest
    existing folder is writable (RunError before anything is loaded or written)."""
    for part in [run_dir, *run_dir.parents]:
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                raise RunError(f"{part} exists as a file, not a folder; move it, or pick another runs_dir/name/run_id")
            if not os.access(part, os.W_OK | os.X_OK):
                raise RunError(f"cannot write in {part} (read-only or not ours); pick another runs_dir=...")
            return


def is_rank_zero() -> bool:
    """True in the launching process (and in rank 0 under SLURM / torchrun)."""
    return all(os.environ.get(v, "0") == "0" for v in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))


def check_memory_budget(cfg: DictConfig, image_shape: tuple[int, int, int]) -> None:
    """Refuse, before anything is written, a batch whose training step cannot fit in this machine's memory
    (data.batch_size x data.episode_length images at once): e.g. T = 10^6 grew to 21 GB and was killed.
    The estimate counts the conv nets' activations (each block keeps about 6 maps of its size, in the encoder
    and the decoder, forward and backward) and the memory algebra's T x T matrices; it is meant to catch
    orders of magnitude, not to budget tightly (on a GPU the device's own out-of-memory error still applies)."""
    if str(cfg.trainer.accelerator) not in ("cpu", "auto"):
        return
    B, T = cfg.data.batch_size, cfg.data.episode_length
    C, H, W = image_shape
    maps = sum(ch * (H >> (i + 1)) * (W >> (i + 1)) for i, ch in enumerate(cfg.net.channels)) + C * H * W
    need = 4 * B * T * (maps * 6 * 2 * 2) + 4 * 8 * B * T * T
    avail = _available_memory()
    if avail and need > 0.9 * avail:
        raise RunError(
            f"data.batch_size={B} x data.episode_length={T} = {B * T} images per step needs about "
            f"{need / 2**30:.1f} GiB, more than the {avail / 2**30:.1f} GiB available here; lower them"
        )


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def train(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Fit (or continue) a run, then evaluate its best checkpoint. Returns a summary dict (see `_run`).

    trainer.num_threads applies to this run only: the caller's torch thread count is restored on return, so
    one run in a notebook or a test does not change the arithmetic (and the last bits) of the next."""
    with torch_threads():
        return _run(cfg, overrides)


def _run(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Fit (or continue) a run, then evaluate its best checkpoint.

    Order, so that bad input loses nothing: every value is checked, the data are loaded and checked against
    the batch and episode sizes, the model is built and a checkpoint to continue from is loaded into it, all
    before the run directory is created or touched. Then the launching process takes the run directory's lock
    (`RunLock`; a second trainer on the same run is refused in one line, exit 2) and holds it until it
    returns; from there on any failure marks the run failed in run.json with its one-line error."""
    quiet_lightning()
    check_trainer(cfg)
    cfg, run_dir, ckpt = prepare_run(cfg, overrides)
    plain_batches_for_memoryless(cfg)
    dm = build_datamodule(cfg)
    check_memory_budget(cfg, dm.image_shape)
    dm.setup("fit")
    dm.check_sizes()
    if cfg.test_after_fit and cfg.eval.class_episodes:  # the one-class test pass after training: checked now
        dm.check_classes("test")
    seed_all(cfg.seed)
    model = build_model(cfg, dm.image_shape, dm.likelihood)
    check_monitor(cfg, model, dm)
    source = None
    if cfg.init_from and ckpt is None:  # a resumed run restores its own weights below
        source, msg = init_weights_from(model, cfg.init_from)
        print(msg, file=sys.stderr)
    start_epoch = 0
    seen = _stamp(ckpt)
    if ckpt is not None:  # the weights must load before config.yaml is rewritten
        state = load_checkpoint(ckpt)
        start_epoch = int(state.get("epoch", -1)) + 1
        try:
            model.load_state_dict(state["state_dict"])
        except RuntimeError as e:
            raise RunError(
                f"cannot resume from {ckpt}: its weights do not fit this config "
                f"({str(e).strip().splitlines()[-1][:150]})"
            ) from None
    if ckpt is not None and is_rank_zero():
        done = _check_resume(cfg, run_dir, start_epoch)
        if done is not None:
            return done
    if not is_rank_zero():  # DDP workers write through rank 0, which holds the lock
        return _train(cfg, overrides, run_dir, ckpt, start_epoch, dm, model, source)
    with RunLock(run_dir):
        # checked again now that the lock is held: another trainer may have created or advanced this run while
        # this one loaded its data (a slow start, a SIGSTOP); what it wrote is never replaced
        if ckpt is None and last_checkpoint(run_dir):
            raise RunError(
                f"{run_dir} already holds a run (another trainer created it while this one was starting); "
                f"continue it with resume={run_dir} or pick another run_id"
            )
        if ckpt is not None and _stamp(ckpt) != seen:
            raise RunError(
                f"{run_dir} moved on while this trainer was starting (another trainer wrote {ckpt.name}); "
                "run the same command again to continue from there"
            )
        _announce(cfg, run_dir, model, dm, start_epoch if ckpt is not None else None)  # only a run that goes ahead
        try:
            return _train(cfg, overrides, run_dir, ckpt, start_epoch, dm, model, source)
        except BaseException as e:
            sig = interrupt_signal(e)
            if sig is None:
                mark_failed(run_dir, f"{type(e).__name__}: {str(e).strip()[:300]}")
                raise
            last = last_checkpoint(run_dir)
            keep = f"it keeps {last.name}" if last else "no epoch had finished, so it starts again"
            msg = f"interrupted by {sig[0]}; {keep}: continue with km train resume={run_dir}"
            mark_failed(run_dir, msg, status="interrupted")
            raise RunInterrupted(msg, sig[1]) from None


def _announce(
    cfg: DictConfig, run_dir: Path, model: EpisodeModel, dm: pl.LightningDataModule, start: int | None
) -> None:
    """The run's first line: where it lives, what it trains and for how long (before the trainer starts)."""
    per_epoch = len(dm.episodes("train"))
    epochs = int(cfg.trainer.max_epochs)
    steps = int(cfg.trainer.max_steps) if cfg.trainer.max_steps > 0 else per_epoch * epochs
    n = sum(p.numel() for p in model.parameters())
    cont = f", continuing after epoch {start}" if start is not None else ""
    print(
        f"run {run_dir}: {cfg.model.name} on {cfg.data.name}, {n / 1e6:.2f}M parameters, {steps} optimiser steps "
        f"planned ({epochs} epochs x {per_epoch}){cont}",
        file=sys.stderr,
        flush=True,
    )


def _stamp(path: Path | None) -> tuple[int, int] | None:
    """(size, mtime in ns) of a checkpoint: how a trainer tells that another one rewrote it meanwhile."""
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _check_resume(cfg: DictConfig, run_dir: Path, start_epoch: int) -> dict[str, Any] | None:
    """Before a resumed run is touched: refuse what would fail inside Lightning after run.json, config.yaml and
    metrics.csv were already rewritten (a smaller budget than trained, a damaged metrics.csv), and answer a
    finished run without re-running anything. Returns the summary of a finished run, else None."""
    from km.config import ConfigError
    from km.runs import check_metrics_file

    check_metrics_file(run_dir)
    m = int(cfg.trainer.max_epochs)
    if m != -1 and start_epoch > m:
        raise ConfigError(
            f"resume: {run_dir} has trained {start_epoch} epochs, more than trainer.max_epochs={m}; "
            f"to train further give trainer.max_epochs > {start_epoch} (km eval {run_dir} re-evaluates it)"
        )
    finished = read_meta(run_dir).get("status") == "finished" and (run_dir / "eval.json").is_file()
    if m != -1 and start_epoch == m and finished:
        return {"run_dir": str(run_dir), "already_finished": start_epoch}
    return None


def _train(
    cfg: DictConfig,
    overrides: list[str] | None,
    run_dir: Path,
    ckpt: Path | None,
    start_epoch: int,
    dm: pl.LightningDataModule,
    model: EpisodeModel,
    source: Path | None,
) -> dict[str, Any]:
    rank_zero = is_rank_zero()
    if rank_zero:
        gone = sweep_temp_files(run_dir)
        if gone:
            print(f"removed {len(gone)} temp file(s) an interrupted process left in {run_dir}", file=sys.stderr)
        if ckpt is None:  # a fresh start (a kill before the first checkpoint included): no rows of an earlier try
            truncate_metrics(run_dir, -1)
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
        meta = write_meta(
            run_dir,
            status="running",
            error=None,
            name=cfg.name,
            run_id=cfg.run_id,
            model=cfg.model.name,
            data=cfg.data.name,
            seed=cfg.seed,
            pid=os.getpid(),
        )
        if ckpt is None:
            meta = write_meta(run_dir, choices=group_choices(overrides or []))
        if source is not None:
            write_meta(run_dir, init_from=str(source))
        wandb_id = meta.get("wandb_id") or cfg.run_id.replace("-", "")
        write_meta(run_dir, wandb_id=wandb_id)
    else:
        wandb_id = cfg.run_id.replace("-", "")
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    if ckpt is not None:
        if rank_zero:
            truncate_metrics(run_dir, start_epoch - 1)
        print(
            f"resuming {run_dir} from {ckpt.name}: epoch {start_epoch + 1} of {cfg.trainer.max_epochs} next",
            file=sys.stderr,
        )

    trainer, grid = make_trainer(cfg, run_dir, wandb_id, steps_per_epoch=len(dm.episodes("train")))
    start_step = int(read_meta(run_dir).get("steps") or 0) if ckpt is not None else 0
    if ckpt is not None:
        start_step = max(start_step, _checkpoint_step(ckpt))
    t_fit = time.time()
    try:
        with warnings.catch_warnings():
            if ckpt is not None:  # a resumed run's checkpoint folder holds its own checkpoints: expected, not news
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            trainer.fit(model, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
    except NonFiniteLossError as e:
        _finish_wandb(trainer, failed=True)
        stuck = ckpt is not None and trainer.global_step <= start_step  # not one step since the checkpoint
        raise NonFiniteLossError(f"{e}. {_divergence_advice(cfg, run_dir, stuck)}") from None
    except BaseException:
        _finish_wandb(trainer, failed=True)
        raise
    stop = next(c for c in trainer.callbacks if isinstance(c, StopAt))
    if rank_zero:  # wall time of training, summed over resumes (a killed attempt's time is not counted)
        meta = read_meta(run_dir)
        spent = float(meta.get("train_seconds") or 0.0)
        epoch_s = max(stop.longest, float(meta.get("epoch_seconds") or 0.0)) or None
        write_meta(
            run_dir,
            train_seconds=round(spent + time.time() - t_fit, 1),
            steps=trainer.global_step,
            epoch_seconds=round(epoch_s, 2) if epoch_s else None,
        )
    if not trainer.is_global_zero:  # a DDP worker: rank 0 evaluates and reports
        return {"run_dir": str(run_dir), "rank": trainer.global_rank}
    if stop.stopped_after_epoch is not None:  # a time slice ended (KM_STOP_AT): resumable, not finished
        _finish_wandb(trainer)
        write_meta(run_dir, status="paused", error=None, paused_after_epoch=stop.stopped_after_epoch)
        return {
            "run_dir": str(run_dir),
            "paused": stop.stopped_after_epoch,
            "max_epochs": cfg.trainer.max_epochs,
        }
    summary: dict[str, Any] = {"run_dir": str(run_dir), "samples": str(grid.last_path) if grid.last_path else None}
    summary["val"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if cfg.test_after_fit and trainer.is_global_zero:
        from km.evaluate import evaluate

        summary["eval"] = evaluate(run_dir, split=str(cfg.eval.split), is_samples=cfg.eval.is_samples, dm=dm)
        _log_test_metrics(trainer, summary["eval"]["metrics"])
    _finish_wandb(trainer)
    write_meta(run_dir, status="finished", error=None)
    return summary


def _checkpoint_step(ckpt: Path) -> int:
    try:
        return int(load_checkpoint(ckpt).get("global_step") or 0)
    except Exception:  # noqa: BLE001 - only sharpens the advice
        return 0


def _divergence_advice(cfg: DictConfig, run_dir: Path, stuck: bool = False) -> str:
    """What to run after a diverged run: continue from the last good checkpoint with a 10x lower rate (and
    clipping, if there was none). `resume` applies both (`RESUMABLE`; the rate overrides the optimiser's).
    `stuck`: this was a resume that diverged before one optimiser step, so the checkpoint itself gives a
    non-finite loss and no rate or clipping applied after it can help: start a new run instead."""
    fix = f"model.lr={cfg.model.lr / 10:g}" + ("" if cfg.trainer.gradient_clip_val else " trainer.gradient_clip_val=5")
    if stuck:
        return (
            "The checkpoint it resumed from diverges on its first batch, so resuming cannot help, whatever the "
            f"rate or clipping; start a new run (another run_id) with a lower rate from the beginning: {fix}"
        )
    if last_checkpoint(run_dir) is None:
        return f"No epoch had finished, so no checkpoint was kept; start again with a lower rate: {fix}"
    return f"The last good checkpoint is kept; continue with: km train resume={run_dir} {fix}"


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
        if type(lg).__name__ == "WandbLogger":
            run = lg.experiment  # started by make_loggers, so this never starts one
            offline = run.settings.mode in ("offline", "dryrun")
            run.finish(exit_code=1 if failed else 0)
            if offline:
                print(
                    f"W&B offline run saved; upload later with: wandb sync {run.dir.rsplit('/files', 1)[0]}",
                    file=sys.stderr,
                )


def make_trainer(
    cfg: DictConfig, run_dir: Path, wandb_id: str, steps_per_epoch: int | None = None
) -> tuple[pl.Trainer, SampleGrid]:
    """The Lightning trainer of a run. `steps_per_epoch` caps the logging interval, so a short epoch logs its
    training loss too (and Lightning has nothing to warn about)."""
    from km.callbacks import ModelCheckpoint  # Lightning's, following a moved run's folder

    t = cfg.trainer
    log_every = min(t.log_every_n_steps, steps_per_epoch) if steps_per_epoch else t.log_every_n_steps
    grid = SampleGrid(run_dir / "samples")
    ckpt_dir = str(run_dir / "checkpoints")
    callbacks: list[pl.Callback] = [
        # the best epochs by the protocol's validation quantity (checkpoint.protocol / monitor)
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="best-epoch{epoch:03d}",
            auto_insert_metric_name=False,
            monitor=OmegaConf.to_object(cfg.checkpoint).monitored(),
            mode="min",
            save_top_k=cfg.checkpoint.save_top_k,
            every_n_epochs=cfg.checkpoint.every_n_epochs,
            save_last=False,
        ),
        # last.ckpt: the true last state at every epoch end, whatever validation does (save_last=True on the
        # callback above writes it only when a top-k file is written, so a plateaued run's last.ckpt would stay
        # at its best epoch); no version counter, so a copied or moved run overwrites its own last.ckpt
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="last",
            monitor=None,
            save_top_k=1,
            every_n_epochs=1,
            enable_version_counter=False,
        ),
        EpochSeed(cfg.seed),
        grid,
        StopAt.from_env(),
    ]
    bar = str(t.progress_bar) if t.progress_bar != "auto" else ("rich" if sys.stderr.isatty() else "none")
    if bar == "rich":
        callbacks.append(RichEpochBar())
    else:
        callbacks += [EpochSummary(), ProgressLines(t.progress_interval)]
    trainer = pl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        num_nodes=t.num_nodes,
        precision=str(t.precision),
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        gradient_clip_val=t.gradient_clip_val,
        limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=t.num_sanity_val_steps,
        log_every_n_steps=log_every,
        deterministic=t.deterministic,
        callbacks=callbacks,
        logger=make_loggers(cfg, run_dir, wandb_id),
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=(bar == "rich"),
        enable_model_summary=False,
        default_root_dir=str(run_dir),
        use_distributed_sampler=False,
    )
    return trainer, grid
