"""The training loop, top to bottom: build -> prepare -> loop (step, log, evaluate, checkpoint) -> finish.

Run with ``accelerate launch scripts/train.py --config base.yaml``; the same code runs one CPU process,
several GPUs or several nodes. The data stream is not given to ``accelerator.prepare``: each process
already reads its own share (see ``sidewalk_hf.data.streaming``), and preparing it would shard it again.
"""

from __future__ import annotations

import logging
import math
import shutil
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, parse_flag_from_env, set_seed
from omegaconf import DictConfig
from tqdm.auto import tqdm

from ..configuration_sidewalk_deeplab import SidewalkDeepLabConfig
from ..data.streaming import SegmentationStream, batch_to_model_inputs
from ..datasets_from_geodata.card import pixel_rule_of_dataset
from ..evaluation import evaluate_model
from ..image_processing_sidewalk_deeplab import SidewalkImageProcessor
from ..modeling_sidewalk_deeplab import SidewalkDeepLabForSemanticSegmentation, convert_batchnorm_to_sync
from ..pictures import save_overlay_grid
from . import checkpoint as ckpt
from .config import ConfigError, load_config, to_flat_dict, to_yaml
from .finish import finish_run
from .run_folder import (
    JsonlTracker,
    environment_record,
    new_run_dir,
    truncate_metrics_after,
    write_json_atomic,
    write_run_description,
)
from .schedule import build_lr_scheduler
from .weights import load_initial_weights

logger = logging.getLogger(__name__)

METRIC_KEYS = ("mean_iou", "background_iou", "sidewalk_iou", "pixel_accuracy")


class NonFiniteLossError(RuntimeError):
    """The loss (hence the gradient norm) was NaN or infinite; the last good checkpoint is left intact."""


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


def per_process_batch_size(global_batch: int, num_processes: int, accumulation_steps: int) -> int:
    divisor = num_processes * accumulation_steps
    if global_batch % divisor:
        raise ConfigError(
            f"DATALOADER.BATCH_SIZE={global_batch} is the global batch and must divide evenly by "
            f"processes ({num_processes}) x SOLVER.GRADIENT_ACCUMULATION_STEPS ({accumulation_steps}) = {divisor}"
        )
    return global_batch // divisor


class _TerminationFlag:
    """Set by SIGTERM (a preempted node): the loop checkpoints at the end of the step and exits cleanly."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def _ignore_sigterm(worker_id: int) -> None:
    """A preempted node's SIGTERM also reaches DataLoader workers; the main process decides when they stop."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _make_loader(stream: SegmentationStream, num_workers: int, seed: int):
    """Batches come ready from the stream. A private generator seeds the workers, so creating a loader
    never draws from the global RNG (which a resumed run must continue exactly)."""
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_ignore_sigterm,
    )


def _prepare_dataset(cfg: DictConfig, state: PartialState) -> None:
    """Generate the synthetic dataset when the config points at it and it does not exist yet."""
    source = Path(cfg.DATASET.SOURCE)
    if source.exists() or not cfg.DATASET.SYNTHETIC.GENERATE_IF_MISSING or "synthetic" not in source.name:
        return
    with state.main_process_first():
        if state.is_main_process and not source.exists():
            from ..data.synthetic import generate_synthetic_dataset

            syn = cfg.DATASET.SYNTHETIC
            print(f"generating the synthetic dataset in {source} ...", flush=True)
            generate_synthetic_dataset(
                source,
                num_train=syn.NUM_TRAIN,
                num_validation=syn.NUM_VALIDATION,
                num_test=syn.NUM_TEST,
                chip_size_px=syn.CHIP_SIZE_PX,
                seed=syn.SEED,
                num_shards=syn.NUM_SHARDS,
            )


def _evaluation_stream(cfg, split, processor, state) -> SegmentationStream:
    return SegmentationStream(
        cfg.DATASET.SOURCE,
        split,
        per_process_batch_size=cfg.DATALOADER.EVAL_BATCH_SIZE,
        training=False,
        process_index=state.process_index,
        num_processes=state.num_processes,
        seed=cfg.SEED,
        image_mean=processor.image_mean,
        image_std=processor.image_std,
        rescale_factor=processor.rescale_factor,
        num_channels=cfg.INPUT.NUM_CHANNELS,
        on_bad_sample=cfg.DATASET.ON_BAD_SAMPLE,
    )


