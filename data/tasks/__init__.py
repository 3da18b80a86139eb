"""Downstream task data (docs/downstream.md): task folders of JSONL examples that reference region
features by image id, their official-format builders, the demo tasks, and their collates."""
