"""Training as users run it: their class names, their launcher's settings, their trackers, their logs, an
installed package, several nodes.

One run is shared by most tests: renamed classes, `accelerate launch --mixed_precision bf16`, wandb (offline)
and mlflow (a local file store) beside TensorBoard, output to a pipe (as in a cluster job), killed after its
first checkpoint and resumed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

REPO = Path(__file__).resolve().parents[1]
MAX_ITER = 6


def user_config(tmp_path: Path, dataset_dir: Path) -> Path:
    lines = [
        f"_BASE_: {REPO / 'configs' / 'base.yaml'}",
        "MODEL: {BACKBONE: resnet10t, RES5_MULTI_GRID: [1], ASPP_CHANNELS: 16, PROJECT_CHANNELS: 8,",
        "        DECODER_CHANNELS: 16, LABELS: [ground, sidewalk]}",
        "INPUT: {CROP_SIZE_PX: 64}",
        f"DATASET: {{SOURCE: {dataset_dir}, TEST_SPLIT: ''}}",
        "DATALOADER: {BATCH_SIZE: 4, BUFFER_BATCHES: 2, NUM_WORKERS: 0, EVAL_BATCH_SIZE: 8}",
        f"SOLVER: {{MAX_ITER: {MAX_ITER}, BASE_LR: 0.01, FINAL_LR: 0.001, WARMUP_ITERS: 2}}",
        "TEST: {EVAL_PERIOD: 3, NUM_PICTURES: 2}",
        "CHECKPOINT: {PERIOD: 2, KEEP_LAST: 1}",
        f"OUTPUT: {{ROOT: {tmp_path / 'runs'}, NAME: users, LOG_PERIOD: 1}}",
        "TRACKING: {LOG_WITH: [tensorboard, wandb, mlflow], PROJECT: sidewalk-tests}",
    ]
    path = tmp_path / "users.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def launch(*script_args: str, mixed_precision: str = "bf16") -> list[str]:
    return [
        *(sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"),
        *("--mixed_precision", mixed_precision, "--dynamo_backend", "no"),
        str(REPO / "scripts" / "train.py"),
        *script_args,
    ]


def user_env(tmp_path: Path) -> dict:
    return dict(
        os.environ,
        ACCELERATE_USE_CPU="1",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        CUDA_VISIBLE_DEVICES="",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_DIR=str(tmp_path),
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
        MLFLOW_TRACKING_URI=(tmp_path / "mlruns").as_uri(),
        MLFLOW_ALLOW_FILE_STORE="true",
    )


@pytest.fixture(scope="module")
def user_run(tmp_path_factory, synthetic_dataset_dir):
    """(run folder, output of the first launch, output of the resumed launch, the test's folder)."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    tmp = tmp_path_factory.mktemp("user_run")
    config = user_config(tmp, synthetic_dataset_dir)
    process = subprocess.Popen(
        launch("--config", str(config)),
        cwd=tmp,
        env=user_env(tmp),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline, checkpoint = time.time() + 240, None
    while time.time() < deadline and process.poll() is None and checkpoint is None:
        checkpoint = next(iter((tmp / "runs").glob("*/checkpoints/iter_*")), None)
        time.sleep(0.05)
    assert checkpoint is not None and process.poll() is None, process.communicate()[0][-3000:]
    os.killpg(process.pid, signal.SIGKILL)
    first_output = process.communicate(timeout=120)[0]
    run_dir = checkpoint.parent.parent
    resumed = subprocess.run(
        launch("--resume", str(run_dir)),
        cwd=tmp,
        env=user_env(tmp),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    return run_dir, first_output, resumed.stdout + resumed.stderr, tmp


pytestmark_slow = pytest.mark.slow  # `make test` keeps a module on one worker: user_run is trained once


# ---- 1. class names are configuration ----------------------------------------------------------------


@pytestmark_slow
def test_renamed_labels_are_reported_under_their_names_in_logs_results_and_card(user_run):
    run_dir, _, _, _ = user_run
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [line for line in lines if "split" in line]
    assert [line["iter"] for line in evaluations] == [3, 6]
    assert set(evaluations[0]) == {
        "iter",
        "split",
        "mean_iou",
        "ground_iou",
        "sidewalk_iou",
        "pixel_accuracy",
    }
    for which in ("best", "final"):
        results = json.loads((run_dir / which / "eval_results.json").read_text())["validation"]
        assert "ground_iou" in results and "background_iou" not in results
        card = ModelCard.load(run_dir / which / "README.md")
        index = card.data.to_dict()["model-index"][0]["results"]
        names = [metric["name"] for result in index for metric in result["metrics"]]
        assert "Ground IoU (validation)" in names and "Sidewalk IoU (validation)" in names
        assert "| ground IoU |" in card.text
    assert json.loads((run_dir / "final" / "config.json").read_text())["id2label"] == {
        "0": "ground",
        "1": "sidewalk",
    }


# ---- 2. the launcher's settings are honoured -----------------------------------------------------------


@pytestmark_slow
def test_launcher_mixed_precision_is_honoured_and_recorded(user_run):
    run_dir, first_output, resumed_output, _ = user_run
    assert json.loads((run_dir / "env.json").read_text())["mixed_precision"] == "bf16"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["SOLVER"]["MIXED_PRECISION"] is None
    assert "mixed precision bf16" in first_output and "mixed precision bf16" in resumed_output
    card = (run_dir / "final" / "README.md").read_text()
    assert "| Mixed precision | bf16 |" in card


def test_a_config_value_that_contradicts_the_launcher_is_an_error_naming_both(monkeypatch):
    from sidewalk_hf.training.builders import launcher_settings
    from sidewalk_hf.training.config import ConfigError, load_config

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    assert launcher_settings(load_config("base.yaml")) == {
        "SOLVER.MIXED_PRECISION": "bf16",
        "SOLVER.GRADIENT_ACCUMULATION_STEPS": 2,
    }
    with pytest.raises(ConfigError, match=r"SOLVER\.MIXED_PRECISION is 'no' but the launcher set 'bf16'"):
        launcher_settings(load_config("base.yaml", ["SOLVER.MIXED_PRECISION", "no"]))
    with pytest.raises(ConfigError, match=r"GRADIENT_ACCUMULATION_STEPS is 4 but the launcher set 2"):
        launcher_settings(load_config("base.yaml", ["SOLVER.GRADIENT_ACCUMULATION_STEPS", "4"]))
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    monkeypatch.delenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    assert launcher_settings(load_config("base.yaml", ["SOLVER.MIXED_PRECISION", "bf16"])) == {
        "SOLVER.MIXED_PRECISION": "bf16",
        "SOLVER.GRADIENT_ACCUMULATION_STEPS": 1,
    }


# ---- 3. trackers ----------------------------------------------------------------------------------------


@pytestmark_slow
def test_mlflow_gets_one_run_named_after_the_run_folder_continued_on_resume_with_images(
    user_run, monkeypatch
):
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

    run_dir, _, _, tmp = user_run
    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("sidewalk-tests")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "the resumed launch continued the first launch's run"
    run = runs[0]
    assert run.info.run_name == run_dir.name
    assert json.loads((run_dir / "trackers.json").read_text())["mlflow"]["run_id"] == run.info.run_id
    steps = sorted({metric.step for metric in client.get_metric_history(run.info.run_id, "loss")})
    assert steps == list(range(1, MAX_ITER + 1))
    assert client.get_metric_history(run.info.run_id, "validation/ground_iou")
    images = [artifact.path for artifact in client.list_artifacts(run.info.run_id, "images")]
    assert any("validation_predictions" in path for path in images)
    assert any("training_curves" in path for path in images)


@pytestmark_slow
def test_wandb_offline_run_is_named_after_the_run_folder_and_resumed_under_the_same_id(user_run):
    run_dir, _, _, _ = user_run
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]["id"]
    offline_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(path.name.endswith(f"-{run_id}") for path in offline_runs)
    for path in offline_runs:
        assert (path / f"run-{run_id}.wandb").stat().st_size > 0
    media = list((run_dir / "wandb").rglob("media/images/validation/predictions_*.png"))
    assert media, "validation overlays reach wandb"


@pytestmark_slow
def test_tensorboard_and_the_jsonl_log_stay_on_beside_other_trackers(user_run):
    run_dir, _, _, _ = user_run
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents*"))
    logged = [json.loads(line)["iter"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [i for i in logged if i] == sorted(logged) and logged.count(MAX_ITER) == 2


def test_an_unknown_tracker_is_an_error_listing_the_valid_ones(tmp_path):
    from sidewalk_hf.training.config import ConfigError, load_config
    from sidewalk_hf.training.trackers import tracker_setup

    cfg = load_config("base.yaml", ["TRACKING.LOG_WITH", "[tensorboard, wandbb]"])
    with pytest.raises(ConfigError, match=r"unknown tracker\(s\) \['wandbb'\].*'wandb'"):
        tracker_setup(cfg, tmp_path, iteration=0, resuming=False)
    cfg = load_config("base.yaml", ["TRACKING.INIT_KWARGS.wandb.entity", "my-team"])
    with pytest.raises(ConfigError, match=r"INIT_KWARGS has settings for \['wandb'\]"):
        tracker_setup(cfg, tmp_path, iteration=0, resuming=False)


# ---- 4. logs a person can read afterwards ----------------------------------------------------------------


@pytestmark_slow
def test_log_txt_keeps_what_was_printed_across_the_resume_with_time_level_and_process(user_run):
    run_dir, _, _, _ = user_run
    log = (run_dir / "log.txt").read_text()
    assert "resuming" in log and f"run folder: {run_dir}" in log
    assert " INFO [process 0] sidewalk_hf.training.loop: run folder " in log
    assert " sidewalk_hf.data.streaming: " in log, "module loggers' messages reach the log"
    first_line = log.splitlines()[0]
    time.strptime(first_line[:19], "%Y-%m-%d %H:%M:%S")


@pytestmark_slow
def test_progress_is_one_plain_line_per_log_period_when_output_is_not_a_terminal(user_run):
    _, _, resumed_output, _ = user_run
    assert "\r" not in resumed_output
    progress = [line for line in resumed_output.splitlines() if f"/{MAX_ITER}  loss " in line]
    assert progress and all(" images/s  eta " in line for line in progress)
    assert progress[-1].split(" iteration ")[1].startswith(f"{MAX_ITER}/{MAX_ITER}")


def test_the_progress_bar_is_only_drawn_on_a_terminal_and_tqdm_disable_turns_it_off(monkeypatch):
    from sidewalk_hf.training.logs import progress_bar_wanted

    class Terminal:
        def isatty(self):
            return True

        def write(self, text):
            return len(text)

        def flush(self):
            pass

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert progress_bar_wanted() is False, "pytest captures output: not a terminal"
    monkeypatch.setattr(sys, "stdout", Terminal())
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress_bar_wanted() is True
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress_bar_wanted() is False


# ---- 5. installed, not only cloned -------------------------------------------------------------------------

INSTALLED_CHECK = """
import json, sys
from pathlib import Path
import sidewalk_hf
from sidewalk_hf.training.config import CONFIGS_DIR, load_config
from sidewalk_hf.training.run_folder import code_record
cfg = load_config("demo.yaml")
print(json.dumps({"package": sidewalk_hf.__file__, "configs": str(CONFIGS_DIR), "backbone": cfg.MODEL.BACKBONE,
                  "base_batch": load_config("base").DATALOADER.BATCH_SIZE, "code": code_record()}))
"""


@pytest.mark.slow
def test_an_installed_wheel_finds_its_configs_and_records_its_version_from_another_directory(tmp_path):
    import shutil

    source = tmp_path / "source"
    shutil.copytree(
        REPO / "sidewalk_hf", source / "sidewalk_hf", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", "dist", "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((source / "dist").glob("sidewalk_hf-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site_packages = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # The project's dependencies come from the test's own environment (its .pth files, the editable
    # install of this checkout among them, are not processed); only sidewalk_hf is installed from the wheel.
    dependencies = Path(next(p for p in sys.path if p.endswith("site-packages")))
    (site_packages / "dependencies.pth").write_text(f"{dependencies}\n")
    installed = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    checked = subprocess.run(
        [python, "-c", INSTALLED_CHECK],
        cwd=elsewhere,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr[-3000:]
    result = json.loads(checked.stdout.strip().splitlines()[-1])
    assert result["package"].startswith(str(site_packages))
    assert result["configs"].startswith(str(site_packages))
    assert (result["backbone"], result["base_batch"]) == ("resnet10t", 48)
    assert result["code"]["commit"] is None and result["code"]["version"] == "0.1.0"


def test_the_repository_configs_folder_is_the_packaged_one():
    from sidewalk_hf.training.config import CONFIGS_DIR

    assert (REPO / "configs").resolve() == CONFIGS_DIR.resolve()
    assert sorted(p.name for p in CONFIGS_DIR.glob("*.yaml")) >= ["base.yaml", "demo.yaml"]


# ---- 6. multi-node -----------------------------------------------------------------------------------------


def _two_processes(*args: str) -> subprocess.CompletedProcess:
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"),
        *("--num_machines", "1", "--main_process_port", str(29700 + os.getpid() % 200)),
        *("--mixed_precision", "no", "--dynamo_backend", "no"),
        str(REPO / "tests" / "run_folder_check_worker.py"),
        *args,
    ]
    environment = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_a_process_that_cannot_see_the_run_folder_stops_the_run_at_start_naming_it(tmp_path):
    result = _two_processes(str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "is not visible to process 1 on " in result.stdout
    assert result.stdout.count("is not visible") == 2, "every process stops, none waits at a barrier"
    assert "process 0: shared is shared" in result.stdout and "process 1: shared is shared" in result.stdout
    assert not list((tmp_path / "shared").iterdir()), "the marker is removed"


# ---- 7. the loop reads top to bottom ---------------------------------------------------------------------


def test_train_state_is_saved_and_restored_as_one_object():
    from collections import Counter

    from sidewalk_hf.training.state import TrainState

    state = TrainState(
        iteration=12,
        epoch=2,
        steps_done_in_epoch=3,
        best={"iteration": 8, "mean_iou": 0.5},
        bad_samples=Counter({"decode": 2}),
        bad_sample_examples=[{"reason": "decode", "record_index": 4, "key": "a"}],
        dropped_remainder=5,
    )
    record = json.loads(json.dumps({**state.trainer_record(), "iteration": state.iteration}))
    assert TrainState.restore(record, json.loads(json.dumps(state.stream_position()))) == state


def test_the_sigterm_handler_is_restored_when_training_returns():
    from sidewalk_hf.training.loop import SigtermFlag

    def before(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, before)
    try:
        with SigtermFlag() as flag:
            assert signal.getsignal(signal.SIGTERM) == flag._handle
            os.kill(os.getpid(), signal.SIGTERM)
            assert flag.requested
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytestmark_slow
def test_the_final_evaluation_of_best_reproduces_its_validation_metrics(user_run):
    """Validation and the final evaluation share one stream and loader factory and the memory format."""
    run_dir, _, _, _ = user_run
    results = json.loads((run_dir / "best" / "eval_results.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    validation = next(line for line in lines if line.get("split") and line["iter"] == results["iteration"])
    for key in ("mean_iou", "ground_iou", "sidewalk_iou", "pixel_accuracy"):
        assert results["validation"][key] == validation[key], key


# ---- 8. the model file reads as the architecture -----------------------------------------------------------


def test_the_layers_file_ships_as_remote_code_beside_the_model_file(tmp_path):
    from sidewalk_hf import SidewalkDeepLabConfig, SidewalkDeepLabForSemanticSegmentation

    config = SidewalkDeepLabConfig(
        backbone="test_resnet", res5_multi_grid=[1], aspp_channels=8, project_channels=4, decoder_channels=8
    )
    SidewalkDeepLabForSemanticSegmentation(config).save_pretrained(tmp_path)
    layers = (tmp_path / "layers_sidewalk_deeplab.py").read_text()
    assert "class AtrousConv2d" in layers and "def fold_batch_norms" in layers
    assert "sidewalk_hf" not in layers
    assert "from .layers_sidewalk_deeplab import" in (tmp_path / "modeling_sidewalk_deeplab.py").read_text()


# ---- 9. no citations of documents users do not have -----------------------------------------------------


def test_no_project_file_cites_spec_sections():
    folders = ("sidewalk_hf", "scripts", "tests", "docs", "bench")
    offending = []
    for folder in folders:
        for path in (REPO / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".yaml") and "SPEC section" in path.read_text(errors="ignore"):
                offending.append(str(path.relative_to(REPO)))
    for name in ("README.md", "Makefile", "pyproject.toml"):
        if "SPEC section" in (REPO / name).read_text():
            offending.append(name)
    offending = [p for p in offending if p != "tests/test_training_for_users.py"]
    assert not offending, offending
