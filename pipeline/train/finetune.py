"""`tessera finetune CONFIG`: pretrained weights -> a classifier, with the pretraining trainer.

    finetune:
      init: runs/vit-tiny-fmnist            # a run (its newest checkpoint), a checkpoint or an export
      head_init: 0.0                        # new head: zero weights (ViT), or normal std (MAE 2e-5)
    optim: {lr: 1e-3, layer_decay: 0.75}    # BEiT/MAE layer-wise learning-rate decay
    model: {name: vit-tiny-p4, image_size: 32, num_classes: 10}   # position embeddings resampled

The same DeepSpeed engine, checkpoints and resume as pretraining; at the end, top-1 on
data.val_split is measured on every rank's share of it and written to the run's results table.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.config import RunConfig
from pipeline.data.shards import load_manifest
from pipeline.data.stream import Stream, stream_config
from pipeline.errors import ConfigError, Preempted
from pipeline.evaluate.results import Row, append_rows
from pipeline.storage import basename
from pipeline.train.objectives import class_logits
from pipeline.train.trainer import DrainNotice, Trainer


def check_classes(run: RunConfig) -> None:
    """model.num_classes must equal the classes of the data, before any computing starts."""
    manifest = load_manifest(run.data.url, run.data.endpoint_url)
    for split in (run.data.train_split, run.data.val_split, run.finetune.report_split):
        if split:
            manifest.split(split)  # names the missing split
    if run.model.num_classes != len(manifest.classes):
        raise ConfigError(
            f"model.num_classes is {run.model.num_classes} but {run.data.url} has "
            f"{len(manifest.classes)} classes; set model.num_classes={len(manifest.classes)}"
        )


@torch.no_grad()
def top1(trainer: Trainer, split: str) -> tuple[int, int]:
    """(correct, images) over the whole split: each rank reads its share, counts are summed.
    Multi-label data counts a prediction correct when it is one of the image's labels."""
    cfg = stream_config(trainer.run, split, trainer.micro, train=False)
    stream = Stream(cfg, trainer.rank, trainer.world)
    engine = trainer.engine
    was_training = engine.module.training
    engine.eval()
    correct, images = 0, 0
    for batch in stream.iter_epoch():  # the same number of batches on every rank
        batch = trainer._to_device(batch)
        predicted = class_logits(engine, batch).argmax(-1, keepdim=True)
        labels = batch["label"]
        if labels.ndim == 2:
            hit = labels.gather(1, predicted).squeeze(1) > 0
        else:
            hit = predicted.squeeze(1) == labels
        correct, images = correct + int(hit.sum()), images + len(hit)
    correct, images = trainer.comm.sum([correct, images], f"top-1 counts on {split}")
    engine.train(was_training)
    return int(correct), int(images)


def finetune(
    run: RunConfig,
    resume: str = "auto",
    log=print,
    scratch: bool = False,
    drain_notice: DrainNotice | None = None,
    restart: bool = False,
) -> dict[str, Any]:
    """Train from finetune.init; returns {"top1", "initial_top1", ...}; raises Preempted after
    SIGTERM (checkpoint saved).
    scratch=True allows an empty init: the same recipe from random weights (a baseline)."""
    if not run.finetune.init and not scratch:
        raise ConfigError("finetune.init: is empty; name the pretrained weights to start from")
    check_classes(run)
    if run.finetune.generative_weight and not (
        run.model.family == "igpt" and run.model.causal and run.train.objective == "supervised"
    ):
        raise ConfigError(
            "finetune.generative_weight adds the next-pixel loss: it needs an autoregressive "
            f"ImageGPT (model.causal: true) and train.objective supervised; this run has "
            f"{run.model.name} with {run.train.objective}"
        )
    trainer = Trainer(run, resume=resume, log=log, drain_notice=drain_notice, restart=restart)
    try:
        split = run.data.val_split
        initial = top1(trainer, split) if trainer.step == 0 else None
        if initial and trainer.rank == 0:
            log(f"top-1 on {split} before finetuning: {100 * initial[0] / initial[1]:.2f}%")
        done = trainer.train() == "done"
        correct, total = top1(trainer, split) if done else (0, 0)
        report = run.finetune.report_split
        final = top1(trainer, report) if done and report else None  # read once, after training
    except BaseException:
        trainer.close(clean=False)
        raise
    if not done:
        trainer.close()
        raise Preempted(
            f"finetuning stopped by SIGTERM at step {trainer.step}, checkpoint saved; resume "
            "with the same command"
        )
    result = {
        "top1": correct / max(total, 1),
        "images": total,
        "initial_top1": initial[0] / max(initial[1], 1) if initial else None,
        "step": trainer.step,
    }
    if final:
        result["report_top1"] = final[0] / max(final[1], 1)
    if trainer.rank == 0:
        from pipeline.evaluate.run import code_commit, data_fingerprint

        log(
            f"top-1 on {split} after {trainer.step} steps: {100 * result['top1']:.2f}% ({total} images)"
        )
        if final:
            log(f"top-1 on {report} (final report, read once): {100 * result['report_top1']:.2f}%")
        init = trainer.init_provenance
        manifest = load_manifest(run.data.url, run.data.endpoint_url)

        def row(reported: str, value: float, reported_on: str, **extra) -> Row:
            return Row(
                model=run.model.name, pretrain_data=init.get("data", ""),
                pretrain_steps=init.get("step", 0), target=f"{basename(run.data.url)}:{reported}",
                evaluator="finetune", layer="-", metric="top1", value=value,
                source=init.get("checkpoint", run.finetune.init),
                extra={"finetune_steps": trainer.step, **extra}, fitted_on=run.data.train_split,
                selected_on="- (steps fixed)", reported_on=reported_on, commit=code_commit(),
                dataset=data_fingerprint(manifest),
            )  # fmt: skip

        rows = [row(split, result["top1"], f"{split} (data.val_split)",
                    initial_top1=result["initial_top1"])]  # fmt: skip
        if final:
            rows.append(row(report, result["report_top1"], f"{report} (final)"))
        append_rows(run.train.output, rows, run.data.endpoint_url)
    trainer.close()
    return result
