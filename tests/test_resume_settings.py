"""A resumed run is the same run (engine/run_settings.py): on --resume every setting that
changes what is optimised is compared with the run's log/hps.json and log/model.json; a
change is refused with a line per setting unless --resume_with_changes, which records it
in log/hps_history.jsonl; the other settings change freely."""
import json
import logging
import os
import shutil

import pytest
import torch

from conftest import TINY_CONFIG
from engine.checkpointing import TrainingState, resume
from engine.run_settings import (COMPARED, COMPARED_KEYS, DROPOUT_KEYS, FREE, GLOBAL_BATCH, HISTORY_NAME,
                                 check_resume, differences, record_changes, run_record)
from helpers import run, tiny_train_config
from utils.checkpoint import CheckpointError
from utils.config import ConfigError, parse_with_config

with open(TINY_CONFIG) as f:
    TINY_MODEL = json.load(f)


def _parser():
    import train_itm_hard_negatives
    return train_itm_hard_negatives.build_parser(), train_itm_hard_negatives.CONFIG_ONLY_KEYS


@pytest.fixture(scope="module")
def recorded_hps(tmp_path_factory):
    """What a run of the tiny config on one process records in log/hps.json."""
    parser, config_only = _parser()
    cfg = tiny_train_config(tmp_path_factory.mktemp("cfg") / "c.json")
    opts = parse_with_config(parser, ["--config", cfg, "--output_dir", "out"], config_only)
    return json.loads(json.dumps(run_record(vars(opts), 1)))  # as read back from the file


def _record(log_dir, hps, model=TINY_MODEL):
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "hps.json").write_text(json.dumps(hps, indent=4))
    (log_dir / "model.json").write_text(json.dumps(model, indent=4))
    return str(log_dir)


