"""Structural rules of the code base, checked on the source with the standard library's ``ast``.

(a) No import cycle among the modules of ``app/``, ``rlr_core/`` and ``feedback_store/``. Only
    imports that run when a module is imported count: module-level ones, including those inside
    ``try``/``if`` blocks, but not those in function bodies (deferred on purpose) or under
    ``if TYPE_CHECKING:`` (never run). An edge ``a -> b`` means module ``a`` imports module ``b``
    (``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``).
(b) No module under ``app/``, ``rlr_core/``, ``feedback_store/`` or ``bench/`` is longer than
    450 lines.
(c) One sampling loop. A sampling loop feeds a denoiser's output back into the denoiser: it is a
    ``for``/``while`` loop whose body calls a step-level model function (the names in
    ``MODEL_CALLS``: ``scheduler.step``, a UNet or denoiser call, ``model_output``, a chain's
    ``mean``, the sampler's ``step_mean``, ...) with an argument computed, inside the same loop,
    from such a call's result (x = f(model(x)) in any number of assignments). Loops that call the
    model on recorded states (likelihood-ratio terms, per-row perturbations) do not match. The
    check must find exactly one such loop in the project, :func:`rlr_core.rollout.rollout`; it
    also finds the diffusers reference loop in the tests' oracle, which shows it can fail. A
    loop written with a model function of another name, or as recursion, would slip through.
    And nothing outside the sampler touches a diffusers scheduler's sampling state
    (``set_timesteps``, ``step``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "rlr_core", "feedback_store")
SIZE_CHECKED = (*PACKAGES, "bench")
MAX_LINES = 450
LOOP_CHECKED = (*SIZE_CHECKED, "scripts")
THE_LOOP = "rlr_core/rollout.py"
MODEL_CALLS = {
    "predict", "mean", "perturbed_mean", "step_mean", "step_prediction", "mean_with_graph", "model_output",
    "guided_output", "ddim_mean", "ddim_step", "denoiser", "unet", "step",
}


def python_files(*folders: str) -> Iterator[Path]:
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# --- (a) import cycles ----------------------------------------------------------------------


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def all_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import, deferred ones in function bodies included (a deferred cycle is still a
    cycle: it only hides the dependency); not those under ``if TYPE_CHECKING:`` (never run)."""
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def module_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run at import time: not in functions or classes' methods, not TYPE_CHECKING."""
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                stack.extend(node.body)
            stack.extend(node.orelse)
        elif isinstance(node, (ast.Try, ast.With, ast.ClassDef)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []):
                    stack.extend(child.body if isinstance(child, ast.ExceptHandler) else [child])


def import_graph(root: Path, packages: tuple[str, ...], imports=module_level_imports) -> dict[str, set[str]]:
    files = {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    pkg = name if is_pkg else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                found = resolve(target)
                if found and found != name:
                    graph[name].add(found)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles() -> None:
    graph = import_graph(ROOT, PACKAGES)
    assert "rlr_core.sampler" in graph["rlr_core.dcot"]  # the graph sees real edges
    assert find_cycles(graph) == []


def test_no_import_cycles_through_deferred_imports_either() -> None:
    graph = import_graph(ROOT, PACKAGES, all_imports)
    assert "app.zerogpu" in graph["app.generation"]  # deferred and module-level edges alike
    assert find_cycles(graph) == []


def test_the_cycle_check_finds_a_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n\ndef f():\n    from pkg import c\n")
    (pkg / "b.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    from pkg import c\nfrom . import c\n")
    (pkg / "c.py").write_text("try:\n    from pkg.a import f\nexcept ImportError:\n    pass\n")
    assert find_cycles(import_graph(tmp_path, ("pkg",))) == [["pkg.a", "pkg.b", "pkg.c"]]
    (pkg / "c.py").write_text("")
    assert find_cycles(import_graph(tmp_path, ("pkg",))) == []  # the import in a function does not count
    (pkg / "c.py").write_text("def g():\n    from pkg import a\n")
    assert find_cycles(import_graph(tmp_path, ("pkg",))) == []
    assert find_cycles(import_graph(tmp_path, ("pkg",), all_imports)) == [["pkg.a", "pkg.b", "pkg.c"]]  # deferred count


# --- (b) module size ------------------------------------------------------------------------


def test_no_module_is_too_long() -> None:
    sizes = {rel(p): len(p.read_text().splitlines()) for p in python_files(*SIZE_CHECKED)}
    assert len(sizes) > 40
    assert {path: n for path, n in sizes.items() if n > MAX_LINES} == {}


# --- (c) one sampling loop --------------------------------------------------------------------


def _call_name(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _walk_same_scope(nodes: list[ast.AST]) -> Iterator[ast.AST]:
    """Every node under ``nodes`` without entering nested functions, lambdas or classes."""
    stack = list(nodes)
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                stack.append(child)


def _model_calls(nodes: list[ast.AST]) -> list[ast.Call]:
    return [n for n in _walk_same_scope(nodes) if isinstance(n, ast.Call) and _call_name(n) in MODEL_CALLS]


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in _walk_same_scope([node]) if isinstance(n, ast.Name)}


def _assigned(target: ast.AST) -> set[str]:
    """The names an assignment target rebinds or writes into (``out[i] = ...`` writes ``out``, not ``i``)."""
    if isinstance(target, ast.Name):
        return {target.id}
    if isinstance(target, (ast.Tuple, ast.List)):
        return set().union(*(_assigned(t) for t in target.elts))
    if isinstance(target, (ast.Starred, ast.Subscript, ast.Attribute)):
        return _assigned(target.value)
    return set()


def _assignments(body: list[ast.stmt]) -> list[tuple[set[str], ast.AST]]:
    out = []
    for node in _walk_same_scope(list(body)):
        if isinstance(node, ast.Assign):
            out.append((set().union(*(_assigned(t) for t in node.targets)), node.value))
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign, ast.NamedExpr)) and node.value is not None:
            out.append((_assigned(node.target), node.value))
    return out


