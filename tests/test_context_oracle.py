"""bench/context_oracle.py: the oracle context prior's KL savings against torch.distributions, its orderings, and
the script end to end on a tiny VAE run (one line, exit 2, for bad input)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from tests.conftest import needs_data, tiny

ORACLE_PY = Path(__file__).resolve().parents[1] / "bench" / "context_oracle.py"


def _oracle():
    spec = importlib.util.spec_from_file_location("context_oracle", ORACLE_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _codes(E: int = 64, T: int = 12, C: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Episodes whose codes share a per-episode centre (the 'character') plus per-item noise, first dims only."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(E, 1, C, generator=g) * torch.tensor([2.0, 1.0, 0.5] + [0.0] * (C - 3))
    mu = centre + 0.5 * torch.randn(E, T, C, generator=g)
    var = torch.rand(E, T, C, generator=g) * 0.5 + 0.1
    return mu, var


def test_savings_match_torch_distributions_kls() -> None:
    oracle = _oracle()
    mu, var = _codes()
    n = 3
    s = oracle.oracle_savings(mu, var, n)
    q = Normal(mu[:, -n:].double(), var[:, -n:].double().sqrt())
    kl_std = kl_divergence(q, Normal(0.0, 1.0)).sum(-1).mean()
    m = mu[:, :-n].double().mean(1, keepdim=True)
    resid2 = (var[:, -n:].double() + (mu[:, -n:].double() - m) ** 2).mean()
    kl_scalar = kl_divergence(q, Normal(m.expand_as(q.loc), resid2.sqrt())).sum(-1).mean()
    assert s["kl_std"] == pytest.approx(float(kl_std), rel=1e-10)
    assert s["scalar"] == pytest.approx(float(kl_std - kl_scalar), rel=1e-10)


def test_orderings_and_a_planted_context() -> None:
    """Per-dim includes scalar, shrinkage includes lambda = 1: each larger family saves at least as much; codes with a
    shared centre are predictable from their context (a large saving); codes without one are not (about zero)."""
    oracle = _oracle()
    mu, var = _codes()
    s = oracle.oracle_savings(mu, var, 3)
    assert s["per_dim_shrunk"] >= s["per_dim"] - 1e-9 and s["per_dim"] >= s["scalar"] - 1e-9
    assert s["scalar"] > 0.5  # the planted centres are worth nats
    g = torch.Generator().manual_seed(1)
    mu_iid = torch.randn(256, 12, 6, generator=g) * 0.7**0.5  # marginal N(0, 0.7 + 0.3) = the prior: no centre
    iid = oracle.oracle_savings(mu_iid, torch.full((256, 12, 6), 0.3), 3)
    assert abs(iid["per_dim_shrunk"]) < 0.05 and iid["scalar"] < 0.05  # the context cannot help
    assert iid["active_dims"] == 6


@needs_data
def test_the_script_runs_on_a_tiny_vae_run_and_refuses_bad_input(tmp_path: Path, capsys) -> None:
    from km.config import compose_config
    from km.train import train

    oracle = _oracle()
    run_dir = train(compose_config(tiny(tmp_path, "trainer.max_epochs=1")))["run_dir"]
    oracle.main([run_dir, "--episodes", "8"])
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith(f"| {run_dir} |")]
    assert len(row) == 1, out
    cells = [c.strip() for c in row[0].split("|")[1:-1]]
    assert cells[1] == "vae" and cells[3] == "8" and cells[4] == "2"  # T = 8, n = T // 4 = 2
    assert float(cells[8]) >= float(cells[7]) - 1e-6  # per-dim >= scalar
    for argv, needle in (([run_dir, "--episodes", "0"], "--episodes"), ([str(tmp_path / "nope")], "no run at")):
        with pytest.raises(SystemExit) as exc:
            oracle.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and needle in err[0], err
