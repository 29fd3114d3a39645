"""Large-area inference across machines: Ray Data actors running ``predict_part`` over a list of parts.

Each actor loads the model once (one GPU per actor where the cluster has GPUs) and runs whole parts with
the same code as the local engine, writing into the shared output folder; it returns the part's manifest
entry, ``failed`` with the error text when a tile cannot be done, so one bad tile never kills the job.
The output folder must be visible to every node (a shared file system), as the inputs must be.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ..geo.raster import PixelRule
from .predictor import InferenceOptions, Part, RasterPlan, predict_part


class _PartActor:
    def __init__(self, model_ref: str, options: dict, out_dir: str, device: str | None, optimize: bool):
        import torch

        from .model_loading import load_inference_model

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        rule = PixelRule.from_dict(options.pop("rule"))
        self.options = InferenceOptions(**options, rule=rule)
        self.model = load_inference_model(
            model_ref, device=device, dtype=self.options.dtype, optimize=optimize
        )
        self.out_dir = Path(out_dir)

    def __call__(self, batch: dict) -> dict:
        results = []
        for part_json, plan_json in zip(batch["part"], batch["plan"]):
            part = Part(**json.loads(part_json))
            plan_data = json.loads(plan_json)
            plan = _plan_from_json(plan_data)
            try:
                entry = predict_part(self.model, part, plan, self.options, self.out_dir)
            except Exception as error:  # noqa: BLE001 - recorded in the manifest, never fatal to the job
                entry = {
                    "part": part.key,
                    "path": part.path,
                    "y0": part.y0,
                    "y1": part.y1,
                    "status": "failed",
                    "error": f"{type(error).__name__}: {error}",
                    "windows_run": 0,
                    "windows_nodata": 0,
                    "seconds": 0.0,
                }
            entry["parts_in_input"] = part.parts_in_input
            results.append(json.dumps(entry))
        return {"entry": results}


def _plan_to_json(plan: RasterPlan) -> str:
    profile = plan.profile
    return json.dumps(
        {
            "path": plan.path,
            "stem": plan.stem,
            "height": plan.height,
            "width": plan.width,
            "crs": profile["crs"].to_wkt() if profile["crs"] else None,
            "transform": list(profile["transform"])[:6],
            "warnings": plan.warnings,
        }
    )


def _plan_from_json(data: dict) -> RasterPlan:
    from affine import Affine
    from rasterio.crs import CRS

    profile = {
        "width": data["width"],
        "height": data["height"],
        "crs": CRS.from_wkt(data["crs"]) if data["crs"] else None,
        "transform": Affine(*data["transform"]),
    }
    return RasterPlan(data["path"], data["stem"], data["height"], data["width"], profile, data["warnings"])


def run_parts_on_ray(
    parts: list[Part],
    plans: dict[str, RasterPlan],
    model_ref: str,
    options: InferenceOptions,
    out_dir: Path,
    *,
    device: str | None = None,
    optimize: bool = True,
    address: str | None = None,
    num_actors: int = 0,
) -> dict[str, dict]:
    """Run ``parts`` on a Ray cluster (``address``; a running ``ray.init`` is used as it is)."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("--engine ray needs Ray: pip install 'sidewalk-hf[ray]'") from None
    if not parts:
        return {}
    if not ray.is_initialized():
        ray.init(address=address or None)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    actors = num_actors or max(1, gpus or int(resources.get("CPU", 1)) // 2)
    rows = [{"part": json.dumps(asdict(p)), "plan": _plan_to_json(plans[p.path])} for p in parts]
    options_dict = asdict(options) | {"rule": options.rule.to_dict()}
    # A part is a whole tile's work: one per call, and Ray's own retries for a lost node.
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    results = dataset.map_batches(
        _PartActor,
        fn_constructor_kwargs={
            "model_ref": model_ref,
            "options": options_dict,
            "out_dir": str(Path(out_dir).resolve()),
            "device": device,
            "optimize": optimize,
        },
        batch_size=1,
        concurrency=min(actors, len(rows)),
        num_gpus=1 if gpus else 0,
        num_cpus=1,
    ).take_all()
    entries = [json.loads(row["entry"]) for row in results]
    return {entry["part"]: entry for entry in entries}
