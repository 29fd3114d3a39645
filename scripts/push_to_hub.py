"""Publish the final (or best) model of a training run to the Hugging Face Hub.

    python scripts/push_to_hub.py runs/<run-name> --repo-id org/sidewalk-deeplab [--which best] [--private]
        [--space org/sidewalk-demo]

Uploads the run's save_pretrained folder (weights, config, image processor, model code, model card, evaluation
results, pictures) in one commit, creating the repository if needed. The token comes from `hf auth login` or
the HF_TOKEN environment variable; there is deliberately no flag for it, so it never lands in a shell history.
With --space, the demo Space (space/) is published too, showing this model, and the model card links it.
"""

from __future__ import annotations

import argparse

from sidewalk_hf.hub import publish_run
from sidewalk_hf.space import publish_space


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the run folder (runs/<timestamp>-<name>)")
    parser.add_argument("--repo-id", required=True, help="Hub model repository, org/name")
    parser.add_argument(
        "--which", choices=("final", "best"), default="final", help="which model (default final)"
    )
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument(
        "--revision", default=None, help="branch to push to (created if missing; default main)"
    )
    parser.add_argument(
        "--space", default=None, metavar="ORG/NAME", help="also publish the demo Space showing this model"
    )
    args = parser.parse_args(argv)
    url = publish_run(
        args.run_dir,
        args.repo_id,
        which=args.which,
        private=args.private,
        revision=args.revision,
        space_id=args.space,
    )
    print(f"published {args.which} model of {args.run_dir} to {url}")
    if args.space:
        space = publish_space(args.space, model_id=args.repo_id, private=args.private)
        print(f"published the demo Space to {space}")


if __name__ == "__main__":
    main()
