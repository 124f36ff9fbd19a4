"""ckpt/best.pt and best.json by --best_metric, and the test split with the best weights."""
import json

import pytest
import torch

from engine.best import BestCheckpoint, resolve_metric
from helpers import assert_one_line, entry, run, tiny_train_config
from utils.config import ConfigError


def test_the_metric_is_a_validation_scalar():
    assert resolve_metric(None, False) == "valid/recall_mean"
    assert resolve_metric(None, True) == "valid/r_mean"
    assert resolve_metric("recall_5", False) == "valid/recall_5"
    assert resolve_metric("valid/img_r1", True) == "valid/img_r1"
    with pytest.raises(ConfigError, match="valid/recall_1, valid/recall_5"):
        resolve_metric("img_r1", False)


def test_an_unknown_metric_is_refused_at_start_up(tmp_path, monkeypatch, capsys):
    cfg = tiny_train_config(tmp_path / "c.json")
    code, err = entry("train_itm_hard_negatives", ["--config", cfg, "--output_dir", tmp_path / "o",
                                                   "--best_metric", "recall_50"], monkeypatch, capsys)
    assert_one_line(code, err, "--best_metric recall_50", "valid/recall_mean")
    assert not (tmp_path / "o").exists()


def test_best_keeps_the_highest_and_comes_back(tmp_path):
    model = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    best = BestCheckpoint(str(tmp_path), "valid/recall_1")
    rng = torch.get_rng_state()
    assert best.update(2, {"valid/recall_1": 0.5}, model)
    assert torch.equal(rng, torch.get_rng_state())  # saving draws nothing
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not best.update(4, {"valid/recall_1": 0.5}, model)  # a tie keeps the earlier step
    assert json.loads((tmp_path / "best.json").read_text()) == {"step": 2, "metric": "valid/recall_1", "value": 0.5}
    assert torch.equal(torch.load(tmp_path / "best.pt", weights_only=True)["weight"], before["weight"])
    again = BestCheckpoint(str(tmp_path), "valid/recall_1").load()  # a resumed run
    assert (again.step, again.value) == (2, 0.5)
    assert not again.update(6, {"valid/recall_1": 0.4}, model) and again.update(8, {"valid/recall_1": 0.6}, model)
    other = BestCheckpoint(str(tmp_path), "valid/recall_5").load()  # another metric: chosen afresh
    assert other.step is None
    with pytest.raises(ConfigError, match="it logs valid/recall_1, valid/recall_10"):
        other.update(10, {"valid/recall_1": 0.1, "valid/recall_10": 0.2}, model)


def test_the_test_split_is_evaluated_with_the_last_and_the_best_weights(tmp_path):
    cfg = tiny_train_config(tmp_path / "c.json", num_train_steps=6, valid_steps=1, learning_rate=1e-3)
    out = tmp_path / "out"
    res = run(["train_itm_hard_negatives.py", "--config", cfg, "--output_dir", str(out), "--best_metric", "recall_1"])
    assert res.returncode == 0, res.stderr[-3000:]
    values = [json.loads(line) for line in (out / "log" / "metrics.jsonl").read_text().splitlines()]
    recalls = {e["step"]: e["value"] for e in values if e["name"] == "valid/recall_1"}
    assert sorted(recalls) == [1, 2, 3, 4, 5, 6]
    step = min(s for s in recalls if recalls[s] == max(recalls.values()))
    record = json.loads((out / "ckpt" / "best.json").read_text())
    assert record == {"step": step, "metric": "valid/recall_1", "value": recalls[step]}
    best, same = (torch.load(out / "ckpt" / name, weights_only=True) for name in ("best.pt", f"model_step_{step}.pt"))
    assert best.keys() == same.keys() and all(torch.equal(best[k], same[k]) for k in best)
    results = json.loads((out / "results_test" / "best.json").read_text())
    assert {k: results[k] for k in record} == record and "r_mean" in results and results["counting"] == "textbook"
    assert (out / "results_test" / "results_6.json").exists()
    assert "test split, last weights (step 6):" in res.stdout
    assert f"test split, best weights (step {step}, valid/recall_1 " in res.stdout
    assert (out / "log" / "curves.png").read_bytes()[:4] == b"\x89PNG"
