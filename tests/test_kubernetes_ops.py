"""deploy/kubernetes/ beyond the workloads (issue 21): the request store on PostgreSQL from a
Secret (the dev pod, CloudNativePG's), autoscaling on the queue depth the scheduler exports,
what the scheduler's probes and worker gauge answer, the Secrets make_secrets.py makes, and
the README's walk-through. Offline, like tests/test_kubernetes.py."""

from __future__ import annotations

import pytest

yaml = pytest.importorskip("yaml")

from kube_manifests import (  # noqa: E402
    KUBE,
    OVERLAYS,
    container,
    env_of,
    ms,
    one,
    port,
    rendered,
    scheduler,
)


def test_the_schedulers_probes_and_worker_gauge_mean_what_the_manifests_say():
    """/livez: the engine runs (whatever the workers do); /health: it runs and a worker is
    registered. Both open without the API key, as probes are; /metrics counts draining workers."""
    from fastapi.testclient import TestClient
    from security.test_edge_http import FakeEngine, make_frontend

    from ecoserve_scheduler.live.http_api import create_app

    engine = FakeEngine()
    with TestClient(create_app(make_frontend(engine), "tiny", api_key="k")) as c:
        assert c.get("/livez").status_code == 200 and c.get("/health").status_code == 200
        engine.worker_ids = lambda: []  # every worker gone
        assert c.get("/livez").status_code == 200  # alive: a restart would bring none back
        assert c.get("/health").status_code == 503  # but not ready for clients
        engine.failure = "engine core exited (code 1)"
        live = c.get("/livez")
        assert (live.status_code, live.json()["status"]) == (503, engine.failure)
        engine.stats_snapshot = {"workers": ["w0", "w1"], "draining": {"w0": 2}}
        page = c.get("/metrics").text
        assert 'ecoserve_workers{state="draining"} 1.0' in page
        assert 'ecoserve_workers{state="serving"} 1.0' in page


# ---- the store, autoscaling, monitoring -------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_store_is_postgresql_from_a_secret(overlay, tmp_path):
    objs = rendered(overlay)
    _, c, _ = scheduler(overlay, tmp_path)
    (_, secret, key) = env_of(objs, c)["ECOSERVE_DB_URL"]
    clusters = [o for o in objs if o["kind"] == "Cluster"]
    postgres_pods = [o for o in objs if o["metadata"]["name"] == "ecoserve-postgres"]
    if overlay == "overlays/production":  # CloudNativePG's Secret for its cluster
        (cluster,) = clusters
        assert (secret, key) == (cluster["metadata"]["name"] + "-app", "uri")
        initdb = cluster["spec"]["bootstrap"]["initdb"]
        assert cluster["spec"]["instances"] >= 2 and initdb == {
            "database": "ecoserve",
            "owner": "ecoserve",
        }
        assert not postgres_pods
        return
    assert (secret, key) == (ms.DB, "url") and not clusters
    if overlay != "overlays/dev":
        assert not postgres_pods  # a single PostgreSQL pod only in the dev overlay
        return
    # the dev pod and the URL make_secrets.py --dev-postgres writes agree
    (url,) = [
        s["stringData"]["url"]
        for s in ms.make_secrets(dev_postgres=True)
        if s["metadata"]["name"] == ms.DB
    ]
    _, pg = container(objs, "StatefulSet", "ecoserve-postgres", "postgres")
    pg_env = env_of(objs, pg)
    d = ms.DEV_DB
    assert (pg_env["POSTGRES_USER"], pg_env["POSTGRES_DB"]) == (d["user"], d["database"])
    assert pg_env["POSTGRES_PASSWORD"] == ("secret", ms.DEV_POSTGRES, "password")
    svc = one(objs, "Service", d["host"])
    assert [p["port"] for p in svc["spec"]["ports"]] == [d["port"]] == [port(pg, "postgres")]
    assert url.startswith(f"postgresql+psycopg://{d['user']}:") and url.endswith(
        f"@{d['host']}:{d['port']}/{d['database']}"
    )