def _changed(value):
    """Another value of the same type (a list: its first element changed, or one added)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2
    if isinstance(value, str):
        return value + "_other"
    if isinstance(value, list):
        return [_changed(value[0])] + value[1:] if value else ["other"]
    return "other"  # None: an option that was off (amp_dtype, negative_groups)


def _refusal(log_dir, hps, model_config=TINY_CONFIG, accept=False):
    with pytest.raises(ConfigError) as refused:
        check_resume(log_dir, hps, model_config, accept)
    return str(refused.value), list(refused.value.details)


def test_every_option_is_either_compared_or_free():
    parser, config_only = _parser()
    options = {a.dest for a in parser._actions if a.dest != "help"} | set(config_only) | {"world_size"}
    assert set(COMPARED_KEYS) | set(FREE) == options
    assert not set(COMPARED_KEYS) & set(FREE)
    assert all(reason and keys for reason, keys in COMPARED.values()) and all(FREE.values())


@pytest.mark.parametrize("key", [k for k in COMPARED_KEYS if k != "model_config"])
def test_a_changed_setting_is_refused_with_its_line(tmp_path, recorded_hps, key):
    log_dir = _record(tmp_path / "log", recorded_hps)
    hps = {**recorded_hps, key: _changed(recorded_hps[key])}
    header, details = _refusal(log_dir, hps)
    name = GLOBAL_BATCH if key in ("world_size", "train_batch_size") else key
    assert len(details) == 1 and details[0].startswith(f"{name}: ") and " -> " in details[0], details
    assert "\n" not in header and "hps.json" in header and "--resume_with_changes" in header
    assert check_resume(log_dir, hps, TINY_CONFIG, True)[0].setting == name


@pytest.mark.parametrize("key", sorted(set(TINY_MODEL) - set(DROPOUT_KEYS)))
def test_a_changed_model_config_is_refused_with_its_line(tmp_path, recorded_hps, key):
    log_dir = _record(tmp_path / "log", recorded_hps)
    config = tmp_path / "model.json"
    config.write_text(json.dumps({**TINY_MODEL, key: _changed(TINY_MODEL[key])}))
    _, details = _refusal(log_dir, {**recorded_hps, "model_config": str(config)}, str(config))
    assert details == [f"model_config.{key}: {json.dumps(TINY_MODEL[key])} -> {json.dumps(_changed(TINY_MODEL[key]))}"]


@pytest.mark.parametrize("key", DROPOUT_KEYS)
def test_the_files_dropout_is_not_compared_but_the_dropout_set_is(tmp_path, recorded_hps, key):
    """--dropout sets every dropout layer, whatever the file says: the file's value trains
    nothing; a changed --dropout is one change, not three."""
    log_dir = _record(tmp_path / "log", recorded_hps)
    config = tmp_path / "model.json"
    config.write_text(json.dumps({**TINY_MODEL, key: 0.3}))
    assert check_resume(log_dir, {**recorded_hps, "model_config": str(config)}, str(config), False) == []
    _, details = _refusal(log_dir, {**recorded_hps, "dropout": 0.0})
    assert details == ["dropout: 0.1 -> 0.0"]


@pytest.mark.parametrize("key", sorted(FREE))
def test_a_free_setting_changes_silently(tmp_path, recorded_hps, key, caplog):
    log_dir = _record(tmp_path / "log", recorded_hps)
    with caplog.at_level(logging.WARNING):
        assert check_resume(log_dir, {**recorded_hps, key: _changed(recorded_hps[key])}, TINY_CONFIG, False) == []
    assert not caplog.records


def test_the_message_has_a_line_per_change(tmp_path, recorded_hps):
    log_dir = _record(tmp_path / "log", {**recorded_hps, "num_train_steps": 200, "learning_rate": 3e-5})
    hps = {**recorded_hps, "num_train_steps": 300, "learning_rate": 3e-5, "IAIS": "singular", "world_size": 2}
    header, details = _refusal(log_dir, hps)
    assert header.startswith("--resume: ") and os.path.join(log_dir, "hps.json") in header
    assert details == ["num_train_steps: 200 -> 300", 'IAIS: false -> "singular"',
                       f"{GLOBAL_BATCH}: 2 (1 x 2) -> 4 (2 x 2)"]


def test_what_is_compared_is_what_the_run_optimises(tmp_path, recorded_hps, caplog):
    """The same file however its path is spelt, the same positives per step on more
    processes and the same model config elsewhere are the same run; an older record
    without world_size compares the per-process batch alone."""
    log_dir = _record(tmp_path / "log", recorded_hps)
    txt_db = recorded_hps["val_txt_db"]
    same = {**recorded_hps, "val_txt_db": os.path.relpath(txt_db) + "/", "world_size": 2, "train_batch_size": 1}
    copy = shutil.copy(TINY_CONFIG, tmp_path / "elsewhere.json")
    assert check_resume(log_dir, {**same, "model_config": copy}, copy, False) == []
    older = {k: v for k, v in recorded_hps.items() if k != "world_size"}
    _record(tmp_path / "log", older)
    with caplog.at_level(logging.WARNING):
        assert check_resume(log_dir, {**recorded_hps, "world_size": 8}, TINY_CONFIG, False) == []
    assert "does not record world_size" in caplog.text
    assert _refusal(log_dir, {**recorded_hps, "train_batch_size": 4})[1] == ["train_batch_size: 2 -> 4"]


@pytest.mark.parametrize("name,content,needle", [
    ("hps.json", None, "hps.json is missing"), ("hps.json", "{not json", "hps.json is unreadable"),
    ("hps.json", "[]", "not a JSON object"), ("model.json", None, "model.json is missing")])
def test_a_record_missing_or_unreadable_is_one_line(tmp_path, recorded_hps, name, content, needle):
    log_dir = _record(tmp_path / "log", recorded_hps)
    os.remove(os.path.join(log_dir, name))
    if content is not None:
        (tmp_path / "log" / name).write_text(content)
    header, details = _refusal(log_dir, recorded_hps, accept=True)
    assert needle in header and "restore it" in header and "\n" not in header and details == []


def test_accepted_changes_are_recorded(tmp_path, recorded_hps):
    log_dir = _record(tmp_path / "log", recorded_hps)
    config = tmp_path / "model.json"
    config.write_text(json.dumps({**TINY_MODEL, "initializer_range": 0.04, "hidden_dropout_prob": 0.3}))
    hps = {**recorded_hps, "num_train_steps": 8, "n_workers": 3, "model_config": str(config), "dropout": 0.0}
    changes = check_resume(log_dir, hps, str(config), True)
    record_changes(log_dir, 4, changes, hps, str(config))
    entries = [json.loads(line) for line in (tmp_path / "log" / HISTORY_NAME).read_text().splitlines()]
    assert len(entries) == 1 and entries[0]["step"] == 4
    # the file's dropout is not what trains: --dropout is, compared once as a setting
    assert entries[0]["changes"] == [{"setting": "model_config.initializer_range", "old": 0.02, "new": 0.04},
                                     {"setting": "num_train_steps", "old": 4, "new": 8},
                                     {"setting": "dropout", "old": 0.1, "new": 0.0}]
    written = json.loads((tmp_path / "log" / "hps.json").read_text())
    assert written == {**recorded_hps, "num_train_steps": 8, "model_config": str(config),
                       "dropout": 0.0}  # n_workers kept
    model = json.loads((tmp_path / "log" / "model.json").read_text())
    assert model["initializer_range"] == 0.04
    assert model["hidden_dropout_prob"] == model["attention_probs_dropout_prob"] == 0.0  # as trained
    assert check_resume(log_dir, hps, str(config), False) == []  # the record now describes the run
    assert differences(written, TINY_MODEL, recorded_hps, TINY_MODEL)[0][0].text == "num_train_steps: 8 -> 4"


def test_resume_into_weights_of_another_model_size_is_one_line(tmp_path):
    from model import UniterForImageTextRetrievalHardNeg
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    trained = UniterForImageTextRetrievalHardNeg.from_pretrained(TINY_CONFIG, {}, img_dim=2048)
    torch.save(trained.state_dict(), ckpt / "model_step_2.pt")
    torch.save({}, ckpt / "train_state_2.pt")
    wider = tmp_path / "wider.json"
    wider.write_text(json.dumps({**TINY_MODEL, "hidden_size": 128}))
    model = UniterForImageTextRetrievalHardNeg.from_pretrained(str(wider), {}, img_dim=2048)
    with pytest.raises(CheckpointError) as refused:
        resume(TrainingState(model, None, None, {}), str(ckpt), str(wider))
    message = str(refused.value)
    assert "model_step_2.pt" in message and str(wider) in message and "size mismatch" in message
    assert "\n" not in message


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-step run of the tiny config (without IAIS) and its command line."""
    root = tmp_path_factory.mktemp("finished")
    args = ["train_itm_hard_negatives.py", "--config",
            tiny_train_config(root / "c.json", num_train_steps=2, valid_steps=2)]
    res = run(args + ["--output_dir", str(root / "run")])
    assert res.returncode == 0, res.stderr[-3000:]
    return root / "run", args


