"""The `km` command.

    km train [overrides...]            e.g. km train model=vae data=mnist trainer.max_epochs=5 seed=1
    km train resume=<run dir | checkpoint | auto> [trainer.max_epochs=N]
    km eval <run dir | checkpoint> [--split test] [--is-samples N] [overrides...]
    km sweep start SPEC.yaml [--local]  register a W&B sweep (online) or create a local sweep dir (offline)
    km sweep agent ID|DIR [--count N] [--gpus 0,1]   run sweep agents (see km/sweep/)
    km compare TARGET... [--out DIR]   tables and plots across runs (see km/compare/)
    km data check [NAME...]            verify the local data files (md5)
    km data download NAME [--dir D]    fetch official files (needs internet) into the local layout
    km config [overrides...]           print the resolved config
    km campaign FILE [--budget-s 540] [--procs N|auto] [--smoke]   paper budgets on one GPU, in time slices
    km denoise <run> [--noise 0.15] [--iters 5]   iterative reading of corrupted test items (PNG chain)
    km attract ...                     the same (DKM's attractor dynamics; prints the energy per step)
    km sample <run> [--iters 3]        one-shot samples from a written test episode (+ addressing heatmap)
    km study NAME RUN... [--out DIR]   what each memory does: capacity | attractors | oneshot | addressing |
                                       allocation; a table and a PNG (see km/study.py)

Bad input (unknown config keys or options, missing data, incompatible checkpoints) prints one
line starting with 'error:' and exits with code 2; a run stopped by a NaN loss exits with 3.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path


def fail(msg: str, code: int = 2) -> None:
    """A user error (code 2, the default) or a diverged run (3): one line on stderr, then exit. The bench
    scripts use it too, so every command of the project fails the same way."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def _saved_choices(overrides: list[str]) -> list[str]:
    """With `resume=<run dir or checkpoint>`: the run's own group choices (model=, data=, experiment=, from
    run.json) as overrides, so that its model's options (model.query_noise of a DKM run, say) are checked
    against its model rather than the default one. Choices given on the command line win."""
    from km.config import GROUPS
    from km.overrides import split_override
    from km.runs import read_meta

    given = dict(split_override(o) for o in overrides)
    target = Path(given.get("resume") or "")
    if not given.get("resume") or not target.exists():
        return []  # no resume, `auto`, or a missing path: train reports it
    run_dir = target if target.is_dir() else target.parent.parent  # <run>/checkpoints/<file>.ckpt
    choices = read_meta(run_dir).get("choices") or {}
    return [f"{g}={v}" for g, v in choices.items() if g in GROUPS and g not in given and isinstance(v, str)]


def check_run_path(target: str, prefix: str = "") -> None:
    """A run path given to resume=, km eval, km sample, km denoise or km study (after the command's options), checked before torch loads
    (well under a second): it exists, and a folder is a run, not a folder of runs (those are listed)."""
    p = Path(target)
    if not p.exists():
        fail(f"{prefix}no such run directory or checkpoint: {p}")
    if p.is_dir() and not (p / "config.yaml").is_file() and not (p / "checkpoints").is_dir():
        runs = sorted(str(c.parent.relative_to(p)) for c in p.glob("**/config.yaml") if "wandb" not in c.parts)
        if runs:
            shown = ", ".join(runs[:6]) + (f" and {len(runs) - 6} more" if len(runs) > 6 else "")
            fail(
                f"{p} is a folder of {len(runs)} runs, not a run: {shown}; give one of them (km compare takes the folder)"
            )
        fail(f"{p} holds no run (no config.yaml, no checkpoints/)")


