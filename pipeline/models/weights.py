"""Model weights as safetensors + a JSON model config, over any fsspec URL; timm interop.

A saved model is a folder: `model.safetensors` then `model.json` (written last, with the
weights' sha256, so a folder with a JSON file holds complete weights, and the weights it
describes). Writing over a saved model removes its `model.json` first: a save cut short leaves
no model, never new weights under the old description. Loading needs only torch and
safetensors, not DeepSpeed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipeline.models.layers import Backbone
from pipeline.models.posembed import resample_bias_table, resample_pos_embed
from pipeline.models.pvt import resample_stage_pos_embeds
from pipeline.models.registry import config_from_dict, config_to_dict, create_model
from pipeline.storage import filesystem, join, write_atomic

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"


def save_model(
    model: Backbone, url: str, provenance: dict[str, Any] | None = None, endpoint_url: str = ""
) -> None:
    """Write `url/model.safetensors` and then `url/model.json` (with `provenance`: where the
    weights came from, e.g. the pretraining data and step, for results tables). `endpoint_url`:
    the S3 endpoint of a config's data.endpoint_url, here and below."""
    fs, path = filesystem(url, endpoint_url)
    fs.makedirs(path, exist_ok=True)
    if fs.exists(join(path, CONFIG_FILE)):
        fs.rm(join(path, CONFIG_FILE))
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    data = save_safetensors(state)
    write_atomic(fs, join(path, WEIGHTS_FILE), data)
    meta = {
        "format": "tessera-model/1",
        "config": config_to_dict(model.cfg),
        "weights_sha256": hashlib.sha256(data).hexdigest(),
    }
    if provenance:
        meta["provenance"] = provenance
    write_atomic(fs, join(path, CONFIG_FILE), json.dumps(meta, indent=2).encode())


def read_model_config(url: str, endpoint_url: str = "") -> dict[str, Any]:
    return read_model_meta(url, endpoint_url)["config"]


def read_model_meta(url: str, endpoint_url: str = "") -> dict[str, Any]:
    """model.json of a saved model: {"config": ..., "provenance": ... (if saved with one)}."""
    fs, path = filesystem(url, endpoint_url)
    try:
        with fs.open(join(path, CONFIG_FILE), "r") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no saved model at {url}: {CONFIG_FILE} is missing (it is written last, so the "
            "folder is absent or its save did not finish)"
        ) from None
    return meta


def load_state(url: str, endpoint_url: str = "") -> dict[str, torch.Tensor]:
    """The weights, refused if they are not the ones model.json describes."""
    want = read_model_meta(url, endpoint_url).get("weights_sha256")  # absent: saved before
    fs, path = filesystem(url, endpoint_url)
    with fs.open(join(path, WEIGHTS_FILE), "rb") as f:
        data = f.read()
    if want and hashlib.sha256(data).hexdigest() != want:
        raise ValueError(
            f"{join(url, WEIGHTS_FILE)}: its sha256 is not the one {CONFIG_FILE} records; the "
            "file changed after the model was saved (export it again)"
        )
    return load_safetensors(data)


def load_model(url: str, endpoint_url: str = "", **overrides: Any) -> Backbone:
    """Rebuild a saved model; overrides (image_size, num_classes, ...) adapt it on load: the
    position embeddings are resampled and a head of another shape starts afresh."""
    cfg = config_from_dict(read_model_config(url, endpoint_url))
    model = create_model(cfg, **overrides)
    load_pretrained(model, load_state(url, endpoint_url), source=url)
    return model


