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

Algorithms (``train.algorithm``): the loss of a micro-batch is the only part that differs (``_micro_loss``): FDFO's
``learner.loss.fdfo_loss`` on (branch, step) rows, or Flow-GRPO's ``learner.flow_grpo.grpo_loss`` on (image, SDE
step) rows; batching, staleness, the learner group, publication and checkpoints are shared.

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
from dataclasses import dataclass, field

import pyarrow as pa
import torch

from learner.batch import GroupBatch, TrainBatch, from_arrow
from learner.collective import LearnerGroupBroken
from learner.flow_grpo import check_descending, group_advantages, grpo_loss, sde_step
from learner.loss import STALENESS_FDFO_ONLY, fdfo_loss
from learner.sharded import (
    clip_grad_norm,
    full_optimizer_state,
    full_state,
    init_default_group,
    shard_transformer,
)
from learner.weights import Weights, checksum
from models.adapter import PromptCache
from models.device import autocast, grad_scaler, to_device
from models.lora import make_trainable, trainable

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


def peer_lost(e: BaseException) -> bool:
    """Whether a sharded (default-group) collective failed because a rank died or timed out: torch says so with a
    ``DistError`` (NCCL, stores), gloo with a plain RuntimeError from its transport."""
    return isinstance(e, torch.distributed.DistError) or (isinstance(e, RuntimeError) and "gloo/" in str(e))


