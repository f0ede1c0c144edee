"""README.md and docs/*.md: their ```python examples run as written, every relative link reaches a file of
the repository and every #anchor a heading of its page (GitHub's slugs), and the README stays a front door
of at most 250 lines. External http(s) links are not checked."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250
# pages whose ```python blocks are not programs, with the reason
NOT_RUN = {"docs/ARCHITECTURE.md": "its python blocks are interface sketches (Protocol signatures)"}


def name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def fenced(text: str) -> list[tuple[int, str, str]]:
    """The fenced code blocks of a markdown text: (line of the opening fence, info string, body)."""
    blocks, lines, i = [], text.splitlines(keepends=True), 0
    while i < len(lines):
        opening = re.match(r" {0,3}(`{3,}|~{3,})\s*([^`\s]*)", lines[i])
        if not opening:
            i += 1
            continue
        fence, start, body = opening[1], i, []
        i += 1
        while i < len(lines) and not re.match(rf" {{0,3}}{fence[0]}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        blocks.append((start + 1, opening[2], "".join(body)))
        i += 1  # past the closing fence (or the end)
    return blocks


def unfenced(text: str) -> str:
    """The text with its fenced blocks blanked out, line count kept: where headings are."""
    lines = text.splitlines(keepends=True)
    for start, _, body in fenced(text):
        for j in range(start - 1, min(start + body.count("\n") + 1, len(lines))):
            lines[j] = "\n"
    return "".join(lines)


def prose(text: str) -> str:
    """The text without fenced blocks and inline code: where links are."""
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "``", unfenced(text), flags=re.S)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text lowercased, punctuation but - and _ dropped, spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link or image reads as its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a page's headings; a repeated slug gets -1, -2, ... as GitHub numbers them."""
    seen, out = Counter(), set()
    for heading in re.findall(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", unfenced(text), flags=re.M):
        base = slug(heading)
        out.add(base if not seen[base] else f"{base}-{seen[base]}")
        seen[base] += 1
    return out


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", flags=re.M)


def links(text: str) -> list[str]:
    """Targets of the inline links, images and link definitions outside code."""
    body = prose(text)
    return LINK.findall(body) + DEFINITION.findall(body)


def broken_links(page: Path, text: str | None = None) -> list[str]:
    """Each relative link of `page` (its file, or `text` as if it were the page) whose file is missing or
    outside the repository, or whose #anchor is no heading of the target markdown page."""
    text = page.read_text() if text is None else text
    problems = []
    for target in links(text):
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target):  # http(s), mailto: not checked
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / unquote(path)).resolve() if path else page
        if path and (not file.is_relative_to(ROOT) or not file.exists()):
            problems.append(f"{target}: no such file")
        elif anchor and (not path or file.suffix == ".md"):
            page_text = text if file == page else file.read_text()
            if unquote(anchor) not in anchors(page_text):
                problems.append(f"{target}: no heading #{anchor} in {file.name}")
    return problems


BLOCKS = [
    pytest.param(page, line, body, id=f"{name(page)}:{line}")
    for page in PAGES
    if name(page) not in NOT_RUN
    for line, info, body in fenced(page.read_text())
    if info == "python"
]


def test_the_pages_have_python_examples():
    assert {name(param.values[0]) for param in BLOCKS} >= {"docs/data.md", "docs/sampling.md"}


@pytest.mark.parametrize(("page", "line", "body"), BLOCKS)
def test_python_block_runs(page, line, body, tmp_path, monkeypatch):
    """Each block in a fresh namespace, from an empty working directory (the data example writes shards);
    a traceback names the page and its line."""
    monkeypatch.chdir(tmp_path)
    exec(compile("\n" * line + body, str(page), "exec"), {"__name__": "__main__"})


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_relative_links_and_anchors_resolve(page):
    assert broken_links(page) == []


def test_the_readme_links_to_the_docs():
    targets = {target.partition("#")[0] for target in links(README.read_text())}
    assert {"docs/README.md", "docs/demo_rollout.png", "docs/lora_wan.md", "BENCHMARKS.md"} <= targets


def test_readme_is_a_front_door():
    assert len(README.read_text().splitlines()) <= README_MAX_LINES


def test_slugs_follow_github():
    assert slug("Fine-tuning Wan 2.1 / SkyReels-V2") == "fine-tuning-wan-21--skyreels-v2"
    interface = "The model interface (`dforce/models/backbone.py`)"
    assert slug(interface) == "the-model-interface-dforcemodelsbackbonepy"
    assert slug("Scale: memory per GPU under FSDP") == "scale-memory-per-gpu-under-fsdp"
    assert slug("snake_case and [a link](x.md)") == "snake_case-and-a-link"
    assert anchors("# A\n## A\n```\n# A\n```\n### A ##\n") == {"a", "a-1", "a-2"}


def test_the_checker_catches_broken_links_and_anchors():
    """The checker on a made-up page in docs/: good links pass, every broken one is reported, code is
    skipped."""
    text = """# A page

## Fine-tuning Wan 2.1 / SkyReels-V2
## Twice
## Twice

[ok](#a-page) [ok](#fine-tuning-wan-21--skyreels-v2) [ok](#twice-1) [ok](model.md#model) [ok](../README.md)
![ok](demo_rollout.png) [ok](https://example.com/nowhere.md#nothing) `[code](not-checked.md)`
[a missing page](no-such-page.md) [a bad anchor](#no-such-heading) [another](model.md#no-such-heading)
![a missing image](missing.png) [outside the repository](../../elsewhere.md) [twice](#twice-2)
[a link across
lines](also-missing.md#x) [heading in code](#not-a-heading)

```bash
[fenced](not-checked.md)
# not-a-heading
```
"""
    assert broken_links(ROOT / "docs" / "made_up.md", text) == [
        "no-such-page.md: no such file",
        "#no-such-heading: no heading #no-such-heading in made_up.md",
        "model.md#no-such-heading: no heading #no-such-heading in model.md",
        "missing.png: no such file",
        "../../elsewhere.md: no such file",
        "#twice-2: no heading #twice-2 in made_up.md",
        "also-missing.md#x: no such file",
        "#not-a-heading: no heading #not-a-heading in made_up.md",
    ]
