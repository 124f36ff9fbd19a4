"""Tables of scripts/compare_runs.py: Markdown (printed and PREFIX.md), LaTeX, CSV and JSON,
each written atomically (a temporary file in the same folder, then a rename)."""
import csv
import io
import json
import os
from os.path import basename, dirname, exists, join

OUTPUT_KINDS = ("md", "tex", "csv", "json")
TWIN_LABELS = {"text": "Winoground text", "image": "Winoground image", "group": "Winoground group",
               "own_vs_twin": "own-vs-twin"}
CSV_COLUMNS = ("kind", "arm", "minus", "metric", "n", "mean", "std", "ci95_lo", "ci95_hi", "p", "pairing",
               "interval")
_TEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"}
_TEX_SPECIAL.update({"~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"})


def label(key):
    """Column title of a metric: img_r1 -> image R@1 (a caption finds its image), txt_r5 -> text R@5."""
    if key == "rsum":
        return "RSUM"
    if key in TWIN_LABELS:
        return TWIN_LABELS[key]
    side, k = key.split("_r")
    return f"{'image' if side == 'img' else 'text'} R@{k}"


def arm_cell(s, latex=False):
    """mean ± std [95% interval] in percent; for one run its value and n=1."""
    if s["std"] is None:
        return f"{100 * s['mean']:.2f} (n=1)"
    if latex:
        return f"{100 * s['mean']:.2f} $\\pm$ {100 * s['std']:.2f}"
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f} [{100 * s['ci95'][0]:.2f}, {100 * s['ci95'][1]:.2f}]"


def diff_cell(d, latex=False):
    """difference [95% interval] p in percentage points."""
    def signed(x):
        return f"${100 * x:+.2f}$" if latex else f"{100 * x:+.2f}"

    text = signed(d["diff"])
    if d["ci95"] is not None:
        text += f" [{signed(d['ci95'][0])}, {signed(d['ci95'][1])}]"
    return text + f" p={d['p']:.3g}"


def seeds_text(arm):
    return ", ".join("?" if r["seed"] is None else str(r["seed"]) for r in arm["runs"])


def pairs_text(d):
    return f"{d['n']} {d['pairing']}, {d['interval']}"


def _md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def markdown(result):
    keys = result["metrics"]
    lines = [f"Per arm: mean ± sample standard deviation over runs [95% Student-t interval over runs], "
             f"percent ({result['counting']} recall counting; image R@K: a caption finds its image, "
             f"text R@K: an image finds a caption).", ""]
    lines += _md_table(["arm", "n", "seeds"] + [label(k) for k in keys],
                       [[a["name"], len(a["runs"]), seeds_text(a)] + [arm_cell(a["summary"][k]) for k in keys]
                        for a in result["arms"]])
    if result["differences"]:
        interval = (f" [95% bootstrap interval, {result['bootstrap']} resamples of the seeds (and of the queries "
                    f"within each seed where every run has a score matrix)]" if result["bootstrap"] else "")
        lines += ["", f"Differences, percentage points: mean over paired runs{interval}, two-sided sign-flip p "
                      f"over seeds.", ""]
        lines += _md_table(["difference", "pairs, interval over"] + [label(k) for k in keys],
                           [[f"{d['arm']} - {d['minus']}", pairs_text(d)] + [diff_cell(d["metrics"][k]) for k in keys]
                            for d in result["differences"]])
    return "\n".join(lines) + "\n"


def tex_escape(text):
    return "".join(_TEX_SPECIAL.get(c, c) for c in str(text))


def _tex_tabular(header, rows):
    lines = [r"\begin{tabular}{" + "l" * 2 + "r" * (len(header) - 2) + "}", r"\hline",
             " & ".join(header) + r" \\", r"\hline"]
    return lines + [" & ".join(row) + r" \\" for row in rows] + [r"\hline", r"\end{tabular}"]


def latex(result):
    keys = result["metrics"]
    header = [tex_escape(label(k)) for k in keys]
    lines = [f"% mean $\\pm$ sample standard deviation over runs, percent ({result['counting']} recall counting)"]
    lines += _tex_tabular(["arm", "$n$"] + header,
                          [[tex_escape(a["name"]), str(len(a["runs"]))]
                           + [arm_cell(a["summary"][k], True) for k in keys] for a in result["arms"]])
    if result["differences"]:
        lines += ["", "% difference [95% bootstrap interval] and sign-flip p, percentage points"]
        lines += _tex_tabular(["difference", "pairs"] + header,
                              [[f"{tex_escape(d['arm'])} $-$ {tex_escape(d['minus'])}", tex_escape(pairs_text(d))]
                               + [diff_cell(d["metrics"][k], True) for k in keys] for d in result["differences"]])
    return "\n".join(lines) + "\n"


def csv_text(result):
    """One row per arm and metric, then one per difference and metric (fractions)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for a in result["arms"]:
        for k, s in a["summary"].items():
            lo, hi = s["ci95"] or ("", "")
            writer.writerow({"kind": "arm", "arm": a["name"], "metric": k, "n": s["n"], "mean": s["mean"],
                             "std": "" if s["std"] is None else s["std"], "ci95_lo": lo, "ci95_hi": hi})
    for d in result["differences"]:
        for k, m in d["metrics"].items():
            lo, hi = m["ci95"] or ("", "")
            writer.writerow({"kind": "difference", "arm": d["arm"], "minus": d["minus"], "metric": k, "n": d["n"],
                             "mean": m["diff"], "ci95_lo": lo, "ci95_hi": hi, "p": m["p"],
                             "pairing": d["pairing"], "interval": d["interval"]})
    return out.getvalue()


def write_atomic(path, text):
    """``text`` to ``path`` through a temporary file in the same folder and a rename."""
    folder = dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = join(folder, f".{basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if exists(tmp):
            os.remove(tmp)


def print_and_write(result, outputs):
    """Print the Markdown tables; write each of ``outputs`` ({kind: path}) if given."""
    texts = {"md": markdown, "tex": latex, "csv": csv_text, "json": lambda r: json.dumps(r, indent=2) + "\n"}
    print(markdown(result), end="")
    for kind, path in outputs.items():
        write_atomic(path, texts[kind](result))