def _snapshot(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def _error_lines(stderr):
    lines = stderr.splitlines()
    at = next(i for i, line in enumerate(lines) if ": error: " in line)
    return lines[at:]


def test_more_steps_are_refused_then_accepted_and_recorded(tmp_path, finished_run):
    out = shutil.copytree(finished_run[0], tmp_path / "run")
    args = finished_run[1] + ["--output_dir", str(out), "--resume", "--num_train_steps", "4"]
    before = _snapshot(out)
    res = run(args)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert _error_lines(res.stderr)[1:] == ["  num_train_steps: 2 -> 4"], res.stderr[-2000:]
    assert "log/hps.json" in _error_lines(res.stderr)[0] and "--resume_with_changes" in res.stderr
    assert _snapshot(out) == before  # nothing written

    res = run(args + ["--resume_with_changes"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--resume_with_changes: num_train_steps: 2 -> 4 (from step 2)" in res.stderr
    history = [json.loads(line) for line in (out / "log" / HISTORY_NAME).read_text().splitlines()]
    assert [(h["step"], h["changes"]) for h in history] == [
        (2, [{"setting": "num_train_steps", "old": 2, "new": 4}])]
    assert json.loads((out / "log" / "hps.json").read_text())["num_train_steps"] == 4
    assert (out / "ckpt" / "model_step_4.pt").exists()


def test_iais_is_refused_and_loader_workers_change_freely(tmp_path, finished_run):
    out = shutil.copytree(finished_run[0], tmp_path / "run")
    args = finished_run[1] + ["--output_dir", str(out), "--resume"]
    before = _snapshot(out)
    res = run(args + ["--IAIS", "singular"])
    assert res.returncode == 2, res.stderr[-3000:]
    assert _error_lines(res.stderr)[1:] == ['  IAIS: false -> "singular"'], res.stderr[-2000:]
    assert _snapshot(out) == before

    res = run(args + ["--n_workers", "1"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr and "WARNING" not in res.stderr and "resume_with_changes" not in res.stderr
    assert not (out / "log" / HISTORY_NAME).exists()
    assert (out / "log" / "hps.json").read_bytes() == before[os.path.join("log", "hps.json")]
