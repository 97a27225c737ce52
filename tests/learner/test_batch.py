"""The Arrow batch contract: round trip keeps values, shapes and dtypes; bad batches are rejected clearly."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.sampling import PairTrajectory
from learner.batch import DR, X, batch_schema, check_schema, from_arrow, to_arrow
from learner.loss import pair_signal


def _traj(dtype, P=3, N=4, lat=(2, 3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(P, 2, N, *lat, generator=g).to(dtype)
    vs = torch.randn(P, 2, N, *lat, generator=g).to(dtype)
    return PairTrajectory(xs, vs, torch.linspace(1, 0, N + 1), torch.randn(P, 2, *lat, generator=g), [7, 8, 9][:P])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_keeps_values_shapes_and_dtypes(dtype):
    traj = _traj(dtype)
    rewards = np.array([[1.0, 2.0], [0.5, 0.5], [-1.0, 3.0]])
    rb = to_arrow(traj, rewards, [0, 1, 2], [10, 11, 12], ["a", "b", "c"], policy_version=5, guidance_scale=1.0)
    assert rb.num_rows == 6
    # survives Arrow IPC (what the object store does) unchanged
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rb.schema) as w:
        w.write_batch(rb)
    rb2 = pa.ipc.open_stream(sink.getvalue()).read_next_batch()
    tb = from_arrow(rb2)
    assert tb.x.dtype == dtype and tb.v.dtype == dtype
    assert tb.x.shape == (6, 4, 2, 3, 3) and tb.d.shape == (6, 2, 3, 3) and tb.sigmas.shape == (6, 4)
    assert torch.equal(tb.x.view(3, 2, 4, 2, 3, 3), traj.xs)
    assert torch.equal(tb.v.view(3, 2, 4, 2, 3, 3), traj.vs)
    dR, d = pair_signal(torch.tensor(rewards), traj.x_final)
    assert torch.equal(tb.dR, dR.reshape(-1)) and torch.equal(tb.d, d.reshape(6, 2, 3, 3))
    assert tb.dR.tolist() == [-0.5, 0.5, 0.0, 0.0, -2.0, 2.0]
    assert tb.policy_version.tolist() == [5] * 6
    assert tb.pair_id.tolist() == [10, 10, 11, 11, 12, 12] and tb.branch.tolist() == [0, 1] * 3
    assert tb.prompt == ["a", "a", "b", "b", "c", "c"]
    assert torch.equal(tb.sigmas[0], torch.linspace(1, 0, 5)[:4])


def test_wrong_shape_or_dtype_is_rejected_with_the_column_named():
    rb = to_arrow(_traj(torch.float32), np.zeros((3, 2)), [0, 1, 2], [0, 1, 2], ["a", "b", "c"], 0)
    with pytest.raises(ValueError, match=r"column 'x' has type .*expected"):
        from_arrow(rb, expected=batch_schema(4, (2, 4, 4), torch.float32))
    with pytest.raises(ValueError, match=r"column 'x' has type .*bfloat16"):
        from_arrow(rb, expected=batch_schema(4, (2, 3, 3), torch.bfloat16))
    bad = rb.set_column(rb.schema.get_field_index(DR), DR, pa.array(["x"] * 6))
    with pytest.raises(ValueError, match="column 'dR'"):
        check_schema(bad.schema)
    with pytest.raises(ValueError, match="missing column 'reward'"):
        check_schema(rb.drop_columns(["reward"]).schema)
    with pytest.raises(ValueError, match="not an fdfo batch"):
        from_arrow(pa.record_batch({X: [1, 2]}))


def test_rewards_must_be_one_per_branch():
    with pytest.raises(ValueError, match=r"rewards must be \[P, 2\]"):
        to_arrow(_traj(torch.float32), np.zeros(3), [0, 1, 2], [0, 1, 2], ["a", "b", "c"], 0)
