"""Loading HF-named checkpoint tensors into a model's (possibly fused) parameters."""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Optional

import torch

from paged_backend.layers.linear import default_weight_loader

logger = logging.getLogger(__name__)

# Maps a checkpoint name to (parameter name, shard id or None), or None to skip it.
NameMapper = Callable[[str], Optional[tuple[str, Optional[int]]]]


def _preview(names: list[str], limit: int = 8) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_named_weights(model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                       map_name: NameMapper) -> None:
    """Load `weights` into `model` through `map_name`; raise on unexpected or missing tensors.

    A parameter counts as loaded once checkpoint tensors covering all its
    elements were copied in (fused parameters load from several tensors).
    """
    params = dict(model.named_parameters())
    loaded_numel = dict.fromkeys(params, 0)
    unexpected: list[str] = []
    for name, tensor in weights:
        target = map_name(name)
        if target is None:
            continue
        param_name, shard_id = target
        param = params.get(param_name)
        if param is None:
            unexpected.append(name)
            continue
        loader = getattr(param, "weight_loader", None)
        try:
            if shard_id is None:
                (loader or default_weight_loader)(param, tensor)
            else:
                loader(param, tensor, shard_id)
        except ValueError as exc:
            raise ValueError(f"Cannot load checkpoint tensor {name!r} into {param_name!r}: {exc}") from exc
        loaded_numel[param_name] += tensor.numel()
    if unexpected:
        raise ValueError(f"Unexpected weights in the checkpoint (no matching parameter in "
                         f"{type(model).__name__}): {_preview(unexpected)}")
    missing = [n for n, p in params.items() if loaded_numel[n] < p.numel()]
    if missing:
        raise ValueError(f"Weights missing from the checkpoint for {type(model).__name__}: "
                         f"{_preview(missing)}")
