"""Links and file references of the documentation resolve.

- Every relative link and image of the Markdown files (README.md, docs/**, the bundled model card, the Space's
  README) names an existing file or folder inside the repository, and a ``#anchor`` names a heading of the target page
  under GitHub's slug rules (lower case, punctuation dropped, spaces to hyphens, ``-1``, ``-2``... on repeats).
- An inline code span of a Markdown file that is nothing but a path (``results/shapes_rl_128.json``,
  ``trainers/shapes_grpo.py``, globs allowed) names an existing file: relative to the page when its first folder is
  next to the page, else relative to the repository root when its first folder is there (``out/`` is git-ignored and
  not checked; a path whose first folder is in neither place, such as ``shapes/world.py``, is not checked).
- Every ``docs/...`` path named in code, configs and docs (``.py``, ``.md``, ``.yaml``, ``.toml``, Makefile, and
  ``ROOT / "docs" / ...`` joins) exists; globs must match; an f-string's fixed prefix must exist. A path given to an
  output flag of a command (``--output``, ``--plot``, ``--summary``...) may be a file still to be written: its folder
  must exist.
- ``docs/README.md`` lists every page of ``docs/``.
"""

from __future__ import annotations

import functools
import glob
import os
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "venv", "out", "tmp", "build", "dist", "node_modules", "__pycache__", ".pytest_cache",
             ".ruff_cache"}
IGNORED_FIRST = {"out", "tmp"}  # git-ignored outputs, named in docs as places to write to


def _walk(suffixes: tuple[str, ...], names: tuple[str, ...] = ()) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        found.extend(Path(folder) / f for f in sorted(files) if Path(f).suffix in suffixes or f in names)
    return found


def markdown_files() -> list[Path]:
    return [p for p in _walk((".md",)) if p.relative_to(ROOT).parts[0] not in ("tests",)]


# --- Markdown parsing -------------------------------------------------------------------------------------------

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
INLINE_LINK = re.compile(r"\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.M)
HTML_LINK = re.compile(r"<(?:img|a|source)\b[^>]*?\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.I)
HTML_ANCHOR = re.compile(r"<[a-z]+\b[^>]*?\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.I)
ATX = re.compile(r"^\s{0,3}(#{1,6})(?:\s+(.*?))?(?:\s+#+)?\s*$")
SETEXT = re.compile(r"^\s{0,3}(=+|-+)\s*$")


def split_fences(text: str) -> tuple[str, str]:
    """(prose, code): the text with fenced blocks / everything but fenced blocks blanked (lines kept, for numbers).

    YAML front matter (a first line ``---`` up to the next ``---``) counts as code."""
    prose, code = [], []
    lines = text.split("\n")
    fence = None
    front = bool(lines) and lines[0].strip() == "---"
    for i, line in enumerate(lines):
        if front:
            prose.append("")
            code.append(line)
            if i > 0 and line.strip() == "---":
                front = False
            continue
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)[0] * len(match.group(1))
            prose.append("")
            code.append(line)
        elif fence is not None:
            prose.append("")
            code.append(line)
            if line.strip().startswith(fence) and set(line.strip()) == {fence[0]}:
                fence = None
        else:
            prose.append(line)
            code.append("")
    return "\n".join(prose), "\n".join(code)


def blank_code_spans(prose: str) -> str:
    return CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), prose)