def finite_mean(values: list) -> float:
    """Mean of the finite values (a skipped update's inf/nan norm left out; None counts as missing); nan when there
    are none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


@dataclass
class EpochState:
    """The epoch a learner is updating, from ``begin_epoch`` to its last ``update``: the rows it trains, the updates
    left and the metrics running over them."""

    tb: TrainBatch | GroupBatch  # the epoch's table (``from_arrow``)
    keep: torch.Tensor  # indices of its rows that are not stale [R]
    w: float  # the guidance scale every row was sampled with
    updates: list[torch.Tensor]  # row indices of each update still to take (``Batching.plan``)
    rows: int  # rows over all of the epoch's updates
    sums: dict[str, float] = field(default_factory=dict)  # running metric sums (maxima for log_rho_abs_max)
    grad_norms: list[float] = field(default_factory=list)  # one per update taken
    lag_sum: float = 0.0  # policy lag summed over the rows trained
    lag_max: int = 0
    seconds: float = 0.0  # the steps' own time (``perf/update_s``), without snapshots
    start_version: int = 0  # the learner's version when the epoch's update started (the staleness correction's anchor)
    prox: torch.Tensor | None = None  # staleness correction: v_prox of stale rows of updates 2.. [S, *latent]
    prox_at: torch.Tensor | None = None  # [kept rows x steps]: each row's index into ``prox``, -1 where none


class Learner:
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
        if sharding not in ("replicate", "fsdp"):
            raise ValueError(f"sharding must be 'replicate' or 'fsdp', got {sharding!r}")
        if train.staleness_correction and train.algorithm != "fdfo":
            raise ValueError(STALENESS_FDFO_ONLY.format(algorithm=train.algorithm))
        if (grpo is not None) != (train.algorithm == "flow_grpo"):
            raise ValueError(
                f"train.algorithm = {train.algorithm!r} but grpo settings were {'' if grpo else 'not '}given: "
                "build the learner with grpo=cluster.config.grpo_of(cfg)"
            )
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
        self._last_snapshot: weakref.ref | None = (
            None  # the last published Weights (its buffer is reused once it is gone)
        )
        self._epoch: EpochState | None = None  # the epoch being updated (begin_epoch .. last update)
        self.prompts = PromptCache(model)  # embeddings per prompt, never shipped in batches
        if rank == 0:
            log.info("learner model placement: %s", self.placement())

    # -- helpers -------------------------------------------------------------------------------------------
    def _adamw(self, params: list[torch.Tensor]) -> torch.optim.AdamW:
        c = self.cfg
        return torch.optim.AdamW(params, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay, eps=c.adam_eps)

    def _published(self) -> tuple[dict[str, torch.Tensor], str | None]:
        """(the trainable tensors by name as samplers load them, their checksum or None when not yet computed):
        views of the live parameters, or (fsdp) the full tensors every rank gathered after the last step or load
        with their checksum, so rank 0 reads them alone, starting no collective."""
        if self.sharding == "replicate":
            return trainable(self.model.transformer), None
        if self._gathered is None:
            raise RuntimeError("a sharded learner publishes once its group is formed: call join_learner_group first")
        return self._gathered

    def _base_velocity(self, x, sigma, cond, w) -> torch.Tensor:
        with torch.no_grad():
            if self.lora:
                self.model.transformer.disable_adapters()
                try:
                    return self.model.velocity(x, sigma, cond, w)
                finally:
                    self.model.transformer.enable_adapters()
            trained, self.model.transformer = self.model.transformer, self.base
            try:
                return self.model.velocity(x, sigma, cond, w)
            finally:
                self.model.transformer = trained

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

    def _anchor_later_updates(self, ep: EpochState) -> None:
        """The staleness correction's anchor for this rank's rows of the epoch's updates 2.. that were sampled before
        the epoch's weights: their velocity under those weights, no gradient (one forward per such row, before the
        first step moves the weights). The first update's rows take it from their own forward (the same weights), and
        rows sampled with the epoch's weights need none (their v is it). Sharded (fsdp), every rank runs as many
        forwards as the busiest (forwards are collectives)."""
        N = ep.tb.x.shape[1]

        def stale_share(rank: int) -> torch.Tensor:  # a rank's rows of updates 2.. (_accumulate's split), stale ones
            rows = torch.cat([torch.tensor_split(u, self.world_size)[rank] for u in ep.updates[1:]])
            return rows[ep.tb.policy_version[ep.keep[rows // N]] < ep.start_version]

        chunks = [
            [mb for mb in torch.split(stale_share(rank), self.batching.micro_batch_rows) if len(mb)]
            for rank in range(self.world_size)
        ]
        mine = chunks[self.rank]
        pad = max(map(len, chunks)) - len(mine) if self.sharding == "fsdp" else 0
        prox = []
        with torch.no_grad(), autocast(self.model.device, self.cfg.precision):
            for i, mb in enumerate(mine + [ep.updates[-1][:1]] * pad):
                x, _, sigma, _, _, cond, _ = self._rows(ep.tb, ep.keep, mb)
                v_prox = self.model.velocity(x, sigma, cond, ep.w)
                if i < len(mine):
                    prox.append(v_prox.cpu())
        if prox:
            rows = torch.cat(mine)
            ep.prox = torch.cat(prox)
            ep.prox_at = torch.full((len(ep.keep) * N,), -1, dtype=torch.long)
            ep.prox_at[rows] = torch.arange(len(rows))

    def _v_prox(self, ep: EpochState, mb: torch.Tensor, v: torch.Tensor, v_theta: torch.Tensor) -> torch.Tensor:
        """The anchor of micro-batch ``mb`` [B, *latent]: v where the row was sampled with the weights the epoch's
        update started from, else the velocity under those weights: this forward's own (detached) in the first
        update, the one ``_anchor_later_updates`` computed in the later ones."""
        v_prox = v.float().clone()
        stale = torch.nonzero(ep.tb.policy_version[ep.keep[mb // ep.tb.x.shape[1]]] < ep.start_version).squeeze(1)
        if len(stale) == 0:
            return v_prox
        at = stale.to(v.device)
        if not ep.grad_norms:  # the first update: the weights are still the epoch's
            v_prox[at] = v_theta.detach()[at].float()
        else:
            where = ep.prox_at[mb[stale]] if ep.prox_at is not None else torch.tensor([-1])
            if bool(where.lt(0).any()):
                raise RuntimeError("staleness correction: a stale row of a later update has no anchor; this is a bug")
            v_prox[at] = to_device(ep.prox[where], v.device).float()
        return v_prox

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
            self._reduce_epoch_metrics(ep)
            out.update({f"learner/{k}": v for k, v in ep.sums.items()})
            out.update(
                {
                    "updates": len(ep.grad_norms),
                    "learner/grad_norm": finite_mean(ep.grad_norms),
                    "learner/skipped_steps": self.skipped_steps,
                    "learner/lr": self.opt.param_groups[0]["lr"],
                    "learner/policy_lag_mean": ep.lag_sum / ep.rows,
                    "learner/policy_lag_max": ep.lag_max,
                    "learner/rows": ep.rows,
                    "perf/update_s": ep.seconds,
                }
            )
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
        self._add_metrics(ep, metrics)

    def _add_metrics(self, ep: EpochState, metrics: list) -> None:
        """The micro-batches' metrics (0-dim tensors on the device) into the epoch's running sums, in micro-batch order
        and with the same float arithmetic as reading each at once, but read from the device together: one host sync
        per update, none per micro-batch."""
        if not metrics:
            return
        values = iter(torch.stack([v.detach().double() for _, m in metrics for v in m.values()]).tolist())
        for share, m in metrics:
            for k in m:
                val = next(values)
                if k == "log_rho_abs_max":
                    ep.sums[k] = max(ep.sums.get(k, 0.0), val)
                else:
                    ep.sums[k] = ep.sums.get(k, 0.0) + val * share / self.batching.updates_per_epoch

    def _micro_loss(self, ep: EpochState, mb: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """The run's algorithm on one micro-batch of rows ``mb``: (loss, its metrics, each row's lag [B])."""
        if self.grpo is not None:
            return self._grpo_loss(ep, mb)
        x, v, sigma, d, dR, cond, lag = self._rows(ep.tb, ep.keep, mb)
        with autocast(self.model.device, self.cfg.precision):
            v_theta = self.model.velocity(x, sigma, cond, ep.w)
            v_base = self._base_velocity(x, sigma, cond, ep.w) if self.cfg.kl_weight > 0 else None
        v_prox = self._v_prox(ep, mb, v, v_theta) if self.cfg.staleness_correction else None
        loss, m = fdfo_loss(v_theta, v, d, dR, self.cfg.epsilon, v_base, self.cfg.kl_weight, v_prox)
        return loss, m, lag

    def _grpo_loss(self, ep: EpochState, mb: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """Flow-GRPO on (image, SDE step) rows: log p_theta of the recorded step under v_theta, against the sampler's."""
        tb, g, dev, w = ep.tb, self.grpo, self.model.device, ep.w
        W = tb.x.shape[1]
        r, i = ep.keep[mb // W], mb % W  # row of the table, recorded step
        cond = self.prompts([tb.prompt[j] for j in r.tolist()])
        x, x_next = to_device(tb.x[r, i], dev), to_device(tb.x_next[r, i], dev)
        check_descending(tb.sigmas[r, i], tb.sigmas_next[r, i])  # on the host, before they move
        sigma, sigma_next = to_device(tb.sigmas[r, i], dev), to_device(tb.sigmas_next[r, i], dev)
        sigma_max = float(tb.sigma_max[r[0]])
        with autocast(dev, self.cfg.precision):
            v_theta = self.model.velocity(x, sigma, cond, w)
            v_base = self._base_velocity(x, sigma, cond, w) if self.cfg.kl_weight > 0 else None
        step = sde_step(x, v_theta, sigma, sigma_next, g.noise_level, sigma_max, x_next=x_next)
        base = (
            None if v_base is None else sde_step(x, v_base, sigma, sigma_next, g.noise_level, sigma_max, x_next=x_next)
        )
        old_log_prob, advantage = to_device(tb.log_prob[r, i], dev), to_device(tb.advantage[r], dev)
        loss, m = grpo_loss(
            step.log_prob,
            old_log_prob,
            advantage,
            g.clip_range,
            g.adv_clip_max,
            step.mean,
            None if base is None else base.mean,
            step.std,
            self.cfg.kl_weight,
        )
        return loss, m, self.version - tb.policy_version[r]

    def _rows(self, tb, keep: torch.Tensor, mb: torch.Tensor):
        """One micro-batch of (branch, step) rows ``mb`` (indices into kept rows x steps) on the learner's device:
        x, v [B, C, H, W], sigma [B], d [B, C, H, W], dR [B], the prompts' conditioning, and each row's lag [B] (on
        the host). To a GPU the rows go through pinned memory without a host sync (``to_device``)."""
        N, dev = tb.x.shape[1], self.model.device
        r, i = keep[mb // N], mb % N  # row of the table, step index
        cond = self.prompts([tb.prompt[j] for j in r.tolist()])
        x, v, sigma, d, dR = (to_device(t, dev) for t in (tb.x[r, i], tb.v[r, i], tb.sigmas[r, i], tb.d[r], tb.dR[r]))
        return x, v, sigma, d, dR, cond, self.version - tb.policy_version[r]

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

    def gather_weights(self) -> None:
        """Sharded (fsdp), every rank at once (a collective), after each step and each load: the full trainable
        tensors gathered in the trained dtype, and their checksum, which ``weights``, ``weights_info``,
        ``trainable_bytes``, ``send_weights`` and ``update(publish=True)`` read on rank 0 alone."""
        tr = self.model.transformer
        full = full_state(tr, dtype=self._dtype)
        tensors = {n: full[n] for n, p in tr.named_parameters() if p.requires_grad}
        self._gathered = (tensors, checksum(tensors))

    def weights(self) -> Weights:
        return self._snapshot(self.version, self._published()[1])

    def _snapshot(self, version: int, digest: str | None) -> Weights:
        """The published tensors as ``version``; with ``reuse_snapshots``, packed into the last snapshot's buffer when
        no one holds that ``Weights`` any more."""
        last = self._last_snapshot() if self._last_snapshot is not None else None
        buffer = self._snapshot_buffer if (self.reuse_snapshots and last is None) else None
        w = Weights.of(self._published()[0], version, digest, buffer=buffer)
        self._snapshot_buffer = w.packed if self.reuse_snapshots else None
        self._last_snapshot = weakref.ref(w)
        return w

    def torch_threads(self) -> int:
        return torch.get_num_threads()

    def placement(self) -> dict[str, str]:
        """Where the model's components live (``model.placement()``: the transformer's device, each text encoder's,
        the VAE's or "released"); {} for a model that does not say."""
        placement = getattr(self.model, "placement", None)
        return placement() if placement is not None else {}

    def trainable_bytes(self) -> int:
        """Bytes of one published version (what every sampler loads)."""
        return sum(t.numel() * t.element_size() for t in self._published()[0].values())

    def weights_info(self) -> tuple[int, str]:
        """(version, checksum) without copying or shipping the tensors."""
        tensors, digest = self._published()
        return self.version, digest or checksum(tensors)

    # -- the learner group (runtime.learner.count ranks) ---------------------------------------------------------
    def _reduce_epoch_metrics(self, ep: EpochState) -> None:
        """Every rank's share of the epoch's metrics added up (maxima maxed), so each rank reports the epoch's."""
        if self._grads is None:
            return
        sums = {k: v for k, v in ep.sums.items() if k != "log_rho_abs_max"} | {"_lag_sum": ep.lag_sum}
        maxima = {"_lag_max": ep.lag_max} | (
            {"log_rho_abs_max": ep.sums["log_rho_abs_max"]} if "log_rho_abs_max" in ep.sums else {}
        )
        sums, maxima = self._grads.reduce_metrics(sums, maxima)
        ep.lag_sum, ep.lag_max = sums.pop("_lag_sum"), int(maxima.pop("_lag_max"))
        ep.sums = sums | maxima

    def learner_group_address(self, peers_on_this_node: bool) -> tuple[str, int]:
        """Rank 0: where the other ranks meet it (loopback when they all run on this node)."""
        from learner.collective import rendezvous_address

        return rendezvous_address(peers_on_this_node)

    def join_learner_group(self, master_addr: str, master_port: int, backend: str, timeout_s: float = 120.0) -> int:
        """Form the learner group with the other ranks (each calls this at once); returns this rank. Sharded
        (fsdp), the group's store also hosts this process's default group, and the transformer is sharded over it."""
        from learner.collective import GradientGroup

        self._grads = GradientGroup(self.rank, self.world_size, master_addr, master_port, backend, timeout_s)
        if self.sharding == "fsdp":
            self._shard(backend, timeout_s)
        return self.rank

    def _shard(self, backend: str, timeout_s: float) -> None:
        """FSDP2 over the learner group: the transformer sharded in place (its fp32 shards are the masters, stepped
        by a new AdamW with the same settings), then the first publication gathered."""
        group = init_default_group(self.rank, self.world_size, self._grads._store, backend, timeout_s)
        tr = shard_transformer(self.model.transformer, group, self.model.device, param_dtype=self._dtype)
        self.params = [p for p in tr.parameters() if p.requires_grad]
        self.masters = None
        self.opt = self._adamw(self.params)
        self.gather_weights()

    # -- full-weight broadcast over a collective group (gloo on CPU, NCCL on GPU); LoRA uses the object store
    def weight_backend(self) -> str:
        """The collective backend this actor's weights can travel over: NCCL from a GPU, gloo from a CPU."""
        return "nccl" if self.model.device.type == "cuda" else "gloo"

    def node_id(self) -> str | None:
        """The Ray node this learner runs on (None outside Ray); the runtime compares it with the samplers'."""
        from learner.collective import node_id

        return node_id()

    def weight_group_address(self, peers_on_this_node: bool) -> tuple[str, int]:
        """(host, free port) for a new weight-group generation with this learner as rank 0: 127.0.0.1 when every
        sampler of the group runs on this learner's node, else this node's cluster address (``rendezvous_address``)."""
        from learner.collective import rendezvous_address

        return rendezvous_address(peers_on_this_node)

    def join_weight_group(
        self, *, world_size: int, master_addr: str, master_port: int, backend: str = "gloo", timeout_s: float = 120.0
    ) -> None:
        from learner.collective import WeightGroup

        if getattr(self, "_group", None) is not None:
            self._group.close()
        self._group = WeightGroup(0, world_size, master_addr, master_port, backend=backend, timeout_s=timeout_s)

    def send_weights(self) -> dict:
        """Broadcast the trainable tensors to every sampler of the group; returns {version, checksum}."""
        sent = self._group.send(self._published()[0], version=self.version)
        return {"version": self.version, "checksum": sent}

    def leave_weight_group(self) -> None:
        if getattr(self, "_group", None) is not None:
            self._group.close()
            self._group = None

    def save(self, run_dir: str, state: dict, config: dict) -> str | None:
        """Checkpoint weights, optimizer and ``state`` under ``run_dir``; returns the folder. Sharded (fsdp), every
        rank calls it at once (the full weights and AdamW moments are gathered: collectives), rank 0 writes them in
        one learner's layout and returns the folder, the others None."""
        from learner.checkpoint import save_checkpoint

        ours = {"skipped_steps": self.skipped_steps, "grad_scaler": self.scaler.state_dict()}
        gathered = None
        if self.sharding == "fsdp":
            try:
                gathered = {
                    "state": full_state(self.model.transformer, device="cpu"),
                    "dtype": self._dtype,
                    "optimizer": full_optimizer_state(self.opt),
                }
            except RuntimeError as e:
                if peer_lost(e):
                    raise LearnerGroupBroken(f"learner rank {self.rank}: a checkpoint's gather failed ({e})") from e
                raise
            if self.rank != 0:
                return None
        return str(save_checkpoint(run_dir, self, {**state, "learner": ours}, config, gathered=gathered))

    def load(self, folder: str) -> dict:
        """Restore from a checkpoint folder (of any number of ranks); returns its saved ``state``. Sharded (fsdp),
        every rank calls it at once."""
        from learner.checkpoint import load_checkpoint

        state = dict(load_checkpoint(folder, self))
        if self.masters is not None and not state.pop("_masters_loaded", False):
            with torch.no_grad():  # a checkpoint without masters: start them from its weights
                for m, p in zip(self.masters, self.params):
                    m.copy_(p)
        ours = state.pop("learner", {})
        self.skipped_steps = int(ours.get("skipped_steps", 0))
        if ours.get("grad_scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ours["grad_scaler"])
        return state
