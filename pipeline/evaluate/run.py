"""`tessera evaluate CONFIG`: a checkpoint or exported model -> the numbers a paper reports.

    eval:
      evaluators: [linear_probe, fewshot, knn, finetune, pixels]
      target: runs/data/fashion-mnist # empty: the pretraining data
      transfer: [runs/data/digits]    # more datasets, evaluated the same way (transfer)
      layers: [1, 2, 3]               # blocks to probe (a sweep); empty: the last
      concat_layers: true             # and all of them side by side: layer "1+2+3"
      shots: [1, 5, 10, 25]
      train_samples: 10000            # fit on the first N training images (0: all)

Each evaluator is a function `(Context) -> Iterator[Measurement]`: it asks the context for
features (extracted once per layer and split, streamed to disk, shared by every evaluator) and
yields metrics. The raw-pixel baseline is always computed: its own row, and beside every other
row the same evaluator run on pixels. Rows go to the run folder's results.json / results.md and to
TensorBoard (run `eval`).

Every check that can fail (weights of another size, a layer out of range, a target without the
splits or with another class count) runs before any feature is computed.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch

from pipeline import runs
from pipeline.config import RunConfig, config_to_raw, parse_config
from pipeline.data.shards import DatasetError, load_manifest
from pipeline.data.stream import StreamConfig, stream_config
from pipeline.errors import ConfigError
from pipeline.evaluate import probes
from pipeline.evaluate.features import (
    FeatureSet,
    extract,
    feature_name,
    feature_names,
    model_extractor,
    palette_pixel_extractor,
    pixel_extractor,
)
from pipeline.evaluate.results import Row, append_rows, read_rows, write_layer_sweep
from pipeline.storage import basename, join, write_atomic
from pipeline.train import checkpoint
from pipeline.train.export import Weights, read_weights_for

PIXEL_SIDE = 32  # the raw-pixel baseline sees images at most this many pixels a side


@dataclass(frozen=True)
class Target:
    url: str
    train_split: str
    test_split: str
    classes: int
    channels: int
    pixel_side: int  # the raw-pixel baseline's image side: native, at most PIXEL_SIDE
    endpoint_url: str = ""
    multi_label: bool = False  # probes report precision@1 and mAP; few-shot and kNN refuse it
    role: str = ""  # how results.md shows the reported split: "val", "test (final)", ...
    fingerprint: str = ""  # data_fingerprint of the target
    # A final report's split for choices: where several probes (blocks, poolings) compete, each
    # is scored here and test is read for the one chosen alone; "" where there is none.
    choose_split: str = ""

    @property
    def name(self) -> str:
        return basename(self.url)


def resolve_target(run: RunConfig, key: str = "eval.target") -> Target:
    """eval.target (or the pretraining data) with its splits checked; a multi-label target
    only with evaluators that score several labels. Errors name `key`, the config entry the
    dataset came from."""
    url = run.eval.target or run.data.url
    try:
        manifest = load_manifest(url, run.data.endpoint_url)
    except DatasetError as e:
        raise ConfigError(f"{key}: {e}") from None
    single = sorted(set(run.eval.evaluators) & SINGLE_LABEL)
    if manifest.multi_label and single:
        raise ConfigError(
            f"{key}: {url} is multi-label; {', '.join(single)} "
            f"{'needs' if len(single) == 1 else 'need'} one label per image "
            "(linear_probe reports precision@1 and mean average precision on it)"
        )
    test, role = report_split(run, manifest.splits, url, key)
    for key, split in (("eval.train_split", run.eval.train_split), ("eval.test_split", test)):
        if split not in manifest.splits:
            raise ConfigError(
                f"{key}: {url} has no split {split!r}; it has {', '.join(manifest.splits)}"
            )
    side = min(manifest.image_size[0] if manifest.image_size else PIXEL_SIDE, PIXEL_SIDE)
    choose = "val" if role == "test (final)" and "val" in manifest.splits else ""
    return Target(
        url, run.eval.train_split, test, len(manifest.classes), manifest.channels, side,
        run.data.endpoint_url, manifest.multi_label, role, data_fingerprint(manifest),
        "" if choose == run.eval.train_split else choose,
    )  # fmt: skip


def report_split(run: RunConfig, splits: dict, url: str, key: str) -> tuple[str, str]:
    """(the split reported, its role as results.md shows it). Choices are made on val, so an
    evaluation reports val; `eval.final` (`--final`) reports test, once, for the paper."""
    if run.eval.test_split:
        return run.eval.test_split, f"{run.eval.test_split} (named by eval.test_split)"
    if run.eval.final:
        if "test" in splits:
            return "test", "test (final)"
        return "val", "val (final; the dataset has no test split)"
    if "val" not in splits:
        raise ConfigError(
            f"{key}: {url} has no val split, and evaluations report val unless --final: carve "
            "one with `tessera prepare --val-fraction`, or make the final report with --final "
            "(eval.final: true)"
        )
    return "val", "val"


def data_fingerprint(manifest) -> str:
    """The dataset's identity for results: its shards' sha256 digests (12 hex digits)."""
    h = hashlib.sha256()
    for name, split in sorted(manifest.splits.items()):
        for shard in split.shards:
            h.update(f"{name}:{shard.name}:{shard.sha256 or shard.bytes};".encode())
    return h.hexdigest()[:12]


@functools.cache
def code_commit() -> str:
    """The git commit of the code that evaluated, "+dirty" when tracked files differ from it,
    for results rows: $TESSERA_COMMIT where the code travelled without its .git (a Ray job's
    working directory; launch/ray-submit.sh sets it), else the checkout's; "" outside one."""
    if os.environ.get("TESSERA_COMMIT"):
        return os.environ["TESSERA_COMMIT"]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                timeout=10,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    rev = git("rev-parse", "--short=12", "HEAD")
    if not rev:
        return ""
    return rev + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def weights_fingerprint(weights: Weights) -> str:
    h = hashlib.sha256()
    for k in sorted(weights.state):
        v = weights.state[k]
        h.update(f"{k}:{tuple(v.shape)}:{float(v.float().sum()):.6e};".encode())
    return h.hexdigest()[:16]


