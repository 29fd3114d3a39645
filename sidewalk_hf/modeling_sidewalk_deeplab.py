"""DeepLabV3+ for sidewalks: a timm encoder, Detectron2's DeepLabV3+ decoder, hard pixel mining loss.

The decoder, the dilations and the upsampling follow Detectron2's `projects/DeepLab` exactly, so that its
Cityscapes checkpoints convert to this model with identical logits. Two deliberate differences: inputs arrive
normalised (the image processor normalises, as everywhere in transformers), and the ASPP image pooling is
global, which equals Detectron2's fixed pooling kernel at its training crop size and works at any input size.
The CPU speed-ups (`AtrousConv2d`) and the batch-norm folding of `optimize_for_inference` live in
`layers_sidewalk_deeplab.py` beside this file; they change no output.
"""

import timm
import torch
import torch.nn.functional as F
from timm.models import FeatureDictNet
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.utils import logging

from .configuration_sidewalk_deeplab import SidewalkDeepLabConfig
from .layers_sidewalk_deeplab import AtrousConv2d, fold_batch_norms

logger = logging.get_logger(__name__)

LOW_LEVEL_FEATURE_STRIDE = 4


def hard_pixel_mining_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    ignore_index: int = 255,
    top_k_percent_pixels: float = 1.0,
) -> torch.Tensor:
    """Detectron2's `DeepLabCE`: per-pixel (class-weighted) cross-entropy averaged over the hardest pixels.

    Every pixel of the batch gets the loss `class_weights[label] * -log softmax(logits)[label]`, and ignored
    pixels get exactly 0. With `top_k_percent_pixels == 1.0` the result is the sum of those losses divided by
    the number of pixels in the batch, N·H·W, ignored pixels included; it is divided neither by the number of
    valid pixels nor by the sum of their class weights, unlike `nn.CrossEntropyLoss(reduction="mean")`.
    Otherwise the `k = int(top_k_percent_pixels * N·H·W)` largest pixel losses of the whole batch (not per
    image) are kept and the result is their sum divided by k (k is at least 1). A batch whose pixels are all
    ignored gives 0.

    Args:
        logits: `(N, C, H, W)` scores; the loss is computed in float32 whatever their dtype.
        labels: `(N, H, W)` integer class ids, `ignore_index` where unlabelled.
        class_weights: `(C,)` weights, or `None` for equal weights.
        ignore_index: label value that contributes no loss.
        top_k_percent_pixels: fraction in (0, 1] of the pixels whose losses are averaged.
    """
    if logits.shape[-2:] != labels.shape[-2:] or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match logits of shape {tuple(logits.shape)}; "
            "expected labels of shape (batch, height, width) matching the logits"
        )
    if class_weights is not None:
        class_weights = class_weights.to(device=logits.device, dtype=torch.float32)
    pixel_losses = F.cross_entropy(
        logits.float(), labels.long(), weight=class_weights, ignore_index=ignore_index, reduction="none"
    ).flatten()
    if top_k_percent_pixels == 1.0:
        return pixel_losses.mean()
    num_hardest = max(1, int(top_k_percent_pixels * pixel_losses.numel()))
    hardest_losses, _ = torch.topk(pixel_losses, num_hardest)
    return hardest_losses.mean()


