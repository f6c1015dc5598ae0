"""ResNet, ResNeXt and BiT: sizes, BatchNorm under bf16, checkpointing and ranks, training."""

import os
import re

import pytest
import torch
import torch.nn.functional as F
from test_train import (
    resume_matches_uninterrupted,
)

from pipeline.models import create_model, load_model, model_config
from pipeline.models.registry import PAPER_PARAMS
from pipeline.models.resnet import BatchNorm
from pipeline.train.optim import param_groups

RESNETS = [n for n in PAPER_PARAMS if model_config(n).family == "resnet"]


def count(name, **overrides):
    with torch.device("meta"):
        return sum(p.numel() for p in create_model(name, **overrides).parameters())


@pytest.mark.parametrize("name", RESNETS)
def test_paper_sizes_are_within_2_percent_of_the_papers_counts(name):
    assert abs(count(name) / PAPER_PARAMS[name] - 1) < 0.02


def test_counts_equal_timms_and_resnet50_costs_its_known_4_1_gmacs():
    # timm 1.0.31 `resnet50`, `resnext50_32x4d`, `resnext101_32x8d`, `resnetv2_50x1_bit`.
    assert count("resnet-50") == 25_557_032
    assert count("resnext-50-32x4d") == 25_028_904
    assert count("resnext-101-32x8d") == 88_791_336
    assert count("bit-r50x1") == 25_549_352
    assert 4.05 < model_config("resnet-50").forward_flops() / 2e9 < 4.15
    assert len(RESNETS) == 5


def test_analytic_flops_equal_the_convolutions_actually_run():
    """The FLOPs count walks the same geometry the model builds: counted by a hook on every
    convolution and linear layer of a forward pass."""
    for name, overrides in [("resnext-26-s", {}), ("resnet-micro", {"small_stem": False}),
                            ("bit-micro", {"image_size": 28, "channels": 1})]:  # fmt: skip
        model = create_model(name, **overrides).eval()
        cfg = model.cfg
        flops = []

        def hook(m, inputs, out, flops=flops):
            if isinstance(m, torch.nn.Conv2d):
                k = m.weight[0].numel()  # c_in / groups x kernel^2
                flops.append(2 * out.numel() * k)
            else:
                flops.append(2 * m.in_features * m.out_features)

        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
                m.register_forward_hook(hook)
        with torch.no_grad():
            model(torch.randn(1, cfg.channels, cfg.image_size, cfg.image_size))
        assert sum(flops) == cfg.forward_flops(), name


