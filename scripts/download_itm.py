#!/usr/bin/env python3
"""Download the retrieval experiments' data and checkpoints (called by download_itm.sh).

Standard library only: it runs before anything is installed. A host that refuses a file
(HTTP 4xx) is given up for that file at once; dropped connections and 5xx answers are
retried with growing waits, resuming the partial file. Every completed file is appended
to ``$STORAGE/MANIFEST.sha256`` as ``sha256  size  path`` (path relative to the storage),
which ``--verify`` checks again."""
import argparse
import hashlib
import json
import os
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from http.client import HTTPException

UNITER_HOSTS = ("https://acvrpublicycchen.blob.core.windows.net/uniter",  # since mid-2021
                "https://convaisharables.blob.core.windows.net/uniter")  # the release's first home
RELEASE_API = "https://api.github.com/repos/lancopku/IAIS/releases/tags/v0.1.0"
VOCAB_URLS = ("https://huggingface.co/google-bert/bert-base-cased/resolve/main/vocab.txt",
              "https://s3.amazonaws.com/models.huggingface.co/bert/bert-base-cased-vocab.txt")
VOCAB_FILE = "pretrained/bert-base-cased-vocab.txt"
VOCAB_LINES = 28996
MANIFEST = "MANIFEST.sha256"
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
CHUNK = 1 << 20
PROGRESS_S = 30

# paths below a UNITER host; the storage mirrors them (archives are extracted in their folder)
UNITER_FILES = {
    "coco": ["img_db/coco_train2014.tar", "img_db/coco_val2014.tar"]
            + [f"txt_db/itm_coco_{split}.db.tar" for split in ("train", "restval", "val", "test")],
    "flickr": ["img_db/flickr30k.tar"] + [f"txt_db/itm_flickr30k_{split}.db.tar" for split in ("train", "val", "test")],
    "pretrained": ["pretrained/uniter-base.pt", "pretrained/uniter-large.pt"],
}
SUBSETS = ("flickr", "coco", "pretrained", "iais")
ENVIRONMENT = f"""environment:
  UNITER_BLOB       base URL(s) of the UNITER release, space-separated, tried in order per file
                    (default: {' '.join(UNITER_HOSTS)})
  BERT_VOCAB_URL    URL(s) of bert-base-cased's vocab.txt (default: {' '.join(VOCAB_URLS)})
  IAIS_RELEASE_API  GitHub API URL of the IAIS release (default: {RELEASE_API})
  RETRIES           tries per host after a dropped connection or a 5xx answer (default: 5)
  RETRY_WAIT        seconds before the first retry, doubled after each (default: 5)
  DOWNLOAD_TIMEOUT  seconds without data before a connection counts as dropped (default: 60)"""


class DownloadError(Exception):
    """A download that cannot succeed as configured; the message is one line for the user."""


class Refused(Exception):
    """The host answered a 4xx status for this file: asking again will not help."""


class Transient(Exception):
    """A dropped connection, a timeout or a 5xx answer: worth another try."""


def env_list(name, default):
    return os.environ.get(name, "").split() or list(default)


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
                wait = self.retry_wait * 2 ** (attempt - 1)
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
        digest, size = sha256_of(path)
        with open(os.path.join(self.storage, MANIFEST), "a") as f:
            f.write(f"{digest}  {size}  {os.path.relpath(path, self.storage)}\n")

    def fetch_archive(self, urls, dest, advice):
        """Download, check and extract an archive into its folder, then delete it. The folder's
        marker lists what was extracted: the archive is fetched again only if some is gone."""
        folder = os.path.dirname(dest)
        marker = os.path.join(folder, ".extracted-" + os.path.basename(dest))
        if extracted_files_present(marker, self.storage):
            print(f"extracted already: {dest}")
            return
        for _ in range(2):
            if not os.path.exists(dest):
                self.fetch(urls, dest, advice, record=False)
            problem = archive_problem(dest)
            if problem is None:
                break
            print(f"download_itm: {dest} is not a valid archive ({problem}); downloading it again",
                  file=sys.stderr, flush=True)
            os.remove(dest)
        else:
            raise DownloadError(f"{dest} is not a valid archive after two downloads ({problem}); {advice}")
        print(f"extract {dest} -> {folder}", flush=True)
        try:
            extracted = extract(dest, folder)
        except (tarfile.TarError, zipfile.BadZipFile, OSError) as e:
            raise DownloadError(f"cannot extract {dest} into {folder}: {e}") from None
        for path in extracted:
            self.record(path)
        with open(marker, "w") as f:
            f.writelines(os.path.relpath(path, self.storage) + "\n" for path in extracted)
        os.remove(dest)


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