def load_pretrained(
    model: Backbone, state: dict[str, torch.Tensor], source: str = "state dict"
) -> list[str]:
    """Load `state` into `model`, adapting what a resolution or task change alters.

    Position embeddings of another grid (PVT: each stage's), and Swin's relative position bias
    tables of another window, are resampled; a classifier head of another shape is
    left at the model's fresh initialisation. Returns the keys that were not loaded. Any other
    mismatch is an error naming the key, both shapes and `source`.
    """
    own = model.state_dict()
    state = dict(state)
    if "pos_embed" in state and state["pos_embed"].shape[1] != own["pos_embed"].shape[1]:
        prefix = getattr(model.cfg, "prefix_tokens", 1)  # [class] (and DeiT's distillation)
        side = round((own["pos_embed"].shape[1] - prefix) ** 0.5)
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], (side, side), prefix)
    state = resample_stage_pos_embeds(state, own)  # PVT: each stage's grid
    for key, value in list(state.items()):  # Swin at a new window: bias tables resampled
        table = key.endswith("relative_position_bias_table") and key in own
        if table and value.shape != own[key].shape:
            state[key] = resample_bias_table(value, own[key].shape[0])
    fresh = [
        k
        for k in own
        if k.startswith("head.") and (k not in state or state[k].shape != own[k].shape)
    ]
    for key in fresh:
        state.pop(key, None)
    state = {k: v for k, v in state.items() if not (k.startswith("head.") and k not in own)}
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state) - set(fresh))
    if unexpected or missing:
        raise ValueError(
            f"{source} does not fit {model.cfg.name}: missing {missing[:8]}, unexpected "
            f"{unexpected[:8]} (a checkpoint of another model family or depth?)"
        )
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ValueError(
                f"{source} does not fit {model.cfg.name}: {key} has shape {tuple(value.shape)}, "
                f"the model has {tuple(own[key].shape)} (a checkpoint of another model size?)"
            )
    model.load_state_dict(state, strict=False)
    return fresh


# timm's VisionTransformer names everything as we do except the patch projection.
_TIMM_RENAMES = {"patch_embed.proj.": "patch_embed."}
_TIMM_UNSUPPORTED = (
    "reg_token",
    ".ls1.",
    ".ls2.",
    ".q_norm.",
    ".k_norm.",
    "attn_pool.",
    "norm_pre.",
)


def from_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm `VisionTransformer` state dict (class token, learned 1D position embeddings, no
    register tokens or layer scale), a timm `ResNet` one (ResNet/ResNeXt with the default
    stem) or a timm `SwinTransformer` one -> Tessera's layout."""
    if "conv1.weight" in state:
        return _resnet_from_timm(state)
    if "layers.0.blocks.0.attn.qkv.weight" in state:
        return _swin_from_timm(state)
    for key in state:
        if any(tag in key for tag in _TIMM_UNSUPPORTED):
            raise ValueError(f"timm weights use a feature Tessera's ViT does not have: {key}")
    if "cls_token" not in state:
        raise ValueError("timm weights have no cls_token; only class-token ViTs are supported")
    n = state["pos_embed"].shape[1]
    if round(n**0.5) ** 2 == n:  # a square grid alone: no slot for the class token
        raise ValueError("timm weights have no class-token position embedding (no_embed_class)")
    return _rename(state, _TIMM_RENAMES)


def to_timm(
    state: dict[str, torch.Tensor], depths: tuple[int, ...] = ()
) -> dict[str, torch.Tensor]:
    """Tessera's ViT layout -> timm `VisionTransformer` keys, or a ResNet's or Swin's (`depths`:
    its blocks per stage) -> timm `ResNet` or `SwinTransformer` keys (load with timm's
    `load_state_dict`)."""
    if "blocks.0.attn.relative_position_bias_table" in state:
        if not depths:
            raise ValueError(
                "a Swin's weights go to timm's layout with its depths (blocks per stage)"
            )
        return _swin_to_timm(state, depths)
    if "stem.conv.weight" in state:
        if "blocks.0.norm1.weight" in state:
            raise ValueError("BiT's ResNet-v2 has no timm ResNet layout (timm's resnetv2 differs)")
        if not depths:
            raise ValueError(
                "a ResNet's weights go to timm's layout with its depths (blocks per stage)"
            )
        return _resnet_to_timm(state, depths)
    if any(key.startswith("stem.") for key in state):
        raise ValueError(
            "a hybrid ViT (model.stem) has no timm VisionTransformer layout: timm's hybrids "
            "embed with a ResNet, not this convolution stem"
        )
    return _rename(state, {ours: theirs for theirs, ours in _TIMM_RENAMES.items()})


