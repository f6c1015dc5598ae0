"""DeiT: the distillation token and head, timm parity, hard-label distillation from a frozen
teacher of another family, on one and two ranks."""

import pytest
import torch
from test_resnet import RESNET_RUN, count
from test_train import (
    finish,
    pretrain,
    resume_matches_uninterrupted,
    run_export,
    write_config,
)
from test_weights import assert_timm_round_trip, timm_fixture

from pipeline.config import parse_config
from pipeline.models import ViTConfig, create_model
from pipeline.train.objectives import supervised


def test_deit_b_with_its_distillation_token_is_timms_87m():
    assert count("deit-b16") == 87_338_192  # timm 1.0.31 deit_base_distilled_patch16_224
    assert count("deit-ti16") == 5_910_800


def test_timm_deit_weights_reproduce_timm_logits_and_convert_back():
    cfg = ViTConfig("from-timm", image_size=32, patch_size=8, width=48, depth=2, heads=3,
                    mlp_dim=192, num_classes=5, distilled=True)  # fmt: skip
    assert_timm_round_trip(create_model(cfg), timm_fixture("timm_deit.safetensors"))


def test_two_heads_apart_in_training_averaged_at_inference():
    model = create_model("deit-micro-p4")
    for head in (model.head, model.head_dist):
        torch.nn.init.normal_(head.weight)
    x = torch.randn(3, 3, 32, 32)
    cls, dist = model(x, head="both")
    torch.testing.assert_close(model(x), (cls + dist) / 2)
    tokens = model.forward_features(x)
    torch.testing.assert_close(model.forward_head(tokens, True), (tokens[:, 0] + tokens[:, 1]) / 2)
    model.reset_head(4)
    assert model.head.weight.shape == model.head_dist.weight.shape == (4, 48)
    assert model(x).abs().max() == 0  # both fresh heads start at zero


class Constant(torch.nn.Module):
    """A teacher that always answers `k`."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k, self.w = k, torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.nn.functional.one_hot(torch.full((len(x),), self.k), 10).float() + self.w


def test_hard_distillation_teaches_the_distillation_head_what_the_teacher_says():
    """Labels say class 1, the teacher says class 7: the [class] head learns 1, the
    distillation head 7, and the loss is the mean of the two cross-entropies."""
    torch.manual_seed(0)
    model = create_model("deit-micro-p4")
    batch = {"image": torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8),
             "label": torch.full((8,), 1)}  # fmt: skip
    teacher = Constant(7)
    loss, m = supervised(model, batch, teacher=teacher)
    torch.testing.assert_close(loss, (m["classification_loss"] + m["distillation_loss"]) / 2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    for _ in range(30):
        loss, m = supervised(model, batch, teacher=teacher)
        opt.zero_grad()
        loss.backward()
        opt.step()
    cls, dist = model(torch.randn(4, 3, 32, 32), head="both")
    assert (cls.argmax(-1) == 1).all() and (dist.argmax(-1) == 7).all()
    assert m["teacher_agreement"] == 1.0


def test_label_smoothing_mixes_the_label_with_a_uniform_target():
    model = create_model("vit-micro-p4").eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    batch = {"image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8),
             "label": torch.tensor([0, 1, 2, 3])}  # fmt: skip
    plain, _ = supervised(model, batch)
    smoothed, _ = supervised(model, batch, label_smoothing=0.1)
    from pipeline.data.transforms import model_input

    logp = model(model_input(batch["image"])).log_softmax(-1)
    uniform = -logp.mean(-1).mean()
    torch.testing.assert_close(smoothed, 0.9 * plain + 0.1 * uniform)


def test_a_teacher_needs_a_distilled_student():
    raw = {"model": {"name": "vit-micro-p4"}, "data": {"url": "/unused"},
           "train": {"teacher": "/some/export"}}  # fmt: skip
    with pytest.raises(ValueError, match=r"train.teacher.*distilled ViT"):
        parse_config(raw, "test")


DEIT_RUN = {"name": "deit-micro-p4", "image_size": 16, "channels": 1, "num_classes": 10}


@pytest.mark.slow
def test_two_ranks_distil_from_a_resnet_teacher_and_resume_exactly(tmp_path, digits_url):
    """The teacher: a ResNet trained and exported here. The DeiT student on 2 ranks at ZeRO-2
    learns from it with DeiT's augmentations, killed after its step-4 checkpoint and resumed to
    the uninterrupted losses and weights;
    a teacher of another image size is refused before any work, naming train.teacher."""
    (tmp_path / "teacher").mkdir()
    finish(pretrain(write_config(tmp_path / "teacher", digits_url, model=RESNET_RUN)))
    run_export(tmp_path / "teacher" / "run", tmp_path / "teacher" / "export")
    teacher = str(tmp_path / "teacher" / "export")
    # DeiT's whole recipe: RandAugment, random erasing, Mixup or CutMix, label smoothing.
    sections = dict(
        model=DEIT_RUN,
        data={"augment": "vit", "randaugment_ops": 2, "random_erasing": 0.25},
        train={"teacher": teacher, "mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1},
    )
    clean_out, _ = resume_matches_uninterrupted(tmp_path, digits_url, 4, ranks=2, **sections)
    assert f"distilling from {teacher} (resnet-micro, frozen)" in clean_out
    # The student through `tessera evaluate` like any ViT: its last block's [class] token.
    from test_evaluate import probes_of_an_export

    config = write_config(tmp_path / "b", digits_url, **sections)
    found = probes_of_an_export(config, tmp_path / "b" / "export", layers=(-1,))
    assert {e for e, _ in found} == {"linear_probe", "knn"}

    (tmp_path / "c").mkdir()
    bad = write_config(tmp_path / "c", digits_url, model={**DEIT_RUN, "image_size": 32},
                       train={"teacher": teacher})  # fmt: skip
    proc = pretrain(bad)
    text = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0
    assert "train.teacher" in text and "image_size 16 != 32" in text, text[-2000:]
