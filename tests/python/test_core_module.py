"""The binding's surface: the stub is current and covers the module, errors map to typed
exceptions, the step plan's arrays are views of the plan."""

from __future__ import annotations

import ast
import importlib.util
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


def _gen_stub():
    path = Path(__file__).resolve().parents[2] / "bindings" / "gen_stub.py"
    spec = importlib.util.spec_from_file_location("gen_stub", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_stub_is_generated_from_this_build() -> None:
    """The committed stub equals what pybind11-stubgen makes of the installed module."""
    pytest.importorskip("pybind11_stubgen")
    gen = _gen_stub()
    committed = gen.STUB.read_text()
    assert committed.startswith(gen.HEADER), "the stub must say it is generated; run `make stubs`"
    stale = gen.stale_names(committed, gen.generate())
    assert not stale, f"_core.pyi is stale for {stale}; run `make stubs`"


def test_stub_check_sees_a_changed_signature() -> None:
    gen = _gen_stub()
    committed = "class A:\n    def f(self) -> int: ...\n"
    assert gen.stale_names(committed, committed) == []
    assert gen.stale_names(committed, "class A:\n    def f(self) -> str: ...\n") == ["A"]
    assert gen.stale_names(committed, committed + "def g() -> None: ...\n") == ["g"]


def test_plan_arrays_are_views_of_the_plan() -> None:
    config = _core.SchedulerConfig()
    config.num_device_blocks = 64
    config.block_size = 4
    core = _core.Scheduler(config, _core.CostModel.builtin("gptj-6b-a100"))
    first = core.add_request(list(range(1, 11)), 0.0)
    second = core.add_request([7, 8, 9], 0.0)
    plan = core.schedule(0.0)
    ids = plan.input_ids
    assert ids.tolist() == list(range(1, 11)) + [7, 8, 9]
    assert plan.positions.tolist() == list(range(10)) + [0, 1, 2]
    assert plan.query_start.tolist() == [0, 10, 13]
    assert plan.context_lens.tolist() == [10, 3]
    assert plan.request_ids.tolist() == [first, second]
    assert plan.sampling_request_ids.tolist() == [first, second]
    assert plan.logit_rows.tolist() == [9, 12]
    tables = plan.block_tables
    assert tables.shape == (2, 3)
    assert tables[0].tolist() == core.block_table(first).device_blocks
    assert tables[1].tolist() == core.block_table(second).device_blocks + [0, 0]
    slots = plan.slot_mapping.tolist()
    assert slots[4] == core.block_table(first).device_blocks[1] * 4 + 0
    # No copy: the array's memory is the plan's and keeps the plan alive.
    assert ids.base is not None
    del plan
    assert ids.tolist()[0] == 1


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


def test_waste_ledger_dict_and_fractions() -> None:
    config = _core.SchedulerConfig()
    config.num_device_blocks = 64
    config.block_size = 4
    config.policy = _core.Policy.parse("preserve")
    core = _core.Scheduler(config, _core.CostModel.builtin("gptj-6b-a100"))
    assert core.ledger().fractions() == {"waste_fraction": 0.0, "preserve_waste_fraction": 0.0,
                                         "recompute_waste_fraction": 0.0, "swap_waste_fraction": 0.0}
    request = core.add_request(list(range(1, 10)), 0.0)
    plan = core.schedule(0.0)
    core.update(plan, _core.StepResult(0.1, 0.0, [], [5]), 0.1)
    core.intercept(request, 0.1, 10.0)
    plan = core.schedule(0.1)
    core.update(plan, _core.StepResult(0.0), 2.0)  # held 1.9 s by a paused context
    ledger = core.ledger()
    d, f = ledger.as_dict(), ledger.fractions()
    assert d["capacity_byte_s"] > 0 and d["total_byte_s"] == pytest.approx(
        d["preserved_idle_byte_s"] + d["recompute_byte_s"] + d["swap_stall_byte_s"])
    assert f["waste_fraction"] == pytest.approx(d["total_byte_s"] / d["capacity_byte_s"])
    assert f["waste_fraction"] == pytest.approx(ledger.waste_fraction)
    assert f["preserve_waste_fraction"] > 0


def _decoding_core(policy: str, num_requests: int) -> tuple[_core.Scheduler, list[int]]:
    """A core whose requests have each just sampled (each may be intercepted now)."""
    config = _core.SchedulerConfig()
    config.num_device_blocks = 64
    config.num_host_blocks = 64
    config.block_size = 4
    config.policy = _core.Policy.parse(policy)
    core = _core.Scheduler(config, _core.CostModel.builtin("gptj-6b-a100"))
    ids = [core.add_request(list(range(1 + i, 10 + i)), 0.0) for i in range(num_requests)]
    plan = core.schedule(0.0)
    core.update(plan, _core.StepResult(0.1, 0.0, [], [5] * plan.num_sampling_requests), 0.1)
    return core, ids


@pytest.mark.parametrize("policy", ["preserve", "discard", "swap"])
def test_batched_intercepts_and_resumes_match_one_call_each(policy: str) -> None:
    one, ids = _decoding_core(policy, 3)
    batch, _ = _decoding_core(policy, 3)
    states = [one.intercept(i, 0.1, 1.0 + i, "search").label for i in ids]
    assert batch.intercept_batch(ids, [0.1] * 3, [1.0 + i for i in ids], ["search"] * 3) == states
    for core in (one, batch):
        plan = core.schedule(0.1)
        core.update(plan, _core.StepResult(0.01), 0.5)
    for i in ids:
        one.resume(i, [7, 8], 0.5)
    assert batch.resume_batch(ids, [0.5] * 3, [[7, 8]] * 3, [0] * 3) == ["", "", ""]
    for core in (one, batch):
        core.check_invariants()
    assert [one.request(i).token_ids for i in ids] == [batch.request(i).token_ids for i in ids]
    assert [one.request(i).state for i in ids] == [batch.request(i).state for i in ids]
    assert one.stats().num_waiting == batch.stats().num_waiting == 3


def test_intercept_batch_is_all_or_nothing() -> None:
    core, ids = _decoding_core("preserve", 2)
    with pytest.raises(ValueError, match="intercepted twice"):
        core.intercept_batch([ids[0], ids[0]], [0.1] * 2, [-1.0] * 2, [""] * 2)
    assert core.stats().num_intercepted == 0
    core.intercept(ids[1], 0.1)
    with pytest.raises(_core.StateError, match=f"request {ids[1]} cannot be intercepted"):
        core.intercept_batch(ids, [0.1] * 2, [-1.0] * 2, [""] * 2)
    assert core.stats().num_intercepted == 1 and core.request(ids[0]).state == _core.RequestState.RUNNING
    with pytest.raises(ValueError, match=r"one entry per request id \(2\), got one of 1"):
        core.intercept_batch(ids, [0.1], [-1.0] * 2, [""] * 2)


def test_resume_batch_reports_each_failure_and_resumes_the_rest() -> None:
    core, ids = _decoding_core("preserve", 2)
    core.intercept_batch(ids, [0.1] * 2, [1.0] * 2, [""] * 2)
    errors = core.resume_batch(ids, [0.2] * 2, [[7] * 400, [7]], [0, 0])
    assert "over the device pool of 64 blocks" in errors[0] and errors[1] == ""
    assert core.request(ids[0]).state == _core.RequestState.ABORTED
    assert core.request(ids[1]).state != _core.RequestState.ABORTED and not core.request(ids[1]).tool_pending
