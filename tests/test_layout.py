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


# Where model weights may be loaded: in the Ray roles (actors/), in Ray Train workers (a Task's build_model),
# and in functions the jobs run as Ray tasks on a stage's resources; never in a driver, which on a cluster
# runs on a CPU head (cluster.yaml, k8s/rayjob.yaml) and would hold a 7B model in its memory.
LOADS_WEIGHTS = ("load_model", "from_pretrained", "from_config", "LLM", "build_model")
RUNS_ON_THE_CLUSTER = {
    "clinicalgpt/stages.py:CausalLMTask.build_model": "Ray Train worker",
    "clinicalgpt/reward_model.py:RewardTask.build_model": "Ray Train worker",
    "clinicalgpt/trainer.py:train_loop": "Ray Train worker",
    "clinicalgpt/reward_model.py:pair_scores": "ray.remote(pair_scores)",
    "clinicalgpt/dpo.py:DpoTask.build_model": "Ray Train worker",
    "clinicalgpt/dpo.py:scoring_model": "ray.remote(policy_logprobs)",  # and in ReferenceLogprobs, a Ray Data actor
    "clinicalgpt/serving.py:merge_adapter": "ray.remote(merge_adapter)",
    "jobs/bootstrap.py:base_model_check": "ray.remote(base_model_check)",
    "clinicalgpt/plan.py:Model.parameters": "PyTorch's meta device: parameter shapes, no weights, no memory",
}
NOT_MODELS = ("Tokenizer", "Config", "PeftModel")  # X.from_pretrained of these loads no weights (PeftModel: an adapter)


def functions(tree: ast.Module):
    """(name, node) of each module-level function and method (nested functions belong to their parent)."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            yield from ((f"{node.name}.{f.name}", f) for f in node.body if isinstance(f, ast.FunctionDef))


def weight_loading_call_sites() -> dict[str, str]:
    """file:function -> the first call in it that loads model weights (actors/ aside: Ray roles)."""
    sites = {}
    for folder in ("clinicalgpt", "jobs"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == REPO / "clinicalgpt" / "modeling.py":
                continue  # the loaders themselves
            for name, fn in functions(ast.parse(path.read_text())):
                for node in ast.walk(fn):
                    if isinstance(node, ast.Call):
                        f = node.func
                        called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                        owner = ast.unparse(f.value) if isinstance(f, ast.Attribute) else ""
                        if called in LOADS_WEIGHTS and not owner.endswith(NOT_MODELS):
                            sites.setdefault(f"{path.relative_to(REPO)}:{name}", ast.unparse(node)[:80])
    return sites


def test_model_weights_load_only_on_the_cluster_never_in_a_driver():
    sites = weight_loading_call_sites()
    unplaced = {site: call for site, call in sites.items() if site not in RUNS_ON_THE_CLUSTER}
    assert not unplaced, f"model weights loaded where a driver runs them: {unplaced}"
    for site, where in RUNS_ON_THE_CLUSTER.items():
        assert site in sites, f"{site} no longer loads weights: drop it from RUNS_ON_THE_CLUSTER"
        if where.startswith("ray.remote("):
            assert where in (REPO / site.split(":")[0]).read_text(), f"{site} is not run as {where}"
