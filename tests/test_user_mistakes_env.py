"""A user's mistakes in what surrounds the options: environment variables (the launcher's,
OpenMP's, the downloader's), a config naming another config or an empty path, checkpoints
saved from a wrapped model, a resumed run of another model size, outputs that cannot be
written and scripts run from a copy of the repository. Each ends in one line on stderr
naming the variable, key, flag or file and what to do, or in a correct result."""
import json
import logging
import os
import re
import shutil
import string
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FIXTURES, IMG_DB, ROOT, TINY_CONFIG, TXT_DB
from helpers import PY, assert_one_line, end_of_process, entry, free_port, run, run_state_released, tiny_train_config
from scripts.repo import child_env
from utils import distributed as dist
from utils.checkpoint import load_model_state
from utils.environment import EnvironmentVariableError, env_float, env_int, env_urls
from utils.threads import THREADS_VARIABLE, apply_default_policy, available_cores, default_threads

REF_MODEL = os.path.join(FIXTURES, "ref_model.pt")
REF_PRETRAIN = os.path.join(FIXTURES, "ref_pretrain.pt")
# every variable that says how a process was launched: none may leak in from the machine running the tests
LAUNCH_STATE = tuple(dist.LAUNCH_INTEGERS) + ("MASTER_ADDR", "TORCHELASTIC_RUN_ID", "HOROVOD_RANK",
                                              "OMPI_COMM_WORLD_RANK", "SLURM_PROCID", "SLURM_STEP_ID")


@pytest.fixture(autouse=True)
def _alone(monkeypatch):
    """A single process's environment; what an entry point run here holds is let go after."""
    for name in LAUNCH_STATE:
        monkeypatch.delenv(name, raising=False)
    with run_state_released():
        yield


def split_flags(**changes):
    flags = {"--txt_db": TXT_DB, "--img_db": IMG_DB, "--checkpoint": REF_MODEL, "--model_config": TINY_CONFIG}
    flags.update(changes)
    return [x for kv in flags.items() for x in kv]


def inf_argv(out, **changes):
    return split_flags(**changes) + ["--output_dir", str(out), "--batch_size", "8", "--n_workers", "0"]


# ----------------------------------------------------------------------------- launch variables

def _not_integers():
    return ["abc", "1.5", "2e3", "nan", "0x10", "--1", "1 2", "one", "٣.٠"]


def bad_launch_values():
    """(variable, value) pairs that torch.distributed or the LMDB readers cannot use."""
    for name, (low, high) in dist.LAUNCH_INTEGERS.items():
        for value in _not_integers() + [str(low - 1), str(low - 100)] + ([str(high + 1)] if high else []):
            yield name, value


# what each entry point needs to get past its own flags (the environment is checked next)
ENTRY_ARGV = {
    "inf_itm": lambda t: inf_argv(t / "out"),
    "train_itm_hard_negatives": lambda t: ["--config", tiny_train_config(t / "c.json"), "--output_dir", t / "out"],
    "scripts.isd": lambda t: split_flags() + ["--output", t / "out"],
    "scripts.visualize_attention": lambda t: split_flags() + ["--txt_id", "x", "--output", t / "out" / "a.png"],
    "scripts.make_demo_data": lambda t: ["--output", t / "out"],
}


@pytest.mark.parametrize("module", list(ENTRY_ARGV))
def test_every_entry_point_names_a_bad_launch_variable(tmp_path, monkeypatch, capsys, module):
    cases = list(bad_launch_values())
    assert len(cases) > 60
    for name, value in cases:
        monkeypatch.setenv(name, value)
        code, err = entry(module, ENTRY_ARGV[module](tmp_path), monkeypatch, capsys)
        assert_one_line(code, err, f"environment variable {name}=", "must be an integer", "unset it")
        assert not (tmp_path / "out").exists(), (name, value)
        monkeypatch.delenv(name)


