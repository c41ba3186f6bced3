"""Install the files a GPU pre-training run returned (bench/micro_pretrain_device.sh) into
the shipped micro model folder: the UNet halves joined, the VAE, their configs.

    python bench/micro_install_run.py /work/.device/1 [b4m_core/micro/model]
"""

import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

src = Path(sys.argv[1])
dst = Path(sys.argv[2] if len(sys.argv) > 2 else Path(__file__).resolve().parents[1] / "b4m_core/micro/model")
unet = {**load_file(src / "unet_a.safetensors"), **load_file(src / "unet_b.safetensors")}
save_file(unet, str(dst / "unet/diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
shutil.copy(src / "unet_config.json", dst / "unet/config.json")
shutil.copy(src / "vae.safetensors", dst / "vae/diffusion_pytorch_model.safetensors")
shutil.copy(src / "vae_config.json", dst / "vae/config.json")
print(f"installed {len(unet)} UNet tensors and the VAE into {dst}")
