"""Property-based fuzzing of the on-disk formats a user brings (Karpathy caption JSON,
txt_db JSON files and LMDB values, img_db count files and values, .npz feature files,
score files, groups files, ISDa annotations): broken variants of each
(truncated files, wrong JSON types and shapes, missing and extra keys, out-of-range and
non-finite values, duplicated and dangling ids, empty and huge values) go through the
real entry points, in this process. Each run must end either with exit status 2 and one
error line naming the file at fault (no traceback), or with a result that an independent
computation here confirms; never a hang, a signal, a traceback, a silent wrong number, or
a changed input file.

Derandomised and bounded within the test suite (HYPOTHESIS_PROFILE unset: a few dozen
examples per format, about a minute); ``make fuzz`` selects the "fuzz" profile: FUZZ_EXAMPLES
examples per format (default 1000), seeded by --hypothesis-seed (FUZZ_SEED). Every failure found became an
@example below or a case of tests/test_format_contracts.py."""
import copy
import hashlib
import io
import json
import math
import os
import shutil
import signal
import tempfile
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from conftest import IMG_DB, TXT_DB
from test_format_contracts import VOCAB, call, error_line, inf_argv, score_file, vocab_file, write

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
# not named "default": registering that one changes Hypothesis's own defaults, and "fuzz"
# would inherit derandomize (every --hypothesis-seed then draws the same examples)
settings.register_profile("suite", derandomize=True, **_COMMON)
settings.register_profile("fuzz", max_examples=int(os.environ.get("FUZZ_EXAMPLES", 1000)), derandomize=False,
                          **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "suite")
settings.load_profile(PROFILE)
PER_RUN_LIMIT_S = 120  # a hang is a failure, not a stuck suite


def examples(n):
    """The example count of a test: ``n`` within the suite (sized to its runs' cost), the
    profile's in `make fuzz`."""
    return settings(max_examples=settings.default.max_examples if PROFILE == "fuzz" else n)


@contextmanager
def time_limit(seconds=PER_RUN_LIMIT_S):
    def expired(*_):
        raise TimeoutError(f"an entry point ran past {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def scratch():
    """A temporary folder; the LMDB environments opened under it are closed at its end (the
    readers keep one per DB for the process's life: thousands of examples would pile up)."""
    from data import lmdb_io
    with tempfile.TemporaryDirectory() as tmp:
        try:
            yield tmp
        finally:
            root = os.path.realpath(tmp)
            with lmdb_io._ENVS_LOCK:
                for key in [k for k in lmdb_io._ENVS if k.startswith(root + os.sep)]:
                    lmdb_io._ENVS.pop(key).close()


def digest(paths):
    """sha256 of every file under ``paths``: the inputs a run must leave as they were."""
    out = {}
    for top in paths:
        for root, _, files in os.walk(top) if os.path.isdir(top) else [(os.path.dirname(top), [], [top])]:
            for name in files:
                path = os.path.join(root, name)
                if name == "lock.mdb":  # LMDB's reader table, rewritten by every read-only open
                    continue
                with open(path, "rb") as f:
                    out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


def refused_or_ok(code, err, *names):
    """A run ended in one error line naming one of ``names`` (True), or succeeded (False)."""
    assert "Traceback" not in err, err[-3000:]
    if code == 0:
        event("accepted, result checked")
        return False
    line = error_line(code, err)
    assert any(name in line for name in names), (line, names)
    event("refused in one line")
    return True


# ----------------------------------------------------------------------------- mutating JSON

JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.sampled_from([0, -1, 1, 2 ** 63]),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                        st.sampled_from(["", "[CLS]", "0", "test", "x" * 300]))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=5)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _get(obj, path):
    for key in path:
        obj = obj[key]
    return obj


@st.composite
def mutated_json(draw, base, near=()):
    """``base`` changed one to three times at random places: a value replaced (by any JSON
    value, or a sibling's: a duplicated or dangling id), deleted, duplicated, or a key
    added. ``near``: values worth trying in place of others (ids of the same file)."""
    obj = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(obj))))
        op = draw(st.sampled_from(["replace", "replace", "delete", "duplicate", "add_key", "near"]))
        if not path:
            if op in ("replace", "delete"):
                obj = draw(JSON_VALUES)
            continue
        parent, key = _get(obj, path[:-1]), path[-1]
        if op == "replace":
            parent[key] = draw(JSON_VALUES)
        elif op == "near" and near:
            parent[key] = copy.deepcopy(draw(st.sampled_from(list(near))))  # a shared list could hold itself
        elif op == "delete":
            del parent[key]
        elif op == "duplicate" and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        elif op == "duplicate" and isinstance(parent, dict):
            parent[draw(st.sampled_from(list(parent)))] = copy.deepcopy(parent[key])
        elif op == "add_key" and isinstance(parent, dict):
            parent[draw(st.text(max_size=6))] = draw(JSON_VALUES)
    return obj


