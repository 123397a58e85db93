"""The documentation: the generated spec reference is current, links and repo paths resolve, the README stays a
front door, and nothing points outside the repository."""
import re
from pathlib import Path

import pytest

from orchestrator import reference

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
REPO_DIRS = ("orchestrator/", "trainers/", "experiments/", "tests/", "docker/", "benchmarks/", "docs/")
OUTSIDE = ("shared/DESIGN.md", "METHOD.md")

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def _page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("name", sorted(reference.generated()))
def test_generated_spec_reference_is_current(name):
    path = DOCS / name
    assert path.is_file(), f"{path} is missing: run python -m orchestrator.reference"
    assert path.read_text(encoding="utf-8") == reference.generated()[name], (
        f"{path} differs from what the pydantic models generate: run python -m orchestrator.reference")


def test_reference_covers_every_model_reachable_from_spec():
    text = reference.spec_reference()
    for model in reference._walk(reference.Spec):
        assert f"\n## {model.__name__}\n" in text
        for field in model.model_fields:
            assert f"| `{field}` |" in text, f"{model.__name__}.{field} has no row"


def _links(text: str, anchors: bool = False) -> list:
    """Relative link targets, anchors and query strings stripped; web and mail links left out. With `anchors`,
    (target, anchor) pairs instead, the target "" for the page itself."""
    out = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        path = path.split("?", 1)[0]
        if anchors:
            out.append((path, anchor))
        elif path:
            out.append(path)
    return out


def _headings(page: Path) -> set[str]:
    """The anchors of a Markdown page's headings, as GitHub makes them (lower case, punctuation dropped, spaces to
    hyphens, -1, -2, ... on repeats)."""
    seen: dict[str, int] = {}
    for title in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", FENCE.sub("", page.read_text(encoding="utf-8")), re.M):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def _repo_paths(text: str) -> list[str]:
    """Words of code (spans and fenced blocks) that name a path under one of the repository's top folders."""
    code = [m.group(0) for m in FENCE.finditer(text)]
    code += [m.group(2) for m in CODE_SPAN.finditer(FENCE.sub("", text))]
    out = []
    for chunk in code:
        for word in re.split(r"[\s=]+", chunk):
            word = word.strip("\"'()[]{},;.`")
            word = re.sub(r"(::\S*|:\d*)$", "", word)  # pytest node ids, file:line
            if word.startswith(REPO_DIRS):
                out.append(word)
    return out


def _exists(base: Path, target: str) -> bool:
    pattern = re.sub(r"<[^>]*>", "*", target)  # placeholders such as <hash> match any name
    if any(ch in pattern for ch in "*?["):
        return any(base.glob(pattern.rstrip("/")))
    return (base / target).exists()


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_relative_links_resolve(page):
    text = page.read_text(encoding="utf-8")
    broken = [t for t in _links(text) if not _exists(page.parent, t)]
    assert not broken, f"{_page_id(page)}: links to nothing: {broken}"
    unknown = [f"{path}#{anchor}" for path, anchor in _links(text, anchors=True)
               if anchor and (path == "" or path.endswith(".md")) and (page.parent / path).is_file()
               and anchor not in _headings((page.parent / path) if path else page)]
    assert not unknown, f"{_page_id(page)}: links to headings that do not exist: {unknown}"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_repo_paths_in_code_exist(page):
    text = page.read_text(encoding="utf-8")
    missing = sorted({p for p in _repo_paths(text) if not _exists(ROOT, p)})
    assert not missing, f"{_page_id(page)}: names paths the repository does not have: {missing}"


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail to docs/"
    long = [i for i, line in enumerate(lines, 1) if len(line) > 120]
    assert not long, f"README.md lines over 120 characters: {long}"


def test_docs_point_at_nothing_outside_the_repository():
    files = [ROOT / "README.md", *sorted(p for p in DOCS.rglob("*") if p.is_file())]
    found = [f"{_page_id(f)}: {name}" for f in files for name in OUTSIDE
             if name in f.read_text(encoding="utf-8", errors="replace")]
    assert not found, f"references to documents outside the repository: {found}"


def test_the_link_checks_catch_what_they_should():
    text = ("[a](docs/nowhere.md#x) [b](https://example.com) [c](#anchor) "
            "`python benchmarks/missing.py --x` `trainers/engine.py:12` `tests/test_docs.py::test_x`\n"
            "```bash\nbash benchmarks/gpu_check.sh tests\n```\n")
    assert _links(text) == ["docs/nowhere.md"]
    assert _links(text, anchors=True) == [("docs/nowhere.md", "x"), ("", "anchor")]
    assert sorted(_repo_paths(text)) == ["benchmarks/gpu_check.sh", "benchmarks/missing.py", "tests/test_docs.py",
                                         "trainers/engine.py"]
    assert not _exists(ROOT, "benchmarks/missing.py")
    assert _exists(ROOT, "benchmarks/results/<session>/")


def test_reference_command_writes_and_checks(tmp_path, capsys):
    assert reference.main(["--check", "--docs", str(tmp_path)]) == 1  # nothing written yet
    assert not list(tmp_path.iterdir())
    assert reference.main(["--docs", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(reference.generated())
    assert reference.main(["--check", "--docs", str(tmp_path)]) == 0
    (tmp_path / reference.MARKDOWN).write_text("stale\n", encoding="utf-8")
    assert reference.main(["--check", "--docs", str(tmp_path)]) == 1
    assert "out of date" in capsys.readouterr().err
