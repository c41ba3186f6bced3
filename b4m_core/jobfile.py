"""Training settings from a file, in the shape kohya / ai-toolkit users know.

`b4m train content|style --config job.toml` and `b4m fuse --config job.toml` read every flag
from a TOML (or YAML, with PyYAML installed) file of sections `model`, `network`, `train`,
`data` and `sample`; flags given on the command line win. `b4m config example` prints a
commented one.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from .config import ConfigError

SECTIONS = ("model", "network", "train", "data", "sample")
# the file's names where they differ from the flags' (argparse dests)
ALIASES = {
    "learning_rate": "lr",
    "class_word": "word",
    "style_word": "word",
    "prompts": "sample_prompt",
    "every": "sample_every",
    "name_or_path": "base",
    "linear": "rank",
    "linear_alpha": "alpha",
}

EXAMPLE = """\
# b4m training settings. Use: b4m train content --config job.toml [flags override the file]
# (YAML works too, with the same sections.) Every key is optional; a flag's name with - as _.

[model]
base = "micro"                  # micro (shipped), a local diffusers folder or a hub id
# device = "cuda"
# resolution = 1024

[network]                       # the adapter: PLP halves of one LoRA
rank = 16
# alpha = 16.0                  # default: rank
# rho = 0.75                    # default: the base model's measured one (micro 0.75; others 0.5)
# basis_scale = "legacy"        # or "balanced"
# content_half = "up"

[train]
# steps = 250                   # default: the base model's measured one (micro 250 break, 50 make)
# learning_rate = 5e-3          # default: the base model's (micro 5e-3; others 1e-3)
batch_size = 1
seed = 0
# aux_sets = 3                  # MCP sets from the model's bank when no aux folders (0: none)
# aux = ["out/images/aux_pastel"]   # or your own auxiliary sets of the other kind
# routing = "strict"            # or "released"
# mixed_precision = "auto"      # CUDA only: bf16 where supported, else fp16 (default: the model's)
# gradient_checkpointing = true # default: the model's (on for SDXL)
# checkpoint_every = 100

[data]
images = "b4m_core/micro/references/content/hexagon"
word = "shape"                  # the class word (content) or style word (style)
token = "hkx"
out = "out/hexagon.safetensors"

[sample]                        # pictures while it trains, beside the adapter
prompts = ["a large {content} in striped style in the center on a white background"]
every = 50
"""


def load(path: str | Path) -> dict:
    """The file's settings as {flag dest: value}, sections flattened."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as exc:
                raise ConfigError("YAML config files need PyYAML (pip install pyyaml); or use TOML") from exc
            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except ConfigError:
        raise
    except Exception as exc:  # a syntax error, with its line
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected sections of settings")
    flat: dict = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update(value)
        elif key in SECTIONS:
            raise ConfigError(f"{path}: [{key}] must be a section of settings")
        else:
            flat[key] = value
    return {ALIASES.get(k, k).replace("-", "_"): v for k, v in flat.items()}


def apply(parser, config: dict, path: str) -> None:
    """Make the file's values `parser`'s defaults (so flags still win); refuse unknown keys."""
    actions = {a.dest: a for a in parser._actions}
    unknown = sorted(k for k in config if k not in actions)
    if unknown:
        known = sorted(d for d in actions if d not in ("help", "config"))
        raise ConfigError(f"{path}: unknown settings {unknown}; known: {known}")
    for dest, value in config.items():
        action = actions[dest]
        if isinstance(value, list) and not (action.nargs in ("+", "*") or isinstance(action.default, list)):
            raise ConfigError(f"{path}: {dest} takes one value, got a list")
        if isinstance(action.default, list) and not isinstance(value, list):
            value = [value]
        if action.type is not None and not isinstance(value, list):
            try:
                value = action.type(value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{path}: {dest}: {exc}") from exc
        if action.choices is not None and value not in action.choices:
            raise ConfigError(f"{path}: {dest} must be one of {list(action.choices)}, got {value!r}")
        action.required = False  # given by the file
        action.default = [str(v) for v in value] if isinstance(value, list) else value
