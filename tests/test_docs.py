"""The docs hold together: links resolve, and every repository path or module they name exists.

Checked in README.md, docs/ and the model cards (Markdown), and in the comments and docstrings
of every Python file and the comments of the shell scripts:
- every relative link (and image) points to a file in the repository, and its #anchor to a
  heading of that file (GitHub's heading slugs); no link leaves the repository (``../`` past the
  root, absolute paths, ``file:``). Web links (http, https, mailto) are not followed;
- every path that starts with one of the repository's top-level folders (``rlr_core/sampler.py``,
  ``bench/results/app.json``, ``docs/images/*.png``) exists, unless .gitignore covers it (folders
  the code creates, such as ``tests/artifacts/``);
- every dotted module name of the project (``rlr_core.training.lora.apply_version``) is a module,
  and a name after it is defined there;
- every "docs/method.md section N" or "method doc section N" cites a numbered section that exists;
- every ``Class.member`` of a project class named in the docs exists (the architecture's data path
  names real methods).
"""

from __future__ import annotations

import ast
import fnmatch
import io
import os
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP_DIRS = ("app", "rlr_core", "feedback_store", "bench", "scripts", "tests", "models", "docs", "examples")
PACKAGES = ("app", "rlr_core", "feedback_store", "bench", "tests", "examples")
SKIP_DIRS = {".git", ".venv", "runs", "data", "__pycache__", "node_modules", "artifacts"}
FILE_SUFFIXES = {"py", "md", "json", "jsonl", "sh", "png", "txt", "toml", "zip", "safetensors", "yml", "yaml",
                 "db", "html", "js", "css", "tgz", "log"}

_NOT_AFTER = r"(?<![\w./$-])"  # the start of a name, not the middle of a longer path or URL
PATH_RE = re.compile(_NOT_AFTER + "(?:" + "|".join(TOP_DIRS) + r")/[\w.*/-]*")
MODULE_RE = re.compile(_NOT_AFTER + "(?:" + "|".join(PACKAGES) + r")(?:\.\w+)+")
LINK_RE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK_RE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)
HTML_SRC_RE = re.compile(r"<(?:img|a)\b[^>]*?(?:src|href)=\"([^\"]+)\"", re.I)
SECTION_RE = re.compile(r"(?:docs/method\.md|method doc|\bdoc),? section (\d+)")
HEADING_RE = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE_RE = re.compile(r"^\s*(```|~~~)")


# ----------------------------------------------------------------------------- what to read
def markdown_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "models").rglob("*.md"))]
    return [f for f in files if f.is_file()]


def source_files(suffix: str) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(suffix)]
    return out


