"""A prediction run over many rasters: planning, the manifest, resuming, and the engines that run the parts.

``run.json`` accounts for every input: ``ok`` (with its outputs' checksums), ``failed`` (with the error
text) or ``skipped`` (with why). While a run goes on, each process records every finished part at once in
``run.part-<rank>-<start>.json`` (rewritten atomically); ``run.json`` is written when the run ends. A run killed at
any moment can be resumed with ``--resume``: inputs whose outputs exist with their recorded checksums (in
``run.json`` or a part file) are kept, the rest run again, and the files come out the same as in an
uninterrupted run.

Engines, all running the same ``predict_part``:

- ``local`` (default): this process, or each process under ``accelerate launch --num_processes N``. Parts are
  given to processes by a deterministic plan (largest first, to the least loaded); a raster is cut into
  row bands only when there are fewer rasters than processes. Each process records its finished parts in a part file;
  no collective operation runs while tiles are processed, so a failed tile cannot stall the others. At the
  end the main process joins split rasters and merges the parts into ``run.json``.
- ``ray``: Ray Data actors (one model each; one GPU each where there are GPUs) over the list of parts, on a
  local or remote Ray cluster. Failed tiles come back as manifest entries; they never kill the job.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..geo.raster import PixelRule, RasterInputError, expand_inputs, open_raster
from .outputs import sha256_of
from .predictor import (
    InferenceOptions,
    Part,
    RasterPlan,
    assemble_parts,
    plan_raster,
    predict_part,
    split_into_parts,
)
from .windows import WindowGrid

logger = logging.getLogger(__name__)
MANIFEST = "run.json"
FORMAT = "sidewalk_hf.predict/1"


class OutputFolderError(RuntimeError):
    """The output folder holds another run's files, or a manifest that does not match this run."""


