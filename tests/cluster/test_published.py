"""The register of published versions: what a sample call loads, proofs checked, versions orphaned by a restore."""

import pytest

from cluster.weight_sync import Published


def test_a_sample_call_carries_the_newest_version_on_the_object_store_path_only():
    published = Published(0, "c0", weights_ref="w0")
    assert published.to_load() == (0, "c0", ["w0"])
    published.record(1, "c1")
    assert published.to_load() == (0, "c0", ["w0"])  # recorded, not yet published
    published.publish(1, "w1")
    assert published.to_load() == (1, "c1", ["w1"])
    assert Published(0, "c0").to_load() is None  # the collective path: samplers hold the broadcast


def test_proofs_are_checked_and_sampler_calls_counted_by_version():
    published = Published(0, "c0")
    published.record(1, "c1")
    for proof in ({"version": 0, "checksum": "c0"}, {"version": 1, "checksum": "c1"}, {"version": 1, "checksum": "c1"}):
        published.count_call(proof | {"sampler": 0})
    published.check({"version": 1, "checksum": "c1", "sampler": 2})  # a joining sampler's load: not counted
    assert published.sampled == {0: 1, 1: 2}
    with pytest.raises(
        RuntimeError,
        match=r"^sampler 3 reports version 1 checksum bad but the learner broadcast "
        r"version 1 checksum c1: weight sync failed$",
    ):
        published.count_call({"version": 1, "checksum": "bad", "sampler": 3})
    assert published.sampled == {0: 1, 1: 2}


def test_a_restore_orphans_what_the_lost_learner_published_after_it():
    published = Published(0, "c0", weights_ref="w0")
    for version in (1, 2, 3):
        published.record(version, f"c{version}")
        published.publish(version, f"w{version}")
    # the new learner restored version 2 from a checkpoint, but its weights differ from what the lost one published
    # as version 2 (e.g. a different lineage): versions 2 and 3 of the lost learner are orphaned
    published.restore(2, "r2")
    assert published.orphaned == {(2, "c2"), (3, "c3")}
    assert published.checksums == {0: "c0", 1: "c1", 2: "r2"} and published.version == 2
    assert published.is_orphaned(3, "c3") and not published.is_orphaned(2, "r2") and not published.is_orphaned(1, "c1")
    # the same version restored with its own checksum orphans nothing more
    published.record(3, "d3")
    published.restore(3, "d3")
    assert published.orphaned == {(2, "c2"), (3, "c3")} and published.checksums[3] == "d3"