@st.composite
def file_bytes(draw, obj):
    """The JSON text of ``obj``, or that text broken: cut short, with bytes that are not
    UTF-8, a number too long to read, nesting too deep, or nothing at all."""
    text = json.dumps(obj).encode()
    how = draw(st.sampled_from(["as is"] * 6 + ["truncated", "latin-1", "huge number", "deep", "empty"]))
    if how == "truncated":
        return text[:draw(st.integers(0, max(0, len(text) - 1)))]
    if how == "latin-1":
        at = draw(st.integers(0, len(text)))
        return text[:at] + b"\xe9\xff" + text[at:]
    if how == "huge number":
        return b"[" + b"9" * 5000 + b"]"
    if how == "deep":
        return b"[" * 100000 + b"]" * 100000
    if how == "empty":
        return b""
    return text


# ----------------------------------------------------------------------------- independent recall

def reference_recalls(scores, txt_ids, img_ids, txt2img):
    """Textbook R@1/5/10 both ways and median ranks, by plain loops: ties count against the
    query; images without a text are candidates for the text queries but no query."""
    s = scores.float().numpy().astype(np.float64)
    col = {img: j for j, img in enumerate(img_ids)}
    gt = [col[txt2img[t]] for t in txt_ids]
    txt_ranks = [1 + sum(1 for j in range(len(img_ids)) if j != g and s[i, j] >= s[i, g]) for i, g in enumerate(gt)]
    img_ranks = []
    for j in range(len(img_ids)):
        own = [i for i, g in enumerate(gt) if g == j]
        if not own:
            continue
        best = max(s[i, j] for i in own)
        img_ranks.append(1 + sum(1 for i, g in enumerate(gt) if g != j and s[i, j] >= best))
    out = {}
    for k in (1, 5, 10):
        out[f"img_r{k}"] = sum(r <= k for r in txt_ranks) / len(txt_ranks)
        out[f"txt_r{k}"] = sum(r <= k for r in img_ranks) / len(img_ranks)
    out["img_medr"] = sorted(txt_ranks)[(len(txt_ranks) - 1) // 2]
    out["txt_medr"] = sorted(img_ranks)[(len(img_ranks) - 1) // 2]
    out["unmatched_images"] = sorted(img for j, img in enumerate(img_ids) if j not in set(gt))
    return out


def assert_recalls(result, scores, txt_ids, img_ids, txt2img, keys=("img_r1", "img_r5", "img_r10", "txt_r1",
                                                                    "txt_r5", "txt_r10")):
    ref = reference_recalls(scores, txt_ids, img_ids, txt2img)
    for key in keys:
        assert result[key] == pytest.approx(ref[key], abs=1e-12), (key, result[key], ref[key])
    return ref


# ----------------------------------------------------------------------------- Karpathy JSON -> prepro_itm.py

WORDS = [w for w in VOCAB[104:] if not w.startswith("##")]
BASE_KARPATHY = {"dataset": "flickr30k", "images": [
    {"filename": "1000092795.jpg", "imgid": 0, "split": "train",
     "sentences": [{"raw": "A dog runs on the grass.", "tokens": ["a", "dog"], "sentid": 0},
                   {"raw": "Two men play.", "sentid": 1}]},
    {"filename": "42.jpg", "imgid": 1, "split": "test", "sentences": [{"tokens": ["a", "cat"], "sentid": 2}]},
    {"filename": "7.jpg", "imgid": 2, "split": "val", "sentences": [{"raw": "the cat", "sentid": 3}]}]}


def expected_txt_dbs(ann):
    """{split: {text id: (caption text, img_fname)}} that a Karpathy JSON keeping the
    contract gives, by the format's definition (default Flickr30k names)."""
    import re
    out, seen_ids, seen_fnames = {"train": {}, "val": {}, "test": {}}, set(), set()
    for img in ann["images"]:
        stem = os.path.splitext(img["filename"])[0]
        digits = re.findall(r"\d+", stem)
        fname = f"flickr30k_{int(digits[-1]):012d}.npz"
        assert fname not in seen_fnames, f"two images written as {fname}: their captions merged"
        seen_fnames.add(fname)
        for sent in img["sentences"]:
            raw = sent.get("raw")
            text = raw if isinstance(raw, str) and raw.strip() else " ".join(sent.get("tokens") or [])
            assert text.strip() and "[CLS]" not in text and "[SEP]" not in text, f"caption {text!r} written"
            assert type(sent["sentid"]) in (int, str), sent
            txt_id = str(sent["sentid"])
            assert txt_id not in seen_ids, f"text id {txt_id} written twice: one caption overwrote another"
            seen_ids.add(txt_id)
            out[img["split"]][txt_id] = (text, fname)
    return out


@examples(150)
@given(data=st.data())
@example(data=None)  # sentids restarting for each image, the case first reported
def test_fuzz_karpathy_json(data):
    from pytorch_pretrained_bert import BertTokenizer
    from data import TxtTokLmdb
    if data is None:
        ann = copy.deepcopy(BASE_KARPATHY)
        for img in ann["images"]:
            for k, sent in enumerate(img["sentences"]):
                sent["sentid"] = k
        content = json.dumps(ann).encode()
    else:
        ann = data.draw(mutated_json(BASE_KARPATHY, near=["dev", "val", 0, 1, "1", WORDS[0], [WORDS[1]], None]))
        content = data.draw(file_bytes(ann))
    with scratch() as tmp:
        ann_path = write(os.path.join(tmp, "ann.json"), content)
        vocab = vocab_file(tmp_path_of(tmp))
        before = digest([ann_path, vocab])
        with time_limit():
            code, out, err = call("scripts.prepro_itm", ["--annotation", ann_path, "--vocab", vocab, "--output",
                                                         os.path.join(tmp, "txt"), "--allow_unk"])
        assert digest([ann_path, vocab]) == before
        if refused_or_ok(code, err, ann_path, vocab):
            assert not os.path.exists(os.path.join(tmp, "txt"))
            return
        assert data is not None, "sentids restarting for each image were taken"
        expected = expected_txt_dbs(json.loads(content))
        tok = BertTokenizer(vocab, do_lower_case=False)
        for split, captions in expected.items():
            db = TxtTokLmdb(os.path.join(tmp, "txt", f"itm_flickr30k_{split}.db"), -1)
            assert set(db.id2len) == set(captions), split
            for txt_id, (text, fname) in captions.items():
                assert db[txt_id]["input_ids"] == tok.convert_tokens_to_ids(tok.tokenize(text))
                assert db.txt2img[txt_id] == fname and txt_id in db.img2txts[fname]


class tmp_path_of(str):
    """A folder path with ``/`` like pathlib's, for the builders of test_format_contracts."""

    def __truediv__(self, name):
        return os.path.join(self, name)


# ----------------------------------------------------------------------------- txt_db JSON files -> inf_itm.py

_BASELINE = {}


def baseline_scores():
    """{(text id, image id): score} of the fixture split, scored once."""
    if not _BASELINE:
        with scratch() as tmp:
            code, _, err = call("inf_itm", inf_argv(tmp_path_of(tmp)))
            assert code == 0, err
            saved = torch.load(os.path.join(tmp, "out", "score_matrix.pt"), weights_only=True)
        for i, t in enumerate(saved["txt_ids"]):
            for j, m in enumerate(saved["img_ids"]):
                _BASELINE[(t, m)] = float(saved["scores"][i, j])
    return _BASELINE


def check_evaluation(out_dir, baseline=None):
    """scores.json against the saved matrix, and the matrix against the baseline's scores."""
    saved = torch.load(os.path.join(out_dir, "score_matrix.pt"), weights_only=True)
    result = json.loads(open(os.path.join(out_dir, "scores.json")).read())
    assert torch.isfinite(saved["scores"]).all()
    ref = assert_recalls(result, saved["scores"], saved["txt_ids"], saved["img_ids"], saved["txt2img"])
    assert (result["n_texts"], result["n_images"]) == (len(saved["txt_ids"]), len(saved["img_ids"]))
    assert sorted(result["unmatched_images"]) == ref["unmatched_images"]
    if baseline is not None:
        for i, t in enumerate(saved["txt_ids"]):
            for j, m in enumerate(saved["img_ids"]):
                assert float(saved["scores"][i, j]) == pytest.approx(baseline[(t, m)], abs=1e-5), (t, m)
    return saved


def _fixture_json(name):
    with open(os.path.join(TXT_DB, f"{name}.json")) as f:
        return json.load(f)


def _caption_of(txt_id):
    from data import TxtTokLmdb
    return TxtTokLmdb(TXT_DB, -1)[txt_id]


def _put_caption(db, txt_id, value):
    """Write one LMDB value of a txt_db copy as it is, the JSON files left alone."""
    import lmdb
    from data.txt_db import encode_txt
    env = lmdb.open(db, map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(txt_id.encode(), value if isinstance(value, bytes) else encode_txt(value))
    env.close()


@examples(100)
@given(data=st.data(), name=st.sampled_from(["id2len", "txt2img", "img2txts", "meta", "LMDB value"]))
@example(data=None, name="meta")  # a caption holding [SEP]
@example(data="bool", name="LMDB value")  # found by the fuzzer: a boolean among the input_ids
@example(data="extra image", name="img2txts")  # found by the fuzzer: an image the img_db lacks, no caption
def test_fuzz_txt_db(data, name):
    base = _fixture_json(name if name != "LMDB value" else "id2len")
    ids = list(_fixture_json("id2len"))[:4] + list(_fixture_json("img2txts"))[:2] + [101, 102, 0, 999, 1000, -1]
    with scratch() as tmp:
        db = os.path.join(tmp, "t.db")
        same_scores = name != "meta"
        if data == "bool":
            shutil.copytree(TXT_DB, db)
            changed = {**_caption_of("test_flickr30k_000000000000_0")}
            changed["input_ids"] = [True] + changed["input_ids"][1:]
            _put_caption(db, "test_flickr30k_000000000000_0", changed)
            data = None
        elif data == "extra image":
            shutil.copytree(TXT_DB, db)
            write(os.path.join(db, "img2txts.json"), json.dumps({**base, "": []}))
            data = None
        elif data is None:
            from test_format_contracts import txt_db_copy

            def wrap(examples):
                first = next(iter(examples))
                examples[first]["input_ids"] = examples[first]["input_ids"] + [102]
            txt_db_copy(db, wrap)
        else:
            shutil.copytree(TXT_DB, db)
            if name == "id2len" and data.draw(st.booleans()):  # part of the split, a consistent subset
                keep = data.draw(st.sets(st.sampled_from(sorted(base)), max_size=len(base)))
                write(os.path.join(db, "id2len.json"), json.dumps({t: n for t, n in base.items() if t in keep}))
            elif name == "LMDB value":  # one caption's value: its tokens, types, keys, or bytes that decode to nothing
                txt_id = data.draw(st.sampled_from(sorted(base)))
                value = _caption_of(txt_id)
                changed = data.draw(mutated_json(value, [101, 102, 999, 1000, -1, True, "a", [], [5] * 70]))
                if data.draw(st.integers(0, 5)) == 0:
                    changed = data.draw(st.binary(max_size=20))
                _put_caption(db, txt_id, changed)
                same_scores = isinstance(changed, dict) and changed.get("input_ids") == value["input_ids"]
            else:
                write(os.path.join(db, f"{name}.json"), data.draw(file_bytes(data.draw(mutated_json(base, ids)))))
        before = digest([db])
        with time_limit():
            code, _, err = call("inf_itm", inf_argv(tmp_path_of(tmp), db))
        assert digest([db]) == before
        if refused_or_ok(code, err, db):
            assert not os.path.exists(os.path.join(tmp, "out", "scores.json"))
            return
        assert data is not None, "an explicit example of a broken txt_db was scored"
        if name == "LMDB value":  # what the format allows of input_ids, by its definition
            ids = changed["input_ids"]
            assert isinstance(ids, list) and all(type(i) is int and 0 <= i < 1000 and i not in (101, 102)
                                                 for i in ids), ids
        saved = check_evaluation(os.path.join(tmp, "out"), baseline_scores() if same_scores else None)
        on_disk = json.loads(open(os.path.join(db, "id2len.json")).read())
        assert sorted(saved["txt_ids"]) == sorted(on_disk)


# ----------------------------------------------------------------------------- img_db count file and values -> inf_itm.py

IMG_SUB = "feat_th0.2_max100_min10"
NBB_FILE = "nbb_th0.2_max100_min10.json"
ARRAY_KEYS = ("features", "norm_bb", "conf", "soft_labels")


@st.composite
def mutated_arrays(draw, arrays):
    """One image's arrays with one to three changes: rows or columns cut, a dtype of
    another kind, a special value somewhere, boxes scaled to pixels, an array missing or
    an extra one."""
    arrays = {k: np.array(a) for k, a in arrays.items()}
    with warnings.catch_warnings():  # the casts below are meant: complex to real, overflow to inf
        warnings.simplefilter("ignore")
        return _mutate_arrays(draw, arrays)


def _mutate_arrays(draw, arrays):
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(arrays) or ["features"]))
        if key not in arrays:
            arrays[key] = np.zeros((3, 6), np.float16)
        a = arrays[key]
        op = draw(st.sampled_from(["rows", "columns", "dtype", "value", "pixels", "delete", "extra", "reshape"]))
        if op == "rows" and a.ndim:
            arrays[key] = a[:draw(st.integers(0, max(0, len(a) - 1)))]
        elif op == "columns" and a.ndim == 2:
            arrays[key] = a[:, :draw(st.integers(0, max(0, a.shape[1] - 1)))]
        elif op == "dtype":
            arrays[key] = a.astype(draw(st.sampled_from(["<f4", "<f8", "<i4", "<c8", "|b1", "<u2"])))
        elif op == "value" and a.size:
            flat = a.astype(np.float32).reshape(-1)
            flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from(
                [np.nan, np.inf, -np.inf, 65504.0, -1.0, 500.0, 1.05, 1e-8, 0.0]))
            arrays[key] = flat.reshape(a.shape).astype(a.dtype if a.dtype.kind == "f" else np.float32)
        elif op == "pixels":
            arrays[key] = (a.astype(np.float32) * draw(st.sampled_from([2.0, 500.0]))).astype(np.float16)
        elif op == "delete":
            del arrays[key]
        elif op == "extra":
            arrays[draw(st.sampled_from(["extra", "nbb", "boxes"]))] = np.ones(draw(st.integers(0, 3)), np.float16)
        elif op == "reshape" and a.size:
            arrays[key] = a.reshape(-1)
    return arrays


