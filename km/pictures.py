"""Pictures researchers look at: denoising chains, conditional sample chains, addressing heatmaps.

Every function works through the `EpisodeModel` interface, so each model gets them for free
(`addressing` only where the model has addressing weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchvision.utils import make_grid


def corrupt(x: torch.Tensor, noise: float, binary: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each pixel with probability `noise` (binary data), or add N(0, noise^2) and clamp (8-bit data)."""
    if binary:
        flip = torch.rand(x.shape, generator=generator, device=x.device) < noise
        return torch.where(flip, 1 - x, x)
    return (x + noise * torch.randn(x.shape, generator=generator, device=x.device)).clamp(0, 1)


def reconstruction_errors(chain: list[torch.Tensor], clean: torch.Tensor, binary: bool) -> list[dict[str, float]]:
    """Per iteration: mean |x_hat - x| and, for binary data, the fraction of wrong pixels at threshold 0.5."""
    rows = []
    for i, x_hat in enumerate(chain):
        row = {"iter": i, "l1": (x_hat - clean).abs().mean().item()}
        if binary:
            row["pixel_error"] = ((x_hat > 0.5).float() != clean).float().mean().item()
        rows.append(row)
    return rows


def labelled_grid(rows: list[tuple[str, torch.Tensor]], title: str, path: Path) -> Path:
    """rows: (label, images (N, C, H, W) in [0, 1]) -> one PNG, one labelled row each, under `title`, so the
    picture says what it shows without the README. The title and the row labels are also stored as the PNG's
    `Title` and `Description` text (one label a line), for tools and tests that read a picture's text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(r.shape[0] for _, r in rows)
    imgs = [torch.cat([r, r.new_full((n - r.shape[0], *r.shape[1:]), 0.5)]) if r.shape[0] < n else r for _, r in rows]
    grid = make_grid(torch.cat(imgs).float().cpu().clamp(0, 1), nrow=n, padding=2, pad_value=0.5)  # (3, H', W')
    H = rows[0][1].shape[-2] + 2
    labels = [label for label, _ in rows]
    fig, ax = plt.subplots(figsize=(0.42 * n + 3.2, 0.42 * len(rows) + 0.9))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_yticks([1 + i * H + H / 2 for i in range(len(rows))], labels, fontsize=8)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9, loc="left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Title": title, "Description": "\n".join(labels)})
    plt.close(fig)
    return path


def picture_title(model: Any, run_dir: Path | None, when: str) -> str:
    """'KanervaMachine (km) | run cpu_km_omniglot/s1 | epoch 3, step 120': what, whose, when."""
    name = (getattr(model, "km_config", None) or {}).get("model", {}).get("name", "?")
    run = f"run {run_dir.parent.name}/{run_dir.name}" if run_dir is not None else "no run"
    return f"{type(model).__name__} ({name}) | {run} | {when}"


def checkpoint_when(model: Any) -> str:
    """'checkpoint of epoch N, step S' of a model loaded by load_run (epochs counted from 1)."""
    epoch, step = getattr(model, "checkpoint_epoch", None), getattr(model, "checkpoint_step", None)
    return f"checkpoint of epoch {epoch + 1}, step {step}" if epoch is not None and epoch >= 0 else "checkpoint"


def _err_text(row: dict[str, float]) -> str:
    parts = [f"L1 {row['l1']:.3f}"]
    if "pixel_error" in row:
        parts.append(f"wrong pixels {row['pixel_error']:.3f}")
    if "energy" in row:
        parts.append(f"energy {row['energy']:.1f} nats/image")
    return ", ".join(parts)


@torch.no_grad()
def denoise_chain(
    model: Any,
    x: torch.Tensor,
    noise: float,
    iters: int,
    binary: bool,
    path: Path,
    columns: int = 12,
    seed: int = 0,
    title: str | None = None,
) -> list[dict[str, float]]:
    """Write clean episodes x (B, T, ...) to memory, corrupt them, read iteratively.

    PNG rows (first episode): original, corrupted, iterations 1..n. Returns per-iteration errors
    against the clean pattern (iteration 0 = the corrupted query) and, for models with an `energy`
    (DKM: the negative ELBO of a query, the dynamics' Lyapunov function), the mean energy per image."""
    model.eval()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    noisy = corrupt(x, noise, binary, gen)
    memory = model.write(x)
    chain = model.denoise(noisy, memory, iters)
    rows = reconstruction_errors([noisy, *chain], x, binary)
    if hasattr(model, "energy"):
        for row, x_i in zip(rows, [noisy, *chain], strict=True):
            row["energy"] = model.energy(x_i, memory).mean().item()
    what = f"{'flipped' if binary else 'noise std'} {noise:g}"
    labelled_grid(
        [
            ("stored episode (written to memory)", x[0, :columns]),
            (f"corrupted query ({what}): {_err_text(rows[0])}", noisy[0, :columns]),
            *[
                (f"read {i}: {_err_text(r)}", c[0, :columns])
                for i, (r, c) in enumerate(zip(rows[1:], chain, strict=True), 1)
            ],
        ],
        title
        or f"iterative reading of corrupted stored items, {iters} reads (errors: mean over {x.shape[0]} episodes)",
        path,
    )
    return rows


@torch.no_grad()
def sample_chain(
    model: Any, x: torch.Tensor, iters: int, path: Path, columns: int = 12, title: str | None = None
) -> Path:
    """Condition on episode x (1, T, ...): PNG rows = the episode, its reconstruction (read from that memory),
    one-shot samples from its memory, those samples after 1..n iterative reads, and a last row of samples from
    the prior memory: the four pictures a researcher looks at first (test episode, reconstruction, memory
    samples, prior samples), on binary and colour data alike."""
    model.eval()
    memory = model.write(x)
    recon = model.mean_image(model.read(x, memory))[:, :columns]  # (1, columns, C, H, W)
    samples = model.generate(memory, columns, batch=1)  # (1, n, C, H, W)
    chain = model.denoise(samples, memory, iters) if iters else []
    prior = model.generate(None, columns, batch=1)
    src = "its memory" if memory is not None else "the prior (no memory: the episode is not used)"
    return labelled_grid(
        [
            ("conditioning episode (written to memory)", x[0, :columns]),
            ("reconstruction from its memory" if memory is not None else "reconstruction", recon[0]),
            (f"one-shot samples from {src}", samples[0]),
            *[(f"samples after {i} read(s)", c[0]) for i, c in enumerate(chain, 1)],
            ("samples from the prior memory" if memory is not None else "samples from the prior", prior[0]),
        ],
        title or "samples conditioned on one episode",
        path,
    )


@torch.no_grad()
def addressing_heatmap(model: Any, x: torch.Tensor, path: Path) -> Path | None:
    """Heatmap of addressing weights w (T x K) for the first episodes of x; None if the model has none."""
    if not hasattr(model, "addressing"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = model.addressing(x).float().cpu()  # (B, T, K)
    n = min(2, w.shape[0])
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
    for i in range(n):
        im = axes[0, i].imshow(
            w[i].numpy(), aspect="auto", cmap="RdBu_r", vmin=-w[i].abs().max().item(), vmax=w[i].abs().max().item()
        )
        axes[0, i].set(xlabel="memory slot k", ylabel="item t in episode", title=f"addressing weights w, episode {i}")
        fig.colorbar(im, ax=axes[0, i])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def machine_pictures(model: Any, x: torch.Tensor, folder: Path, per_machine: int = 12) -> list[Path]:
    """Product memories: a grid of items grouped by their dominant machine (one row per machine, empty
    cells grey) and a bar chart of machine usage (dominant-machine counts and mean weight). [] if the
    model has a single memory."""
    if not hasattr(model, "item_machines"):
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    pi = model.item_machines(x).flatten(0, 1).float().cpu()  # (N, P)
    items = x.flatten(0, 1).float().cpu()  # (N, C, H, W)
    P = pi.shape[1]
    dominant = pi.argmax(-1)  # (N,)
    rows = []
    for p in range(P):
        chosen = items[dominant == p][:per_machine]
        pad = torch.full((per_machine - len(chosen), *items.shape[1:]), 0.5)
        rows.append(torch.cat([chosen, pad]))
    folder.mkdir(parents=True, exist_ok=True)
    counts = torch.bincount(dominant, minlength=P)
    grid = labelled_grid(
        [(f"machine {p}: {int(counts[p])} items (mean weight {pi[:, p].mean():.2f})", r) for p, r in enumerate(rows)],
        f"{type(model).__name__}: test items grouped by their dominant machine (grey: no more items)",
        folder / "machines.png",
    )
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].bar(range(P), torch.bincount(dominant, minlength=P).numpy())
    ax[0].set(xlabel="machine", ylabel="items", title=f"dominant machine of {len(items)} items")
    ax[1].bar(range(P), pi.mean(0).numpy())
    ax[1].set(xlabel="machine", ylabel="mean weight pi", title="mean machine weight")
    fig.tight_layout()
    fig.savefig(folder / "machine_usage.png", dpi=100)
    plt.close(fig)
    return [grid, folder / "machine_usage.png"]


@torch.no_grad()
def window_picture(model: Any, x: torch.Tensor, path: Path, items: int = 8) -> Path | None:
    """Block memories (K++): the memory mean of the first episode (channel mean) with the read windows
    of its first items drawn on it, one colour per item; None if the model has no windowed reads."""
    if not hasattr(model, "read_keys"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from km.memory.block import key_to_theta

    model.eval()
    memory = model.write(x[:1])
    theta = key_to_theta(model.read_keys(x[:1], memory)[0, :items], model.cfg.window, model.cfg.mem_size).cpu()
    S = model.cfg.mem_size
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5), gridspec_kw={"width_ratios": [1, 1]})
    axes[0].imshow(memory[0][0].mean(0).float().cpu().numpy(), cmap="gray")
    colours = plt.cm.tab10.colors
    for i, th in enumerate(theta):
        a, tx, ty = th[0, 0].item(), th[0, 2].item(), th[1, 2].item()
        # normalised [-1, 1] (align_corners=False) -> cell coordinates, origin at the top-left cell's corner
        x0, y0, side = (tx - a + 1) / 2 * S - 0.5, (ty - a + 1) / 2 * S - 0.5, a * S
        axes[0].add_patch(Rectangle((x0, y0), side, side, fill=False, lw=1.5, color=colours[i % 10]))
    axes[0].set(
        title=f"memory mean (channel mean), {len(theta)} read windows", xlim=(-0.5, S - 0.5), ylim=(S - 0.5, -0.5)
    )
    strip = torch.cat(list(x[0, :items, 0].float().cpu()), dim=1)  # the items, side by side
    axes[1].imshow(strip.numpy(), cmap="gray")
    for i in range(len(theta)):
        axes[1].add_patch(
            Rectangle((i * x.shape[-1], 0), x.shape[-1] - 1, x.shape[-2] - 1, fill=False, lw=2, color=colours[i % 10])
        )
    axes[1].set(title="items (frame colour = window)")
    axes[1].axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
