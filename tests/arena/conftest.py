import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The arena's tiny models run fastest single-threaded (and do not fight other processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
