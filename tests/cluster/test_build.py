"""What a config builds is checked before anything is built: every reward component and eval metric (name,
settings and their types, weights files, the judge template) fails with the problem and the fix named, and
the Ray runtime raises it before it connects to a cluster."""

from __future__ import annotations

import pytest

from cluster.build import check_run
from cluster.config import load_config


def check(*overrides):
    check_run(load_config("tiny-cpu", list(overrides)))


def test_the_presets_pass():
    for preset in ("tiny-cpu", "shapes", "sd35m-combined", "sd35m-pickscore"):
        check_run(load_config(preset))


def test_an_unknown_scorer_lists_the_known_ones():
    with pytest.raises(
        ValueError, match=r"reward.components: component 0: unknown reward 'jpg'; known rewards: .*jpeg_compressibility"
    ):
        check("reward.components=[{name: jpg, weight: 1}]")


def test_a_misspelt_setting_lists_the_scorers_settings():
    with pytest.raises(
        ValueError, match=r"component 0 \(jpeg_compressibility\): unknown setting 'qualty'; its settings are quality$"
    ):
        check("reward.components=[{name: jpeg_compressibility, weight: 1, qualty: 90}]")
    # settings a scorer forwards to its CLIP embedder count as its own; a typo names them all
    with pytest.raises(
        ValueError,
        match=r"\(pickscore\): unknown setting 'batchsize'; its settings are batch_size, device, dtype, model, processor$",
    ):
        check("reward.components=[{name: pickscore, weight: 1, batchsize: 8}]")


def test_a_setting_of_the_wrong_type_says_what_it_should_be():
    with pytest.raises(ValueError, match=r"\(jpeg_compressibility\): quality = a str should be int$"):
        check("reward.components=[{name: jpeg_compressibility, weight: 1, quality: high}]")
    with pytest.raises(ValueError, match=r"\(vlm_judge\): image_size = 1.5 should be int or None$"):
        check("reward.components=[{name: vlm_judge, weight: 1, image_size: 1.5}]")


def test_a_missing_weight_is_named():
    with pytest.raises(
        ValueError,
        match=r"component 0 \(jpeg_compressibility\): weight must be a finite number, e\.g\. 'weight': 1\.0; got None",
    ):
        check("reward.components=[{name: jpeg_compressibility}]")


def test_missing_weights_files_fail_before_loading(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"\(aesthetic\): aesthetic head weights: no file at '.*nope.pth'; download it and pass its path",
    ):
        check(f"reward.components=[{{name: aesthetic, weight: 1, head: {tmp_path}/nope.pth}}]")
    with pytest.raises(FileNotFoundError, match=r"\(hpsv2\): HPSv2 checkpoint: no file at 'HPS_v2.1_compressed.pt'"):
        check("reward.components=[{name: hpsv2, weight: 1, checkpoint: HPS_v2.1_compressed.pt}]")
    with pytest.raises(
        FileNotFoundError,
        match=r"\(pickscore\): model='./no/such/dir' does not exist; point it at the downloaded files or use the hub id",
    ):
        check("reward.components=[{name: pickscore, weight: 1, model: ./no/such/dir}]")
    with pytest.raises(FileNotFoundError, match=r"imagereward model='/no/such' is not a directory"):
        check("reward.components=[{name: imagereward, weight: 1, model: /no/such}]")


def test_the_judge_template_and_backend_settings_are_checked():
    with pytest.raises(
        ValueError,
        match=r"\(vlm_judge\): judge question template 'Is this a cat\?' must contain the placeholder \{prompt\}",
    ):
        check("reward.components=[{name: vlm_judge, weight: 1, question: 'Is this a cat?'}]")
    with pytest.raises(
        ValueError, match=r"\(vlm_judge\): backend 'server': unknown setting 'urll'; its settings are .*url"
    ):
        check("reward.components=[{name: vlm_judge, weight: 1, backend: server, urll: 'http://127.0.0.1:8000'}]")
    with pytest.raises(ValueError, match=r"unknown judge backend 'tgi'"):
        check("reward.components=[{name: vlm_judge, weight: 1, backend: tgi}]")


def test_a_setting_that_may_be_a_secret_is_not_echoed():
    with pytest.raises(ValueError) as e:
        check(
            "reward.components=[{name: vlm_judge, weight: 1, backend: server, api_key: sk-planted-1234, max_concurrency: x}]"
        )
    assert "max_concurrency = a str should be int" in str(e.value) and "sk-planted-1234" not in str(e.value)
    from rewards.combined import CombinedReward

    with pytest.raises(
        ValueError,
        match=r"^reward spec vlm_judge \(settings: api_key, backend\) has no 'weight'; add e.g. 'weight': 1.0$",
    ):
        CombinedReward(specs=[{"name": "vlm_judge", "backend": "server", "api_key": "sk-planted-1234"}])


def test_eval_metrics_are_checked_too():
    with pytest.raises(ValueError, match=r"eval.metrics\[1\]: unknown reward 'shapes_exactt'"):
        check("eval.metrics=[{name: shapes_exact}, {name: shapes_exactt}]")


def test_a_bad_model_path_is_named(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"model.path='.*nowhere' is not a folder; build one with `python -m tasks.shapes.pretrain",
    ):
        check_run(load_config("shapes", [f"model.path={tmp_path}/nowhere"]))


def test_the_ray_runtime_checks_before_it_connects(monkeypatch):
    import cluster.runtime as runtime

    def no_cluster(*_, **__):
        raise AssertionError("connected to Ray before checking the config")

    monkeypatch.setattr(runtime, "connect", no_cluster)
    cfg = load_config("tiny-cpu", ["reward.components=[{name: jpeg_compressibility, weight: 1, qualty: 9}]"])
    with pytest.raises(ValueError, match="unknown setting 'qualty'"):
        runtime.run_ray(cfg)
