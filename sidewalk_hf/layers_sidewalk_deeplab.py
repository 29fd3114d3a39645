"""CPU speed-ups and inference-time rewrites that leave the model's outputs unchanged.

`AtrousConv2d` is the ASPP's dilated convolution without the work that only reads padding, and
`fold_batch_norms` folds eval-mode batch norms into the convolutions before them. Both keep `nn.Conv2d`'s
parameters and names, so checkpoints do not change. This file ships beside `modeling_sidewalk_deeplab.py` as
remote code, so it imports only torch.
"""

import itertools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def live_tap_offsets(size: int, kernel_size: int, dilation: int) -> list[tuple[int, int, int]]:
    """`(tap, first output row, end output row)` for the taps of a "same" convolution that read any data.

    Tap t reads the input at `row + (t - kernel_size // 2) * dilation`; rows where that falls in the padding
    contribute nothing, and a tap whose every row does is left out.
    """
    taps = []
    for tap in range(kernel_size):
        offset = (tap - kernel_size // 2) * dilation
        start, end = max(0, -offset), min(size, size - offset)
        if start < end:
            taps.append((tap, start, end))
    return taps


class _PaddingSkippingConv2dFunction(torch.autograd.Function):
    """A "same" dilated convolution whose weight gradient only visits taps and rows that read data.

    oneDNN's forward and input gradient already skip the padding of large dilations, but its weight gradient
    does not: on a 16x16 map (a 256-px chip at output stride 16) the dilation-12 ASPP branch's weight
    gradient ran 6x slower than its forward. Summing the gradient tap by tap over the rows each tap reads is
    the same sum without the zeros.
    """

    @staticmethod
    def forward(ctx, inputs, weight, padding, dilation):
        ctx.save_for_backward(inputs, weight)
        ctx.padding, ctx.dilation = padding, dilation
        return F.conv2d(inputs, weight, padding=padding, dilation=dilation)

    @staticmethod
    def backward(ctx, grad_output):
        inputs, weight = ctx.saved_tensors
        grad_inputs = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_inputs = torch.ops.aten.convolution_backward(
                grad_output,
                inputs,
                weight,
                None,
                [1, 1],
                list(ctx.padding),
                list(ctx.dilation),
                False,
                [0, 0],
                1,
                [True, False, False],
            )[0]
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros_like(weight)
            height, width = inputs.shape[-2:]
            rows = live_tap_offsets(height, weight.shape[-2], ctx.dilation[0])
            cols = live_tap_offsets(width, weight.shape[-1], ctx.dilation[1])
            centre_row, centre_col = weight.shape[-2] // 2, weight.shape[-1] // 2
            for row_tap, row_start, row_end in rows:
                row_shift = (row_tap - centre_row) * ctx.dilation[0]
                for col_tap, col_start, col_end in cols:
                    col_shift = (col_tap - centre_col) * ctx.dilation[1]
                    grad_weight[:, :, row_tap, col_tap] = torch.einsum(
                        "nohw,nchw->oc",
                        grad_output[:, :, row_start:row_end, col_start:col_end],
                        inputs[
                            :,
                            :,
                            row_start + row_shift : row_end + row_shift,
                            col_start + col_shift : col_end + col_shift,
                        ],
                    )
        return grad_inputs, grad_weight, None, None


class AtrousConv2d(nn.Conv2d):
    """A dilated "same" convolution (stride 1, odd kernel, padding `dilation * (kernel - 1) / 2`) that does
    not compute what only ever reads padding. Outputs and gradients are those of `nn.Conv2d`.

    ASPP's large rates meet small feature maps: a 256-px chip gives a 16x16 map at output stride 16, on which
    the rate-18 branch reads data through its centre tap only, so it runs as a 1x1 convolution with that tap.
    Otherwise, when training on a CPU (float32, float64 or bf16 autocast) with fewer than half of the tap
    positions reading data (the rate-12 branch at 256 and 320 px), the weight gradient is summed over those
    positions alone.
    The parameters are `nn.Conv2d`'s, so checkpoints are unchanged. `skip_padding` switches this off (to
    count the dense convolution's FLOPs, or to compare).
    """

    skip_padding = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        same_padding = tuple(d * (k - 1) // 2 for d, k in zip(self.dilation, self.kernel_size))
        if (
            self.stride != (1, 1)
            or self.groups != 1
            or self.padding != same_padding
            or self.padding_mode != "zeros"
            or any(k % 2 == 0 for k in self.kernel_size)
        ):
            raise ValueError(
                "AtrousConv2d needs stride 1, one group, an odd kernel and zero padding of "
                f"dilation * (kernel - 1) / 2; got stride {self.stride}, groups {self.groups}, kernel "
                f"{self.kernel_size}, padding {self.padding} ({self.padding_mode}), dilation {self.dilation}"
            )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.skip_padding:
            return super().forward(inputs)
        (height, width), (dilation_h, dilation_w) = inputs.shape[-2:], self.dilation
        if dilation_h >= height and dilation_w >= width:
            centre = self.weight[
                :,
                :,
                self.kernel_size[0] // 2 : self.kernel_size[0] // 2 + 1,
                self.kernel_size[1] // 2 : self.kernel_size[1] // 2 + 1,
            ]
            return F.conv2d(inputs, centre, self.bias)
        if (
            self.bias is None
            and inputs.device.type == "cpu"
            and torch.is_grad_enabled()
            and self.weight.requires_grad
            and self.live_tap_fraction(height, width) < 0.5
        ):
            if not torch.is_autocast_enabled("cpu"):
                return _PaddingSkippingConv2dFunction.apply(inputs, self.weight, self.padding, self.dilation)
            # What autocast does for a convolution: both operands in the autocast dtype (bf16 on CPUs).
            dtype = torch.get_autocast_dtype("cpu")
            with torch.autocast("cpu", enabled=False):
                return _PaddingSkippingConv2dFunction.apply(
                    inputs.to(dtype), self.weight.to(dtype), self.padding, self.dilation
                )
        return super().forward(inputs)

    def live_tap_fraction(self, height: int, width: int) -> float:
        """The fraction of (tap, output position) pairs that read data rather than padding."""
        live = [
            sum(end - start for _, start, end in live_tap_offsets(size, kernel, dilation)) / (kernel * size)
            for size, kernel, dilation in zip((height, width), self.kernel_size, self.dilation)
        ]
        return live[0] * live[1]


def fold_batch_norms(model: nn.Module, sequential_containers: tuple[type[nn.Module], ...]) -> int:
    """Fold each eval-mode `BatchNorm2d` that directly follows a convolution into it; returns how many.

    Inference only: the convolution gets the normalisation's scale and shift (`fuse_conv_bn_eval`) and the
    normalisation becomes an identity, so every convolution-normalisation pair runs as one convolution. Only
    `sequential_containers`, the module types known to run their children in registration order (so that a
    norm registered right after a convolution normalises exactly its output), are looked into; norms
    elsewhere, and timm's fused norm-activation layers, are left as they are.
    """
    folded = 0
    for container in list(model.modules()):
        if not isinstance(container, sequential_containers):
            continue
        names = list(container._modules)
        for conv_name, norm_name in itertools.pairwise(names):
            norm, owner = container._modules[norm_name], container
            conv = container._modules[conv_name]
            while isinstance(conv, nn.Sequential) and len(conv) > 0:  # a stem ending in a convolution
                owner, conv_name = conv, str(len(conv) - 1)
                conv = conv[-1]
            if type(norm) is not nn.BatchNorm2d or not isinstance(conv, nn.Conv2d):
                continue
            if not norm.track_running_stats or conv.training or norm.training:
                continue
            setattr(owner, conv_name, fuse_conv_bn_eval(conv, norm))
            setattr(container, norm_name, nn.Identity())
            folded += 1
    return folded
