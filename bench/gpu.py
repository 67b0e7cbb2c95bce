"""One-shot device check: every model at the papers' sizes on the accelerator, one table.

Run:  python bench/gpu.py            (or `make gpu-check`)
      python bench/gpu.py --tiny --compile off     (CPU, seconds: what the test suite runs)

Sizes: ``auto`` (the default) is the papers' sizes (``configs/experiment/paper_<model>_omniglot.yaml``: model,
nets, B and T) on CUDA, and tiny nets and episodes on a CPU, where the papers' sizes take minutes per model.
For every model it prints, on one fixed batch (synthetic binary images, so no data is needed):

    fp32 ms/step     training step (forward + backward + Adam), median of ``--steps`` after 2 warm-up steps
    images/s         B * T / that step time
    peak MiB         peak accelerator memory of the fp32 steps (CUDA only)
    bf16 ms/step     the same step under ``torch.autocast(bfloat16)`` (what trainer=gpu's bf16-mixed does; the
                     memory algebra keeps float32 inside: ``km.memory.kanerva.KanervaMemory``)
    loss fp32 / bf16 the training loss of the same batch with the same random draws, and their relative gap
    compiled ms/step the fp32 step of ``torch.compile(model.episode_elbo)``, and its compile time

``--compile auto`` compiles on CUDA only: on this project's 2-core CPU machines inductor takes minutes per model,
so the CPU table says "skipped". After the table, the episode sampler runs on the same device when the data is
found (episodes/s of ``get_batch`` on the device, images checked to be there; Omniglot, MNIST at tiny sizes).

Inductor's layout optimisation is switched off here (``TORCHINDUCTOR_LAYOUT_OPTIMIZATION=0`` unless set):
on an H200 with torch 2.11 it made every model's compiled backward fail in ``convolution_backward`` ("expected
size 32==32, stride 256==1 at dim=1"); with it off all five compile (docs/results/gpu/h200_2026-12-01*.txt).
fp32 matmuls stay at full float32 ("highest"), as the memory algebra needs; TF32 would be a separate decision.
A model that fails is printed as a row saying why, and each row is printed as soon as it is done.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import time
import traceback
from collections.abc import Callable

os.environ.setdefault("TORCHINDUCTOR_LAYOUT_OPTIMIZATION", "0")  # before torch: see the docstring

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

MODEL_NAMES = ("vae", "km", "dkm", "pkm", "kpp")
# tiny sizes (CPU smoke test): every model's memory and nets shrunk, B = 2 episodes of T = 4
TINY = ["net.channels=[4,8,8]", "net.embed_dim=16", "data.batch_size=2", "data.episode_length=4", "model.code_dim=8"]
TINY_MODEL = {
    "km": ["model.memory_size=8", "model.hidden=16"],
    "pkm": ["model.memory_size=8", "model.hidden=16"],
    "dkm": ["model.memory_size=8"],
    "kpp": ["model.mem_size=8", "model.window=4", "model.hidden=16", "model.read_steps=1"],
    "vae": [],
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} thread(s), load {os.getloadavg()[0]:.2f}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_step(step: Callable[[], object], device: torch.device, steps: int, warmup: int = 2) -> float:
    """Median seconds of ``step()`` after min(warmup, steps) calls, synchronised on the device."""
    for _ in range(min(warmup, steps)):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(name: str, tiny: bool, device: torch.device, extra: tuple[str, ...] = ()):
    """(model on device, x (B, T, 1, S, S) on device, cfg) from the paper experiment config of ``name``, with
    the overrides ``extra`` (``--set``) last."""
    from km.config import compose_config
    from km.train import build_model

    overrides = [f"experiment=paper_{name}_omniglot"] + (TINY + TINY_MODEL[name] if tiny else []) + list(extra)
    cfg = compose_config(overrides)
    S = cfg.data.image_size
    model = build_model(cfg, (1, S, S), "bernoulli").to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.full((cfg.data.batch_size, cfg.data.episode_length, 1, S, S), 0.2), generator=gen)
    return model, x.to(device), cfg


def loss_on(model, x: torch.Tensor, device: torch.device, bf16: bool) -> float:
    """Training loss of batch x with fixed random draws (seed 0), in fp32 or under bf16 autocast."""
    torch.manual_seed(0)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return float(model.training_loss(model.episode_elbo(x)))


def bf16_supported(device: torch.device) -> bool:
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())


class time_limit:
    """Raise TimeoutError in the main thread after ``seconds`` (SIGALRM; no limit where there is none)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds if hasattr(signal, "SIGALRM") else 0

    def _raise(self, *_) -> None:
        raise TimeoutError(f"over {self.seconds:.0f} s")

    def __enter__(self) -> None:
        if self.seconds:
            self.previous = signal.signal(signal.SIGALRM, self._raise)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *_) -> None:
        if self.seconds:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)


