"""The vector stage across machines: Ray Data tasks running the local engine's ``run_tile`` over a run's tiles.

A tile is one row and one task (one CPU): it writes the tile's files into the output folder and returns
its summary, raw graph and polygons, which the caller merges across tile borders exactly as after the local
engine. A tile that fails comes back as its failed summary (``run_tile`` records it), so one bad tile never
ends the job. Jobs and results travel pickled, as they do to and from the local engine's worker processes.
The rasters, the run's VRT mosaics and the output folder must be visible to every node (a shared file
system); the inference engine has the same rule (``inference/ray_engine.py``).
"""

from __future__ import annotations

import pickle


def _run_row(row: dict) -> dict:
    from .vectorize import run_tile

    return {"index": row["index"], "result": pickle.dumps(run_tile(pickle.loads(row["job"])))}


def run_tiles_on_ray(jobs: list[dict], *, address: str | None = None) -> list[dict]:
    """``run_tile`` of each job on a Ray cluster (``address``; a running ``ray.init`` is used as it is), the
    results in the jobs' order."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("--engine ray needs Ray: pip install 'sidewalk-hf[ray]'") from None
    if not jobs:
        return []
    if not ray.is_initialized():
        ray.init(address=address or None)
    rows = [{"index": index, "job": pickle.dumps(job)} for index, job in enumerate(jobs)]
    # One tile per block and task; Ray retries a task whose node is lost.
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    results: list[dict | None] = [None] * len(jobs)
    for row in dataset.map(_run_row, num_cpus=1).take_all():
        results[row["index"]] = pickle.loads(row["result"])
    return results
