"""Finetuning and evaluation: probes that can tell signal from noise, one results table,
`tessera finetune` from exported weights, `evaluate --watch`, and errors before any work."""

import json
import os
import re
import subprocess

import numpy as np
import pytest
import torch
from conftest import BIN, TESSERA
from PIL import Image
from test_train import TIMEOUT, finish, pretrain, run_export, write_config

from pipeline.evaluate import probes
from pipeline.evaluate.results import Row, append_rows, read_rows
from pipeline.models import create_model, model_config
from pipeline.models.registry import weights_mismatch
from pipeline.storage import filesystem
from pipeline.train.optim import param_groups

# -- probes on features whose answer is known ----------------------------------------------------


def separable(n=1200, d=32, classes=8, noise=0.3, seed=0):
    """Features that are a linear function of the labels plus noise: a probe should be ~100%."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(size=(classes, d))[y] + noise * rng.normal(size=(n, d))
    return (x[:1000].astype(np.float32), y[:1000]), (x[1000:].astype(np.float32), y[1000:])


def noise(n=1200, d=32, classes=8, seed=1):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, classes, n)
    return (x[:1000], y[:1000]), (x[1000:], y[1000:])


def test_linear_probe_finds_a_linear_signal_and_not_noise():
    top1, info = probes.logistic_probe(*separable(), classes=8)
    assert top1 > 0.98 and info["l2"] in probes.LOGISTIC_L2
    assert probes.logistic_probe(*noise(), classes=8)[0] < 0.25  # chance is 0.125


def test_multilabel_probe_finds_the_signal_and_not_noise():
    """JFT-style targets: precision@1 and mAP of per-class sigmoids; features that carry the
    labels score near 1, noise near the positive rate."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1500, 16)).astype(np.float32)
    y = (x[:, :6] > 0.7).astype(np.float32)  # 6 classes, ~24% positive each, several per image
    y[y.sum(1) == 0, 0] = 1  # every image has a label
    train, test = (x[:1000], y[:1000]), (x[1000:], y[1000:])
    scores, info = probes.multilabel_probe(train, test, classes=6)
    assert scores["mAP"] > 0.9 and scores["precision_at_1"] > 0.9, scores
    assert info["l2"] in probes.LOGISTIC_L2 and 0 < info["holdout_mAP"] <= 1
    noise = rng.normal(size=(1500, 16)).astype(np.float32)
    blind, _ = probes.multilabel_probe(
        (noise[:1000], y[:1000]), (noise[1000:], y[1000:]), classes=6
    )
    assert blind["mAP"] < 0.5, blind


def test_fewshot_and_knn_find_the_signal_and_not_noise():
    scores = probes.fewshot(*separable(), classes=8, shots=[1, 5], seeds=3)
    assert set(scores) == {1, 5} and all(len(s) == 3 for s in scores.values())
    assert np.mean(scores[5]) > 0.95
    random = probes.fewshot(*noise(), classes=8, shots=[5], seeds=3)
    assert np.mean(random[5]) < 0.3
    assert probes.knn(*separable(), classes=8, k=10) > 0.98
    assert probes.knn(*noise(), classes=8, k=10) < 0.3


def test_fewshot_needs_enough_images_of_every_class():
    (x, y), test = separable()
    y = y.copy()
    y[y == 3] = 2
    y[0] = 3  # class 3 has one training image
    with pytest.raises(ValueError, match=r"classes \[3\] have fewer"):
        probes.fewshot((x, y), test, classes=8, shots=[5])


def test_probe_streams_features_from_disk_with_the_same_result(tmp_path, monkeypatch):
    """Features larger than the memory budget are read chunk by chunk from a memory map."""
    (x, y), test = separable(n=1200, d=16)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    held = probes.logistic_probe((x, y), test, classes=8)
    monkeypatch.setattr(probes, "MEMORY_BUDGET", 0)
    monkeypatch.setattr(probes, "CHUNK", 128)
    streamed = probes.logistic_probe((mapped, y), test, classes=8)
    assert streamed[1]["l2"] == held[1]["l2"]
    assert abs(streamed[0] - held[0]) < 0.01


