"""A catalogue of a user's own data and usual mistakes: each ends with one line on stderr
that names the file, key or flag at fault, exit status 2, and nothing already written
lost. The entry points run in this process (their ``main`` under the same wrapper as on
the command line); the few cases that could kill a process with a signal run in a
subprocess."""
import importlib
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from conftest import FIXTURES, IMG_DB, TINY_CONFIG, TXT_DB
from helpers import assert_one_line, end_of_process, entry, run, run_state_released, tiny_train_config
from utils import cli

REF_MODEL = os.path.join(FIXTURES, "ref_model.pt")
IMG_SUB = "feat_th0.2_max100_min10"


@pytest.fixture(autouse=True)
def _release_what_a_run_holds():
    """A training run in this process adds a file handler for its log.txt and locks its
    output_dir until the process ends: both are let go after each test."""
    with run_state_released():
        yield


# ----------------------------------------------------------------------------- data builders

def copy_txt_db(dst, edit=None, n_images=None, meta=None):
    """The fixture txt_db rewritten (first ``n_images`` images only; ``edit`` may change
    the ``{text id: example}`` dict in place)."""
    from data import TxtTokLmdb, write_txt_db
    src = TxtTokLmdb(TXT_DB, -1)
    images = list(src.img2txts)[:n_images]
    examples = {t: src[t] for img in images for t in src.img2txts[img]}
    if edit:
        edit(examples)
    with open(os.path.join(TXT_DB, "meta.json")) as f:
        write_txt_db(str(dst), examples, meta or json.load(f))
    return str(dst)


def copy_img_db(dst, edit):
    """The fixture img_db rewritten with ``edit(name, arrays)`` applied to each image's arrays."""
    from data import DetectFeatLmdb, ImgDbWriter
    src = DetectFeatLmdb(IMG_DB, 0.2, 100, 10, 36, False)
    with ImgDbWriter(str(dst), 0.2, 100, 10, 36) as w:
        for name in src.name2nbb:
            arrays = {k: np.array(a, dtype=np.float32) for k, a in
                      src.read_arrays(name, ("features", "norm_bb", "conf", "soft_labels"), cut=False).items()}
            edit(name, arrays)
            w.put(name, arrays, src.name2nbb[name])
    return str(dst)


def edit_json(path, edit):
    with open(path) as f:
        obj = json.load(f)
    obj = edit(obj)
    with open(path, "w") as f:
        json.dump(obj, f)


def copied_txt_db_with_json(dst, name, edit):
    shutil.copytree(TXT_DB, dst)
    edit_json(os.path.join(dst, name), edit)
    return str(dst)


def model_config(dst, **changes):
    with open(TINY_CONFIG) as f:
        config = json.load(f)
    config.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del config[key]
    with open(dst, "w") as f:
        json.dump(config, f)
    return str(dst)


def ref_state(**changes):
    state = torch.load(REF_MODEL, weights_only=True)
    state.update(changes)
    return state


def saved(path, obj):
    torch.save(obj, path)
    return str(path)


# ----------------------------------------------------------------------------- inf_itm.py

def inf_argv(tmp_path, **flags):
    args = {"--txt_db": TXT_DB, "--img_db": IMG_DB, "--checkpoint": REF_MODEL, "--model_config": TINY_CONFIG,
            "--output_dir": str(tmp_path / "out"), "--batch_size": "8", "--n_workers": "0"}
    args.update(flags)
    return [x for kv in args.items() for x in kv if x is not None]


def _no_layer_1(state):
    return {k: v for k, v in state.items() if not k.startswith("uniter.encoder.layer.1.")}


