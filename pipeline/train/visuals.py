"""Pictures of a run: ViT attention rollout, ImageGPT completions (for TensorBoard and PNG files),
and training curves as PNG. Single-device code."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.data.palette import Palette
from pipeline.models import ImageGPT, VisionTransformer


def attention_rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): per block, heads averaged and the residual
    path added (0.5 A + 0.5 I, rows renormalised), multiplied through the blocks. maps: each
    (B, H, N, N) -> (B, N - 1), how much the [class] token draws on each patch."""
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


def curves_png(series: dict[str, list[tuple[int, float]]], path, title: str = "") -> None:
    """Line plots, one panel per named series of (step, value), drawn with PIL (no plotting
    library): axes with the first and last step and the value range, and the curve."""
    from pathlib import Path

    from PIL import Image, ImageDraw

    names = [n for n, points in series.items() if points]
    width, panel_h, margin = 640, 220, 56
    image = Image.new("RGB", (width, max(1, len(names)) * panel_h + 30), "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, 8), title, fill="black")
    for k, name in enumerate(names):
        points = sorted(series[name])
        steps, values = [p[0] for p in points], [p[1] for p in points]
        top = 30 + k * panel_h
        x0, x1, y0, y1 = margin, width - 16, top + 20, top + panel_h - 30
        lo, hi = min(values), max(values)
        span, first, last = (hi - lo) or 1.0, steps[0], steps[-1]
        draw.rectangle((x0, y0, x1, y1), outline="black")
        draw.text((x0, top + 4), name, fill="black")
        draw.text((4, y0), f"{hi:.3g}", fill="black")
        draw.text((4, y1 - 10), f"{lo:.3g}", fill="black")
        draw.text((x0, y1 + 4), f"step {first}", fill="black")
        draw.text((x1 - 80, y1 + 4), f"step {last}", fill="black")
        xy = [
            (x0 + (x1 - x0) * (s - first) / max(last - first, 1), y1 - (y1 - y0) * (v - lo) / span)
            for s, v in points
        ]
        if len(xy) == 1:
            draw.ellipse((xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2), fill="blue")
        else:
            draw.line(xy, fill="blue", width=2)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