def save_pretrained_folder(model, processor, out_dir: Path, accelerator: Accelerator) -> None:
    """``save_pretrained`` (weights, config, remote code) plus the image processor, swapped in atomically."""
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(tmp, state_dict=accelerator.get_state_dict(model, unwrap=True))
        processor.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    accelerator.wait_for_everyone()


def train(cfg: DictConfig, *, run_dir: Path | None = None, argv: list[str] | None = None) -> Path:
    """Train (or, when ``run_dir`` holds checkpoints, resume) and return the run folder."""
    # The run folder is named once, on the main process, before the Accelerator that logs into it exists.
    # (Accelerator() honours ACCELERATE_USE_CPU by itself; a bare PartialState must be told.)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if run_dir is None:
        run_dir = new_run_dir(cfg.OUTPUT.ROOT, cfg.OUTPUT.NAME) if state.is_main_process else None
        run_dir = broadcast_object_list([run_dir])[0]
    run_dir = Path(run_dir)
    resuming = bool(ckpt.complete_checkpoints(run_dir / "checkpoints"))

    accumulation = cfg.SOLVER.GRADIENT_ACCUMULATION_STEPS
    micro_batch = per_process_batch_size(cfg.DATALOADER.BATCH_SIZE, state.num_processes, accumulation)
    accelerator = Accelerator(
        mixed_precision=cfg.SOLVER.MIXED_PRECISION,
        gradient_accumulation_steps=accumulation,
        log_with=["tensorboard", JsonlTracker(run_dir / "metrics.jsonl")],
        project_dir=str(run_dir),
    )
    set_seed(cfg.SEED)

    # ---- build -------------------------------------------------------------------------------
    model_config = model_config_from(cfg)
    processor = SidewalkImageProcessor.from_model_config(
        model_config, pixel_rule=pixel_rule_of_dataset(cfg.DATASET.SOURCE)
    )
    model = SidewalkDeepLabForSemanticSegmentation(model_config)
    if cfg.MODEL.WEIGHTS and not resuming:
        report = load_initial_weights(model, cfg.MODEL.WEIGHTS)
        accelerator.print(report)
    if cfg.MODEL.SYNC_BATCHNORM and accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        model = convert_batchnorm_to_sync(model)
    memory_format = torch.channels_last if cfg.SOLVER.CHANNELS_LAST else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(
        optimizer_param_groups(model, cfg),
        lr=cfg.SOLVER.BASE_LR,
        momentum=cfg.SOLVER.MOMENTUM,
        nesterov=cfg.SOLVER.NESTEROV,
    )
    scheduler = build_lr_scheduler(
        optimizer,
        base_lr=cfg.SOLVER.BASE_LR,
        final_lr=cfg.SOLVER.FINAL_LR,
        max_iter=cfg.SOLVER.MAX_ITER,
        warmup_iters=cfg.SOLVER.WARMUP_ITERS,
        warmup_factor=cfg.SOLVER.WARMUP_FACTOR,
    )
    # The scheduler is not prepared: Accelerate would step it once per process per optimizer step.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    _prepare_dataset(cfg, state)
    train_stream = SegmentationStream(
        cfg.DATASET.SOURCE,
        cfg.DATASET.TRAIN_SPLIT,
        per_process_batch_size=micro_batch,
        training=True,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
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

    # ---- run folder and resume ---------------------------------------------------------------
    # The stream position is counted here, from consumed batches: DataLoader workers read ahead.
    iteration, epoch, steps_done_in_epoch = 0, 0, 0
    best = {"mean_iou": -1.0, "iteration": None}
    bad_samples: Counter = Counter()
    bad_sample_examples: list = []
    dropped_remainder = 0
    if resuming:
        latest = ckpt.complete_checkpoints(run_dir / "checkpoints")[-1]
        trainer_state, stream_state = ckpt.load_checkpoint(accelerator, latest)
        iteration = trainer_state["iteration"]
        epoch, steps_done_in_epoch = stream_state["epoch"], stream_state["start_step"]
        best = trainer_state["best"]
        bad_samples = Counter(trainer_state["bad_samples"])
        bad_sample_examples = trainer_state["bad_sample_examples"]
        dropped_remainder = trainer_state["dropped_remainder"]
        if accelerator.is_main_process:
            truncate_metrics_after(run_dir / "metrics.jsonl", iteration)
        accelerator.print(f"resuming {run_dir} from {latest.name} (iteration {iteration}, epoch {epoch})")
    elif accelerator.is_main_process:
        environment = environment_record(
            seed=cfg.SEED,
            num_processes=accelerator.num_processes,
            mixed_precision=cfg.SOLVER.MIXED_PRECISION,
            device=str(accelerator.device),
        )
        write_run_description(run_dir, config_yaml=to_yaml(cfg), argv=argv or sys.argv, environment=environment)
    accelerator.wait_for_everyone()
    accelerator.print(
        f"run folder {run_dir}: world size {accelerator.num_processes}, device {accelerator.device}, "
        f"per-process batch {micro_batch} x {accumulation} accumulation step(s)"
    )
    accelerator.init_trackers(
        "tensorboard",
        config=to_flat_dict(cfg),
        init_kwargs={"tensorboard": {"purge_step": iteration}} if resuming else {},
    )

    def trainer_state() -> dict:
        return {
            "best": best,
            "bad_samples": dict(bad_samples),
            "bad_sample_examples": bad_sample_examples[:100],
            "dropped_remainder": dropped_remainder,
        }

    def save_training_state() -> None:
        ckpt.save_checkpoint(
            accelerator,
            run_dir / "checkpoints",
            iteration,
            trainer_state=trainer_state(),
            stream_state={"epoch": epoch, "start_step": steps_done_in_epoch},
            keep_last=cfg.CHECKPOINT.KEEP_LAST,
        )
        if accelerator.is_main_process:
            write_json_atomic(
                run_dir / "bad_samples.json",
                {"counts": dict(bad_samples), "examples": bad_sample_examples[:100],
                 "dropped_remainder_samples": dropped_remainder},
            )  # fmt: skip

    def run_validation() -> dict:
        stream = _evaluation_stream(cfg, cfg.DATASET.VALIDATION_SPLIT, processor, accelerator)
        loader = _make_loader(stream, cfg.DATALOADER.NUM_WORKERS, cfg.SEED)
        result = evaluate_model(
            accelerator.unwrap_model(model), loader, accelerator,
            num_pictures=cfg.TEST.NUM_PICTURES, channels_last=cfg.SOLVER.CHANNELS_LAST,
        )  # fmt: skip
        metrics = {key: result.metrics[key] for key in METRIC_KEYS}
        accelerator.log({f"validation/{k}": v for k, v in metrics.items()}, step=iteration)
        if accelerator.is_main_process and result.pictures:
            save_overlay_grid(
                result.pictures,
                run_dir / "pictures" / f"validation_{ckpt.checkpoint_name(iteration)}.png",
                title=f"iteration {iteration}: image | truth | prediction   "
                + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()),
            )
        return metrics

    # ---- loop --------------------------------------------------------------------------------
    termination = _TerminationFlag()
    max_iter = cfg.SOLVER.MAX_ITER
    global_batch = cfg.DATALOADER.BATCH_SIZE
    progress = tqdm(
        total=max_iter, initial=iteration, desc="training", unit="it",
        disable=not accelerator.is_local_main_process, dynamic_ncols=True,
    )  # fmt: skip
    loss_sum = torch.zeros((), device=accelerator.device)
    loss_count, window_start = 0, time.perf_counter()
    window_start_iter = iteration
    model.train()
    stopped_by_signal = False
    while iteration < max_iter and not stopped_by_signal:
        train_stream.load_state_dict({"epoch": epoch, "start_step": steps_done_in_epoch})
        batches_in_epoch = 0
        for batch in _make_loader(train_stream, cfg.DATALOADER.NUM_WORKERS, cfg.SEED + epoch):
            batches_in_epoch += 1
            steps_done_in_epoch += 1
            for reason, index, key in batch.get("bad_samples", []):
                bad_samples[reason] += 1
                bad_sample_examples.append({"reason": reason, "record_index": int(index), "key": str(key)})
            pixel_values, labels = batch_to_model_inputs(batch, accelerator.device, memory_format)
            with accelerator.accumulate(model):
                loss = model(pixel_values=pixel_values, labels=labels).loss
                accelerator.backward(loss)
                skip_step = False
                if accelerator.sync_gradients:
                    max_norm = cfg.SOLVER.CLIP_GRAD_NORM if cfg.SOLVER.CLIP_GRAD_NORM > 0 else math.inf
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
                    # With fp16 the gradient scaler skips overflowing steps itself.
                    if not torch.isfinite(grad_norm) and cfg.SOLVER.MIXED_PRECISION != "fp16":
                        if cfg.SOLVER.ON_NONFINITE_LOSS == "stop":
                            raise NonFiniteLossError(
                                f"non-finite loss or gradient at iteration {iteration} (loss {loss.item()}); "
                                f"stopping. The last good checkpoint in {run_dir / 'checkpoints'} is intact; "
                                "set SOLVER.ON_NONFINITE_LOSS skip to skip such steps instead"
                            )
                        skip_step = True
                        accelerator.print(f"iteration {iteration}: non-finite loss, step skipped")
                if not skip_step:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if torch.isfinite(loss.detach()):
                loss_sum += loss.detach()
                loss_count += 1
            if not accelerator.sync_gradients:
                continue

            # one optimizer step done
            iteration += 1
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            progress.update(1)
            if iteration % cfg.OUTPUT.LOG_PERIOD == 0 or iteration == max_iter:
                mean_loss = accelerator.reduce(loss_sum / max(loss_count, 1), reduction="mean").item()
                elapsed = time.perf_counter() - window_start
                images_per_s = (iteration - window_start_iter) * global_batch / max(elapsed, 1e-9)
                accelerator.log({"loss": mean_loss, "lr": lr, "images_per_s": images_per_s}, step=iteration)
                progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")
                loss_sum.zero_()
                loss_count, window_start, window_start_iter = 0, time.perf_counter(), iteration
            if iteration % cfg.TEST.EVAL_PERIOD == 0 or iteration == max_iter:
                metrics = run_validation()
                accelerator.print(
                    f"iteration {iteration} validation: " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items())
                )
                if metrics["mean_iou"] > best["mean_iou"]:
                    best = {"iteration": iteration, **metrics}
                    save_pretrained_folder(model, processor, run_dir / "best", accelerator)
            if iteration % cfg.CHECKPOINT.PERIOD == 0 and iteration < max_iter:
                save_training_state()
            stop = torch.tensor(float(termination.requested), device=accelerator.device)
            if accelerator.reduce(stop, reduction="sum").item() > 0:
                accelerator.print(f"SIGTERM received: checkpointing at iteration {iteration} and exiting")
                save_training_state()
                stopped_by_signal = True
                break
            if iteration >= max_iter:
                break
        else:
            if batches_in_epoch == 0 and steps_done_in_epoch == 0:
                raise ValueError(
                    f"{cfg.DATASET.SOURCE} split {cfg.DATASET.TRAIN_SPLIT!r} has fewer samples than one global "
                    f"step ({micro_batch} x {accelerator.num_processes} processes): nothing to train on"
                )
            dropped_remainder += train_stream.dropped_remainder_records
            epoch, steps_done_in_epoch = epoch + 1, 0
    progress.close()
    if stopped_by_signal:
        accelerator.end_training()
        return run_dir

    # ---- finish ------------------------------------------------------------------------------
    save_training_state()
    save_pretrained_folder(model, processor, run_dir / "final", accelerator)
    finish_run(cfg, run_dir, accelerator, best=best, make_loader=_make_loader,
               evaluation_stream=lambda split: _evaluation_stream(cfg, split, processor, accelerator))  # fmt: skip
    accelerator.end_training()
    return run_dir


def main(argv: list[str] | None = None) -> Path:
    """Entry point behind ``scripts/train.py``."""
    from .cli import parse_args

    args = parse_args(argv)
    if args.resume:
        run_dir = Path(args.resume)
        config_file = run_dir / "config.yaml"
        if not config_file.is_file():
            raise SystemExit(f"--resume {run_dir}: no config.yaml there; is it a run folder?")
        cfg = load_config(config_file, args.opts)
    else:
        cfg = load_config(args.config, args.cli_overrides + args.opts)
        run_dir = None
    if cfg.MODEL.WEIGHTS and not args.resume and not Path(cfg.MODEL.WEIGHTS).exists():
        raise SystemExit(f"--weights_path {cfg.MODEL.WEIGHTS}: no such file or folder")
    return train(cfg, run_dir=run_dir, argv=sys.argv)
