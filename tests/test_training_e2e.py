"""Real `accelerate launch` runs of scripts/train.py with a tiny model on generated data.

One uninterrupted run per process count is shared by several tests; the other runs are killed
(SIGKILL, SIGTERM) or made to diverge on purpose, then compared with it.
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
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
MAX_ITER = 12
CHECKPOINT_PERIOD = 4

pytestmark = pytest.mark.slow


def tiny_config(tmp_path: Path, dataset_dir: Path, name: str, **overrides) -> Path:
    """A tiny-model config inheriting base.yaml, written next to the test's run root."""
    lines = [
        f"_BASE_: {REPO / 'configs' / 'base.yaml'}",
        "MODEL: {BACKBONE: resnet10t, RES5_MULTI_GRID: [1], ASPP_CHANNELS: 16, PROJECT_CHANNELS: 8, DECODER_CHANNELS: 16}",
        "INPUT: {CROP_SIZE_PX: 64}",
        f"DATASET: {{SOURCE: {dataset_dir}}}",
        "DATALOADER: {BATCH_SIZE: 4, BUFFER_BATCHES: 2, NUM_WORKERS: 1, EVAL_BATCH_SIZE: 4}",
        f"SOLVER: {{MAX_ITER: {MAX_ITER}, BASE_LR: 0.01, FINAL_LR: 0.001, WARMUP_ITERS: 2}}",
        "TEST: {EVAL_PERIOD: 6, NUM_PICTURES: 2}",
        f"CHECKPOINT: {{PERIOD: {CHECKPOINT_PERIOD}, KEEP_LAST: 2}}",
        f"OUTPUT: {{ROOT: {tmp_path / 'runs'}, NAME: {name}, LOG_PERIOD: 2}}",
    ]
    path = tmp_path / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def launch_command(num_processes: int, *script_args: str) -> list[str]:
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    if num_processes == 1:
        flags = ["--num_processes", "1", "--num_machines", "1"]
    else:
        flags = [
            "--multi_gpu",
            "--num_processes",
            str(num_processes),
            "--num_machines",
            "1",
            "--main_process_port",
            str(29500 + os.getpid() % 1000),
        ]
    return [
        *accelerate,
        *flags,
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(REPO / "scripts" / "train.py"),
        *script_args,
    ]


def launch_env() -> dict:
    env = dict(
        os.environ,
        ACCELERATE_USE_CPU="1",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        CUDA_VISIBLE_DEVICES="",
    )
    return env


def run_training(num_processes: int, *script_args: str, cwd: Path, timeout: int = 300):
    result = subprocess.run(
        launch_command(num_processes, *script_args),
        cwd=cwd,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return result


def only_run_dir(root: Path) -> Path:
    runs = [p for p in root.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key, tensor in a.items():
        assert torch.equal(tensor, b[key]), (
            f"{key} differs by {(tensor.float() - b[key].float()).abs().max()}"
        )


def start_and_kill_after_checkpoint(
    num_processes, config, cwd, sig, command=None
) -> tuple[Path, subprocess.Popen]:
    """Start a run, wait for its first checkpoint, then send ``sig`` to the whole process group."""
    process = subprocess.Popen(
        command or launch_command(num_processes, "--config", str(config)),
        cwd=cwd,
        env=launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 240
    checkpoint = None
    while time.time() < deadline and process.poll() is None:
        found = list((cwd / "runs").glob("*/checkpoints/iter_*"))
        if found:
            checkpoint = found[0]
            break
        time.sleep(0.05)
    assert checkpoint is not None, f"no checkpoint appeared: {process.communicate()[0][-3000:]}"
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, sig)
    process.wait(timeout=120)
    return checkpoint.parent.parent, process


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, synthetic_dataset_dir):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    config = tiny_config(tmp, synthetic_dataset_dir, "tiny")
    result = run_training(1, "--config", str(config), cwd=tmp)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return only_run_dir(tmp / "runs"), result


def test_run_folder_is_complete(uninterrupted_run):
    run_dir, result = uninterrupted_run
    for name in ("config.yaml", "command.txt", "env.json", "metrics.jsonl", "bad_samples.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents*"))
    assert (
        sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        == ["iter_0000004", "iter_0000008", "iter_0000012"][-2:]
    )
    assert list((run_dir / "pictures").glob("validation_iter_*.png"))
    assert (run_dir / "pictures" / "training_curves.png").is_file()
    env = json.loads((run_dir / "env.json").read_text())
    assert env["seed"] == 0 and env["num_processes"] == 1 and "torch" in env["packages"]
    assert "commit" in env["git"] and "dirty" in env["git"]
    for which in ("best", "final"):
        folder = run_dir / which
        for name in (
            "config.json",
            "model.safetensors",
            "preprocessor_config.json",
            "README.md",
            "eval_results.json",
        ):
            assert (folder / name).is_file(), f"{which}/{name}"
        results = json.loads((folder / "eval_results.json").read_text())
        assert 0.0 <= results["validation"]["sidewalk_iou"] <= 1.0
        assert "test" in results
    assert f"run folder: {run_dir}" in result.stdout


def test_metrics_log_has_the_documented_keys(uninterrupted_run):
    run_dir, _ = uninterrupted_run
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    training = [line for line in lines if "loss" in line]
    evaluation = [line for line in lines if "split" in line]
    assert [line["iter"] for line in training] == list(range(2, MAX_ITER + 1, 2))
    assert set(training[0]) == {"iter", "loss", "lr", "images_per_s"}
    assert [line["iter"] for line in evaluation] == [6, 12]
    assert set(evaluation[0]) == {
        "iter",
        "split",
        "mean_iou",
        "background_iou",
        "sidewalk_iou",
        "pixel_accuracy",
    }


