"""Faults of the runtime parts on stand-ins: a joining sampler that loaded what a lost learner published is asked
again and joins on the current version; a sampler lost from a pool above its size is not replaced; a learner lost
while the run is finishing fails the run instead of being restored (``LearnerRecovery.save``)."""

import pytest
from ray.exceptions import RayActorError

from cluster.config import load_config
from learner.collective import LearnerGroupBroken


class FakeBook:
    """What the pool and the recovery ask of the books."""

    def __init__(self, epoch: int = 4):
        self.epoch, self.drops = epoch, []
        self.runlog = type("RunLog", (), {"location": "/runs/x"})()

    def drop(self, reason: str, n: int) -> None:
        self.drops.append((reason, n))

    def state(self, epoch: int) -> dict:
        return {"epoch": epoch}


@pytest.fixture
def stubs(ray_local):
    """Stand-in samplers answering their loads with ``answers[index]`` in turn (then with the weights they were
    given), recording every load's weights; the actors are killed after the test."""
    import ray

    @ray.remote(num_cpus=0)
    class StubSampler:
        def __init__(self, index: int, answers: list):
            self.index, self.answers, self.loads = index, list(answers), []

        def set_weights(self, weights: dict) -> dict:
            self.loads.append(weights)
            return {**(self.answers.pop(0) if self.answers else weights), "sampler": self.index}

        def record(self) -> list:
            return self.loads

    made, answers = {}, {}

    def spawn(cfg, index):
        made[index] = StubSampler.remote(index, answers.get(index, []))
        return made[index]

    yield spawn, made, answers
    for actor in made.values():
        ray.kill(actor)


def make_pool(spawn, minimum: int, maximum: int | None = None, book=None):
    import ray

    from cluster.sampler_pool import SamplerPool
    from cluster.weight_sync import Published, WeightSync

    over = [f"runtime.sampler.count={minimum}"] + ([f"runtime.sampler.max_count={maximum}"] if maximum else [])
    published = Published(3, "c3", weights_ref=ray.put({"version": 3, "checksum": "c3"}))
    sync = WeightSync(learner=None, collective=False)
    return SamplerPool(load_config("tiny-cpu", over), book or FakeBook(), published, sync, faults=[], spawn=spawn)


def join_all(pool) -> None:
    import ray

    while pool.members.joining:
        pool.on_joined(ray.wait(list(pool.members.joining), num_returns=1)[0][0])


@pytest.mark.ray_unit
def test_a_joining_sampler_that_loaded_a_lost_version_loads_the_current_one_and_joins(stubs):
    # sampler 0's first load answers version 5 of a lost learner's lineage; it is never trusted, asked to load the
    # published version again, and joins once it proves version 3 (its second load)
    import ray

    spawn, made, answers = stubs
    answers[0] = [{"version": 5, "checksum": "lost5"}]
    pool = make_pool(spawn, minimum=1)
    pool.published.orphaned.add((5, "lost5"))
    pool.add()
    join_all(pool)
    assert pool.members.actors == {0: made[0]} and pool.faults == []
    assert ray.get(made[0].record.remote()) == [{"version": 3, "checksum": "c3"}] * 2  # loaded twice: asked again


@pytest.mark.ray_unit
def test_a_lost_sampler_is_not_replaced_while_the_pool_is_above_its_size(stubs):
    # runtime.sampler.count=1, max_count=3, autoscaled to 2: losing one leaves the pool at its size, nothing is
    # spawned; losing the last one then brings a replacement (index 2: indices are not reused)
    spawn, made, _ = stubs
    book = FakeBook(epoch=4)
    pool = make_pool(spawn, minimum=1, maximum=3, book=book)
    pool.add()
    pool.add()
    join_all(pool)
    pool.lose(1)
    assert sorted(pool.members.actors) == [0] and not pool.members.joining and sorted(made) == [0, 1]
    assert pool.faults == [{"role": "sampler", "lost": 1, "replaced_by": [], "epoch": 4}]
    pool.lose(0)
    assert [i for i, _ in pool.members.joining.values()] == [2] and pool.faults[-1]["replaced_by"] == [2]


class FakeLearners:
    """A learner group whose checkpoint write fails with ``error``; ``died`` says whether that error is its death."""

    def __init__(self, error: Exception, dead: bool = True):
        self.error, self.dead, self.checkpoint = error, dead, "/runs/x/checkpoints/v000004"

    def save(self, location: str, state: dict, config: dict) -> str:
        raise self.error

    def died(self, e) -> bool:
        return self.dead and e is self.error


def recovery(learners):
    from cluster.recovery import LearnerRecovery

    rec = LearnerRecovery(
        load_config("tiny-cpu"), FakeBook(), learners, None, None, None, None, faults=[], drop_update=lambda: None
    )
    rec.restarts = []
    rec.lose_learner = lambda: rec.restarts.append(rec.book.epoch)  # the restart itself: tests/cluster/test_runtime.py
    return rec


@pytest.mark.parametrize("error", [RayActorError(actor_id="aa" * 16), LearnerGroupBroken("rank 1 is gone")])
def test_a_learner_lost_writing_a_checkpoint_is_restored_mid_run_but_fails_a_finishing_run(error):
    # mid-run: the group is restored from the previous checkpoint (lose_learner) and save answers where it is
    rec = recovery(FakeLearners(error))
    assert rec.save(4) == "/runs/x/checkpoints/v000004" and rec.restarts == [4]
    # finishing (a graceful stop's or an early stop's checkpoint): the loss fails the run, nothing is restored
    rec = recovery(FakeLearners(error))
    rec.finishing = True
    with pytest.raises(type(error)) as raised:
        rec.save(4)
    assert raised.value is error and rec.restarts == []
    # an error that is not the group's death (an input lost, say) is raised mid-run too
    rec = recovery(FakeLearners(error, dead=False))
    with pytest.raises(type(error)):
        rec.save(4)
    assert rec.restarts == []
