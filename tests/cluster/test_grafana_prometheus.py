"""fdfo's Grafana dashboard: it shows every fdfo_* metric the runtime exports, and a real Prometheus (Debian's
`prometheus`) scraping a short local run's Ray metrics endpoint answers every panel's query, with the run's
pairs trained as the ledger counted them."""

import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from cluster.config import load_config
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "cluster" / "deploy" / "grafana" / "fdfo_grafana_dashboard.json"
RUN = "promrun"


def exported_metrics() -> set[str]:
    """The fdfo_* names cluster/metrics.py's Metrics registers."""
    return set(re.findall(r'"(fdfo_[a-z_]+)"', (ROOT / "cluster" / "metrics.py").read_text()))


def panel_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_shows_every_exported_metric():
    # Ray exports a metric `fdfo_x` as `ray_fdfo_x` (counters with `_total`)
    # (histograms as `_bucket` / `_sum` / `_count` series)
    shown = {
        re.sub(r"_(total|bucket|sum|count)$", "", m)[len("ray_") :]
        for q in panel_queries()
        for m in re.findall(r"ray_fdfo_[a-z_]+", q)
    }
    assert shown == exported_metrics()
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "fdfo-training"
    assert [v["name"] for v in dash["templating"]["list"]] == ["datasource", "run"]
    assert all('run=~"$run"' in q for q in panel_queries())


def prom_query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def start_prometheus(tmp_path, target: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: ray\n    static_configs:\n      - targets: ['{target}']\n"
    )
    with open(tmp_path / "prometheus.log", "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [
                shutil.which("prometheus"),
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return proc, f"http://127.0.0.1:{port}"


def wait_for(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"{what}: not within {timeout_s:g} s")


def prometheus_or_skip() -> str:
    """The ``prometheus`` binary; without one the test skips on a developer's machine but fails in CI (``CI`` set, as
    every CI service sets it), where .ci/setup.sh --tests installs it: a skip there would hide a broken setup."""
    found = shutil.which("prometheus")
    if found:
        return found
    why = (
        "Debian's `prometheus` is not installed (apt-get install prometheus; .ci/setup.sh --tests installs it where "
        "it runs as root with apt)"
    )
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{why}, and this is CI (CI={os.environ['CI']}): the dashboard test must run here, not skip")
    pytest.skip(why)


def test_a_missing_prometheus_fails_in_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    for ci in ("true", "1"):
        monkeypatch.setenv("CI", ci)
        with pytest.raises(
            pytest.fail.Exception, match=rf"^Debian's `prometheus` is not installed .*, and this is CI \(CI={ci}\)"
        ):
            prometheus_or_skip()
    for ci in ("", "false"):
        monkeypatch.setenv("CI", ci)
        with pytest.raises(pytest.skip.Exception, match="^Debian's `prometheus` is not installed"):
            prometheus_or_skip()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        prometheus_or_skip()
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setenv("CI", "true")
    assert prometheus_or_skip() == "/usr/bin/prometheus"


def test_prometheus_scrapes_a_run_and_answers_every_panel(ray_local, tmp_path):
    from cluster.runtime import run_ray

    prometheus_or_skip()
    cfg = load_config(
        "tiny-cpu",
        [
            f"name={RUN}",
            f"output_dir={tmp_path / 'runs'}",
            "train.epochs=2",
            "train.pairs_per_epoch=8",
            "train.updates_per_epoch=2",
            "sampling.pairs_per_call=4",
            "sampling.num_steps=4",
            "runtime.sampler.count=2",
            "runtime.sampler.num_cpus=1",
            "runtime.learner.num_cpus=1",
        ],
    )
    out = run_ray(cfg)
    trained = out["ledger"]["pairs_trained"]
    assert trained == 16
    proc, base = start_prometheus(tmp_path, f"127.0.0.1:{ray_local['metrics_port']}")
    try:
        wait_for(lambda: urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200, 30, "Prometheus ready")
        query = f'sum(ray_fdfo_pairs_trained_total{{run="{RUN}"}})'

        def scraped():
            res = prom_query(base, query)["data"]["result"]
            return res and float(res[0]["value"][1]) == trained

        wait_for(scraped, 40, f"{query} == {trained}")
        assert float(prom_query(base, query)["data"]["result"][0]["value"][1]) == 16.0
        # every panel's PromQL is valid, and the series a run always sets have data
        always = {"pairs_per_s", "images_per_s", "learner_loss", "weight_version", "pairs_trained", "learner_step_s"}
        for expr in panel_queries():
            concrete = expr.replace("$run", RUN).replace("$__rate_interval", "1m")
            answer = prom_query(base, concrete)
            assert answer["status"] == "success", (expr, answer)
            if any(f"ray_fdfo_{m}" in expr for m in always) and "rate(" not in expr:
                assert answer["data"]["result"], f"no data for {concrete}"
        # the staleness histogram counted every trained pair once, at its epoch's first update: with 2 updates an epoch
        # and max_policy_lag 3 at the last one, no pair starts more than 2 versions behind
        lagged = prom_query(base, f'sum(ray_fdfo_policy_lag_count{{run="{RUN}"}})')["data"]["result"]
        assert float(lagged[0]["value"][1]) == trained
        within_2 = prom_query(base, f'sum(ray_fdfo_policy_lag_bucket{{run="{RUN}", le="2.5"}})')["data"]["result"]
        assert float(within_2[0]["value"][1]) == trained
        version = prom_query(base, f'max(ray_fdfo_weight_version{{run="{RUN}"}})')["data"]["result"]
        assert float(version[0]["value"][1]) == out["version"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