def test_batchnorm_keeps_fp32_statistics_and_arithmetic_in_a_bf16_model():
    torch.manual_seed(0)
    model = create_model("resnet-micro").bfloat16().train()
    bn = model.blocks[0].bn1
    assert bn.weight.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.float32
    x = torch.randn(8, 3, 32, 32)
    before = bn.running_mean.clone()
    out = model(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert not torch.equal(before, bn.running_mean)  # updated, in fp32
    # The same normalisation as an fp32 BatchNorm on the same (bf16-rounded) input.
    ref = torch.nn.BatchNorm2d(bn.num_features)
    y = torch.randn(8, bn.num_features, 4, 4).bfloat16()
    fresh = BatchNorm(bn.num_features).bfloat16().train()
    torch.testing.assert_close(fresh(y).float(), ref(y.float()), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(fresh.running_var, ref.running_var, rtol=1e-6, atol=1e-6)


def test_checkpointing_recomputes_without_updating_the_running_statistics_twice():
    torch.manual_seed(0)
    plain = create_model("resnet-micro", drop_path=0.1).train()
    recomputed = create_model("resnet-micro", drop_path=0.1, grad_checkpointing=True).train()
    torch.nn.init.normal_(plain.head.weight, std=0.1)  # a zero head passes no gradient back
    recomputed.load_state_dict(plain.state_dict())
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for model in plain, recomputed:
        torch.manual_seed(1)  # the same drop-path draws
        F.cross_entropy(model(x), y).backward()
    for (name, a), b in zip(
        plain.state_dict().items(), recomputed.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # num_batches_tracked too
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_synchronised_batchnorm_on_one_rank_is_batchnorm():
    """The synchronised path (sums and sums of squares, summed over ranks) gives what
    F.batch_norm gives, outputs, gradients and running statistics, with a sum over one rank."""
    torch.manual_seed(0)
    a, b = BatchNorm(6), BatchNorm(6)
    for m in a, b:
        torch.nn.init.normal_(m.weight)
    b.load_state_dict(a.state_dict())
    b.sync = lambda t: t * 1.0
    x = torch.randn(5, 6, 3, 3) * 3 + 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(5, 6, 3, 3)
    (a(xa) * grad).sum().backward()
    (b(xb) * grad).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=1e-4, atol=1e-5)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(a, k), getattr(b, k), rtol=1e-5, atol=1e-6)


def _sync_rank(rank, world, port, x, grad, queue):
    import torch.distributed as dist

    from pipeline.train.distributed import Comm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    comm = Comm(rank, world, rank, torch.device("cpu"), 60.0, 60.0)
    torch.manual_seed(0)
    bn = BatchNorm(6)
    torch.nn.init.normal_(bn.weight)
    bn.sync = lambda t: comm.sum_differentiable(t, "BatchNorm's batch statistics")
    mine = x.chunk(world)[rank].clone().requires_grad_()
    (bn(mine) * grad.chunk(world)[rank]).sum().backward()
    # By value: a tensor sent as is is fetched from this process's listener, gone once it exits.
    sent = (mine.grad, bn.weight.grad, bn.running_mean, bn.running_var)
    queue.put((rank, *(t.detach().numpy() for t in sent)))
    dist.destroy_process_group()


@pytest.mark.slow
def test_synchronised_batchnorm_on_two_ranks_equals_batchnorm_on_the_whole_batch():
    import torch.multiprocessing as mp
    from test_train import _port

    x, grad = torch.randn(8, 6, 3, 3) * 2 + 1, torch.randn(8, 6, 3, 3)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = int(_port())
    procs = [ctx.Process(target=_sync_rank, args=(r, 2, port, x, grad, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = {
        r[0]: [torch.from_numpy(a) for a in r[1:]] for r in (queue.get(timeout=120) for _ in procs)
    }
    for p in procs:
        p.join(60)
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(6)
    torch.nn.init.normal_(ref.weight)
    whole = x.clone().requires_grad_()
    (ref(whole) * grad).sum().backward()
    torch.testing.assert_close(torch.cat([got[0][0], got[1][0]]), whole.grad, rtol=1e-4, atol=1e-5)
    # Each rank's weight gradient is its share; DeepSpeed's all-reduce sums (averages) them.
    torch.testing.assert_close(got[0][1] + got[1][1], ref.weight.grad, rtol=1e-4, atol=1e-5)
    for r in range(2):
        torch.testing.assert_close(got[r][2], ref.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[r][3], ref.running_var, rtol=1e-5, atol=1e-6)


def test_sgd_keeps_one_moment_and_cannot_run_on_deepspeeds_cpu_adam():
    from pipeline.config import parse_config
    from pipeline.plan import model_state_bytes
    from pipeline.train.engine import deepspeed_config

    p = 1000
    assert sum(model_state_bytes(p, 0, 1, "bf16", optimizer_name="sgd")[:3]) == 12 * p
    assert sum(model_state_bytes(p, 0, 1, "fp32", optimizer_name="sgd")[:3]) == 12 * p
    raw = {"model": {"name": "resnet-micro"}, "optim": {"name": "sgd", "momentum": 0.9}}
    ds = deepspeed_config(parse_config(raw), 1)
    assert ds["optimizer"] == {"type": "SGD", "params": {
        "lr": 1e-3, "momentum": 0.9, "nesterov": False, "weight_decay": 0.05}}  # fmt: skip
    with pytest.raises(ValueError, match=r"offload_optimizer.*sgd"):
        parse_config({**raw, "deepspeed": {"offload_optimizer": True}})


def test_layer_decay_goes_by_stage():
    model = create_model("resnet-micro", depths=(1, 2, 1, 1))
    lrs = {
        name: g["lr"] for g in param_groups(model, 0.05, lr=1.0, layer_decay=0.5)
        for p in g["params"] for name, q in model.named_parameters() if p is q
    }  # fmt: skip
    assert lrs["stem.conv.weight"] == 0.5**5 and lrs["head.weight"] == 1.0
    assert lrs["blocks.1.conv1.weight"] == lrs["blocks.2.conv1.weight"] == 0.5**3  # stage 2
    assert lrs["blocks.4.conv1.weight"] == 0.5


def test_probe_features_of_chosen_blocks_are_pooled_maps():
    model = create_model("resnext-26-s").eval()
    x = torch.randn(2, 3, 32, 32)
    first, last = model.features(x, [0, -1])
    assert first.shape == (2, 64) and last.shape == (2, 512)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(x), True), last)


def test_bad_sizes_are_refused_naming_the_key():
    with pytest.raises(ValueError, match="depths"):
        model_config("resnet-50", depths=(3, 0, 6, 3))
    with pytest.raises(ValueError, match="divisible by 32"):
        model_config("bit-micro", group_width=8)


RESNET_RUN = {"name": "resnet-micro", "image_size": 16, "channels": 1, "num_classes": 10}


EVAL = {
    "evaluators": ["linear_probe", "fewshot", "knn", "finetune"],
    "layers": [0, -1],
    "shots": [5],
    "seeds": 1,
    "finetune_steps": 20,
    "finetune": ["optim.lr=3e-3", "optim.layer_decay=0.75", "train.global_batch_size=32"],
}


@pytest.mark.slow
def test_a_resnet_trains_resumes_exactly_exports_loads_and_evaluates(tmp_path, digits_url):
    sections = dict(
        model=RESNET_RUN, train={"validate_every_steps": 4, "validate_samples": 64}, eval=EVAL
    )
    resume_matches_uninterrupted(tmp_path, digits_url, kill_at=8, **sections)
    config = tmp_path / "b" / "run.yaml"
    a = load_model(str(tmp_path / "b" / "export")).state_dict()
    assert a["blocks.0.bn1.running_var"].dtype == torch.float32
    # The evaluators read pooled feature maps of the chosen blocks; finetuning decays by stage.
    from test_evaluate import read_rows, run_tessera

    run_tessera("evaluate", config)
    rows = {(r.evaluator, r.layer, r.metric): r for r in read_rows(tmp_path / "b" / "run")}
    assert {("linear_probe", "0", "top1"), ("linear_probe", "3", "top1"), ("knn", "3", "top1"),
            ("fewshot", "3", "5-shot top1"), ("finetune", "-", "top1")} <= set(rows)  # fmt: skip
    assert all(r.model == "resnet-micro" and r.pretrain_steps == 12 for r in rows.values())
    assert rows[("linear_probe", "3", "top1")].value > 0.3  # 10 classes: chance is 0.1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sync", "zero", "checkpointing", "optim"),
    [(False, 2, False, {"name": "sgd", "lr": 0.05, "nesterov": True}), (True, 3, True, {})],
)
def test_two_ranks_resume_exactly_with_running_statistics_averaged_at_each_save(
    tmp_path, digits_url, sync, zero, checkpointing, optim
):
    """Per-rank BatchNorm: each rank's running statistics differ and a checkpoint holds rank
    0's, so without averaging them at every save a resumed rank 1 would carry on from rank 0's,
    and the validation at step 6 (no save there) and the final weights would differ from the
    uninterrupted run's. Synchronised, under ZeRO-3 (whose zero.Init casts buffers) with
    recomputed blocks: the same. The first case trains with SGD and Nesterov momentum (the
    CNN recipe; torch's SGD under ZeRO-2), whose momentum the checkpoint carries."""
    sections = dict(
        model={**RESNET_RUN, "grad_checkpointing": checkpointing},
        deepspeed={"zero_stage": zero},
        optim={"warmup_steps": 2, **optim},
        train={"sync_batchnorm": sync, "validate_every_steps": 6, "validate_samples": 64},
    )
    clean_out, out = resume_matches_uninterrupted(tmp_path, digits_url, 4, ranks=2, **sections)
    line = re.compile(r"^validation at step (\d+): (.*)$", re.M)
    want = {k: v for k, v in line.findall(clean_out) if int(k) > 4}
    assert sorted(want, key=int) == ["6", "12"], clean_out[-2000:]
    assert {k: v for k, v in line.findall(out) if int(k) > 4} == want
    step = tmp_path / "b" / "run" / "checkpoints" / "step-0000012"
    states = sorted(step.glob("*mp_rank_00_model_states.pt"))[0]  # ZeRO-3: zero_pp_rank_0_...
    saved = torch.load(states, weights_only=False)["module"]
    assert saved["blocks.0.bn1.running_var"].dtype == torch.float32  # not cast to bf16
