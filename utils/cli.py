"""Entry-point wrapper: user mistakes become one line on stderr and exit status 2."""
import os
import sys

from . import distributed
from .checkpoint import CheckpointError
from .config import ConfigError, parse_with_config
from .environment import EnvironmentVariableError
from .errors import CheckpointMismatchError, DataError
from .outputs import OutputError


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. gradients non-finite for too long)."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, CheckpointMismatchError, TrainingError, OutputError,
               EnvironmentVariableError, OSError)


def one_line(error):
    """The message of an error, also when a DataLoader worker re-raised it with its traceback."""
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def run(main_fn, parser, config_only_keys=()):
    prog = os.path.basename(sys.argv[0])
    try:
        opts = parse_with_config(parser, config_only_keys=config_only_keys)
        # before any work: the LMDB readers and torch.distributed parse these deep inside
        distributed.check_launch_environment()
        main_fn(opts)
    except USER_ERRORS as e:
        # one write: the lines of each rank stay together when several ranks fail at once
        details = "".join(f"  {line}\n" for line in getattr(e, "details", ()))
        sys.stderr.write(f"{prog}: error: {one_line(e)}\n{details}")
        sys.stderr.flush()
        distributed.abandon()
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
