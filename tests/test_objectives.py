"""Objectives: the losses the papers define, on tiny models."""

import math

import pytest
import torch

from pipeline.models import create_model
from pipeline.train.objectives import OBJECTIVES, mask_pixels


def test_every_config_objective_has_an_implementation():
    import typing

    from pipeline.config import Objective

    assert set(typing.get_args(Objective)) == set(OBJECTIVES)


def test_ar_loss_of_an_untrained_model_is_about_log_k_bits():
    torch.manual_seed(0)
    model = create_model("igpt-micro", vocab_size=16)
    tokens = torch.randint(0, 16, (4, 256))
    loss, metrics = OBJECTIVES["igpt-ar"](model, {"tokens": tokens})
    assert abs(metrics["bits_per_dim"].item() - 4.0) < 0.1  # log2(16) bits for a uniform guess
    assert math.isclose(metrics["bits_per_dim"].item(), loss.item() / math.log(2), rel_tol=1e-6)


def test_ar_training_learns_a_deterministic_image():
    torch.manual_seed(0)
    model = create_model("igpt-micro", image_size=8, vocab_size=16)
    tokens = (torch.arange(64) % 16).repeat(8, 1)  # every image the same ramp
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss, _ = OBJECTIVES["igpt-ar"](model, {"tokens": tokens})
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3


def test_bert_masks_about_15_percent_and_scores_only_masked_pixels():
    tokens = torch.randint(0, 16, (64, 256))
    inputs, mask = mask_pixels(tokens, 0.15, mask_id=17, generator=torch.Generator().manual_seed(0))
    assert 0.13 < mask.float().mean() < 0.17
    assert (inputs[mask] == 17).all() and (inputs[~mask] == tokens[~mask]).all()

    model = create_model("igpt-micro", vocab_size=16, causal=False)
    gen = torch.Generator().manual_seed(1)
    loss, _ = OBJECTIVES["igpt-bert"](model, {"tokens": tokens[:4]}, mask_prob=0.15, generator=gen)
    # The loss is the NLL at the masked positions only: recompute it by hand with the same mask.
    gen = torch.Generator().manual_seed(1)
    inputs, mask = mask_pixels(tokens[:4], 0.15, model.cfg.mask_id, gen)
    expected = torch.nn.functional.cross_entropy(model(inputs)[mask], tokens[:4][mask])
    torch.testing.assert_close(loss, expected)


def test_every_row_gets_a_masked_pixel():
    _, mask = mask_pixels(
        torch.zeros(32, 4, dtype=torch.long), 0.01, 9, torch.Generator().manual_seed(0)
    )
    assert mask.any(1).all()


def test_sigmoid_loss_with_negative_head_bias_starts_low():
    torch.manual_seed(0)
    model = create_model("vit-micro-p4", num_classes=100)
    batch = {"image": torch.randn(4, 3, 32, 32), "label": torch.randint(0, 100, (4,))}
    loss_zero, _ = OBJECTIVES["supervised-sigmoid"](model, batch)
    model.reset_head(100, bias=-10.0)
    loss_neg, _ = OBJECTIVES["supervised-sigmoid"](model, batch)
    # Zero bias: 100 classes x log 2 nats. Bias -10: ~ 10 nats for the true class only.
    assert loss_zero.item() == pytest.approx(100 * math.log(2), rel=1e-3)
    assert 9.5 < loss_neg.item() < 10.5


@pytest.mark.parametrize("name", ["supervised", "supervised-sigmoid"])
def test_supervised_losses_accept_multi_hot_labels(name):
    torch.manual_seed(0)
    model = create_model("vit-micro-p4", num_classes=5)
    torch.nn.init.normal_(model.head.weight)
    labels = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 1]])
    loss, metrics = OBJECTIVES[name](model, {"image": torch.randn(2, 3, 32, 32), "label": labels})
    assert torch.isfinite(loss) and loss.requires_grad
    assert all(torch.isfinite(v) for v in metrics.values())


def test_imagegpt_finetuning_adds_the_generative_loss_of_the_same_pass():
    """L = L_CLF + w L_GEN (the ImageGPT paper's finetuning): the classification loss as without
    it, the next-pixel NLL as igpt-ar computes it, from one forward."""
    torch.manual_seed(0)
    model = create_model("igpt-micro", image_size=8, vocab_size=16, num_classes=3)
    torch.nn.init.normal_(model.head.weight, std=0.1)
    batch = {"tokens": torch.randint(0, 16, (4, 64)), "label": torch.tensor([0, 1, 2, 1])}
    plain, _ = OBJECTIVES["supervised"](model, batch)
    gen, _ = OBJECTIVES["igpt-ar"](model, batch)
    both, metrics = OBJECTIVES["supervised"](model, batch, generative_weight=0.5)
    assert torch.allclose(both, plain + 0.5 * gen, atol=1e-5)
    assert torch.allclose(metrics["classification_loss"], plain, atol=1e-6)
    assert torch.allclose(metrics["bits_per_dim"], gen / math.log(2), atol=1e-6)
    both.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0  # the generative loss trains the lm head
