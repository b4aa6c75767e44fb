"""State dicts and comparisons shared by the transport tests (run inside spawned ranks)."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch

# Every dtype the transport moves as bytes, the exotic ones included.
DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
    torch.bool,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.complex32,
    torch.complex64,
    torch.complex128,
]


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Arbitrary bit patterns of ``dtype`` (NaNs included), reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    n = math.prod(shape) * dtype.itemsize
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)


def dtype_state() -> dict[str, Any]:
    state: dict[str, Any] = {}
    for i, dtype in enumerate(DTYPES):
        name = str(dtype).removeprefix("torch.")
        state[name] = random_tensor((5, 7), dtype, i)
        state[name + "_scalar"] = random_tensor((), dtype, 100 + i)
        state[name + "_empty"] = random_tensor((0, 3), dtype, 200 + i)
    return state


def view_state() -> dict[str, torch.Tensor]:
    base = torch.arange(1000, dtype=torch.float32).reshape(10, 100)
    return {
        "rows": base[2:5],
        "cols": base[:, 3:7],
        "transposed": base.t(),
        "element": base[3, 5],
        "strided": base[::2, ::3],
        "flat_slice": base.view(-1)[17:29],
    }


def leaf_state() -> dict[Any, Any]:
    return {
        "none": None,
        "bools": [True, False],
        "ints": (0, -5, 2**80, 7),
        "floats": [1.5, math.inf, -math.inf, math.nan, -0.0, 1e-310],
        "strs": ["", "ünïcode ✓", "a" * 1000],
        "bytes": [b"", b"\x00\xff" * 50],
        "dtypes": [torch.float8_e4m3fn, torch.int64, torch.bool],
        "device": torch.device("cpu"),
        "size": torch.Size([2, 3]),
        "nested": {"a": [{"b": (1, [2, {"c": None}])}], 3: {4: "int keys"}},
        "ordered": OrderedDict([("z", 1), ("a", torch.ones(2))]),
        0: "int key at top",
        "empty": {"d": {}, "l": [], "t": ()},
    }


def optimizer_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optim": opt.state_dict(), "step": 1}


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Equal values, dtypes, shapes, container types and keys (floats and tensors bitwise)."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype, f"{path}: {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{path}: {a.shape} != {b.shape}"
        assert a.requires_grad == b.requires_grad, f"{path}: requires_grad differs"
        assert tensor_bytes(a) == tensor_bytes(b), f"{path}: values differ"
    elif isinstance(a, float):
        assert a.hex() == b.hex() or (math.isnan(a) and math.isnan(b)), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return bytes(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""
