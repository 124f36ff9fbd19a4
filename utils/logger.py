"""Text log (stderr + log/log.txt), TensorBoard scalars (also in log/metrics.jsonl) and
running averages."""
import json
import logging
import math
import os

from .curves import METRICS_NAME

LOGGER = logging.getLogger("iais")
_FORMAT = "%(asctime)s - %(levelname)s - %(name)s - %(message)s"


def setup_logging(is_main):
    logging.basicConfig(format=_FORMAT, datefmt="%m/%d/%Y %H:%M:%S",
                        level=logging.INFO if is_main else logging.WARNING)
    # per-key messages of checkpoint loading are useful once, not once per rank
    logging.getLogger("model").setLevel(logging.INFO if is_main else logging.WARNING)


def add_log_to_file(path):
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(_FORMAT))
    logging.getLogger().addHandler(handler)


class TensorBoardLogger:
    """Scalars to TensorBoard and to ``log_dir``/metrics.jsonl (one JSON object
    ``{"step", "name", "value"}`` a line, ``value`` null where not finite; appended to by a
    resumed run, flushed at every scalar so that a crash keeps what was logged) on the
    main process (``log_dir`` given); does nothing elsewhere."""

    def __init__(self, log_dir=None):
        self.writer = self.jsonl = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir)
            self.jsonl = open(os.path.join(log_dir, METRICS_NAME), "a", encoding="utf-8")

    def add_scalar(self, key, value, step):
        if self.writer is None:
            return
        value = float(value)
        self.writer.add_scalar(key, value, step)
        entry = {"step": int(step), "name": key, "value": value if math.isfinite(value) else None}
        self.jsonl.write(json.dumps(entry) + "\n")
        self.jsonl.flush()

    def log_scalar_dict(self, values, step, prefix=""):
        for key, value in values.items():
            self.add_scalar(prefix + key, value, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.jsonl.close()
            self.writer = self.jsonl = None


class RunningMeter:
    """Exponential moving average of a scalar (NaN values are skipped)."""

    def __init__(self, name, smooth=0.99):
        self.name, self._sm, self._val = name, smooth, None

    def __call__(self, value):
        val = value if self._val is None else value * (1 - self._sm) + self._val * self._sm
        if not math.isnan(val):
            self._val = val

    @property
    def seen(self):
        """Whether any finite value came in."""
        return self._val is not None

    @property
    def val(self):
        return 0.0 if self._val is None else self._val
