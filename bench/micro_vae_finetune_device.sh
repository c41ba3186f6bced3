#!/usr/bin/env bash
# Fine-tune the shipped micro VAE on world + generic images (keeping its latent space) and
# score the shipped UNet through it, on the lent GPU:
#   carry .whl and .minilm (see micro_pretrain_device.sh), then OUT=<folder> bash bench/micro_vae_finetune_device.sh
set -o pipefail
source bench/device_env.sh  # carried wheels, offline env, GPU name, MiniLM in /tmp/minilm
python3 -m b4m_core.micro.pretrain --out /tmp/m/model --images ${IMAGES:-150000} --vae-from b4m_core/micro/model/vae \
  --vae-finetune --vae-seconds ${VAE_S:-120} --vae-batch 512 --unet-seconds 0 --unet-from b4m_core/micro/model/unet \
  --probe-steps 0 --text-encoder /tmp/minilm --workers 16 --eval-guidance 5 --report $OUT/report.json 2>&1 \
  | grep -v "Loading\|^Key\|^pooler\|^Notes\|UNEXPECTED\|^---\|float32: \[\]\|^ \|^{\|^}" | tee $OUT/log
cp /tmp/m/model/vae/diffusion_pytorch_model.safetensors $OUT/vae.safetensors
cp /tmp/m/model/vae/config.json $OUT/vae_config.json
cp /tmp/m/pretrain_samples.png $OUT/samples.png
