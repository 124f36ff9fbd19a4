#!/usr/bin/env bash
# Start the training container with the data mounted where the configs expect it:
#   source launch_container.sh $TXT_DB $IMG_DIR $OUTPUT $PRETRAIN_DIR
# /txt and /img are read-only; /storage (outputs) and /pretrain are writable.
# GPUs: $CUDA_VISIBLE_DEVICES (all when unset). Image: $IAIS_IMAGE (default iais:latest,
# built with `docker build -t iais:latest .`).
if [ "$#" -ne 4 ]; then
    echo "usage: source launch_container.sh TXT_DB IMG_DIR OUTPUT PRETRAIN_DIR" >&2
    return 2 2>/dev/null || exit 2
fi
TXT_DB=$1
IMG_DIR=$2
OUTPUT=$3
PRETRAIN_DIR=$4
for d in "$TXT_DB" "$IMG_DIR" "$PRETRAIN_DIR"; do
    if [ ! -d "$d" ]; then
        echo "launch_container.sh: $d is not a directory" >&2
        return 2 2>/dev/null || exit 2
    fi
done
mkdir -p "$OUTPUT"

if [ -z "${CUDA_VISIBLE_DEVICES:-}" ]; then
    GPU=all
else
    GPU="\"device=$CUDA_VISIBLE_DEVICES\""
fi
IMAGE=${IAIS_IMAGE:-iais:latest}

${DOCKER:-docker} run --gpus "$GPU" --ipc=host --rm -it \
    --mount src="$(pwd)",dst=/src,type=bind \
    --mount src="$OUTPUT",dst=/storage,type=bind \
    --mount src="$PRETRAIN_DIR",dst=/pretrain,type=bind,readonly \
    --mount src="$TXT_DB",dst=/txt,type=bind,readonly \
    --mount src="$IMG_DIR",dst=/img,type=bind,readonly \
    -e NVIDIA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-all}" \
    -w /src "$IMAGE"
