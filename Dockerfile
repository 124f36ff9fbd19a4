# Training/evaluation image: current NGC PyTorch (CUDA, NCCL) + this repository's
# requirements + horovod 0.28.1 built with NCCL. Code is mounted at /src by
# launch_container.sh, data at /txt /img /pretrain /storage.
FROM nvcr.io/nvidia/pytorch:24.10-py3

COPY requirements.txt scripts/install_horovod.sh /tmp/setup/
RUN pip install --no-cache-dir -r /tmp/setup/requirements.txt \
 && bash /tmp/setup/install_horovod.sh python \
 && rm -rf /tmp/setup

WORKDIR /src
