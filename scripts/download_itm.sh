#!/usr/bin/env bash
# Download what the retrieval experiments need into $PATH_TO_STORAGE:
#   img_db/     BUTD features of COCO and Flickr30k (UNITER release)
#   txt_db/     tokenised ITM captions (UNITER release)
#   pretrained/ uniter-base.pt, uniter-large.pt, bert-base-cased-vocab.txt
#   finetune/   IAIS fine-tuned checkpoints and logs (GitHub release v0.1.0 of lancopku/IAIS)
#
# usage: bash scripts/download_itm.sh [--dry-run] PATH_TO_STORAGE
# Partial downloads resume, complete files are skipped, failures are retried, archives are
# checked before they are extracted. --dry-run prints what would be fetched and does nothing.
set -euo pipefail

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
if [ "$#" -ne 1 ]; then
    echo "usage: bash scripts/download_itm.sh [--dry-run] PATH_TO_STORAGE" >&2
    exit 2
fi
DOWNLOAD=$1
BLOB=${UNITER_BLOB:-https://convaisharables.blob.core.windows.net/uniter}
RELEASE_API=${IAIS_RELEASE_API:-https://api.github.com/repos/lancopku/IAIS/releases/tags/v0.1.0}
VOCAB_URL=${BERT_VOCAB_URL:-https://s3.amazonaws.com/models.huggingface.co/bert/bert-base-cased-vocab.txt}
RETRIES=${RETRIES:-5}

fetch() {  # fetch URL DEST_FILE: resumable, skipped when DEST_FILE is complete
    local url=$1 dest=$2
    if [ "$DRY_RUN" = 1 ]; then echo "fetch $url -> $dest"; return; fi
    if [ -f "$dest" ]; then echo "complete: $dest"; return; fi
    mkdir -p "$(dirname "$dest")"
    local try
    for try in $(seq 1 "$RETRIES"); do
        if curl -fL --retry 3 -C - -o "$dest.part" "$url"; then
            mv "$dest.part" "$dest"
            return
        fi
        echo "download of $url failed (try $try/$RETRIES)" >&2
        sleep $((try * 5))
    done
    echo "download_itm.sh: could not download $url" >&2
    exit 1
}

fetch_tar() {  # fetch_tar URL DIR: download, verify, extract into DIR once
    local url=$1 dir=$2
    local tarball="$dir/$(basename "$url")"
    local marker="$dir/.extracted-$(basename "$url")"
    if [ "$DRY_RUN" = 1 ]; then echo "fetch $url -> $tarball (extract into $dir)"; return; fi
    if [ -f "$marker" ]; then echo "extracted: $tarball"; return; fi
    fetch "$url" "$tarball"
    if ! tar -tf "$tarball" >/dev/null 2>&1; then
        echo "$tarball is corrupt; downloading it again" >&2
        rm -f "$tarball"
        fetch "$url" "$tarball"
        tar -tf "$tarball" >/dev/null || { echo "download_itm.sh: $tarball is not a valid archive" >&2; exit 1; }
    fi
    tar -xf "$tarball" -C "$dir"
    touch "$marker"
    rm -f "$tarball"
}

for FOLDER in img_db txt_db pretrained finetune; do
    [ "$DRY_RUN" = 1 ] || mkdir -p "$DOWNLOAD/$FOLDER"
done

for SPLIT in train2014 val2014; do
    fetch_tar "$BLOB/img_db/coco_$SPLIT.tar" "$DOWNLOAD/img_db"
done
fetch_tar "$BLOB/img_db/flickr30k.tar" "$DOWNLOAD/img_db"

for SPLIT in train restval val test; do
    fetch_tar "$BLOB/txt_db/itm_coco_$SPLIT.db.tar" "$DOWNLOAD/txt_db"
done
for SPLIT in train val test; do
    fetch_tar "$BLOB/txt_db/itm_flickr30k_$SPLIT.db.tar" "$DOWNLOAD/txt_db"
done

for MODEL in uniter-base uniter-large; do
    fetch "$BLOB/pretrained/$MODEL.pt" "$DOWNLOAD/pretrained/$MODEL.pt"
done
fetch "$VOCAB_URL" "$DOWNLOAD/pretrained/bert-base-cased-vocab.txt"

# IAIS fine-tuned checkpoints and training logs: every asset of the GitHub release
if [ "$DRY_RUN" = 1 ]; then
    echo "list assets of $RELEASE_API -> $DOWNLOAD/finetune/"
    exit 0
fi
assets=$(curl -fsSL --retry 3 "$RELEASE_API" | python3 -c '
import json, sys
for asset in json.load(sys.stdin).get("assets", []):
    print(asset["browser_download_url"])
') || { echo "download_itm.sh: could not list the assets of $RELEASE_API" >&2; exit 1; }
for url in $assets; do
    fetch "$url" "$DOWNLOAD/finetune/$(basename "$url")"
done
echo "done: $DOWNLOAD"
