"""The learner: FDFO (or Flow-GRPO) updates on the samplers' Arrow batches, versioned weights out.

Usage (plain class; the Ray runtime wraps it with ``ray.remote``)::

    learner = Learner(model, cfg.train, Batching.of(cfg), cfg.lora, seed=cfg.seed)
    metrics = learner.train_epoch(record_batch, ...)   # updates_per_epoch AdamW steps
    weights = learner.weights()                                  # version = optimizer steps taken

An epoch's pairs are flattened into (branch, step) rows, shuffled globally and split evenly over
``updates_per_epoch`` optimizer steps (the reference's arithmetic); each step accumulates gradients over
micro-batches of ``micro_batch_rows``. A pair is only trained on if it stays within ``max_policy_lag`` of the
learner's version for the whole epoch; otherwise it is dropped as stale and reported.

Numerics (``train.precision``): every forward runs under ``models.device.autocast``, the context the samplers record
v under; fp16 adds the reference's GradScaler. An update whose gradient is not finite is skipped (the weights and
AdamW state stay as they were, as the reference's scaler skips it), counted in ``learner/skipped_steps`` and the run
goes on; the version still advances (it counts updates, so the epoch's arithmetic and the lr schedule hold).

Algorithms (``train.algorithm``): the loss of a micro-batch is the only part that differs (``learner.micro_loss``):
FDFO's ``learner.loss.fdfo_loss`` on (branch, step) rows, or Flow-GRPO's ``learner.flow_grpo.grpo_loss`` on (image,
SDE step) rows; batching, staleness, the learner group, publication and checkpoints are shared.

The learner group (``runtime.learner.count`` ranks, each its own process) either replicates the weights and all-reduces
the gradients, or (``sharding="fsdp"``, full fine-tuning) shards the fp32 weights, gradients and AdamW moments with
FSDP2 (``learner.sharded``): every rank then runs as many micro-batches per update as the busiest (zero-weight padding),
gathers the full trainable tensors after each step for rank 0 to publish, and takes part in every checkpoint, which
has one learner's layout, so a checkpoint resumes at any number of ranks.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import weakref

import pyarrow as pa
import torch

from learner.batch import from_arrow
from learner.checkpoint import Checkpointing
from learner.collective import LearnerGroupBroken
from learner.epoch import EpochState, finite_mean
from learner.flow_grpo import group_advantages
from learner.loss import STALENESS_FDFO_ONLY
from learner.membership import GroupMember
from learner.micro_loss import MicroLoss
from learner.publishing import Publisher
from learner.sharded import clip_grad_norm, peer_lost
from learner.weights import Weights
from models.adapter import PromptCache
from models.device import grad_scaler
from models.lora import make_trainable

__all__ = ["EpochState", "Learner", "finite_mean", "peer_lost", "scheduled_lr"]

log = logging.getLogger("fdfo")


def scheduled_lr(train, version: int) -> float:
    """The learning rate of the update that makes ``version + 1`` (train: ``TrainConfig``): ``train.lr`` decayed by
    ``train.lr_schedule`` to ``train.lr_final`` at the run's last update (epochs * updates_per_epoch), and held
    there after it. A function of the version alone, so a resumed run continues the same schedule."""
    if train.lr_schedule == "constant":
        return train.lr
    frac = min(version / max(train.epochs * train.updates_per_epoch - 1, 1), 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * frac)) if train.lr_schedule == "cosine" else 1 - frac
    return train.lr_final + (train.lr - train.lr_final) * shape


def check_learner_settings(train, grpo, sharding: str) -> None:
    """The learner's arguments that contradict each other, refused before a model is built."""
    if sharding not in ("replicate", "fsdp"):
        raise ValueError(f"sharding must be 'replicate' or 'fsdp', got {sharding!r}")
    if train.staleness_correction and train.algorithm != "fdfo":
        raise ValueError(STALENESS_FDFO_ONLY.format(algorithm=train.algorithm))
    if (grpo is not None) != (train.algorithm == "flow_grpo"):
        raise ValueError(
            f"train.algorithm = {train.algorithm!r} but grpo settings were {'' if grpo else 'not '}given: "
            "build the learner with grpo=cluster.config.grpo_of(cfg)"
        )


