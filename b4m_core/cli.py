"""`b4m`: the method on local files, no server.

b4m train content --images DIR --class-word WORD --base BASE --steps N --out FILE [--aux DIR ...]
b4m train style   --images DIR --style-word WORD --base BASE --steps N --out FILE [--aux DIR ...]
b4m fuse --content FILE --style FILE --content-images DIR --style-images DIR --steps N --out FILE
b4m generate --adapter FILE --prompt TEXT --seed S --num-images N --out DIR
b4m export --adapter FILE --format diffusers|kohya --out FILE
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import (
    BASIS_MODES,
    BASIS_SCALES,
    CONTENT_HALVES,
    ROUTINGS,
    SCHEDULERS,
    TARGET_SETS,
    ConfigError,
    TrainConfig,
)

AUX_HELP = (
    "auxiliary reference folder of the opposite kind for MCP (repeatable); each folder's name "
    "is its word, unless a file word.txt inside says otherwise"
)


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return v


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("b4m")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown"


def _train_args(p: argparse.ArgumentParser, with_plp: bool = True) -> None:
    p.add_argument(
        "--base",
        default=os.environ.get("B4M_BASE_MODEL", "micro"),
        help="base model: micro (shipped), a local diffusers folder or a hub id (env B4M_BASE_MODEL)",
    )
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="training steps (default: the base model's measured one: micro 250 break, 50 make; others 300 / 50)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate (default: the base model's measured one: micro 5e-3; others 1e-3; ZipLoRA 1e-4)",
    )
    p.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="reference images a step (default: the base model's; else 1)"
    )
    p.add_argument("--resolution", type=int, default=None, help="training resolution (default: the model's)")
    p.add_argument(
        "--mixed-precision",
        choices=["no", "auto", "fp16", "bf16"],
        default=None,
        help="autocast on CUDA (auto: bf16 where the GPU has it, else fp16); the CPU trains in fp32 "
        "(default: the base model's: auto for SD and SDXL)",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute activations in backward: less memory, slower (default: the base model's: on for SDXL)",
    )
    p.add_argument(
        "--checkpoint-every", type=_positive_int, default=0, help="write a resumable checkpoint every N steps"
    )
    p.add_argument(
        "--config", default=None, metavar="FILE", help="settings from a TOML/YAML file (b4m config example); flags win"
    )
    p.add_argument(
        "--sample-prompt",
        action="append",
        default=[],
        metavar="PROMPT",
        help="draw this prompt while training ({content} / {style}: the concepts; repeatable)",
    )
    p.add_argument(
        "--sample-every", type=int, default=50, metavar="N", help="with --sample-prompt: every N steps (default: 50)"
    )
    p.add_argument("--checkpoint-dir", default=None, help="folder for checkpoints (default: next to --out)")
    p.add_argument("--resume", default=None, help="a checkpoint file to continue from")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    p.add_argument(
        "--save-dtype",
        choices=["fp32", "fp16"],
        default="fp32",
        help="tensor type of the adapter file (fp16: half the size; it still trains and draws in fp32)",
    )
    if with_plp:
        p.add_argument("--rank", type=int, default=None, help="adapter rank (default: the base model's; else 16)")
        p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: rank)")
        p.add_argument(
            "--rho",
            type=float,
            default=None,
            help="PLP split ratio (default: the base model's measured one, 0.75 on micro; else 0.5)",
        )
        p.add_argument(
            "--basis-mode",
            choices=BASIS_MODES,
            default=None,
            help="frozen bases: exact (random, A C = 0), principal (along the base weights' top singular "
            "directions), paper, random (default: the base model's; else exact)",
        )
        p.add_argument(
            "--basis-scale",
            choices=BASIS_SCALES,
            default=None,
            help="exact bases: legacy (A 3-6x larger than C) or balanced (equal norms) (default: the base model's)",
        )
        p.add_argument("--basis-seed", type=int, default=0)
        p.add_argument("--content-half", choices=CONTENT_HALVES, default=None)
        p.add_argument("--targets", choices=TARGET_SETS, default=None)


def build_parser(extensions=(), amend=()) -> argparse.ArgumentParser:
    """`extensions`: callables adding more subcommands (the service layer adds serve/worker);
    `amend`: callables given {name: subparser} afterwards (it adds server forms of fuse/generate/export)."""
    parser = argparse.ArgumentParser(prog="b4m", description="Break-for-Make content-style customization")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for extend in extensions:
        extend(sub)

    train = sub.add_parser("train", help="break stage: learn a content or a style adapter")
    tsub = train.add_subparsers(dest="kind", required=True)
    for kind, word_flag in (("content", "--class-word"), ("style", "--style-word")):
        p = tsub.add_parser(kind, help=f"learn a {kind} adapter")
        p.add_argument(
            "--images",
            required=True,
            nargs="+",
            help=f"{kind} reference images: files or folders (a same-stem .txt beside an image is its caption)",
        )
        p.add_argument(
            "--word",
            word_flag,
            dest="word",
            required=True,
            help="class word of the content (dog)" if kind == "content" else "style word (watercolor)",
        )
        p.add_argument("--token", default="", help="identifier token (default sks for content, zwx for style)")
        p.add_argument("--aux", action="append", default=[], help=AUX_HELP)
        p.add_argument(
            "--aux-sets",
            type=int,
            default=None,
            metavar="K",
            help="with no --aux: K auxiliary sets from the base model's bank (default: its measured default, "
            "3 on micro; 0 turns MCP off; bases without a bank train with none)",
        )
        p.add_argument(
            "--aux-lr-factor",
            type=float,
            default=0.1,
            help="learning-rate factor for the auxiliary half (default 0.1, as the released code)",
        )
        p.add_argument(
            "--routing",
            choices=ROUTINGS,
            default="strict",
            help="MCP: strict (each loss trains only its own half; default) or released (one joint loss, "
            "as the authors' code does in effect)",
        )
        p.add_argument(
            "--train-token-embedding",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="pivotal tuning: learn the identifier token's embedding with the adapter (kept in the adapter "
            "file; default: the base model's)",
        )
        p.add_argument(
            "--token-lr", type=float, default=None, help="learning rate of the token embedding (default: --lr)"
        )
        p.add_argument(
            "--prior-preservation",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="DreamBooth's prior preservation: also train on the base model's own drawings of the captions "
            "with a word it knows in the concept's place (default: the base model's)",
        )
        p.add_argument("--prior-images", type=int, default=None, help="class images to draw (default 8)")
        p.add_argument("--prior-loss-weight", type=float, default=None, help="their loss weight (default 1)")
        p.add_argument(
            "--method", choices=["b4m", "lora"], default="b4m", help="b4m (PLP + MCP) or a plain LoRA for the baselines"
        )
        _train_args(p)

    p = sub.add_parser("fuse", help="make stage: combine a content and a style adapter")
    p.add_argument("--content", help="content adapter file")
    p.add_argument("--style", help="style adapter file")
    p.add_argument("--content-images", help="the content's reference folder")
    p.add_argument("--style-images", help="the style's reference folder")
    p.add_argument("--method", choices=["b4m", "joint", "merge", "ziplora"], default="b4m")
    _train_args(p, with_plp=False)
    p.set_defaults(base=None)  # default: the base model the adapters name

    p = sub.add_parser("generate", help="draw images with an adapter (or none)")
    p.add_argument("--adapter", default=None, help="adapter file (omit for the bare base model)")
    p.add_argument("--base", default=None, help="base model (default: the one the adapter names)")
    p.add_argument("--prompt", required=True, help="prompt; {content} and {style} expand to the adapter's concepts")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--strength", type=float, default=1.0, help="scale of the adapter's update, 0-2 (default 1)")
    p.add_argument("--content-scale", type=float, default=1.0, help="a B4M adapter's content half alone, 0-2")
    p.add_argument("--style-scale", type=float, default=1.0, help="a B4M adapter's style half alone, 0-2")
    p.add_argument(
        "--content-end", type=float, default=1.0, help="a B4M adapter's content half until this fraction of the steps"
    )
    p.add_argument(
        "--style-start", type=float, default=0.0, help="a B4M adapter's style half from this fraction of the steps"
    )
    p.add_argument("--scheduler", choices=list(SCHEDULERS), default="default", help="sampler (default: the model's)")
    p.add_argument("--unfused", action="store_true", help="keep the adapter unmerged")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True, help="folder for the PNG files")

    p = sub.add_parser("config", help="training settings files")
    csub = p.add_subparsers(dest="action", required=True)
    csub.add_parser("example", help="print a commented settings file (TOML) for --config")

    p = sub.add_parser("demo", help="the whole method on the micro model with the shipped references")
    p.add_argument("--out", default="out/demo", help="folder for adapters, images and grid.png")
    p.add_argument("--quick", action="store_true", help="2 contents x 2 styles, fewer steps")
    p.add_argument("--break-steps", type=int, default=None)
    p.add_argument("--make-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench", required=True)
    p = bsub.add_parser("quality", help="the paper's Table 1 on the micro world")
    p.add_argument("--out", default="out/quality", help="folder for results.json, table.md, grid.png")
    p.add_argument("--quick", action="store_true", help="2 x 2 pairs, fewer steps (a smoke run)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="NAME",
        help="only the table rows whose name contains one of these (e.g. 'w/o MCP' 'random')",
    )
    p.add_argument(
        "--split",
        choices=["test", "dev"],
        default="test",
        help="concepts: test (the 4 + 4 reported) or dev (the 4 + 4 anything is chosen on) (default: test)",
    )
    p.add_argument("--seeds", type=int, default=None, help="seeds per row, for the intervals (default: 1)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda where there is one)")
    p.add_argument(
        "--base",
        default="micro",
        help="the model: micro (shipped) or a micro-shaped folder, e.g. a pre-training run installed into a copy "
        "(bench/micro_install_run.py RUN FOLDER)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a bench setting for every row, e.g. batch_size=4, break_steps=400, basis_scale=balanced (repeatable)",
    )

    p = sub.add_parser("export", help="write an adapter as a diffusers or kohya LoRA")
    p.add_argument("--adapter", help="adapter file")
    p.add_argument("--format", choices=["diffusers", "kohya", "b4m"], required=True)
    p.add_argument(
        "--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="tensor type of the file (default: fp32)"
    )
    p.add_argument(
        "--out",
        required=True,
        help="a file, or a folder (no suffix): diffusers then writes pytorch_lora_weights.safetensors and a "
        "model card README.md (trigger words, base model, settings, sample grid)",
    )
    p.add_argument(
        "--samples",
        type=_positive_int,
        default=4,
        help="images drawn with the adapter for a diffusers folder's model card (default: 4; 0: none)",
    )
    for fn in amend:
        fn(sub.choices)
    return parser


def require(args, *flags: str) -> None:
    """The local form of a command that also has a server form: its file flags are required here."""
    missing = [f for f in flags if not getattr(args, f.lstrip("-").replace("-", "_"), None)]
    if missing:
        raise ConfigError(f"b4m {args.command} needs {', '.join(missing)}")


def _load_aux(folders: list[str], kind: str):
    from .data import load_concept

    out = []
    for i, folder in enumerate(folders):
        path = Path(folder)
        word_file = path / "word.txt"
        word = word_file.read_text().strip() if word_file.is_file() else path.name
        out.append(load_concept(kind, path, word, token=f"aux{i}"))
    return out


def _train_config(args, base, stage: str, **fallback) -> TrainConfig:
    """The run's settings: flags, else `fallback` (a method's own, e.g. ZipLoRA's rate), else
    the base model's measured defaults for `stage` (BaseModel.train_config)."""
    given = dict(
        steps=args.steps,
        learning_rate=args.lr,
        seed=args.seed,
        batch_size=args.batch_size,
        resolution=args.resolution,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        checkpoint_every=args.checkpoint_every,
        aux_lr_factor=getattr(args, "aux_lr_factor", None),
        routing=getattr(args, "routing", None),
        train_token_embedding=getattr(args, "train_token_embedding", None),
        token_learning_rate=getattr(args, "token_lr", None),
        prior_preservation=getattr(args, "prior_preservation", None),
        prior_images=getattr(args, "prior_images", None),
        prior_loss_weight=getattr(args, "prior_loss_weight", None),
    )
    for key, value in fallback.items():
        if given.get(key) is None:
            given[key] = value
    return base.train_config(stage, **given)