@dataclass
class Measurement:
    evaluator: str
    layer: str  # block index or "-"
    metric: str
    value: float
    baseline: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    split: str = ""  # the split reported, where not the target's (a choice's candidates on val)
    chosen_on: str = ""  # the split its block and pooling were chosen on, if they were


class Context:
    """What evaluators share: the model, the target, cached features and pixel baselines."""

    def __init__(
        self, run: RunConfig, weights: Weights, target: Target, log=print, comm=None
    ) -> None:
        self.run, self.weights, self.target, self.log = run, weights, target, log
        self.comm = comm  # several ranks extract features together (`prefetch`)
        self.model = weights.build().eval()
        try:
            self.layers = self.model.resolve_layers(run.eval.layers or [-1])
        except IndexError as e:
            raise ConfigError(f"eval.layers: {e}") from None
        if comm is not None:
            self.device = comm.device
        else:
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.fingerprint = weights_fingerprint(weights)
        self.cache = runs.local_dir(run.train.output) / "eval" / "features"
        self._features: dict[str, FeatureSet] = {}
        self._baselines: dict[tuple[str, str], float] = {}
        self.finetune_run = None
        if "finetune" in run.eval.evaluators:
            self.finetune_run = finetune_config(
                run, "" if weights.source == UNTRAINED else weights.source, target,
                output=join(run.train.output, "finetune", f"{target.name}-{self.fingerprint}"),
                steps=run.eval.finetune_steps, source="eval.finetune",
                overrides=["data.ingest=stream", *run.eval.finetune],  # runs in this process
            )  # fmt: skip

    def _stream(self, split: str, **changes: Any) -> StreamConfig:
        cfg = self.weights.config
        base = stream_config(self.run, split, self.run.eval.batch_size, train=False)
        changes.setdefault("image_size", cfg.image_size)
        if cfg.family != "igpt":  # models of pixels (ImageGPT's tokens take the data's)
            changes.setdefault("channels", cfg.channels)
        return dataclasses.replace(
            base, url=self.target.url, endpoint_url=self.target.endpoint_url, labels=True,
            augment=False, **changes,
        )  # fmt: skip

    def _split(self, split: str) -> FeatureSet:
        if split not in self._features:
            grids = self.run.eval.grids
            folder = self.cache / self.fingerprint / f"{self.target.name}-{split}"
            fn = model_extractor(self.model, self.layers, self.device, grids)
            self._features[split] = extract(
                fn, feature_names(self.layers, grids), self._stream(split), folder, self.fingerprint, self.log,
                self._limit(split), self.comm,
            )  # fmt: skip
        return self._features[split]

    def prefetch(self) -> None:
        """The model's features of every split evaluators read, extracted by every rank of
        `comm` together (on rank 0 afterwards; the evaluators then find them). Pixels are rank
        0's alone."""
        if {"linear_probe", "fewshot", "knn"} & set(self.run.eval.evaluators):
            t = self.target
            for split in dict.fromkeys([t.train_split, t.test_split, t.choose_split]):
                if split:
                    self._split(split)

    def on_split(self, split: str) -> Context:
        """This context reporting `split` instead (sharing the model and extracted features)."""
        other = copy.copy(self)
        other.target = dataclasses.replace(self.target, test_split=split, role=split)
        other._baselines = {}
        return other

    def _limit(self, split: str) -> int:
        cfg = self.run.eval
        return cfg.train_samples if split == self.target.train_split else cfg.test_samples

    def features(self, layer: int, grid: int = 0) -> tuple[tuple, tuple]:
        """((x_train, y_train), (x_test, y_test)) of one block under one pooling."""
        name = feature_name(layer, grid)
        return self._split(self.target.train_split)[name], self._split(self.target.test_split)[name]

    @functools.cached_property
    def input_pixels(self) -> str:
        """How the model sees pixels where that differs from the full-resolution baseline (an
        ImageGPT's palette colours at its own side), for a second baseline; "" otherwise."""
        if self.weights.config.family != "igpt":
            return ""
        palette = self._stream(self.target.train_split).palette
        return f"model input ({self.weights.config.image_size} px, {palette.size} colours)"

    def pixels(self, at_input: bool = False) -> tuple[tuple, tuple]:
        """Raw pixels of both splits in [0, 1]: at full resolution (at most PIXEL_SIDE a side),
        or (at_input) as the model sees them: an ImageGPT's palette colours at its side."""
        out = []
        for split in (self.target.train_split, self.target.test_split):
            key = f"pixels-{split}-{'input' if at_input else 'full'}"
            if key not in self._features:
                if at_input:
                    cfg = self._stream(split)
                    colours = cfg.palette.colours.numpy().tobytes()
                    tag = f"{cfg.image_size}-{hashlib.sha256(colours).hexdigest()[:12]}"
                    fn = palette_pixel_extractor(cfg.palette)
                else:
                    side = self.target.pixel_side
                    cfg = self._stream(
                        split, image_size=side, channels=self.target.channels, palette=None
                    )
                    tag, fn = str(side), pixel_extractor
                folder = self.cache / "pixels" / f"{self.target.name}-{split}-{tag}"
                self._features[key] = extract(
                    fn, ["pixels"], cfg, folder, f"pixels-{tag}", self.log, self._limit(split)
                )
            out.append(self._features[key]["pixels"])
        return out[0], out[1]

    def baseline(self, evaluator: str, metric: str, compute: Callable[[], float]) -> float:
        """A raw-pixel baseline, computed once per run folder and target: the trained and the
        untrained network (and every re-run) share it. The key holds every setting it depends on."""
        if (evaluator, metric) not in self._baselines:
            cfg, t = self.run.eval, self.target
            key = json.dumps([
                evaluator, metric, t.url, t.train_split, t.test_split, t.pixel_side, cfg.holdout,
                cfg.knn_k, cfg.shots, cfg.seeds, cfg.train_samples, cfg.test_samples,
            ] + ([] if not evaluator.endswith("@input") else [self.input_pixels]))  # fmt: skip
            path = self.cache / "pixels" / "baselines.json"
            saved = json.loads(path.read_text()) if path.is_file() else {}
            if key not in saved:
                saved[key] = compute()
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(fsspec.filesystem("file"), str(path), json.dumps(saved).encode())
            self._baselines[(evaluator, metric)] = saved[key]
        return self._baselines[(evaluator, metric)]

    @property
    def choice_metric(self) -> str:
        """The score choices are made by: top-1, or precision@1 on a multi-label target."""
        return "precision_at_1" if self.target.multi_label else "top1"

    def pixel_probe(self, metric: str = "top1", at_input: bool = False) -> float:
        """The linear probe on raw pixels (at full resolution, or as the model sees them): top-1,
        or (a multi-label target) precision_at_1 or mAP."""

        def compute() -> float:
            train, test = self.pixels(at_input)
            return self.probe(train, test)[0][metric]

        return self.baseline("linear_probe" + ("@input" if at_input else ""), metric, compute)

    def fit_probe(self, train: tuple) -> probes.LinearProbe:
        """This target's linear probe fitted on train: it scores {"top1"}, or (multi-label)
        {"precision_at_1", "mAP"}."""
        target = self.target
        return probes.fit_probe(train, target.classes, target.multi_label, self.run.eval.holdout)

    def probe(self, train: tuple, test: tuple) -> tuple[dict[str, float], dict]:
        """The linear probe fitted on train: its scores on test, and its info."""
        fitted = self.fit_probe(train)
        return fitted.score(test), fitted.info