def cmd_train(args: argparse.Namespace) -> None:
    from km.config import compose_config
    from km.overrides import split_override

    for o in args.overrides:  # a resume path is checked before Hydra and torch
        try:
            key, value = split_override(o)
        except Exception:  # noqa: BLE001 - a malformed override: compose_config says why
            continue
        if key == "resume" and value not in ("auto", "", "null", None):
            check_run_path(str(value), prefix="cannot resume: ")

    # a bad option is refused before torch is even imported; a resumed run composes with its own groups
    cfg = compose_config(_saved_choices(args.overrides) + args.overrides)
    from km.train import train

    summary = train(cfg, args.overrides)
    if "rank" in summary:  # DDP worker process: rank 0 prints
        return
    if "already_finished" in summary:
        n = summary["already_finished"]
        print(
            f"{summary['run_dir']} is finished ({n} of {n} epochs, evaluated: eval.json); nothing to do. "
            f"To train it further: km train resume={summary['run_dir']} trainer.max_epochs={2 * n}"
        )
        return
    if "paused" in summary:  # a time slice (KM_STOP_AT, set by km campaign) ended at an epoch end
        print(
            f"paused after epoch {summary['paused']} of {summary['max_epochs']} at the time limit; "
            f"continue with: km train resume={summary['run_dir']}"
        )
        return
    ev = summary.get("eval")
    print(f"run: {summary['run_dir']}")
    if summary.get("samples"):
        print(f"samples: {summary['samples']}")
    if ev:
        m = ev["metrics"]
        kinds = [ev["split"]] + (["test_class"] if ev.get("class_episodes") else [])
        for kind in kinds:  # headline numbers of each protocol (every number is in eval.json)
            for leaf in (
                "neg_elbo",
                f"nll_is{ev['is_samples']}",
                "memory_conditional",
                "heldout",
                f"heldout_nll_is{ev['is_samples']}",
            ):
                if f"{kind}/{leaf}" in m:
                    print(f"{kind}/{leaf}: {m[f'{kind}/{leaf}']:.3f} {ev['unit']}")


def _check_counts(args: argparse.Namespace) -> None:
    """One-line errors for out-of-range command options (before any model or data is loaded)."""
    checks = {"is_samples": (0, "importance samples"), "episodes": (1, "test episodes"), "iters": (1, "iterations")}
    for key, (low, what) in checks.items():
        v = getattr(args, key, None)
        if v is not None and v < low:
            opt = "--" + key.replace("_", "-")
            fail(f"{opt} {v}: the number of {what} must be >= {low}")
    noise = getattr(args, "noise", None)
    if noise is not None and not 0 <= noise <= 1:
        fail(f"--noise {noise}: a pixel flip probability (binary data) or noise std must be in [0, 1]")


def cmd_eval(args: argparse.Namespace) -> None:
    _check_counts(args)
    check_run_path(args.target)
    from km.evaluate import evaluate

    ev = evaluate(args.target, split=args.split, is_samples=args.is_samples, overrides=args.overrides)
    print(f"wrote {ev['file']}")


def _test_episodes(args: argparse.Namespace):
    _check_counts(args)
    check_run_path(args.target)
    from km.evaluate import load_run

    cfg, run_dir, ckpt, dm, model = load_run(args.target, args.overrides)
    dm.setup("test")
    first = next(iter(dm.test_dataloader()))
    x = dm.get_batch("test", first["idx"][: args.episodes])["x"]  # (E, T, C, H, W)
    return run_dir, dm, model, x


def cmd_denoise(args: argparse.Namespace) -> None:
    run_dir, dm, model, x = _test_episodes(args)
    from km.pictures import checkpoint_when, denoise_chain, picture_title

    binary = dm.likelihood == "bernoulli"
    path = run_dir / "denoise" / f"noise{args.noise:g}_iters{args.iters}.png"

    title = picture_title(model, run_dir, f"{checkpoint_when(model)} | iterative reading of corrupted test items")
    rows = denoise_chain(model, x, args.noise, args.iters, binary, path, title=title)
    energy = "energy" in rows[0]
    print(
        f"{'iter':>4} {'L1 error':>9}"
        + (f" {'pixel error':>11}" if binary else "")
        + (f" {'energy (nats/image)':>19}" if energy else "")
    )
    for r in rows:
        print(
            f"{r['iter']:>4} {r['l1']:>9.4f}"
            + (f" {r['pixel_error']:>11.4f}" if binary else "")
            + (f" {r['energy']:>19.2f}" if energy else "")
        )
    print(f"chain: {path}  (rows: original, corrupted, iterations 1..{args.iters}; iter 0 = corrupted query)")