@pytest.mark.parametrize("workers", [0, 2])
def test_an_interrupted_feature_extraction_resumes_and_matches_one_that_was_not(
    tmp_path, monkeypatch, digits_url, workers
):
    """Killed after some batches (progress recorded after each), the re-run computes only the
    images after the last record and writes the same bytes as an uninterrupted extraction."""
    from pipeline.data.stream import StreamConfig
    from pipeline.evaluate import features

    monkeypatch.setattr(features, "COMMIT_S", 0.0)
    cfg = StreamConfig(digits_url, "train", batch_size=64, train=False, workers=workers)
    seen: list[str] = []

    def fn(batch, stop_after=None):
        if stop_after is not None and len(seen) >= stop_after:
            raise KeyboardInterrupt("preempted")
        seen.extend(batch["key"])
        pixels = batch["image"].flatten(1).float()
        return {"mean": pixels.mean(1, keepdim=True), "pixels": pixels}

    names = ["mean", "pixels"]
    whole = features.extract(fn, names, cfg, tmp_path / "whole", "w0", log=lambda *_: None)
    assert len(seen) == 1438
    seen.clear()
    features.extract(fn, names, cfg, tmp_path / "first", "w0", log=lambda *_: None, limit=1400)
    order = list(seen)  # the first 1,400 of the split, in the order the stream reads them
    assert len(set(order)) == 1400

    seen.clear()
    with pytest.raises(KeyboardInterrupt):
        features.extract(lambda b: fn(b, stop_after=5 * 64), names, cfg, tmp_path / "cut",
                         "w0", log=lambda *_: None, limit=1400)  # fmt: skip
    assert not (tmp_path / "cut" / features.META).exists()
    logs: list[str] = []
    again = features.extract(fn, names, cfg, tmp_path / "cut", "w0", log=logs.append, limit=1400)
    assert "  features train: resuming at 320/1400 images" in logs
    assert seen == order  # each image computed once across both runs, in order
    for name in names:  # each image's row at its place in the split, however it was read
        assert again[name][0].tobytes() == whole[name][0][:1400].tobytes()
    assert again.labels.tobytes() == whole.labels[:1400].tobytes()
    assert not (tmp_path / "cut" / features.PROGRESS).exists()

    # Progress of other weights is not resumed: the folder is recomputed.
    seen.clear()
    with pytest.raises(KeyboardInterrupt):
        features.extract(lambda b: fn(b, stop_after=128), names, cfg, tmp_path / "other", "w0",
                         log=lambda *_: None)  # fmt: skip
    features.extract(fn, names, cfg, tmp_path / "other", "w1", log=lambda *_: None)
    assert len(seen) == 128 + 1438


# -- models and optimiser pieces -----------------------------------------------------------------


def two_inputs(cfg) -> torch.Tensor:
    """Two random inputs of a model: palette token ids for an ImageGPT, else images."""
    if cfg.family == "igpt":
        return torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    return torch.randn(2, cfg.channels, cfg.image_size, cfg.image_size)


@pytest.mark.parametrize("name", ["vit-micro-p4", "igpt-micro"])
def test_probe_features_of_the_last_block_are_what_the_head_sees(name):
    model = create_model(name).eval()
    cfg = model.cfg
    x = two_inputs(cfg)
    first, last = model.features(x, [0, -1])
    assert first.shape == last.shape == (2, cfg.width)
    pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(last, pre_logits)


@pytest.mark.parametrize(
    "name", ["igpt-micro", "vit-micro-p4", "resnet-micro", "swin-micro", "pvt-micro"]
)
def test_grid_pooling_averages_each_blocks_map_over_a_k_by_k_grid(name):
    """eval.grids: a block's spatial map averaged over k x k cells ((B, D k^2), channel-major);
    0 is the model's own pooling. Checked against the map's own cell averages for ImageGPT."""
    model = create_model(name).eval()
    cfg = model.cfg
    x = two_inputs(cfg)
    own, grid1, grid2 = model.features(x, [0], grids=[0, 1, 2])
    torch.testing.assert_close(own, model.features(x, [0])[0])
    assert grid2.shape == (2, 4 * grid1.shape[1])
    (last,) = model.features(x, [-1], grids=[1])  # PVT's last stage: after its [class] token
    assert last.shape == (2, model.width)
    if cfg.family == "igpt":  # raster order: pixel (r, c) is token 1 + r * side + c
        (state,) = model.forward_features(x, layers=[0])
        side, half = cfg.image_size, cfg.image_size // 2
        pixels = state[:, 1:].reshape(2, side, side, -1).float()
        top_right = pixels[:, :half, half:].mean(dim=(1, 2))  # cell (0, 1) of the 2x2 grid
        torch.testing.assert_close(grid2.reshape(2, -1, 4)[:, :, 1], top_right)
        torch.testing.assert_close(grid1, own.float())  # one cell: the average over pixels
        with pytest.raises(
            ValueError, match=r"eval.grids: a 17x17 grid .* block 0.s map has 16x16"
        ):
            model.features(x, [0], grids=[17])


