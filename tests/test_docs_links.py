"""The README and docs/*.md: every relative link resolves, every anchor names a heading, and the
README stays short enough to read in one sitting. Pure Python (no Megatron import), milliseconds.

Anchors follow GitHub's rule for heading ids: the heading's text stripped and lowercased, every
character that is not a letter, digit, space, hyphen or underscore removed, spaces turned into
hyphens; a repeated id gets ``-1``, ``-2``, ... in order of appearance.
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_LINES = 400

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*(<[^>]*>|[^)\s]*)(?:\s+\"[^\"]*\")?\s*\)")
INLINE_LINK_TEXT = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)")
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)  # http:, https:, mailto:, ...


def markdown_files():
    return [README, *sorted((ROOT / "docs").glob("**/*.md"))]


def prose_lines(text: str):
    """``(line number, line)`` outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
            fence = None
        elif fence is None:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's id for a heading's text (before duplicates are numbered)."""
    text = INLINE_LINK_TEXT.sub(r"\1", heading)  # a link in a heading shows its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: pathlib.Path):
    """Every heading id of a Markdown file, duplicates numbered as GitHub numbers them."""
    seen, ids = {}, set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        candidate, count = base, seen.get(base, 0)
        while candidate in ids:
            count += 1
            candidate = f"{base}-{count}"
        seen[base] = count
        ids.add(candidate)
    return ids


def links(path: pathlib.Path):
    """``(line number, target)`` of every Markdown link and image in prose (not in code)."""
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = CODE_SPAN.sub(lambda m: "x" * len(m.group(0)), line)  # `](` inside code is no link
        for match in LINK.finditer(line):
            yield number, match.group(2).strip("<>")


def broken_links(path: pathlib.Path, root: pathlib.Path = ROOT):
    problems = []
    for number, target in links(path):
        where = f"{path.relative_to(root)}:{number}: ({target})"
        if not target or EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            problems.append(f"{where}: no such file")
            continue
        if anchor:
            if resolved.suffix != ".md" or resolved.is_dir():
                problems.append(f"{where}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(resolved):
                problems.append(f"{where}: no heading with id '{anchor}' in {resolved.name}")
    return problems


@pytest.mark.parametrize(
    "heading, expected",
    [
        ("`--moe-default-fit shared-1`: the default follows the token",
         "--moe-default-fit-shared-1-the-default-follows-the-token"),
        ("The fit's warm-up: debiased moments", "the-fits-warm-up-debiased-moments"),
        ("Results: paired runs with error bars (`examples/experiments.py`)",
         "results-paired-runs-with-error-bars-examplesexperimentspy"),
        ("Default / TopK, per_layer", "default--topk-per_layer"),
        ("[Probes](#probes): the unchosen mean", "probes-the-unchosen-mean"),
    ],
)  # fmt: skip
def test_slug_follows_githubs_rule(heading, expected):
    assert slug(heading) == expected


def test_duplicate_headings_are_numbered(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Cost\n\n## Cost\n\n```bash\n# Cost\n```\n\n### Cost\n", encoding="utf-8")
    assert anchors(page) == {"cost", "cost-1", "cost-2"}


def test_the_checker_finds_a_broken_link_and_anchor(tmp_path):
    page = ("# Here\n\n[ok](#here) [ok](b.md#there) ![ok](b.md) [bad](#nowhere) [bad](c.md)\n"
            "`[not a link](nowhere.md)` [web](https://example.com)\n```\n[not a link](nowhere.md)\n```\n")
    (tmp_path / "a.md").write_text(page, encoding="utf-8")
    (tmp_path / "b.md").write_text("# There\n", encoding="utf-8")
    problems = broken_links(tmp_path / "a.md", root=tmp_path)
    assert len(problems) == 2, problems
    assert "nowhere" in problems[0] and "c.md" in problems[1]


def test_there_are_docs_to_check():
    files = markdown_files()
    assert README in files and len(files) > 1
    assert sum(1 for f in files for _ in links(f)) > 0


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(path):
    problems = broken_links(path)
    assert not problems, "\n".join(problems)


def test_readme_reads_in_one_sitting():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}: move detail to docs/)"
