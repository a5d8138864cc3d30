"""Small real models shared by the core tests."""
import torch
from torch import nn

from kdhooks.demo import DigitsCNN


def pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return DigitsCNN(width=4), DigitsCNN(width=8)


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


class TwoHeads(nn.Module):
    """A model whose blocks return a tuple and a dict, and whose trunk is called twice."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        first = self.trunk(x)
        second = self.trunk(torch.relu(first))
        return {"logits": self.head(second), "pair": (first, second)}