def test_a_final_report_chooses_the_block_and_pooling_on_val_and_reads_test_once(
    tmp_path, digits_url
):
    """Several probes compete (blocks x poolings): each is scored on val, and test is read for
    the one val chose alone, its row saying so; ImageGPT's pixels are also probed as it sees
    them (its side, its palette's greys)."""
    from conftest import fashion_mnist_subset

    from pipeline.config import load_config
    from pipeline.data.prepare import PrepareOptions, prepare
    from pipeline.data.sources import open_source
    from pipeline.evaluate.results import layer_sweep
    from pipeline.evaluate.run import UNTRAINED, evaluate

    (tmp_path / "idx").mkdir()
    fashion_mnist_subset(tmp_path / "idx", 300, 100)
    url = str(tmp_path / "fmnist")
    prepare(open_source(str(tmp_path / "idx")), url,
            PrepareOptions(samples_per_shard=100, executor="local", progress=False,
                           val_fraction=0.25))  # fmt: skip
    config = write_config(
        tmp_path, url,
        model={"name": "igpt-micro", "image_size": 8, "vocab_size": 4, "causal": True},
        data={"palette": "grey", "palette_size": 4},
        train={"objective": "igpt-ar"},
        eval={"evaluators": ["linear_probe"], "layers": [0, 1], "grids": [0, 2], "final": True},
    )  # fmt: skip
    rows = evaluate(load_config(config), UNTRAINED, log=lambda *_: None)
    val = {r.layer: r for r in rows if r.evaluator == "linear_probe" and r.reported_on == "val"}
    assert set(val) == {"0", "0@2x2", "1", "1@2x2"}
    assert all(r.target == "fmnist:val" and r.baseline is not None for r in val.values())
    (chosen,) = [r for r in rows if r.evaluator == "linear_probe" and r.reported_on != "val"]
    best = max(val.values(), key=lambda r: r.value)
    assert chosen.layer == best.layer and chosen.extra["val_top1"] == best.value
    assert (chosen.target, chosen.reported_on) == ("fmnist:test", "test (final)")
    assert chosen.selected_on == "val (block, pooling); 10% of train (L2)"
    pixels = {(r.target, r.layer) for r in rows if r.evaluator == "pixels"}
    at_input = "model input (8 px, 4 colours)"
    assert pixels == {
        (t, layer) for t in ("fmnist:val", "fmnist:test") for layer in ("-", at_input)
    }
    # The sweep against depth (val), one curve per pooling, beside both pixel baselines.
    sweep = layer_sweep(read_rows(tmp_path / "run"))
    assert set(sweep) == {"fmnist:val"}
    curves = sweep["fmnist:val"]["curves"]
    assert set(curves) == {"igpt-micro (untrained)", "igpt-micro (untrained), 2x2 grid"}
    assert sorted(curves["igpt-micro (untrained)"]) == [(0, val["0"].value), (1, val["1"].value)]
    assert set(sweep["fmnist:val"]["pixels"]) == {
        "raw pixels, full resolution",
        f"raw pixels, {at_input}",
    }
    with Image.open(tmp_path / "run" / "layer_sweep.png") as picture:
        assert picture.size == (840, 400)
    seen = tmp_path / "run" / "eval" / "features" / "pixels"
    (at_input,) = [np.load(f) for f in seen.glob("fmnist-test-8-*/pixels.npy")]
    assert at_input.shape == (100, 64) and len(np.unique(at_input)) <= 4  # 4 greys, 8x8
    (full,) = [np.load(f) for f in seen.glob("fmnist-test-28/pixels.npy")]
    assert full.shape == (100, 784) and len(np.unique(full)) > 4


def test_layer_decay_scales_each_blocks_lr_from_the_top():
    model = create_model("vit-micro-p4")  # 2 blocks: embeddings 0, blocks 1-2, head 3
    groups = param_groups(model, 0.05, lr=1.0, layer_decay=0.5)
    lr_of = {}
    for g in groups:
        for p in g["params"]:
            lr_of[p] = g["lr"]
    named = dict(model.named_parameters())
    assert lr_of[named["head.weight"]] == 1.0
    assert lr_of[named["blocks.1.mlp.fc1.weight"]] == 0.5
    assert lr_of[named["blocks.0.attn.qkv.weight"]] == 0.25
    assert lr_of[named["pos_embed"]] == lr_of[named["patch_embed.weight"]] == 0.125
    assert all("lr" not in g for g in param_groups(model, 0.05))  # no decay: one lr for all
    hybrid = create_model("vit-micro-p4", stem=[8], patch_size=2)  # the stem embeds too
    lr_of = {
        p: g["lr"] for g in param_groups(hybrid, 0.05, lr=1.0, layer_decay=0.5) for p in g["params"]
    }
    assert lr_of[dict(hybrid.named_parameters())["stem.0.weight"]] == 0.125


def test_weights_of_another_size_do_not_fit():
    tiny, micro = model_config("vit-tiny-p4"), model_config("vit-micro-p4")
    assert "width 192 != 48" in weights_mismatch(tiny, micro)
    resized = model_config("vit-micro-p4", image_size=16, num_classes=3)
    assert weights_mismatch(micro, resized) == []  # resampled embeddings, a new head
    igpt = model_config("igpt-micro")
    assert weights_mismatch(igpt, model_config("igpt-micro", image_size=8)) == []  # resampled
    assert weights_mismatch(igpt, model_config("igpt-micro", vocab_size=16))  # another palette
    assert weights_mismatch(micro, igpt) == ["family vit != igpt"]


# -- which split is reported ----------------------------------------------------------------------


