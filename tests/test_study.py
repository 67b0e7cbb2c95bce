"""The studies of km/study.py on constructed memories whose answers are known, and on tiny random models
(in-process, no data files, a few seconds in all)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from km import study
from km.study import StudyError, StudyRun

SHAPE = (1, 28, 28)


def _images(n: int = 96, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, *SHAPE), 0.3), generator=g), torch.arange(n) % classes


class _Lookup:
    """A memory that stores the items themselves. `mode='nearest'`: a read returns the stored item nearest
    the cue (exact retrieval); 'shuffled': a random stored item of the episode."""

    def __init__(self, mode: str):
        self.cfg = SimpleNamespace(name=f"lookup_{mode}")
        self.mode = mode

    def write(self, x):
        return x

    def read(self, cue, memory):
        if memory is None:  # nothing written: the cue comes back
            return cue
        if self.mode == "nearest":
            pick = study.l1_distances(cue, memory).argmin(-1)  # (E, T)
        else:
            pick = torch.stack([torch.randperm(memory.shape[1]) for _ in range(memory.shape[0])])
        return torch.stack([memory[e, pick[e]] for e in range(memory.shape[0])])

    def mean_image(self, p):
        return p

    def log_px(self, p, x):  # Bernoulli log-likelihood (E, T), for the attractor study's energy proxy
        p = p.clamp(1e-4, 1 - 1e-4)
        return (x * p.log() + (1 - x) * (1 - p).log()).flatten(2).sum(-1)


def _run(model, label: str, x=None, y=None) -> StudyRun:
    if x is None:
        x, y = _images()
    return StudyRun(label=label, model=model, x_test=x, y_test=y, data="toy", memory="test")


def test_retrieval_scores_exact_and_shuffled():
    x, _ = _images(8 * 300)
    items = x.view(300, 8, *SHAPE)
    exact = study.retrieval_scores(items, items)
    assert exact["accuracy"] == 1.0 and exact["pixel_error"] == 0.0
    torch.manual_seed(0)
    shuffled = torch.stack([ep[torch.randperm(8)] for ep in items])
    assert abs(study.retrieval_scores(shuffled, items)["accuracy"] - 1 / 8) < 0.03  # chance: 1/T


def test_capacity_of_an_exact_memory_is_one_and_of_a_shuffled_one_chance():
    runs = [_run(_Lookup("nearest"), "exact"), _run(_Lookup("shuffled"), "shuffled")]
    torch.manual_seed(0)
    res = study.capacity(runs, Ts=(4, 8), episodes=8, corruptions=("none", "flip"))
    by = {(r["model"], r["corruption"], r["T"]): r for r in res.rows}
    for T in (4, 8):
        assert by[("exact", "none", T)]["accuracy"] == 1.0 and by[("exact", "none", T)]["pixel_error"] == 0.0
        assert by[("exact", "flip", T)]["accuracy"] == 1.0  # 15% flips of random images: the nearest is its own
        assert by[("shuffled", "none", T)]["accuracy"] < 0.5
        assert by[("query (no read)", "none", T)]["accuracy"] == 1.0
    assert "T=8 err / acc" in res.table and "chance accuracy" in res.table


def test_capacity_on_colour_images_says_noise_and_mean_absolute_error():
    """On 8-bit colour data (StudyRun.binary False) the cues get Gaussian noise, not flips, and the error is the
    mean |read - item| per sub-pixel: the table says so, and an exact memory still scores accuracy 1, error 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 8, 8, generator=g)
    run = StudyRun(label="exact", model=_Lookup("nearest"), x_test=x, y_test=torch.arange(64) % 4, data="toy",
                   memory="test", binary=False)  # fmt: skip
    res = study.capacity([run], Ts=(4, 8), episodes=4, noise=0.1, corruptions=("flip", "none"))
    by = {(r["model"], r["corruption"], r["T"]): r for r in res.rows}
    assert by[("exact", "none", 8)]["pixel_error"] == 0.0 and by[("exact", "flip", 8)]["accuracy"] == 1.0
    noisy = by[("query (no read)", "flip", 8)]["pixel_error"]
    assert 0.05 < noisy < 0.1  # E|N(0, 0.1^2)| = 0.08, a little less where clamped at 0 or 1
    assert "N(0, 0.1^2) added to every sub-pixel" in res.header and "mean |read - item| per sub-pixel" in res.header
    assert "flipped" not in res.header and "thresholded" not in res.header


