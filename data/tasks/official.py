"""Task folders from the official releases: `vlpt tasks vqa|nlvr2|ve|refcoco|karpathy|vcr`
(docs/downstream.md, "Task folders").

Each builder reads the files the user names (and nothing they point to: the image file names
inside them are kept as ids only), turns every record into one example of the task's format
(data/tasks/records.py) and writes one task folder per split with `write_task_folder`, into
`<out>/<split>`. It returns a summary {"task", "out", "written": {split: n}, "total",
"skipped": {reason: n}, "folders": {split: path}} (VQA adds "num_answers" and "unlabelled").

Bad input follows the task readers' rule (docs/data.md, "Bad and hostile input"): a bad record is
skipped and counted by reason, never raised, and every example is checked with the reader's own
`check_record` before it is written, so a folder never holds a line a run would skip. Reasons:
"bad_json", "line_too_long" (JSONL), "bad_record" (not an object), "missing_field",
"bad_field" (wrong type or shape), "bad_caption" / "empty_caption", "bad_label", "duplicate_id" (in
one split), "bad_split" (a split name the release does not have: split names become folder
names, so they are never taken from a file unchecked), "no_annotation" (VQA: a question of an
annotated split without a usable annotation); RefCOCO and VCR add theirs
(data/tasks/official_refcoco.py, data/tasks/official_vcr.py). A file that is not the expected
kind at all (missing, over the size limit, not JSON, wrong top-level shape) is a ValueError
naming it.

VQA v2: the answer normalisation is the VQA evaluation's (lower case, punctuation, number words
to digits, articles dropped, common contractions restored), and each distinct answer's soft score
is the evaluation's accuracy of predicting it: the mean over the leave-one-annotator-out subsets
of min(#matches / 3, 1), i.e. 0, .3, .6, .9, 1 for 0, 1, 2, 3, >= 4 matches of 10 annotators
(docs/downstream.md, table: `labels`, `scores`).
"""
from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator, Optional

from data.shards import caption_reason
from data.tasks.folder import MANIFEST, write_task_folder
from data.tasks.records import MAX_LINE_BYTES, VE_LABELS, check_record

DEFAULT_MAX_JSON_BYTES = 2 << 30
"""Largest JSON file read (VQA v2 train annotations and COCO instances are ~0.35 GB)."""
DEFAULT_NUM_ANSWERS = 3129
"""UNITER's VQA answer vocabulary size (docs/downstream.md)."""
MAX_ANNOTATORS = 100
"""Most answers one VQA annotation may carry (VQA v2 has 10)."""
SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
"""A split name: it becomes a folder name under --out, so no dots or slashes."""
KARPATHY_SPLITS = ("train", "restval", "val", "test")


# ---------------------------------------------------------------- reading

def _regular_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():  # also refuses FIFOs and devices, which could block or never end
        raise ValueError(f"{what} not found (or not a regular file): {path}")
    return path