def feedback_loops(source: str) -> list[int]:
    """Line numbers of loops that pass a model call's (transitive) output back into a model call."""
    found = []
    for loop in ast.walk(ast.parse(source)):
        if not isinstance(loop, (ast.For, ast.AsyncFor, ast.While)):
            continue
        calls = _model_calls(loop.body)
        if not calls:
            continue
        tainted: set[str] = set()
        assignments = _assignments(loop.body)
        changed = True
        while changed:  # names computed from a model call, directly or through other names
            changed = False
            for targets, value in assignments:
                if not targets <= tainted and (_model_calls([value]) or _names(value) & tainted):
                    tainted |= targets
                    changed = True
        if any(_names(arg) & tainted for call in calls for arg in [*call.args, *(k.value for k in call.keywords)]):
            found.append(loop.lineno)
    return found


def test_there_is_one_sampling_loop() -> None:
    files = [ROOT / "app.py", *python_files(*LOOP_CHECKED)]
    loops = {rel(p): lines for p in files if (lines := feedback_loops(p.read_text()))}
    assert list(loops) == [THE_LOOP] and len(loops[THE_LOOP]) == 1, loops


def test_the_loop_check_finds_the_diffusers_loop_and_the_old_ones() -> None:
    assert len(feedback_loops((ROOT / "tests/oracles/diffusers_loop.py").read_text())) == 1
    pathwise = (
        "def pathwise(chain, ctx, x, k_start, noise):\n"
        "    for k in range(k_start, 0, -1):\n"
        "        mu = mean_with_graph(chain, x, k, ctx)\n"
        "        x = mu + chain.sigma[k] * noise[k]\n"
        "    return x\n")
    assert feedback_loops(pathwise) == [2]
    replay = (  # the model on recorded states: no feedback, not a sampling loop
        "for start in range(0, len(ks), chunk):\n"
        "    k = ks[start:start + chunk]\n"
        "    mu = chain.mean(traj.x[k], k, ctx)\n"
        "    loss = (mu - traj.mean[k]).sum()\n")
    assert feedback_loops(replay) == []


def scheduler_calls(source: str) -> list[str]:
    """``set_timesteps`` calls, and a scheduler's ``step(model_output, t, sample, ...)`` (a receiver
    named ``*sched*`` with arguments: an LR schedule's or optimiser's ``step()`` has none)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            receiver = ast.unparse(node.func.value)
            if node.func.attr == "set_timesteps" or (
                    node.func.attr == "step" and len(node.args) >= 2 and "sched" in receiver.lower()):
                found.append(ast.unparse(node.func))
    return found


def test_only_the_sampler_touches_scheduler_state() -> None:
    """Only the sampler's schedule table (on a private copy of the scheduler) sets timesteps."""
    found = {rel(p): calls for p in [ROOT / "app.py", *python_files(*LOOP_CHECKED)]
             if (calls := scheduler_calls(p.read_text()))}
    assert found == {"rlr_core/sampler.py": ["scheduler.set_timesteps"],  # DDIM's table
                     "rlr_core/flow.py": ["scheduler_copy.set_timesteps"]}  # flow models' table
    oracle = scheduler_calls((ROOT / "tests/oracles/diffusers_loop.py").read_text())
    assert sorted(oracle) == ["scheduler.set_timesteps", "scheduler.step"]


# --- (d) the backend interface is complete ------------------------------------------------------

CONCRETE_BACKENDS = {"BuiltinBackend", "BuiltinClipBackend", "DiffusersLatentBackend", "AnimateDiffBackend",
                     "SDXLBackend"}


