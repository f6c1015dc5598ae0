"""Model families: sizes against the papers, the head API, masks, checkpointing, FLOPs."""

import pytest
import torch

from pipeline.models import create_model, list_models, model_config

# (name, overrides, paper parameter count, tolerance). ViT at 224 px with a 1000-class head.
PAPER_SIZES = [
    ("vit-b16", {}, 86e6, 0.02),
    ("vit-l16", {}, 307e6, 0.02),
    ("vit-h14", {}, 632e6, 0.02),
    ("igpt-s", {}, 76e6, 0.03),
    ("igpt-m", {}, 455e6, 0.03),
    ("igpt-l", {}, 1.4e9, 0.03),
    ("igpt-xl", {}, 6.8e9, 0.03),
    ("igpt-xl", {"image_size": 64}, 6.8e9, 0.03),
]


def count_params(name, **overrides):
    with torch.device("meta"):
        model = create_model(name, **overrides)
    assert all(p.device.type == "meta" for p in model.parameters())
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "overrides", "paper", "tol"), PAPER_SIZES)
def test_parameter_counts_match_the_papers(name, overrides, paper, tol):
    assert abs(count_params(name, **overrides) / paper - 1) < tol


def test_every_paper_count_the_registry_quotes_is_met_within_2_percent():
    """What `tessera models` prints in its paper column; ImageGPT within 3% (iGPT-L is 1.36B
    against the paper's rounded 1.4B)."""
    from pipeline.models.registry import PAPER_PARAMS

    assert len(PAPER_PARAMS) >= 22
    for name, paper in PAPER_PARAMS.items():
        tol = 0.03 if name.startswith("igpt") else 0.02
        assert abs(count_params(name) / paper - 1) < tol, name


def test_vit_counts_equal_timm_exactly():
    # timm 1.0.31 `vit_base_patch16_224` / `vit_large_patch16_224`, counted on the meta device.
    assert count_params("vit-b16") == 86_567_656
    assert count_params("vit-l16") == 304_326_632


def test_every_named_size_builds_on_meta():
    for name in list_models():
        assert count_params(name) > 0


def test_vit_b16_forward_flops_match_the_known_17_6_gmacs():
    gmacs = model_config("vit-b16").forward_flops() / 2e9
    assert 17.4 < gmacs < 17.8


TINY = ["vit-micro-p4", "igpt-micro"]


def tiny_input(model, batch=2):
    cfg = model.cfg
    if cfg.family == "vit":
        return torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size)
    return torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len))


@pytest.mark.parametrize("name", [*TINY, "vit-tiny-p4"])
def test_tiny_forward_backward_is_finite(name):
    torch.manual_seed(0)
    model = create_model(name)
    heads = [m for m in (model.head, getattr(model, "lm_head", None)) if m is not None]
    for head in heads:  # the zero-initialised head would stop every gradient below it
        if isinstance(head, torch.nn.Linear):
            torch.nn.init.normal_(head.weight, std=0.02)
    out = model(tiny_input(model))
    assert torch.isfinite(out).all()
    target = torch.randint(0, out.shape[-1], out.shape[:-1])
    torch.nn.functional.cross_entropy(out.flatten(0, -2), target.flatten()).backward()
    used = [
        p
        for n, p in model.named_parameters()
        if not (n.startswith("head.") and name.startswith("igpt"))
    ]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in used)
    assert all(p.grad.abs().sum() > 0 for p in used)


def test_vit_accepts_grey_28px_images():
    model = create_model("vit-micro-p4", image_size=28, channels=1)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_wrong_image_shape_names_the_expected_shape():
    model = create_model("vit-micro-p4")
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        model(torch.randn(1, 3, 28, 28))


def test_igpt_logits_align_with_the_pixel_they_predict():
    model = create_model("igpt-micro")
    tokens = tiny_input(model)
    assert model(tokens).shape == (2, model.cfg.seq_len, model.cfg.vocab_size)


@pytest.mark.parametrize("j", [0, 37, 255])
def test_causal_igpt_outputs_before_j_ignore_token_j(j):
    torch.manual_seed(0)
    model = create_model("igpt-micro").eval()
    tokens = tiny_input(model, batch=1)
    changed = tokens.clone()
    changed[0, j] = (tokens[0, j] + 1) % model.cfg.vocab_size
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    # logits[:, i] predicts pixel i from pixels < i: positions <= j must not move, j+1 must.
    torch.testing.assert_close(a[:, : j + 1], b[:, : j + 1], rtol=0, atol=1e-6)
    if j + 1 < model.cfg.seq_len:
        assert not torch.allclose(a[:, j + 1], b[:, j + 1])


def test_bert_igpt_sees_both_directions():
    torch.manual_seed(0)
    model = create_model("igpt-micro", causal=False).eval()
    tokens = tiny_input(model, batch=1)
    changed = tokens.clone()
    changed[0, 100] = model.cfg.mask_id
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert not torch.allclose(a[:, 0], b[:, 0])  # an earlier position moves too


