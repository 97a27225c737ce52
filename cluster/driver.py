"""The fdfo driver in one process: sample -> score -> pack -> update -> publish, epoch after epoch.

Usage::

    fdfo train --config tiny-cpu --local                              # one process, breakpoint() works
    fdfo train --config tiny-cpu                                      # the Ray runtime (cluster/runtime.py)

``run_local`` is the whole algorithm as a map of the dataflow: the same Sampler, reward scorers and Learner
classes that the Ray runtime wraps in actors, called one stage after the other (cluster/pipeline.py names the
stages and keeps the books for both). Three hops to the math: this loop -> ``Learner.train_epoch`` ->
``learner.loss.fdfo_loss``.
"""

from __future__ import annotations

import logging
from functools import partial

from actors.sampler import Sampler
from cluster.build import build_model, check_run, make_reward
from cluster.config import Batching, RunConfig, grpo_of, to_dict
from cluster.evaluate import heldout_reward
from cluster.pipeline import Book, check_proof, deferred_interrupts, score_pairs, setup_process
from learner.learner import Learner

log = logging.getLogger("fdfo")


def run_local(cfg: RunConfig, resume: bool = False) -> dict:
    """One process, no Ray: each epoch samples pairs_per_epoch pairs with the current weights, then updates."""
    setup_process(cfg)
    check_run(cfg)
    reward = make_reward(cfg.reward)
    sampler = Sampler(
        partial(build_model, cfg.model), cfg.sampling, cfg.lora, precision=cfg.train.precision, grpo=grpo_of(cfg)
    )
    learner = Learner(
        partial(build_model, cfg.model, role="learner"),
        cfg.train,
        Batching.of(cfg),
        cfg.lora,
        seed=cfg.seed,
        grpo=grpo_of(cfg),
    )
    book = Book(
        cfg,
        resume=resume,
        evaluate=lambda png: heldout_reward(cfg, sampler.generate, reward.score, png),
        save=lambda epoch: learner.save(book.runlog.location, book.state(epoch), to_dict(cfg)),
    )
    if resume:
        book.resume(learner.load)
        book.version = book.last_checkpoint = learner.version
    publish(learner, sampler)  # both sides start from the same weights (version 0 or resumed)
    book.start()
    try:
        train(cfg, book, sampler, reward, learner)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: a checkpoint and the accounting line, then stop
        folder = book.save(book.epoch)
        log.warning(
            "stopped at epoch %d (version %d): checkpoint %s; %s", book.epoch, book.version, folder, book.ledger.line()
        )
        raise
    return book.finish(learner=learner, sampler=sampler)


def train(cfg: RunConfig, book: Book, sampler: Sampler, reward, learner: Learner) -> None:
    """The epochs: sample, score and pack an epoch of pairs with the current weights, update, publish; until
    ``train.epochs`` are done or the book stops the run early (the hacking guard: ``book.stop_reason``)."""
    while book.running:
        batches, todo = [], book.batching.pairs_per_epoch
        while todo > 0:
            req = book.request(min(cfg.sampling.pairs_per_call, todo))
            todo -= len(req["pair_ids"])
            job, images = sampler.sample(**req)  # sample
            with book.timers("score"):
                out = score_pairs(reward, images, req["prompts"])  # score
            batch, report = sampler.complete(job=job, rewards=out)  # pack
            kept, stats = book.record_request(req["pair_ids"], out, report)
            if kept:
                batches.append(batch)
                book.stats.add_rewards([stats])
        with deferred_interrupts():  # a stop lands after the epoch is recorded, not inside it
            m = learner.train_epoch(*batches) if batches else {"stale_pair_ids": [], "trained_pair_ids": []}  # update
            book.record_update(m)
            with book.timers("publish"):
                publish(learner, sampler)  # publish
            book.ledger.check()
            book.end_epoch(m)
    if book.stop_reason is not None:
        log.warning("stopped early at epoch %d of %d: %s", book.epoch, cfg.train.epochs, book.stop_reason)


def publish(learner, sampler) -> None:
    """The publish stage in process: the sampler loads the learner's weights and proves it holds them."""
    version, checksum = learner.weights_info()
    check_proof(sampler.set_weights(learner.weights()), version, checksum)