def test_evaluations_report_val_and_only_the_final_report_reads_test(tmp_path, digits_url):
    """Choices are made on val, so an evaluation reports val; --final (eval.final) reports test
    once, and says so; a target without val stops with what to do."""
    from conftest import fashion_mnist_subset

    from pipeline.config import load_config
    from pipeline.data.prepare import PrepareOptions, prepare
    from pipeline.data.sources import open_source
    from pipeline.errors import ConfigError
    from pipeline.evaluate.run import resolve_target

    (tmp_path / "idx").mkdir()
    fashion_mnist_subset(tmp_path / "idx", 60, 20)
    opts = PrepareOptions(samples_per_shard=50, executor="local", progress=False)
    prepare(open_source(str(tmp_path / "idx")), str(tmp_path / "plain"), opts)  # train, test
    prepare(open_source(str(tmp_path / "idx")), str(tmp_path / "carved"),
            PrepareOptions(**{**opts.__dict__, "val_fraction": 0.25}))  # fmt: skip
    config = write_config(tmp_path, digits_url)

    def target(url, *sets):
        return resolve_target(load_config(config, [f"eval.target={url}", *sets]))

    carved = target(tmp_path / "carved")
    assert (carved.test_split, carved.role) == ("val", "val") and len(carved.fingerprint) == 12
    final = target(tmp_path / "carved", "eval.final=true")
    assert (final.test_split, final.role) == ("test", "test (final)")
    assert final.fingerprint == carved.fingerprint != target(digits_url).fingerprint
    assert (
        target(digits_url, "eval.final=true").role == "val (final; the dataset has no test split)"
    )
    named = target(tmp_path / "plain", "eval.test_split=test")
    assert named.role == "test (named by eval.test_split)"
    with pytest.raises(
        ConfigError, match=r"plain has no val split, and evaluations report val unless --final"
    ):
        target(tmp_path / "plain")


# -- the results table -----------------------------------------------------------------------------


def test_results_rows_replace_their_own_key_and_the_table_lists_each(tmp_path):
    def row(evaluator, value, layer="-", source="ckpt-a"):
        return Row("vit-micro-p4", "/d/fmnist", 10, "digits:val", evaluator, layer, "top1", value,
                   0.9, source)  # fmt: skip

    append_rows(tmp_path, [row("linear_probe", 0.5, "1"), row("pixels", 0.9)])
    append_rows(tmp_path, [row("linear_probe", 0.6, "1"), row("knn", 0.7, "1", "ckpt-b")])
    rows = read_rows(tmp_path)
    assert len(rows) == 3
    assert [r.value for r in rows if r.evaluator == "linear_probe"] == [0.6]
    table = (tmp_path / "results.md").read_text()
    assert "| linear_probe | 1 | top1 | 60.00 | 90.00 |" in table
    assert "| pixels |" in table and "| knn |" in table and "fmnist" in table


@pytest.mark.parametrize("where", ["local", "s3"])
def test_results_appended_at_once_by_several_writers_lose_no_row(where, tmp_path, request):
    """An evaluate and a finetune stage of one run finishing together: with one file read,
    changed and written back, one writer's rows vanished. Each row is its own object now."""
    from concurrent.futures import ThreadPoolExecutor

    url = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket") + "/run"
    append_rows(url, [Row("vit-micro-p4", "", 1, "digits:val", "knn", "-", "top1", 0.1)])

    def writer(i):
        for j in range(2):
            row = Row("vit-micro-p4", "", 1, "digits:val", f"eval{i}", str(j), "top1", i + j / 10)
            append_rows(url, [row])

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(writer, range(4)))
    rows = read_rows(url)
    assert len(rows) == 1 + 4 * 2
    assert {(r.evaluator, r.layer) for r in rows} >= {(f"eval{i}", str(j)) for i in range(4)
                                                      for j in range(2)}  # fmt: skip
    append_rows(url, [])  # any later append brings the table files up to date
    table = json.loads(filesystem(url)[0].cat_file(filesystem(url)[1] + "/results.json"))
    assert len(table["rows"]) == 9


# -- end to end: pretrain, evaluate, finetune ------------------------------------------------------


def probes_of_an_export(config, export, layers=(0, -1)) -> dict:
    """`tessera evaluate` in this process on an export of any family: a linear probe and kNN of
    the blocks `layers` on the digits' val; returns {(evaluator, layer): top-1}."""
    from pipeline.config import load_config
    from pipeline.evaluate.run import evaluate

    sets = ["eval.evaluators=[linear_probe, knn]", f"eval.layers=[{', '.join(map(str, layers))}]"]
    rows = evaluate(load_config(config, sets), str(export), log=lambda *_: None)
    found = {(r.evaluator, r.layer): r.value for r in rows if r.evaluator != "pixels"}
    assert all(r.reported_on == "val" for r in rows)
    assert all(0.2 < v <= 1.0 for v in found.values()), found  # ten classes: chance is 0.1
    return found


def run_tessera(*args, check=True):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    proc = subprocess.run(
        [TESSERA, *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT, env=env
    )
    if check:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


EVAL = {
    "evaluators": ["linear_probe", "fewshot", "knn", "finetune", "pixels"],
    "layers": [0, 1],
    "shots": [1, 5],
    "seeds": 2,
    "finetune_steps": 60,
    "finetune": ["optim.lr=3e-3", "train.global_batch_size=64"],
}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, digits_url):
    """A tiny ViT pretrained for 40 steps on digits, and its export."""
    tmp = tmp_path_factory.mktemp("pretrained")
    config = write_config(tmp, digits_url, train={"steps": 40}, checkpoint={"every_steps": 20},
                          logging={"every_steps": 10}, eval=EVAL)  # fmt: skip
    finish(pretrain(config))
    run_export(tmp / "run", tmp / "export")
    return config, tmp / "run", tmp / "export"


