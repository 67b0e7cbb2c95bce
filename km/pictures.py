"""Pictures researchers look at: denoising chains, conditional sample chains, addressing heatmaps.

Every function works through the `EpisodeModel` interface, so each model gets them for free
(`addressing` only where the model has addressing weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchvision.utils import make_grid, save_image


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


def _save_rows(rows: list[torch.Tensor], path: Path) -> Path:
    """rows: list of (N, C, H, W) -> one PNG, one row each."""
    n = rows[0].shape[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(torch.cat(rows).float().cpu(), nrow=n, padding=2, pad_value=0.5), path)
    return path


@torch.no_grad()
def denoise_chain(
    model: Any, x: torch.Tensor, noise: float, iters: int, binary: bool, path: Path, columns: int = 12, seed: int = 0
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
    _save_rows([x[0, :columns], noisy[0, :columns], *[c[0, :columns] for c in chain]], path)
    rows = reconstruction_errors([noisy, *chain], x, binary)
    if hasattr(model, "energy"):
        for row, x_i in zip(rows, [noisy, *chain], strict=True):
            row["energy"] = model.energy(x_i, memory).mean().item()
    return rows


@torch.no_grad()
def sample_chain(model: Any, x: torch.Tensor, iters: int, path: Path, columns: int = 12) -> Path:
    """Condition on episode x (1, T, ...): PNG rows = the episode, one-shot samples from its memory,
    then those samples after 1..n iterative reads, and a last row of samples from the prior memory."""
    model.eval()
    memory = model.write(x)
    samples = model.generate(memory, columns, batch=1)  # (1, n, C, H, W)
    chain = model.denoise(samples, memory, iters) if iters else []
    prior = model.generate(None, columns, batch=1)
    return _save_rows([x[0, :columns], samples[0], *[c[0] for c in chain], prior[0]], path)


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
    grid = _save_rows(rows, folder / "machines.png")
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
