"""DataError (utils/errors.py), and the JSON index files of the DBs read with one-line errors."""
from utils.errors import DataError, load_json

__all__ = ["DataError", "load_json", "load_json_map"]


def load_json_map(path, value_type, what):
    """A JSON object whose values are all ``value_type`` (``what`` names them in the error)."""
    obj = load_json(path)
    if not isinstance(obj, dict) or not all(isinstance(v, value_type) and not isinstance(v, bool)
                                            for v in obj.values()):
        raise DataError(f"{path} must be a JSON object mapping names to {what}; rebuild it")
    return obj