# ---------------------------------------------------------------------------------------------
# Evaluators


def layer_label(layers: str, grid: int) -> str:
    """A results row's layer: "3" (the model's pooling), "3@4x4" (pooled on a 4x4 grid)."""
    return layers if grid == 0 else f"{layers}@{grid}x{grid}"


def linear_probe(ctx: Context) -> Iterator[Measurement]:
    """iGPT's linear probe, on every block in eval.layers under every pooling in eval.grids, and
    (eval.concat_layers) on all the blocks concatenated (layer "1+2+3"; the iGPT paper also
    concatenates layers for its best probe).

    A final report with a val split beside test scores every candidate on val and reads test
    for the one with the best val score alone, so the number quoted was not chosen on test."""
    cfg = ctx.run.eval
    candidates = [(str(i), [i], k) for i in ctx.layers for k in cfg.grids]
    if cfg.concat_layers and len(ctx.layers) > 1:
        joined = "+".join(map(str, ctx.layers))
        candidates += [(joined, ctx.layers, k) for k in cfg.grids]

    def features(on: Context, blocks: list[int], grid: int, j: int) -> tuple:
        """(x, y) of train (j=0) or the reported split (j=1): one block memory-mapped (read in
        chunks by the probe), or several side by side in memory (eval.concat_layers)."""
        parts = [on.features(i, grid)[j] for i in blocks]
        return (
            parts[0] if len(parts) == 1 else (np.concatenate([x for x, _ in parts], 1), parts[0][1])
        )

    choose = ctx.target.choose_split
    if not choose or len(candidates) == 1:
        for name, blocks, grid in candidates:
            scores, info = ctx.probe(features(ctx, blocks, grid, 0), features(ctx, blocks, grid, 1))
            for metric, value in scores.items():
                label = layer_label(name, grid)
                yield Measurement(
                    "linear_probe", label, metric, value, ctx.pixel_probe(metric), info
                )
        return
    # Each candidate fitted once, on train, and scored on val; the chosen one's fit on test.
    on_val, best, chosen, kept = ctx.on_split(choose), -1.0, candidates[0], None
    for name, blocks, grid in candidates:
        fitted = ctx.fit_probe(features(on_val, blocks, grid, 0))
        scores = fitted.score(features(on_val, blocks, grid, 1))
        for metric, value in scores.items():
            label, base = layer_label(name, grid), on_val.pixel_probe(metric)
            yield Measurement("linear_probe", label, metric, value, base, fitted.info, split=choose)
        if scores[ctx.choice_metric] > best:
            best, chosen, kept = scores[ctx.choice_metric], (name, blocks, grid), fitted
    name, blocks, grid = chosen
    scores = kept.score(features(ctx, blocks, grid, 1))
    info = {**kept.info, f"{choose}_{ctx.choice_metric}": best}
    for metric, value in scores.items():
        label = layer_label(name, grid)
        yield Measurement(
            "linear_probe", label, metric, value, ctx.pixel_probe(metric), info, chosen_on=choose
        )  # fmt: skip


