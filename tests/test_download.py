"""scripts/download_itm.sh against a local HTTP server holding a small fake release: host
fallback, fail-fast refusals, resumed and retried downloads, the manifest, the vocabulary check
and the IAIS release assets. Nothing here reaches the internet."""
import hashlib
import io
import json
import os
import socket
import subprocess
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT

VOCAB_LINES = 28996


def tar_bytes(files):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(files):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


# what the archives hold, by storage path; the flickr features are large enough to be cut half-way
EXTRACTED = {
    "img_db/flickr30k/data.mdb": os.urandom(300_000),
    "img_db/flickr30k/nbb_th0.2_max100_min10.json": b'{"a.npz": 12}',
    **{f"txt_db/itm_flickr30k_{split}.db/data.mdb": f"captions of {split}".encode() * 100
       for split in ("train", "val", "test")},
    "finetune/flickr_singular/model_step_5000.pt": os.urandom(5000),
}
PLAIN = {"pretrained/uniter-base.pt": os.urandom(70_000), "pretrained/uniter-large.pt": os.urandom(90_000)}
VOCAB = "".join(f"tok{i}\n" for i in range(VOCAB_LINES)).encode()
SHORT_VOCAB = "".join(f"tok{i}\n" for i in range(1000)).encode()
LOG = b"step 5000 loss 0.1\n"


def release_tree():
    """Server path -> bytes of the fake UNITER host, vocabulary and IAIS release."""
    def under(prefix):
        return {path[len(prefix):]: data for path, data in EXTRACTED.items() if path.startswith(prefix)}

    tree = {"/uniter/img_db/flickr30k.tar": tar_bytes(under("img_db/")),
            "/uniter/pretrained/uniter-base.pt": PLAIN["pretrained/uniter-base.pt"],
            "/uniter/pretrained/uniter-large.pt": PLAIN["pretrained/uniter-large.pt"],
            "/vocab/vocab.txt": VOCAB, "/vocab/short.txt": SHORT_VOCAB,
            "/release/download/flickr_singular.zip": zip_bytes(under("finetune/")),
            "/release/download/train_log.txt": LOG}
    for split in ("train", "val", "test"):
        name = f"itm_flickr30k_{split}.db"
        tree[f"/uniter/txt_db/{name}.tar"] = tar_bytes({f"{name}/data.mdb": EXTRACTED[f"txt_db/{name}/data.mdb"]})
    return tree


