"""The routing keys and the affinity table of infercept.deploy (plain Python, no Ray)."""

from __future__ import annotations

import pytest

from infercept.deploy.affinity import (AffinityTable, call_key, prefix_hashes, reply_keys,
                                       request_keys, response_key, session_key)


def test_a_follow_up_names_its_session_calls_and_previous_response():
    chat = {"session_id": "s1", "cache_salt": "t", "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [{"id": "call_a"}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "1"},
        {"role": "tool", "tool_call_id": "call_b", "content": "2"}]}
    assert request_keys("POST", "/v1/chat/completions", chat) == [
        session_key("s1", "t"), call_key("call_b"), call_key("call_a")]
    responses = {"previous_response_id": "resp_1", "input": [
        {"type": "function_call_output", "call_id": "call_c", "output": "3"}]}
    assert request_keys("POST", "/v1/responses", responses) == [
        response_key("resp_1"), call_key("call_c")]
    assert request_keys("GET", "/v1/responses/resp_9", None) == [response_key("resp_9")]
    assert request_keys("POST", "/v1/responses", {"input": "hi"}) == []
    assert request_keys("POST", "/v1/chat/completions", None) == []  # malformed: no keys
    assert session_key("s1", None) != session_key("s1", "t")  # tenants apart


def test_a_reply_hands_out_its_call_ids_response_id_and_session():
    chat_reply = {"choices": [{"message": {"tool_calls": [{"id": "call_x"}]}}]}
    assert reply_keys("/v1/chat/completions", {"session_id": "s"}, [chat_reply]) == [
        call_key("call_x"), session_key("s", None)]
    streamed = [{"choices": [{"delta": {"tool_calls": [{"id": "call_y", "index": 0}]}}]}]
    assert reply_keys("/v1/chat/completions", {}, streamed) == [call_key("call_y")]
    plain = {"choices": [{"message": {"content": "done"}}]}
    assert reply_keys("/v1/chat/completions", {"session_id": "s"}, [plain]) == []
    response = {"object": "response", "id": "resp_2", "status": "completed", "output": [
        {"type": "message"}, {"type": "function_call", "call_id": "call_z"}]}
    assert reply_keys("/v1/responses", {}, [response]) == [
        response_key("resp_2"), call_key("call_z")]
    events = [{"type": "response.created", "response": {**response, "status": "in_progress"}},
              {"type": "response.completed", "response": response}]
    assert reply_keys("/v1/responses", {}, events) == [response_key("resp_2"),
                                                        call_key("call_z")]


def test_prefix_hashes_chain_over_messages_and_prompt_pieces():
    a = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}
    b = {"messages": [*a["messages"], {"role": "assistant", "content": "x"}]}
    ha, hb = prefix_hashes(a, "/v1/chat/completions"), prefix_hashes(b, "/v1/chat/completions")
    assert len(ha) == 2 and hb[:2] == ha and len(hb) == 3
    salted = prefix_hashes({**a, "cache_salt": "t"}, "/v1/chat/completions")
    assert not set(salted) & set(ha)
    prompt = prefix_hashes({"prompt": "x" * 300}, "/v1/completions")
    assert len(prompt) == 3
    assert prefix_hashes({"prompt": "x" * 300 + "y"}, "/v1/completions")[:2] == prompt[:2]
    assert prefix_hashes({"input": "hi"}, "/v1/responses") != []
    assert prefix_hashes({"messages": "bad"}, "/v1/chat/completions") == []


def test_the_table_maps_keys_to_live_replicas_and_drops_the_dead():
    table = AffinityTable(max_keys=3)
    table.retain(["r1", "r2"])
    table.learn("r1", ["call:a", "response:b"])
    table.learn("r2", ["call:c"])
    assert table.owner(["call:x", "call:c", "call:a"]) == "r2"  # the first known key
    table.learn_prefixes("r1", ["h1", "h2"])
    table.learn_prefixes("r2", ["h1"])  # r2 served the shorter prefix since
    assert table.prefix_owner(["h1", "h2", "h3"]) == ("r1", 2)
    assert table.prefix_owner(["h1"]) == ("r2", 1)
    table.forget("r1")
    assert table.owner(["call:a"]) is None and table.is_lost(["call:a"])
    assert table.prefix_owner(["h1", "h2"]) == ("r2", 1)
    assert table.num_dropped_keys == 2 and table.live == {"r2"}
    table.learn("r2", ["call:a"])  # learned again: no longer lost
    assert not table.is_lost(["call:a"])
    table.learn("r2", ["k1", "k2", "k3"])
    assert len(table) == 3 and table.owner(["call:c"]) is None  # LRU bound
    with pytest.raises(ValueError, match="max_keys=0"):
        AffinityTable(max_keys=0)


def test_without_ray_the_error_names_the_extra(monkeypatch, capsys):
    import sys

    from infercept.cli import build_parser, main
    from infercept.deploy import require_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails, as if not installed
    with pytest.raises(ImportError, match=r"infercept\[distributed\]"):
        require_ray()
    args = build_parser().parse_args(["serve", "--replicas", "2", "--num-cpus-per-replica",
                                      "0.5"])
    assert args.replicas == 2 and args.num_cpus_per_replica == 0.5
    assert build_parser().parse_args(["serve"]).replicas is None  # one server, no Ray
    assert main(["serve", "--replicas", "2"]) == 2
    assert "infercept[distributed]" in capsys.readouterr().err
    assert main(["serve", "--replicas", "0"]) == 2
    assert "--replicas 0: must be >= 1" in capsys.readouterr().err