def _put_value(img_dir, name, raw):
    import lmdb
    env = lmdb.open(os.path.join(img_dir, IMG_SUB), map_size=1 << 28)
    with env.begin(write=True) as txn:
        txn.put(name.encode(), raw)
    env.close()


@examples(60)
@given(data=st.data(), what=st.sampled_from(["count file", "values", "value bytes"]))
def test_fuzz_img_db(data, what):
    from data import DetectFeatLmdb
    from data.feature_codec import encode_img_dump
    with open(os.path.join(IMG_DB, NBB_FILE)) as f:
        counts = json.load(f)
    names = sorted(counts)
    with scratch() as tmp:
        img = os.path.join(tmp, "img")
        shutil.copytree(IMG_DB, img)
        if what == "count file":
            write(os.path.join(img, NBB_FILE), data.draw(file_bytes(data.draw(
                mutated_json(counts, names[:3] + [0, -1, 1, 10, 36, 10 ** 9])))))
        else:
            name = data.draw(st.sampled_from(names))
            src = DetectFeatLmdb(IMG_DB, 0.2, 100, 10, 36, False)
            arrays = src.read_arrays(name, ARRAY_KEYS, cut=False)
            if what == "values":
                raw = encode_img_dump(data.draw(mutated_arrays(arrays)), False)
            else:
                good = encode_img_dump({k: np.array(a) for k, a in arrays.items()}, False)
                raw = data.draw(st.sampled_from([
                    good[:data.draw(st.integers(0, len(good) - 1))], b"", b"\x00" * 16,
                    encode_img_dump({k: np.array(a) for k, a in arrays.items()}, True),
                    data.draw(st.binary(max_size=64))]))
            _put_value(img, name, raw)
        before = digest([img])
        with time_limit():
            code, _, err = call("inf_itm", inf_argv(tmp_path_of(tmp), TXT_DB, img))
        assert digest([img]) == before
        if refused_or_ok(code, err, img):
            assert not os.path.exists(os.path.join(tmp, "out", "scores.json"))
            return
        check_evaluation(os.path.join(tmp, "out"))


