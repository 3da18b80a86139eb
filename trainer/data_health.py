"""The run's bad/seen sample counters over all ranks, their metrics and the bad-rate limit."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from data.config import DataConfig
from data.loader import add_counts
from data.shards import LENGTH_FILTERED
from trainer.distributed import all_gather_objects


@dataclass(frozen=True)
class DataCounts:
    skipped: dict[str, int]
    """Samples not used, by reason: bad input and the length filter's (LENGTH_FILTERED) alike, as
    trainer_state.json keeps them."""
    seen: int
    retries: dict[str, int] = field(default_factory=dict)
    """S3 retries by reason, this process's run only (not carried over a resume)."""

    @property
    def bad_skipped(self) -> dict[str, int]:
        """Bad input by reason: every reason but the length filter's."""
        return {k: v for k, v in self.skipped.items() if k not in LENGTH_FILTERED}

    @property
    def filtered(self) -> int:
        """Captions over data.max_txt_len that UNITER's decoder drops: a policy, not bad input."""
        return sum(v for k, v in self.skipped.items() if k in LENGTH_FILTERED)

    @property
    def bad(self) -> int:
        return sum(self.bad_skipped.values())

    @property
    def per_1000(self) -> float:
        """Bad samples per 1,000 read (the length filter's are not bad)."""
        return 1000.0 * self.bad / max(self.seen, 1)


def data_counts(loaders: dict, resumed_skipped: dict[str, int], resumed_seen: int) -> DataCounts:
    """Collective. The run's bad/seen sample totals: the resumed-from totals plus what
    every task loader of every rank has consumed since this process started."""
    local_skipped: dict[str, int] = {}
    local_retries: dict[str, int] = {}
    local_seen = 0
    for loader in loaders.values():
        add_counts(local_skipped, loader.skip_counts)
        add_counts(local_retries, loader.retries)
        local_seen += loader.seen
    skipped, seen, retries = dict(resumed_skipped), resumed_seen, {}
    for rank_skipped, rank_seen, rank_retries in all_gather_objects((local_skipped, local_seen, local_retries)):
        add_counts(skipped, rank_skipped)
        add_counts(retries, rank_retries)
        seen += rank_seen
    return DataCounts({k: skipped[k] for k in sorted(skipped) if skipped[k]}, seen, dict(sorted(retries.items())))


def data_metrics(counts: DataCounts) -> dict[str, float]:
    return {**{f"data/skipped_{k}": float(v) for k, v in counts.bad_skipped.items()},
            "data/skipped": float(counts.bad), "data/filtered_length": float(counts.filtered),
            "data/seen": float(counts.seen),
            "data/skipped_per_1000": counts.per_1000,
            **{f"data/{k}": float(v) for k, v in counts.retries.items()}}


def bad_rate_error(data: DataConfig, counts: DataCounts) -> Optional[str]:
    """The one-line abort message when the bad-sample limit is exceeded, else None. Decided from
    the all-gathered totals, so every rank agrees; captions the length filter dropped do not count."""
    limit = data.max_bad_per_1000
    if counts.seen < max(data.min_samples_for_bad_rate, 1) or counts.per_1000 <= limit:
        return None
    reasons = ", ".join(f"{k}={v:,}" for k, v in sorted(counts.bad_skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    return (f"data: {counts.bad:,} of {counts.seen:,} samples were bad ({counts.per_1000:.1f} per 1,000 > "
            f"data.max_bad_per_1000={limit:g}): {reasons}; fix the shards or raise data.max_bad_per_1000")


def is_data_error(e: Exception) -> bool:
    """Errors of reading held-out data: a validation can be skipped for them."""
    return isinstance(e, (OSError, ValueError)) or type(e).__module__.startswith("botocore")
