#!/usr/bin/env bash
# The micro model's GPU pre-training run (v1), as run on the lent H100:
#   carry .whl (diffusers + importlib_metadata wheels) and .minilm (bench/pack_minilm.py pack),
#   then OUT=<folder> bash bench/micro_pretrain_device.sh
# Writes the UNet (split in two: a returned file may be at most 16 MB), the VAE, the report,
# the log and a sample grid to $OUT; `python bench/micro_install_run.py $OUT` installs them.
set -o pipefail
source bench/device_env.sh  # carried wheels, offline env, GPU name, MiniLM in /tmp/minilm
python3 -m b4m_core.micro.pretrain --out /tmp/m/model --images ${IMAGES:-300000} \
  --vae-seconds ${VAE_S:-90} --vae-batch 512 --unet-seconds ${UNET_S:-330} --unet-batch 2048 --unet-lr 1e-3 \
  --probe-steps 0 --text-encoder /tmp/minilm --workers 16 --report $OUT/report.json 2>&1 \
  | grep -v "Loading\|^Key\|^pooler\|^Notes\|UNEXPECTED\|^---\|float32: \[\]" | tee $OUT/log
python3 bench/micro_pack_run.py /tmp/m/model $OUT
ls -la $OUT
