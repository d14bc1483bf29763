import os

import pytest
import torch

# Tests share two CPU cores: one torch thread each keeps them from thrashing.
torch.set_num_threads(int(os.environ.get("RLR_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def builtin_backend():
    from rlr_core.backend import BuiltinBackend

    return BuiltinBackend.load()