def read_json(path: str | Path, what: str, max_bytes: int = DEFAULT_MAX_JSON_BYTES) -> Any:
    """The JSON value in the regular file `path`; ValueError naming `what` and the file when it is
    missing, larger than `max_bytes` or not JSON."""
    path = _regular_file(path, what)
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{what} {path} is {size} bytes, over the {max_bytes}-byte limit "
                         "(raise --max-json-bytes if the file is genuine)")
    try:
        with open(path, "rb") as f:
            return json.loads(f.read(max_bytes + 1).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{what} {path} is not readable JSON: {e}") from None


def iter_jsonl(path: str | Path, what: str, skipped: Counter) -> Iterator[dict]:
    """The JSON objects of a JSONL file, one a line; a line that is over MAX_LINE_BYTES, not
    JSON or not an object is counted in `skipped` and passed over (never read whole into memory)."""
    path = _regular_file(path, what)
    with open(path, "rb") as f:
        while True:
            line = f.readline(MAX_LINE_BYTES + 1)
            if not line:
                return
            if len(line) > MAX_LINE_BYTES:
                while line and not line.endswith(b"\n"):
                    line = f.readline(MAX_LINE_BYTES + 1)
                skipped["line_too_long"] += 1
                continue
            if not line.strip():
                continue
            try:
                r = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                skipped["bad_json"] += 1
                continue
            if isinstance(r, dict):
                yield r
            else:
                skipped["bad_record"] += 1


# ---------------------------------------------------------------- fields

def as_id(value: Any) -> Optional[str]:
    """An int or non-empty str id as a str of at most 256 characters that a reader accepts; else None."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    try:
        text = str(value)
    except ValueError:  # an int of over 4,300 digits (a pickle can hold one)
        return None
    return text if len(text) <= 256 and caption_reason(text) is None else None


def need_id(r: dict, key: str) -> tuple[Optional[str], Optional[str]]:
    """(id, None), or (None, "missing_field" / "bad_field")."""
    if r.get(key) is None:
        return None, "missing_field"
    value = as_id(r[key])
    return (value, None) if value is not None else (None, "bad_field")


def need_text(r: dict, key: str) -> tuple[Optional[str], Optional[str]]:
    """(text, None), or (None, "missing_field" / "bad_field" / "bad_caption" / "empty_caption")."""
    if r.get(key) is None:
        return None, "missing_field"
    value = r[key]
    if not isinstance(value, str):
        return None, "bad_field"
    reason = caption_reason(value)
    return (None, reason) if reason else (value, None)


def file_stem(name: Any) -> Optional[str]:
    """A file name without its folder and extension ("123.jpg" -> "123"); None if not a str."""
    if not isinstance(name, str) or not name:
        return None
    return PurePosixPath(name.replace("\\", "/")).stem or None


def check_id_format(fmt: str) -> str:
    """`fmt` if it is a format string with exactly one plain field ("{}", "COCO_train2014_{:012d}");
    attribute or index access ("{0.__class__}") is refused: the format must only shape an id."""
    try:
        fields = [(name, spec) for _, name, spec, _ in string.Formatter().parse(fmt) if name is not None]
    except ValueError as e:
        raise ValueError(f"--image-id-format {fmt!r} is not a format string: {e}") from None
    if len(fields) != 1 or fields[0][0] not in ("", "0") or "{" in (fields[0][1] or ""):
        raise ValueError(f"--image-id-format {fmt!r} must hold exactly one plain field, e.g. '{{}}' or "
                         "'COCO_train2014_{:012d}'")
    if format_image_id(fmt, 1) is None:
        raise ValueError(f"--image-id-format {fmt!r} does not format the id 1")
    return fmt


def format_image_id(fmt: str, raw: Any) -> Optional[str]:
    """`fmt.format(raw)` (a digit string also tried as an int, for "{:012d}"); None if it fails."""
    if isinstance(raw, bool) or not isinstance(raw, (int, str)) or (isinstance(raw, str) and len(raw) > 256):
        return None
    values = [raw] + ([int(raw)] if isinstance(raw, str) and raw.isascii() and raw.isdigit() else [])
    for value in values:
        try:
            return as_id(fmt.format(value))
        except (ValueError, TypeError, IndexError, KeyError):
            continue
    return None


# ---------------------------------------------------------------- writing

class TaskBuild:
    """What one builder run collects: the examples of each split, ids seen, skip counts."""

    def __init__(self, task: str, splits: Iterable[str] = (), num_labels: int = 0):
        self.task, self.num_labels = task, num_labels
        self.splits: dict[str, list[dict]] = {s: [] for s in splits}
        self.ids: dict[str, set] = {s: set() for s in splits}
        self.skipped: Counter = Counter()

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def add(self, split: str, example: Optional[dict], reason: Optional[str] = None) -> bool:
        """Keep `example` in `split` unless `reason`, the reader's check or a repeated id says no."""
        if reason is None:
            reason = check_record(example, self.task, self.num_labels)
        if reason is None and example["id"] in self.ids.setdefault(split, set()):
            reason = "duplicate_id"
        if reason:
            self.skip(reason)
            return False
        self.ids[split].add(example["id"])
        self.splits.setdefault(split, []).append(example)
        return True

    def write(self, out: str | Path, labels: Optional[list[str]] = None, meta: Optional[dict] = None) -> dict:
        """One task folder per split under `out`; the summary dict (module docstring)."""
        out, written, folders = Path(out), {}, {}
        for split, examples in self.splits.items():
            folder = out / split
            try:
                (folder / MANIFEST).unlink(missing_ok=True)  # an interrupted rebuild must not look complete
                write_task_folder(folder, self.task, split, examples, labels, meta)
            except OSError as e:
                raise ValueError(f"cannot write the task folder {folder}: {e}") from None
            written[split], folders[split] = len(examples), str(folder)
        return {"task": self.task, "out": str(out), "written": written, "total": sum(written.values()),
                "skipped": dict(sorted(self.skipped.items())), "folders": folders}


def check_split_paths(paths: Optional[dict], what: str) -> dict[str, str]:
    """{split: path} with split names that are safe folder names; ValueError otherwise."""
    out = {}
    for split, path in (paths or {}).items():
        if not isinstance(split, str) or not SPLIT_NAME.match(split):
            raise ValueError(f"{what}: split name {split!r} must be letters, digits, '_' or '-' (it names "
                             "the output folder)")
        out[split] = str(path)
    return out


# ---------------------------------------------------------------- VQA v2

_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBER_WORDS["none"] = "0"  # as the VQA evaluation
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {w.replace("'", ""): w for w in (
    "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll how's "
    "isn't it'd it'll let's ma'am mightn't might've mustn't must've needn't shan't she'd she's should've "
    "shouldn't that's there'd there's they'd they'll they're they've wasn't we'd we've weren't what'll what're "
    "what's what've when's where'd where's where've who'd who'll who's who've why'll why're why's won't "
    "would've wouldn't y'all you'd you'll you're you've").split()}
_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_DIGIT_COMMA = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
"""The evaluation strips a period unless a digit follows ("2.5" stays)."""


def normalize_answer(answer: str) -> str:
    """A VQA answer as the VQA evaluation compares answers (module docstring)."""
    text = original = " ".join(answer.split()).lower()
    keep_joined = _DIGIT_COMMA.search(original) is not None  # "1,000": punctuation deleted, not spaced
    for p in _PUNCTUATION:  # judged on the answer as given, as the evaluation does
        if keep_joined or p + " " in original or " " + p in original:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD.sub("", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_score(matches: int, annotators: int = 10) -> float:
    """The soft score of an answer `matches` of `annotators` gave: the mean, over the subsets that
    leave one annotator out, of min(matches in the subset / 3, 1); rounded to 6 places."""
    if annotators <= 0:
        return 0.0
    total = 0.0
    for left_out in range(annotators):  # annotators 0..matches-1 are the ones who gave it
        total += min((matches - (1 if left_out < matches else 0)) / 3, 1.0)
    return round(total / annotators, 6)


def vqa_targets(answers: list[str]) -> dict[str, float]:
    """{normalised answer: soft score} of one question's annotator answers (already normalised)."""
    counts = Counter(answers)
    return {a: vqa_score(c, len(answers)) for a, c in counts.items()}


def answer_vocabulary(answers: Counter, num_answers: int) -> list[str]:
    """The `num_answers` most frequent answers, ties broken by the answer string."""
    ranked = sorted(answers.items(), key=lambda kv: (-kv[1], kv[0]))
    return [a for a, _ in ranked[:num_answers]]


def load_ans2label(path: str | Path, max_bytes: int = DEFAULT_MAX_JSON_BYTES) -> list[str]:
    """The answers of an {answer: index} JSON in index order; indices must be 0..n-1, once each."""
    data = read_json(path, "--ans2label file", max_bytes)
    if not isinstance(data, dict) or not data:
        raise ValueError(f"--ans2label file {path} must be a non-empty JSON object {{answer: index}}")
    labels: list[Optional[str]] = [None] * len(data)
    for answer, index in data.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(data) \
                or labels[index] is not None or caption_reason(answer) == "bad_caption":
            raise ValueError(f"--ans2label file {path}: answer {answer!r} has index {index!r}; indices must be "
                             f"0..{len(data) - 1}, each used once")
        labels[index] = answer
    return labels  # type: ignore[return-value]


def _vqa_answers(ann: Any) -> tuple[Optional[str], Optional[list[str]], Optional[str]]:
    """(question id, normalised answers, None) of one annotation, or (.., .., skip reason)."""
    if not isinstance(ann, dict):
        return None, None, "bad_record"
    qid, reason = need_id(ann, "question_id")
    if reason:
        return None, None, reason
    answers = ann.get("answers")
    if answers is None:
        return qid, None, "missing_field"
    if not isinstance(answers, list) or not 0 < len(answers) <= MAX_ANNOTATORS or not all(
            isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
        return qid, None, "bad_field"
    if any(caption_reason(a["answer"]) == "bad_caption" for a in answers):
        return qid, None, "bad_caption"
    return qid, [normalize_answer(a["answer"]) for a in answers], None


def _json_list(data: Any, key: str, what: str, path: str) -> list:
    items = data.get(key) if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ValueError(f"{what} {path} has no {key!r} list (expected the official release's format)")
    return items


def read_vqa_annotations(path: str, build: TaskBuild, max_bytes: int) -> tuple[dict[str, list[str]], Counter]:
    """({question id: normalised answers}, counts of normalised multiple_choice_answer) of one
    annotations file; bad annotations are counted in `build`."""
    anns = _json_list(read_json(path, "annotations file", max_bytes), "annotations", "annotations file", path)
    index: dict[str, list[str]] = {}
    choices: Counter = Counter()
    for ann in anns:
        qid, answers, reason = _vqa_answers(ann)
        if not reason and qid in index:
            reason = "duplicate_id"
        if reason:
            build.skip(reason)
            continue
        index[qid] = answers
        mc = ann.get("multiple_choice_answer")
        if isinstance(mc, str) and caption_reason(mc) is None and normalize_answer(mc):
            choices[normalize_answer(mc)] += 1
    return index, choices


def _vqa_example(q: Any, answers: Optional[dict], label_of: dict[str, int],
                 fmt: str) -> tuple[Optional[dict], Optional[str]]:
    if not isinstance(q, dict):
        return None, "bad_record"
    qid, reason = need_id(q, "question_id")
    text, text_reason = need_text(q, "question")
    reason = reason or text_reason or ("missing_field" if q.get("image_id") is None else None)
    if reason:
        return None, reason
    image_id = format_image_id(fmt, q["image_id"])
    if image_id is None:
        return None, "bad_field"
    example = {"id": qid, "image_id": image_id, "text": text}
    if answers is not None:
        if qid not in answers:
            return None, "no_annotation"
        given = answers[qid]
        counts = Counter(given)
        pairs = sorted((label_of[a], s, round(counts[a] / len(given), 6))
                       for a, s in vqa_targets(given).items() if a in label_of and s > 0)
        example["labels"], example["scores"] = [i for i, _, _ in pairs], [s for _, s, _ in pairs]
        example["weights"] = [w for _, _, w in pairs]  # ALBEF's: the share of annotators who gave the answer
    return example, None


def _vqa_labels(annotated: dict[str, tuple[dict, Counter]], ans2label: Optional[str], num_answers: int,
                vocab_splits: Iterable[str], max_bytes: int) -> list[str]:
    if ans2label:
        return load_ans2label(ans2label, max_bytes)
    vocab_splits = list(vocab_splits)
    missing = [s for s in vocab_splits if s not in annotated]
    if missing or not vocab_splits:
        raise ValueError(f"the answer vocabulary comes from the annotations of split(s) {', '.join(missing or ['?'])}"
                         ": pass --annotations " + (missing[0] if missing else "train") + "=FILE, or --ans2label FILE")
    counts: Counter = Counter()
    for s in vocab_splits:
        counts.update(annotated[s][1])
    labels = answer_vocabulary(counts, num_answers)
    if not labels:
        raise ValueError(f"no usable multiple_choice_answer in the annotations of {', '.join(vocab_splits)}")
    return labels


def build_vqa(questions: dict[str, str], out: str | Path, annotations: Optional[dict[str, str]] = None, *,
              num_answers: int = DEFAULT_NUM_ANSWERS, ans2label: Optional[str] = None,
              vocab_splits: Iterable[str] = ("train",), image_id_format: str = "{}",
              max_json_bytes: int = DEFAULT_MAX_JSON_BYTES) -> dict:
    """VQA v2 questions (+ annotations) files, {split: path} each -> `<out>/<split>` task folders.
    A split without annotations (test) gets no labels/scores. The answer vocabulary (the manifest's
    `labels`) is `ans2label`'s, else the `num_answers` most frequent normalised
    multiple_choice_answers of the `vocab_splits` annotations."""
    questions = check_split_paths(questions, "--questions")
    annotations = check_split_paths(annotations, "--annotations")
    if not questions:
        raise ValueError("--questions: name at least one SPLIT=FILE")
    if num_answers <= 0:
        raise ValueError(f"--num-answers must be positive, got {num_answers}")
    check_id_format(image_id_format)
    build = TaskBuild("vqa", questions)
    annotated = {s: read_vqa_annotations(p, build, max_json_bytes) for s, p in annotations.items()}
    labels = _vqa_labels(annotated, ans2label, num_answers, vocab_splits, max_json_bytes)
    build.num_labels, label_of = len(labels), {a: i for i, a in enumerate(labels)}
    unlabelled = 0
    for split, path in questions.items():
        items = _json_list(read_json(path, "questions file", max_json_bytes), "questions", "questions file", path)
        answers = annotated[split][0] if split in annotated else None
        for q in items:
            example, reason = _vqa_example(q, answers, label_of, image_id_format)
            if build.add(split, example, reason) and answers is not None and not example["labels"]:
                unlabelled += 1
    meta = {"source": "VQA v2", "questions": questions, "annotations": annotations,
            "image_id_format": image_id_format, "vocabulary": ans2label or f"top {num_answers} of "
            + ",".join(vocab_splits)}
    summary = build.write(out, labels, meta)
    summary.update(num_answers=len(labels), unlabelled=unlabelled)
    return summary


# ---------------------------------------------------------------- NLVR2, SNLI-VE

def nlvr2_image_ids(identifier: str) -> Optional[list[str]]:
    """NLVR2's image ids of a statement: its identifier with the last `-` field replaced by img0 /
    img1 ("dev-850-0-0" -> ["dev-850-0-img0", "dev-850-0-img1"]); None without such a field."""
    prefix, sep, last = identifier.rpartition("-")
    if not sep or not prefix or not last:
        return None
    return [f"{prefix}-img0", f"{prefix}-img1"]


_BOOL_LABELS = {"true": 1, "false": 0}


def _nlvr2_example(r: dict) -> tuple[Optional[dict], Optional[str]]:
    ident, reason = need_id(r, "identifier")
    text, text_reason = need_text(r, "sentence")
    if reason or text_reason:
        return None, reason or text_reason
    image_ids = nlvr2_image_ids(ident)
    if image_ids is None:
        return None, "bad_field"
    example = {"id": ident, "image_ids": image_ids, "text": text}
    if r.get("label") is not None:
        label = r["label"]
        key = str(label).lower() if isinstance(label, (str, bool)) else None
        if key not in _BOOL_LABELS:
            return None, "bad_label"
        example["label"] = _BOOL_LABELS[key]
    return example, None


def build_nlvr2(jsonl: dict[str, str], out: str | Path) -> dict:
    """NLVR2 JSONL files ({"identifier", "sentence", "label": "True"/"False", ...} a line), {split:
    path} -> `<out>/<split>` task folders; a line without a label (hidden test) gets none."""
    return build_jsonl("nlvr2", "NLVR2", jsonl, out, _nlvr2_example)


def build_jsonl(task: str, source: str, jsonl: dict[str, str], out: str | Path,
                example: Callable[[dict], tuple[Optional[dict], Optional[str]]], meta: Optional[dict] = None) -> dict:
    """The JSONL releases (NLVR2, SNLI-VE, VCR): each line of each {split: path} file through `example`
    (-> (example, None) or (None, reason)) into `<out>/<split>` task folders."""
    jsonl = check_split_paths(jsonl, "--jsonl")
    if not jsonl:
        raise ValueError("--jsonl: name at least one SPLIT=FILE")
    build = TaskBuild(task, jsonl)
    for split, path in jsonl.items():
        for r in iter_jsonl(path, f"{source} {split} file", build.skipped):
            build.add(split, *example(r))
    return build.write(out, meta={"source": source, "files": jsonl, **(meta or {})})


def _ve_example(r: dict, fmt: str) -> tuple[Optional[dict], Optional[str]]:
    pair, reason = need_id(r, "pairID")
    text, text_reason = need_text(r, "sentence2")
    reason = reason or text_reason or ("missing_field" if r.get("Flikr30kID") is None else None)
    if reason:
        return None, reason
    image_id = format_image_id(fmt, file_stem(r["Flikr30kID"]) if isinstance(r["Flikr30kID"], str)
                               else r["Flikr30kID"])
    if image_id is None:
        return None, "bad_field"
    example = {"id": pair, "image_id": image_id, "text": text}
    if r.get("gold_label") is not None:
        if r["gold_label"] not in VE_LABELS:  # "-" (no annotator majority) included
            return None, "bad_label"
        example["label"] = VE_LABELS.index(r["gold_label"])
    return example, None


def build_ve(jsonl: dict[str, str], out: str | Path, *, image_id_format: str = "{}") -> dict:
    """SNLI-VE JSONL files ({"Flikr30kID": "123.jpg", "sentence2", "gold_label", "pairID"} a line),
    {split: path} -> `<out>/<split>` task folders; labels in UNITER's order (records.VE_LABELS)."""
    check_id_format(image_id_format)
    return build_jsonl("ve", "SNLI-VE", jsonl, out, lambda r: _ve_example(r, image_id_format),
                       {"image_id_format": image_id_format, "label_order": list(VE_LABELS)})


# ---------------------------------------------------------------- Karpathy splits

def _karpathy_image(img: Any, restval_into_train: bool, fmt: str) -> tuple[Optional[tuple], Optional[str]]:
    """((split, image id, sentences), None) of one image entry, or (None, reason)."""
    if not isinstance(img, dict):
        return None, "bad_record"
    split = img.get("split")
    if split is None or not isinstance(img.get("sentences"), list):
        return None, "missing_field" if split is None or img.get("sentences") is None else "bad_field"
    if split not in KARPATHY_SPLITS:
        return None, "bad_split"
    raw = img["cocoid"] if img.get("cocoid") is not None else file_stem(img.get("filename"))
    if raw is None:
        return None, "missing_field"
    image_id = format_image_id(fmt, raw)
    if image_id is None:
        return None, "bad_field"
    split = "train" if split == "restval" and restval_into_train else split
    return (split, image_id, img["sentences"]), None


def add_sentences(build: "TaskBuild", split: str, sentences: Iterable, keys: tuple[str, str], shared: dict) -> None:
    """One example per sentence record ({id key, text key}) with the image's `shared` fields."""
    id_key, text_key = keys
    for s in sentences:
        if not isinstance(s, dict):
            build.skip("bad_record")
            continue
        sent_id, reason = need_id(s, id_key)
        text, text_reason = need_text(s, text_key)
        reason = reason or text_reason
        build.add(split, None if reason else {"id": sent_id, "text": text, **shared}, reason)


def build_karpathy(karpathy: str | Path, out: str | Path, *, restval_into_train: bool = True,
                   image_id_format: str = "{}", max_json_bytes: int = DEFAULT_MAX_JSON_BYTES) -> dict:
    """A Karpathy split file (dataset_coco.json, dataset_flickr30k.json) -> retrieval task folders
    `<out>/<split>`, one example per caption; image id = `cocoid`, else the file name's stem.
    Reasons are counted per image entry, then per sentence."""
    check_id_format(image_id_format)
    images = _json_list(read_json(karpathy, "Karpathy split file", max_json_bytes), "images",
                        "Karpathy split file", str(karpathy))
    build = TaskBuild("retrieval")
    for img in images:
        found, reason = _karpathy_image(img, restval_into_train, image_id_format)
        if reason:
            build.skip(reason)
            continue
        split, image_id, sentences = found
        add_sentences(build, split, sentences, ("sentid", "raw"), {"image_id": image_id})
    return build.write(out, meta={"source": "Karpathy split", "file": str(karpathy), "image_id_format":
                                  image_id_format, "restval_into_train": restval_into_train})
