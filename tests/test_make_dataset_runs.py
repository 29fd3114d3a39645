"""Datasets from geodata at work: worker processes, an interrupted build resumed, training on the result with
the pixel rule carried into the model, and publishing with only the Hub's HTTP replaced."""

from __future__ import annotations

import json
import os
import runpy
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("rasterio")
pytest.importorskip("pyogrio")

import pyarrow.parquet as pq
from huggingface_hub import CommitInfo, HfApi, RepoUrl

from sidewalk_hf.data.scene import write_scene
from sidewalk_hf.datasets_from_geodata import BuildError, BuildOptions, build_dataset

REPO = Path(__file__).resolve().parents[1]


def osm_lines(scene, path: Path) -> Path:
    collection = json.loads(scene.centerlines.read_text())
    for feature in collection["features"]:
        feature["properties"]["width"] = feature["properties"].pop("width_m")
    path.write_text(json.dumps(collection))
    return path


def all_rows(dataset: Path) -> dict[str, list]:
    """Every split's rows in shard order, as plain values (image and mask bytes included)."""
    rows = {}
    for path in sorted((dataset / "data").glob("*.parquet")):
        rows.setdefault(path.name.split("-")[0], []).extend(pq.read_table(path).to_pylist())
    return rows


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    scenes = [
        write_scene(
            folder,
            f"tile{i}",
            height_px=384,
            width_px=384,
            seed=20 + i,
            gsd_m=0.3,
            origin=(560_000.0 + 115.2 * i, 4_460_000.0),
        )
        for i in range(2)
    ]
    lines = [osm_lines(scene, folder / f"tile{i}.geojson") for i, scene in enumerate(scenes)]
    return [str(s.image) for s in scenes], [str(p) for p in lines]


def options(inputs, out: Path, **overrides) -> BuildOptions:
    images, labels = inputs
    settings = {
        "images": images,
        "labels": labels,
        "out": str(out),
        "chip_px": 64,
        "overlap_px": 16,
        "split_block_m": 40,
        "seed": 2,
        "num_workers": 0,
        "chips_per_unit": 16,
    }
    return BuildOptions(**(settings | overrides))


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "dataset"
    report = build_dataset(options(inputs, out))
    return out, report


def test_worker_processes_write_the_same_dataset(inputs, reference, tmp_path):
    out, report = reference
    assert report["units"]["total"] > 4
    parallel = tmp_path / "parallel"
    build_dataset(options(inputs, parallel, num_workers=2))
    assert all_rows(parallel) == all_rows(out)
    assert (parallel / "README.md").read_text() == (out / "README.md").read_text()


@pytest.mark.slow
def test_an_interrupted_build_resumes_to_the_same_dataset(inputs, reference, tmp_path):
    out = tmp_path / "dataset"
    script = (
        "import sys, json; from sidewalk_hf.datasets_from_geodata import BuildOptions, build_dataset; "
        "build_dataset(BuildOptions(**json.loads(sys.argv[1])))"
    )
    settings = {k: v for k, v in vars(options(inputs, out)).items()}
    process = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(settings)],
        start_new_session=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if list((out / ".build" / "units").glob("*/done.json")):
            break
        time.sleep(0.01)
    assert process.poll() is None, (
        f"the build ended before it could be interrupted: {process.stderr.read()[-2000:]}"
    )
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert not (out / "README.md").exists()

    with pytest.raises(BuildError, match="unfinished build"):
        build_dataset(options(inputs, out))
    with pytest.raises(BuildError, match="chip_px"):
        build_dataset(options(inputs, out, chip_px=96), resume=True)
    report = build_dataset(options(inputs, out), resume=True)
    assert 0 < report["units"]["ran_now"] < report["units"]["total"]
    assert all_rows(out) == all_rows(reference[0])
    assert not (out / ".build").exists()


class FakeHub:
    """Stands in for the Hub at huggingface_hub's network boundary and keeps what would be uploaded."""

    def __init__(self, monkeypatch):
        self.created, self.commits = [], []
        hub = self

        def create_repo(api, repo_id, *, repo_type=None, private=None, exist_ok=False, **kwargs):
            hub.created.append({"repo_id": repo_id, "repo_type": repo_type, "private": private})
            return RepoUrl(f"https://huggingface.co/datasets/{repo_id}")

        def create_commit(api, repo_id, operations, *, commit_message, repo_type=None, **kwargs):
            files = {}
            for operation in operations:
                with operation.as_file() as handle:
                    files[operation.path_in_repo] = handle.read()
            hub.commits.append({"repo_id": repo_id, "repo_type": repo_type, "files": files})
            return CommitInfo(
                commit_url=f"https://huggingface.co/datasets/{repo_id}/commit/{'0' * 40}",
                commit_message=commit_message,
                commit_description="",
                oid="0" * 40,
            )

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)


