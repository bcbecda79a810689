import pytest
import torch

@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One math thread: several times faster than two for the package's small networks."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
