"""`vlpt tasks <kind> ...`: the command line of the official-format task builders (docs/downstream.md,
"Builders of the official releases")."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from data.tasks.official import (DEFAULT_MAX_JSON_BYTES, DEFAULT_NUM_ANSWERS, SPLIT_NAME, build_karpathy, build_nlvr2,
                                 build_ve, build_vqa)
from data.tasks.official_refcoco import build_refcoco
from data.tasks.official_vcr import build_vcr

EXIT_USER_ERROR = 2
"""As `vlpt`'s other commands: a user error ends with one line on stderr and this code."""


def _split_paths(items: Optional[list[str]], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        split, sep, path = item.partition("=")
        if not sep or not path or not SPLIT_NAME.match(split):
            raise ValueError(f"{flag} {item!r}: expected SPLIT=FILE, e.g. train=/data/file.json (split: letters, "
                             "digits, '_' or '-')")
        if split in out:
            raise ValueError(f"{flag} names split {split!r} twice")
        out[split] = path
    return out


def _run_vqa(args) -> dict:
    return build_vqa(_split_paths(args.questions, "--questions"), args.out,
                     _split_paths(args.annotations, "--annotations"), num_answers=args.num_answers,
                     ans2label=args.ans2label, vocab_splits=[s for s in args.vocab_splits.split(",") if s],
                     image_id_format=args.image_id_format, max_json_bytes=args.max_json_bytes)


def _run_refcoco(args) -> dict:
    splits = [s for s in args.splits.split(",") if s] if args.splits else None
    return build_refcoco(args.refs, args.instances, args.out, splits=splits, image_id_format=args.image_id_format,
                         detections=args.detections, max_json_bytes=args.max_json_bytes)


def _run_vcr(args) -> dict:
    return build_vcr(_split_paths(args.jsonl, "--jsonl"), args.out)


_RUNNERS = {
    "vqa": _run_vqa,
    "nlvr2": lambda a: build_nlvr2(_split_paths(a.jsonl, "--jsonl"), a.out),
    "ve": lambda a: build_ve(_split_paths(a.jsonl, "--jsonl"), a.out, image_id_format=a.image_id_format),
    "refcoco": _run_refcoco,
    "karpathy": lambda a: build_karpathy(a.karpathy, a.out, restval_into_train=a.restval_into_train,
                                         image_id_format=a.image_id_format, max_json_bytes=a.max_json_bytes),
    "vcr": _run_vcr,
}


def run_task_builder(args) -> int:
    """Run the `vlpt tasks <kind>` builder `args` names; print its summary as one JSON line. A user
    error (missing or malformed file, bad option) prints one line on stderr and returns 2."""
    try:
        summary = _RUNNERS[args.kind](args)
    except ValueError as e:
        print(f"vlpt: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(json.dumps(summary, sort_keys=True, ensure_ascii=False))
    return 0


def _cmd_tasks(args, extra: list[str]) -> int:
    """`vlpt`'s calling convention (fn(args, extra)), so `add_task_builder_commands` is all the wiring."""
    if extra:
        print(f"vlpt: error: unrecognised arguments: {' '.join(extra)}", file=sys.stderr)
        return EXIT_USER_ERROR
    return run_task_builder(args)


_SPLIT_FILES = "SPLIT=FILE pairs, e.g. train=a.jsonl dev=b.jsonl (one task folder <out>/<SPLIT> each)"
_ID_FORMAT = "format of the image id, e.g. 'COCO_train2014_{:012d}' (default '{}': the id as is)"


def _add_vqa(kinds) -> None:
    sp = kinds.add_parser("vqa", help="VQA v2 questions + annotations -> vqa task folders")
    sp.add_argument("--questions", nargs="+", required=True, metavar="SPLIT=FILE",
                    help="v2_OpenEnded_mscoco_<split>_questions.json per split; " + _SPLIT_FILES)
    sp.add_argument("--annotations", nargs="+", metavar="SPLIT=FILE",
                    help="v2_mscoco_<split>_annotations.json per labelled split (a split without: no labels)")
    vocab = sp.add_mutually_exclusive_group()
    vocab.add_argument("--num-answers", type=int, default=DEFAULT_NUM_ANSWERS,
                       help="answer vocabulary: the most frequent normalised multiple_choice_answers")
    vocab.add_argument("--ans2label", help="answer vocabulary from a JSON {answer: index} instead")
    sp.add_argument("--vocab-splits", default="train", help="comma-separated splits whose annotations give the "
                                                            "vocabulary (default train)")
    sp.add_argument("--image-id-format", default="{}", help=_ID_FORMAT)


def _add_jsonl_kinds(kinds) -> None:
    for kind, text in (("nlvr2", "NLVR2 JSONL ({identifier, sentence, label}) -> nlvr2 task folders"),
                       ("ve", "SNLI-VE JSONL ({Flikr30kID, sentence2, gold_label, pairID}) -> ve task folders"),
                       ("vcr", "VCR JSONL ({annot_id, img_id, objects, question, answer_choices, ...}) -> vcr "
                               "task folders")):
        sp = kinds.add_parser(kind, help=text)
        sp.add_argument("--jsonl", nargs="+", required=True, metavar="SPLIT=FILE", help=_SPLIT_FILES)
        if kind == "ve":
            sp.add_argument("--image-id-format", default="{}", help=_ID_FORMAT + "; applied to the file stem")


def _add_refcoco_karpathy(kinds) -> None:
    ref = kinds.add_parser("refcoco", help="RefCOCO/+/g refs + COCO instances -> re task folders")
    ref.add_argument("--refs", required=True, help="refs(unc).p / refs(umd).p (read as plain data only) or its JSON "
                                                   "conversion (a list of refs)")
    ref.add_argument("--instances", required=True, help="the dataset's instances.json (images, annotations)")
    ref.add_argument("--splits", help="comma-separated splits to write (default: all in the refs)")
    ref.add_argument("--detections", help="ALBEF's detections JSON ({image id: [[x, y, w, h], ...]}): each "
                                          "example's candidate boxes for ALBEF grounding")
    kar = kinds.add_parser("karpathy", help="Karpathy split JSON (dataset_coco.json, dataset_flickr30k.json) -> "
                                            "retrieval task folders")
    kar.add_argument("--karpathy", required=True, help="dataset_coco.json or dataset_flickr30k.json")
    kar.add_argument("--restval-into-train", action=argparse.BooleanOptionalAction, default=True,
                     help="put the restval images into train (default on)")
    for sp in (ref, kar):
        sp.add_argument("--image-id-format", default="{}", help=_ID_FORMAT)


def add_task_builder_commands(subparsers) -> argparse.ArgumentParser:
    """Declare `vlpt tasks <kind> ...` on `subparsers` (the top-level `add_subparsers()` object).
    Every kind sets `fn` to a `fn(args, extra) -> int` that calls `run_task_builder(args)`."""
    sp = subparsers.add_parser("tasks", help="build downstream task folders from the official releases",
                               description="build task folders (docs/downstream.md) from the official files")
    kinds = sp.add_subparsers(dest="kind", required=True)
    _add_vqa(kinds)
    _add_jsonl_kinds(kinds)
    _add_refcoco_karpathy(kinds)
    for kind, parser in kinds.choices.items():
        parser.add_argument("--out", required=True, help="output folder: one task folder <out>/<split> per split")
        if kind in ("vqa", "refcoco", "karpathy"):  # JSONL kinds read line by line, each line capped
            parser.add_argument("--max-json-bytes", type=int, default=DEFAULT_MAX_JSON_BYTES,
                                help="largest JSON (or refs pickle) file read")
        parser.set_defaults(fn=_cmd_tasks)
    return sp