# (case, flags built from tmp_path, needles of the error line)
INF_CASES = [
    ("empty checkpoint", lambda t: {"--checkpoint": saved(t / "e.pt", {})}, ["e.pt holds a dict of 0 entries"]),
    ("list checkpoint", lambda t: {"--checkpoint": saved(t / "l.pt", [torch.ones(2)])}, ["l.pt holds a list"]),
    ("tensor checkpoint", lambda t: {"--checkpoint": saved(t / "t.pt", torch.ones(2))}, ["t.pt holds a Tensor"]),
    ("dict of non-tensors", lambda t: {"--checkpoint": saved(t / "d.pt", {"a": 1, "b": "x"})},
     ["entry 'a' holds a int", "not a model state dict"]),
    ("unrelated file", lambda t: {"--checkpoint": str(t / "notes.pt")}, ["notes.pt is unreadable"]),
    ("training state", lambda t: {"--checkpoint": saved(t / "train_state_2.pt", {
        "global_step": 2, "optimizer": {}, "scaler": {}, "rng": [], "streams": {}})},
     ["train_state_2.pt is a training state", "model_step_N.pt"]),
    ("NaN weights", lambda t: {"--checkpoint": saved(t / "nan.pt", ref_state(**{
        "uniter.pooler.dense.weight": torch.full((64, 64), float("nan"))}))},
     ["nan.pt: 1 tensor(s) hold non-finite values", "uniter.pooler.dense.weight", "4096 values"]),
    ("more layers in the model config", lambda t: {"--model_config": model_config(t / "m.json", num_hidden_layers=3)},
     ["2 encoder layer(s), the model config 3", "--allow_random_init"]),
    ("fewer layers in the model config", lambda t: {"--model_config": model_config(t / "m.json", num_hidden_layers=1)},
     ["2 encoder layer(s), the model config 1", "fit nowhere"]),
    ("checkpoint missing a layer", lambda t: {"--checkpoint": saved(t / "cut.pt", _no_layer_1(ref_state()))},
     ["cut.pt has 1 encoder layer(s), the model config 2"]),
    ("no head at all", lambda t: {"--checkpoint": saved(t / "h.pt", {k: v for k, v in ref_state().items()
                                                                      if "_output" not in k})},
     ["h.pt has neither rank_output nor itm_output"]),
    ("model config not JSON", lambda t: {"--model_config": str(t / "bad.json")}, ["bad.json: invalid JSON"]),
    ("model config a list", lambda t: {"--model_config": _write(t / "list.json", "[1, 2]")},
     ["list.json must be a JSON object"]),
    ("model config missing a key", lambda t: {"--model_config": model_config(t / "m.json", vocab_size=None)},
     ["m.json: vocab_size must be a positive integer, got nothing"]),
    ("model config wrong type", lambda t: {"--model_config": model_config(t / "m.json", hidden_size="64")},
     ["hidden_size must be a positive integer"]),
    ("heads do not divide", lambda t: {"--model_config": model_config(t / "m.json", num_attention_heads=5)},
     ["hidden_size must be a multiple of num_attention_heads (5)"]),
    ("unknown activation", lambda t: {"--model_config": model_config(t / "m.json", hidden_act="tanh")},
     ["hidden_act must be one of gelu, relu, swish"]),
    ("dropout of 1.5 in the model config", lambda t: {"--model_config": model_config(t / "m.json",
                                                                                    hidden_dropout_prob=1.5)},
     ["hidden_dropout_prob must be a number in [0, 1)"]),
    ("vocabulary too small", lambda t: _smaller_table(t, "word_embeddings", "vocab_size", 500),
     ["test_flickr30k_", "holds token id", "vocab_size 500"]),
    ("position table too short", lambda t: _smaller_table(t, "position_embeddings", "max_position_embeddings", 8),
     ["tokens; with [CLS] and [SEP] it exceeds the model's 8 positions (max_position_embeddings)"]),
    ("batch size 0", lambda t: {"--batch_size": "0"}, ["--batch_size must be >= 1, got 0"]),
    ("n_workers -1", lambda t: {"--n_workers": "-1"}, ["--n_workers must be >= 0, got -1"]),
    ("collective_timeout 0", lambda t: {"--collective_timeout": "0"}, ["--collective_timeout must be >= 1"]),
    ("conf_th 2", lambda t: {"--conf_th": "2"}, ["--conf_th must be in [0, 1] or -1, got 2.0"]),
    ("conf_th nan", lambda t: {"--conf_th": "nan"}, ["--conf_th must be a finite number"]),
    ("txt_db image ids that img_db lacks", lambda t: {"--txt_db": copy_txt_db(t / "t.db", edit=_rename_image)},
     ["1 image(s)", "are not in"]),
    ("token id past the vocabulary", lambda t: {"--txt_db": copy_txt_db(t / "t.db", edit=_token(5000))},
     ["token id 5000 outside the model's vocabulary (vocab_size 1000)"]),
    ("negative token id", lambda t: {"--txt_db": copy_txt_db(t / "t.db", edit=_token(-3))}, ["token id -3"]),
    ("caption longer than the position table", lambda t: {"--txt_db": copy_txt_db(t / "t.db", edit=_long_caption)},
     ["has 600 tokens", "512 positions"]),
    ("input_ids not a list", lambda t: {"--txt_db": copy_txt_db(t / "t.db", edit=_ids_as_text)},
     ["no list of integer input_ids"]),
    ("id2len disagrees with the LMDB", lambda t: {"--txt_db": copied_txt_db_with_json(
        t / "t.db", "id2len.json", lambda d: {k: v + 1 for k, v in d.items()})}, ["id2len.json says"]),
    ("id2len lists a caption the LMDB lacks", lambda t: {"--txt_db": copied_txt_db_with_json(
        t / "t.db", "id2len.json", lambda d: {**d, "ghost": 3})}, ["'ghost' of id2len.json is not in txt2img.json"]),
    ("img2txts misses a caption", lambda t: {"--txt_db": copied_txt_db_with_json(
        t / "t.db", "img2txts.json", lambda d: {k: v[1:] for k, v in d.items()})},
     ["not listed under its image"]),
    ("txt2img and img2txts disagree", lambda t: {"--txt_db": copied_txt_db_with_json(
        t / "t.db", "img2txts.json", _swap_lists)}, ["img2txts.json lists"]),
    ("id2len not an object", lambda t: {"--txt_db": copied_txt_db_with_json(t / "t.db", "id2len.json", lambda d: [])},
     ["id2len.json must be a JSON object mapping names to caption lengths"]),
    ("id2len lengths not integers", lambda t: {"--txt_db": copied_txt_db_with_json(
        t / "t.db", "id2len.json", lambda d: {k: str(v) for k, v in d.items()})}, ["id2len.json must be"]),
    ("meta.json CLS a string", lambda t: {"--txt_db": copied_txt_db_with_json(
        t / "t.db", "meta.json", lambda d: {**d, "CLS": "[CLS]"})}, ["meta.json: CLS must be a token id"]),
    ("meta.json a list", lambda t: {"--txt_db": copied_txt_db_with_json(t / "t.db", "meta.json", lambda d: [1])},
     ["meta.json: CLS must be a token id"]),
    ("meta.json SEP outside the vocabulary", lambda t: {"--txt_db": copied_txt_db_with_json(
        t / "t.db", "meta.json", lambda d: {**d, "SEP": 4000})}, ["meta.json: SEP 4000 is outside"]),
    ("nbb json not an object", lambda t: {"--img_db": _img_db_with_nbb(t, [])},
     ["nbb_th0.2_max100_min10.json must be a JSON object mapping names to box counts"]),
    ("features of another dimension", lambda t: {"--img_db": copy_img_db(t / "img", _narrow_features)},
     ["features of shape (", "1024)", "the model takes [boxes, 2048]"]),
    ("boxes with 4 columns", lambda t: {"--img_db": copy_img_db(t / "img", _four_column_boxes)},
     ["norm_bb of shape", "expected ["]),
    ("NaN features in one image", lambda t: {"--img_db": copy_img_db(t / "img", _nan_in("features", 7))},
     ["image 'flickr30k_000000000007.npz' has non-finite values in features", IMG_SUB]),
    ("inf boxes in one image", lambda t: {"--img_db": copy_img_db(t / "img", _nan_in("norm_bb", 3, np.inf))},
     ["image 'flickr30k_000000000003.npz' has non-finite values in norm_bb"]),
    ("garbage data.mdb", lambda t: {"--img_db": _img_db_with_data(t, os.urandom(1 << 16))},
     ["data.mdb is not a readable LMDB", IMG_SUB]),
    ("empty data.mdb", lambda t: {"--img_db": _img_db_with_data(t, b"")}, ["data.mdb is not a readable LMDB"]),
    ("garbage txt_db data.mdb", lambda t: {"--txt_db": _txt_db_with_data(t, os.urandom(1 << 14))},
     ["t.db/data.mdb is not a readable LMDB"]),
    ("train config not an object", lambda t: {"--train_config": _write(t / "hps.json", "[]")},
     ["hps.json must be a JSON object"]),
    ("train config with a bad box setting", lambda t: {"--train_config": _write(t / "hps.json", '{"max_bb": "x"}')},
     ["hps.json: max_bb must be an integer"]),
    ("output_dir under a file", lambda t: {"--output_dir": str(t / "notes.pt" / "out")},
     ["--output_dir", "lies under", "notes.pt, which is a file, not a folder"]),
    ("output_dir a file", lambda t: {"--output_dir": str(t / "notes.pt")}, ["notes.pt exists and is not a folder"]),
    ("train config where config.json goes", lambda t: {"--train_config": _in_out(t, "config.json", "{}"),
                                                       "--overwrite": None},
     ["--output_dir", "would write", "config.json, which is the same file as --train_config"]),
]


