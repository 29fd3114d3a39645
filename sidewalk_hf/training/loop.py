"""The training loop, top to bottom: build -> prepare -> resume -> loop (step, log, evaluate, checkpoint) -> finish.

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
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import parse_flag_from_env, set_seed
from omegaconf import DictConfig
from PIL import Image

from ..data.streaming import SegmentationStream, batch_to_model_inputs
from ..datasets_from_geodata.card import pixel_rule_of_dataset
from ..evaluation import evaluate_model
from ..image_processing_sidewalk_deeplab import SidewalkImageProcessor
from ..metrics import reported_metric_keys
from ..pictures import save_overlay_grid
from . import checkpoint as ckpt
from .builders import (
    build_model,
    build_optimizer,
    build_scheduler,
    evaluation_stream_from,
    launcher_settings,
    make_loader,
    memory_format_from,
    model_config_from,
    per_process_batch_size,
    prepare_synthetic_dataset,
    training_stream,
)
from .config import load_config, to_flat_dict, to_yaml
from .finish import finish_run
from .logs import TrainingProgress, add_run_log_file, configure_logging, log_exception_to_files
from .run_folder import environment_record, share_run_dir, truncate_metrics_after, write_run_description
from .state import TrainState
from .trackers import log_images, save_tracker_ids, tracker_setup

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss (hence the gradient norm) was NaN or infinite; the last good checkpoint is left intact."""


class SigtermFlag:
    """Set by SIGTERM (a preempted node): the loop checkpoints at the end of the step and exits cleanly.
    The previous handler is restored on exit."""

    def __enter__(self):
        self.requested = self.stopped = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, accelerator: Accelerator) -> bool:
        """Whether any process got SIGTERM; then ``stopped`` is set (collective: every process stops at the
        same step)."""
        stop = torch.tensor(float(self.requested), device=accelerator.device)
        self.stopped = accelerator.reduce(stop, reduction="sum").item() > 0
        return self.stopped


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


def epoch_batches(
    stream: SegmentationStream, state: TrainState, cfg: DictConfig, micro_batch: int
) -> Iterator:
    """The batches from the stream position in ``state`` to the end of the pass, counted into ``state``.
    A pass read to its end moves ``state`` to the next epoch."""
    stream.load_state_dict(state.stream_position())
    batches_in_pass = 0
    for batch in make_loader(stream, cfg.DATALOADER.NUM_WORKERS, cfg.SEED + state.epoch):
        batches_in_pass += 1
        state.steps_done_in_epoch += 1
        state.count_bad_samples(batch)
        yield batch
    if batches_in_pass == 0 and state.steps_done_in_epoch == 0:
        raise ValueError(
            f"{cfg.DATASET.SOURCE} split {cfg.DATASET.TRAIN_SPLIT!r} has fewer samples than one global "
            f"step ({micro_batch} x {stream.num_processes} processes): nothing to train on"
        )
    state.end_epoch(stream.dropped_remainder_records)


def training_step(
    model, optimizer, accelerator: Accelerator, batch: dict, cfg: DictConfig, state: TrainState, run_dir
):
    """Forward, backward and (at the end of an accumulation window) the clipped optimizer step; returns the
    loss. A non-finite gradient stops the run or skips the step, as ``SOLVER.ON_NONFINITE_LOSS`` says."""
    pixel_values, labels = batch_to_model_inputs(batch, accelerator.device, memory_format_from(cfg))
    with accelerator.accumulate(model):
        loss = model(pixel_values=pixel_values, labels=labels).loss
        accelerator.backward(loss)
        skip_step = False
        if accelerator.sync_gradients:
            max_norm = cfg.SOLVER.CLIP_GRAD_NORM if cfg.SOLVER.CLIP_GRAD_NORM > 0 else math.inf
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
            # With fp16 the gradient scaler skips overflowing steps itself.
            if not torch.isfinite(grad_norm) and accelerator.mixed_precision != "fp16":
                if cfg.SOLVER.ON_NONFINITE_LOSS == "stop":
                    raise NonFiniteLossError(
                        f"non-finite loss or gradient at iteration {state.iteration} (loss {loss.item()}); "
                        f"stopping. The last good checkpoint in {run_dir / 'checkpoints'} is intact; "
                        "set SOLVER.ON_NONFINITE_LOSS skip to skip such steps instead"
                    )
                skip_step = True
                logger.warning("iteration %d: non-finite loss, step skipped", state.iteration)
        if not skip_step:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


