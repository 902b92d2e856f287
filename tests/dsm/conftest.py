"""Fortanix DSM's own clients against a real daemon over HTTPS.

One daemon for the whole package (per test worker), its gateway serving TLS
with a throwaway CA (:mod:`tests.dsm.certs`). :func:`sdk` gives DSM's
generated REST SDK (``sdkms.v1``) logged in with an API key the way DSM's
documentation shows (HTTP Basic of ``app_id:secret`` on ``/sys/v1/session/auth``,
then the bearer token); :func:`cli` runs DSM's ``sdkms-cli`` as a subprocess with
the API key in the environment, never in argv.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sdkms.v1 as v1

from tests.conftest import Daemon, start_daemon
from tests.daemon.gateway.conftest import gateway_url
from tests.dsm.certs import Certs, make_certs, tls_config

CLI = Path(sys.executable).with_name("sdkms-cli")


@dataclass
class Dsm:
    daemon: Daemon
    url: str
    certs: Certs

    @property
    def admin_key(self) -> str:
        return self.daemon.admin_key


def configuration(dsm: Dsm) -> v1.Configuration:
    """An SDK configuration that verifies the gateway against the test CA."""
    cfg = v1.Configuration()
    cfg.host = dsm.url
    cfg.ssl_ca_cert = str(dsm.certs.ca)
    cfg.verify_ssl = True
    return cfg


def sdk(dsm: Dsm, api_key: str) -> v1.ApiClient:
    """An SDK client logged in with ``api_key`` (base64 ``id:secret``), as DSM's
    examples do: Basic credentials to ``authorize()``, then the bearer token."""
    cfg = configuration(dsm)
    cfg.app_api_key = api_key
    auth = v1.AuthenticationApi(v1.ApiClient(configuration=cfg)).authorize()
    assert auth.token_type == "Bearer" and auth.access_token
    cfg = configuration(dsm)
    cfg.api_key["Authorization"] = auth.access_token
    cfg.api_key_prefix["Authorization"] = "Bearer"
    return v1.ApiClient(configuration=cfg)


def api_key_of(credential_app_id: str, secret: str) -> str:
    return base64.b64encode(f"{credential_app_id}:{secret}".encode()).decode()


@pytest.fixture(scope="session")
def dsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dsm]:
    base = tmp_path_factory.mktemp("dsm")
    certs = make_certs(base / "certs")
    d = start_daemon(base, config=tls_config(certs))
    try:
        yield Dsm(d, gateway_url(d), certs)
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]


@pytest.fixture(scope="session")
def admin(dsm: Dsm) -> v1.ApiClient:
    return sdk(dsm, dsm.admin_key)


@dataclass
class App:
    app_id: str
    api_key: str
    group_id: str
    client: v1.ApiClient


@pytest.fixture(scope="session")
def app(dsm: Dsm, admin: v1.ApiClient) -> App:
    """A group and an app with every permission in it, made with the SDK as admin.

    DSM's SDK models an app without its credential, so the API key that Strongroom
    returns once, in the answer to the app's creation, is read from the raw answer
    (``_preload_content=False``): Strongroom keeps only a hash of the secret, and
    ``GET /sys/v1/apps/{id}/credential`` cannot give it back (see test_admin.py).
    """
    group = v1.GroupsApi(admin).create_group(v1.GroupRequest(name=unique("group")))
    made = raw_json(
        v1.AppsApi(admin).create_app_with_http_info(
            v1.AppRequest(
                name=unique("app"), default_group=group.group_id, add_groups=[group.group_id]
            ),
            _preload_content=False,
        )
    )
    key = made["credential"]["api_key"]
    return App(made["app_id"], key, group.group_id, sdk(dsm, key))


def raw_json(answer: tuple) -> Any:
    """The JSON of an SDK call made with ``_preload_content=False``."""
    response = answer[0]
    return json.loads(response.data)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class Cli:
    """DSM's sdkms-cli, as a subprocess, with its token file in a temporary directory."""

    dsm: Dsm
    token_file: Path

    def __call__(
        self, *args: str, api_key: str | None = None, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        env = {
            **os.environ,
            "FORTANIX_API_ENDPOINT": self.dsm.url,
            "SDKMS_CLI_TOKEN_FILE": str(self.token_file),
        }
        env.pop("FORTANIX_API_KEY", None)
        if api_key is not None:
            env["FORTANIX_API_KEY"] = api_key
        return subprocess.run(
            [str(CLI), "--ssl-ca-cert", str(self.dsm.certs.ca), *args],
            env=env,
            input=stdin,
            capture_output=True,
            timeout=60,
            check=False,
        )

    def raw(self, *args: str, **kw) -> bytes:
        out = self(*args, **kw)
        assert out.returncode == 0, (args, out.stdout, out.stderr)
        return out.stdout

    def ok(self, *args: str, **kw) -> str:
        return self.raw(*args, **kw).decode()
