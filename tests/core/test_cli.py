"""`b4m` on local files. The commands run in this process (`b4m_core.cli.main`, what
`python -m b4m_core` calls), so each does not pay a fresh interpreter's torch import;
one case runs the real module entry point."""

import contextlib
import io
import subprocess
import sys

from PIL import Image
from safetensors.torch import load_file

from b4m_core.adapter import Adapter
from b4m_core.cli import main

from ..helpers.images import write_images


def b4m(*args) -> subprocess.CompletedProcess:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's own usage errors
            code = exc.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_the_module_entry_point_reports_errors_with_exit_code_2(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "b4m_core",
            "generate",
            "--adapter",
            tmp_path / "nope.safetensors",
            "--prompt",
            "x",
            "--out",
            tmp_path / "o",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "adapter file not found" in r.stderr


def test_full_flow_on_local_files(tmp_path, tiny_sd_path):
    c = write_images(tmp_path / "content", 0, 3)
    s = write_images(tmp_path / "style", 1, 2)
    aux1 = write_images(tmp_path / "aux_ink", 2, 1)
    aux2 = write_images(tmp_path / "aux_pastel", 3, 1)
    auxc = write_images(tmp_path / "aux_cat", 4, 1)
    (aux1 / "word.txt").write_text("ink")
    (c / "00.txt").write_text("a photo of {content} on a table")
    r = b4m(
        "train",
        "content",
        "--images",
        c,
        "--class-word",
        "dog",
        "--base",
        tiny_sd_path,
        "--steps",
        4,
        "--rank",
        4,
        "--aux",
        aux1,
        "--aux",
        aux2,
        "--checkpoint-every",
        2,
        "--out",
        tmp_path / "c.safetensors",
    )
    assert r.returncode == 0, r.stderr
    assert "4/4" in r.stderr and "loss=" in r.stderr  # the progress bar
    assert (tmp_path / "c.step000002.ckpt.safetensors").is_file()
    assert Adapter.load(tmp_path / "c.safetensors").extra["aux"] == ["aux0 ink", "aux1 aux_pastel"]
    r = b4m(
        "train",
        "style",
        "--images",
        s,
        "--style-word",
        "ink",
        "--base",
        tiny_sd_path,
        "--steps",
        2,
        "--rank",
        4,
        "--aux",
        auxc,
        "--prior-preservation",
        "--prior-images",
        2,
        "--out",
        tmp_path / "s.safetensors",
    )
    assert r.returncode == 0, r.stderr
    # the prior: the base's own drawings of the template with the style word, no identifier
    assert Adapter.load(tmp_path / "s.safetensors").extra["prior"] == ["a picture in ink style"] * 2
    assert Adapter.load(tmp_path / "c.safetensors").extra["prior"] is None
    r = b4m(
        "fuse",
        "--content",
        tmp_path / "c.safetensors",
        "--style",
        tmp_path / "s.safetensors",
        "--content-images",
        c,
        "--style-images",
        s,
        "--steps",
        2,
        "--out",
        tmp_path / "f.safetensors",
    )
    assert r.returncode == 0, r.stderr
    assert Adapter.load(tmp_path / "f.safetensors").kind == "fused"
    r = b4m(
        "generate",
        "--adapter",
        tmp_path / "f.safetensors",
        "--prompt",
        "a {content} in {style} style",
        "--seed",
        3,
        "--num-images",
        2,
        "--steps",
        2,
        "--out",
        tmp_path / "imgs",
    )
    assert r.returncode == 0, r.stderr
    pngs = sorted((tmp_path / "imgs").glob("*.png"))
    assert len(pngs) == 2 and Image.open(pngs[0]).size == (32, 32)
    # the halves over the sampling steps: a window draws another picture; one outside [0, 1] exits 2
    args = ["generate", "--adapter", tmp_path / "f.safetensors", "--prompt", "a {content} in {style} style"]
    args += ["--seed", 3, "--steps", 2]
    r = b4m(*args, "--content-end", 0.5, "--out", tmp_path / "window")
    assert r.returncode == 0, r.stderr
    window = Image.open(next((tmp_path / "window").glob("*.png")))
    assert list(window.getdata()) != list(Image.open(pngs[0]).getdata())
    r = b4m(*args, "--style-start", 1.5, "--out", tmp_path / "bad")
    assert r.returncode == 2 and "style_start" in r.stderr
    for fmt, key in (("diffusers", ".lora_A.weight"), ("kohya", ".alpha")):
        out = tmp_path / f"{fmt}.safetensors"
        r = b4m("export", "--adapter", tmp_path / "f.safetensors", "--format", fmt, "--out", out)
        assert r.returncode == 0, r.stderr
        assert any(k.endswith(key) for k in load_file(out))
    # a folder: weights, a sample grid drawn with the adapter, and a model card showing it
    r = b4m("export", "--adapter", tmp_path / "f.safetensors", "--format", "diffusers", "--out", tmp_path / "hub")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "hub" / "samples.png").size == (4 * 32, 32)
    assert "![samples](samples.png)" in (tmp_path / "hub" / "README.md").read_text()
    # a baseline through the same command
    r = b4m(
        "train",
        "content",
        "--images",
        c,
        "--class-word",
        "dog",
        "--base",
        tiny_sd_path,
        "--steps",
        1,
        "--rank",
        4,
        "--method",
        "lora",
        "--out",
        tmp_path / "lc.safetensors",
    )
    assert r.returncode == 0, r.stderr
    assert Adapter.load(tmp_path / "lc.safetensors").method == "lora"