def fewshot(ctx: Context) -> Iterator[Measurement]:
    """big_vision's few-shot ridge regression on the last block asked for."""
    layer, cfg = ctx.layers[-1], ctx.run.eval
    grid = cfg.grids[0]
    train, test = ctx.features(layer, grid)
    scores = probes.fewshot(train, test, ctx.target.classes, cfg.shots, cfg.seeds)
    pixel_scores: dict[int, list[float]] = {}
    for k, accs in scores.items():

        def compute(k: int = k) -> float:
            if not pixel_scores:
                px_train, px_test = ctx.pixels()
                pixel_scores.update(
                    probes.fewshot(px_train, px_test, ctx.target.classes, cfg.shots, cfg.seeds)
                )
            return float(np.mean(pixel_scores[k]))

        base = ctx.baseline("fewshot", f"{k}-shot top1", compute)
        extra = {"std": float(np.std(accs)), "seeds": len(accs)}
        yield Measurement(
            "fewshot", layer_label(str(layer), grid), f"{k}-shot top1", float(np.mean(accs)),
            base, extra,
        )  # fmt: skip


def knn(ctx: Context) -> Iterator[Measurement]:
    layer, k, grid = ctx.layers[-1], ctx.run.eval.knn_k, ctx.run.eval.grids[0]
    train, test = ctx.features(layer, grid)
    top1 = probes.knn(train, test, ctx.target.classes, k)

    def compute() -> float:
        px_train, px_test = ctx.pixels()
        return probes.knn(px_train, px_test, ctx.target.classes, k)

    label = layer_label(str(layer), grid)
    yield Measurement("knn", label, "top1", top1, ctx.baseline("knn", "top1", compute), {"k": k})


