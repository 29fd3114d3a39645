"""Pictures of a run: validation overlays (image | ground truth | prediction, sidewalk drawn over the image)
and the training curves drawn from `metrics.jsonl`."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .metrics import reported_metric_keys

logger = logging.getLogger(__name__)

TRUTH_COLOUR = np.array([0, 220, 0], dtype=np.float32)
PREDICTION_COLOUR = np.array([255, 40, 40], dtype=np.float32)
IGNORE_COLOUR = np.array([255, 255, 0], dtype=np.float32)


def _overlay(image: np.ndarray, mask: np.ndarray, colour: np.ndarray, ignore_value: int) -> np.ndarray:
    out = image.astype(np.float32)
    sidewalk = mask == 1
    out[sidewalk] = 0.45 * out[sidewalk] + 0.55 * colour
    ignored = mask == ignore_value
    out[ignored] = 0.7 * out[ignored] + 0.3 * IGNORE_COLOUR
    return out.clip(0, 255).astype(np.uint8)


def overlay_panel(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, ignore_value: int = 255):
    """One row: the image, the truth in green (ignored pixels tinted yellow), the prediction in red."""
    row = np.concatenate(
        [
            image,
            _overlay(image, truth, TRUTH_COLOUR, ignore_value),
            _overlay(image, prediction, PREDICTION_COLOUR, -1),
        ],
        axis=1,
    )
    return Image.fromarray(row)


def save_overlay_grid(rows: list[Image.Image], path: Path, title: str = "") -> Path:
    """Stack panels vertically under a one-line title."""
    if not rows:
        raise ValueError("no pictures to save")
    header = 18 if title else 0
    width = max(r.width for r in rows)
    canvas = Image.new("RGB", (width, header + sum(r.height for r in rows)), "white")
    if title:
        ImageDraw.Draw(canvas).text((4, 3), title, fill="black")
    y = header
    for row in rows:
        canvas.paste(row, (0, y))
        y += row.height
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def plot_training_curves(
    metrics_jsonl: str | Path, out_png: str | Path, id2label: dict[int, str] | None = None
) -> Path:
    """Draw the training loss (learning rate on a second axis) and the evaluation IoUs against iteration:
    the mean IoU and each class's IoU (`<label>_iou` for the classes of `id2label`; without it, every
    `<name>_iou` found in the log).

    Reads the `metrics.jsonl` of a run folder; lines that are not JSON objects (a line cut short by a killed
    process) are skipped with a warning rather than failing the end of a run. Uses matplotlib's Agg canvas
    directly, so no GUI backend and no global pyplot state are involved.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    training, evaluations = read_metrics_log(metrics_jsonl)
    figure = Figure(figsize=(11, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, iou_axes = figure.subplots(1, 2)

    points = [(row["iter"], row["loss"]) for row in training if _is_number(row.get("loss"))]
    if points:
        loss_axes.plot(*zip(*points), color="tab:blue", linewidth=1.2, label="training loss")
        losses = [loss for _, loss in points]
        if min(losses) > 0 and max(losses) > 10 * min(losses):
            loss_axes.set_yscale("log")
        rates = [(row["iter"], row["lr"]) for row in training if _is_number(row.get("lr"))]
        if rates:
            rate_axes = loss_axes.twinx()
            rate_axes.plot(
                *zip(*rates), color="tab:gray", linewidth=1.0, linestyle="--", label="learning rate"
            )
            rate_axes.set_ylabel("learning rate")
            rate_axes.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
            handles = loss_axes.get_legend_handles_labels()[0] + rate_axes.get_legend_handles_labels()[0]
            loss_axes.legend(handles=handles, loc="upper right", fontsize="small")
    else:
        _no_data(loss_axes)
    loss_axes.set_title("Training loss")
    loss_axes.set_xlabel("iteration")
    loss_axes.set_ylabel("loss")

    by_split: dict[str, list[dict]] = {}
    for row in evaluations:
        by_split.setdefault(row["split"], []).append(row)
    plotted = False
    if id2label is not None:
        iou_keys = [key for key in reported_metric_keys(id2label) if key.endswith("_iou")]
    else:
        found = {key for row in evaluations for key in row if key.endswith("_iou") and key != "mean_iou"}
        iou_keys = ["mean_iou", *sorted(found)]
    class_styles = (":", "--", "-.")
    for split, rows in sorted(by_split.items()):
        for index, key in enumerate(iou_keys):
            style = "-" if key == "mean_iou" else class_styles[index % len(class_styles)]
            points = [(row["iter"], row[key]) for row in rows if _is_number(row.get(key))]
            if points:
                iou_axes.plot(
                    *zip(*points), linestyle=style, marker="o", markersize=3, label=f"{split} {key}"
                )
                plotted = True
    if plotted:
        iou_axes.legend(loc="best", fontsize="small")
        iou_axes.set_ylim(0.0, 1.0)
        iou_axes.grid(alpha=0.3)
    else:
        _no_data(iou_axes)
    iou_axes.set_title("Evaluation")
    iou_axes.set_xlabel("iteration")
    iou_axes.set_ylabel("IoU")

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png)
    return out_png


def read_metrics_log(metrics_jsonl: str | Path) -> tuple[list[dict], list[dict]]:
    """The training lines (`{"iter", "loss", ...}`) and the evaluation lines (`{"iter", "split", ...}`)."""
    training, evaluations = [], []
    path = Path(metrics_jsonl)
    if not path.is_file():
        logger.warning("no metrics log at %s", path)
        return training, evaluations
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d is not JSON; skipped", path, number)
            continue
        if not isinstance(row, dict) or not _is_number(row.get("iter")):
            logger.warning("%s:%d has no iteration number; skipped", path, number)
            continue
        (evaluations if "split" in row else training).append(row)
    return training, evaluations


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _no_data(axes) -> None:
    axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes, color="gray")
