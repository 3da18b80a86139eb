"""`vlpt convert {import,export}`: UNITER / ALBEF checkpoint files <-> ours on disk
(docs/models.md, "UNITER checkpoint compatibility", "ALBEF checkpoint export").

import: a UNITER `model_step_*.pt` state dict -> our key names (.pt or .safetensors).
export: our state-dict file, or a training checkpoint (run dir, its `checkpoints/`
dir, or one `step_XXXXXXXX/` dir) -> a UNITER-named state dict, or for an ALBEF run
one with the names of ALBEF's `ALBEF` model (student, momentum model and queues).

Every user error is a `ConfigError` naming the path, which the CLI prints as one line.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import pickle
import re
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from trainer.checkpoint_files import UnsafeCheckpointError, load_tensors
from trainer.config_files import ConfigError
from trainer.models.convert import TIED_DUPLICATES, export_uniter_state_dict, import_uniter_state_dict
from trainer.models.convert_albef import export_albef_state_dict, is_albef_state_dict

StateDict = Dict[str, Tensor]

STAGE0_MODEL_FILE = "mp_rank_00_model_states.pt"
TEACHER_FILE = "teacher.pt"
"""ALBEF runs: the recipe's replicated `teacher` module, saved beside the engine's files (trainer/checkpoint.py)."""
KEY_ORDER_METADATA = "vlpt_key_order"  # safetensors sorts keys; UNITER's order is kept here
_MAX_LISTED = 5
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run_convert(args: argparse.Namespace) -> int:
    """Entry point of `vlpt convert`; prints one summary line and returns the exit code."""
    src, dst = Path(args.src), Path(args.dst)
    if args.direction == "import":
        print(import_uniter_file(src, dst))
    elif args.direction == "export":
        print(export_checkpoint(src, dst))
    else:
        raise ConfigError(f"unknown convert direction {args.direction!r}; use 'import' or 'export'")
    return 0


def import_uniter_file(src: Path, dst: Path) -> str:
    """UNITER state-dict file -> our state dict at `dst`; returns the summary line."""
    sd = load_state_dict_file(src)
    try:
        ours = import_uniter_state_dict(sd)
    except ValueError as e:
        raise ConfigError(f"{src}: {_one_line(e)}") from None
    _require_tie_sources(ours, src)
    save_state_dict(ours, dst)
    dropped = [k for k in TIED_DUPLICATES if k in sd]
    return (f"imported {src} -> {dst}: {len(sd)} keys in, {len(ours)} out "
            f"(tied duplicates dropped: {', '.join(dropped) or 'none'})")


def export_checkpoint(src: Path, dst: Path) -> str:
    """Our state-dict file or training checkpoint -> the model family's own names (UNITER's or
    ALBEF's) at `dst`; returns the summary line."""
    teacher = None
    if src.is_dir():
        tag_dir = resolve_checkpoint_dir(src)
        sd, kind = read_deepspeed_checkpoint(tag_dir)
        check_against_run_config(sd, tag_dir)
        source = tag_dir
        teacher = read_teacher(tag_dir)
    elif src.is_file():
        sd, kind, source = load_state_dict_file(src), "state dict", src
    else:
        raise ConfigError(f"--src {src} does not exist; pass our state-dict file, a run directory, "
                          "its checkpoints/ directory or one step_XXXXXXXX/ checkpoint directory")
    if is_albef_state_dict(sd):
        return export_to_albef(sd, teacher, source, kind, dst)
    if is_finetuned_uniter(sd):
        save_state_dict(sd, dst)  # a task head on the backbone: UNITER's own key names already
        return f"exported {source} ({kind}, fine-tuned) -> {dst}: {len(sd)} keys with UNITER names"
    return export_to_uniter(sd, source, kind, dst)


FINETUNE_HEADS = ("vqa_output.", "rank_output.", "nlvr2_output.", "re_output.", "vcr_output.")


def is_finetuned_uniter(sd: Mapping[str, Tensor]) -> bool:
    """A `vlpt finetune` UNITER (docs/downstream.md): the backbone and a task head, no pretraining heads."""
    pretraining_heads = ("cls.", "feat_regress.", "region_classifier.")
    return any(k.startswith(FINETUNE_HEADS) for k in sd) and not any(k.startswith(pretraining_heads) for k in sd)


def export_to_albef(sd: StateDict, teacher: Optional[StateDict], source: Path, kind: str, dst: Path) -> str:
    """Our ALBEF student (+ its teacher) -> a state dict with the names of ALBEF's `ALBEF` model."""
    try:
        out = export_albef_state_dict(sd, teacher)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{source}: cannot export with ALBEF's names ({_one_line(e)})") from None
    save_state_dict(out, dst)
    what = "student and momentum model" if teacher is not None else "student only (no teacher.pt)"
    return f"exported {source} ({kind}, {what}) -> {dst}: {len(out)} keys with ALBEF names"


