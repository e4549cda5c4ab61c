"""The Secrets the manifests read, made fresh and printed as one JSON List for `kubectl apply`.

    python deploy/kubernetes/make_secrets.py -n ecoserve --dev-postgres | kubectl apply -f -
    ECOSERVE_DB_URL=postgresql+psycopg://... python deploy/kubernetes/make_secrets.py -n ecoserve \\
        | kubectl apply -f -

Nothing secret is ever in the manifests, an image or a command line (the hardening issue):

- `ecoserve-curve-scheduler` (`server.key_secret`, `worker.key`) and `ecoserve-curve-worker`
  (`server.key`, `worker.key_secret`): the worker plane's CURVE keys, split so that each side
  holds only what it needs (`ecoserve_common.curve`: the scheduler's pair and the allowed
  worker public key; the scheduler's public key and the worker's pair). Made by
  `init_keys` in a private temporary directory, or taken from `--keys-dir` (an existing
  `python -m ecoserve_common.curve init DIR`);
- `ecoserve-auth` (`worker-auth-token`, `api-key`): the shared secret workers present when they
  register and the bearer key clients send; fresh random values, or `--api-key-file`;
- `ecoserve-db` (`url`): the request store's SQLAlchemy URL, from `$ECOSERVE_DB_URL` (the
  environment, never a flag: `ps` shows flags), or with `--dev-postgres` one for the dev
  overlay's single PostgreSQL pod, whose password goes in `ecoserve-postgres-dev`
  (`password`). With CloudNativePG (the `cloudnative-pg` component) the operator makes the
  database's Secret itself and `ecoserve-db` is not needed.

Values go in `stringData`, so the output is readable by whoever runs this; keep it off disk (pipe
it into kubectl). Needs the `ecoserve-common` distribution (pyzmq) only.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
from pathlib import Path

from ecoserve_common.curve import ALLOWED, SERVER, WORKER, init_keys

# What the manifests reference, by Secret name: the keys each holds (tests check both agree).
CURVE_SCHEDULER = "ecoserve-curve-scheduler"
CURVE_WORKER = "ecoserve-curve-worker"
AUTH = "ecoserve-auth"
DB = "ecoserve-db"
DEV_POSTGRES = "ecoserve-postgres-dev"
# The dev overlay's PostgreSQL pod (overlays/dev/postgres.yaml): user, database, Service, port.
DEV_DB = {"user": "ecoserve", "database": "ecoserve", "host": "ecoserve-postgres", "port": 5432}


def secret(name: str, namespace: str, data: dict[str, str]) -> dict:
    meta = {"name": name, "labels": {"app.kubernetes.io/part-of": "ecoserve"}}
    if namespace:
        meta["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": "Opaque",
        "stringData": data,
    }


def curve_secrets(keys_dir: Path, namespace: str) -> list[dict]:
    """The two CURVE Secrets from a key directory laid out as `init_keys` makes it."""

    def read(name: str) -> str:
        return (keys_dir / name).read_text()

    scheduler = {
        f"{SERVER}.key_secret": read(f"{SERVER}.key_secret"),
        f"{WORKER}.key": read(f"{ALLOWED}/{WORKER}.key"),
    }
    worker = {
        f"{SERVER}.key": read(f"{SERVER}.key"),
        f"{WORKER}.key_secret": read(f"{WORKER}.key_secret"),
    }
    return [secret(CURVE_SCHEDULER, namespace, scheduler), secret(CURVE_WORKER, namespace, worker)]


def make_secrets(
    namespace: str = "",
    keys_dir: Path | None = None,
    api_key: str = "",
    db_url: str = "",
    dev_postgres: bool = False,
) -> list[dict]:
    """Every Secret the manifests read (see the module docstring), fresh random values where
    none is given."""
    if keys_dir is not None:
        items = curve_secrets(keys_dir, namespace)
    else:
        with tempfile.TemporaryDirectory() as tmp:  # 0700; the keys never outlive this call
            items = curve_secrets(init_keys(Path(tmp) / "keys"), namespace)
    auth = {"worker-auth-token": secrets.token_hex(16), "api-key": api_key or secrets.token_hex(24)}
    items.append(secret(AUTH, namespace, auth))
    if dev_postgres:
        password = secrets.token_hex(16)
        items.append(secret(DEV_POSTGRES, namespace, {"password": password}))
        d = DEV_DB
        db_url = (
            f"postgresql+psycopg://{d['user']}:{password}@{d['host']}:{d['port']}/{d['database']}"
        )
    if db_url:
        items.append(secret(DB, namespace, {"url": db_url}))
    return items


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deploy/kubernetes/make_secrets.py", description=__doc__)
    p.add_argument("-n", "--namespace", default="", help="default: kubectl's current one")
    p.add_argument("--keys-dir", type=Path, help="existing CURVE keys (default: fresh ones)")
    p.add_argument("--api-key-file", type=Path, help="the clients' API key (default: random)")
    p.add_argument(
        "--dev-postgres",
        action="store_true",
        help="a password for the dev overlay's PostgreSQL pod and the URL that reaches it",
    )
    a = p.parse_args(argv)
    api_key = a.api_key_file.read_text().strip() if a.api_key_file else ""
    db_url = os.environ.get("ECOSERVE_DB_URL", "")
    if a.dev_postgres and db_url:
        p.error("--dev-postgres makes the URL: unset ECOSERVE_DB_URL")
    items = make_secrets(a.namespace, a.keys_dir, api_key, db_url, a.dev_postgres)
    if not (db_url or a.dev_postgres):
        print(
            f"note: no {DB} Secret (set ECOSERVE_DB_URL, or --dev-postgres); the cuda and cpu "
            "overlays need one, the production overlay (CloudNativePG) does not",
            file=sys.stderr,
        )
    ns = f" -n {a.namespace}" if a.namespace else ""
    print(
        f"the API key: kubectl{ns} get secret {AUTH} -o jsonpath='{{.data.api-key}}' | base64 -d",
        file=sys.stderr,
    )
    json.dump({"apiVersion": "v1", "kind": "List", "items": items}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
