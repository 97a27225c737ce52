"""Hybrid workers (``runtime.placement: hybrid``): one actor per GPU holding one copy of the transformer that both
samples (the Sampler's contract: ``sample`` -> images to the reward pool -> ``complete``) and trains as a rank of the
learner group (the Learner's contract: ``begin_epoch``, ``update``, ``save``, ``load``; gradients all-reduced across
the workers, weights replicated).

Usage::

    worker = HybridWorker(model, cfg.sampling, cfg.train, Batching.of(cfg), cfg.lora)   # plain class, no Ray
    job, images = worker.sample(prompts=..., prompt_ids=..., pair_ids=..., seeds=...)  # with its own weights
    batch, report = worker.complete(job=job, rewards=scores)
    worker.begin_epoch(batch); worker.update()        # the model steps in place; the next sample uses the new version

    learners = LearnerGroup(cfg, form=form_workers)    # the Ray runtime: the group's ranks are the workers, and the
    pool.adopt(workers_of(learners))                   # sampler pool's members are the same actors

Nothing is broadcast inside a worker: after an update it samples with the weights its own learner stepped, and the
version and checksum it reports with each call are of its own tensors (the runtime checks them against what rank 0
published, so a replica that drifted from the group stops the run). The rewards stay on their own pool.
"""

from __future__ import annotations

from functools import partial

import pyarrow as pa
import ray
import torch

from actors.sampler import Sampler
from cluster.build import build_model
from cluster.config import Batching, RunConfig, grpo_of
from cluster.learner_group import form_group
from cluster.resources import actor_threads
from cluster.runtime_config import actor_options
from learner.learner import Learner


class HybridWorker:
    """A ``Sampler`` and a ``Learner`` rank on one model: the learner marks what trains (LoRA or full weights) and
    steps it; the sampler samples with the same tensors. The transformer is in eval mode while sampling and in train
    mode while training, as each role's own copy would be. Both share one prompt cache (each prompt is encoded on
    its own, so the embedding is the same bits whichever role encodes it first)."""

    def __init__(
        self,
        model,
        sampling,
        train,
        batching: Batching,
        lora=None,
        index: int = 0,
        seed: int = 0,
        threads: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        grpo=None,
    ):
        """model: a FlowModel or a zero-argument callable that builds one (with the sampler's components: the VAE
        decodes the worker's images); index: its place in the sampler pool; rank / world_size: its place in the
        learner group; the rest as for ``Sampler`` and ``Learner`` (``train.precision`` is the sampler's too)."""
        if threads:
            torch.set_num_threads(threads)
        if not hasattr(model, "velocity"):
            model = model()
        self.model = model
        self.learner = Learner(
            model, train, batching, lora, seed=seed, rank=rank, world_size=world_size, grpo=grpo, sharding="replicate"
        )
        self.sampler = Sampler(
            model, sampling, lora, index=index, precision=train.precision, grpo=grpo, mark_trainable=False
        )
        self.sampler.prompts = self.learner.prompts
        self._holds()

    def _holds(self) -> dict:
        """The sampler side records what the learner side holds now (version and checksum of this process's tensors)."""
        return self.sampler.holds(*self.learner.weights_info())

    def _mode(self, training: bool) -> None:
        self.model.transformer.train(training)

    # -- the sampler's contract ----------------------------------------------------------------------------------
    def sample(self, prompts: list[str], prompt_ids: list[int], pair_ids: list[int], seeds: list[int], newest=None):
        """``Sampler.sample`` with the worker's own weights (``newest`` is None: nothing is ever published to it)."""
        if newest is not None:
            raise ValueError("a hybrid worker samples with its own weights: nothing is published to it (newest=None)")
        self._mode(training=False)
        return self.sampler.sample(prompts=prompts, prompt_ids=prompt_ids, pair_ids=pair_ids, seeds=seeds)

    def complete(self, job: int, rewards) -> tuple[pa.RecordBatch | None, dict]:
        return self.sampler.complete(job=job, rewards=rewards)

    def forget(self, job: int) -> list[int]:
        return self.sampler.forget(job=job)

    def generate(self, prompts: list[str], seeds: list[int], num_steps: int, newest=None):
        """Held-out images with the worker's own weights."""
        self._mode(training=False)
        return self.sampler.generate(prompts=prompts, seeds=seeds, num_steps=num_steps)

    def proof(self) -> dict:
        """{version, checksum, sampler} of the weights it samples with (checked against what the group published)."""
        return self._holds()

    def status(self) -> dict:
        return self.sampler.status()

    # -- the learner rank's contract -----------------------------------------------------------------------------
    def begin_epoch(self, *batches: pa.RecordBatch) -> dict:
        self._mode(training=True)
        return self.learner.begin_epoch(*batches)

    def update(self, publish: bool = False) -> tuple[dict, None]:
        """The epoch's next optimizer step, in place: the sampler side samples with it from the next call. Nothing is
        published (``publish`` must be False: no copy of the weights leaves the worker)."""
        if publish:
            raise ValueError("a hybrid worker publishes nothing: its sampler holds the stepped weights (publish=False)")
        self._mode(training=True)
        out, _ = self.learner.update(publish=False)
        self.sampler.holds(out["learner/version"], out["checksum"])
        return out, None

    def save(self, run_dir: str, state: dict, config: dict) -> str | None:
        return self.learner.save(run_dir, state, config)

    def load(self, folder: str) -> dict:
        state = self.learner.load(folder)
        self._holds()
        return state

    def weights_info(self) -> tuple[int, str]:
        return self.learner.weights_info()

    def trainable_bytes(self) -> int:
        return self.learner.trainable_bytes()

    def torch_threads(self) -> int:
        return torch.get_num_threads()

    def weight_backend(self) -> str:
        return self.learner.weight_backend()

    def node_id(self) -> str | None:
        return self.learner.node_id()

    def learner_group_address(self, peers_on_this_node: bool) -> tuple[str, int]:
        return self.learner.learner_group_address(peers_on_this_node)

    def join_learner_group(self, master_addr: str, master_port: int, backend: str, timeout_s: float = 120.0) -> int:
        return self.learner.join_learner_group(master_addr, master_port, backend, timeout_s)

    def gpu_ids(self) -> list:
        """The GPUs Ray gave this worker (its ``runtime.learner`` GPUs); [] outside Ray or without GPUs."""
        return [str(i) for i in ray.get_gpu_ids()] if ray.is_initialized() else []