def cmd_sample(args: argparse.Namespace) -> None:
    run_dir, dm, model, x = _test_episodes(args)
    from km.pictures import (
        addressing_heatmap,
        checkpoint_when,
        machine_pictures,
        picture_title,
        sample_chain,
        window_picture,
    )

    title = picture_title(model, run_dir, f"{checkpoint_when(model)} | samples conditioned on one test episode")
    path = sample_chain(
        model, x[:1], args.iters, run_dir / "samples" / f"conditional_iters{args.iters}.png", title=title
    )
    print(
        f"samples: {path}  (rows: conditioning episode, its reconstruction, one-shot samples, after 1..{args.iters} reads, prior samples)"
    )
    heat = addressing_heatmap(model, x, run_dir / "samples" / "addressing.png")
    if heat:
        print(f"addressing: {heat}")
    for pic in machine_pictures(model, x, run_dir / "samples"):
        print(f"machines: {pic}")
    win = window_picture(model, x, run_dir / "samples" / "windows.png")
    if win:
        print(f"read windows: {win}")


def cmd_study(args: argparse.Namespace) -> None:
    _check_counts(args)  # the options first, then the runs' paths, both before torch loads
    for r in args.runs:
        check_run_path(r)
    from km.study import StudyError, main

    try:
        main(args)
    except StudyError as e:
        fail(str(e))


def cmd_campaign(args: argparse.Namespace) -> None:
    from km.campaign import CampaignError, main

    try:
        main(args)
    except CampaignError as e:
        fail(str(e))


def cmd_config(args: argparse.Namespace) -> None:
    from km.config import compose_config, to_yaml

    print(to_yaml(compose_config(args.overrides)), end="")


def cmd_data(args: argparse.Namespace) -> None:
    from datamodules import resolve_data_dir
    from datamodules.catalog import DEFAULT_FILES, NAMES

    names = args.names or NAMES
    for n in names:
        if n not in DEFAULT_FILES:
            fail(f"unknown data set '{n}'; valid: {', '.join(NAMES)}")
    if args.action == "download":
        from datamodules.download import download

        root = resolve_data_dir(args.dir, must_exist=False) if args.dir else resolve_data_dir(None, must_exist=False)
        for n in names:
            download(n, root)
            print(f"{n}: downloaded into {root}")
        return
    from datamodules.paths import DataFiles

    for n in names:  # a check hashes every file: a cached md5 cannot vouch for a file changed in place
        files = DataFiles(n, args.dir)
        for rel in DEFAULT_FILES[n]:
            files.verified(rel, fresh=True)
        print(f"{n}: ok ({files.root})")


# The keys a researcher changes most, with what they do (defaults: `km config` prints every resolved value).
TRAIN_KEYS = (
    ("seed=1", "the run's seed"),
    ("trainer.max_epochs=N", "the budget (epochs x data.train_episodes_per_epoch / data.batch_size steps)"),
    ("data.train_episodes_per_epoch=N", "episodes per epoch (null: the whole training split)"),
    ("data.episode_length=T data.batch_size=B", "items per episode, episodes per step"),
    ("data.episodes=iid|class", "training episodes: unrelated images, or one class each"),
    ("model.lr=1e-3 model.code_dim=C", "optimiser rate, code size"),
    ("eval.is_samples=N", "importance samples of the test pass (0: none)"),
    ("name=NAME run_id=ID", "the run directory runs/NAME/ID"),
    ("resume=RUN|auto", "continue a run (resume=auto with run_id= continues it if it exists)"),
    ("trainer.compile=true", "torch.compile the model's step (GPU)"),
    ("logger=csv", "metrics.csv only, no W&B"),
)


