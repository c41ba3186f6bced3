"""Pivotal tuning: an identifier token's input embedding learnt with its adapter.

A PLP content half reads its layer's input only through the frozen random `C`, so it
cannot single out the identifier's text features the way a LoRA's trainable down
projection can; a learnt embedding for the identifier can move them where `C` reads.
The base model's tokenizer and embedding tables are never changed: a forward hook on
each text encoder's input embeddings replaces the vectors at the identifier's word pieces
(found as a contiguous run of ids) with the adapter's own. Prompts without the identifier
encode exactly as before, and a content and a style adapter (different identifiers)
carry their embeddings side by side into a fused adapter.

Adapter tensors: `token.<kind>.<encoder index>` (pieces x width).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ConfigError
from .formats import TOKEN_PREFIX as PREFIX
from .formats import identifier_vectors


def text_encoders(pipe) -> list[tuple[object, nn.Module]]:
    """(tokenizer, text encoder) of each encoder the pipeline has (SDXL: two)."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def piece_ids(tokenizer, token: str) -> list[int]:
    """The ids `token` is written with, no special tokens."""
    return list(tokenizer(token, add_special_tokens=False).input_ids)


def initial_vectors(pipe, token: str) -> list[torch.Tensor]:
    """The base model's own embeddings of the identifier's pieces, one tensor per encoder."""
    out = []
    for tok, enc in text_encoders(pipe):
        ids = torch.tensor(piece_ids(tok, token), device=enc.get_input_embeddings().weight.device)
        out.append(enc.get_input_embeddings().weight[ids].detach().float().clone())
    return out


def tensor_key(kind: str, index: int) -> str:
    return f"{PREFIX}{kind}.{index}"


def adapter_vectors(tensors: dict[str, torch.Tensor], tokens: dict[str, str]) -> dict[str, list[torch.Tensor]]:
    """{identifier: [vectors per encoder]} for every kind whose embedding the adapter carries."""
    return identifier_vectors(tensors, tokens)


def _replace(ids: torch.Tensor, embeds: torch.Tensor, pieces: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
    """`embeds` with every run of `pieces` in `ids` replaced by `vecs` (differentiable in `vecs`)."""
    n, length = pieces.numel(), ids.shape[-1]
    if n == 0 or length < n:
        return embeds
    hit = (ids.unfold(-1, n, 1) == pieces).all(-1)  # batch x (length - n + 1): a run starts here
    if not bool(hit.any()):
        return embeds
    for j in range(n):
        at = torch.zeros_like(ids, dtype=torch.bool)
        at[:, j : j + hit.shape[-1]] = hit
        embeds = torch.where(at.unsqueeze(-1), vecs[j].to(embeds.dtype), embeds)
    return embeds


class IdentifierEmbeddings:
    """Hooks that make the base model's text encoders read identifiers with learnt vectors.

    `vectors`: {identifier: [pieces x width tensor per encoder]}; the tensors are used as
    given (parameters stay differentiable). `remove()` restores the encoders.
    """

    def __init__(self, pipe, vectors: dict[str, list[torch.Tensor]]):
        self.handles = []
        for index, (tok, enc) in enumerate(text_encoders(pipe)):
            table = enc.get_input_embeddings()
            runs = [
                (torch.tensor(piece_ids(tok, token), device=table.weight.device), vecs[index])
                for token, vecs in vectors.items()
                if index < len(vecs)
            ]
            for pieces, vecs in runs:
                if vecs.shape != (pieces.numel(), table.weight.shape[1]):
                    raise ConfigError(
                        f"token embedding of shape {tuple(vecs.shape)} does not fit text encoder {index} "
                        f"({pieces.numel()} pieces x {table.weight.shape[1]})"
                    )
            if runs:
                self.handles.append(table.register_forward_hook(self._hook(runs)))

    @staticmethod
    def _hook(runs):
        def hook(module, args, output):
            ids = args[0] if args else None
            if ids is None:
                return output
            for pieces, vecs in runs:
                output = _replace(ids, output, pieces, vecs.to(output.device))
            return output

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