def test_resume_from_a_checkpoint_file(tmp_path, tiny_sd_path):
    c = write_images(tmp_path / "content", 0, 2)
    common = [
        "train",
        "content",
        "--images",
        c,
        "--class-word",
        "dog",
        "--base",
        tiny_sd_path,
        "--steps",
        4,
        "--rank",
        4,
        "--checkpoint-every",
        2,
    ]
    assert b4m(*common, "--out", tmp_path / "a.safetensors").returncode == 0
    r = b4m(*common, "--resume", tmp_path / "a.step000002.ckpt.safetensors", "--out", tmp_path / "b.safetensors")
    assert r.returncode == 0, r.stderr
    a, b = Adapter.load(tmp_path / "a.safetensors"), Adapter.load(tmp_path / "b.safetensors")
    import torch

    assert all(torch.allclose(a.tensors[k], b.tensors[k], atol=1e-6) for k in a.tensors)


def test_train_takes_image_files_and_folders_with_the_server_forms_flag_names(tmp_path, tiny_sd_path):
    a, b = write_images(tmp_path / "a", 0, 2), write_images(tmp_path / "b", 1, 1)
    out = tmp_path / "s.safetensors"
    common = ["--base", tiny_sd_path, "--steps", 1, "--rank", 4, "--out", out]
    r = b4m("train", "style", "--images", a / "00.png", b, "--word", "ink", *common)  # a file and a folder
    assert r.returncode == 0, r.stderr
    assert Adapter.load(out).words["style"] == "ink"
    r = b4m("train", "style", "--images", a / "00.png", tmp_path / "nothing.png", "--word", "ink", *common)
    assert r.returncode == 2 and "not found" in r.stderr


