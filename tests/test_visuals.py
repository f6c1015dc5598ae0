"""TensorBoard pictures: attention rollout and ImageGPT completions."""

import numpy as np
import torch

from pipeline.data.palette import Palette
from pipeline.models import create_model
from pipeline.train.visuals import attention_rollout, complete, completion_panel, rollout_panel


def test_rollout_of_uniform_attention_is_uniform_and_follows_a_focused_map():
    n = 5
    uniform = [torch.full((1, 2, n, n), 1 / n) for _ in range(3)]
    r = attention_rollout(uniform)
    assert r.shape == (1, n - 1)
    torch.testing.assert_close(r, r[:, :1].expand_as(r))
    focused = torch.zeros(1, 1, n, n)
    focused[..., 3] = 1.0  # every token attends to token 3 (patch index 2)
    r = attention_rollout([focused, focused])
    assert r.argmax().item() == 2


def test_rollout_panel_shape_and_range():
    model = create_model("vit-micro-p4", image_size=16, channels=1).eval()
    panel = rollout_panel(model, torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8))
    assert panel.shape == (2, 3, 16, 32) and panel.min() >= 0 and panel.max() <= 1


def test_rollout_of_a_hybrid_lies_where_its_tokens_look():
    # 28 px through a 3-convolution stem: a 4x4 grid of 8 px cells, the last reaching past the
    # image. All attention on the bottom-right token warms rows 24-27, not a stretched 21-27.
    model = create_model("vit-hybrid-mini").eval()
    n = model.cfg.num_tokens
    focused = torch.zeros(1, 1, n, n)
    focused[..., n - 1] = 1.0
    model.attention_maps = lambda x: [focused.expand(len(x), -1, -1, -1)] * model.depth
    panel = rollout_panel(model, torch.zeros(1, 1, 28, 28, dtype=torch.uint8))
    assert panel.shape == (1, 3, 28, 56)
    warm = (2 * panel[0, 0, :, 28:] > 0.5).any(dim=1).nonzero().flatten()
    assert warm.min() == 24 and warm.max() == 27


def test_completion_keeps_the_given_half_and_fills_the_rest():
    torch.manual_seed(0)
    for causal in (True, False):
        model = create_model("igpt-micro", image_size=8, vocab_size=16, causal=causal).eval()
        tokens = torch.randint(0, 16, (3, 64))
        done = complete(model, tokens, torch.Generator().manual_seed(0))
        assert torch.equal(done[:, :32], tokens[:, :32])
        assert done.max() < 16 and done.min() >= 0
        panel = completion_panel(model, tokens, Palette.grey(16))
        assert panel.shape == (3, 3, 8, 24)


def test_a_model_that_learned_a_ramp_completes_it():
    torch.manual_seed(0)
    model = create_model("igpt-micro", image_size=8, vocab_size=16)
    ramp = (torch.arange(64) // 4 % 16).repeat(8, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    from pipeline.train.objectives import igpt_ar

    for _ in range(80):
        loss, _ = igpt_ar(model, {"tokens": ramp})
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    done = complete(model, ramp[:1], torch.Generator().manual_seed(0))
    assert (done[0, 32:] == ramp[0, 32:]).float().mean() > 0.9


def _sample_without_cache(model, tokens, start, generator):
    """The whole sequence through the network once per pixel: what sampling did before."""
    out = tokens.clone()
    for i in range(start, out.shape[1]):
        probs = model(out)[:, i].float().softmax(-1)
        out[:, i] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return out


def test_cached_sampling_draws_the_same_pixels_from_the_same_logits():
    torch.manual_seed(0)
    model = create_model("igpt-micro").eval()  # fp32
    t, half = model.cfg.seq_len, model.cfg.seq_len // 2
    tokens = torch.randint(0, model.cfg.vocab_size, (3, t))
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(out))
    cached = model.sample(tokens, half, torch.Generator().manual_seed(7))
    hook.remove()
    plain = _sample_without_cache(model, tokens, half, torch.Generator().manual_seed(7))
    assert torch.equal(cached, plain) and torch.equal(cached[:, :half], tokens[:, :half])
    with torch.no_grad():
        full = model(cached)[:, half:]  # what the uncached network says at every new position
    torch.testing.assert_close(torch.stack(seen, 1), full, rtol=0, atol=1e-4)
    assert torch.equal(complete(model, tokens, torch.Generator().manual_seed(7)), cached)


def test_a_cached_32px_completion_costs_far_fewer_model_flops():
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.models import model_config

    model = create_model(model_config("igpt-micro", image_size=32)).eval()
    t = model.cfg.seq_len
    tokens = torch.randint(0, model.cfg.vocab_size, (1, t))

    def counted(fn) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
        return counter.get_total_flops()

    cached = counted(lambda: model.sample(tokens, t // 2, torch.Generator().manual_seed(0)))
    # Without the cache every new pixel is one full forward of the same shape: count one.
    plain = (t - t // 2) * counted(lambda: model(tokens))
    assert plain / cached >= 10, (plain, cached)  # the bar
    print(f"32x32 completion: {plain / cached:.0f}x fewer model FLOPs with the cache")


def test_curves_are_drawn_with_labelled_axes_two_panels_a_row_and_an_optional_log_scale(tmp_path):
    from PIL import Image

    from pipeline.train.visuals import curves_png

    loss = [(s, 3.0 * 0.9**s) for s in range(1, 60)]
    panels = {
        "pretraining loss": {"training": loss, "validation": [(20, 1.0), (40, 0.2)]},
        "finetuning loss": {"training": loss[:20], "validation": []},
        "learning rate": {"pretraining": [(s, 1e-3) for s in range(1, 60)]},
        "nothing yet": {"training": []},  # left out
    }
    curves_png(panels, tmp_path / "a.png", title="run")
    curves_png(panels, tmp_path / "b.png", title="run", log_scale=("pretraining loss",))
    with Image.open(tmp_path / "a.png") as a, Image.open(tmp_path / "b.png") as b:
        assert a.size == b.size == (1280, 640)  # three panels: two rows of two
        pa, pb = np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))
        assert len(np.unique(pa.reshape(-1, 3), axis=0)) > 10  # drawn, antialiased
        first = (slice(0, 320), slice(0, 640))
        assert not np.array_equal(pa[first], pb[first])  # the log axis redraws the first panel
