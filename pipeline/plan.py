"""`tessera plan CONFIG --gpus N --gpu-memory 80GB --peak-tflops 989`: will it fit, and how long.

Memory per device, from the run config alone (nothing is allocated):

  model states  mixed-precision Adam keeps 16 bytes per parameter: 2 (bf16/fp16 weights) + 2
                (gradients) + 12 (fp32 master weights, Adam's m and v). ZeRO-1 splits the 12 over
                the ranks, ZeRO-2 also the gradients, ZeRO-3 also the weights (the ZeRO paper's
                Table 1). fp32 training: 4 + 4 + 8. Offload moves the split parts to host memory.
  activations   what autograd keeps per block for one micro-batch, with fused attention (no
                s x s score matrices): the block's input, its normalised copy, q/k/v, the
                attention output, the MLP input, its hidden layer before and after GELU, i.e.
                (9 s h + 2 s m) elements for s tokens, width h, MLP width m. Without fused
                attention (the explicit path Tessera takes on CPU in bf16) add a s^2: the
                probabilities, which softmax and the product with v keep. With activation
                checkpointing each block keeps only its input (s h); one block's full set (less
                that input, already kept), and the gradient of its MLP hidden layer, are live
                while it is recomputed. A hybrid ViT's convolution stem adds two feature maps per
                convolution, never checkpointed. A ResNet is counted block by block, since its
                maps shrink as they deepen (`cnn_activation_bytes`).
  buffers       DeepSpeed's gradient-reduction buckets (and ZeRO-3's prefetch), as sized by the
                DeepSpeed config the run really gets.
  teacher       train.teacher (DeiT's distillation): its weights whole on every device in the
                training precision, and the activations of its no-grad forward, bounded by
                what the same network keeps training with checkpointing (an upper bound: a
                no-grad forward frees each block's tensors as it goes). Its forward's FLOPs
                join the step's.

Checked against the allocator on CPU (tests/test_plan.py): activations within 10% of the
profiler's peak with and without checkpointing, model states within 15% at 2 ranks for ZeRO
0/2/3 (they agree to under 1%).

Compute: the model's analytic FLOPs (the same count the training log's MFU uses) x the global
batch, at an assumed MFU of the peak, gives the step time, images/s, and time and device-hours
to train.steps.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass

import torch

from pipeline.config import RunConfig
from pipeline.models import ModelConfig, create_model
from pipeline.models.pvt import PVTConfig
from pipeline.models.resnet import ResNetConfig
from pipeline.models.swin import SwinConfig
from pipeline.train.engine import batch_layout, deepspeed_config

GB = 1e9


def parse_bytes(text: str) -> float:
    """ "80GB", "80G", "141GiB", "24e9" -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]i?[bB]?)?\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 80GB)")
    unit = (m.group(2) or "").upper().rstrip("B")
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    base = 1024 if unit.endswith("I") else 1000
    return float(m.group(1)) * base**power