def test_end_point_classes():
    x, _ = _images(4 * 8)
    items = x.view(4, 8, *SHAPE)
    assert study.classify_end_points(items, items)["own"] == 1.0
    rolled = study.classify_end_points(items.roll(1, dims=1), items)
    assert rolled["other"] == 1.0 and rolled["nearest_own"] == 0.0
    assert study.classify_end_points(torch.zeros_like(items) + 0.9, items)["none"] == 1.0
    collapsed = study.classify_end_points(items[:, :1].expand_as(items), items)  # every chain on item 0
    assert collapsed["spread"] == 0.0 and abs(collapsed["own"] - 1 / 8) < 1e-6


def test_attractors_of_an_exact_memory_end_at_their_own_items_on_fixed_points():
    """A memory whose read is the nearest stored item: every chain from a 15%-flipped query ends at its own item
    (own 1), converged (no pixel moves on the last read), and a stored item reads back as itself; a shuffled
    memory's chains keep moving and end at their own item at about chance."""
    x, y = _images(8 * 16)
    exact = study.attractors([_run(_Lookup("nearest"), "exact", x, y)], T=16, episodes=8, iters=3).rows
    for r in exact:
        assert r["own"] == 1.0 and r["converged"] == 1.0 and r["clean_start_dist_1"] == 0.0, r["feedback"]
        assert r["prior_nearest_own"] == 1.0  # nothing written: the lookup returns the cue, nearest its own item
    torch.manual_seed(0)
    shuffled = study.attractors([_run(_Lookup("shuffled"), "shuffled", x, y)], T=16, episodes=8, iters=3).rows
    for r in shuffled:
        assert r["own"] < 0.2 and r["converged"] < 0.2, r["feedback"]
    assert study.still_moving(x[:4, None], x[:4, None]).sum() == 0
    assert study.still_moving(x[:4, None], 1 - x[:4, None]).all()


def test_runs_of_one_config_and_checkpoints_of_one_run_get_distinct_labels(tmp_path):
    from pathlib import Path

    def r(run: str, steps: int) -> StudyRun:
        return StudyRun(
            label="dkm",
            model=None,
            x_test=None,
            y_test=None,
            data="toy",
            memory="-",
            steps=steps,
            run_dir=Path(tmp_path / run),
        )

    runs = study.distinct_labels([r("a", 400), r("b", 400), r("b", 920), r("c", 10)])
    assert [x.label for x in runs] == ["dkm [a]", "dkm [b] @ step 400", "dkm [b] @ step 920", "dkm [c]"]
    assert study.distinct_labels([r("a", 400)])[0].label == "dkm"


def test_clustering_scores_and_sparsity():
    labels = torch.arange(400) % 5
    s = study.clustering_scores(labels.numpy(), labels.numpy(), shuffles=5)
    assert s["ari"] == pytest.approx(1.0) and s["purity"] == pytest.approx(1.0)
    assert abs(s["ari_shuffled"]) < 0.02 and s["purity_shuffled"] < 0.4
    one_hot = torch.nn.functional.one_hot(labels % 4, 4).float()
    assert study.weight_sparsity(one_hot)["entropy"] == pytest.approx(0.0, abs=1e-5)
    assert study.weight_sparsity(torch.full((10, 4), 0.25))["entropy"] == pytest.approx(1.0)


