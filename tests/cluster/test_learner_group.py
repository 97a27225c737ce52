"""The learner group on stand-in ranks: every call goes to each rank, rank 0 answers for the group, a dead rank is
noticed, checkpoints are written by rank 0 (every rank when sharded) and a restart forms the next group on the last
checkpoint."""

import pytest

from cluster.config import load_config

pytestmark = pytest.mark.ray_unit  # stand-in actors on the session's Ray instance: the fast tier


@pytest.fixture
def group(ray_local):
    """A LearnerGroup of two stand-in ranks (``form`` builds group ``index``), the groups formed, the actors killed."""
    import ray

    from cluster.learner_group import LearnerGroup

    @ray.remote(num_cpus=0)
    class StubRank:
        def __init__(self, index: int, rank: int):
            self.index, self.rank, self.saves = index, rank, []

        def begin_epoch(self, *batches) -> dict:
            return {"rank": self.rank, "batches": list(batches)}

        @ray.method(num_returns=2)
        def update(self, publish: bool):
            return {"rank": self.rank}, (f"weights of group {self.index}" if publish else None)

        def save(self, location: str, state: dict, config: dict) -> str:
            self.saves.append(state["epoch"])
            return f"{location}/checkpoints/v{state['epoch']:06d}"

        def load(self, folder: str) -> dict:
            return {"epoch": 2, "ledger": {"pairs_trained": 16}, "loaded_by": [self.index, self.rank], "folder": folder}

        def record(self) -> list:
            return self.saves

        def ping(self) -> str:
            return "ok"

    formed = []

    def form(cfg, index):
        formed.append([StubRank.remote(index, r) for r in range(cfg.runtime.learner.count)])
        return formed[-1]

    learners = LearnerGroup(
        load_config("tiny-cpu", ["runtime.learner.count=2", "runtime.learner.sharding=replicate"]), form=form
    )
    yield learners, formed
    for ranks in formed:
        for rank in ranks:
            ray.kill(rank)


def test_every_call_goes_to_each_rank_and_rank_0_answers(group):
    import ray

    learners, formed = group
    assert learners.lead is formed[0][0] and learners.index == 0
    batches = [ray.put("batch-a"), ray.put("batch-b")]
    lead = learners.begin_epoch(batches)
    assert ray.get(lead) == {"rank": 0, "batches": ["batch-a", "batch-b"]}  # refs resolved on the rank
    (other,) = learners.rank_refs
    assert learners.owns(other) and not learners.owns(lead)
    assert learners.on_rank(other) and learners.rank_refs == []
    info, weights = learners.update(publish=True)
    assert ray.get(info) == {"rank": 0} and ray.get(weights) == "weights of group 0"
    assert len(learners.rank_refs) == 1 and learners.on_rank(learners.rank_refs[0])


def test_a_dead_rank_is_noticed(group):
    import ray
    from ray.exceptions import RayActorError

    from learner.collective import LearnerGroupBroken

    learners, formed = group
    assert learners.died(LearnerGroupBroken("a peer's collective failed"))
    assert learners.died(RayActorError(actor_id=formed[0][1]._actor_id.hex()))
    assert not learners.died(RayActorError(actor_id="a sampler's id")) and not learners.died(ValueError("bad batch"))
    learners.begin_epoch([])
    ray.kill(formed[0][1])
    ray.wait(learners.rank_refs)
    assert learners.on_rank(learners.rank_refs[0]) is False


def test_checkpoints_and_a_restart_on_the_last_one(group):
    import ray
    from ray.exceptions import RayActorError

    learners, formed = group
    # a restart before any checkpoint: group 1 from the starting weights, nothing trained
    assert learners.restart() == {"epoch": 0, "ledger": {"pairs_trained": 0}}
    assert learners.index == 1 and learners.ranks == formed[1] and learners.checkpoint is None
    with pytest.raises(RayActorError):
        ray.get(formed[0][0].ping.remote(), timeout=30)
    # replicated ranks: rank 0 alone writes
    folder = learners.save("/runs/a", {"epoch": 2}, config={})
    assert folder == learners.checkpoint == "/runs/a/checkpoints/v000002"
    assert [ray.get(r.record.remote()) for r in formed[1]] == [[2], []]
    learners.begin_epoch([])
    state = learners.restart()  # group 2 restores the checkpoint on every rank
    assert learners.index == 2 and learners.rank_refs == []
    assert state == {"epoch": 2, "ledger": {"pairs_trained": 16}, "loaded_by": [2, 0], "folder": folder}
    assert learners.checkpoint == folder


def test_a_sharded_group_saves_on_every_rank(ray_local):
    # sharded (fsdp: full fine-tuning over two ranks), every rank takes part in gathering what rank 0 writes
    import ray

    from cluster.learner_group import LearnerGroup

    @ray.remote(num_cpus=0)
    class Rank:
        def __init__(self):
            self.saves = 0

        def save(self, location, state, config):
            self.saves += 1
            return f"{location}/v{state['epoch']}"

        def record(self) -> int:
            return self.saves

    ranks = [Rank.remote(), Rank.remote()]
    cfg = load_config("tiny-cpu", ["runtime.learner.count=2", "lora.enabled=false", "runtime.learner.sharding=auto"])
    try:
        learners = LearnerGroup(cfg, form=lambda cfg, index: ranks)
        assert learners.save("/runs/b", {"epoch": 3}, {}) == "/runs/b/v3"
        assert ray.get([r.record.remote() for r in ranks]) == [1, 1]
    finally:
        for r in ranks:
            ray.kill(r)
