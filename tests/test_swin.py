"""Swin Transformer: sizes, shifted windows, resolution and window changes, training."""

import pytest
import torch
from test_resnet import count
from test_train import (
    resume_matches_uninterrupted,
    run_export,
    write_config,
)

from pipeline.models import create_model, load_model, model_config
from pipeline.models.posembed import resample_bias_table
from pipeline.models.registry import PAPER_PARAMS
from pipeline.models.swin import MASKED, partition, shift_mask


@pytest.mark.parametrize("name", ["swin-t", "swin-s", "swin-b"])
def test_paper_sizes_are_within_2_percent_and_equal_timms(name):
    timm = {"swin-t": 28_288_354, "swin-s": 49_606_258, "swin-b": 87_768_224}  # timm 1.0.31
    assert count(name) == timm[name]
    assert abs(count(name) / PAPER_PARAMS[name] - 1) < 0.02


def test_swin_t_costs_the_papers_4_5_gflops():
    assert 4.4 < model_config("swin-t").forward_flops() / 2e9 < 4.6  # the paper's "FLOPs" are MACs


def test_a_stage_no_larger_than_the_window_is_one_unshifted_window():
    cfg = model_config("swin-t")
    blocks = list(cfg.blocks())
    assert [b[1:] for b in blocks[:2]] == [(56, 7, 0), (56, 7, 3)]  # W-MSA, then SW-MSA
    assert [b[1:] for b in blocks[-2:]] == [(7, 7, 0), (7, 7, 0)]  # 7x7: one window, no shift


def test_the_shift_mask_keeps_apart_what_the_roll_brought_together():
    """On a 4x4 map, windows of 2 shifted by 1: the last window holds one token from each
    corner region of the unrolled map, so every pair in it is masked, while the first window,
    untouched by the roll's wrap-around, masks nothing."""
    mask = shift_mask(4, 2, 1)
    assert mask.shape == (4, 4, 4)
    assert (mask[0] == 0).all()
    last = mask[-1]
    assert (last.diagonal() == 0).all() and (last + torch.eye(4) * MASKED == MASKED).all()
    regions = partition(torch.arange(16.0).view(1, 4, 4, 1), 2).flatten(1)
    assert regions[0].tolist() == [0, 1, 4, 5]  # windows in raster order


def test_bad_geometry_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"image_size: got 32; gives stage 0 a 16x16 map, wh"):
        model_config("swin-micro", window=3)  # maps 16, 8, 4, 2: windows of 3 tile none
    with pytest.raises(ValueError, match="heads"):
        model_config("swin-micro", heads=(1, 2, 2))


def test_resampled_bias_table_keeps_a_constant_field():
    table = torch.full((49, 3), 0.5)
    assert torch.allclose(resample_bias_table(table, 225), torch.full((225, 3), 0.5))


def test_probe_features_and_the_head_see_the_same_pooled_map():
    model = create_model("swin-micro").eval()
    x = torch.randn(2, 3, 32, 32)
    first, last = model.features(x, [0, -1])
    assert first.shape == (2, 16) and last.shape == (2, 128)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(x), True), last)


SWIN_RUN = {"name": "swin-micro", "image_size": 16, "channels": 1, "num_classes": 10}


@pytest.mark.slow
def test_a_swin_trains_resumes_exactly_and_finetunes_at_a_new_resolution(tmp_path, digits_url):
    """16 px: maps 8, 4, 2, 1 with windows 4, 4, 2, 1. Finetuned at 32 px the third stage's
    window grows to 4: its bias tables are resampled (7x7 offsets from 3x3)."""
    resume_matches_uninterrupted(tmp_path, digits_url, kill_at=8, model=SWIN_RUN)

    from test_evaluate import probes_of_an_export, run_tessera

    config = write_config(tmp_path / "b", digits_url, model=SWIN_RUN)
    found = probes_of_an_export(config, tmp_path / "b" / "export")  # the first and last maps
    assert {layer for _, layer in found} == {"0", str(len(load_model(
        str(tmp_path / "b" / "export")).blocks) - 1)}  # fmt: skip

    ft = tmp_path / "ft"
    ft.mkdir()
    config = write_config(ft, digits_url, train={"steps": 1}, optim={"lr": 1e-9, "warmup_steps": 0},
                          model={**SWIN_RUN, "image_size": 32},
                          finetune={"init": str(tmp_path / "b" / "export")})  # fmt: skip
    run_tessera("finetune", config)
    run_export(ft / "run", ft / "after")
    before = load_model(str(tmp_path / "b" / "export")).blocks[3].attn.relative_position_bias_table
    after = load_model(str(ft / "after")).blocks[3].attn.relative_position_bias_table
    assert before.shape == (9, 2) and after.shape == (49, 2)
    expected = resample_bias_table(before.detach(), 49)
    torch.testing.assert_close(after.detach(), expected, atol=1e-3, rtol=0)