def _train_epilog() -> str:
    """Config groups with their choices and the most used keys; read from configs/ (no torch, no Hydra)."""
    from km.config import GROUPS, _group_options

    lines = ["config groups (GROUP=CHOICE):"]
    for g in GROUPS:
        opts = ", ".join(_group_options(g)) or "-"
        lines += textwrap.wrap(opts, 108, initial_indent=f"  {g:<11} ", subsequent_indent=" " * 14)
    lines += ["", "most used keys:"]
    lines += [f"  {k:<42} {what}" for k, what in TRAIN_KEYS]
    lines += [
        "",
        "shorter runs: experiment=debug (a whole train-eval loop in seconds), or lower trainer.max_epochs and",
        "data.train_episodes_per_epoch. Every key and its value: km config [overrides...]  (e.g. km config model=km)",
    ]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one `error:` line naming the command's --help, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        fail(f"{message} (see: {self.prog} --help)")


STUDY_NAMES = ("capacity", "attractors", "oneshot", "addressing", "allocation")  # km.study.STUDIES

# name -> (what the study asks, its options: (flag, default shown, help)); the defaults are km/study.py's own
STUDY_HELP: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "capacity": (
        "store T items, cue each with a corrupted copy, read --iters times: retrieval error and accuracy against T",
        [
            ("--T", "8,16,32,64,128", "items stored per episode, a comma list"),
            ("--episodes", "16", "episodes per T"),
            (
                "--noise",
                "0.15",
                "pixel flip probability of the cues (binary data) or std of the Gaussian noise added (colour), in [0, 1]",
            ),
            ("--iters", "1", "reads of each cue"),
        ],
    ),
    "attractors": (
        "write T clean items, start a chain at each item's corrupted copy, iterate the read: does it settle on the item?",
        [
            ("--T", "32", "items per episode"),
            ("--episodes", "8", "episodes"),
            ("--noise", "0.15", "pixel flip probability of the starting points, in [0, 1]"),
            ("--iters", "20", "reads per chain"),
            ("--feedback", "mean,threshold", "what each read feeds back: a comma list of mean | threshold | sample"),
        ],
    ),
    "oneshot": (
        "write one-class episodes, sample from the memory and from the prior: do the samples keep the class?",
        [
            ("--T", "15", "items per one-class episode"),
            ("--episodes", "32", "episodes"),
            ("--iters", "3", "iterative reads applied to each sample"),
            ("--samples", "10", "samples per episode"),
        ],
    ),
    "addressing": (
        "how spread, how distinct and how class-aligned the addressing weights w of an episode's items are",
        [("--T", "32", "items per episode"), ("--episodes", "16", "episodes")],
    ),
    "allocation": (
        "PKM: which machine each test item goes to, against its label (purity, mutual information)",
        [("--items", "10000", "labelled test items")],
    ),
}
TYPES = {"--episodes": int, "--iters": int, "--samples": int, "--items": int, "--noise": float}