def test_clear_errors_for_bad_input(tmp_path, tiny_sd_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    notimg = tmp_path / "notimg"
    notimg.mkdir()
    (notimg / "a.png").write_text("this is not a png")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.pdf").write_text("x")
    base = [
        "train",
        "content",
        "--class-word",
        "dog",
        "--base",
        tiny_sd_path,
        "--steps",
        1,
        "--out",
        tmp_path / "x.safetensors",
    ]
    cases = [
        (["--images", tmp_path / "missing"], "not found"),
        (["--images", empty], "no images"),
        (["--images", notimg], "cannot read image"),
        (["--images", other], "not an image file"),
    ]
    for extra, msg in cases:
        r = b4m(*base, *extra)
        assert r.returncode == 2 and msg in r.stderr, (extra, r.stderr)
    good = write_images(tmp_path / "good", 0, 1)
    r = b4m(
        "train",
        "content",
        "--images",
        good,
        "--class-word",
        "dog",
        "--base",
        tmp_path / "nomodel",
        "--steps",
        1,
        "--out",
        tmp_path / "x.safetensors",
    )
    assert r.returncode == 2 and "base model folder not found" in r.stderr
    r = b4m(
        "train",
        "content",
        "--images",
        good,
        "--class-word",
        "dog",
        "--base",
        good,
        "--steps",
        1,
        "--out",
        tmp_path / "x.safetensors",
    )
    assert r.returncode == 2 and "not a diffusers pipeline folder" in r.stderr
    r = b4m("generate", "--adapter", tmp_path / "nope.safetensors", "--prompt", "x", "--out", tmp_path / "o")
    assert r.returncode == 2 and "adapter file not found" in r.stderr
    r = b4m("export", "--adapter", tmp_path / "nope.safetensors", "--format", "kohya", "--out", tmp_path / "o.st")
    assert r.returncode == 2
    r = b4m(
        "train",
        "content",
        "--images",
        good,
        "--class-word",
        "dog",
        "--base",
        tiny_sd_path,
        "--steps",
        1,
        "--rho",
        "1.5",
        "--out",
        tmp_path / "x.safetensors",
    )
    assert r.returncode == 2 and "rho" in r.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_train_on_micro_uses_mcp_from_the_models_bank_unless_told_not_to(tmp_path):
    import json

    from b4m_core.micro.model import MODEL_DIR
    from b4m_core.micro.references import reference_folder

    default = json.loads((MODEL_DIR / "b4m_defaults.json").read_text())["aux_sets"]
    assert default >= 1  # MCP is the default path
    folder = reference_folder("content", "fish")
    for k, expected in ((None, default), (1, 1), (0, 0)):
        out = tmp_path / f"fish_{k}.safetensors"
        args = ["train", "content", "--images", folder, "--class-word", "shape", "--base", "micro"]
        args += ["--steps", 1, "--rank", 4, "--device", "cpu", "--out", out]
        r = b4m(*args, *(["--aux-sets", k] if k is not None else []))
        assert r.returncode == 0, r.stderr
        aux = Adapter.load(out).extra["aux"]
        assert len(aux) == expected, aux


def test_settings_file_with_flags_over_it_and_samples_while_training(tmp_path, tiny_sd_path):
    import tomllib

    example = b4m("config", "example")
    assert example.returncode == 0 and {"model", "network", "train", "data", "sample"} <= set(
        tomllib.loads(example.stdout)
    )
    images = write_images(tmp_path / "dog", 0, 2)
    job = tmp_path / "job.toml"
    job.write_text(
        f"""
[model]
base = "{tiny_sd_path}"
[network]
rank = 4
[train]
steps = 6
learning_rate = 2e-3
seed = 3
aux_sets = 0
[data]
images = "{images}"
word = "dog"
out = "{tmp_path / "dog.safetensors"}"
[sample]
prompts = ["a photo of {{content}}", "{{content}} on a beach"]
every = 1
"""
    )
    r = b4m("train", "content", "--config", job, "--steps", 2)  # the flag wins over the file's 6
    assert r.returncode == 0, r.stderr
    made = Adapter.load(tmp_path / "dog.safetensors")
    assert (made.steps, made.rank, made.seed, made.extra["learning_rate"]) == (2, 4, 3, 2e-3)
    samples = sorted((tmp_path / "dog_samples").glob("*.png"))
    assert [p.name for p in samples] == ["step000001_00.png", "step000001_01.png"]  # 2 prompts at step 1
    (tmp_path / "bad.toml").write_text("[train]\nsteps = 2\nlearnin_rate = 1e-3\n")
    r = b4m("train", "content", "--config", tmp_path / "bad.toml")
    assert r.returncode == 2 and "unknown settings ['learnin_rate']" in r.stderr
    r = b4m("train", "content", "--config", tmp_path / "missing.toml")
    assert r.returncode == 2 and "config file not found" in r.stderr
