"""The API reference (book/api.md) documents every module of fishr_lite, or names it as one
documented in its source, so a new module cannot silently miss the page."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def modules() -> list[str]:
    names = []
    for path in sorted((ROOT / "fishr_lite").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_module_is_on_the_api_page():
    page = (ROOT / "book" / "api.md").read_text()
    documented = set(re.findall(r"automodule:: (\S+)", page))
    # "The other modules (`datasets`, `networks`, ...) are documented in their source."
    in_source = re.search(r"The other modules \(([^)]*)\) are documented in their source", page)
    named = set(re.findall(r"`(\w+)`", in_source.group(1))) if in_source else set()
    missing = [m for m in modules() if m not in documented and m.rsplit(".", 1)[-1] not in named]
    assert not missing, f"add {missing} to book/api.md (an automodule block), or name them as documented in their source"
