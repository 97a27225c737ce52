"""Old checkpoints go (train.keep_checkpoints); the newest, the one `latest` names and `best` stay."""

from learner.checkpoint import LATEST, prune_checkpoints


def make(folder, names, latest):
    for n in names:
        (folder / n).mkdir(parents=True)
    (folder / LATEST).write_text(latest)


def test_keeps_the_newest_by_version_number_not_by_name(tmp_path):
    make(tmp_path, ["v000004", "v000008", "v000012", "v100000", "best"], "v100000")
    assert prune_checkpoints(tmp_path, keep=2) == ["v000004", "v000008"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "latest", "v000012", "v100000"]


def test_the_folder_latest_names_is_never_deleted_and_zero_keeps_all(tmp_path):
    make(tmp_path, ["v000004", "v000008", "v000012"], "v000004")
    assert prune_checkpoints(tmp_path, keep=0) == []
    assert prune_checkpoints(tmp_path, keep=1) == ["v000008"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "v000004", "v000012"]
