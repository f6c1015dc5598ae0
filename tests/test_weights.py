"""Weights in and out: safetensors round trips, resolution change, timm interop."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pipeline.models import (
    ViTConfig,
    create_model,
    from_timm,
    load_model,
    load_pretrained,
    model_config,
    resample_pos_embed,
    save_model,
    to_timm,
)

FIXTURES = Path(__file__).parent / "fixtures"


def test_resample_is_identity_at_the_same_grid():
    pos = torch.randn(1, 1 + 8 * 8, 16)
    torch.testing.assert_close(resample_pos_embed(pos, (8, 8)), pos, rtol=0, atol=0)


def test_resample_keeps_the_class_token_and_a_smooth_field():
    # A smooth field over the image plane, sampled at cell centres of a 8x8 and a 12x12 grid.
    def field(n):
        c = (torch.arange(n) + 0.5) / n
        y, x = torch.meshgrid(c, c, indexing="ij")
        f = torch.stack([torch.sin(2 * x) + y, x * y, torch.cos(3 * y)], dim=-1)
        return f.reshape(1, n * n, 3)

    cls = torch.randn(1, 1, 3)
    out = resample_pos_embed(torch.cat([cls, field(8)], 1), (12, 12))
    assert out.shape == (1, 1 + 144, 3)
    torch.testing.assert_close(out[:, :1], cls)
    err = (out[:, 1:] - field(12)).abs()  # the field spans about 2 units
    assert err.mean() < 0.01 and err.max() < 0.05  # the largest errors sit at the border


def test_resample_rejects_a_non_square_grid():
    with pytest.raises(ValueError, match="not a square grid"):
        resample_pos_embed(torch.randn(1, 1 + 10, 4), (4, 4))


@pytest.mark.parametrize("name", ["vit-micro-p4", "igpt-micro"])
@pytest.mark.parametrize("where", ["local", "memory"])
def test_save_load_round_trip_reproduces_outputs(name, where, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, num_classes=4).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    url = str(tmp_path / "export") if where == "local" else f"memory://weights-test/{name}"
    save_model(model, url)
    loaded = load_model(url).eval()
    assert loaded.cfg == model.cfg
    x = torch.randn(2, 3, 32, 32) if name.startswith("vit") else torch.randint(0, 512, (2, 256))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        feats = model.forward_head(model.forward_features(x))
        torch.testing.assert_close(loaded.forward_head(loaded.forward_features(x)), feats)


def test_load_missing_model_names_the_url(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        load_model(str(tmp_path / "nothing"))


def test_load_at_a_new_resolution_and_class_count(tmp_path):
    model = create_model("vit-micro-p4", image_size=32)
    save_model(model, str(tmp_path))
    bigger = load_model(str(tmp_path), image_size=48, num_classes=3)
    assert bigger.pos_embed.shape == (1, 1 + 12 * 12, 48)
    torch.testing.assert_close(bigger.cls_token, model.cls_token)
    torch.testing.assert_close(bigger.pos_embed[:, :1], model.pos_embed[:, :1])
    assert bigger(torch.randn(1, 3, 48, 48)).shape == (1, 3)


def test_loading_another_model_size_is_a_clear_error():
    small = create_model("vit-micro-p4")
    other = create_model("vit-micro-p4", width=96, heads=3, mlp_dim=192)
    with pytest.raises(
        ValueError, match=r"ckpt-x does not fit vit-micro-p4: cls_token has shape \(1, 1, 96\)"
    ):
        load_pretrained(small, other.state_dict(), source="ckpt-x")


def timm_fixture(file: str, model: str = "") -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(timm state dict, input, timm's eval-mode logits) as make_timm_fixture.py wrote them;
    `model` picks one of a file's several models (its key prefix)."""
    prefix = f"{model}/" if model else ""
    with safe_open(FIXTURES / file, "pt") as f:
        state = {
            k[len(prefix) + len("state/") :]: f.get_tensor(k)
            for k in f.keys()  # noqa: SIM118 (not a dict)
            if k.startswith(prefix + "state/")
        }
        return state, f.get_tensor(f"{prefix}input"), f.get_tensor(f"{prefix}logits")


def assert_timm_round_trip(model, fixture, depths: tuple[int, ...] = ()) -> None:
    """timm's weights in: timm's logits to 1e-4 (eval mode); ours back out in timm's layout:
    exactly timm's state dict."""
    state, x, timm_logits = fixture
    model.eval()
    assert load_pretrained(model, from_timm(state)) == []
    with torch.no_grad():
        torch.testing.assert_close(model(x), timm_logits, rtol=1e-4, atol=1e-4)
    back = to_timm(model.state_dict(), depths=depths)
    assert set(back) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(back[key], value, rtol=0, atol=0)


@pytest.mark.parametrize(("timm_pool", "pool"), [("token", "cls"), ("avg", "avg")])
def test_timm_weights_reproduce_timm_logits(timm_pool, pool):
    """The fixture holds a real timm 1.0.31 ViT's weights and logits (see make_timm_fixture.py)."""
    cfg = ViTConfig(
        "from-timm",
        image_size=32,
        patch_size=8,
        width=48,
        depth=2,
        heads=3,
        mlp_dim=192,
        num_classes=5,
        pool=pool,
    )
    assert_timm_round_trip(create_model(cfg), timm_fixture("timm_vit.safetensors", timm_pool))


