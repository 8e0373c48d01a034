"""The documentation stays a user's manual a fresh clone can follow: short README, no dead links or paths."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]

REPO_PREFIXES = (
    "wisp_common/",
    "wisp_server/",
    "wisp_edge/",
    "wisp_distill/",
    "benchmarks/",
    "tests/",
    "deploy/",
    "proto/",
    "docs/",
)
FORBIDDEN = ("DESIGN.md", "../shared", "/work/")

FENCE = re.compile(r"^[ \t]*(```+|~~~+).*?^[ \t]*\1[ \t]*$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
LINE_SUFFIX = re.compile(r":\d+(?:-\d+)?$")


def _prose(text: str) -> str:
    """The text outside fenced code blocks, where links and inline code live."""
    return FENCE.sub("", text)


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def relative_links(text: str) -> list[str]:
    """Targets of `[text](target)` links that point into the repository, without their #fragment."""
    targets = []
    for target in LINK.findall(_prose(text)):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s), mailto, ... and anchors within the same page
        target = target.split("#", 1)[0]
        if target:
            targets.append(target)
    return targets


def repository_paths(text: str) -> list[str]:
    """Backticked tokens that name a path in the repository, without a trailing `:line` or `/`."""
    paths = []
    for _, token in CODE_SPAN.findall(_prose(text)):
        token = token.strip()
        if not token.startswith(REPO_PREFIXES) or any(c in token for c in " *<{"):
            continue
        paths.append(LINE_SUFFIX.sub("", token).rstrip("/"))
    return paths


def test_readme_is_a_short_manual_with_both_setup_commands():
    text = README.read_text()
    assert len(text.splitlines()) < 200, f"README.md has {len(text.splitlines())} lines; move detail into docs/"
    for command in ("make demo", "make test"):
        assert command in text, f"README.md does not show `{command}`"


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_no_reference_outside_the_repository(doc: Path):
    text = doc.read_text()
    found = [word for word in FORBIDDEN if word in text]
    assert not found, f"{doc.relative_to(ROOT)} mentions {found}, which a fresh clone lacks"


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_relative_links_resolve(doc: Path):
    dead = sorted({target for target in relative_links(doc.read_text()) if not (doc.parent / target).exists()})
    assert not dead, f"{doc.relative_to(ROOT)} links to missing files: {dead}"


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_backticked_repository_paths_exist(doc: Path):
    missing = sorted({path for path in repository_paths(doc.read_text()) if not (ROOT / path).exists()})
    assert not missing, f"{doc.relative_to(ROOT)} names paths that do not exist: {missing}"


def test_the_extractors_find_what_they_should():
    sample = """See [the docs](docs/x.md#part), [web](https://example.com), [here](#anchor), ![img](pic.png).
Code: `wisp_common/config.py:12`, `wisp_edge/`, `benchmarks/results/<name>.json`, `python -m benchmarks.x`,
`tests/a b.py`, `docs/*.md`, `README.md`.

```sh
wisp-distill --output wisp_common/nothing [not](a/link.md) `wisp_server/nowhere.py`
```
"""
    assert relative_links(sample) == ["docs/x.md"]
    assert repository_paths(sample) == ["wisp_common/config.py", "wisp_edge"]
