"""ResNet (He et al. 2016), ResNeXt (Xie et al. 2017) and BiT's ResNet (Kolesnikov et al. 2020).

Image (B, C, H, W) -> stem (7x7 stride-2 convolution, norm, ReLU, 3x3 stride-2 max pool; for
28-32 px images one 3x3 stride-1 convolution) -> four stages of bottleneck blocks, each a 1x1
convolution down to the bottleneck width, a 3x3 (grouped into `groups` paths for ResNeXt) with
the stage's stride, a 1x1 up to 4x the stage's base width, added to the input (projected where
the shape changes) -> global average pool -> linear head. Each stage doubles the widths and
halves the side; the stride sits on the 3x3 convolution, as in torchvision and timm ("v1.5").

`variant="bit"` is BiT's ResNet-v2: pre-activation blocks (norm and ReLU before each
convolution), GroupNorm (32 groups) and weight-standardised convolutions, so that nothing depends
on the batch: large-batch pretraining across many ranks needs no statistics in step.

BatchNorm keeps its running statistics and its arithmetic in fp32 when the model is cast to bf16
(`BatchNorm`). Its statistics are per rank unless the trainer hands the model a reduction
(`set_batchnorm_sync`): the model only calls it, and knows nothing about ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import require
from pipeline.models.layers import Backbone, DropPath, TrainFlops, class_head

BITS_GROUPS = 32  # GroupNorm groups in BiT


@dataclass(frozen=True)
class Conv:
    """One convolution of the network, for counting: channels in and out, kernel side, groups,
    side of its output map."""

    c_in: int
    c_out: int
    kernel: int
    groups: int
    side: int


@dataclass(frozen=True)
class ResNetConfig(TrainFlops):
    """Architecture of one ResNet/ResNeXt; a registry name fills it, a run config may override
    fields."""

    family: ClassVar[str] = "resnet"

    name: str = "resnet"
    image_size: int = 224  # pixels per side (square images)
    channels: int = 3
    depths: tuple[int, ...] = (3, 4, 6, 3)  # blocks per stage
    base_width: int = 64  # stage 1's base width: it outputs 4x this, each stage doubles it
    groups: int = 1  # ResNeXt's cardinality: paths of the grouped 3x3 convolution
    group_width: int = 64  # channels per path in stage 1 (ResNeXt 32x4d: 4), doubled per stage
    stem_width: int = 64  # channels of the stem's convolution
    small_stem: bool = False  # 28-32 px inputs: one 3x3 stride-1 convolution, no max pool
    variant: Literal["v1", "bit"] = "v1"  # bit: pre-activation, GroupNorm, standardised weights
    num_classes: int = 1000  # 0: no head, forward returns pooled features
    head_bias: float = 0.0
    drop_path: float = 0.0  # stochastic depth rate of the last block (linear from 0)
    grad_checkpointing: bool = False  # recompute block activations in backward

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(self.depths))  # a list from YAML or model.json
        for key in ("image_size", "channels", "base_width", "stem_width", "groups", "group_width"):
            require(getattr(self, key) > 0, key, getattr(self, key), "must be positive")
        require(
            len(self.depths) > 0 and all(d > 0 for d in self.depths),
            "depths", list(self.depths), "must be one or more positive block counts",
        )  # fmt: skip
        require(self.variant in ("v1", "bit"), "variant", self.variant, "allowed: v1, bit")
        if self.variant == "bit":
            for i in range(len(self.depths)):
                for c in (self.stage_width(i), self.out_width(i)):
                    require(
                        c % BITS_GROUPS == 0, "base_width", self.base_width,
                        f"BiT's GroupNorm needs channels divisible by {BITS_GROUPS} (stage {i} "
                        f"has {c})",
                    )  # fmt: skip
        require(self.num_classes >= 0, "num_classes", self.num_classes, "must be >= 0")
        require(0.0 <= self.drop_path < 1.0, "drop_path", self.drop_path, "must be in [0, 1)")

    def stage_width(self, i: int) -> int:
        """Bottleneck channels of stage i (what its grouped 3x3 convolution sees)."""
        return self.groups * self.group_width * 2**i

    def out_width(self, i: int) -> int:
        return 4 * self.base_width * 2**i

    @property
    def batchnorm(self) -> bool:
        return self.variant == "v1"

    @property
    def width(self) -> int:
        """Channels of the final feature map: what the head and the probes see."""
        return self.out_width(len(self.depths) - 1)

    @property
    def final_width(self) -> int:
        return self.width

    @property
    def depth(self) -> int:
        return sum(self.depths)

    @property
    def final_side(self) -> int:
        """Side of the last stage's feature map."""
        return list(self.blocks())[-1][4]

    @property
    def stem_sides(self) -> tuple[int, int]:
        """Side after the stem's convolution, and after its max pool (the first stage's input)."""
        if self.small_stem:
            return self.image_size, self.image_size
        conv = (self.image_size - 1) // 2 + 1
        return conv, (conv - 1) // 2 + 1

    def blocks(self) -> Iterator[tuple[int, int, int, int, int]]:
        """(stage, c_in, side_in, stride, side_out) of every block, in order."""
        c_in, side = self.stem_width, self.stem_sides[1]
        for i, n in enumerate(self.depths):
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                out = (side - 1) // stride + 1
                yield i, c_in, side, stride, out
                c_in, side = self.out_width(i), out

    def convs(self) -> Iterator[Conv]:
        """Every convolution of the network, stem first."""
        kernel = 3 if self.small_stem else 7
        yield Conv(self.channels, self.stem_width, kernel, 1, self.stem_sides[0])
        for i, c_in, side_in, stride, side in self.blocks():
            w, c = self.stage_width(i), self.out_width(i)
            yield Conv(c_in, w, 1, 1, side_in)
            yield Conv(w, w, 3, self.groups, side)
            yield Conv(w, c, 1, 1, side)
            if stride != 1 or c_in != c:
                yield Conv(c_in, c, 1, 1, side)

    def forward_flops(self) -> int:
        """FLOPs of one forward pass per image: the convolutions and the head (2 per MAC)."""
        convs = sum(
            2 * v.side**2 * v.kernel**2 * v.c_in // v.groups * v.c_out for v in self.convs()
        )
        return convs + 2 * self.width * self.num_classes

    def largest_weight(self) -> int:
        """Elements of the largest weight tensor (sizes DeepSpeed's ZeRO-3 buckets)."""
        biggest = max(v.kernel**2 * v.c_in // v.groups * v.c_out for v in self.convs())
        return max(biggest, self.width * self.num_classes)

    def largest_block(self) -> int:
        """Convolution weights of the largest block (what ZeRO-3 gathers at once)."""
        convs, sizes = list(self.convs())[1:], []
        for _, c_in, _, stride, _ in self.blocks():
            n = 4 if stride != 1 or c_in != convs[2].c_out else 3
            sizes.append(sum(v.kernel**2 * v.c_in // v.groups * v.c_out for v in convs[:n]))
            convs = convs[n:]
        return max(sizes)


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose running statistics stay fp32 when the model is cast to bf16 (or fp16),
    and whose normalisation runs in fp32 on a half-precision input (PyTorch's mixed-type kernel:
    the input is kept as it came, the output has its dtype). Averaged batch statistics in bf16
    would lose the small updates of a 0.1 momentum.

    `sync`, when set (`set_batchnorm_sync`): a differentiable sum over data-parallel ranks, so
    that training normalises with the statistics of the global batch."""

    sync: Callable[[torch.Tensor], torch.Tensor] | None = None
    # ZeRO-3's zero.Init casts every buffer to the training dtype as a module is built, not
    # through _apply; it keeps in fp32 the buffers a module names here (the attribute Hugging
    # Face models use, which DeepSpeed honours: data_types.keep_in_fp32_modules "auto").
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["running_mean", "running_var"]
    # True while activation checkpointing recomputes the block: the same batch statistics,
    # but the running ones are not updated a second time.
    recomputing: bool = False

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> BatchNorm:
        super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight.float(), self.bias.float()
        if not self.training or self.sync is None:
            mean, var = self.running_mean, self.running_var
            if self.training and self.recomputing:  # copies take the second update
                mean, var = mean.clone(), var.clone()
            elif self.training:
                self.num_batches_tracked.add_(1)  # as nn.BatchNorm2d counts
            return F.batch_norm(
                x, mean, var, weight, bias, self.training, self.momentum, self.eps
            )  # fmt: skip
        return self._synchronised(x, weight, bias)

    def _synchronised(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """Normalise with the mean and variance of every rank's batch: the per-channel sums and
        sums of squares (and the count) summed over ranks, in fp32. The sum is differentiable, so
        backward carries each rank's gradient of the statistics to every other, as
        SyncBatchNorm's backward does."""
        xf = x.float()
        count = torch.full((1,), x.numel() / x.shape[1], dtype=torch.float32, device=x.device)
        local = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count])
        total = self.sync(local)
        c = x.shape[1]
        n = total[-1]
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp_min(0)
        if not self.recomputing:
            self._track(mean, var, n)
        scale = weight * torch.rsqrt(var + self.eps)
        y = xf * scale[None, :, None, None] + (bias - mean * scale)[None, :, None, None]
        return y.to(x.dtype)

    @torch.no_grad()
    def _track(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        """Running statistics as F.batch_norm keeps them: the variance unbiased."""
        self.num_batches_tracked.add_(1)
        unbiased = var * (n / (n - 1).clamp_min(1))
        self.running_mean.lerp_(mean, self.momentum)
        self.running_var.lerp_(unbiased, self.momentum)


class StdConv2d(nn.Conv2d):
    """Convolution with weight standardisation (Qiao et al. 2019), as BiT: each filter is
    normalised to zero mean and unit variance before use, in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float()
        flat = w.flatten(1)
        mean = flat.mean(1, keepdim=True)
        var = flat.var(1, unbiased=False, keepdim=True)
        w = ((flat - mean) * torch.rsqrt(var + 1e-8)).view_as(w).to(x.dtype)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def conv(
    c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, std: bool = False
) -> nn.Conv2d:
    """Kaiming-normal (fan out) weights, no bias: a norm follows (or, in BiT, precedes) each."""
    cls = StdConv2d if std else nn.Conv2d
    layer = cls(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False)
    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
    return layer


def norm(channels: int, variant: str, zero: bool = False) -> nn.Module:
    """BatchNorm (v1) or GroupNorm (BiT); `zero`: gamma 0, so a residual block starts as the
    identity (Goyal et al. 2017, timm's zero_init_last)."""
    layer = BatchNorm(channels) if variant == "v1" else nn.GroupNorm(BITS_GROUPS, channels)
    if zero:
        nn.init.zeros_(layer.weight)
    return layer


class Bottleneck(nn.Module):
    """ResNet v1 block: relu(x' + bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x))))))))), with x' the
    input or its projection (timm's and torchvision's layout and names)."""

    def __init__(
        self, c_in: int, width: int, c_out: int, stride: int, groups: int, drop_path: float
    ) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv(c_in, width, 1), norm(width, "v1")
        self.conv2, self.bn2 = conv(width, width, 3, stride, groups), norm(width, "v1")
        self.conv3, self.bn3 = conv(width, c_out, 1), norm(c_out, "v1", zero=True)
        self.act = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(conv(c_in, c_out, 1, stride), norm(c_out, "v1"))
            if stride != 1 or c_in != c_out
            else None
        )
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.act(self.bn1(self.conv1(x)))
        y = self.act(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.act(self.drop_path(y) + shortcut)


class PreActBottleneck(nn.Module):
    """BiT's ResNet-v2 block: norm and ReLU before each convolution; the projection, where the
    shape changes, reads the pre-activated input (timm's resnetv2 names)."""

    def __init__(
        self, c_in: int, width: int, c_out: int, stride: int, groups: int, drop_path: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(BITS_GROUPS, c_in)
        self.conv1 = conv(c_in, width, 1, std=True)
        self.norm2 = nn.GroupNorm(BITS_GROUPS, width)
        self.conv2 = conv(width, width, 3, stride, groups, std=True)
        self.norm3 = nn.GroupNorm(BITS_GROUPS, width)
        self.conv3 = conv(width, c_out, 1, std=True)
        self.downsample = (
            conv(c_in, c_out, 1, stride, std=True) if stride != 1 or c_in != c_out else None
        )
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.norm1(x))
        shortcut = x if self.downsample is None else self.downsample(pre)
        y = self.conv1(pre)
        y = self.conv2(F.relu(self.norm2(y)))
        y = self.conv3(F.relu(self.norm3(y)))
        return self.drop_path(y) + shortcut


class Stem(nn.Module):
    """7x7 stride-2 convolution and 3x3 stride-2 max pool (ImageNet), or one 3x3 stride-1
    convolution (small images); v1 normalises and activates after the convolution, BiT only in
    its first block."""

    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        bit = cfg.variant == "bit"
        kernel = 3 if cfg.small_stem else 7
        self.conv = conv(cfg.channels, cfg.stem_width, kernel, 1 if cfg.small_stem else 2, std=bit)
        self.bn = nn.Identity() if bit else norm(cfg.stem_width, "v1")
        self.act = nn.Identity() if bit else nn.ReLU(inplace=True)
        if cfg.small_stem:
            self.pool: nn.Module = nn.Identity()
        elif bit:  # BiT pads with zeros, not -inf: its stem has no ReLU before the pool
            self.pool = nn.Sequential(nn.ConstantPad2d(1, 0.0), nn.MaxPool2d(3, 2))
        else:
            self.pool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.bn(self.conv(x))))


class ResNet(Backbone):
    """The blocks of all stages form one list (`blocks`), so that per-block checkpointing,
    `forward_features(layers=...)` and probes index them as a ViT's; `stage_of` says which
    stage a block is in (layer-wise lr decay goes by stage)."""

    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__(cfg.width)
        self.cfg = cfg
        self.stem = Stem(cfg)
        block = Bottleneck if cfg.variant == "v1" else PreActBottleneck
        blocks, self.stage_of = [], []
        for n, (i, c_in, _, stride, _) in enumerate(cfg.blocks()):
            rate = cfg.drop_path * n / max(cfg.depth - 1, 1)
            w, c = cfg.stage_width(i), cfg.out_width(i)
            blocks.append(block(c_in, w, c, stride, cfg.groups, rate))
            self.stage_of.append(i)
        self.blocks = nn.ModuleList(blocks)
        # BiT's blocks end unnormalised: a last norm and ReLU before pooling.
        self.norm = (
            nn.Sequential(nn.GroupNorm(BITS_GROUPS, cfg.width), nn.ReLU())
            if cfg.variant == "bit"
            else nn.Identity()
        )
        self.head = class_head(cfg.width, cfg.num_classes, cfg.head_bias)
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    @contextlib.contextmanager
    def recomputing(self, block: nn.Module) -> Iterator[None]:
        """While checkpointing recomputes `block`: its BatchNorms leave their running
        statistics alone (they were updated in the forward)."""
        norms = [m for m in block.modules() if isinstance(m, BatchNorm)]
        for m in norms:
            m.recomputing = True
        try:
            yield
        finally:
            for m in norms:
                m.recomputing = False

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> the first stage's input (B, base_width, H', W')."""
        self.check_images(x)
        return self.stem(x)

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        """Feature maps (B, C, H, W) -> their spatial average (B, C)."""
        return maps.mean(dim=(2, 3))

    def spatial(self, maps: torch.Tensor) -> torch.Tensor:
        return maps

    def set_batchnorm_sync(self, sync: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """Train with the statistics of every rank's batch: `sync` sums a tensor over ranks,
        differentiably (None: each rank its own)."""
        for m in self.modules():
            if isinstance(m, BatchNorm):
                m.sync = sync

    def running_stats(self) -> list[torch.Tensor]:
        """Every BatchNorm's running mean and variance (the trainer averages them over ranks
        before saving or evaluating); none in BiT."""
        return [
            t for m in self.modules() if isinstance(m, BatchNorm)
            for t in (m.running_mean, m.running_var)
        ]  # fmt: skip
