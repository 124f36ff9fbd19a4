"""log/metrics.jsonl (written by the TensorBoard logger), the curves picture and scripts/plot_run.py."""
import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import run
from utils.curves import draw_curves, panel_names, read_metrics
from utils.logger import TensorBoardLogger

PNG = b"\x89PNG\r\n\x1a\n"


def test_every_scalar_goes_to_tensorboard_and_metrics_jsonl(tmp_path):
    tb = TensorBoardLogger(str(tmp_path))
    tb.add_scalar("loss_step", 0.5, 1)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, "name": "loss_step", "value": 0.5}]  # flushed
    tb.log_scalar_dict({"recall_1": 0.25, "recall_5": float("nan")}, 2, "valid/")
    tb.close()
    entries = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert entries[1:] == [{"step": 2, "name": "valid/recall_1", "value": 0.25},
                           {"step": 2, "name": "valid/recall_5", "value": None}]
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("valid/recall_1")] == [(2, 0.25)]
    TensorBoardLogger(None).add_scalar("lr", 1.0, 1)  # other ranks: nothing


def test_read_metrics_keeps_the_last_value_of_a_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "name": "lr", "value": 1.0}, {"step": 2, "name": "lr", "value": 2.0},
             {"step": 2, "name": "lr", "value": 3.0}, {"step": 3, "name": "grad_norm", "value": None}]
    path.write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"step": 4, "na')  # killed mid-line
    assert read_metrics(path) == {"lr": ([1, 2], [1.0, 3.0])}


def test_panels_and_picture(tmp_path):
    a = {"loss_step": ([1, 2], [1.0, 0.5]), "rank_loss": ([1, 2], [0.9, 0.4]), "lr": ([1, 2], [1e-3, 5e-4]),
         "grad_norm": ([1], [1.0]), "perf/ex_per_s": ([1], [5.0]), "valid/recall_10": ([2], [0.5]),
         "valid/recall_5": ([2], [0.3]), "valid/ex_per_s": ([2], [9.0]), "eval/test_r_mean": ([2], [0.4])}
    b = {"loss_step": ([1], [2.0]), "self_attn_loss": ([1], [0.1]), "weight/iais-singular": ([1], [0.01])}
    assert panel_names({"a": a, "b": b}) == ["loss_step", "rank_loss", "self_attn_loss", "lr",
                                             "weight/iais-singular", "valid/recall_5", "valid/recall_10"]
    out = draw_curves({"a": a, "b": b}, str(tmp_path / "c.png"))
    assert open(out, "rb").read(8) == PNG


def _metrics_dir(root, name, scale):
    log = root / name / "log"
    log.mkdir(parents=True)
    entries = [{"step": s, "name": "loss_step", "value": scale / s} for s in (1, 2, 3)]
    entries.append({"step": 3, "name": "valid/recall_mean", "value": scale / 4})
    (log / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return str(root / name)


def test_plot_run_overlays_runs(tmp_path):
    runs = [_metrics_dir(tmp_path, "base", 1.0), _metrics_dir(tmp_path, "iais", 0.5)]
    out = tmp_path / "pics" / "both.png"
    res = run(["scripts/plot_run.py", *runs, "--output", str(out)])
    assert res.returncode == 0, res.stderr
    assert out.read_bytes()[:8] == PNG
    res = run(["scripts/plot_run.py", runs[0] + "/log", "--output", str(tmp_path / "one.png")])
    assert res.returncode == 0, res.stderr
    res = run(["scripts/plot_run.py", str(tmp_path / "missing")])
    assert res.returncode == 2 and "no log/metrics.jsonl" in res.stderr and res.stderr.count("\n") == 1


def test_a_picture_that_cannot_be_drawn_is_a_warning(tmp_path, caplog):
    from engine.output_dir import RunFolders
    from engine.run_end import draw_curves_at_end
    (tmp_path / "log").mkdir()  # no metrics.jsonl
    draw_curves_at_end(RunFolders(str(tmp_path)))
    assert [r.levelname for r in caplog.records if "curves.png" in r.getMessage()] == ["WARNING"]
    assert not (tmp_path / "log" / "curves.png").exists()