def _study_arguments(p: argparse.ArgumentParser) -> None:
    """`km study NAME --help` shows that study's question and options, with its own defaults."""
    sub = p.add_subparsers(dest="study", required=True, metavar="NAME", parser_class=_Parser)
    for name, (what, options) in STUDY_HELP.items():
        s = sub.add_parser(name, help=what, description=f"km study {name}: {what}")
        s.add_argument("runs", nargs="+", help="run directories or checkpoints, all of one data set")
        for flag, default, text in options:
            typ = TYPES.get(flag, str)
            value = typ(default) if flag in ("--noise", "--samples", "--items", "--feedback") else None
            s.add_argument(flag, type=typ, default=value, help=f"{text} (default {default})")
        s.add_argument("--out", default=None, help="folder for the PNG, .md and .json (default: <first run>/study)")
        s.add_argument("--seed", type=int, default=0, help="which test items (default 0)")
        s.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
        s.add_argument("--tag", default=None, help="suffix of the output files: <study>_<data>_<tag>.png/.md/.json")
        s.set_defaults(T=None, episodes=None, iters=None, noise=0.15, samples=10, items=10000)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="km", description="kanerva-lab: Kanerva Machine experiments")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        help="train a model (Hydra overrides)",
        description="Train a model: Hydra overrides KEY=VALUE and GROUP=CHOICE (a typo is one line, exit 2).",
        epilog=_train_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("overrides", nargs="*")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="evaluate a run on the test episodes")
    e.add_argument("target", help="run directory or checkpoint")
    e.add_argument("--split", default="test", choices=["test", "val"])
    e.add_argument(
        "--is-samples", type=int, default=None, help="importance samples (default: the run's eval.is_samples)"
    )
    e.add_argument("overrides", nargs="*")
    e.set_defaults(func=cmd_eval)
    c = sub.add_parser("config", help="print the resolved config")
    c.add_argument("overrides", nargs="*")
    c.set_defaults(func=cmd_config)
    dn = sub.add_parser(
        "denoise", aliases=["attract"], help="iterative reading (DKM: attractor dynamics) of corrupted test episodes"
    )
    dn.add_argument("target", help="run directory or checkpoint")
    dn.add_argument("--noise", type=float, default=0.15, help="pixel flip probability (binary) or noise std")
    dn.add_argument("--iters", type=int, default=5)
    dn.add_argument("--episodes", type=int, default=4)
    dn.add_argument("overrides", nargs="*")
    dn.set_defaults(func=cmd_denoise)
    sm = sub.add_parser("sample", help="conditional samples from a written test episode")
    sm.add_argument("target", help="run directory or checkpoint")
    sm.add_argument("--iters", type=int, default=3)
    sm.add_argument("--episodes", type=int, default=2)
    sm.add_argument("overrides", nargs="*")
    sm.set_defaults(func=cmd_sample)
    st = sub.add_parser("study", help="studies of what each memory does, on trained runs (table + PNG)")
    _study_arguments(st)
    st.set_defaults(func=cmd_study)
    from km import compare, sweep  # stdlib-only imports at module level: cheap

    sw = sub.add_parser("sweep", help="hyperparameter sweeps, online (W&B) or offline (local engine)")
    sweep.add_arguments(sw)
    sw.set_defaults(func=sweep.main)
    cp = sub.add_parser("compare", help="compare runs: markdown/CSV tables, learning curves, NLL bars")
    compare.add_arguments(cp)
    cp.set_defaults(func=compare.main)
    cm = sub.add_parser("campaign", help="train a list of experiments to full budget on one GPU, in time slices")
    from km import campaign

    campaign.add_arguments(cm)
    cm.set_defaults(func=cmd_campaign)
    d = sub.add_parser("data", help="check or download data sets")
    d.add_argument("action", choices=["check", "download"])
    d.add_argument("names", nargs="*")
    d.add_argument("--dir", default=None, help="data directory (default: KM_DATA_DIR, then ../shared/data)")
    d.set_defaults(func=cmd_data)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    from datamodules import DataError  # these four are torch-free: a command that does not train stays fast
    from km.overrides import ConfigError
    from km.runs import NonFiniteLossError, RunError, RunInterrupted

    try:
        args.func(args)
    except RunInterrupted as e:
        fail(str(e), code=e.code)
    except (ConfigError, RunError, DataError) as e:
        fail(str(e))
    except NonFiniteLossError as e:
        fail(f"training stopped: {e}", code=3)
    except KeyboardInterrupt:
        fail("interrupted; continue with: km train resume=<run dir>", code=130)
    except OSError as e:  # the file system said no (a full disk, a read-only folder, a path that is a file)
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        fail(f"{e.strerror or type(e).__name__}{where}; nothing was lost: the files written before are intact")


if __name__ == "__main__":
    main()
