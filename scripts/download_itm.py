#!/usr/bin/env python3
"""Download the retrieval experiments' data and checkpoints (called by download_itm.sh).

Standard library only: it runs before anything is installed. A host that refuses a file
(HTTP 4xx) is given up for that file at once; dropped connections and 5xx answers are
retried with growing waits, resuming the partial file. Every completed file is appended
to ``$STORAGE/MANIFEST.sha256`` as ``sha256  size  path`` (path relative to the storage),
which ``--verify`` checks again."""
import sys  # the repository this file is in comes first, whatever the path names (another clone, none)
from os.path import dirname, realpath
sys.path.insert(0, dirname(dirname(realpath(__file__))))
import argparse  # noqa: E402
import os  # noqa: E402

from scripts.download import DownloadError
from scripts.download.manifest import MANIFEST, verify
from scripts.download.release import (RELEASE_API, SUBSETS, UNITER_HOSTS, VOCAB_URLS, asset_jobs, release_api,
                                      release_assets, uniter_hosts, uniter_jobs, vocab_urls)
from scripts.download.transfer import MAX_WAIT_S, Fetcher
from utils.environment import EnvironmentVariableError, env_float, env_int

ENVIRONMENT = f"""environment:
  UNITER_BLOB       base URL(s) of the UNITER release, space-separated, tried in order per file
                    (default: {' '.join(UNITER_HOSTS)})
  BERT_VOCAB_URL    URL(s) of bert-base-cased's vocab.txt (default: {' '.join(VOCAB_URLS)})
  IAIS_RELEASE_API  GitHub API URL of the IAIS release (default: {RELEASE_API})
  RETRIES           tries per host after a dropped connection or a 5xx answer, >= 1 (default: 5)
  RETRY_WAIT        seconds before the first retry, doubled after each (up to {MAX_WAIT_S:g}), in
                    [0, {MAX_WAIT_S:g}] (default: 5)
  DOWNLOAD_TIMEOUT  seconds without data before a connection counts as dropped, in (0, {MAX_WAIT_S:g}]
                    (default: 60)
URLs are http:// or https://; every variable is checked before anything is fetched."""


def dry_run(storage, subsets, timeout):
    for job in uniter_jobs(storage, subsets):
        print(job.describe())
    if "iais" not in subsets:
        return
    api = release_api()
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
        api = release_api()
        for job in asset_jobs(storage, release_assets(api, fetcher.timeout)):
            job.run(fetcher)
    print(f"done: {storage}")


def read_settings():
    """(retries, retry wait, timeout) from the environment, whose URLs are checked too:
    a mistake in any variable is one line before anything is fetched or created."""
    uniter_hosts(), vocab_urls(), release_api()
    retries = env_int("RETRIES", 5, low=1, advice="give the number of tries per host (e.g. 5), or unset it")
    wait = env_float("RETRY_WAIT", 5.0, high=MAX_WAIT_S,
                     advice="give the seconds before the first retry (e.g. 5), or unset it")
    timeout = env_float("DOWNLOAD_TIMEOUT", 60.0, high=MAX_WAIT_S, low_open=True,
                        advice="give the seconds without data before a connection counts as dropped (e.g. 60), "
                               "or unset it")
    return retries, wait, timeout


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="download_itm.sh", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=ENVIRONMENT,
        description="Download UNITER's features, captions and checkpoints, the bert-base-cased vocabulary "
                    "and the IAIS release's checkpoints into STORAGE (img_db/ txt_db/ pretrained/ finetune/).")
    parser.add_argument("storage", metavar="STORAGE")
    parser.add_argument("--only", action="append", choices=SUBSETS,
                        help="download this subset only (repeatable; default: all). pretrained holds the "
                             "UNITER checkpoints (several GB) and the vocabulary, vocab only the bert-base-cased "
                             "vocabulary (pretrained/bert-base-cased-vocab.txt, what scripts/prepro_itm.py "
                             "needs), iais the IAIS release")
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
        retries, wait, timeout = read_settings()
        if args.verify:
            verify(storage)
        elif args.dry_run:
            dry_run(storage, subsets, timeout)
        else:
            download(storage, subsets, Fetcher(storage, retries, wait, timeout))
    except (DownloadError, EnvironmentVariableError, OSError) as e:  # OSError: the storage cannot be written
        print(f"download_itm.sh: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("download_itm.sh: interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
