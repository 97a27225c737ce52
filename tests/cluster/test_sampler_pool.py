"""The sampler pool on stand-in sampler actors: joining on a proven load, calls queued and finished, a lost sampler's
calls dropped and its replacement, a failed call's accounting, autoscale's growth and release."""

import pytest

from cluster.config import load_config

pytestmark = pytest.mark.ray_unit  # stand-in actors on the session's Ray instance: the fast tier


class FakeBook:
    """What the pool asks of the books: the epoch (for fault records) and drops by reason."""

    def __init__(self, epoch: int = 5):
        self.epoch, self.drops = epoch, []

    def drop(self, reason: str, n: int) -> None:
        self.drops.append((reason, n))


@pytest.fixture
def stubs(ray_local):
    """A factory of stand-in sampler actors (``spawn``) answering loads with the proof of the weights they were given
    (or of a fixed version), and the actors it made (killed after the test)."""
    import ray

    @ray.remote(num_cpus=0)
    class StubSampler:
        def __init__(self, index: int, proof: dict | None):
            self.index, self.proof, self.forgotten = index, proof, []

        def set_weights(self, weights: dict) -> dict:
            return {**(self.proof or weights), "sampler": self.index}

        def forget(self, job) -> None:
            self.forgotten.append(job)

        def record(self) -> list:
            return self.forgotten

        def ping(self) -> str:
            return "ok"

    made, proofs = {}, {}

    def spawn(cfg, index):
        made[index] = StubSampler.remote(index, proofs.get(index))
        return made[index]

    yield spawn, made, proofs
    for actor in made.values():
        ray.kill(actor)


def make_pool(spawn, minimum=2, maximum=None, book=None):
    import ray

    from cluster.sampler_pool import SamplerPool
    from cluster.weight_sync import Published, WeightSync

    over = [f"runtime.sampler.count={minimum}"] + ([f"runtime.sampler.max_count={maximum}"] if maximum else [])
    published = Published(3, "c3", weights_ref=ray.put({"version": 3, "checksum": "c3"}))
    sync = WeightSync(learner=None, collective=False)
    sync.members_changed = False
    return SamplerPool(load_config("tiny-cpu", over), book or FakeBook(), published, sync, faults=[], spawn=spawn)


def join_all(pool, add: int = 0):
    """Add ``add`` samplers, then wait until every joining one has joined (or been dealt with)."""
    import ray

    for _ in range(add):
        pool.add()
    while pool.members.joining:
        pool.on_joined(ray.wait(list(pool.members.joining), num_returns=1)[0][0])


def test_samplers_join_once_their_first_load_is_proven(stubs):
    import ray

    spawn, made, proofs = stubs
    proofs[1] = {"version": 2, "checksum": "orphan"}  # sampler 1 loaded what a lost learner published
    pool = make_pool(spawn)
    pool.published.orphaned.add((2, "orphan"))
    for _ in range(2):
        pool.add()
    assert pool.size() == 2 and not pool.members.actors and len(pool.pending()) == 2
    ref0 = next(r for r, (i, _) in pool.members.joining.items() if i == 0)
    pool.on_joined(ref0)
    assert pool.members.actors == {0: made[0]} and pool.members.busy == {0: 0} and pool.sync.members_changed
    # the orphaned load is asked again (the stand-in repeats it: it stays joining, never trusted)
    ref1 = next(iter(pool.members.joining))
    ray.wait([ref1])
    pool.on_joined(ref1)
    assert list(pool.members.joining.values())[0][0] == 1 and 1 not in pool.members.actors
    assert pool.published.sampled == {}  # a join is checked, not counted as a sampler call


def test_a_sampler_that_dies_while_starting_is_replaced(stubs):
    import ray

    spawn, made, _ = stubs
    book = FakeBook(epoch=0)
    pool = make_pool(spawn, minimum=1, book=book)
    pool.add()
    ray.kill(made[0])
    join_all(pool)  # sampler 0's first load fails: sampler 1 takes its place
    assert sorted(pool.members.actors) == [1] and book.drops == []
    assert pool.faults == [{"role": "sampler", "lost": 0, "replaced_by": [1], "epoch": 0}]


def test_a_wrong_first_load_stops_the_run(stubs):
    spawn, made, proofs = stubs
    proofs[0] = {"version": 3, "checksum": "tampered"}
    pool = make_pool(spawn, minimum=1)
    pool.add()
    with pytest.raises(
        RuntimeError,
        match="sampler 0 reports version 3 checksum tampered but the learner broadcast "
        "version 3 checksum c3: weight sync failed",
    ):
        join_all(pool)


