"""The layers: jobs/ (entry points) -> clinicalgpt.rlhf and clinicalgpt.evaluation (drivers of actors) ->
actors/ (the Ray roles) -> the rest of clinicalgpt (pure pieces). Nothing imports upwards, and no module
reaches into a job: tests and users call a job's main()."""

import ast

from conftest import REPO

DRIVERS = ("clinicalgpt.rlhf", "clinicalgpt.evaluation")


def imports(path) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names |= {module} | {f"{module}.{a.name}" for a in node.names}
    return names


def layer(module: str) -> str | None:
    if module.startswith("jobs"):
        return "jobs"
    if module.startswith(DRIVERS):
        return "drivers"
    if module.startswith("actors"):
        return "actors"
    if module.startswith("clinicalgpt"):
        return "core"
    return None


def test_no_module_imports_a_layer_above_its_own():
    order = ["core", "actors", "drivers", "jobs"]
    upward = []
    for folder in ("clinicalgpt", "actors", "jobs"):
        for path in sorted((REPO / folder).rglob("*.py")):
            own = layer(".".join(path.relative_to(REPO).with_suffix("").parts))
            for name in imports(path):
                other = layer(name)
                if other and order.index(other) > order.index(own):
                    upward.append(f"{path.relative_to(REPO)} imports {name}")
    assert not upward, upward


def test_tests_and_benchmarks_use_a_job_only_through_its_main():
    reaching = []
    for path in sorted((REPO / "tests").glob("*.py")) + sorted((REPO / "bench").glob("*.py")):
        tree = ast.parse(path.read_text())
        jobs = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "jobs"
                for a in node.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jobs."):
                reaching.append(f"{path.name}: from {node.module} import ...")
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in jobs \
                    and node.attr != "main":
                reaching.append(f"{path.name}: {node.value.id}.{node.attr}")
    assert not reaching, reaching
