"""A checkout of the original code (lancopku/IAIS), which the benchmarks run against."""
from os.path import exists, join

# the original's modules that the benchmarks import
ORIGINAL_MODULES = ("data/data.py", "data/itm.py", "data/sampler.py", "model/model.py", "model/itm.py",
                    "model/layer.py")


def check_checkout(original_repo, prog="bench_original.py"):
    missing = [m for m in ORIGINAL_MODULES if not exists(join(original_repo, m))]
    if missing:
        raise SystemExit(f"{prog}: error: --original_repo {original_repo} has no {missing[0]}; "
                         "pass a checkout of lancopku/IAIS")
