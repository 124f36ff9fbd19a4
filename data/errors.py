"""DataError, and reading JSON files with one-line errors that name the file."""
import json


class DataError(ValueError):
    """Bad or missing input data; the message names the file or key at fault."""


def load_json(path, what=None, error=DataError):
    """The JSON value in ``path``; a one-line ``error`` naming the file (and ``what`` it is)
    when it is missing or not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{what} file {path} not found" if what else f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def load_json_map(path, value_type, what):
    """A JSON object whose values are all ``value_type`` (``what`` names them in the error)."""
    obj = load_json(path)
    if not isinstance(obj, dict) or not all(isinstance(v, value_type) and not isinstance(v, bool)
                                            for v in obj.values()):
        raise DataError(f"{path} must be a JSON object mapping names to {what}; rebuild it")
    return obj
