"""Which prompt and seed each pair gets (PairSchedule, pair_seed), and prompt files (load_prompts)."""

import hashlib
import re

import numpy as np
import pytest

from cluster.prompts import TINY, load_prompts
from cluster.schedule import PairSchedule, pair_seed

PROMPTS = [f"prompt {i}" for i in range(7)]


# -- PairSchedule ---------------------------------------------------------------------------------------------
def test_every_prompt_exactly_once_per_pass_in_a_fresh_order():
    sched = PairSchedule(PROMPTS, seed=3)
    ids = []
    for n in (3, 5, 6, 4, 2, 1, 14):  # 35 pairs = 5 passes, chunks across pass edges
        ids += sched.take(n)["prompt_ids"]
    passes = [ids[k : k + 7] for k in range(0, 35, 7)]
    for order in passes:
        assert sorted(order) == list(range(7))  # a permutation: none twice, none left out
    assert len({tuple(o) for o in passes}) == 5  # a fresh order each pass (7! = 5040 orders)
    assert passes[0] != list(range(7))  # shuffled, not the file's order


def test_pair_ids_count_up_and_prompts_match_their_ids():
    sched = PairSchedule(PROMPTS, seed=3, start_pair_id=42)
    a, b = sched.take(4), sched.take(3)
    assert a["pair_ids"] == [42, 43, 44, 45] and b["pair_ids"] == [46, 47, 48] and sched.next_pair_id == 49
    for t in (a, b):
        assert t["prompts"] == [PROMPTS[i] for i in t["prompt_ids"]]
        assert t["seeds"] == [pair_seed(3, p, i) for p, i in zip(t["prompts"], t["pair_ids"])]
    # pairs 42..48 are pass 6 (pair id // 7) in full: each prompt once
    assert sorted(a["prompt_ids"] + b["prompt_ids"]) == list(range(7))


def test_the_schedule_is_a_function_of_the_pair_id_alone():
    # chunking and resuming do not change which prompt and seed a pair id gets
    whole = PairSchedule(PROMPTS, seed=5).take(20)
    parts = PairSchedule(PROMPTS, seed=5)
    chunks = [parts.take(n) for n in (1, 6, 13)]
    resumed = PairSchedule(PROMPTS, seed=5, start_pair_id=9).take(11)
    for key in ("prompts", "prompt_ids", "pair_ids", "seeds"):
        assert [x for c in chunks for x in c[key]] == whole[key]
        assert resumed[key] == whole[key][9:]


def test_another_run_seed_gives_other_orders_and_seeds():
    a, b = PairSchedule(PROMPTS, seed=1).take(14), PairSchedule(PROMPTS, seed=2).take(14)
    assert a["prompt_ids"] != b["prompt_ids"]
    assert not set(a["seeds"]) & set(b["seeds"])


def test_one_prompt_is_repeated_with_distinct_seeds():
    t = PairSchedule(["only"], seed=0).take(5)
    assert t["prompt_ids"] == [0] * 5 and len(set(t["seeds"])) == 5


def test_no_prompts_is_an_error():
    with pytest.raises(ValueError, match="^no prompts to sample from$"):
        PairSchedule([], seed=0)


def test_pair_seed_is_stable_and_in_63_bits():
    # pinned values: a resumed run, or the same config next year, must draw the same noise for the same pair
    assert pair_seed(0, "a red circle", 0) == 3138131953238343484
    assert pair_seed(7, "a black cat", 12) == 6479198726630210292
    # the definition: blake2b-64 of "seed NUL index NUL prompt", little-endian, top bit cleared
    digest = hashlib.blake2b(b"7\x0012\x00a black cat", digest_size=8).digest()
    assert pair_seed(7, "a black cat", 12) == int.from_bytes(digest, "little") >> 1
    seeds = {pair_seed(s, p, i) for s in (0, 1) for p in TINY for i in range(50)}
    assert len(seeds) == 2 * len(TINY) * 50  # every (seed, prompt, index) its own seed
    assert all(0 <= s < 2**63 for s in seeds)  # fits torch.Generator.manual_seed and int64 columns


# -- load_prompts ---------------------------------------------------------------------------------------------
def write(tmp_path, data: bytes, name="prompts.txt") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_builtin_lists():
    assert load_prompts("builtin:tiny") == list(TINY) and len(TINY) == 8


def test_blank_lines_and_surrounding_space_are_skipped(tmp_path):
    src = write(tmp_path, b"a red circle\n\n   \n  a blue square  \r\n\t\na black cat")
    assert load_prompts(src) == ["a red circle", "a blue square", "a black cat"]


def test_utf8_text_and_a_byte_order_mark(tmp_path):
    src = write(tmp_path, "\ufeffcaf\u00e9 au lait\nein gr\u00fcner Apfel\n".encode())
    assert load_prompts(src) == ["caf\u00e9 au lait", "ein gr\u00fcner Apfel"]  # no BOM glued to the first


@pytest.mark.parametrize("data", [b"", b"\n\n", b"  \n\t\n \r\n"], ids=["empty", "newlines", "whitespace"])
def test_a_file_without_prompts_is_a_clear_error(tmp_path, data):
    src = write(tmp_path, data)
    with pytest.raises(ValueError, match="^" + re.escape(f"prompt file {src} has no prompts (one per line)") + "$"):
        load_prompts(src)


def test_non_utf8_bytes_are_a_clear_error_naming_the_file_and_the_fix(tmp_path):
    src = write(tmp_path, "a red circle\na blue square\ncaf\u00e9\n".encode("latin-1"))  # é = 0xe9 on line 3
    msg = f"prompt file {src} is not UTF-8 text (byte 0xe9 on line 3); save it as UTF-8"
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        load_prompts(src)


def test_a_missing_file_names_the_accepted_sources(tmp_path):
    src = str(tmp_path / "nope.txt")
    with pytest.raises(
        FileNotFoundError,
        match=re.escape(f"prompts.source {src!r} is neither builtin:tiny, builtin:shapes-train|heldout nor a file"),
    ):
        load_prompts(src)
    with pytest.raises(FileNotFoundError, match="neither builtin:tiny"):
        load_prompts(str(tmp_path))  # a folder is not a prompt file


def test_a_huge_file_loads_and_schedules(tmp_path, monkeypatch):
    n = 200_000
    src = write(tmp_path, "".join(f"prompt number {i}\n" for i in range(n)).encode())
    prompts = load_prompts(src)
    assert len(prompts) == n and prompts[0] == "prompt number 0" and prompts[-1] == f"prompt number {n - 1}"
    # one shuffle of the 200k prompts per pass, not one per pair (that cost ~2.7 ms a pair, 1.2 s an epoch)
    shuffles, rng = [], np.random.default_rng
    monkeypatch.setattr(np.random, "default_rng", lambda *a: shuffles.append(a) or rng(*a))
    sched = PairSchedule(prompts, seed=0, start_pair_id=n - 500)
    t = sched.take(1000)  # the last 500 of pass 0, the first 500 of pass 1
    assert shuffles == [([0, 0],), ([0, 1],)]
    assert len(set(t["prompt_ids"][:500])) == len(set(t["prompt_ids"][500:])) == 500
    assert all(prompts[i] == p for i, p in zip(t["prompt_ids"], t["prompts"]))
    assert t["prompt_ids"][:500] == PairSchedule(prompts, seed=0).take(n)["prompt_ids"][-500:]
