import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread on a shared 2-core machine; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(n)


def tiny(**kw):
    from model import MPlugConfig
    return MPlugConfig.from_preset("tiny", **kw)


def batch(b=2, t=4, size=32, length=10, vocab=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(b, t, 3, size, size, generator=g)
    ids = torch.randint(5, vocab, (b, length), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1:, length - 3:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return frames, ids, mask
