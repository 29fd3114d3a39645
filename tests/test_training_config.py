"""The training configuration: YAML chain, overrides, and errors that name the key."""

import pytest

from sidewalk_hf.training.cli import parse_args
from sidewalk_hf.training.config import CONFIGS_DIR, ConfigError, load_config, resolve_config_path


def test_base_yaml_reproduces_the_reference_recipe():
    cfg = load_config("base.yaml")
    assert cfg.MODEL.BACKBONE == "resnet101s"
    assert cfg.DATALOADER.BATCH_SIZE == 48
    assert cfg.SOLVER.MAX_ITER == 100_000
    assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.FINAL_LR) == (1e-3, 1e-4)
    assert (cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.WARMUP_FACTOR) == (1000, 1e-3)
    assert (cfg.SOLVER.MOMENTUM, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.WEIGHT_DECAY_NORM) == (0.9, 1e-4, 0.0)
    assert cfg.SOLVER.CLIP_GRAD_NORM == 1.0
    assert list(cfg.MODEL.LOSS.CLASS_WEIGHTS) == [1.0, 10.0]
    assert cfg.MODEL.LOSS.TOP_K_PERCENT_PIXELS == 1.0
    assert cfg.DATASET.SOURCE == "data/synthetic"


def test_bare_name_resolves_in_configs_dir_and_a_path_works_too():
    assert resolve_config_path("base.yaml") == CONFIGS_DIR / "base.yaml"
    assert resolve_config_path("demo") == CONFIGS_DIR / "demo.yaml"
    assert resolve_config_path(str(CONFIGS_DIR / "demo.yaml")) == CONFIGS_DIR / "demo.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        resolve_config_path("nope.yaml")


def test_base_parent_is_merged_child_wins(tmp_path):
    (tmp_path / "parent.yaml").write_text("SOLVER:\n  BASE_LR: 0.5\n  MAX_ITER: 7\n")
    (tmp_path / "child.yaml").write_text("_BASE_: parent.yaml\nSOLVER:\n  MAX_ITER: 9\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER) == (0.5, 9)


def test_opts_override_any_key_with_typed_values():
    cfg = load_config("base.yaml", ["SOLVER.BASE_LR", "0.002", "MODEL.LOSS.CLASS_WEIGHTS", "[1.0, 5.0]"])
    assert cfg.SOLVER.BASE_LR == 0.002
    assert list(cfg.MODEL.LOSS.CLASS_WEIGHTS) == [1.0, 5.0]


def test_unknown_key_names_it_and_the_closest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match=r"SOLVER\.BASE_LRR.*closest valid key: SOLVER\.BASE_LR"):
        load_config("base.yaml", ["SOLVER.BASE_LRR", "0.1"])
    (tmp_path / "typo.yaml").write_text("SOLVER:\n  MAX_ITRE: 5\n")
    with pytest.raises(ConfigError, match=r"MAX_ITRE.*closest valid key: SOLVER\.MAX_ITER"):
        load_config(tmp_path / "typo.yaml")


def test_wrongly_typed_value_names_the_key():
    with pytest.raises(ConfigError, match=r"SOLVER\.MAX_ITER"):
        load_config("base.yaml", ["SOLVER.MAX_ITER", "many"])
    with pytest.raises(ConfigError, match=r"MODEL\.LOSS\.CLASS_WEIGHTS"):
        load_config("base.yaml", ["MODEL.LOSS.CLASS_WEIGHTS", "[1.0, heavy]"])


def test_choice_keys_reject_values_outside_their_set():
    with pytest.raises(ConfigError, match=r"SOLVER\.MIXED_PRECISION.*'bf16'"):
        load_config("base.yaml", ["SOLVER.MIXED_PRECISION", "fp64"])


def test_odd_number_of_opts_is_an_error():
    with pytest.raises(ConfigError, match="KEY VALUE pairs"):
        load_config("base.yaml", ["SOLVER.BASE_LR"])


def test_dedicated_flags_become_overrides():
    args = parse_args(
        [
            "--config",
            "base.yaml",
            "--batch_size",
            "8",
            "--buffer_batches",
            "4",
            "--num_workers",
            "0",
            "--weights_path",
            "w.pkl",
            "--opts",
            "SOLVER.BASE_LR",
            "0.002",
        ]
    )
    cfg = load_config(args.config, args.cli_overrides + args.opts)
    assert cfg.DATALOADER.BATCH_SIZE == 8
    assert cfg.DATALOADER.BUFFER_BATCHES == 4
    assert cfg.DATALOADER.NUM_WORKERS == 0
    assert cfg.MODEL.WEIGHTS == "w.pkl"
    assert cfg.SOLVER.BASE_LR == 0.002
