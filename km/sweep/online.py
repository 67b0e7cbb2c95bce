"""Online sweeps on a W&B server: `wandb.sweep` (`start_online`) and `wandb agent` subprocesses, one per GPU
(`agent_online`); both stop with a one-line error without credentials. Thin and untested here (no W&B
server in CI)."""

from __future__ import annotations

import os
import subprocess
import sys

from km import wandb_env
from km.sweep.state import SweepError, load_spec


def _need_credentials(what: str) -> None:
    if not wandb_env.online_possible():
        raise SweepError(
            f"{what} needs W&B credentials (WANDB_API_KEY or `wandb login`; WANDB_MODE must not be "
            "offline); without them use the local engine: km sweep start SPEC.yaml --local, "
            "then km sweep agent <dir>"
        )


def start_online(spec_path: str, project: str | None, entity: str | None) -> str:
    spec = load_spec(spec_path)
    _need_credentials("km sweep start")
    import wandb

    sweep_id = wandb.sweep(
        spec, project=project or spec.get("project") or "kanerva-lab", entity=entity or spec.get("entity")
    )
    return str(sweep_id)


def agent_online(sweep_id: str, count: int | None, gpus: str | None) -> int:
    """One `wandb agent` per GPU (CUDA_VISIBLE_DEVICES set), or one without --gpus; waits for all."""
    _need_credentials("km sweep agent (online)")
    cmd = [sys.executable, "-m", "wandb", "agent", *(["--count", str(count)] if count else []), sweep_id]
    devices = [g.strip() for g in gpus.split(",") if g.strip()] if gpus else [None]
    procs = []
    for dev in devices:
        env = dict(os.environ)
        if dev is not None:
            env["CUDA_VISIBLE_DEVICES"] = dev
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        return max(p.wait() for p in procs)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        return 130