def pixels(ctx: Context) -> Iterator[Measurement]:
    """The same logistic regression on raw pixels: what pretraining has to beat, at full
    resolution, and for an ImageGPT also as it sees them (its side and palette)."""
    choose = ctx.target.choose_split
    metrics = ("precision_at_1", "mAP") if ctx.target.multi_label else ("top1",)
    for on, split in ((ctx.on_split(choose), choose), (ctx, "")) if choose else ((ctx, ""),):
        for metric in metrics:  # beside probes chosen on val, the baselines on val too
            value = on.pixel_probe(metric)
            yield Measurement("pixels", "-", metric, value, value, split=split)
            if on.input_pixels:
                at_input = on.pixel_probe(metric, at_input=True)
                yield Measurement("pixels", on.input_pixels, metric, at_input, value, split=split)


def finetune(ctx: Context) -> Iterator[Measurement]:
    """Transfer by finetuning the whole network (`tessera finetune`) on the target."""
    from pipeline.train.finetune import finetune as run_finetune

    result = run_finetune(ctx.finetune_run, log=ctx.log, scratch=True)  # Preempted: stops here
    extra = {"steps": result["step"], "initial_top1": result["initial_top1"]}
    metric = "precision_at_1" if ctx.target.multi_label else "top1"  # the top class is a label
    yield Measurement("finetune", "-", metric, result["top1"], ctx.pixel_probe(metric), extra)


