"""`vlpt bench data`: how fast the input pipeline is, and how much padding each batching wastes.

One pass of the training pipeline (read, decode, tokenize, mask, collate) per
source (local directory and/or s3:// prefix), timed, with `workers` DataLoader
workers; then the same data batched in fixed-size batches and in token-budget
buckets, with the padded share of `[B, L]` slots of each. With `pack_len` > 0 the
fixed-size batches are also packed into rows of `pack_len` positions (data/packing.py,
inside collate, so it is timed too) and the padded share of those rows is reported
beside the `[B, L]` one of the same batches. Figures go to stdout and to a JSON file
(default benchmarks/results/).

Picture shards (vlpt-pixels-v1/v2) are timed through ALBEF's pipeline (decode, augment,
tokenize, mask, collate_albef) at the manifest's `image_size` (else 256), counting
(picture, caption) pairs; their batches have a fixed size, so no padding is reported
(token buckets and packed rows are region-feature batchings).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

from data.collate import collate_itm, collate_mlm
from data.collate_albef import collate_albef
from data.loader import ResumableTaskLoader, StreamSpec, TaskBatches
from data.packing import check_pack_len
from data.pixels import PixelConfig
from data.shards import FORMAT, PIXEL_FORMAT, Manifest, read_manifest
from data.sources import DatasetShards
from data.storage import S3Options
from data.tokenizer import load_tokenizer


@dataclass(frozen=True)
class BenchConfig:
    sources: tuple[str, ...]
    vocab: str
    task: str = "mlm"
    batch_size: int = 32
    token_budget: int = 2048
    workers: int = 1
    shuffle_buffer: int = 512
    max_txt_len: int = 60
    max_samples: int = 0
    """Stop each pass after about this many samples (0: one whole epoch)."""
    pack_len: int = 0
    """> 0: also pack the fixed-size batches into rows of this many positions (data.uniter.pack_len)."""
    s3: S3Options = S3Options()

    def __post_init__(self) -> None:
        check_pack_len(self.pack_len, "--pack-len")


def _manifest(cfg: BenchConfig, source: str) -> Manifest:
    return read_manifest(source, (FORMAT, PIXEL_FORMAT), s3=cfg.s3)


def is_pictures(m: Manifest) -> bool:
    return m.meta["format"] != FORMAT


def _spec(cfg: BenchConfig, m: Manifest, token_budget: int) -> StreamSpec:
    return StreamSpec(datasets=(DatasetShards.from_manifest("bench", m),), task=cfg.task, seed=0,
                      n_streams=1, batch_size=cfg.batch_size, shuffle_buffer=cfg.shuffle_buffer,
                      max_txt_len=cfg.max_txt_len, img_dim=m.img_dim, parts=max(1, cfg.workers),
                      token_budget=token_budget, s3=cfg.s3, epochs=1,
                      modality="pixels" if is_pictures(m) else "regions")


def _collate(cfg: BenchConfig, m: Manifest, tok, pack_len: int):
    if is_pictures(m):
        if pack_len:
            raise ValueError("--pack-len packs region-feature batches; picture shards have no packed rows")
        size = m.meta.get("image_size")
        pixels = PixelConfig(image_size=size if isinstance(size, int) and size > 0 else PixelConfig.image_size)
        return functools.partial(collate_albef, tok=tok, pixels=pixels, max_txt_len=cfg.max_txt_len)
    pack = {"pack_len": pack_len} if pack_len else {}
    return (functools.partial(collate_itm, tok=tok, **pack) if cfg.task == "itm"
            else functools.partial(collate_mlm, tok=tok, **pack))


def one_pass(cfg: BenchConfig, source: str, token_budget: int = 0, pack_len: int = 0) -> dict:
    """Time one epoch (or max_samples) of the pipeline; samples/s and padding of its batches
    (`[B, L]` slots, and with pack_len > 0 also the packed rows the encoder would run on)."""
    tok = load_tokenizer(cfg.vocab)
    m = _manifest(cfg, source)
    collate = _collate(cfg, m, tok, pack_len)
    loader = ResumableTaskLoader(TaskBatches(_spec(cfg, m, token_budget), tok, collate, [0]), cfg.workers)
    samples = batches = used = slots = rows = row_slots = 0
    sizes: list[int] = []
    t0 = time.perf_counter()
    for batch in loader:
        attn = batch["attn_masks"] if "attn_masks" in batch else batch["attn_mask"]  # [B, L]: 1 on real slots
        samples, batches = samples + attn.shape[0], batches + 1
        used, slots = used + int(attn.sum()), slots + attn.numel()
        sizes.append(attn.shape[0])
        if pack_len:
            seg = batch["segment_ids"]  # [R, pack_len]: -1 at the packed rows' pads
            rows, row_slots = rows + seg.shape[0], row_slots + seg.numel()
        if cfg.max_samples and samples >= cfg.max_samples:
            break
    seconds = time.perf_counter() - t0
    out = {"source": source, "samples": samples, "batches": batches, "seconds": round(seconds, 3),
           "samples_per_s": round(samples / seconds, 1),
           "samples_per_s_per_worker": round(samples / seconds / max(1, cfg.workers), 1),
           "padding_fraction": round(1 - used / max(slots, 1), 4),
           "mean_batch_size": round(samples / max(batches, 1), 2), "max_batch_size": max(sizes, default=0),
           "retries": loader.retries, "skipped": loader.skip_counts}
    if is_pictures(m):  # fixed-size batches of (picture, caption) pairs: [B, L] is only the captions'
        del out["padding_fraction"]
        out.update(pictures=True, image_size=collate.keywords["pixels"].image_size)
    if pack_len:  # the packed rows hold the same valid positions as the [B, L] slots
        out.update(packed_padding_fraction=round(1 - used / max(row_slots, 1), 4),
                   packed_mean_rows=round(rows / max(batches, 1), 2))
    return out


def run_bench(cfg: BenchConfig) -> dict:
    throughput = [one_pass(cfg, source, pack_len=cfg.pack_len) for source in cfg.sources]
    fixed = throughput[0]
    config = {"task": cfg.task, "batch_size": cfg.batch_size, "token_budget": cfg.token_budget,
              "pack_len": cfg.pack_len, "workers": cfg.workers, "shuffle_buffer": cfg.shuffle_buffer}
    if fixed.get("pictures"):  # no token buckets or packing for picture batches: throughput only
        return {"config": {**config, "task": "albef", "token_budget": 0}, "throughput": throughput,
                "padding": None}
    buckets = one_pass(cfg, cfg.sources[0], token_budget=cfg.token_budget)
    padding = {"fixed_size": fixed["padding_fraction"], "token_buckets": buckets["padding_fraction"],
               "fixed_mean_batch": fixed["mean_batch_size"], "buckets_mean_batch": buckets["mean_batch_size"],
               "buckets_max_batch": buckets["max_batch_size"]}
    if cfg.pack_len:
        padding.update(pack_len=cfg.pack_len, packed=fixed["packed_padding_fraction"],
                       packed_mean_rows=fixed["packed_mean_rows"])
    return {
        "config": config,
        "throughput": throughput,
        "padding": padding,
    }


def format_result(result: dict) -> str:
    lines = [f"{r['source']}: {r['samples_per_s']:.0f} samples/s ({r['samples_per_s_per_worker']:.0f} per worker, "
             f"{r['samples']} samples in {r['seconds']:.2f} s, retries {sum(r['retries'].values())})"
             for r in result["throughput"]]
    p = result["padding"]
    if p is None:
        lines.append("picture-caption pairs in fixed-size batches: no padding figures (no token buckets or "
                     "packed rows for pictures)")
        return "\n".join(lines)
    lines.append(f"padding: fixed-size batches {p['fixed_size']:.1%} (mean {p['fixed_mean_batch']}) vs token "
                 f"buckets {p['token_buckets']:.1%} (mean {p['buckets_mean_batch']}, max {p['buckets_max_batch']})")
    if "packed" in p:
        lines.append(f"padding: fixed-size {p['fixed_size']:.1%} -> packed (pack_len {p['pack_len']}) "
                     f"{p['packed']:.1%} ({p['packed_mean_rows']} rows of {p['pack_len']} per batch of "
                     f"{p['fixed_mean_batch']} samples)")
    return "\n".join(lines)
