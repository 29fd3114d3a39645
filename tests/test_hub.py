"""Model cards and publishing, offline.

The Hub is replaced at huggingface_hub's own network boundary (`HfApi.create_repo`, `HfApi.create_commit`, and
`HfApi.create_branch` for a revision); everything else is the real code. What would be uploaded is rebuilt from
the captured commit operations and loaded in a fresh process.
"""

import json
import logging
import math
import os
import runpy
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard, ModelCardData, RepoUrl
from huggingface_hub.repocard_data import model_index_to_eval_results
from PIL import Image

from sidewalk_hf import (
    SidewalkDeepLabConfig,
    SidewalkDeepLabForSemanticSegmentation,
    SidewalkImageProcessor,
    save_pretrained_with_processor,
)
from sidewalk_hf.hub import plot_training_curves, publish_run, write_model_card

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "backbone": "test_resnet",
    "res5_multi_grid": [1],
    "aspp_channels": 16,
    "decoder_channels": 16,
    "project_channels": 8,
}
RESULTS = {
    "validation": {
        "mean_iou": 0.7784,
        "background_iou": 0.962,
        "sidewalk_iou": 0.5949,
        "pixel_accuracy": 0.964,
        "per_category_accuracy": [0.97, 0.71],
    },
    "test": {
        "mean_iou": 0.7732,
        "background_iou": 0.9619,
        "sidewalk_iou": 0.5845,
        "pixel_accuracy": 0.9638,
        "per_category_accuracy": [0.969, 0.70],
    },
}
RUN_CONFIG = """\
MODEL:
  BACKBONE: test_resnet
  IGNORE_VALUE: 255
  WEIGHTS: checkpoints/d2_cityscapes.pkl
  LOSS:
    CLASS_WEIGHTS: [1.0, 10.0]
    TOP_K_PERCENT_PIXELS: 1.0
DATASET:
  SOURCE: org/aerial-sidewalks
  TRAIN_SPLIT: train
DATALOADER:
  BATCH_SIZE: 48
SOLVER:
  MAX_ITER: 100000
  BASE_LR: 0.001
  FINAL_LR: 0.0001
  WARMUP_ITERS: 1000
  WARMUP_FACTOR: 0.001
  MOMENTUM: 0.9
  WEIGHT_DECAY: 0.0001
  WEIGHT_DECAY_NORM: 0.0
  CLIP_GRAD_NORM: 1.0
SEED: 0
"""
MODEL_FILES = [
    "config.json",
    "configuration_sidewalk_deeplab.py",
    "image_processing_sidewalk_deeplab.py",
    "model.safetensors",
    "layers_sidewalk_deeplab.py",
    "modeling_sidewalk_deeplab.py",
    "preprocessor_config.json",
]
CARD_FILES = ["README.md", "eval_results.json", "training_curves.png", "validation_predictions.png"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run folder laid out as training writes it (see the README), with a tiny model in final/ and best/ and no card yet."""
    run_dir = tmp_path_factory.mktemp("runs") / "20260101-000000-tiny"
    torch.manual_seed(0)
    config = SidewalkDeepLabConfig(**TINY)
    model = SidewalkDeepLabForSemanticSegmentation(config).eval()
    processor = SidewalkImageProcessor.from_model_config(config)
    for which in ("final", "best"):
        save_pretrained_with_processor(model, processor, run_dir / which)
    (run_dir / "config.yaml").write_text(RUN_CONFIG)
    (run_dir / "command.txt").write_text("accelerate launch scripts/train.py --config base.yaml\n")
    lines = [{"iter": i, "loss": 2.0 / i, "lr": 1e-3 * i / 40, "images_per_s": 50.0} for i in range(2, 41, 2)]
    lines += [
        {
            "iter": i,
            "split": "validation",
            "mean_iou": 0.5 + i / 200,
            "background_iou": 0.9,
            "sidewalk_iou": i / 80,
            "pixel_accuracy": 0.95,
        }
        for i in (20, 40)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run_dir / "pictures").mkdir()
    for iteration, shade in ((20, 60), (40, 200)):
        Image.fromarray(np.full((16, 48, 3), shade, np.uint8)).save(
            run_dir / "pictures" / f"validation_iter_{iteration:07d}.png"
        )
    return run_dir


@pytest.fixture
def run_dir(trained_run, tmp_path):
    """A private copy of the run folder, for tests that write into it."""
    return Path(shutil.copytree(trained_run, tmp_path / trained_run.name))


class FakeHub:
    """Stands in for the Hub at huggingface_hub's network boundary and records what would be uploaded."""

    def __init__(self, monkeypatch):
        self.created = []
        self.branches = []
        self.commits = []
        hub = self

        def create_repo(api, repo_id, *, repo_type=None, private=None, exist_ok=False, **kwargs):
            hub.created.append(
                {"repo_id": repo_id, "repo_type": repo_type, "private": private, "exist_ok": exist_ok}
            )
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(api, repo_id, *, branch, repo_type=None, exist_ok=False, **kwargs):
            hub.branches.append({"repo_id": repo_id, "branch": branch, "exist_ok": exist_ok})

        def create_commit(api, repo_id, operations, *, commit_message, revision=None, **kwargs):
            files = {}
            for operation in operations:
                with operation.as_file() as handle:
                    files[operation.path_in_repo] = handle.read()
            hub.commits.append(
                {"repo_id": repo_id, "revision": revision, "message": commit_message, "files": files}
            )
            return CommitInfo(
                commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}",
                commit_message=commit_message,
                commit_description="",
                oid="0" * 40,
            )

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)

    def rebuild(self, destination: Path) -> Path:
        """The repository as the last commit would leave it."""
        for name, content in self.commits[-1]["files"].items():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            (destination / name).write_bytes(content)
        return destination


