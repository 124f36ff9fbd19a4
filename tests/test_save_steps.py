"""--save_steps: checkpoints between validations, written without validating, that change
nothing of the run (saving draws no random numbers); a resumed run may change them."""
import json
import os

import torch

from helpers import run, tiny_train_config


def _weights(path):
    return torch.load(path, weights_only=True)


def test_save_steps_checkpoints_without_validating_and_changes_nothing(tmp_path):
    cfg = tiny_train_config(tmp_path / "c.json", num_train_steps=6, valid_steps=3, dropout=0.1)
    plain, saved = tmp_path / "plain", tmp_path / "saved"
    assert run(["train_itm_hard_negatives.py", "--config", cfg, "--output_dir", str(plain)]).returncode == 0
    res = run(["train_itm_hard_negatives.py", "--config", cfg, "--output_dir", str(saved), "--save_steps", "2"])
    assert res.returncode == 0, res.stderr
    steps = sorted(int(f[len("model_step_"):-3]) for f in os.listdir(saved / "ckpt") if f.startswith("model_step_"))
    assert steps == [2, 3, 4, 6]  # every 2 steps, and the validations' 3 and 6
    assert all((saved / "ckpt" / f"train_state_{s}.pt").exists() for s in steps)
    entries = [json.loads(line) for line in (saved / "log" / "metrics.jsonl").read_text().splitlines()]
    assert sorted({e["step"] for e in entries if e["name"] == "valid/recall_mean"}) == [3, 6]
    for step in (3, 6):
        a, b = _weights(plain / "ckpt" / f"model_step_{step}.pt"), _weights(saved / "ckpt" / f"model_step_{step}.pt")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a run stopped at a save step resumes from it, with another --save_steps, to the same end
    for step in (6, 4):
        for name in (f"model_step_{step}.pt", f"train_state_{step}.pt"):
            (saved / "ckpt" / name).unlink()
    res = run(["train_itm_hard_negatives.py", "--config", cfg, "--output_dir", str(saved), "--resume",
               "--save_steps", "5"])
    assert res.returncode == 0, res.stderr
    a, b = _weights(plain / "ckpt" / "model_step_6.pt"), _weights(saved / "ckpt" / "model_step_6.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (saved / "ckpt" / "model_step_5.pt").exists()
