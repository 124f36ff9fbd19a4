#!/usr/bin/env bash
# Build horovod 0.28.1 from its PyPI source against the torch already installed.
#
# horovod 0.28.1 compiles its torch extension as C++14, but torch >= 2.1 headers need
# C++17, so the source is patched before building. Gloo is always built (CPU and
# `horovodrun --gloo`); NCCL is used when a CUDA toolkit is found.
#
# Usage: scripts/install_horovod.sh [PYTHON]   (default: python3 on PATH)
# Idempotent: exits at once when horovod.torch already imports.
set -euo pipefail

PYTHON=${1:-python3}
VERSION=0.28.1

if "$PYTHON" -c "import horovod.torch" 2>/dev/null; then
    echo "horovod already installed: $("$PYTHON" -c 'import horovod; print(horovod.__version__)')"
    exit 0
fi
"$PYTHON" -c "import torch" 2>/dev/null || {
    echo "install_horovod.sh: torch is not importable by $PYTHON; install the requirements first" >&2
    exit 1
}
command -v cmake >/dev/null || { echo "install_horovod.sh: cmake not found (apt-get install cmake)" >&2; exit 1; }
command -v g++ >/dev/null || { echo "install_horovod.sh: g++ not found (apt-get install g++)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m pip download --no-deps --no-binary :all: "horovod==$VERSION" -d "$work" -q
tar xzf "$work/horovod-$VERSION.tar.gz" -C "$work"
src="$work/horovod-$VERSION"

sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
    "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt" || {
    echo "install_horovod.sh: could not raise the C++ standard in $src; the source layout changed" >&2
    exit 1
}

export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
export HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1
# cmake >= 4 refuses the old minimum versions declared by horovod's third-party code.
export CMAKE_POLICY_VERSION_MINIMUM=3.5
if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" && command -v nvcc >/dev/null; then
    export HOROVOD_GPU_OPERATIONS=NCCL
    echo "building horovod $VERSION with NCCL and gloo"
else
    export HOROVOD_CPU_OPERATIONS=gloo
    echo "building horovod $VERSION with gloo (CPU)"
fi
"$PYTHON" -m pip install -q cffi cloudpickle psutil pyyaml packaging
export MAKEFLAGS="-j$(nproc)"
"$PYTHON" -m pip install --no-build-isolation --no-deps --no-cache-dir "$src"
"$PYTHON" -c "import horovod.torch as hvd; hvd.init(); print('horovod', hvd.__version__ if hasattr(hvd, '__version__') else '', 'size', hvd.size())"
