"""Pictures of a run: ViT attention rollout, ImageGPT completions (for TensorBoard and PNG files),
and training curves as PNG (matplotlib, Agg). Single-device code."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.data.palette import Palette
from pipeline.models import ImageGPT, VisionTransformer


def attention_rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): per block, heads averaged and the residual
    path added (0.5 A + 0.5 I, rows renormalised), multiplied through the blocks. maps: each
    (B, H, N, N) -> (B, N - 1), how much the [class] token draws on each other token."""
    b, _, n, _ = maps[0].shape
    eye = torch.eye(n, device=maps[0].device, dtype=torch.float32)
    rollout = eye.expand(b, n, n)
    for a in maps:
        a = 0.5 * a.float().mean(1) + 0.5 * eye
        a = a / a.sum(-1, keepdim=True)
        rollout = a @ rollout
    return rollout[:, 0, 1:]


@torch.no_grad()
def rollout_panel(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, C, H, W) -> (B, 3, H, 2W) in [0, 1]: the image, then its rollout map."""
    from pipeline.data.transforms import model_input

    x = model_input(images).to(next(model.parameters()).dtype)
    heat = attention_rollout(model.attention_maps(x))
    heat = heat[:, model.cfg.prefix_tokens - 1 :]  # the patches (DeiT: not its second token)
    g = model.cfg.grid
    heat = heat.reshape(-1, 1, g, g)
    heat = (heat - heat.amin((2, 3), keepdim=True)) / (
        heat.amax((2, 3), keepdim=True) - heat.amin((2, 3), keepdim=True) + 1e-8
    )
    # A hybrid's stem pads, so its grid can reach past the image (28 px: 4 tokens of 8 px): lay
    # the grid over the pixels it covers, then crop to the image.
    covered = g * model.cfg.token_pixels
    heat = F.interpolate(heat, size=(covered, covered), mode="bilinear", align_corners=False)
    heat = heat[..., : images.shape[-2], : images.shape[-1]]
    picture = images.float() / 255
    if picture.shape[1] == 1:
        picture = picture.expand(-1, 3, -1, -1)
    colour = torch.cat([heat, heat.pow(3), 1 - heat], dim=1)  # warm where the model looks
    return torch.cat([picture, 0.5 * picture + 0.5 * colour], dim=-1).clamp(0, 1)


@torch.no_grad()
def complete(
    model: ImageGPT, tokens: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep the top half of each image (B, T) and let the model fill in the rest.

    Autoregressive models sample pixel by pixel; BERT-style models predict every masked pixel
    at once from the visible half."""
    half = (model.cfg.image_size // 2) * model.cfg.image_size
    out = tokens.clone()
    if not model.cfg.causal:
        out[:, half:] = model.cfg.mask_id
        logits = model(out)[:, half:].float()
        out[:, half:] = logits.argmax(-1)
        return out
    return model.sample(out, half, generator)


@torch.no_grad()
def completion_panel(
    model: ImageGPT, tokens: torch.Tensor, palette: Palette, generator=None
) -> torch.Tensor:
    """(B, T) tokens -> (B, 3, S, 3S) in [0, 1]: the original, the half the model saw, its
    completion."""
    s = model.cfg.image_size
    done = complete(model, tokens, generator)
    seen = tokens.clone()
    seen[:, (s // 2) * s :] = 0
    rows = [
        palette.decode(x.reshape(-1, s, s).cpu()).permute(0, 3, 1, 2).float() / 255
        for x in (tokens, seen, done)
    ]
    rows[1][:, :, s // 2 :] = 0.5  # grey: what the model was not shown
    panel = torch.cat(rows, dim=-1)
    return panel.expand(-1, 3, -1, -1) if panel.shape[1] == 1 else panel


# ---------------------------------------------------------------------------------------------
# PNG files in the run folder (readable without TensorBoard)


def save_panel(panel: torch.Tensor, path) -> None:
    """(B, 3, H, W) in [0, 1] -> one PNG, the B pictures stacked top to bottom, enlarged to at
    least 128 pixels high each (nearest, so pixels stay visible)."""
    from pathlib import Path

    from PIL import Image

    b, _, h, w = panel.shape
    scale = max(1, -(-128 // h))
    grid = panel.clamp(0, 1).permute(0, 2, 3, 1).reshape(b * h, w, 3)
    pixels = (grid * 255).round().to(torch.uint8).cpu().numpy()
    image = Image.fromarray(pixels).resize((w * scale, b * h * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def curves_png(
    panels: dict[str, dict[str, list[tuple[int, float]]]], path, title: str = "",
    log_scale: tuple[str, ...] = (),
) -> None:  # fmt: skip
    """Training curves with matplotlib (Agg): one panel per entry of `panels` (its title ->
    {curve label: [(step, value)]}), two panels a row, axes labelled (step; the panel's title),
    panels named in `log_scale` on a logarithmic y axis. Empty panels are left out."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file, on any machine
    import matplotlib.pyplot as plt

    shown = {name: curves for name, curves in panels.items() if any(curves.values())}
    columns = 2 if len(shown) > 1 else 1
    rows = max(1, -(-len(shown) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(6.4 * columns, 3.2 * rows), squeeze=False)
    for ax, (name, curves) in zip(axes.flat, shown.items(), strict=False):
        for label, points in curves.items():
            if points:
                steps, values = zip(*sorted(points), strict=True)
                ax.plot(steps, values, label=label, marker="o" if len(steps) < 20 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        if name in log_scale:
            ax.set_yscale("log")
        if len(curves) > 1:
            ax.legend()
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sweep_png(sweeps: dict[str, dict], path, title: str = "") -> None:
    """Linear probe accuracy against block depth (matplotlib, Agg): one panel per target, a
    line per curve of `sweeps[target]["curves"]` ({label: [(block, value)]}), a dashed
    horizontal line per raw-pixel baseline in `sweeps[target]["pixels"]` ({label: value})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sweeps), figsize=(8.4 * len(sweeps), 4.0), squeeze=False)
    for ax, (target, sweep) in zip(axes.flat, sorted(sweeps.items()), strict=True):
        colours: dict[str, str] = {}  # one colour per pooling; untrained dashed, open markers
        for label, points in sorted(sweep["curves"].items()):
            blocks, values = zip(*sorted(points), strict=True)
            untrained = "(untrained)" in label
            key = label.replace(" (untrained)", "")
            colour = colours.setdefault(key, f"C{len(colours)}")
            ax.plot(
                blocks, [100 * v for v in values], color=colour, marker="o", label=label,
                linestyle="--" if untrained else "-", markerfacecolor="white" if untrained else colour,
            )  # fmt: skip
        for i, (label, value) in enumerate(sorted(sweep["pixels"].items())):
            ax.axhline(100 * value, color="grey", linestyle=(":", "-.")[i % 2], label=label)
        ax.set_title(f"linear probe on {target}")
        ax.set_xlabel("block")
        ax.set_ylabel("top-1 or precision@1 (%)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
