"""Numbers and URLs read from environment variables, with one-line errors that name the
variable and the values it takes.

A launcher's or a user's variable is read by several layers (torch.distributed, the LMDB
readers, the downloader); ``int()`` deep inside one of them ends in a traceback that names
neither the variable nor the fix, so every reader goes through these. A variable set to
the empty string counts as unset, as shells and launchers often export them so.

Standard library only: the downloader uses it before anything is installed."""
import math
import os
import shlex
from urllib.parse import urlsplit


class EnvironmentVariableError(ValueError):
    """An environment variable holds a value the program cannot use; the message is one
    line naming it."""


def env_value(name, environ=None):
    """The variable's text, or None when it is unset or empty."""
    text = (os.environ if environ is None else environ).get(name)
    return text if text is not None and text.strip() else None


def _shown(text):
    """``text`` as a shell would take it back, on one line (control characters escaped)."""
    return shlex.quote(text) if text.isprintable() else repr(text)


def _bounds(low, high, low_open=False):
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}]"


def env_int(name, default=None, low=0, high=None, advice="unset it", environ=None):
    """The integer in ``name`` (``default`` when unset), which must lie in [low, high]."""
    text = env_value(name, environ)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        raise EnvironmentVariableError(f"environment variable {name}={_shown(text)} must be an integer "
                                       f"{_bounds(low, high)}; {advice}")
    return value


def env_float(name, default, low=0.0, high=None, low_open=False, advice="unset it", environ=None):
    """The finite number in ``name`` (``default`` when unset), in [low, high] (``low_open``:
    above ``low``)."""
    text = env_value(name, environ)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < low or (low_open and value == low) or (high is not None and value > high):
        raise EnvironmentVariableError(f"environment variable {name}={_shown(text)} must be a finite number "
                                       f"{_bounds(low, high, low_open)}; {advice}")
    return value


def env_urls(name, default, schemes=("http", "https"), single=False, environ=None):
    """The space-separated URLs in ``name`` (``default`` when unset), each with one of
    ``schemes`` and a host; ``single``: exactly one."""
    text = env_value(name, environ)
    if text is None:
        return list(default)
    urls = text.split()
    if single and len(urls) > 1:
        raise EnvironmentVariableError(f"environment variable {name} holds {len(urls)} URLs; give one, "
                                       f"or unset it for the default")
    for url in urls:
        try:
            parts = urlsplit(url)
            ok = parts.scheme in schemes and bool(parts.hostname)
        except ValueError:  # e.g. a bracketed host that is not an IPv6 address
            ok = False
        if not ok:
            raise EnvironmentVariableError(
                f"environment variable {name}: {_shown(url)} is not a URL; give "
                f"{'one' if single else 'one or more space-separated'} {' or '.join(schemes)} "
                f"URL{'' if single else 's'} ({schemes[-1]}://HOST/...), or unset it for the default")
    return urls
