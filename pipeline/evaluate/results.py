"""A run's results: one object per row, and the tables made from them.

  results/rows/<key>.json   one row per (checkpoint, target, evaluator, layer, metric): the truth
  results.json, results.md  the table, rewritten from the rows after every append (both atomic)

A row for the same checkpoint, target, evaluator, layer and metric replaces the old one (the same
object), so re-running an evaluation updates the table instead of growing it. Two evaluations
appending at once (a finetune and an evaluate stage of one run, two Ray tasks) never lose a row:
each writes only its own rows' objects, and object storage has no lock a read-change-write of
one file could take. The table files are views: the last writer's may miss a row written while
it listed, and the next append, or `read_rows`, sees it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.storage import filesystem, join, write_atomic

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
LAYER_SWEEP = "layer_sweep.png"
ROWS = "results/rows"


@dataclass
class Row:
    model: str  # model size, e.g. vit-tiny-p4
    pretrain_data: str  # dataset URL the weights were trained on ("" if unknown)
    pretrain_steps: int  # checkpoint step
    target: str  # dataset evaluated on, with its split: "digits:val"
    evaluator: str  # linear_probe, fewshot, knn, finetune, pixels
    layer: str  # block index, "-" where it does not apply
    metric: str  # top1, 5-shot top1, ...
    value: float
    baseline: float | None = None  # the same evaluator on raw pixels
    source: str = ""  # checkpoint or export folder the weights came from
    extra: dict[str, Any] = field(default_factory=dict)  # std over seeds, chosen L2, ...
    # Where a number comes from, for a reviewer: the split the classifier was fitted on, what its
    # free settings were chosen on, the split reported (and whether it is the final report), the
    # code's commit and the dataset's fingerprint.
    fitted_on: str = ""
    selected_on: str = ""
    reported_on: str = ""
    commit: str = ""
    dataset: str = ""

    def key(self) -> tuple:
        return (self.source, self.target, self.evaluator, self.layer, self.metric)

    def object_name(self) -> str:
        return hashlib.sha256(json.dumps(self.key()).encode()).hexdigest()[:24] + ".json"


def read_rows(run_url: str | Path, endpoint_url: str = "") -> list[Row]:
    """The rows of a run (any fsspec URL); none if it has no results yet. A run written before
    rows were objects has only results.json, which is read instead."""
    fs, path = filesystem(str(run_url), endpoint_url)
    try:
        names = sorted(fs.ls(join(path, ROWS), detail=False))
    except FileNotFoundError:
        names = []
    names = [n for n in names if n.endswith(".json") and ".tmp-" not in n]
    if names:
        contents = fs.cat(names)  # concurrent on object storage
        rows = [Row(**json.loads(contents[n])) for n in names]
        return sorted(rows, key=lambda r: r.key())
    try:
        data = fs.cat_file(join(path, RESULTS_JSON))
    except FileNotFoundError:
        return []
    return [Row(**r) for r in json.loads(data)["rows"]]


def read_markdown(run_url: str | Path, endpoint_url: str = "") -> str:
    fs, path = filesystem(str(run_url), endpoint_url)
    try:
        return fs.cat_file(join(path, RESULTS_MD)).decode()
    except FileNotFoundError:
        return ""


def append_rows(run_url: str | Path, rows: list[Row], endpoint_url: str = "") -> list[Row]:
    """Write `rows` (each its own object), then rewrite results.json and results.md from every
    row the run has; returns them all."""
    fs, path = filesystem(str(run_url), endpoint_url)
    if not fs.exists(join(path, ROWS)):  # rows of a results.json from before: kept as objects
        new = {r.key() for r in rows}
        rows = [r for r in read_rows(run_url, endpoint_url) if r.key() not in new] + rows
    fs.makedirs(join(path, ROWS), exist_ok=True)
    for r in rows:
        write_atomic(fs, join(path, ROWS, r.object_name()), json.dumps(asdict(r)).encode())
    everything = read_rows(run_url, endpoint_url)
    table = {"format": "tessera-results/1", "rows": [asdict(r) for r in everything]}
    write_atomic(fs, join(path, RESULTS_JSON), json.dumps(table, indent=1).encode())
    write_atomic(fs, join(path, RESULTS_MD), markdown(everything).encode())
    return everything


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def markdown(rows: list[Row]) -> str:
    """The table a paper would quote: accuracies in percent, the raw-pixel baseline beside each."""
    header = [
        "model", "pretrained on", "step", "target", "evaluator", "layer", "metric", "value (%)",
        "raw pixels (%)", "fitted on", "selected on", "reported on", "commit", "dataset",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = sorted(rows, key=lambda r: (r.pretrain_steps, r.target, r.evaluator, r.layer, r.metric))
    for r in order:
        value = _pct(r.value)
        if "std" in r.extra:
            value += f" ± {100 * r.extra['std']:.2f}"
        data = Path(r.pretrain_data).name if r.pretrain_data else "-"
        cells = [
            r.model, data, str(r.pretrain_steps), r.target, r.evaluator, r.layer, r.metric,
            value, _pct(r.baseline) or "-", r.fitted_on or "-", r.selected_on or "-",
            r.reported_on or "-", r.commit or "-", r.dataset or "-",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def layer_sweep(rows: list[Row]) -> dict[str, dict]:
    """Per target (and split), the linear probe against block depth, as the ImageGPT paper draws
    it: {"target": {"curves": {label: [(block, value)]}, "pixels": {label: value}}}, one curve
    per weights (the newest trained step and the untrained network) and pooling; targets with
    fewer than two single-block probes are left out. Where candidates were scored on val for a
    final report, the sweep is the val one (test was read for the chosen probe alone)."""
    out: dict[str, dict] = {}
    scores = ("top1", "precision_at_1")  # the score choices are made by
    probes = [r for r in rows if r.evaluator == "linear_probe" and r.metric in scores]
    newest = max((r.pretrain_steps for r in probes if r.source != "untrained"), default=0)
    for r in probes:
        block, _, grid = r.layer.partition("@")
        if not block.isdigit() or (r.source != "untrained" and r.pretrain_steps != newest):
            continue
        pooling = f", {grid} grid" if grid else ""
        sweep = out.setdefault(r.target, {"curves": {}, "pixels": {}})
        sweep["curves"].setdefault(f"{r.model}{pooling}", []).append((int(block), r.value))
    for r in rows:  # the raw-pixel baselines of the same split
        if r.evaluator == "pixels" and r.metric in scores and r.target in out:
            where = "full resolution" if r.layer == "-" else r.layer
            out[r.target]["pixels"][f"raw pixels, {where}"] = r.value
    return {t: s for t, s in out.items() if any(len(c) > 1 for c in s["curves"].values())}


def write_layer_sweep(
    rows: list[Row], run_url: str | Path, endpoint_url: str = "", title: str = ""
) -> str:
    """layer_sweep.png in the run folder from the run's rows (see `layer_sweep`); "" if there
    is no sweep to draw."""
    import tempfile

    sweeps = layer_sweep(rows)
    if not sweeps:
        return ""
    from pipeline.train.visuals import sweep_png

    fs, path = filesystem(str(run_url), endpoint_url)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / LAYER_SWEEP
        sweep_png(sweeps, local, title=title)
        fs.makedirs(path, exist_ok=True)
        write_atomic(fs, join(path, LAYER_SWEEP), local.read_bytes())
    return join(str(run_url), LAYER_SWEEP)
