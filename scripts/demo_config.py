"""The demo's training config pointed at a folder of demo data (make_demo_data.py writes it
beside the data it builds; gpu_check.py trains on a smaller demo of its own)."""
import json
from os.path import join

from scripts.repo import ROOT
from utils.outputs import write_json


def write_train_config(output, path=None, **overrides):
    """config/train-itm-demo.json with its demo/ paths under ``output`` (written to ``path``,
    by default output/train-itm-demo.json): the demo trains wherever its data is."""
    with open(join(ROOT, "config", "train-itm-demo.json")) as f:
        config = json.load(f)

    def moved(value):
        if isinstance(value, list):
            return [moved(v) for v in value]
        if isinstance(value, str) and value.startswith("demo/"):
            return join(output, value[len("demo/"):])
        return value

    config = {**{k: moved(v) for k, v in config.items()}, **overrides}
    write_json(path or join(output, "train-itm-demo.json"), config, indent=2)
    return config
