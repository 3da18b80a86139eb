"""Reading the weights a fine-tuning run starts from, or `vlpt evaluate` scores (docs/downstream.md,
"Initialisation"): a vlpt run / checkpoint folder, or a state-dict file with our names or UNITER's."""
from __future__ import annotations

from pathlib import Path

from torch import Tensor

from trainer.config_files import ConfigError
from trainer.models.convert import TIED_DUPLICATES, import_uniter_state_dict
from trainer.models.convert_cli import load_state_dict_file, read_deepspeed_checkpoint, resolve_checkpoint_dir


def read_weights(path: str, key: str) -> tuple[dict[str, Tensor], str]:
    """(state dict in our key names, where it came from) for the file or folder at `path`, which the
    config key (or flag) `key` named; ConfigError with one line when it cannot be read."""
    p = Path(path)
    if p.is_dir():
        tag_dir = resolve_checkpoint_dir(p)
        sd, kind = read_deepspeed_checkpoint(tag_dir)
        return dict(sd), f"{tag_dir} ({kind})"
    if not p.is_file():
        raise ConfigError(f"{key}={path}: no such file or folder; name a vlpt run folder, a checkpoint folder "
                          "or a state-dict file")
    sd = load_state_dict_file(p)
    uniter_names = any(k in sd for k in TIED_DUPLICATES)
    try:
        sd = import_uniter_state_dict(sd)  # UNITER's own names (tied duplicates, gamma/beta) become ours
    except ValueError as e:
        raise ConfigError(f"{key}={path}: {e}") from None
    return sd, f"{p} ({'UNITER' if uniter_names else 'vlpt'} state dict)"