@dataclass(frozen=True)
class Memory:
    """Bytes per device (and on the host, for offload)."""

    params: float
    grads: float
    optimizer: float
    activations: float
    buffers: float
    host: float = 0.0
    teacher: float = 0.0  # train.teacher's weights and forward activations, on every device

    @property
    def model_states(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.activations + self.buffers + self.teacher


def element_bytes(precision: str) -> int:
    """Bytes of one weight, gradient or activation element in the training precision."""
    return 4 if precision == "fp32" else 2


def parameter_count(run: RunConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in create_model(run.model).parameters())


def peak_allocated(fn) -> int:
    """What the plan predicts for activations, measured: the peak bytes the CPU allocator handed
    out while fn() ran, above what was allocated before it (the profiler's memory events; the
    allocator's own peak, not resident memory, which also holds what it keeps after frees)."""
    import json
    import tempfile
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        events = json.loads(Path(trace.name).read_text())["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")


def live_tensor_bytes(device: str = "cpu") -> int:
    """What the plan predicts, measured: the bytes of every tensor Python can reach on `device`,
    each storage counted once (views share one). Taken between backward and the optimizer step,
    it is a rank's model states (tests/plan_states.py, benchmarks/train_step.py)."""
    import gc

    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == device:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def model_state_bytes(
    params: int,
    stage: int,
    world: int,
    precision: str,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    optimizer_name: str = "adamw",
) -> tuple[float, float, float, float]:
    """(weights, gradients, optimizer states, host bytes) per device for this ZeRO stage."""  # fmt: skip
    half = element_bytes(precision)
    weights, grads = half * params, half * params
    moments = 2 if optimizer_name == "adamw" else 1  # Adam's m and v; SGD's momentum
    optimizer = (4 * moments + (0 if precision == "fp32" else 4)) * params  # (+ fp32 master)
    if stage >= 1:
        optimizer /= world
    if stage >= 2:
        grads /= world
    if stage >= 3:
        weights /= world
    host = 0.0
    if offload_optimizer:
        host, optimizer = host + optimizer, 0.0
    if offload_params:
        host, weights = host + weights, 0.0
    return weights, grads, optimizer, host


def activation_bytes(
    run: RunConfig, micro_batch: int, checkpointing: bool, fused_attention: bool = True
) -> float:
    """Peak bytes of activations for one micro-batch's forward and backward (module docstring).

    Without checkpointing the peak is where backward starts: every block's saved tensors plus
    the loss's. With it, each block keeps only its input, and the peak is either that same
    moment or the recomputation of a block, whose full set is live with the gradients flowing
    through its MLP (about s m elements more), whichever is larger.
    """
    cfg = run.model
    if cfg.family == "resnet":
        half = element_bytes(run.deepspeed.precision)
        return cnn_activation_bytes(cfg, half, micro_batch, checkpointing)
    if cfg.family in ("swin", "pvt"):
        half = element_bytes(run.deepspeed.precision)
        count = swin_activation_bytes if cfg.family == "swin" else pvt_activation_bytes
        return count(cfg, half, micro_batch, checkpointing, fused_attention)
    s, h, m, depth = cfg.num_tokens, cfg.width, cfg.mlp_dim, cfg.depth
    half = element_bytes(run.deepspeed.precision)
    block = 9 * s * h + 2 * s * m
    if not fused_attention:
        block += cfg.heads * s * s
    if cfg.family == "igpt":
        # The embedding, the final norm's input and output; the loss in fp32 whatever the
        # precision: log-softmax output, its gradient and the logits' gradient.
        edges, loss = half * 3 * s * h, 3 * 4 * s * cfg.vocab_size
    else:
        # The image, the embedding and the final norm's output; a hybrid's stem (never
        # checkpointed) keeps per convolution its output (for GroupNorm) and ReLU's output (for
        # ReLU and the next convolution); GroupNorm's own output is freed once ReLU has run.
        stem = sum(2 * c * side**2 for c, side in cfg.stem_maps)
        edges, loss = half * (2 * s * h + cfg.channels * cfg.image_size**2 + stem), 0
    if checkpointing:  # the recomputed block's input is the checkpoint already counted
        peak = half * depth * s * h + edges + max(loss, half * (block - s * h + s * m))
    else:
        peak = half * depth * block + edges + loss
    return micro_batch * peak


def cnn_activation_bytes(
    cfg: ResNetConfig, half: int, micro_batch: int, checkpointing: bool
) -> float:
    """Peak activation bytes of a ResNet for one micro-batch (module docstring), block by block.

    v1 (post-activation, BatchNorm; ReLU in place): the stem keeps the image, its convolution's
    output (for BatchNorm) and ReLU's (for the pool), the pool's int64 indices; a block keeps its
    input, each convolution's output (for its BatchNorm), ReLU's output after the first two (for
    the next convolution) and the projection's output. BiT (pre-activation): a block keeps its
    input (for GroupNorm), ReLU's output before each convolution and the first two
    convolutions' outputs; weight standardisation keeps, per convolution, the centred fp32
    weight, its fp32 copy (in half precision) and the standardised weight the convolution reads.

    The gradients live during a block's backward are its output's, its input's and one of its
    own outputs' (2 c s^2 + c_in s_in^2); `Staged.peak` finds where backward holds the most.
    """
    bit = cfg.variant == "bit"
    c0, (s1, s2) = cfg.stem_width, cfg.stem_sides
    image = cfg.channels * cfg.image_size**2
    standardised = (8 if half == 2 else 4) + half  # bytes per weight element, per forward
    if cfg.small_stem:
        stem = half * (image + (0 if bit else 2 * c0 * s1**2))
        stem_grads = half * 2 * c0 * s1**2
    elif bit:  # the zero-padded map the pool reads, and its indices
        stem = half * (image + c0 * (s1 + 2) ** 2) + 8 * c0 * s2**2
        stem_grads = half * (c0 * s1**2 + c0 * (s1 + 2) ** 2)
    else:
        stem = half * (image + 2 * c0 * s1**2) + 8 * c0 * s2**2
        stem_grads = half * 2 * c0 * s1**2
    weights = [0] * cfg.depth
    convs = list(cfg.convs())[1:]
    full, grads = [], []
    for n, (i, c_in, side_in, stride, side) in enumerate(cfg.blocks()):
        w, c = cfg.stage_width(i), cfg.out_width(i)
        projected = stride != 1 or c_in != c
        kept = c_in * side_in**2 + 2 * w * side_in**2 + 2 * w * side**2
        if bit:
            kept += c_in * side_in**2
            mine, convs = convs[: 3 + projected], convs[3 + projected :]
            weights[n] = standardised * sum(
                v.kernel**2 * v.c_in // v.groups * v.c_out for v in mine
            )
        else:
            kept += c * side**2 * (1 + projected)
        full.append(half * kept)
        grads.append(half * (2 * c * side**2 + c_in * side_in**2))
    last = half * c * side**2  # the last block's output: ReLU keeps it (BiT: its last norm too)
    if bit:
        last *= 2
    inputs = [half * c_in * side_in**2 for _, c_in, side_in, _, _ in cfg.blocks()]
    # a recomputed block's own output: v1's last ReLU keeps it
    outputs = [0 if bit else half * cfg.out_width(i) * side**2 for i, *_, side in cfg.blocks()]
    blocks = Staged(full, grads, inputs, outputs, weights)
    return blocks.peak(micro_batch, stem, stem_grads, last, checkpointing)


def swin_activation_bytes(
    cfg: SwinConfig, half: int, micro_batch: int, checkpointing: bool, fused_attention: bool
) -> float:
    """Peak activation bytes of a Swin Transformer for one micro-batch, block by block (the
    tensors each keeps, counted with autograd's saved-tensor hooks on CPU).

    A block over n tokens of width c with MLP width m keeps what a ViT block keeps, 9nc + 2nm
    (its input, the windows its qkv projection reads, q, k, v, the attention output, the
    residual sum, its normalised copy, the MLP's hidden layer before and after GELU), and the
    probabilities, h n w^2 for h heads and w x w windows, on either attention path: the bias and
    shift mask need gradients, which PyTorch's fused kernel does not give. Patch merging keeps
    the 2x2-concatenated map and its normalised copy (4nc). The stem keeps the image and the
    patch embeddings; the final norm the last block's output. The peak is found as for a ResNet
    (`Staged`): the maps shrink as the stages deepen.
    """
    del fused_attention  # the same count on both paths (docstring)
    stem = half * (cfg.channels * cfg.image_size**2 + cfg.grid**2 * cfg.width)
    full, grads, inputs, outputs, hidden = [], [], [], [], []
    previous = -1
    for i, side, window, _ in cfg.blocks():
        n, c, h = side**2, cfg.stage_width(i), cfg.heads[i]
        m = cfg.mlp_ratio * c
        kept = 9 * n * c + 2 * n * m + h * n * window**2
        merges = i != previous and i > 0
        previous = i
        full.append(half * (kept + 4 * n * c * merges))
        grads.append(half * (2 * n * c + n * m))
        hidden.append(half * n * m)
        # a merging block's input: 4x the tokens at half the width
        inputs.append(half * n * c * (2 if merges else 1))
        outputs.append(0)
    last = half * cfg.final_side**2 * cfg.final_width
    blocks = Staged(full, grads, inputs, outputs, [0] * len(full), hidden)
    stem_grads = half * 2 * cfg.grid**2 * cfg.width
    return blocks.peak(micro_batch, stem, stem_grads, last, checkpointing)


def pvt_activation_bytes(
    cfg: PVTConfig, half: int, micro_batch: int, checkpointing: bool, fused_attention: bool
) -> float:
    """Peak activation bytes of a PVT for one micro-batch, block by block (counted with
    autograd's saved-tensor hooks on CPU).

    A block over n tokens of width c, MLP width m, h heads and n' key/value tokens keeps its
    input, its normalised copy, the scaled queries, the attention output, the residual sum, its
    normalised copy and the MLP's hidden layer twice (6nc + 2nm); with spatial reduction also
    the map the reduction convolution reads, that convolution's output, its normalised copy and
    keys and values (nc + 4n'c), without it keys and values (2nc); and, on the explicit
    attention path, the probabilities (h n n'). A stage's first block also keeps the previous
    stage's tokens as a map and its patch embedding's output. The peak is found as for a ResNet
    (`Staged`).
    """
    stem = half * (cfg.channels * cfg.image_size**2 + cfg.tokens(0) * cfg.widths[0])
    full, grads, inputs, hidden = [], [], [], []
    previous = 0
    for i, n, kv in cfg.blocks():
        c, m = cfg.widths[i], cfg.mlp_ratios[i] * cfg.widths[i]
        kept = 6 * n * c + 2 * n * m
        kept += n * c + 4 * kv * c if cfg.reductions[i] > 1 else 2 * n * c
        if not fused_attention:
            kept += cfg.heads[i] * n * kv
        if i != previous:  # the stage's embedding: the previous map, the new patches
            before = cfg.side(i - 1) ** 2 * cfg.widths[i - 1]
            kept += before + cfg.side(i) ** 2 * c
            inputs.append(half * before)
        else:
            inputs.append(half * n * c)
        previous = i
        full.append(half * kept)
        grads.append(half * (2 * n * c + n * m))
        hidden.append(half * n * m)
    last = half * cfg.tokens(len(cfg.depths) - 1) * cfg.final_width
    blocks = Staged(full, grads, inputs, [0] * len(full), [0] * len(full), hidden)
    stem_grads = half * 2 * cfg.tokens(0) * cfg.widths[0]
    return blocks.peak(micro_batch, stem, stem_grads, last, checkpointing)


@dataclass(frozen=True)
class Staged:
    """Per-block bytes (per image, `weights` per micro-batch) of a model whose blocks differ:
    what each keeps for backward (`full`, its input included), the gradients live during its
    backward, its input (all checkpointing keeps of it), what its own output costs when it is
    recomputed, and parameter-sized tensors it keeps."""

    full: list[float]
    grads: list[float]
    inputs: list[float]
    outputs: list[float]
    weights: list[float]
    # gradients live while a recomputed block runs backward, where they differ: a transformer
    # block frees its MLP's saved tensors as the MLP's gradients appear
    recomputed_grads: list[float] | None = None

    def peak(
        self, micro_batch: int, stem: float, stem_grads: float, last: float, checkpointing: bool
    ) -> float:
        """Backward runs from the last block to the first, freeing what each block kept once
        its backward is done: the peak is at the end of the forward, or at some block i,
        holding the stem's, blocks 0..i's kept tensors (with checkpointing: their inputs and
        block i's recomputed set) and block i's gradients."""
        b, n = micro_batch, len(self.full)
        if checkpointing:
            grads = self.recomputed_grads or self.grads
            at = [
                b * (sum(self.inputs[:i]) + self.full[i] + self.outputs[i] + grads[i])
                + self.weights[i]
                for i in range(n)
            ]
            end = b * sum(self.inputs)
        else:
            at = [
                b * (sum(self.full[: i + 1]) + self.grads[i]) + sum(self.weights[: i + 1])
                for i in range(n)
            ]
            end = b * (sum(self.full) + last) + sum(self.weights)
        return b * stem + max(max(at), end, b * stem_grads)


def buffer_bytes(run: RunConfig, world: int, params: int) -> float:
    """DeepSpeed's communication buffers for the DeepSpeed config this run really gets (a user's
    file included): ZeRO-0 flattens gradients into all-reduce buckets; ZeRO-1/2 allocate one
    reduce bucket of `reduce_bucket_size` elements (two with overlap_comm) for every backward;
    ZeRO-3 has its reduce and prefetch buckets and one block's gathered weights."""
    zero = deepspeed_config(run, world)["zero_optimization"]
    stage, half = zero["stage"], element_bytes(run.deepspeed.precision)
    default = 500_000_000  # DeepSpeed's default bucket sizes, in elements
    if stage == 0:
        return half * min(params, default)
    if stage in (1, 2):
        buckets = 2 if zero.get("overlap_comm", False) else 1
        return half * buckets * zero.get("reduce_bucket_size", default)
    cfg = run.model
    if cfg.family in ("resnet", "swin", "pvt"):
        block = cfg.largest_block()
    else:
        block = 4 * cfg.width**2 + 2 * cfg.width * cfg.mlp_dim
    return half * (
        zero.get("reduce_bucket_size", default)
        + zero.get("stage3_prefetch_bucket_size", default)
        + block
    )


FIT_FRACTION = 0.9  # of device memory: the rest is the CUDA context and allocator fragmentation


@dataclass(frozen=True)
class Device:
    count: int
    memory: float  # bytes per device
    peak_flops: float  # per device, dense bf16
    mfu: float  # assumed model FLOPs utilisation


@dataclass(frozen=True)
class Plan:
    run: RunConfig
    device: Device
    params: int
    micro_batch: int
    accum: int
    memory: Memory
    activations_other: float  # the same micro-batch with checkpointing switched the other way
    teacher: ModelConfig | None = None  # train.teacher's model, where it could be read

    @property
    def fits(self) -> bool:
        return self.memory.total <= FIT_FRACTION * self.device.memory

    @property
    def step_flops(self) -> float:
        """Model FLOPs of one optimizer step (the count the training log's MFU uses), and the
        teacher's forward where there is one."""
        teacher = self.teacher.forward_flops() if self.teacher else 0
        return (self.run.model.train_flops() + teacher) * self.run.train.global_batch_size

    @property
    def step_seconds(self) -> float:
        d = self.device
        return self.step_flops / (d.count * d.peak_flops * d.mfu)

    @property
    def images_per_second(self) -> float:
        return self.run.train.global_batch_size / self.step_seconds

    @property
    def train_seconds(self) -> float:
        return self.run.train.steps * self.step_seconds


@functools.cache
def teacher_model(source: str, endpoint_url: str = "") -> ModelConfig | str:
    """train.teacher's model config (read from its export or checkpoint, no weights), or why it
    could not be read (not there yet, no credentials here): the plan then says it is not
    counted, and plans the rest."""
    from pipeline.train.export import read_model_config

    try:
        return read_model_config(source, endpoint_url)
    except FileNotFoundError:
        return "it is not there yet"
    except Exception as e:  # a plan is made anywhere: storage may be out of reach from here
        return f"it could not be read here ({type(e).__name__}: {e})"


def _teacher(run: RunConfig) -> ModelConfig | None:
    if not run.train.teacher:
        return None
    found = teacher_model(run.train.teacher, run.data.endpoint_url)
    return None if isinstance(found, str) else found


def teacher_bytes(run: RunConfig, teacher: ModelConfig, micro_batch: int) -> float:
    """The teacher's weights in the training precision and a bound on its forward's activations
    (module docstring)."""
    with torch.device("meta"):
        params = sum(p.numel() for p in create_model(teacher).parameters())
    as_trained = dataclasses.replace(
        run, model=teacher, train=dataclasses.replace(run.train, teacher="")
    )
    bound = activation_bytes(as_trained, micro_batch, checkpointing=True)
    return params * element_bytes(run.deepspeed.precision) + bound


def memory_for(run: RunConfig, world: int, params: int, micro_batch: int) -> Memory:
    ds = run.deepspeed
    weights, grads, optimizer, host = model_state_bytes(
        params, ds.zero_stage, world, ds.precision, ds.offload_optimizer, ds.offload_params,
        run.optim.name,
    )  # fmt: skip
    activations = activation_bytes(run, micro_batch, run.model.grad_checkpointing)
    teacher = _teacher(run)
    extra = teacher_bytes(run, teacher, micro_batch) if teacher else 0.0
    buffers = buffer_bytes(run, world, params)
    return Memory(weights, grads, optimizer, activations, buffers, host, extra)


def make_plan(run: RunConfig, device: Device) -> Plan:
    params = parameter_count(run)
    micro, accum = batch_layout(run, device.count)
    flipped = activation_bytes(run, micro, not run.model.grad_checkpointing)
    teacher = _teacher(run)
    return Plan(run, device, params, micro, accum, memory_for(run, device.count, params, micro),
                flipped, teacher)  # fmt: skip


def with_changes(run: RunConfig, **deepspeed: object) -> RunConfig:
    return dataclasses.replace(run, deepspeed=dataclasses.replace(run.deepspeed, **deepspeed))


def suggestions(plan: Plan) -> list[str]:
    """The smallest ZeRO stage that fits at this micro-batch, and the largest micro-batch that
    fits at that stage (one that divides the global batch over the devices)."""
    run, device = plan.run, plan.device
    usable = FIT_FRACTION * device.memory
    lines = []
    stage = next(
        (z for z in range(4) if memory_for(with_changes(run, zero_stage=z), device.count,
                                           plan.params, plan.micro_batch).total <= usable),
        None,
    )  # fmt: skip
    if stage is None:
        lines.append(
            f"no ZeRO stage fits micro-batch {plan.micro_batch}: lower deepspeed.micro_batch_size"
            + ("" if run.model.grad_checkpointing else ", turn on model.grad_checkpointing")
            + " or offload (deepspeed.offload_optimizer)"
        )
        stage = 3
    elif stage != run.deepspeed.zero_stage:
        lines.append(
            f"the smallest ZeRO stage that fits: deepspeed.zero_stage={stage} (ZeRO-1 and 2 "
            "communicate as much as ZeRO-0, ZeRO-3 half as much again)"
        )
    per_device = run.train.global_batch_size // device.count
    staged = memory_for(with_changes(run, zero_stage=stage), device.count, plan.params,
                        plan.micro_batch)  # fmt: skip
    fixed = staged.total - staged.activations  # what the micro-batch does not change
    checkpointing = run.model.grad_checkpointing
    fitting = [
        m for m in range(1, per_device + 1)
        if per_device % m == 0 and fixed + activation_bytes(run, m, checkpointing) <= usable
    ]  # fmt: skip
    if checkpointing:
        total = plan.memory.total - plan.memory.activations + plan.activations_other
        if total <= usable:
            lines.append(
                f"it also fits without activation checkpointing ({total / GB:.1f} GB), which saves "
                "recomputing the forward: model.grad_checkpointing=false"
            )
    if fitting and fitting[-1] != plan.micro_batch:
        lines.append(
            f"the largest micro-batch that fits at ZeRO-{stage}: "
            f"deepspeed.micro_batch_size={fitting[-1]} ({per_device // fitting[-1]} accumulation "
            "steps)"
        )
    return lines


def _gb(x: float) -> str:
    return f"{x / GB:10.2f}"


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} minutes"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 86400:.1f} days"


