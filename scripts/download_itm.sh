#!/usr/bin/env bash
# Download what the retrieval experiments need into STORAGE:
#   img_db/     BUTD features of COCO and Flickr30k (UNITER release)
#   txt_db/     tokenised ITM captions (UNITER release)
#   pretrained/ uniter-base.pt, uniter-large.pt, bert-base-cased-vocab.txt
#   finetune/   IAIS fine-tuned checkpoints and logs (GitHub release v0.1.0 of lancopku/IAIS)
#
#   (--only vocab: pretrained/bert-base-cased-vocab.txt alone, what scripts/prepro_itm.py needs)
#
# usage: bash scripts/download_itm.sh [--only flickr|coco|pretrained|vocab|iais ...] [--dry-run | --verify] STORAGE
# `--help` lists the options and the environment variables (UNITER_BLOB: other hosts).
# The work is done by download_itm.py beside this script (Python 3 standard library only).
set -euo pipefail
PYTHON=${PYTHON:-python3}
command -v "$PYTHON" >/dev/null || { echo "download_itm.sh: $PYTHON not found; install Python 3 or set PYTHON" >&2; exit 2; }
# download_itm.py imports its parts from the package scripts.download of this repository
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" "$ROOT/scripts/download_itm.py" "$@"