def test_calls_are_queued_two_deep_and_finished(stubs):
    from cluster.sampler_pool import Job

    spawn, made, _ = stubs
    pool = make_pool(spawn)
    join_all(pool, add=2)
    # samplers join in the order their first loads answer (either may be first): compare as sets of indices
    assert sorted(i for i, _ in pool.with_room()) == [0, 1]
    for report, sampler, pairs in (("r1", 0, [0, 1]), ("r2", 0, [2]), ("r3", 1, [3, 4, 5])):
        pool.track(Job(sampler, pairs, f"job-{report}", None, None, report))
    assert [i for i, _ in pool.with_room()] == [1] and pool.pairs_in_flight() == 6
    assert pool.finish("r1").pair_ids == [0, 1] and pool.members.busy == {0: 1, 1: 1}
    assert sorted(i for i, _ in pool.with_room()) == [0, 1] and pool.pending()[:2] == ["r2", "r3"]


def test_a_lost_sampler_drops_its_calls_and_is_replaced_up_to_the_minimum(stubs):
    from cluster.sampler_pool import Job

    spawn, made, _ = stubs
    book = FakeBook(epoch=5)
    pool = make_pool(spawn, book=book)
    join_all(pool, add=2)
    pool.sync.members_changed = False
    pool.track(Job(1, [0, 1, 2], "j1", None, None, "r1"))
    pool.track(Job(0, [3], "j0", None, None, "r0"))
    pool.track(Job(1, [4, 5], "j2", None, None, "r2"))
    pool.lose(1)
    assert book.drops == [("actor_lost", 3), ("actor_lost", 2)] and list(pool.jobs) == ["r0"]
    assert pool.faults == [{"role": "sampler", "lost": 1, "replaced_by": [2], "epoch": 5}]
    assert sorted(pool.members.actors) == [0] and [i for i, _ in pool.members.joining.values()] == [2]
    assert pool.sync.members_changed and pool.size() == 2


def test_a_failed_call_is_counted_by_what_failed(stubs):
    import ray
    from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

    from cluster.sampler_pool import Job

    spawn, made, _ = stubs
    book, lost_rewards = FakeBook(), []
    pool = make_pool(spawn, book=book)
    join_all(pool, add=2)
    job = lambda s, n: Job(s, list(range(n)), f"job{s}-{n}", None, None, f"r{s}-{n}")  # noqa: E731
    # a reward actor died serving sampler 0's call: the sampler lives and frees the trajectories
    pool.fail(job(0, 2), RayActorError(actor_id="reward-actor-id"), reward_lost=lost_rewards.append)
    # the reward failed sampler 1's call, then an input of another was lost with its node
    pool.fail(job(1, 3), RayTaskError("score", "traceback", ValueError("bad image")), reward_lost=lost_rewards.append)
    pool.fail(job(1, 1), ObjectLostError("00" * 28, None, ""), reward_lost=lost_rewards.append)
    assert lost_rewards == ["reward-actor-id"] and sorted(pool.members.actors) == [0, 1]
    assert ray.get(made[0].record.remote()) == ["job0-2"] and ray.get(made[1].record.remote()) == ["job1-3", "job1-1"]
    # sampler 1 itself died: it is lost (and replaced), its trajectories are gone with it
    pool.fail(job(1, 4), RayActorError(actor_id=made[1]._actor_id.hex()), reward_lost=lost_rewards.append)
    assert book.drops == [("actor_lost", 2), ("reward_failure", 3), ("actor_lost", 1), ("actor_lost", 4)]
    assert sorted(pool.members.actors) == [0] and [f["lost"] for f in pool.faults] == [1]


def test_autoscale_grows_when_the_learner_waited_and_releases_an_idle_sampler_when_it_did_not(stubs):
    # three samplers above a minimum of one, the learner never waited for data; sampler 2 has a call queued and
    # sampler 1 still owes a report, so only sampler 0 is idle and released
    import ray
    from ray.exceptions import RayActorError

    from cluster.sampler_pool import Job

    spawn, made, _ = stubs
    pool = make_pool(spawn, minimum=1, maximum=3)
    join_all(pool, add=1)
    pool.autoscale(waited_s=2.0, step_s=1.0)  # waited longer than it trained: a second sampler
    pool.autoscale(waited_s=0.5, step_s=1.0)  # waited, but less than a step: no change
    pool.autoscale(waited_s=2.0, step_s=1.0)
    pool.autoscale(waited_s=2.0, step_s=1.0)  # at the ceiling of 3
    join_all(pool)
    assert sorted(pool.members.actors) == [0, 1, 2]
    pool.track(Job(2, [7], "j", None, None, "r2"))
    pool.jobs["r1"] = Job(1, [8], "j", None, None, "r1")  # finished but not yet read: still queued on sampler 1
    pool.sync.members_changed = False
    pool.autoscale(waited_s=0.0, step_s=1.0)
    assert sorted(pool.members.actors) == [1, 2] and sorted(pool.members.busy) == [1, 2]
    assert pool.sync.members_changed  # the next broadcast re-forms the weight group
    with pytest.raises(RayActorError):
        ray.get(made[0].ping.remote(), timeout=30)
    pool.autoscale(waited_s=0.0, step_s=1.0)  # nothing idle now: the pool keeps its two samplers
    assert sorted(pool.members.actors) == [1, 2] and ray.get(made[1].ping.remote()) == "ok"
