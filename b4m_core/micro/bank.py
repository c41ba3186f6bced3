"""The micro model's bank of MCP auxiliary sets: known concepts rendered by the world.

A break stage with MCP trains the concept's half on its references and the other half on
k auxiliary sets of the opposite kind. Where a request names none, they come from here
(`BaseModel.auxiliary_sets`), so MCP is the default path without the user uploading extra
sets.
"""

from __future__ import annotations

import numpy as np

from ..data import Concept
from .references import CLASS_WORD
from .world import BACKGROUNDS, PRETRAIN_CONTENTS, PRETRAIN_STYLES, Scene, render

# identifier tokens for token-bound auxiliary sets (rare letter triples, like the concepts')
AUX_TOKENS = ("vqz", "jwk", "xqv", "zjq", "kvx", "qzw", "wvj", "zkq")


def aux_bank(kind: str, k: int, seed: int = 0, token_bound: bool = False, generic_word: bool = False) -> list[Concept]:
    """MCP auxiliary sets of the opposite kind: known concepts rendered by the world.

    The model knows them; `token_bound` gives each its own identifier token anyway, as the
    paper's auxiliary styles have ("w@z sticker style"). With the known word beside it
    ("vqz brick") the word still names the set; `generic_word` names it as a user's concept is
    named ("vqz pattern", "vqz shape"), so only the token tells the sets apart, as the paper's
    new auxiliary styles are told apart."""
    rng = np.random.default_rng([seed, 4242])
    bgs = tuple(BACKGROUNDS)
    # a content learns beside known styles (each shown on 2 known contents), a style beside
    # known contents (each in 2 known styles)
    aux_kind = "style" if kind == "content" else "content"
    names, others = (
        (PRETRAIN_STYLES, PRETRAIN_CONTENTS) if aux_kind == "style" else (PRETRAIN_CONTENTS, PRETRAIN_STYLES)
    )
    out = []
    for j, name in enumerate(rng.choice(names, size=k, replace=False)):
        scenes = []
        for other in rng.choice(others, size=2, replace=False):
            content, style = (str(other), str(name)) if aux_kind == "style" else (str(name), str(other))
            scenes.append(Scene(content, style, bgs[rng.integers(6)], "center", "large"))
        if aux_kind == "style":
            captions = [f"a {{style}} {s.content} on a {s.background} background" for s in scenes]
        else:
            captions = [f"a {s.style} {{content}} on a {s.background} background" for s in scenes]
        out.append(
            Concept(
                aux_kind,
                [render(s, (50 if aux_kind == "style" else 60) + i) for i, s in enumerate(scenes)],
                word=CLASS_WORD[aux_kind] if generic_word else str(name),
                token=AUX_TOKENS[j % len(AUX_TOKENS)] if token_bound else "",
                captions=captions,
            )
        )
    return out