@pytest.mark.slow
def test_evaluate_writes_every_evaluator_and_the_pixel_baseline(pretrained):
    config, run, _ = pretrained
    out = run_tessera("evaluate", config).stdout
    rows = read_rows(run)
    by = {(r.evaluator, r.layer, r.metric): r for r in rows}
    assert {("linear_probe", "0", "top1"), ("linear_probe", "1", "top1"), ("knn", "1", "top1"),
            ("fewshot", "1", "1-shot top1"), ("fewshot", "1", "5-shot top1"),
            ("finetune", "-", "top1"), ("pixels", "-", "top1")} <= set(by)  # fmt: skip
    pixels = by[("pixels", "-", "top1")].value
    assert pixels > 0.9  # logistic regression on 8x8 digits
    probe = by[("linear_probe", "1", "top1")]
    assert (probe.fitted_on, probe.selected_on, probe.reported_on) == (
        "train",
        "10% of train (L2)",
        "val",
    )
    assert len(probe.commit) == 12 and len(probe.dataset) == 12
    assert all(r.baseline is not None for r in rows)
    assert by[("linear_probe", "1", "top1")].baseline == pixels
    assert all(r.pretrain_steps == 40 and r.model == "vit-micro-p4" for r in rows)
    ft = by[("finetune", "-", "top1")]
    assert ft.value > ft.extra["initial_top1"] + 0.1  # 60 steps from a zero head
    table = (run / "results.md").read_text()
    for evaluator in EVAL["evaluators"]:
        assert f"| {evaluator} |" in table
    assert "results.md" in out and "| pixels |" in out
    events = list((run / "tensorboard" / "eval").glob("events.out.tfevents.*"))
    assert events
    # A second run reuses the extracted features (no "features" progress) and keeps one row each.
    again = run_tessera("evaluate", config, "--set", "eval.evaluators=[linear_probe]").stdout
    assert "features train" not in again
    assert len(read_rows(run)) == len(rows)


