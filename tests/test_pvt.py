"""Pyramid Vision Transformer: sizes, spatial reduction, resolution change, training."""

import pytest
import torch
from test_resnet import count
from test_train import (
    resume_matches_uninterrupted,
)

from pipeline.models import create_model, load_model, load_pretrained, model_config
from pipeline.models.posembed import resample_pos_embed
from pipeline.models.registry import PAPER_PARAMS

PAPER_GMACS = {"pvt-tiny": 1.9, "pvt-small": 3.8, "pvt-medium": 6.7, "pvt-large": 9.8}


@pytest.mark.parametrize("name", ["pvt-tiny", "pvt-small", "pvt-medium", "pvt-large"])
def test_paper_sizes_and_costs_are_within_2_percent_of_the_papers(name):
    assert abs(count(name) / PAPER_PARAMS[name] - 1) < 0.02
    assert abs(model_config(name).forward_flops() / 2e9 / PAPER_GMACS[name] - 1) < 0.02


def test_spatial_reduction_shortens_keys_not_queries():
    cfg = model_config("pvt-tiny")
    blocks = list(cfg.blocks())
    assert blocks[0] == (0, 56 * 56, 7 * 7)  # 56x56 map, keys from its 8x reduced 7x7 copy
    assert blocks[-1] == (3, 7 * 7 + 1, 7 * 7 + 1)  # no reduction: every token, [class] too
    model = create_model("pvt-micro").eval()
    attn, seen = model.blocks[0].attn, {}
    attn.kv.register_forward_hook(lambda m, i, o: seen.update(kv=i[0].shape))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert seen["kv"] == (2, 16, 16)  # 16x16 map reduced 4x: 4x4 = 16 key tokens


def test_probes_average_early_stages_and_read_the_class_token_last():
    model = create_model("pvt-micro").eval()
    x = torch.randn(2, 3, 32, 32)
    first, last = model.features(x, [0, -1])
    assert first.shape == (2, 16) and last.shape == (2, 128)
    with torch.no_grad():
        tokens = model.forward_features(x)
        torch.testing.assert_close(last, tokens[:, 0])
        torch.testing.assert_close(model.forward_head(tokens, True), last)


def test_a_new_resolution_resamples_each_stages_position_embeddings():
    small = create_model("pvt-micro")
    big = create_model("pvt-micro", image_size=64)
    assert load_pretrained(big, small.state_dict()) == []
    for i in range(4):  # one stage embedding per stage, in that stage's first block
        before = small.blocks[i].embed.pos_embed.detach()
        after = big.blocks[i].embed.pos_embed.detach()
        side, cls = round((after.shape[1] - (i == 3)) ** 0.5), int(i == 3)
        torch.testing.assert_close(after, resample_pos_embed(before, (side, side), cls))
    assert torch.isfinite(big(torch.randn(1, 3, 64, 64))).all()


def test_bad_geometry_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"reductions: .* stage 1's 8x8 map does not shrink by 3"):
        model_config("pvt-micro", reductions=(4, 3, 1, 1))
    with pytest.raises(ValueError, match="heads"):
        model_config("pvt-micro", heads=(1, 3, 2, 4))


PVT_RUN = {"name": "pvt-micro", "image_size": 16, "channels": 1, "num_classes": 10,
           "reductions": (2, 1, 1, 1)}  # fmt: skip


@pytest.mark.slow
def test_a_pvt_trains_resumes_exactly_evaluates_and_finetunes_at_a_new_resolution(
    tmp_path, digits_url
):
    """Through the same commands as a ViT: pretrain, resume, export, evaluate (probes of the
    first stage's pooled map and of the class token), finetune at 32 px, where each stage's
    position embeddings are resampled."""
    from test_evaluate import probes_of_an_export, run_tessera
    from test_train import run_export, write_config

    resume_matches_uninterrupted(tmp_path, digits_url, kill_at=8, model=PVT_RUN)
    export = tmp_path / "b" / "export"
    found = probes_of_an_export(write_config(tmp_path / "b", digits_url, model=PVT_RUN), export)
    assert set(found) == {("linear_probe", "0"), ("linear_probe", "3"), ("knn", "3")}

    ft = tmp_path / "ft"
    ft.mkdir()
    config = write_config(ft, digits_url, train={"steps": 1}, optim={"lr": 1e-9, "warmup_steps": 0},
                          model={**PVT_RUN, "image_size": 32},
                          finetune={"init": str(export)})  # fmt: skip
    run_tessera("finetune", config)
    run_export(ft / "run", ft / "after")
    small, big = load_model(str(export)), load_model(str(ft / "after"))
    assert torch.isfinite(big(torch.rand(2, 1, 32, 32))).all()
    for i in range(4):
        before = small.blocks[i].embed.pos_embed.detach().float()
        after = big.blocks[i].embed.pos_embed.detach().float()
        side, cls = round((after.shape[1] - (i == 3)) ** 0.5), int(i == 3)
        assert after.shape[1] == 4 * before.shape[1] - 3 * cls  # twice the side
        torch.testing.assert_close(after, resample_pos_embed(before, (side, side), cls),
                                   atol=1e-3, rtol=0)  # bf16 weights, an lr of 1e-9  # fmt: skip