@pytest.mark.parametrize("name", TINY)
def test_forward_features_returns_chosen_blocks_and_stops_early(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = tiny_input(model)
    calls = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    with torch.no_grad():
        first, last = model.forward_features(x, layers=[0, -1])
        assert calls == [0, 1]
        calls.clear()
        (only_first,) = model.forward_features(x, layers=[0])
        assert calls == [0]  # block 1 never ran
        final = model.forward_features(x)
    torch.testing.assert_close(first, only_first)
    torch.testing.assert_close(model.norm(last), final)
    assert final.shape == (2, model.cfg.num_tokens, model.cfg.width)


@pytest.mark.parametrize("name", TINY)
def test_layer_out_of_range_is_an_error(name):
    model = create_model(name)
    with pytest.raises(IndexError, match="out of range"):
        model.forward_features(tiny_input(model), layers=[2])


@pytest.mark.parametrize("name", TINY)
def test_head_api_pre_logits_and_reset_head(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = tiny_input(model)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        assert pooled.shape == (2, model.cfg.width)
        model.reset_head(7, bias=-3.0)
        logits = model.forward_head(model.forward_features(x))
    assert logits.shape == (2, 7)
    torch.testing.assert_close(logits, torch.full((2, 7), -3.0))


def test_vit_avg_pool_uses_patch_tokens():
    torch.manual_seed(0)
    model = create_model("vit-micro-p4", pool="avg").eval()
    x = tiny_input(model)
    with torch.no_grad():
        tokens = model.forward_features(x)
        expected = model.fc_norm(tokens[:, 1:].mean(1))
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), expected)


@pytest.mark.parametrize("name", TINY)
def test_grad_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    model = create_model(name)
    x = tiny_input(model)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model.forward_features(x).pow(2).mean().backward()
        grads.append([p.grad for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_grad_checkpointing_recomputes_blocks_in_backward():
    model = create_model("vit-micro-p4", grad_checkpointing=True)
    calls = []
    model.blocks[0].mlp.fc1.register_forward_hook(lambda *_: calls.append(1))
    model.forward_features(tiny_input(model)).sum().backward()
    assert len(calls) == 2  # once forward, once recomputed in backward


def test_attention_maps_are_distributions():
    model = create_model("vit-micro-p4").eval()
    with torch.no_grad():
        maps = model.attention_maps(tiny_input(model))
    assert len(maps) == model.depth
    assert maps[0].shape == (2, 3, 65, 65)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 3, 65))


@pytest.mark.parametrize("causal", [False, True])
def test_bf16_attention_on_cpu_computes_what_the_fused_kernel_does(causal):
    # In bf16 on CPU the layer takes the explicit softmax(QK^T)V path (faster there); it must
    # agree with scaled_dot_product_attention in float32, forward and backward.
    from pipeline.models.layers import Attention

    torch.manual_seed(0)
    attn = Attention(64, 4, causal=causal)
    with torch.no_grad():
        attn.qkv.weight.normal_(0, 0.15)  # scores of order 1: not near-uniform attention
    x = torch.randn(3, 17, 64)
    ref_x, x16 = x.clone().requires_grad_(), x.to(torch.bfloat16).requires_grad_()
    ref = attn(ref_x)
    ref.square().sum().backward()
    ref_grad = attn.qkv.weight.grad.clone()
    attn.zero_grad()
    out = attn.to(torch.bfloat16)(x16)
    out.float().square().sum().backward()
    torch.testing.assert_close(out.float(), ref.detach(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(x16.grad.float(), ref_x.grad, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(attn.qkv.weight.grad.float(), ref_grad, atol=0.1, rtol=5e-2)


def test_unknown_model_suggests_close_names():
    with pytest.raises(KeyError, match="vit-b16"):
        model_config("vit-b61")


def test_head_bias_is_part_of_the_architecture_init():
    model = create_model("vit-micro-p4", head_bias=-10.0)
    torch.testing.assert_close(model.head.bias, torch.full((10,), -10.0))
    assert model.head.weight.abs().sum() == 0


def test_hybrid_vit_cuts_its_patches_from_the_stems_feature_map():
    # 28 px halved three times (rounding up) is 4: 16 tokens of 1x1 feature-map patches.
    cfg = model_config("vit-tiny-p7", channels=1, stem=[8, 16, 32], patch_size=1)
    assert cfg.stem == (8, 16, 32) and cfg.feature_size == 4 and cfg.num_tokens == 17
    model = create_model(cfg)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert model.patch_embed.weight.shape == (192, 32, 1, 1)
    plain = model_config("vit-tiny-p7", channels=1)
    extra = cfg.forward_flops() - plain.forward_flops()
    convs = 2 * 9 * (14**2 * 1 * 8 + 7**2 * 8 * 16 + 4**2 * 16 * 32)
    assert extra == convs + 2 * 16 * 192 * (32 - 49)  # the stem, and a narrower embedding


def test_hybrid_stem_is_per_image_and_trains():
    torch.manual_seed(0)
    model = create_model("vit-micro-p4", stem=[8], patch_size=2).train()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():  # GroupNorm, not BatchNorm: in training too, tokens ignore the batch
        torch.testing.assert_close(model.embed(x[1:]), model.embed(x)[1:])
    assert model.cfg.token_pixels == 4 and model.cfg.grid == 8
    torch.nn.init.normal_(model.head.weight, std=0.02)
    model(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.stem.parameters())