class Learner(MicroLoss, Publisher, GroupMember, Checkpointing):
    """Takes epochs of rows and steps the weights (``begin_epoch``, ``update``: this class); its parts, each a module
    of its own: the micro-batch loss (``MicroLoss``), publishing (``Publisher``), the learner and weight groups
    (``GroupMember``) and checkpoints (``Checkpointing``). They hold no state: every attribute is set here."""

    def __init__(
        self,
        model,
        train,
        batching,
        lora=None,
        seed: int = 0,
        threads: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        grpo=None,
        sharding: str = "replicate",
        reuse_snapshots: bool = False,
    ):
        """model: a FlowModel, or a zero-argument callable that builds one (so a Ray actor loads it on its own
        device); train: ``TrainConfig`` (optimizer, loss); batching: ``Batching`` (which rows make each update);
        lora: ``LoraSettings`` or None (full fine-tuning); threads: torch intra-op threads of this process (None =
        leave as is; a Ray actor gets ``runtime.torch_threads``); rank / world_size: this learner's place in a
        learner group (``runtime.learner.count``; ``join_learner_group`` forms it): each rank computes the gradient
        of its share of every update's rows and the group sums them, so M ranks take one learner's step; grpo:
        ``GrpoConfig`` when ``train.algorithm`` is flow_grpo (``cluster.config.grpo_of``), else None; sharding: how
        a group of ranks holds the weights (``cluster.config.learner_sharding``): "replicate" (every rank all of them)
        or "fsdp" (full fine-tuning sharded over the ranks when ``join_learner_group`` forms the group);
        reuse_snapshots: pack each published snapshot into the previous one's buffer once that ``Weights`` is gone
        (no allocation: its first touch costs more than the copy) — for a Ray actor, whose results Ray stores as the
        call returns; a caller that keeps snapshots' tensors leaves it off."""
        check_learner_settings(train, grpo, sharding)
        if threads:
            torch.set_num_threads(threads)
        if not hasattr(model, "velocity"):
            model = model()
        self.model = model
        self.cfg = train
        self.batching = batching
        self.seed = seed
        self.grpo = grpo
        tr = model.transformer
        self.lora = make_trainable(tr, lora)
        if sharding == "fsdp" and self.lora:
            raise ValueError(
                "sharding='fsdp' shards full fine-tuning; a LoRA learner group replicates (sharding='replicate')"
            )
        if train.gradient_checkpointing:
            model.enable_gradient_checkpointing()  # less memory, the same v_theta
        self.base = copy.deepcopy(tr).requires_grad_(False) if (train.kl_weight > 0 and not self.lora) else None
        tr.train()
        self.params = [p for p in tr.parameters() if p.requires_grad]
        # fp32 master weights: when trainable weights are bf16/fp16 (full fine-tuning of a half-precision model; LoRA
        # factors are fp32 already), AdamW steps fp32 copies and the model's weights are rounded from them after each
        # step: an update at lr 3e-5 would otherwise round away. The forward stays in the model's dtype / autocast.
        # Sharded (fsdp), the fp32 shards made when the group forms are the masters: no whole fp32 copy here.
        self.masters = (
            [p.detach().float().clone() for p in self.params]
            if any(p.dtype != torch.float32 for p in self.params) and sharding == "replicate"
            else None
        )
        self.opt = self._adamw(self.masters or self.params)
        self.scaler = grad_scaler(model.device, train.precision)  # pass-through unless fp16 on CUDA
        self.skipped_steps = 0  # updates skipped for a non-finite gradient, all run
        self.version = 0
        self.rank, self.world_size = rank, world_size
        self._grads = None  # the learner group (GradientGroup) when world_size > 1
        self.sharding = sharding
        self._dtype = self.params[0].dtype if self.params else torch.float32  # the trained weights' (published) dtype
        self._gathered: tuple[dict, str] | None = None  # fsdp: the full trainable tensors and their checksum
        self.reuse_snapshots = reuse_snapshots
        self._snapshot_buffer: torch.Tensor | None = None
        # the last published Weights (its buffer is reused once it is gone)
        self._last_snapshot: weakref.ref | None = None
        self._epoch: EpochState | None = None  # the epoch being updated (begin_epoch .. last update)
        self.prompts = PromptCache(model)  # embeddings per prompt, never shipped in batches
        if rank == 0:
            log.info("learner model placement: %s", self.placement())

    def _adamw(self, params: list[torch.Tensor]) -> torch.optim.AdamW:
        c = self.cfg
        return torch.optim.AdamW(params, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay, eps=c.adam_eps)

    # -- the update ------------------------------------------------------------------------------------------
    def stale_mask(self, policy_version: torch.Tensor) -> torch.Tensor:
        """True for rows that would exceed max_policy_lag at this epoch's last update."""
        worst_version = self.version + self.batching.updates_per_epoch - 1
        return worst_version - policy_version > self.batching.max_policy_lag

    def train_epoch(self, *batches: pa.RecordBatch) -> dict:
        """Run the epoch's optimizer steps (``Batching.plan``) on the rows of ``batches``; returns metrics, the
        trained and stale pair ids, the new weights' checksum and ``perf/update_s`` (this call's own time).
        (Batches are positional so that Ray resolves object refs.)"""
        out = self.begin_epoch(*batches)
        while self._epoch is not None:
            step = self.update()[0]
            step.pop("perf/publish_s")  # nothing published: the caller publishes
            out = out | step
        return out

    def begin_epoch(self, *batches: pa.RecordBatch) -> dict:
        """Take an epoch's batches and plan its updates; ``update()`` then takes them one at a time (the Ray
        runtime publishes the weights after each). Returns the trained and stale pair ids and the number of
        updates planned (0 when every pair was stale: nothing to update)."""
        t0 = time.perf_counter()
        if self._epoch is not None:
            raise RuntimeError(f"begin_epoch while {len(self._epoch.updates)} updates of the previous epoch are left")
        tb = from_arrow(pa.Table.from_batches(batches), algorithm=self.cfg.algorithm)
        stale = self.stale_mask(tb.policy_version)
        keep = torch.nonzero(~stale).squeeze(1)
        out = {
            "stale_pair_ids": sorted(set(tb.unit_id[stale].tolist())),
            "trained_pair_ids": sorted(set(tb.unit_id[keep].tolist())),
            "updates": 0,
        }
        if len(keep) == 0:
            return out
        w = float(tb.guidance_scale[0])
        if not torch.all(tb.guidance_scale == w):
            raise ValueError(
                "one epoch mixes guidance scales; sampling.guidance_scale must be the same on every sampler"
            )
        if self.grpo is not None and self.grpo.global_std:  # Flow-GRPO's SD3 settings: the epoch's std
            tb.advantage = group_advantages(tb.reward, tb.group_id, global_std=True)
        self.prompts.prefetch([tb.prompt[j] for j in keep.tolist()])  # new prompts: one encoder window
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.version)
        updates = self.batching.plan(len(keep) * tb.x.shape[1], g)  # row indices of each update
        self._epoch = EpochState(tb, keep, w, updates, rows=sum(len(r) for r in updates), start_version=self.version)
        if self.cfg.staleness_correction and len(updates) > 1:
            self._anchor_later_updates(self._epoch)
        self._epoch.seconds = time.perf_counter() - t0
        return out | {"updates": len(updates)}

    def update(self, publish: bool = False) -> tuple[dict, Weights | None]:
        """The epoch's next optimizer step. Returns (metrics, the new ``Weights`` if ``publish`` else None); the
        metrics hold the new version and checksum and ``perf/publish_s`` (the snapshot's time), and after the
        epoch's last step the epoch's metrics too (``perf/update_s``: the steps' time, without snapshots)."""
        ep = self._epoch
        if ep is None:
            raise RuntimeError("update() without an epoch: call begin_epoch(*batches) first")
        t0 = time.perf_counter()
        try:
            self._accumulate(ep, ep.updates.pop(0))
            ep.grad_norms.append(self._step())
        except BaseException as e:
            self._epoch = None  # a failed step abandons the epoch (weights untouched)
            if self.sharding == "fsdp" and peer_lost(e):
                raise LearnerGroupBroken(
                    f"learner rank {self.rank} of {self.world_size}: a sharded collective failed "
                    f"({e}); the runtime restarts the group from the last checkpoint"
                ) from e
            raise
        version, digest = self.weights_info()
        out = {"learner/version": version, "checksum": digest}
        t_publish = time.perf_counter()
        weights = self._snapshot(version, digest) if publish else None
        out["perf/publish_s"] = time.perf_counter() - t_publish
        ep.seconds += t_publish - t0
        if not ep.updates:  # the epoch's last step: its metrics
            self._epoch = None
            ep.reduce_over(self._grads)
            out.update(ep.summary(self.skipped_steps, self.opt.param_groups[0]["lr"]))
        return out, weights

    def _accumulate(self, ep: EpochState, rows: torch.Tensor) -> None:
        """Gradients of this rank's share of one update's ``rows`` (accumulated over micro-batches to the update's
        mean), and the epoch's running metrics. Sharded (fsdp), every forward and backward is a collective, so a rank
        with fewer micro-batches than the busiest pads with zero-weight ones (a row of the update, loss * 0)."""
        self.opt.zero_grad(set_to_none=True)
        if self.masters is not None:
            for p in self.params:
                p.grad = None
        shares = [
            [mb for mb in self.batching.micro_batches(part) if len(mb)]
            for part in torch.tensor_split(rows, self.world_size)
        ]
        mine = shares[self.rank]
        pad = max(map(len, shares)) - len(mine) if self.sharding == "fsdp" else 0
        metrics = []  # (share, metrics) of each micro-batch, read after the loop
        for i, mb in enumerate(mine + [rows[:1]] * pad):
            loss, m, lag = self._micro_loss(ep, mb)
            share = len(mb) / len(rows) if i < len(mine) else 0.0  # of the update's rows (over every rank's)
            self.scaler.scale(loss * share).backward()
            if i >= len(mine):
                continue  # padding: no rows, no metrics
            # lag is on the host (versions): reading it does not wait for the device
            ep.lag_sum, ep.lag_max = ep.lag_sum + float(lag.sum()), max(ep.lag_max, int(lag.max()))
            metrics.append((share, m))
        ep.add_metrics(metrics, self.batching.updates_per_epoch)

    def _step(self) -> float:
        """Unscale (fp16), clip, set the scheduled lr and take the AdamW step, or skip it and count it when the
        gradient is not finite; returns the gradient norm before clipping (inf or nan for a skipped update)."""
        if self._grads is not None and self.sharding == "replicate":
            self._grads.all_reduce_grads(self.params)  # every rank now holds the update's whole gradient
        stepped = self.masters or self.params
        if self.masters is not None:  # the optimizer steps the fp32 masters
            for m, p in zip(self.masters, self.params):
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None
        self.scaler.unscale_(self.opt)
        gn = clip_grad_norm(stepped, self.cfg.grad_clip)  # fsdp: the global norm over the shards
        for group in self.opt.param_groups:
            group["lr"] = scheduled_lr(self.cfg, self.version)
        if torch.isfinite(gn):
            self.scaler.step(self.opt)
            if self.masters is not None:
                with torch.no_grad():
                    for m, p in zip(self.masters, self.params):
                        p.copy_(m)  # the model's weights: the masters, rounded
        else:
            self.skipped_steps += 1
            log.warning(
                "non-finite gradient norm at learner version %d: update skipped (%d so far); if this "
                "repeats outside fp16 warm-up, lower train.lr",
                self.version,
                self.skipped_steps,
            )
        self.scaler.update()  # fp16: a skipped update halves the loss scale
        self.opt.zero_grad(set_to_none=True)
        self.version += 1
        if self.sharding == "fsdp":
            self.gather_weights()
        return float(gn)

    def torch_threads(self) -> int:
        return torch.get_num_threads()

    def placement(self) -> dict[str, str]:
        """Where the model's components live (``model.placement()``: the transformer's device, each text encoder's,
        the VAE's or "released"); {} for a model that does not say."""
        placement = getattr(self.model, "placement", None)
        return placement() if placement is not None else {}