@pytest.fixture
def fake_hub(monkeypatch):
    return FakeHub(monkeypatch)


def test_card_metadata_parses_and_its_model_index_validates(run_dir):
    readme = write_model_card(
        run_dir / "final", run_dir=run_dir, eval_results=RESULTS, repo_id="org/sidewalk-deeplab"
    )
    card = ModelCard.load(readme)
    metadata = card.data.to_dict()
    assert metadata["license"] == "apache-2.0" and metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-segmentation"
    assert {"image-segmentation", "sidewalk", "deeplabv3plus"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["org/aerial-sidewalks"]

    model_name, results = model_index_to_eval_results(metadata["model-index"])
    assert model_name == "sidewalk-deeplab"
    assert ModelCardData(**metadata).eval_results == results
    by_split_and_metric = {(r.dataset_split, r.metric_name): r for r in results}
    assert by_split_and_metric[("validation", "Mean IoU (validation)")].metric_value == 0.7784
    assert by_split_and_metric[("test", "Sidewalk IoU (test)")].metric_value == 0.5845
    assert by_split_and_metric[("test", "Pixel accuracy (test)")].metric_type == "accuracy"
    assert {r.task_type for r in results} == {"image-segmentation"}
    assert {r.dataset_type for r in results} == {"org/aerial-sidewalks"}
    assert len(results) == 2 * 4  # two splits, four metrics each


def test_card_tells_how_to_use_the_model_and_shows_metrics_recipe_pictures_and_limitations(run_dir):
    model_dir = run_dir / "best"
    text = write_model_card(
        model_dir, run_dir=run_dir, eval_results=RESULTS, repo_id="org/sidewalk-deeplab", iteration=40
    ).read_text()
    assert (
        'AutoModelForSemanticSegmentation.from_pretrained("org/sidewalk-deeplab", trust_remote_code=True)'
        in text
    )
    assert 'pipeline("image-segmentation", model="org/sidewalk-deeplab", trust_remote_code=True)' in text
    assert "| validation | 0.7784 | 0.9620 | 0.5949 | 0.9640 | 0.9700 | 0.7100 |" in text
    assert "| test | 0.7732 | 0.9619 | 0.5845 | 0.9638 | 0.9690 | 0.7000 |" in text
    assert "100,000 at a global batch of 48 (4,800,000 chip exposures)" in text
    assert "linear warmup over 1,000 iterations from 1e-06 to 0.001, then cosine decay to 0.0001" in text
    assert "best validation mean IoU of the run at iteration 40" in text
    assert "Incomplete annotations cap the scores" in text and "a little wider than the masks" in text
    assert "SOLVER:\n  MAX_ITER: 100000" in text  # the resolved config, verbatim
    for picture in ("validation_predictions.png", "training_curves.png"):
        assert f"]({picture})" in text
        assert Image.open(model_dir / picture).size[0] > 0
    # The picture of the model's own iteration, not merely the latest one.
    assert Image.open(model_dir / "validation_predictions.png").getpixel((0, 0)) == (200, 200, 200)


def test_eval_results_json_records_the_metrics_and_the_iteration(run_dir):
    write_model_card(run_dir / "final", run_dir=run_dir, eval_results=RESULTS, iteration=100_000)
    assert json.loads((run_dir / "final" / "eval_results.json").read_text()) == {
        "iteration": 100_000,
        **RESULTS,
    }
    # Writing the card again without an iteration keeps the recorded one.
    write_model_card(run_dir / "final", run_dir=run_dir, eval_results=RESULTS)
    assert json.loads((run_dir / "final" / "eval_results.json").read_text())["iteration"] == 100_000


def test_non_finite_metrics_show_as_na_and_stay_out_of_the_model_index(run_dir):
    results = {"validation": {**RESULTS["validation"], "sidewalk_iou": math.nan}}
    readme = write_model_card(run_dir / "final", run_dir=run_dir, eval_results=results)
    card = ModelCard.load(readme)
    names = {result.metric_name for result in card.data.eval_results}
    assert names == {"Mean IoU (validation)", "Background IoU (validation)", "Pixel accuracy (validation)"}
    assert "| validation | 0.7784 | 0.9620 | n/a |" in readme.read_text()


def test_a_local_dataset_is_named_but_not_listed_as_a_hub_dataset(run_dir):
    (run_dir / "config.yaml").write_text(RUN_CONFIG.replace("org/aerial-sidewalks", "data/synthetic"))
    (run_dir.parent / "data" / "synthetic").mkdir(parents=True)
    card = ModelCard.load(write_model_card(run_dir / "final", run_dir=run_dir, eval_results=RESULTS))
    assert "datasets" not in card.data.to_dict()
    assert {result.dataset_type for result in card.data.eval_results} == {"synthetic"}


def test_training_curves_are_drawn_and_a_truncated_log_line_is_skipped(run_dir, tmp_path, caplog):
    with (run_dir / "metrics.jsonl").open("a") as log:
        log.write('{"iter": 42, "loss": 0.0')  # a process killed mid-write
    out = plot_training_curves(run_dir / "metrics.jsonl", tmp_path / "curves.png")
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.size[0] > picture.size[1] > 100
    assert "metrics.jsonl:23 is not JSON" in caplog.text


def test_publish_uploads_exactly_the_model_folder_with_its_card(run_dir, fake_hub):
    write_model_card(run_dir / "final", run_dir=run_dir, eval_results=RESULTS, iteration=100_000)
    url = publish_run(run_dir, "org/sidewalk-deeplab", which="final", private=True)
    assert url == "https://huggingface.co/org/sidewalk-deeplab"
    assert fake_hub.created == [
        {"repo_id": "org/sidewalk-deeplab", "repo_type": "model", "private": True, "exist_ok": True}
    ]
    (commit,) = fake_hub.commits
    assert sorted(commit["files"]) == sorted(MODEL_FILES + CARD_FILES)
    assert commit["revision"] is None
    readme = commit["files"]["README.md"].decode()
    assert (
        'from_pretrained("org/sidewalk-deeplab", trust_remote_code=True)' in readme
    )  # re-rendered for the repo
    assert json.loads(commit["files"]["eval_results.json"]) == {"iteration": 100_000, **RESULTS}
    assert commit["files"]["model.safetensors"] == (run_dir / "final" / "model.safetensors").read_bytes()


def test_uploaded_folder_loads_with_trust_remote_code_in_a_fresh_process(run_dir, fake_hub, tmp_path):
    write_model_card(run_dir / "best", run_dir=run_dir, eval_results=RESULTS, iteration=40)
    publish_run(run_dir, "org/sidewalk-deeplab", which="best")
    uploaded = fake_hub.rebuild(tmp_path / "uploaded")
    code = f"""
import torch
from PIL import Image
from transformers import AutoModelForSemanticSegmentation, pipeline

model = AutoModelForSemanticSegmentation.from_pretrained({str(uploaded)!r}, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
assert model.config.id2label == {{0: "background", 1: "sidewalk"}}
assert model(pixel_values=torch.zeros(1, 3, 32, 32)).logits.shape == (1, 2, 32, 32)
segmenter = pipeline("image-segmentation", model={str(uploaded)!r}, trust_remote_code=True)
segments = segmenter(Image.new("RGB", (40, 24), (90, 120, 90)))
assert segments and all(s["mask"].size == (40, 24) for s in segments), segments
print("loaded", sorted(s["label"] for s in segments))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "loaded" in result.stdout


def test_push_script_publishes_the_best_model_to_a_branch(run_dir, fake_hub, capsys):
    write_model_card(run_dir / "best", run_dir=run_dir, eval_results=RESULTS, iteration=40)
    argv = [
        str(run_dir),
        "--repo-id",
        "org/sidewalk-deeplab",
        "--which",
        "best",
        "--private",
        "--revision",
        "v1",
    ]
    runpy.run_path(str(REPO / "scripts" / "push_to_hub.py"), run_name="push_to_hub")["main"](argv)
    assert fake_hub.branches == [{"repo_id": "org/sidewalk-deeplab", "branch": "v1", "exist_ok": True}]
    (commit,) = fake_hub.commits
    assert commit["revision"] == "v1"
    assert json.loads(commit["files"]["eval_results.json"])["iteration"] == 40
    assert "https://huggingface.co/org/sidewalk-deeplab/tree/v1" in capsys.readouterr().out


def test_the_token_never_lands_in_the_run_folder_or_the_logs(run_dir, fake_hub, monkeypatch, capsys, caplog):
    token = f"hf_{secrets.token_hex(16)}"
    monkeypatch.setenv("HF_TOKEN", token)
    caplog.set_level(logging.DEBUG)
    write_model_card(run_dir / "final", run_dir=run_dir, eval_results=RESULTS)
    runpy.run_path(str(REPO / "scripts" / "push_to_hub.py"), run_name="push_to_hub")["main"](
        [str(run_dir), "--repo-id", "org/sidewalk-deeplab"]
    )
    assert fake_hub.commits
    captured = capsys.readouterr()
    assert token not in captured.out + captured.err + caplog.text
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    for content in fake_hub.commits[0]["files"].values():
        assert token.encode() not in content


def test_publishing_a_folder_without_weights_names_the_missing_file(run_dir, fake_hub):
    (run_dir / "final" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"final/model\.safetensors is missing"):
        publish_run(run_dir, "org/sidewalk-deeplab")
    assert not fake_hub.created and not fake_hub.commits


def test_model_card_template_is_the_top_level_file():
    from sidewalk_hf.hub import MODEL_CARD_TEMPLATE

    assert (REPO / "model_card.md").resolve() == MODEL_CARD_TEMPLATE.resolve()
    assert "{{ card_data }}" in MODEL_CARD_TEMPLATE.read_text()
