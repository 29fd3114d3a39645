"""Model cards and publishing: a run folder's `save_pretrained` model becomes a Hub repository with its metrics.

A run folder (its layout is in the README) holds the resolved `config.yaml`, `metrics.jsonl`, validation pictures and the
`final/` and `best/` model folders. `write_model_card` fills one model folder with `eval_results.json`, a
`README.md` rendered from the top-level `model_card.md` template (metadata with a `model-index`, so the Hub shows
the metrics), a picture of predictions and the training curves. `publish_run` pushes that folder, exactly as it
is on disk, in one commit.

Tokens are never printed, logged or written here; with `token=None`, `huggingface_hub` itself finds the saved
login or `HF_TOKEN`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import filter_repo_objects

from .metrics import reported_metric_keys
from .pictures import plot_training_curves

logger = logging.getLogger(__name__)

# The template ships inside the package (so a wheel install has it); the repository's top-level
# model_card.md is a link to it.
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent / "templates" / "model_card.md"
EVAL_RESULTS_FILE = "eval_results.json"
PREDICTIONS_PICTURE = "validation_predictions.png"
CURVES_PICTURE = "training_curves.png"
CARD_TAGS = ["image-segmentation", "semantic-segmentation", "sidewalk", "deeplabv3plus", "aerial-imagery"]
# Metrics published in the model-index: key in the results -> (Hub metric type, display name, metric config).
# Per-class IoUs (`<class>_iou`) are added for every class of the model.
CARD_METRICS = {
    "mean_iou": ("mean_iou", "Mean IoU", None),
    "pixel_accuracy": ("accuracy", "Pixel accuracy", None),
}
_HUB_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_VALIDATION_PICTURE = re.compile(r"^validation_iter_(\d+)\.png$")
# Files of a save_pretrained folder that are never published (huggingface_hub's defaults plus editor debris).
_IGNORED_UPLOADS = [
    ".git",
    ".git/*",
    "*/.git",
    "**/.git/**",
    ".cache/*",
    "**/.cache/**",
    "**/.DS_Store",
    "*.tmp",
]


def write_model_card(
    model_dir: str | Path,
    *,
    run_dir: str | Path,
    eval_results: Mapping[str, Mapping[str, Any]],
    repo_id: str | None = None,
    iteration: int | None = None,
    license: str = "apache-2.0",
    template_path: str | Path | None = None,
    space_id: str | None = None,
) -> Path:
    """Write `eval_results.json`, `README.md` and the card's pictures into a `save_pretrained` folder.

    Args:
        model_dir: the `save_pretrained` folder (`final/` or `best/` of a run); its `config.json` describes
            the model.
        run_dir: the run folder: `config.yaml` gives the training recipe and the dataset, `metrics.jsonl` the
            curves, `pictures/validation_iter_*.png` the picture of predictions (the one of `iteration` when
            it exists, else the latest).
        eval_results: `{split: {metric: value}}` with the keys of the `sidewalk_iou` metric (`mean_iou`,
            `<class>_iou`, `pixel_accuracy`, `per_category_accuracy`). Non-finite values are shown as "n/a"
            and left out of the model-index.
        repo_id: the Hub repository the card is for, used in the usage snippets and as the model name.
        iteration: training iteration of these weights. When omitted, the iteration already recorded in
            `eval_results.json` (if any) is kept.
        license: license identifier for the card metadata.
        template_path: Jinja template; defaults to the project's `model_card.md`.
        space_id: the demo Space (org/name) published beside the model; the card links it.

    Returns the path of the written `README.md`. The card is checked before it is written: it must load back
    with `ModelCard` and its `model-index` must convert to the same `EvalResult`s.
    """
    model_dir, run_dir = Path(model_dir), Path(run_dir)
    template = Path(template_path) if template_path is not None else MODEL_CARD_TEMPLATE
    if not template.is_file():
        raise FileNotFoundError(f"model card template {template} not found; pass template_path=")
    model_config = _read_json(model_dir / "config.json")
    config_path = run_dir / "config.yaml"
    run_config = _read_run_config(config_path)
    results_path = model_dir / EVAL_RESULTS_FILE
    if iteration is None and results_path.is_file():
        iteration = _read_json(results_path).get("iteration")
    eval_results = {str(split): dict(metrics) for split, metrics in eval_results.items()}
    results_path.write_text(json.dumps({"iteration": iteration, **eval_results}, indent=2) + "\n")

    id2label = {
        int(k): str(v) for k, v in (model_config.get("id2label") or {0: "background", 1: "sidewalk"}).items()
    }
    class_names = [id2label[i] for i in sorted(id2label)]
    dataset_source = str(_config_value(run_config, "DATASET.SOURCE", "") or "")
    dataset_is_local = _is_local_dataset(dataset_source, run_config, run_dir)
    dataset_id = dataset_source if not dataset_is_local else Path(dataset_source).name or "local-dataset"
    dataset_name = dataset_id.split("/")[-1]
    model_name = (
        repo_id.split("/")[-1] if repo_id else str(_config_value(run_config, "OUTPUT.NAME", model_dir.name))
    )

    plot_training_curves(run_dir / "metrics.jsonl", model_dir / CURVES_PICTURE, id2label=id2label)
    predictions_picture = _copy_validation_picture(
        run_dir / "pictures", model_dir / PREDICTIONS_PICTURE, iteration
    )

    card_eval_results = _card_eval_results(eval_results, class_names, dataset_id, dataset_name)
    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="image-segmentation",
        tags=CARD_TAGS,
        datasets=None if dataset_is_local else [dataset_id],
        metrics=["mean_iou", "accuracy"],
        model_name=model_name,
        eval_results=card_eval_results or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=model_name,
        repo_id=repo_id or f"path/to/{model_dir.name}",
        class_list=" or ".join(f"**{name}**" for name in class_names),
        class_ids=", ".join(f"`{index}` {name}" for index, name in sorted(id2label.items())),
        sidewalk_id=next((i for i, name in id2label.items() if name == "sidewalk"), max(id2label)),
        model=_model_summary(model_config),
        dataset_description=_dataset_description(dataset_source, dataset_id, dataset_is_local),
        checkpoint_description=_checkpoint_description(model_dir.name, iteration),
        metrics_table=_metrics_table(eval_results, class_names),
        predictions_picture=predictions_picture,
        curves_picture=CURVES_PICTURE,
        recipe_table=_markdown_table(["", ""], _recipe_rows(_with_launcher_settings(run_config, run_dir))),
        provenance="\n".join(f"- **{name}:** {value}" for name, value in _provenance_rows(run_dir)),
        config_yaml=config_path.read_text().strip() if config_path.is_file() else "",
        space_id=space_id,
    )
    _check_card(card, card_eval_results)
    readme = model_dir / "README.md"
    card.save(readme)
    return readme


def publish_run(
    run_dir: str | Path,
    repo_id: str,
    which: str = "final",
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    space_id: str | None = None,
) -> str:
    """Push `run_dir/<which>/` (weights, config, image processor, remote code, card, eval results, pictures)
    to the model repository `repo_id`, creating it if needed; returns the repository's URL.

    The card is rendered again for `repo_id` (so its usage snippets name the repository) when the folder has
    `eval_results.json`. The upload is one `create_commit` with exactly the folder's files: huggingface_hub's
    `upload_folder` would also send the card to the Hub's YAML validator first and, with `hf_xet` installed,
    split large uploads over several commits. `token=None` uses the saved login or `HF_TOKEN`. `space_id`
    (the demo Space beside the model, see `sidewalk_hf.space.publish_space`) is linked from the card.
    """
    run_dir = Path(run_dir)
    if which not in ("final", "best"):
        raise ValueError(f"which must be 'final' or 'best', got {which!r}")
    model_dir = run_dir / which
    if (run_dir / "config.json").is_file() and not model_dir.is_dir():
        raise ValueError(f"{run_dir} is a save_pretrained folder; pass the run folder that contains it")
    for required in ("config.json", "model.safetensors"):
        if not (model_dir / required).is_file():
            raise FileNotFoundError(f"{model_dir / required} is missing: {model_dir} is not a saved model")
    results_path = model_dir / EVAL_RESULTS_FILE
    if results_path.is_file():
        recorded = _read_json(results_path)
        write_model_card(
            model_dir,
            run_dir=run_dir,
            eval_results={split: m for split, m in recorded.items() if isinstance(m, dict)},
            repo_id=repo_id,
            iteration=recorded.get("iteration"),
            space_id=space_id,
        )
    elif not (model_dir / "README.md").is_file():
        raise FileNotFoundError(
            f"{model_dir} has neither {EVAL_RESULTS_FILE} nor README.md; write the card first"
        )

    files = sorted(
        filter_repo_objects(
            (path.relative_to(model_dir).as_posix() for path in model_dir.rglob("*") if path.is_file()),
            ignore_patterns=_IGNORED_UPLOADS,
        )
    )
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_url.repo_id, branch=revision, repo_type="model", exist_ok=True)
    commit = api.create_commit(
        repo_url.repo_id,
        [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(model_dir / name)) for name in files],
        commit_message=commit_message or f"Upload {which} model of run {run_dir.name}",
        repo_type="model",
        revision=revision,
    )
    logger.info("uploaded %d files from %s: %s", len(files), model_dir, commit.commit_url)
    return str(repo_url) if revision is None else f"{repo_url}/tree/{revision}"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def _read_run_config(path: Path) -> dict:
    if not path.is_file():
        logger.warning("no resolved config at %s; the card will not describe the training recipe", path)
        return {}
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict):
        raise TypeError(f"{path}: the top level must be a mapping of keys, got {type(config).__name__}")
    return config


def _config_value(config: Mapping, dotted_key: str, default: Any = None) -> Any:
    node: Any = config
    for part in dotted_key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_local_dataset(source: str, run_config: Mapping, run_dir: Path) -> bool:
    """Whether DATASET.SOURCE named a local folder rather than a Hub dataset id.

    Relative folders were resolved against the training's working directory, which the run folder does not
    record; it is usually the folder holding OUTPUT.ROOT, so both it and the current directory are tried. The
    generated synthetic dataset (a folder name containing "synthetic", generated when missing) is always local.
    """
    if not _HUB_DATASET_ID.match(source) or source.startswith((".", "/", "~")):
        return True
    if "synthetic" in Path(source).name and _config_value(
        run_config, "DATASET.SYNTHETIC.GENERATE_IF_MISSING"
    ):
        return True
    return any((base / source).exists() for base in (Path.cwd(), run_dir.parent, run_dir.parent.parent))


def _dataset_description(source: str, dataset_id: str, is_local: bool) -> str:
    if not source:
        return "an unrecorded dataset"
    if not is_local:
        return f"the Hub dataset [{dataset_id}](https://huggingface.co/datasets/{dataset_id})"
    if "synthetic" in dataset_id:
        return "the synthetic aerial sidewalk dataset generated by `sidewalk_hf` (not real imagery)"
    return f"a local dataset folder, `{dataset_id}`"


def _checkpoint_description(which: str, iteration: int | None) -> str:
    at = f" at iteration {iteration:,}" if isinstance(iteration, int) else ""
    if which == "best":
        return f"the best validation mean IoU of the run{at}"
    if which == "final":
        return f"the end of the run{at}"
    return at.strip()


def _markdown_table(
    header: list[str], rows: list[list[str]] | list[tuple[str, ...]], align: str = "---"
) -> str:
    if not rows:
        return ""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([" --- "] + [f" {align} "] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _model_summary(model_config: Mapping) -> dict:
    return {
        "backbone": model_config.get("backbone", "unknown"),
        "output_stride": model_config.get("output_stride", "?"),
        "aspp_dilations": model_config.get("aspp_dilations", []),
        "num_channels": model_config.get("num_channels", 3),
        "image_mean": [f"{v:g}" for v in model_config.get("image_mean", [])],
        "image_std": [f"{v:g}" for v in model_config.get("image_std", [])],
    }


def _format_metric(value: Any) -> str:
    return f"{value:.4f}" if _is_number(value) else "n/a"


def _metrics_table(eval_results: Mapping[str, Mapping], class_names: list[str]) -> str:
    header = ["split", "mean IoU", *(f"{name} IoU" for name in class_names), "pixel accuracy"]
    header += [f"{name} accuracy" for name in class_names]
    rows = []
    for split, metrics in eval_results.items():
        accuracies = list(metrics.get("per_category_accuracy") or [None] * len(class_names))
        rows.append(
            [split, _format_metric(metrics.get("mean_iou"))]
            + [_format_metric(metrics.get(f"{name}_iou")) for name in class_names]
            + [_format_metric(metrics.get("pixel_accuracy"))]
            + [_format_metric(value) for value in accuracies]
        )
    return _markdown_table(header, rows, align="---:")


def _card_eval_results(
    eval_results: Mapping[str, Mapping], class_names: list[str], dataset_id: str, dataset_name: str
) -> list[EvalResult]:
    metric_specs = dict(CARD_METRICS)
    for key in reported_metric_keys(dict(enumerate(class_names))):
        name = key.removesuffix("_iou")
        metric_specs.setdefault(key, ("iou", f"{name.capitalize()} IoU", name))
    results = []
    for split, metrics in eval_results.items():
        for key, (metric_type, metric_name, metric_config) in metric_specs.items():
            value = metrics.get(key)
            if not _is_number(value):
                continue
            results.append(
                EvalResult(
                    task_type="image-segmentation",
                    task_name="Semantic Segmentation",
                    dataset_type=dataset_id,
                    dataset_name=dataset_name,
                    dataset_split=split,
                    metric_type=metric_type,
                    metric_name=f"{metric_name} ({split})",
                    metric_config=metric_config,
                    metric_value=round(float(value), 4),
                )
            )
    return results


# The recipe in words: (row name, dotted config keys, text from their values).
_RECIPE = [
    ("Iterations", ("SOLVER.MAX_ITER", "DATALOADER.BATCH_SIZE"),
     lambda iterations, batch: f"{iterations:,} at a global batch of {batch} ({iterations * batch:,} chip exposures)"),
    ("Optimizer", ("SOLVER.MOMENTUM", "SOLVER.NESTEROV"),
     lambda momentum, nesterov: f"SGD, momentum {momentum}" + (", Nesterov" if nesterov else "")),
    ("Learning rate", ("SOLVER.BASE_LR", "SOLVER.WARMUP_FACTOR", "SOLVER.WARMUP_ITERS", "SOLVER.FINAL_LR"),
     lambda base, factor, warmup, final: f"linear warmup over {warmup:,} iterations from {base * factor:g} to "
     f"{base:g}, then cosine decay to {final:g}"),
    ("Weight decay", ("SOLVER.WEIGHT_DECAY", "SOLVER.WEIGHT_DECAY_NORM"),
     lambda decay, norm_decay: f"{decay:g} ({norm_decay:g} on normalization layers)"),
    ("Gradient clipping", ("SOLVER.CLIP_GRAD_NORM",), lambda norm: f"global norm {norm:g}"),
    ("Loss", ("MODEL.LOSS.TOP_K_PERCENT_PIXELS", "MODEL.LOSS.CLASS_WEIGHTS", "MODEL.IGNORE_VALUE"),
     lambda top_k, weights, ignore: f"hard pixel mining cross-entropy averaging the top {top_k:.0%} of pixel "
     f"losses, class weights {list(weights)}, mask value {ignore} ignored"),
    ("Augmentation", ("INPUT.SCALE_RANGE", "INPUT.CROP_SIZE_PX"),
     lambda scales, crop: f"random scale in {list(scales)}, random {crop} px crop, flips"),
    ("Input normalization", ("INPUT.PIXEL_MEAN", "INPUT.PIXEL_STD"),
     lambda mean, std: f"per-band mean {list(mean)} and standard deviation {list(std)} (0-255 scale)"),
    ("Mixed precision", ("SOLVER.MIXED_PRECISION",), str),
    ("Initial weights", ("MODEL.WEIGHTS",), lambda weights: f"`{Path(weights).name}`" if weights else "none"),
    ("Dataset", ("DATASET.SOURCE", "DATASET.TRAIN_SPLIT"), lambda source, split: f"`{source}`, split `{split}`"),
    ("Seed", ("SEED",), str),
]  # fmt: skip


def _recipe_rows(config: Mapping) -> list[tuple[str, str]]:
    """The training recipe from the resolved config; rows whose keys are absent or malformed are left out."""
    rows = []
    for name, keys, describe in _RECIPE:
        values = [_config_value(config, key) for key in keys]
        if any(value is None for value in values):
            continue
        try:
            rows.append((name, describe(*values)))
        except (TypeError, ValueError):
            logger.warning(
                "config values %s do not describe %r; left out of the card", dict(zip(keys, values)), name
            )
    return rows


def _with_launcher_settings(config: Mapping, run_dir: Path) -> dict:
    """The run config with the mixed precision the launcher chose (recorded in env.json) where the config
    left it to the launcher."""
    environment_path = run_dir / "env.json"
    if _config_value(config, "SOLVER.MIXED_PRECISION") is not None or not environment_path.is_file():
        return dict(config)
    resolved = _read_json(environment_path).get("mixed_precision")
    if resolved is None:
        return dict(config)
    return {**config, "SOLVER": {**(config.get("SOLVER") or {}), "MIXED_PRECISION": resolved}}


def _provenance_rows(run_dir: Path) -> list[tuple[str, str]]:
    rows = []
    environment_path = run_dir / "env.json"
    if environment_path.is_file():
        environment = _read_json(environment_path)
        git = environment.get("git") or {}
        if git.get("commit"):
            rows.append(
                (
                    "Code",
                    f"`sidewalk_hf` at commit `{git['commit']}`"
                    + (" (with local changes)" if git.get("dirty") else ""),
                )
            )
        elif git.get("version"):
            rows.append(("Code", f"`sidewalk_hf` {git['version']} (installed package)"))
        if environment.get("num_processes"):
            rows.append(("Processes", str(environment["num_processes"])))
        packages = environment.get("packages") or {}
        named = [
            f"{name} {packages[name]}"
            for name in ("torch", "transformers", "timm", "accelerate")
            if name in packages
        ]
        if named:
            rows.append(("Packages", ", ".join(named)))
    command_path = run_dir / "command.txt"
    if command_path.is_file():
        rows.append(("Command", f"`{command_path.read_text().strip()}`"))
    return rows


def _copy_validation_picture(pictures_dir: Path, destination: Path, iteration: int | None) -> str | None:
    """Copy the validation overlay of `iteration` (or the latest one) next to the card; its relative name."""
    found = {}
    if pictures_dir.is_dir():
        for path in pictures_dir.iterdir():
            match = _VALIDATION_PICTURE.match(path.name)
            if match:
                found[int(match.group(1))] = path
    if not found:
        destination.unlink(missing_ok=True)
        return None
    source = found.get(iteration) if iteration is not None else None
    shutil.copyfile(source or found[max(found)], destination)
    return destination.name


def _check_card(card: ModelCard, eval_results: list[EvalResult]) -> None:
    """The rendered card must parse back, and its model-index must give back the same results."""
    reloaded = ModelCard(str(card))
    data = ModelCardData(**reloaded.data.to_dict())
    if eval_results and data.eval_results != eval_results:
        raise ValueError(
            "the rendered model card's model-index does not round-trip to the evaluation results"
        )
