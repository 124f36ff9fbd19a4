"""engine/output_dir.py: whether a run resumes, what it refuses to touch, the folders it
makes, and decisions taken by rank 0 for every rank."""
import json
import logging

import pytest

from conftest import TINY_CONFIG
from engine.output_dir import decided_by_rank0, make_run_folders, should_resume
from utils.config import ConfigError


def _unfinished_run(out):
    for sub in ("log", "ckpt", "results_test"):
        (out / sub).mkdir(parents=True)
    (out / "log" / "hps.json").write_text("{}")
    (out / "ckpt" / ".model_step_2.pt.tmp999").write_bytes(b"partial")  # killed while writing
    (out / ".lock").write_text("pid 1 on crashed\n")


@pytest.mark.parametrize("resume", [False, True])
def test_run_stopped_before_its_first_checkpoint_starts_afresh(tmp_path, caplog, resume):
    out = tmp_path / "o"
    _unfinished_run(out)
    assert should_resume(str(out), resume) is False
    assert resume == any("starting from step 0" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("extra,resume,needle", [
    ("results_test/results_4.json", False, "is not empty"),
    ("notes.txt", False, "is not empty"),
    ("notes.txt", True, "--resume: no training state"),
    ("ckpt/model_step_2.pt", False, "is not empty")])
def test_output_dir_with_results_is_kept(tmp_path, extra, resume, needle):
    out = tmp_path / "o"
    _unfinished_run(out)
    (out / extra).write_text("keep me")
    if extra.startswith("ckpt/"):
        (out / "ckpt" / "train_state_2.pt").write_text("keep me")
    with pytest.raises(ConfigError, match=needle):
        should_resume(str(out), resume)
    assert (out / extra).read_text() == "keep me"


@pytest.fixture
def root_log_handlers():
    """make_run_folders logs to the run's log.txt from then on; the test process must not."""
    before = list(logging.getLogger().handlers)
    yield
    for handler in logging.getLogger().handlers[len(before):]:
        logging.getLogger().removeHandler(handler)
        handler.close()


def test_new_run_writes_its_options_and_model_config(tmp_path, root_log_handlers):
    folders = make_run_folders(str(tmp_path / "o"), False, {"seed": 3}, TINY_CONFIG)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["ckpt", "log", "results_test"]
    assert json.loads((tmp_path / "o" / "log" / "hps.json").read_text()) == {"seed": 3}
    with open(TINY_CONFIG) as f:
        assert json.loads((tmp_path / "o" / "log" / "model.json").read_text()) == json.load(f)
    assert folders.ckpt == str(tmp_path / "o" / "ckpt")
    logging.getLogger("iais").warning("into the run's log")
    assert "into the run's log" in (tmp_path / "o" / "log" / "log.txt").read_text()


def test_model_json_records_the_dropout_set(tmp_path, root_log_handlers):
    make_run_folders(str(tmp_path / "o"), False, {"seed": 3, "dropout": 0.0}, TINY_CONFIG)
    with open(TINY_CONFIG) as f:
        file_config = json.load(f)
    recorded = json.loads((tmp_path / "o" / "log" / "model.json").read_text())
    assert file_config["hidden_dropout_prob"] == 0.1
    assert recorded == {**file_config, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def test_resumed_run_keeps_the_options_it_started_with(tmp_path, root_log_handlers):
    (tmp_path / "o" / "log").mkdir(parents=True)
    (tmp_path / "o" / "log" / "hps.json").write_text('{"seed": 1}')
    make_run_folders(str(tmp_path / "o"), True, {"seed": 3}, TINY_CONFIG)
    assert json.loads((tmp_path / "o" / "log" / "hps.json").read_text()) == {"seed": 1}
    assert not (tmp_path / "o" / "log" / "model.json").exists()


def test_rank0_decision_and_its_error_reach_the_caller():
    assert decided_by_rank0(lambda: 7) == 7

    def refuse():
        raise OSError("disk gone")

    with pytest.raises(ConfigError, match="^disk gone$"):
        decided_by_rank0(refuse)
