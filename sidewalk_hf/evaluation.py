"""Running a model over an evaluation stream: its metrics (mean IoU, per-class IoU, pixel accuracy) and a
few overlay pictures.

Each process evaluates its own share of the split (every sample exactly once across processes) and
accumulates a confusion matrix; the matrices are summed across processes once, at the end. There is no
per-batch collective, so processes may run different numbers of batches.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from PIL import Image

from .data.streaming import batch_to_model_inputs
from .metrics import SegmentationMetricAccumulator, reported_metric_keys
from .pictures import overlay_panel, save_overlay_grid
from .training.logs import progress_bar_wanted

logger = logging.getLogger(__name__)


@dataclass
class EvaluationResult:
    metrics: dict
    pictures: list[Image.Image] = field(default_factory=list)
    bad_samples: list = field(default_factory=list)
    num_samples: int = 0


@torch.inference_mode()
def evaluate_model(
    model: torch.nn.Module,
    loader,
    accelerator: Accelerator,
    *,
    num_pictures: int = 0,
    channels_last: bool = False,
    progress: bool = False,
) -> EvaluationResult:
    """Collective: every process calls it with its own share of the split. ``model`` is unwrapped."""
    config = model.config
    accumulator = SegmentationMetricAccumulator(
        num_labels=config.num_labels,
        ignore_index=config.ignore_index,
        id2label=config.id2label,
        device=accelerator.device,
    )
    was_training = model.training
    model.eval()
    result = EvaluationResult(metrics={})
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    batches = loader
    if progress and accelerator.is_local_main_process and progress_bar_wanted():
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc="evaluating", unit="batch", leave=False)
    for batch in batches:
        pixel_values, labels = batch_to_model_inputs(batch, accelerator.device, memory_format)
        with accelerator.autocast():
            logits = model(pixel_values=pixel_values).logits
        predictions = logits.argmax(dim=1)
        accumulator.update(predictions, labels)
        result.bad_samples += list(batch.get("bad_samples", []))
        result.num_samples += int(labels.shape[0])
        if accelerator.is_main_process and len(result.pictures) < num_pictures:
            for i in range(min(num_pictures - len(result.pictures), labels.shape[0])):
                image = batch["pixel_values"][i, :3].expand(3, -1, -1).permute(1, 2, 0).numpy()  # uint8 HWC
                result.pictures.append(
                    overlay_panel(
                        image, labels[i].cpu().numpy(), predictions[i].cpu().numpy(), config.ignore_index
                    )
                )
    result.metrics = accumulator.compute(accelerator)
    result.num_samples = int(
        accelerator.reduce(torch.tensor(result.num_samples, device=accelerator.device), "sum")
    )
    model.train(was_training)
    return result


def resolve_model_path(model: str | Path) -> str:
    """A run folder means its best model (else its final one); anything else is a folder or Hub id."""
    path = Path(model)
    for which in ("best", "final"):
        if (path / which / "config.json").is_file():
            return str(path / which)
    return str(model)


def metrics_table(metrics: dict, id2label: dict[int, str]) -> str:
    rows = [(key, metrics[key]) for key in reported_metric_keys(id2label)]
    rows += [(f"accuracy ({id2label[i]})", value) for i, value in enumerate(metrics["per_category_accuracy"])]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value:.4f}" for name, value in rows)


def evaluate_pretrained(
    model: str | Path,
    dataset: str,
    split: str,
    *,
    batch_size: int = 8,
    num_workers: int = 2,
    output_dir: str | Path | None = None,
    num_pictures: int = 6,
    channels_last: bool = True,
) -> dict:
    """Evaluate a ``save_pretrained`` folder, run folder or Hub model on a split; write
    ``eval_<split>.json`` (metrics and confusion matrix) and ``eval_<split>_overlays.png``.

    Channels-last by default, like training's validation, so both give the same figures for the same weights.
    """
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    from .training.builders import evaluation_stream, make_loader

    accelerator = Accelerator()
    model_path = resolve_model_path(model)
    network = AutoModelForSemanticSegmentation.from_pretrained(model_path, trust_remote_code=True)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    network = network.to(accelerator.device, memory_format=memory_format).eval()
    processor = AutoImageProcessor.from_pretrained(model_path, trust_remote_code=True)
    stream = evaluation_stream(dataset, split, processor, accelerator, batch_size=batch_size)
    loader = make_loader(stream, num_workers, seed=0)
    result = evaluate_model(
        network, loader, accelerator, num_pictures=num_pictures, channels_last=channels_last, progress=True
    )
    if accelerator.is_main_process:
        out = (
            Path(output_dir)
            if output_dir
            else (Path(model_path) if Path(model_path).is_dir() else Path("eval"))
        )
        out.mkdir(parents=True, exist_ok=True)
        record = {
            "model": model_path,
            "dataset": dataset,
            "split": split,
            "num_samples": result.num_samples,
            "bad_samples": len(result.bad_samples),
            **result.metrics,
        }
        (out / f"eval_{split}.json").write_text(json.dumps(record, indent=2) + "\n")
        if result.pictures:
            save_overlay_grid(
                result.pictures,
                out / f"eval_{split}_overlays.png",
                title=f"{split}: image | truth | prediction",
            )
        logger.info(
            "%s on %s [%s], %d chips:\n%s\nconfusion matrix (rows: truth, columns: prediction): %s\nwritten: %s",
            model_path,
            dataset,
            split,
            result.num_samples,
            metrics_table(result.metrics, network.config.id2label),
            result.metrics["confusion_matrix"],
            out / f"eval_{split}.json",
        )
    accelerator.end_training()
    return result.metrics
