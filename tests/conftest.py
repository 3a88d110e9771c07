import pytest


def pytest_collection_modifyitems(config, items):
    from dist_utils import gpu_count, placement_problem

    gpus = gpu_count()
    for item in items:
        if "gpu" not in item.keywords:
            continue
        if gpus == 0:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none is visible here"))
            continue
        # Multi-rank GPU tests take their rank count as the parameter world_size.
        callspec = getattr(item, "callspec", None)
        ranks = callspec.params.get("world_size") if callspec is not None else None
        problem = placement_problem(ranks) if ranks is not None else None
        if problem is not None:
            item.add_marker(pytest.mark.skip(reason=problem))


@pytest.fixture(scope="session")
def one_rank_group():
    """A 1-rank gloo process group in the test process, for single-process buffer tests."""
    from dist_utils import single_rank_group

    single_rank_group()
    yield


@pytest.fixture(scope="session")
def nvcc():
    """The CUDA compiler's path, for the tests that build C++/CUDA sources (skips without it)."""
    import shutil

    path = shutil.which("nvcc")
    if path is None:
        pytest.skip("nvcc not found")
    return path