def code_spans(prose: str) -> list[tuple[int, str]]:
    return [(prose.count("\n", 0, m.start()) + 1, m.group(2).strip()) for m in CODE_SPAN.finditer(prose)]


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading's text (before de-duplication)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "").replace("~~", "")
    text = "".join(ch for ch in text.strip().lower() if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    lines = prose.split("\n")
    headings = []
    for i, line in enumerate(lines):
        match = ATX.match(line)
        if match:
            headings.append(match.group(2) or "")
        elif (SETEXT.match(line) and i > 0 and lines[i - 1].strip() and not ATX.match(lines[i - 1])
              and not lines[i - 1].lstrip().startswith(("|", "-", "*", ">"))):
            headings.append(lines[i - 1])
    seen: dict[str, int] = {}
    found = set()
    for heading in headings:
        slug = github_slug(heading)
        if slug in seen:
            seen[slug] += 1
            slug = f"{slug}-{seen[slug]}"
        else:
            seen[slug] = 0
        found.add(slug)
    found.update(HTML_ANCHOR.findall(prose))
    return frozenset(found)


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link and image of a Markdown file, outside code."""
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    prose = blank_code_spans(prose)
    found = []
    for pattern in (INLINE_LINK, REFERENCE_DEF, HTML_LINK):
        for match in pattern.finditer(prose):
            target = match.group(1).strip()
            if target.startswith("<") and target.endswith(">"):
                target = target[1:-1]
            found.append((prose.count("\n", 0, match.start()) + 1, target))
    return found


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


def link_errors(path: Path) -> list[str]:
    errors = []
    rel = path.relative_to(ROOT)
    for line, target in links(path):
        if is_external(target) or not target:
            continue
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part.split("?")[0])
        if file_part:
            resolved = (ROOT / file_part.lstrip("/")) if file_part.startswith("/") else (path.parent / file_part)
            resolved = resolved.resolve()
            if not resolved.is_relative_to(ROOT):
                errors.append(f"{rel}:{line}: {target} leaves the repository")
                continue
            if not resolved.exists():
                errors.append(f"{rel}:{line}: {target} does not exist")
                continue
        else:
            resolved = path
        if anchor and resolved.suffix == ".md" and unquote(anchor) not in anchors(resolved):
            errors.append(f"{rel}:{line}: {target}: no heading of {resolved.relative_to(ROOT)} has the anchor "
                          f"#{anchor}")
    return errors


BARE_PATH = re.compile(r"^[\w.-]+(?:/[\w.*-]+)+/?$")


def code_path_errors(path: Path) -> list[str]:
    """Inline code spans that are a bare path must name an existing file (see the module docstring)."""
    errors = []
    rel = path.relative_to(ROOT)
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    for line, span in code_spans(prose):
        if not BARE_PATH.match(span) or span.startswith(("./", "../")) or "/" not in span.rstrip("/"):
            continue
        first = span.split("/")[0]
        if first in IGNORED_FIRST or first.startswith("."):
            continue
        if (path.parent / first).is_dir():
            base = path.parent
        elif (ROOT / first).is_dir():
            base = ROOT
        else:
            continue  # a package-relative name such as `shapes/world.py`, or not a path
        if not glob.glob(str(base / span.rstrip("/"))):
            errors.append(f"{rel}:{line}: `{span}` does not exist")
    return errors


# --- docs/ paths named anywhere ---------------------------------------------------------------------------------

DOCS_PATH = re.compile(r"(?<![\w./\\-])docs/[\w./*{}-]*")
DOCS_JOIN = re.compile(r"[\"']docs[\"'](?:\s*/\s*[\"'][^\"']+[\"'])*")
OUTPUT_FLAG = re.compile(r"--[\w-]*(?:output|plot|summary|save|write|dir)[\w-]*(?:\s*=\s*|\s+)$")


def docs_path_errors(path: Path) -> list[str]:
    errors = []
    rel = path.relative_to(ROOT)
    text = path.read_text(encoding="utf-8", errors="replace")
    mentions = []
    for match in DOCS_PATH.finditer(text):
        mentions.append((match.start(), match.group(0), text[max(0, match.start() - 80):match.start()]))
    if path.suffix == ".py":
        for match in DOCS_JOIN.finditer(text):
            parts = re.findall(r"[\"']([^\"']+)[\"']", match.group(0))
            mentions.append((match.start(), "/".join(parts), ""))
    for start, mention, before in mentions:
        line = text.count("\n", 0, start) + 1
        name = mention.rstrip(".,;")
        if "{" in name:  # an f-string or a template: its fixed prefix, a folder
            name = name[:name.index("{")].rpartition("/")[0] + "/"
        target = ROOT / name
        if OUTPUT_FLAG.search(before.split("\n")[-1]):
            if not target.parent.is_dir():
                errors.append(f"{rel}:{line}: output {mention}: the folder {name.rpartition('/')[0]} does not exist")
        elif not glob.glob(str(target)):
            errors.append(f"{rel}:{line}: {mention} does not exist")
    return errors


def files_naming_docs() -> list[Path]:
    return _walk((".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ".txt", ".sh"), ("Makefile",))


# --- tests ------------------------------------------------------------------------------------------------------

def test_slug_rules():
    assert github_slug("6. CM-GRPO: online RL with rewards") == "6-cm-grpo-online-rl-with-rewards"
    assert github_slug("Reward functions (`diffusers_raven.rewards`)") == "reward-functions-diffusers_ravenrewards"
    assert github_slug("2d. The 4x VAE on both cores: 28.67 dB in two stages") == \
        "2d-the-4x-vae-on-both-cores-2867-db-in-two-stages"
    assert github_slug("Long streams: 4,797 frames") == "long-streams-4797-frames"
    assert github_slug("Text–video alignment: [`make_clip_reward`](x.md)") == "textvideo-alignment-make_clip_reward"


def test_parser_finds_links_and_ignores_code(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Title\n\nSee [a](a.md#x), ![img](images/b.png \"t\") and `[no](c.md)`.\n\n"
                    "```\n[no](d.md)\n# not a heading\n```\n\n[ref]: e.md\n<img src=\"f.png\">\n", encoding="utf-8")
    assert [t for _, t in links(page)] == ["a.md#x", "images/b.png", "e.md", "f.png"]
    assert anchors(page) == {"title", "title-1"}


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_links_resolve(path):
    errors = link_errors(path)
    assert not errors, "broken links:\n" + "\n".join(errors)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_code_paths_exist(path):
    errors = code_path_errors(path)
    assert not errors, "paths that do not exist:\n" + "\n".join(errors)


def test_docs_paths_named_in_code_and_docs_exist():
    errors = [error for path in files_naming_docs() for error in docs_path_errors(path)]
    assert not errors, "docs/ paths that do not exist:\n" + "\n".join(errors)


def test_docs_index_lists_every_page():
    index = ROOT / "docs" / "README.md"
    assert index.exists(), "docs/README.md (the index of docs/) is missing"
    linked = {(index.parent / unquote(t.partition("#")[0])).resolve() for _, t in links(index) if not is_external(t)}
    pages = {p.resolve() for p in (ROOT / "docs").rglob("*.md") if p != index}
    missing = sorted(str(p.relative_to(ROOT)) for p in pages - linked)
    assert not missing, f"docs/README.md does not link to: {missing}"
