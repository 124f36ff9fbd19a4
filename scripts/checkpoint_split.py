"""The split and the checkpoint that the attention scripts (isd.py, visualize_attention.py)
read: their flags, and the matched-pair dataset and the model in eval mode they name."""
from data import CaptionDataset, TxtTokLmdb, open_img_db
from model import IMG_DIM, UniterForImageTextRetrieval
from engine.checks import check_split, load_model
from utils.config import add_box_args, make_parser


SPLIT_FLAGS = ("--txt_db", "--img_db", "--checkpoint", "--model_config")


def split_parser(description):
    """A parser with the flags naming a split and a model."""
    parser = make_parser(description)
    for flag in SPLIT_FLAGS:
        parser.add_argument(flag, required=True)
    parser.add_argument("--allow_random_init", action="store_true",
                        help="accept a checkpoint that leaves part of the model at random initialisation")
    add_box_args(parser)
    return parser


def split_inputs(opts):
    """(flag, path) of the split and the model, for utils.outputs.refuse_overwriting_inputs."""
    return [(flag, getattr(opts, flag[2:])) for flag in SPLIT_FLAGS]


def open_split(opts):
    """(the split's captions with their images, model in eval mode) from the split_parser flags."""
    txt_db = TxtTokLmdb(opts.txt_db, -1)
    img_db = open_img_db(opts.img_db, opts.conf_th, opts.max_bb, opts.min_bb, opts.num_bb, opts.compressed_db)
    model, _ = load_model(UniterForImageTextRetrieval, opts.model_config, opts.checkpoint, opts.allow_random_init,
                          img_dim=IMG_DIM, pairs_num=1)
    check_split(txt_db, img_db, model.config, IMG_DIM)
    txt_db.check_vocab(model.config.vocab_size)
    return CaptionDataset(txt_db, img_db), model.eval()
