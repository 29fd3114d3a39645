"""One process of a 2-process launch checking that the run folder is shared.

First every process is given its own folder (``<base>/process<N>``): the same run folder path naming
another folder on another node, as when OUTPUT.ROOT is not on a shared file system. Then every process is
given the same folder. Prints what each check found.
"""

import sys
from pathlib import Path

from accelerate import PartialState

from sidewalk_hf.training.run_folder import RunFolderNotSharedError, share_run_dir

base = Path(sys.argv[1])
state = PartialState(cpu=True)
for run_dir in (base / f"process{state.process_index}", base / "shared"):
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        share_run_dir(run_dir, "unused", "unused", state)
        print(f"process {state.process_index}: {run_dir.name} is shared", flush=True)
    except RunFolderNotSharedError as error:
        print(f"process {state.process_index}: {error}", flush=True)
# Exit as training does (Accelerator.end_training): a process group left to interpreter shutdown can abort
# the process ("terminate called without an active exception").
state.destroy_process_group()
