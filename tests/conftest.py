import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # jobs/ are scripts; tests import their main()
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tests read the real corpora through the configurable data root (../shared/data by default).
DATA_ROOT = Path(os.environ.get("CLINICALGPT_DATA_ROOT", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "README.md").exists():
        pytest.fail(f"corpora not found at {DATA_ROOT}: set CLINICALGPT_DATA_ROOT")
    return DATA_ROOT


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session; shut down (not `ray stop`) at the end."""
    import ray
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)  # as init_ray
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def built(ray_session, data_root, tmp_path_factory):
    """The data job and the tiny model bootstrap on the real corpora, once per session: (cfg, manifest)."""
    from clinicalgpt.config import load_config
    from jobs import bootstrap, data
    argv = [f"run_root={tmp_path_factory.mktemp('runs')}", f"data.root={data_root}"]
    manifest = data.main(argv)
    bootstrap.main(argv + ["check_vllm=false"])
    return load_config(argv), manifest