def backend_guesses(tree: ast.Module) -> list[int]:
    """Lines that ask for a concrete backend class (``isinstance(x, BuiltinBackend)``) or guess at
    an attribute of a backend (``getattr(backend, ...)``): what the interface should say instead."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or _call_name(node) not in ("isinstance", "getattr") or len(node.args) < 2:
            continue
        if _call_name(node) == "isinstance":
            kinds = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
            if any(isinstance(k, (ast.Name, ast.Attribute)) and ast.unparse(k).split(".")[-1] in CONCRETE_BACKENDS
                   for k in kinds):
                lines.append(node.lineno)
        elif "backend" in ast.unparse(node.args[0]).split(".")[-1]:
            lines.append(node.lineno)
    return lines


def test_no_concrete_backend_checks_outside_the_backends() -> None:
    found = {rel(p): backend_guesses(ast.parse(p.read_text())) for p in python_files(*PACKAGES, "bench")
             if not rel(p).startswith("rlr_core/backends/")}
    assert {path: lines for path, lines in found.items() if lines} == {}
    sample = "if isinstance(b, BuiltinBackend) or getattr(backend, 'is_video', False): pass"
    assert backend_guesses(ast.parse(sample)) == [1, 1]  # the check can fail


# --- (e) one schema per estimator ----------------------------------------------------------------

SCHEMA_FREE = ("app", "rlr_core")  # outside rlr_core/estimators/: no code keyed on an estimator's name


def estimator_names() -> set[str]:
    """The ``name: ClassVar[str] = "..."`` of every estimator class, read from the source."""
    names = set()
    for path in python_files("rlr_core/estimators"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                names |= {st.value.value for st in node.body if isinstance(st, ast.AnnAssign)
                          and isinstance(st.target, ast.Name) and st.target.id == "name"
                          and isinstance(st.value, ast.Constant) and isinstance(st.value.value, str)}
    return names


def name_checks(tree: ast.Module, names: set[str]) -> list[int]:
    """Lines that ask which estimator it is by name (``estimator == "rlr"``, ``name in ("rlr", "lr")``):
    what an estimator's schema or a capability of its class should say instead. (Tables keyed by
    name are not looked for: "lr" is also the learning rate's flag.)"""
    def named(node: ast.AST) -> bool:
        items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
        return any(isinstance(c, ast.Constant) and isinstance(c.value, str) and c.value in names for c in items)

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(named(side) for side in [node.left, *node.comparators]):
            lines.append(node.lineno)
    return lines


def test_no_estimator_is_told_apart_by_its_name_outside_the_estimators() -> None:
    names = estimator_names()
    assert {"rlr", "truncated-bp", "ddpo", "full-bp", "lr", "authors-code"} <= names
    found = {rel(p): lines for p in python_files(*SCHEMA_FREE) if not rel(p).startswith("rlr_core/estimators/")
             and (lines := name_checks(ast.parse(p.read_text()), names))}
    assert found == {}
    sample = 'if config.estimator == "rlr": pass\nok = name in ("ddpo", x) or name != "lrs"'
    assert name_checks(ast.parse(sample), names) == [1, 2]  # the check can fail


def test_each_estimator_has_one_options_schema() -> None:
    """Each estimator's options are declared once, in its dataclass (rlr_core/estimators/schema.py);
    the app's estimator settings and the command line's flags are exactly what the schemas say."""
    import dataclasses

    from rlr_core.estimators import ESTIMATORS
    from rlr_core.estimators.schema import options_schema, public_options
    from rlr_core.training.cli import OPTION_FLAGS
    from rlr_core.training.defaults import DEFAULTS, PUBLIC_OPTIONS

    assert set(ESTIMATORS) == estimator_names()
    declared = {}
    for name, cls in ESTIMATORS.items():
        assert dataclasses.is_dataclass(cls)
        specs = options_schema(cls)
        assert specs and all(s.help and s.label for s in specs), name
        assert "kl_coef" in {s.name for s in specs}, name  # every estimator takes the KL
        declared[name] = {s.name for s in specs}
    # the command line: one flag per option, and nothing else
    flagged = {(n, field) for names, field in OPTION_FLAGS.values() for n in names}
    assert flagged == {(n, field) for n, fields in declared.items() for field in fields}
    # the app's flat settings: the schemas' public options (declared alike where shared), no other
    assert PUBLIC_OPTIONS == public_options(ESTIMATORS.values())
    assert set(PUBLIC_OPTIONS) <= set(DEFAULTS)
    # options are declared in the estimators' dataclasses only
    outside = [rel(p) for p in python_files(*SCHEMA_FREE) if not rel(p).startswith("rlr_core/estimators/")
               and any(isinstance(n, ast.ImportFrom) and n.module == "rlr_core.estimators.schema"
                       and any(a.name == "option" for a in n.names) for n in ast.walk(ast.parse(p.read_text())))]
    assert outside == []
