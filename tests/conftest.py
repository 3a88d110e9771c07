import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import their helpers by module name


def pytest_collection_modifyitems(config, items):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        if "gpu" in item.keywords and gpus == 0:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none is visible here"))
        marker = item.get_closest_marker("multigpu")
        if marker is not None and gpus < marker.args[0]:
            item.add_marker(pytest.mark.skip(reason=f"needs {marker.args[0]} CUDA GPUs; {gpus} visible"))


@pytest.fixture(scope="session")
def one_rank_group():
    """A 1-rank gloo process group in the test process, for single-process buffer tests."""
    from dist_utils import single_rank_group

    single_rank_group()
    yield
