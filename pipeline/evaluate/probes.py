"""The classifiers evaluations fit on frozen features, as papers report them.

Features are (N, D) arrays, in memory or memory-mapped from disk; everything here reads them in
chunks of rows, so a feature set larger than memory is fitted by streaming it (each L-BFGS
iteration then re-reads the file; one that fits in `MEMORY_BUDGET` is standardised once and held).

  logistic_probe  multinomial logistic regression, L-BFGS, standardised features, the L2
                  strength chosen on a held-out part of the training split (iGPT's linear probe)
  multilabel_probe  the same with one sigmoid per class, for multi-label targets (JFT-style):
                  precision@1 and mean average precision, the L2 strength chosen by holdout mAP
  fewshot         closed-form ridge regression to +-1 targets on k examples per class, several
                  seeds (big_vision's few-shot linear evaluation)
  knn             k nearest neighbours by cosine similarity, votes weighted by exp(sim / T)
                  (the DINO/InstDisc protocol)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CHUNK = 16384  # rows per read
MEMORY_BUDGET = 2 << 30  # bytes of standardised features held in memory; above it, stream
LOGISTIC_L2 = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)  # on the mean loss, strongest first (warm starts)
RIDGE_L2 = (1e4, 1e3, 1e2, 1e1, 1e0, 1e-1)
KNN_TEMPERATURE = 0.07


@dataclass
class Standardizer:
    """Per-feature mean and standard deviation of the training rows (constant features: std 1)."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        n, d = x.shape
        total, sq = np.zeros(d), np.zeros(d)
        for a in range(0, n, CHUNK):
            c = np.asarray(x[a : a + CHUNK], dtype=np.float64)
            total += c.sum(0)
            sq += (c * c).sum(0)
        mean = total / n
        std = np.sqrt(np.maximum(sq / n - mean * mean, 0))
        std[std < 1e-6] = 1.0
        return cls(torch.from_numpy(mean).float(), torch.from_numpy(std).float())

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(np.array(rows, dtype=np.float32)) - self.mean) / self.std


class Design:
    """Rows `idx` of x, standardised, with their labels, readable chunk by chunk."""

    def __init__(self, x: np.ndarray, y: np.ndarray, idx: np.ndarray, scale: Standardizer):
        self.x, self.y, self.idx, self.scale = x, y, np.sort(idx), scale
        self.n = len(self.idx)
        self.held = None
        if self.n * x.shape[1] * 4 <= MEMORY_BUDGET:
            self.held = list(self._read())

    def _read(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        dtype = np.float32 if self.y.ndim == 2 else np.int64  # multi-hot rows, or class ids
        for a in range(0, self.n, CHUNK):
            sel = self.idx[a : a + CHUNK]
            yield self.scale(self.x[sel]), torch.from_numpy(np.array(self.y[sel], dtype=dtype))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.held) if self.held is not None else self._read()