def sha256_of(path):
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def archive_problem(path):
    """Why the archive cannot be extracted completely, or None."""
    try:
        if path.endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            return f"{bad} is corrupt" if bad else None
        with tarfile.open(path) as archive:
            last = max(archive.getmembers(), key=lambda m: m.offset_data + m.size, default=None)
        # a tar cut short after a member's header still lists every member it holds
        if last is not None and not path.endswith((".gz", ".tgz")) and last.offset_data + last.size > os.path.getsize(path):
            return f"{last.name} is cut short"
        return None
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
        return str(e) or type(e).__name__


def extract(path, folder):
    """Extract the archive into ``folder``; returns the paths of the regular files written."""
    if path.endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            return [archive.extract(info, folder) for info in archive.infolist() if not info.is_dir()]
    with tarfile.open(path) as archive:
        members = archive.getmembers()
        # the "data" filter refuses absolute paths and links leaving the folder (Python >= 3.8.17)
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        archive.extractall(folder, members=members, **safe)
    return [os.path.join(folder, m.name) for m in members if m.isfile()]


def extracted_files_present(marker, storage):
    if not os.path.exists(marker):
        return False
    with open(marker) as f:
        return all(os.path.exists(os.path.join(storage, line.strip())) for line in f if line.strip())


def vocab_problem(path):
    with open(path, "rb") as f:
        lines = len(f.read().splitlines())
    if lines != VOCAB_LINES:
        return f"served a vocabulary of {lines} lines, bert-base-cased's has {VOCAB_LINES:,}"
    return None


def release_assets(api, timeout):
    """Download URLs of the assets of a GitHub release."""
    try:
        with urllib.request.urlopen(api, timeout=timeout) as response:
            return [asset["browser_download_url"] for asset in json.load(response).get("assets", [])]
    except urllib.error.HTTPError as e:
        reason = f"HTTP {e.code} ({e.reason})"
    except (urllib.error.URLError, HTTPException, OSError) as e:
        reason = str(getattr(e, "reason", e))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        reason = f"not a GitHub release: {e}"
    raise DownloadError(f"could not list the assets of {api}: {reason}; "
                        "try again later or set IAIS_RELEASE_API to the release's API URL")


class Job:
    """One file to fetch: its candidate URLs, where it goes, how it is checked."""

    def __init__(self, urls, dest, advice, check=None):
        self.urls, self.dest, self.advice, self.check = urls, dest, advice, check
        self.archive = dest.endswith(ARCHIVE_SUFFIXES)

    def describe(self):
        fallback = "".join(f" (else {url})" for url in self.urls[1:])
        extracted = f", extracted into {os.path.dirname(self.dest)}" if self.archive else ""
        return f"fetch {self.urls[0]}{fallback} -> {self.dest}{extracted}"

    def run(self, fetcher):
        if self.archive:
            return fetcher.fetch_archive(self.urls, self.dest, self.advice)
        if os.path.exists(self.dest):
            if self.check is None or self.check(self.dest) is None:
                print(f"complete: {self.dest}")
                return
            os.remove(self.dest)  # a wrong file left by an earlier download
        os.makedirs(os.path.dirname(self.dest), exist_ok=True)
        fetcher.fetch(self.urls, self.dest, self.advice, check=self.check)


def uniter_jobs(storage, subsets):
    hosts = [host.rstrip("/") for host in env_list("UNITER_BLOB", UNITER_HOSTS)]
    advice = "set UNITER_BLOB to a base URL that serves the UNITER release"
    jobs = [Job([f"{host}/{path}" for host in hosts], os.path.join(storage, path), advice)
            for subset in subsets for path in UNITER_FILES.get(subset, [])]
    if "pretrained" in subsets:
        jobs.append(Job(env_list("BERT_VOCAB_URL", VOCAB_URLS), os.path.join(storage, VOCAB_FILE),
                        "set BERT_VOCAB_URL to bert-base-cased's vocab.txt", check=vocab_problem))
    return jobs