# ----------------------------------------------------------------------------- .npz features -> convert_imgdir.py

@st.composite
def npz_content(draw):
    """(bytes of a file, the arrays it holds or None): a feature file in most of the ways
    it can be made or broken."""
    n = draw(st.integers(0, 14))
    rng = np.random.default_rng(draw(st.integers(0, 3)))
    arrays = {"features": rng.random((n, 2048), dtype=np.float32), "norm_bb": rng.random((n, 6), dtype=np.float32),
              "conf": np.sort(rng.random(n, dtype=np.float32))[::-1].copy(),
              "soft_labels": rng.random((n, 5), dtype=np.float32), "nbb": np.array(n)}
    arrays = draw(mutated_arrays(arrays)) if draw(st.booleans()) else arrays
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    raw = buf.getvalue()
    how = draw(st.sampled_from(["as is"] * 5 + ["truncated", "garbage", "pickled"]))
    if how == "truncated":
        return raw[:draw(st.integers(0, len(raw) - 1))], None
    if how == "garbage":
        return draw(st.binary(max_size=100)), None
    if how == "pickled":
        buf = io.BytesIO()
        np.savez(buf, features=np.array([{"a": 1}], dtype=object))
        return buf.getvalue(), None
    return raw, arrays


def reference_npz(arrays, conf_th=0.2, max_bb=100, min_bb=1):
    """The arrays convert_imgdir.py stores for a file (None: it must be skipped), by the
    .npz contract of README's "Building DBs from raw data"."""
    if arrays is None or "features" not in arrays or "norm_bb" not in arrays or "conf" not in arrays:
        return None
    if any(arrays[k].dtype.kind != "f" for k in ("features", "norm_bb", "conf", "soft_labels") if k in arrays):
        return None
    conf = arrays["conf"]
    nbb = min(max_bb, max(min_bb, int((conf > conf_th).sum()))) if conf.ndim == 1 else None
    if nbb is None:
        return None
    kept = {k: arrays[k][:nbb].astype(np.float16) for k in ("features", "norm_bb", "conf", "soft_labels")
            if k in arrays}
    feat, bb = kept["features"], kept["norm_bb"]
    if feat.ndim != 2 or feat.shape[1] != 2048 or bb.ndim != 2 or bb.shape[1] != 6:
        return None
    if any(a.ndim == 0 or len(a) != nbb for a in kept.values()):
        return None
    if not all(np.isfinite(kept[k]).all() for k in ("features", "norm_bb", "conf")):
        return None
    if bb.size and not (-0.1 <= bb.min() and bb.max() <= 1.1):
        return None
    return kept


