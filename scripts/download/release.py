"""What the releases hold: the UNITER release's files on its hosts, the bert-base-cased
vocabulary and the assets of the IAIS release on GitHub, as jobs of one file each."""
import json
import os
import urllib.error
import urllib.request
from http.client import HTTPException

from utils.environment import env_urls

from . import DownloadError
from .archives import ARCHIVE_SUFFIXES, fetch_archive

UNITER_HOSTS = ("https://acvrpublicycchen.blob.core.windows.net/uniter",  # since mid-2021
                "https://convaisharables.blob.core.windows.net/uniter")  # the release's first home
RELEASE_API = "https://api.github.com/repos/lancopku/IAIS/releases/tags/v0.1.0"
VOCAB_URLS = ("https://huggingface.co/google-bert/bert-base-cased/resolve/main/vocab.txt",
              "https://s3.amazonaws.com/models.huggingface.co/bert/bert-base-cased-vocab.txt")
VOCAB_FILE = "pretrained/bert-base-cased-vocab.txt"
VOCAB_LINES = 28996

# paths below a UNITER host; the storage mirrors them (archives are extracted in their folder)
UNITER_FILES = {
    "coco": ["img_db/coco_train2014.tar", "img_db/coco_val2014.tar"]
            + [f"txt_db/itm_coco_{split}.db.tar" for split in ("train", "restval", "val", "test")],
    "flickr": ["img_db/flickr30k.tar"] + [f"txt_db/itm_flickr30k_{split}.db.tar" for split in ("train", "val", "test")],
    "pretrained": ["pretrained/uniter-base.pt", "pretrained/uniter-large.pt"],
}
SUBSETS = ("flickr", "coco", "pretrained", "vocab", "iais")  # pretrained includes the vocabulary


def uniter_hosts():
    return [host.rstrip("/") for host in env_urls("UNITER_BLOB", UNITER_HOSTS)]


def vocab_urls():
    return env_urls("BERT_VOCAB_URL", VOCAB_URLS)


def release_api():
    return env_urls("IAIS_RELEASE_API", [RELEASE_API], single=True)[0]


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
            return fetch_archive(fetcher, self.urls, self.dest, self.advice)
        if os.path.exists(self.dest):
            if self.check is None or self.check(self.dest) is None:
                print(f"complete: {self.dest}")
                return
            os.remove(self.dest)  # a wrong file left by an earlier download
        os.makedirs(os.path.dirname(self.dest), exist_ok=True)
        fetcher.fetch(self.urls, self.dest, self.advice, check=self.check)


def uniter_jobs(storage, subsets):
    hosts = uniter_hosts()
    advice = "set UNITER_BLOB to a base URL that serves the UNITER release"
    jobs = [Job([f"{host}/{path}" for host in hosts], os.path.join(storage, path), advice)
            for subset in subsets for path in UNITER_FILES.get(subset, [])]
    if "pretrained" in subsets or "vocab" in subsets:  # vocab: the one file the DB builders need
        jobs.append(Job(vocab_urls(), os.path.join(storage, VOCAB_FILE),
                        "set BERT_VOCAB_URL to bert-base-cased's vocab.txt", check=vocab_problem))
    return jobs


def asset_jobs(storage, urls):
    advice = "set IAIS_RELEASE_API to a release whose assets can be downloaded"
    return [Job([url], os.path.join(storage, "finetune", os.path.basename(url)), advice) for url in urls]
