"""The contract of each on-disk format a user brings, at the entry points that read it:
a file that breaks it ends in one line naming the file and the id at fault (exit status
2, nothing written), a file that keeps it gives the right result. The builders here make
the formats from scratch and are shared with tests/test_fuzz_formats.py."""
import contextlib
import importlib
import io
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from conftest import FIXTURES, IMG_DB, TINY_CONFIG, TXT_DB
from helpers import assert_one_line as error_line, run_state_released

REF_MODEL = os.path.join(FIXTURES, "ref_model.pt")
IMG_SUB = "feat_th0.2_max100_min10"
NBB_FILE = "nbb_th0.2_max100_min10.json"
VOCAB = (["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
         + ["a", "dog", "runs", "on", "the", "grass", "two", "men", "play", "##s", ".", "A", "Two", "cat"])


# ----------------------------------------------------------------------------- running entry points

def call(module, argv):
    """(exit status, stdout, stderr) of an entry point run in this process under the same
    wrapper as on the command line (0 when it returns)."""
    from utils import cli
    mod = importlib.import_module(module)
    saved_argv, out, err = sys.argv, io.StringIO(), io.StringIO()
    sys.argv = [f"{module.rsplit('.', 1)[-1]}.py"] + [str(a) for a in argv]
    try:
        with run_state_released(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.run(mod.main, mod.build_parser(), getattr(mod, "CONFIG_ONLY_KEYS", {}))
                code = 0
            except SystemExit as e:
                code = e.code
    finally:
        sys.argv = saved_argv
    return code, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------- builders

def write(path, text):
    path = str(path)
    with open(path, "w" if isinstance(text, str) else "wb") as f:
        f.write(text)
    return path


def vocab_file(tmp_path):
    return write(tmp_path / "vocab.txt", "\n".join(VOCAB) + "\n")


def karpathy(images, dataset="flickr30k"):
    return json.dumps({"dataset": dataset, "images": images})


def flickr_image(filename, split, *captions, first_sentid=0):
    return {"filename": filename, "split": split,
            "sentences": [{"raw": c, "sentid": first_sentid + k} for k, c in enumerate(captions)]}


def prepro_argv(tmp_path, annotation, *extra):
    return ["--annotation", write(tmp_path / "ann.json", annotation), "--vocab", vocab_file(tmp_path),
            "--output", str(tmp_path / "txt")] + list(extra)


def txt_db_copy(dst, edit=None, meta=None, keep=None):
    """The fixture txt_db rewritten: ``edit({text id: value})`` in place, ``meta`` for its
    meta.json, and id2len.json cut to the ids ``keep`` accepts."""
    from data import TxtTokLmdb, write_txt_db
    src = TxtTokLmdb(TXT_DB, -1)
    examples = {t: dict(src[t]) for t in src.id2len}
    if edit:
        edit(examples)
    with open(os.path.join(TXT_DB, "meta.json")) as f:
        write_txt_db(str(dst), examples, meta or json.load(f))
    if keep:
        path = os.path.join(str(dst), "id2len.json")
        with open(path) as f:
            id2len = json.load(f)
        write(path, json.dumps({t: n for t, n in id2len.items() if keep(t)}))
    return str(dst)


def fixture_images():
    """{name: arrays as float32} and {name: nbb} of the fixture img_db, every box kept."""
    from data import DetectFeatLmdb
    src = DetectFeatLmdb(IMG_DB, 0.2, 100, 10, 36, False)
    arrays = {name: {k: np.array(a, dtype=np.float32) for k, a in
                     src.read_arrays(name, ("features", "norm_bb", "conf", "soft_labels"), cut=False).items()}
              for name in src.name2nbb}
    return arrays, dict(src.name2nbb)


def img_db_copy(dst, edit=None, compress=False):
    """The fixture img_db rewritten with ``edit(name, arrays)`` applied to each image."""
    from data import ImgDbWriter
    images, name2nbb = fixture_images()
    with ImgDbWriter(str(dst), 0.2, 100, 10, 36, compress=compress) as w:
        for name, arrays in images.items():
            if edit:
                edit(name, arrays)
            w.put(name, arrays, name2nbb[name])
    return str(dst)


def inf_argv(tmp_path, txt_db=TXT_DB, img_db=IMG_DB, *extra):
    return ["--txt_db", txt_db, "--img_db", img_db, "--checkpoint", REF_MODEL, "--model_config", TINY_CONFIG,
            "--output_dir", str(tmp_path / "out"), "--batch_size", "8", "--n_workers", "0"] + list(extra)


def score_file(path, scores, txt_ids, img_ids, txt2img):
    torch.save({"scores": scores, "txt_ids": txt_ids, "img_ids": img_ids, "txt2img": txt2img}, str(path))
    return str(path)


def npz(path, n=12, **changes):
    rng = np.random.default_rng(0)
    arrays = {"features": rng.random((n, 2048), dtype=np.float32), "norm_bb": rng.random((n, 6), dtype=np.float32),
              "conf": np.linspace(0.99, 0.5, n).astype(np.float32), "soft_labels": rng.random((n, 5), dtype=np.float32),
              "nbb": np.array(n)}
    arrays.update(changes)
    np.savez(str(path), **arrays)
    return str(path)


# ----------------------------------------------------------------------------- caption JSON (prepro_itm.py)

def test_sentids_restarting_for_each_image_are_refused(tmp_path):
    """Both images' captions would be text id "0": the second would overwrite the first."""
    ann = karpathy([flickr_image("1.jpg", "test", "a dog"), flickr_image("2.jpg", "test", "a cat")])
    error_line(*call("scripts.prepro_itm", prepro_argv(tmp_path, ann))[::2], "ann.json", "sentid '0' occurs twice",
               "images[0] and images[1]")
    assert not (tmp_path / "txt").exists()


@pytest.mark.parametrize("image,needles", [
    ({**flickr_image("1.jpg", "dev", "a dog")}, ["split 'dev'", "train, val, test"]),
    ({"filename": "1.jpg", "split": "test", "sentences": [{"sentid": 0}]}, ["'raw' or 'tokens'"]),
    ({"filename": "1.jpg", "split": "test", "sentences": [{"sentid": 0, "raw": 7}]}, ["'raw' of type int"]),
    ({"filename": "1.jpg", "split": "test", "sentences": [{"sentid": 0, "tokens": [1, 2]}]},
     ["'tokens' that are not a list of strings"]),
    ({"filename": "1.jpg", "split": "test", "sentences": [{"sentid": 0, "raw": " ", "tokens": []}]},
     ["has no text"]),
    ({"filename": "1.jpg", "split": "test", "sentences": [{"sentid": [0], "raw": "a dog"}]}, ["sentid '[0]'"]),
], ids=["unknown split", "no text", "raw a number", "tokens not strings", "empty caption", "sentid a list"])
def test_caption_json_mistakes(tmp_path, image, needles):
    error_line(*call("scripts.prepro_itm", prepro_argv(tmp_path, karpathy([image])))[::2], "ann.json", *needles)
    assert not (tmp_path / "txt").exists()


def test_coco_images_need_their_coco_id(tmp_path):
    """COCO's imgid is Karpathy's index: taken for the cocoid it would name other images."""
    image = {"filename": "COCO_val2014_000000391895.jpg", "filepath": "val2014", "imgid": 3, "split": "test",
             "sentences": [{"raw": "a dog", "sentid": 0}]}
    error_line(*call("scripts.prepro_itm", prepro_argv(tmp_path, karpathy([image], "coco")))[::2],
               "ann.json", "images[0]", "has no 'cocoid'")
    image["cocoid"] = 391895
    code, out, err = call("scripts.prepro_itm", prepro_argv(tmp_path, karpathy([image], "coco")))
    assert code == 0, err
    from data import TxtTokLmdb
    assert TxtTokLmdb(str(tmp_path / "txt" / "itm_coco_test.db"), -1).txt2img == {
        "0": "coco_val2014_000000391895.npz"}


@pytest.mark.parametrize("template", ["{stem.real}.npz", "{filename[0]}.npz", "{}.npz", "{0}.npz"])
def test_img_fname_templates_take_plain_fields_only(tmp_path, template):
    ann = karpathy([flickr_image("1.jpg", "test", "a dog")])
    error_line(*call("scripts.prepro_itm", prepro_argv(tmp_path, ann, "--img_fname", template))[::2],
               "--img_fname", "not a field name", "stem, filename")


def test_two_images_with_one_img_fname_are_refused(tmp_path):
    ann = karpathy([flickr_image("1.jpg", "test", "a dog"), flickr_image("1.png", "test", "a cat", first_sentid=1)])
    error_line(*call("scripts.prepro_itm", prepro_argv(tmp_path, ann))[::2],
               "images[0] and images[1] both get img_fname 'flickr30k_000000000001.npz'")


def test_vocab_that_is_a_folder_or_not_text(tmp_path):
    ann = write(tmp_path / "ann.json", karpathy([flickr_image("1.jpg", "test", "a dog")]))
    (tmp_path / "vocab_dir").mkdir()
    write(tmp_path / "latin1.txt", "\n".join(VOCAB).encode() + b"\ncaf\xe9\n")
    for vocab, needle in ((tmp_path / "vocab_dir", "is a folder"), (tmp_path / "latin1.txt", "is not UTF-8 text")):
        code, _, err = call("scripts.prepro_itm", ["--annotation", ann, "--vocab", vocab, "--output", tmp_path / "o"])
        error_line(code, err, f"--vocab {vocab}", needle)


def test_captions_already_wrapped_in_cls_and_sep_are_refused(tmp_path):
    ann = karpathy([flickr_image("1.jpg", "test", "[CLS] a dog [SEP]")])
    error_line(*call("scripts.prepro_itm", prepro_argv(tmp_path, ann))[::2],
               "sentid '0' already holds [CLS] (token id 101)")
    assert not (tmp_path / "txt").exists()


def test_a_karpathy_json_that_keeps_the_contract(tmp_path):
    ann = karpathy([flickr_image("1000092795.jpg", "train", "A dog runs.", "Two men play"),
                    flickr_image("42.jpg", "test", "a cat", first_sentid=2)])
    code, out, err = call("scripts.prepro_itm", prepro_argv(tmp_path, ann))
    assert code == 0, err
    from data import TxtTokLmdb
    train = TxtTokLmdb(str(tmp_path / "txt" / "itm_flickr30k_train.db"), -1)
    ids = {w: i for i, w in enumerate(VOCAB)}
    assert train["0"]["input_ids"] == [ids["A"], ids["dog"], ids["runs"], ids["."]]
    assert train.img2txts == {"flickr30k_001000092795.npz": ["0", "1"]}
    assert TxtTokLmdb(str(tmp_path / "txt" / "itm_flickr30k_test.db"), -1).id2len == {"2": 2}


# ----------------------------------------------------------------------------- txt_db

def test_txt_db_captions_holding_cls_or_sep_are_refused(tmp_path):
    def wrap(examples):
        first = next(iter(examples))
        examples[first]["input_ids"] = [101] + examples[first]["input_ids"] + [102]
    db = txt_db_copy(tmp_path / "t.db", wrap)
    error_line(*call("inf_itm", inf_argv(tmp_path, db))[::2], "t.db", "text 'test_flickr30k_000000000000_0'",
               "already holds the CLS token id 101 of meta.json")
    assert not (tmp_path / "out" / "scores.json").exists()


def test_a_txt_db_of_another_tokenizer_is_named(tmp_path, caplog):
    """An uncased txt_db (30522 tokens) for a model of another vocabulary: every id fits
    the table here, so only meta.json tells; a WARNING names the mismatch."""
    meta = {"UNK": 100, "CLS": 101, "SEP": 102, "MASK": 103, "v_range": [999, 30522], "toker": "bert-base-uncased"}
    db = txt_db_copy(tmp_path / "t.db", meta=meta)
    code, _, err = call("inf_itm", inf_argv(tmp_path, db))
    assert code == 0, err
    assert any(r.levelname == "WARNING" and "v_range [999, 30522]" in r.getMessage()
               and "vocab_size is 1000" in r.getMessage() for r in caplog.records)


def test_meta_json_ids_must_be_distinct(tmp_path):
    meta = {"UNK": 100, "CLS": 101, "SEP": 101, "MASK": 103, "v_range": [106, 1000]}
    error_line(*call("inf_itm", inf_argv(tmp_path, txt_db_copy(tmp_path / "t.db", meta=meta)))[::2],
               "meta.json: CLS, SEP and MASK must be distinct")


def test_id2len_listing_part_of_the_split(tmp_path, caplog):
    """id2len.json without the captions of two images: a WARNING counts the captions left
    out, and scores.json says how many texts were scored and names the images left
    without a text (candidates, but no image query)."""
    dropped = ("flickr30k_000000000003.npz", "flickr30k_000000000008.npz")
    from data import TxtTokLmdb
    full = TxtTokLmdb(TXT_DB, -1)
    db = txt_db_copy(tmp_path / "t.db", keep=lambda t: full.txt2img[t] not in dropped)
    code, _, err = call("inf_itm", inf_argv(tmp_path, db))
    assert code == 0, err
    assert any(r.levelname == "WARNING" and "id2len.json lists 50 captions" in r.getMessage()
               and "10 more" in r.getMessage() for r in caplog.records)
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert (scores["n_texts"], scores["n_images"]) == (50, 12)
    assert sorted(scores["unmatched_images"]) == sorted(dropped)
    # every image query has a text to find: an image without one no longer drags text recall down
    saved = torch.load(tmp_path / "out" / "score_matrix.pt", weights_only=True)
    from utils.retrieval_metrics import gt_image_index
    gt = gt_image_index(saved["txt_ids"], saved["img_ids"], saved["txt2img"])
    s = saved["scores"]
    own = s.gather(1, gt[:, None]).squeeze(1)
    hits = 0
    for j in set(gt.tolist()):
        best = own[gt == j].max()
        others = (s[gt != j, j] >= best).sum()
        hits += int(others == 0)
    assert scores["txt_r1"] == pytest.approx(hits / 10)


# ----------------------------------------------------------------------------- img_db

@pytest.mark.parametrize("count", [0, -3])
def test_box_counts_below_one_are_refused(tmp_path, count):
    dst = tmp_path / "img"
    shutil.copytree(IMG_DB, dst)
    counts = json.loads((dst / NBB_FILE).read_text())
    counts["flickr30k_000000000004.npz"] = count
    write(dst / NBB_FILE, json.dumps(counts))
    error_line(*call("inf_itm", inf_argv(tmp_path, TXT_DB, str(dst)))[::2], NBB_FILE,
               f"image 'flickr30k_000000000004.npz' has {count} boxes", "0 and negative counts are refused")


def test_a_count_file_lacking_an_image_is_named_as_such(tmp_path):
    dst = tmp_path / "img"
    shutil.copytree(IMG_DB, dst)
    counts = json.loads((dst / NBB_FILE).read_text())
    del counts["flickr30k_000000000004.npz"]
    write(dst / NBB_FILE, json.dumps(counts))
    error_line(*call("inf_itm", inf_argv(tmp_path, TXT_DB, str(dst)))[::2],
               f"lack a box count in {dst / NBB_FILE}", "flickr30k_000000000004.npz")


def _later(image, key, change):
    def edit(name, arrays):
        if name == f"flickr30k_{image:012d}.npz":
            arrays[key] = change(arrays[key])
    return edit


def _all_cut(image, rows):
    def edit(name, arrays):
        if name == f"flickr30k_{image:012d}.npz":
            arrays.update({k: a[:rows] for k, a in arrays.items()})
    return edit


@pytest.mark.parametrize("edit,needles", [
    (_later(7, "features", lambda a: a[:, :1024]), ["features of shape (", "1024), expected [boxes, 2048]"]),
    (_later(7, "norm_bb", lambda a: a[:, :4]), ["norm_bb of shape (", "4), expected ["]),
    (_later(7, "norm_bb", lambda a: a * 500), ["norm_bb values in [", "not in pixels"]),
    (_later(7, "norm_bb", lambda a: a[:3]), ["norm_bb of shape (3, 6)"]),
    (_all_cut(7, 5), ["5 boxes stored but the box counts say"]),
], ids=["another width", "4 box columns", "pixel boxes", "fewer boxes than features", "fewer rows than nbb"])
def test_a_later_image_that_breaks_the_layout(tmp_path, edit, needles):
    """The first image is fine (what the start-up probe reads); image 7 is read half-way
    through the evaluation and named there, with the DB."""
    db = img_db_copy(tmp_path / "img", edit)
    error_line(*call("inf_itm", inf_argv(tmp_path, TXT_DB, db))[::2], IMG_SUB,
               "image 'flickr30k_000000000007.npz' has", *needles)
    assert not (tmp_path / "out" / "scores.json").exists()


def test_plain_values_in_a_compressed_sub_db(tmp_path):
    dst = tmp_path / "img"
    shutil.copytree(IMG_DB, dst)
    shutil.rmtree(dst / f"{IMG_SUB}_compressed")
    os.rename(dst / IMG_SUB, dst / f"{IMG_SUB}_compressed")
    error_line(*call("inf_itm", inf_argv(tmp_path, TXT_DB, str(dst), "--compressed_db"))[::2],
               f"{IMG_SUB}_compressed", "holds a plain (msgpack) value but the sub-DB's name says compressed")


def test_complex_features_in_the_db(tmp_path):
    from data import DetectFeatLmdb, ImgDbWriter
    from data.feature_codec import encode_img_dump
    images, name2nbb = fixture_images()
    with ImgDbWriter(str(tmp_path / "img"), 0.2, 100, 10, 36) as w:
        for name, arrays in images.items():
            w.put(name, arrays, name2nbb[name])
        name = list(images)[3]
        bad = {k: a.astype(np.float16) for k, a in images[name].items()}
        bad["features"] = bad["features"].astype(np.complex64)
        w._writer.put(name, encode_img_dump(bad, False))
    db = DetectFeatLmdb(str(tmp_path / "img"), 0.2, 100, 10, 36, False)
    from data import DataError
    with pytest.raises(DataError, match=rf"image '{name}' has features of dtype complex64, expected real"):
        db[name]


# ----------------------------------------------------------------------------- .npz features (convert_imgdir.py)

@pytest.mark.parametrize("changes,needle", [
    ({"norm_bb": np.random.default_rng(1).random((12, 6), dtype=np.float32) * 500},
     "boxes must be normalised to [0, 1]"),
    ({"features": np.ones((12, 2048), np.complex64) * (1 + 2j)}, "features of dtype complex64"),
    ({"norm_bb": np.ones((12, 6), np.int64)}, "norm_bb of dtype int64"),
    ({"conf": np.full(12, np.nan, np.float32)}, "non-finite values in conf"),
], ids=["pixel boxes", "complex features", "integer boxes", "nan confidences"])
def test_convert_imgdir_refuses_what_breaks_the_npz_contract(tmp_path, changes, needle):
    src = tmp_path / "feats"
    src.mkdir()
    npz(src / "bad.npz", **changes)
    argv = ["--img_dir", src, "--output", tmp_path / "out", "--nproc", "1"]
    error_line(*call("scripts.convert_imgdir", argv)[::2], "none of the 1 .npz files", "bad.npz", needle)
    npz(src / "good.npz")
    shutil.rmtree(tmp_path / "out")
    code, out, err = call("scripts.convert_imgdir", argv)
    assert code == 0, err
    assert "skipped 1 unreadable file(s)" in out and f"  bad.npz: ValueError: " in out and needle in out


# ----------------------------------------------------------------------------- Winoground, ISD annotations

@pytest.mark.parametrize("field,value", [("caption_0", None), ("caption_1", 3), ("image_0", ""), ("id", [1])])
def test_winoground_examples_with_fields_of_the_wrong_kind(tmp_path, field, value):
    example = {"id": 0, "image_0": "ex_0_img_0", "image_1": "ex_0_img_1", "caption_0": "a dog", "caption_1": "a cat"}
    example[field] = value
    argv = ["--examples", write(tmp_path / "examples.jsonl", json.dumps(example) + "\n"), "--vocab",
            vocab_file(tmp_path), "--output", tmp_path / "o"]
    error_line(*call("scripts.prepro_winoground", argv)[::2], "examples.jsonl line 1", f"{field} is")
    assert not (tmp_path / "o").exists()


def test_isd_annotations_of_another_split(tmp_path):
    ann = write(tmp_path / "an.json", json.dumps({"val_flickr30k_000000000001_0": [[[0], [0]]]}))
    argv = ["--txt_db", TXT_DB, "--img_db", IMG_DB, "--checkpoint", REF_MODEL, "--model_config", TINY_CONFIG,
            "--output", tmp_path / "isd", "--annotations", ann]
    error_line(*call("scripts.isd", argv)[::2], "an.json", "none of its 1 text ids is in the split")
    assert not (tmp_path / "isd" / "isd.json").exists()
    argv[-1] = write(tmp_path / "an.json", json.dumps({"test_flickr30k_000000000011_0": [[[0], [0]]]}))
    error_line(*call("scripts.isd", argv + ["--max_pairs", "2"])[::2], "none of its text ids is among the first 2")


# ----------------------------------------------------------------------------- score files (retrieval_metrics.py)

def _metrics(tmp_path, path, *extra):
    code, out, err = call("scripts.retrieval_metrics", [path, "--output", tmp_path / "m.json"] + list(extra))
    return code, out, err


def test_images_without_a_caption_are_no_image_queries(tmp_path, caplog):
    """Five images, four with a caption each, all ranked first: text R@1 is 100, not 80."""
    scores = torch.eye(4, 5) + 0.1 * torch.rand(4, 5)
    txt_ids, img_ids = [f"t{i}" for i in range(4)], [f"i{j}" for j in range(5)]
    path = score_file(tmp_path / "s.pt", scores, txt_ids, img_ids, {f"t{i}": f"i{i}" for i in range(4)})
    code, out, err = _metrics(tmp_path, path, "--bootstrap", "20")
    assert code == 0, err
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["txt_r1"] == 1.0 and result["img_r1"] == 1.0 and result["txt_medr"] == 1
    assert (result["n_texts"], result["n_images"], result["unmatched_images"]) == (4, 5, ["i4"])
    assert result["ci95"]["txt_r1"] == [1.0, 1.0]
    assert "1 without a text" in out
    assert any(r.levelname == "WARNING" and "1 of its 5 images have no text" in r.getMessage() for r in caplog.records)


def test_folds_are_made_of_images_with_captions(tmp_path):
    scores = torch.eye(4, 6)
    txt2img = {f"t{i}": f"i{i}" for i in range(4)}
    path = score_file(tmp_path / "s.pt", scores, list(txt2img), [f"i{j}" for j in range(6)], txt2img)
    code, _, err = _metrics(tmp_path, path, "--folds", "2")
    assert code == 0, err
    assert json.loads((tmp_path / "m.json").read_text())["folds"]["txt_r1"] == 1.0
    error_line(*_metrics(tmp_path, path, "--folds", "5")[::2], "--folds 5", "the 4 images of", "that have texts")


@pytest.mark.parametrize("content,needles", [
    ({"scores": torch.zeros(0, 0), "txt_ids": [], "img_ids": [], "txt2img": {}}, ["0 texts and 0 images"]),
    ({"scores": torch.zeros(1, 1), "txt_ids": [["t"]], "img_ids": ["i"], "txt2img": {}},
     ["a text id is list", "ids are strings"]),
    ({"scores": torch.zeros(1, 1), "txt_ids": ["t"], "img_ids": ["i"], "txt2img": {"t": ["i"]}},
     ["txt2img gives text 't'", "not an image id"]),
    ({"scores": torch.zeros(1, 1, dtype=torch.complex64), "txt_ids": ["t"], "img_ids": ["i"], "txt2img": {"t": "i"}},
     ["scores of dtype torch.complex64"]),
], ids=["0 x 0", "ids as lists", "txt2img values as lists", "complex scores"])
def test_score_files_breaking_the_contract(tmp_path, content, needles):
    torch.save(content, tmp_path / "s.pt")
    error_line(*_metrics(tmp_path, tmp_path / "s.pt")[::2], "s.pt", *needles)
    assert not (tmp_path / "m.json").exists()


def test_a_seed_beyond_the_generator_is_refused(tmp_path):
    path = score_file(tmp_path / "s.pt", torch.eye(2), ["t0", "t1"], ["i0", "i1"], {"t0": "i0", "t1": "i1"})
    error_line(*_metrics(tmp_path, path, "--bootstrap", "5", "--seed", str(2 ** 64))[::2],
               "--seed must be in [0, 4294967295]")


def test_twin_groups_of_one_caption_twice(tmp_path):
    path = score_file(tmp_path / "s.pt", torch.eye(2), ["t0", "t1"], ["i0", "i1"], {"t0": "i0", "t1": "i1"})
    groups = write(tmp_path / "g.json", json.dumps([{"caption_0": "t0", "caption_1": "t0", "image_0": "i0",
                                                      "image_1": "i1"}]))
    error_line(*_metrics(tmp_path, path, "--groups", groups)[::2], "g.json: group 0 has 't0' as both caption_0")


def test_a_vocab_of_another_size_than_the_tokenizer_named(tmp_path):
    """An uncased vocabulary (30522 tokens) converted under the default --toker
    bert-base-cased: meta.json would name the wrong tokenizer, which is said."""
    words = VOCAB + [f"w{i}" for i in range(30522 - len(VOCAB))]
    vocab = write(tmp_path / "uncased.txt", "\n".join(words) + "\n")
    ann = write(tmp_path / "ann.json", karpathy([flickr_image("1.jpg", "test", "a dog")]))
    code, _, err = call("scripts.prepro_itm", ["--annotation", ann, "--vocab", vocab, "--output", tmp_path / "o"])
    assert code == 0, err
    assert f"WARNING: --vocab {vocab} has 30522 tokens but --toker bert-base-cased has 28996" in err


def test_a_txt_db_naming_another_tokenizer_only_by_name(tmp_path, caplog):
    meta = {"UNK": 100, "CLS": 101, "SEP": 102, "MASK": 103, "toker": "bert-base-uncased"}
    code, _, err = call("inf_itm", inf_argv(tmp_path, txt_db_copy(tmp_path / "t.db", meta=meta)))
    assert code == 0, err
    assert any(r.levelname == "WARNING" and "toker 'bert-base-uncased' has 30522 tokens" in r.getMessage()
               for r in caplog.records)


def test_img2txts_listing_an_image_the_img_db_lacks(tmp_path):
    """Every image of img2txts.json is a candidate of the evaluation (and a negative in
    training), with a caption or without: one the img_db lacks is named, not a KeyError."""
    dst = tmp_path / "t.db"
    shutil.copytree(TXT_DB, dst)
    img2txts = json.loads((dst / "img2txts.json").read_text())
    write(dst / "img2txts.json", json.dumps({**img2txts, "flickr30k_000000000099.npz": []}))
    error_line(*call("inf_itm", inf_argv(tmp_path, str(dst)))[::2], "t.db names images that the img_db cannot give",
               "flickr30k_000000000099.npz")
