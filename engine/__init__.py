"""The task's engine; the entry points build things and call these.

train_step.py     one optimizer step (both sides' hard batches, gradient averaging, loss
                  scaling, clipping, the non-finite policy)
training.py       the loop: step logs, validation and checkpoints
checkpointing.py  what a checkpoint holds; resume
evaluation.py     score matrices, R@1/5/10, quick validation
output_dir.py     a run's output_dir: resume or not, its lock, its folders
run_settings.py   the settings a resumed run must keep; changes accepted and recorded
"""
