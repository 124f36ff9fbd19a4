"""The manifest of the files written into the storage, ``$STORAGE/MANIFEST.sha256``, one
``sha256  size  path`` line each (path relative to the storage), and its check."""
import hashlib
import os

from . import DownloadError

MANIFEST = "MANIFEST.sha256"
CHUNK = 1 << 20


def record(storage, path):
    """Append the file's sha256 and size to the manifest."""
    digest, size = sha256_of(path)
    with open(os.path.join(storage, MANIFEST), "a") as f:
        f.write(f"{digest}  {size}  {os.path.relpath(path, storage)}\n")


def sha256_of(path):
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


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