def test_a_bare_postgresql_url_uses_psycopg_3():
    pytest.importorskip("psycopg")
    from ecoserve_scheduler.store import make_engine, with_driver

    uri = "postgresql://app:pw@ecoserve-pg-rw.ecoserve:5432/ecoserve"  # CloudNativePG's `uri`
    assert with_driver(uri) == "postgresql+psycopg://app:pw@ecoserve-pg-rw.ecoserve:5432/ecoserve"
    assert with_driver("postgres://a@h/d") == "postgresql+psycopg://a@h/d"
    assert with_driver("sqlite:///x.db") == "sqlite:///x.db"
    assert make_engine(uri).dialect.driver == "psycopg"  # no connection is made


def test_workers_autoscale_on_the_queue_depth_the_scheduler_exports():
    from ecoserve_scheduler.live.http_api.metrics import Metrics

    objs = rendered("overlays/production")
    hpa = one(objs, "HorizontalPodAutoscaler", "ecoserve-worker")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "ecoserve-worker",
    }
    assert "replicas" not in one(objs, "Deployment", "ecoserve-worker")["spec"]  # the HPA's
    (metric,) = hpa["metrics"]
    name = metric["object"]["metric"]["name"]
    exported = {m.name for m in Metrics().registry.collect()}
    assert name == "ecoserve_waiting_requests" and name in exported
    described = metric["object"]["describedObject"]
    svc = one(objs, described["kind"], described["name"])
    assert metric["object"]["target"]["type"] == "AverageValue"  # per worker
    # Prometheus scrapes that Service (the ServiceMonitor), prometheus-adapter serves the metric
    monitor = one(objs, "ServiceMonitor", "ecoserve-scheduler")["spec"]
    services = [o for o in objs if o["kind"] == "Service"]
    picked = [
        o
        for o in services
        if monitor["selector"]["matchLabels"].items() <= o["metadata"]["labels"].items()
    ]
    assert picked == [svc]  # the API Service only, not the worker plane's
    assert [(e["port"], e["path"]) for e in monitor["endpoints"]] == [("http", "/metrics")]
    assert "http" in {p["name"] for p in svc["spec"]["ports"]}
    values = KUBE / "components/autoscaling/prometheus-adapter-values.yaml"
    (rule,) = yaml.safe_load(values.read_text())["rules"]["custom"]
    assert rule["seriesQuery"].startswith(name + "{") and rule["name"]["as"] == name
    assert rule["resources"]["overrides"]["service"] == {"resource": "service"}
    for overlay in OVERLAYS:
        if overlay != "overlays/production":  # opt-in: the others need no Prometheus stack
            kinds = {o["kind"] for o in rendered(overlay)}
            assert not kinds & {"HorizontalPodAutoscaler", "ServiceMonitor"}, overlay


# ---- the Secrets make_secrets.py makes --------------------------------------------------------


def test_the_curve_secrets_load_as_the_pods_mount_them(tmp_path):
    """Written out as the volumes lay them out (files 0400, kubelet's 0755 directories), the
    scheduler's and the worker's keys load, and each side trusts the other's."""
    from ecoserve_common.curve import ServerKeys, WorkerKeys, allowed_keys

    objs = rendered("overlays/cpu")
    made = {s["metadata"]["name"]: s["stringData"] for s in ms.make_secrets()}
    sides = (("StatefulSet", "ecoserve-scheduler", "s"), ("Deployment", "ecoserve-worker", "w"))
    for kind, name, root in sides:
        pod = one(objs, kind, name)["spec"]["template"]["spec"]
        (v,) = [v for v in pod["volumes"] if v["name"] == "curve"]
        data = made[v["secret"]["secretName"]]
        items = v["secret"].get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            path = tmp_path / root / item["path"]
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            path.write_text(data[item["key"]])
            path.chmod(v["secret"]["defaultMode"])
    server, worker = ServerKeys.load(tmp_path / "s"), WorkerKeys.load(tmp_path / "w")
    assert worker.pair.public in allowed_keys(server.allowed_dir)
    assert worker.server_public == server.pair.public
    assert made[ms.AUTH]["worker-auth-token"] and made[ms.AUTH]["api-key"]
    assert ms.make_secrets()[0] != ms.make_secrets()[0]  # fresh keys each time


def test_the_readme_walks_through_every_overlay():
    text = (KUBE / "README.md").read_text()
    for overlay in OVERLAYS[1:]:
        assert f"deploy/kubernetes/{overlay}" in text, overlay
    assert "make_secrets.py" in text and "kubectl apply -k" in text
