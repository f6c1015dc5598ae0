"""Training objectives. One trainer calls `OBJECTIVES[name](model, batch, ...)`.

Each objective takes the model and a batch dict and returns (loss, metrics): `loss` is the scalar
to minimise, `metrics` holds detached scalars for logging. Batches:
  supervised, supervised-sigmoid: {"image": (B, C, H, W) uint8 (or float in [-1, 1]) or, for
                                   ImageGPT, "tokens": (B, T) int64,
                                   "label": (B,) int64 or (B, K) multi-hot}
  igpt-ar, igpt-bert:             {"tokens": (B, T) int64 palette ids}
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.transforms import model_input

LN2 = math.log(2.0)

Metrics = dict[str, torch.Tensor]


def _multi_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    if labels.ndim == 2:
        return labels.float()
    return F.one_hot(labels, num_classes).float()


def class_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """Class logits of a batch of images (ViT) or palette tokens (ImageGPT), in fp32."""
    inputs = batch["tokens"] if "tokens" in batch else model_input(batch["image"])
    return model(inputs, head="classes").float()


def mix(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, mixup: float, cutmix: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Mixup or CutMix of a micro-batch with itself reversed (timm's pairing): images
    (B, C, H, W) floats and labels -> mixed images and soft targets (B, num_classes). Beta
    draws and the CutMix box come from the step's generator's seed."""
    rng = random.Random(generator.initial_seed())
    use_cutmix = cutmix > 0 and (mixup == 0 or rng.random() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = rng.betavariate(alpha, alpha)
    target = _multi_hot(labels, num_classes)
    target = target / target.sum(1, keepdim=True).clamp_min(1)
    other = images.flip(0)
    if use_cutmix:  # a box of 1 - lam of the area, clipped at the border; lam is what is left
        h, w = images.shape[-2:]
        cut = math.sqrt(1 - lam)
        cy, cx = rng.randrange(h), rng.randrange(w)
        y0, y1 = max(cy - int(h * cut) // 2, 0), min(cy + int(h * cut) // 2, h)
        x0, x1 = max(cx - int(w * cut) // 2, 0), min(cx + int(w * cut) // 2, w)
        images = images.clone()
        images[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        images = lam * images + (1 - lam) * other
    return images, lam * target + (1 - lam) * target.flip(0)


def supervised(
    model: nn.Module,
    batch: dict,
    generative_weight: float = 0.0,
    label_smoothing: float = 0.0,
    teacher: nn.Module | None = None,
    mixup: float = 0.0,
    cutmix: float = 0.0,
    generator: torch.Generator | None = None,
    **_: object,
) -> tuple[torch.Tensor, Metrics]:
    """Softmax cross-entropy; multi-hot labels become a uniform target over their classes.

    generative_weight > 0 (an autoregressive ImageGPT): plus that weight times the next-pixel
    NLL of the same pass, as the ImageGPT paper finetunes (L_CLF + L_GEN).
    teacher (DeiT's hard-label distillation): the [class] head learns the labels, the
    distillation head the teacher's top class, each half the loss; accuracy is that of the two
    heads averaged, as at inference.
    mixup, cutmix (training mode only): the micro-batch mixed with itself reversed (`mix`);
    accuracy then counts a prediction of either class of a pair as right."""
    if model.training and (mixup or cutmix) and "image" in batch:
        classes = getattr(model, "module", model).cfg.num_classes  # a DeepSpeed engine's, or not
        images, target = mix(
            model_input(batch["image"]), batch["label"], classes, mixup, cutmix, generator
        )
        batch = {**batch, "image": images, "label": target}
    generative = distill = None
    if teacher is not None:
        images = model_input(batch["image"])
        logits, dist = (t.float() for t in model(images, head="both"))
        with torch.no_grad():
            taught = teacher(images.to(next(teacher.parameters()).dtype)).argmax(-1)
        distill = F.cross_entropy(dist, taught)
    elif generative_weight > 0:
        logits, lm = model(batch["tokens"], head="both")
        logits = logits.float()
        generative = F.cross_entropy(lm.float().flatten(0, 1), batch["tokens"].flatten())
    else:
        logits = class_logits(model, batch)
    labels = batch["label"]
    if labels.ndim == 2:
        target = labels.float() / labels.float().sum(1, keepdim=True).clamp_min(1)
        if label_smoothing:
            target = target * (1 - label_smoothing) + label_smoothing / target.shape[1]
        loss = -(target * logits.log_softmax(-1)).sum(-1).mean()
    else:
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    predicted = logits if distill is None else (logits + dist) / 2
    if labels.ndim == 2:
        correct = labels.gather(1, predicted.argmax(-1, keepdim=True)).squeeze(1) > 0
    else:
        correct = predicted.argmax(-1) == labels
    metrics = {"loss": loss.detach(), "accuracy": correct.float().mean()}
    if generative is not None:
        metrics["classification_loss"] = loss.detach()
        metrics["bits_per_dim"] = generative.detach() / LN2
        loss = loss + generative_weight * generative
        metrics["loss"] = loss.detach()
    if distill is not None:
        metrics["classification_loss"] = loss.detach()
        metrics["distillation_loss"] = distill.detach()
        metrics["teacher_agreement"] = (dist.argmax(-1) == taught).float().mean()
        loss = (loss + distill) / 2
        metrics["loss"] = loss.detach()
    return loss, metrics


def supervised_sigmoid(model: nn.Module, batch: dict, **_: object) -> tuple[torch.Tensor, Metrics]:
    """JFT-style multi-label: per-class sigmoid cross-entropy, summed over classes, mean over
    the batch (big_vision's sigmoid_xent). Pair with a negative head-bias initialisation."""
    logits = class_logits(model, batch)
    target = _multi_hot(batch["label"], logits.shape[-1])
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1).mean()
    top1 = target.gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
    return loss, {"loss": loss.detach(), "precision_at_1": top1.mean()}


def igpt_ar(model: nn.Module, batch: dict, **_: object) -> tuple[torch.Tensor, Metrics]:
    """Next-pixel prediction: mean negative log-likelihood over every pixel of the raster."""
    tokens = batch["tokens"]
    logits = model(tokens).float()
    nll = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    return nll, {"loss": nll.detach(), "bits_per_dim": nll.detach() / LN2}


def mask_pixels(
    tokens: torch.Tensor, mask_prob: float, mask_id: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking as in iGPT: each pixel independently replaced by [mask] with `mask_prob`.

    Returns (inputs, mask) with mask (B, T) bool; every row has at least one masked pixel so the
    loss is always defined.
    """
    mask = torch.rand(tokens.shape, generator=generator, device=tokens.device) < mask_prob
    empty = ~mask.any(1)
    if empty.any():
        first = torch.randint(
            tokens.shape[1], (int(empty.sum()),), generator=generator, device=tokens.device
        )
        mask[empty.nonzero().squeeze(1), first] = True
    return tokens.masked_fill(mask, mask_id), mask


def igpt_bert(
    model: nn.Module,
    batch: dict,
    mask_prob: float = 0.15,
    generator: torch.Generator | None = None,
    **_: object,
) -> tuple[torch.Tensor, Metrics]:
    """Masked-pixel prediction: NLL of the original pixels at the masked positions only."""
    tokens = batch["tokens"]
    inputs, mask = mask_pixels(tokens, mask_prob, model.cfg.mask_id, generator)
    logits = model(inputs).float()
    nll = F.cross_entropy(logits[mask], tokens[mask])
    return nll, {"loss": nll.detach(), "bits_per_dim": nll.detach() / LN2}


Objective = Callable[..., tuple[torch.Tensor, Metrics]]

OBJECTIVE_METRICS: dict[str, tuple[str, ...]] = {  # what each objective's metrics hold
    "supervised": ("loss", "accuracy"),
    "supervised-sigmoid": ("loss", "precision_at_1"),
    "igpt-ar": ("loss", "bits_per_dim"),
    "igpt-bert": ("loss", "bits_per_dim"),
}

OBJECTIVES: dict[str, Objective] = {
    "supervised": supervised,
    "supervised-sigmoid": supervised_sigmoid,
    "igpt-ar": igpt_ar,
    "igpt-bert": igpt_bert,
}