def fit_logistic(
    data: Design, classes: int, l2: float, init: tuple | None = None, max_iter: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (D, C) and bias (C,) minimising mean cross-entropy + l2/2 |W|^2 with L-BFGS;
    with multi-hot labels, the per-class sigmoid cross-entropy summed over classes."""
    d = data.x.shape[1]
    w = torch.zeros(d, classes) if init is None else init[0].clone()
    b = torch.zeros(classes) if init is None else init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-6, tolerance_change=1e-9,
    )  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        total = 0.0
        for xc, yc in data:
            if yc.ndim == 2:
                loss = F.binary_cross_entropy_with_logits(xc @ w + b, yc, reduction="sum") / data.n
            else:
                loss = F.cross_entropy(xc @ w + b, yc, reduction="sum") / data.n
            loss.backward()
            total += loss.item()
        reg = 0.5 * l2 * (w * w).sum()
        reg.backward()
        return torch.tensor(total) + reg.detach()

    opt.step(closure)
    return w.detach(), b.detach()


def accuracy(data: Design, w: torch.Tensor, b: torch.Tensor) -> float:
    correct = sum(int(((xc @ w + b).argmax(1) == yc).sum()) for xc, yc in data)
    return correct / max(data.n, 1)


@dataclass
class LinearProbe:
    """A fitted linear probe: train's standardisation, the weights, the L2 strength chosen on
    train's holdout (and its score there); scores any number of test sets."""

    scale: Standardizer
    w: torch.Tensor
    b: torch.Tensor
    multi_label: bool
    info: dict

    def score(self, test: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
        """{"top1"}, or (multi-label) {"precision_at_1", "mAP"}, on (x, y) of another split."""
        x, y = test
        data = Design(x, y, np.arange(len(y)), self.scale)
        if self.multi_label:
            return ranking_metrics(data, self.w, self.b)
        return {"top1": accuracy(data, self.w, self.b)}


def fit_probe(
    train: tuple[np.ndarray, np.ndarray], classes: int, multi_label: bool = False,
    holdout: float = 0.1, seed: int = 0, grid: tuple[float, ...] = LOGISTIC_L2,
) -> LinearProbe:  # fmt: skip
    """Fit on train less `holdout` for each L2 strength in `grid` (warm starts), keep the one
    ranked best on the held-out part (top-1, or mAP for multi-hot labels), refit it on all of
    train."""
    (xtr, ytr), metric = train, ("mAP" if multi_label else "top1")
    scale = Standardizer.fit(xtr)
    perm = np.random.default_rng(seed).permutation(len(ytr))
    n_hold = max(1, int(holdout * len(ytr)))
    fit, held = Design(xtr, ytr, perm[n_hold:], scale), Design(xtr, ytr, perm[:n_hold], scale)
    scores, params = {}, None
    for l2 in grid:
        params = fit_logistic(fit, classes, l2, init=params)
        w, b = params
        scores[l2] = ranking_metrics(held, w, b)["mAP"] if multi_label else accuracy(held, w, b)
    best = max(grid, key=lambda l2: (scores[l2], l2))  # ties: the stronger regulariser
    w, b = fit_logistic(Design(xtr, ytr, perm, scale), classes, best)
    return LinearProbe(scale, w, b, multi_label, {"l2": best, f"holdout_{metric}": scores[best]})


def logistic_probe(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    classes: int,
    holdout: float = 0.1,
    seed: int = 0,
    grid: tuple[float, ...] = LOGISTIC_L2,
) -> tuple[float, dict]:
    """Test top-1 of a logistic regression whose L2 strength was chosen on `holdout` of train."""
    probe = fit_probe(train, classes, False, holdout, seed, grid)
    return probe.score(test)["top1"], probe.info


def ranking_metrics(data: Design, w: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Multi-label scores: precision@1 (the top class is one of the image's labels) and mean
    average precision over the classes with at least one positive image."""
    from sklearn.metrics import average_precision_score

    scores, truth = [], []
    for xc, yc in data:
        scores.append((xc @ w + b).numpy())
        truth.append(yc.numpy())
    s, y = np.concatenate(scores), np.concatenate(truth) > 0
    p_at_1 = float(y[np.arange(len(y)), s.argmax(1)].mean()) if len(y) else 0.0
    present = y.any(0)
    ap = (
        average_precision_score(y[:, present], s[:, present], average=None) if present.any() else []
    )
    return {"precision_at_1": p_at_1, "mAP": float(np.mean(ap)) if len(ap) else 0.0}


def multilabel_probe(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    classes: int,
    holdout: float = 0.1,
    seed: int = 0,
    grid: tuple[float, ...] = LOGISTIC_L2,
) -> tuple[dict[str, float], dict]:
    """Test precision@1 and mAP of per-class logistic regressions on multi-hot labels (N, K),
    the L2 strength chosen by mAP on `holdout` of train."""
    probe = fit_probe(train, classes, True, holdout, seed, grid)
    return probe.score(test), probe.info


def _ridge(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression with an unpenalised bias, solved in the dual (few rows, many features)."""
    mx, my = x.mean(0), y.mean(0)
    xc, yc = (x - mx).double(), (y - my).double()
    gram = xc @ xc.T + l2 * torch.eye(len(xc), dtype=torch.float64)
    w = (xc.T @ torch.linalg.solve(gram, yc)).float()
    return w, my - mx @ w


def fewshot(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    classes: int,
    shots: list[int],
    seeds: int = 3,
    select: int = 2000,
    grid: tuple[float, ...] = RIDGE_L2,
) -> dict[int, list[float]]:
    """shots -> test top-1 of each seed. Each seed draws k training images per class; the ridge
    strength is chosen on `select` other training images, never on the test split."""
    (xtr, ytr), (xte, yte) = train, test
    scale = Standardizer.fit(xtr)
    by_class = [np.flatnonzero(ytr == c) for c in range(classes)]
    short = [c for c, idx in enumerate(by_class) if len(idx) < max(shots)]
    if short:
        raise ValueError(
            f"few-shot with {max(shots)} shots needs that many training images of every class; "
            f"classes {short[:10]} have fewer"
        )
    test_set = Design(xte, yte, np.arange(len(yte)), scale)
    out: dict[int, list[float]] = {}
    for k in shots:
        out[k] = []
        for s in range(seeds):
            rng = np.random.default_rng([s, k])
            picked = np.concatenate([rng.choice(idx, k, replace=False) for idx in by_class])
            rest = np.setdiff1d(np.arange(len(ytr)), picked)
            chooser = Design(
                xtr, ytr, rng.choice(rest, min(select, len(rest)), replace=False), scale
            )
            x = scale(xtr[np.sort(picked)])
            y = 2 * F.one_hot(torch.from_numpy(ytr[np.sort(picked)]).long(), classes).float() - 1
            fits = {l2: _ridge(x, y, l2) for l2 in grid}
            best = max(grid, key=lambda l2: (accuracy(chooser, *fits[l2]), l2))
            out[k].append(accuracy(test_set, *fits[best]))
    return out


def knn(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    classes: int,
    k: int = 20,
    temperature: float = KNN_TEMPERATURE,
) -> float:
    """Test top-1 of a weighted k-NN vote over L2-normalised features."""
    (xtr, ytr), (xte, yte) = train, test
    k = min(k, len(ytr))
    correct = 0
    for a in range(0, len(yte), CHUNK):
        q = F.normalize(torch.from_numpy(np.array(xte[a : a + CHUNK], dtype=np.float32)), dim=1)
        best_sim = torch.full((len(q), k), -2.0)
        best_lab = torch.zeros((len(q), k), dtype=torch.int64)
        for t in range(0, len(ytr), CHUNK):
            ref = F.normalize(
                torch.from_numpy(np.array(xtr[t : t + CHUNK], dtype=np.float32)), dim=1
            )
            labels = torch.from_numpy(np.array(ytr[t : t + CHUNK], dtype=np.int64))
            sims = torch.cat([best_sim, q @ ref.T], dim=1)
            labs = torch.cat([best_lab, labels.expand(len(q), -1)], dim=1)
            best_sim, top = sims.topk(k, dim=1)
            best_lab = labs.gather(1, top)
        votes = torch.zeros(len(q), classes).scatter_add_(
            1, best_lab, (best_sim / temperature).exp()
        )
        truth = torch.from_numpy(np.array(yte[a : a + CHUNK], dtype=np.int64))
        correct += int((votes.argmax(1) == truth).sum())
    return correct / max(len(yte), 1)
