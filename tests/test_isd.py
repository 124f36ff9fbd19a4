"""ISD / ISDa on hand-built attention, agreement with the IAIS loss, and the scripts."""
import json
import math

import pytest
import torch

from conftest import TINY_CONFIG, load_fixture
from helpers import run
from model.isd import annotated_isd, layer_attention_blocks, pair_isd

PNG = b"\x89PNG\r\n\x1a\n"


def test_annotated_isd_is_zero_when_relations_agree():
    # words 0 and 2 are aligned to boxes 1 and 0; the text attention among them equals
    # the visual attention between their boxes
    img = torch.tensor([[0.8, 0.2, 0.0], [0.3, 0.7, 0.0], [0.0, 0.0, 1.0]])
    txt = torch.zeros(3, 3)
    txt[0, 0], txt[0, 2] = 0.7, 0.3
    txt[2, 0], txt[2, 2] = 0.2, 0.8
    txt[1] = torch.tensor([0.1, 0.8, 0.1])
    # zero up to the 1e-6 inside the logs (entries >= 0.2: at most ~1e-5)
    assert annotated_isd(txt, img, [([0], [1]), ([2], [0])]) == pytest.approx(0.0, abs=1e-5)


def test_annotated_isd_hand_value():
    img = torch.eye(2)
    txt = torch.full((2, 2), 0.5)
    d = annotated_isd(txt, img, [([0], [0]), ([1], [1])])
    eps = 1e-6
    # pseudo = identity, text = uniform: KL(pseudo || text) + KL(text || pseudo), batchmean
    kl1 = sum(p * (math.log(p) - math.log(t + eps)) for p, t in ((1, 0.5), (1, 0.5))) / 2
    kl2 = sum(t * (math.log(t) - math.log(p + eps)) for t, p in ((0.5, 1), (0.5, 0), (0.5, 0), (0.5, 1))) / 2
    assert d == pytest.approx(kl1 + kl2, rel=1e-5)
    assert d > 6  # log(1/1e-6) / 2 dominates: the relations disagree completely
    assert annotated_isd(txt, img, [([0], [0])]) is None  # one annotated word: no relation


def test_last_layer_isd_equals_the_iais_loss():
    """ISD of the last layer is exactly what IAIS minimises for that pair."""
    from model import UniterForImageTextRetrieval
    model = UniterForImageTextRetrieval.from_pretrained(TINY_CONFIG, load_fixture("ref_model.pt"),
                                                        img_dim=2048, pairs_num=1).eval()
    case = load_fixture("ref_hardneg.pt")[0]
    b = case["batch"]
    batch = {"input_ids": b["input_ids"], "position_ids": b["position_ids"], "img_feat": b["img_feat"][:1],
             "img_pos_feat": b["img_pos_feat"][:1], "attn_masks": b["attn_masks"][:1],
             "txt_attn_masks": b["txt_attn_masks"], "img_attn_masks": b["img_attn_masks"], "sample_size": 1}
    blocks = layer_attention_blocks(model, batch)
    n_words, n_boxes = int(b["txt_attn_masks"].sum()), int(b["img_attn_masks"].sum())
    isd = pair_isd(blocks[-1], 0, n_words, n_boxes)
    for variant in ("L-singular", "V-distributed"):
        with torch.no_grad():
            _, losses = model(batch, compute_loss=True, IAIS=variant)
        assert isd[variant] == pytest.approx(losses["self_attn_loss"].item(), rel=1e-5)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    res = run(["scripts/make_demo_data.py", "--output", str(root / "d"), "--n_train", "4", "--n_val", "2",
               "--n_test", "6"])
    assert res.returncode == 0, res.stderr
    from model import UniterConfig, UniterForImageTextRetrieval
    torch.manual_seed(0)
    model = UniterForImageTextRetrieval(UniterConfig.from_json_file("config/uniter-demo.json"), 2048, 1)
    torch.save(model.state_dict(), root / "model.pt")
    return root


def test_isd_script_with_annotations(demo, tmp_path):
    d = demo / "d"
    res = run(["scripts/isd.py", "--txt_db", str(d / "txt_db" / "itm_demo_test.db"), "--img_db",
               str(d / "img_db" / "demo"), "--checkpoint", str(demo / "model.pt"), "--model_config",
               "config/uniter-demo.json", "--output", str(tmp_path / "isd"), "--annotations",
               str(d / "annotations" / "isda_test.json")])
    assert res.returncode == 0, res.stderr
    out = json.loads((tmp_path / "isd" / "isd.json").read_text())
    assert out["pairs"] == 30
    for layer in ("layer_0", "layer_1"):
        assert set(out[layer]) >= {"L-singular", "V-singular", "L-distributed", "V-distributed", "ISDa"}
        assert all(v >= 0 for v in out[layer].values())
        assert out[layer]["ISDa_pairs"] == 30
    assert (tmp_path / "isd" / "isd.png").read_bytes()[:8] == PNG


def test_visualize_attention_script(demo, tmp_path):
    d = demo / "d"
    args = ["scripts/visualize_attention.py", "--txt_db", str(d / "txt_db" / "itm_demo_test.db"), "--img_db",
            str(d / "img_db" / "demo"), "--checkpoint", str(demo / "model.pt"), "--model_config",
            "config/uniter-demo.json", "--vocab", str(d / "vocab.json"), "--output", str(tmp_path / "a.png")]
    res = run(args + ["--txt_id", "test_demo_000000000006_0"])
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG
    res = run(args + ["--txt_id", "nope"])
    assert res.returncode != 0 and "nope is not a text id" in res.stderr
