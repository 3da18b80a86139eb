"""Parameters read outside the module that owns them (tied heads, shared embedding rows)."""
from __future__ import annotations

from typing import Iterable

from torch import nn


def register_shared_parameters(pairs: Iterable[tuple[nn.Module, nn.Parameter]]) -> None:
    """Tell ZeRO-3 that each module reads the parameter paired with it, which it does not own.

    ZeRO-3 gathers a partitioned parameter only around its owner's forward; a tied head or
    an embedding row read elsewhere must be gathered for that reader too. Outside ZeRO-3
    this only records the pairs.
    """
    try:
        from deepspeed.zero import register_external_parameter
    except ImportError:  # DeepSpeed is a dependency, but the models are usable without it
        return
    for module, parameter in pairs:
        register_external_parameter(module, parameter)
