# Sourced by the bench/*_device.sh scripts on the lent GPU machine (no network there): installs
# the carried wheels (.whl: diffusers, importlib_metadata, zipp), sets the offline environment,
# names the GPU and unpacks the carried MiniLM (.minilm, bench/pack_minilm.py) into /tmp/minilm.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 bench/pack_minilm.py unpack .minilm/minilm.npz /tmp/minilm 2>&1 | tail -1
