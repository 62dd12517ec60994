"""merge_inplace: chains merge at hand-over steps only; a still-live input or a too-small buffer is refused."""

from lmc.targets.inplace import merge_inplace
from lmc.targets.liveness import Interval


def test_chain_merges_and_live_input_is_refused():
    ivs = [Interval("a", 100, 0, 1), Interval("b", 100, 1, 2), Interval("c", 100, 2, 4),
           Interval("d", 100, 3, 5), Interval("e", 200, 4, 6)]
    pairs = {1: [("a", "b")], 2: [("b", "c")], 3: [("c", "d")], 4: [("d", "e")]}
    buffers, owner, merged = merge_inplace(ivs, pairs, alignment=64)
    assert merged == [("a", "b"), ("b", "c")]          # c lives past step 3; e does not fit in d's bytes
    assert owner["a"] == owner["b"] == owner["c"] != owner["d"]
    chain = buffers[owner["a"]]
    assert (chain.first, chain.last, chain.members) == (0, 4, ["a", "b", "c"])


def test_a_buffer_hosts_one_successor():
    ivs = [Interval("a", 64, 0, 1), Interval("b", 64, 1, 2), Interval("c", 64, 1, 2)]
    buffers, owner, merged = merge_inplace(ivs, {1: [("a", "b"), ("a", "c")]}, alignment=64)
    assert merged == [("a", "b")] and owner["c"] != owner["a"]
