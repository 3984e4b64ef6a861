import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for every flow test in the session (it takes seconds to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