def _in_out(tmp_path, name, text):
    """A file the user keeps in --output_dir under a name that inf_itm.py writes."""
    (tmp_path / "out").mkdir(exist_ok=True)
    return _write(tmp_path / "out" / name, text)


def _smaller_table(tmp_path, table, key, rows):
    """A model config and a checkpoint that agree on a smaller embedding table."""
    name = f"uniter.embeddings.{table}.weight"
    state = ref_state()
    state[name] = state[name][:rows]
    return {"--model_config": model_config(tmp_path / "m.json", **{key: rows}),
            "--checkpoint": saved(tmp_path / "small.pt", state)}


def _write(path, text):
    path.write_text(text)
    return str(path)


def _rename_image(examples):
    first = next(iter(examples))
    examples[first] = {**examples[first], "img_fname": "elsewhere.npz"}


def _token(token):
    def edit(examples):
        first = next(iter(examples))
        examples[first] = {**examples[first], "input_ids": examples[first]["input_ids"] + [token]}
    return edit


def _long_caption(examples):
    last = list(examples)[-1]
    examples[last] = {**examples[last], "input_ids": [200] * 600}


def _ids_as_text(examples):
    first = next(iter(examples))
    examples[first] = {**examples[first], "input_ids": "a dog"}


def _swap_lists(img2txts):
    a, b = list(img2txts)[:2]
    img2txts[a], img2txts[b] = img2txts[b], img2txts[a]
    return img2txts


def _narrow_features(name, arrays):
    arrays["features"] = arrays["features"][:, :1024]


def _four_column_boxes(name, arrays):
    arrays["norm_bb"] = arrays["norm_bb"][:, :4]


def _nan_in(key, image, value=np.nan):
    def edit(name, arrays):
        if name == f"flickr30k_{image:012d}.npz":
            arrays[key][0, 0] = value
    return edit