def _rename(state: dict[str, torch.Tensor], prefixes: dict[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for old, new in prefixes.items():
            if key.startswith(old):
                key = new + key[len(old) :]
        out[key] = value
    return out


# timm's ResNet: conv1/bn1 are the stem, layerS.J the J-th block of stage S (from 1), fc the
# head; inside a block the names are ours.
_RESNET_STEM = {"conv1.": "stem.conv.", "bn1.": "stem.bn.", "fc.": "head."}


def _resnet_from_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    depths: dict[int, int] = {}
    for key in state:
        if key.startswith("layer"):
            stage, block = key.split(".")[:2]
            s = int(stage[len("layer") :])
            depths[s] = max(depths.get(s, 0), int(block) + 1)
    first = {s: sum(depths[t] for t in depths if t < s) for s in depths}
    out = {}
    for key, value in state.items():
        if key.startswith("layer"):
            stage, block, rest = key.split(".", 2)
            n = first[int(stage[len("layer") :])] + int(block)
            out[f"blocks.{n}.{rest}"] = value
        elif any(key.startswith(t) for t in _RESNET_STEM):
            out[_rename({key: value}, _RESNET_STEM).popitem()[0]] = value
        else:
            raise ValueError(f"timm ResNet weights use a feature Tessera's ResNet lacks: {key}")
    return out


def _resnet_to_timm(
    state: dict[str, torch.Tensor], depths: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    where = [(s + 1, j) for s, d in enumerate(depths) for j in range(d)]
    back = {ours: theirs for theirs, ours in _RESNET_STEM.items()}
    out = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            _, n, rest = key.split(".", 2)
            stage, j = where[int(n)]
            out[f"layer{stage}.{j}.{rest}"] = value
        else:
            out[_rename({key: value}, back).popitem()[0]] = value
    return out


# timm's Swin: layers.S.blocks.J is block J of stage S (from 0), layers.S.downsample the patch
# merging that opens stage S, which here sits in that stage's first block; head.fc the head.
def _swin_from_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    depths: dict[int, int] = {}
    for key in state:
        parts = key.split(".")
        if parts[0] == "layers" and parts[2] == "blocks":
            depths[int(parts[1])] = max(depths.get(int(parts[1]), 0), int(parts[3]) + 1)
    first = {s: sum(depths[t] for t in depths if t < s) for s in depths}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "layers" and parts[2] == "blocks":
            n = first[int(parts[1])] + int(parts[3])
            out[".".join(["blocks", str(n), *parts[4:]])] = value
        elif parts[0] == "layers" and parts[2] == "downsample":
            out[".".join(["blocks", str(first[int(parts[1])]), *parts[2:]])] = value
        elif key.startswith(("patch_embed.", "norm.", "head.fc.")):
            out[key.replace("head.fc.", "head.")] = value
        else:
            raise ValueError(f"timm Swin weights use a feature Tessera's Swin lacks: {key}")
    return out


def _swin_to_timm(
    state: dict[str, torch.Tensor], depths: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    where = [(s, j) for s, d in enumerate(depths) for j in range(d)]
    out = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            _, n, rest = key.split(".", 2)
            stage, j = where[int(n)]
            if rest.startswith("downsample."):
                out[f"layers.{stage}.{rest}"] = value
            else:
                out[f"layers.{stage}.blocks.{j}.{rest}"] = value
        else:
            out[key.replace("head.", "head.fc.", 1) if key.startswith("head.") else key] = value
    return out
