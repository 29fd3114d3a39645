"""The demo Space: its example inputs and its publication on the Hub beside the model.

The Space (``space/`` in the repository: ``app.py``, ``requirements.txt``, ``README.md`` with the Space front
matter, ``examples/``) runs this package's own inference code. A Space installs only what its
``requirements.txt`` names, so ``publish_space`` uploads the package's source beside ``app.py``: the Space
runs exactly the version it was published from. The model it shows is the first entry of ``models:`` in the
Space card, which ``publish_space`` fills in; that entry is also what links the Space to the model page.

Tokens are never printed, logged or written here; with ``token=None``, ``huggingface_hub`` finds the saved
login or ``HF_TOKEN``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import yaml

logger = logging.getLogger(__name__)

SPACE_DIR = Path(__file__).resolve().parent.parent / "space"
PACKAGE_DIR = Path(__file__).resolve().parent
# What the Space needs of the package: its code, the card template, the evaluate module.
_PACKAGE_SUFFIXES = (".py", ".md")
# Files of space/ that are never uploaded: caches and whatever a local run of the app left behind.
_IGNORED_SPACE_PARTS = {"__pycache__", ".gradio", "flagged", ".pytest_cache", ".ipynb_checkpoints"}
_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.DOTALL)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def write_space_examples(
    out_dir: str | os.PathLike = SPACE_DIR / "examples",
    *,
    seed: int = 0,
    num_chips: int = 2,
    chip_size_px: int = 128,
    scene_size_px: int = 384,
    scene_gsd_m: float = 0.5,
) -> list[Path]:
    """Write the Space's example inputs; the same arguments give the same files.

    - ``chip_<i>.png`` / ``chip_<i>.jpg`` (alternately): test-split chips of the synthetic dataset, exactly as
      ``generate_synthetic_dataset(..., seed=seed, chip_size_px=chip_size_px)`` renders them (the demo model
      trains on 128-px chips, so 128 shows it at its training scale);
    - ``scene.tif``: a small georeferenced 3-band GeoTIFF scene (``data.scene.write_scene``) at
      ``scene_gsd_m`` metres per pixel (0.5 m is the demo model's training scale), for the GeoTIFF path.

    Returns the written paths.
    """
    from PIL import Image

    from .data.scene import write_scene
    from .data.synthetic import SPLITS, render_chip

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(num_chips):
        # The dataset's own stream of the test split: render_chip(default_rng([seed, split, index]), ...).
        rng = np.random.default_rng([seed, SPLITS.index("test"), index])
        chip = render_chip(rng, chip_size_px, 0.07)
        path = out_dir / f"chip_{index}.{'png' if index % 2 == 0 else 'jpg'}"
        image = Image.fromarray(chip.image)
        if path.suffix == ".png":
            image.save(path, format="PNG", optimize=True)
        else:
            image.save(path, format="JPEG", quality=90)
        written.append(path)
    if scene_size_px:
        scene = write_scene(
            out_dir / ".scene-tmp",
            "scene",
            height_px=scene_size_px,
            width_px=scene_size_px,
            seed=seed,
            gsd_m=scene_gsd_m,
        )
        target = out_dir / "scene.tif"
        os.replace(scene.image, target)
        for leftover in (scene.truth_mask, scene.centerlines):
            leftover.unlink(missing_ok=True)
        (out_dir / ".scene-tmp").rmdir()
        written.append(target)
    return written


def space_card_metadata(readme_text: str) -> dict:
    """The YAML front matter of a Space card (``README.md``) as a dict; an error if there is none."""
    match = _FRONT_MATTER.match(readme_text)
    if not match:
        raise ValueError("the Space README.md must start with YAML front matter between '---' lines")
    metadata = yaml.safe_load(match.group(1)) or {}
    if not isinstance(metadata, dict):
        raise TypeError("the Space README.md front matter must be a mapping")
    return metadata


def render_space_card(readme_text: str, model_id: str | None) -> str:
    """The Space card with ``models: [model_id]`` (the model the app shows, and the Hub's link between the
    Space and the model page); the rest of the card is kept as written."""
    metadata = space_card_metadata(readme_text)
    if model_id is not None:
        if not _REPO_ID.match(model_id):
            raise ValueError(f"model_id must be a Hub model id (org/name), got {model_id!r}")
        metadata["models"] = [model_id]
    body = _FRONT_MATTER.sub("", readme_text, count=1)
    header = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).strip()
    return f"---\n{header}\n---\n{body}"


def space_files(space_dir: str | os.PathLike = SPACE_DIR) -> dict[str, Path]:
    """``{path in the Space repository: local file}``: the app folder, and the package beside ``app.py``."""
    space_dir = Path(space_dir)
    for required in ("app.py", "requirements.txt", "README.md"):
        if not (space_dir / required).is_file():
            raise FileNotFoundError(f"{space_dir / required} is missing: {space_dir} is not a Space folder")
    files: dict[str, Path] = {}
    for path in sorted(space_dir.rglob("*")):
        relative = path.relative_to(space_dir)
        ignored = _IGNORED_SPACE_PARTS.intersection(relative.parts)
        # A copy of the package inside space/ (from an earlier local test) is replaced by the real one below.
        if path.is_file() and not ignored and relative.parts[0] != PACKAGE_DIR.name:
            files[relative.as_posix()] = path
    for path in sorted(PACKAGE_DIR.rglob("*")):
        relative = path.relative_to(PACKAGE_DIR)
        if path.is_file() and path.suffix in _PACKAGE_SUFFIXES and "__pycache__" not in relative.parts:
            files[f"{PACKAGE_DIR.name}/{relative.as_posix()}"] = path
    return files


def publish_space(
    space_id: str,
    *,
    model_id: str | None = None,
    space_dir: str | os.PathLike = SPACE_DIR,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload the Space folder (and the package beside ``app.py``) to the Space ``space_id`` in one commit,
    creating it as a Gradio Space if needed; returns the Space's URL.

    ``model_id`` (the Hub model the Space shows) is written into the uploaded card's ``models:``; the local
    ``space/README.md`` is not changed.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    if not _REPO_ID.match(space_id):
        raise ValueError(f"space_id must be org/name, got {space_id!r}")
    space_dir = Path(space_dir)
    files = space_files(space_dir)
    card = render_space_card((space_dir / "README.md").read_text(), model_id).encode()
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=card if name == "README.md" else str(path))
        for name, path in files.items()
    ]
    api = HfApi(token=token)
    repo_url = api.create_repo(
        space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True
    )
    commit = api.create_commit(
        repo_url.repo_id,
        operations,
        commit_message=commit_message or f"Upload the demo Space{f' for {model_id}' if model_id else ''}",
        repo_type="space",
    )
    logger.info("uploaded %d files from %s: %s", len(operations), space_dir, commit.commit_url)
    return str(repo_url)


def space_url(space_id: str) -> str:
    """The page of a Space on the Hub."""
    return f"https://huggingface.co/spaces/{space_id}"