def _img_db_with_nbb(tmp_path, obj):
    dst = tmp_path / "img"
    shutil.copytree(IMG_DB, dst)
    (dst / "nbb_th0.2_max100_min10.json").write_text(json.dumps(obj))
    return str(dst)


def _img_db_with_data(tmp_path, data):
    dst = tmp_path / "img"
    shutil.copytree(IMG_DB, dst)
    (dst / IMG_SUB / "data.mdb").write_bytes(data)
    return str(dst)


def _txt_db_with_data(tmp_path, data):
    dst = tmp_path / "t.db"
    shutil.copytree(TXT_DB, dst)
    (dst / "data.mdb").write_bytes(data)
    return str(dst)


@pytest.mark.parametrize("case,flags,needles", INF_CASES, ids=[c[0] for c in INF_CASES])
def test_inf_itm_refuses(tmp_path, monkeypatch, capsys, case, flags, needles):
    (tmp_path / "bad.json").write_text('{"vocab_size": 1000,')
    (tmp_path / "notes.pt").write_text("my notes, not a checkpoint")
    code, err = entry("inf_itm", inf_argv(tmp_path, **flags(tmp_path)), monkeypatch, capsys)
    assert_one_line(code, err, *needles)
    assert not (tmp_path / "out" / "scores.json").exists()


def test_inf_itm_zero_shot_is_a_warning(tmp_path, monkeypatch, capsys, caplog):
    """A pre-training checkpoint (ITM head, no ranking head) is evaluated, said at WARNING."""
    argv = inf_argv(tmp_path, **{"--checkpoint": os.path.join(FIXTURES, "ref_pretrain.pt")})
    mod = importlib.import_module("inf_itm")
    monkeypatch.setattr(sys, "argv", ["inf_itm.py"] + argv)
    cli.run(mod.main, mod.build_parser())
    assert any(r.levelname == "WARNING" and "zero-shot evaluation" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "out" / "scores.json").exists()


def test_inf_itm_random_init_when_asked(tmp_path, monkeypatch, capsys, caplog):
    argv = inf_argv(tmp_path, **{"--model_config": model_config(tmp_path / "m.json", num_hidden_layers=3)})
    mod = importlib.import_module("inf_itm")
    monkeypatch.setattr(sys, "argv", ["inf_itm.py"] + argv + ["--allow_random_init"])
    cli.run(mod.main, mod.build_parser())
    assert any(r.levelname == "WARNING" and "--allow_random_init" in r.getMessage() for r in caplog.records)


def test_inf_itm_keeps_an_earlier_evaluation(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "scores.json").write_text('{"earlier": 1}')
    code, err = entry("inf_itm", inf_argv(tmp_path), monkeypatch, capsys)
    assert_one_line(code, err, "already holds scores.json", "--overwrite")
    assert (out / "scores.json").read_text() == '{"earlier": 1}'
    mod = importlib.import_module("inf_itm")
    monkeypatch.setattr(sys, "argv", ["inf_itm.py"] + inf_argv(tmp_path) + ["--overwrite"])
    cli.run(mod.main, mod.build_parser())
    assert "img_r1" in json.loads((out / "scores.json").read_text())


def test_non_finite_scores_are_reported(tmp_path, monkeypatch, capsys):
    """Finite weights so large that the image embedding overflows: every score is NaN."""
    state = ref_state()
    state["uniter.img_embeddings.img_linear.weight"] = state["uniter.img_embeddings.img_linear.weight"] * 1e38
    flags = {"--checkpoint": saved(tmp_path / "huge.pt", state)}
    code, err = entry("inf_itm", inf_argv(tmp_path, **flags), monkeypatch, capsys)
    assert_one_line(code, err, "720 of 720 scores are not finite", "60 text(s)", "12 image(s)",
                    "test_flickr30k_000000000000_0", "flickr30k_000000000000.npz", "--allow_nonfinite_scores")
    assert not (tmp_path / "out" / "scores.json").exists()


# ----------------------------------------------------------------------------- training