@examples(100)
@given(files=st.lists(npz_content(), min_size=1, max_size=3))
def test_fuzz_npz_features(files):
    from data import DetectFeatLmdb
    with scratch() as tmp:
        src = os.path.join(tmp, "feats")
        os.mkdir(src)
        expected = {}
        for k, (raw, arrays) in enumerate(files):
            write(os.path.join(src, f"img_{k}.npz"), raw)
            expected[f"img_{k}.npz"] = reference_npz(arrays)
        before = digest([src])
        with time_limit():
            code, out, err = call("scripts.convert_imgdir", ["--img_dir", src, "--output", os.path.join(tmp, "out"),
                                                             "--nproc", "1", "--min_bb", "1"])
        assert digest([src]) == before
        usable = {name for name, arrays in expected.items() if arrays is not None}
        if refused_or_ok(code, err, src):
            assert not usable, (err, usable)
            return
        assert usable, out
        db = DetectFeatLmdb(os.path.join(tmp, "out", "feats"), 0.2, 100, 1, 36, False)
        assert set(db.name2nbb) == usable
        for name in usable:
            stored = db.read_arrays(name, ("features", "norm_bb"))
            for key in ("features", "norm_bb"):
                assert np.array_equal(stored[key], expected[name][key], equal_nan=False), (name, key)
        for name in set(expected) - usable:
            assert f"  {name}: " in out