def _hooks(args):
    from tqdm import tqdm

    from .training import Hooks

    bar = None

    def progress(step: int, total: int, loss: float) -> None:  # a bar: step, loss, rate and ETA
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, initial=step - 1, unit="step", dynamic_ncols=True, file=sys.stderr)
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if step == total:
            bar.close()

    samples_dir = Path(args.out).with_suffix("")
    samples_dir = samples_dir.parent / f"{samples_dir.name}_samples"
    drawn: dict[int, int] = {}

    def preview(step: int, image) -> None:
        i = drawn[step] = drawn.get(step, -1) + 1
        samples_dir.mkdir(parents=True, exist_ok=True)
        path = samples_dir / f"step{step:06d}_{i:02d}.png"
        image.save(path)
        (bar.write if bar is not None else print)(f"sample {path}")

    ckpt_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else Path(args.out).parent
    stem = Path(args.out).stem

    def checkpoint(step: int, state: bytes) -> None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        path = ckpt_dir / f"{stem}.step{step:06d}.ckpt.safetensors"
        path.write_bytes(state)
        print(f"checkpoint {path}", file=sys.stderr)

    resume = None
    if args.resume:
        if not Path(args.resume).is_file():
            raise ConfigError(f"checkpoint not found: {args.resume}")
        resume = Path(args.resume).read_bytes()
    prompts = list(getattr(args, "sample_prompt", []) or [])
    return Hooks(
        progress=progress,
        checkpoint=checkpoint,
        resume=resume,
        preview=preview if prompts else None,
        preview_every=args.sample_every if prompts else 0,
        preview_prompts=prompts,
    )


