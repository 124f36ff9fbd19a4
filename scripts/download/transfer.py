"""Resumable HTTP downloads. A host that refuses a file (HTTP 4xx) is given up for that
file at once; dropped connections and 5xx answers are retried with growing waits, resuming
the partial file."""
import os
import sys
import time
import urllib.error
import urllib.request
from http.client import HTTPException

from . import DownloadError, manifest

CHUNK = 1 << 20
PROGRESS_S = 30
MAX_WAIT_S = 3600.0  # longest wait between tries (the doubling stops there) and longest timeout


class Refused(Exception):
    """The host answered a 4xx status for this file: asking again will not help."""


class Transient(Exception):
    """A dropped connection, a timeout or a 5xx answer: worth another try."""


class Fetcher:
    """Resumable downloads into a storage folder, each completed file logged to the manifest."""

    def __init__(self, storage, retries, retry_wait, timeout):
        self.storage, self.retries, self.retry_wait, self.timeout = storage, retries, retry_wait, timeout

    def fetch(self, urls, dest, advice, check=None, record=True):
        """Download ``dest`` from the first of ``urls`` that serves it and whose file passes
        ``check`` (a function of the path returning a problem or None); ``advice`` ends the
        error when none does."""
        part, failures = dest + ".part", []
        for i, url in enumerate(urls):
            print(f"fetch {url} -> {dest}", flush=True)
            try:
                self._with_retries(url, part)
                problem = check(part) if check else None
                if problem:  # a wrong file is never resumed from
                    os.remove(part)
            except (Refused, Transient) as e:
                problem = str(e)
            if problem is None:
                os.replace(part, dest)
                if record:
                    self.record(dest)
                return
            failures.append(f"{url} {problem}")
            if i + 1 < len(urls):
                print(f"download_itm: {url} {problem}; trying {urls[i + 1]}", file=sys.stderr, flush=True)
        raise DownloadError(f"could not download {os.path.basename(dest)}: {'; '.join(failures)}; {advice}")

    def _with_retries(self, url, part):
        for attempt in range(1, self.retries + 1):
            try:
                return self._fetch_once(url, part)
            except Transient as e:
                if attempt == self.retries:
                    raise Transient(f"failed {self.retries} times, last: {e}") from None
                wait = min(self.retry_wait * 2.0 ** min(attempt - 1, 32), MAX_WAIT_S)
                print(f"download_itm: {url}: {e}; try {attempt + 1}/{self.retries} in {wait:g} s",
                      file=sys.stderr, flush=True)
                time.sleep(wait)

    def _fetch_once(self, url, part):
        """One request, appended to ``part`` when the server honours the range asked for."""
        offset = os.path.getsize(part) if os.path.exists(part) else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                resumed = response.status == 206
                if resumed and content_range_start(response) != offset:
                    os.remove(part)
                    raise Transient(f"answered another range than bytes {offset}-")
                expected = response.headers.get("Content-Length")
                total = int(expected) + (offset if resumed else 0) if expected else None
                written = copy_stream(response, part, append=resumed, total=total)
        except urllib.error.HTTPError as e:
            if e.code == 416:  # the part is not a prefix of what the server holds: start over
                os.remove(part)
                raise Transient("answered HTTP 416 to a resumed request") from None
            if 400 <= e.code < 500 and e.code not in (408, 429):
                raise Refused(f"answered HTTP {e.code} ({e.reason})") from None
            raise Transient(f"answered HTTP {e.code} ({e.reason})") from None
        except (urllib.error.URLError, HTTPException, OSError) as e:
            raise Transient(str(getattr(e, "reason", e)) or type(e).__name__) from None
        if expected is not None and written != int(expected):
            raise Transient(f"connection closed after {written} of {expected} bytes")

    def record(self, path):
        """Append the file's sha256 and size to the manifest."""
        manifest.record(self.storage, path)


def content_range_start(response):
    """First byte of a 206 answer (``Content-Range: bytes START-END/TOTAL``), or None."""
    value = response.headers.get("Content-Range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def copy_stream(response, path, append, total=None):
    """Bytes of the answer written to ``path``; a read error is the connection's, a write error
    ours. How far the file is comes every PROGRESS_S seconds."""
    written, shown = 0, time.monotonic()
    try:
        f = open(path, "ab" if append else "wb")
    except OSError as e:
        raise DownloadError(f"cannot write {path}: {e.strerror}") from None
    with f:
        while True:
            chunk = response.read(CHUNK)
            if not chunk:
                return written
            try:
                f.write(chunk)
            except OSError as e:
                raise DownloadError(f"cannot write {path}: {e.strerror}; the part written so far is kept") from None
            written += len(chunk)
            if time.monotonic() - shown > PROGRESS_S:
                shown = time.monotonic()
                size = f" of {total / 1e9:.2f}" if total else ""
                print(f"  {os.path.basename(path)}: {f.tell() / 1e9:.2f}{size} GB", flush=True)
