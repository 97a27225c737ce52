"""The sampler: churned pairs (FDFO) or SDE groups (Flow-GRPO) with the current policy weights, held until their
rewards arrive.

Usage (plain class; the Ray runtime wraps it with ``ray.remote``)::

    sampler = Sampler(model, cfg.sampling, cfg.lora)
    job, images = sampler.sample(prompts=[...], prompt_ids=[...], pair_ids=[...], seeds=[...])   # Ray: newest=...
    ...score images [2P, H, W, 3] uint8 (pair-major, branch-minor) elsewhere...
    batch, report = sampler.complete(job=job, rewards=rewards)   # Arrow rows of the finite pairs
    report["dropped"]                                             # pair ids left out (a non-finite reward)

Trajectories (x_i, v_i for every step) stay in this process until ``complete``; only images leave it, and
only the finished Arrow batch goes to the learner. With ``grpo`` (``train.algorithm: flow_grpo``) a request's
"pairs" are groups: ``sample`` returns G images per prompt (group-major) and ``complete`` packs Flow-GRPO's rows.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from actors.sampling import GroupTrajectory, PairTrajectory, sample_groups, sample_pairs
from learner.batch import to_arrow, to_arrow_groups
from learner.weights import Weights, checksum
from models.adapter import PromptCache
from models.device import DTYPES
from models.euler import generate_images
from models.images import to_uint8
from models.lora import make_trainable, trainable


@dataclass
class _Pending:
    traj: PairTrajectory | GroupTrajectory
    prompts: list[str]
    prompt_ids: list[int]
    pair_ids: list[int]
    version: int
    checksum: str
    sample_s: float
    load_s: float


class Sampler:
    def __init__(
        self,
        model,
        sampling,
        lora=None,
        index: int = 0,
        precision: str = "bf16",
        threads: int | None = None,
        grpo=None,
        mark_trainable: bool = True,
    ):
        """model: a FlowModel, or a zero-argument callable that builds one (so a Ray actor loads it on its own
        device); sampling: ``SamplingConfig``; lora: ``LoraSettings`` (None or disabled = full weights; its
        ``init_from`` sets the starting weights); precision: the learner's ``train.precision`` (velocities are
        recorded under the autocast the learner trains under; default = the config's default); threads:
        torch intra-op threads of this process (None = leave as is; a Ray actor gets ``runtime.torch_threads``);
        grpo: ``GrpoConfig`` to sample Flow-GRPO groups (``cluster.config.grpo_of``), None for FDFO pairs;
        mark_trainable: False when ``model`` is a Learner's (a hybrid worker's one copy, cluster/hybrid.py): its
        trainable set is marked already (a LoRA is not added twice) and the worker sets its train/eval mode."""
        if threads:
            torch.set_num_threads(threads)
        if not hasattr(model, "velocity"):
            model = model()
        self.model = model
        self.cfg = sampling
        self.index = index
        self.precision = precision
        self.grpo = grpo
        self.images_per_unit = 2 if grpo is None else grpo.group_size
        if mark_trainable:
            make_trainable(model.transformer, lora)  # marks the set the learner broadcasts
            model.transformer.eval()
        params = trainable(model.transformer)  # what the learner trains and broadcasts
        self.version, self.checksum = 0, checksum(params)
        self._broadcast_names = sorted(params)
        self._pending: dict[int, _Pending] = {}
        self._jobs = itertools.count()
        self.prompts = PromptCache(model)

    def set_weights(self, weights: Weights) -> dict:
        """Load a broadcast version; returns {version, checksum} as proof of what this sampler now holds."""
        self.checksum = weights.load_into(self.model.transformer)
        self.version = weights.version
        return {"version": self.version, "checksum": self.checksum, "sampler": self.index}

    def holds(self, version: int, checksum: str) -> dict:
        """The model's weights were changed in place to ``version`` (``checksum`` of this process's own tensors): a
        hybrid worker's learner stepped them. Returns the proof ``set_weights`` would."""
        self.version, self.checksum = version, checksum
        return {"version": self.version, "checksum": self.checksum, "sampler": self.index}

    def sample(
        self,
        prompts: list[str],
        prompt_ids: list[int],
        pair_ids: list[int],
        seeds: list[int],
        newest: tuple[int, str, list] | None = None,
    ) -> tuple[int, np.ndarray]:
        """Sample P pairs (groups); returns (job id, images uint8 [2P, H, W, 3], branches of a pair adjacent; [G P, ...]
        for groups, members adjacent) and keeps
        the trajectories until ``complete``. newest: (version, checksum, [object ref of its ``Weights``]), the
        learner's newest published version (the Ray runtime's): loaded first (verified) unless this sampler holds
        it. (The ref travels inside a list so that Ray hands it over unresolved: it is fetched only when new.)"""
        t_load = time.perf_counter()
        self._take(newest)
        if self.version < 0:
            raise RuntimeError(
                f"sampler {self.index} holds no verified weights (the last transfer failed); refusing to sample"
            )
        t0 = time.perf_counter()
        common = dict(
            cond=self.prompts(prompts),  # encoded as the learner encodes them
            num_steps=self.cfg.num_steps,
            guidance_scale=self.cfg.guidance_scale,
            record_dtype=DTYPES[self.cfg.record_dtype],
            precision=self.precision,
            noise_device=self.cfg.noise_device,
        )
        if self.grpo is None:
            traj = sample_pairs(self.model, prompts, seeds, gamma=self.cfg.gamma, **common)
        else:
            g = self.grpo
            traj = sample_groups(
                self.model,
                prompts,
                seeds,
                g.group_size,
                noise_level=g.noise_level,
                window=g.sde_window,
                window_range=g.sde_window_range,
                **common,
            )
        images = to_uint8(self.model.decode(traj.x_final.flatten(0, 1)))  # [2P, H, W, 3]
        job = next(self._jobs)
        self._pending[job] = _Pending(
            traj,
            list(prompts),
            list(prompt_ids),
            list(pair_ids),
            self.version,
            self.checksum,
            time.perf_counter() - t0,
            t0 - t_load,
        )
        return job, images

    def generate(self, prompts: list[str], seeds: list[int], num_steps: int, newest=None) -> np.ndarray:
        """Plain Euler images uint8 [N, H, W, 3] with the current weights (evaluation, not training); newest: as
        for ``sample``."""
        self._take(newest)
        return generate_images(self.model, prompts, seeds, num_steps, self.cfg.guidance_scale)

    def _take(self, newest) -> None:
        """Load the published version ``newest`` = (version, checksum, [ref]) unless this sampler holds it already
        or holds a newer one (calls can overtake each other)."""
        if newest is not None and (
            newest[0] > self.version or (newest[0] == self.version and newest[1] != self.checksum)
        ):
            import ray

            self.set_weights(ray.get(newest[2][0]))

    def complete(self, job: int, rewards) -> tuple[pa.RecordBatch | None, dict]:
        """Turn job's pairs (groups) into Arrow rows. rewards: [2P] or [P, 2] scores ([G P] or [P, G] for groups), or
        the ``RewardOutput`` of the images ``sample`` returned; a pair (group) with a non-finite reward is left out
        whole. Returns (batch, or None if no pair is
        left; report): report["dropped"] is the left-out pair ids (the caller counts them as dropped),
        report["sample_s"] / report["pack_s"] the time this sampler spent sampling and packing the job, and
        report["version"] / report["checksum"] the weights it was sampled with (the caller checks that proof) and
        report["load_s"] the time it took to load them at the start of the ``sample`` call (0 if held already)."""
        t0 = time.perf_counter()
        p = self._pending.pop(job)
        scores = getattr(rewards, "scores", rewards)
        rewards = np.asarray(scores, dtype=np.float64).reshape(len(p.pair_ids), self.images_per_unit)
        ok = np.isfinite(rewards).all(1)
        report = {
            "dropped": [pid for pid, k in zip(p.pair_ids, ok) if not k],
            "sample_s": p.sample_s,
            "load_s": p.load_s,
            "version": p.version,
            "checksum": p.checksum,
        }
        batch = None
        if ok.any():
            keep = torch.from_numpy(np.flatnonzero(ok))
            pick = lambda seq: [seq[i] for i in keep]  # noqa: E731
            t = p.traj
            if self.grpo is None:
                traj = PairTrajectory(t.xs[keep], t.vs[keep], t.sigmas, t.x_final[keep], pick(t.seeds))
                pack = to_arrow
            else:
                traj = GroupTrajectory(
                    t.xs[keep],
                    t.x_next[keep],
                    t.log_probs[keep],
                    t.steps[keep],
                    t.sigmas[keep],
                    t.sigmas_next[keep],
                    t.x_final[keep],
                    pick(t.seeds),
                    t.sigma_max,
                )
                pack = to_arrow_groups
            batch = pack(
                traj,
                rewards[ok],
                pick(p.prompt_ids),
                pick(p.pair_ids),
                pick(p.prompts),
                p.version,
                self.cfg.guidance_scale,
            )
        return batch, report | {"pack_s": time.perf_counter() - t0}

    def forget(self, job: int) -> list[int]:
        """Drop a job whose rewards will never come; returns its pair ids."""
        return self._pending.pop(job).pair_ids

    # -- full weights of 512 MiB or more over a collective group (see learner/collective.py); smaller payloads come
    #    through set_weights / sample(newest=...)
    def weight_backend(self) -> str:
        """The collective backend this actor's weights can travel over: NCCL from a GPU, gloo from a CPU."""
        return "nccl" if self.model.device.type == "cuda" else "gloo"

    def node_id(self) -> str | None:
        """The Ray node this sampler runs on (None outside Ray): with every member on the learner's node the
        weight group listens on loopback only."""
        from learner.collective import node_id

        return node_id()

    def join_weight_group(
        self,
        *,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        backend: str = "gloo",
        timeout_s: float = 120.0,
    ) -> None:
        from learner.collective import WeightGroup

        self.leave_weight_group()
        self._group = WeightGroup(rank, world_size, master_addr, master_port, backend=backend, timeout_s=timeout_s)

    def receive_weights(self) -> dict:
        """Receive the learner's broadcast in place; the group verifies the checksum (a mismatch raises and this
        sampler refuses to sample until a verified version arrives)."""
        params = dict(self.model.transformer.named_parameters())
        tensors = {n: params[n].data for n in self._broadcast_names}
        self.version = -1  # undefined until the transfer is verified
        with torch.no_grad():
            version, checksum = self._group.receive(tensors)
        self.version, self.checksum = version, checksum
        return {"version": self.version, "checksum": self.checksum, "sampler": self.index}

    def leave_weight_group(self) -> None:
        if getattr(self, "_group", None) is not None:
            self._group.close()
            self._group = None

    def status(self) -> dict:
        """What this sampler holds: weight version and checksum, and pairs awaiting rewards."""
        return {
            "sampler": self.index,
            "version": self.version,
            "checksum": self.checksum,
            "pending_pairs": sum(len(p.pair_ids) for p in self._pending.values()),
            "torch_threads": torch.get_num_threads(),
        }