def teacher_lines(plan: Plan) -> list[str]:
    run = plan.run
    if not run.train.teacher:
        return []
    if plan.teacher is None:
        why = teacher_model(run.train.teacher, run.data.endpoint_url)
        return [f"  teacher: not counted, {run.train.teacher}: {why}"]
    name = f"  teacher {plan.teacher.name} (whole, forward bound)"
    return [f"{name:<44}{_gb(plan.memory.teacher)}"]


def report(plan: Plan) -> str:
    run, d, m = plan.run, plan.device, plan.memory
    ds = run.deepspeed
    stage = ds.zero_stage
    split = {0: "", 1: "optimizer split", 2: "gradients and optimizer split",
             3: "everything split"}[stage]  # fmt: skip
    ckpt = "on" if run.model.grad_checkpointing else "off"
    other = "off" if run.model.grad_checkpointing else "on"
    cfg = run.model
    moments = "Adam m and v" if run.optim.name == "adamw" else "SGD momentum"
    states = (
        f"{cfg.num_tokens} tokens" if hasattr(cfg, "num_tokens")
        else f"{cfg.final_side}x{cfg.final_side} final map"
    )  # fmt: skip
    lines = [
        f"{cfg.name}: {plan.params / 1e6:,.1f}M parameters, {states}; "
        f"{d.count} devices, ZeRO-{stage} ({split or 'nothing split'}), {ds.precision}",
        f"batch {run.train.global_batch_size} = {d.count} devices x micro-batch "
        f"{plan.micro_batch} x {plan.accum} accumulation steps",
        "",
        f"{'memory per device':<44}{'GB':>10}",
        f"{'  weights':<44}{_gb(m.params)}",
        f"{'  gradients':<44}{_gb(m.grads)}",
        f"{'  optimizer (fp32 master, ' + moments + ')':<44}{_gb(m.optimizer)}",
        f"{f'  activations (checkpointing {ckpt})':<44}{_gb(m.activations)}"
        f"   ({other}: {plan.activations_other / GB:.2f})",
        f"{'  DeepSpeed buffers':<44}{_gb(m.buffers)}",
        *teacher_lines(plan),
        f"{'  total':<44}{_gb(m.total)}   of {d.memory / GB:.0f} GB: "
        + ("fits" if plan.fits else f"DOES NOT FIT (keeping {1 - FIT_FRACTION:.0%} free)"),
    ]
    if m.host:
        lines.append(f"{'  offloaded to host memory':<44}{_gb(m.host)}")
    flops = run.model.train_flops()
    lines += [
        "",
        "compute",
        f"{'  training FLOPs per image':<44}{flops / 1e9:10.1f} G",
        f"{'  FLOPs per step':<44}{plan.step_flops:10.3g}",
        f"{f'  step time at {d.mfu:.0%} MFU of {d.peak_flops / 1e12:g} TFLOP/s':<44}"
        f"{plan.step_seconds:10.3f} s",
        f"{'  images/s':<44}{plan.images_per_second:10,.0f}",
        f"{f'  {run.train.steps:,} steps':<44}{_duration(plan.train_seconds):>10}, "
        f"{plan.train_seconds * d.count / 3600:,.0f} device-hours",
    ]
    if plan.teacher:
        lines.insert(
            lines.index("compute") + 2,
            f"{'  teacher forward FLOPs per image':<44}{plan.teacher.forward_flops() / 1e9:10.1f} G",
        )
    if run.model.grad_checkpointing:
        lines.append("  (checkpointing recomputes the forward: hardware does 4/3 of these FLOPs)")
    advice = suggestions(plan)
    if advice:
        lines += ["", *advice]
    return "\n".join(lines)