def _need_base(args) -> str:
    if not args.base:
        raise ConfigError("no base model: pass --base (a diffusers folder or hub id) or set B4M_BASE_MODEL")
    return args.base


def cmd_train(args) -> None:
    from .data import load_concept
    from .models import load_base
    from .training import train_concept

    concept = load_concept(args.kind, args.images, args.word, token=args.token or None)
    other = "style" if args.kind == "content" else "content"
    aux = _load_aux(args.aux, other)
    base = load_base(_need_base(args), device=args.device)
    if not aux and args.method == "b4m":  # MCP by default: the model's own bank
        aux = base.auxiliary_sets(args.kind, args.aux_sets, seed=args.seed)
    plp = base.plp_config(
        rank=args.rank,
        alpha=args.alpha,
        rho=args.rho,
        basis_mode=args.basis_mode,
        basis_scale=args.basis_scale,
        basis_seed=args.basis_seed,
        content_half=args.content_half,
        targets=args.targets,
    )
    cfg = _train_config(args, base, "break")
    adapter = train_concept(base, concept, method=args.method, aux=aux, plp=plp, cfg=cfg, hooks=_hooks(args))
    adapter.save(args.out, args.save_dtype)
    print(args.out)


def cmd_fuse(args) -> None:
    from .adapter import Adapter
    from .data import load_concept
    from .models import load_base
    from .training import fuse

    require(args, "--content", "--style", "--content-images", "--style-images")
    content, style = Adapter.load(args.content), Adapter.load(args.style)
    cset = load_concept(
        "content", args.content_images, content.words.get("content") or "thing", token=content.tokens.get("content")
    )
    sset = load_concept(
        "style", args.style_images, style.words.get("style") or "style", token=style.tokens.get("style")
    )
    base = load_base(args.base or content.base_model, device=args.device)
    if args.method == "joint":  # one LoRA trained from scratch on both sets: a break stage's budget
        cfg = _train_config(args, base, "break", train_token_embedding=False)
    else:
        own = {"ziplora": dict(steps=100, learning_rate=1e-4), "merge": dict(steps=0)}.get(args.method, {})
        cfg = _train_config(args, base, "make", **own)
    fused = fuse(base, content, style, cset, sset, method=args.method, cfg=cfg, hooks=_hooks(args))
    fused.save(args.out, args.save_dtype)
    print(args.out)