def test_timm_features_we_lack_are_refused():
    state, _, _ = timm_fixture("timm_vit.safetensors", "token")
    state["blocks.0.ls1.gamma"] = torch.ones(48)
    with pytest.raises(ValueError, match="ls1"):
        from_timm(state)


def test_a_hybrid_round_trips_but_has_no_timm_layout(tmp_path):
    model = create_model("vit-micro-p4", stem=[8, 16], patch_size=1).eval()
    save_model(model, str(tmp_path))
    loaded = load_model(str(tmp_path)).eval()
    assert loaded.cfg == model.cfg and loaded.cfg.stem == (8, 16)  # a JSON list comes back a tuple
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"hybrid ViT \(model\.stem\)"):
        to_timm(model.state_dict())


def test_an_export_cut_short_leaves_no_model_and_changed_weights_are_refused(tmp_path, monkeypatch):
    """Exporting over a saved model: if the new weights never arrive, the folder holds no
    model (not new weights under the old description, or the old under the new). Weights
    changed after the save are refused by their sha256 in model.json."""
    from pipeline.models import weights

    old, new = create_model("vit-micro-p4", image_size=32), create_model("vit-micro-p4")
    save_model(old, str(tmp_path))
    real = weights.write_atomic

    def crash_on_weights(fs, path, data):
        if path.endswith(weights.WEIGHTS_FILE):
            raise OSError("the disk filled up")
        real(fs, path, data)

    monkeypatch.setattr(weights, "write_atomic", crash_on_weights)
    with pytest.raises(OSError):
        save_model(new, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"model\.json is missing"):
        load_model(str(tmp_path))
    monkeypatch.setattr(weights, "write_atomic", real)
    save_model(new, str(tmp_path))
    load_model(str(tmp_path))
    data = bytearray((tmp_path / weights.WEIGHTS_FILE).read_bytes())
    data[-7] ^= 0x01  # one bit of one weight
    (tmp_path / weights.WEIGHTS_FILE).write_bytes(data)
    with pytest.raises(ValueError, match=r"sha256 is not the one model\.json records"):
        load_model(str(tmp_path))


def test_imagegpt_finetunes_at_a_new_resolution_with_its_raster_embeddings_resampled(tmp_path):
    from pipeline.models import load_pretrained
    from pipeline.models.registry import weights_mismatch

    torch.manual_seed(0)
    small = create_model("igpt-micro", image_size=8, vocab_size=16)
    big = create_model("igpt-micro", image_size=12, vocab_size=16, num_classes=5)
    assert weights_mismatch(small.cfg, big.cfg) == []
    load_pretrained(big, small.state_dict())
    assert big.pos_embed.shape == (1, 1 + 144, small.cfg.width)
    assert torch.equal(big.pos_embed[:, 0], small.pos_embed[:, 0])  # the start token's, kept
    assert torch.equal(big.tok_embed.weight, small.tok_embed.weight)
    assert big(torch.randint(0, 16, (2, 144)), head="classes").shape == (2, 5)


@pytest.mark.parametrize(("name", "groups", "group_width"), [("resnet", 1, 8), ("resnext", 4, 4)])
def test_timm_resnet_weights_reproduce_timm_logits_and_convert_back(name, groups, group_width):
    """A real timm 1.0.31 ResNet and ResNeXt (make_timm_fixture.py): weights, running
    statistics and logits in eval mode."""
    cfg = model_config(
        "resnet-micro", depths=(1, 2, 1, 1), base_width=8, groups=groups,
        group_width=group_width, stem_width=64, small_stem=False, num_classes=5,
    )  # fmt: skip
    fixture = timm_fixture("timm_resnet.safetensors", name)
    assert_timm_round_trip(create_model(cfg), fixture, depths=cfg.depths)


def test_timm_swin_weights_reproduce_timm_logits_and_convert_back():
    """A real timm 1.0.31 Swin Transformer (make_timm_fixture.py) the size of `swin-micro`:
    shifted windows, their mask, relative position bias, patch merging."""
    model = create_model("swin-micro", num_classes=5)
    assert_timm_round_trip(model, timm_fixture("timm_swin.safetensors"), depths=model.cfg.depths)


def test_swin_at_a_larger_window_resamples_its_bias_tables():
    small = create_model("swin-micro")
    with torch.no_grad():
        for p in small.parameters():
            p.normal_()
    big = create_model("swin-micro", image_size=64, window=8)
    assert load_pretrained(big, small.state_dict()) == []
    table = big.blocks[0].attn.relative_position_bias_table
    assert table.shape == (15 * 15, 1)
    # The centre offset (0, 0) of a 7x7 grid lands exactly on the centre of the 15x15 one.
    centre = small.blocks[0].attn.relative_position_bias_table[24]
    torch.testing.assert_close(table[112], centre, rtol=0, atol=1e-6)
    assert torch.isfinite(big(torch.randn(1, 3, 64, 64))).all()