TRAIN_CASES = [
    ("seed -1", ["--seed", "-1"], {}, ["--seed must be in [0, 4294967295], got -1"]),
    ("seed too large", ["--seed", str(2 ** 32)], {}, ["--seed must be in [0, 4294967295]"]),
    ("dropout 1.5", ["--dropout", "1.5"], {}, ["--dropout must be in [0, 1), got 1.5"]),
    ("betas 0.9 1.5", ["--betas", "0.9", "1.5"], {}, ["--betas must be in [0, 1), got 1.5"]),
    ("one beta", ["--betas", "0.9"], {}, ["--betas takes two numbers"]),
    ("changes without resume", ["--resume_with_changes"], {}, ["--resume_with_changes", "add --resume"]),
    ("n_workers -1", ["--n_workers", "-1"], {}, ["--n_workers must be >= 0, got -1"]),
    ("collective_timeout 0", ["--collective_timeout", "0"], {}, ["--collective_timeout must be >= 1, got 0"]),
    ("learning rate nan", ["--learning_rate", "nan"], {}, ["--learning_rate must be a finite number"]),
    ("learning rate inf in the config", [], {"learning_rate": 1e999}, ["--learning_rate must be a finite number"]),
    ("learning rate 0", ["--learning_rate", "0"], {}, ["--learning_rate must be > 0, got 0.0"]),
    ("negative margin", ["--margin", "-0.2"], {}, ["--margin must be >= 0"]),
    ("negative weight decay", [], {"weight_decay": -1}, ["--weight_decay must be >= 0, got -1.0"]),
    ("grad_norm 0", ["--grad_norm", "0"], {}, ["--grad_norm must be > 0 or -1, got 0.0"]),
    ("warmup -1", ["--warmup_steps", "-1"], {}, ["--warmup_steps must be >= 0"]),
    ("no steps", ["--num_train_steps", "0"], {}, ["--num_train_steps must be >= 1"]),
    ("valid_steps 0", [], {"valid_steps": 0}, ["--valid_steps must be >= 1"]),
    ("batch size 0", ["--train_batch_size", "0"], {}, ["--train_batch_size must be >= 1"]),
    ("max_skipped_steps 0", ["--max_skipped_steps", "0"], {}, ["--max_skipped_steps must be >= 1"]),
    ("max_txt_len 0", ["--max_txt_len", "0"], {}, ["--max_txt_len must be >= 1"]),
    ("min_bb above max_bb", ["--min_bb", "50", "--max_bb", "20"], {}, ["--min_bb 50 exceeds --max_bb 20"]),
    ("max_bb 0", ["--max_bb", "0"], {}, ["--max_bb must be >= 1"]),
    ("list where a path is expected", [], {"val_txt_db": [TXT_DB]}, ["val_txt_db must be a path"]),
    ("path where a list is expected", [], {"train_txt_dbs": TXT_DB}, ["train_txt_dbs must be a non-empty list"]),
    ("model_config a number", [], {"model_config": 3}, ["model_config must be a path"]),
    ("empty path", [], {"test_img_db": ""}, ["test_img_db must be a path"]),
    ("list of numbers for paths", [], {"train_img_dbs": [1]}, ["train_img_dbs must be a non-empty list of paths"]),
    ("betas not a list", [], {"betas": 0.9}, ["betas must be a list"]),
    ("checkpoint of NaN weights", [], {"checkpoint": "NAN"}, ["1 tensor(s) hold non-finite values"]),
    ("checkpoint with fewer layers", [], {"model_config": "THREE_LAYERS"},
     ["2 encoder layer(s), the model config 3", "--allow_random_init"]),
    ("training state as checkpoint", [], {"checkpoint": "STATE"}, ["is a training state"]),
    ("split as small as negative_size", [], {"train_txt_dbs": ["SEVEN"], "inf_minibatch_size": 7},
     ["7 images leave 6 other images, fewer than negative_size 7", "too small"]),
    ("split smaller than negative_size", [], {"negative_size": 15, "hard_neg_size": 7},
     ["12 images leave 11 other images, fewer than negative_size 15", "lower --negative_size to 7"]),
    ("long caption in the validation split", [], {"val_txt_db": "LONG"}, ["has 600 tokens", "512 positions"]),
    ("token past the vocabulary in the test split", [], {"test_txt_db": "TOKEN"}, ["token id 5000"]),
    ("img_db features of another dimension", [], {"val_img_db": "NARROW"}, ["the model takes [boxes, 2048]"]),
]


def _train_paths(tmp_path):
    """Stand-ins of TRAIN_CASES resolved to files built on demand."""
    return {
        "NAN": lambda: saved(tmp_path / "nan.pt", ref_state(**{"uniter.pooler.dense.bias": torch.full((64,), np.inf)})),
        "THREE_LAYERS": lambda: model_config(tmp_path / "m.json", num_hidden_layers=3),
        "STATE": lambda: saved(tmp_path / "train_state_2.pt", {"global_step": 2, "optimizer": {}}),
        "SEVEN": lambda: copy_txt_db(tmp_path / "seven.db", n_images=7),
        "LONG": lambda: copy_txt_db(tmp_path / "long.db", edit=_long_caption),
        "TOKEN": lambda: copy_txt_db(tmp_path / "token.db", edit=_token(5000)),
        "NARROW": lambda: copy_img_db(tmp_path / "narrow", _narrow_features),
    }


def _resolve(value, paths):
    if isinstance(value, list):
        return [_resolve(v, paths) for v in value]
    return paths[value]() if isinstance(value, str) and value in paths else value