def export_to_uniter(sd: StateDict, source: Path, kind: str, dst: Path) -> str:
    """Our UNITER state dict -> UNITER-named `.pt`; returns the summary line."""
    already = [k for k in TIED_DUPLICATES if k in sd]
    if already:
        raise ConfigError(f"{source} already has UNITER key names ({', '.join(already)}); "
                          "it needs no export (use `vlpt convert import` to get our names)")
    _require_tie_sources(sd, source)
    out = export_uniter_state_dict(sd)
    save_state_dict(out, dst)
    return f"exported {source} ({kind}) -> {dst}: {len(out)} keys with UNITER names"


def load_state_dict_file(path: Path) -> StateDict:
    """A plain name -> tensor file (.safetensors, or .pt read with `weights_only=True`), or the `model` entry of
    a training checkpoint that holds one (ALBEF's `ALBEF.pth`)."""
    if not path.is_file():
        raise ConfigError(f"--src {path} is not an existing file; check the path")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file can fail anywhere inside the unpickler
        raise ConfigError(f"{path} is not a plain PyTorch state dict ({_load_failure(e)}); "
                          "pass a file saved with torch.save(model.state_dict())") from None
    if isinstance(sd, Mapping) and isinstance(sd.get("module"), Mapping):
        raise ConfigError(f"{path} is a DeepSpeed model-states file; pass its checkpoint "
                          f"directory {path.parent} as --src instead")
    if isinstance(sd, Mapping) and _is_state_dict(sd.get("model")):
        sd = sd["model"]  # a training checkpoint as ALBEF's (`{'model': ..., 'optimizer': ..., 'epoch': ...}`)
    if not _is_state_dict(sd):
        raise ConfigError(f"{path} is not a state dict (a mapping of parameter names to tensors); "
                          "pass a file saved with torch.save(model.state_dict())")
    return dict(sd)


def _load_safetensors(path: Path) -> StateDict:
    """safetensors sorts keys; the order we saved in the metadata (if any) is restored."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            order = json.loads((f.metadata() or {}).get(KEY_ORDER_METADATA, "[]"))
    except Exception as e:  # safetensors raises its own SafetensorError; metadata may be foreign
        raise ConfigError(f"{path} is not a readable .safetensors file ({_one_line(e)})") from None
    if sorted(order) != sorted(sd):
        return sd
    return {k: sd[k] for k in order}


def resolve_checkpoint_dir(d: Path) -> Path:
    """Run dir / checkpoints dir (via `latest`) / tag dir -> the tag dir to read."""
    for root in (d, d / "checkpoints"):
        pointer = root / "latest"
        if pointer.is_file():
            tag = pointer.read_text().strip()
            if not tag or not (root / tag).is_dir():
                raise ConfigError(f"{pointer} names {tag!r}, which is not a directory in {root}; "
                                  "fix the file or pass one step_XXXXXXXX/ directory as --src")
            return root / tag
    if any(d.glob("*model_states.pt")):
        return d
    raise ConfigError(f"{d} has no 'latest' file, no checkpoints/latest and no DeepSpeed model states; "
                      "pass a run directory, its checkpoints/ directory or one step_XXXXXXXX/ directory")


def read_deepspeed_checkpoint(tag_dir: Path) -> Tuple[StateDict, str]:
    """Full fp32 model state dict of one DeepSpeed checkpoint tag dir, and how it was obtained."""
    if any(tag_dir.glob("*_optim_states.pt")):
        return _zero_fp32_state_dict(tag_dir), "ZeRO checkpoint, fp32 master weights"
    model_file = tag_dir / STAGE0_MODEL_FILE
    if not model_file.is_file():
        raise ConfigError(f"{tag_dir} has neither {STAGE0_MODEL_FILE} nor ZeRO *_optim_states.pt files; "
                          "is the checkpoint complete?")
    module = load_deepspeed_file(model_file).get("module")
    if not _is_state_dict(module):
        raise ConfigError(f"{model_file} has no 'module' state dict; is this a DeepSpeed checkpoint?")
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in module.values() if v.is_floating_point()})
    # Without ZeRO the engine keeps no fp32 copy by name; half-precision weights are upcast (exactly).
    sd = {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    return sd, f"stage-0 checkpoint, {'/'.join(dtypes) or 'no float'} module weights"


def read_teacher(tag_dir: Path) -> Optional[Dict[str, Any]]:
    """ALBEF's momentum model and queues (`teacher.pt`, beside the engine's files), or None if absent."""
    path = tag_dir / TEACHER_FILE
    if not path.is_file():
        return None
    teacher = load_deepspeed_file(path)
    if not _is_state_dict(teacher):
        raise ConfigError(f"{path} is not a state dict; is the checkpoint complete?")
    return teacher


def load_deepspeed_file(path: Path) -> Dict[str, Any]:
    """DeepSpeed's model-states file, read like every checkpoint file: `weights_only=True`
    with DeepSpeed's plain records allowed, a file pickling anything else refused."""
    try:
        return load_tensors(str(path))
    except ValueError as e:  # unsafe, truncated or damaged: load_tensors says which, in one line
        raise ConfigError(str(e)) from None


