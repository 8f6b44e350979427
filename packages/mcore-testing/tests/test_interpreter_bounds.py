"""The interpreter's bounds check catches what a GPU would fault on, and nothing a correct kernel does.

Kernels with a deliberate off-by-one (mask ``i <= n`` where ``i < n`` is right), reads before a tensor, an
unmasked tail and an out-of-range atomic run in a child under ``TRITON_INTERPRET=1`` with the check installed
(``interpreted_lines``); each must raise ``OutOfBounds`` naming the kernel, while the correct kernels, a view
into a larger storage and a kernel reaching a tensor through an address table (inside ``allowed``) pass and
compute the right values. Skipped where Triton is not installed.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import pytest
import torch

from mcore_testing.interpreted import interpreted_records

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _outcome(name: str, launch: Any) -> dict[str, Any]:
    """Run ``launch``; its record: ``ok`` with its result, or the exception's type and message."""
    from mcore_testing.interpreter_bounds import OutOfBounds

    try:
        result = launch()
    except Exception as err:  # the interpreter wraps what a launch raises: look through the chain
        seen: BaseException | None = err
        while seen is not None and not isinstance(seen, OutOfBounds):
            seen = seen.__cause__ or seen.__context__
        message = str(seen if seen is not None else err)
        return {"name": name, "ok": False, "out_of_bounds": seen is not None, "message": message}
    return {"name": name, "ok": True, "result": result}


def interpreted_main() -> None:
    """(Child process, ``TRITON_INTERPRET=1``, check installed.) One JSON line per case."""
    import triton
    import triton.language as tl

    from mcore_testing.interpreter_bounds import allowed

    @triton.jit
    def copy_kernel(src, dst, n, shift, OFF_BY_ONE: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = (i <= n) if OFF_BY_ONE else (i < n)
        if MASKED:
            tl.store(dst + i, tl.load(src + i + shift, mask=mask, other=0.0), mask=mask)
        else:
            tl.store(dst + i, tl.load(src + i + shift))

    @triton.jit
    def count_kernel(counts, index, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        where = tl.load(index + i, mask=i < n, other=0)
        tl.atomic_add(counts + where, 1.0, mask=i < n)

    @triton.jit
    def table_kernel(table, out, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        src = tl.load(table).to(tl.pointer_type(tl.float32))  # a tensor that is not an argument
        tl.store(out + i, tl.load(src + i, mask=i < n, other=0.0), mask=i < n)

    def copy(n: int, size: int, *, off_by_one: bool = False, masked: bool = True, shift: int = 0) -> list[float]:
        src, dst = torch.arange(float(size)), torch.zeros(size)
        copy_kernel[(triton.cdiv(n, 16),)](src, dst, n, shift, OFF_BY_ONE=off_by_one, MASKED=masked, BLOCK=16)
        return dst.tolist()

    def view_copy() -> list[float]:
        base = torch.arange(64.0)
        src, dst = base[40:60], torch.zeros(20)  # a view: the whole storage is the argument's
        copy_kernel[(2,)](src, dst, 20, -40, OFF_BY_ONE=False, MASKED=True, BLOCK=16)  # reads base[0:20]
        return dst.tolist()

    def count(index: list[int]) -> list[float]:
        counts = torch.zeros(4)
        count_kernel[(1,)](counts, torch.tensor(index), len(index), BLOCK=8)
        return counts.tolist()

    def through_table(allow: bool) -> list[float]:
        hidden, out = torch.arange(5.0), torch.zeros(5)
        table = torch.tensor([hidden.data_ptr()], dtype=torch.int64)
        if allow:
            with allowed(hidden, None):
                table_kernel[(1,)](table, out, 5, BLOCK=8)
        else:
            table_kernel[(1,)](table, out, 5, BLOCK=8)
        return out.tolist()

    cases = {
        "masked-right": lambda: copy(37, 37),
        "off-by-one": lambda: copy(37, 37, off_by_one=True),
        "unmasked-tail": lambda: copy(37, 37, masked=False),
        "before-start": lambda: copy(8, 8, shift=-1),
        "view-of-larger-storage": view_copy,
        "atomic-in-range": lambda: count([0, 3, 3, 1]),
        "atomic-out-of-range": lambda: count([0, 4]),
        "table-allowed": lambda: through_table(True),
        "table-not-allowed": lambda: through_table(False),
    }
    for name, launch in cases.items():
        print(json.dumps(_outcome(name, launch)), flush=True)


@needs_triton
def test_bounds_check_raises_on_accesses_a_gpu_would_fault_on_and_passes_correct_kernels() -> None:
    records = interpreted_records(__file__)
    assert records["masked-right"] == {"name": "masked-right", "ok": True, "result": [float(i) for i in range(37)]}
    assert records["view-of-larger-storage"]["result"] == [float(i) for i in range(20)]
    assert records["atomic-in-range"]["result"] == [1.0, 1.0, 0.0, 2.0]
    assert records["table-allowed"]["result"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    for name, what in (
        ("off-by-one", "load"),
        ("unmasked-tail", "load"),
        ("before-start", "load"),
        ("atomic-out-of-range", "atomic"),
        ("table-not-allowed", "load"),
    ):
        record = records[name]
        assert not record["ok"] and record["out_of_bounds"], record
        assert f"masked-on {what} addresses lie outside its tensor arguments" in record["message"], record
        assert record["message"].startswith("kernel "), record
    # the last block (i = 32..47) has 6 lanes on, i = 37 reaches one float past the 37 of src
    assert "1 of 6 masked-on load" in records["off-by-one"]["message"]
    assert "byte offset 148 of the nearest, 148 bytes long" in records["off-by-one"]["message"]
    assert "1 of 8 masked-on load" in records["before-start"]["message"]  # i = 0 reads src[-1]
    assert "11 of 16 masked-on load" in records["unmasked-tail"]["message"]  # i = 37..47 of the last block


def test_install_refuses_outside_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    from mcore_testing.interpreter_bounds import install

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 must be set"):
        install()
