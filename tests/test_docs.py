"""Docs that check themselves: every section the code, tests and docs cite exists, every relative link resolves, the
generated reference pages are current, and the README stays a short front page (issue #28, point 8).

Citation forms (the only ones, so that this test finds them all):
- `docs/<page>.md §N` (also `§N, §M`, `§N-§M`), or in a docs page `[<page>.md](<page>.md) §N`: the page has `## §N`;
- `docs/<page>.md "Title"` and `README "Title"`: the page (the README) has a heading `Title` (or `Title: …`).
A `§` anywhere else must name a paper (`arXiv …` on the same line); in a docs page it may cite that page's own sections.
"""
from __future__ import annotations

import importlib
import os
import re

import pytest

from jobs import doctables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
SOURCE_DIRS = ("pipelines", "operators", "jobs", "tests", "benchmarks", "infra", "datasets", ".ci")
SOURCE_EXT = (".py", ".yaml", ".yml", ".md", ".sh", ".toml", ".txt", "Dockerfile", "Makefile", "run")
SELF = os.path.abspath(__file__)

PAGE = r"(?:docs/(?P<page>[\w-]+)\.md|\]\((?P<link>[\w-]+)\.md\))"
SECTIONS = re.compile(PAGE + r"(?P<secs>(?:\s*(?:,|-|–|/|and)?\s*§\d+)+)")
NAMED = re.compile(r"(?:" + PAGE + r"|(?P<readme>\bREADME)(?:\.md)?,?)\s+\"(?P<title>[^\"\n]+)\"")
TOP_DIRS = ("pipelines", "operators", "jobs", "tests", "benchmarks", "datasets", "infra", "docs")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")


def _files() -> list[str]:
    out = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "Makefile"), os.path.join(ROOT, "pyproject.toml")]
    out += [os.path.join(DOCS, n) for n in sorted(os.listdir(DOCS)) if n.endswith(".md")]
    for top in SOURCE_DIRS:
        for folder, dirs, names in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if d not in ("__pycache__", "model_configs")]
            out += [os.path.join(folder, n) for n in sorted(names) if n.endswith(SOURCE_EXT)]
    return [f for f in out if os.path.abspath(f) != SELF]


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def headings(path: str) -> list[str]:
    """The markdown headings of a file, outside code fences, without the #s."""
    out, fenced = [], False
    for line in _read(path).splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            out.append(line.lstrip("#").strip())
    return out


def _has_title(path: str, title: str) -> bool:
    return any(h == title or h.startswith(title + ":") or h.startswith(title + " (") for h in headings(path))


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def test_every_cited_section_exists():
    bad = []
    for path in _files():
        text, where = _read(path), _rel(path)
        for m in SECTIONS.finditer(text):
            page = os.path.join(DOCS, (m["page"] or m["link"]) + ".md")
            if not os.path.exists(page):
                bad.append(f"{where}:{_line(text, m.start())}: {m[0]!r}: no page {_rel(page)}")
                continue
            have = {h.split()[0] for h in headings(page) if h.startswith("§")}
            bad += [f"{where}:{_line(text, m.start())}: {m[0]!r}: {_rel(page)} has no {s}"
                    for s in re.findall(r"§\d+", m["secs"]) if s not in have]
        for m in NAMED.finditer(text):
            name = m["page"] or m["link"]
            page = os.path.join(ROOT, "README.md") if m["readme"] else os.path.join(DOCS, name + ".md")
            if not os.path.exists(page) or not _has_title(page, m["title"]):
                bad.append(f"{where}:{_line(text, m.start())}: {m[0]!r}: no heading {m['title']!r} in {_rel(page)}")
    assert not bad, "\n".join(bad)