def test_address_spread():
    same = torch.randn(1, 1, 16).expand(3, 6, 16)
    s = study.address_spread(same)
    assert (
        s["cosine"] == pytest.approx(1.0, abs=1e-5) and s["rel_spread"] < 1e-5 and s["eff_rank"] == pytest.approx(1.0)
    )
    assert study.address_spread(torch.randn(3, 6, 64))["cosine"] < 0.5


def _tiny_models():
    from km.models.dkm import DKMConfig, DynamicKanervaMachine
    from km.models.km import KanervaMachine, KMConfig
    from km.models.kpp import KanervaPlusPlus, KPPConfig
    from km.models.pkm import PKMConfig, ProductKanervaMachine
    from km.models.vae import VAE, VAEConfig
    from km.nets import NetConfig

    torch.manual_seed(0)
    net = NetConfig(channels=[4, 8, 8], embed_dim=16)
    small = {"code_dim": 8, "memory_size": 8}
    models = {
        "km": KanervaMachine(KMConfig(**small, y_dim=4, addr_dim=8, hidden=16), net, SHAPE, "bernoulli"),
        "dkm": DynamicKanervaMachine(DKMConfig(**small), net, SHAPE, "bernoulli"),
        "pkm": ProductKanervaMachine(
            PKMConfig(**small, machines=2, y_dim=4, addr_dim=8, hidden=16), net, SHAPE, "bernoulli"
        ),
        "kpp": KanervaPlusPlus(
            KPPConfig(code_dim=8, mem_channels=2, mem_size=8, window=4, read_steps=1, hidden=16),
            net,
            SHAPE,
            "bernoulli",
        ),
        "vae": VAE(VAEConfig(code_dim=8), net, SHAPE, "bernoulli"),
    }
    from km.models.gpm import GenerativePseudoInverseMemory, GPMConfig

    models["gpm"] = GenerativePseudoInverseMemory(GPMConfig(**small), net, SHAPE, "bernoulli")  # built last
    for m in models.values():
        m.eval()
    return models


def _study_tables() -> dict[str, str]:
    """The table of every study on the five tiny models of before the package split (GPM left out)."""
    models = _tiny_models()
    runs = {k: _run(m, k) for k, m in models.items() if k != "gpm"}
    mem = [runs[k] for k in ("km", "dkm", "pkm", "kpp")]
    calls = {
        "capacity": lambda: study.capacity([*mem, runs["vae"]], Ts=(4, 8), episodes=2),
        "attractors": lambda: study.attractors(
            mem, T=4, episodes=2, iters=2, feedbacks=("mean", "threshold", "sample")
        ),
        "oneshot": lambda: study.oneshot(list(runs.values()), T=3, episodes=2, samples=3, iters=1),
        "addressing": lambda: study.addressing([runs["km"], runs["pkm"], runs["dkm"]], T=4, episodes=2),
        "allocation": lambda: study.allocation([runs["pkm"]], items=40, shuffles=3),
    }
    out = {}
    for name, call in calls.items():
        torch.manual_seed(0)
        out[name] = call().table
    return out


def test_the_studies_package_gives_the_tables_of_the_single_module():
    """km/study.py became the km/study/ package (issue #29) and the studies ask the model what it can do instead
    of its name: each study's table on the tiny models is what the 1.3k-line module printed (tests/data, written
    by that module)."""
    import json
    from pathlib import Path

    before = json.loads((Path(__file__).parent / "data" / "study_tables.json").read_text())
    assert _study_tables() == before


def test_a_sixth_model_slots_into_every_study(tmp_path):
    """GPM, added after the studies were written, runs in each of them through the model interface alone."""
    models = _tiny_models()
    gpm, km = _run(models["gpm"], "gpm"), _run(models["km"], "km")
    res = study.capacity([gpm, km], Ts=(4,), episodes=2, out=tmp_path)
    assert any(r["model"] == "gpm" for r in res.rows) and res.png.exists()
    assert study.attractors([gpm], T=4, episodes=2, iters=2).rows
    assert any(r["run"] == "gpm" for r in study.oneshot([gpm, km], T=3, episodes=2, samples=3, iters=1).rows)
    assert study.addressing([gpm], T=4, episodes=2).rows[0]["run"] == "gpm"
    assert "32 slots" not in gpm.model.describe_memory() and "8 slots x 8" == gpm.model.describe_memory()


