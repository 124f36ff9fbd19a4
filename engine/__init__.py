"""The task's engine: one training step, the training loop, checkpoints and resume,
evaluation, and the output folder of a run. The entry points build things and call these."""
