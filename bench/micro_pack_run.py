"""Pack a pre-training run's model folder into the files a device run returns (the UNet in two
halves: a returned file may be at most 16 MB), the inverse of bench/micro_install_run.py.

    python bench/micro_pack_run.py /tmp/m/model $OUT
"""

import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

src, out = Path(sys.argv[1]), Path(sys.argv[2])
unet = load_file(src / "unet/diffusion_pytorch_model.safetensors")
keys = sorted(unet)
half = len(keys) // 2
save_file({k: unet[k] for k in keys[:half]}, str(out / "unet_a.safetensors"))
save_file({k: unet[k] for k in keys[half:]}, str(out / "unet_b.safetensors"))
shutil.copy(src / "unet/config.json", out / "unet_config.json")
shutil.copy(src / "vae/diffusion_pytorch_model.safetensors", out / "vae.safetensors")
shutil.copy(src / "vae/config.json", out / "vae_config.json")
shutil.copy(src.parent / "pretrain_samples.png", out / "samples.png")
print(f"packed {len(keys)} UNet tensors and the VAE into {out}")
