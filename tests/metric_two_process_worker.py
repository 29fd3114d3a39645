"""Run by tests/test_metric.py under `torchrun --nproc_per_node 2`: each process counts its own uneven share of
the maps (the short one pads with all-ignore masks, as evaluation streams do) and the confusion matrices are
summed once by `SegmentationMetricAccumulator.compute(accelerator)`.

    torchrun --nproc_per_node 2 tests/metric_two_process_worker.py DATA.pt OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from sidewalk_hf.metrics import SegmentationMetricAccumulator

SHARES = {0: range(3), 1: range(3, 10)}  # uneven on purpose
BATCH_SIZE = 2


def main(data_path: str, out_dir: str) -> None:
    accelerator = Accelerator(cpu=True)
    data = torch.load(data_path)
    accumulator = SegmentationMetricAccumulator(num_labels=2, ignore_index=255, device=accelerator.device)
    share = SHARES[accelerator.process_index]
    batches = 0
    for start in range(share.start, share.stop, BATCH_SIZE):
        stop = min(start + BATCH_SIZE, share.stop)
        accumulator.update(data["logits"][start:stop], data["labels"][start:stop])
        batches += 1
    most_batches = max(len(range(s.start, s.stop, BATCH_SIZE)) for s in SHARES.values())
    for _ in range(most_batches - batches):
        accumulator.update(
            torch.ones((BATCH_SIZE, *data["labels"].shape[1:]), dtype=torch.long),
            torch.full((BATCH_SIZE, *data["labels"].shape[1:]), 255, dtype=torch.long),
        )
    results = accumulator.compute(accelerator)
    record = {"world_size": accelerator.num_processes, "distributed_type": accelerator.distributed_type.value}
    Path(out_dir, f"rank{accelerator.process_index}.json").write_text(
        json.dumps({**record, "results": results})
    )
    accelerator.end_training()  # tears the process group down, so gloo does not abort at exit


if __name__ == "__main__":
    main(*sys.argv[1:])
