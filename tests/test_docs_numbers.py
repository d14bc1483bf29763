"""Every number the docs quote from a benchmark matches the JSON it came from (bench/results/).

A doc marks a quoted number with an HTML comment (invisible once rendered). Three markers:

``<!-- numbers: bench/results/fidelity.json -->``
    sets the JSON file that the markers after it in the page read (until the next ``numbers:``).

``0.875 <!-- n: summary.accuracy -->``, ``316 s <!-- n: bench/results/app.json runs[0].wall_s -->``
    the number right before the marker (the last one before it on its line, or on the line above
    when the marker starts a line; never one before an earlier comment) equals the value at
    that JSON path. The file may be named in the marker; else the page's current ``numbers:`` file.
    Several numbers at once: ``0.42 ± 0.03 <!-- n: mean, std -->`` (the last two numbers before it,
    in order).

A table: a comment right before it (blank lines allowed) that names what each body row reads and
what each column reads from there::

    <!-- table: bench/results/fidelity.json
    rows: seen, held_out, all, -
    cols: kind=kind_acc; colour=colour_acc; 3=size_acc
    -->

``rows:`` one JSON path per body row, in order (``-`` skips a row; the count must match the
table's, so a table edited without its marker fails); ``rows: results[*]`` reads row i from
``results[i]``; a row from another file names it first (``rows: rows[0], bench/results/estimators_branches.json
rows[1]``). ``cols:`` ``<column>=<path>`` pairs split by ``;``: the column by its header text or
1-based number, the path relative to the row's (a path starting with ``/`` is from the file's
top). A cell holding several numbers takes one path per number, comma-separated, ``_`` skipping
one: ``mean ± std=mean, std``; a cell with no number in it is skipped. ``rows:`` and ``cols:``
may go on over several lines.

Paths: ``a.b[0].c``; a key with dots or spaces is quoted, ``runs["kl=0.3"].mean``; ``[-1]`` is the
last element. A scale after a path: ``accuracy *100`` (a percentage), ``peak_bytes /2**30`` (GiB),
``seconds *1000`` (ms).

Equal means: the JSON value rounded to the digits the doc quotes is the quoted number ("0.875" vs
0.87512 passes; "316" vs 325.2 fails; "1,234" is 1234; "−0.3" with a Unicode minus is -0.3).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

COMMENT_RE = re.compile(r"<!--\s*(numbers|n|table):(.*?)-->", re.S)
NUMBER_RE = re.compile(r"(?<![\w.])([-+\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?)(?![\d])")
SCALE_RE = re.compile(r"\s*([*/])\s*(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?:\*\*(\d+))?\s*$")
TOKEN_RE = re.compile(r"""\.?([^.\[\]\s"']+)|\[(-?\d+)\]|\[\s*"([^"]*)"\s*\]|\[\s*'([^']*)'\s*\]""")
FENCE_RE = re.compile(r"^\s*(```|~~~)")


class MarkerError(ValueError):
    """A marker that cannot be read or points at nothing."""


@dataclass
class Check:
    where: str  # the page and line, "<page>:12"
    quoted: str  # the number as the doc writes it
    file: str  # the JSON file in bench results
    path: str  # the JSON path, with its scale
    value: float | None = None
    error: str = ""

    def ok(self) -> bool:
        return not self.error and self.value is not None and matches(self.quoted, self.value)

    def describe(self) -> str:
        got = self.error or f"JSON has {self.value!r}"
        return f"{self.where}: doc says {self.quoted}, {self.file} {self.path}: {got}"


# ----------------------------------------------------------------------------- numbers
def parse_quoted(text: str) -> tuple[float, int]:
    """The doc's number and how many decimals it quotes ("1,234" -> (1234.0, 0); "0.50" -> (0.5, 2))."""
    clean = text.replace(",", "").replace("\u2212", "-").lstrip("+")
    mantissa = re.split(r"[eE]", clean)[0]
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    if re.search(r"[eE]", clean):
        decimals -= int(re.split(r"[eE]", clean)[1])
    return float(clean), decimals


def matches(quoted: str, value: float) -> bool:
    """``value`` rounded to the decimals of ``quoted`` is ``quoted`` (a tie may round either way)."""
    number, decimals = parse_quoted(quoted)
    if not math.isfinite(value):
        return False
    half = 0.5 * 10.0 ** (-decimals)
    return abs(value - number) <= half * (1 + 1e-9) + 1e-12


def numbers_in(text: str) -> list[str]:
    return NUMBER_RE.findall(text)


# ----------------------------------------------------------------------------- JSON paths
def split_scale(spec: str) -> tuple[str, float]:
    m = SCALE_RE.search(spec)
    if not m:
        return spec.strip(), 1.0
    factor = float(m.group(2)) ** (int(m.group(3)) if m.group(3) else 1)
    return spec[:m.start()].strip(), factor if m.group(1) == "*" else 1.0 / factor


def lookup(data, path: str):
    """The value at ``path`` (``a.b[0]["c d"]``) in ``data``; MarkerError names the missing step."""
    path = path.strip().lstrip("/")
    pos, node = 0, data
    while pos < len(path):
        m = TOKEN_RE.match(path, pos)
        if not m or m.end() == pos:
            raise MarkerError(f"cannot read path {path!r} at {path[pos:]!r}")
        key, index, quoted1, quoted2 = m.groups()
        try:
            if index is not None:
                node = node[int(index)]
            else:
                name = key if key is not None else (quoted1 if quoted1 is not None else quoted2)
                if isinstance(node, list) and re.fullmatch(r"-?\d+", name):
                    node = node[int(name)]
                else:
                    node = node[name]
        except (KeyError, IndexError, TypeError):
            raise MarkerError(f"no {path[:m.end()]!r}") from None
        pos = m.end()
    return node


def value_at(data, spec: str) -> float:
    path, factor = split_scale(spec)
    value = lookup(data, path)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?\s*", value):
        value = float(value)  # a number the benchmark wrote as text
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MarkerError(f"{path!r} is {type(value).__name__} {str(value)[:60]!r}, not a number")
    return float(value) * factor


def join(base: str, rel: str) -> str:
    rel = rel.strip()
    if rel.startswith("/") or not base:
        return rel.lstrip("/")
    if rel.startswith("["):
        return base + rel
    return f"{base}.{rel}" if rel else base


# ----------------------------------------------------------------------------- reading a page
def _code_lines(lines: list[str]) -> set[int]:
    inside, out = False, set()
    for i, line in enumerate(lines):
        if FENCE_RE.match(line):
            inside = not inside
            out.add(i)
        elif inside:
            out.add(i)
    return out


def _cells(row: str) -> list[str]:
    row = row.strip()
    row = row[1:] if row.startswith("|") else row
    row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
    return [c.strip() for c in re.split(r"(?<!\\)\|", row)]


def _plain(cell: str) -> str:
    return re.sub(r"<!--.*?-->", "", cell).replace("**", "").replace("`", "").strip()


def _table_after(lines: list[str], start: int) -> tuple[list[str], list[list[str]], int]:
    """Header cells, body rows (cells) and the header's line index of the first table after ``start``."""
    i = start
    while i < len(lines) and not lines[i].strip():
        i += 1
    if i + 1 >= len(lines) or not lines[i].lstrip().startswith("|") or not re.match(r"^\s*\|?\s*:?-+", lines[i + 1]):
        raise MarkerError("a table: marker must be followed by a table")
    header, body, j = _cells(lines[i]), [], i + 2
    while j < len(lines) and lines[j].lstrip().startswith("|"):
        body.append(_cells(lines[j]))
        j += 1
    return header, body, i


def _load(name: str, cache: dict) -> object:
    name = name.strip()
    if name not in cache:
        path = ROOT / name
        if not name.startswith("bench/results/") or not path.is_file():
            raise MarkerError(f"{name!r} is not a file in bench/results/")
        cache[name] = json.loads(path.read_text())
    return cache[name]


def _number_checks(where: str, quoted: list[str], file: str, specs: list[str], data) -> list[Check]:
    if len(quoted) < len([s for s in specs if s.strip() != "_"]) or not specs:
        return [Check(where, " ".join(quoted) or "(no number)", file, ", ".join(specs),
                      error=f"{len(specs)} path(s) but {len(quoted)} number(s) to compare")]
    out = []
    for q, spec in zip(quoted, specs):
        if spec.strip() == "_":
            continue
        check = Check(where, q, file, spec.strip())
        try:
            check.value = value_at(data, spec)
        except MarkerError as err:
            check.error = str(err)
        out.append(check)
    return out


def checks_in(text: str, name: str, cache: dict | None = None) -> list[Check]:
    """Every marked number of a page (``name`` labels the results, e.g. "docs/benchmarks.md")."""
    cache = {} if cache is None else cache
    lines = text.splitlines()
    code = _code_lines(lines)
    offsets, pos = [], 0
    for line in lines:
        offsets.append(pos)
        pos += len(line) + 1
    line_of = lambda off: max(i for i, o in enumerate(offsets) if o <= off)  # noqa: E731
    current, out, previous_end = "", [], 0
    for comment in re.finditer(r"<!--.*?-->", text, re.S):
        start, end, since = comment.start(), comment.end(), previous_end
        previous_end = end
        m = COMMENT_RE.fullmatch(comment.group(0))
        if m is None:
            continue
        kind, body = m.group(1), m.group(2).strip()
        lineno = line_of(start)
        if lineno in code:
            continue
        where = f"{name}:{lineno + 1}"
        try:
            if kind == "numbers":
                current = body
                _load(current, cache)
                continue
            if kind == "n":
                file, paths = current, body
                first = body.split(None, 1)
                if first and first[0].endswith(".json"):
                    file, paths = first[0], (first[1] if len(first) > 1 else "")
                if not file:
                    raise MarkerError("an n: marker needs a file: name it, or put a numbers: marker above")
                data = _load(file, cache)
                specs = [s for s in paths.split(",")]
                # the text before the marker: its line and the one above, after any earlier comment
                before = text[max(offsets[max(lineno - 1, 0)], since):start]
                found = numbers_in(before)[-len(specs):] if specs else []
                out += _number_checks(where, found, file, specs, data)
                continue
            # a table
            head, _, rest = body.partition("\n")
            file = head.strip() or current
            data = _load(file, cache)
            fields, last = {}, None
            for line in rest.splitlines():
                field = re.match(r"\s*(rows|cols)\s*:(.*)", line)
                if field:
                    last = field.group(1)
                    fields[last] = field.group(2).strip()
                elif line.strip() and last:  # a long line goes on on the next one
                    fields[last] += " " + line.strip()
            if "rows" not in fields or "cols" not in fields:
                raise MarkerError("a table: marker needs rows: and cols: lines")
            end_line = line_of(end)
            header, body_rows, header_line = _table_after(lines, end_line + 1)
            rows = [r.strip() for r in fields["rows"].split(",")]
            if len(rows) == 1 and rows[0].endswith("[*]"):
                base = rows[0][:-3]
                rows = [f"{base}[{i}]" for i in range(len(body_rows))]
                if len(lookup(data, base)) != len(body_rows):
                    raise MarkerError(f"{base} has {len(lookup(data, base))} entries, the table {len(body_rows)} rows")
            if len(rows) != len(body_rows):
                raise MarkerError(f"rows: names {len(rows)} rows, the table has {len(body_rows)}")
            plain_header = [_plain(h) for h in header]
            for col_spec in filter(None, (c.strip() for c in fields["cols"].split(";"))):
                col, eq, paths = col_spec.partition("=")
                col = col.strip()
                if not eq:
                    raise MarkerError(f"column {col_spec!r}: use <column>=<path>")
                if col.isdigit():
                    index = int(col) - 1
                elif col in plain_header:
                    index = plain_header.index(col)
                else:
                    raise MarkerError(f"no column {col!r} (the header has {plain_header})")
                for r, (row_path, cells) in enumerate(zip(rows, body_rows)):
                    if row_path == "-":
                        continue
                    row_file, row_data = file, data
                    if row_path.split(None, 1)[0].endswith(".json"):  # a row from another file
                        row_file, row_path = row_path.split(None, 1)
                        row_data = _load(row_file, cache)
                    cell_where = f"{name}:{header_line + 3 + r}"
                    if index >= len(cells):
                        raise MarkerError(f"{cell_where}: row has no column {col!r}")
                    quoted = numbers_in(_plain(cells[index]))
                    if not quoted:
                        continue  # an empty cell, or words ("(load)"), quote nothing
                    specs = [s.strip() if s.strip() == "_" else join(row_path, s) for s in paths.split(",")]
                    out += _number_checks(cell_where, quoted, row_file, specs, row_data)
        except MarkerError as err:
            out.append(Check(where, "", "", body.splitlines()[0] if body else "", error=f"bad marker: {err}"))
    return out


def doc_pages() -> list[Path]:
    return [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if p.is_file()]


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_quoted_numbers_match_the_results(page):
    name = str(page.relative_to(ROOT))
    wrong = [c.describe() for c in checks_in(page.read_text(), name) if not c.ok()]
    assert not wrong, f"{len(wrong)} number(s) in {name} do not match bench/results/:\n" + "\n".join(wrong)


def test_the_benchmark_pages_are_marked():
    """The marked pages keep their markers (a page that loses them would pass unnoticed)."""
    for page, least in (("docs/benchmarks.md", 100), ("docs/video.md", 10)):
        checks = checks_in((ROOT / page).read_text(), page)
        assert len(checks) >= least, f"{page} has only {len(checks)} marked numbers"


def test_the_checker_catches_wrong_numbers(tmp_path, monkeypatch):
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    (results / "x.json").write_text(json.dumps({
        "acc": 0.87512, "wall_s": 325.2, "runs": [{"name": "a", "mean": 1.5, "std": 0.25}, {"name": "b", "mean": 2.0,
                                                                                         "std": 0.5}],
        "kl=0.3": {"mean": -0.3}, "bytes": 3 * 2**30, "n": 1234}))
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    page = """<!-- numbers: bench/results/x.json -->
Accuracy 0.875 <!-- n: acc -->, 87.5% <!-- n: acc *100 -->, 1,234 items <!-- n: n -->,
3.0 GiB <!-- n: bytes /2**30 -->, \u22120.30 <!-- n: ["kl=0.3"].mean -->,
1.50 ± 0.25 <!-- n: runs[0].mean, runs[0].std -->.

<!-- table: bench/results/x.json
rows: runs[*]
cols: mean=mean; 3=std
-->

| run | mean | std |
|---|---|---|
| a | 1.5 | 0.25 |
| b | 2.00 | 0.5 |

```
316 s <!-- n: wall_s -->  (in a code block: not read)
```
"""
    checks = checks_in(page, "page.md")
    assert len(checks) == 11 and all(c.ok() for c in checks), [c.describe() for c in checks if not c.ok()]

    def failures(text: str) -> list[str]:
        return [c.describe() for c in checks_in(text, "page.md") if not c.ok()]

    wrong = failures("The run took 316 s <!-- n: bench/results/x.json wall_s -->.")
    assert len(wrong) == 1 and "doc says 316" in wrong[0] and "325.2" in wrong[0]
    assert failures("0.876 <!-- n: bench/results/x.json acc -->")
    assert failures("0.88 <!-- n: bench/results/x.json acc -->") == []
    assert failures(page.replace("| b | 2.00 |", "| b | 2.10 |"))  # a wrong cell
    assert failures(page.replace("| b | 2.00 | 0.5 |\n", ""))  # a row dropped from the table, not from rows:
    assert "no 'nope'" in failures("1 <!-- n: bench/results/x.json nope -->")[0]  # a path that is not there
    assert "not a number" in failures("1 <!-- n: bench/results/x.json runs[0].name -->")[0]
    assert "not a file" in failures("1 <!-- n: bench/results/missing.json acc -->")[0]
    assert "needs a file" in failures("1 <!-- n: acc -->")[0]
    assert "no column" in failures(page.replace("cols: mean=mean", "cols: average=mean"))[0]


def test_rounding_rule():
    assert matches("0.875", 0.87512) and not matches("316", 325.2) and matches("325", 325.2)
    assert matches("1,234", 1234.4) and not matches("1,234", 1235)
    assert matches("\u22120.3", -0.31) and matches("+2", 1.6) and not matches("0.30", 0.306)
    assert matches("1.5e-3", 0.00149) and not matches("2", float("nan"))
