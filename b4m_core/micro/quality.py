"""`b4m bench quality`: the paper's Table 1 on the micro world.

For every held-out content x held-out style pair, every method trains or composes an
adapter, draws images for fixed prompts that name attributes, and is scored on
content, style and prompt alignment: exactly, with the probes, and paper-style, with
EfficientNet-lite0 and Magenta style vectors. Writes `results.json`, `table.md`
(laid out like Table 1) and `grid.png` (pairs x methods).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import ConfigError, PLPConfig, TrainConfig
from ..data import Concept
from ..generation import GenerationRequest, Generator
from ..models import BaseModel, load_base
from ..training import fuse, train_concept
from .metrics import PaperMetrics
from .probes import load_probe, predict
from .references import reference_concept
from .world import (
    BACKGROUNDS,
    CONTENTS,
    HELDOUT_CONTENTS,
    HELDOUT_STYLES,
    PRETRAIN_CONTENTS,
    PRETRAIN_STYLES,
    STYLES,
    Scene,
    random_scene,
    render,
)

# (size, position, background) named by each evaluation prompt
EVAL_ATTRIBUTES = [
    ("large", "center", "white"),
    ("small", "top left", "blue"),
    ("large", "bottom right", "yellow"),
    ("small", "center", "pink"),
    ("large", "top right", "green"),
    ("small", "bottom left", "black"),
]


def eval_prompt(size: str, position: str, background: str) -> str:
    where = "in the center" if position == "center" else f"in the {position} corner"
    return f"a {size} {{content}} in {{style}} style {where} on a {background} background"


@dataclass
class Settings:
    # micro v1: 250 steps at 5e-3 learn a held-out content (5/6 probe reads, docs/micro.md)
    # in ~35 s per concept with k = 3 on 2 cores, inside the 60 s budget; lr 1e-2 learnt less.
    break_steps: int = 250
    make_steps: int = 50
    lora_steps: int = 250
    joint_steps: int = 250  # the same budget as one break stage, from scratch for every pair
    ziplora_steps: int = 100
    learning_rate: float = 5e-3
    batch_size: int = 1  # rows of each reference set a step (MCP adds one row per auxiliary set)
    rank: int = 16
    aux_sets: int = 3
    images_per_pair: int = 4
    sample_steps: int = 20
    guidance: float = 5.0
    seed: int = 0


# 2 x 2 pairs; these step counts ran the whole --quick bench in 11:59 on 2 cores (same UNet)
QUICK = Settings(break_steps=80, make_steps=20, lora_steps=80, joint_steps=80, ziplora_steps=40)


@dataclass
class Method:
    name: str
    family: str  # "b4m" | "joint" | "merge" | "ziplora"
    plp: PLPConfig = field(default_factory=PLPConfig)
    aux_sets: int | None = None  # MCP's k; None: the bench's setting (3)
    routing: str = "strict"

    def k(self, settings: Settings) -> int:
        return settings.aux_sets if self.aux_sets is None else self.aux_sets

    def key(self, settings: Settings) -> tuple:
        """Rows with the same key share their adapters."""
        return (self.family, self.plp, self.k(settings), self.routing)


def methods(rank: int) -> list[Method]:
    base = PLPConfig(rank=rank, alpha=float(rank))
    return [
        Method("B4M (content up)", "b4m", base),
        Method("B4M (content down)", "b4m", replace(base, content_half="down")),
        Method("Joint LoRA (DB+LoRA)", "joint", base),
        Method("Direct merge", "merge", base),
        Method("ZipLoRA", "ziplora", base),
        Method("B4M w/o MCP (k=1)", "b4m", base, aux_sets=1),  # the paper's ablation: one style per content
        Method("B4M no auxiliary sets (k=0)", "b4m", base, aux_sets=0),
        Method("B4M random bases (w/o Orth)", "b4m", replace(base, basis_mode="random")),
        Method("B4M rho=0.25", "b4m", replace(base, rho=0.25)),
        Method("B4M rho=0.5", "b4m", base),  # same adapters as the first row; listed for the sweep
        Method("B4M rho=0.75", "b4m", replace(base, rho=0.75)),
        Method("B4M balanced bases", "b4m", replace(base, basis_scale="balanced")),
        Method("B4M released routing", "b4m", base, routing="released"),
    ]


def aux_bank(kind: str, k: int, seed: int = 0) -> list[Concept]:
    """MCP auxiliary sets of the opposite kind: known concepts rendered by the world.

    The model already knows them, so they carry no identifier token."""
    rng = np.random.default_rng([seed, 4242])
    bgs = tuple(BACKGROUNDS)
    out = []
    if kind == "content":  # auxiliary styles for a content adapter
        for name in rng.choice(PRETRAIN_STYLES, size=k, replace=False):
            scenes = [
                Scene(str(c), str(name), bgs[rng.integers(6)], "center", "large")
                for c in rng.choice(PRETRAIN_CONTENTS, size=2, replace=False)
            ]
            out.append(
                Concept(
                    "style",
                    [render(s, 50 + i) for i, s in enumerate(scenes)],
                    word=str(name),
                    token="",
                    captions=[f"a {{style}} {s.content} on a {s.background} background" for s in scenes],
                )
            )
    else:
        for name in rng.choice(PRETRAIN_CONTENTS, size=k, replace=False):
            scenes = [
                Scene(str(name), str(st), bgs[rng.integers(6)], "center", "large")
                for st in rng.choice(PRETRAIN_STYLES, size=2, replace=False)
            ]
            out.append(
                Concept(
                    "content",
                    [render(s, 60 + i) for i, s in enumerate(scenes)],
                    word=str(name),
                    token="",
                    captions=[f"a {s.style} {{content}} on a {s.background} background" for s in scenes],
                )
            )
    return out


class QualityBench:
    def __init__(
        self,
        base: BaseModel,
        contents: list[str],
        styles: list[str],
        settings: Settings,
        log: Callable[[str], None] = print,
    ):
        self.base, self.contents, self.styles, self.s, self.log = base, contents, styles, settings, log
        self.gen = Generator(base)
        self.probe, self.probe_acc = load_probe()
        rng = np.random.default_rng(7)
        self.metrics = PaperMetrics([render(random_scene(rng, CONTENTS, STYLES), i) for i in range(200)])
        self.ref = {("content", c): reference_concept("content", c) for c in contents}
        self.ref.update({("style", s): reference_concept("style", s) for s in styles})
        self.timings: dict[str, list[float]] = {}

    def _time(self, key: str, fn):
        t = time.perf_counter()
        out = fn()
        self.timings.setdefault(key, []).append(time.perf_counter() - t)
        return out

    def _cfg(self, steps: int, lr: float | None = None) -> TrainConfig:
        return TrainConfig(
            steps=steps, learning_rate=lr or self.s.learning_rate, seed=self.s.seed, batch_size=self.s.batch_size
        )

    def adapters(self, m: Method, cache: dict) -> dict:
        """Per pair, the fused adapter of method `m` (first-stage adapters cached by key)."""
        s = self.s
        out = {}
        if m.family == "b4m":
            key = m.key(s)
            if key not in cache:
                single = {}
                for kind, names in (("content", self.contents), ("style", self.styles)):
                    for n in names:
                        aux = aux_bank(kind, m.k(s), seed=s.seed)
                        single[(kind, n)] = self._time(
                            "b4m break (per concept)",
                            lambda: train_concept(
                                self.base,
                                self.ref[(kind, n)],
                                "b4m",
                                aux=aux,
                                plp=m.plp,
                                cfg=replace(self._cfg(s.break_steps), routing=m.routing),
                            ),
                        )
                pairs = {}
                for c in self.contents:
                    for st in self.styles:
                        pairs[(c, st)] = self._time(
                            "b4m make (per pair)",
                            lambda: fuse(
                                self.base,
                                single[("content", c)],
                                single[("style", st)],
                                self.ref[("content", c)],
                                self.ref[("style", st)],
                                "b4m",
                                cfg=self._cfg(s.make_steps),
                            ),
                        )
                cache[key] = pairs
            return cache[key]
        if m.family in ("merge", "ziplora"):
            key = ("lora", m.plp.rank)
            if key not in cache:
                cache[key] = {
                    (kind, n): self._time(
                        "lora (per concept)",
                        lambda: train_concept(
                            self.base, self.ref[(kind, n)], "lora", plp=m.plp, cfg=self._cfg(s.lora_steps)
                        ),
                    )
                    for kind, names in (("content", self.contents), ("style", self.styles))
                    for n in names
                }
            single = cache[key]
        for c in self.contents:
            for st in self.styles:
                cref, sref = self.ref[("content", c)], self.ref[("style", st)]
                if m.family == "joint":
                    out[(c, st)] = self._time(
                        "joint (per pair)",
                        lambda: fuse(
                            self.base, None, None, cref, sref, "joint", cfg=self._cfg(s.joint_steps), plp=m.plp
                        ),
                    )
                elif m.family == "merge":
                    out[(c, st)] = self._time(
                        "merge (per pair)",
                        lambda: fuse(self.base, single[("content", c)], single[("style", st)], cref, sref, "merge"),
                    )
                else:
                    out[(c, st)] = self._time(
                        "ziplora (per pair)",
                        lambda: fuse(
                            self.base,
                            single[("content", c)],
                            single[("style", st)],
                            cref,
                            sref,
                            "ziplora",
                            cfg=self._cfg(s.ziplora_steps, lr=1e-2),
                        ),
                    )
        return out

    def draw(self, adapter) -> tuple[list[Image.Image], list[tuple]]:
        self.gen.set_adapter(adapter, fuse=True)
        attrs = EVAL_ATTRIBUTES[: self.s.images_per_pair]
        images = []
        for i, a in enumerate(attrs):
            req = GenerationRequest(
                eval_prompt(*a), seed=self.s.seed + i, steps=self.s.sample_steps, guidance=self.s.guidance
            )
            images += self._time("generate (per image)", lambda: self.gen.generate(req))
        self.gen.set_adapter(None)
        return images, attrs

    def score(self, images, attrs, content: str, style: str) -> dict:
        reads = predict(self.probe, images)
        n = len(images)
        probe = {
            "content": sum(r["content"] == content for r in reads) / n,
            "style": sum(r["style"] == style for r in reads) / n,
            "prompt": sum(
                (r["size"] == a[0]) + (r["position"] == a[1]) + (r["background"] == a[2]) for r, a in zip(reads, attrs)
            )
            / (3 * n),
        }
        probe["average"] = (probe["content"] + probe["style"] + probe["prompt"]) / 3
        paper = self.metrics.score(images, self.ref[("content", content)].images, self.ref[("style", style)].images)
        return {"probe": probe, "paper": paper}

    def run(self, method_list: list[Method], on_method: Callable[[dict], None] | None = None) -> dict:
        cache: dict = {}
        results = {
            "methods": {},
            "pairs": [[c, s] for c in self.contents for s in self.styles],
            "probe_test_accuracy": self.probe_acc,
        }
        grid_cells: dict[str, dict] = {}
        seen: dict[tuple, str] = {}
        for m in method_list:
            key = m.key(self.s)
            if key in seen:  # the same adapters as an earlier row (the rho sweep's 0.5)
                results["methods"][m.name] = dict(results["methods"][seen[key]], same_as=seen[key])
                grid_cells[m.name] = grid_cells[seen[key]]
                continue
            seen[key] = m.name
            t = time.perf_counter()
            fused = self.adapters(m, cache)
            per_pair = {}
            for (c, st), adapter in fused.items():
                images, attrs = self.draw(adapter)
                per_pair[f"{c}|{st}"] = self.score(images, attrs, c, st)
                grid_cells.setdefault(m.name, {})[(c, st)] = images
            agg = {
                grp: {
                    k: float(np.mean([p[grp][k] for p in per_pair.values()]))
                    for k in next(iter(per_pair.values()))[grp]
                }
                for grp in ("probe", "paper")
            }
            results["methods"][m.name] = {"aggregate": agg, "pairs": per_pair, "seconds": time.perf_counter() - t}
            self.log(f"{m.name}: {json.dumps(agg['probe'])} {json.dumps(agg['paper'])}")
            if on_method:  # partial results survive an interrupted run
                on_method(results)
        results["timings_s"] = {k: {"mean": float(np.mean(v)), "n": len(v)} for k, v in self.timings.items()}
        return results, grid_cells


def time_to_new_pair(t: dict) -> dict:
    """Seconds from two concepts' references to a pair adapter, per method."""
    g = lambda k: t.get(k, {}).get("mean", float("nan"))
    b4m = g("b4m make (per pair)")
    out = {
        "b4m_compose_and_finetune_s": b4m,
        "ziplora_merge_training_s": g("ziplora (per pair)"),
        "joint_lora_from_scratch_s": g("joint (per pair)"),
    }
    out["ziplora_over_b4m"] = out["ziplora_merge_training_s"] / b4m
    out["joint_over_b4m"] = out["joint_lora_from_scratch_s"] / b4m
    return out


