"""The best checkpoint of a run by one validation scalar (``--best_metric``, higher is better).

    ckpt/best.pt     the weights of the best validation so far (the format of model_step_N.pt)
    ckpt/best.json   {"step", "metric", "value"} of that validation

Both are written by rank 0, atomically, whenever a validation beats the best so far (the
first validation always does; a tie keeps the earlier step). The weights are copied from
the model's state dict: saving them draws no random number and changes no weight, so a run
with this choice is the same run. A resumed run reads the best so far back from best.json.
"""
import math
import os
from os.path import join

from utils import distributed as dist
from utils.checkpoint import save_weights
from utils.config import ConfigError
from utils.errors import load_json
from utils.logger import LOGGER
from utils.outputs import write_json

from .evaluation import validation_scalar_names
from .output_dir import decided_by_rank0

BEST_WEIGHTS, BEST_RECORD = "best.pt", "best.json"


def default_metric(full_val):
    """The validation mean recall: of the quick validation's recall_K, or the full R@K table's r_mean."""
    return "valid/r_mean" if full_val else "valid/recall_mean"


def resolve_metric(name, full_val):
    """The validation scalar ``--best_metric`` names ("recall_1" is "valid/recall_1"); one line
    naming the scalars this run's validation logs when it names none of them."""
    if name is None:
        return default_metric(full_val)
    metric = name if name.startswith("valid/") else f"valid/{name}"
    known = validation_scalar_names(full_val)
    if metric not in known:
        kind = "full (--full_val)" if full_val else "quick"
        raise ConfigError(f"--best_metric {name}: the {kind} validation logs no such scalar; it logs "
                          f"{', '.join(known)}")
    return metric


def _state_copy(model):
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class BestCheckpoint:
    """The best validation of the run in ``ckpt_dir`` by ``metric``: ``step`` and ``value``
    (None before the first validation)."""

    def __init__(self, ckpt_dir, metric):
        self.ckpt_dir, self.metric = ckpt_dir, metric
        self.step = self.value = None

    @property
    def weights_path(self):
        return join(self.ckpt_dir, BEST_WEIGHTS)

    @property
    def record_path(self):
        return join(self.ckpt_dir, BEST_RECORD)

    def _read_record(self):
        path = self.record_path
        if not os.path.exists(path):
            return None
        record = load_json(path, "best checkpoint record", ConfigError)
        if not isinstance(record, dict) or not {"step", "metric", "value"} <= set(record):
            raise ConfigError(f"{path} is not a best checkpoint record (step, metric, value); delete it and "
                                  f"{BEST_WEIGHTS} to choose the best afresh")
        if record["metric"] != self.metric:
            LOGGER.warning("%s chose by %s, this run by %s: the best is chosen afresh from the next validation",
                           path, record["metric"], self.metric)
            return None
        return int(record["step"]), float(record["value"])

    def load(self):
        """Continue from best.json (a resumed run); read by rank 0, the same on every rank."""
        best = decided_by_rank0(self._read_record)
        if best is not None:
            self.step, self.value = best
            LOGGER.info("best checkpoint so far: step %d, %s %.6g", self.step, self.metric, self.value)
        return self

    def update(self, step, scalars, model):
        """After the validation at ``step`` (its ``scalars``): keep ``model``'s weights when
        they beat the best so far (rank 0's value decides on every rank). -> whether they did."""
        if self.metric not in scalars:
            raise ConfigError(f"--best_metric {self.metric} is not a scalar of this run's validation; it logs "
                              f"{', '.join(sorted(scalars))}")
        value = dist.all_gather_object(float(scalars[self.metric]))[0]
        if not math.isfinite(value) or (self.value is not None and value <= self.value):
            return False
        self.step, self.value = step, value
        if dist.is_main_process():
            save_weights(_state_copy(model), self.weights_path)
            write_json(self.record_path, {"step": step, "metric": self.metric, "value": value}, indent=2)
        LOGGER.info("step %d: best %s so far (%.6g): %s", step, self.metric, value, self.weights_path)
        return True
