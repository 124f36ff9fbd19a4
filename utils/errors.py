"""The errors a user's input can cause, and reading JSON files with one-line errors; the
lowest layer, so that every package raises and catches the same types."""
import json


class DataError(ValueError):
    """Bad or missing input data; the message names the file or key at fault."""


class CheckpointMismatchError(ValueError):
    """A checkpoint tensor whose shape does not fit the model config."""


def load_json(path, what=None, error=DataError):
    """The JSON value in ``path``; a one-line ``error`` naming the file (and ``what`` it is)
    when it is missing or not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{what} file {path} not found" if what else f"{path} not found") from None
    except IsADirectoryError:
        raise error(f"{path} is a folder; give the {what or 'JSON'} file") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise error(f"{what + ' ' if what else ''}{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                    f"{e.start}); JSON files are read as UTF-8: save it so") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to read") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise error(f"{path}: unreadable JSON value ({e})") from None
