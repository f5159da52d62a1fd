"""Pytest fixtures: a CouchDB-compatible server and fresh databases.

The server is PouchDB Server started in memory for the whole test session
(see ``tools/localserver.py``), or the server named by the environment
variable ``COUCHDB_URL`` when that is set.
"""

import os
import sys

import couchdb
import pytest

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from tools.localserver import running_server, temporary_database  # noqa: E402


@pytest.fixture(scope='session')
def server_url():
    """The base URL of the server the tests use, ending in '/'."""
    with running_server() as url:
        yield url


@pytest.fixture
def server(server_url):
    """A :class:`couchdb.Server` for :func:`server_url`."""
    return couchdb.Server(server_url)


@pytest.fixture
def db(server):
    """A fresh, randomly named :class:`couchdb.Database`, deleted afterwards."""
    with temporary_database(server) as database:
        yield database
