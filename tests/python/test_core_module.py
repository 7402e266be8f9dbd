"""The binding's surface: the stub covers the module, errors map to typed exceptions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import infercept
from infercept import _core


def test_stub_declares_every_public_name() -> None:
    stub = Path(infercept.__file__).with_name("_core.pyi")
    assert stub.is_file(), "the wheel must ship infercept/_core.pyi"
    tree = ast.parse(stub.read_text())
    declared = {node.name for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
    public = {name for name in dir(_core) if not name.startswith("_") and name != "cuda_compiled"}
    assert public <= declared, f"stub is missing {sorted(public - declared)}; run `make stubs`"


def test_errors_are_typed_and_name_the_limit() -> None:
    pool = _core.BlockPool(_core.Tier.DEVICE, 2)
    block = pool.allocate()
    pool.free(block)
    with pytest.raises(_core.BlockError, match="double free of device block"):
        pool.free(block)
    with pytest.raises(_core.OutOfBlocksError, match="only 2 of 2 are free"):
        pool.allocate_many(3)
    with pytest.raises(ValueError, match="unknown policy 'fifo'"):
        _core.Policy.parse("fifo")
    config = _core.SchedulerConfig()
    config.num_device_blocks = 4
    core = _core.Scheduler(config, _core.CostModel.builtin("gptj-6b-a100"))
    with pytest.raises(_core.InvalidArgumentError, match="needs 7 KV blocks but the device pool holds only 4"):
        core.add_request(100, 0.0)
    with pytest.raises(_core.UnknownRequestError, match="unknown request id 99"):
        core.resume(99, 1, 0.0)


def test_cuda_report_is_consistent() -> None:
    # Without a device the smoke test reports False instead of crashing.
    if _core.cuda_device_count() == 0:
        assert _core.cuda_smoke_test(7) is False
    else:
        assert _core.cuda_smoke_test(7) is True
