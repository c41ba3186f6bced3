#!/usr/bin/env bash
# The micro model's GPU pre-training run (v1), as run on the lent H100:
#   carry .whl (diffusers + importlib_metadata wheels) and .minilm (bench/pack_minilm.py pack),
#   then OUT=<folder> bash bench/micro_pretrain_device.sh
# Writes the UNet (split in two: a returned file may be at most 16 MB), the VAE, the report,
# the log and a sample grid to $OUT; `python bench/micro_install_run.py $OUT` installs them.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 bench/pack_minilm.py unpack .minilm/minilm.npz /tmp/minilm 2>&1 | tail -1
python3 -m b4m_core.micro.pretrain --out /tmp/m/model --images ${IMAGES:-300000} \
  --vae-seconds ${VAE_S:-90} --vae-batch 512 --unet-seconds ${UNET_S:-330} --unet-batch 2048 --unet-lr 1e-3 \
  --probe-steps 0 --text-encoder /tmp/minilm --workers 16 --report $OUT/report.json 2>&1 \
  | grep -v "Loading\|^Key\|^pooler\|^Notes\|UNEXPECTED\|^---\|float32: \[\]" | tee $OUT/log
python3 bench/micro_pack_run.py /tmp/m/model $OUT
ls -la $OUT
