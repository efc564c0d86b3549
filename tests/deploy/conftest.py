"""Fixtures for the deployment tests: a development certificate made by app.gateway.devcert."""

from __future__ import annotations

import ssl

import pytest

from app.gateway.devcert import DevCert, write_dev_cert


@pytest.fixture(scope="session")
def dev_cert(tmp_path_factory: pytest.TempPathFactory) -> DevCert:
    return write_dev_cert(tmp_path_factory.mktemp("certs"), ["localhost", "127.0.0.1"])


@pytest.fixture(scope="session")
def tls_context(dev_cert: DevCert) -> ssl.SSLContext:
    """Trusts the development CA only, with the default hostname and chain checks."""
    return ssl.create_default_context(cafile=str(dev_cert.ca))