# ----------------------------------------------------------------------------- score files -> retrieval_metrics.py

@st.composite
def score_contents(draw):
    """A score file's dict: a small valid one, then broken at random places."""
    n_img = draw(st.integers(0, 5))
    n_txt = draw(st.integers(0, 7))
    img_ids = [f"i{j}" for j in range(n_img)]
    txt_ids = [f"t{i}" for i in range(n_txt)]
    txt2img = {t: draw(st.sampled_from(img_ids)) for t in txt_ids} if img_ids else {}
    values = st.sampled_from([0.0, 0.5, 1.0, -2.0]) | st.floats(-10, 10, width=32)
    scores = torch.tensor([[draw(values) for _ in range(n_img)] for _ in range(n_txt)],
                          dtype=torch.float32).reshape(n_txt, n_img)
    content = {"scores": scores, "txt_ids": txt_ids, "img_ids": img_ids, "txt2img": txt2img}
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.sampled_from(["dtype", "nonfinite", "shape", "id type", "duplicate id", "dangling", "delete",
                                   "extra", "not a dict"]))
        if any(k not in content for k in ("scores", "txt_ids", "img_ids", "txt2img")):
            break  # already broken beyond these changes
        if op == "dtype":
            content["scores"] = content["scores"].to(draw(st.sampled_from(
                [torch.float64, torch.float16, torch.int64, torch.bool, torch.complex64])))
        elif op == "nonfinite" and content["scores"].numel():
            content["scores"] = content["scores"].clone().float()
            content["scores"].view(-1)[draw(st.integers(0, content["scores"].numel() - 1))] = draw(
                st.sampled_from([float("nan"), float("inf"), -float("inf")]))
        elif op == "shape":
            content["scores"] = content["scores"].reshape(-1) if draw(st.booleans()) else content["scores"].t()
        elif op == "id type" and (txt_ids or img_ids):
            ids = draw(st.sampled_from([k for k in ("txt_ids", "img_ids") if content[k]]))
            content[ids] = list(content[ids])
            content[ids][0] = draw(st.sampled_from([0, None, ["x"], 1.5, b"t0"]))
        elif op == "duplicate id" and len(txt_ids) > 1:
            content["txt_ids"] = [txt_ids[0]] + txt_ids[:-1]
        elif op == "dangling" and txt_ids:
            content["txt2img"] = {**txt2img, txt_ids[0]: draw(st.sampled_from(["nowhere", 3, ["i0"]]))}
        elif op == "delete":
            content.pop(draw(st.sampled_from(sorted(content))), None)
        elif op == "extra":
            content["extra"] = 1
        elif op == "not a dict":
            return draw(st.sampled_from([[], torch.zeros(2), "scores"]))
    return content


