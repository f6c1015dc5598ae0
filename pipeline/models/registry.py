"""Named model sizes: `vit-h14`, `igpt-xl`, `vit-tiny-p4` are names, not copied constructors."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from pipeline.models.igpt import IGPTConfig, ImageGPT
from pipeline.models.layers import Backbone
from pipeline.models.pvt import PVTConfig, PyramidVisionTransformer
from pipeline.models.resnet import ResNet, ResNetConfig
from pipeline.models.swin import SwinConfig, SwinTransformer
from pipeline.models.vit import VisionTransformer, ViTConfig

ModelConfig = ViTConfig | IGPTConfig | ResNetConfig | SwinConfig | PVTConfig

FAMILIES: dict[str, tuple[type, type[Backbone]]] = {
    "vit": (ViTConfig, VisionTransformer),
    "igpt": (IGPTConfig, ImageGPT),
    "resnet": (ResNetConfig, ResNet),
    "swin": (SwinConfig, SwinTransformer),
    "pvt": (PVTConfig, PyramidVisionTransformer),
}

_REGISTRY: dict[str, ModelConfig] = {}
# Parameter counts the papers give for their sizes (at their image size and 1000 classes, or
# ImageGPT's 512-colour vocabulary); tests hold the built models within 2% of them.
PAPER_PARAMS: dict[str, float] = {}


def register(cfg: ModelConfig, paper_params: float = 0.0) -> None:
    if cfg.name in _REGISTRY:
        raise ValueError(f"model name {cfg.name!r} is registered twice")
    _REGISTRY[cfg.name] = cfg
    if paper_params:
        PAPER_PARAMS[cfg.name] = paper_params


def _vit(
    name: str, width: int, depth: int, heads: int, patch: int, paper: float = 0.0, **kw: Any
) -> None:
    kw.setdefault("mlp_dim", 4 * width)
    register(ViTConfig(name, patch_size=patch, width=width, depth=depth, heads=heads, **kw), paper)


def _igpt(name: str, width: int, depth: int, heads: int, paper: float = 0.0, **kw: Any) -> None:
    cfg = IGPTConfig(name, width=width, depth=depth, heads=heads, mlp_dim=4 * width, **kw)
    register(cfg, paper)


def _resnet(name: str, depths: tuple[int, ...], paper: float = 0.0, **kw: Any) -> None:
    register(ResNetConfig(name, depths=depths, **kw), paper)


def _swin(name: str, width: int, depths: tuple[int, ...], paper: float = 0.0, **kw: Any) -> None:
    heads = kw.pop("heads", tuple(width * 2**i // 32 for i in range(len(depths))))
    register(SwinConfig(name, width=width, depths=depths, heads=heads, **kw), paper)


# ViT paper sizes (Table 1) plus DeiT's Ti/S; 224 px, 1000 classes, as the parameter counts assume.
_vit("vit-ti16", 192, 12, 3, 16, paper=5.7e6)
_vit("vit-s16", 384, 12, 6, 16, paper=22e6)
_vit("vit-b16", 768, 12, 12, 16, paper=86e6)
_vit("vit-b32", 768, 12, 12, 32)
_vit("vit-l16", 1024, 24, 16, 16, paper=307e6)
_vit("vit-l32", 1024, 24, 16, 32)
_vit("vit-h14", 1280, 32, 16, 14, paper=632e6)
# DeiT's distilled models (Touvron et al. 2021): the ViT sizes with a distillation token.
_vit("deit-ti16", 192, 12, 3, 16, distilled=True)
_vit("deit-s16", 384, 12, 6, 16, distilled=True)
_vit("deit-b16", 768, 12, 12, 16, distilled=True, paper=87e6)
# Small-image variants (28x28 Fashion-MNIST, 32x32 CIFAR-like) for tests and the quickstart.
_vit("vit-micro-p4", 48, 2, 3, 4, image_size=32, num_classes=10)
_vit("vit-tiny-p4", 192, 6, 3, 4, image_size=32, num_classes=10)
_vit("vit-tiny-p7", 192, 6, 3, 7, image_size=28, num_classes=10)
_vit("vit-small-p4", 384, 12, 6, 4, image_size=32, num_classes=10)
_vit("deit-micro-p4", 48, 2, 3, 4, image_size=32, num_classes=10, distilled=True)
_vit("deit-tiny-p4", 192, 6, 3, 4, image_size=32, num_classes=10, distilled=True)
# The quickstart's: a hybrid whose 3-convolution stem turns 28 px into a 4x4 map of 1x1 patches.
_vit("vit-hybrid-mini", 128, 4, 4, 1, mlp_dim=256, stem=(32, 64, 128), image_size=28, channels=1,
     num_classes=10)  # fmt: skip

# ImageGPT paper sizes (S/M/L/XL), 32x32 inputs and a 512-colour palette.
_igpt("igpt-s", 512, 24, 8, paper=76e6)
_igpt("igpt-m", 1024, 36, 16, paper=455e6)
_igpt("igpt-l", 1536, 48, 16, paper=1.4e9)
_igpt("igpt-xl", 3072, 60, 24, paper=6.8e9)
# Tiny variants for tests and the quickstart (16x16 tokens).
_igpt("igpt-micro", 64, 2, 2, image_size=16)
_igpt("igpt-tiny", 128, 4, 4, image_size=16)
_igpt("igpt-mini", 256, 8, 8, image_size=16)

# ResNet (He et al. 2016, Table 1) and ResNeXt (Xie et al. 2017, Table 1) at 224 px; BiT's
# ResNet-v2 R50x1 (Kolesnikov et al. 2020), which gives no count beside the ResNet-50's.
_resnet("resnet-50", (3, 4, 6, 3), paper=25.6e6)
_resnet("resnet-101", (3, 4, 23, 3), paper=44.5e6)
_resnet("resnet-152", (3, 8, 36, 3), paper=60.2e6)
_resnet("resnext-50-32x4d", (3, 4, 6, 3), groups=32, group_width=4, paper=25.0e6)
_resnet("resnext-101-32x8d", (3, 4, 23, 3), groups=32, group_width=8, paper=88.8e6)
_resnet("bit-r50x1", (3, 4, 6, 3), variant="bit")
# Small-image variants (28-32 px): a 3x3 stride-1 stem, no max pool; sides 32, 16, 8, 4.
_small = {"small_stem": True, "image_size": 32, "num_classes": 10}
_resnet("resnet-micro", (1, 1, 1, 1), base_width=8, group_width=8, stem_width=8, **_small)
_resnet("resnet-26-s", (2, 2, 2, 2), base_width=16, group_width=16, stem_width=16, **_small)
_resnet("resnext-26-s", (2, 2, 2, 2), base_width=16, groups=8, group_width=4, stem_width=16,
        **_small)  # fmt: skip
_resnet("bit-micro", (1, 1, 1, 1), base_width=32, group_width=32, stem_width=32, variant="bit",
        **_small)  # fmt: skip

# Swin Transformer (Liu et al. 2021, Table 1): 224 px, 4x4 patches, window 7, a head per 32
# channels.
_swin("swin-t", 96, (2, 2, 6, 2), paper=28.3e6)
_swin("swin-s", 96, (2, 2, 18, 2), paper=49.6e6)
_swin("swin-b", 128, (2, 2, 18, 2), paper=87.8e6)
# Small-image variants: 32 px, 2x2 patches, window 4; maps 16, 8, 4 and 2 (one whole window).
_swin_small = {"image_size": 32, "num_classes": 10, "patch_size": 2, "window": 4}
_swin("swin-micro", 16, (1, 2, 1, 1), heads=(1, 2, 2, 4), **_swin_small)
_swin("swin-tiny-s", 48, (2, 2, 4, 2), heads=(2, 4, 8, 16), **_swin_small)

# Pyramid Vision Transformer v1 (Wang et al. 2021, Table 1): 224 px, widths 64-512, heads 1-8,
# MLP ratios 8, 8, 4, 4, spatial reduction 8, 4, 2, 1.
register(PVTConfig("pvt-tiny", depths=(2, 2, 2, 2)), 13.2e6)
register(PVTConfig("pvt-small", depths=(3, 4, 6, 3)), 24.5e6)
register(PVTConfig("pvt-medium", depths=(3, 4, 18, 3)), 44.2e6)
register(PVTConfig("pvt-large", depths=(3, 8, 27, 3)), 61.4e6)
# Small-image variants: 32 px, patches 2, 2, 2, 2 (maps 16, 8, 4, 2), reduction 4, 2, 1, 1.
_pvt_small = {
    "image_size": 32,
    "num_classes": 10,
    "patches": (2, 2, 2, 2),
    "reductions": (4, 2, 1, 1),
}
register(PVTConfig("pvt-micro", widths=(16, 32, 64, 128), depths=(1, 1, 1, 1), heads=(1, 2, 2, 4),
                   mlp_ratios=(4, 4, 4, 4), **_pvt_small))  # fmt: skip
register(PVTConfig("pvt-tiny-s", widths=(32, 64, 160, 256), depths=(2, 2, 2, 2), heads=(1, 2, 5, 8),
                   **_pvt_small))  # fmt: skip


def list_models() -> list[str]:
    return list(_REGISTRY)


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """The named size, with any fields replaced (validated by the config's own checks)."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise KeyError(f"unknown model {name!r}{hint}; known: {', '.join(_REGISTRY)}")
    return dataclasses.replace(_REGISTRY[name], **overrides)


def create_model(cfg: ModelConfig | str, **overrides: Any) -> Backbone:
    """Build a model from a config or a registry name. Works under `torch.device("meta")`."""
    if isinstance(cfg, str):
        cfg = model_config(cfg, **overrides)
    elif overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    return FAMILIES[cfg.family][1](cfg)


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    return {"family": cfg.family, **dataclasses.asdict(cfg)}


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Inverse of `config_to_dict`; unknown fields are an error, not dropped."""
    data = dict(data)
    family = data.pop("family", None)
    if family not in FAMILIES:
        raise ValueError(f"model config has family {family!r}; allowed: {', '.join(FAMILIES)}")
    cls = FAMILIES[family][0]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"model config has unknown fields {unknown} for family {family!r}")
    return cls(**data)


# Fields a finetune may change on pretrained weights; every other field shapes the weights.
# (Position embeddings are resampled to a new image size: a ViT's patch grid, ImageGPT's raster.)
ADAPTABLE = {
    "vit": {"name", "image_size", "num_classes", "head_bias", "drop_path", "grad_checkpointing"},
    "igpt": {
        "name", "image_size", "num_classes", "head_bias", "drop_path", "grad_checkpointing",
        "causal",
    },
    "resnet": {"name", "image_size", "num_classes", "head_bias", "drop_path", "grad_checkpointing"},
    # A new image size resamples each stage's position embeddings.
    "pvt": {"name", "image_size", "num_classes", "head_bias", "drop_path", "grad_checkpointing"},
    # A new window resamples the relative position bias tables.
    "swin": {
        "name", "image_size", "window", "num_classes", "head_bias", "drop_path",
        "grad_checkpointing",
    },
}  # fmt: skip


def weights_mismatch(saved: ModelConfig, wanted: ModelConfig) -> list[str]:
    """Why weights of `saved` cannot initialise `wanted`: ["width 192 != 48", ...]; [] if they can."""
    if saved.family != wanted.family:
        return [f"family {saved.family} != {wanted.family}"]
    out = []
    for f in dataclasses.fields(saved):
        a, b = getattr(saved, f.name), getattr(wanted, f.name)
        if f.name not in ADAPTABLE[saved.family] and a != b:
            out.append(f"{f.name} {a} != {b}")
    return out
