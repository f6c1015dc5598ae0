"""Model families (ViT, ImageGPT), named sizes and weights. No DeepSpeed or Ray in here."""

from pipeline.models.igpt import IGPTConfig, ImageGPT
from pipeline.models.layers import Backbone
from pipeline.models.posembed import resample_pos_embed
from pipeline.models.registry import (
    ModelConfig,
    config_from_dict,
    config_to_dict,
    create_model,
    list_models,
    model_config,
)
from pipeline.models.vit import VisionTransformer, ViTConfig
from pipeline.models.weights import from_timm, load_model, load_pretrained, save_model, to_timm

__all__ = [
    "Backbone",
    "IGPTConfig",
    "ImageGPT",
    "ModelConfig",
    "ViTConfig",
    "VisionTransformer",
    "config_from_dict",
    "config_to_dict",
    "create_model",
    "from_timm",
    "list_models",
    "load_model",
    "load_pretrained",
    "model_config",
    "resample_pos_embed",
    "save_model",
    "to_timm",
]