def asset_jobs(storage, urls):
    advice = "set IAIS_RELEASE_API to a release whose assets can be downloaded"
    return [Job([url], os.path.join(storage, "finetune", os.path.basename(url)), advice) for url in urls]


def dry_run(storage, subsets, timeout):
    for job in uniter_jobs(storage, subsets):
        print(job.describe())
    if "iais" not in subsets:
        return
    api = os.environ.get("IAIS_RELEASE_API", RELEASE_API)
    print(f"list the assets of {api} -> {os.path.join(storage, 'finetune')}")
    try:
        jobs = asset_jobs(storage, release_assets(api, timeout))
    except DownloadError as e:
        print(f"(the assets are not listed: {e})")
        return
    for job in jobs:
        print(job.describe())


def download(storage, subsets, fetcher):
    for folder in ("img_db", "txt_db", "pretrained", "finetune"):
        os.makedirs(os.path.join(storage, folder), exist_ok=True)
    for job in uniter_jobs(storage, subsets):
        job.run(fetcher)
    if "iais" in subsets:
        api = os.environ.get("IAIS_RELEASE_API", RELEASE_API)
        for job in asset_jobs(storage, release_assets(api, fetcher.timeout)):
            job.run(fetcher)
    print(f"done: {storage}")


def verify(storage):
    """Check every file of the manifest (the last line of a path counts); names each mismatch."""
    manifest = os.path.join(storage, MANIFEST)
    if not os.path.exists(manifest):
        raise DownloadError(f"{manifest} does not exist; it is written while files are downloaded")
    expected = {}
    with open(manifest) as f:
        for number, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("  ", 2)
            if len(fields) != 3 or not fields[1].isdigit():
                raise DownloadError(f"{manifest} line {number} is not 'sha256  size  path'")
            expected[fields[2]] = (fields[0], int(fields[1]))
    mismatches = 0
    for path, (digest, size) in expected.items():
        problem = file_problem(os.path.join(storage, path), digest, size)
        if problem:
            print(f"mismatch: {path}: {problem}")
            mismatches += 1
    if mismatches:
        raise DownloadError(f"{mismatches} of {len(expected)} files listed in {manifest} do not match; "
                            "delete them and run download_itm.sh again to fetch them anew")
    print(f"all {len(expected)} files listed in {manifest} match")


def file_problem(path, digest, size):
    if not os.path.exists(path):
        return "missing"
    actual_digest, actual_size = sha256_of(path)
    if actual_size != size:
        return f"{actual_size} bytes, {size} expected"
    if actual_digest != digest:
        return "sha256 differs"
    return None


def env_number(name, default, kind):
    value = os.environ.get(name, "")
    try:
        number = kind(value) if value else default
    except ValueError:
        number = -1
    if number < 0 or (kind is int and number < 1):
        raise DownloadError(f"{name}={value} is not a valid number; unset it or give a positive number")
    return number


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="download_itm.sh", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=ENVIRONMENT,
        description="Download UNITER's features, captions and checkpoints, the bert-base-cased vocabulary "
                    "and the IAIS release's checkpoints into STORAGE (img_db/ txt_db/ pretrained/ finetune/).")
    parser.add_argument("storage", metavar="STORAGE")
    parser.add_argument("--only", action="append", choices=SUBSETS,
                        help="download this subset only (repeatable; default: all). pretrained holds the "
                             "UNITER checkpoints and the vocabulary, iais the IAIS release")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print every URL that would be fetched")
    mode.add_argument("--verify", action="store_true",
                        help=f"check every file listed in STORAGE/{MANIFEST} (sha256 and size)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    subsets = [s for s in SUBSETS if s in (args.only or SUBSETS)]
    storage = os.path.abspath(args.storage)
    try:
        timeout = env_number("DOWNLOAD_TIMEOUT", 60.0, float)
        if args.verify:
            verify(storage)
        elif args.dry_run:
            dry_run(storage, subsets, timeout)
        else:
            fetcher = Fetcher(storage, env_number("RETRIES", 5, int), env_number("RETRY_WAIT", 5.0, float), timeout)
            download(storage, subsets, fetcher)
    except (DownloadError, OSError) as e:  # OSError: the storage cannot be written
        print(f"download_itm.sh: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("download_itm.sh: interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
