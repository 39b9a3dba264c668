"""Inference-only rewrite of EfficientNet-Lite0 blocks: BatchNorm folded into the convolutions and
TensorFlow 'SAME' padding turned into the convolution's own padding wherever it is symmetric.

Same function as the original modules (to float rounding); fewer passes over the activations, which is
what limits depthwise networks on CPUs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv whose output equals bn(conv(x)) in eval mode, with padding made native where possible."""
    pad = getattr(conv, "static_padding", None)
    pads = tuple(pad.padding) if isinstance(pad, nn.ZeroPad2d) else (0, 0, 0, 0)  # (left, right, top, bottom)
    symmetric = pads[0] == pads[1] and pads[2] == pads[3]
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
        padding=(pads[2], pads[0]) if symmetric else 0, groups=conv.groups, bias=True,
    )
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    if symmetric:
        return fused
    return nn.Sequential(nn.ZeroPad2d(pads), fused)


class FusedMBConv(nn.Module):
    """MBConv without squeeze-excite (Lite0 has none): expand 1x1 -> depthwise -> project 1x1 (+ skip)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        args = block._block_args
        self.expand = fold_conv_bn(block._expand_conv, block._bn0) if args.expand_ratio != 1 else None
        self.depthwise = fold_conv_bn(block._depthwise_conv, block._bn1)
        self.project = fold_conv_bn(block._project_conv, block._bn2)
        stride = args.stride if isinstance(args.stride, int) else args.stride[0]
        self.skip = block.id_skip and stride == 1 and args.input_filters == args.output_filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.expand(x)) if self.expand is not None else x
        y = self.project(F.relu6(self.depthwise(y)))
        return y + x if self.skip else y


def fuse_lite0_stem(conv: nn.Module, bn: nn.BatchNorm2d) -> nn.Module:
    return nn.Sequential(fold_conv_bn(conv, bn), nn.ReLU6())
