"""The end of a training run: the test split with the last and the best weights, the
curves picture, and the line that says how to resume a run a signal stopped."""
import shlex
import sys

from utils import distributed as dist
from utils.checkpoint import load_model_state
from utils.curves import draw_run
from utils.logger import LOGGER
from utils.retrieval_metrics import counting_name, format_recall_table, gt_image_index, scored_counts

from .evaluation import evaluate
from .output_dir import write_best_test_results, write_test_results


def _print_table(title, log, original_counting):
    table = format_recall_table(log, original_counting)
    LOGGER.info("%s:\n%s", title, table)
    print(f"{title}:\n{table}")


def scored_of(dataset):
    """What an evaluation of ``dataset`` (an ItmEvalDataset, whose ranks share the split's
    captions) scores: utils.retrieval_metrics.scored_counts of the whole split."""
    txt_ids = list(dataset.txt_db.id2len)
    return scored_counts(txt_ids, dataset.all_img_ids, gt_image_index(txt_ids, dataset.all_img_ids, dataset.txt2img))


def test_last_and_best(model, test_loader, last_step, best, folders, tb, original_counting, amp):
    """Evaluate the test split with the weights of ``last_step`` (the model as it is) and,
    when ``best`` (an engine.best.BestCheckpoint) knows a best validation, with ckpt/best.pt
    (the same numbers, not evaluated twice, when it is the last step's). Writes
    results_test/results_{last_step}.json and results_test/best.json, prints both tables.
    ``amp()`` gives the autocast context. -> (last step's log, best's log or None)."""
    counting, scored = counting_name(original_counting), scored_of(test_loader.dataset)
    with amp():
        last_log = evaluate(model, test_loader, original_counting=original_counting)
    tb.log_scalar_dict(last_log, last_step, "eval/test_")
    if dist.is_main_process():
        write_test_results(folders, last_step, last_log, counting, scored)
        _print_table(f"test split, last weights (step {last_step})", last_log, original_counting)
    if best is None or best.step is None:
        return last_log, None
    best_log = last_log
    if best.step != last_step:
        model.load_state_dict(load_model_state(best.weights_path, "best checkpoint"))
        with amp():
            best_log = evaluate(model, test_loader, original_counting=original_counting)
    tb.log_scalar_dict(best_log, best.step, "eval/best_test_")
    if dist.is_main_process():
        record = {"step": best.step, "metric": best.metric, "value": best.value}
        write_best_test_results(folders, record, best_log, counting, scored)
        _print_table(f"test split, best weights (step {best.step}, {best.metric} {best.value:.4f})", best_log,
                     original_counting)
    return last_log, best_log


def draw_curves_at_end(folders):
    """log/curves.png of the run (rank 0); a failure to draw is a warning, never the run's end."""
    if not dist.is_main_process():
        return
    try:
        LOGGER.info("curves: %s", draw_run(folders.log))
    except Exception as e:  # noqa: BLE001  (the picture is a convenience: nothing may fail the run here)
        LOGGER.warning("could not draw %s/curves.png (%s: %s); scripts/plot_run.py draws it from "
                       "log/metrics.jsonl", folders.log, type(e).__name__, " ".join(str(e).split())[:200])


def resume_command(argv, executable=None, world_size=1):
    """The command that resumes a run started with ``argv`` (sys.argv): the same with
    --resume (added unless there); a distributed run's under the same launcher as before."""
    args = list(argv) + ([] if "--resume" in argv else ["--resume"])
    if world_size > 1:
        return f"the launcher as before with {shlex.join(args)}"
    return shlex.join([executable or sys.executable] + args)


def report_interrupted(stopped, argv):
    """The one line of a run stopped by a signal (rank 0): the checkpoint and how to resume."""
    if dist.is_main_process():
        print(f"{stopped}: checkpoint {stopped.checkpoint}; resume with: "
              f"{resume_command(argv, world_size=dist.get_world_size())}", file=sys.stderr, flush=True)
