#!/usr/bin/env bash
# Continue the shipped micro UNet on the rich world (issue 12's lever: shape and surface
# families named by their attributes beside the 12 + 12 named concepts, so that held-out
# shapes and patterns lie inside what the UNet can draw), on the lent GPU. The shipped VAE and
# probe are kept (the VAE already codes generic images; its latent space is not re-standardised).
#   prepare here: pip download --no-deps -d .whl diffusers importlib_metadata zipp
#                 python bench/pack_minilm.py pack .minilm/minilm.npz
#   device:       run(command="OUT=$OUT bash bench/micro_pretrain_rich_device.sh", carry=[".whl", ".minilm"])
#   back here:    cp -r b4m_core/micro/model out/micro_rich && python bench/micro_install_run.py <files_at> out/micro_rich
#                 b4m bench quality --split dev --base out/micro_rich --methods "B4M uncaptioned (auto captions)" \
#                   --set seed=1 --out out/quality_rich_s1   (and seed 2; the shipped row's files are in docs/quality/dev)
# RICH: share of rich-world examples (default 0.5); UNET_S: seconds of UNet training.
set -o pipefail
source bench/device_env.sh  # carried wheels, offline env, GPU name, MiniLM in /tmp/minilm
python3 -m b4m_core.micro.pretrain --out /tmp/m/model --images ${IMAGES:-300000} --rich-fraction ${RICH:-0.5} \
  --vae-from b4m_core/micro/model/vae --unet-from b4m_core/micro/model/unet \
  --unet-seconds ${UNET_S:-330} --unet-batch 2048 --unet-lr ${UNET_LR:-5e-4} \
  --probe-steps 0 --text-encoder /tmp/minilm --workers 16 --eval-guidance 5 --report $OUT/report.json 2>&1 \
  | grep -v "Loading\|^Key\|^pooler\|^Notes\|UNEXPECTED\|^---\|float32: \[\]\|^ \|^{\|^}" | tee $OUT/log
python3 bench/micro_pack_run.py /tmp/m/model $OUT
ls -la $OUT
