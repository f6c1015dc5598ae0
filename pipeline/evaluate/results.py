"""results.json and results.md in a run folder: one row per (model, target, evaluator, layer, metric).

Rows are appended as evaluations finish; a row for the same checkpoint, target, evaluator, layer
and metric replaces the old one, so re-running an evaluation updates the table instead of
growing it. results.md is rewritten from results.json each time (both atomically).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.storage import filesystem, join, write_atomic

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


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

    def key(self) -> tuple:
        return (self.source, self.target, self.evaluator, self.layer, self.metric)


def read_rows(run_url: str | Path, endpoint_url: str = "") -> list[Row]:
    """The rows of a run's results.json (any fsspec URL); none if it has no table yet."""
    fs, path = filesystem(str(run_url), endpoint_url)
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
    """Merge rows into the run's results.json and rewrite results.md; returns all rows."""
    fs, path = filesystem(str(run_url), endpoint_url)
    fs.makedirs(path, exist_ok=True)
    merged = {r.key(): r for r in read_rows(run_url, endpoint_url)}
    for r in rows:
        merged[r.key()] = r
    everything = list(merged.values())
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
        "raw pixels (%)",
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
            value, _pct(r.baseline) or "-",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
