"""Publishing a built dataset folder to the Hub as a dataset repository, in one commit."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .build import BUILD_DIR

logger = logging.getLogger(__name__)


def push_dataset_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = True,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload ``folder`` (data/, README.md, footprints/, contact sheet, report) to the dataset repository
    ``repo_id``, creating it if needed; returns its URL. ``token=None`` uses the saved login or ``HF_TOKEN``;
    the token is never written anywhere. One ``create_commit`` with exactly the folder's files (as the model
    publishing does: ``upload_folder`` would also send the card to the Hub's YAML validator first)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    if not (folder / "README.md").is_file() or not (folder / "data").is_dir():
        raise FileNotFoundError(f"{folder} is not a finished dataset (README.md and data/ are missing)")
    if (folder / BUILD_DIR).exists():
        raise ValueError(f"{folder} holds an unfinished build ({BUILD_DIR}/): finish it with --resume first")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    commit = api.create_commit(
        repo_url.repo_id,
        [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files],
        commit_message=commit_message or f"Upload dataset built from geodata ({len(files)} files)",
        repo_type="dataset",
    )
    logger.info("uploaded %d files from %s: %s", len(files), folder, commit.commit_url)
    return str(repo_url)
