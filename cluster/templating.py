"""Fill the job templates in cluster/templates/: `{{name}}` placeholders, nothing else.

`{{ }}` rather than string.Template's `$name`, which would collide with every shell
variable of the sbatch script. A placeholder without a value, or a value without a
placeholder, is an error: a template and its renderer cannot drift apart silently.
"""
from __future__ import annotations

import re
from pathlib import Path

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def fill(template: str, **values: str) -> str:
    text = (TEMPLATE_DIR / template).read_text()
    wanted = set(PLACEHOLDER.findall(text))
    missing, unused = wanted - set(values), set(values) - wanted
    if missing or unused:
        raise KeyError(f"{template}: no value for {sorted(missing)}, no placeholder for {sorted(unused)}")
    return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)