def worker_index(index: int, rank: int, world_size: int) -> int:
    """A worker's index in the sampler pool: group ``index``'s ranks follow the lost groups' (never reused)."""
    return index * world_size + rank


def worker_actor(cfg: RunConfig, index: int = 0, rank: int = 0):
    """Hybrid worker ``fdfo/worker/<pool index>`` with the learner role's resources (one GPU each on a GPU cluster);
    ``complete`` runs in its own concurrency group ("pack"), as a sampler's does. Workers spread over the nodes."""
    role, world = cfg.runtime.learner, cfg.runtime.learner.count
    pool_index = worker_index(index, rank, world)
    return (
        ray.remote(concurrency_groups={"pack": 1})(HybridWorker)
        .options(
            name=f"fdfo/worker/{pool_index}",
            scheduling_strategy="SPREAD",
            **actor_options(role),
        )
        .remote(
            model=partial(build_model, cfg.model),
            sampling=cfg.sampling,
            train=cfg.train,
            batching=Batching.of(cfg),
            lora=cfg.lora,
            index=pool_index,
            seed=cfg.seed,
            threads=actor_threads(cfg.runtime, role.num_cpus),
            rank=rank,
            world_size=world,
            grpo=grpo_of(cfg),
        )
    )


def form_workers(cfg: RunConfig, index: int = 0) -> list:
    """The learner group of hybrid workers (``LearnerGroup``'s ``form``): ``runtime.learner.count`` workers joined
    into one gradient group when there are several."""
    return form_group(cfg, index, actor=worker_actor)


def workers_of(group) -> dict[int, object]:
    """The sampler pool's members for a ``LearnerGroup`` of hybrid workers: pool index -> worker."""
    return {worker_index(group.index, r, len(group.ranks)): w for r, w in enumerate(group.ranks)}