@contextlib.contextmanager
def _weights_only_torch_load() -> Iterator[None]:
    """Within the block, `torch.load` is `load_tensors`: DeepSpeed's ZeRO consolidation
    calls it on every file of the checkpoint with the full unpickler, which would run
    whatever a planted pickle holds."""
    original = torch.load

    def weights_only_load(f, map_location=None, weights_only=None, **kwargs):
        return load_tensors(f, map_location=map_location, **kwargs)

    torch.load = weights_only_load
    try:
        yield
    finally:
        torch.load = original


def _zero_fp32_state_dict(tag_dir: Path) -> StateDict:
    """Consolidate the fp32 master weights of a ZeRO stage 1/2/3 checkpoint (any world size)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # Its progress prints and bar are dropped: our output is one summary line (or one error line).
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), _weights_only_torch_load():
            sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except UnsafeCheckpointError as e:
        raise ConfigError(str(e)) from None
    except Exception as e:  # missing rank files, damaged pickles, foreign layouts
        raise ConfigError(f"{tag_dir}: DeepSpeed could not consolidate this ZeRO checkpoint ({_one_line(e)}); "
                          "check that the files of every rank are present") from None
    return dict(sd)


def check_against_run_config(sd: Mapping[str, Tensor], tag_dir: Path) -> None:
    """If the tag dir holds the run's config.yaml, the state dict must fit its model exactly."""
    cfg_file = tag_dir / "config.yaml"
    if not cfg_file.is_file():
        return
    expected = _expected_shapes(cfg_file)
    if expected is None:
        return
    problems = {
        "missing": [k for k in expected if k not in sd],
        "unexpected": [k for k in sd if k not in expected],
        "shape (checkpoint vs config)": [f"{k} {tuple(sd[k].shape)} vs {expected[k]}" for k in expected
                                         if k in sd and tuple(sd[k].shape) != expected[k]],
    }
    found = "; ".join(f"{what} {_listed(keys)}" for what, keys in problems.items() if keys)
    if found:
        raise ConfigError(f"{tag_dir} does not match the model in its config.yaml: {found}")


def _expected_shapes(cfg_file: Path) -> Optional[Dict[str, Tuple[int, ...]]]:
    """Key -> shape of the model `cfg_file` describes (built on the meta device), or None if unreadable."""
    from trainer.config import load_config
    from trainer.recipes import recipe_for

    try:
        cfg = load_config(str(cfg_file))
        recipe = recipe_for(cfg)(cfg)
    except (ValueError, TypeError, OSError) as e:  # also a family registered elsewhere, not imported here
        print(f"vlpt: note: not checking against {cfg_file} ({_one_line(e)})", file=sys.stderr)
        return None
    with torch.device("meta"):
        model = recipe.checkpoint_model()
    if model is None:  # a UNITER fine-tuned model: the task folder sizes its head
        print(f"vlpt: note: not checking against {cfg_file} (a fine-tuned model)", file=sys.stderr)
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def save_state_dict(sd: Mapping[str, Tensor], dst: Path) -> None:
    """`safetensors` if `dst` ends with .safetensors, else `torch.save`."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(_unshared_contiguous(sd), str(dst),
                  metadata={"format": "pt", KEY_ORDER_METADATA: json.dumps(list(sd))})
    else:
        torch.save(dict(sd), dst)


def _unshared_contiguous(sd: Mapping[str, Tensor]) -> StateDict:
    """safetensors refuses non-contiguous tensors and tensors sharing storage."""
    out: StateDict = {}
    seen: set[int] = set()
    for key, value in sd.items():
        value = value.detach().contiguous()
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:
            value = value.clone()
        seen.add(ptr)
        out[key] = value
    return out


def _require_tie_sources(sd: Mapping[str, Tensor], path: Path) -> None:
    missing = [k for k in TIED_DUPLICATES.values() if k not in sd]
    if missing:
        raise ConfigError(f"{path} does not look like a UNITER pretraining model: missing {', '.join(missing)}")


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()))


def _listed(items: Sequence[str]) -> str:
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"{len(items)} [{', '.join(items[:_MAX_LISTED])}{more}]"


def _load_failure(e: BaseException) -> str:
    if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
        return "it pickles Python objects besides tensors, which are not unpickled for safety"
    return _one_line(e)


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {' '.join(_ANSI.sub('', str(e)).split())}"
    return text if len(text) <= 200 else text[:197] + "..."