@functools.cache  # importlib.metadata scans every installed distribution: once per process
def _package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("sidewalk-hf", "torch", "transformers", "rasterio", "numpy", "accelerate", "ray"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    try:
        import rasterio

        versions["gdal"] = rasterio.__gdal_version__
    except ImportError:
        pass
    return versions


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _outputs_intact(entry: dict, out_dir: Path) -> bool:
    outputs = entry.get("outputs") or {}
    return bool(outputs) and all(
        (out_dir / o["path"]).is_file() and sha256_of(out_dir / o["path"]) == o["sha256"]
        for o in outputs.values()
    )


def _previous_entries(out_dir: Path) -> tuple[dict | None, dict]:
    """The previous manifest and every finished entry it, or a killed run's part files, recorded."""
    manifest = None
    entries: dict = {}
    if (out_dir / MANIFEST).is_file():
        manifest = json.loads((out_dir / MANIFEST).read_text())
        entries.update(manifest.get("inputs", {}))
    for part_file in sorted(out_dir.glob("run.part-*.json")):
        for entry in json.loads(part_file.read_text()).get("parts", {}).values():
            if entry.get("parts_in_input", 1) == 1 and entry.get("status") == "ok":
                entries.setdefault(entry["path"], entry)
    return manifest, entries


def _check_output_folder(out_dir: Path, resume: bool, overwrite: bool, parameters: dict) -> dict:
    """Finished entries to keep on ``--resume``; errors when the folder holds another run's files."""
    manifest, entries = _previous_entries(out_dir)
    ours = [p for p in out_dir.glob("*.tif") if p.name.endswith((".mask.tif", ".prob.tif"))]
    if not resume and not overwrite and (manifest is not None or ours):
        raise OutputFolderError(
            f"{out_dir} already holds the outputs of a prediction run ({MANIFEST if manifest else ours[0].name}); "
            "pass --resume to continue it, --overwrite to replace it, or choose another --out"
        )
    if not resume:
        return {}
    if manifest is not None:
        before = manifest.get("parameters", {})
        changed = sorted(k for k in set(before) | set(parameters) if before.get(k) != parameters.get(k))
        if changed:
            raise OutputFolderError(
                f"{out_dir}/{MANIFEST} was made with other parameters ({', '.join(changed)}); "
                "resume with the same ones, or use --overwrite"
            )
    return {path: e for path, e in entries.items() if e.get("status") == "ok" and _outputs_intact(e, out_dir)}


def _assign(parts: list[tuple[Part, int]], num_processes: int) -> list[list[Part]]:
    """Largest part first, to the least loaded process (ties: lowest rank); deterministic."""
    loads = [0] * num_processes
    shares: list[list[Part]] = [[] for _ in range(num_processes)]
    for part, windows in sorted(parts, key=lambda item: (-item[1], item[0].path, item[0].y0)):
        rank = min(range(num_processes), key=lambda r: (loads[r], r))
        loads[rank] += windows
        shares[rank].append(part)
    return shares


def _part_windows(part: Part, grid: WindowGrid) -> int:
    r0, r1 = grid.rows_for_output_band(part.y0, part.y1)
    return (r1 - r0) * len(grid.col_starts)


def predict_rasters(
    model_ref: str,
    inputs: list[str],
    out_dir: str | os.PathLike,
    options: InferenceOptions,
    *,
    engine: str = "local",
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    optimize: bool = True,
    ray_address: str | None = None,
    ray_num_actors: int = 0,
    command: list[str] | None = None,
) -> dict:
    """Predict every input raster into ``out_dir``; returns the manifest (also written as ``run.json``)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from .model_loading import load_inference_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A bare PartialState must be told about ACCELERATE_USE_CPU (Accelerator() reads it by itself).
    state = (
        PartialState(cpu=device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU"))
        if engine == "local"
        else None
    )
    rank, world = (state.process_index, state.num_processes) if state else (0, 1)
    started = time.time()

    model = load_inference_model(
        model_ref,
        device=device or (str(state.device) if state else None),
        dtype=options.dtype,
        optimize=optimize,
    )
    if options.rule.bands is None and options.rule.scale == "none" and model.pixel_rule:
        options = replace(options, rule=PixelRule.from_dict(model.pixel_rule))
        logger.info("pixel rule from the model: %s", options.rule.describe())
    if options.num_workers < 0:
        options = replace(
            options, num_workers=0 if model.device.type == "cpu" else min(4, (os.cpu_count() or 2) // 2)
        )
    if not options.window_px:
        if model.training_chip_px is None:
            logger.warning(
                "the model does not record its training chip size; windows of 256 px (set --window-px)"
            )
        options = replace(options, window_px=model.training_chip_px or 256)

    paths = [str(p) for p in expand_inputs(inputs)]
    stems: dict[str, str] = {}
    for path in paths:
        stem = Path(path).stem
        if stem in stems:
            raise RasterInputError(
                f"two inputs would write the same outputs {stem}.mask.tif: {stems[stem]} and {path}"
            )
        stems[stem] = path

    previous_manifest = (
        json.loads((out_dir / MANIFEST).read_text()) if resume and (out_dir / MANIFEST).is_file() else None
    )
    if options.rule.kind == "percentiles" and options.rule.ranges is None:
        stored = (previous_manifest or {}).get("pixel_rule")
        if (
            stored
            and stored.get("scale") == options.rule.scale
            and stored.get("bands") == (list(options.rule.bands) if options.rule.bands else None)
        ):
            options = replace(options, rule=PixelRule.from_dict(stored))
        else:
            readable = []
            for path in paths:
                try:
                    readable.append(open_raster(path))
                except RasterInputError:
                    pass
            try:
                options = replace(options, rule=options.rule.resolve(readable))
            finally:
                for src in readable:
                    src.close()
        logger.info("pixel rule for this run: %s", options.rule.describe())

    parameters = {"model": model.source, "revision": model.revision} | {
        k: v for k, v in options.manifest().items() if k not in ("batch_size", "num_workers")
    }
    kept = _check_output_folder(out_dir, resume, overwrite, parameters) if rank == 0 else {}
    if rank == 0:  # what a killed run left half-written: hidden temporaries and unjoined row bands
        for stale in [*out_dir.glob(".*.tmp-*"), *out_dir.glob(".*.part*.tif")]:
            stale.unlink(missing_ok=True)
    if world > 1:
        state.wait_for_everyone()  # the folder check happens once, before anyone writes
        if rank != 0:
            _, finished = _previous_entries(out_dir)
            kept = {p: e for p, e in finished.items() if e.get("status") == "ok"} if resume else {}
            kept = {p: e for p, e in kept.items() if _outputs_intact(e, out_dir)}

    entries: dict[str, dict] = {}
    plans: dict[str, RasterPlan] = {}
    grids: dict[str, WindowGrid] = {}
    todo = [p for p in paths if p not in kept]
    for path in paths:
        if path in kept:
            entries[path] = kept[path] | {"resumed": True}
    for path in todo:
        try:
            plans[path] = plan_raster(path, options.rule, model.num_channels)
            grids[path] = WindowGrid.for_raster(
                plans[path].height, plans[path].width, options.window_px, options.stride_fraction
            )
        except Exception as error:  # noqa: BLE001 - recorded, named; the other inputs still run
            entries[path] = {"path": path, "stem": Path(path).stem, "status": "failed", "error": str(error)}
    num_engines = world if engine == "local" else max(1, ray_num_actors)
    pieces = max(1, -(-num_engines // max(1, len(plans))))
    all_parts = [
        (part, _part_windows(part, grids[path]))
        for path in plans
        for part in split_into_parts(plans[path], grids[path], pieces)
    ]

    if engine == "ray":
        from .ray_engine import run_parts_on_ray

        part_entries = run_parts_on_ray(
            [p for p, _ in all_parts],
            plans,
            model_ref,
            options,
            out_dir,
            device=device,
            optimize=optimize,
            address=ray_address,
            num_actors=ray_num_actors,
        )
    else:
        share = _assign(all_parts, world)[rank]
        part_entries = _run_share(model, share, plans, options, out_dir, rank, world, parameters)
        if world > 1:
            state.wait_for_everyone()
            if rank != 0:
                return {}
            wanted = {part.key for part, _ in all_parts}
            part_entries = {}
            for part_file in sorted(
                out_dir.glob("run.part-*.json"), key=lambda p: int(p.stem.rsplit("-", 1)[1])
            ):
                part_entries.update(json.loads(part_file.read_text())["parts"])  # newest last: this run's
            part_entries = {key: e for key, e in part_entries.items() if key in wanted}

    by_input: dict[str, list[dict]] = {}
    for entry in part_entries.values():
        by_input.setdefault(entry["path"], []).append(entry)
    kinds = ["mask"] + (["prob"] if options.write_probs else [])
    for path, pieces_done in by_input.items():
        plan = plans[path]
        entry = {
            "path": path,
            "stem": plan.stem,
            "width": plan.width,
            "height": plan.height,
            "crs": str(plan.profile["crs"]) if plan.profile["crs"] else None,
            "transform": list(plan.profile["transform"])[:6],
            "warnings": plan.warnings,
            "windows_run": sum(e["windows_run"] for e in pieces_done),
            "windows_nodata": sum(e["windows_nodata"] for e in pieces_done),
            "seconds": round(sum(e["seconds"] for e in pieces_done), 3),
        }
        failed = [e for e in pieces_done if e["status"] != "ok"]
        if failed:
            entry.update(status="failed", error="; ".join(e["error"] for e in failed))
            for e in pieces_done:
                for output in (e.get("outputs") or {}).values():
                    if "strip" in output:
                        (out_dir / output["strip"]).unlink(missing_ok=True)
        elif len(pieces_done) == 1 and pieces_done[0]["part"] == plan.stem:
            entry.update(status="ok", outputs=pieces_done[0]["outputs"])
        else:
            try:
                entry.update(
                    status="ok", outputs=assemble_parts(plan.stem, plan, pieces_done, out_dir, kinds)
                )
            except Exception as error:  # noqa: BLE001
                entry.update(status="failed", error=f"joining the row bands failed: {error}")
        entries[path] = entry

    manifest = _manifest(model, options, parameters, paths, entries, engine, num_engines, started, command)
    _write_json_atomic(out_dir / MANIFEST, manifest)
    for part_file in out_dir.glob("run.part-*.json"):
        part_file.unlink()
    return manifest


def _manifest(model, options, parameters, paths, entries, engine, num_engines, started, command) -> dict:
    ordered = {path: entries[path] for path in paths if path in entries}
    counts = {
        status: sum(e["status"] == status for e in ordered.values()) for status in ("ok", "failed", "skipped")
    }
    return {
        "format": FORMAT,
        "command": command if command is not None else sys.argv,
        "model": {
            "source": model.source,
            "revision": model.revision,
            "training_chip_px": model.training_chip_px,
        },
        "parameters": parameters,
        "pixel_rule": options.rule.to_dict(),
        "pixel_rule_text": options.rule.describe(),
        "engine": engine,
        "num_processes": num_engines,
        "packages": dict(_package_versions()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "summary": counts | {"inputs": len(paths)},
        "inputs": ordered,
    }


def _run_share(model, share, plans, options, out_dir, rank, world, parameters) -> dict:
    """This process's parts, recording each finished one at once in its part file."""
    from tqdm.auto import tqdm

    part_file = (
        out_dir / f"run.part-{rank}-{time.time_ns()}.json"
    )  # a resumed run keeps the killed run's files
    done: dict[str, dict] = {}
    total = sum(
        _part_windows(
            p,
            WindowGrid.for_raster(
                plans[p.path].height, plans[p.path].width, options.window_px, options.stride_fraction
            ),
        )
        for p in share
    )
    started = time.perf_counter()
    with tqdm(
        total=total, unit="chip", desc=f"predict [{rank}/{world}]", position=rank, dynamic_ncols=True
    ) as bar:
        for i, part in enumerate(share):
            entry = predict_part(model, part, plans[part.path], options, out_dir, progress=bar)
            entry["parts_in_input"] = part.parts_in_input
            done[part.key] = entry
            _write_json_atomic(part_file, {"rank": rank, "parameters": parameters, "parts": done})
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(tiles_per_s=f"{(i + 1) / elapsed:.2f}", chips_per_s=f"{bar.n / elapsed:.1f}")
    return done
