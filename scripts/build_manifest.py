"""Write manifest.json (what Admin Panel → Functions → Import reads) from the plugin source.

python scripts/build_manifest.py          # rewrite manifest.json
python scripts/build_manifest.py --check  # exit 1 when manifest.json has drifted
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "plugin" / "openrouter_usage.py"
MANIFEST = REPO / "manifest.json"
FUNCTION_ID = "openrouter_usage"


def parse_frontmatter(source: str) -> dict[str, str]:
    """The `key: value` lines between the opening and closing triple quotes, as Open WebUI reads them."""
    lines = source.splitlines()
    if not lines or lines[0] != '"""':
        raise ValueError('the plugin must start with a line that is exactly """')
    frontmatter: dict[str, str] = {}
    for line in lines[1:]:
        if line.strip() == '"""':
            return frontmatter
        key, separator, value = line.partition(":")
        if separator:
            frontmatter[key.strip().lower()] = value.strip()
    raise ValueError("the frontmatter is never closed")


def build_manifest(source: str) -> list[dict[str, Any]]:
    frontmatter = parse_frontmatter(source)
    return [
        {
            "id": FUNCTION_ID,
            "name": frontmatter["title"],
            "type": "filter",
            "content": source,
            "meta": {"description": frontmatter["description"], "manifest": frontmatter},
        }
    ]


def render(source: str) -> str:
    return json.dumps(build_manifest(source), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when manifest.json is out of date")
    args = parser.parse_args()
    expected = render(PLUGIN.read_text(encoding="utf-8"))
    if args.check:
        if not MANIFEST.exists() or MANIFEST.read_text(encoding="utf-8") != expected:
            sys.stderr.write("manifest.json is out of date: run `make manifest`\n")
            return 1
        return 0
    MANIFEST.write_text(expected, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