def write_table(results: dict, path: Path) -> str:
    lines = [
        "| Method | Content (probe) | Style (probe) | Prompt (probe) | Average (probe) | "
        "Content (EffNet cos) | Style (Magenta cos) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results["methods"].items():
        p, q = r["aggregate"]["probe"], r["aggregate"]["paper"]
        lines.append(
            f"| {name} | {p['content']:.3f} | {p['style']:.3f} | {p['prompt']:.3f} | {p['average']:.3f} | "
            f"{q['content_effnet']:.3f} | {q['style_magenta']:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def write_grid(cells: dict, pairs: list, path: Path) -> None:
    """Rows: pairs; columns: methods; each cell the pair's first two images side by side."""
    names = list(cells)
    rows = []
    for c, s in pairs:
        row = []
        for n in names:
            ims = cells[n][(c, s)][:2]
            cell = np.concatenate([np.asarray(im.convert("RGB")) for im in ims], axis=1)
            row.append(np.pad(cell, ((2, 2), (2, 2), (0, 0)), constant_values=255))
        rows.append(np.concatenate(row, axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def run_quality(
    out_dir: str | Path,
    quick: bool = False,
    base: str = "micro",
    log=print,
    settings: Settings | None = None,
    contents=None,
    styles=None,
    only: list[str] | None = None,
) -> dict:
    settings = settings or (QUICK if quick else Settings())
    rows = [m for m in methods(settings.rank) if not only or any(o.lower() in m.name.lower() for o in only)]
    if not rows:
        raise ConfigError(f"no method matches {only}: {[m.name for m in methods(settings.rank)]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    contents = list(contents or (HELDOUT_CONTENTS[:2] if quick else HELDOUT_CONTENTS))
    styles = list(styles or (HELDOUT_STYLES[:2] if quick else HELDOUT_STYLES))
    t0 = time.perf_counter()
    bench = QualityBench(load_base(base), contents, styles, settings, log=log)
    partial = lambda r: (out / "results.partial.json").write_text(json.dumps(r, indent=2))
    results, cells = bench.run(rows, on_method=partial)
    results["settings"] = settings.__dict__ | {"quick": quick}
    results["time_to_new_pair"] = time_to_new_pair(results["timings_s"])
    results["total_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = write_table(results, out / "table.md")
    write_grid(cells, [tuple(p) for p in results["pairs"]], out / "grid.png")
    (out / "grid_columns.txt").write_text("\n".join(cells) + "\n")
    log(table)
    log(json.dumps(results["time_to_new_pair"]))
    return results