SINGLE_LABEL = {"fewshot", "knn"}  # evaluators that need one label per image

EVALUATORS: dict[str, Callable[[Context], Iterator[Measurement]]] = {
    "linear_probe": linear_probe,
    "fewshot": fewshot,
    "knn": knn,
    "pixels": pixels,
    "finetune": finetune,
}


def finetune_config(
    run: RunConfig, init: str, target: Target, output: str, steps: int,
    overrides: Sequence[str] = (), source: str = "finetune",
) -> RunConfig:  # fmt: skip
    """A finetuning run: the pretraining run's model, engine and data settings on the target,
    from `init` (empty: from scratch), writing to `output`, with `overrides` (KEY=VALUE) last;
    errors in them name `source`."""
    raw = config_to_raw(run)
    raw["model"]["num_classes"] = target.classes
    raw["train"].update(objective="supervised", steps=steps, output=output)
    raw["data"].update(url=target.url, train_split=target.train_split, val_split=target.test_split)
    if run.model.family == "igpt" and run.data.palette == "kmeans":  # the pretraining palette
        manifest = load_manifest(run.data.url, run.data.endpoint_url)
        raw["data"]["palette"] = join(run.data.url, manifest.palette)
    raw["optim"]["warmup_steps"] = steps // 10
    raw["checkpoint"].update(every_steps=steps, keep_last=1)
    raw["eval"], raw["prepare"] = {}, []
    raw["finetune"] = {"init": init, "head_init": 0.0}
    return parse_config(raw, source=source, overrides=overrides)


# ---------------------------------------------------------------------------------------------
# Jobs


UNTRAINED = "untrained"


def untrained_weights(run: RunConfig) -> Weights:
    """The run's model at its seeded initialisation: what pretraining is measured against."""
    from pipeline.models import create_model

    torch.manual_seed(run.train.seed)
    model = create_model(run.model)
    provenance = {"model": f"{run.model.name} (untrained)", "data": "", "step": 0}
    return Weights(run.model, model.state_dict(), UNTRAINED, provenance)


def _source_of(run: RunConfig, source: str) -> str:
    if source:
        return source
    found = runs.latest_checkpoint(run.train.output, run.data.endpoint_url)
    if found is None:
        raise ConfigError(
            f"train.output: {run.train.output} has no complete checkpoint to evaluate; pass "
            "--model with an exported model, a checkpoint or a run folder"
        )
    return str(runs.pull_checkpoint(run.train.output, found, run.data.endpoint_url))


def target_urls(run: RunConfig) -> list[str]:
    """Where a run is evaluated: eval.target (or the pretraining data), then eval.transfer."""
    return [run.eval.target or run.data.url, *run.eval.transfer]


def resolve_targets(run: RunConfig) -> list[tuple[RunConfig, Target]]:
    """Each target's run (eval.target set to it) and its checked splits, before any work."""
    out = []
    for i, url in enumerate(target_urls(run)):
        key = "eval.target" if i == 0 else f"eval.transfer[{i - 1}]"
        one = dataclasses.replace(run, eval=dataclasses.replace(run.eval, target=url, transfer=[]))
        out.append((one, resolve_target(one, key)))
    return out


