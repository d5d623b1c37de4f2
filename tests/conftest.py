"""Hypothesis profiles: `ci` (derandomized, >= 200 examples) when CI is set, `dev` otherwise.

Select another with HYPOTHESIS_PROFILE=thorough for long runs. Fixtures that modules request
by name: `single_torch_thread`, `restore_logging`.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, max_examples=200, print_blob=True, **_common)
settings.register_profile("dev", max_examples=40, **_common)
settings.register_profile("thorough", max_examples=2000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(scope="module")
def single_torch_thread():
    """Run a module's tests on one torch thread: on tiny tensors, waking the intra-op thread
    pool for each op costs more than the op (tens of times more on a busy 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def restore_logging():
    """Give a test the logging state it found: the root logger's handlers and level and the
    console set-up of ``torch_impl.pipeline.logs`` (``cli.main`` sets up logging for the
    process). Modules that call ``cli.main`` request it for every test with
    ``pytestmark = pytest.mark.usefixtures("restore_logging")``."""
    import logging

    from torch_impl.pipeline import logs

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    console, verbosity = logs._console, logs._verbosity
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logs._console, logs._verbosity = console, verbosity