@pytest.mark.parametrize("case,flags,config,needles", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_training_refuses(tmp_path, monkeypatch, capsys, case, flags, config, needles):
    paths = _train_paths(tmp_path)
    config = {k: _resolve(v, paths) for k, v in config.items()}
    cfg = tiny_train_config(tmp_path / "c.json", **config)
    out = tmp_path / "o"
    code, err = entry("train_itm_hard_negatives", ["--config", cfg, "--output_dir", out] + flags, monkeypatch, capsys)
    assert_one_line(code, err, *needles)
    assert not out.exists()  # checked before anything is written


def test_resume_with_a_state_of_another_optimiser(tmp_path, monkeypatch, capsys):
    cfg = tiny_train_config(tmp_path / "c.json", num_train_steps=2, valid_steps=2)
    out = tmp_path / "o"
    mod = importlib.import_module("train_itm_hard_negatives")
    monkeypatch.setattr(sys, "argv", ["train_itm_hard_negatives.py", "--config", cfg, "--output_dir", str(out)])
    cli.run(mod.main, mod.build_parser(), mod.CONFIG_ONLY_KEYS)
    end_of_process()
    state = out / "ckpt" / "train_state_2.pt"
    before = state.read_bytes()
    hps = (out / "log" / "hps.json").read_bytes()
    code, err = entry("train_itm_hard_negatives", ["--config", cfg, "--output_dir", out, "--resume",
                                                   "--num_train_steps", "4", "--optim", "adamax",
                                                   "--resume_with_changes"], monkeypatch, capsys)
    assert_one_line(code, err, "train_state_2.pt does not fit this run", "another optimiser", "hps.json")
    assert state.read_bytes() == before
    # the changes accepted are recorded only once the training state fits
    assert (out / "log" / "hps.json").read_bytes() == hps and not (out / "log" / "hps_history.jsonl").exists()
    torch.save({"global_step": 2, "optimizer": torch.load(state, weights_only=True)["optimizer"]}, state)
    code, err = entry("train_itm_hard_negatives", ["--config", cfg, "--output_dir", out, "--resume",
                                                   "--num_train_steps", "4", "--resume_with_changes"],
                      monkeypatch, capsys)
    assert_one_line(code, err, "train_state_2.pt does not fit this run", "KeyError")
    assert sorted(os.listdir(out / "ckpt")) == ["best.json", "best.pt", "model_step_2.pt", "train_state_2.pt"]


# ----------------------------------------------------------------------------- data-level cases

def test_negative_sampling_ends_on_a_pool_barely_large_enough():
    """512 captions, 5 of them the positive image's, 507 negatives asked: a random draw
    almost never misses all five; the draw still ends, without them."""
    import random
    from data.negatives import sample_negative
    random.seed(0)
    pool = list(range(512))
    out = sample_negative(pool, [0, 1, 2, 3, 4], 507)
    assert len(out) == 507 and not set(out) & {0, 1, 2, 3, 4} and len(set(out)) == 507


def test_non_finite_features_found_at_first_read(tmp_path):
    from data import DataError, DetectFeatLmdb
    db = DetectFeatLmdb(copy_img_db(tmp_path / "img", _nan_in("features", 4)), 0.2, 100, 10, 36, False)
    db["flickr30k_000000000003.npz"]
    with pytest.raises(DataError, match="flickr30k_000000000004.npz' has non-finite values in features"):
        db["flickr30k_000000000004.npz"]
    with pytest.raises(DataError):  # not remembered as checked after a failure
        db.read_arrays("flickr30k_000000000004.npz")


def test_truncated_lmdb_is_one_line_not_a_signal(tmp_path):
    """LMDB maps data.mdb: reading a page past the end of a truncated file would kill the
    process with SIGBUS, so this runs in a subprocess."""
    img = tmp_path / "img"
    shutil.copytree(IMG_DB, img)
    data = img / IMG_SUB / "data.mdb"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    res = run(["inf_itm.py"] + inf_argv(tmp_path, **{"--img_db": str(img)}))
    assert_one_line(res.returncode, res.stderr, f"{IMG_SUB}/data.mdb is truncated", "copy or download it again")


# ----------------------------------------------------------------------------- output_dir

HOLD_LOCK = """
import fcntl, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.write("pid 4242 on elsewhere\\n")
f.flush()
print("held", flush=True)
time.sleep(120)
"""


def test_output_dir_in_use_is_refused_then_taken_over(tmp_path, monkeypatch, capsys):
    """A run holding output_dir's lock refuses a second one; once it is gone (a crash
    leaves the lock file behind, not the lock), the folder is accepted."""
    import subprocess
    from engine.output_dir import claim
    out = tmp_path / "o"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = tiny_train_config(tmp_path / "c.json")
        code, err = entry("train_itm_hard_negatives", ["--config", cfg, "--output_dir", out], monkeypatch, capsys)
        assert_one_line(code, err, f"output_dir {out} is in use by another run (pid 4242 on elsewhere)")
    finally:
        holder.kill()
        holder.wait()
    assert (out / ".lock").exists()
    assert claim(str(out), resume=False) is False
    assert f"pid {os.getpid()}" in (out / ".lock").read_text()


def test_every_rank_stops_with_the_same_line(tmp_path):
    """A mistake that only rank 0 sees (output_dir) stops both torchrun ranks with the same
    line, not with a peer's 'Connection closed by peer'."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("previous results")
    cfg = tiny_train_config(tmp_path / "c.json")
    res = run(["train_itm_hard_negatives.py", "--config", cfg, "--output_dir", str(out)], launcher="torchrun")
    errors = [line for line in res.stderr.splitlines() if line.startswith("train_itm_hard_negatives.py: error: ")]
    assert len(errors) == 2 and errors[0] == errors[1] and "is not empty" in errors[0], res.stderr[-3000:]
    assert "Connection closed" not in res.stderr and 'train_itm_hard_negatives.py", line' not in res.stderr
    assert (out / "keep.txt").read_text() == "previous results"


# ----------------------------------------------------------------------------- scripts

def _npz(path, n=12, dim=2048, **changes):
    rng = np.random.default_rng(0)
    arrays = {"features": rng.random((n, dim), dtype=np.float32), "norm_bb": rng.random((n, 6), dtype=np.float32),
              "conf": np.linspace(0.99, 0.5, n).astype(np.float32), "soft_labels": rng.random((n, 5), dtype=np.float32),
              "nbb": np.array(n)}
    arrays.update(changes)
    np.savez(path, **arrays)


def test_convert_imgdir_skips_what_the_model_cannot_take(tmp_path, monkeypatch, capsys):
    from data import DetectFeatLmdb
    src = tmp_path / "feats"
    src.mkdir()
    _npz(src / "good.npz")
    bad = {"nan.npz": {"features": np.full((12, 2048), np.nan, np.float32)},
           "too_big_for_fp16.npz": {"norm_bb": np.full((12, 6), 1e6, np.float32)},
           "no_boxes.npz": {"features": np.zeros((0, 2048), np.float32), "norm_bb": np.zeros((0, 6), np.float32),
                            "conf": np.zeros(0, np.float32), "soft_labels": np.zeros((0, 5), np.float32)},
           "narrow.npz": {"features": np.zeros((12, 1024), np.float32)},
           "ragged.npz": {"norm_bb": np.zeros((7, 6), np.float32)},
           "flat_boxes.npz": {"norm_bb": np.zeros((12, 4), np.float32)}}
    for name, changes in bad.items():
        _npz(src / name, **changes)
    mod = importlib.import_module("scripts.convert_imgdir")
    argv = ["--img_dir", str(src), "--output", str(tmp_path / "out"), "--nproc", "1", "--min_bb", "0"]
    monkeypatch.setattr(sys, "argv", ["convert_imgdir.py"] + argv)
    cli.run(mod.main, mod.build_parser())
    out = capsys.readouterr().out
    assert f"skipped {len(bad)} unreadable file(s)" in out
    for name, reason in (("nan.npz", "non-finite values in features"), ("too_big_for_fp16.npz", "in norm_bb"),
                         ("no_boxes.npz", "no boxes"), ("narrow.npz", "expected [boxes, 2048]"),
                         ("ragged.npz", "arrays hold"), ("flat_boxes.npz", "expected [boxes, 6]")):
        assert f"  {name}: ValueError: " in out and reason in out.split(f"  {name}: ")[1].splitlines()[0], out
    assert list(DetectFeatLmdb(str(tmp_path / "out" / "feats"), 0.2, 100, 0, 36, False).name2nbb) == ["good.npz"]


SCRIPT_CASES = [
    ("convert_imgdir", lambda t: ["--img_dir", str(t / "only_bad"), "--output", str(t / "o")],
     ["none of the 1 .npz files", "bad.npz", "non-finite"]),
    ("convert_imgdir", lambda t: ["--img_dir", str(t / "only_bad"), "--output", str(t / "o"), "--nproc", "0"],
     ["--nproc must be >= 1, got 0"]),
    ("convert_imgdir", lambda t: ["--img_dir", str(t / "nowhere"), "--output", str(t / "o")],
     ["--img_dir", "nowhere is not a directory"]),
    ("convert_imgdir", lambda t: ["--output", str(t / "o")], ["the following arguments are required: --img_dir"]),
    ("prepro_itm", lambda t: ["--annotation", _write(t / "a.json", "{"), "--vocab", str(t / "v.txt"),
                              "--output", str(t / "o")], ["a.json: invalid JSON"]),
    ("prepro_itm", lambda t: ["--annotation", _write(t / "a.json", '{"images": {}}'), "--vocab", str(t / "v.txt"),
                              "--output", str(t / "o")], ["no 'images' list"]),
    ("prepro_itm", lambda t: ["--annotation", _write(t / "a.json", '{"dataset": "coco", "images": [{"split": "x"}]}'),
                              "--vocab", str(t / "v.txt"), "--output", str(t / "o")],
     ["images[0] needs 'filename', 'split' and 'sentences'"]),
    ("prepro_itm", lambda t: ["--annotation", _write(t / "a.json", '{"images": []}'), "--vocab", str(t / "v.txt"),
                              "--output", str(t / "o")], ["unknown dataset None", "--dataset"]),
    ("prepro_itm", lambda t: ["--annotation", _write(t / "a.json", _KARPATHY), "--vocab", str(t / "v.txt"),
                              "--output", str(t / "o"), "--img_fname", "{nothing}.npz"],
     ["--img_fname '{nothing}.npz' does not fit image '1.jpg'", "KeyError"]),
    ("prepro_itm", lambda t: ["--annotation", _write(t / "a.json", _KARPATHY), "--vocab",
                              _write(t / "w.txt", "a\nb\n"), "--output", str(t / "o")], ["has no [UNK] token"]),
    ("prepro_itm", lambda t: ["--annotation", _write(t / "a.json", _KARPATHY), "--vocab", str(t / "v.txt"),
                              "--output", _existing_txt_db(t)], ["itm_flickr30k_val.db already holds an LMDB"]),
    ("isd", lambda t: _split_argv(t) + ["--output", str(t / "isd"), "--max_pairs", "0"],
     ["--max_pairs must be >= 1"]),
    ("isd", lambda t: _split_argv(t, **{"--checkpoint": saved(t / "e.pt", {})}) + ["--output", str(t / "isd")],
     ["e.pt holds a dict of 0 entries"]),
    ("isd", lambda t: _split_argv(t) + ["--output", str(t / "isd"), "--annotations", _write(t / "an.json", "[1]")],
     ["annotations", "must map text ids to lists"]),
    ("isd", lambda t: _split_argv(t) + ["--output", str(t / "isd"), "--annotations",
                                        _write(t / "an.json", '{"test_flickr30k_000000000000_0": [[[0], [99]]]}')],
     ["'test_flickr30k_000000000000_0' has", "boxes [99]"]),
    ("isd", lambda t: _split_argv(t, **{"--model_config": model_config(t / "m.json", num_hidden_layers=3)})
     + ["--output", str(t / "isd")], ["--allow_random_init"]),
    ("visualize_attention", lambda t: _split_argv(t) + ["--output", str(t / "a.png"), "--txt_id",
                                                        "test_flickr30k_000000000000_0", "--layer", "5"],
     ["--layer 5 is not a layer of the model (2 layers"]),
    ("visualize_attention", lambda t: _split_argv(t) + ["--output", str(t / "a.png"), "--txt_id", "nope"],
     ["--txt_id nope is not a text id"]),
    ("visualize_attention", lambda t: _split_argv(t) + ["--output", str(t / "a.png"), "--txt_id",
                                                        "test_flickr30k_000000000000_0", "--vocab",
                                                        _write(t / "v.json", "[1]")],
     ["--vocab", "must be a JSON object"]),
    ("make_demo_data", lambda t: ["--output", str(t / "d"), "--twins", "1.5"], ["--twins must be in [0, 1]"]),
    ("make_demo_data", lambda t: ["--output", str(t / "d"), "--n_val", "0"], ["--n_val must be >= 1"]),
    ("make_demo_data", lambda t: ["--output", str(t / "d"), "--seed", "-2"], ["--seed must be in [0, 4294967295]"]),
    ("make_demo_data", lambda t: ["--output", _write(t / "d", "notes")], ["--output", "d exists and is not a folder"]),
    ("visualize_attention", lambda t: _split_argv(t) + ["--txt_id", "test_flickr30k_000000000000_0", "--vocab",
                                                        _write(t / "v.json", "{}"), "--output", str(t / "v.json")],
     ["--output", "v.json is the same file as --vocab"]),
    ("isd", lambda t: _split_argv(t) + ["--output", str(t / "only_bad" / "bad.npz")],
     ["--output", "bad.npz exists and is not a folder"]),
]

_KARPATHY = json.dumps({"dataset": "flickr30k", "images": [
    {"filename": "1.jpg", "split": "val", "sentences": [{"raw": "a dog", "sentid": 0}]}]})


def _existing_txt_db(tmp_path):
    out = tmp_path / "txt"
    copy_txt_db(out / "itm_flickr30k_val.db")
    return str(out)


def _split_argv(tmp_path, **flags):
    args = {"--txt_db": TXT_DB, "--img_db": IMG_DB, "--checkpoint": REF_MODEL, "--model_config": TINY_CONFIG}
    args.update(flags)
    return [x for kv in args.items() for x in kv]


@pytest.mark.parametrize("script,argv,needles", SCRIPT_CASES,
                         ids=[f"{c[0]}-{k}" for k, c in enumerate(SCRIPT_CASES)])
def test_scripts_refuse(tmp_path, monkeypatch, capsys, script, argv, needles):
    (tmp_path / "only_bad").mkdir()
    _npz(tmp_path / "only_bad" / "bad.npz", features=np.full((12, 2048), np.inf, np.float32))
    (tmp_path / "v.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog"]) + "\n")
    code, err = entry(f"scripts.{script}", argv(tmp_path), monkeypatch, capsys)
    assert_one_line(code, err, *needles)
    assert not (tmp_path / "isd" / "isd.json").exists() and not (tmp_path / "a.png").exists()


def test_lmdb_write_errors_name_the_db(tmp_path, monkeypatch):
    import lmdb
    from data import DataError, write_txt_db

    def full(*args, **kwargs):
        raise lmdb.DiskError("mdb_env_open: No space left on device")

    monkeypatch.setattr(lmdb, "open", full)
    with pytest.raises(DataError, match=r"could not write the LMDB .*t\.db \(DiskError: .*No space left"):
        write_txt_db(str(tmp_path / "t.db"), {"a": {"input_ids": [1], "img_fname": "x"}}, {})