class ReleaseHandler(BaseHTTPRequestHandler):
    """GET of the fake tree. Below /dead/ everything answers 409 (as the old UNITER host does);
    the paths in ``server.drop_once`` lose their connection half-way the first time, those in
    ``server.fail_once`` answer 503 the first time; ``server.ranges`` says whether Range is honoured."""

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        if self.path.startswith("/dead/"):
            return self.send_error(409, "Public access is not permitted on this storage account")
        if self.path == "/api/release":
            port = server.server_address[1]
            assets = [{"browser_download_url": f"http://127.0.0.1:{port}/release/download/{name}"}
                      for name in ("flickr_singular.zip", "train_log.txt")]
            return self.reply(200, json.dumps({"tag_name": "v0.1.0", "assets": assets}).encode())
        data = server.tree.get(self.path)
        if data is None:
            return self.send_error(404)
        if self.path in server.fail_once:
            server.fail_once.remove(self.path)
            return self.send_error(503, "Server Busy")
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        if start and server.ranges:
            return self.reply(206, data[start:], {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
        if self.path in server.drop_once:
            server.drop_once.remove(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.close_connection = True
            return
        self.reply(200, data)

    def reply(self, status, body, headers=()):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for key, value in dict(headers).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ReleaseHandler)
    httpd.tree, httpd.requests, httpd.ranges = release_tree(), [], True
    httpd.drop_once, httpd.fail_once = set(), set()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def download(server, *args, **env):
    settings = {"UNITER_BLOB": f"{server.url}/dead/uniter {server.url}/uniter",
                "BERT_VOCAB_URL": f"{server.url}/vocab/vocab.txt", "IAIS_RELEASE_API": f"{server.url}/api/release",
                "RETRIES": "3", "RETRY_WAIT": "0.2", "DOWNLOAD_TIMEOUT": "10", **env}
    return subprocess.run(["bash", "scripts/download_itm.sh", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **settings})


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def manifest(storage):
    """path -> (sha256, size) of the manifest's lines."""
    lines = (storage / "MANIFEST.sha256").read_text().splitlines()
    return {path: (digest, int(size)) for digest, size, path in (line.split("  ") for line in lines)}


@pytest.mark.parametrize("ranges", [True, False], ids=["resumed", "range-ignored"])
def test_fallback_retry_and_resume_give_identical_files(tmp_path, server, ranges):
    server.ranges = ranges
    server.drop_once.add("/uniter/img_db/flickr30k.tar")
    server.fail_once.add("/uniter/pretrained/uniter-large.pt")
    st = tmp_path / "st"
    res = download(server, "--only", "flickr", "--only", "pretrained", st)
    assert res.returncode == 0, res.stderr
    expected = {path: data for path, data in EXTRACTED.items() if not path.startswith("finetune/")}
    expected.update(PLAIN)
    expected["pretrained/bert-base-cased-vocab.txt"] = VOCAB
    for path, data in expected.items():
        assert (st / path).read_bytes() == data, path
    assert manifest(st) == {path: (sha256(data), len(data)) for path, data in expected.items()}
    # archives are deleted after extraction, no part file is left, the IAIS release was not asked for
    assert not [p for p in st.rglob("*") if p.suffix in (".tar", ".part") and not p.name.startswith(".extracted-")]
    assert not list((st / "finetune").iterdir())
    assert all(not path.startswith(("/api", "/release")) for path, _ in server.requests)
    # the old host's refusal moved each file to the next host with one request, without retries
    dead = [path for path, _ in server.requests if path.startswith("/dead/")]
    assert len(dead) == len(set(dead)) == 6
    assert "answered HTTP 409" in res.stderr
    tar_requests = [rng for path, rng in server.requests if path == "/uniter/img_db/flickr30k.tar"]
    half = len(server.tree["/uniter/img_db/flickr30k.tar"]) // 2
    assert tar_requests == [None, f"bytes={half}-"]
    assert [path for path, _ in server.requests].count("/uniter/pretrained/uniter-large.pt") == 2
    assert "HTTP 503" in res.stderr

    # a second run fetches nothing and extracts nothing again
    server.requests.clear()
    res = download(server, "--only", "flickr", "--only", "pretrained", st)
    assert res.returncode == 0, res.stderr
    assert server.requests == []
    assert len((st / "MANIFEST.sha256").read_text().splitlines()) == len(expected)


def test_verify_names_each_mismatch(tmp_path, server):
    st = tmp_path / "st"
    assert download(server, "--only", "pretrained", st).returncode == 0
    res = download(server, "--verify", st)
    assert res.returncode == 0 and "all 3 files" in res.stdout, res.stdout + res.stderr
    large = st / "pretrained" / "uniter-large.pt"
    data = bytearray(large.read_bytes())
    data[100] ^= 1
    large.write_bytes(bytes(data))
    (st / "pretrained" / "uniter-base.pt").write_bytes(b"short")
    res = download(server, "--verify", st)
    assert res.returncode == 1
    assert "mismatch: pretrained/uniter-large.pt: sha256 differs" in res.stdout
    assert "mismatch: pretrained/uniter-base.pt: 5 bytes, 70000 expected" in res.stdout
    assert "bert-base-cased-vocab.txt" not in res.stdout
    assert res.stderr.count("\n") == 1 and "2 of 3 files" in res.stderr
    # a deleted file is fetched anew; then everything matches again
    large.unlink()
    (st / "pretrained" / "uniter-base.pt").unlink()
    assert download(server, "--only", "pretrained", st).returncode == 0
    assert download(server, "--verify", st).returncode == 0
    res = download(server, "--verify", tmp_path / "empty")
    assert res.returncode == 1 and "MANIFEST.sha256 does not exist" in res.stderr


def test_a_refusing_host_fails_at_once_in_one_line(tmp_path, server):
    start = time.monotonic()
    res = download(server, "--only", "flickr", tmp_path / "st", UNITER_BLOB=f"{server.url}/dead/uniter",
                   RETRY_WAIT="5")
    assert time.monotonic() - start < 20
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert f"{server.url}/dead/uniter/img_db/flickr30k.tar answered HTTP 409" in res.stderr
    assert "UNITER_BLOB" in res.stderr
    assert len(server.requests) == 1


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_host_is_retried_then_named(tmp_path, server):
    res = download(server, "--only", "pretrained", tmp_path / "st",
                   UNITER_BLOB=f"http://127.0.0.1:{closed_port()}/uniter",
                   RETRIES="2", RETRY_WAIT="0.1")
    assert res.returncode == 1
    last = res.stderr.splitlines()[-1]
    assert "uniter-base.pt" in last and "failed 2 times" in last and "UNITER_BLOB" in last
    assert "try 2/2" in res.stderr and "Traceback" not in res.stderr


def test_only_vocab_fetches_the_vocabulary_alone(tmp_path, server):
    st = tmp_path / "st"
    res = download(server, "--only", "vocab", "--dry-run", st)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("fetch ") == 1 and "bert-base-cased-vocab.txt" in res.stdout
    res = download(server, "--only", "vocab", st)
    assert res.returncode == 0, res.stderr
    assert (st / "pretrained" / "bert-base-cased-vocab.txt").read_bytes() == VOCAB
    assert [path for path, _ in server.requests] == ["/vocab/vocab.txt"]
    assert list(manifest(st)) == ["pretrained/bert-base-cased-vocab.txt"]
    assert not [p for p in st.rglob("*") if p.is_file() and p.name not in ("bert-base-cased-vocab.txt",
                                                                           "MANIFEST.sha256")]


def test_a_short_vocabulary_is_refused(tmp_path, server):
    st = tmp_path / "st"
    res = download(server, "--only", "pretrained", st, BERT_VOCAB_URL=f"{server.url}/vocab/short.txt",
                   UNITER_BLOB=f"{server.url}/uniter")
    assert res.returncode == 1
    assert "short.txt served a vocabulary of 1000 lines, bert-base-cased's has 28,996" in res.stderr
    assert "BERT_VOCAB_URL" in res.stderr and res.stderr.count("\n") == 1
    assert not (st / "pretrained" / "bert-base-cased-vocab.txt").exists()
    assert not (st / "pretrained" / "bert-base-cased-vocab.txt.part").exists()
    # a wrong first answer falls back to the next URL; a wrong file left over is replaced
    (st / "pretrained" / "bert-base-cased-vocab.txt").write_bytes(VOCAB[:100])
    res = download(server, "--only", "pretrained", st,
                   BERT_VOCAB_URL=f"{server.url}/vocab/short.txt {server.url}/vocab/vocab.txt")
    assert res.returncode == 0, res.stderr
    assert (st / "pretrained" / "bert-base-cased-vocab.txt").read_bytes() == VOCAB


def test_iais_release_assets_are_extracted_once(tmp_path, server):
    st = tmp_path / "st"
    res = download(server, "--only", "iais", st)
    assert res.returncode == 0, res.stderr
    checkpoint = "finetune/flickr_singular/model_step_5000.pt"
    assert (st / checkpoint).read_bytes() == EXTRACTED[checkpoint]
    assert (st / "finetune" / "train_log.txt").read_bytes() == LOG
    assert not (st / "finetune" / "flickr_singular.zip").exists()
    assert manifest(st) == {checkpoint: (sha256(EXTRACTED[checkpoint]), 5000),
                            "finetune/train_log.txt": (sha256(LOG), len(LOG))}
    server.requests.clear()
    assert download(server, "--only", "iais", st).returncode == 0
    assert [path for path, _ in server.requests] == ["/api/release"]


def test_a_corrupt_archive_is_fetched_again_then_refused(tmp_path, server):
    path = "/uniter/txt_db/itm_flickr30k_val.db.tar"
    server.tree[path] = server.tree[path][:700]  # a header and part of the member's data
    res = download(server, "--only", "flickr", tmp_path / "st")
    assert res.returncode == 1
    assert "itm_flickr30k_val.db.tar is not a valid archive after two downloads" in res.stderr.splitlines()[-1]
    assert [p for p, _ in server.requests].count(path) == 2
    assert not (tmp_path / "st" / "txt_db" / "itm_flickr30k_val.db").exists()


def test_dry_run_lists_every_url_and_writes_nothing(tmp_path, server):
    st = tmp_path / "st"
    res = download(server, "--dry-run", st)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert sum(line.startswith("fetch ") for line in lines) == 10 + 3 + 2
    assert f"fetch {server.url}/dead/uniter/img_db/coco_val2014.tar (else {server.url}/uniter/img_db/coco_val2014.tar)" \
           f" -> {st}/img_db/coco_val2014.tar, extracted into {st}/img_db" in lines
    assert f"fetch {server.url}/release/download/train_log.txt -> {st}/finetune/train_log.txt" in lines
    assert not st.exists()
    assert all(path == "/api/release" for path, _ in server.requests)
    # the release API not answering is said, and the rest is listed
    res = download(server, "--dry-run", "--only", "iais", "--only", "coco", st,
                   IAIS_RELEASE_API=f"{server.url}/dead/api")
    assert res.returncode == 0
    assert "the assets are not listed" in res.stdout and "HTTP 409" in res.stdout
    assert sum(line.startswith("fetch ") for line in res.stdout.splitlines()) == 6


def test_bad_settings_are_one_line(tmp_path, server):
    res = download(server, "--only", "pretrained", tmp_path / "st", RETRIES="many")
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "RETRIES=many" in res.stderr
    res = download(server, "--only", "imagenet", tmp_path / "st")
    assert res.returncode == 2 and "--only" in res.stderr