@pytest.mark.slow
def test_a_multi_label_target_gets_precision_at_1_and_mean_average_precision(pretrained, tmp_path):
    """A JSONL target with two labels an image (the digit and its parity): the linear probe and
    the raw-pixel baseline report precision@1 and mAP; few-shot and kNN refuse it by name."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from pipeline.data.prepare import PrepareOptions, prepare
    from pipeline.data.sources import open_source

    config, _, export = pretrained
    digits = load_digits()
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(600):
        pixels = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / "img" / f"{i}.png")
        d = int(digits.target[i])
        lines.append(
            json.dumps(
                {"image": f"img/{i}.png", "labels": [str(d), "even" if d % 2 == 0 else "odd"]}
            )
        )
    (tmp_path / "jft.jsonl").write_text("\n".join(lines))
    target = tmp_path / "jft"
    prepare(open_source(str(tmp_path / "jft.jsonl")), str(target), PrepareOptions(
        samples_per_shard=200, val_fraction=0.3, executor="local", progress=False))  # fmt: skip
    run = tmp_path / "run"
    sets = ["eval.evaluators=[linear_probe]", f"eval.target={target}", f"train.output={run}"]
    run_tessera("evaluate", config, "--model", export, *[a for s in sets for a in ("--set", s)])
    by = {(r.evaluator, r.layer, r.metric): r for r in read_rows(run)}
    assert {("linear_probe", "1", "precision_at_1"), ("linear_probe", "1", "mAP"),
            ("pixels", "-", "precision_at_1"), ("pixels", "-", "mAP")} <= set(by), sorted(by)  # fmt: skip
    assert all(0 <= r.value <= 1 and r.target == "jft:val" for r in by.values())
    assert by[("pixels", "-", "mAP")].value > 0.5  # 12 classes, 2 labels an image
    assert by[("linear_probe", "1", "mAP")].baseline == by[("pixels", "-", "mAP")].value
    refused = run_tessera("evaluate", config, "--model", export, "--set", f"eval.target={target}",
                          "--set", "eval.evaluators=[linear_probe, knn]", check=False)  # fmt: skip
    assert refused.returncode == 2 and "jft is multi-label; knn needs one label" in refused.stderr


@pytest.mark.slow
def test_transfer_targets_and_sample_limits(pretrained, tmp_path, digits_url):
    """eval.transfer evaluates more datasets in the same call; eval.train_samples and
    test_samples fit and report on the first N images of each split."""
    from pipeline.data.prepare import PrepareOptions, prepare
    from pipeline.data.sources import open_source

    config, _, export = pretrained
    other = tmp_path / "digits-b"
    opts = PrepareOptions(samples_per_shard=100, val_fraction=0.3, seed=1, executor="local",
                          progress=False)  # fmt: skip
    prepare(open_source("digits"), str(other), opts)
    run = tmp_path / "run"
    sets = ["eval.evaluators=[linear_probe, knn]", f"eval.transfer=[{other}]",
            "eval.train_samples=500", "eval.test_samples=100", f"train.output={run}"]  # fmt: skip
    args = [a for s in sets for a in ("--set", s)]
    run_tessera("evaluate", config, "--model", export, *args)
    by = {(r.target, r.evaluator) for r in read_rows(run)}
    for target in ("ds:val", "digits-b:val"):
        assert {(target, "linear_probe"), (target, "knn"), (target, "pixels")} <= by
    metas = {p.parent.name: json.loads(p.read_text()) for p in run.rglob("meta.json")}
    assert metas["digits-b-train"]["samples"] == 500 and metas["digits-b-val"]["samples"] == 100
    assert metas["ds-train"]["samples"] == 500 and metas["ds-val"]["samples"] == 100
    assert metas["digits-b-train-8"]["samples"] == 500  # the pixel baseline: the same images
    # Pixel baselines are fitted once per run folder: a second source (here the untrained
    # network) reads them back instead of fitting them again.
    saved = run / "eval" / "features" / "pixels" / "baselines.json"
    fits = json.loads(saved.read_text())
    assert len(fits) == 4  # linear_probe and knn, on two targets
    saved.write_text(json.dumps({k: 0.125 for k in fits}))
    run_tessera("evaluate", config, "--model", "untrained", *args)
    untrained = [r for r in read_rows(run) if r.source == "untrained"]
    assert len(untrained) == 8 and all(r.baseline == 0.125 for r in untrained)

    proc = run_tessera("evaluate", config, "--model", export, "--set",
                       f"eval.transfer=[{digits_url}, {tmp_path / 'nope'}]", check=False)  # fmt: skip
    assert proc.returncode == 2 and "eval.transfer[1]" in proc.stderr and "nope" in proc.stderr


@pytest.mark.slow
def test_finetune_from_an_export_improves_over_its_start(pretrained, tmp_path, digits_url):
    _, _, export = pretrained
    config = write_config(tmp_path, digits_url, train={"steps": 60, "global_batch_size": 64},
                          optim={"lr": 3e-3, "layer_decay": 0.75, "warmup_steps": 6},
                          finetune={"init": str(export)}, checkpoint={"every_steps": 60})  # fmt: skip
    out = run_tessera("finetune", config).stdout
    before = float(out.split("before finetuning: ")[1].split("%")[0])
    after = float(out.split("after 60 steps: ")[1].split("%")[0])
    assert after > before + 10, out[-2000:]
    (row,) = read_rows(tmp_path / "run")
    assert row.evaluator == "finetune" and row.value == pytest.approx(after / 100, abs=1e-4)
    assert row.pretrain_steps == 40


@pytest.mark.slow
def test_keep_head_starts_from_the_pretrained_classifier(pretrained, tmp_path, digits_url):
    """The same labels (e.g. sigmoid pretraining, softmax finetuning): the pretrained head is
    kept instead of a zero one, so the finetune starts where pretraining ended."""
    from safetensors.torch import load_file

    _, _, export = pretrained
    heads = {}
    for keep in (True, False):
        folder = tmp_path / str(keep)
        folder.mkdir()
        config = write_config(folder, digits_url, train={"steps": 2, "global_batch_size": 64},
                              optim={"lr": 1e-12, "warmup_steps": 1},  # weights stay as loaded
                              finetune={"init": str(export), "keep_head": keep},
                              checkpoint={"every_steps": 2})  # fmt: skip
        out = run_tessera("finetune", config).stdout
        assert ("its head kept" in out) == keep, out[-2000:]
        run_export(folder / "run", folder / "export")
        heads[keep] = load_file(folder / "export" / "model.safetensors")["head.weight"]
    pretrained_head = load_file(export / "model.safetensors")["head.weight"]
    assert pretrained_head.abs().sum() > 0
    assert torch.allclose(
        heads[True].float(), pretrained_head.float(), rtol=1e-2, atol=1e-4
    )  # bf16
    assert heads[False].abs().max() < 1e-9  # the ViT paper's zero head (moved by lr 1e-12 only)


@pytest.mark.slow
def test_finetune_at_another_resolution_resamples_the_position_embeddings(
    pretrained, tmp_path, digits_url
):
    from pipeline.models import load_model
    from pipeline.models.posembed import resample_pos_embed

    _, _, export = pretrained
    config = write_config(tmp_path, digits_url, train={"steps": 1}, optim={"lr": 1e-9, "warmup_steps": 0},
                          model={"name": "vit-micro-p4", "image_size": 24, "channels": 1,
                                 "num_classes": 10}, finetune={"init": str(export)})  # fmt: skip
    run_tessera("finetune", config)
    run_export(tmp_path / "run", tmp_path / "after")
    before = load_model(str(export)).pos_embed.detach()  # 1 + 4x4 positions
    after = load_model(str(tmp_path / "after")).pos_embed.detach()  # 1 + 6x6 positions
    assert before.shape[1] == 17 and after.shape[1] == 37
    expected = resample_pos_embed(before, (6, 6))
    torch.testing.assert_close(after, expected, atol=2e-2 * expected.abs().max().item(), rtol=0)


@pytest.mark.slow
def test_zero3_on_two_ranks_starts_from_the_exported_weights(pretrained, tmp_path, digits_url):
    """Under ZeRO-3 each rank holds a shard; the loaded weights must still be the export's."""
    from pipeline.models import load_model

    _, _, export = pretrained
    config = write_config(tmp_path, digits_url, train={"steps": 1}, optim={"lr": 1e-9, "warmup_steps": 0},
                          deepspeed={"zero_stage": 3}, finetune={"init": str(export)})  # fmt: skip
    out = finish(pretrain(config, ranks=2, command="finetune"))
    assert "initialised from" in out
    run_export(tmp_path / "run", tmp_path / "after")
    start, after = (
        load_model(str(export)).state_dict(),
        load_model(str(tmp_path / "after")).state_dict(),
    )
    for key, value in start.items():
        if key.startswith("head."):
            continue
        # bf16 engines keep fp32 masters made from bf16 copies: equal to bf16 precision.
        torch.testing.assert_close(
            after[key], value, atol=1e-2 * value.abs().max().item() + 1e-6, rtol=0
        )
    assert float(after["head.weight"].abs().max()) < 1e-6  # the new head starts at zero


