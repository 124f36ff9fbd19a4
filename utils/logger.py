"""Text log (stderr + log/log.txt), TensorBoard scalars and running averages."""
import logging
import math

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
    """Scalars to TensorBoard on the main process; does nothing elsewhere."""

    def __init__(self, log_dir=None):
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir)

    def add_scalar(self, key, value, step):
        if self.writer is not None:
            self.writer.add_scalar(key, float(value), step)

    def log_scalar_dict(self, values, step, prefix=""):
        for key, value in values.items():
            self.add_scalar(prefix + key, value, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()


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