def test_final_model_loads_with_from_pretrained_and_predicts(uninterrupted_run):
    from transformers import AutoModelForSemanticSegmentation

    run_dir, _ = uninterrupted_run
    model = AutoModelForSemanticSegmentation.from_pretrained(run_dir / "final", trust_remote_code=True)
    logits = model(pixel_values=torch.zeros(1, 3, 64, 64)).logits
    assert logits.shape == (1, 2, 64, 64)
    assert model.config.id2label == {0: "background", 1: "sidewalk"}


def test_sigkill_then_resume_ends_with_identical_weights(uninterrupted_run, tmp_path, synthetic_dataset_dir):
    reference_dir, _ = uninterrupted_run
    config = tiny_config(tmp_path, synthetic_dataset_dir, "tiny")
    run_dir, process = start_and_kill_after_checkpoint(1, config, tmp_path, signal.SIGKILL)
    assert process.returncode != 0
    assert not (run_dir / "final").exists()
    result = run_training(1, "--resume", str(run_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "resuming" in result.stdout
    assert_same_weights(final_weights(reference_dir), final_weights(run_dir))
    logged = [
        json.loads(line)["iter"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if "loss" in line
    ]
    assert logged == list(range(2, MAX_ITER + 1, 2)), "each iteration is logged once across the resume"


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, synthetic_dataset_dir):
    """As a scheduler preempting a job does: SIGTERM to every process of the job, DataLoader workers too."""
    config = tiny_config(tmp_path, synthetic_dataset_dir, "preempted")
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(config)]
    run_dir, process = start_and_kill_after_checkpoint(1, config, tmp_path, signal.SIGTERM, command=command)
    output = process.stdout.read()
    assert process.returncode == 0, output[-3000:]
    assert "SIGTERM received" in output
    checkpoints = sorted((run_dir / "checkpoints").glob("iter_*"))
    assert checkpoints and not list((run_dir / "checkpoints").glob(".tmp-*"))
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    assert CHECKPOINT_PERIOD <= state["iteration"] < MAX_ITER


def test_non_finite_loss_stops_naming_the_iteration_and_keeps_the_checkpoint(tmp_path, synthetic_dataset_dir):
    config = tiny_config(tmp_path, synthetic_dataset_dir, "diverging")
    result = run_training(
        1,
        "--config",
        str(config),
        "--opts",
        "SOLVER.BASE_LR",
        "1e30",
        "SOLVER.FINAL_LR",
        "1e30",
        "SOLVER.CLIP_GRAD_NORM",
        "0.0",
        "CHECKPOINT.PERIOD",
        "1",
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "non-finite loss" in result.stderr
    iteration = int(result.stderr.split("non-finite loss or gradient at iteration ")[1].split()[0])
    run_dir = only_run_dir(tmp_path / "runs")
    checkpoints = sorted((run_dir / "checkpoints").glob("iter_*"))
    assert checkpoints[-1].name == f"iter_{iteration:07d}"
    assert (checkpoints[-1] / "trainer_state.json").is_file()
    assert not (run_dir / "final").exists()


def test_missing_weights_path_fails_before_training(tmp_path, synthetic_dataset_dir):
    config = tiny_config(tmp_path, synthetic_dataset_dir, "noweights")
    result = run_training(
        1, "--config", str(config), "--weights_path", str(tmp_path / "absent.pkl"), cwd=tmp_path
    )
    assert result.returncode != 0
    assert "absent.pkl" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_indivisible_global_batch_is_an_error(tmp_path, synthetic_dataset_dir):
    config = tiny_config(tmp_path, synthetic_dataset_dir, "badbatch")
    result = run_training(2, "--config", str(config), "--batch_size", "5", cwd=tmp_path)
    assert result.returncode != 0
    assert "BATCH_SIZE=5" in result.stderr


def test_two_process_run_resumes_exactly_and_matches_single_process_evaluation(
    tmp_path, synthetic_dataset_dir
):
    (tmp_path / "a").mkdir()
    config = tiny_config(tmp_path / "a", synthetic_dataset_dir, "ddp")
    reference = run_training(2, "--config", str(config), cwd=tmp_path / "a")
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-5000:]
    reference_dir = only_run_dir(tmp_path / "a" / "runs")
    env = json.loads((reference_dir / "env.json").read_text())
    assert env["num_processes"] == 2
    assert "world size 2" in reference.stdout

    (tmp_path / "b").mkdir()
    config_b = tiny_config(tmp_path / "b", synthetic_dataset_dir, "ddp")
    run_dir, _ = start_and_kill_after_checkpoint(2, config_b, tmp_path / "b", signal.SIGKILL)
    resumed = run_training(2, "--resume", str(run_dir), cwd=tmp_path / "b")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert_same_weights(final_weights(reference_dir), final_weights(run_dir))

    # The 2-process validation of final/ equals a 1-process evaluation of the same weights.
    evaluated = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "evaluate.py"),
            "--model",
            str(reference_dir / "final"),
            "--dataset",
            str(synthetic_dataset_dir),
            "--split",
            "validation",
            "--output",
            str(tmp_path / "eval"),
        ],
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    single = json.loads((tmp_path / "eval" / "eval_validation.json").read_text())
    two_process = json.loads((reference_dir / "final" / "eval_results.json").read_text())["validation"]
    for key in ("mean_iou", "background_iou", "sidewalk_iou", "pixel_accuracy"):
        assert single[key] == pytest.approx(two_process[key], abs=1e-12), key
