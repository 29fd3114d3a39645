"""End of a run: evaluate ``final/`` and ``best/`` on validation (and test), fill their model cards,
draw the training curves, and publish when the config asks for it."""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator
from omegaconf import DictConfig

from ..evaluation import evaluate_model
from ..hub import plot_training_curves, publish_run, write_model_card
from ..modeling_sidewalk_deeplab import SidewalkDeepLabForSemanticSegmentation

METRIC_KEYS = ("mean_iou", "background_iou", "sidewalk_iou", "pixel_accuracy", "per_category_accuracy")


def _splits(cfg: DictConfig) -> list[str]:
    return [s for s in (cfg.DATASET.VALIDATION_SPLIT, cfg.DATASET.TEST_SPLIT) if s]


def evaluate_folder(model_dir: Path, cfg, accelerator, make_loader, evaluation_stream) -> dict:
    """Metrics of a save_pretrained folder on each configured split (collective)."""
    model = SidewalkDeepLabForSemanticSegmentation.from_pretrained(model_dir).to(accelerator.device)
    results = {}
    for split in _splits(cfg):
        loader = make_loader(evaluation_stream(split), cfg.DATALOADER.NUM_WORKERS, cfg.SEED)
        result = evaluate_model(model, loader, accelerator)
        results[split] = {key: result.metrics[key] for key in METRIC_KEYS}
    return results


def finish_run(cfg, run_dir: Path, accelerator: Accelerator, *, best, make_loader, evaluation_stream):
    if accelerator.is_main_process:
        plot_training_curves(run_dir / "metrics.jsonl", run_dir / "pictures" / "training_curves.png")
    summary = {}
    for which in ("final", "best"):
        model_dir = run_dir / which
        if not model_dir.is_dir():
            continue
        results = evaluate_folder(model_dir, cfg, accelerator, make_loader, evaluation_stream)
        summary[which] = results
        if accelerator.is_main_process:  # the card writes eval_results.json beside itself
            iteration = cfg.SOLVER.MAX_ITER if which == "final" else best.get("iteration")
            write_model_card(model_dir, run_dir=run_dir, eval_results=results,
                             repo_id=cfg.HUB.REPO_ID or None, iteration=iteration)  # fmt: skip
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        print(f"\nrun folder: {run_dir}")
        for which, results in summary.items():
            for split, metrics in results.items():
                line = "  ".join(f"{k} {metrics[k]:.3f}" for k in METRIC_KEYS[:4])
                print(f"{which:>5} {split:<10} {line}")
        if cfg.HUB.PUSH_AT_END:
            if not cfg.HUB.REPO_ID:
                raise ValueError("HUB.PUSH_AT_END is set but HUB.REPO_ID is empty")
            url = publish_run(run_dir, cfg.HUB.REPO_ID, which="final", private=cfg.HUB.PRIVATE)
            print(f"published {run_dir / 'final'} to {url}")
    return summary