@examples(300)
@given(content=score_contents(), folds=st.sampled_from([0, 0, 1, 2, 6]), bootstrap=st.sampled_from([0, 0, 7]),
       seed=st.sampled_from(["42", "0", str(2 ** 32), str(2 ** 64), "-1"]), truncate=st.booleans() | st.just(False))
@example(content={"scores": torch.eye(4, 5), "txt_ids": ["t0", "t1", "t2", "t3"], "img_ids": [f"i{j}" for j in range(5)],
                  "txt2img": {"t0": "i0", "t1": "i1", "t2": "i2", "t3": "i3"}}, folds=0, bootstrap=0, seed="42",
         truncate=False)  # an image without a caption: text R@1 100, not 80
def test_fuzz_score_files(content, folds, bootstrap, seed, truncate):
    with scratch() as tmp:
        path = os.path.join(tmp, "s.pt")
        torch.save(content, path)
        if truncate:
            with open(path, "rb") as f:
                raw = f.read()
            write(path, raw[:len(raw) // 2])
        out = os.path.join(tmp, "m.json")
        before = digest([path])
        with time_limit():
            code, _, err = call("scripts.retrieval_metrics", [path, "--output", out, "--folds", folds, "--bootstrap",
                                                              bootstrap, "--seed", seed])
        assert digest([path]) == before
        if refused_or_ok(code, err, path, "--seed", "--folds"):
            assert not os.path.exists(out)
            return
        result = json.loads(open(out).read())
        ref = assert_recalls(result, content["scores"], content["txt_ids"], content["img_ids"], content["txt2img"])
        assert (result["img_medr"], result["txt_medr"]) == (ref["img_medr"], ref["txt_medr"])
        assert (result["n_texts"], result["n_images"]) == (len(content["txt_ids"]), len(content["img_ids"]))
        assert result["unmatched_images"] == ref["unmatched_images"]
        assert 0 <= int(seed) < 2 ** 32
        for key, (lo, hi) in result.get("ci95", {}).items():
            assert 0 <= lo <= hi <= 1 and not math.isnan(lo)
        if folds:
            assert result["folds"]["n"] == folds and 0 <= result["folds"]["txt_r1"] <= 1


# ----------------------------------------------------------------------------- groups files

BASE_GROUPS = [{"id": 0, "caption_0": "t0", "caption_1": "t1", "image_0": "i0", "image_1": "i1"},
               {"id": 1, "caption_0": "t2", "caption_1": "t3", "image_0": "i2", "image_1": "i3"}]


def reference_winoground(s, groups, txt_ids, img_ids):
    row, col = {t: i for i, t in enumerate(txt_ids)}, {m: j for j, m in enumerate(img_ids)}
    text = image = both = 0
    for g in groups:
        c0, c1, i0, i1 = row[g["caption_0"]], row[g["caption_1"]], col[g["image_0"]], col[g["image_1"]]
        t = s[c0, i0] > s[c1, i0] and s[c1, i1] > s[c0, i1]
        m = s[c0, i0] > s[c0, i1] and s[c1, i1] > s[c1, i0]
        text, image, both = text + bool(t), image + bool(m), both + bool(t and m)
    return {"text": text / len(groups), "image": image / len(groups), "group": both / len(groups)}


@examples(200)
@given(data=st.data())
def test_fuzz_groups_files(data):
    from data.groups import read_image_groups
    from data import DataError
    txt_ids, img_ids = ["t0", "t1", "t2", "t3"], ["i0", "i1", "i2", "i3"]
    scores = torch.tensor([[data.draw(st.sampled_from([0.0, 0.5, 1.0])) for _ in img_ids] for _ in txt_ids])
    groups = data.draw(mutated_json(BASE_GROUPS, txt_ids + img_ids + ["t9", "i9", 0]))
    raw = data.draw(file_bytes(groups))
    with scratch() as tmp:
        path = score_file(os.path.join(tmp, "s.pt"), scores, txt_ids, img_ids, dict(zip(txt_ids, img_ids)))
        gpath = write(os.path.join(tmp, "g.json"), raw)
        out = os.path.join(tmp, "m.json")
        before = digest([path, gpath])
        with time_limit():
            code, _, err = call("scripts.retrieval_metrics", [path, "--output", out, "--groups", gpath])
        assert digest([path, gpath]) == before
        if not refused_or_ok(code, err, gpath):
            result = json.loads(open(out).read())["winoground"]
            ref = reference_winoground(scores, json.loads(raw), txt_ids, img_ids)
            assert {k: result[k] for k in ref} == pytest.approx(ref)
        # the same file as training's groups of confusable images: a dict, or one line naming it
        try:
            image_groups = read_image_groups(gpath)
        except DataError as e:
            assert gpath in str(e) and "\n" not in str(e)
        else:
            assert all(isinstance(k, str) and all(isinstance(m, str) and m != k for m in v)
                       for k, v in image_groups.items())


# ----------------------------------------------------------------------------- ISDa annotations -> isd.py

BASE_ANNOTATIONS = {"test_flickr30k_000000000000_0": [[[0], [0]], [[1, 2], [3, 4]]],
                    "test_flickr30k_000000000000_1": [[[0, 1], [2]]]}


@examples(60)
@given(data=st.data())
def test_fuzz_isd_annotations(data):
    from data import TxtTokLmdb
    ann = data.draw(mutated_json(BASE_ANNOTATIONS, list(BASE_ANNOTATIONS) + ["val_1", 0, 3, 99, -1, [0, 1]]))
    raw = data.draw(file_bytes(ann))
    ids = list(TxtTokLmdb(TXT_DB, -1).id2len)[:3]  # the pairs scored with --max_pairs 3
    with scratch() as tmp:
        path = write(os.path.join(tmp, "an.json"), raw)
        before = digest([path])
        from test_format_contracts import REF_MODEL
        from conftest import TINY_CONFIG
        with time_limit():
            code, _, err = call("scripts.isd", ["--txt_db", TXT_DB, "--img_db", IMG_DB, "--checkpoint", REF_MODEL,
                                                "--model_config", TINY_CONFIG, "--output", os.path.join(tmp, "isd"),
                                                "--annotations", path, "--max_pairs", "3"])
        assert digest([path]) == before
        if refused_or_ok(code, err, path):
            assert not os.path.exists(os.path.join(tmp, "isd", "isd.json"))
            return
        result = json.loads(open(os.path.join(tmp, "isd", "isd.json")).read())
        ann = json.loads(raw)
        assert any(t in ann for t in ids)
        # ISDa is defined for a pair whose annotation names at least two words
        expected = sum(1 for t in ids if t in ann and len({w for ws, _ in ann[t] for w in ws}) >= 2)
        for layer in (k for k in result if k.startswith("layer_")):
            assert result[layer].get("ISDa_pairs", 0) == expected
            assert "ISDa" not in result[layer] or math.isfinite(result[layer]["ISDa"])