def python_text(path: Path) -> str:
    """The comments and docstrings of a Python file, one per line. (Other string literals are
    left alone: a test may name a missing file on purpose.)"""
    source = path.read_text()
    parts = [tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            parts.append(ast.get_docstring(node, clean=False) or "")
    return "\n".join(parts)


def shell_comments(path: Path) -> str:
    return "\n".join(line for line in path.read_text().splitlines() if line.lstrip().startswith("#"))


def outside_fences(text: str) -> str:
    """The Markdown text without fenced code blocks (links there are code, not links)."""
    keep, fenced = [], False
    for line in text.splitlines():
        if FENCE_RE.match(line):
            fenced = not fenced
            continue
        keep.append("" if fenced else line)
    return "\n".join(keep)


# ----------------------------------------------------------------------------- checks
def gitignore_patterns() -> list[str]:
    lines = (ROOT / ".gitignore").read_text().splitlines() if (ROOT / ".gitignore").exists() else []
    return [ln.strip().rstrip("/") for ln in lines if ln.strip() and not ln.startswith("#")]


def is_ignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    for pat in patterns:
        if "/" in pat.strip("/"):  # anchored: match the path or one of its parent folders
            if any(fnmatch.fnmatch("/".join(parts[:i]), pat.strip("/")) for i in range(1, len(parts) + 1)):
                return True
        elif any(fnmatch.fnmatch(p, pat) for p in parts):
            return True
    return False


def missing_paths(text: str, patterns: list[str]) -> list[str]:
    """Repository paths named in ``text`` that do not exist (globs must match something)."""
    bad = []
    for match in PATH_RE.finditer(text):
        rel = match.group(0).rstrip("./")
        if "/" not in rel or is_ignored(rel, patterns):
            continue
        # a module may be named without its suffix ("app/ui" for app/ui.py)
        found = any(ROOT.glob(rel)) if "*" in rel else (ROOT / rel).exists() or (ROOT / f"{rel}.py").exists()
        if not found:
            bad.append(rel)
    return bad


def _module_file(parts: list[str]) -> Path | None:
    base = ROOT.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return base if base.is_dir() else None


def _defines(module: Path, name: str) -> bool:
    """Is ``name`` a submodule of ``module`` or a name bound at its top level (def, class,
    assignment, import)?"""
    folder = module if module.is_dir() else module.parent if module.name == "__init__.py" else None
    if folder is not None and ((folder / f"{name}.py").is_file() or (folder / name).is_dir()):
        return True
    if module.is_dir():
        return False
    names = set()
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return name in names


def unknown_modules(text: str) -> list[str]:
    """Dotted project names (``rlr_core.training.lora.apply_version``) that do not resolve."""
    bad = []
    for match in MODULE_RE.finditer(text):
        parts = match.group(0).split(".")
        if parts[-1] in FILE_SUFFIXES:  # a file name such as app.py
            continue
        for i in range(len(parts), 0, -1):
            module = _module_file(parts[:i])
            if module is not None:
                break
        rest = parts[i:]
        if module is None or (rest and not _defines(module, rest[0])):
            bad.append(match.group(0))
    return bad


def project_classes() -> dict[str, set[str]]:
    """Every class of the project's packages -> the names it defines or inherits from another
    project class (methods, class attributes, dataclass fields, attributes set on self)."""
    own: dict[str, set[str]] = {}
    bases: dict[str, list[str]] = {}
    for path in source_files(".py"):
        if path.relative_to(ROOT).parts[0] not in PACKAGES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            names = own.setdefault(node.name, set())
            bases.setdefault(node.name, []).extend(b.id for b in node.bases if isinstance(b, ast.Name))
            for item in ast.walk(node):
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and item is not node:
                    names.add(item.name)
                elif isinstance(item, ast.Name) and isinstance(item.ctx, ast.Store):
                    names.add(item.id)
                elif isinstance(item, ast.Attribute) and isinstance(item.ctx, ast.Store):
                    names.add(item.attr)

    def members(cls: str, seen: frozenset = frozenset()) -> set[str]:
        out = set(own.get(cls, ()))
        for base in bases.get(cls, []):
            if base in own and base not in seen:
                out |= members(base, seen | {cls})
        return out

    return {cls: members(cls) for cls in own}


def unknown_members(text: str, classes: dict[str, set[str]]) -> list[str]:
    """``Class.member`` names in ``text`` whose class is a project class without that member."""
    return [f"{c}.{m}" for c, m in re.findall(r"(?<![\w.])([A-Z]\w*)\.([a-z_]\w*)", text)
            if c in classes and m not in classes[c]]


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the text lowercased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in outside_fences(path.read_text()).splitlines():
        m = HEADING_RE.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def link_problems(doc: Path) -> list[str]:
    text = outside_fences(doc.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    targets = LINK_RE.findall(text) + REF_LINK_RE.findall(text) + HTML_SRC_RE.findall(text)
    problems = []
    for target in targets:
        if re.match(r"(?i)(https?|mailto):", target):
            continue  # the web: not followed
        if re.match(r"(?i)[a-z][a-z0-9+.-]*:", target) or target.startswith(("/", "\\")):
            problems.append(f"{target}: not a path inside the repository")
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc.resolve()
        if not dest.is_relative_to(ROOT):
            problems.append(f"{target}: points outside the repository")
        elif not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    return problems


def method_sections() -> set[str]:
    return {m.group(1) for line in (ROOT / "docs" / "method.md").read_text().splitlines()
            if (m := re.match(r"^##\s+(\d+)\.", line))}


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve_inside_the_repository(doc: Path):
    assert link_problems(doc) == []


@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_paths_and_modules_named_in_docs_exist(doc: Path):
    text = doc.read_text()
    assert missing_paths(text, gitignore_patterns()) == []
    assert unknown_modules(text) == []


def test_paths_and_modules_named_in_code_exist():
    patterns = gitignore_patterns()
    bad = {}
    for path in source_files(".py"):
        if path == Path(__file__).resolve():
            continue  # this file names broken paths on purpose (the last test)
        text = python_text(path)
        found = missing_paths(text, patterns) + unknown_modules(text)
        if found:
            bad[str(path.relative_to(ROOT))] = found
    for path in source_files(".sh"):
        if found := missing_paths(shell_comments(path), patterns):
            bad[str(path.relative_to(ROOT))] = found
    assert bad == {}


def test_method_doc_sections_cited_in_code_exist():
    sections = method_sections()
    assert {"1", "2", "3", "4", "5"} <= sections
    bad = []
    for path in [*source_files(".py"), *markdown_files()]:
        if path == Path(__file__).resolve():
            continue
        text = python_text(path) if path.suffix == ".py" else path.read_text()
        bad += [f"{path.relative_to(ROOT)}: section {n}" for n in SECTION_RE.findall(text) if n not in sections]
    assert bad == []


def test_classes_and_members_named_in_docs_exist():
    """The architecture's data path (and every other page) names real methods: Judgements.rate,
    FeedbackStore.add_rating, ModelRegistry.training_copy..."""
    classes = project_classes()
    assert {"AppServices", "FeedbackStore", "DiffusionBackend", "RLR"} <= set(classes)
    bad = {str(doc.relative_to(ROOT)): found for doc in markdown_files()
           if (found := unknown_members(doc.read_text(), classes))}
    assert bad == {}


def test_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_the_checks_catch_what_they_should(tmp_path):
    """The checkers report broken things (so the tests above can fail)."""
    patterns = gitignore_patterns()
    text = ("see `rlr_core/sampler.py`, rlr_core/no_such.py and docs/parts/*.md; runs/x is not ours; "
            "tests/artifacts/shots/a.png is created by the tests; python app.py")
    assert missing_paths(text, patterns) == ["rlr_core/no_such.py", "docs/parts/*.md"]
    assert unknown_modules("rlr_core.training.lora.apply_version and rlr_core.sampler.generate") == []
    assert unknown_modules("rlr_core.latent_backend, rlr_core.training.lora.no_such_name") == [
        "rlr_core.latent_backend", "rlr_core.training.lora.no_such_name"]
    assert github_slug("3. RLR: an FO tail, one HO block, and a `rest`-of-chain term") == \
        "3-rlr-an-fo-tail-one-ho-block-and-a-rest-of-chain-term"
    doc = ROOT / "docs" / "method.md"
    fake = tmp_path / "x.md"
    fake.write_text("[a](../../etc/passwd) [b](/etc/passwd) [c](file:///etc) [d](https://example.org)\n")
    assert len(link_problems(fake)) == 3
    assert "#1-setting-and-notation" not in " ".join(link_problems(doc))
    assert "1-setting-and-notation" in anchors(doc) and "no-such-heading" not in anchors(doc)
    classes = project_classes()
    assert unknown_members("FeedbackStore.add_rating, BuiltinBackend.unconditional, Path.exists", classes) == []
    assert unknown_members("FeedbackStore.add_star, RoundRunner.no_such_step", classes) == [
        "FeedbackStore.add_star", "RoundRunner.no_such_step"]
    source = io.StringIO("x = 1  # see docs/rlr-method.md section 3\n")
    comments = [t.string for t in tokenize.generate_tokens(source.readline) if t.type == tokenize.COMMENT]
    assert missing_paths("\n".join(comments), patterns) == ["docs/rlr-method.md"]
