"""The docs say what the code does: generated tables equal the code's own, every relative link
resolves, the module map lists exactly the modules there are (a method, benchmark or backend
added beside the shipped ones is in its table instead), and every make target named exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.benchmarks import benchmarks_table
from pipeline.config import keys_table
from pipeline.method.methods import methods_table

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
MAPPED = ("pipeline", "jobs", "analysis")  # the folders the module map covers
README_MAX_LINES = 120  # a newcomer's five minutes; the rest belongs in docs/

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"``.+?``|`[^`\n]+`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*$", re.MULTILINE)


def _prose(text: str) -> str:
    """The text without code blocks and code spans (their brackets are not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: the text as rendered, lower-cased, punctuation dropped,
    spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        slug = _slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_config_table_in_the_docs_is_the_configs():
    text = (DOCS / "configuration.md").read_text()
    assert keys_table() in text, "paste pipeline.config.keys_table() into docs/configuration.md"


def test_methods_table_in_the_docs_is_the_registrys():
    text = (DOCS / "method.md").read_text()
    assert methods_table() in text, (
        "paste pipeline.method.methods.methods_table() into docs/method.md"
    )


def test_benchmarks_table_in_the_docs_is_the_registrys():
    text = (DOCS / "configuration.md").read_text()
    assert benchmarks_table() in text, (
        "paste pipeline.benchmarks.benchmarks_table() into docs/configuration.md"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and (linked.suffix != ".md" or anchor not in _anchors(linked)):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.name}: " + ", ".join(broken)


def test_the_slugs_are_githubs():
    assert _slug("The benchmark (`make bench`)") == "the-benchmark-make-bench"
    assert _slug("The first study: the embedded model on GSM8K") == (
        "the-first-study-the-embedded-model-on-gsm8k"
    )


def _module_map() -> list[str]:
    """The paths the module map of docs/development.md lists, from its indented tree."""
    text = (DOCS / "development.md").read_text()
    section = text.split("## Module map", 1)[1]
    block = re.search(r"^```\n(pipeline/\n.*?)^```", section, re.MULTILINE | re.DOTALL)
    assert block, "docs/development.md: the module map is a code block under '## Module map'"
    folders: list[str] = []
    paths = []
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0]
        folders = folders[:depth]
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
        else:
            paths.append("/".join([*folders, name]))
    return paths


def _registered_modules() -> set[str]:
    """The modules the registries find (a method, a benchmark, a backend each): the generated
    tables document them, so a new one needs no line in the module map."""
    found = set()
    for name, module in (
        ("METHOD", "method/methods"),
        ("BENCHMARK", "benchmarks"),
        ("BACKEND", "engine/backends"),
    ):
        for path in (ROOT / "pipeline" / module).glob("*.py"):
            if re.search(rf"^{name} = ", path.read_text(), re.MULTILINE):
                found.add(path.relative_to(ROOT).as_posix())
    return found


def test_the_module_map_lists_exactly_the_modules():
    listed = _module_map()
    assert len(listed) == len(set(listed)), "a module is listed twice"
    modules = {
        path.relative_to(ROOT).as_posix()
        for folder in MAPPED
        for path in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in path.parts
        and not (path.name == "__init__.py" and not path.read_text().strip())
    }
    assert not set(listed) - modules, f"listed but missing: {sorted(set(listed) - modules)}"
    unlisted = modules - set(listed) - _registered_modules()
    assert not unlisted, f"not in the module map: {sorted(unlisted)}"
    assert {
        "pipeline/method/methods/cot.py",
        "pipeline/engine/backends/native.py",
    } <= _registered_modules()


def test_every_make_target_named_exists():
    makefile = (ROOT / "Makefile").read_text()
    named = {t for page in PAGES for t in re.findall(r"`make ([a-z-]+)", page.read_text())}
    assert {"run", "test", "bench"} <= named
    missing = sorted(t for t in named if f"\n{t}:" not in makefile)
    assert not missing, f"named in the docs, not in the Makefile: {missing}"


def test_ci_runs_make_test():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_readme_is_a_five_minute_read():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move detail to docs/"
