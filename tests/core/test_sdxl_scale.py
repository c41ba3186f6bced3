"""bench/sdxl_scale.py at toy size on the CPU: every row runs and the ratios are computed
(the real run is on a GPU; its numbers go to docs/bench/)."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "sdxl_scale.py"


ALL_ROWS = ["lora", "lora_ckpt", "plp_k0", "plp_k0_ckpt", "plp_k3", "plp_k3_ckpt", "make", "make_ckpt"]


# every row on the SDXL shape; the SD 1.5 shape's build and the ratio rows only (time)
@pytest.mark.parametrize("arch,rows", [("toy-sdxl", ALL_ROWS), ("toy-sd15", ["lora", "plp_k0", "plp_k3"])])
def test_sdxl_scale_bench_runs_every_row_at_toy_size(tmp_path, arch, rows):
    spec = importlib.util.spec_from_file_location("sdxl_scale", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "scale.json"
    argv = ["--arch", arch, "--device", "cpu", "--steps", "2", "--steps-short", "1", "--make-steps", "1"]
    only = [] if rows == ALL_ROWS else ["--only", *rows]
    bench.main([*argv, "--sample-steps", "2", *only, "--json", str(out)])
    got = json.loads(out.read_text())
    assert set(got["rows"]) == set(rows)
    assert all(r["s_per_step"] is not None for r in got["rows"].values())
    assert set(got["generation"]) == {"bare", "fused", "unfused", "switch_fused_s"}
    # the ratios of the per-step slopes; at toy size on a busy machine a slope can come out
    # <= 0 (timing noise), and then its ratio is None rather than a meaningless number
    r = got["rows"]
    for key, (a, b) in {
        "plp_k0_over_lora_step": ("plp_k0", "lora"),
        "plp_k3_over_k0_step": ("plp_k3", "plp_k0"),
    }.items():
        want = r[a]["s_per_step"] / r[b]["s_per_step"] if r[b]["s_per_step"] > 0 else None
        assert got["ratios"][key] == pytest.approx(want) if want is not None else got["ratios"][key] is None
    # an fp16 file is about half the fp32 one
    assert got["adapter_file_MB"]["fp16"] < 0.6 * got["adapter_file_MB"]["fp32"]
    assert got["weights_dtype"] == "float32" and got["arch"] == arch