@pytest.mark.slow
def test_watch_evaluates_checkpoints_of_an_s3_run_as_training_writes_them(
    tmp_path, digits_url, s3_bucket
):
    """The watcher runs as on another machine (its own staging folder): it downloads each
    complete checkpoint into a folder of its own and removes it once evaluated. (On a
    filesystem: the local job test's job.eval_every_checkpoint.)"""
    run_url = f"{s3_bucket}/runs/watched"
    config = write_config(tmp_path, digits_url, train={"steps": 8, "output": run_url},
                          checkpoint={"every_steps": 4, "keep_last": 1},
                          eval={"evaluators": ["knn"], "layers": [-1]})  # fmt: skip
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
           "TESSERA_STAGING": str(tmp_path / "watcher")}  # fmt: skip
    watcher = subprocess.Popen(
        [TESSERA, "evaluate", str(config), "--watch", "--poll", "0.5", "--idle-timeout", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        finish(pretrain(config, env={"TESSERA_STAGING": str(tmp_path / "trainer")}))
        out, _ = watcher.communicate(timeout=TIMEOUT)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, out[-3000:]
    assert "evaluated the final checkpoint step-0000008; done watching" in out
    rows = read_rows(run_url)
    assert {r.source.rsplit("/", 1)[-1] for r in rows} >= {"step-0000008"}
    assert {r.pretrain_steps for r in rows} <= {4, 8}
    assert all(r.target.endswith(":val") and r.reported_on == "val" for r in rows)  # not final
    assert not list((tmp_path / "watcher").rglob("mp_rank_*")), "a pulled copy was kept"
    assert filesystem(run_url)[0].glob(f"{run_url}/tensorboard/eval/events.out.tfevents.*")


@pytest.mark.slow
def test_two_ranks_extract_features_together_as_one_process_does_and_resume_after_kills(
    pretrained, tmp_path
):
    """`tessera evaluate` under the deepspeed launcher: each rank extracts its share of the
    stream, rank 0 gathers and writes each image's features at its place, fits and reports;
    the features and the table's numbers are those of one process. Untidy: rank 1 killed in
    the middle of an extraction, then rank 0 while it records the progress; the next launch
    resumes, and every feature array is byte for byte the uninterrupted one."""
    import random

    from test_train import ranks_with_a_kill

    from pipeline.evaluate import features

    config, _, export = pretrained
    rows, arrays = {}, {}

    def args(out):
        sets = [f"train.output={out}", "eval.evaluators=[linear_probe, knn]", "eval.layers=[1]",
                "eval.batch_size=96"]  # fmt: skip
        return ["--model", export, *[a for x in sets for a in ("--set", x)]]

    def read(name, out):
        rows[name] = {(r.evaluator, r.metric): r.value for r in read_rows(out)}
        arrays[name] = {p.relative_to(out): np.load(p) for p in sorted(out.rglob("*.npy"))}

    for ranks in (1, 2):
        out = tmp_path / f"ranks{ranks}"
        log = finish(pretrain(config, *args(out), ranks=ranks, command="evaluate"))
        assert log.count("linear_probe layer 1 top1") == 1, log[-3000:]  # rank 0 reports
        read(ranks, out)
    assert set(rows[2]) == {("linear_probe", "top1"), ("knn", "top1"), ("pixels", "top1")}
    assert rows[2] == rows[1]
    assert arrays[2].keys() == arrays[1].keys() and len(arrays[1]) >= 4  # layer1 and labels
    for name, a in arrays[1].items():
        np.testing.assert_array_equal(arrays[2][name], a, err_msg=str(name))

    out, rng = tmp_path / "killed", random.Random(20261207)
    for point, rank, nth in (("extract", 1, rng.randint(3, 6)), ("commit", 0, rng.randint(2, 4))):
        proc, log = ranks_with_a_kill(config, point, rank, nth, *args(out))
        print(f"kill {point} rank {rank} #{nth}:", *re.findall(r"KILL .*|.*resuming at.*", log))
        assert proc.returncode != 0 and f"KILL {point} rank {rank}" in log, log[-3000:]
        assert "linear_probe layer 1 top1" not in log
        if point == "commit":  # the record of the kill before was resumed from
            assert re.search(r"features \w+: resuming at [1-9]\d*/", log), log[-3000:]
    log = finish(pretrain(config, *args(out), ranks=2, command="evaluate"))
    assert "resuming at" in log, log[-3000:]
    read("killed", out)
    assert rows["killed"] == rows[1]
    assert arrays["killed"].keys() == arrays[1].keys()  # no progress array left behind
    assert not list(out.rglob(features.PROGRESS)) and not list(out.rglob(f".{features.PROGRESS}*"))
    for name, a in arrays[1].items():
        assert arrays["killed"][name].tobytes() == a.tobytes(), name


@pytest.mark.slow
def test_imagegpt_layer_sweep_finetune_and_the_untrained_baseline(tmp_path, digits_url):
    config = write_config(
        tmp_path, digits_url,
        model={"name": "igpt-micro", "image_size": 8, "vocab_size": 16, "causal": True},
        data={"palette": "grey", "palette_size": 16},
        train={"objective": "igpt-ar", "steps": 30},
        optim={"lr": 3e-3, "schedule": "constant"},
        checkpoint={"every_steps": 30},
        eval={"evaluators": ["linear_probe", "finetune"], "layers": [0, 1], "finetune_steps": 10,
              "finetune": ["finetune.generative_weight=0.5"]},  # with the paper's L_GEN
    )  # fmt: skip
    finish(pretrain(config))
    done = run_tessera("evaluate", config)
    trained_out = done.stdout + done.stderr
    assert re.search(r"classification_loss [0-9.]+ bits_per_dim [0-9.]+", trained_out), trained_out[
        -2000:
    ]
    out = run_tessera("evaluate", config, "--model", "untrained").stdout
    rows = read_rows(tmp_path / "run")
    trained = {(r.evaluator, r.layer) for r in rows if r.pretrain_steps == 30}
    untrained = {(r.evaluator, r.layer) for r in rows if r.source == "untrained"}
    expected = {("linear_probe", "0"), ("linear_probe", "1"), ("finetune", "-"), ("pixels", "-")}
    expected.add(("pixels", "model input (8 px, 16 colours)"))
    assert trained == untrained == expected
    assert all(0 <= r.value <= 1 for r in rows)
    assert "igpt-micro (untrained)" in out


# -- errors before any work ------------------------------------------------------------------------


@pytest.mark.slow
def test_bad_evaluations_fail_before_computing_anything(pretrained, tmp_path, digits_url):
    config, run, export = pretrained
    features = run / "eval" / "features"

    def fails(cfg, *args):
        proc = run_tessera("evaluate", cfg, *args, check=False)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        return proc.stderr

    before = sorted(p.name for p in features.glob("*")) if features.exists() else []
    assert "layer 5 is out of range" in fails(config, "--set", "eval.layers=[5]")
    other = write_config(tmp_path, digits_url, name="tiny.yaml",
                         model={"name": "vit-tiny-p4", "image_size": 16, "channels": 1,
                                "num_classes": 10}, eval=EVAL)  # fmt: skip
    err = fails(other, "--model", export)
    assert "vit-micro-p4" in err and "width 48 != 192" in err
    assert "no split 'nope'" in fails(config, "--set", "eval.test_split=nope")
    after = sorted(p.name for p in features.glob("*")) if features.exists() else []
    assert before == after

    # An evaluator that fails after others finished keeps their rows.
    err = fails(config, "--set", "eval.evaluators=[knn, fewshot]", "--set", "eval.shots=[500]",
                "--set", "eval.knn_k=3")  # fmt: skip
    assert "fewshot on" in err and "have fewer" in err
    assert any(r.evaluator == "knn" and r.extra.get("k") == 3 for r in read_rows(run))

    wrong = write_config(tmp_path, digits_url, name="ft.yaml", finetune={"init": str(export)},
                         model={"name": "vit-micro-p4", "image_size": 16, "channels": 1,
                                "num_classes": 7})  # fmt: skip
    proc = run_tessera("finetune", wrong, check=False)
    assert (
        proc.returncode == 2
        and "model.num_classes is 7" in proc.stderr
        and "10 classes" in proc.stderr
    )
    assert not (tmp_path / "run").exists()
    sized = write_config(tmp_path, digits_url, name="ft2.yaml", finetune={"init": str(export)},
                         model={"name": "vit-tiny-p4", "image_size": 16, "channels": 1,
                                "num_classes": 10})  # fmt: skip
    proc = run_tessera("finetune", sized, check=False)
    assert (
        proc.returncode == 2 and "finetune.init" in proc.stderr and "width 48 != 192" in proc.stderr
    )
