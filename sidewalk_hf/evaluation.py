"""Running a model over an evaluation stream: the metrics of SPEC section 6 and a few overlay pictures.

Each process evaluates its own share of the split (every sample exactly once across processes) and
accumulates a confusion matrix; the matrices are summed across processes once, at the end. There is no
per-batch collective, so processes may run different numbers of batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from PIL import Image

from .metrics import SegmentationMetricAccumulator
from .pictures import denormalize, overlay_panel


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
    image_processor,
    num_pictures: int = 0,
    channels_last: bool = False,
    progress: bool = False,
) -> EvaluationResult:
    """Collective: every process calls it with its own share of the split. ``model`` is unwrapped."""
    config = model.config
    accumulator = SegmentationMetricAccumulator(
        num_labels=config.num_labels, ignore_index=config.ignore_index, device=accelerator.device
    )
    was_training = model.training
    model.eval()
    result = EvaluationResult(metrics={})
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    batches = loader
    if progress and accelerator.is_local_main_process:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc="evaluating", unit="batch", leave=False)
    for batch in batches:
        pixel_values = batch["pixel_values"].to(accelerator.device, memory_format=memory_format)
        labels = batch["labels"].to(accelerator.device)
        with accelerator.autocast():
            logits = model(pixel_values=pixel_values).logits
        predictions = logits.argmax(dim=1)
        accumulator.update(predictions, labels)
        result.bad_samples += list(batch.get("bad_samples", []))
        result.num_samples += int(labels.shape[0])
        if accelerator.is_main_process and len(result.pictures) < num_pictures:
            for i in range(min(num_pictures - len(result.pictures), labels.shape[0])):
                image = denormalize(
                    batch["pixel_values"][i],
                    image_processor.image_mean,
                    image_processor.image_std,
                    image_processor.rescale_factor,
                )
                result.pictures.append(
                    overlay_panel(image, labels[i].cpu().numpy(), predictions[i].cpu().numpy(), config.ignore_index)
                )
    result.metrics = accumulator.compute(accelerator)
    model.train(was_training)
    return result