class LossWindow:
    """The mean loss and images per second since the last log line."""

    def __init__(self, device, iteration: int):
        self.total, self.count = torch.zeros((), device=device), 0
        self.started, self.start_iteration = time.perf_counter(), iteration

    def add(self, loss: torch.Tensor) -> None:
        if torch.isfinite(loss):
            self.total += loss
            self.count += 1

    def report(self, accelerator: Accelerator, iteration: int, global_batch: int) -> tuple[float, float]:
        mean_loss = accelerator.reduce(self.total / max(self.count, 1), reduction="mean").item()
        elapsed = time.perf_counter() - self.started
        images_per_s = (iteration - self.start_iteration) * global_batch / max(elapsed, 1e-9)
        self.total.zero_()
        self.count, self.started, self.start_iteration = 0, time.perf_counter(), iteration
        return mean_loss, images_per_s


def validate(
    model, accelerator: Accelerator, cfg: DictConfig, processor, run_dir: Path, iteration: int
) -> dict:
    """Validation metrics (logged, and drawn with a few predictions for the trackers and pictures/)."""
    stream = evaluation_stream_from(cfg, cfg.DATASET.VALIDATION_SPLIT, processor, accelerator)
    loader = make_loader(stream, cfg.DATALOADER.NUM_WORKERS, cfg.SEED)
    unwrapped = accelerator.unwrap_model(model)
    result = evaluate_model(
        unwrapped,
        loader,
        accelerator,
        num_pictures=cfg.TEST.NUM_PICTURES,
        channels_last=cfg.SOLVER.CHANNELS_LAST,
    )
    metrics = {key: result.metrics[key] for key in reported_metric_keys(unwrapped.config.id2label)}
    accelerator.log({f"validation/{k}": v for k, v in metrics.items()}, step=iteration)
    summary = "  ".join(f"{k} {v:.3f}" for k, v in metrics.items())
    if accelerator.is_main_process and result.pictures:
        picture = save_overlay_grid(
            result.pictures,
            run_dir / "pictures" / f"validation_{ckpt.checkpoint_name(iteration)}.png",
            title=f"iteration {iteration}: image | truth | prediction   {summary}",
        )
        with Image.open(picture) as image:
            log_images(accelerator, {"validation/predictions": image.copy()}, step=iteration)
    logger.info("iteration %d validation: %s", iteration, summary)
    return metrics


def make_accelerator(cfg: DictConfig, run_dir: Path, checkpoints: list[Path]) -> tuple[Accelerator, int]:
    """The Accelerator with the launcher's settings and its trackers started, and the per-process batch size."""
    settings = launcher_settings(cfg)
    accumulation = settings["SOLVER.GRADIENT_ACCUMULATION_STEPS"]
    micro_batch = per_process_batch_size(
        cfg.DATALOADER.BATCH_SIZE, PartialState().num_processes, accumulation
    )
    log_with, tracker_kwargs = tracker_setup(
        cfg,
        run_dir,
        iteration=ckpt.checkpoint_iteration(checkpoints[-1]) if checkpoints else 0,
        resuming=bool(checkpoints),
    )
    accelerator = Accelerator(
        mixed_precision=settings["SOLVER.MIXED_PRECISION"],
        gradient_accumulation_steps=accumulation,
        log_with=log_with,
        project_dir=str(run_dir),
    )
    accelerator.init_trackers(cfg.TRACKING.PROJECT, config=to_flat_dict(cfg), init_kwargs=tracker_kwargs)
    save_tracker_ids(accelerator, run_dir)
    return accelerator, micro_batch


def resume_or_describe_run(
    accelerator: Accelerator, cfg: DictConfig, run_dir: Path, argv: list[str]
) -> TrainState:
    """The newest checkpoint's state (the metrics log cut back to it), or a new state and the run folder's
    description (config.yaml, command.txt, env.json)."""
    if ckpt.complete_checkpoints(run_dir / "checkpoints"):
        state, latest = ckpt.restore_training_state(accelerator, run_dir)
        if accelerator.is_main_process:
            truncate_metrics_after(run_dir / "metrics.jsonl", state.iteration)
        logger.info(
            "resuming %s from %s (iteration %d, epoch %d)", run_dir, latest.name, state.iteration, state.epoch
        )
    else:
        state = TrainState()
        if accelerator.is_main_process:
            environment = environment_record(
                seed=cfg.SEED,
                num_processes=accelerator.num_processes,
                mixed_precision=accelerator.mixed_precision,
                device=str(accelerator.device),
            )
            write_run_description(run_dir, config_yaml=to_yaml(cfg), argv=argv, environment=environment)
    accelerator.wait_for_everyone()
    return state


