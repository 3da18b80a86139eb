"""Readers of region features as they come, feeding `vlpt shards`' region-shard writer
(data/builders.py, docs/data.md "Region feature formats"):

- `butd_tsv`: bottom-up-attention TSV rows with base64 float32 fields (`vlpt shards butd-tsv`);
- `uniter_lmdb`: UNITER's own img_db + txt_db LMDB databases (`vlpt shards uniter-lmdb`);
- `lmdb_features`: detectron2-style LMDB records with boxes in the resized frame
  (`vlpt shards lmdb-features`).

Each plans its images (image id -> where its record is), then loads one record at a time
into `RegionRecord` (record.py) in the builder's worker processes. Nothing is ever
unpickled; every size is bounded before it is read.
"""
from data.region_formats.record import RecordError, RegionRecord

__all__ = ["RecordError", "RegionRecord"]
