"""Which settings make a training run what it is, and what --resume does when they change.

A run's log/hps.json records its options (and the number of processes), log/model.json
its model config. On --resume the settings of COMPARED must match that record: a resumed
run is the same run. A change is refused before anything is written, one line per
setting, unless --resume_with_changes accepts it; then each change is logged, appended to
log/hps_history.jsonl with the step it takes effect at, and hps.json (model.json) updated
so that it describes what runs from then on. The settings of FREE change how a run is
carried out or reported, not what it optimises, and may differ freely.
"""
import json
import os
from datetime import datetime, timezone
from os.path import join
from typing import NamedTuple

from utils.config import ConfigError, load_json
from utils.logger import LOGGER
from utils.outputs import first_line

ACCEPT_FLAG = "--resume_with_changes"
HISTORY_NAME = "hps_history.jsonl"
GLOBAL_BATCH = "world_size x train_batch_size"

# group: (why a change makes another run, the hps.json keys it holds)
COMPARED = {
    "model": ("the network trained and the weights it started from; model_config is compared by its contents "
              "(log/model.json), one key at a time, so that a copy of the file elsewhere is the same model",
              ("model_config", "checkpoint")),
    "data": ("the examples trained on (and validated and tested on), which captions are kept and which boxes "
             "each image has",
             ("train_txt_dbs", "train_img_dbs", "val_txt_db", "val_img_db", "test_txt_db", "test_img_db",
              "max_txt_len", "conf_th", "max_bb", "min_bb", "num_bb", "compressed_db", "negative_groups")),
    "schedule": ("the update of every remaining step: the learning-rate curve (num_train_steps moves its "
                 "decay), the optimiser and its regularisation, the seed of the data order",
                 ("learning_rate", "warmup_steps", "num_train_steps", "optim", "betas", "weight_decay",
                  "grad_norm", "dropout", "seed")),
    "negatives": ("which negatives each positive is scored against and trained on, and the image side's masks",
                  ("negative_size", "hard_neg_size", "fix_image_side_masks")),
    "alignment": ("the alignment losses added to the ranking loss (IAIS and the --alignment objectives)",
                  ("IAIS", "alignment")),
    "precision": ("the arithmetic of every step, and whether a loss scale is kept", ("fp16", "amp_dtype")),
    "margin": ("the ranking loss itself", ("margin",)),
    "batch": ("the positives one optimizer step averages over all processes; compared as the product "
              f"{GLOBAL_BATCH}, so that 2 processes x 16 may continue as 1 x 32", ("world_size", "train_batch_size")),
}

# setting: why it may change on --resume
FREE = {
    "output_dir": "where the run is: the folder resumed holds the record itself, however its path is spelt",
    "config": "the file the options came from; the options themselves are compared",
    "resume": "how this launch treats output_dir",
    "resume_with_changes": "how this launch treats a change",
    "n_workers": "how batches are built, not which (the same batches: tests/test_training.py)",
    "worker_type": "how batches are built, not which",
    "pin_mem": "how batches are copied, not what they hold",
    "valid_steps": "when to validate and checkpoint: validation draws no random numbers and changes no weight, "
                   "so the steps between stay the same; only where the checkpoints fall moves",
    "save_steps": "where the checkpoints between validations fall: saving draws no random numbers",
    "full_val": "which validation numbers are logged",
    "best_metric": "which validation keeps ckpt/best.pt, not what is trained; a best.json of another metric "
                   "is chosen afresh from the next validation",
    "inf_minibatch_size": "how many images validation and evaluation score at once (and the quick validation's "
                          "candidates): what is measured, not what is trained",
    "original_counting": "how test recall is counted (results_N.json names the counting)",
    "max_skipped_steps": "when a run with non-finite gradients gives up",
    "collective_timeout": "when a distributed run with a dead process gives up",
    "allow_random_init": "a check of --checkpoint at the start; a resumed run loads its own weights",
}

PATH_KEYS = {"checkpoint", "train_txt_dbs", "train_img_dbs", "val_txt_db", "val_img_db", "test_txt_db",
             "test_img_db", "negative_groups"}
COMPARED_KEYS = tuple(key for _, keys in COMPARED.values() for key in keys)


class Change(NamedTuple):
    setting: str
    old: object  # as recorded (None: the model config had no such key)
    new: object
    text: str  # "setting: old -> new"


DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob")  # both set by --dropout


def model_as_trained(model_config, dropout):
    """The model config file's contents with what --dropout sets (every dropout layer's
    probability): what log/model.json records. ``dropout`` None: the file's as it is."""
    config = load_json(model_config, "model config")
    return config if dropout is None else {**config, **{key: dropout for key in DROPOUT_KEYS}}


def run_record(options, world_size):
    """What log/hps.json holds: the options and the number of processes."""
    return {**options, "world_size": world_size}


def read_resume_record(path, remedy):
    """The JSON object a --resume compares its settings with, or one line that says why
    not and, with ``remedy``, what to do."""
    if not os.path.exists(path):
        raise ConfigError(f"--resume: {path} is missing; {remedy}")
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--resume: {path} is unreadable ({first_line(e)}); {remedy}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--resume: {path} holds {type(value).__name__}, not a JSON object; {remedy}")
    return value