# (environment, needles of the error line)
INCONSISTENT_LAUNCHES = [
    ({"RANK": "0", "WORLD_SIZE": "2"}, ["RANK=0 and WORLD_SIZE=2 are set but MASTER_ADDR is not", "torchrun",
                                        "unset RANK and WORLD_SIZE"]),
    ({"RANK": "0", "WORLD_SIZE": "8", "MASTER_PORT": "29500"}, ["but MASTER_ADDR is not"]),
    ({"RANK": "0", "WORLD_SIZE": "1"}, ["WORLD_SIZE=1 are set but MASTER_ADDR is not"]),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, ["but MASTER_PORT is not"]),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     ["RANK=2 must be below WORLD_SIZE=2"]),
    ({"WORLD_SIZE": "4"}, ["WORLD_SIZE=4 is set but RANK is not", "unset WORLD_SIZE"]),
    ({"RANK": "3"}, ["RANK=3 is set but WORLD_SIZE is not", "unset RANK"]),
    ({"RANK": "0", "WORLD_SIZE": " "}, ["RANK=0 is set but WORLD_SIZE is not"]),
    ({"LOCAL_RANK": "4", "LOCAL_WORLD_SIZE": "4"}, ["LOCAL_RANK=4 must be below LOCAL_WORLD_SIZE=4"]),
]


@pytest.mark.parametrize("env,needles", INCONSISTENT_LAUNCHES, ids=[" ".join(e) for e, _ in INCONSISTENT_LAUNCHES])
def test_an_inconsistent_launch_is_one_line(tmp_path, monkeypatch, capsys, env, needles):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, err = entry("inf_itm", inf_argv(tmp_path / "out"), monkeypatch, capsys)
    assert_one_line(code, err, *needles)
    assert not (tmp_path / "out").exists()


@given(st.one_of(st.integers(-10 ** 6, 10 ** 6).map(str), st.text(string.printable, max_size=8)),
       st.integers(0, 3), st.one_of(st.none(), st.integers(3, 100)))
@settings(max_examples=300, deadline=None)
def test_env_int_takes_exactly_the_integers_in_range(text, low, high):
    environ = {"N": text}
    integer = re.fullmatch(r"\s*[+-]?[0-9](_?[0-9])*\s*", text)
    if not text.strip():
        assert env_int("N", "unset", low, high, environ=environ) == "unset"
    elif integer and low <= int(text) <= (high if high is not None else int(text)):
        assert env_int("N", None, low, high, environ=environ) == int(text)
    else:
        with pytest.raises(EnvironmentVariableError, match=r"^environment variable N=.* must be an integer"):
            env_int("N", None, low, high, environ=environ)


