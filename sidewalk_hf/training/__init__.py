"""Training under Accelerate: configuration, schedule, run folder, checkpoints and the loop."""