def check_model(
    name: str,
    tiny: bool,
    device: torch.device,
    steps: int,
    compile_: bool,
    compile_limit: float = 0,
    extra: tuple[str, ...] = (),
) -> dict[str, str]:
    model, x, cfg = build(name, tiny, device, extra)
    B, T = x.shape[:2]
    opt = model.configure_optimizers()

    def step(fn=model.episode_elbo, bf16: bool = False) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = fn(x)
        model.training_loss(out).backward()
        opt.step()

    row = {
        "model": name,
        "B x T": f"{B} x {T}",
        "image": "x".join(map(str, x.shape[2:])),
        "params": f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M",
    }
    loss32 = loss_on(model, x, device, bf16=False)  # before any step: both losses on the same weights
    loss16 = loss_on(model, x, device, bf16=True) if bf16_supported(device) else float("nan")
    row.update(
        {
            "loss fp32": f"{loss32:.2f}",
            "loss bf16": f"{loss16:.2f}" if loss16 == loss16 else "unsupported",
            "bf16 gap": f"{abs(loss16 - loss32) / abs(loss32):.1e}" if loss16 == loss16 else "-",
        }
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t32 = median_step(step, device, steps)
    row["peak MiB"] = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}" if device.type == "cuda" else "-"
    row["fp32 ms/step"] = f"{1e3 * t32:.1f}"
    row["images/s"] = f"{B * T / t32:.0f}"
    row["bf16 ms/step"] = (
        f"{1e3 * median_step(lambda: step(bf16=True), device, steps):.1f}" if bf16_supported(device) else "unsupported"
    )
    if compile_:
        compiled = torch.compile(model.episode_elbo)
        sync(device)
        start = time.perf_counter()
        try:
            with time_limit(compile_limit):
                step(compiled)  # the first call compiles
        except Exception as e:  # noqa: BLE001 - dynamo wraps the TimeoutError; keep the eager row either way
            if "TimeoutError" in f"{type(e).__name__} {e}":
                row["compile s"], row["compiled ms/step"] = f">{compile_limit:.0f}", "timed out"
            else:
                row["compile s"], row["compiled ms/step"] = "failed", f"{type(e).__name__}"
                print(f"{name}: torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                if os.environ.get("KM_BENCH_TRACEBACK"):
                    traceback.print_exc()
            return row
        sync(device)
        row["compile s"] = f"{time.perf_counter() - start:.1f}"
        row["compiled ms/step"] = f"{1e3 * median_step(lambda: step(compiled), device, steps):.1f}"
    else:
        row["compile s"] = row["compiled ms/step"] = "skipped"
    return row


def check_sampler(device: torch.device, tiny: bool) -> str:
    """Episodes/s of the in-memory sampler's get_batch on ``device``, or why it was skipped."""
    from datamodules import DataError
    from km.config import compose_config
    from km.train import build_datamodule

    # tiny: MNIST, which loads in a fraction of a second (Omniglot's first load resizes 105 x 105 images: ~10 s)
    cfg = compose_config(["data=mnist"] + TINY if tiny else ["experiment=paper_km_omniglot"])
    dm = build_datamodule(cfg)
    try:
        dm.setup()
    except (DataError, OSError) as e:
        return f"episode sampler: skipped ({str(e).splitlines()[0][:120]})"
    loader = dm.episodes("train")
    idx = next(iter(loader))["idx"].to(device)  # (B, T), as Lightning moves it before on_after_batch_transfer
    batch = dm.get_batch("train", idx)
    if batch["x"].device.type != device.type or batch["y"].device.type != device.type:
        raise RuntimeError(f"episode sampler returned images on {batch['x'].device}, not on {device}")
    t = median_step(lambda: dm.get_batch("train", idx), device, steps=20)
    return (
        f"episode sampler on {device.type}: {idx.shape[0] / t:,.0f} episodes/s "
        f"(B={idx.shape[0]}, T={idx.shape[1]}, images on {batch['x'].device})"
    )


COLUMNS = (
    "model",
    "B x T",
    "image",
    "params",
    "fp32 ms/step",
    "images/s",
    "peak MiB",
    "bf16 ms/step",
    "loss fp32",
    "loss bf16",
    "bf16 gap",
    "compiled ms/step",
    "compile s",
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (default on a CPU: auto)")
    parser.add_argument("--paper", action="store_true", help="the papers' sizes even on a CPU (slow)")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (median)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="auto: on CUDA only")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for every model (net.channels_last=true)",
    )
    parser.add_argument(
        "--compile-limit",
        type=float,
        default=120,
        help="seconds one model may compile, best effort: inductor can swallow the alarm (0: none)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = args.tiny or (device.type == "cpu" and not args.paper)
    compile_ = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    console = Console(width=200)
    sizes = "tiny sizes" if tiny else "the papers' sizes (configs/experiment/paper_*_omniglot.yaml)"
    sizes += "".join(f", {o}" for o in args.set)
    table = Table(title=f"device check: {device_name(device)}, torch {torch.__version__}, {sizes}")
    for col in COLUMNS:
        table.add_column(col, justify="right")
    for name in args.models:
        # a model that fails is a row saying why, not a lost table; each row is printed as it is done
        try:
            row = check_model(name, tiny, device, args.steps, compile_, args.compile_limit, tuple(args.set))
        except Exception as e:  # noqa: BLE001 - the check reports every model's outcome
            row = {"model": name, "B x T": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}"}
        row = {c: row.get(c, "-") for c in COLUMNS}
        console.print("  ".join(f"{c}={row[c]}" for c in COLUMNS), soft_wrap=True)
        table.add_row(*(row[c] for c in COLUMNS))
    console.print(table)
    if not compile_:
        why = "--compile off" if args.compile == "off" else "CPU: inductor takes minutes per model here; --compile on"
        console.print(f"torch.compile: skipped ({why})")
    try:
        console.print(check_sampler(device, tiny))
    except Exception as e:  # noqa: BLE001
        console.print(f"episode sampler: failed: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