def cmd_generate(args) -> None:
    from .adapter import Adapter
    from .generation import GenerationRequest, Generator
    from .models import load_base

    adapter = Adapter.load(args.adapter) if args.adapter else None
    base_name = args.base or (adapter.base_model if adapter else os.environ.get("B4M_BASE_MODEL", "micro"))
    if not base_name:
        raise ConfigError("no base model: pass --base or --adapter")
    gen = Generator(load_base(base_name, device=args.device))
    gen.set_adapter(
        adapter,
        fuse=not args.unfused,
        strength=args.strength,
        content_scale=args.content_scale,
        style_scale=args.style_scale,
    )
    req = GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        width=args.width,
        height=args.height,
        num_images=args.num_images,
        scheduler=args.scheduler,
        content_end=args.content_end,
        style_start=args.style_start,
    )
    images = gen.generate(req)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        path = out / f"image_{args.seed}_{i:02d}.png"
        im.save(path)
        print(path)


def _draw_samples(adapter, n: int) -> bytes:
    """`n` images the adapter draws on its base model with its usage prompt, as one PNG."""
    from .formats import read, sample_grid, usage_hint
    from .generation import GenerationRequest, Generator
    from .models import load_base

    gen = Generator(load_base(adapter.base_model))
    gen.set_adapter(adapter)
    prompt = usage_hint(read(adapter.to_bytes())[1])
    return sample_grid(gen.generate(GenerationRequest(prompt=prompt, num_images=n, seed=0)))