def test_no_ambiguous_section_numbers():
    """A § outside the citation forms is a paper's section (arXiv on the line) or, in a docs page, its own."""
    bad = []
    for path in _files():
        text, where = _read(path), _rel(path)
        cited = {i for m in SECTIONS.finditer(text) for i in range(m.start(), m.end())}
        own = {h.split()[0] for h in headings(path) if h.startswith("§")} if path.startswith(DOCS) else set()
        for m in re.finditer(r"§\d+(?:\.\d+)*", text):
            line = text[text.rfind("\n", 0, m.start()) + 1:text.find("\n", m.start())]
            if m.start() in cited or "arXiv" in line or m[0] in own:
                continue
            bad.append(f"{where}:{_line(text, m.start())}: bare {m[0]} in {line.strip()[:100]!r}")
    assert not bad, "write `docs/<page>.md §N`, or name the paper (arXiv id) on the line:\n" + "\n".join(bad)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _doc_pages() -> list[str]:
    """The README, the folder READMEs and every docs page."""
    pages = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "datasets", "README.md"),
             os.path.join(ROOT, "infra", "README.md")]
    return pages + [os.path.join(DOCS, n) for n in sorted(os.listdir(DOCS)) if n.endswith(".md")]


def test_every_relative_link_resolves():
    pages = _doc_pages()
    bad = []
    for page in pages:
        text = _read(page)
        for m in LINK.finditer(text):
            target = m[1]
            if re.match(r"[a-z]+:", target):
                continue  # http(s)://, mailto:
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(full):
                bad.append(f"{_rel(page)}:{_line(text, m.start())}: {target}: no such file")
            elif anchor and anchor not in {_slug(h) for h in headings(full)}:
                bad.append(f"{_rel(page)}:{_line(text, m.start())}: {target}: no heading with that anchor")
    assert not bad, "\n".join(bad)


def test_readme_is_a_front_page_linking_every_docs_page():
    text = _read(os.path.join(ROOT, "README.md"))
    assert len(text.splitlines()) <= 250
    linked = {os.path.normpath(m[1].partition("#")[0]) for m in LINK.finditer(text)}
    missing = [n for n in sorted(os.listdir(DOCS)) if n.endswith(".md") and os.path.join("docs", n) not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"
    assert re.search(r"make demo .*\nmake test ", text), "the quick start's two commands"


@pytest.mark.parametrize("page", sorted(doctables.PAGES))
def test_generated_pages_are_current(page):
    assert _read(os.path.join(ROOT, page)) == doctables.PAGES[page](), f"regenerate: {doctables.REGENERATE}"


def _named(text: str):
    """Repository paths and dotted project names quoted in `backticks`."""
    for m in re.finditer(r"`([^`\n]+)`", text):
        for path in re.findall(r"(?<![\w./-])((?:" + "|".join(TOP_DIRS) + r")/[\w./-]*)", m[1]):
            yield "path", path.rstrip(".").split("::")[0]
        for name in re.findall(r"(?<![\w./-])((?:pipelines|operators|jobs)\.[\w.]+)", m[1]):
            yield "name", name.rstrip(".")


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_file_and_module_the_docs_name_exists():
    """`pipelines/x.py`, `operators.y.z` in the README and docs: the file exists, the module and attribute import."""
    pages = _doc_pages()
    bad = []
    for page in pages:
        for kind, ref in _named(_read(page)):
            if kind == "path" and not re.search(r"[*{A-Z]", ref.split("/", 1)[1] if "/" in ref else ref):
                if not os.path.exists(os.path.join(ROOT, ref)):
                    bad.append(f"{_rel(page)}: no file {ref}")
            elif kind == "name" and not _resolves(ref):
                bad.append(f"{_rel(page)}: {ref} does not import")
    assert not bad, "\n".join(bad)


def test_every_test_the_claims_page_names_exists():
    """docs/testing.md names tests as `test_file.py` or `test_file.py::test_name` (`…`: a name's prefix)."""
    bad = []
    for m in re.finditer(r"(test_\w+)\.py(?:::(\w+)(…)?)?", _read(os.path.join(DOCS, "testing.md"))):
        path = os.path.join(ROOT, "tests", m[1] + ".py")
        if not os.path.exists(path):
            bad.append(f"no file tests/{m[1]}.py")
        elif m[2] and not re.search(rf"def {m[2]}" + (r"\w*" if m[3] else r"\("), _read(path)):
            bad.append(f"no test {m[0]}")
    assert not bad, "\n".join(bad)
