"""Archives of the release: checked, extracted once into their folder, then deleted."""
import os
import sys
import tarfile
import zipfile

from utils.outputs import write_text

from . import DownloadError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")


def fetch_archive(fetcher, urls, dest, advice):
    """Download, check and extract an archive into its folder, then delete it. The folder's
    marker lists what was extracted: the archive is fetched again only if some is gone."""
    folder = os.path.dirname(dest)
    marker = os.path.join(folder, ".extracted-" + os.path.basename(dest))
    if extracted_files_present(marker, fetcher.storage):
        print(f"extracted already: {dest}")
        return
    for _ in range(2):
        if not os.path.exists(dest):
            fetcher.fetch(urls, dest, advice, record=False)
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
        fetcher.record(path)
    write_text(marker, "".join(os.path.relpath(path, fetcher.storage) + "\n" for path in extracted))
    os.remove(dest)


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