def cmd_export(args) -> None:
    from .adapter import Adapter
    from .formats import FormatError, write_export

    require(args, "--adapter")
    adapter = Adapter.load(args.adapter)
    samples = None
    if args.format == "diffusers" and not Path(args.out).suffix and args.samples:
        samples = _draw_samples(adapter, args.samples)
    try:
        written = write_export(adapter.to_bytes(), args.format, args.out, args.dtype, samples=samples)
    except FormatError as exc:
        raise ConfigError(str(exc)) from exc
    print("\n".join(str(p) for p in written))


def cmd_demo(args) -> None:
    from .micro.demo import run_demo
    from .micro.world import HELDOUT_CONTENTS, HELDOUT_STYLES

    n = 2 if args.quick else None
    run_demo(
        args.out,
        contents=HELDOUT_CONTENTS[:n] if n else None,
        styles=HELDOUT_STYLES[:n] if n else None,
        break_steps=args.break_steps or (80 if args.quick else None),  # None: the model's defaults
        make_steps=args.make_steps or (20 if args.quick else None),
        seed=args.seed,
        log=lambda m: print(m, file=sys.stderr),
    )
    print(Path(args.out) / "grid.png")


def cmd_bench(args) -> None:
    from dataclasses import replace

    from .micro.quality import QUICK, Settings, run_quality, setting_changes

    settings = QUICK if args.quick else Settings()
    changes = setting_changes(args.set + ([f"seeds={args.seeds}"] if args.seeds else []))
    run_quality(
        args.out,
        quick=args.quick,
        base=args.base,
        log=lambda m: print(m, file=sys.stderr),
        only=args.methods,
        settings=replace(settings, **changes),
        split=args.split,
        device=args.device,
    )
    print(Path(args.out) / "table.md")


def cmd_config(args) -> None:
    from .jobfile import EXAMPLE

    print(EXAMPLE, end="")


COMMANDS = {
    "train": cmd_train,
    "fuse": cmd_fuse,
    "generate": cmd_generate,
    "export": cmd_export,
    "demo": cmd_demo,
    "bench": cmd_bench,
    "config": cmd_config,
}


def _config_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """`--config FILE` in argv: its settings become the defaults of the subcommand named."""
    from . import jobfile

    path = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None)
    path = path or next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None:
        return
    target = parser
    for word in argv:
        subs = [a for a in target._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        target = subs[0].choices[word]
    if not any(a.dest == "config" for a in target._actions):
        raise ConfigError("--config works with b4m train content|style and b4m fuse")
    jobfile.apply(target, jobfile.load(path), path)


def main(argv: list[str] | None = None, extensions=(), commands: dict | None = None, amend=()) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(extensions, amend)
    try:
        _config_file(parser, argv)
    except ConfigError as exc:
        print(f"b4m: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        {**COMMANDS, **(commands or {})}[args.command](args)
    except ConfigError as exc:
        print(f"b4m: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