def test_every_study_runs_on_tiny_models(tmp_path):
    models = _tiny_models()
    models.pop("gpm")
    runs = {k: _run(m, k) for k, m in models.items()}
    mem = [runs[k] for k in ("km", "dkm", "pkm", "kpp")]
    res = study.capacity([*mem, runs["vae"]], Ts=(4, 8), episodes=2, out=tmp_path)
    assert len(res.rows) == 2 * 3 * 12 and res.png.exists()  # T x cue x (query, 5 models, 4 prior memories, 2 w^T M)
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["pixel_error"] <= 1 for r in res.rows)
    assert any(r["model"] == "vae (no memory)" for r in res.rows)
    res = study.attractors(mem, T=4, episodes=2, iters=2, feedbacks=("mean", "threshold", "sample"))  # no figure
    assert len(res.rows) == 4 * 3
    for r in res.rows:
        assert r["own"] + r["other"] + r["none"] == pytest.approx(1.0)
    assert not any(r["energy_first"] != r["energy_first"] for r in res.rows if r["run"] == "dkm")  # DKM has one
    res = study.oneshot(list(runs.values()), T=3, episodes=2, samples=3, iters=1)
    assert len(res.rows) == 5
    vae = next(r for r in res.rows if r["run"] == "vae")
    assert vae["memory"]["in_class"] != vae["memory"]["in_class"]  # NaN: no memory samples
    assert 0 <= vae["prior"]["in_class"] <= 1
    res = study.addressing([runs["km"], runs["pkm"], runs["dkm"]], T=4, episodes=2)
    assert res.rows[0]["kl_y"] == pytest.approx(0.0, abs=1e-5)  # KM starts with q(y|x) = p(y)
    res = study.allocation([runs["pkm"]], items=40, shuffles=3)
    assert res.rows[0]["machines"] == 2
    files = res.save(tmp_path)
    assert files[0].read_text().startswith("**PKM allocation**")


def test_a_tagged_study_leaves_the_untagged_figure_alone(tmp_path):
    pkm = _run(_tiny_models()["pkm"], "pkm")
    res, _ = study.run_study("allocation", [pkm], tmp_path, items=40, shuffles=3)
    untagged = res.png.read_bytes()
    res, files = study.run_study("allocation", [pkm], tmp_path, tag="again", items=40, shuffles=3)
    assert res.png.name.endswith("_again.png") and res.png.parent == tmp_path and files[0].stem.endswith("_again")
    survivors = sorted(p.name for p in tmp_path.glob("allocation_*.png"))
    assert len(survivors) == 2 and (tmp_path / survivors[0]).read_bytes() == untagged, survivors


def test_bad_input_is_one_study_error():
    models = _tiny_models()
    vae, km = _run(models["vae"], "vae"), _run(models["km"], "km")
    with pytest.raises(StudyError, match="without a memory"):
        study.attractors([vae], T=4, episodes=1)
    with pytest.raises(StudyError, match="without a memory"):
        study.capacity([vae], Ts=(4,), episodes=1)
    with pytest.raises(StudyError, match="distinct test images"):
        study.capacity([km], Ts=(8, 200), episodes=1)
    with pytest.raises(StudyError, match=r"\[0, 1\]"):
        study.capacity([km], Ts=(4,), episodes=1, noise=1.5)
    with pytest.raises(StudyError, match="each must be one of mean, threshold, sample"):
        study.attractors([km], T=4, episodes=1, feedbacks=("bogus",))
    with pytest.raises(StudyError, match="single memory"):
        study.allocation([km])


def test_cli_bad_input_exits_2(capsys):
    from km.cli import main

    with pytest.raises(SystemExit) as e:
        main(["study", "capacity", "/nonexistent/run", "--noise", "1.5"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --noise 1.5")
