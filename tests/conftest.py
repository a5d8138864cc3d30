import pytest
import torch

# one thread: the models in the tests are tiny, and launched workers must not oversubscribe 2 cores
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
