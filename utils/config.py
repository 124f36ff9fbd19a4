"""Command line + JSON config: the JSON sets defaults, flags given on the command line win.

Mistakes (unknown key or flag, wrong type, malformed JSON) raise ConfigError with one line
that names the culprit and, where it helps, the closest known name.
"""
import argparse
import difflib
import json
import math
import sys

from . import errors


class ConfigError(ValueError):
    """A user's mistake in the options. ``details``: lines shown under the one-line message,
    one per item (e.g. per changed setting), where a single line would hide what differs."""

    def __init__(self, message, details=()):
        super().__init__(message)
        self.details = tuple(details)


class Range:
    """The valid values of a numeric option: ``low``/``high`` bounds (open or closed) and
    special values allowed besides (``also``, e.g. -1 for "off")."""

    def __init__(self, low=None, high=None, low_open=False, high_open=False, also=()):
        self.low, self.high, self.low_open, self.high_open, self.also = low, high, low_open, high_open, also

    def __contains__(self, value):
        if value in self.also:
            return True
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self):
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low}"
        else:
            text = f"{'<' if self.high_open else '<='} {self.high}"
        return text + "".join(f" or {v}" for v in self.also)


POSITIVE = Range(1)
NON_NEGATIVE = Range(0)
PROBABILITY = Range(0, 1, high_open=True)


class _Parser(argparse.ArgumentParser):
    """Raises ConfigError instead of exiting; ``add_argument`` takes ``valid=Range(...)``,
    checked after flags and config are merged (one place for every option's range)."""

    def error(self, message):
        raise ConfigError(message)

    def add_argument(self, *args, valid=None, **kwargs):
        action = super().add_argument(*args, **kwargs)
        action.valid = valid
        return action


def make_parser(description):
    return _Parser(description=description, allow_abbrev=False)


def _closest(name, known):
    match = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def load_json(path, what="config"):
    return errors.load_json(path, what, ConfigError)


def _check_type(action, key, value, source):
    """Validate a JSON value against the argparse action that would have parsed it."""
    def fail(expected):
        raise ConfigError(f"{source}: {key} must be {expected}, got {json.dumps(value)}")

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        if not isinstance(value, list):
            fail("a list")
        return [_check_scalar(action, key, v, source) for v in value]
    return _check_scalar(action, key, value, source)


def _check_scalar(action, key, value, source):
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{source}: {key} must be one of "
                          f"{', '.join(json.dumps(c) for c in action.choices)}, got {json.dumps(value)}")
    typ = action.type
    ok = True
    if value is None:
        ok = action.default is None
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typ is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif typ is str:
        ok = isinstance(value, str)
        if ok and not value.strip():
            raise ConfigError(f"{source}: {key} is an empty string; give a value, or leave the key out "
                              f"(or null) for its default")
    if not ok:
        name = {int: "an integer", float: "a number", str: "a string"}.get(typ, "valid")
        raise ConfigError(f"{source}: {key} must be {name}, got {json.dumps(value)}")
    return value


def _check_values(parser, args):
    """Every float finite (argparse takes 'nan' and 'inf'), every declared Range held."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if value is None or isinstance(value, bool):
            continue
        values = value if isinstance(value, list) else [value]
        name = action.option_strings[-1] if action.option_strings else action.dest
        for v in values:
            if isinstance(v, str) and not v.strip() and action.type in (str, None):
                raise ConfigError(f"{name} is an empty string; give a value, or leave the flag out for its default")
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number, got {v}")
            valid = getattr(action, "valid", None)
            if valid is not None and isinstance(v, (int, float)) and v not in valid:
                raise ConfigError(f"{name} must be {valid}, got {v}")


def _check_config_only(key, value, kind, source):
    """``kind``: 'path' (a non-empty string) or 'paths' (a non-empty list of them)."""
    values = value if kind == "paths" and isinstance(value, list) else [value]
    if (kind == "paths" and not isinstance(value, list)) or not value or \
            not all(isinstance(v, str) and v for v in values):
        expected = "a non-empty list of paths" if kind == "paths" else "a path (a non-empty string)"
        raise ConfigError(f"{source}: {key} must be {expected}, got {json.dumps(value)}")
    return value


def parse_with_config(parser, argv=None, config_only_keys=()):
    """Parse flags; when --config is given, its keys fill in every flag not on the command
    line. ``config_only_keys`` ({key: 'path' or 'paths'}) are accepted in the JSON only
    (dataset paths and the like). Every option is then checked against its declared range."""
    argv = sys.argv[1:] if argv is None else argv
    known = {a.dest: a for a in parser._actions if a.dest != "help"}
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        flags = [s for a in parser._actions for s in a.option_strings]
        raise ConfigError(f"unknown argument {flag}{_closest(flag.split('=')[0], flags)}")
    for key in config_only_keys:
        setattr(args, key, None)
    if getattr(args, "config", None):
        given = set()
        for token in argv:
            if token.startswith("--"):
                action = parser._option_string_actions.get(token.split("=")[0])
                if action is not None:
                    given.add(action.dest)
        config = load_json(args.config)
        if not isinstance(config, dict):
            raise ConfigError(f"{args.config}: the config must be a JSON object")
        for key, value in config.items():
            if key in config_only_keys:
                setattr(args, key, _check_config_only(key, value, config_only_keys[key], args.config))
            elif key == "config":
                raise ConfigError(f"{args.config}: a config cannot name another config (key 'config'); "
                                  f"copy the keys of {json.dumps(value)} into this file, or pass that file as --config")
            elif key in known:
                if key not in given:
                    setattr(args, key, _check_type(known[key], key, value, args.config))
            else:
                raise ConfigError(f"{args.config}: unknown key {key!r}"
                                  f"{_closest(key, list(known) + list(config_only_keys))}")
    _check_values(parser, args)
    return args


def take_settings(parser, opts, path, keys, what="train config"):
    """Set ``keys`` of ``opts`` from the JSON object at ``path`` (e.g. a training run's
    hps.json), each checked as if it were given in --config."""
    settings = load_json(path, what)
    if not isinstance(settings, dict):
        raise ConfigError(f"{what} {path} must be a JSON object, got {type(settings).__name__}")
    actions = {a.dest: a for a in parser._actions}
    for key in keys:
        if key in settings:
            setattr(opts, key, _check_type(actions[key], key, settings[key], path))
    _check_values(parser, opts)


def add_box_args(parser):
    """The img_db box-selection flags shared by every command that opens an img_db."""
    parser.add_argument("--compressed_db", action="store_true", help="use the compressed img_db sub-directories")
    add_box_selection_args(parser)


def add_box_selection_args(parser, num_bb=36):
    """--conf_th --max_bb --min_bb --num_bb: which boxes of each image an img_db holds."""
    a = parser.add_argument
    a("--conf_th", type=float, default=0.2, valid=Range(0, 1, also=(-1,)),
      help="box confidence threshold (-1: fixed num_bb)")
    a("--max_bb", type=int, default=100, valid=POSITIVE, help="max boxes per image")
    a("--min_bb", type=int, default=10, valid=NON_NEGATIVE, help="min boxes per image")
    a("--num_bb", type=int, default=num_bb, valid=POSITIVE, help="boxes per image when conf_th is -1")


def add_counting_arg(parser):
    """--original_counting, shared by training and inference."""
    parser.add_argument("--original_counting", type=int, choices=[0, 1], default=0,
                        help="0: textbook recall; 1: image-retrieval R@K counted as the original code "
                             "(the paper's numbers)")
