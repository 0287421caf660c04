"""The session's fixtures: a small pipeline run, the S3 server and the Ray cluster, shared by every
test that asks for them; the helpers they use live in tests/helpers/ (``pythonpath`` in pyproject)."""

from pathlib import Path

import pytest

from helpers.common import make_params, make_photo_folder

# The tiers. `pytest -m "not slow"` is the fast tier: every test that starts no server or cluster,
# runs no `dvc repro` or launched processes, and trains no shared pipeline. A test is slow when it
# uses one of these fixtures (the marker follows the fixtures, so a new test is placed by what it
# uses) or its module says so (`pytestmark = pytest.mark.slow`: subprocess pipelines).
SLOW_FIXTURES = {"pipeline_dir", "s3_server", "s3_env", "ray_cluster", "ray_engine", "repo", "bucket_repo"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)



@pytest.fixture
def tiny_params():
    """Params for a model and run small enough for unit tests (seconds on a CPU)."""
    return make_params()


@pytest.fixture
def photo_folder(tmp_path):
    return make_photo_folder(tmp_path / "photos")


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory):
    """download -> prepare -> train (a few steps) on a photo folder, once per test session.

    Returns the folder holding raw/, prepared/, vae/, train/, checkpoints/; tests that modify
    anything copy what they need first.
    """
    from ldm_vae.ingest.download import run_download
    from ldm_vae.ingest.prepare import run_prepare
    from ldm_vae.shards import shard_paths
    from ldm_vae.train.training import train

    base = tmp_path_factory.mktemp("pipeline")
    folder = make_photo_folder(base / "photos")
    params = make_params(data={"source": f"folder:{folder}"})
    run_download(params.data, base / "raw")
    run_prepare(params.data, base / "raw", base / "prepared")
    train(params, shard_paths(base / "prepared" / "train"), shard_paths(base / "prepared" / "val"),
          base / "vae", base / "train", base / "checkpoints")
    return base


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS) on 127.0.0.1 for the whole session (helpers/s3server.py)."""
    from helpers.s3server import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The AWS variables of the test server set in this process (and so in its children)."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture(scope="session")
def ray_cluster():
    """A real two-node Ray cluster on 127.0.0.1 (head and second node, 1 CPU each) for the whole
    session (helpers/raycluster.py); this process can be its driver (``ray_engine``)."""
    import shutil
    import tempfile

    from helpers.raycluster import RayCluster, patch_this_process

    root = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay short
    cluster = RayCluster(root).start()
    patch_this_process()
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def ray_engine(ray_cluster):
    """engine params that run a stage's units on the test cluster."""
    from ldm_vae.config import EngineConfig

    return EngineConfig(kind="ray", ray_address=ray_cluster.address)
