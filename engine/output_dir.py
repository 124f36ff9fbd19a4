"""A training run's output_dir: whether to resume, its lock, and its layout.

    output_dir/log/       log.txt, hps.json, model.json, TensorBoard events
    output_dir/ckpt/      model_step_{N}.pt, train_state_{N}.pt
    output_dir/results_test/results_{N}.json, best.json
"""
import os
from dataclasses import dataclass
from os.path import exists, join

from utils import distributed as dist
from utils.checkpoint import latest_training_state
from engine.run_settings import model_as_trained
from utils.config import ConfigError
from utils.logger import LOGGER, add_log_to_file
from utils.outputs import LOCK_NAME, OutputError, lock_dir, refuse_unwritable, write_json
from utils.retrieval_metrics import write_recall_log

_RUN_FOLDERS = {"log", "ckpt", "results_test", LOCK_NAME}


@dataclass(frozen=True)
class RunFolders:
    root: str

    @property
    def ckpt(self):
        return join(self.root, "ckpt")

    @property
    def log(self):
        return join(self.root, "log")

    @property
    def results(self):
        return join(self.root, "results_test")


def _started_without_checkpoint(output_dir):
    """Whether ``output_dir`` holds only what a run leaves before its first checkpoint."""
    folders = RunFolders(output_dir)
    results = folders.results
    return (set(os.listdir(output_dir)) <= _RUN_FOLDERS and latest_training_state(folders.ckpt) is None
            and not (os.path.isdir(results) and os.listdir(results)))


def should_resume(output_dir, resume):
    """Whether to resume. A non-empty output_dir is refused unless resuming (nothing of a
    previous run is touched); one left by a run stopped before its first checkpoint starts
    afresh, with or without --resume."""
    refuse_unwritable("output_dir", output_dir, folder=True)
    if resume and latest_training_state(RunFolders(output_dir).ckpt) is not None:
        return True
    if not exists(output_dir) or _started_without_checkpoint(output_dir):
        if resume:
            LOGGER.warning("--resume: %s holds no training state yet (the run stopped before its first "
                           "checkpoint); starting from step 0", output_dir)
        return False
    if resume:
        raise ConfigError(f"--resume: no training state in {output_dir}/ckpt to resume from")
    raise ConfigError(f"output_dir {output_dir} is not empty; choose a new one or pass --resume")


def claim(output_dir, resume):
    """Create and lock output_dir for this process's life, then decide again whether to
    resume (another run may have written there since the first look)."""
    os.makedirs(output_dir, exist_ok=True)
    lock_dir(output_dir)
    return should_resume(output_dir, resume)


def decided_by_rank0(decide):
    """Rank 0 runs ``decide()``; every rank gets its result, or raises the same error, so
    that a user's mistake stops all ranks with one line instead of leaving them waiting."""
    outcome = None
    if dist.is_main_process():
        try:
            outcome = ("ok", decide())
        except (ConfigError, OutputError, OSError) as e:
            outcome = ("error", (str(e), getattr(e, "details", ())))
    kind, value = dist.all_gather_object(outcome)[0]
    if kind == "error":
        raise ConfigError(*value)
    return value


def make_run_folders(output_dir, resumed, hps, model_config):
    """The run's folders (made by rank 0, which also logs to log/log.txt and, for a new run,
    writes the options to log/hps.json and the model config as trained to log/model.json:
    the file's, with the ``dropout`` of ``hps`` set)."""
    folders = RunFolders(output_dir)
    if dist.is_main_process():
        for path in (folders.ckpt, folders.log, folders.results):
            os.makedirs(path, exist_ok=True)
        add_log_to_file(join(folders.log, "log.txt"))
        if not resumed:
            write_json(join(folders.log, "hps.json"), hps, indent=4)
            write_json(join(folders.log, "model.json"), model_as_trained(model_config, hps.get("dropout")),
                       indent=4)
    return folders


def write_test_results(folders, step, log, counting, scored=None):
    write_recall_log(join(folders.results, f"results_{step}.json"), log, counting, scored)


def write_best_test_results(folders, record, log, counting, scored=None):
    """results_test/best.json: the test split with ckpt/best.pt, ``record`` its step, metric and value."""
    write_recall_log(join(folders.results, "best.json"), {**record, **log}, counting, scored)
