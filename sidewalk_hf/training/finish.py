"""End of a run: evaluate ``final/`` and ``best/`` on validation (and test) as validation does, fill their model
cards, draw the training curves, and publish when the config asks for it."""

from __future__ import annotations

import logging
from pathlib import Path

from accelerate import Accelerator
from omegaconf import DictConfig
from PIL import Image

from ..evaluation import evaluate_model
from ..hub import publish_run, write_model_card
from ..metrics import reported_metric_keys
from ..modeling_sidewalk_deeplab import SidewalkDeepLabForSemanticSegmentation
from ..pictures import plot_training_curves
from .builders import evaluation_stream_from, make_loader, memory_format_from
from .trackers import log_images

logger = logging.getLogger(__name__)


def evaluation_splits(cfg: DictConfig) -> list[str]:
    return [s for s in (cfg.DATASET.VALIDATION_SPLIT, cfg.DATASET.TEST_SPLIT) if s]


def evaluate_folder(model_dir: Path, cfg: DictConfig, accelerator: Accelerator, processor) -> dict:
    """Metrics of a save_pretrained folder on each configured split, in validation's memory format
    (collective)."""
    model = SidewalkDeepLabForSemanticSegmentation.from_pretrained(model_dir)
    model = model.to(accelerator.device, memory_format=memory_format_from(cfg))
    keys = [*reported_metric_keys(model.config.id2label), "per_category_accuracy"]
    results = {}
    for split in evaluation_splits(cfg):
        stream = evaluation_stream_from(cfg, split, processor, accelerator)
        loader = make_loader(stream, cfg.DATALOADER.NUM_WORKERS, cfg.SEED)
        result = evaluate_model(model, loader, accelerator, channels_last=cfg.SOLVER.CHANNELS_LAST)
        results[split] = {key: result.metrics[key] for key in keys}
    return results


def finish_run(cfg: DictConfig, run_dir: Path, accelerator: Accelerator, *, best: dict, processor) -> dict:
    """Evaluate, card and (optionally) publish the run's models; returns ``{which: {split: metrics}}``."""
    id2label = dict(enumerate(cfg.MODEL.LABELS))
    if accelerator.is_main_process:
        curves = plot_training_curves(
            run_dir / "metrics.jsonl", run_dir / "pictures" / "training_curves.png", id2label=id2label
        )
        with Image.open(curves) as picture:
            log_images(accelerator, {"training_curves": picture.copy()}, step=cfg.SOLVER.MAX_ITER)
    summary = {}
    for which in ("final", "best"):
        model_dir = run_dir / which
        if not model_dir.is_dir():
            continue
        results = evaluate_folder(model_dir, cfg, accelerator, processor)
        summary[which] = results
        if accelerator.is_main_process:  # the card writes eval_results.json beside itself
            iteration = cfg.SOLVER.MAX_ITER if which == "final" else best.get("iteration")
            write_model_card(
                model_dir,
                run_dir=run_dir,
                eval_results=results,
                repo_id=cfg.HUB.REPO_ID or None,
                iteration=iteration,
            )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        lines = [f"run folder: {run_dir}"]
        for which, results in summary.items():
            for split, metrics in results.items():
                values = "  ".join(f"{key} {metrics[key]:.3f}" for key in reported_metric_keys(id2label))
                lines.append(f"{which:>5} {split:<10} {values}")
        logger.info("\n".join(lines))
        if cfg.HUB.PUSH_AT_END:
            if not cfg.HUB.REPO_ID:
                raise ValueError("HUB.PUSH_AT_END is set but HUB.REPO_ID is empty")
            url = publish_run(run_dir, cfg.HUB.REPO_ID, which="final", private=cfg.HUB.PRIVATE)
            logger.info("published %s to %s", run_dir / "final", url)
    return summary
