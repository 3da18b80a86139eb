"""The RE demo study of docs/downstream.md ("Demo tasks"): does anything make `make demo`'s checkpoint
beat a from-scratch model on the demo referring expressions?

Each variant changes the RE task or the run, then fine-tunes from `make demo` and from scratch for the
same steps (as `vlpt demo-finetune`) and scores both on 4 expressions per validation scene. Needs
`make demo` and `vlpt demo-data --tasks` done (the demo scenes, seed 0); about 10 minutes on 2 cores.

    DS_ACCELERATOR=cpu python benchmarks/re_demo_study.py --out /tmp/re-study \\
        --record benchmarks/results/re-demo-study-cpu.json [--variants few,probe]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.demo_scenes import DEMO_COLOURS, DEMO_SHAPES, generate_scenes  # noqa: E402
from data.tasks import demo as D  # noqa: E402
from data.tasks.folder import write_task_folder  # noqa: E402

CONFIG = ROOT / "configs/finetune/demo-re.yaml"
HELD_OUT_COLOURS = ("purple", "orange", "white", "black")


def relational_only(scene, objects, o, rng) -> Optional[str]:
    """An expression that needs a relation to a named object: "the object / the <shape> / the <colour>
    object <rel> the <ref>", fitting `o` alone; None when the scene has none for `o`."""
    pool = []
    for ref in objects:
        if ref is o:
            continue
        rel = D.relation(scene, o, ref)
        others = [x for x in objects if x is not ref and x is not o]
        for head, rivals in (("object", others), (DEMO_SHAPES[o.shape], [x for x in others if x.shape == o.shape]),
                             (f"{DEMO_COLOURS[o.colour]} object", [x for x in others if x.colour == o.colour])):
            if (head == "object" or rivals) and all(D.relation(scene, x, ref) != rel for x in rivals):
                pool.append(f"the {head} {rel} the {ref.name}")
    return pool[int(rng.integers(len(pool)))] if pool else None


def without_colours(scene, objects, o, rng) -> Optional[str]:
    """The demo's expressions, leaving out every one that names a HELD_OUT_COLOURS word."""
    plain, relational = D._re_expressions(scene, objects, o)
    keep = lambda pool: [e for e in pool if not set(e.split()) & set(HELD_OUT_COLOURS)]  # noqa: E731
    plain, relational = keep(plain), keep(relational)
    pool = relational if relational and rng.random() < 0.5 else plain
    return pool[int(rng.integers(len(pool)))] if pool else None


# name -> (what it changes, train scenes, train expression picker, extra overrides, init_from rule);
# validation uses the demo's own expressions unless VAL_PICKERS names others.
VARIANTS: dict[str, tuple[str, int, Callable, list[str], Optional[str]]] = {
    "demo": ("the demo RE task as `make demo-finetune` runs it", 2000, D.pick_expression, [], None),
    "few": ("150 training scenes instead of 2,000", 150, D.pick_expression, [], None),
    "few-lr1e-4": ("150 scenes, lr 1e-4", 150, D.pick_expression, ["--optim.lr=1e-4"], None),
    "few-lr1e-3": ("150 scenes, lr 1e-3", 150, D.pick_expression, ["--optim.lr=1e-3"], None),
    "relational": ("trained on relational expressions only", 2000, relational_only, [], None),
    "relational-both": ("trained and validated on relational expressions only", 2000, relational_only, [], None),
    "held-out-colours": ("training never names purple, orange, white or black", 2000, without_colours, [], None),
    "probe": ("a linear head on a nearly frozen encoder (lr 5e-6, head x100)", 2000, D.pick_expression,
              ["--optim.lr=5e-6", "--finetune.lr_mul=100"], None),
    "few-embeddings": ("150 scenes, only the embeddings from `make demo`", 150, D.pick_expression, [], "embeddings"),
    "few-layers": ("150 scenes, only the encoder layers from `make demo`", 150, D.pick_expression, [],
                   r"encoder\.layer\."),
}

VAL_PICKERS: dict[str, Callable] = {"relational-both": relational_only}


def write_split(out: Path, split: str, n_scenes: int, use: int, per_scene: int, pick: Callable) -> None:
    scenes = list(generate_scenes(split, n_scenes, seed=0, img_dim=64, noise_std=0.5))[:use]
    examples = D.re_examples(scenes, D.task_rng(0, "re", split), per_scene, pick)
    write_task_folder(out, "re", split, examples, meta={"chance": D._chance("re", examples, scenes)})


def partial_init(pretrained: str, keep: str, out: Path) -> str:
    """A state dict with `make demo`'s tensors whose names match `keep` and a fresh model's (seed 42) elsewhere."""
    import torch

    from trainer.config import load_config
    from trainer.models.pretrained_weights import read_weights
    from trainer.run_setup import checked_recipe

    torch.manual_seed(42)
    recipe, _ = checked_recipe(load_config(str(CONFIG), ["--finetune.init_from=null"]))
    fresh = recipe.build_model().state_dict()
    sd, _ = read_weights(pretrained, "init_from")
    mixed = {k: v if re.search(keep, k) or k not in fresh else fresh[k].clone() for k, v in sd.items()}
    torch.save(mixed, out)
    return str(out)


def run_variant(name: str, out: Path, pretrained: str) -> dict:
    from trainer.demo_finetune import run_one

    what, n_train, pick, extra, keep = VARIANTS[name]
    data = out / name / "data"
    write_split(data / "train", "train", 2000, n_train, 2, pick)
    write_split(data / "val", "val", 250, 250, 4, VAL_PICKERS.get(name, D.pick_expression))
    init = partial_init(pretrained, keep, out / name / "init.pt") if keep else pretrained
    common = [f"--finetune.train={data / 'train'}", f"--finetune.val={data / 'val'}", "--tracking.enabled=false",
              f"--finetune.init_from={init}", *extra]
    row = {"variant": name, "what": what, "train_scenes": n_train}
    for side, scratch in (("pretrained", False), ("scratch", True)):
        metrics, _ = run_one(str(CONFIG), common, str(out / name / side), from_scratch=scratch)
        row[side] = {k: round(v, 4) for k, v in metrics.items()}
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the variants' task folders and runs")
    ap.add_argument("--pretrained", default=str(ROOT / "runs/demo"), help="the `make demo` run")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--record", help="write the rows here as JSON (device, commit, command, rows)")
    args = ap.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    from trainer.distributed import setup_distributed, teardown

    setup_distributed()
    try:
        rows = [run_variant(n, Path(args.out), args.pretrained) for n in names]
    finally:
        teardown()
    if args.record:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        record = {"device": f"cpu ({os.cpu_count()} cores)", "commit": commit.strip(),
                  "command": "python benchmarks/re_demo_study.py " + " ".join(sys.argv[1:]),
                  "metric": "re_acc = IoU >= 0.5 accuracy, re_index_acc = exact proposal", "rows": rows}
        Path(args.record).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