def test_bad_launch_variables_end_a_real_process_in_one_line(tmp_path):
    """Through the command line, where torch.distributed would otherwise raise from its rendezvous."""
    cfg = tiny_train_config(tmp_path / "c.json")
    for env, needle in (({"LOCAL_WORLD_SIZE": "abc"}, "LOCAL_WORLD_SIZE=abc must be an integer >= 1"),
                        ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR is not")):
        res = run(["train_itm_hard_negatives.py", "--config", cfg, "--output_dir", str(tmp_path / "out")],
                  env=env, timeout=120)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert [line for line in res.stderr.splitlines() if line.strip()] == \
            [line for line in res.stderr.splitlines() if ": error: " in line] and needle in res.stderr
        assert not (tmp_path / "out").exists()


def test_a_launch_set_by_hand_still_runs(tmp_path):
    """RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT exported by hand (no torchrun): a process
    group of one, with the same recall as a plain single process."""
    outs = {}
    for name, env in (("plain", {}), ("by_hand", {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                                                   "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                                                   "MASTER_PORT": str(free_port())})):
        outs[name] = tmp_path / name
        res = run(["inf_itm.py"] + inf_argv(outs[name]), env=env, timeout=180)
        assert res.returncode == 0, res.stderr[-3000:]
    plain, by_hand = (json.loads((out / "scores.json").read_text()) for out in outs.values())
    assert plain == by_hand and "img_r1" in plain


# ----------------------------------------------------------------------------- OMP_NUM_THREADS

THREAD_VALUES = {"abc": False, "0": False, "-1": False, "2.5": False, "1,0": False, "four": False,
                 "1": True, " 2": True, "007": True, "1,1": True, "": None}


def gnu_openmp():
    """The GNU OpenMP runtime torch loads (its wheel's own copy, else the system's)."""
    import ctypes.util
    import glob
    import importlib.util
    torch_lib = os.path.join(os.path.dirname(importlib.util.find_spec("torch").origin), "lib")
    found = sorted(glob.glob(os.path.join(torch_lib, "libgomp*.so*"))) or [ctypes.util.find_library("gomp")]
    if not found[0]:
        pytest.skip("no GNU OpenMP runtime to judge the thread counts")
    return found[0]


def openmp_reads(value, policy=True):
    """(threads OpenMP computes with, the variable as it saw it, stderr) of a process that
    loads OpenMP with OMP_NUM_THREADS=value, after utils.threads (``policy``) or without."""
    probe = (("import utils.threads; " if policy else "") + "import ctypes, os; "
             f"gomp = ctypes.CDLL({gnu_openmp()!r}); "
             "print(gomp.omp_get_max_threads(), repr(os.environ['OMP_NUM_THREADS']), flush=True)")
    res = subprocess.run([PY, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=child_env(**{THREADS_VARIABLE: value}))
    assert res.returncode == 0, res.stderr
    threads, seen = res.stdout.strip().split(" ", 1)
    return int(threads), seen, res.stderr


def test_a_thread_count_openmp_rejects_is_replaced_with_a_warning():
    """OpenMP itself is the judge: after the policy it never complains, and a value it would
    reject (then taking every core) gives way to the default, said in one warning line."""
    default = default_threads(available_cores())
    for value, valid in THREAD_VALUES.items():
        if valid is not None:  # the values sorted as OpenMP sorts them
            rejected = "libgomp: Invalid value for environment variable" in openmp_reads(value, False)[2]
            assert rejected != valid, value
        threads, seen, err = openmp_reads(value)
        assert "libgomp" not in err and "Traceback" not in err, (value, err)
        warnings = [line for line in err.splitlines() if ": warning: " in line]
        if valid:
            assert seen == repr(value) and warnings == [], (value, err)
            assert threads == int(value.split(",")[0]), value
        else:
            assert seen == repr(str(default)) and threads == default, (value, seen)
            assert len(warnings) == (1 if value else 0), (value, err)
            assert not value or (f"OMP_NUM_THREADS={value!r}" in warnings[0] and "unset it" in warnings[0])


@given(st.one_of(st.integers(-50, 50).map(str), st.text(string.printable, max_size=6)), st.integers(1, 64))
@settings(max_examples=300, deadline=None)
def test_the_thread_policy_keeps_exactly_the_positive_counts(text, cores):
    environ, said = {THREADS_VARIABLE: text}, []
    set_now = apply_default_policy(environ, cores, warn=said.append)
    counts = [part.strip() for part in text.split(",")]
    valid = all(re.fullmatch(r"[0-9]+", c) and int(c) > 0 for c in counts)
    if valid:
        assert set_now == {} and environ[THREADS_VARIABLE] == text and said == []
    else:
        assert environ[THREADS_VARIABLE] == str(max(1, cores - 1))
        assert len(said) == (1 if text.strip() else 0)


# ----------------------------------------------------------------------------- download settings

BAD_DOWNLOAD_SETTINGS = (
    [("UNITER_BLOB", v, "is not a URL") for v in ("notaurl", "ftp://host/uniter", "http://", "https:/x/y",
                                                   "host.org/uniter", "http://[::1/x")]
    + [("BERT_VOCAB_URL", v, "is not a URL") for v in ("vocab.txt", "file:///tmp/vocab.txt")]
    + [("IAIS_RELEASE_API", "nothing", "is not a URL"), ("IAIS_RELEASE_API", "http://a/b http://c/d", "holds 2 URLs")]
    + [("RETRY_WAIT", v, "must be a finite number in [0, 3600]") for v in ("nan", "inf", "-inf", "-1", "1e9", "x")]
    + [("DOWNLOAD_TIMEOUT", v, "must be a finite number in (0, 3600]") for v in ("nan", "0", "-5", "inf", "0.0")]
    + [("RETRIES", v, "must be an integer >= 1") for v in ("0", "-2", "many", "2.5")]
)


class CountingHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.requests.append(self.path)
        self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture
def host():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), CountingHandler)
    httpd.requests, httpd.url = [], f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_download_settings_are_checked_before_anything_is_fetched(tmp_path, host, monkeypatch, capsys):
    from scripts import download_itm
    base = {"UNITER_BLOB": f"{host.url}/uniter", "BERT_VOCAB_URL": f"{host.url}/vocab.txt",
            "IAIS_RELEASE_API": f"{host.url}/api", "RETRIES": "1", "RETRY_WAIT": "0", "DOWNLOAD_TIMEOUT": "5"}
    storage = tmp_path / "st"
    for name, value, needle in BAD_DOWNLOAD_SETTINGS:
        for mode in ([], ["--dry-run"], ["--only", "vocab"]):
            for key, setting in {**base, name: value}.items():
                monkeypatch.setenv(key, setting)
            with pytest.raises(SystemExit) as exited:
                download_itm.main(mode + [str(storage)])
            err = capsys.readouterr().err
            assert exited.value.code == 1 and err.count("\n") == 1, (name, value, err)
            assert err.startswith("download_itm.sh: error: environment variable ") and name in err and needle in err
            assert not storage.exists() and host.requests == [], (name, value)


def test_a_bad_download_setting_through_the_shell_script(tmp_path):
    res = subprocess.run(["bash", os.path.join(ROOT, "scripts", "download_itm.sh"), str(tmp_path / "st")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "DOWNLOAD_TIMEOUT": "0", "UNITER_BLOB": "http://127.0.0.1:9/uniter"})
    assert res.returncode == 1 and res.stdout == "" and res.stderr.count("\n") == 1, res.stderr
    assert "DOWNLOAD_TIMEOUT=0 must be a finite number in (0, 3600]" in res.stderr
    assert not (tmp_path / "st").exists()


@given(st.floats(allow_nan=True, allow_infinity=True), st.booleans())
@settings(max_examples=200, deadline=None)
def test_env_float_takes_exactly_the_finite_numbers_in_range(number, open_low):
    environ = {"S": repr(number)}
    if number == number and abs(number) != float("inf") and (0 < number <= 10 or (number == 0 and not open_low)):
        assert env_float("S", None, 0.0, 10.0, low_open=open_low, environ=environ) == number
    else:
        with pytest.raises(EnvironmentVariableError, match="^environment variable S="):
            env_float("S", None, 0.0, 10.0, low_open=open_low, environ=environ)


def test_env_urls_keeps_good_lists():
    environ = {"U": " https://a.org/x  http://127.0.0.1:8000/y/ "}
    assert env_urls("U", ["d"], environ=environ) == ["https://a.org/x", "http://127.0.0.1:8000/y/"]
    assert env_urls("U", ["d"], environ={}) == ["d"] == env_urls("U", ["d"], environ={"U": "  "})


# ----------------------------------------------------------------------------- configs

def train_parser_strings():
    """The string options of training whose value is a path or a name (no choices)."""
    import train_itm_hard_negatives as train
    return [a.dest for a in train.build_parser()._actions
            if a.type is str and a.choices is None and a.dest not in ("config", "output_dir")]


def test_an_empty_string_in_a_config_is_refused(tmp_path, monkeypatch, capsys):
    keys = train_parser_strings()
    assert "checkpoint" in keys and "negative_groups" in keys
    for key in keys:
        cfg = tiny_train_config(tmp_path / "c.json", **{key: ""})
        code, err = entry("train_itm_hard_negatives", ["--config", cfg, "--output_dir", tmp_path / "out"],
                          monkeypatch, capsys)
        assert_one_line(code, err, f"c.json: {key} is an empty string", "leave the key out (or null)")
        assert not (tmp_path / "out").exists()
    for key in keys + ["output_dir"]:
        cfg = tiny_train_config(tmp_path / "c.json")
        argv = ["--config", cfg, "--output_dir", tmp_path / "out"] + [f"--{key}", ""]
        code, err = entry("train_itm_hard_negatives", argv, monkeypatch, capsys)
        assert_one_line(code, err, f"--{key} is an empty string")
        assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_null_or_none_means_random_initialisation(tmp_path):
    import train_itm_hard_negatives as train
    from utils.config import parse_with_config
    with_checkpoint = json.loads(open(tiny_train_config(tmp_path / "c.json")).read())
    without = {k: v for k, v in with_checkpoint.items() if k != "checkpoint"}
    for config in ({**without, "checkpoint": None}, without):
        (tmp_path / "c.json").write_text(json.dumps(config))
        opts = parse_with_config(train.build_parser(), ["--config", str(tmp_path / "c.json")], train.CONFIG_ONLY_KEYS)
        assert opts.checkpoint is None and opts.train_txt_dbs == [TXT_DB]


@pytest.mark.parametrize("value", ["other.json", None, 3, ["a.json", "b.json"], {"lr": 1}])
def test_a_config_cannot_name_another_config(tmp_path, monkeypatch, capsys, value):
    cfg = tiny_train_config(tmp_path / "c.json", config=value)
    code, err = entry("train_itm_hard_negatives", ["--config", cfg, "--output_dir", tmp_path / "out"],
                      monkeypatch, capsys)
    assert_one_line(code, err, "c.json: a config cannot name another config (key 'config')")
    assert "did you mean" not in err and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- checkpoints

def prefixed(path, dst, prefix, share=1.0):
    state = torch.load(path, weights_only=True)
    cut = int(len(state) * share)
    torch.save({(prefix + k if i < cut else k): v for i, (k, v) in enumerate(state.items())}, dst)
    return str(dst)


@pytest.mark.parametrize("source", [REF_MODEL, REF_PRETRAIN], ids=["retrieval", "pre-training"])
def test_a_checkpoint_of_a_wrapped_model_scores_as_the_plain_one(tmp_path, monkeypatch, capsys, caplog, source):
    from utils import cli
    import inf_itm
    caplog.set_level(logging.INFO)
    matrices = {}
    for name, prefix in (("plain", ""), ("ddp", "module."), ("twice", "module.module.")):
        checkpoint = prefixed(source, tmp_path / f"{name}.pt", prefix)
        caplog.clear()
        monkeypatch.setattr(sys, "argv", ["inf_itm.py"] + inf_argv(tmp_path / name, **{"--checkpoint": checkpoint}))
        cli.run(inf_itm.main, inf_itm.build_parser())
        end_of_process()
        matrices[name] = torch.load(tmp_path / name / "score_matrix.pt", weights_only=True)
        said = [r.getMessage() for r in caplog.records if "saved from a wrapped model" in r.getMessage()]
        names = len(torch.load(checkpoint, weights_only=True))
        assert said == ([] if not prefix else [f"checkpoint {checkpoint} was saved from a wrapped model: the prefix "
                                               f"'{prefix}' is removed from its {names} names"])
        assert not [r for r in caplog.records if "module." in r.getMessage() and r.getMessage() not in said]
    for name in ("ddp", "twice"):
        assert torch.equal(matrices[name]["scores"], matrices["plain"]["scores"])
        assert matrices[name]["txt_ids"] == matrices["plain"]["txt_ids"]


def test_wrapped_weights_load_as_the_plain_ones(tmp_path):
    plain = load_model_state(REF_MODEL)
    for prefix in ("module.", "module.module.module."):
        loaded = load_model_state(prefixed(REF_MODEL, tmp_path / "w.pt", prefix))
        assert list(loaded) == list(plain) and all(torch.equal(loaded[k], plain[k]) for k in plain)
    # a prefix on some names only is no wrapping: the names stay, and what they fill is checked
    partial = load_model_state(prefixed(REF_MODEL, tmp_path / "p.pt", "module.", share=0.5))
    assert sum(k.startswith("module.") for k in partial) == len(plain) // 2


def test_a_partly_prefixed_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    checkpoint = prefixed(REF_MODEL, tmp_path / "p.pt", "module.", share=0.5)
    state = torch.load(REF_MODEL, weights_only=True)
    behind = sum(k.startswith("uniter.") for k in list(state)[:len(state) // 2])
    code, err = entry("inf_itm", inf_argv(tmp_path / "out", **{"--checkpoint": checkpoint}), monkeypatch, capsys)
    assert_one_line(code, err, "p.pt has", f"{behind} of its names are the model's behind the prefix 'module.' "
                    f"(first: module.uniter.")
    assert not (tmp_path / "out" / "scores.json").exists()


# ----------------------------------------------------------------------------- --resume of another size

@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    """A finished run of 2 steps (a checkpoint at step 2) and its config."""
    folder = tmp_path_factory.mktemp("two_step")
    cfg = tiny_train_config(folder / "c.json", num_train_steps=2, valid_steps=2)
    res = run(["train_itm_hard_negatives.py", "--config", cfg, "--output_dir", str(folder / "run")], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return folder / "run"


def _model_config(path, **changes):
    config = {**json.loads(open(TINY_CONFIG).read()), **changes}
    path.write_text(json.dumps(config))
    return config


@pytest.mark.parametrize("changes,accept", [
    ({"num_hidden_layers": 3}, True), ({"hidden_size": 32, "intermediate_size": 64}, True),
    ({"num_hidden_layers": 1}, False), ({"hidden_size": 128}, False),
], ids=["deeper-accepted", "narrower-accepted", "shallower-record-edited", "wider-record-edited"])
def test_resume_with_a_model_of_another_size_is_one_line(tmp_path, monkeypatch, capsys, two_step_run, changes,
                                                        accept):
    """--resume_with_changes and a model config of another size, or a log/model.json edited to
    match one: the weights are named, and the run's files stay as they were."""
    out = tmp_path / "run"
    shutil.copytree(two_step_run, out)
    config = _model_config(tmp_path / "m.json", **changes)
    if not accept:
        recorded = json.loads((out / "log" / "model.json").read_text())
        (out / "log" / "model.json").write_text(json.dumps({**config, **{k: recorded[k] for k in recorded
                                                                          if k.endswith("dropout_prob")}}))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    cfg = tiny_train_config(tmp_path / "c.json", num_train_steps=2 + accept * 2, valid_steps=2,
                            model_config=str(tmp_path / "m.json"))
    argv = ["--config", cfg, "--output_dir", out, "--resume"] + (["--resume_with_changes"] if accept else [])
    code, err = entry("train_itm_hard_negatives", argv, monkeypatch, capsys)
    assert_one_line(code, err, "--resume:", "model_step_2.pt does not fit the model of", "m.json",
                    "resume with the model config the run was trained with")
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for name, data in before.items():
        if name.name != "run.json":  # the launch record gains this attempt
            assert after[name] == data, name


# ----------------------------------------------------------------------------- outputs

def test_an_output_dir_that_is_a_file_is_refused_before_the_evaluation(tmp_path, monkeypatch, capsys):
    import inf_itm

    def no_evaluation(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(inf_itm, "load_model", no_evaluation)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    (tmp_path / "link").symlink_to(notes)
    cases = {str(notes): "exists and is not a folder", str(tmp_path / "link"): "exists and is not a folder",
             os.devnull: "exists and is not a folder", str(notes / "out"): "which is a file, not a folder",
             str(tmp_path / "link" / "a" / "b"): "which is a file, not a folder"}
    for out, needle in cases.items():
        code, err = entry("inf_itm", inf_argv(out), monkeypatch, capsys)
        assert_one_line(code, err, f"--output_dir {out}", needle, "choose another --output_dir")
    assert notes.read_text() == "mine"


def test_visualize_attention_refuses_what_it_cannot_write_or_read_before_any_work(tmp_path, monkeypatch, capsys):
    import scripts.visualize_attention as vis

    def no_work(*args, **kwargs):
        raise AssertionError("the split was opened")

    monkeypatch.setattr(vis, "open_split", no_work)
    argv = split_flags() + ["--txt_id", "test_flickr30k_000000000000_0"]
    for extension in (".xyz", ".pngg", ".txt", ".json", ".PNG2", ".mp4"):
        out = tmp_path / f"a{extension}"
        code, err = entry("scripts.visualize_attention", argv + ["--output", out], monkeypatch, capsys)
        assert_one_line(code, err, f"--output {out}: {extension.lower()} is not an image format", ".png", ".pdf")
        assert not out.exists()
    (tmp_path / "latin1.txt").write_bytes("[PAD]\ncaf\xe9\n".encode("latin-1"))
    (tmp_path / "latin1.json").write_bytes('{"caf\xe9": 3}'.encode("latin-1"))
    (tmp_path / "utf16.txt").write_bytes("[PAD]\n".encode("utf-16"))
    vocabs = {"latin1.txt": "latin1.txt is not UTF-8 text", "latin1.json": "latin1.json is not UTF-8 text",
              "utf16.txt": "utf16.txt is not UTF-8 text", "missing.txt": "missing.txt not found",
              "missing.json": "missing.json not found", ".": "is a folder"}
    for name, needle in vocabs.items():
        code, err = entry("scripts.visualize_attention", argv + ["--output", tmp_path / "a.png", "--vocab",
                                                                 tmp_path / name], monkeypatch, capsys)
        assert_one_line(code, err, "--vocab", needle)
        assert not (tmp_path / "a.png").exists()


# ----------------------------------------------------------------------------- a copy of the repository

def copy_of_repository(dst):
    """The files git tracks, as they are in the work tree, copied to ``dst``; its utils/
    package says on stderr where it was imported from."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in files.decode().split("\0"):
        if rel and os.path.isfile(os.path.join(ROOT, rel)):
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), os.path.join(dst, rel))
    with open(os.path.join(dst, "utils", "__init__.py"), "a") as f:
        f.write("\nimport sys as _sys\n_sys.stderr.write('utils imported from ' + __file__ + '\\n')\n")


def decoy_path(dst):
    """A folder whose packages carry this repository's names and refuse to be imported."""
    for package in ("utils", "data", "model", "engine", "scripts"):
        os.makedirs(os.path.join(dst, package))
        with open(os.path.join(dst, package, "__init__.py"), "w") as f:
            f.write(f"raise ImportError('the {package} package of another clone was imported')\n")
    return str(dst)


SCRIPTS_RUN_DIRECTLY = ("isd", "retrieval_metrics", "visualize_attention", "download_itm")


def test_scripts_of_a_moved_copy_import_their_own_modules(tmp_path):
    copy = tmp_path / "moved" / "clone"
    copy_of_repository(str(copy))
    decoy = decoy_path(tmp_path / "other")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for script in SCRIPTS_RUN_DIRECTLY:
        for env in ({**base, "PYTHONPATH": decoy}, base):
            res = subprocess.run([PY, str(copy / "scripts" / f"{script}.py"), "--help"], cwd=elsewhere,
                                 capture_output=True, text=True, timeout=120, env=env)
            assert res.returncode == 0, (script, res.stderr[-2000:])
            assert res.stdout.startswith("usage: "), res.stdout
            assert f"utils imported from {copy / 'utils' / '__init__.py'}\n" == res.stderr, (script, res.stderr)


# scripts that still need the repository on the path (PYTHONPATH or the venv's .pth, README, Troubleshooting)
WITHOUT_BOOTSTRAP = set()
BOOTSTRAP = ["import sys", "from os.path import dirname, realpath",
             "sys.path.insert(0, dirname(dirname(realpath(__file__))))"]


def test_every_script_run_directly_finds_its_repository():
    import ast
    lacking = set()
    for name in sorted(os.listdir(os.path.join(ROOT, "scripts"))):
        path = os.path.join(ROOT, "scripts", name)
        if not name.endswith(".py") or "__main__" not in open(path).read():
            continue
        tree = ast.parse(open(path).read())
        body = tree.body[1:] if isinstance(tree.body[0], ast.Expr) else tree.body  # after the docstring
        if [ast.unparse(node) for node in body[:3]] != BOOTSTRAP:
            lacking.add(name)
    assert lacking <= WITHOUT_BOOTSTRAP, sorted(lacking - WITHOUT_BOOTSTRAP)
    assert "isd.py" not in lacking and "download_itm.py" not in lacking
