"""bench/micro_oracle.py: its training images are the pair itself, and one pair runs end to end."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "micro_oracle.py"


def _oracle():
    spec = importlib.util.spec_from_file_location("micro_oracle", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_oracle_trains_on_renders_of_the_pair_and_scores_them(tmp_path):
    from b4m_core.micro.probes import load_probe, predict

    oracle = _oracle()
    concept, cphrase, sphrase = oracle.pair_concept("fish", "leopard", images=4, seed=1)
    assert (cphrase, sphrase) == ("fsv shape", "lpk pattern")
    # the captions name the style by its identifier and leave the content's slot
    assert all(c.startswith("a large {content} in lpk pattern style in the center") for c in concept.captions)
    reads = predict(load_probe()[0], concept.images)  # the renders are the answer itself
    assert sum(r["content"] == "fish" and r["style"] == "leopard" for r in reads) >= 3

    out, grid = tmp_path / "new" / "oracle.json", tmp_path / "new" / "oracle.png"
    argv = ["--pairs", "1", "--steps", "1", "--images", "2", "--out", str(out), "--grid", str(grid), "--threads", "1"]
    report = oracle.main(argv)
    from PIL import Image

    assert Image.open(grid).size == (64 * 4, 64)  # one row: the pair's four drawings
    saved = json.loads(out.read_text())
    assert list(saved["pairs"]) == ["fish|rainbow"] and saved == json.loads(json.dumps(report))
    for k in ("content", "style", "prompt", "average"):
        assert 0.0 <= saved["summary"][k]["mean"] <= 1.0