def test_push_to_hub_uploads_a_loadable_dataset_and_never_the_token(inputs, tmp_path, monkeypatch, capsys):
    import datasets

    hub = FakeHub(monkeypatch)
    token = f"hf_{secrets.token_hex(16)}"
    monkeypatch.setenv("HF_TOKEN", token)
    images, labels = inputs
    out = tmp_path / "dataset"
    main = runpy.run_path(str(REPO / "scripts" / "make_dataset.py"), run_name="make_dataset")["main"]
    code = main(
        [
            "--images",
            *images,
            "--labels",
            *labels,
            "--out",
            str(out),
            "--chip-size",
            "64",
            "--split-block-m",
            "40",
            "--seed",
            "2",
            "--num-workers",
            "0",
            "--license",
            "odbl",
            "--push-to-hub",
            "org/nj-sidewalks",
        ]
    )
    assert code == 0
    assert hub.created == [{"repo_id": "org/nj-sidewalks", "repo_type": "dataset", "private": True}]
    (commit,) = hub.commits
    assert commit["repo_type"] == "dataset"
    local = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sorted(commit["files"]) == local and "README.md" in local and "footprints/train.geojson" in local
    mirror = tmp_path / "mirror"
    for name, content in commit["files"].items():
        (mirror / name).parent.mkdir(parents=True, exist_ok=True)
        (mirror / name).write_bytes(content)
    rows = list(datasets.load_dataset(str(mirror), split="train", streaming=True))
    assert len(rows) == json.loads((out / "build_report.json").read_text())["splits"]["train"]["chips"]
    assert "license: odbl" in commit["files"]["README.md"].decode()
    captured = capsys.readouterr()
    assert "published" in captured.out and token not in captured.out + captured.err
    assert all(token.encode() not in content for content in commit["files"].values())


@pytest.mark.slow
def test_training_on_a_built_dataset_carries_its_pixel_rule(tmp_path):
    """configs/demo.yaml on a dataset cut from a 16-bit 4-band raster (bands 2,3,4): the model's image
    processor records the rule, which large-area inference then uses by default."""
    scene = write_scene(
        tmp_path, "nrgb", height_px=512, width_px=512, seed=4, gsd_m=0.3, num_bands=4, dtype="uint16"
    )
    lines = osm_lines(scene, tmp_path / "lines.geojson")
    out = tmp_path / "dataset"
    report = build_dataset(
        BuildOptions(
            images=[str(scene.image)],
            labels=[str(lines)],
            out=str(out),
            chip_px=64,
            overlap_px=0,
            bands="2,3,4",
            scale="fixed:0,65535",
            split=(0.6, 0.2, 0.2),
            split_block_m=40,
            seed=0,
            num_workers=0,
        )
    )
    assert all(report["splits"][s]["chips"] >= 2 for s in ("train", "validation", "test")), report["splits"]
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(REPO / "scripts" / "train.py"),
        "--config",
        "demo.yaml",
        "--opts",
        "DATASET.SOURCE",
        str(out),
        "SOLVER.MAX_ITER",
        "3",
        "SOLVER.WARMUP_ITERS",
        "1",
        "TEST.EVAL_PERIOD",
        "3",
        "TEST.NUM_PICTURES",
        "1",
        "CHECKPOINT.PERIOD",
        "3",
        "DATALOADER.BATCH_SIZE",
        "4",
        "DATALOADER.BUFFER_BATCHES",
        "2",
        "DATALOADER.EVAL_BATCH_SIZE",
        "2",
        "INPUT.CROP_SIZE_PX",
        "64",
        "MODEL.ASPP_CHANNELS",
        "16",
        "MODEL.PROJECT_CHANNELS",
        "8",
        "MODEL.DECODER_CHANNELS",
        "16",
        "OUTPUT.ROOT",
        str(tmp_path / "runs"),
        "OUTPUT.LOG_PERIOD",
        "1",
    ]
    env = dict(
        os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""
    )
    result = subprocess.run(
        command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    iterations = [json.loads(line)["iter"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(iterations) == 3
    processor = json.loads((run_dir / "final" / "preprocessor_config.json").read_text())
    assert processor["pixel_rule"] == {
        "bands": [2, 3, 4],
        "scale": "fixed:0,65535",
        "ranges": [[0.0, 65535.0]],
    }

    from sidewalk_hf.inference import load_inference_model

    assert load_inference_model(run_dir / "final", device="cpu").pixel_rule == processor["pixel_rule"]
