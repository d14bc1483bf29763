import os

import pytest
import torch

# Tests share two CPU cores: one torch thread each keeps them from thrashing.
torch.set_num_threads(int(os.environ.get("RLR_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def builtin_backend():
    from rlr_core.backends.builtin import BuiltinBackend

    return BuiltinBackend.load()


@pytest.fixture(scope="module")
def running_app(tmp_path_factory, builtin_backend):
    """The app served in-process on a free port, with its own temporary data folder."""
    from app.config import AppConfig
    from app.server import start

    app = start(AppConfig(data_dir=tmp_path_factory.mktemp("app-data"), port=0), builtin_backend)
    yield app
    app.close()


PUBLIC_ADMIN_PASSWORD = "s3cret-admin"


@pytest.fixture(scope="module")
def public_app(tmp_path_factory, builtin_backend):
    """The app served in-process as a public app (what --share or a Space gets), admin password set."""
    from app.config import AppConfig
    from app.server import start

    app = start(AppConfig(data_dir=tmp_path_factory.mktemp("public-data"), port=0, public=True,
                          admin_password=PUBLIC_ADMIN_PASSWORD), builtin_backend)
    yield app
    app.close()
