"""DataError, and the JSON reads of the DBs' index files that raise it with the file named."""
import json
from os.path import exists


class DataError(ValueError):
    """Bad or missing input data; the message names the file or key at fault."""


def load_json(path):
    if not exists(path):
        raise DataError(f"{path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def load_json_map(path, value_type, what):
    """A JSON object whose values are all ``value_type`` (``what`` names them in the error)."""
    obj = load_json(path)
    if not isinstance(obj, dict) or not all(isinstance(v, value_type) and not isinstance(v, bool)
                                            for v in obj.values()):
        raise DataError(f"{path} must be a JSON object mapping names to {what}; rebuild it")
    return obj