def evaluate(run: RunConfig, source: str = "", log=print) -> list[Row]:
    """Run eval.evaluators on `source` (default: the run's newest complete checkpoint; "untrained":
    the same network at its initialisation), on eval.target and then each eval.transfer dataset;
    returns the rows added to the run's results table."""
    targets = resolve_targets(run)
    weights = (
        untrained_weights(run)
        if source == UNTRAINED
        else read_weights_for(_source_of(run, source), run.model, "--model", run.data.endpoint_url)
    )
    comm = _ranks(run)
    if comm is None:
        return [
            row for one, t in targets for row in _evaluate_target(Context(one, weights, t, log))
        ]
    # Several ranks (under a launcher): every rank extracts its share of every target's
    # features first; then rank 0 alone fits and reports, with no collective left to wait on.
    quiet = log if comm.rank == 0 else (lambda *_: None)
    contexts = [Context(one, weights, t, quiet, comm) for one, t in targets]
    for ctx in contexts:
        ctx.prefetch()
        ctx.comm = None  # what is left (pixels, probes) is rank 0's
    if comm.rank != 0:
        return []
    return [row for ctx in contexts for row in _evaluate_target(ctx)]


def _ranks(run: RunConfig):
    """This process's Comm when a launcher started several ranks (WORLD_SIZE > 1), else None;
    made once per process (`--watch` evaluates many checkpoints)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if "finetune" in run.eval.evaluators:
        raise ConfigError(
            "eval.evaluators: finetune trains with every rank itself; under a launcher run "
            "`tessera finetune`, or evaluate it in one process"
        )
    if not _COMM:
        from pipeline.train.distributed import setup

        _COMM.append(setup(run.train.collective_timeout_s))
    return _COMM[0]


_COMM: list = []


def _evaluate_target(ctx: Context) -> list[Row]:
    run, weights, target, log = ctx.run, ctx.weights, ctx.target, ctx.log
    names = list(dict.fromkeys([*run.eval.evaluators, "pixels"]))  # the baseline row, always
    p = weights.provenance
    log(
        f"evaluating {weights.source} ({p['model']}, step {p['step']}) on {target.url} "
        f"({target.train_split} -> {target.test_split}): {', '.join(names)}"
    )
    rows: list[Row] = []
    writer = _writer(run)
    try:
        for name in names:
            started = time.perf_counter()
            try:
                for m in EVALUATORS[name](ctx):
                    rows.append(
                        _record(m, p, target, weights.source, writer, log, run.eval.holdout)
                    )
            except ValueError as e:  # e.g. too few images of a class for the shots asked
                raise EvalError(f"{name} on {target.url}: {e}") from None
            log(f"  ({name}: {time.perf_counter() - started:.0f}s)")
    finally:  # what finished is kept, even when a later evaluator fails
        everything = append_rows(run.train.output, rows, run.data.endpoint_url)
        if writer:
            writer.close()
            if runs.is_remote(run.train.output):
                board = runs.local_dir(run.train.output) / "tensorboard" / "eval"
                runs.push_files(run.train.output, board, run.data.endpoint_url)
    picture = write_layer_sweep(everything, run.train.output, run.data.endpoint_url, run.name)
    if picture:
        log(f"  linear probe against depth: {picture}")
    _prune_features(ctx)
    return rows


class EvalError(ValueError):
    """An evaluator could not run on this target (names the evaluator and the target)."""


SELECTED_ON = {  # what each evaluator chose its free settings on (never the reported split)
    "linear_probe": "{holdout:.0%} of {train} (L2)",
    "pixels": "{holdout:.0%} of {train} (L2)",
    "fewshot": "other {train} images (ridge)",
    "knn": "- (k fixed)",
    "finetune": "- (steps fixed)",
}


def _record(
    m: Measurement, p: dict, target: Target, source: str, writer, log, holdout: float = 0.1
) -> Row:
    selected = SELECTED_ON[m.evaluator].format(holdout=holdout, train=target.train_split)
    if m.chosen_on:
        selected = f"{m.chosen_on} (block, pooling); {selected}"
    row = Row(
        model=p["model"], pretrain_data=p.get("data", ""), pretrain_steps=p["step"],
        target=f"{target.name}:{m.split or target.test_split}", evaluator=m.evaluator,
        layer=m.layer, metric=m.metric, value=m.value, baseline=m.baseline, source=source,
        extra=m.extra, fitted_on=target.train_split,
        reported_on=m.split or target.role or target.test_split, selected_on=selected,
        commit=code_commit(), dataset=target.fingerprint,
    )  # fmt: skip
    base = "" if m.baseline is None else f" (raw pixels {100 * m.baseline:.2f}%)"
    where = f" on {m.split}" if m.split else (f" (chosen on {m.chosen_on})" if m.chosen_on else "")
    log(f"  {m.evaluator} layer {m.layer} {m.metric}{where}: {100 * m.value:.2f}%{base}")
    if writer:
        layer = "" if m.layer == "-" else f"/layer{m.layer}".replace(" ", "_")
        split = f"/{m.split}" if m.split else ""
        tag = f"eval/{target.name}{split}/{m.evaluator}/{m.metric.replace(' ', '_')}{layer}"
        writer.add_scalar(tag, m.value, p["step"])
    return row


def _writer(run: RunConfig):
    if not run.logging.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(runs.local_dir(run.train.output) / "tensorboard" / "eval"))


def _prune_features(ctx: Context) -> None:
    """Keep the features of the weights just evaluated (a re-run reuses them) and the pixels."""
    for folder in ctx.cache.glob("*"):
        if folder.name not in (ctx.fingerprint, "pixels"):
            shutil.rmtree(folder, ignore_errors=True)


def evaluate_checkpoint(
    run: RunConfig, name: str, log=print
) -> tuple[list[Row], dict[str, Any] | None]:
    """Evaluate the run's complete checkpoint `name` (a watcher's report: on val); returns its
    rows and its training state, or no state when keep_last pruning removed it while it was being
    read. The run may be on a filesystem or in object storage: a remote checkpoint is downloaded
    into a folder of the evaluator's own and removed once evaluated (the trainer's local copies
    are left alone). Every rank's optimizer states come with it: they hold the fp32 weights."""
    url, endpoint = run.train.output, run.data.endpoint_url
    remote = runs.is_remote(url)
    staging = runs.local_dir(url) / "watch"
    try:
        ckpt = runs.pull_checkpoint(url, name, endpoint, into=staging if remote else None)
        state = checkpoint.read_state(ckpt)
        return evaluate(run, str(ckpt), log), state
    except (FileNotFoundError, OSError, RuntimeError) as e:
        if name in runs.complete_checkpoints(url, endpoint):
            raise
        log(f"{name} was removed while being read (keep_last pruning); skipped: {e}")
        return [], None
    finally:
        if remote:
            shutil.rmtree(staging / name, ignore_errors=True)


def watch(run: RunConfig, poll: float = 10.0, idle_timeout: float = 3600.0, log=print) -> list[Row]:
    """Evaluate each new complete checkpoint of the run as it appears, oldest first, in this
    process (training is not blocked: it only writes checkpoints), by evaluate_checkpoint.
    Returns once the final step has been evaluated, or after `idle_timeout` seconds without a
    new checkpoint."""
    url, endpoint = run.train.output, run.data.endpoint_url
    done = {basename(r.source) for r in read_rows(url, endpoint)}  # step-NNNNNNN
    rows: list[Row] = []
    last_new = time.monotonic()
    log(f"watching {join(url, runs.CHECKPOINTS)} for complete checkpoints (every {poll:g}s)")
    while True:
        for name in runs.complete_checkpoints(url, endpoint):
            if name in done:
                continue
            done.add(name)
            new, state = evaluate_checkpoint(run, name, log)
            rows += new
            last_new = time.monotonic()
            if state is not None and state["step"] >= state["config"]["train"]["steps"]:
                log(f"evaluated the final checkpoint {name}; done watching")
                return rows
        if time.monotonic() - last_new > idle_timeout:
            log(f"no new checkpoint for {idle_timeout:g}s; done watching")
            return rows
        time.sleep(poll)
