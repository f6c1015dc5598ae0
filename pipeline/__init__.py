"""Tessera: pretrain ViT and ImageGPT at scale, then probe and transfer them."""

__version__ = "0.1.0"
