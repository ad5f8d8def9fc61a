"""oneDNN prepacked linears (the CPU float32 fast path) compute the same function as F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from paged_backend.layers.cpu_prepack import PREPACK_ENV, prepack_available, prepack_cpu_linears
from paged_backend.layers.linear import ColumnParallelLinear, RowParallelLinear

pytestmark = pytest.mark.skipif(not prepack_available(), reason="torch built without oneDNN")


def make_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(ColumnParallelLinear(64, [96, 32], bias=True),
                                RowParallelLinear(128, 48, bias=False))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.mark.parametrize("rows", [1, 5, 16, 133])
def test_packed_equals_f_linear(rows):
    model = make_model()
    assert prepack_cpu_linears(model) == 2
    assert all(m.packed is not None for m in model)
    x = torch.randn(rows, 64, dtype=torch.float64)
    ref = F.linear(F.linear(x, model[0].weight.double(), model[0].bias.double()),
                   model[1].weight.double())
    with torch.inference_mode():
        out = model(x.float())
    assert out.shape == (rows, 48)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_env_turns_it_off_and_non_float32_is_left_alone(monkeypatch):
    monkeypatch.setenv(PREPACK_ENV, "0")
    assert prepack_cpu_linears(make_model()) == 0
    monkeypatch.delenv(PREPACK_ENV)
    half = make_model().to(torch.bfloat16)
    assert prepack_cpu_linears(half) == 0
    assert all(m.packed is None for m in half)
