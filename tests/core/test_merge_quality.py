"""bench/merge_quality.py: rows of side-by-side bench runs joined into one paired table."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEV = ROOT / "docs" / "quality" / "dev"


def _bench_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _merge_tool():
    return _bench_tool("merge_quality")


def test_rows_of_two_runs_become_one_table_paired_against_the_first(tmp_path):
    tool = _merge_tool()
    mcp, joint = DEV / "results_k_mcp_3seeds.json", DEV / "results_k_joint_3seeds.json"
    tool.main(
        [
            "--out",
            str(tmp_path),
            "--row",
            f"k=1={mcp}::B4M w/o MCP (k=1)",
            "--row",
            f"joint={joint}::Joint LoRA (DB+LoRA)",
        ]
    )
    merged = json.loads((tmp_path / "results.json").read_text())
    assert list(merged["methods"]) == ["k=1", "joint"]
    assert merged["seeds"] == [0, 1, 2] and len(merged["pairs"]) == 16
    # each row is the run's own row, with where it came from and that run's settings
    source = json.loads(joint.read_text())["methods"]["Joint LoRA (DB+LoRA)"]
    assert merged["methods"]["joint"]["aggregate"] == source["aggregate"]
    assert merged["runs"][str(joint)]["settings"]["seeds"] == 3
    diff = merged["differences"]["joint - k=1"]["average"]
    a, b = (merged["methods"][n]["aggregate"]["probe"]["average"] for n in ("joint", "k=1"))
    assert diff["mean"] == pytest.approx(a - b) and diff["beyond_noise"] == (diff["lo"] > 0 or diff["hi"] < 0)
    table = (tmp_path / "table.md").read_text()
    assert "| k=1 |" in table and "- joint - k=1:" in table


def test_runs_over_other_seeds_or_unknown_rows_are_refused(tmp_path):
    tool = _merge_tool()
    three, one = DEV / "results_k_mcp_3seeds.json", DEV / "results_n_shipped_s1.json"
    with pytest.raises(SystemExit, match="other seeds"):
        tool.merge([("a", three, "B4M w/o MCP (k=1)"), ("b", one, "B4M uncaptioned (auto captions)")])
    with pytest.raises(SystemExit, match="has no row"):
        tool.merge([("a", three, "B4M rho=0.25")])
    with pytest.raises(SystemExit, match="LABEL=PATH::ROW"):
        tool.parse_row("no separator")
    assert not list(tmp_path.iterdir())


def test_one_row_run_over_seeds_apart_is_joined_and_its_means_taken_again():
    tool = _merge_tool()
    row = "B4M uncaptioned (auto captions)"
    s1, s2 = DEV / "results_n_shipped_s1.json", DEV / "results_n_shipped_s2.json"
    merged = tool.merge([("shipped", s1, row), ("shipped", s2, row)])
    assert merged["seeds"] == [1, 2] and len(merged["pairs"]) == 16
    joined = merged["methods"]["shipped"]
    parts = [json.loads(p.read_text())["methods"][row] for p in (s1, s2)]
    for k in ("content", "style", "prompt", "average"):
        expected = sum(p["aggregate"]["probe"][k] for p in parts) / 2  # same pairs in each seed
        assert joined["aggregate"]["probe"][k] == pytest.approx(expected)
    assert joined["single"]["style"]["mean"] == pytest.approx(sum(p["single"]["style"]["mean"] for p in parts) / 2)
    assert [src["seeds"] for src in joined["sources"]] == [[1], [2]]
    with pytest.raises(SystemExit, match="repeat seeds"):
        tool.merge([("shipped", s1, row), ("shipped", s1, row)])


def test_rows_with_kept_reads_say_what_the_probe_read(tmp_path, capsys, monkeypatch):
    """Runs that kept the probe's reads (Session S) carry them through a merge into table.md
    and through bench/pool_seeds.py; the numbers are the committed runs' own."""
    R = "B4M uncaptioned (auto captions)"
    shipped, conv = DEV / "results_s_shipped_reads_s1.json", DEV / "results_s_convmake100_reads_s1.json"
    _merge_tool().main(["--out", str(tmp_path), "--row", f"shipped={shipped}::{R}", "--row", f"conv={conv}::{R}"])
    table = (tmp_path / "table.md").read_text()
    assert "- shipped: rainbow 0.25, camouflage 0.00, lava 0.25, leopard 0.31; read most: leopard 20%" in table
    assert "whatever was asked would score 0.11" in table  # the conv row: rainbow read for 27 %
    monkeypatch.setattr(
        "sys.argv", ["pool_seeds", json.dumps({"shipped": [[str(shipped), R]], "conv": [[str(conv), R]]})]
    )
    _bench_tool("pool_seeds").main()
    out = capsys.readouterr().out
    assert "style chance_from_reads 0.125" in out and "style chance_from_reads 0.109" in out