def read_record(log_dir):
    """(options, model config) a run recorded in ``log_dir``."""
    def read(name, what):
        return read_resume_record(join(log_dir, name), f"it records the {what} the run was trained with, which "
                                                       f"--resume compares: restore it, or train afresh in a new output_dir")
    return read("hps.json", "settings"), read("model.json", "model config")


def _comparable(key, value):
    """Paths name the same file however they are spelt (relative, symlinked, with ./)."""
    if key not in PATH_KEYS or value is None:
        return value
    if isinstance(value, list):
        return [os.path.realpath(v) if isinstance(v, str) else v for v in value]
    return os.path.realpath(value) if isinstance(value, str) else value


def _positives_per_step(hps):
    """world_size x train_batch_size (as a pair where a hand-edited record holds no numbers)."""
    pair = hps["world_size"], hps["train_batch_size"]
    return pair[0] * pair[1] if all(type(n) is int for n in pair) else pair


def _global_batch(hps):
    return f"{_positives_per_step(hps)} ({hps['world_size']} x {hps['train_batch_size']})"


def _model_changes(recorded_model, model):
    """The model config's changes, less the dropout probabilities: --dropout sets them and is
    compared as a setting of its own (a record of an older version holds the file's)."""
    def shown(config, key):
        return json.dumps(config[key]) if key in config else "(none)"

    return [Change(f"model_config.{key}", recorded_model.get(key), model.get(key),
                   f"model_config.{key}: {shown(recorded_model, key)} -> {shown(model, key)}")
            for key in sorted(set(recorded_model) | set(model))
            if key not in DROPOUT_KEYS and recorded_model.get(key, ...) != model.get(key, ...)]


def _plain_change(key, recorded, hps):
    if _comparable(key, recorded[key]) == _comparable(key, hps[key]):
        return None
    return Change(key, recorded[key], hps[key], f"{key}: {json.dumps(recorded[key])} -> {json.dumps(hps[key])}")


def _batch_change(recorded, hps):
    """The positives per step over all processes; a record without world_size (an older
    version's) has only the per-process count to compare."""
    if "world_size" not in recorded:
        return _plain_change("train_batch_size", recorded, hps)
    if _positives_per_step(recorded) == _positives_per_step(hps):
        return None
    return Change(GLOBAL_BATCH, [recorded["world_size"], recorded["train_batch_size"]],
                  [hps["world_size"], hps["train_batch_size"]],
                  f"{GLOBAL_BATCH}: {_global_batch(recorded)} -> {_global_batch(hps)}")


def differences(recorded, recorded_model, hps, model):
    """(changes, settings the record lacks) between a run's record (hps.json, model.json)
    and this launch's options ``hps`` (run_record) and model config contents ``model``."""
    unrecorded = [key for key in COMPARED_KEYS if key not in recorded and key != "model_config"]
    changes = _model_changes(recorded_model, model)
    for key in COMPARED_KEYS:
        if key not in unrecorded + ["model_config", "world_size", "train_batch_size"]:
            changes.append(_plain_change(key, recorded, hps))
    if "train_batch_size" not in unrecorded:
        changes.append(_batch_change(recorded, hps))
    return [c for c in changes if c is not None], unrecorded


def _model_changed(changes):
    return any(c.setting.startswith("model_config.") for c in changes)


def check_resume(log_dir, hps, model_config, accept_changes):
    """The changes a resume into the run of ``log_dir`` brings (with options ``hps`` and the
    model config file ``model_config``); refused (ConfigError, a line per change) unless
    ``accept_changes``. Nothing is written."""
    recorded, recorded_model = read_record(log_dir)
    model = model_as_trained(model_config, hps.get("dropout"))
    changes, unrecorded = differences(recorded, recorded_model, hps, model)
    for key in unrecorded:
        LOGGER.warning("--resume: %s does not record %s (written by an older version); it is not compared",
                       join(log_dir, "hps.json"), key)
    if changes and not accept_changes:
        model_json = " (model_config.*: model.json)" if _model_changed(changes) else ""
        raise ConfigError(f"--resume: these settings differ from the run's record {join(log_dir, 'hps.json')}"
                          f"{model_json}; resume with the recorded values, or pass {ACCEPT_FLAG} to continue "
                          f"with the new ones", [c.text for c in changes])
    return changes


def _write_json(path, value):
    """Through a temporary file and a rename: a run killed meanwhile keeps a readable record."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=4)
    os.replace(tmp, path)


def record_changes(log_dir, step, changes, hps, model_config):
    """Log the accepted ``changes``, append them to log/hps_history.jsonl with ``step`` (the
    step the run continues from), and update hps.json (and model.json) to this launch's
    values. The history is written first: a run killed in between records a change twice
    rather than not at all."""
    if not changes:
        return
    for change in changes:
        LOGGER.info("%s: %s (from step %d)", ACCEPT_FLAG, change.text, step)
    entry = {"step": step, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "changes": [{"setting": c.setting, "old": c.old, "new": c.new} for c in changes]}
    with open(join(log_dir, HISTORY_NAME), "a") as f:
        f.write(json.dumps(entry) + "\n")
    recorded, _ = read_record(log_dir)
    _write_json(join(log_dir, "hps.json"), {**recorded, **{key: hps[key] for key in COMPARED_KEYS}})
    if _model_changed(changes) or any(c.setting == "dropout" for c in changes):
        _write_json(join(log_dir, "model.json"), model_as_trained(model_config, hps.get("dropout")))
