# Training/evaluation image: NGC PyTorch (CUDA, NCCL and the image's own torch build) with this
# repository's locked requirements, horovod 0.28.1 built with NCCL, and ssh (horovodrun reaches
# the other nodes through it). launch_container.sh mounts the code at /src and the data at /txt
# /img /pretrain /storage; the code is also copied to /src so that the image runs on its own
# (e.g. under SLURM with pyxis).
#
# NGC_TAG picks the NGC PyTorch release; a GPU that the default's CUDA does not know needs a
# release whose CUDA does (NGC's support matrix lists them):
#   docker build --build-arg NGC_TAG=26.07-py3 -t iais:latest .
ARG NGC_TAG=26.05-py3
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}

RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake g++ openssh-client openssh-server \
 && mkdir -p /var/run/sshd \
 && rm -rf /var/lib/apt/lists/*

# The lock's versions for everything but torch: the image's torch build matches its CUDA and
# NCCL. NGC pins its own packages in PIP_CONSTRAINT, which would refuse the lock's versions.
COPY requirements.lock scripts/install_horovod.sh /tmp/setup/
RUN grep -v '^torch[=<>~ ]' /tmp/setup/requirements.lock > /tmp/setup/requirements-without-torch.txt \
 && PIP_CONSTRAINT= pip install --no-cache-dir -r /tmp/setup/requirements-without-torch.txt \
 && bash /tmp/setup/install_horovod.sh python \
 && rm -rf /tmp/setup

COPY . /src
WORKDIR /src
# the scripts (python scripts/x.py) import the repository's packages from /src, the copy or the mount
ENV PYTHONPATH=/src${PYTHONPATH:+:${PYTHONPATH}}