class ConvNormReLU(nn.Module):
    """Detectron2's `Conv2d(..., norm=BN, activation=relu)`: a bias-free convolution, BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1):
        super().__init__()
        conv_class = AtrousConv2d if dilation > 1 else nn.Conv2d
        self.conv = conv_class(
            in_channels,
            out_channels,
            kernel_size,
            padding=dilation * (kernel_size - 1) // 2,
            dilation=dilation,
            bias=False,
        )
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(hidden_states)))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling as in Detectron2's `layers/aspp.py`, with global image pooling.

    Branches, concatenated in this order: a 1x1 convolution, one 3x3 atrous convolution per dilation, and
    image pooling. The pooling branch is a convolution with bias and a ReLU but no normalisation, as in
    Detectron2, so a batch of one trains; its output is broadcast back to the feature size (what Detectron2's
    bilinear resize of a 1x1 map computes).

    Args:
        in_channels: channels of the deepest backbone feature.
        out_channels: channels of every branch and of the projection.
        dilations: rates of the 3x3 atrous branches.
        dropout: dropout probability after the projection, active in training only.
    """

    def __init__(self, in_channels: int, out_channels: int, dilations: list[int], dropout: float):
        super().__init__()
        self.branches = nn.ModuleList(
            [ConvNormReLU(in_channels, out_channels, 1)]
            + [ConvNormReLU(in_channels, out_channels, 3, dilation=dilation) for dilation in dilations]
        )
        self.image_pooling_conv = nn.Conv2d(in_channels, out_channels, 1)
        self.project = ConvNormReLU((len(dilations) + 2) * out_channels, out_channels, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        branch_outputs = [branch(features) for branch in self.branches]
        pooled = F.relu(self.image_pooling_conv(F.adaptive_avg_pool2d(features, 1)))
        branch_outputs.append(pooled.expand(-1, -1, *features.shape[-2:]))
        return self.dropout(self.project(torch.cat(branch_outputs, dim=1)))


class WeightedDeepLabHead(nn.Module):
    """Detectron2's `DeepLabV3PlusHead`, with the class-weighted hard pixel mining loss it trains with.

    ASPP runs on the deepest feature; the stride-4 feature is projected to `config.project_channels`; the ASPP
    output is resized bilinearly to the projection's size and concatenated after it ([low-level, ASPP], the
    channel order Detectron2's fusion weights expect); two 3x3 convolutions fuse them and a 1x1 convolution
    with bias predicts the classes, at stride 4.

    Args:
        config: the model configuration (decoder sizes, labels, loss settings).
        low_level_channels: channels of the stride-4 backbone feature.
        high_level_channels: channels of the deepest backbone feature.
    """

    def __init__(self, config: SidewalkDeepLabConfig, low_level_channels: int, high_level_channels: int):
        super().__init__()
        # from_pretrained(..., id2label=...) sets config attributes after the config's own validation has run.
        if config.class_weights is not None and len(config.class_weights) != config.num_labels:
            raise ValueError(
                f"class_weights={config.class_weights} has {len(config.class_weights)} entries but the model "
                f"predicts {config.num_labels} classes; give one weight per label, or class_weights=None"
            )
        self.aspp = ASPP(
            high_level_channels, config.aspp_channels, config.aspp_dilations, config.aspp_dropout
        )
        self.low_level_projection = ConvNormReLU(low_level_channels, config.project_channels, 1)
        self.fuse = nn.Sequential(
            ConvNormReLU(config.project_channels + config.aspp_channels, config.decoder_channels, 3),
            ConvNormReLU(config.decoder_channels, config.decoder_channels, 3),
        )
        self.classifier = nn.Conv2d(config.decoder_channels, config.num_labels, 1)
        # Plain Python values, not buffers: buffers would not survive transformers' meta-device loading.
        self.class_weights = config.class_weights
        self.ignore_index = config.ignore_index
        self.top_k_percent_pixels = config.top_k_percent_pixels

    def forward(self, low_level_features: torch.Tensor, high_level_features: torch.Tensor) -> torch.Tensor:
        context = self.aspp(high_level_features)
        low_level = self.low_level_projection(low_level_features)
        context = F.interpolate(context, size=low_level.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(torch.cat([low_level, context], dim=1)))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of full-resolution `logits` against `labels`; see `hard_pixel_mining_cross_entropy`."""
        class_weights = None if self.class_weights is None else torch.tensor(self.class_weights)
        return hard_pixel_mining_cross_entropy(
            logits, labels, class_weights, self.ignore_index, self.top_k_percent_pixels
        )


def create_backbone(config: SidewalkDeepLabConfig) -> nn.Module:
    """The timm encoder returning [the stride-4 feature, the deepest feature], dilated as DeepLab wants.

    Always built with `pretrained=False`: transformers constructs models on the meta device when loading, and
    weights come from the checkpoint being loaded (or from `convert_detectron2.load_detectron2_weights`).
    """
    try:
        with torch.device("meta"):
            probe = timm.create_model(
                config.backbone,
                features_only=True,
                in_chans=config.num_channels,
                output_stride=config.output_stride,
            )
    except TypeError as error:
        raise ValueError(
            f"timm backbone {config.backbone!r} cannot be built with features_only=True and "
            f"output_stride={config.output_stride}: {error}"
        ) from error
    strides = probe.feature_info.reduction()
    if LOW_LEVEL_FEATURE_STRIDE not in strides:
        raise ValueError(
            f"backbone {config.backbone!r} has no stride-{LOW_LEVEL_FEATURE_STRIDE} feature (feature "
            f"strides: {strides}); DeepLabV3+ fuses one with the ASPP output"
        )
    if strides[-1] != config.output_stride:
        raise ValueError(
            f"backbone {config.backbone!r} ignores output_stride={config.output_stride} (its deepest feature "
            f"has stride {strides[-1]}); use a backbone that supports dilation or set "
            f"output_stride={strides[-1]}"
        )
    out_indices = (strides.index(LOW_LEVEL_FEATURE_STRIDE), len(strides) - 1)
    backbone = timm.create_model(
        config.backbone,
        pretrained=False,
        features_only=True,
        in_chans=config.num_channels,
        output_stride=config.output_stride,
        out_indices=out_indices,
    )
    apply_multi_grid_dilations(backbone, config)
    return backbone


def apply_multi_grid_dilations(backbone: nn.Module, config: SidewalkDeepLabConfig) -> None:
    """Dilate the last stage's blocks as Detectron2 does: block j at `(32 / output_stride) * multi_grid[j]`.

    timm dilates a stage uniformly and keeps the previous dilation in its first block (1, 2, 2 at output
    stride 16), whereas Detectron2's DeepLab ResNet uses 2, 4, 8; converted checkpoints only reproduce their
    logits with the latter. Only timm ResNet blocks (`Bottleneck`, `BasicBlock`) are patched: their 3x3
    convolutions get the block's dilation and the matching padding. Other backbones keep timm's dilations.
    """
    last_stage_name = backbone.feature_info.module_name()[-1].replace(".", "_")
    last_stage = getattr(backbone, last_stage_name, None)
    blocks = list(last_stage.children()) if isinstance(last_stage, nn.Sequential) else []
    if not blocks or not all(isinstance(block, (Bottleneck, BasicBlock)) for block in blocks):
        logger.info(
            "Backbone %s has no ResNet blocks in its last stage %r; res5_multi_grid is not applied.",
            config.backbone,
            last_stage_name,
        )
        return
    if len(blocks) != len(config.res5_multi_grid):
        raise ValueError(
            f"res5_multi_grid={config.res5_multi_grid} has {len(config.res5_multi_grid)} entries but the "
            f"last stage of backbone {config.backbone!r} has {len(blocks)} blocks; give one per block"
        )
    base_dilation = 32 // config.output_stride
    for block, multiplier in zip(blocks, config.res5_multi_grid):
        dilation = base_dilation * multiplier
        convs_3x3 = (block.conv2,) if isinstance(block, Bottleneck) else (block.conv1, block.conv2)
        for conv in convs_3x3:
            conv.dilation = (dilation, dilation)
            conv.padding = tuple(dilation * (size - 1) // 2 for size in conv.kernel_size)


def upsample_logits(logits: torch.Tensor, scale_factor: int, output_size: tuple[int, int]) -> torch.Tensor:
    """Detectron2's route to input-size logits: bilinear x`scale_factor`, crop to the input, resize if short.

    The crop is the identity when the input size is a multiple of the backbone's output stride; the final
    resize only happens for backbones whose strided layers round sizes down.
    """
    logits = F.interpolate(logits, scale_factor=scale_factor, mode="bilinear", align_corners=False)
    logits = logits[..., : output_size[0], : output_size[1]]
    if tuple(logits.shape[-2:]) != tuple(output_size):
        logits = F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)
    return logits


class SidewalkDeepLabForSemanticSegmentation(PreTrainedModel):
    """DeepLabV3+ (timm encoder + `WeightedDeepLabHead`) returning logits at the input's height and width.

    `pixel_values` must already be normalised by the image processor (`(x - image_mean) / image_std` per band
    on the 0-255 scale). With `labels`, the output also carries the hard pixel mining loss of `config`.
    """

    config_class = SidewalkDeepLabConfig
    base_model_prefix = "sidewalk_deeplab"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: SidewalkDeepLabConfig):
        super().__init__(config)
        self.backbone = create_backbone(config)
        low_level_channels, high_level_channels = self.backbone.feature_info.channels()
        self.decode_head = WeightedDeepLabHead(config, low_level_channels, high_level_channels)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialise the decoder as Detectron2 does and leave the backbone alone.

        timm initialises the backbone when it is built, and pretrained backbone weights are loaded after
        construction; transformers' generic initialisation would overwrite both. `torch.nn.init` calls are
        guarded by transformers, so tensors loaded from a checkpoint are not re-initialised.
        """
        if not any(module is head_module for head_module in self.decode_head.modules()):
            return
        if module is self.decode_head.classifier:
            nn.init.normal_(module.weight, std=0.001)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            # Detectron2's c2_xavier_fill.
            nn.init.kaiming_uniform_(module.weight, a=1)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            nn.init.zeros_(module.running_mean)
            nn.init.ones_(module.running_var)
            nn.init.zeros_(module.num_batches_tracked)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also map `AutoModel` in `auto_map`: `register_for_auto_class` records a single Auto class."""
        if getattr(self, "_optimized_for_inference", False):
            raise RuntimeError(
                "this model was prepared with optimize_for_inference(): its batch norms are folded into its "
                "convolutions and its weights no longer match its config; save it before optimizing"
            )
        if getattr(self, "_auto_class", None) is not None:
            module_name = type(self).__module__.split(".")[-1]
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoModel": f"{module_name}.{type(self).__name__}",
            }
        return super().save_pretrained(save_directory, *args, **kwargs)

    def optimize_for_inference(self, channels_last: bool = True) -> "SidewalkDeepLabForSemanticSegmentation":
        """Switch to eval mode, fold every batch norm into the convolution before it and, by default, move to
        channels-last: the same class maps (logits equal up to float rounding) for less work per image.

        For inference only: the model can no longer be trained or saved (it lacks its batch norms), so save
        first. Returns the model, to chain after `from_pretrained(...)`.
        """
        self.eval()
        fold_batch_norms(self, SEQUENTIAL_CONTAINERS)
        self._optimized_for_inference = True
        if channels_last:
            self.to(memory_format=torch.channels_last)
        return self

    def train(self, mode: bool = True):
        if mode and getattr(self, "_optimized_for_inference", False):
            raise RuntimeError(
                "this model was prepared with optimize_for_inference(): its batch norms are folded into its "
                "convolutions, so it cannot train; load it again with from_pretrained to train"
            )
        return super().train(mode)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> SemanticSegmenterOutput | tuple:
        r"""
        Args:
            pixel_values: `(batch, num_channels, height, width)` normalised images, any height and width.
            labels: `(batch, height, width)` class ids, `config.ignore_index` where unlabelled.
            output_hidden_states: also return the two backbone features (stride 4, deepest).
            return_dict: return a `SemanticSegmenterOutput` (default) rather than a tuple.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        low_level_features, high_level_features = self.backbone(pixel_values)
        logits = self.decode_head(low_level_features, high_level_features)
        logits = upsample_logits(logits, LOW_LEVEL_FEATURE_STRIDE, pixel_values.shape[-2:])
        loss = self.decode_head.loss(logits, labels) if labels is not None else None
        hidden_states = (low_level_features, high_level_features) if output_hidden_states else None

        if not return_dict:
            output = (logits,) + ((hidden_states,) if hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=hidden_states)


def convert_batchnorm_to_sync(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm (timm's norm+activation layers included) by its synchronised version.

    For training on several GPUs only, so that batch statistics span all of them: SyncBatchNorm needs a CUDA
    process group and does not run in CPU processes. State-dict keys are unchanged, so checkpoints and
    `save_pretrained` folders stay interchangeable (they reload as plain BatchNorm). timm's converter is used
    because torch's would turn timm's `BatchNormAct2d` into a plain `SyncBatchNorm` and silently drop its
    activation.
    """
    return timm.layers.convert_sync_batchnorm(model)


# Containers whose children run one after the other in registration order, so that a BatchNorm registered
# right after a convolution normalises exactly that convolution's output.
SEQUENTIAL_CONTAINERS = (nn.Sequential, FeatureDictNet, ConvNormReLU, Bottleneck, BasicBlock)