def train(cfg: DictConfig, *, run_dir: Path | None = None, argv: list[str] | None = None) -> Path:
    """Train (or, when ``run_dir`` holds checkpoints, resume) and return the run folder."""
    # The run folder is named once, on the main process, before the Accelerator that logs into it exists.
    # (Accelerator() honours ACCELERATE_USE_CPU by itself; a bare PartialState must be told.)
    process = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    run_dir = share_run_dir(run_dir, cfg.OUTPUT.ROOT, cfg.OUTPUT.NAME, process)
    add_run_log_file(run_dir, process.process_index)
    checkpoints = ckpt.complete_checkpoints(run_dir / "checkpoints")
    accelerator, micro_batch = make_accelerator(cfg, run_dir, checkpoints)
    set_seed(cfg.SEED)

    # ---- build and prepare ---------------------------------------------------------------------
    model_config = model_config_from(cfg)
    processor = SidewalkImageProcessor.from_model_config(
        model_config, pixel_rule=pixel_rule_of_dataset(cfg.DATASET.SOURCE)
    )
    multi_gpu = accelerator.num_processes > 1 and accelerator.device.type == "cuda"
    model = build_model(cfg, model_config, load_weights=not checkpoints, multi_gpu=multi_gpu)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    # The scheduler is not prepared: Accelerate would step it once per process per optimizer step.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    prepare_synthetic_dataset(cfg, process)
    stream = training_stream(cfg, processor, accelerator, micro_batch)

    # ---- resume --------------------------------------------------------------------------------
    state = resume_or_describe_run(accelerator, cfg, run_dir, argv or sys.argv)
    logger.info(
        "run folder %s: world size %d, device %s, mixed precision %s, per-process batch %d x %d accumulation",
        run_dir,
        accelerator.num_processes,
        accelerator.device,
        accelerator.mixed_precision,
        micro_batch,
        accelerator.gradient_accumulation_steps,
    )

    # ---- loop ----------------------------------------------------------------------------------
    max_iter = cfg.SOLVER.MAX_ITER
    progress = TrainingProgress(logger, max_iter, state.iteration, show=accelerator.is_local_main_process)
    losses = LossWindow(accelerator.device, state.iteration)
    model.train()
    with SigtermFlag() as termination:
        while state.iteration < max_iter and not termination.stopped:
            for batch in epoch_batches(stream, state, cfg, micro_batch):
                losses.add(training_step(model, optimizer, accelerator, batch, cfg, state, run_dir))
                if not accelerator.sync_gradients:
                    continue
                state.iteration += 1
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                progress.step()
                if state.iteration % cfg.OUTPUT.LOG_PERIOD == 0 or state.iteration == max_iter:
                    loss, images_per_s = losses.report(
                        accelerator, state.iteration, cfg.DATALOADER.BATCH_SIZE
                    )
                    accelerator.log(
                        {"loss": loss, "lr": lr, "images_per_s": images_per_s}, step=state.iteration
                    )
                    progress.report(state.iteration, loss, lr, images_per_s)
                if state.iteration % cfg.TEST.EVAL_PERIOD == 0 or state.iteration == max_iter:
                    metrics = validate(model, accelerator, cfg, processor, run_dir, state.iteration)
                    if metrics["mean_iou"] > state.best["mean_iou"]:
                        state.best = {"iteration": state.iteration, **metrics}
                        save_pretrained_folder(model, processor, run_dir / "best", accelerator)
                if state.iteration % cfg.CHECKPOINT.PERIOD == 0 and state.iteration < max_iter:
                    ckpt.save_training_state(accelerator, run_dir, state, cfg.CHECKPOINT.KEEP_LAST)
                if termination.agreed(accelerator):
                    logger.info(
                        "SIGTERM received: checkpointing at iteration %d and exiting", state.iteration
                    )
                    ckpt.save_training_state(accelerator, run_dir, state, cfg.CHECKPOINT.KEEP_LAST)
                    break
                if state.iteration >= max_iter:
                    break
        progress.close()

        # ---- finish ----------------------------------------------------------------------------
        if not termination.stopped:
            ckpt.save_training_state(accelerator, run_dir, state, cfg.CHECKPOINT.KEEP_LAST)
            save_pretrained_folder(model, processor, run_dir / "final", accelerator)
            finish_run(cfg, run_dir, accelerator, best=state.best, processor=processor)
    accelerator.end_training()
    return run_dir


def main(argv: list[str] | None = None) -> Path:
    """Entry point behind ``scripts/train.py``: logging, the config, then ``train``."""
    from .cli import parse_args

    process = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    configure_logging(process.process_index, process.is_local_main_process)
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
    try:
        return train(cfg, run_dir=run_dir, argv=sys.argv)
    except Exception:
        log_exception_to_files(logger, "training stopped by an error")
        raise
