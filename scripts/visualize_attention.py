"""Heatmaps of the attention IAIS aligns, for one image-text pair.

    python scripts/visualize_attention.py --txt_db demo/txt_db/itm_demo_test.db \\
        --img_db demo/img_db/demo --checkpoint demo/output/ckpt/model_step_2500.pt \\
        --model_config config/uniter-demo.json --txt_id test_demo_000000001100_0 \\
        --output demo/attention.png [--layer -1] [--vocab demo/vocab.json]

Four panels of the chosen layer (head-averaged): the textual self-attention, the visual
self-attention, and the pseudo textual attention of singular and distributed alignment
(the visual attention mapped onto the words). Axes are labelled with the caption's tokens
(words from --vocab, a JSON {token: id} or a BERT vocab.txt; ids otherwise) and box indices.
"""
import sys  # the repository this file is in comes first, whatever the path names (another clone, none)
from os.path import dirname, realpath
sys.path.insert(0, dirname(dirname(realpath(__file__))))
import utils.threads  # noqa: E402,F401  (next: sets the OpenMP thread count before torch loads OpenMP)
import os
from os.path import abspath, dirname, splitext

from data import DataError
from model.iais import distributed_pseudo, singular_pseudo
from scripts.checkpoint_split import open_split, split_inputs, split_parser
from utils.cli import run
from utils.config import ConfigError, load_json
from model.isd import layer_attention_blocks
from utils.outputs import atomic_write, refuse_overwriting_inputs, refuse_unwritable


def read_vocab(vocab_path):
    """{token id: word} of --vocab (a JSON {token: id} or a vocab.txt, one token a line), {}
    without one."""
    if not vocab_path:
        return {}
    if vocab_path.endswith(".json"):
        vocab = load_json(vocab_path, "--vocab")
        if not isinstance(vocab, dict):
            raise ConfigError(f"--vocab {vocab_path} must be a JSON object {{token: id}}")
        return {v: k for k, v in vocab.items() if isinstance(v, int)}
    try:
        with open(vocab_path, encoding="utf-8") as f:
            return dict(enumerate(line.rstrip("\n") for line in f))
    except FileNotFoundError:
        raise ConfigError(f"--vocab {vocab_path} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"--vocab {vocab_path} is a folder; give a vocab.txt or a JSON {{token: id}}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"--vocab {vocab_path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                          f"{e.start}); give a vocab.txt saved as UTF-8 (one token a line)") from None


def token_names(ids, inverse):
    return [inverse.get(i, str(i)) for i in ids]


def figure_format(path):
    """The image format the file name asks for (PNG without an extension), one matplotlib writes."""
    from matplotlib.backend_bases import FigureCanvasBase
    extension = splitext(path)[1][1:].lower() or "png"
    formats = FigureCanvasBase.get_supported_filetypes()
    if extension not in formats:
        raise ConfigError(f"--output {path}: .{extension} is not an image format matplotlib writes; end it in "
                          f"one of {', '.join('.' + f for f in sorted(formats))}")
    return extension


def build_parser():
    p = split_parser(__doc__.split("\n")[0])
    p.add_argument("--txt_id", required=True, help="text id of the pair (its image is the matched one)")
    p.add_argument("--output", required=True, help="PNG file")
    p.add_argument("--layer", type=int, default=-1, help="layer to show (default: the last, where IAIS acts)")
    p.add_argument("--vocab", default=None, help="vocabulary to print tokens as words")
    return p


def check_output(opts):
    """Before any work: OUTPUT can be written, in a format its name says, and is none of the inputs."""
    refuse_unwritable("--output", opts.output, folder=False)
    refuse_overwriting_inputs([("--output", opts.output, opts.output)], split_inputs(opts) + [("--vocab", opts.vocab)])
    return figure_format(opts.output)


def save_figure(fig, path, image_format):
    """The figure, written atomically."""
    os.makedirs(dirname(abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format=image_format, dpi=90))


def main(opts):
    image_format = check_output(opts)
    vocab = read_vocab(opts.vocab)
    dataset, model = open_split(opts)
    if opts.txt_id not in dataset.ids:
        raise DataError(f"--txt_id {opts.txt_id} is not a text id of {opts.txt_db}")
    n_layers = model.config.num_hidden_layers
    if not -n_layers <= opts.layer < n_layers:
        raise ConfigError(f"--layer {opts.layer} is not a layer of the model ({n_layers} layers: "
                          f"0 to {n_layers - 1}, or -1 for the last)")
    _, batch, n_words, n_boxes = dataset.pair_batch(dataset.ids.index(opts.txt_id))
    txt, img, t2i, i2t = (b[0] for b in layer_attention_blocks(model, batch)[opts.layer])
    txt, img = txt[:n_words, :n_words], img[:n_boxes, :n_boxes]
    singular = singular_pseudo(img, t2i[:n_words])
    distributed = distributed_pseudo(t2i[:n_words, :n_boxes], i2t[:n_boxes, :n_words])
    words = token_names(dataset.txt_db[opts.txt_id]["input_ids"], vocab)
    boxes = [str(k) for k in range(n_boxes)]

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("textual self-attention", txt, words), ("visual self-attention", img, boxes),
              ("pseudo textual (singular)", singular, words), ("pseudo textual (distributed)", distributed, words)]
    fig, axes = plt.subplots(1, 4, figsize=(20, 5.5))
    for ax, (title, m, labels) in zip(axes, panels):
        im = ax.imshow(m.numpy(), cmap="viridis")
        ax.set_title(title)
        ax.set_xticks(range(len(labels)), labels, rotation=90)
        ax.set_yticks(range(len(labels)), labels)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"{opts.txt_id}: {' '.join(words)} (layer {opts.layer % model.config.num_hidden_layers})")
    fig.tight_layout()
    save_figure(fig, opts.output, image_format)
    print(f"wrote {opts.output}")


if __name__ == "__main__":
    run(main, build_parser())
