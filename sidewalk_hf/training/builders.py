"""What a run is built from: the model config, the model, optimizer, scheduler, the launcher's settings, and
the data streams with the one DataLoader factory that training, validation, the final evaluation and
``scripts/evaluate.py`` all use."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import torch
from accelerate import PartialState
from omegaconf import DictConfig

from ..configuration_sidewalk_deeplab import SidewalkDeepLabConfig
from ..data.streaming import SegmentationStream, StreamLoader, make_dataloader
from ..modeling_sidewalk_deeplab import SidewalkDeepLabForSemanticSegmentation, convert_batchnorm_to_sync
from .config import ConfigError
from .schedule import build_lr_scheduler
from .weights import load_initial_weights

logger = logging.getLogger(__name__)

# Settings both the config and `accelerate launch` / `accelerate config` can give: config key -> (the
# environment variable the launcher sets, the launcher's flag, the value when neither says). The launcher
# always sets the mixed precision ("no" unless told otherwise); the accumulation steps only with DeepSpeed.
LAUNCHER_SETTINGS = {
    "SOLVER.MIXED_PRECISION": ("ACCELERATE_MIXED_PRECISION", "--mixed_precision", "no"),
    "SOLVER.GRADIENT_ACCUMULATION_STEPS": (
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
        "--gradient_accumulation_steps",
        1,
    ),
}


def launcher_settings(cfg: DictConfig) -> dict[str, object]:
    """``{config key: value}`` for the settings the launcher may also give.

    A key left unset (null) takes the launcher's value, so ``accelerate launch --mixed_precision bf16`` is
    honoured; a key set to a value the launcher contradicts is an error naming both.
    """
    resolved = {}
    for key, (variable, flag, default) in LAUNCHER_SETTINGS.items():
        section, name = key.split(".")
        configured = cfg[section][name]
        launched = os.environ.get(variable)
        if launched is not None:
            launched = type(default)(launched.lower() if isinstance(default, str) else launched)
        if configured is not None and launched is not None and configured != launched:
            raise ConfigError(
                f"{key} is {configured!r} but the launcher set {launched!r} (accelerate launch {flag}, or "
                f"`accelerate config`; the launcher's default when neither says); leave {key} null to follow "
                f"the launcher, or pass accelerate launch {flag} {configured}"
            )
        resolved[key] = (
            configured if configured is not None else (launched if launched is not None else default)
        )
    return resolved


def per_process_batch_size(global_batch: int, num_processes: int, accumulation_steps: int) -> int:
    divisor = num_processes * accumulation_steps
    if global_batch % divisor:
        raise ConfigError(
            f"DATALOADER.BATCH_SIZE={global_batch} is the global batch and must divide evenly by "
            f"processes ({num_processes}) x SOLVER.GRADIENT_ACCUMULATION_STEPS ({accumulation_steps}) = {divisor}"
        )
    return global_batch // divisor


def model_config_from(cfg: DictConfig) -> SidewalkDeepLabConfig:
    labels = list(cfg.MODEL.LABELS)
    return SidewalkDeepLabConfig(
        backbone=cfg.MODEL.BACKBONE,
        num_channels=cfg.INPUT.NUM_CHANNELS,
        output_stride=cfg.MODEL.OUTPUT_STRIDE,
        res5_multi_grid=list(cfg.MODEL.RES5_MULTI_GRID),
        aspp_dilations=list(cfg.MODEL.ASPP_DILATIONS),
        aspp_channels=cfg.MODEL.ASPP_CHANNELS,
        aspp_dropout=cfg.MODEL.ASPP_DROPOUT,
        project_channels=cfg.MODEL.PROJECT_CHANNELS,
        decoder_channels=cfg.MODEL.DECODER_CHANNELS,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        ignore_index=cfg.MODEL.IGNORE_VALUE,
        class_weights=list(cfg.MODEL.LOSS.CLASS_WEIGHTS),
        top_k_percent_pixels=cfg.MODEL.LOSS.TOP_K_PERCENT_PIXELS,
        image_mean=list(cfg.INPUT.PIXEL_MEAN),
        image_std=list(cfg.INPUT.PIXEL_STD),
        # Large-area inference runs windows of this size: the ASPP's image pooling makes predictions depend on it.
        training_chip_size_px=cfg.INPUT.CROP_SIZE_PX,
    )


def memory_format_from(cfg: DictConfig) -> torch.memory_format:
    return torch.channels_last if cfg.SOLVER.CHANNELS_LAST else torch.contiguous_format


def build_model(
    cfg: DictConfig, model_config: SidewalkDeepLabConfig, *, load_weights: bool, multi_gpu: bool
) -> SidewalkDeepLabForSemanticSegmentation:
    """The model in the configured memory format; initial weights (``MODEL.WEIGHTS``) only for a new run."""
    model = SidewalkDeepLabForSemanticSegmentation(model_config)
    if cfg.MODEL.WEIGHTS and load_weights:
        logger.info("%s", load_initial_weights(model, cfg.MODEL.WEIGHTS))
    if cfg.MODEL.SYNC_BATCHNORM and multi_gpu:
        model = convert_batchnorm_to_sync(model)
    return model.to(memory_format=memory_format_from(cfg))


def optimizer_param_groups(model: torch.nn.Module, cfg: DictConfig) -> list[dict]:
    """Detectron2's grouping: normalisation parameters get WEIGHT_DECAY_NORM; biases WEIGHT_DECAY_BIAS
    when it is set (otherwise they decay like weights)."""
    norm_types = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)
    groups: dict[float, list[torch.nn.Parameter]] = {}
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            decay = cfg.SOLVER.WEIGHT_DECAY
            if isinstance(module, norm_types):
                decay = cfg.SOLVER.WEIGHT_DECAY_NORM
            if name == "bias" and cfg.SOLVER.WEIGHT_DECAY_BIAS is not None:
                decay = cfg.SOLVER.WEIGHT_DECAY_BIAS
            groups.setdefault(decay, []).append(param)
    return [{"params": params, "weight_decay": decay} for decay, params in groups.items()]


def build_optimizer(model: torch.nn.Module, cfg: DictConfig) -> torch.optim.SGD:
    return torch.optim.SGD(
        optimizer_param_groups(model, cfg),
        lr=cfg.SOLVER.BASE_LR,
        momentum=cfg.SOLVER.MOMENTUM,
        nesterov=cfg.SOLVER.NESTEROV,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: DictConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return build_lr_scheduler(
        optimizer,
        base_lr=cfg.SOLVER.BASE_LR,
        final_lr=cfg.SOLVER.FINAL_LR,
        max_iter=cfg.SOLVER.MAX_ITER,
        warmup_iters=cfg.SOLVER.WARMUP_ITERS,
        warmup_factor=cfg.SOLVER.WARMUP_FACTOR,
    )


def prepare_synthetic_dataset(cfg: DictConfig, state: PartialState) -> None:
    """Generate the synthetic dataset when the config points at it and it does not exist yet."""
    source = Path(cfg.DATASET.SOURCE)
    if source.exists() or not cfg.DATASET.SYNTHETIC.GENERATE_IF_MISSING or "synthetic" not in source.name:
        return
    with state.main_process_first():
        if state.is_main_process and not source.exists():
            from ..data.synthetic import generate_synthetic_dataset

            syn = cfg.DATASET.SYNTHETIC
            logger.info("generating the synthetic dataset in %s ...", source)
            generate_synthetic_dataset(
                source,
                num_train=syn.NUM_TRAIN,
                num_validation=syn.NUM_VALIDATION,
                num_test=syn.NUM_TEST,
                chip_size_px=syn.CHIP_SIZE_PX,
                seed=syn.SEED,
                num_shards=syn.NUM_SHARDS,
            )


def training_stream(cfg: DictConfig, processor, state: PartialState, micro_batch: int) -> SegmentationStream:
    return SegmentationStream(
        cfg.DATASET.SOURCE,
        cfg.DATASET.TRAIN_SPLIT,
        per_process_batch_size=micro_batch,
        training=True,
        process_index=state.process_index,
        num_processes=state.num_processes,
        seed=cfg.SEED,
        buffer_batches=cfg.DATALOADER.BUFFER_BATCHES,
        crop_size_px=cfg.INPUT.CROP_SIZE_PX,
        scale_range=tuple(cfg.INPUT.SCALE_RANGE),
        image_mean=processor.image_mean,
        image_std=processor.image_std,
        rescale_factor=processor.rescale_factor,
        num_channels=cfg.INPUT.NUM_CHANNELS,
        on_bad_sample=cfg.DATASET.ON_BAD_SAMPLE,
    )


def evaluation_stream(
    source: str,
    split: str,
    processor,
    state: PartialState,
    *,
    batch_size: int,
    seed: int = 0,
    num_channels: int | None = None,
    on_bad_sample: str = "skip",
) -> SegmentationStream:
    """Every sample of ``split`` exactly once across processes, normalised as ``processor`` says."""
    return SegmentationStream(
        source,
        split,
        per_process_batch_size=batch_size,
        training=False,
        process_index=state.process_index,
        num_processes=state.num_processes,
        seed=seed,
        image_mean=processor.image_mean,
        image_std=processor.image_std,
        rescale_factor=processor.rescale_factor,
        num_channels=num_channels,
        on_bad_sample=on_bad_sample,
    )


def evaluation_stream_from(cfg: DictConfig, split: str, processor, state: PartialState) -> SegmentationStream:
    """``evaluation_stream`` with the run's settings (validation during training, the final evaluation)."""
    return evaluation_stream(
        cfg.DATASET.SOURCE,
        split,
        processor,
        state,
        batch_size=cfg.DATALOADER.EVAL_BATCH_SIZE,
        seed=cfg.SEED,
        num_channels=cfg.INPUT.NUM_CHANNELS,
        on_bad_sample=cfg.DATASET.ON_BAD_SAMPLE,
    )


def _ignore_sigterm(worker_id: int) -> None:
    """A preempted node's SIGTERM also reaches DataLoader workers; the main process decides when they stop."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(stream: SegmentationStream, num_workers: int, seed: int) -> StreamLoader:
    """Batches come ready from the stream. A private generator seeds the workers, so creating a loader
    never draws from the global RNG (which a resumed run must continue exactly)."""
    return make_dataloader(
        stream,
        num_workers,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_ignore_sigterm,
    )
