"""The tests of `session`, against a real CouchDB-compatible server.

Each test gets a fresh database (the `db` fixture of conftest.py), and the
server's state is checked with plain python-couchdb. The `wire` fixture
records every HTTP request python-couchdb makes, so tests can assert what
went over the wire. In this order:

- the contract of `Session`: reading, creating, deleting, views, change
  tracking, diffs, hooks and housekeeping, and a smoke run of the benchmark;
- property tests (Hypothesis): random changes to tracked documents against a
  plain model, diffs, JSON types, and the three-way merge with a concurrent
  writer;
- failures and conflicts: documents the server refuses, the ``on_conflict``
  policies, and connections that fail on the way, through the TCP forwarder
  of tools/forwarder.py (the `forwarder` and `remote` fixtures);
- attachments: inline and uploaded, deleted, read, in conflicts and over
  broken connections;
- deep documents: as deep as python-couchdb can send, through a flush and
  its conflicts, and 2000 levels deep without a server.
"""

import base64
import collections
import collections.abc
import concurrent.futures
import contextlib
import copy
import doctest
import errno
import gc
import hashlib
import http.client
import importlib.util
import io
import itertools
import json
import logging
import math
import mimetypes
import os
import random
import socket
import signal
import socketserver
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import weakref
import wsgiref.simple_server
from urllib.parse import parse_qs, parse_qsl, unquote, urlsplit

import couchdb
import couchdb.http
import jsonpatch
import jsonpointer
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize,
                                 invariant, precondition, rule,
                                 run_state_machine_as_test)

import session
from session import FlushError, Session
from tools.forwarder import Forwarder, is_bulk_docs, quorum_not_met
from tools.localserver import (SERVER_EXECUTABLE, _stop_process,
                               _wait_until_ready, find_free_port,
                               temporary_database)


# -- Fixtures and helpers -----------------------------------------------------

class Request(collections.namedtuple('Request', 'method path body query',
                                     defaults=(None,))):
    """One HTTP request: method, path, body and query (``{name: value}``,
    the values as sent).

    The path is relative to the database ('' for the database itself; the
    path of a request elsewhere stays whole). A JSON body is a snapshot
    (python-couchdb gets those as dicts and lists; the session gives the
    body of ``_bulk_docs`` encoded); any other body is what was given: an
    attachment's bytes, or the file-like object streamed."""

    __slots__ = ()

    def __repr__(self):
        return '%s %s' % (self.method, self.path)


class Wire(list):
    """The `Request` of every request python-couchdb made since the
    fixture started (or `clear()`)."""

    def __init__(self, db):
        list.__init__(self)
        self.prefix = urlsplit(db.resource.url).path.rstrip('/')

    def record(self, method, url, body):
        path = unquote(urlsplit(url).path)
        if path == self.prefix or path.startswith(self.prefix + '/'):
            path = path[len(self.prefix) + 1:]
        if isinstance(body, (dict, list)):
            try:
                body = json.loads(json.dumps(body))
            except (TypeError, ValueError):
                pass                # not JSON: python-couchdb refuses it
        elif isinstance(body, bytes) and path == '_bulk_docs':
            body = json.loads(body)     # the session encodes it itself
        query = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
        self.append(Request(method, path, body, query))

    def calls(self):
        """``(method, path)`` of each request."""
        return [(r.method, r.path) for r in self]

    def bulk_posts(self):
        """The ``POST _bulk_docs`` requests."""
        return [r for r in self
                if (r.method, r.path) == ('POST', '_bulk_docs')]

    def bulk_bodies(self):
        """The body of each ``POST _bulk_docs``."""
        return [r.body for r in self.bulk_posts()]

    def bulk_ids(self):
        """The ids sent by each ``POST _bulk_docs``, one list each."""
        return [[doc['_id'] for doc in body['docs']]
                for body in self.bulk_bodies()]

    def puts(self):
        """``(path, body)`` of each PUT."""
        return [(r.path, r.body) for r in self if r.method == 'PUT']

    def writes(self):
        return [r for r in self if r.method in ('PUT', 'DELETE') or
                r.path == '_bulk_docs']


@pytest.fixture
def wire(db, monkeypatch):
    """A `Wire` of the requests made through python-couchdb."""
    recorded = Wire(db)
    request = couchdb.http.Session.request

    def recording(self, method, url, body=None, *args, **kwargs):
        recorded.record(method, url, body)
        return request(self, method, url, body, *args, **kwargs)

    monkeypatch.setattr(couchdb.http.Session, 'request', recording)
    return recorded


def put(db, id, **content):
    """Write a document straight to the server; return it as stored."""
    content['_id'] = id
    db.save(content)
    return db[id]


def stored(db, id):
    """The server's document without ``_rev``, or None."""
    doc = db.get(id)
    if doc is None:
        return None
    doc = dict(doc)
    doc.pop('_rev')
    return doc


# -- The module ---------------------------------------------------------------

def test_module_docstring_example_runs(db):
    """The example at the top of session.py works as shown."""
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(session, extraglobs={'db': db}):
        runner.run(test)
    assert runner.failures == 0
    assert runner.tries > 5


def test_readme_examples_run(server_url):
    """Every example in README.txt works as shown, from couchdb.Server(url)
    on, and deletes the database it makes."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        'README.txt')
    before = set(couchdb.Server(server_url))
    failures, tries = doctest.testfile(
        path, module_relative=False, globs={'url': server_url},
        optionflags=doctest.ELLIPSIS)
    left = [name for name in set(couchdb.Server(server_url)) - before
            if name.startswith('mydb_')]
    assert failures == 0
    assert tries > 170
    assert left == []


def test_namespace_is_the_api():
    """dir(session) shows the API, and __all__ names it."""
    public = [name for name in dir(session) if not name.startswith('_')]
    api = ['FlushError', 'Middleware', 'Session', 'TooManyRequests',
           'current', 'plain']
    assert sorted(public) == api and sorted(session.__all__) == api


# -- Reading ------------------------------------------------------------------

def test_getitem_fetches_once_and_returns_the_same_object(db, wire):
    """S[id] makes one GET; later reads are served from the session."""
    put(db, 'a', x=1)
    wire.clear()
    S = Session(db)
    doc = S['a']
    assert S['a'] is doc
    assert S.get('a') is doc
    assert wire.calls() == [('GET', 'a')]


def test_get_returns_the_cached_object_and_default_for_missing(db, wire):
    """S.get(id) is S[id]; a missing id gives the default."""
    put(db, 'a', x=1)
    S = Session(db)
    assert S.get('a') is S['a']
    assert S.get('missing') is None
    assert S.get('missing', 'dflt') == 'dflt'
    with pytest.raises(couchdb.ResourceNotFound):
        S['missing']


def test_document_behind_proxy_keeps_id_and_rev(db):
    """The tracked object is the fetched couchdb.Document behind a proxy."""
    rev = put(db, 'a', x=1).rev
    doc = Session(db)['a']
    assert doc.id == 'a'
    assert doc.rev == rev
    assert isinstance(doc, couchdb.Document)


def test_get_with_options_reads_the_server_and_leaves_the_cache(db, wire):
    """rev=, revs=, conflicts= ... go to the server, untracked, every time."""
    first = put(db, 'a', x=1)
    first_rev = first.rev
    first['x'] = 2
    db.save(first)
    S = Session(db)
    current = S['a']
    wire.clear()
    old = S.get('a', rev=first_rev)
    assert old['x'] == 1 and old is not current
    with_revs = S.get('a', revs=True)
    assert '_revisions' in with_revs
    assert '_revisions' not in current and current['x'] == 2
    assert S['a'] is current
    assert [m for m, _ in wire.calls()] == ['GET', 'GET']
    old['x'] = 5                         # untracked
    assert S.flush() == []


def test_get_many_fetches_missing_ids_in_one_request(db, wire):
    """get_many: one POST _bulk_get for the ids not cached, in order."""
    for id in 'abc':
        put(db, id, name=id)
    S = Session(db)
    a = S['a']
    wire.clear()
    docs = S.get_many(['b', 'a', 'nope', 'c', 'b'])
    assert wire.calls() == [('POST', '_bulk_get')]
    assert wire[0].body == {'docs': [{'id': 'b'}, {'id': 'nope'},
                                     {'id': 'c'}]}
    assert docs[1] is a and docs[0] is docs[4] is S['b']
    assert docs[2] is None
    assert [d['name'] for d in (docs[0], docs[3])] == ['b', 'c']
    wire.clear()
    assert S.get_many(['a', 'b', 'c']) == [a, S['b'], S['c']]
    assert wire.calls() == []


def test_get_many_docs_are_tracked(db):
    """Documents from get_many are tracked like those from S[id]."""
    put(db, 'a', n=1)
    S = Session(db)
    [doc] = S.get_many(['a'])
    doc['n'] = 2
    S.flush()
    assert db['a']['n'] == 2


def test_get_many_and_flush_pause_the_collector_and_leave_it_as_found(
        db, forwarder, remote):
    """get_many and flush run with the garbage collector off (a hook sees
    it off), and leave it as they found it: on again, after a failure too;
    off if it was off."""
    put(db, 'a', n=1)
    seen = []
    S = Session(db, pre_flush_hook=lambda *work: seen.append(gc.isenabled()))
    assert gc.isenabled()
    [a] = S.get_many(['a'])
    assert gc.isenabled()
    a['n'] = 2
    S.flush()
    assert seen == [False] and gc.isenabled() and db['a']['n'] == 2
    gc.disable()
    try:
        [b] = S.get_many(['b'])
        S['b'] = {'n': 1}
        S.flush()
        assert not gc.isenabled() and seen == [False, False]
    finally:
        gc.enable()
    assert stored(db, 'b') == {'_id': 'b', 'n': 1}
    R = Session(remote)
    R['c'] = {'n': 1}
    forwarder.mode = 'refuse'
    with pytest.raises(Exception):
        R.flush()
    with pytest.raises(Exception):
        R.get_many(['a'])
    forwarder.mode = 'pass'
    assert gc.isenabled()
    R.flush()
    assert stored(db, 'c') == {'_id': 'c', 'n': 1}


# -- Creating -----------------------------------------------------------------

def test_create_sends_nothing_before_flush(db, wire):
    """create() returns a new uuid4 hex id; nothing is sent before flush."""
    S = Session(db)
    id = S.create({'type': 'note'})
    assert len(id) == 32 and int(id, 16) >= 0
    assert wire.calls() == []
    assert S[id]['type'] == 'note'
    assert id in S
    S.flush()
    assert stored(db, id) == {'_id': id, 'type': 'note'}


def test_create_keeps_a_deep_copy(db):
    """Later changes to the data given to create() do not leak in."""
    data = {'_id': 'n', 'tags': ['a'], 'owner': {'name': 'bob'}}
    S = Session(db)
    S.create(data)
    data['tags'].append('b')
    data['owner']['name'] = 'eve'
    S.flush()
    assert stored(db, 'n') == {'_id': 'n', 'tags': ['a'],
                               'owner': {'name': 'bob'}}


def test_setitem_creates_with_that_id(db, wire):
    """S[id] = content queues a creation with that id."""
    S = Session(db)
    S['x'] = {'v': 1}
    assert wire.calls() == []
    assert S['x'] == {'_id': 'x', 'v': 1}
    S.flush()
    assert stored(db, 'x') == {'_id': 'x', 'v': 1}


def test_create_rejects_bad_input_before_anything_is_queued(db):
    """Not a dict, or an _id that is not a string: TypeError; held id:
    conflict."""
    put(db, 'held', v=1)
    S = Session(db)
    with pytest.raises(TypeError):
        S.create('x')
    with pytest.raises(TypeError):
        S['y'] = ['not', 'a', 'dict']
    for bad in (5, None):
        with pytest.raises(TypeError):
            S.create({'_id': bad})
    S['held']
    with pytest.raises(couchdb.ResourceConflict):
        S.create({'_id': 'held'})
    S.create({'_id': 'fresh'})
    with pytest.raises(couchdb.ResourceConflict):
        S['fresh'] = {}
    assert S.create({'_id': '_design/d'}) == '_design/d'
    assert S.create({'_id': '_local/l'}) == '_local/l'
    assert S.new and len(S.new) == 3
    S.flush()
    assert db['_design/d'] and db['_local/l'] and db['fresh']


# Every public way to name a document, given an id that is not a string.
BAD_IDS = {
    'S[id]': (1, lambda S: S[1]),
    'S.get(id)': (1, lambda S: S.get(1)),
    'S.get(id, rev=...)': (1, lambda S: S.get(1, rev='1-a')),
    'del S[id]': (1, lambda S: S.__delitem__(1)),
    'id in S': (1, lambda S: 1 in S),
    'S.get_many(ids)': (1, lambda S: S.get_many(['a', 1])),
    'S.get_many([None])': (None, lambda S: S.get_many([None])),
    'S[id] = content': (1, lambda S: S.__setitem__(1, {'v': 1})),
    'S.create(doc)': (5, lambda S: S.create({'_id': 5})),
    'S.save(doc)': (5, lambda S: S.save({'_id': 5})),
    'S.save(doc with _rev)': (5, lambda S: S.save({'_id': 5,
                                                   '_rev': '1-a'})),
    'S.save(doc with _deleted)': (5, lambda S: S.save({'_id': 5,
                                                       '_deleted': True})),
    'S.update(docs)': (5, lambda S: S.update([{'_id': 5}])),
    'S.delete(doc)': (5, lambda S: S.delete({'_id': 5})),
    'S.delete(doc with _rev)': (5, lambda S: S.delete({'_id': 5,
                                                       '_rev': '1-a'})),
    'S.expunge(id)': (1, lambda S: S.expunge(1)),
    'S.refresh(id)': (1, lambda S: S.refresh(1)),
    'S.diff(id)': (1, lambda S: S.diff(1)),
    'S.put_attachment(id)': (1, lambda S: S.put_attachment(1, b'x',
                                                           'a.txt')),
    'S.put_attachment(doc)': (5, lambda S: S.put_attachment({'_id': 5}, b'x',
                                                            'a.txt')),
    'S.get_attachment(id)': (1, lambda S: S.get_attachment(1, 'a.txt')),
    'S.delete_attachment(id)': (1, lambda S: S.delete_attachment(1,
                                                                 'a.txt')),
    'bytes for an id': (b'a', lambda S: S[b'a']),
}


@pytest.mark.parametrize('call', sorted(BAD_IDS))
def test_an_id_that_is_not_a_string_is_refused_at_the_call(db, wire, call):
    """Any entry point given an id that is not a string raises TypeError
    at once, naming the id; nothing is queued, nothing is sent."""
    put(db, 'a', v=1)
    bad, entry_point = BAD_IDS[call]
    S = Session(db)
    wire.clear()
    with pytest.raises(TypeError) as caught:
        entry_point(S)
    message = str(caught.value)
    assert message.startswith('%r is not a document id' % (bad,))
    assert 'a document id is a string' in message
    assert not S.has_changes() and S.new == S.deleted == S.dirty == []
    assert wire.calls() == []
    assert S.flush() == [] and wire.calls() == []


def test_session_of_a_url_or_a_server_is_refused(server):
    """Session() of a URL or of a couchdb.Server raises TypeError saying a
    couchdb.Database is expected and what it got (a URL without its
    password)."""
    url = 'http://ann:secret@127.0.0.1:5984/notes'
    with pytest.raises(TypeError) as caught:
        Session(url)
    message = str(caught.value)
    assert 'expects a couchdb.Database' in message
    assert "got the str 'http://127.0.0.1:5984/notes'" in message
    assert 'secret' not in message
    with pytest.raises(TypeError) as caught:
        Session(server)
    message = str(caught.value)
    assert 'expects a couchdb.Database' in message
    assert 'got the couchdb.Server %r' % server.resource.url in message
    assert 'server[name]' in message


def test_save_creates_adopts_and_keeps_tracked_documents(db, wire):
    """save(): plain dicts are created, dicts with _rev adopted as changed,
    tracked documents left as they are; nothing is sent."""
    original = put(db, 'adopt', v=1)
    S = Session(db)
    fresh = {'n': 1}
    id, rev = S.save(fresh)
    assert fresh['_id'] == id and rev is None
    plain = dict(original, v=2)
    assert S.save(plain) == ('adopt', original.rev)
    assert S.dirty == [S['adopt']]
    assert {'op': 'add', 'path': '/v', 'value': 2} in S.diff('adopt')
    tracked = S.get('adopt')
    assert S.save(tracked) == ('adopt', original.rev)
    wire.clear()
    S.flush()
    assert len(wire.bulk_posts()) == 1 and len(wire) == 1
    assert stored(db, id) == {'_id': id, 'n': 1}
    assert db['adopt']['v'] == 2


def test_a_dict_inside_a_document_is_not_the_document(db):
    """save() and delete() of a dict inside a tracked document treat it as
    a plain dict: they never act on the document holding it."""
    put(db, 'a', owner={'_id': 'owner-1', 'name': 'ann'})
    S = Session(db)
    doc = S['a']
    assert S.save(doc['owner']) == ('owner-1', None)
    S.delete(doc['owner'])                # the new one: forgotten
    assert S.new == [] and S.deleted == [] and S.dirty == []
    S.flush()
    assert 'owner-1' not in db and db['a']['owner']['name'] == 'ann'


def test_update_queues_each_document_and_returns_ids(db, wire):
    """update(docs) returns the list of ids; one bulk request at flush."""
    put(db, 'old', v=1)
    S = Session(db)
    ids = S.update([{'_id': 'a'}, {'b': 2}, dict(db['old'], v=5)])
    assert ids[0] == 'a' and ids[2] == 'old' and len(ids[1]) == 32
    wire.clear()
    S.flush()
    assert len(wire) == 1
    assert db['old']['v'] == 5 and db[ids[1]]['b'] == 2


def test_setitem_with_rev_updates_and_self_assignment_is_a_no_op(db, wire):
    """S[id] = content with _rev updates; S[id] = S[id] does nothing."""
    put(db, 'a', v=1)
    S = Session(db)
    doc = S['a']
    S['a'] = S['a']
    assert S.dirty == [] and S.flush() == []
    S['a'] = dict(db['a'], v=2)
    assert S['a'] is doc and doc['v'] == 2
    S.flush()
    assert db['a']['v'] == 2


# -- Deleting -----------------------------------------------------------------

def test_deleted_documents_are_gone_from_the_session(db, wire):
    """After delete: get is default, [] raises, `in` is False."""
    put(db, 'a', v=1)
    put(db, 'b', v=1)
    S = Session(db)
    S.delete(S['a'])
    del S['b']
    wire.clear()
    for id in 'ab':
        assert S.get(id) is None
        with pytest.raises(couchdb.ResourceNotFound):
            S[id]
        assert id not in S
    assert S.get_many(['a', 'b']) == [None, None]
    assert wire.calls() == []
    assert db['a'] and db['b']          # nothing sent yet
    S.flush()
    assert 'a' not in db and 'b' not in db


def test_create_then_delete_sends_nothing(db, wire):
    """A document created and deleted before a flush never reaches the
    server."""
    S = Session(db)
    id = S.create({})
    S.delete(S[id])
    assert S.flush() == []
    assert wire.calls() == []


def test_change_then_delete_sends_only_the_deletion(db, wire):
    """A changed and then deleted document is sent as a deletion only."""
    rev = put(db, 'a', v=1).rev
    S = Session(db)
    S['a']['v'] = 2
    del S['a']
    wire.clear()
    S.flush()
    [post] = wire.bulk_posts()
    assert post.body == {'docs': [{'_id': 'a', '_rev': rev,
                                   '_deleted': True}]}
    assert 'a' not in db


def test_delete_then_create_is_one_write_of_the_new_content(db, wire):
    """Deleting and re-creating an id sends one write; the server ends with
    the new content."""
    put(db, 'a', v=1)
    put(db, 'b', v=1)
    S = Session(db)
    S.delete(S['a'])
    S['a'] = {'v': 'new'}
    del S['b']                            # never fetched
    S['b'] = {'v': 'newer'}
    wire.clear()
    S.flush()
    [post] = wire.bulk_posts()
    assert sorted(d['_id'] for d in post.body['docs']) == ['a', 'b']
    assert stored(db, 'a') == {'_id': 'a', 'v': 'new'}
    assert stored(db, 'b') == {'_id': 'b', 'v': 'newer'}


def test_deleting_unfetched_ids_looks_up_revisions_in_one_request(db, wire):
    """del S[id] of ids never fetched: one POST _all_docs for all their
    revisions, then the one bulk request."""
    for id in 'abcd':
        put(db, id)
    S = Session(db)
    for id in 'abcd':
        del S[id]
    wire.clear()
    S.flush()
    assert wire.calls() == [('POST', '_all_docs'), ('POST', '_bulk_docs')]
    assert list(db) == []


def test_deleting_a_missing_id_is_reported(db):
    """Deleting an id the server does not have fails with
    ResourceNotFound in FlushError; the other work is done."""
    put(db, 'a')
    S = Session(db)
    del S['missing']
    del S['a']
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert isinstance(caught.value.failures['missing'],
                      couchdb.ResourceNotFound)
    assert 'a' not in db
    assert S.flush() == []                # nothing left to retry


def test_deleting_twice_raises_not_found(db):
    """A document already deleted in the session cannot be deleted again."""
    put(db, 'a')
    S = Session(db)
    del S['a']
    with pytest.raises(couchdb.ResourceNotFound):
        del S['a']


# -- Passing through to the database ------------------------------------------

def test_database_protocol_passes_through(db, server_url):
    """len, iter, bool, name, info() and other attributes are the
    database's; pending work is not counted."""
    put(db, 'a')
    put(db, 'b')
    S = Session(db)
    S.create({'_id': 'c'})
    del S['a']
    assert len(S) == 2
    assert sorted(S) == ['a', 'b']
    assert bool(S) is True
    assert S.name == db.name
    assert S.info()['doc_count'] == 2
    assert S.changes()['results']
    assert 'b' in S and 'c' in S and 'a' not in S and 'zz' not in S
    assert not Session(couchdb.Database(server_url + 'no_such_database'))


# -- Views, queries, find -----------------------------------------------------

@pytest.fixture
def design(db):
    db['_design/d'] = {'views': {'by_type': {
        'map': 'function (doc) { if (doc.type) emit(doc.type, doc.n); }'}}}


def test_view_rows_carry_the_sessions_documents(db, design, wire):
    """With include_docs, row.doc is the session's tracked document."""
    for n in range(4):
        put(db, 'n%d' % n, type='note', n=n)
    S = Session(db)
    held = S['n1']
    held['n'] = 100                        # local change, not flushed
    del S['n3']
    rows = list(S.view('d/by_type', include_docs=True))
    assert [r.id for r in rows] == ['n0', 'n1', 'n2']
    assert [r.key for r in rows] == ['note'] * 3
    assert [r.value for r in rows] == [0, 1, 2]
    assert rows[1].doc is held and rows[1].doc['n'] == 100
    assert rows[0].doc is S['n0']
    rows[2].doc['n'] = 22
    assert S['n2']['n'] == 22
    S.flush()
    assert db['n2']['n'] == 22 and 'n3' not in db


def test_view_results_keep_python_couchdb_features(db, design):
    """total_rows, offset, key lookup and slicing still work."""
    for n in range(3):
        put(db, 'n%d' % n, type='t%d' % n, n=n)
    S = Session(db)
    results = S.view('d/by_type')
    assert results.total_rows == 3 and results.offset == 0
    assert [r.id for r in results['t1']] == ['n1']
    assert [r.id for r in results['t1':'t2']] == ['n1', 'n2']
    assert len(results) == 3
    wrapped = S.view('d/by_type', wrapper=lambda row: row.id)
    assert list(wrapped) == ['n0', 'n1', 'n2']


def test_all_docs_view_with_docs_fills_the_identity_map(db, wire):
    """Documents read through _all_docs are cached: no GET afterwards."""
    put(db, 'a', v=1)
    S = Session(db)
    [row] = S.view('_all_docs', include_docs=True)
    wire.clear()
    assert S['a'] is row.doc
    assert wire.calls() == []


def test_iterview_yields_rows_with_tracked_documents(db):
    """iterview: rows in batches, docs tracked, deleted ones left out."""
    for n in range(7):
        put(db, 'n%d' % n, type='note', n=n)
    S = Session(db)
    del S['n4']
    rows = list(S.iterview('_all_docs', 3, include_docs=True))
    assert [r.id for r in rows] == ['n0', 'n1', 'n2', 'n3', 'n5', 'n6']
    assert all(r.doc is S[r.id] for r in rows)


def test_query_runs_a_temporary_view_where_the_server_has_them(db):
    """query(): like view, where the server supports temporary views."""
    put(db, 'a', type='x')
    S = Session(db)
    try:
        rows = list(S.query('function (doc) { emit(doc.type, null); }',
                            include_docs=True))
    except (couchdb.ResourceNotFound, couchdb.ServerError) as exc:
        pytest.skip('no temporary views on this server: %s' % (exc,))
    assert [r.key for r in rows] == ['x']
    assert rows[0].doc is S['a']


def test_find_yields_tracked_documents(db):
    """find(): the server selects, the session supplies its documents."""
    put(db, 'a', type='p', n=1)
    put(db, 'b', type='p', n=2)
    put(db, 'c', type='q', n=3)
    S = Session(db)
    a = S['a']
    del S['b']
    try:
        found = list(S.find({'selector': {'type': 'p'}}))
    except (couchdb.ResourceNotFound, couchdb.ServerError) as exc:
        pytest.skip('no _find on this server: %s' % (exc,))
    assert found == [a] and found[0] is a
    partial = list(S.find({'selector': {'type': 'q'}, 'fields': ['n']}))
    assert partial == [{'n': 3}]


# -- Reads: through _bulk_get, only what the session lacks --------------------

def leaf(db, id, rev, **content):
    """Give document ``id`` one more leaf revision ``rev`` holding
    ``content``, as replication between writers that were apart leaves
    it (``new_edits=false``)."""
    db.update([dict(content, _id=id, _rev=rev)], new_edits=False)
    assert db.get(id, rev=rev) is not None


WINNING, LOSING = '1-' + 'f' * 32, '1-' + '0' * 32


def test_get_many_reads_what_a_get_reads(db, wire):
    """get_many through _bulk_get gives each document as a GET gives it:
    a document with conflicting leaves is its winner, whichever leaf
    that is; a deleted or missing one is None; a _local one is read with a
    GET of its own."""
    put(db, 'plain', v=1)
    put(db, 'wins', v=1)
    leaf(db, 'wins', WINNING, v='replicated')
    put(db, 'loses', v=1)
    leaf(db, 'loses', LOSING, v='replicated')
    db.delete(put(db, 'gone', v=1))
    db['_local/x'] = {'v': 'local'}
    ids = ['plain', 'wins', 'loses', 'gone', 'missing', '_local/x']
    S = Session(db)
    wire.clear()
    docs = S.get_many(ids)
    assert sorted(wire.calls()) == [('GET', '_local/x'),
                                    ('POST', '_bulk_get')]
    expected = [db.get(id) for id in ids]
    assert [None if d is None else session.plain(d) for d in docs] == \
        [None if d is None else dict(d) for d in expected]
    assert docs[1]['v'] == 'replicated' and docs[2]['v'] == 1
    assert [S.get(id) for id in ids] == docs


def test_get_many_reads_in_batches(db, wire, monkeypatch):
    """Ids past the batch size (1,000 documents) go in further requests,
    each asking only for its own documents."""
    monkeypatch.setattr(session, '_READ_BATCH', 2)
    for id in 'abcde':
        put(db, id, name=id)
    S = Session(db)
    wire.clear()
    docs = S.get_many('edcba')
    assert [doc['name'] for doc in docs] == list('edcba')
    assert wire.calls() == [('POST', '_bulk_get')] * 3
    assert [[d['id'] for d in r.body['docs']] for r in wire] == \
        [['e', 'd'], ['c', 'b'], ['a']]


@pytest.mark.parametrize('status', [400, 404, 405])
def test_a_server_without_bulk_get_is_read_through_all_docs(
        db, server_url, forwarder, status):
    """Where the server answers _bulk_get with 400, 404 or 405 (CouchDB 1,
    a proxy letting only some paths through), reads go through _all_docs
    and give the same documents; only the first read asks."""
    for id in 'abc':
        put(db, id, name=id)
    db.delete(put(db, 'gone', v=1))
    forwarder.fail('reply', when=lambda method, path: path.endswith(
        '/_bulk_get'), reply=lambda body: (status, {
            'error': 'not_found', 'reason': 'missing'}))
    S = Session(through(forwarder, db, server_url))
    docs = S.get_many(['a', 'gone', 'nope', 'b'])
    assert [d and d['name'] for d in docs] == ['a', None, None, 'b']
    # Another session on the database, and its conflict read, do not ask.
    S = Session(through(forwarder, db, server_url), on_conflict='overwrite')
    S['c']['name'] = 'mine'
    change(db, 'c', name='theirs')
    S.flush()
    assert content(db, 'c') == {'name': 'mine'}
    assert [(method, path.rpartition('/')[2], action) for method, path,
            action in forwarder.log] == [
        ('POST', '_bulk_get', 'reply'), ('POST', '_all_docs', 'pass'),
        ('GET', 'c', 'pass'), ('POST', '_bulk_docs', 'pass'),
        ('POST', '_all_docs', 'pass'), ('POST', '_bulk_docs', 'pass')]


def test_a_missing_database_is_no_server_without_bulk_get(server_url, wire):
    """A 404 for a database that does not exist is not taken for a server
    without _bulk_get: once the database exists, reads use _bulk_get."""
    server = couchdb.Server(server_url)
    name = 'test_session_%s' % uuid.uuid4().hex
    with pytest.raises(couchdb.ResourceNotFound):
        Session(couchdb.Database(server_url + name)).get_many(['a'])
    server.create(name)
    try:
        wire.prefix = '/' + name
        wire.clear()
        assert Session(couchdb.Database(server_url + name)).get_many(
            ['a']) == [None]
        assert wire.calls() == [('POST', '_bulk_get')]
    finally:
        del server[name]


def test_view_with_docs_reads_only_the_documents_the_session_lacks(
        db, design, wire):
    """view(include_docs=True): the server sends the rows alone and the
    session reads the documents it does not hold in one _bulk_get; rows
    of held documents carry the session's objects. Once it holds them
    all, a view costs one request."""
    for n in range(4):
        put(db, 'n%d' % n, type='note', n=n)
    S = Session(db)
    held = S['n1']
    held['n'] = 100
    wire.clear()
    rows = list(S.view('d/by_type', include_docs=True))
    assert wire.calls() == [('GET', '_design/d/_view/by_type'),
                            ('POST', '_bulk_get')]
    assert 'include_docs' not in wire[0].query
    assert wire[1].body == {'docs': [{'id': 'n0'}, {'id': 'n2'},
                                     {'id': 'n3'}]}
    assert rows[1].doc is held and rows[1].doc['n'] == 100
    assert all(row.doc is S[row.id] for row in rows)
    assert [session.plain(row.doc) for row in rows if row.id != 'n1'] == [
        dict(db[id]) for id in ('n0', 'n2', 'n3')]
    wire.clear()
    again = S.view('d/by_type', include_docs=True)
    assert [row.doc for row in again] == [row.doc for row in rows]
    assert wire.calls() == [('GET', '_design/d/_view/by_type')]


@pytest.fixture
def linking(db):
    """A view whose values link to other documents (``{"_id": ...}``)."""
    db['_design/links'] = {'views': {'to': {'map': '''function (doc) {
        if (doc.link) emit(doc._id, {_id: doc.link});
        if (doc.old) emit(doc._id, {_id: doc.old[0], _rev: doc.old[1]});
    }'''}}}


def test_view_with_docs_gives_the_rows_the_server_would_give(
        db, linking, wire):
    """The rows and documents are those of python-couchdb's
    include_docs=True: a linked document, None for a link to a deleted or
    missing one; in _all_docs with keys, None for a deleted document and
    an error row for a missing key."""
    put(db, 'target', v='t')
    db.delete(put(db, 'gone', v='g'))
    put(db, 'l1', link='target')
    put(db, 'l2', link='gone')
    put(db, 'l3', link='nowhere')
    S = Session(db)
    for name, options in (('links/to', {}),
                          ('_all_docs', {'keys': ['l1', 'gone', 'nope']})):
        mine = list(S.view(name, include_docs=True, **options))
        theirs = list(db.view(name, include_docs=True, **options))
        assert [(r.get('id'), r.key, r.value, r.get('error'))
                for r in mine] == [(r.get('id'), r.key, r.value,
                                    r.get('error')) for r in theirs]
        assert [r.doc and session.plain(r.doc) for r in mine] == \
            [r.doc and dict(r.doc) for r in theirs]
    [row] = S.view('links/to', include_docs=True, key='l1')
    assert row.doc is S['target']


def holding_one(db):
    """A session holding a document of its own, so that it reads the
    documents of view rows apart from the rows (a session holding none
    lets the server include them)."""
    put(db, 'held elsewhere')
    S = Session(db)
    S['held elsewhere']
    return S


def test_view_with_docs_reads_the_revision_a_link_names(db, linking):
    """A value {"_id": id, "_rev": rev} includes that revision (CouchDB's
    rule) when the session does not hold the document; one it holds is
    the session's."""
    first = put(db, 'target', v=1)
    change(db, 'target', v=2)
    put(db, 'l', old=['target', first.rev])
    [row] = holding_one(db).view('links/to', include_docs=True)
    assert row.doc['v'] == 1 and row.doc.rev == first.rev
    S = Session(db)
    held = S['target']
    [row] = S.view('links/to', include_docs=True)
    assert row.doc is held


def test_a_link_to_a_document_deleted_in_the_session_includes_none(
        db, linking):
    """A row linking to a document the session deleted (fetched first, or
    by id only) has no document, in a view and in iterdocs, as the server
    gives none for a deleted one."""
    put(db, 'target', v=1)
    put(db, 'other', v=1)
    put(db, 'l1', link='target')
    put(db, 'l2', link='other')
    S = Session(db)
    S.delete(S['target'])
    del S['other']
    assert [row.doc for row in S.view('links/to', include_docs=True)] == \
        [None, None]
    assert list(S.iterdocs('links/to', batch=10)) == []


def test_a_link_to_an_old_revision_leaves_the_sessions_document_current(
        db, linking):
    """A row linking to an old revision includes that revision, untracked
    (as get with rev gives it): the session's document for the id stays
    the current one."""
    first = put(db, 'target', v=1)
    change(db, 'target', v=2)
    put(db, 'l', old=['target', first.rev])
    S = holding_one(db)
    [row] = S.view('links/to', include_docs=True)
    assert row.doc['v'] == 1
    target = S['target']
    assert (target['v'], target.rev) == (2, db['target'].rev)


def test_view_with_docs_follows_couchdbs_rules_for_odd_links(db):
    """A value {"_id": null} includes no document; {"_rev": rev} alone
    includes that revision of the row's own document (CouchDB's rules;
    PouchDB Server's include_docs differs)."""
    db['_design/odd'] = {'views': {'links': {'map': '''function (doc) {
        if (doc.none) emit('none', {_id: null});
        if (doc.old) emit('old', {_rev: doc.old});
    }'''}}}
    put(db, 'n', none=True)
    first = put(db, 'o', v=1)
    change(db, 'o', v=2, old=first.rev)
    rows = dict((row.key, row) for row in holding_one(db).view(
        'odd/links', include_docs=True))
    assert rows['none'].doc is None
    assert rows['old'].doc['v'] == 1 and rows['old'].doc.rev == first.rev


def test_view_options_that_shape_documents_leave_them_to_the_server(
        db, design, wire):
    """With conflicts, attachments or att_encoding_info the server
    includes the documents itself: one request."""
    put(db, 'a', type='t', n=1)
    leaf(db, 'a', LOSING, type='t', n=0)
    S = Session(db)
    wire.clear()
    [row] = S.view('d/by_type', include_docs=True, conflicts=True)
    assert wire.calls() == [('GET', '_design/d/_view/by_type')]
    assert wire[0].query['include_docs'] == 'true'
    assert row.doc is S['a']


def test_view_with_docs_of_a_reduce_answers_as_the_server_does(db):
    """include_docs on a reduce is the server's to refuse: the session
    asks as it was told, and gives what python-couchdb gives."""
    db['_design/r'] = {'views': {'sum': {
        'map': 'function (doc) { emit(doc._id, 1); }', 'reduce': '_sum'}}}
    put(db, 'a', v=1)

    def outcome(view):
        try:
            return [dict(row) for row in view('r/sum', include_docs=True)]
        except couchdb.HTTPError as exc:
            return type(exc)
    assert outcome(Session(db).view) == outcome(db.view)


def test_iterview_with_docs_reads_each_batchs_missing_documents(db, wire):
    """iterview(include_docs=True): per batch, one request for the rows and
    one _bulk_get for the documents of the batch the session lacks."""
    for n in range(7):
        put(db, 'n%d' % n, n=n)
    S = Session(db)
    held = S['n1']
    wire.clear()
    rows = list(S.iterview('_all_docs', 3, include_docs=True))
    assert [r.id for r in rows] == ['n%d' % n for n in range(7)]
    assert rows[1].doc is held
    assert all(r.doc is S[r.id] and r.doc['n'] == n
               for n, r in enumerate(rows))
    assert wire.calls() == [('GET', '_all_docs'), ('POST', '_bulk_get')] * 3
    assert [[d['id'] for d in r.body['docs']] for r in wire
            if r.path == '_bulk_get'] == [['n0', 'n2'], ['n3', 'n4', 'n5'],
                                          ['n6']]
    assert all('include_docs' not in r.query for r in wire
               if r.path == '_all_docs')


def test_a_session_holding_nothing_lets_the_server_include_documents(
        db, wire):
    """A session holding no document has all of a view's documents to read:
    view and iterview ask the server to include them and find asks for
    whole documents, one request (per batch), and each is the session's
    tracked document."""
    for n in range(5):
        put(db, 'n%d' % n, type='p', n=n)
    S = Session(db)
    wire.clear()
    rows = list(S.view('_all_docs', include_docs=True))
    assert wire.calls() == [('GET', '_all_docs')]
    assert wire[0].query['include_docs'] == 'true'
    assert [r.doc['n'] for r in rows] == list(range(5))
    assert all(r.doc is S[r.id] for r in rows)
    rows[0].doc['n'] = 'changed'
    S.flush()
    assert stored(db, 'n0')['n'] == 'changed'
    S = Session(db)
    wire.clear()
    rows = list(S.iterview('_all_docs', 2, include_docs=True))
    assert wire.calls() == [('GET', '_all_docs')] * 3
    assert all(r.query['include_docs'] == 'true' for r in wire)
    assert all(r.doc is S[r.id] for r in rows) and len(rows) == 5
    S = Session(db)
    wire.clear()
    try:
        found = list(S.find({'selector': {'type': 'p'}, 'sort': ['_id']}))
    except (couchdb.ResourceNotFound, couchdb.ServerError) as exc:
        pytest.skip('no _find on this server: %s' % (exc,))
    assert wire.calls() == [('POST', '_find')]
    assert 'fields' not in wire[0].body
    assert [d['n'] for d in found] == ['changed', 1, 2, 3, 4]
    assert all(d is S[d['_id']] for d in found)


def iterate(S, how):
    """The session's documents of 'p0'..'p3' through ``how``: find or
    iterview (in batches of 2) with include_docs."""
    if how == 'find':
        try:
            for doc in S.find({'selector': {'type': 'p'}, 'sort': ['_id']}):
                yield doc
        except (couchdb.ResourceNotFound, couchdb.ServerError) as exc:
            pytest.skip('no _find on this server: %s' % (exc,))
        return
    for row in S.iterview('_all_docs', 2, include_docs=True):
        yield row.doc


@pytest.mark.parametrize('holding', [False, True])
@pytest.mark.parametrize('how', ['find', 'iterview'])
def test_a_loop_that_resets_the_session_writes_each_change(db, how,
                                                          holding):
    """A loop over find or iterview that changes each document, flushes
    and resets the session writes every change, whether or not the session
    held a document when the loop began (it then reads the documents apart
    from the rows, but each is the session's when it comes out)."""
    for n in range(4):
        put(db, 'p%d' % n, type='p', sub={'n': n})
    S = Session(db)
    if holding:
        S['p3']
    seen = []
    for doc in iterate(S, how):
        seen.append(doc['_id'])
        assert doc is S[doc['_id']]
        doc['sub']['n'] += 10
        assert [row[1] for row in S.flush()] == [doc['_id']]
        S.reset()
    assert seen == ['p0', 'p1', 'p2', 'p3']
    assert [stored(db, 'p%d' % n)['sub'] for n in range(4)] == \
        [{'n': n + 10} for n in range(4)]


@pytest.mark.parametrize('how', ['find', 'iterview'])
def test_a_document_let_go_of_during_a_loop_is_read_again(db, wire, how):
    """A document the session held when find or iterview read the rows,
    expunged in the loop before it comes out, is read again (one _bulk_get)
    and comes out as the session's new tracked document, whose change is
    written."""
    for n in range(4):
        put(db, 'p%d' % n, type='p', sub={'n': n})
    S = Session(db)
    old = S['p1']
    wire.clear()
    docs = iterate(S, how)
    assert next(docs)['_id'] == 'p0'
    S.expunge('p1')
    calls = len(wire.calls())
    doc = next(docs)
    assert wire.calls()[calls:] == [('POST', '_bulk_get')]
    assert doc['_id'] == 'p1' and doc is not old and doc is S['p1']
    doc['sub']['n'] = 'new'
    rest = list(docs)
    assert [d['_id'] for d in rest] == ['p2', 'p3']
    S.flush()
    assert stored(db, 'p1')['sub'] == {'n': 'new'}


def test_find_reads_only_the_documents_the_session_lacks(db, wire):
    """find(): the server sends the ids, the session reads the documents
    it does not hold in one _bulk_get; one request when it holds them."""
    for id, n in (('a', 1), ('b', 2), ('c', 3)):
        put(db, id, type='p', n=n)
    S = Session(db)
    a = S['a']
    wire.clear()
    try:
        found = list(S.find({'selector': {'type': 'p'}, 'sort': ['_id']}))
    except (couchdb.ResourceNotFound, couchdb.ServerError) as exc:
        pytest.skip('no _find on this server: %s' % (exc,))
    assert found[0] is a and [d['n'] for d in found] == [1, 2, 3]
    assert wire.calls() == [('POST', '_find'), ('POST', '_bulk_get')]
    assert wire[0].body['fields'] == ['_id']
    assert wire[1].body == {'docs': [{'id': 'b'}, {'id': 'c'}]}
    wire.clear()
    assert list(S.find({'selector': {'type': 'p'}, 'sort': ['_id']})) == \
        found
    assert wire.calls() == [('POST', '_find')]


@pytest.mark.parametrize('options', [{}, {'key': 'none'},
                                     {'keys': ['none']}])
def test_include_docs_of_a_reduce_without_rows_is_refused_as_by_the_server(
        db, options):
    """A reduce asked with include_docs is the server's to refuse (CouchDB:
    400, "include_docs is invalid for reduce") whether or not it has rows
    for what was asked: view and iterview give what python-couchdb gives,
    not an empty list."""
    db['_design/r'] = {'views': {'sum': {
        'map': 'function (doc) { if (doc.v) emit(doc._id, 1); }',
        'reduce': '_sum'}}}
    put(db, 'a', w=1)                   # no rows: nothing emits

    def outcome(rows):
        try:
            return [dict(row) for row in rows()]
        except couchdb.HTTPError as exc:
            return type(exc)
    theirs = outcome(lambda: db.view('r/sum', include_docs=True, **options))
    assert isinstance(theirs, type)     # the server refuses
    S = Session(db)
    assert outcome(lambda: S.view('r/sum', include_docs=True,
                                  **options)) == theirs
    if 'keys' not in options:           # python-couchdb pages by startkey
        assert outcome(lambda: S.iterview('r/sum', 10, include_docs=True,
                                          **options)) == outcome(
            lambda: db.iterview('r/sum', 10, include_docs=True, **options))


# -- Change tracking ----------------------------------------------------------

# Each mutation runs against a plain deep copy and against a tracked
# document: the protocol is the same, and the tracked one must be written.
DICT_MUTATIONS = {
    'setitem': lambda d: d['m'].__setitem__('new', 1),
    'setitem_nested': lambda d: d['m']['inner'].__setitem__('x', 2),
    'delitem': lambda d: d['m'].__delitem__('k'),
    'update': lambda d: d['m'].update({'k': 'u'}, extra=[1]),
    'update_pairs': lambda d: d['m'].update([('k', 'p')]),
    'ior': lambda d: d['m'].__ior__({'k': 'or'}),
    'setdefault': lambda d: d['m'].setdefault('sd', {'v': 1}),
    'pop': lambda d: d['m'].pop('k'),
    'popitem': lambda d: d['m'].popitem(),
    'clear': lambda d: d['m'].clear(),
}

LIST_MUTATIONS = {
    'setitem': lambda d: d['l'].__setitem__(1, 'x'),
    'setitem_negative': lambda d: d['l'].__setitem__(-1, 'x'),
    'delitem': lambda d: d['l'].__delitem__(0),
    'set_slice': lambda d: d['l'].__setitem__(slice(0, 2), ['s', 't', 'u']),
    'del_slice': lambda d: d['l'].__delitem__(slice(1, None)),
    'append': lambda d: d['l'].append({'a': 1}),
    'extend': lambda d: d['l'].extend([7, 8]),
    'insert': lambda d: d['l'].insert(1, 'i'),
    'pop': lambda d: d['l'].pop(),
    'pop_index': lambda d: d['l'].pop(0),
    'remove': lambda d: d['l'].remove(3),
    'sort': lambda d: d['l'].sort(key=str, reverse=True),
    'reverse': lambda d: d['l'].reverse(),
    'clear': lambda d: d['l'].clear(),
}

CONTENT = {'m': {'k': 'v', 'inner': {'x': 1}}, 'l': [3, 1, 2, {'z': 0}]}


def _iadd(d):
    items = d['l']
    items += ['plus']


def _imul(d):
    items = d['l']
    items *= 2


LIST_MUTATIONS['iadd'] = _iadd
LIST_MUTATIONS['imul'] = _imul


@pytest.mark.parametrize('name', sorted(DICT_MUTATIONS))
def test_dict_mutations_are_tracked(db, name):
    """Every dict mutator marks the document changed and is written."""
    check_mutation(db, DICT_MUTATIONS[name])


@pytest.mark.parametrize('name', sorted(LIST_MUTATIONS))
def test_list_mutations_are_tracked(db, name):
    """Every list mutator marks the document changed and is written."""
    check_mutation(db, LIST_MUTATIONS[name])


def check_mutation(db, mutate):
    put(db, 'doc', **copy.deepcopy(CONTENT))
    expected = dict(copy.deepcopy(CONTENT), _id='doc')
    plain_result = mutate(expected)
    S = Session(db)
    doc = S['doc']
    result = mutate(doc)
    assert result == plain_result
    assert S.dirty == [doc]
    assert doc == dict(expected, _rev=doc.rev)
    S.flush()
    assert stored(db, 'doc') == expected


CHILD_READS = {
    'getitem': lambda d: d['m'],
    'get': lambda d: d.get('m'),
    'items': lambda d: dict(d.items())['m'],
    'values': lambda d: [v for v in d.values() if isinstance(v, dict)
                         and 'k' in v][0],
    'setdefault': lambda d: d.setdefault('m', None),
    'iteration': lambda d: [x for x in d['l'] if isinstance(x, dict)][0],
    'negative_index': lambda d: d['l'][-1],
    'reversed': lambda d: next(iter(reversed(d['l']))),
    'dict_of_doc': lambda d: dict(d)['m'],
}


@pytest.mark.parametrize('name', sorted(CHILD_READS))
def test_children_from_every_read_path_are_tracked(db, name):
    """A child reached by any read path reports its changes."""
    put(db, 'doc', **copy.deepcopy(CONTENT))
    S = Session(db)
    child = CHILD_READS[name](S['doc'])
    child['changed'] = True
    S.flush()
    server = db['doc']
    assert server['m'].get('changed') or server['l'][-1].get('changed')


def test_changes_through_references_kept_across_flushes(db):
    """A reference taken before a flush still tracks its dict after list
    items moved; one to a dict taken out of the document changes nothing
    the session writes."""
    put(db, 'a', items=[{'n': 1}, {'n': 2}], gone={'x': 1})
    S = Session(db)
    doc = S['a']
    second, gone = doc['items'][1], doc['gone']
    doc['items'].insert(0, {'n': 0})
    del doc['gone']
    S.flush()
    second['n'] = 20                        # now at index 2
    gone['x'] = 2                           # no longer in the document
    assert S.diff(doc) == [{'op': 'replace', 'path': '/items/2/n',
                            'value': 20, 'was': 2}]
    S.flush()
    assert stored(db, 'a') == {'_id': 'a', 'items': [
        {'n': 0}, {'n': 1}, {'n': 20}]}


def test_dict_proxy_iterates_over_keys(db):
    """Iterating a tracked dict gives its keys (ProxyTypes alone would
    not)."""
    put(db, 'doc', a=1, b={'c': 2})
    doc = Session(db)['doc']
    assert sorted(doc) == ['_id', '_rev', 'a', 'b']
    assert list(doc['b']) == ['c']
    assert sorted(k for k, v in doc.items()) == ['_id', '_rev', 'a', 'b']


def test_proxies_have_every_public_method_of_their_type(db):
    """Each name a dict, a list or a couchdb.Document offers is there on
    its tracked proxy, and the read-only ones give what the plain value
    gives."""
    put(db, 'doc', a=1, l=[1, {'b': 2}, 1])
    doc = Session(db)['doc']
    plain = db['doc']
    for proxy, kind in [(doc, couchdb.Document), (doc['l'], list)]:
        missing = [name for name in dir(kind) if not name.startswith('_')
                   and not hasattr(proxy, name)]
        assert missing == []
    assert sorted(doc.keys()) == sorted(plain.keys())
    assert doc.fromkeys('xy', 0) == {'x': 0, 'y': 0}
    assert doc['l'].count(1) == 2 and doc['l'].index({'b': 2}) == 1
    assert doc['l'].index(1, 1) == 2
    assert (doc.id, doc.rev) == (plain['_id'], plain['_rev'])


def test_a_copy_stored_while_a_flat_list_is_iterated_is_tracked(db):
    """A list of plain values is iterated at C speed, handing out what it
    holds as it is: a dict stored in it meanwhile (a copy, since it comes
    from the document itself) is the document's own, and its later changes
    are written."""
    put(db, 'doc', tags=['x', 'y'], other={'k': 1})
    S = Session(db)
    doc = S['doc']
    for item in doc['tags']:
        if item == 'y':
            doc['tags'].append(doc['other'])
    item['k'] = 2                       # the last item: the copy
    S.flush()
    assert stored(db, 'doc')['tags'] == ['x', 'y', {'k': 2}]
    assert stored(db, 'doc')['other'] == {'k': 1}
    item['k'] = 3                       # and after the flush
    S.flush()
    assert stored(db, 'doc')['tags'][2] == {'k': 3}


def test_values_put_in_while_a_loop_runs_come_out_tracked(db):
    """A loop over a list or a dict's items hands out each value tracked
    as it comes: also a dict a refresh, a merging flush, new content saved
    or ``*=`` put in while the loop runs. Changes to it are written."""
    put(db, 'r', tags=['p', 'q'], m={'a': 1, 'b': 2})
    put(db, 'm', tags=['p', 'q'], n=0)
    put(db, 's', tags=['p', 'q'])
    put(db, 'i', l=[1])
    S = Session(db, on_conflict='merge')
    r, m, s, i = S['r'], S['m'], S['s'], S['i']
    change(db, 'r', tags=['p', {'k': 1}], m={'a': 1, 'b': {'z': 1}})
    items = []
    for item in r['tags']:
        if item == 'p':
            S.refresh(r)
        items.append(item)
    pairs = dict(r['m'].items())
    change(db, 'r', tags=['p', {'k': 1}], m={'a': 1, 'b': {'z': 1}})
    m['n'] = 1
    change(db, 'm', tags=['p', {'k': 1}])
    merged = []
    for item in m['tags']:
        if item == 'p':
            S.flush()                   # merges the other writer's tags
        merged.append(item)
    saved = []
    for item in s['tags']:
        if item == 'p':
            S['s'] = {'_rev': s.rev, 'tags': ['p', {'k': 1}]}
        saved.append(item)
    doubled = []
    for item in i['l']:
        doubled.append(item)
        if len(doubled) == 1:
            i['l'].append({'a': 1})
            i['l'] *= 2
    S.flush()
    items[1]['k'] = pairs['b']['z'] = merged[1]['k'] = saved[1]['k'] = 2
    doubled[3]['a'] = 2
    S.flush()
    assert stored(db, 'r') == {'_id': 'r', 'tags': ['p', {'k': 2}],
                               'm': {'a': 1, 'b': {'z': 2}}}
    assert stored(db, 'm') == {'_id': 'm', 'n': 1, 'tags': ['p', {'k': 2}]}
    assert stored(db, 's')['tags'] == ['p', {'k': 2}]
    assert stored(db, 'i')['l'] == [1, {'a': 1}, 1, {'a': 2}]


def test_a_dict_stored_again_stays_the_users_own(db):
    """The user's dict stored twice at its key, or taken out and stored
    at another key, is the document's own as in a plain dict: changes
    made through it later are written."""
    put(db, 'doc', x=None)
    S = Session(db)
    doc = S['doc']
    x, y = {'v': 1}, {}
    doc['x'] = x
    doc['x'] = x
    doc['a'] = y
    del doc['a']
    doc['b'] = y
    x['v'] = 2
    y['k'] = 1
    S.flush()
    assert stored(db, 'doc') == {'_id': 'doc', 'x': {'v': 2}, 'b': {'k': 1}}


def test_tracked_documents_take_what_couchdb_documents_take(db):
    """Attributes, weak references, fromkeys building a Document, reversed
    views, and a keys view whose mapping hands out tracked values, as a
    couchdb.Document; unhashable as a dict (and Django templates do not
    call them)."""
    put(db, 'doc', a=1, d={'k': 1}, l=[1])
    plain = db['doc']
    S = Session(db)
    doc = S['doc']
    doc.note = 'x'
    assert doc.note == 'x' and vars(doc) == {'note': 'x'}
    assert weakref.ref(doc)() is doc
    assert type(doc.fromkeys(['_id'])) is type(plain.fromkeys(['_id']))
    assert list(reversed(doc.items())) == list(reversed(plain.items()))
    assert list(reversed(doc.values())) == list(reversed(plain.values()))
    assert list(reversed(doc.keys())) == list(reversed(plain.keys()))
    for value in (doc, doc['d'], doc['l']):
        assert not isinstance(value, collections.abc.Hashable)
        with pytest.raises(TypeError):
            hash(value)
    assert doc.do_not_call_in_templates
    doc.keys().mapping['d']['k'] = 2
    doc.items().mapping['d']['j'] = 3
    S.flush()
    assert stored(db, 'doc')['d'] == {'k': 2, 'j': 3}


def test_a_sort_key_function_sees_tracked_values(db):
    """The key function of a tracked list's sort gets tracked values:
    what it changes is written, as in a plain list."""
    put(db, 'doc', l=[{'n': 'a'}, {'n': 'b', 'rank': 2}])
    S = Session(db)
    doc = S['doc']
    doc['l'].sort(key=lambda item: item.setdefault('rank', 0))
    S.flush()
    assert stored(db, 'doc')['l'] == [{'n': 'a', 'rank': 0},
                                      {'n': 'b', 'rank': 2}]


def test_slice_read_is_a_copy(db):
    """A slice is a copy: changing it changes nothing."""
    put(db, 'doc', l=[{'a': 1}, 2])
    S = Session(db)
    part = S['doc']['l'][:1]
    part[0]['a'] = 5
    part.append(3)
    assert S.dirty == [] and S.flush() == []
    assert S['doc']['l'] == [{'a': 1}, 2]


def test_values_put_in_are_tracked_from_then_on(db):
    """A plain dict or list stored in a document becomes part of it: changes
    through the document and through the user's own reference are tracked,
    before and after a flush."""
    put(db, 'doc')
    S = Session(db)
    doc = S['doc']
    value = {'tags': []}
    doc['new'] = value
    value['tags'].append('outside')        # the document's own now
    S.flush()
    assert db['doc']['new'] == {'tags': ['outside']}
    doc['new']['tags'].append('inside')
    assert S.dirty == [doc]
    S.flush()
    assert db['doc']['new'] == {'tags': ['outside', 'inside']}
    value['after'] = True
    assert S.dirty == [doc] and S.diff(doc) == [
        {'op': 'add', 'path': '/new/after', 'value': True}]
    S.flush()
    assert db['doc']['new'] == {'tags': ['outside', 'inside'], 'after': True}


def test_created_documents_stay_tracked_after_flush(db):
    """create, flush, change, flush writes the change."""
    S = Session(db)
    id = S.create({'items': []})
    S.flush()
    S[id]['items'].append(1)
    S.flush()
    assert db[id]['items'] == [1]
    assert db[id].rev.startswith('2-')


def test_changes_that_cancel_out_are_not_sent(db, wire):
    """Set to the same value, or changed and changed back: no write."""
    put(db, 'a', v=1, l=[1, 2])
    S = Session(db)
    doc = S['a']
    doc['v'] = 1
    doc['l'].append(3)
    doc['l'].pop()
    doc['tmp'] = 'x'
    del doc['tmp']
    assert S.dirty == [doc]
    assert not S.has_changes()
    wire.clear()
    assert S.flush() == []
    assert wire.calls() == [] and S.dirty == []


def test_json_types_are_compared_strictly(db):
    """1 -> True and 1 -> 1.0 are changes even though they compare
    equal in Python."""
    put(db, 'a', v=1, w=1)
    S = Session(db)
    S['a']['v'] = True
    S['a']['w'] = 1.0
    assert len(S.diff('a')) == 2
    S.flush()
    server = db['a']
    assert server['v'] is True


def test_flush_with_nothing_to_do_sends_no_request(db, wire):
    """A clean session's flush makes no request."""
    put(db, 'a')
    S = Session(db)
    S['a']
    wire.clear()
    assert S.flush() == []
    assert wire.calls() == []


def test_mixed_flush_is_one_bulk_post_and_cached_reads_are_free(db, wire):
    """Creates, changes and deletes over many documents: one POST
    _bulk_docs and no other request; reading cached documents costs
    nothing."""
    for n in range(40):
        put(db, 'd%02d' % n, n=n, nested={'list': [n]})
    S = Session(db)
    docs = S.get_many(['d%02d' % n for n in range(40)])
    wire.clear()
    for doc in docs[:30]:
        doc['nested']['list'].append('changed')
        S[doc.id]['n'] += 1000
    for doc in docs[30:]:
        S.delete(doc)
    created = [S.create({'k': k}) for k in range(10)]
    assert wire.calls() == []
    results = S.flush()
    assert wire.calls() == [('POST', '_bulk_docs')]
    assert len(wire[0].body['docs']) == 50
    assert len(results) == 50 and all(ok for ok, _, _ in results)
    assert db['d05'] == dict(db['d05'], n=1005,
                             nested={'list': [5, 'changed']})
    assert 'd35' not in db and all(id in db for id in created)


def test_flush_gives_new_revisions_and_keeps_tracking(db):
    """After a flush each written document carries its new _rev."""
    put(db, 'a', v=1)
    S = Session(db)
    doc = S['a']
    doc['v'] = 2
    [(ok, id, rev)] = S.flush()
    assert ok and id == 'a' and doc.rev == rev == db['a'].rev
    assert S.dirty == [] and S.diff(doc) == []
    doc['v'] = 3
    S.flush()
    assert db['a']['v'] == 3


def test_flush_splits_very_large_sets_into_batches(db, wire):
    """More documents than batch_size go in several bulk requests."""
    S = Session(db)
    S.batch_size = 3
    for n in range(7):
        S.create({'n': n})
    results = S.flush()
    assert [len(p.body['docs']) for p in wire.bulk_posts()] == [3, 3, 1]
    assert len(results) == 7 and len(db) == 7


def test_results_are_matched_by_id_not_position(db):
    """A refused document in the middle of a request fails alone."""
    for id in 'abc':
        put(db, id, v=0)
    S = Session(db)
    for id in 'abc':
        S[id]['v'] = 1
    other = db['b']
    other['v'] = 'theirs'
    db.save(other)
    with pytest.raises(FlushError) as caught:
        S.flush()
    error = caught.value
    assert list(error.failures) == ['b']
    assert isinstance(error.failures['b'], couchdb.ResourceConflict)
    assert sorted((ok, id) for ok, id, _ in error.results) == [
        (False, 'b'), (True, 'a'), (True, 'c')]
    assert S['a'].rev == db['a'].rev and S['c'].rev == db['c'].rev
    assert S.dirty == [S['b']]          # kept, with the change
    assert S['b']['v'] == 1


# -- Bad values ---------------------------------------------------------------

@pytest.mark.parametrize('value, error, path', [
    ({1, 2}, TypeError, '/bad/0'),
    (object(), TypeError, '/bad/0'),
    (math.nan, ValueError, '/bad/0'),
    (math.inf, ValueError, '/bad/0'),
    ({1: 'int key'}, TypeError, '/bad/0'),
])
def test_bad_values_fail_before_anything_is_sent(db, wire, value, error,
                                                 path):
    """A value JSON cannot carry: a clear error naming the document and
    the path; nothing sent, nothing pending lost."""
    put(db, 'a', bad=[])
    S = Session(db)
    S['a']['bad'].append(value)
    S['a']['good'] = 1
    new = S.create({'_id': 'new'})
    wire.clear()
    with pytest.raises(error) as caught:
        S.flush()
    assert "'a'" in str(caught.value) and path in str(caught.value)
    assert wire.calls() == []
    assert S.new == [S[new]] and S.dirty == [S['a']]
    S['a']['bad'].pop()
    S.flush()
    assert stored(db, 'a') == {'_id': 'a', 'bad': [], 'good': 1}
    assert 'new' in db


@pytest.mark.parametrize('value, words', [
    ({1, 2}, 'the value at /v is a set'),
    (object(), 'the value at /v is an object'),
    ({1: 'x'}, 'the key 1 at /v is an int'),
    ({None: 'x'}, 'the key None at /v is None'),
])
def test_bad_value_messages_name_the_type_with_a_or_an(db, wire, value,
                                                       words):
    """The type of a value JSON cannot carry is named with its article:
    'a set', 'an object', 'an int'."""
    S = Session(db)
    S.create({'_id': 'n', 'v': value})
    with pytest.raises(TypeError) as caught:
        S.flush()
    assert words + ', ' in str(caught.value) or \
        words + '. ' in str(caught.value)
    assert wire.calls() == []


def test_a_key_added_to_a_fetched_document_is_named_with_an(db, wire):
    """A key JSON cannot carry added at the top of a fetched document:
    'the key 1 at / is an int'."""
    put(db, 'a', v=0)
    S = Session(db)
    S['a'][1] = 'x'
    wire.clear()
    with pytest.raises(TypeError) as caught:
        S.flush()
    assert 'the key 1 at / is an int, but JSON object keys must be ' \
        'strings' in str(caught.value)
    assert wire.calls() == []


# -- Diffs --------------------------------------------------------------------

def test_diff_is_a_json_patch_with_the_old_values(db, wire):
    """diff(): RFC 6902 operations from the fetched version to the current
    one; replace and remove carry `was`."""
    before = put(db, 'a', owner={'name': 'bob', 'a/b': 1}, tags=['x', 'y'],
                 gone=1)
    S = Session(db)
    doc = S['a']
    doc['owner']['name'] = 'ann'
    doc['owner']['a/b'] = 2
    doc['tags'].insert(0, 'w')
    del doc['gone']
    doc['new'] = {'deep': [1]}
    wire.clear()
    ops = S.diff(doc)
    assert wire.calls() == []
    assert {'op': 'replace', 'path': '/owner/name', 'value': 'ann',
            'was': 'bob'} in ops
    assert {'op': 'replace', 'path': '/owner/a~1b', 'value': 2,
            'was': 1} in ops
    assert {'op': 'remove', 'path': '/gone', 'was': 1} in ops
    assert {'op': 'add', 'path': '/tags/0', 'value': 'w'} in ops
    assert {'op': 'add', 'path': '/new', 'value': {'deep': [1]}} in ops
    assert jsonpatch.apply_patch(dict(before), ops) == doc
    assert S.diff('a') == ops


def test_diff_of_a_new_document_is_against_the_empty_document(db):
    """A created document's diff adds each of its fields."""
    S = Session(db)
    id = S.create({'v': 1})
    assert jsonpatch.apply_patch({}, S.diff(id)) == S[id]
    with pytest.raises(KeyError):
        S.diff('not-held')


# -- Hooks --------------------------------------------------------------------

def test_pre_flush_hook_work_goes_in_the_same_request(db, wire):
    """The pre-flush hook sees deleted, created and (doc, diff) changed;
    what it adds is in the same bulk request."""
    put(db, 'a', v=1)
    put(db, 'b', v=1)
    calls = []

    def hook(session, deleted, created, changed):
        calls.append(([d.id for d in deleted], [d.id for d in created],
                      [(d.id, ops) for d, ops in changed]))
        if len(calls) == 1:
            session.create({'_id': 'audit', 'count': len(changed)})

    S = Session(db, pre_flush_hook=hook)
    S['a']['v'] = 2
    del S['b']
    S.create({'_id': 'c'})
    wire.clear()
    S.flush()
    assert calls[0] == (['b'], ['c'], [('a', [
        {'op': 'replace', 'path': '/v', 'value': 2, 'was': 1}])])
    assert calls[1] == ([], ['audit'], [])       # only the new work
    assert len(calls) == 2
    [post] = wire.bulk_posts()
    assert sorted(d['_id'] for d in post.body['docs']) == [
        'a', 'audit', 'b', 'c']
    assert db['audit']['count'] == 1


def test_post_flush_hook_changes_are_written_by_the_same_flush(db, wire):
    """What the post-flush hook changes goes in a following request of
    the same flush()."""
    seen = []

    def hook(session, deleted, created, changed):
        seen.append(([d.id for d in created], [d.id for d, _ in changed]))
        if created and 'log' not in session:
            session['log'] = {'created': [d.id for d in created]}

    S = Session(db, post_flush_hook=hook)
    S.create({'_id': 'x'})
    results = S.flush()
    assert [r[1] for r in results] == ['x', 'log']
    assert len(wire.bulk_posts()) == 2
    assert seen == [(['x'], []), (['log'], [])]
    assert db['log']['created'] == ['x']
    assert not S.has_changes()


def test_hooks_that_never_settle_stop_with_a_clear_error(db):
    """A hook that keeps making work ends the flush with RuntimeError."""
    def pre(session, deleted, created, changed):
        session.create({})

    S = Session(db, pre_flush_hook=pre)
    S.max_hook_rounds = 5
    S.create({})
    with pytest.raises(RuntimeError, match='pre-flush hook'):
        S.flush()
    assert len(db) == 0

    def post(session, deleted, created, changed):
        session.create({})

    S = Session(db, post_flush_hook=post)
    S.max_hook_rounds = 5
    S.create({})
    with pytest.raises(RuntimeError, match='rounds'):
        S.flush()
    assert len(db) == 5


def test_subclasses_may_override_the_hook_methods(db):
    """Overriding pre_flush_hook in a subclass works like passing one."""
    class Stamping(Session):
        def pre_flush_hook(self, deleted, created, changed):
            for doc in created:
                doc['stamped'] = True
            for doc, _ in changed:
                doc['stamped'] = True

    put(db, 'a', v=1)
    S = Stamping(db)
    S['a']['v'] = 2
    S.create({'_id': 'b'})
    S.flush()
    assert db['a']['stamped'] and db['b']['stamped']


def test_flush_from_a_hook_is_refused(db):
    """A hook calling flush() gets an error instead of a nested flush."""
    def hook(session, deleted, created, changed):
        session.flush()

    S = Session(db, pre_flush_hook=hook)
    S.create({})
    with pytest.raises(RuntimeError, match='while the session was flushing'):
        S.flush()
    assert S.new                             # nothing lost


# -- Housekeeping -------------------------------------------------------------

def test_new_dirty_deleted_and_has_changes(db):
    """Read-only lists of what is pending."""
    put(db, 'a', v=1)
    put(db, 'b', v=1)
    S = Session(db)
    assert not S.has_changes()
    a = S['a']
    a['v'] = 2
    del S['b']
    id = S.create({})
    assert S.new == [S[id]] and S.dirty == [a]
    assert [d['_id'] for d in S.deleted] == ['b']
    assert S.has_changes()
    S.new.clear()                            # a copy: the session is intact
    assert S.new == [S[id]]
    S.flush()
    assert S.new == S.dirty == S.deleted == [] and not S.has_changes()


def test_expunge_stops_tracking_a_document(db, wire):
    """An expunged document is forgotten; S[id] fetches it again."""
    put(db, 'a', v=1)
    S = Session(db)
    doc = S['a']
    doc['v'] = 2
    S.expunge(doc)
    doc['v'] = 3
    assert S.flush() == [] and db['a']['v'] == 1
    wire.clear()
    again = S['a']
    assert again is not doc and again['v'] == 1
    assert wire.calls() == [('GET', 'a')]


def test_a_dropped_session_frees_its_documents_without_the_garbage_collector(
        db):
    """A session dropped (at the end of a web request, say) lets go of its
    documents at once: those the user no longer holds are freed by
    reference counting alone, changed, created or deleted, as plain dicts
    would be; one the user kept, and a dict kept from inside one, still
    read as they were and are tracked by nothing."""
    ids = numbered(db, 4, meta={'k': 1})
    enabled = gc.isenabled()
    gc.disable()
    try:
        S = Session(db)
        docs = S.get_many(ids)
        docs[0]['meta']['k'] = 'changed'
        S.delete(docs[1])
        created = S[S.create({"v": "new"})]
        kept, inner = docs[2], docs[3]['meta']
        gone = [weakref.ref(doc) for doc in (docs[0], docs[1], created)]
        del docs, created, S
        assert [ref() for ref in gone] == [None] * 3
    finally:
        if enabled:
            gc.enable()
    kept['v'] = 'after'
    inner['k'] = 2
    assert kept['v'] == 'after' and kept.id == ids[2] and inner == {'k': 2}
    assert 'v' not in db[ids[2]] and db[ids[3]]['meta'] == {'k': 1}
    assert ids[1] in db and db[ids[0]]['meta'] == {'k': 1}


def test_a_dropped_copy_of_a_session_leaves_the_original_its_documents(db):
    """copy.copy(S) is a second Session object for the same documents:
    dropping it leaves S holding them, with its changes and creations,
    and the last of the two to go lets go of them."""
    put(db, 'a', v=1)
    S = Session(db)
    doc = S['a']
    doc['v'] = 2
    S.create({'_id': 'new', 'v': 1})
    twin = copy.copy(S)
    assert twin['a'] is doc
    del twin
    gc.collect()
    assert S.has_changes() and S['a'] is doc
    S.flush()
    assert db['a']['v'] == 2 and stored(db, 'new') == {'_id': 'new', 'v': 1}


def test_refresh_rereads_and_drops_local_changes(db):
    """refresh() re-reads the document into the same object."""
    put(db, 'a', v=1)
    S = Session(db)
    doc = S['a']
    doc['v'] = 'local'
    other = db['a']
    other['v'] = 'server'
    db.save(other)
    assert S.refresh(doc) is doc
    assert doc['v'] == 'server' and doc.rev == other.rev
    assert S.dirty == [] and S.flush() == []
    doc['v'] = 'after'
    S.flush()
    assert db['a']['v'] == 'after'
    del S['a']
    S.refresh('a')                       # drops the pending deletion
    assert S.flush() == [] and 'a' in db


def test_reset_forgets_everything(db, wire):
    """reset() drops the cache and all pending work."""
    put(db, 'a', v=1)
    S = Session(db)
    doc = S['a']
    doc['v'] = 2
    S.create({})
    S.reset()
    assert S.flush() == []
    doc['v'] = 3
    assert S.flush() == []
    wire.clear()
    assert S['a'] is not doc
    assert wire.calls() == [('GET', 'a')]


def test_with_block_flushes_on_success(db):
    """`with Session(db) as S:` flushes at the end of the block."""
    with Session(db) as S:
        S['a'] = {'v': 1}
    assert db['a']['v'] == 1


def test_with_block_discards_on_exception(db, wire):
    """An exception in the block discards pending work and propagates."""
    with pytest.raises(KeyError):
        with Session(db) as S:
            S['a'] = {'v': 1}
            raise KeyError('boom')
    assert wire.writes() == [] and 'a' not in db


# -- Requests: counting, the budget, logging -----------------------------------

def test_requests_counts_every_request_the_session_sends(db, wire):
    """S.requests counts reads, writes, uploads and the database's methods
    called through the session: the requests on the wire."""
    put(db, 'a', v=0)
    put(db, 'b', v=0)
    wire.clear()
    S = Session(db, max_inline_attachment=LIMIT)
    assert S.requests == 0
    S['a']['v'] = 1
    S.get_many(['a', 'b', 'c'])
    list(S.view('_all_docs'))
    S.info()
    'zz' in S
    S.put_attachment(S['b'], LARGE, 'big.bin')
    S.flush()
    assert S.requests == len(wire) == 7
    assert S.flush() == [] and S.requests == 7
    assert Session(db).requests == 0        # per session


def test_max_requests_refuses_the_request_past_it_before_sending(db, wire):
    """The request past max_requests raises TooManyRequests naming the limit
    and the request, and is not sent; nothing pending is lost, and raising
    the limit lets the session go on."""
    for id in 'abc':
        put(db, id, v=0)
    wire.clear()
    S = Session(db, max_requests=2)
    S['a']['v'] = 1
    S['b']['v'] = 1
    with pytest.raises(session.TooManyRequests) as caught:
        S['c']
    assert caught.value.limit == 2 and caught.value.method == 'GET'
    assert '(2)' in str(caught.value) and '/c' in str(caught.value)
    assert len(wire) == 2 and S.requests == 2
    with pytest.raises(session.TooManyRequests):
        S.flush()
    assert len(wire) == 2 and sorted(d['_id'] for d in S.dirty) == ['a', 'b']
    S.max_requests = 3
    S.flush()
    assert S.requests == len(wire) == 3 and not S.has_changes()
    assert content(db, 'a') == content(db, 'b') == {'v': 1}


def test_a_budget_spent_during_a_flush_keeps_what_was_written(db, wire):
    """A flush stopped by the budget after its bulk write (the conflict read
    is refused) keeps what was written; the conflict stays pending."""
    put(db, 'a', v=0)
    put(db, 'b', v=0)
    S = Session(db, on_conflict='overwrite')
    S['a']['v'] = 1
    S['b']['v'] = 1
    change(db, 'b', v='theirs')
    S.max_requests = S.requests + 1
    wire.clear()
    with pytest.raises(session.TooManyRequests):
        S.flush()
    assert wire.calls() == [('POST', '_bulk_docs')]
    assert content(db, 'a') == {'v': 1} and S.dirty == [S['b']]
    S.max_requests = None
    S.flush()
    assert content(db, 'b') == {'v': 1}


def test_a_bad_max_requests_is_refused(db):
    for bad in (-1, 'ten', 1.5):
        with pytest.raises(ValueError, match='max_requests'):
            Session(db, max_requests=bad)


def test_the_session_logger_tells_each_request_and_each_flush(db, caplog):
    """One DEBUG line per request (method, path, status, bytes, time) and one
    INFO line per flush (written, failed, requests, time) on the 'session'
    logger."""
    put(db, 'a', v=0)
    S = Session(db)
    with caplog.at_level(logging.DEBUG, logger='session'):
        S['a']['v'] = 1
        S['_bad'] = {}
        with pytest.raises(FlushError):
            S.flush()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records
             if r.name == 'session']
    debug = [message for level, message in lines if level == 'DEBUG']
    info = [message for level, message in lines if level == 'INFO']
    assert any(m.startswith('GET /%s/a: 200' % db.name) for m in debug)
    assert any(m.startswith('POST /%s/_bulk_docs: 201, 1 documents, '
                            % db.name) and 'bytes sent' in m for m in debug)
    assert len(info) == 1
    assert info[0].startswith('flush FlushError: 1 written, 1 failed, '
                              '1 requests')


# -- Web requests: Middleware, current(), plain() -----------------------------
#
# A real WSGI server (the standard library's, one thread per request) serves
# an app wrapped in `session.Middleware`; real HTTP clients drive it.

class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, *args):
        pass


class _ThreadingWSGIServer(socketserver.ThreadingMixIn,
                           wsgiref.simple_server.WSGIServer):
    daemon_threads = True


@contextlib.contextmanager
def serving(app):
    """Serve the WSGI ``app`` on a free loopback port; yield its URL."""
    server = wsgiref.simple_server.make_server(
        '127.0.0.1', 0, app, server_class=_ThreadingWSGIServer,
        handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield 'http://127.0.0.1:%d/' % server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def fetch(url):
    """``(status, body bytes)`` of a GET of ``url``."""
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def counter_app(environ, start_response):
    """Add one to the counter document, in the request's session."""
    S = session.current()
    S['counter']['n'] += 1
    start_response('200 OK', [('Content-Type', 'text/plain')])
    return [b'counted']


def add_up(mine, theirs, base):
    """A resolve function: both sides' increments count."""
    return dict(theirs, n=theirs['n'] + mine['n'] - base['n'])


@pytest.mark.parametrize('on_conflict', ['raise', add_up])
def test_concurrent_requests_lose_no_increment_and_count_none_twice(
        db, on_conflict):
    """20 concurrent requests each add one to a counter: the counter ends
    equal to the number of 200 answers; every other answer is a 409 with
    the JSON body naming the counter. With a resolve function adding the
    increments up, far fewer requests end in 409."""
    put(db, 'counter', n=0)
    app = session.Middleware(counter_app, db, on_conflict=on_conflict)
    with serving(app) as url:
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(fetch, [url] * 20))
    statuses = collections.Counter(status for status, _ in answers)
    assert set(statuses) <= {200, 409}
    assert db['counter']['n'] == statuses[200]
    for status, body in answers:
        if status == 409:
            failure = json.loads(body)
            assert failure['error'] == 'conflict'
            assert list(failure['failures']) == ['counter']
            assert 'conflict' in failure['failures']['counter']
        else:
            assert body == b'counted'
    if on_conflict is add_up:
        # 0 to 8 of 20 in eight runs; 'raise' 11 to 17.
        assert statuses[409] <= 12
    else:
        assert statuses[200] >= 1


def test_an_app_that_raises_writes_nothing(db):
    def app(environ, start_response):
        session.current()['x'] = {'v': 1}
        raise RuntimeError('bug')

    with serving(session.Middleware(app, db)) as url:
        status, _ = fetch(url)
    assert status == 500 and 'x' not in db


@pytest.mark.parametrize('status', ['404 Not Found', '500 Oops'])
def test_an_error_answer_writes_nothing(db, status):
    def app(environ, start_response):
        session.current()['x'] = {'v': 1}
        start_response(status, [('Content-Type', 'text/plain')])
        return [b'no']

    with serving(session.Middleware(app, db)) as url:
        code, body = fetch(url)
    assert code == int(status.split()[0]) and body == b'no'
    assert 'x' not in db


def test_a_refused_document_turns_the_answer_into_409(db):
    """A document the server refuses: 409 naming it and the reason, and the
    app's own body is not sent; the others are written."""
    def app(environ, start_response):
        S = session.current()
        S['good'] = {'v': 1}
        S['_bad'] = {'v': 1}
        start_response('201 Created', [('Content-Type', 'text/plain')])
        return [b'created']

    with serving(session.Middleware(app, db)) as url:
        status, body = fetch(url)
    assert status == 409
    failures = json.loads(body)['failures']
    assert list(failures) == ['_bad'] and 'illegal_docid' in failures['_bad']
    assert user_docs(db) == ['good']


def test_couchdb_unreachable_at_flush_answers_503(db, forwarder, remote):
    def app(environ, start_response):
        session.current()['x'] = {'v': 1}
        forwarder.mode = 'refuse'
        start_response('200 OK', [('Content-Type', 'text/plain')])
        return [b'ok']

    with serving(session.Middleware(app, remote)) as url:
        status, body = fetch(url)
    forwarder.mode = 'pass'
    assert status == 503
    assert json.loads(body)['error'] == 'service_unavailable'
    assert 'x' not in db


def test_the_middleware_flushes_before_the_status_goes_out(db):
    """The flush happens between the app's start_response and the server's:
    what the client reads was written already."""
    seen = []

    def app(environ, start_response):
        session.current()['x'] = {'v': 1}
        start_response('200 OK', [('Content-Type', 'text/plain')])
        return [b'ok']

    def server_side(environ, start_response):
        def spy(status, headers, exc_info=None):
            seen.append((status, 'x' in db))
            return start_response(status, headers, exc_info)
        return session.Middleware(app, db)(environ, spy)

    with serving(server_side) as url:
        assert fetch(url) == (200, b'ok')
    assert seen == [('200 OK', True)]


def test_changes_made_while_the_body_streams_are_flushed_at_its_end(db):
    """A body produced after the app returns sees the session as current;
    what it changes is written when the body ends, after the status."""
    put(db, 'log', lines=[])

    def app(environ, start_response):
        start_response('200 OK', [('Content-Type', 'text/plain')])

        def body():
            for n in range(3):
                session.current()['log']['lines'].append(n)
                yield b'%d' % n
        return body()

    with serving(session.Middleware(app, db)) as url:
        assert fetch(url) == (200, b'012')
        deadline = time.monotonic() + 5
        while db['log']['lines'] != [0, 1, 2] and time.monotonic() < deadline:
            time.sleep(0.02)
    assert db['log']['lines'] == [0, 1, 2]


def test_a_streaming_body_that_fails_writes_nothing(db):
    def app(environ, start_response):
        start_response('200 OK', [('Content-Type', 'text/plain')])

        def body():
            session.current()['x'] = {'v': 1}
            yield b'a'
            raise RuntimeError('bug while streaming')
        return body()

    with serving(session.Middleware(app, db)) as url:
        try:
            fetch(url)
        except (OSError, http.client.HTTPException):
            pass                # the server cuts the answer short
    assert 'x' not in db


def test_each_request_has_its_own_session_and_budget(db, wire):
    """current() is the request's own session; max_requests guards each
    request; S.requests counts the request's requests."""
    for id in 'abcd':
        put(db, id, v=0)
    counts = []

    def app(environ, start_response):
        S = session.current()
        ids = environ['PATH_INFO'].strip('/').split(',')
        try:
            for id in ids:
                S[id]['v'] += 1
        except session.TooManyRequests:
            start_response('429 Too Many Requests', [])
            return [b'']
        counts.append(S.requests)
        start_response('200 OK', [])
        return [b'']

    app = session.Middleware(app, db, max_requests=3)
    with serving(app) as url:
        wire.clear()
        assert fetch(url + 'a,b')[0] == 200
        assert fetch(url + 'a,b,c,d')[0] == 429
        assert fetch(url + 'c')[0] == 200
    assert counts == [2, 1]
    assert len(wire) == 2 + 1 + 3 + 1 + 1
    assert [db[id]['v'] for id in 'abcd'] == [1, 1, 1, 0]


def test_current_outside_a_request_says_why():
    with pytest.raises(LookupError, match='Middleware'):
        session.current()


def test_current_is_per_thread(db):
    """Two requests served at once, in two threads, see their own
    sessions."""
    barrier = threading.Barrier(2, timeout=10)
    seen = []

    def app(environ, start_response):
        S = session.current()
        barrier.wait()
        seen.append(S is session.current())
        S[environ['PATH_INFO'].strip('/')] = {}
        start_response('200 OK', [])
        return [b'']

    with serving(session.Middleware(app, db)) as url:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            assert [s for s, _ in pool.map(fetch, [url + 'p', url + 'q'])] \
                == [200, 200]
    assert seen == [True, True] and user_docs(db) == ['p', 'q']


def test_middleware_refuses_bad_options_at_once(db):
    with pytest.raises(ValueError):
        session.Middleware(counter_app, db, on_conflict='sometimes')
    with pytest.raises(TypeError):
        session.Middleware(counter_app, 'http://localhost:5984/db')


def test_plain_makes_documents_json_ready(db):
    """session.plain copies a tracked document or any part of it into plain
    values, and copies plain values too; json.dumps(doc,
    default=session.plain) encodes a document."""
    put(db, 'a', v=1, nested={'l': [1, {'x': 2}]})
    doc = Session(db)['a']
    copied = session.plain(doc)
    assert type(copied) is dict and type(copied['nested']['l'][1]) is dict
    assert copied == {'_id': 'a', '_rev': doc['_rev'], 'v': 1,
                      'nested': {'l': [1, {'x': 2}]}}
    assert session.plain(doc['nested']['l']) == [1, {'x': 2}]
    assert json.loads(json.dumps(doc, default=session.plain)) == copied
    value = {'k': [1, 2]}
    assert session.plain(value) == value and session.plain(value) is not value
    assert session.plain(value)['k'] is not value['k']
    assert session.plain(3) == 3
    with pytest.raises(TypeError, match='set'):
        json.dumps({'s': {1}}, default=session.plain)


def test_a_tracked_value_json_cannot_take_says_what_to_do(db):
    """json.dumps(dict(doc)) meets tracked parts: the error names
    session.plain."""
    put(db, 'a', nested={'x': 1})
    doc = Session(db)['a']
    with pytest.raises(TypeError, match=r'session\.plain'):
        json.dumps(dict(doc))
    with pytest.raises(TypeError, match=r'session\.plain'):
        json.dumps(doc)
    assert isinstance(doc['nested'], dict) and isinstance(doc, dict)
    assert isinstance(doc, couchdb.Document)


def test_flask_app_with_the_middleware(db):
    """A Flask app: jsonify of a document through app.json.default, and a
    conflict as 409."""
    flask = pytest.importorskip('flask')
    put(db, 'counter', n=0)
    app = flask.Flask('counter')
    app.json.default = session.plain
    app.wsgi_app = session.Middleware(app.wsgi_app, db)

    @app.route('/count', methods=['POST'])
    def count():
        doc = session.current()['counter']
        doc['n'] += 1
        if flask.request.args.get('race'):
            change(db, 'counter', n=20)     # another writer, meanwhile
        return flask.jsonify(doc)

    client = app.test_client()
    answer = client.post('/count')
    assert answer.status_code == 200 and answer.get_json()['n'] == 1
    assert db['counter']['n'] == 1
    answer = client.post('/count?race=1')
    assert answer.status_code == 409
    assert list(answer.get_json()['failures']) == ['counter']
    assert db['counter']['n'] == 20


# -- Jobs over many documents: iterdocs, requests sized in bytes --------------

def numbered(db, count, **content):
    """``count`` documents n000..., each holding ``n`` and ``content``."""
    ids = ['n%03d' % n for n in range(count)]
    db.update([dict(content, _id=id, n=n) for n, id in enumerate(ids)])
    return ids


def held_count(S):
    """How many documents the session holds, as its repr says."""
    return int(repr(S).split(': ')[1].split(' held')[0])


def generations(db):
    """{id: revision number} of the server's documents (design ones
    left out)."""
    return dict((row.id, int(row.value['rev'].split('-')[0]))
                for row in db.view('_all_docs')
                if not row.id.startswith('_design/'))


def test_iterdocs_goes_over_every_document_once_in_bounded_memory(db, wire):
    """iterdocs: every document of _all_docs once, in order, tracked;
    each batch is written when the next begins and then let go, so the
    session never holds more than one batch; one request per batch for
    the rows with their documents, and one _bulk_docs."""
    ids = numbered(db, 23)
    db['_design/d'] = {'views': {}}
    S = Session(db)
    wire.clear()
    it = S.iterdocs(batch=5)
    assert it.total == 23 and it.done == 0
    seen, most = [], 0
    for doc in it:
        seen.append(doc.id)
        doc['v'] = 'migrated'
        most = max(most, held_count(S))
        assert it.done == len(seen)
    kinds = [path for _, path in wire.calls()]
    assert kinds.count('_bulk_docs') == 5 and kinds.count('_bulk_get') == 0
    assert kinds.count('_all_docs') == 2 + 5    # counting, then the pages
    assert all(call.query.get('include_docs') == 'true'
               for call in wire[2:] if call.path == '_all_docs')
    assert seen == ids and most <= 5 and held_count(S) == 0
    assert all(db[id]['v'] == 'migrated' for id in ids)
    assert set(generations(db).values()) == {2}
    assert not S.has_changes()


def test_iterdocs_frees_a_written_batch_without_the_garbage_collector(db):
    """A batch let go is freed by reference counting alone once the job
    drops its documents: nothing of it waits in a reference cycle for the
    garbage collector (which, for a job, would hold the batches and scan
    them over and over). A document the job kept still reads, untracked."""
    numbered(db, 9)
    S = Session(db)
    gone, kept = [], None
    enabled = gc.isenabled()
    gc.disable()
    try:
        for n, doc in enumerate(S.iterdocs(batch=3)):
            doc['v'] = 'migrated'
            gone.append(weakref.ref(doc))
            if n == 1:
                kept = doc
            del doc
        # The last batch was written and let go when the loop ended.
        assert [ref() for ref in gone if ref() is not kept] == [None] * 8
    finally:
        if enabled:
            gc.enable()
    assert kept['v'] == 'migrated' and held_count(S) == 0
    kept['w'] = 1                   # not the session's any more
    assert not S.has_changes() and 'w' not in db[kept.id]


def test_iterdocs_leaves_alone_what_was_held_when_the_loop_began(db):
    """A document read between iterdocs() and its loop (a summary the job
    counts into) is not the job's: it stays held, and every change to it
    is written."""
    for n in range(5):
        put(db, 'job-%d' % n, state='old')
    put(db, 'summary', count=0)
    S = Session(db)
    jobs = S.iterdocs(batch=2, startkey='job-', endkey='job.')
    summary = S['summary']
    for doc in jobs:
        doc['state'] = 'new'
        summary['count'] += 1
    S.flush()
    assert stored(db, 'summary')['count'] == 5


def test_iterdocs_hands_out_a_document_of_several_rows_once_per_batch(db):
    """A view emitting two rows per document: a batch holding both hands
    the document out once, so a job deleting what it is handed deletes
    each once."""
    db['_design/two'] = {'views': {'rows': {'map': '''function (doc) {
        if (doc.n !== undefined) { emit([doc.n, 0], null);
                                   emit([doc.n, 1], null); }
    }'''}}}
    for n in range(3):
        put(db, 'd%d' % n, n=n)
    S = Session(db)
    handed = []
    for doc in S.iterdocs('two/rows', batch=10):
        handed.append(doc.id)
        S.delete(doc)
    assert handed == ['d0', 'd1', 'd2']
    assert [id for id in ('d0', 'd1', 'd2') if id in db] == []


def test_iterdocs_skips_design_documents_unless_asked(db):
    """Design documents are left out of _all_docs, and of total, unless
    design_docs=True."""
    numbered(db, 3)
    db['_design/d'] = {'views': {}}
    S = Session(db)
    it = S.iterdocs(batch=2)
    assert it.total == 3 and [d.id for d in it] == ['n000', 'n001', 'n002']
    it = Session(db).iterdocs(batch=2, design_docs=True)
    assert it.total == 4 and '_design/d' in [d.id for d in it]


@pytest.fixture
def by_group(db):
    """A view with few keys, many documents each (``n % 3``)."""
    db['_design/g'] = {'views': {'by_group': {
        'map': 'function (doc) { if (doc.n !== undefined) '
               'emit(doc.n % 3, null); }'}}}


@pytest.mark.parametrize('batch', [1, 2, 4, 7, 30])
def test_iterdocs_pages_equal_keys_without_loss_or_repeat(db, by_group,
                                                          batch):
    """A view whose rows share keys, in batches smaller and larger than a
    key's rows: each document comes once, in the view's order. (PouchDB
    Server ignores startkey_docid, where python-couchdb's iterview
    repeats rows.)"""
    numbered(db, 20)
    expected = [row.id for row in db.view('g/by_group')]
    S = Session(db)
    it = S.iterdocs('g/by_group', batch=batch)
    assert it.total == 20
    assert [doc.id for doc in it] == expected


def test_iterdocs_of_a_range_counts_it(db, by_group):
    """startkey, endkey and key ask for a range; total counts it."""
    numbered(db, 20)
    for options, expected in (
            ({'key': 1}, [r.id for r in db.view('g/by_group', key=1)]),
            ({'startkey': 1}, [r.id for r in db.view('g/by_group',
                                                      startkey=1)]),
            ({'startkey': 2, 'endkey': 1, 'descending': True},
             [r.id for r in db.view('g/by_group', startkey=2, endkey=1,
                                    descending=True)])):
        it = Session(db).iterdocs('g/by_group', batch=3, **options)
        assert it.total == len(expected)
        assert [doc.id for doc in it] == expected


def test_iterdocs_refuses_the_options_it_sets(db):
    """keys, limit, skip and include_docs are for paging to set; a batch
    below 1 is no batch."""
    S = Session(db)
    for options in ({'keys': ['a']}, {'limit': 3}, {'skip': 1},
                    {'include_docs': True}):
        with pytest.raises(ValueError, match=list(options)[0]):
            S.iterdocs(**options)
    with pytest.raises(ValueError, match='batch'):
        S.iterdocs(batch=0)


def test_iterdocs_resumes_from_its_checkpoint(db):
    """checkpoint='name': each written batch is recorded on the server; an
    iteration stopped half-way starts again after the last written batch;
    one that finished yields nothing; deleting the record starts over."""
    ids = numbered(db, 10)
    S = Session(db)
    it = S.iterdocs(batch=3, checkpoint='job')
    for doc in itertools.islice(it, 7):
        doc['v'] = 1
    # Batches 1 and 2 were written when batch 3 began; batch 3 was not.
    record = db['_local/session-checkpoint-job']
    assert record['done'] == 6 and record['finished'] is False
    again = Session(db).iterdocs(batch=3, checkpoint='job')
    assert again.done == 6 and again.total == 10
    rest = []
    for doc in again:
        rest.append(doc.id)
        doc['v'] = 1
    assert rest == ids[6:] and again.done == 10
    assert set(generations(db).values()) == {2}
    assert db['_local/session-checkpoint-job']['finished'] is True
    assert list(Session(db).iterdocs(batch=3, checkpoint='job')) == []
    del db['_local/session-checkpoint-job']
    assert len(list(Session(db).iterdocs(batch=3, checkpoint='job'))) == 10


def test_a_checkpoint_whose_answer_was_lost_is_recorded_once(
        db, remote, forwarder):
    """The answer to a checkpoint's save is lost after the server stored it,
    and python-couchdb's retry meets the record it made: the job goes on
    (one GET tells the record is its own), every document is changed, and
    the record says the job finished."""
    ids = numbered(db, 6)
    S = Session(remote)
    jobs = S.iterdocs(batch=2, checkpoint='job')
    forwarder.fail('drop_answer', times=1,
                   when=lambda method, path: method == 'PUT' and
                   '_local/' in path)
    for doc in jobs:
        doc['v'] = 1
    assert jobs.done == 6 and forwarder.pending_rules == 0     # it failed
    assert [db[id].get('v') for id in ids] == [1] * 6
    assert set(generations(db).values()) == {2}
    assert db['_local/session-checkpoint-job']['finished'] is True


def test_a_checkpoint_belongs_to_one_job(db, by_group):
    """A checkpoint recorded for one view and options is refused for
    another, naming both."""
    numbered(db, 4)
    list(Session(db).iterdocs(batch=2, checkpoint='job'))
    with pytest.raises(ValueError, match='g/by_group'):
        Session(db).iterdocs('g/by_group', checkpoint='job')
    # Options Python finds equal but the server does not: key 1 and true.
    list(Session(db).iterdocs('g/by_group', checkpoint='ones', key=1))
    with pytest.raises(ValueError, match='True'):
        Session(db).iterdocs('g/by_group', checkpoint='ones', key=True)


KILLED_JOB = '''
import os, signal, sys
import couchdb, session
db = couchdb.Database(sys.argv[1])
where, count = sys.argv[2], int(sys.argv[3])
flushes = []

def hook(S, deleted, created, changed):
    flushes.append(1)
    if where == 'after the write' and len(flushes) == count:
        os.kill(os.getpid(), signal.SIGKILL)   # written, not recorded

S = session.Session(db, post_flush_hook=hook)
for doc in S.iterdocs(batch=4, checkpoint='migration'):
    doc['v'] = 'migrated'
    if where == 'in a batch' and len(flushes) == count and doc['n'] % 4 == 2:
        os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.mark.parametrize('where', ['after the write', 'in a batch'])
def test_a_killed_job_resumes_and_changes_each_document_once(
        db, server_url, tmp_path, where):
    """A migration killed (SIGKILL) in another process, after a batch was
    written but before its checkpoint, or in the middle of a batch, run
    again: every document is changed exactly once."""
    ids = numbered(db, 30)
    script = tmp_path / 'job.py'
    script.write_text(KILLED_JOB)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(
        os.path.abspath(__file__)))
    url = server_url.rstrip('/') + '/' + db.name
    killed = subprocess.run([sys.executable, str(script), url, where, '3'],
                            env=env, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    record = db['_local/session-checkpoint-migration']
    assert 0 < record['done'] < 30 and not record['finished']
    finished = subprocess.run([sys.executable, str(script), url, 'nowhere',
                               '0'], env=env, timeout=120)
    assert finished.returncode == 0
    assert generations(db) == dict((id, 2) for id in ids)
    assert all(db[id]['v'] == 'migrated' for id in ids)
    assert db['_local/session-checkpoint-migration']['finished'] is True


def test_iterdocs_stops_at_a_conflict_and_loses_nothing(db):
    """A conflict in a batch stops the iteration with FlushError; the
    document stays pending, and the next run of the checkpoint (or a
    flush) writes it."""
    ids = numbered(db, 8)
    S = Session(db)
    it = S.iterdocs(batch=3, checkpoint='job')
    with pytest.raises(FlushError) as caught:
        for doc in it:
            doc['v'] = 'mine'
            if doc.id == 'n004':
                change(db, 'n004', other='theirs')
    assert list(caught.value.failures) == ['n004']
    assert list(it) == []               # the iteration is over
    assert S.has_changes()
    S.on_conflict = 'merge'
    rest = []
    for doc in S.iterdocs(batch=3, checkpoint='job'):
        rest.append(doc.id)
        doc['v'] = 'mine'
    assert rest == ids[3:]
    assert content(db, 'n004') == {'n': 4, 'v': 'mine', 'other': 'theirs'}
    assert all(db[id]['v'] == 'mine' for id in ids)


def test_iterdocs_survives_a_dropped_answer(db, remote, forwarder):
    """The answer to a batch's write is lost: the write is sent again and
    recognised; every document is changed once."""
    ids = numbered(db, 9)
    S = Session(remote)
    forwarder.fail('drop_answer', when=is_bulk_docs, times=1)
    for doc in S.iterdocs(batch=4):
        doc['v'] = 'migrated'
    assert generations(db) == dict((id, 2) for id in ids)
    assert forwarded(forwarder, 'POST', '/_bulk_docs') == 3 + 1


def test_a_connection_failure_stops_iterdocs_and_the_next_run_ends_it(
        db, remote, forwarder):
    """A batch's write fails on the connection: the iteration stops with
    that error, and the next run of the checkpoint finishes the job, each
    document changed once."""
    ids = numbered(db, 9)
    S = Session(remote)
    forwarder.fail('cut_before', when=is_bulk_docs, times=2)
    with pytest.raises(OSError):
        for doc in S.iterdocs(batch=4, checkpoint='job'):
            doc['v'] = 'migrated'
    for doc in S.iterdocs(batch=4, checkpoint='job'):
        doc['v'] = 'migrated'
    assert generations(db) == dict((id, 2) for id in ids)


def test_iterdocs_logs_one_line_per_batch(db, caplog):
    """One INFO line per batch: done/total, documents per second, written,
    failed."""
    numbered(db, 5)
    with caplog.at_level(logging.INFO, logger='session'):
        for doc in Session(db).iterdocs(batch=2):
            doc['v'] = 1
    lines = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith('iterdocs')]
    assert len(lines) == 3
    assert lines[0].startswith('iterdocs _all_docs: 2/5 documents, ')
    assert lines[0].endswith('documents/s, 2 written, 0 failed')


def sent_bytes(request):
    """The size of a _bulk_docs request's body as the session encodes it."""
    return len(json.dumps(request.body, ensure_ascii=False,
                          separators=(',', ':')).encode('utf-8'))


def test_bulk_writes_are_split_by_bytes(db, wire):
    """max_request_bytes: no _bulk_docs request is larger, unless it holds
    one document larger by itself, which goes alone; all are written."""
    S = Session(db, max_request_bytes=1000)
    for n in range(12):
        S.create({'_id': 'd%02d' % n, 'text': 'x' * 200})
    S.create({'_id': 'big', 'text': 'y' * 3000})
    S.flush()
    posts = wire.bulk_posts()
    assert all(sent_bytes(p) <= 1000 or len(p.body['docs']) == 1
               for p in posts)
    assert [len(p.body['docs']) for p in posts if sent_bytes(p) > 1000] == \
        [1]
    assert sum(len(p.body['docs']) for p in posts) == 13
    assert 4 <= len(posts) <= 5 and len(db) == 13


def test_a_byte_limit_below_one_document_sends_each_alone(db, wire):
    """A limit smaller than every document: one request each, all
    written."""
    S = Session(db, max_request_bytes=10)
    for n in range(3):
        S.create({'n': n})
    S.flush()
    assert [len(p.body['docs']) for p in wire.bulk_posts()] == [1, 1, 1]
    assert len(db) == 3


def test_session_size_options_are_checked(db):
    """batch_size and max_request_bytes: whole numbers (at least 1 for
    batch_size; None turns the byte limit off)."""
    for options in ({'batch_size': 0}, {'batch_size': None},
                    {'max_request_bytes': -1}, {'max_request_bytes': 1.5}):
        with pytest.raises(ValueError):
            Session(db, **options)
    assert Session(db, max_request_bytes=None).max_request_bytes is None
    assert Session(db).batch_size == 10000


def test_iterdocs_cursor_holds_the_same_few_values_however_many_rows_share_a_key(
        db, by_group):
    """Memory and the checkpoint stay bounded by the batch, not by how many
    rows share a key: the cursor recorded after each batch is as large
    after 85 rows of three keys as after 5."""
    numbered(db, 90)
    it = Session(db).iterdocs('g/by_group', batch=5, checkpoint='j')
    sizes = []
    for n, doc in enumerate(it, 1):
        if n % 5 == 1 and n > 1:            # the batch before was recorded
            cursor = db['_local/session-checkpoint-j']['cursor']
            sizes.append(len(json.dumps(cursor)))
    assert len(sizes) == 17 and max(sizes) - min(sizes) <= 2    # skip's digits


@pytest.mark.parametrize('batch', [1, 2, 3])
@pytest.mark.parametrize('descending', [False, True])
def test_iterdocs_pages_equal_keys_whatever_their_ids(db, batch, descending):
    """Rows of one key come in the order of their ids, which servers compare
    in their own way (CouchDB by UTF-8 bytes, PouchDB Server by UTF-16 code
    units: they differ for characters beyond U+FFFF against U+E000 and
    above): each document comes once, in the view's order."""
    db['_design/one'] = {'views': {'key': {
        'map': 'function (doc) { if (doc.n !== undefined) emit("k", null); }'}}}
    ids = ['a', 'a\U0001F600', 'a\uE000', 'a\uFFFD', 'b\U00010000', 'b',
           'b\uE001', 'c \u00e9', 'c\u4e00', '\U0001F601', '\uFF21']
    db.update([{'_id': id, 'n': n} for n, id in enumerate(ids)])
    expected = [row.id for row in db.view('one/key', descending=descending)]
    assert sorted(expected) == sorted(ids)
    it = Session(db).iterdocs('one/key', batch=batch, descending=descending)
    assert [doc.id for doc in it] == expected


def test_iterdocs_over_equal_keys_deleting_every_document(db, by_group):
    """A clean-up job deleting each document it meets, over rows sharing
    keys: the rows read leave the view as each batch is written, and every
    document is met once and deleted."""
    ids = numbered(db, 40)
    S = Session(db)
    met = []
    for doc in S.iterdocs('g/by_group', batch=4):
        met.append(doc.id)
        S.delete(doc)
    assert sorted(met) == ids
    assert [row.id for row in db.view('g/by_group')] == []


def test_iterdocs_over_equal_keys_with_a_writer_deleting_read_rows(
        db, by_group):
    """Another writer deletes rows already read, before the anchor, while
    the job runs: the cursor's place among the key's rows is by id, so
    nothing is met twice or missed."""
    ids = numbered(db, 30)
    expected = [row.id for row in db.view('g/by_group')]
    other = couchdb.Database(db.resource.url)
    met = []
    for doc in Session(db).iterdocs('g/by_group', batch=4):
        met.append(doc.id)
        doc['v'] = 'done'
        if len(met) % 4 == 3 and len(met) > 5:
            gone = other[met[-5]]       # before this batch: written
            other.delete(gone)
    assert met == expected and sorted(met) == ids
    assert all(db[id]['v'] == 'done' for id in ids if id in db)


# -- iterdocs and adopted values, from an outside review ----------------------

def test_iterdocs_keeps_a_summary_read_inside_the_loop(db):
    """A summary the job first reads inside its loop is the job's own, not
    the batch's: it stays in the session, and every increment is
    written."""
    for n in range(5):
        put(db, 'job-%d' % n, state='old')
    put(db, 'summary', count=0)
    S = Session(db)
    summary = None
    for doc in S.iterdocs(batch=2, startkey='job-', endkey='job.'):
        if summary is None:
            summary = S['summary']
        doc['state'] = 'new'
        summary['count'] += 1
    S.flush()
    assert stored(db, 'summary')['count'] == 5


@pytest.mark.parametrize('how', ['by id', 'from a view'])
@pytest.mark.parametrize('summary_id', ['n001', 'n004', 'zz-summary'])
def test_iterdocs_keeps_a_document_the_loop_reads_even_from_its_batch(
        db, summary_id, how):
    """A document the job's loop reads itself (a summary it counts into)
    stays the session's for the whole loop, and every change to it is
    written, also when it is a document of the batch being handed out (it
    used to be let go with its batch, its later changes lost) or of a
    batch to come."""
    numbered(db, 9)
    put(db, 'zz-summary', count=0)
    S = Session(db)
    summary = None
    for doc in S.iterdocs(batch=3, startkey='n', endkey='o'):
        if summary is None:             # read once, kept by the job
            summary = S[summary_id] if how == 'by id' else [
                row.doc for row in S.view('_all_docs', key=summary_id,
                                          include_docs=True)][0]
        summary['count'] = summary.get('count', 0) + 1
        doc['v'] = 'migrated'
    S.flush()
    assert stored(db, summary_id)['count'] == 9
    assert all(stored(db, 'n%03d' % n)['v'] == 'migrated' for n in range(9))


def test_iterdocs_keeps_a_document_the_job_created(db):
    """A report the job creates in its loop stays in the session: every id
    appended to it is written."""
    for n in range(5):
        put(db, 'job-%d' % n, state='old')
    S = Session(db)
    report = None
    for doc in S.iterdocs(batch=2, startkey='job-', endkey='job.'):
        if report is None:
            report = S[S.create({'_id': 'report', 'ids': []})]
        report['ids'].append(doc.id)
    S.flush()
    assert stored(db, 'report')['ids'] == ['job-%d' % n for n in range(5)]


def test_iterdocs_keeps_a_parent_cached_across_batches(db):
    """Parents the job reads and keeps in a cache of its own stay in the
    session across batches: each counts all its children."""
    put(db, 'p-a', children=0)
    put(db, 'p-b', children=0)
    for n in range(8):
        put(db, 'c-%d' % n, parent='p-a' if n % 2 else 'p-b')
    S = Session(db)
    parents = {}
    for doc in S.iterdocs(batch=3, startkey='c-', endkey='c.'):
        parent = parents.get(doc['parent'])
        if parent is None:
            parent = parents[doc['parent']] = S[doc['parent']]
        parent['children'] += 1
    S.flush()
    assert (stored(db, 'p-a')['children'], stored(db, 'p-b')['children']) \
        == (4, 4)


@pytest.mark.parametrize('batch', [1, 2])
def test_iterdocs_rows_of_object_keys_differing_in_member_order(db, batch):
    """Object keys collate member by member, in order: {"a":1,"b":2} and
    {"b":2,"a":1} are two keys, and the cursor tells them apart, handing
    out every document once, in the view's order (it once dropped one, or
    asked the same page for ever)."""
    db['_design/o'] = {'views': {'obj': {
        'map': 'function (doc) { if (doc.k) emit(doc.k, null); }'}}}
    db.save({'_id': 'x', 'k': {'a': 0}})
    db.save({'_id': 'z', 'k': {'a': 1, 'b': 2}})
    db.save({'_id': 'a', 'k': {'b': 2, 'a': 1}})
    db.save({'_id': 'm', 'k': {'c': 0}})
    expected = [row.id for row in db.view('o/obj')]
    assert expected == ['x', 'z', 'a', 'm']
    S = Session(db, max_requests=60)
    it = S.iterdocs('o/obj', batch=batch)
    assert [doc.id for doc in it] == expected


def test_a_dict_moved_to_another_document_stays_the_users_own(db):
    """The user's dict stored in one document, taken out of it and stored in
    another, stays the user's own: a change through their reference is
    written to the second document."""
    put(db, 'a', v=0)
    put(db, 'b', v=0)
    S = Session(db)
    a, b = S['a'], S['b']
    y = {}
    a['x'] = y
    del a['x']
    b['x'] = y
    y['k'] = 1
    S.flush()
    assert stored(db, 'b') == {'_id': 'b', 'v': 0, 'x': {'k': 1}}
    assert stored(db, 'a') == {'_id': 'a', 'v': 0}


@pytest.fixture
def disk_db(tmp_path):
    """A database of PouchDB Server as it runs by default: on disk
    (LevelDB), not --in-memory."""
    port = find_free_port()
    url = 'http://127.0.0.1:%d/' % port
    (tmp_path / 'config.json').write_text('{}')
    log = tmp_path / 'server.log'
    with open(str(log), 'ab') as out:
        process = subprocess.Popen(
            [SERVER_EXECUTABLE, '--host', '127.0.0.1', '--port', str(port),
             '--dir', str(tmp_path / 'data'),
             '--config', str(tmp_path / 'config.json'), '--no-color'],
            cwd=str(tmp_path), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert _wait_until_ready(process, url, str(log))
        yield couchdb.Server(url).create('disk')
    finally:
        _stop_process(process)


@pytest.mark.parametrize('batch', [1, 2, 3])
def test_iterdocs_on_pouchdb_server_on_disk_pages_equal_keys(disk_db, batch):
    """PouchDB Server on disk (LevelDB, its default) orders ids by their
    UTF-8 bytes, as CouchDB does, unlike in memory: every document comes
    once, in the view's order."""
    db = disk_db
    assert 'adapter' in db.info()
    db['_design/one'] = {'views': {'key': {
        'map': 'function (doc) { if (doc.n !== undefined) emit("k", null); }'}}}
    ids = ['a', 'a\U0001F600', 'a\uE000', 'a\uFFFD', 'b\U00010000', 'b',
           'b\uE001', 'c\u4e00', '\U0001F601', '\uFF21']
    db.update([{'_id': id, 'n': n} for n, id in enumerate(ids)])
    expected = [row.id for row in db.view('one/key')]
    assert expected.index('a\uE000') < expected.index('a\U0001F600')
    S = Session(db, max_requests=200)
    assert [doc.id for doc in S.iterdocs('one/key', batch=batch)] == expected


@pytest.mark.parametrize('batch, keep_every', [(4, 3), (5, 2)])
def test_iterdocs_job_deleting_most_of_the_last_keys_rows(db, by_group,
                                                          batch, keep_every):
    """A clean-up job deleting most of what it meets in the view's last
    key: the rows it deleted leave the key shorter than the cursor's skip,
    and the rest of the key's documents still come, once."""
    numbered(db, 30)
    expected = [row.id for row in db.view('g/by_group', key=0)]
    S = Session(db)
    met = []
    for doc in S.iterdocs('g/by_group', batch=batch, key=0):
        met.append(doc.id)
        if len(met) % keep_every:
            S.delete(doc)
    assert met == expected


def test_iterdocs_other_writer_deleting_read_rows_of_the_last_key(
        db, by_group):
    """Another writer deleting rows read already in the last key: the rest
    of the key's documents still come, once."""
    numbered(db, 30)
    expected = [row.id for row in db.view('g/by_group')]
    other = couchdb.Database(db.resource.url)
    S = Session(db)
    met = []
    for doc in S.iterdocs('g/by_group', batch=3):
        met.append(doc.id)
        if doc.id == 'n020':            # key 2: n002 ... n017 read already
            for id in ('n005', 'n008', 'n011', 'n014'):
                other.delete(other[id])
    assert met == expected


def test_a_resumed_job_meets_the_rest_after_read_rows_went(db, by_group):
    """Rows read by a stopped run are deleted before the job runs again: the
    rerun hands out the documents it had not reached, and only then
    records the job finished."""
    numbered(db, 30)
    expected = [row.id for row in db.view('g/by_group', key=0)]
    S = Session(db)
    first = []
    it = S.iterdocs('g/by_group', batch=3, key=0, checkpoint='job')
    for doc in it:
        first.append(doc.id)
        doc['v'] = 1
        record = db.get('_local/session-checkpoint-job')
        if record is not None and record['done'] >= 6:
            break                       # a batch began after the record
    done = record['done']
    assert first[:done] == expected[:done]
    for id in first[1:done - 1]:        # read rows, before the anchor
        db.delete(db[id])
    rest = []
    again = Session(db).iterdocs('g/by_group', batch=3, key=0,
                                 checkpoint='job')
    for doc in again:
        rest.append(doc.id)
        doc['v'] = 1
    assert rest == expected[done:]


# -- Replication conflicts -----------------------------------------------------

def siblings(db, id, *leaves, **base):
    """Give ``id`` (created with ``base``) one leaf revision per dict of
    ``leaves``, each a child of the first revision, as replication between
    writers that were apart leaves them; the leaves' revisions, winner
    last."""
    db[id] = dict(base)
    first = db[id].rev
    digest = first.split('-')[1]
    revs = []
    for n, content in enumerate(leaves):
        hash = '%x' % (n + 1) * 32
        revs.append('2-' + hash[:32])
        db.update([dict(content, _id=id, _rev=revs[-1], _revisions={
            'start': 2, 'ids': [hash[:32], digest]})], new_edits=False)
    return sorted(revs)


def leaf_values(db, id):
    """{rev: content} of every live leaf of ``id``."""
    return dict((item['ok']['_rev'], content_of(item['ok']))
                for item in db.get(id, open_revs='all')
                if 'ok' in item and not item['ok'].get('_deleted'))


def content_of(doc):
    return dict((k, v) for k, v in doc.items()
                if k not in ('_id', '_rev', '_revisions', '_conflicts'))


def resolved_content(db, id):
    """The content of ``id`` on the server, which has no conflicts left."""
    doc = db.get(id, conflicts=True)
    assert '_conflicts' not in doc
    return content_of(doc)


def test_conflicts_lists_the_losing_leaves_oldest_first(db, wire):
    """conflicts(): the losers as plain dicts with their _rev, oldest
    first, for one request; [] for a document without conflicts."""
    revs = siblings(db, 'a', {'v': 1}, {'v': 2}, {'v': 3}, v=0)
    S = Session(db)
    wire.clear()
    losers = S.conflicts('a')
    assert [loser['_rev'] for loser in losers] == revs[:-1]
    assert [loser['v'] for loser in losers] == [1, 2]
    assert all(type(loser) is dict for loser in losers)
    assert len(wire) == 1
    put(db, 'b', v=0)
    assert S.conflicts('b') == []
    with pytest.raises(couchdb.ResourceNotFound):
        S.conflicts('nope')


@pytest.mark.parametrize('count', [2, 3])
def test_resolve_conflicts_merges_every_loser_and_deletes_them(db, wire,
                                                               count):
    """resolve_conflicts(): each loser's changes merged over their common
    ancestor; flush() writes the document, then deletes the losers in one
    more request: no _conflicts left, every value kept."""
    leaves = [{'x%d' % n: n, 'shared': 0} for n in range(count)]
    siblings(db, 'a', *leaves, shared=0)
    S = Session(db)
    S.resolve_conflicts('a')
    wire.clear()
    S.flush()
    assert [len(body['docs']) for body in wire.bulk_bodies()] == [1,
                                                                  count - 1]
    assert resolved_content(db, 'a') == dict([('shared', 0)] + [
        ('x%d' % n, n) for n in range(count)])
    assert not S.has_changes()


def test_a_clash_leaves_the_document_unresolved(db):
    """Two leaves changing one field differently: flush() reports the
    document in FlushError, naming the field; nothing of it is written or
    deleted, and the other documents are written."""
    siblings(db, 'a', {'v': 'one'}, {'v': 'two'}, v=0)
    S = Session(db)
    S.resolve_conflicts('a')
    with pytest.raises(FlushError) as caught:
        S.flush()                       # the clash alone
    assert list(caught.value.failures) == ['a']
    S.create({'_id': 'other'})
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert list(caught.value.failures) == ['a']
    assert '/v' in str(caught.value.failures['a'])
    assert len(leaf_values(db, 'a')) == 2 and 'other' in db
    assert generation(db, 'a') == 2


def test_without_a_common_version_only_agreement_merges(db):
    """Once compaction took the common ancestor's body, leaves that differ
    clash, and leaves that agree resolve."""
    siblings(db, 'a', {'v': 1, 'w': 1}, {'v': 1, 'w': 2}, v=0, w=0)
    siblings(db, 'b', {'v': 1}, {'v': 1}, v=0)
    db.compact()
    first = db.get('a', revs='true')['_revisions']
    base = '1-' + first['ids'][-1]
    for _ in range(50):
        if db.get('a', rev=base) is None:
            break
        time.sleep(0.1)
    else:
        pytest.skip('compaction did not remove the old body in time')
    S = Session(db)
    S.resolve_conflicts('a')
    S.resolve_conflicts('b')
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert list(caught.value.failures) == ['a']
    assert 'no common version' in str(caught.value.failures['a'])
    assert '/w' in str(caught.value.failures['a'])
    assert '_conflicts' not in db.get('b', conflicts=True)


def test_a_function_resolves_with_plain_copies(db):
    """resolve=function: called with (winner, loser, base) plain copies
    for each loser; what it returns is written; None leaves the document
    as it is."""
    siblings(db, 'a', {'n': 1}, {'n': 2}, n=0)
    calls = []

    def add_up(winner, loser, base):
        calls.append((winner['n'], loser['n'], base['n'],
                      type(winner) is dict))
        return dict(winner, n=winner['n'] + loser['n'] - base['n'])

    S = Session(db)
    S.resolve_conflicts('a', resolve=add_up)
    S.flush()
    assert calls == [(2, 1, 0, True)]
    assert content_of(db.get('a', conflicts=True)) == {'n': 3}
    siblings(db, 'b', {'n': 1}, {'n': 2}, n=0)
    S.resolve_conflicts('b', resolve=lambda *sides: None)
    assert S.flush() == [] and len(leaf_values(db, 'b')) == 2


def test_the_users_edits_around_resolve_conflicts_are_kept(db):
    """Changes made before and after the call, through kept references
    too, are written with the resolution."""
    siblings(db, 'a', {'x': 1, 'nested': {'k': 0}}, {'y': 1, 'nested': {
        'k': 0}}, nested={'k': 0})
    S = Session(db)
    doc = S['a']
    nested = doc['nested']
    doc['before'] = True
    S.resolve_conflicts(doc)
    nested['k'] = 'after'
    doc['after'] = True
    S.flush()
    assert content_of(db.get('a', conflicts=True)) == {
        'x': 1, 'y': 1, 'nested': {'k': 'after'}, 'before': True,
        'after': True}


@pytest.mark.parametrize('policy', ['raise', 'merge'])
def test_a_writer_moving_the_winner_meanwhile(db, policy):
    """Another writer updates the winner between resolve_conflicts() and
    flush(): on_conflict decides; the losers are deleted only once the
    document is written."""
    siblings(db, 'a', {'x': 1}, {'y': 1})
    S = Session(db, on_conflict=policy)
    S.resolve_conflicts('a')
    change(db, 'a', z='theirs')
    if policy == 'raise':
        with pytest.raises(FlushError):
            S.flush()
        assert len(leaf_values(db, 'a')) == 2
        return
    S.flush()
    assert resolved_content(db, 'a') == {'x': 1, 'y': 1, 'z': 'theirs'}


@pytest.mark.parametrize('which', [1, 2])
def test_a_dropped_answer_while_resolving_loses_nothing(db, remote,
                                                        forwarder, which):
    """The answer to the document's write, or to the deletion of the
    losers, is lost: the flush recognises what landed; the document ends
    resolved, every value kept."""
    siblings(db, 'a', {'x': 1}, {'y': 1}, {'w': 1})
    S = Session(remote)
    S.resolve_conflicts('a')
    forwarder.fail('drop_answer', when=bulk_docs_numbered(which, which),
                   times=1)
    S.flush()
    assert resolved_content(db, 'a') == {'x': 1, 'y': 1, 'w': 1}
    assert not S.has_changes()


def test_a_connection_failure_between_the_requests_keeps_the_losers(
        db, remote, forwarder):
    """The deletion of the losers fails on the connection: the document is
    written with their content, the losers stay (nothing lost), and the
    next flush deletes them."""
    siblings(db, 'a', {'x': 1}, {'y': 1})
    S = Session(remote)
    S.resolve_conflicts('a')
    forwarder.fail('cut_before', when=bulk_docs_numbered(2), times=2)
    with pytest.raises(OSError):
        S.flush()
    assert content_of(db['a']) == {'x': 1, 'y': 1}
    assert len(leaf_values(db, 'a')) == 2
    assert S.has_changes()
    S.flush()
    assert '_conflicts' not in db.get('a', conflicts=True)


def test_get_with_conflicts_gives_the_tracked_document(db, wire):
    """get(id, conflicts=True): the session's document, with _conflicts
    to read; it is never written back."""
    revs = siblings(db, 'a', {'v': 1}, {'v': 2})
    S = Session(db)
    doc = S.get('a', conflicts=True)
    assert doc is S['a'] and doc['_conflicts'] == revs[:1]
    held = S.get('a', conflicts=True)
    assert held is doc
    doc['v'] = 'mine'
    wire.clear()
    S.flush()
    [body] = wire.bulk_bodies()
    assert '_conflicts' not in body['docs'][0]


def test_replicated_conflicts_are_resolved(server_url, db):
    """Two databases edited apart and replicated into one: the session
    merges the leaves replication left."""
    server = couchdb.Server(server_url)
    name = 'test_session_%s' % uuid.uuid4().hex
    other = server.create(name)
    try:
        put(db, 'a', shared=0)
        server.replicate(server_url + db.name, server_url + name)
        change(db, 'a', mine=1)
        change(other, 'a', theirs=1)
        server.replicate(server_url + name, server_url + db.name)
        assert len(leaf_values(db, 'a')) == 2
        S = Session(db)
        S.resolve_conflicts('a')
        S.flush()
        assert resolved_content(db, 'a') == {'shared': 0, 'mine': 1,
                                             'theirs': 1}
    finally:
        del server[name]


def test_a_clash_alone_is_reported_and_keeps_the_users_changes(db):
    """A clash is reported by flush() even when nothing else is pending,
    and the user's own changes to the document are not dropped in
    silence."""
    siblings(db, 'a', {'v': 'one'}, {'v': 'two'}, v=0)
    S = Session(db)
    S['a']['mine'] = 1
    S.resolve_conflicts('a')
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert list(caught.value.failures) == ['a']
    assert '/v' in str(caught.value.failures['a'])
    assert len(leaf_values(db, 'a')) == 2


def test_a_loser_is_not_deleted_when_on_conflict_drops_its_content(db):
    """Another writer moves the winner, and an on_conflict function keeps
    the server's version: the resolution (with the loser's content) was not
    written, so the loser must stay."""
    siblings(db, 'a', {'x': 1}, {'y': 1})
    S = Session(db, on_conflict=lambda mine, theirs, base: theirs)
    S.resolve_conflicts('a')
    change(db, 'a', z='theirs')
    S.flush()
    assert any(value.get('x') == 1 for value in leaf_values(db, 'a').values())


def test_a_loser_is_not_deleted_when_the_winner_was_deleted_meanwhile(db):
    """Another writer deletes the winner between resolve_conflicts() and
    flush(): the loser becomes the document; the flush must not delete it,
    leaving no document at all."""
    siblings(db, 'a', {'x': 1, 's': 0}, {'y': 1, 's': 0}, s=0)
    S = Session(db, on_conflict='merge')
    S.resolve_conflicts('a')
    db.delete(db['a'])
    S.flush()
    assert db.get('a') is not None and db['a']['x'] == 1


def test_resolving_a_document_read_before_a_sibling_won_merges_the_winner(db):
    """The session read the document while its revision won; replication
    then brought a sibling that wins. resolve_conflicts() must fold that
    winner in too: after the flush the document has no conflicts left and
    holds every leaf's content."""
    db['a'] = {'s': 0}
    first = db['a'].rev.split('-')[1]

    def leaf(digest, **content):
        db.update([dict(content, _id='a', _rev='2-' + digest, _revisions={
            'start': 2, 'ids': [digest, first]})], new_edits=False)
    leaf('1' * 32, s=0, mid=1)
    S = Session(db)
    S['a']['mine'] = 1
    leaf('f' * 32, s=0, theirs=1)
    S.resolve_conflicts('a')
    S.flush()
    assert list(leaf_values(db, 'a').values()) == [
        {'s': 0, 'mid': 1, 'mine': 1, 'theirs': 1}]


def test_a_resolve_function_returning_a_deletion_deletes_the_document(db):
    """resolve() returning {'_deleted': True} deletes the document: after
    the flush the session no longer gives it out as a live document."""
    siblings(db, 'a', {'x': 1}, {'y': 1})
    S = Session(db)
    S.resolve_conflicts('a', resolve=lambda *sides: {'_deleted': True})
    S.flush()
    assert db.get('a') is None
    assert S.get('a') is None


def test_each_loser_merges_on_its_nearest_ancestor_with_what_was_folded(db):
    """Two losers below a shared revision C, the winner on another branch:
    the second loser merges on C (its ancestor with the first, folded in
    already), so its undoing of C's change is kept, not lost."""
    db['a'] = {'f': 0}
    root = db['a'].rev.split('-')[1]

    def write(rev, history, **content):
        db.update([dict(content, _id='a', _rev=rev, _revisions={
            'start': int(rev[0]), 'ids': history})], new_edits=False)
    c, w = 'c' * 32, 'e' * 32
    write('2-' + c, [c, root], f=1)
    write('2-' + w, [w, root], f=0)
    write('3-' + 'a' * 32, ['a' * 32, c, root], f=1, x=1)
    write('3-' + 'b' * 32, ['b' * 32, c, root], f=0)
    write('3-' + 'f' * 32, ['f' * 32, w, root], f=0, w=1)
    S = Session(db)
    S.resolve_conflicts('a')
    S.flush()
    assert resolved_content(db, 'a') == {'f': 0, 'w': 1, 'x': 1}


def test_resolving_after_a_lost_answer_recognises_the_write(db, remote,
                                                            forwarder):
    """A write whose answer was lost (it landed), then resolve_conflicts()
    and a plain flush: the session finds its own write, writes the merge
    over it and deletes the loser; no conflict is reported."""
    siblings(db, 'a', {'x': 1}, {'y': 1})
    S = Session(remote)
    S['a']['mine'] = 1
    forwarder.fail('drop_answer', when=is_bulk_docs, times=2)
    with pytest.raises(OSError):
        S.flush()
    S.resolve_conflicts('a')
    S.flush()
    assert resolved_content(db, 'a') == {'x': 1, 'y': 1, 'mine': 1}


# -- Friendliness -------------------------------------------------------------

def test_tracked_documents_work_with_ordinary_code(db):
    """isinstance, ==, dict(), copy.deepcopy and json all behave."""
    put(db, 'a', nested={'l': [1, {'x': 2}]})
    doc = Session(db)['a']
    assert isinstance(doc, dict) and isinstance(doc['nested']['l'], list)
    plain = json.loads(json.dumps(dict(db['a'])))
    assert doc == plain and plain == doc
    assert doc['nested'] == {'l': [1, {'x': 2}]}
    assert dict(doc)['nested'] == plain['nested']
    copied = copy.deepcopy(doc)
    assert json.loads(json.dumps(copied)) == plain
    assert type(copied['nested']) is dict
    assert json.dumps(doc.copy()) == json.dumps(plain)
    assert repr(doc['nested']) == repr(plain['nested'])
    assert len(doc['nested']['l']) == 2 and 1 in doc['nested']['l']
    assert doc['nested']['l'] + [3] == [1, {'x': 2}, 3]


def test_copies_of_tracked_documents_are_plain_and_detached(db):
    """copy.copy, copy.deepcopy and .copy() give plain copies: changing them
    does not change the document behind the session's back."""
    put(db, 'a', owner={'name': {'first': 'bob'}})
    S = Session(db)
    doc = S['a']
    for make_copy in (copy.copy, copy.deepcopy, lambda d: d.copy()):
        duplicate = make_copy(doc['owner'])
        assert type(duplicate) is dict and duplicate == doc['owner']
        duplicate['name']['first'] = 'ann'
    assert type(copy.deepcopy(doc)) is dict
    assert doc['owner']['name']['first'] == 'bob'
    assert S.flush() == []


def test_augmented_assignment_keeps_references_to_the_child(db):
    """d[k] += v changes the list in place, as in Python: references taken
    before still see the document's list."""
    put(db, 'a', tags=['a'], nested={'l': [1]})
    S = Session(db)
    doc = S['a']
    tags = doc['tags']
    doc['tags'] += ['b']
    tags.append('c')
    inner = doc['nested']['l']
    doc['nested']['l'] *= 2
    inner.append(9)
    assert doc['tags'] == ['a', 'b', 'c']
    assert doc['nested']['l'] == [1, 1, 9]
    S.flush()
    assert db['a']['tags'] == ['a', 'b', 'c']
    assert db['a']['nested'] == {'l': [1, 1, 9]}


# -- The benchmark ------------------------------------------------------------

def test_benchmark_smoke_run(server_url, capsys):
    """benchmarks/bench_session.py runs at tiny sizes (no time is
    asserted: speed is measured by `make bench`)."""
    bench = load_benchmark()
    bench.main(['--smoke', '--url', server_url])
    out = capsys.readouterr().out
    for title in ('1. edit', '2. mixed', '3. idle-cache', '4. read',
                  '5. memory', '6. read', '7. edit', '8. view'):
        assert title in out


def test_benchmark_of_big_jobs_smoke_run(server_url, capsys):
    """benchmarks/bench_jobs.py runs at tiny sizes, its jobs in processes
    of their own, and finds every document changed once after a kill."""
    bench = load_benchmark('bench_jobs.py')
    bench.main(['--smoke', '--url', server_url])
    out = capsys.readouterr().out
    for title in ('1. migration', '2. creates', '3. resume'):
        assert title in out
    assert 'every document changed exactly once: True' in out


def test_benchmark_of_client_cpu_smoke_run(server_url, capsys):
    """benchmarks/bench_cpu.py runs its ways at a tiny size, each in a
    process of its own (without valgrind: nothing is counted), and
    workload 7 by phase."""
    bench = load_benchmark('bench_cpu.py')
    bench.main(['--smoke', '--phases', '--url', server_url])
    out = capsys.readouterr().out
    for title in ('1. edit 20 documents', '4. read every field of 20',
                  '7. edit 20 documents read by id', '7. by phase'):
        assert title in out
    assert out.count('run, not counted (--smoke)') == 4


def test_benchmark_session_requests_are_as_few_as_the_floors(server):
    """On the benchmark's workloads the session makes as many requests as
    hand-written bulk code, however often it reads an id, and one more
    where, holding documents, it reads a view's documents apart from its
    rows."""
    bench = load_benchmark()
    meter = bench.Meter()
    try:
        for workload, more in (
                (lambda db: bench.edit_workload(db, meter, 30, 1), 0),
                (lambda db: bench.mixed_workload(db, meter, 1), 0),
                (lambda db: bench.read_by_id_workload(db, meter, 30, 1), 0),
                (lambda db: bench.edit_by_id_workload(db, meter, 30, 1), 0),
                (lambda db: bench.held_view_workload(db, meter, 30, 1), 1)):
            with temporary_database(server) as db:
                rows = dict((row[0], row) for row in workload(db))
            assert rows['session'].requests == rows['floor'].requests + more
            assert rows['floor'].requests <= 2
            if 'naive' in rows:
                assert rows['naive'].requests > 30
            assert 0 < rows['session'].received
    finally:
        meter.close()


def load_benchmark(name='bench_session.py'):
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, 'benchmarks', name)
    if os.path.join(here, 'benchmarks') not in sys.path:
        sys.path.insert(0, os.path.join(here, 'benchmarks'))
    spec = importlib.util.spec_from_file_location(name[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- Property tests -----------------------------------------------------------
#
# Property-based tests of change tracking, diffs and JSON types. Every
# example works on a real server (the ``db`` fixture of conftest.py):
# a document is written with plain python-couchdb, read in a `Session`,
# changed, and what the user sees is checked: the tracked document, `diff`,
# what `flush` returns and what the server holds afterwards.
#
# The reference model is a plain copy of the document (nested dicts and lists)
# that undergoes the same changes. A plain value put into a tracked document
# becomes the document's own, so the model stores a ``copy.deepcopy`` of it
# and changes both the user's value and its copy the same way (`share`).
#
# The server is a JavaScript one (PouchDB Server) in development: it keeps no
# difference between ``1`` and ``1.0`` and keeps integers exactly only up to
# 2**53, so integers stay in that range and documents read back from the
# server are compared with numbers taken by value (``True`` is still not
# ``1``).


# -- Property tests: strategies -----------------------------------------------

MAX_INT = 2 ** 53

# Numbers a JavaScript server gives back in another form than Python's json
# writes them: PouchDB Server gives 1.0 as 1, 5.948392946531295e+16 as
# 59483929465312950 (an int to Python, which == tells from the float), and
# 2**53 + 1 as 2**53 (the double nearest to it).
RENDERED = [1.0, 5.948392946531295e16, 2 ** 53 + 1]

#: Object keys, with the characters JSON Pointer escapes (``~`` and ``/``).
keys = st.text(alphabet='ab~/1_ é', max_size=3)
#: Top-level keys: CouchDB reserves those starting with ``_``.
top_keys = keys.filter(lambda key: not key.startswith('_'))

finite_floats = st.floats(allow_nan=False, allow_infinity=False)
numbers = st.one_of(st.booleans(), st.integers(-MAX_INT, MAX_INT),
                    finite_floats)
scalars = st.one_of(st.none(), numbers, st.text(max_size=5))
#: Lists that ``sort()`` can sort without a key.
sortable_lists = st.one_of(st.lists(numbers, max_size=5),
                           st.lists(st.text(max_size=3), max_size=5))
json_values = st.recursive(
    scalars | sortable_lists,
    lambda children: (st.lists(children, max_size=4) |
                      st.dictionaries(keys, children, max_size=4)),
    max_leaves=6)
json_lists = st.lists(json_values, max_size=4) | sortable_lists
json_containers = json_lists | st.dictionaries(keys, json_values, max_size=3)
documents = st.dictionaries(top_keys, json_values | json_containers,
                            max_size=5)

#: ``(before, after)``: equal in Python, different JSON values.
equal_values_of_other_types = (
    st.sampled_from([(1, True), (0, False), (True, 1), (False, 0),
                     (True, 1.0), (False, 0.0)]) |
    st.integers(-1000, 1000).map(lambda n: (n, float(n))))

slice_steps = st.sampled_from([None, 1, 2, 3, -1, -2])

SETTINGS = dict(deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


# -- Property tests: helpers --------------------------------------------------

def same(a, b, exact_numbers=True):
    """Whether ``a`` and ``b`` are the same JSON value: ``True`` is not ``1``
    and, with ``exact_numbers``, ``1`` is not ``1.0``."""
    if isinstance(a, dict) or isinstance(b, dict):
        return (isinstance(a, dict) and isinstance(b, dict) and
                len(a) == len(b) and
                all(key in b and same(value, b[key], exact_numbers)
                    for key, value in a.items()))
    if isinstance(a, list) or isinstance(b, list):
        return (isinstance(a, list) and isinstance(b, list) and
                len(a) == len(b) and
                all(same(x, y, exact_numbers) for x, y in zip(a, b)))
    if exact_numbers:
        return type(a) is type(b) and a == b
    number = (int, float)
    if type(a) in number and type(b) in number:
        # JavaScript writes 4.8e16 as 48000000000000000.
        return float(a) == float(b)
    return type(a) is type(b) and a == b


def save(db, content):
    """Write ``content`` as a new document with plain python-couchdb and read
    it back: ``(id, the server's version as plain dicts and lists)``."""
    id = uuid.uuid4().hex
    db[id] = copy.deepcopy(content)
    return id, dict(db[id])


def vandalize(value):
    """Change a container the caller handed over (or got back), to show that
    the document does not share it."""
    if isinstance(value, list):
        value.append('vandal')
    elif isinstance(value, dict):
        value['vandal'] = True


def ior(target, values):
    target |= values
    return target


def iadd(target, values):
    target += values
    return target


def imul(target, times):
    target *= times
    return target


def imul_plain(target, times):
    """``target *= times`` as JSON would do it: the repeats are copies."""
    copies = [copy.deepcopy(item) for _ in range(times - 1) for item in target]
    if times > 0:
        target.extend(copies)
    else:
        target.clear()
    return target


def sortable(items):
    return (all(type(item) in (bool, int, float) for item in items) or
            all(type(item) is str for item in items))


def json_sort_key(item):
    # A key function of a tracked list gets tracked values, as every read.
    return json.dumps(item, sort_keys=True, default=session.plain)


def json_size(value):
    return len(json.dumps(value))


Handle = collections.namedtuple('Handle', 'tracked plain root expr')

_RAISED = object()


class Mirror(object):
    """Applies the same random changes to a tracked document and to a plain
    model of it, checking after each change that both agree.

    It keeps every container it has reached (a "handle": the tracked proxy
    and the model's object), so later changes may go through references
    obtained earlier, as user code does.
    """

    def __init__(self, data, doc, plain):
        self.data = data
        self.doc = doc
        self.plain = plain
        self.pool = [Handle(doc, plain, True, 'doc')]

    def draw(self, strategy):
        return self.data.draw(strategy)

    def run(self, max_steps=12):
        for _ in range(self.draw(st.integers(0, max_steps))):
            self.step()

    def step(self):
        handle = self.pool[self.draw(st.integers(0, len(self.pool) - 1))]
        for _ in range(self.draw(st.integers(0, 3))):
            child = self.descend(handle)
            if child is None:
                break
            handle = child
            self.pool.append(handle)
        if isinstance(handle.plain, dict):
            self.change_dict(handle)
        else:
            self.change_list(handle)
        assert same(self.doc, self.plain)
        assert self.doc == self.plain

    def mark_every_container(self):
        """Change every dict and list of the document once, through the
        tracked document and in the model: a container the document held
        twice (an alias) would show the change twice."""
        paths = []

        def collect(value, path):
            if isinstance(value, (dict, list)):
                paths.append(path)
                where = value if isinstance(value, dict) else range(len(value))
                for k in where:
                    collect(value[k], path + [k])
        collect(self.plain, [])
        for number, path in enumerate(paths):
            t, p = self.doc, self.plain
            for k in path:
                t, p = t[k], p[k]
            if isinstance(p, list):
                t.append('mark %d' % number)
                p.append('mark %d' % number)
            else:
                t['mark %d' % number] = number
                p['mark %d' % number] = number
        assert same(self.doc, self.plain)

    # Reading children through the different read paths.

    def descend(self, handle):
        t, p, expr = handle.tracked, handle.plain, handle.expr
        where = p if isinstance(p, dict) else range(len(p))
        containers = [k for k in where if isinstance(p[k], (dict, list))]
        if not containers:
            return None
        k = self.draw(st.sampled_from(containers))
        if isinstance(p, dict):
            how = self.draw(st.sampled_from(
                ['[]', 'get', 'items', 'values', 'setdefault']))
            if how == '[]':
                child, text = t[k], '%s[%r]' % (expr, k)
            elif how == 'get':
                child, text = t.get(k), '%s.get(%r)' % (expr, k)
            elif how == 'items':
                child = [v for key, v in t.items() if key == k][0]
                text = 'dict(%s.items())[%r]' % (expr, k)
            elif how == 'values':
                position = list(p).index(k)
                child = list(t.values())[position]
                text = 'list(%s.values())[%d]' % (expr, position)
            else:
                child = t.setdefault(k, 'unused')
                text = '%s.setdefault(%r, "unused")' % (expr, k)
        else:
            n = len(p)
            how = self.draw(st.sampled_from(
                ['[]', 'negative', 'iter', 'reversed']))
            if how == '[]':
                child, text = t[k], '%s[%d]' % (expr, k)
            elif how == 'negative':
                child, text = t[k - n], '%s[%d]' % (expr, k - n)
            elif how == 'iter':
                child = [item for item in t][k]
                text = '[x for x in %s][%d]' % (expr, k)
            else:
                child = list(reversed(t))[n - 1 - k]
                text = 'list(reversed(%s))[%d]' % (expr, n - 1 - k)
        assert same(child, p[k]), text
        return Handle(child, p[k], False, text)

    # Values to put in.

    def value(self, lists_only=False):
        """``(for the tracked side, for the model, source)``: a new JSON
        value (``source`` is None) or, sometimes, a container of the
        document itself: its tracked proxy, a copy of its model object, and
        that object as ``source``."""
        handles = [h for h in self.pool
                   if (isinstance(h.plain, list) or not lists_only) and
                   json_size(h.plain) < 400]
        if handles and self.draw(st.integers(0, 4)) == 0:
            h = handles[self.draw(st.integers(0, len(handles) - 1))]
            return h.tracked, copy.deepcopy(h.plain), h.plain
        v = self.draw(json_lists if lists_only else json_values)
        return v, copy.deepcopy(v), None

    def key(self, handle):
        """A key of the dict of ``handle``: one it has, or any (never one
        starting with ``_`` at the top level)."""
        candidates = [k for k in handle.plain
                      if not (handle.root and k.startswith('_'))]
        fresh = top_keys if handle.root else keys
        if not candidates:
            return self.draw(fresh)
        if self.draw(st.booleans()):
            return self.draw(st.sampled_from(candidates))
        return self.draw(fresh)

    def apply(self, text, on_tracked, on_plain):
        """Run a change on both sides: both raise the same exception, or
        both return the same value."""
        note(text)
        try:
            expected = on_plain()
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            with pytest.raises(type(exc)):
                on_tracked()
            return _RAISED
        got = on_tracked()
        assert same(got, expected), text
        return got

    def share(self, stored, model):
        """Change a fresh value the caller stored (and the model's copy of
        it) through the caller's reference: a plain value stored in a
        document is the document's own, so the document must see it."""
        vandalize(stored)
        vandalize(model)

    def apply_and_vandalize(self, text, on_tracked, on_plain, part=None):
        """`apply` a change that takes a value out of the document, then
        change that value on both sides: the document must not see it.
        The session hands out a copy of what it takes out (no object is
        shared between a document and the code around it), so the model
        copies it too."""
        got, expected = [], []
        self.apply(text, lambda: got.append(on_tracked()) or got[0],
                   lambda: expected.append(copy.deepcopy(on_plain())) or
                   expected[0])
        if got:
            vandalize(got[0] if part is None else got[0][part])
            vandalize(expected[0] if part is None else expected[0][part])

    # Changes of dicts.

    def change_dict(self, h):
        t, p, expr = h.tracked, h.plain, h.expr
        ops = ['[]=', 'del', 'update', 'setdefault', 'pop', '|=',
               'child +=', 'child *=']
        if not h.root:
            ops += ['popitem', 'clear']
        op = self.draw(st.sampled_from(ops))
        event('dict ' + op)
        if op == '[]=':
            k = self.key(h)
            vt, vp, source = self.value()
            old = p.get(k)

            def on_tracked():
                t[k] = vt

            def on_plain():
                p[k] = vp
            self.apply('%s[%r] = %r' % (expr, k, vp), on_tracked, on_plain)
            if source is None:
                self.share(vt, vp)
            elif source is old:
                self.forget_within(old)
        elif op == 'del':
            k = self.key(h)

            def on_tracked():
                del t[k]

            def on_plain():
                del p[k]
            self.apply('del %s[%r]' % (expr, k), on_tracked, on_plain)
        elif op in ('update', '|='):
            mt, mp, fresh = {}, {}, []
            for _ in range(self.draw(st.integers(0, 3))):
                k = self.key(h)
                mt[k], mp[k], source = self.value()
                if source is None:
                    fresh.append((k, mt[k], mp[k]))
            if op == '|=':
                self.apply('%s |= %r' % (expr, mp),
                           lambda: ior(t, mt) is t,
                           lambda: ior(p, mp) is p)
            else:
                form = self.draw(st.sampled_from(['dict', 'pairs', 'kwargs']))
                if form == 'dict':
                    on_tracked = lambda: t.update(mt)  # noqa: E731
                elif form == 'pairs':
                    on_tracked = lambda: t.update(list(mt.items()))  # noqa
                else:
                    on_tracked = lambda: t.update(**mt)  # noqa: E731
                self.apply('%s.update(%r) (as %s)' % (expr, mp, form),
                           on_tracked, lambda: p.update(mp))
            for k, stored, model in fresh:
                if p.get(k) is model:       # not overwritten by a later one
                    self.share(stored, model)
                else:
                    vandalize(stored)
        elif op == 'setdefault':
            k = self.key(h)
            vt, vp, source = self.value()
            got = self.apply('%s.setdefault(%r, %r)' % (expr, k, vp),
                             lambda: t.setdefault(k, vt),
                             lambda: p.setdefault(k, vp))
            if source is None and p[k] is vp:
                self.share(vt, vp)
            elif source is None:
                vandalize(vt)           # not stored: the key was there
            if isinstance(p[k], (dict, list)):
                self.pool.append(Handle(got, p[k], False, '%s.setdefault(%r)'
                                        % (expr, k)))
        elif op == 'pop':
            k = self.key(h)
            if self.draw(st.booleans()):
                self.apply_and_vandalize('%s.pop(%r)' % (expr, k),
                                         lambda: t.pop(k), lambda: p.pop(k))
            else:
                self.apply_and_vandalize('%s.pop(%r, None)' % (expr, k),
                                         lambda: t.pop(k, None),
                                         lambda: p.pop(k, None))
        elif op == 'popitem':
            self.apply_and_vandalize('%s.popitem()' % expr,
                                     lambda: t.popitem(), lambda: p.popitem(),
                                     part=1)
        elif op == 'clear':
            self.apply('%s.clear()' % expr, lambda: t.clear(),
                       lambda: p.clear())
        else:
            self.change_child_list(h, op)

    # Changes of lists.

    def change_list(self, h):
        t, p, expr = h.tracked, h.plain, h.expr
        n = len(p)
        ops = ['[]=', 'del', '[:]=', 'del [:]', 'append', 'extend', 'insert',
               'pop', 'remove', 'sort', 'reverse', '+=', '*=', 'clear',
               'child +=', 'child *=']
        op = self.draw(st.sampled_from(ops))
        event('list ' + op)
        index = st.integers(-n - 1, n)      # out of range at both ends too
        if op == '[]=':
            i = self.draw(index)
            vt, vp, source = self.value()
            old = p[i] if -n <= i < n else None

            def on_tracked():
                t[i] = vt

            def on_plain():
                p[i] = vp
            raised = self.apply('%s[%d] = %r' % (expr, i, vp), on_tracked,
                                on_plain) is _RAISED
            if source is None and raised:
                vandalize(vt)           # not stored
            elif source is None:
                self.share(vt, vp)
            elif source is old:
                self.forget_within(old)
        elif op == 'del':
            i = self.draw(index)

            def on_tracked():
                del t[i]

            def on_plain():
                del p[i]
            self.apply('del %s[%d]' % (expr, i), on_tracked, on_plain)
        elif op in ('[:]=', 'del [:]'):
            bound = st.none() | st.integers(-n - 2, n + 2)
            s = slice(self.draw(bound), self.draw(bound),
                      self.draw(slice_steps))
            if op == 'del [:]':
                def on_tracked():
                    del t[s]

                def on_plain():
                    del p[s]
                self.apply('del %s[%r]' % (expr, s), on_tracked, on_plain)
                return
            if s.step not in (None, 1) and self.draw(st.integers(0, 4)):
                # An extended slice takes exactly as many items as it has.
                count = len(range(*s.indices(n)))
                vt = self.draw(st.lists(json_values, min_size=count,
                                        max_size=count))
                vp, source = copy.deepcopy(vt), None
            else:
                vt, vp, source = self.value(lists_only=True)

            def on_tracked():
                t[s] = vt

            def on_plain():
                p[s] = vp
            raised = self.apply('%s[%r] = %r' % (expr, s, vp), on_tracked,
                                on_plain) is _RAISED
            if source is None:
                vandalize(vt)           # its items are stored, not itself
                for stored, model in zip(vt, vp):
                    if raised:
                        vandalize(stored)
                    else:
                        self.share(stored, model)
        elif op == 'append':
            vt, vp, source = self.value()
            self.apply('%s.append(%r)' % (expr, vp),
                       lambda: t.append(vt), lambda: p.append(vp))
            if source is None:
                self.share(vt, vp)
        elif op in ('extend', '+='):
            vt, vp, source = self.value(lists_only=True)
            if op == 'extend':
                self.apply('%s.extend(%r)' % (expr, vp),
                           lambda: t.extend(vt), lambda: p.extend(vp))
            else:
                self.apply('%s += %r' % (expr, vp),
                           lambda: iadd(t, vt) is t, lambda: iadd(p, vp) is p)
            if source is None:
                for stored, model in zip(vt, vp):
                    self.share(stored, model)
        elif op == 'insert':
            i = self.draw(st.integers(-n - 2, n + 2))
            vt, vp, source = self.value()
            self.apply('%s.insert(%d, %r)' % (expr, i, vp),
                       lambda: t.insert(i, vt), lambda: p.insert(i, vp))
            if source is None:
                self.share(vt, vp)
        elif op == 'pop':
            if self.draw(st.booleans()):
                self.apply_and_vandalize('%s.pop()' % expr, lambda: t.pop(),
                                         lambda: p.pop())
            else:
                i = self.draw(index)
                self.apply_and_vandalize('%s.pop(%d)' % (expr, i),
                                         lambda: t.pop(i), lambda: p.pop(i))
        elif op == 'remove':
            if n and self.draw(st.booleans()):
                v = copy.deepcopy(p[self.draw(st.integers(0, n - 1))])
            else:
                v = self.draw(json_values)
            vp = copy.deepcopy(v)
            self.apply('%s.remove(%r)' % (expr, vp),
                       lambda: t.remove(v), lambda: p.remove(vp))
        elif op == 'sort':
            reverse = self.draw(st.booleans())
            if sortable(p) and self.draw(st.integers(0, 3)):
                self.apply('%s.sort(reverse=%r)' % (expr, reverse),
                           lambda: t.sort(reverse=reverse),
                           lambda: p.sort(reverse=reverse))
            else:
                self.apply('%s.sort(key=json_sort_key, reverse=%r)'
                           % (expr, reverse),
                           lambda: t.sort(key=json_sort_key, reverse=reverse),
                           lambda: p.sort(key=json_sort_key, reverse=reverse))
        elif op == 'reverse':
            self.apply('%s.reverse()' % expr, lambda: t.reverse(),
                       lambda: p.reverse())
        elif op == '*=':
            times = self.draw(st.integers(-1, 3))
            self.apply('%s *= %d' % (expr, times),
                       lambda: imul(t, times) is t,
                       lambda: imul_plain(p, times) is p)
        elif op == 'clear':
            self.apply('%s.clear()' % expr, lambda: t.clear(),
                       lambda: p.clear())
        else:
            self.change_child_list(h, op)

    def change_child_list(self, h, op):
        """``parent[k] += values`` or ``parent[k] *= n`` on a list child:
        Python reads the child, changes it in place, and stores it back (a
        store, so the model stores a copy)."""
        t, p, expr = h.tracked, h.plain, h.expr
        where = p if isinstance(p, dict) else range(len(p))
        lists = [k for k in where if isinstance(p[k], list)]
        if not lists:
            return
        k = self.draw(st.sampled_from(lists))
        old = p[k]
        if op == 'child +=':
            vt, vp, source = self.value(lists_only=True)

            def on_tracked():
                t[k] += vt

            def on_plain():
                child = p[k]
                child += vp
                p[k] = copy.deepcopy(child)
            self.apply('%s[%r] += %r' % (expr, k, vp), on_tracked, on_plain)
        else:
            times = self.draw(st.integers(-1, 3))

            def on_tracked():
                t[k] *= times

            def on_plain():
                p[k] = copy.deepcopy(imul_plain(p[k], times))
            self.apply('%s[%r] *= %d' % (expr, k, times), on_tracked,
                       on_plain)
        self.forget_within(old)

    def forget_within(self, old):
        """Drop the handles into ``old``, a container just stored back over
        itself (``parent[k] += v``, ``d[k] = d[k]``). The session stores a
        copy, so references taken before no longer reach the document;
        Python would keep the object. The tests take no side: they stop
        using those references."""
        inside = set()
        stack = [old]
        while stack:
            value = stack.pop()
            if isinstance(value, (dict, list)):
                inside.add(id(value))
                stack.extend(value.values() if isinstance(value, dict)
                             else value)
        self.pool = [h for h in self.pool
                     if h.root or id(h.plain) not in inside]


def check_patch(patch, before, current):
    """``patch`` (a `Session.diff`) turns ``before`` into ``current``, op by
    op, and each ``was`` is what the op overwrites or removes."""
    state = copy.deepcopy(before)
    for op in patch:
        assert op['op'] in ('add', 'remove', 'replace'), op
        if op['op'] in ('replace', 'remove'):
            # The value at the path when the op applies: for several items
            # removed from a list, the same path in turn.
            assert same(op['was'], jsonpointer.resolve_pointer(
                state, op['path'])), op
        if op['op'] == 'replace':
            assert not same(op['value'], op['was']), op
        state = jsonpatch.apply_patch(state, [op])
    assert same(state, current)
    assert same(jsonpatch.apply_patch(before, patch), current)


# -- Property tests: tracking -------------------------------------------------

@settings(max_examples=300, **SETTINGS)
@given(content=documents, data=st.data())
def test_tracked_document_changes_like_a_plain_copy_and_flushes_them(
        db, content, data):
    """Random changes at any depth reach the server, and only real ones."""
    id, plain = save(db, content)
    S = session.Session(db)
    doc = S[id]
    mirror = Mirror(data, doc, plain)
    for round in range(data.draw(st.integers(1, 2))):
        note('-- round %d' % round)
        original = copy.deepcopy(plain)
        mirror.run()
        assert same(doc, plain)
        assert doc == plain

        results = S.flush()
        event('written' if results else 'not written')
        if same(plain, original):
            assert results == []
        else:
            [(ok, written_id, rev)] = results
            assert ok and written_id == id
            assert rev != original['_rev']
            assert doc['_rev'] == rev
            plain['_rev'] = rev
        assert S.flush() == []
        fresh = session.Session(db)[id]
        assert fresh['_rev'] == plain['_rev']
        assert same(fresh, plain, exact_numbers=False)
        assert same(doc, plain)
    mirror.mark_every_container()


# -- Property tests: diff -----------------------------------------------------

@settings(max_examples=300, **SETTINGS)
@given(before=documents, after=documents, data=st.data())
def test_diff_turns_the_fetched_version_into_one_assigned_key_by_key(
        db, before, after, data):
    """The diff of a document rewritten key by key patches the version
    fetched into the current one."""
    id, fetched = save(db, before)
    S = session.Session(db)
    doc = S[id]
    gone = [k for k in fetched if not k.startswith('_') and k not in after]
    work = [('del', k) for k in gone] + [('set', k) for k in after]
    for how, k in data.draw(st.permutations(work)):
        if how == 'del':
            del doc[k]
        elif data.draw(st.booleans()):
            doc[k] = after[k]
        else:
            doc.update({k: after[k]})
    current = dict(copy.deepcopy(after), _id=id, _rev=fetched['_rev'])
    assert same(doc, current)
    patch = S.diff(doc)
    check_patch(patch, fetched, current)
    if same(fetched, current):
        assert patch == []


@settings(max_examples=300, **SETTINGS)
@given(content=documents, data=st.data())
def test_diff_turns_the_fetched_version_into_one_changed_at_random(
        db, content, data):
    """The diff after random changes at any depth patches the version
    fetched into the current one, and shares nothing with the document."""
    id, plain = save(db, content)
    fetched = copy.deepcopy(plain)
    S = session.Session(db)
    doc = S[id]
    mirror = Mirror(data, doc, plain)
    mirror.run(max_steps=15)
    if data.draw(st.booleans()):
        mirror.mark_every_container()
    patch = S.diff(doc)
    check_patch(patch, fetched, plain)
    if same(fetched, plain):
        assert patch == []
    for op in patch:
        vandalize(op.get('value'))
        vandalize(op.get('was'))
    assert same(doc, plain)
    check_patch(S.diff(doc), fetched, plain)


@settings(max_examples=100, **SETTINGS)
@given(content=documents, data=st.data())
def test_changes_that_cancel_out_are_neither_diffed_nor_sent(
        db, content, data):
    """A document changed and then put back as fetched has an empty diff
    and is not written."""
    id, plain = save(db, content)
    fetched = copy.deepcopy(plain)
    S = session.Session(db)
    doc = S[id]
    Mirror(data, doc, plain).run()
    event('changed' if not same(plain, fetched) else 'unchanged')
    # Put it back, key by key.
    for k in list(doc):
        if k not in fetched:
            del doc[k]
    for k in data.draw(st.permutations(
            [k for k in fetched if not k.startswith('_')])):
        doc[k] = copy.deepcopy(fetched[k])
    assert same(doc, fetched)
    assert S.diff(doc) == []
    assert not S.has_changes()
    assert S.flush() == []
    assert session.Session(db)[id]['_rev'] == fetched['_rev']


def put_scalars_back(data, doc, plain, fetched):
    """Put some scalars of ``doc`` (mirrored by ``plain``) back as they are
    in ``fetched``, in place, at any depth where both hold a dict, as
    copies or as the fetched objects themselves."""
    for k in list(plain):
        if k not in fetched or k.startswith('_'):
            continue
        was, now = fetched[k], plain[k]
        if isinstance(was, dict) and isinstance(now, dict):
            put_scalars_back(data, doc[k], now, was)
        elif not isinstance(was, (dict, list)) and \
                not isinstance(now, (dict, list)) and \
                data.draw(st.booleans()):
            value = was if data.draw(st.booleans()) else copy.copy(was)
            doc[k] = value
            plain[k] = value


@settings(max_examples=150, **SETTINGS)
@given(content=documents, data=st.data())
def test_a_flush_writes_a_document_exactly_when_it_differs_from_its_fetch(
        db, content, data):
    """After random changes at any depth, some scalars then put back as
    fetched, a flush writes the document if and only if it differs from
    the version fetched, and the server then holds what the user sees."""
    id, plain = save(db, content)
    fetched = copy.deepcopy(plain)
    S = session.Session(db)
    doc = S[id]
    Mirror(data, doc, plain).run()
    put_scalars_back(data, doc, plain, fetched)
    assert same(doc, plain)
    differs = not same(plain, fetched)
    event('differs' if differs else 'as fetched')
    results = S.flush()
    stored = dict(db[id])
    if differs:
        assert [(ok, written) for ok, written, _ in results] == [(True, id)]
        assert stored['_rev'] != fetched['_rev']
    else:
        assert results == []
        assert stored['_rev'] == fetched['_rev']
    del stored['_rev'], plain['_rev']
    assert same(stored, plain, exact_numbers=False)


# -- Property tests: JSON types -----------------------------------------------

PLACES = {
    # name: (content holding a value, path of the value in JSON Pointer)
    'top': (lambda v: {'v': v, 'w': 1}, '/v'),
    'dict': (lambda v: {'d': {'v': v, 'w': 1}}, '/d/v'),
    'list': (lambda v: {'l': ['x', v, 'y']}, '/l/1'),
}


def set_at(doc, path, value):
    *parents, last = path.strip('/').split('/')
    for part in parents:
        doc = doc[part]
    doc[int(last) if isinstance(doc, list) else last] = value


@settings(max_examples=40, **SETTINGS)
@given(values=equal_values_of_other_types,
       place=st.sampled_from(sorted(PLACES)))
def test_an_equal_value_of_another_json_type_is_a_change(db, values, place):
    """1 -> True and 1 -> 1.0 are diffed and written, though they are ==."""
    was, value = values
    make, path = PLACES[place]
    id, fetched = save(db, make(was))
    S = session.Session(db)
    doc = S[id]
    set_at(doc, path, value)
    patch = S.diff(doc)
    assert same(patch, [{'op': 'replace', 'path': path, 'value': value,
                         'was': was}])
    [(ok, written_id, rev)] = S.flush()
    assert ok and written_id == id and rev != fetched['_rev']
    stored = jsonpointer.resolve_pointer(session.Session(db)[id], path)
    assert same(stored, value, exact_numbers=False)


@settings(max_examples=60, **SETTINGS)
@given(content=documents, data=st.data())
def test_storing_an_equal_value_of_the_same_type_is_not_a_change(
        db, content, data):
    """Values stored over themselves (as copies), at any depth, are
    neither diffed nor written."""
    id, fetched = save(db, content)
    S = session.Session(db)
    doc = S[id]
    paths = []

    def collect(value, path):
        items = (value.items() if isinstance(value, dict)
                 else enumerate(value) if isinstance(value, list) else ())
        for k, item in items:
            if not (path == [] and k.startswith('_')):
                paths.append(path + [k])
                collect(item, path + [k])
    collect(fetched, [])
    if paths:
        for path in data.draw(st.lists(st.sampled_from(paths), max_size=8)):
            note('doc%s = copy of itself' % ''.join('[%r]' % k for k in path))
            target, source = doc, fetched
            for k in path[:-1]:
                target, source = target[k], source[k]
            target[path[-1]] = copy.deepcopy(source[path[-1]])
    assert same(doc, fetched)
    assert S.diff(doc) == []
    assert S.flush() == []
    assert session.Session(db)[id]['_rev'] == fetched['_rev']


# -- Property tests: the three-way merge --------------------------------------
#
# A concurrent writer: the session fetches a document and changes it through
# the tracked proxy, while another writer changes (or deletes) a plain copy
# of the same version and saves it with python-couchdb. `flush(on_conflict=
# 'merge')` must then write the three-way merge of the version fetched (the
# base), the session's (mine) and the server's (theirs), or report a real
# conflict with both sides left as they were.
#
# The reference model, `three_way`, is written from the rules of the merge:
# a value changed on one side only takes that side's; changed on both sides
# to the same JSON value is fine; dicts changed on both sides merge key by
# key (an absent or non-dict base counts as the empty dict, as the empty
# document is the base of a document created in the session); anything else
# changed on both sides (scalars, lists, a key removed on one side and
# changed on the other) is a conflict. `ABSENT` stands for a missing key,
# and, at the top, for a deleted document: deleting is "removing the
# document", so a deletion against a change is a conflict too.

class _Absent(object):
    def __repr__(self):
        return 'ABSENT'


#: A missing dict key, or a deleted document, in `three_way`.
ABSENT = _Absent()


class ModelConflict(Exception):
    """Both sides changed the value at a path (the argument) differently."""


def three_way(base, mine, theirs, path=''):
    """The three-way merge of JSON values; `ABSENT` for a missing one.

    :raise ModelConflict: naming the first path both sides changed
                          differently
    """
    if same(base, theirs):
        return mine                 # only mine changed (or nothing did)
    if same(base, mine):
        return theirs               # only theirs changed
    if same(mine, theirs):
        return mine                 # both changed it the same way
    if isinstance(mine, dict) and isinstance(theirs, dict):
        old = base if isinstance(base, dict) else {}
        merged = {}
        for key in sorted(set(mine) | set(theirs)):
            value = three_way(old.get(key, ABSENT), mine.get(key, ABSENT),
                              theirs.get(key, ABSENT), '%s/%s' % (path, key))
            if value is not ABSENT:
                merged[key] = value
        return merged
    raise ModelConflict(path or '/')


def test_the_merge_model_itself():
    """`three_way` on hand-made cases, so that its verdicts can be trusted."""
    base = {'v': 0, 'l': [1], 'd': {'p': 0, 'q': 0}, 'gone': 1}
    assert three_way(base, dict(base, v=1), dict(base, w=2)) == \
        dict(base, v=1, w=2)
    assert three_way(base, dict(base, d={'p': 1, 'q': 0}),
                     dict(base, d={'p': 0, 'q': 2})) == \
        dict(base, d={'p': 1, 'q': 2})
    assert three_way(base, dict(base, v=5), dict(base, v=5)) == \
        dict(base, v=5)
    assert three_way(base, ABSENT, base) is ABSENT
    assert three_way(base, ABSENT, ABSENT) is ABSENT
    assert three_way({}, {'n': {'a': 1}}, {'n': {'b': 2}}) == \
        {'n': {'a': 1, 'b': 2}}
    for mine, theirs in [({'v': 1}, {'v': 2}),
                         ({'l': [1, 2]}, {'l': [1, 3]}),
                         ({'v': True}, {'v': 1}),
                         ({'d': {'p': 1}}, {'d': {}})]:
        with pytest.raises(ModelConflict):
            three_way(base, dict(base, **mine), dict(base, **theirs))
    minus_gone = {k: v for k, v in base.items() if k != 'gone'}
    with pytest.raises(ModelConflict):
        three_way(base, minus_gone, dict(base, gone=2))
    with pytest.raises(ModelConflict):
        three_way(base, ABSENT, dict(base, v=1))
    with pytest.raises(ModelConflict):
        three_way(base, dict(base, v=1), ABSENT)


#: A small key alphabet, so that both writers often touch the same keys
#: (one key with the characters JSON Pointer escapes).
merge_keys = st.sampled_from(['a', 'b', 'c', 'd/~'])
#: Small values, often equal ones, so that both writers often make the same
#: change.
merge_scalars = st.sampled_from([0, 1, 'x', None, True]) | scalars
merge_values = st.recursive(
    merge_scalars,
    lambda children: (st.lists(children, max_size=3) |
                      st.dictionaries(merge_keys, children, max_size=3)),
    max_leaves=5)
merge_documents = st.dictionaries(merge_keys, merge_values | json_containers,
                                  max_size=4)

#: What each writer does: weights by repetition.
MINE_ACTIONS = ['edit'] * 6 + ['edit, then put back'] + ['delete'] * 2
THEIR_ACTIONS = (['edit'] * 6 + ['same edits as mine'] * 2 +
                 ['same edits as mine, and more'] * 2 + ['save unchanged'] +
                 ['delete'] * 2)


def body(document):
    """A plain deep copy of a document without ``_id`` and ``_rev``."""
    return {k: copy.deepcopy(v) for k, v in document.items()
            if k not in ('_id', '_rev')}


def draw_edit(data, root):
    """A random change of the plain document ``root``, as ``(path, op, key,
    value)``: the container at ``path`` gets ``op`` (with ``key`` and
    ``value`` as the op takes them)."""
    path, node = [], root
    while True:
        where = node if isinstance(node, dict) else range(len(node))
        inner = [k for k in where if isinstance(node[k], (dict, list))
                 and not (not path and k.startswith('_'))]
        if not inner or data.draw(st.integers(0, 2)) == 0:
            break
        k = data.draw(st.sampled_from(inner))
        path.append(k)
        node = node[k]
    if isinstance(node, dict):
        existing = [k for k in node if not (not path and k.startswith('_'))]
        op = data.draw(st.sampled_from(
            ['[]=', 'update'] + (['del', 'pop'] if existing else [])))
        if op in ('del', 'pop'):
            return path, op, data.draw(st.sampled_from(existing)), None
        return path, op, data.draw(merge_keys), data.draw(merge_values)
    n = len(node)
    op = data.draw(st.sampled_from(
        ['append', 'insert'] + (['[]=', 'pop'] if n else [])))
    if op == 'append':
        return path, op, None, data.draw(merge_values)
    if op == 'pop':
        return path, op, data.draw(st.integers(0, n - 1)), None
    index = data.draw(st.integers(0, n if op == 'insert' else n - 1))
    return path, op, index, data.draw(merge_values)


def describe_edit(edit):
    path, op, key, value = edit
    target = 'doc' + ''.join('[%r]' % k for k in path)
    if op == '[]=':
        return '%s[%r] = %r' % (target, key, value)
    if op == 'update':
        return '%s.update({%r: %r})' % (target, key, value)
    if op == 'del':
        return 'del %s[%r]' % (target, key)
    if op == 'pop':
        return '%s.pop(%r)' % (target, key)
    if op == 'append':
        return '%s.append(%r)' % (target, value)
    return '%s.insert(%r, %r)' % (target, key, value)


def apply_edit(root, edit):
    """Make ``edit`` on ``root``, a tracked or a plain document."""
    path, op, key, value = edit
    node = root
    for k in path:
        node = node[k]
    value = copy.deepcopy(value)
    if op == '[]=':
        node[key] = value
    elif op == 'update':
        node.update({key: value})
    elif op == 'del':
        del node[key]
    elif op == 'pop':
        node.pop(key)
    elif op == 'append':
        node.append(value)
    else:
        node.insert(key, value)


def changed_keys(base, side):
    """The top-level keys ``side`` (a body, or `ABSENT`) changed."""
    if side is ABSENT:
        return set(base) | {'(deleted)'}
    return {k for k in set(base) | set(side)
            if not same(base.get(k, ABSENT), side.get(k, ABSENT))}


@settings(max_examples=175, **SETTINGS)
@given(content=merge_documents, data=st.data())
def test_merge_with_a_concurrent_writer_is_the_three_way_merge_or_a_conflict(
        db, content, data):
    """flush(on_conflict='merge') against another writer's save writes the
    three-way merge on the server's revision, or reports the conflict and
    leaves both sides as they were."""
    id, base = save(db, content)
    S = session.Session(db)
    doc = S[id]

    # The session's side, through the tracked document.
    mine_action = data.draw(st.sampled_from(MINE_ACTIONS))
    mine = copy.deepcopy(base)
    edits = []
    for _ in range(data.draw(st.integers(1, 4))):
        edit = draw_edit(data, mine)
        note('mine: ' + describe_edit(edit))
        apply_edit(doc, edit)
        apply_edit(mine, edit)
        edits.append(edit)
        assert same(doc.copy(), mine)
    if mine_action == 'edit, then put back':
        note('mine: put back as fetched')
        for k in list(doc):
            if k not in base:
                del doc[k]
        for k in base:
            if not k.startswith('_'):
                doc[k] = copy.deepcopy(base[k])
        mine = copy.deepcopy(base)
        assert same(doc.copy(), mine)
    elif mine_action == 'delete':
        how = data.draw(st.sampled_from(['del S[id]', 'S.delete(doc)']))
        note('mine: ' + how)
        if how == 'del S[id]':
            del S[id]
        else:
            S.delete(doc)

    # The other writer's side, on a plain copy of the same version.
    their_action = data.draw(st.sampled_from(THEIR_ACTIONS))
    if their_action == 'delete':
        note('theirs: db.delete(copy of the version fetched)')
        db.delete(copy.deepcopy(base))
        theirs = None
    else:
        theirs = copy.deepcopy(base)
        if their_action.startswith('same edits as mine'):
            note('theirs: the same edits as mine')
            for edit in edits:
                apply_edit(theirs, edit)
        if their_action in ('edit', 'same edits as mine, and more'):
            for _ in range(data.draw(st.integers(1, 4))):
                edit = draw_edit(data, theirs)
                note('theirs: ' + describe_edit(edit))
                apply_edit(theirs, edit)
        db.save(theirs)
        theirs = dict(db[id])           # as the server holds it
        assert theirs['_rev'].startswith('2-')
    event('mine: ' + mine_action)
    event('theirs: ' + their_action)

    # The model's verdict.
    base_body = body(base)
    mine_body = ABSENT if mine_action == 'delete' else body(mine)
    theirs_body = ABSENT if theirs is None else body(theirs)
    both = (changed_keys(base_body, mine_body) &
            changed_keys(base_body, theirs_body))
    event('both sides changed the same key' if both else
          'no key changed on both sides')
    try:
        expected = three_way(base_body, mine_body, theirs_body)
        note('model: merged into %r' % (expected,))
    except ModelConflict as conflict:
        note('model: conflict at %s' % conflict)
        expected = conflict

    def server_holds(version):
        """The server holds ``version`` (a document read from it before),
        or no live document for None."""
        if version is None:
            assert id not in db
        else:
            assert same(dict(db[id]), version)

    try:
        results, error = S.flush(on_conflict='merge'), None
    except session.FlushError as exc:
        results, error = None, exc
    both_live = mine_body is not ABSENT and theirs_body is not ABSENT
    if mine_body is not ABSENT and same(mine_body, base_body):
        # No real change in the session: nothing to merge, nothing sent.
        event('outcome: nothing to write')
        assert error is None and results == []
        server_holds(theirs)
        assert same(doc.copy(), mine)
        assert not S.has_changes()
    elif both_live and (
            same(mine_body, theirs_body) or
            (same(mine_body, theirs_body, exact_numbers=False) and
             results == [(True, id, theirs['_rev'])])):
        # The server holds what the session sends: flush takes it for its
        # own write whose answer was lost (see `Session.flush`) and writes
        # nothing more. Where only numbers differ, as this server writes
        # them (1.0 as 1, 4.8e16 as 48000000000000000), flush may also
        # merge as the model says (below); True is never 1.
        event('outcome: taken for its own write')
        assert error is None and results == [(True, id, theirs['_rev'])]
        server_holds(theirs)
        assert same(body(doc.copy()), mine_body)
        assert doc['_rev'] == theirs['_rev'] and not S.has_changes()
    elif isinstance(expected, ModelConflict):
        event('outcome: conflict')
        if ABSENT in (mine_body, theirs_body):
            event('outcome: conflict of a deletion with a change')
        assert error is not None, 'merged into %r' % (results,)
        assert list(error.failures) == [id]
        assert isinstance(error.failures[id], couchdb.ResourceConflict)
        server_holds(theirs)
        if mine_body is ABSENT:
            assert id not in S
            assert [d['_id'] for d in S.deleted] == [id]
        else:
            assert same(doc.copy(), mine)      # the fetched _rev included
            assert any(d is doc for d in S.dirty)
        assert S.has_changes()
    else:
        assert error is None, error
        [(ok, written_id, rev)] = results
        assert ok is True and written_id == id
        if expected is ABSENT:
            event('outcome: merged into a deletion')
            assert id not in db
            assert S.get(id) is None
            assert session.Session(db).get(id) is None
        else:
            event('outcome: merged')
            if both:
                event('outcome: merged where both sides changed a key')
            if same(expected, theirs_body):
                # The server has the merge already: adopted, not written.
                event('outcome: merged into what the server has')
                assert rev == theirs['_rev']
            else:
                assert rev.startswith('3-')
            stored = db[id]
            assert stored['_rev'] == rev
            assert same(body(stored), expected, exact_numbers=False)
            assert doc['_rev'] == rev and doc['_id'] == id
            assert same(body(doc.copy()), expected)
            assert not S.has_changes() and S.flush() == []
            fresh = session.Session(db)[id]
            assert fresh['_rev'] == rev
            assert same(body(fresh), expected, exact_numbers=False)


@settings(max_examples=20, **SETTINGS)
@given(values=equal_values_of_other_types,
       place=st.sampled_from(sorted(PLACES)))
def test_merge_of_values_equal_in_python_but_not_in_json(db, values, place):
    """Both sides change one value, to values Python finds equal (``1 ==
    True``, ``1 == 1.0``): the same JSON value, as the server stores them,
    merges; different ones (``True`` is not ``1``) are a conflict, never
    a write lost."""
    mine_value, their_value = values
    make, path = PLACES[place]
    id, base = save(db, make('fetched'))
    S = session.Session(db)
    doc = S[id]
    set_at(doc, path, mine_value)
    mine = doc.copy()
    theirs = copy.deepcopy(base)
    set_at(theirs, path, their_value)
    db.save(theirs)
    theirs = dict(db[id])
    stored = jsonpointer.resolve_pointer(theirs, path)
    note('mine: %r, theirs as stored: %r' % (mine_value, stored))
    if same(mine_value, stored, exact_numbers=False):
        event('the same JSON value')
        S.flush(on_conflict='merge')
        assert same(body(db[id]), body(mine), exact_numbers=False)
        assert not S.has_changes()
    else:
        event('different JSON values')
        with pytest.raises(session.FlushError) as caught:
            S.flush(on_conflict='merge')
        assert isinstance(caught.value.failures[id],
                          couchdb.ResourceConflict)
        assert same(dict(db[id]), theirs)
        assert same(doc.copy(), mine) and S.has_changes()


# The examples of the property test of resolving replication conflicts.
RESOLVE_EXAMPLES = 400 if os.environ.get('SESSION_SOAK') == '1' else 40


@settings(max_examples=RESOLVE_EXAMPLES, **SETTINGS)
@given(content=merge_documents, data=st.data())
def test_resolving_replication_conflicts_is_the_three_way_merge_or_a_clash(
        db, server_url, forwarder, content, data):
    """Two or three leaves edited apart from one version, the user's own
    edits on the winner, resolve_conflicts() and a flush (whose first or
    second request may lose its answer): the server ends holding the
    three-way merge of every leaf with no conflicts left, or, where two
    leaves changed a value differently, reports the clash and keeps every
    leaf as it was."""
    id, base = save(db, content)
    digest = base['_rev'].split('-')[1]
    leaves = []
    for n in range(data.draw(st.integers(2, 3), label='leaves')):
        leaf = copy.deepcopy(base)
        for _ in range(data.draw(st.integers(0, 3))):
            edit = draw_edit(data, leaf)
            note('leaf %d: %s' % (n, describe_edit(edit)))
            apply_edit(leaf, edit)
        hash = ('%x' % (n + 1)) * 32
        leaf['_rev'] = '2-' + hash
        db.update([dict(leaf, _revisions={'start': 2, 'ids': [hash, digest]})],
                  new_edits=False)
        leaves.append(body(leaf))
    S = Session(through(forwarder, db, server_url))
    doc = S[id]
    mine = copy.deepcopy(leaves[-1])        # the winner: the greatest hash
    assert same(body(doc.copy()), mine, exact_numbers=False)
    mine = body(doc.copy())                 # as the server keeps numbers
    for _ in range(data.draw(st.integers(0, 2))):
        edit = draw_edit(data, mine)
        note('mine: %s' % describe_edit(edit))
        apply_edit(doc, edit)
        apply_edit(mine, edit)
    S.resolve_conflicts(doc)
    try:
        expected = mine
        for loser in leaves[:-1]:
            expected = three_way(body(base), expected, loser)
        note('model: merged into %r' % (expected,))
    except ModelConflict as clash:
        note('model: clash at %s' % clash)
        expected = clash
    fault = data.draw(st.sampled_from([None, 1, 2]), label='lost answer')
    nth = bulk_docs_numbered(fault, fault)
    if fault:
        forwarder.fail('drop_answer', when=nth, times=1)
    try:
        S.flush()
        error = None
    except FlushError as exc:
        error = exc
    finally:
        nth.over = True             # a rule left unused matches no more
    after = db.get(id, conflicts=True)
    if isinstance(expected, ModelConflict):
        event('clash')
        assert error is not None and list(error.failures) == [id], (
            content, leaves, mine)
        assert len(leaf_values(db, id)) == len(leaves)
        assert same(content_of(after), leaves[-1], exact_numbers=False)
    else:
        event('merged')
        assert error is None, error
        assert '_conflicts' not in after
        assert same(content_of(after), expected, exact_numbers=False)
        assert not S.has_changes()


# -- Failures and conflicts ---------------------------------------------------
#
# What `Session.flush()` does when things go wrong: documents the server
# refuses, conflicts with other writers (``on_conflict``), and broken
# connections: the session's database goes through a
# `tools.forwarder.Forwarder`, a TCP forwarder that refuses connections, cuts
# them before a request reaches the server, or drops the server's answer after
# the server applied the request. The tests check the server's state through
# the direct ``db`` fixture.
#
# Every test ends with the server holding exactly the documents the user
# meant, each written once: revision numbers (``'2-...'``) prove there was no
# second write.

VALIDATE = """function (newDoc, oldDoc, userCtx) {
    if (newDoc.forbidden) throw({forbidden: 'no forbidden docs'});
}"""


# -- Failures: fixtures and helpers -------------------------------------------

@pytest.fixture
def forwarder(server_url):
    """A `Forwarder` to the test server, in 'pass' mode."""
    parts = urlsplit(server_url)
    if parts.scheme != 'http':
        pytest.skip('the forwarder speaks plain HTTP only')
    with Forwarder(parts.hostname, parts.port or 80) as fw:
        yield fw


def through(forwarder, db, server_url, timeout=None):
    """The database ``db`` reached through ``forwarder``: a
    `couchdb.Database` with its own connection pool."""
    parts = urlsplit(server_url)
    netloc = urlsplit(forwarder.url).netloc
    if parts.username:
        netloc = parts.netloc.rpartition('@')[0] + '@' + netloc
    url = 'http://%s%s%s' % (netloc, parts.path.rstrip('/') + '/', db.name)
    return couchdb.Database(url, session=couchdb.http.Session(timeout=timeout))


@pytest.fixture
def remote(forwarder, db, server_url):
    """The test database as the session sees it: through the forwarder."""
    return through(forwarder, db, server_url)


def forwarded(forwarder, method, kind):
    """How many requests of ``method`` to paths ending in ``kind`` reached
    the server."""
    return sum(count for (m, path), count in forwarder.forwarded.items()
               if m == method and path.endswith(kind))


def bulk_docs_numbered(first, last=None):
    """A `Forwarder.fail` predicate: the ``POST _bulk_docs`` requests from
    the ``first``-th from now on (to the ``last``-th, if given), until its
    ``over`` is set."""
    count = [0]

    def when(method, path):
        if when.over or not is_bulk_docs(method, path):
            return False
        count[0] += 1
        return first <= count[0] and (last is None or count[0] <= last)
    when.over = False
    return when


def bulk_posts(forwarder):
    """How many ``POST _bulk_docs`` reached the server via ``forwarder``."""
    return forwarded(forwarder, 'POST', '/_bulk_docs')


def change(db, id, **values):
    """Another writer changes a document on the server."""
    doc = db[id]
    doc.update(values)
    db.save(doc)
    return doc


def content(db, id):
    """The server's document without ``_id`` and ``_rev``, or None."""
    doc = db.get(id)
    if doc is None:
        return None
    return dict((k, v) for k, v in doc.items() if k not in ('_id', '_rev'))


def generation(db, id):
    """The number before the dash of the server's revision of ``id``."""
    return int(db[id].rev.split('-')[0])


def user_docs(db):
    """The ids of the server's documents, design documents left out."""
    return sorted(id for id in db if not id.startswith('_design/'))


def is_connection_reset(exc):
    """python-couchdb turns an empty answer into ``socket.error(ECONNRESET)``
    (a plain OSError); a TCP reset is a ConnectionResetError."""
    return isinstance(exc, OSError) and (
        isinstance(exc, ConnectionResetError) or
        exc.args[:1] == (errno.ECONNRESET,))


# -- Failures: documents the server refuses -----------------------------------

@pytest.fixture
def validated(db):
    """The database refuses documents with a true ``forbidden`` field."""
    db['_design/validate'] = {'validate_doc_update': VALIDATE}


def test_refused_document_fails_alone_and_keeps_its_change(db, validated,
                                                            wire):
    """A document refused in the middle of a bulk request is reported as
    Forbidden with the server's reason; the others are written and clean."""
    for id in 'abc':
        put(db, id, v=0)
    S = Session(db)
    for id in 'abc':
        S[id]['v'] = 1
    S['b']['forbidden'] = True
    S.create({'_id': 'n', 'v': 1})
    wire.clear()
    with pytest.raises(FlushError) as caught:
        S.flush()
    error = caught.value
    assert wire.calls() == [('POST', '_bulk_docs')]
    assert sorted(wire.bulk_ids()[0]) == ['a', 'b', 'c', 'n']
    assert list(error.failures) == ['b']
    refused = error.failures['b']
    assert isinstance(refused, couchdb.Forbidden)
    assert refused.args[0] == ('forbidden', 'no forbidden docs')
    assert 'no forbidden docs' in str(error)
    assert sorted((ok, id) for ok, id, _ in error.results) == [
        (False, 'b'), (True, 'a'), (True, 'c'), (True, 'n')]
    for id in 'acn':
        assert S[id].rev == db[id].rev and content(db, id) == {'v': 1}
    assert S.dirty == [S['b']] and S.new == []
    assert S['b']['v'] == 1 and S['b']['forbidden'] is True
    assert content(db, 'b') == {'v': 0}


def test_fixed_refused_document_is_all_the_next_flush_sends(db, validated,
                                                            wire):
    """After fixing the refused value, a plain flush sends exactly that
    document, and it is written once."""
    for id in 'abc':
        put(db, id, v=0)
    S = Session(db)
    for id in 'abc':
        S[id]['v'] = 1
    S['b']['forbidden'] = True
    with pytest.raises(FlushError):
        S.flush()
    del S['b']['forbidden']
    wire.clear()
    [(ok, id, rev)] = S.flush()
    assert wire.bulk_ids() == [['b']] and len(wire) == 1
    assert (ok, id) == (True, 'b') and rev == db['b'].rev
    for id in 'abc':
        assert content(db, id) == {'v': 1} and generation(db, id) == 2
    assert S.dirty == [] and S.flush() == []


def test_flush_error_results_cover_every_hook_round(db, validated):
    """FlushError.results holds what every bulk request of the flush
    wrote or refused, post-flush hook rounds included."""
    def audit(S, deleted, created, changed):
        if any(doc['_id'] == 'a' for doc in created):
            S.create({'_id': 'audit', 'forbidden': True})

    S = Session(db, post_flush_hook=audit)
    S.create({'_id': 'a', 'v': 1})
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert sorted((ok, id) for ok, id, _ in caught.value.results) == [
        (False, 'audit'), (True, 'a')]
    assert list(caught.value.failures) == ['audit']
    assert user_docs(db) == ['a'] and S.new == [S['audit']]


def test_refused_new_document_stays_new(db, validated):
    """A refused create stays in S.new with its content, and is created
    once it is fixed."""
    S = Session(db)
    id = S.create({'forbidden': 1, 'v': 1})
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert isinstance(caught.value.failures[id], couchdb.Forbidden)
    assert S.new == [S[id]] and user_docs(db) == []
    S[id]['forbidden'] = 0
    S.flush()
    assert content(db, id) == {'forbidden': 0, 'v': 1}
    assert generation(db, id) == 1 and S.new == []


def test_flush_error_says_which_documents_stay_pending_and_which_dropped(
        db, validated, wire):
    """FlushError's message names each document not written with the
    server's reason, and says what becomes of it: the refused ones stay
    pending and go with the next flush; deletions of what the server does
    not have are dropped, in `dropped`, and never sent."""
    for id in 'abc':
        put(db, id, v=0)
    S = Session(db)
    for id in 'abc':
        S[id]['v'] = 1
    S['a']['forbidden'] = S['b']['forbidden'] = True
    del S['gone-1']
    del S['gone-2']
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert str(caught.value) == (
        "4 documents were not written. 'a' (forbidden: no forbidden docs) "
        "and 'b' (forbidden: no forbidden docs) stay pending in the "
        "session; deal with the cause and flush() again. 'gone-1' "
        "(not_found: missing) and 'gone-2' (not_found: missing) were "
        "dropped from the session: they are already gone from the server, "
        "so there is nothing to delete.")
    assert caught.value.dropped == {'gone-1', 'gone-2'}
    assert sorted(caught.value.failures) == ['a', 'b', 'gone-1', 'gone-2']
    assert content(db, 'c') == {'v': 1}
    assert S.deleted == []
    del S['a']['forbidden'], S['b']['forbidden']
    wire.clear()
    S.flush()
    assert [sorted(ids) for ids in wire.bulk_ids()] == [['a', 'b']]
    assert len(wire) == 1
    assert content(db, 'a') == content(db, 'b') == {'v': 1}


def test_flush_error_of_one_document_says_what_became_of_it(db, validated,
                                                           wire):
    """One document pending, or one dropped: the message speaks of it."""
    S = Session(db)
    S.create({'_id': 'a', 'forbidden': True})
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert str(caught.value) == (
        "1 document was not written. 'a' (forbidden: no forbidden docs) "
        "stays pending in the session; deal with the cause and flush() "
        "again.")
    assert caught.value.dropped == set() and S.new == [S['a']]
    S.expunge('a')
    del S['gone']
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert str(caught.value) == (
        "1 document was not written. 'gone' (not_found: missing) was "
        "dropped from the session: it is already gone from the server, so "
        "there is nothing to delete.")
    assert caught.value.dropped == {'gone'}
    wire.clear()
    assert not S.has_changes() and S.flush() == [] and wire.calls() == []


def test_flush_error_names_a_refused_document_a_hook_dropped(db, validated):
    """A post-flush hook that resets the session drops a refused document
    too: the message says it is no longer pending, not that it stays."""
    S = Session(db, post_flush_hook=lambda S, *work: S.reset())
    S.create({'_id': 'a'})
    S.create({'_id': 'b', 'forbidden': True})
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert str(caught.value) == (
        "1 document was not written. 'b' (forbidden: no forbidden docs) is "
        "no longer pending in the session: flush() does not retry it.")
    assert caught.value.dropped == {'b'}
    assert user_docs(db) == ['a'] and not S.has_changes()


def test_flush_error_made_with_results_and_failures_keeps_them_pending():
    """FlushError(results, failures), as before `dropped`: every failure
    stays pending."""
    conflict = couchdb.ResourceConflict(
        ('conflict', 'Document update conflict'))
    exc = FlushError([(False, 'a', conflict)], {'a': conflict})
    assert exc.results == [(False, 'a', conflict)]
    assert exc.failures == {'a': conflict} and exc.dropped == set()
    assert str(exc) == (
        "1 document was not written. 'a' (conflict: Document update "
        "conflict) stays pending in the session; deal with the cause and "
        "flush() again.")


# -- Failures: conflicts, 'raise' ---------------------------------------------

def test_conflict_with_another_session_raises_and_keeps_the_change(db):
    """By default a conflict ends in FlushError with ResourceConflict; the
    session's document keeps its change and stays pending."""
    rev = put(db, 'a', v=0, mine=0).rev
    S1, S2 = Session(db), Session(db)
    S1['a']['mine'] = 1
    S2['a']['v'] = 'theirs'
    S2.flush()
    with pytest.raises(FlushError) as caught:
        S1.flush()
    assert list(caught.value.failures) == ['a']
    assert isinstance(caught.value.failures['a'], couchdb.ResourceConflict)
    assert [ok for ok, _, _ in caught.value.results] == [False]
    assert dict(S1['a']) == {'_id': 'a', '_rev': rev, 'v': 0, 'mine': 1}
    assert S1.dirty == [S1['a']]
    assert content(db, 'a') == {'v': 'theirs', 'mine': 0}


def test_retry_after_refresh_writes_on_the_new_revision(db):
    """After a conflict, refresh() and redoing the change writes it on the
    server's revision."""
    put(db, 'a', v=0, mine=0)
    S = Session(db)
    S['a']['mine'] = 1
    change(db, 'a', v='theirs')
    with pytest.raises(FlushError):
        S.flush()
    doc = S.refresh('a')
    doc['mine'] = 1
    S.flush()
    assert content(db, 'a') == {'v': 'theirs', 'mine': 1}
    assert generation(db, 'a') == 3 and doc.rev == db['a'].rev


def test_conflict_with_a_direct_write_leaves_other_documents_written(db):
    """A conflict from a plain python-couchdb write fails that document
    only; a plain flush afterwards retries just it, and fails again."""
    put(db, 'a', v=0)
    put(db, 'b', v=0)
    S = Session(db)
    S['a']['v'] = 1
    S['b']['v'] = 1
    db.save(dict(db['b'], v='theirs'))
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert list(caught.value.failures) == ['b']
    assert content(db, 'a') == {'v': 1} and S['a'].rev == db['a'].rev
    with pytest.raises(FlushError):
        S.flush()
    assert content(db, 'b') == {'v': 'theirs'} and generation(db, 'b') == 2
    assert S['b']['v'] == 1


def test_deleting_a_document_someone_changed_conflicts(db):
    """A deletion over someone's change is a conflict by default; the
    deletion stays pending."""
    put(db, 'a', v=0)
    S = Session(db)
    S.delete(S['a'])
    change(db, 'a', v='theirs')
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert isinstance(caught.value.failures['a'], couchdb.ResourceConflict)
    assert content(db, 'a') == {'v': 'theirs'}
    assert [doc['_id'] for doc in S.deleted] == ['a']


# -- Failures: conflicts, 'overwrite' -----------------------------------------

def test_overwrite_writes_the_sessions_version_over_theirs(db, wire):
    """'overwrite': the session's whole version replaces the server's,
    on the server's revision; no FlushError."""
    put(db, 'a', v=0, keep=1)
    S = Session(db)
    S['a']['v'] = 'mine'
    change(db, 'a', v='theirs', extra=True)
    wire.clear()
    [(ok, id, rev)] = S.flush(on_conflict='overwrite')
    assert wire.calls() == [('POST', '_bulk_docs'), ('POST', '_bulk_get'),
                            ('POST', '_bulk_docs')]
    assert (ok, id) == (True, 'a')
    assert content(db, 'a') == {'v': 'mine', 'keep': 1}
    assert generation(db, 'a') == 3 and S['a'].rev == db['a'].rev == rev
    assert S.dirty == [] and S.flush() == []


def test_overwrite_deletion_deletes_their_latest(db):
    """'overwrite': a deletion in the session deletes the server's latest
    revision even though someone changed it."""
    put(db, 'a', v=0)
    S = Session(db)
    S.delete(S['a'])
    change(db, 'a', v='theirs')
    S.flush(on_conflict='overwrite')
    assert 'a' not in db and user_docs(db) == []
    assert S.deleted == [] and 'a' not in S


def test_overwrite_change_over_their_deletion_writes_it_again(db, wire):
    """'overwrite': a change over a server-side deletion writes the
    document again, without ``_rev``: CouchDB refuses the old one, and
    takes a document without one as a new revision of the deleted
    branch."""
    put(db, 'a', v=0)
    S = Session(db)
    S['a']['v'] = 'mine'
    db.delete(db['a'])
    S.flush(on_conflict='overwrite')
    assert content(db, 'a') == {'v': 'mine'}
    assert generation(db, 'a') == 3 and S['a'].rev == db['a'].rev
    assert '_rev' not in wire.bulk_bodies()[-1]['docs'][0]


def couchdb_tombstone(id):
    """A forwarder reply: CouchDB 3's answer to a ``_bulk_docs`` holding
    only ``id``, deleted on the server, with a ``_rev``: a conflict (PouchDB
    Server takes some of these)."""
    def reply(body):
        docs = (body or {}).get('docs', ())
        if [doc.get('_id') for doc in docs] == [id] and '_rev' in docs[0]:
            return 201, [{'id': id, 'error': 'conflict',
                          'reason': 'Document update conflict.'}]
        return None
    return reply


@pytest.mark.parametrize('on_conflict', [
    'overwrite', lambda mine, theirs, base: dict(mine, v='resolved')])
def test_a_change_over_a_tombstone_is_written_as_couchdb_takes_it(
        db, forwarder, remote, on_conflict):
    """On CouchDB every write of a deleted document with a _rev is a
    conflict; 'overwrite' and a resolver write it again without one."""
    put(db, 'a', v=0)
    S = Session(remote)
    S['a']['v'] = 'mine'
    db.delete(db['a'])
    forwarder.fail('reply', when=is_bulk_docs,
                   reply=couchdb_tombstone('a'))
    S.flush(on_conflict=on_conflict)
    assert content(db, 'a') == {
        'v': 'mine' if on_conflict == 'overwrite' else 'resolved'}
    assert S['a'].rev == db['a'].rev and not S.has_changes()
    assert forwarder.received['POST', '/%s/_bulk_docs' % db.name] == 2
    assert bulk_posts(forwarder) == 1


def test_overwrite_create_over_their_create(db):
    """'overwrite': a document created in the session replaces one created
    concurrently with the same id."""
    S = Session(db)
    S.create({'_id': 'n', 'v': 'mine'})
    put(db, 'n', v='theirs', other=1)
    S.flush(on_conflict='overwrite')
    assert content(db, 'n') == {'v': 'mine'} and generation(db, 'n') == 2


# -- Failures: conflicts, 'merge' ---------------------------------------------

def test_merge_of_disjoint_changes_is_written_on_their_revision(db, wire):
    """'merge': changes to different keys, at any depth, are merged and
    written on the server's revision; no FlushError."""
    put(db, 'a', x=0, y=0, nested={'p': 0, 'q': 0}, gone=1)
    S = Session(db)
    doc = S['a']
    doc['x'] = 'mine'
    doc['nested']['p'] = 'mine'
    del doc['gone']
    theirs = change(db, 'a', y='theirs', nested={'p': 0, 'q': 'theirs'},
                    added='theirs')
    wire.clear()
    S.flush(on_conflict='merge')
    [_, _, resend] = [request.body for request in wire]
    assert resend['docs'][0]['_rev'] == theirs.rev
    merged = {'x': 'mine', 'y': 'theirs', 'added': 'theirs',
              'nested': {'p': 'mine', 'q': 'theirs'}}
    assert content(db, 'a') == merged
    assert generation(db, 'a') == 3
    assert dict(doc) == dict(db['a']) and S.dirty == []


def test_two_sessions_merging_end_with_both_changes(db):
    """Two sessions changing different keys of the same documents both
    flush with 'merge': the server holds both changes."""
    for id in 'ab':
        put(db, id, first=0, second=0)
    S1, S2 = Session(db), Session(db)
    for id in 'ab':
        S1[id]['first'] = 1
        S2[id]['second'] = 2
    S1.flush(on_conflict='merge')
    S2.flush(on_conflict='merge')
    for id in 'ab':
        assert content(db, id) == {'first': 1, 'second': 2}
        assert generation(db, id) == 3 and S2[id].rev == db[id].rev


def test_merge_accepts_the_same_change_on_both_sides(db):
    """'merge': both sides adding the same key with the same value (or
    making the same change) is no conflict."""
    put(db, 'a', v=0, tags=['x'])
    S = Session(db)
    S['a']['added'] = {'k': [1, 2]}
    S['a']['tags'].append('y')
    S['a']['mine'] = 1
    change(db, 'a', added={'k': [1, 2]}, tags=['x', 'y'], theirs=1)
    S.flush(on_conflict='merge')
    assert content(db, 'a') == {'v': 0, 'tags': ['x', 'y'], 'mine': 1,
                                'theirs': 1, 'added': {'k': [1, 2]}}
    assert generation(db, 'a') == 3


@pytest.mark.parametrize('mine, theirs', [
    ({'v': 'mine'}, {'v': 'theirs'}),                    # same key
    ({'tags': ['x', 'mine']}, {'tags': ['theirs']}),     # a list, both
    ({'nested': {'p': 'mine'}}, {'nested': {}}),         # removed / changed
])
def test_merge_of_a_real_conflict_raises_and_changes_nothing(db, mine,
                                                             theirs):
    """'merge': a value (or list) changed differently on both sides, or
    removed on one and changed on the other, stays in FlushError; neither
    the session's document nor the server's changes."""
    put(db, 'a', v=0, tags=['x'], nested={'p': 0})
    S = Session(db)
    S['a'].update(mine)
    S['a']['other'] = 'mine'
    mine_before = dict(S['a'])
    server_before = change(db, 'a', **theirs)
    with pytest.raises(FlushError) as caught:
        S.flush(on_conflict='merge')
    assert isinstance(caught.value.failures['a'], couchdb.ResourceConflict)
    assert dict(S['a']) == mine_before and S.dirty == [S['a']]
    assert dict(db['a']) == dict(server_before)


def test_merge_keeps_merged_documents_apart_from_real_conflicts(db):
    """'merge': in one flush, mergeable documents are written and real
    conflicts reported; the other documents are written as usual."""
    for id in 'abc':
        put(db, id, v=0, w=0)
    S = Session(db)
    for id in 'abc':
        S[id]['v'] = 'mine'
    change(db, 'a', w='theirs')
    change(db, 'b', v='theirs')
    with pytest.raises(FlushError) as caught:
        S.flush(on_conflict='merge')
    assert list(caught.value.failures) == ['b']
    assert content(db, 'a') == {'v': 'mine', 'w': 'theirs'}
    assert content(db, 'b') == {'v': 'theirs', 'w': 0}
    assert content(db, 'c') == {'v': 'mine', 'w': 0}
    assert [generation(db, id) for id in 'abc'] == [3, 2, 2]
    assert S.dirty == [S['b']] and S['b']['v'] == 'mine'


def test_merge_of_a_create_with_their_create_uses_the_empty_base(db):
    """'merge': a document created in the session merges with one created
    concurrently under the same id, key by key."""
    S = Session(db)
    S.create({'_id': 'n', 'mine': 1, 'both': 'same'})
    put(db, 'n', theirs=1, both='same')
    S.flush(on_conflict='merge')
    assert content(db, 'n') == {'mine': 1, 'theirs': 1, 'both': 'same'}
    assert generation(db, 'n') == 2 and S['n'].rev == db['n'].rev


def test_merge_of_creates_with_different_values_conflicts(db):
    """'merge': two creates giving one key different values conflict."""
    S = Session(db)
    S.create({'_id': 'n', 'v': 'mine'})
    put(db, 'n', v='theirs')
    with pytest.raises(FlushError) as caught:
        S.flush(on_conflict='merge')
    assert isinstance(caught.value.failures['n'], couchdb.ResourceConflict)
    assert content(db, 'n') == {'v': 'theirs'} and S.new == [S['n']]


def test_merge_of_a_deletion_against_a_change_conflicts(db):
    """'merge': a deletion on one side against a change on the other is a
    real conflict, whichever side deleted."""
    put(db, 'a', v=0)
    put(db, 'b', v=0)
    S = Session(db)
    S.delete(S['a'])
    change(db, 'a', v='theirs')
    S['b']['v'] = 'mine'
    db.delete(db['b'])
    with pytest.raises(FlushError) as caught:
        S.flush(on_conflict='merge')
    assert sorted(caught.value.failures) == ['a', 'b']
    assert content(db, 'a') == {'v': 'theirs'} and 'b' not in db
    assert [d['_id'] for d in S.deleted] == ['a'] and S['b']['v'] == 'mine'


@pytest.mark.parametrize('value', RENDERED)
def test_merge_takes_a_number_the_server_gives_in_another_form_for_no_change(
        db, value):
    """'merge': the session wrote a number the server may give back in
    another form (PouchDB Server: 1.0 as 1), then another writer saved the
    document with a change of its own elsewhere, or with none. Their form
    of the number is no change of theirs: the user's change of it, or the
    user's deletion, is merged without a conflict."""
    S = Session(db)
    S['a'] = {'v': value, 'w': 0}
    S['d'] = {'v': value}
    S.flush()
    change(db, 'a', w=1)
    db.save(db['d'])                # saved as the server has it
    S['a']['v'] = 2.5
    del S['d']
    S.flush(on_conflict='merge')
    assert content(db, 'a') == {'v': 2.5, 'w': 1} and 'd' not in db
    assert not S.has_changes()


def test_session_default_on_conflict_and_per_call_override(db):
    """Session(db, on_conflict='merge') merges by default; flush(
    on_conflict='raise') overrides it for one call."""
    put(db, 'a', v=0, w=0)
    S = Session(db, on_conflict='merge')
    S['a']['v'] = 'mine'
    change(db, 'a', w='theirs')
    with pytest.raises(FlushError) as caught:
        S.flush(on_conflict='raise')
    assert isinstance(caught.value.failures['a'], couchdb.ResourceConflict)
    assert content(db, 'a') == {'v': 0, 'w': 'theirs'}
    S.flush()
    assert content(db, 'a') == {'v': 'mine', 'w': 'theirs'}
    assert generation(db, 'a') == 3 and S['a'].rev == db['a'].rev


def test_unknown_on_conflict_is_refused(db):
    """An on_conflict that is not a policy or a function is a ValueError."""
    with pytest.raises(ValueError):
        Session(db, on_conflict='ignore')
    S = Session(db)
    S.create({'v': 1})
    with pytest.raises(ValueError):
        S.flush(on_conflict='newest')
    assert len(S.new) == 1 and user_docs(db) == []


# -- Failures: conflicts, a resolver function ---------------------------------

def test_resolver_gets_plain_copies_and_its_document_is_written(db):
    """A callable resolve(mine, theirs, base) sees the three versions and
    returns the document to write, on the server's revision."""
    put(db, 'counter', n=10)
    S = Session(db)
    S['counter']['n'] += 5
    change(db, 'counter', n=12)
    seen = []

    def resolve(mine, theirs, base):
        seen.append((mine, theirs, base))
        assert type(mine) is dict and type(theirs) is dict
        return dict(theirs, n=theirs['n'] + mine['n'] - base['n'])

    S.flush(on_conflict=resolve)
    [(mine, theirs, base)] = seen
    assert (mine['n'], theirs['n'], base['n']) == (15, 12, 10)
    assert content(db, 'counter') == {'n': 17}
    assert generation(db, 'counter') == 3
    assert S['counter']['n'] == 17 and S['counter'].rev == db['counter'].rev


def test_resolver_returning_none_leaves_the_conflict_pending(db):
    """A resolver returning None leaves that document pending, reported in
    FlushError, and the server's version untouched."""
    put(db, 'a', v=0)
    put(db, 'b', v=0)
    S = Session(db)
    S['a']['v'] = 'mine'
    S['b']['v'] = 'mine'
    change(db, 'a', v='theirs')
    change(db, 'b', v='theirs')

    def resolve(mine, theirs, base):
        return dict(mine, v='resolved') if mine['_id'] == 'b' else None

    with pytest.raises(FlushError) as caught:
        S.flush(on_conflict=resolve)
    assert list(caught.value.failures) == ['a']
    assert isinstance(caught.value.failures['a'], couchdb.ResourceConflict)
    assert content(db, 'a') == {'v': 'theirs'} and S['a']['v'] == 'mine'
    assert content(db, 'b') == {'v': 'resolved'} and S.dirty == [S['a']]


def test_resolver_gets_none_for_a_deleted_side(db):
    """mine is None for a deletion in the session, theirs for one on the
    server."""
    put(db, 'a', v=0)
    put(db, 'b', v=0)
    S = Session(db)
    S.delete(S['a'])
    change(db, 'a', v='theirs')
    S['b']['v'] = 'mine'
    db.delete(db['b'])
    seen = {}

    def resolve(mine, theirs, base):
        seen[base['_id']] = (mine, theirs)
        return theirs if mine is None else mine

    S.flush(on_conflict=resolve)
    assert seen['a'][0] is None and seen['a'][1]['v'] == 'theirs'
    assert seen['b'][1] is None and seen['b'][0]['v'] == 'mine'
    assert content(db, 'a') == {'v': 'theirs'}
    assert content(db, 'b') == {'v': 'mine'}


@pytest.mark.parametrize('policy', ['merge', 'overwrite'])
@pytest.mark.parametrize('conflicted', [1, 5])
def test_resolution_costs_one_read_and_one_write_for_all(db, wire, policy,
                                                          conflicted):
    """However many documents conflict, resolving them costs one more read
    and one more bulk write."""
    for n in range(8):
        put(db, 'd%d' % n, v=0, w=0)
    S = Session(db)
    for n in range(8):
        S['d%d' % n]['v'] = 'mine'
    for n in range(conflicted):
        change(db, 'd%d' % n, w='theirs')
    wire.clear()
    S.flush(on_conflict=policy)
    assert wire.calls() == [('POST', '_bulk_docs'), ('POST', '_bulk_get'),
                            ('POST', '_bulk_docs')]
    assert len(wire.bulk_ids()[1]) == conflicted
    for n in range(8):
        expected = 'theirs' if n < conflicted and policy == 'merge' else 0
        assert content(db, 'd%d' % n) == {'v': 'mine', 'w': expected}
        assert generation(db, 'd%d' % n) == (3 if n < conflicted else 2)


def test_resolution_retries_when_the_server_moves_again(db):
    """If the server moves again while the session resolves, flush reads
    and resolves again."""
    put(db, 'a', n=0)
    S = Session(db)
    S['a']['n'] += 5
    change(db, 'a', n=1)
    calls = []

    def resolve(mine, theirs, base):
        calls.append(theirs['n'])
        if len(calls) == 1:
            change(db, 'a', n=theirs['n'] + 1)      # someone else, again
        return dict(theirs, n=theirs['n'] + mine['n'] - base['n'])

    S.flush(on_conflict=resolve)
    assert calls == [1, 2]
    assert content(db, 'a') == {'n': 7} and generation(db, 'a') == 4


def test_resolution_gives_up_after_a_bounded_number_of_rounds(db, wire):
    """A server that keeps moving ends the flush with a FlushError, after a
    bounded number of requests; the change stays pending."""
    put(db, 'a', n=0)
    S = Session(db)
    S['a']['n'] = 'mine'
    change(db, 'a', n=1)

    def resolve(mine, theirs, base):
        change(db, 'a', n=theirs['n'] + 1)
        return mine

    wire.clear()
    with pytest.raises(FlushError) as caught:
        S.flush(on_conflict=resolve)
    assert isinstance(caught.value.failures['a'], couchdb.ResourceConflict)
    assert len(wire) < 100 and S['a']['n'] == 'mine'


# -- Failures: _local documents ----------------------------------------------

# CouchDB 3 lists a `_local/` document in ``POST _all_docs`` with keys,
# PouchDB Server does not: the session reads them with a GET each, so that
# deleting one unread and settling a conflict on one work on both. A local
# document has no revision history and leaves no tombstone: deleted, a GET
# answers 404.

def test_deleting_an_unread_local_document_deletes_it(db, wire):
    """del S['_local/x'] of a document never read looks its revision up
    with one GET (the other ids with one POST _all_docs) and deletes it."""
    put(db, '_local/x', v=1)
    put(db, 'a', v=1)
    S = Session(db)
    del S['_local/x']
    del S['a']
    wire.clear()
    results = S.flush()
    assert sorted((ok, id) for ok, id, _ in results) == [
        (True, '_local/x'), (True, 'a')]
    assert wire.calls() == [('POST', '_all_docs'), ('GET', '_local/x'),
                            ('POST', '_bulk_docs')]
    assert wire[0].body == {'keys': ['a']}
    assert db.get('_local/x') is None and 'a' not in db
    assert not S.has_changes()


def test_deleting_a_missing_local_document_is_reported_and_dropped(db, wire):
    """Deleting a _local/ id the server does not have costs one GET, fails
    with ResourceNotFound in FlushError, and is dropped."""
    S = Session(db)
    del S['_local/nope']
    wire.clear()
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert isinstance(caught.value.failures['_local/nope'],
                      couchdb.ResourceNotFound)
    assert caught.value.dropped == {'_local/nope'}
    assert wire.calls() == [('GET', '_local/nope')]
    assert S.flush() == []


def test_flush_error_of_many_documents_names_ten_and_counts_the_rest(db):
    """A message that names every one of 2,000 refused documents helps
    no one: it names ten, and says how many more."""
    S = Session(db)
    for n in range(25):
        S['_bad%02d' % n] = {}
    with pytest.raises(FlushError) as caught:
        S.flush()
    message = str(caught.value)
    assert len(caught.value.failures) == 25
    assert "'_bad09'" in message and "'_bad10'" not in message
    assert 'and 15 more stay pending' in message


def test_deleting_a_local_document_someone_deleted_drops_it(db):
    """A fetched _local/ document deleted on the server, then in the
    session: the server answers not_found (no tombstone to conflict with);
    it is reported as dropped, and not sent again."""
    put(db, '_local/x', v=0)
    put(db, 'a', v=0)
    S = Session(db)
    del S['_local/x']
    S['a']['v'] = 1
    db.delete(db['_local/x'])
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert caught.value.dropped == {'_local/x'}
    assert content(db, 'a') == {'v': 1}
    assert not S.has_changes() and S.flush() == []
    assert db.get('_local/x') is None


def local_conflict(db):
    """A session holding '_local/x' with its change ``mine=1``, after
    another writer changed ``v`` on the server."""
    put(db, '_local/x', v=0, mine=0)
    S = Session(db)
    S['_local/x']['mine'] = 1
    change(db, '_local/x', v='theirs')
    return S


def keep_both(mine, theirs, base):
    """A resolver: the server's version with the session's ``mine``."""
    assert base['mine'] == 0 and theirs['v'] == 'theirs'
    return dict(theirs, mine=mine['mine'], resolved=True)


@pytest.mark.parametrize('policy, expected', [
    ('overwrite', {'v': 0, 'mine': 1}),
    ('merge', {'v': 'theirs', 'mine': 1}),
    ('function', {'v': 'theirs', 'mine': 1, 'resolved': True}),
])
def test_a_conflict_on_a_local_document_is_settled(db, wire, policy,
                                                   expected):
    """A _local/ document another writer changed after the session read it
    is settled by 'overwrite', 'merge' and a resolver: one GET reads the
    server's version, one more bulk request writes over it."""
    S = local_conflict(db)
    wire.clear()
    S.flush(on_conflict=keep_both if policy == 'function' else policy)
    assert wire.calls() == [('POST', '_bulk_docs'), ('GET', '_local/x'),
                            ('POST', '_bulk_docs')]
    assert content(db, '_local/x') == expected
    assert S['_local/x'].rev == db['_local/x'].rev
    assert dict(S['_local/x']) == dict(db['_local/x'])
    assert not S.has_changes()


def test_a_conflict_on_a_local_document_raises_with_raise(db, wire):
    """'raise': the conflict on a _local/ document is in FlushError, the
    document stays pending with its change, and no read is made."""
    S = local_conflict(db)
    wire.clear()
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert isinstance(caught.value.failures['_local/x'],
                      couchdb.ResourceConflict)
    assert caught.value.dropped == set()
    assert wire.calls() == [('POST', '_bulk_docs')]
    assert S.dirty == [S['_local/x']] and S['_local/x']['mine'] == 1
    assert content(db, '_local/x') == {'v': 'theirs', 'mine': 0}


def test_a_local_document_deleted_on_the_server_is_written_again(db):
    """'overwrite' of a change to a _local/ document another writer
    deleted writes it again."""
    put(db, '_local/x', v=0)
    S = Session(db)
    S['_local/x']['v'] = 1
    db.delete(db['_local/x'])
    S.flush(on_conflict='overwrite')
    assert content(db, '_local/x') == {'v': 1}
    assert S['_local/x'].rev == db['_local/x'].rev


def test_a_deleted_local_document_can_be_created_again(db):
    """A _local/ document deleted (by the session, read or not, or by
    another writer) is created again by S[id] = content."""
    put(db, '_local/read', v=0)
    put(db, '_local/unread', v=0)
    put(db, '_local/flushed', v=0)
    put(db, '_local/theirs', v=0)
    S = Session(db)
    del S['_local/flushed']
    S.flush()
    S['_local/flushed'] = {'v': 'again'}
    S['_local/read']
    del S['_local/read']
    S['_local/read'] = {'v': 'new'}
    del S['_local/unread']
    S['_local/unread'] = {'v': 'new'}
    del S['_local/never']
    S['_local/never'] = {'v': 'new'}
    db.delete(db['_local/theirs'])
    S['_local/theirs'] = {'v': 'new'}
    S.flush()
    assert content(db, '_local/flushed') == {'v': 'again'}
    for id in ('read', 'unread', 'never', 'theirs'):
        assert content(db, '_local/' + id) == {'v': 'new'}
        assert S['_local/' + id].rev == db['_local/' + id].rev
    assert not S.has_changes()


# -- Failures: connection failures --------------------------------------------

def two_documents(db):
    """Documents 'a' and 'b' on the server, at revision 1."""
    put(db, 'a', v=0)
    put(db, 'b', v=0)


def start_work(S):
    """Change 'a', delete 'b' and create 'n' in the session ``S``."""
    S['a']['v'] = 1
    S.delete(S['b'])
    S.create({'_id': 'n', 'v': 1})


def assert_work_done_once(db, S):
    """The server holds the intended documents, each written once, and
    the session has nothing left to do."""
    assert user_docs(db) == ['a', 'n']
    assert content(db, 'a') == {'v': 1} and generation(db, 'a') == 2
    assert content(db, 'n') == {'v': 1} and generation(db, 'n') == 1
    assert S['a'].rev == db['a'].rev and S['n'].rev == db['n'].rev
    assert not S.has_changes() and S.flush() == []


def assert_nothing_written(db):
    assert user_docs(db) == ['a', 'b']
    assert generation(db, 'a') == 1 and content(db, 'a') == {'v': 0}


def test_forwarder_passes_keep_alive_requests_and_attachments(
        db, remote, forwarder):
    """In 'pass' mode the forwarder is transparent, reusing connections,
    and counts what reached the server."""
    for n in range(3):
        remote.save({'_id': 'd%d' % n})
    doc = remote['d0']
    remote.put_attachment(doc, b'x' * 50000, 'blob.bin')
    with open(__file__, 'rb') as chunked:          # a file: sent chunked
        remote.put_attachment(remote['d1'], chunked, 'me.py', 'text/plain')
        chunked.seek(0)
        this_file = chunked.read()
    assert remote.get_attachment('d0', 'blob.bin').read() == b'x' * 50000
    assert db.get_attachment('d1', 'me.py').read() == this_file
    assert sum(forwarder.received.values()) == \
        sum(forwarder.forwarded.values()) == 8
    assert forwarder.forwarded['PUT', '/%s/d0' % db.name] == 1
    assert forwarder.connections == 1


def test_refused_connection_raises_and_loses_nothing(db, remote, forwarder):
    """With the server unreachable, flush raises ConnectionRefusedError;
    the next flush, once it is back, writes everything once."""
    two_documents(db)
    S = Session(remote)
    start_work(S)
    forwarder.mode = 'refuse'
    with pytest.raises(ConnectionRefusedError):
        S.flush()
    assert_nothing_written(db)
    forwarder.mode = 'pass'
    S.flush()
    assert_work_done_once(db, S)


def test_connection_cut_before_the_request_raises_and_loses_nothing(
        db, remote, forwarder):
    """A connection closed before the request reached the server (twice,
    so python-couchdb's retry fails too) raises ECONNRESET; the next
    flush writes everything once."""
    two_documents(db)
    S = Session(remote)
    start_work(S)
    forwarder.fail('cut_before', when=is_bulk_docs, times=2)
    with pytest.raises(OSError) as caught:
        S.flush()
    assert is_connection_reset(caught.value)
    assert bulk_posts(forwarder) == 0
    assert_nothing_written(db)
    S.flush()
    assert_work_done_once(db, S)
    assert bulk_posts(forwarder) == 1


def test_connection_reset_raises_connection_reset_error(db, remote,
                                                        forwarder):
    """A TCP reset (twice) raises ConnectionResetError; nothing is lost."""
    two_documents(db)
    S = Session(remote)
    start_work(S)
    forwarder.fail('reset', when=is_bulk_docs, times=2)
    with pytest.raises(ConnectionResetError):
        S.flush()
    assert_nothing_written(db)
    S.flush()
    assert_work_done_once(db, S)


def test_one_cut_connection_is_retried_by_python_couchdb(db, remote,
                                                         forwarder):
    """A single cut connection is retried by python-couchdb: the flush
    succeeds, with one bulk request reaching the server."""
    two_documents(db)
    S = Session(remote)
    start_work(S)
    forwarder.fail('cut_before', when=is_bulk_docs, times=1)
    S.flush()
    assert forwarder.pending_rules == 0 and bulk_posts(forwarder) == 1
    assert_work_done_once(db, S)


def test_timeout_before_the_request_raises_and_loses_nothing(
        db, forwarder, server_url):
    """A server that does not answer in time raises the socket's timeout;
    the next flush writes everything once."""
    two_documents(db)
    S = Session(through(forwarder, db, server_url, timeout=0.5))
    start_work(S)
    forwarder.fail('stall', when=is_bulk_docs, times=1)
    with pytest.raises(socket.timeout):
        S.flush()
    assert_nothing_written(db)
    S.flush()
    assert_work_done_once(db, S)


def test_lost_answer_retried_by_python_couchdb_is_recognised(
        db, remote, forwarder):
    """The answer of the bulk request is lost and python-couchdb sends it
    again: the session recognises its own writes; no FlushError."""
    two_documents(db)
    S = Session(remote)
    start_work(S)
    forwarder.fail('drop_answer', when=is_bulk_docs, times=1)
    results = S.flush()
    assert sorted((ok, id) for ok, id, _ in results) == [
        (True, 'a'), (True, 'b'), (True, 'n')]
    assert bulk_posts(forwarder) == 2
    assert_work_done_once(db, S)


def test_lost_answer_then_a_second_flush_writes_nothing_twice(
        db, remote, forwarder):
    """Both answers lost: flush raises ECONNRESET, though the server
    applied the request; the next flush recognises the writes."""
    two_documents(db)
    S = Session(remote)
    start_work(S)
    forwarder.fail('drop_answer', when=is_bulk_docs, times=2)
    with pytest.raises(OSError) as caught:
        S.flush()
    assert is_connection_reset(caught.value)
    assert user_docs(db) == ['a', 'n'] and generation(db, 'a') == 2
    S.flush()
    assert_work_done_once(db, S)


def test_lost_answer_after_a_timeout_is_recognised(db, forwarder,
                                                   server_url):
    """The server applies the request but answers too late (a timeout,
    which python-couchdb does not retry): the next flush recognises it."""
    two_documents(db)
    S = Session(through(forwarder, db, server_url, timeout=0.5))
    start_work(S)
    forwarder.fail('stall_answer', when=is_bulk_docs, times=1)
    with pytest.raises(socket.timeout):
        S.flush()
    assert generation(db, 'a') == 2
    S.flush()
    assert_work_done_once(db, S)


@pytest.mark.parametrize('lost', [1, 2])
def test_lost_answer_of_a_create_with_a_generated_id(db, remote, forwarder,
                                                     lost):
    """A created document (generated id) whose create reached the server
    is recognised: one document, at revision 1."""
    S = Session(remote)
    id = S.create({'v': 1})
    forwarder.fail('drop_answer', when=is_bulk_docs, times=lost)
    if lost == 2:
        with pytest.raises(OSError):
            S.flush()
    S.flush()
    assert user_docs(db) == [id]
    assert content(db, id) == {'v': 1} and generation(db, id) == 1
    assert S[id].rev == db[id].rev and S.new == [] and S.flush() == []


def test_changes_made_after_a_lost_answer_are_written_over_it(
        db, remote, forwarder):
    """After a lost answer, further changes are written on top of the
    session's own write, without a conflict."""
    two_documents(db)
    S = Session(remote)
    start_work(S)
    forwarder.fail('drop_answer', when=is_bulk_docs, times=2)
    with pytest.raises(OSError):
        S.flush()
    S['a']['v'] = 2
    S['n']['v'] = 2
    S.flush()
    assert user_docs(db) == ['a', 'n']
    assert content(db, 'a') == {'v': 2} and generation(db, 'a') == 3
    assert content(db, 'n') == {'v': 2} and generation(db, 'n') == 2
    assert S['a'].rev == db['a'].rev and S.flush() == []


@pytest.mark.parametrize('on_conflict', ['raise', 'merge', 'overwrite',
                                         'a function'])
@pytest.mark.parametrize('lost', [1, 2])
@pytest.mark.parametrize('value', RENDERED)
def test_a_lost_write_is_written_once_whatever_form_its_numbers_come_back(
        db, remote, forwarder, value, lost, on_conflict):
    """A write whose answer was lost, of numbers the server may give back
    in another form: the session recognises its own write and writes
    nothing more, with every policy (the changed document stays at
    revision 2, the created one at 1), and the session keeps the user's
    values."""
    db['a'] = {'v': 0}
    S = Session(remote)
    S['a']['v'] = value
    S['n'] = {'v': value, 'deep': {'w': [value]}}
    called = []

    def resolve(mine, theirs, base):
        called.append(mine['_id'])
        return mine
    policy = resolve if on_conflict == 'a function' else on_conflict
    forwarder.fail('drop_answer', when=is_bulk_docs, times=lost)
    if lost == 2:
        with pytest.raises(OSError):
            S.flush(on_conflict=policy)
    S.flush(on_conflict=policy)
    assert generation(db, 'a') == 2 and generation(db, 'n') == 1
    assert same(content(db, 'a')['v'], value, exact_numbers=False)
    assert same(content(db, 'n')['deep']['w'][0], value, exact_numbers=False)
    assert called == []
    assert type(S['a']['v']) is type(value) and S['a']['v'] == value
    assert type(S['n']['deep']['w'][0]) is type(value)
    assert S['a'].rev == db['a'].rev and S['n'].rev == db['n'].rev
    assert not S.has_changes() and S.flush() == []


@pytest.mark.parametrize('value', RENDERED)
def test_merge_over_a_lost_write_takes_the_other_writers_change_of_it(
        db, remote, forwarder, value):
    """'merge': a write whose answers were lost reached the server, and
    another writer changed its number since; the user changed another
    field. The other writer's change stands, the user's is added: no
    conflict for a number the server gave back in another form."""
    db['a'] = {'v': 0, 'x': 0}
    S = Session(remote)
    S['a']['v'] = value
    forwarder.fail('drop_answer', when=is_bulk_docs, times=2)
    with pytest.raises(OSError):
        S.flush()
    change(db, 'a', v=5)
    S['a']['x'] = 2
    S.flush(on_conflict='merge')
    assert content(db, 'a') == {'v': 5, 'x': 2} and generation(db, 'a') == 4
    assert S['a'].rev == db['a'].rev and not S.has_changes()


def test_lost_answer_beside_a_refused_document(db, validated, remote,
                                               forwarder):
    """A lost answer of a request with a refused document: the retry
    reports only the refused one; the others are written once."""
    two_documents(db)
    S = Session(remote)
    start_work(S)
    S.create({'_id': 'f', 'forbidden': True})
    forwarder.fail('drop_answer', when=is_bulk_docs, times=1)
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert list(caught.value.failures) == ['f']
    assert isinstance(caught.value.failures['f'], couchdb.Forbidden)
    del S['f']
    # The create's first attempt may have landed all the same (a
    # validation may look at the old document): its deletion looks it up,
    # and finds none.
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert list(caught.value.failures) == ['f']
    assert isinstance(caught.value.failures['f'], couchdb.ResourceNotFound)
    assert_work_done_once(db, S)


def test_lost_answer_of_the_resolution_write_is_recognised(
        db, remote, forwarder):
    """The answer of the bulk request writing merged documents is lost:
    the merged documents are recognised as written."""
    put(db, 'a', v=0, w=0)
    S = Session(remote)
    S['a']['v'] = 'mine'
    change(db, 'a', w='theirs')
    bulk = itertools.count()
    forwarder.fail('drop_answer', times=1, when=lambda method, path:
                   is_bulk_docs(method, path) and next(bulk) == 1)
    S.flush(on_conflict='merge')
    assert forwarder.pending_rules == 0
    assert content(db, 'a') == {'v': 'mine', 'w': 'theirs'}
    assert generation(db, 'a') == 3 and S['a'].rev == db['a'].rev


def test_connection_failure_while_resolving_loses_nothing(
        db, remote, forwarder):
    """A connection failure while reading the server's versions of
    conflicted documents raises; what was written stays written and the
    next flush resolves the rest."""
    put(db, 'a', v=0, w=0)
    put(db, 'b', v=0, w=0)
    S = Session(remote, on_conflict='merge')
    S['a']['v'] = 'mine'
    S['b']['v'] = 'mine'
    change(db, 'b', w='theirs')
    forwarder.fail('cut_before', times=2, when=lambda method, path:
                   path.endswith('/_bulk_get'))
    with pytest.raises(OSError):
        S.flush()
    assert content(db, 'a') == {'v': 'mine', 'w': 0}
    assert content(db, 'b') == {'v': 0, 'w': 'theirs'}
    S.flush()
    assert content(db, 'b') == {'v': 'mine', 'w': 'theirs'}
    assert generation(db, 'a') == 2 and generation(db, 'b') == 3
    assert not S.has_changes()


def test_lost_answer_of_a_deletion_by_id_is_recognised(db, remote,
                                                       forwarder):
    """A deletion by id (revision looked up at flush time) whose answer is
    lost is done: the next flush reports no missing document."""
    two_documents(db)
    S = Session(remote)
    del S['b']
    forwarder.fail('drop_answer', when=is_bulk_docs, times=2)
    with pytest.raises(OSError):
        S.flush()
    assert user_docs(db) == ['a']
    S.flush()
    assert user_docs(db) == ['a'] and generation(db, 'a') == 1
    assert S.deleted == [] and not S.has_changes()


def test_lost_write_reverted_afterwards_is_written_back(db, remote,
                                                        forwarder):
    """A change whose flush lost its connection after the server applied
    it, then changed back: the next flush writes the reverted content."""
    put(db, 'a', v=1)
    S = Session(remote)
    S['a']['v'] = 2
    forwarder.fail('drop_answer', when=is_bulk_docs, times=2)
    with pytest.raises(OSError):
        S.flush()
    assert db['a']['v'] == 2
    S['a']['v'] = 1
    S.flush()
    assert db['a']['v'] == 1 and not S.has_changes()


def test_new_document_deleted_after_a_lost_create_is_deleted(db, remote,
                                                              forwarder):
    """A created document whose flush lost its connection may be on the
    server: deleting it in the session deletes it there."""
    S = Session(remote)
    S.create({'_id': 'c', 'v': 1})
    forwarder.fail('drop_answer', when=is_bulk_docs, times=2)
    with pytest.raises(OSError):
        S.flush()
    assert 'c' in db
    del S['c']
    S.flush()
    assert 'c' not in db


def test_setitem_of_a_deleted_document_brings_it_back(db):
    """S[id] = doc after del S[id] writes doc again, as save(doc) does."""
    put(db, 'a', v=1)
    S = Session(db)
    doc = S['a']
    del S['a']
    S['a'] = doc
    S.flush()
    assert stored(db, 'a') == {'_id': 'a', 'v': 1}


# -- Nothing lost, in any order: one test per class of defect -----------------
#
# Each class below was once a way to lose or double a user's change; the
# tests are named for the behaviour that replaced it, and reach it through
# every path that settles a document (plain write, merge, overwrite, a
# resolver function, a recognised lost answer, a refresh).

def bump(mine, theirs, base):
    """A resolver function for counters: their count plus my increment."""
    return dict(theirs, n=theirs['n'] + mine['n'] - base['n'])


def two_sessions_on_a_counter(db, **options):
    """Sessions S1 and S2 that each add 1 to the counter read at n == 0;
    S1 has flushed."""
    put(db, 'counter', n=0)
    S1, S2 = Session(db, **options), Session(db, **options)
    S1['counter']['n'] += 1
    S2['counter']['n'] += 1
    S1.flush()
    return S1, S2


def test_a_plain_conflict_with_the_same_value_is_reported_not_taken(db):
    """Two sessions add 1 to one counter: the second flush's 409 came with
    its answer, so the server holding n == 1 is the other session's write,
    not this one's: 'raise' reports it and keeps the change."""
    _, S2 = two_sessions_on_a_counter(db)
    with pytest.raises(FlushError) as caught:
        S2.flush()
    assert isinstance(caught.value.failures['counter'],
                      couchdb.ResourceConflict)
    assert content(db, 'counter') == {'n': 1}
    assert S2.has_changes()


def test_a_resolver_function_is_called_for_a_plain_conflict(db):
    """The resolver function decides a plain conflict, even when the server
    holds what the session would write."""
    calls = []

    def resolve(mine, theirs, base):
        calls.append((mine['n'], theirs['n'], base['n']))
        return bump(mine, theirs, base)

    _, S2 = two_sessions_on_a_counter(db)
    S2.flush(on_conflict=resolve)
    assert calls == [(1, 1, 0)]
    assert content(db, 'counter') == {'n': 2}
    assert S2['counter']['n'] == 2 and not S2.has_changes()


def test_an_identical_upload_by_another_writer_is_a_conflict(db):
    """Another writer uploads the very bytes the session uploads: the PUT's
    409 came with its answer, so it is a conflict, not the session's own."""
    put(db, 'd', v=1)
    S = Session(db, max_inline_attachment=4)
    S.put_attachment(S['d'], b'same bytes', 'f.bin')
    db.put_attachment(db['d'], b'same bytes', 'f.bin',
                      'application/octet-stream')
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert isinstance(caught.value.failures['d'], couchdb.ResourceConflict)
    assert S.has_changes()


def test_a_plain_value_stored_stays_the_documents_own(db):
    """A plain dict appended to a document's list, then changed through the
    user's reference: the change is the document's, before and after a
    flush, in ``diff()`` and on the server."""
    put(db, 'a', log=[])
    S = Session(db)
    doc = S['a']
    entry = {'at': 1}
    doc['log'].append(entry)
    entry['done'] = True
    S.flush()
    assert db['a']['log'] == [{'at': 1, 'done': True}]
    entry['by'] = ['ann']
    assert S.has_changes() and S.diff(doc) == [
        {'op': 'add', 'path': '/log/0/by', 'value': ['ann']}]
    S.flush()
    assert db['a']['log'] == [{'at': 1, 'done': True, 'by': ['ann']}]


def test_a_popped_subtree_stored_again_stays_the_documents_own(db):
    """What ``pop()`` hands back, stored again and then changed through the
    user's reference, is written with the change."""
    put(db, 'a', old={'k': 1})
    S = Session(db)
    doc = S['a']
    moved = doc.pop('old')
    doc['new'] = moved
    moved['k'] = 2
    S.flush()
    assert content(db, 'a') == {'new': {'k': 2}}


def test_a_value_of_a_document_stored_elsewhere_is_a_copy(db):
    """A tracked value (or one the document holds already) is copied when
    stored elsewhere: documents are JSON trees."""
    put(db, 'a', x={'k': 1})
    S = Session(db)
    doc = S['a']
    doc['y'] = doc['x']
    doc['y']['k'] = 2
    shared = {'n': 0, 'part': [0]}
    doc['p'] = shared
    doc['q'] = shared
    doc['r'] = shared['part']
    shared['n'] = 1
    shared['part'].append(1)
    S.flush()
    assert content(db, 'a') == {
        'x': {'k': 1}, 'y': {'k': 2}, 'p': {'n': 1, 'part': [0, 1]},
        'q': {'n': 0, 'part': [0]}, 'r': [0]}


def test_a_plain_value_stored_in_two_documents_is_the_first_ones(db):
    """A plain value stored in a second document is copied there: another
    writer's change of the second, read back by refresh(), leaves the first
    alone."""
    put(db, 'a')
    put(db, 'b')
    S = Session(db)
    a, b = S['a'], S['b']
    shared = {'s': 1}
    a['sh'] = shared
    b['sh'] = shared
    S.flush()
    change(db, 'b', sh={'s': 'theirs'})
    S.refresh(b)
    assert a['sh'] == {'s': 1} and not S.has_changes()
    shared['s'] = 2
    S.flush()
    assert db['a']['sh'] == {'s': 2} and db['b']['sh'] == {'s': 'theirs'}


def test_a_replaced_plain_value_changed_afterwards_leaves_the_change(db):
    """A plain value adopted, flushed, then replaced in the document and
    changed through the user's old reference: the old value is no longer
    the document's, and the replacement is still written."""
    S = Session(db)
    doc = S[S.create({})]
    old = {'a': 0}
    doc['x'] = old
    S.flush()
    doc['x'] = {'a': []}
    old['a'] = []
    assert S.diff(doc) == [{'op': 'replace', 'path': '/x/a', 'value': [],
                            'was': 0}]
    S.flush()
    assert db[doc['_id']]['x'] == {'a': []}


def test_equal_plain_values_are_told_apart(db):
    """Two equal plain values stored, one removed: the other stays the
    document's (their records are told apart by identity, not by ==)."""
    put(db, 'x')
    S = Session(db)
    doc = S['x']
    first = []
    doc['a'] = first
    doc['c'] = []
    assert S.has_changes()
    del doc['c']
    assert S.has_changes()
    S.flush()
    first.append(1)
    assert S.has_changes()
    S.flush()
    assert content(db, 'x') == {'a': [1]}


def test_a_plain_value_taken_out_of_the_document_is_no_longer_its(db):
    """A stored plain value that is replaced is the document's no more:
    changes through the user's reference are not written."""
    put(db, 'a')
    S = Session(db)
    doc = S['a']
    value = {'k': 1}
    doc['v'] = value
    S.flush()
    doc['v'] = 'replaced'
    value['k'] = 2
    S.flush()
    assert content(db, 'a') == {'v': 'replaced'}
    assert not S.has_changes()


@pytest.mark.parametrize('how', ['fetched', 'created', 'saved with _rev'])
def test_a_plain_value_made_to_hold_itself_later_is_refused_by_name(
        db, wire, how):
    """A plain dict stored in a document, then made to hold itself through
    the user's own reference: flush() refuses it at once, naming the
    document and the place of the loop, sends nothing and loses nothing
    (it used to loop forever for a created document, and to raise a
    ValueError naming nothing for the others); undone, all is written."""
    put(db, 'b', v=1)
    S = Session(db)
    if how == 'created':
        S.create({'_id': 'a', 'v': 1})
    else:
        put(db, 'a', v=1)
        if how == 'saved with _rev':
            S.save(dict(db['a']))
    mine = {'k': 1}
    S['a']['m'] = mine
    S['b']['v'] = 2
    mine['self'] = mine
    wire.clear()
    with pytest.raises(ValueError) as caught:
        S.flush()
    assert str(caught.value).startswith(
        "document 'a' holds what JSON cannot carry: the dict or list at "
        "/m/self holds itself. Nothing was sent")
    assert wire.calls() == [] and sorted(d.id for d in S.dirty + S.new) == [
        'a', 'b']
    del mine['self']
    S.flush()
    assert stored(db, 'a') == {'_id': 'a', 'v': 1, 'm': {'k': 1}}
    assert stored(db, 'b') == {'_id': 'b', 'v': 2}


def test_a_plain_value_holding_itself_or_a_part_twice(db):
    """A stored plain value holding itself is refused at once, changing
    nothing; one holding a part twice gets a copy of the second."""
    put(db, 'a', v=0)
    S = Session(db)
    doc = S['a']
    loop = {'v': []}
    loop['v'].append(loop)
    with pytest.raises(ValueError, match='holds itself'):
        doc['loop'] = loop
    assert not S.has_changes()
    part = {'n': 0}
    twice = {'x': part, 'y': part}
    doc['twice'] = twice
    assert twice['x'] is part and twice['y'] is not part
    part['n'] = 1
    S.flush()
    assert db['a']['twice'] == {'x': {'n': 1}, 'y': {'n': 0}}


def settle_a_conflict(db, forwarder, remote, path):
    """A session whose document 'a' (with children ``tags`` and ``meta``,
    kept by the caller) is settled by a flush along ``path``; returns the
    session and the kept children."""
    put(db, 'a', v=0, tags=['t'], meta={'k': 0})
    S = Session(remote)
    doc = S['a']
    tags, meta = doc['tags'], doc['meta']
    doc['v'] = 1
    if path == 'lost answer':
        forwarder.fail('drop_answer', when=is_bulk_docs, times=1)
        S.flush()
    elif path == 'refresh':
        change(db, 'a', theirs=1)
        with pytest.raises(FlushError):
            S.flush()
        S.refresh(doc)
    else:
        change(db, 'a', theirs=1)
        policy = {'merge': 'merge', 'overwrite': 'overwrite',
                  'function': lambda mine, theirs, base: dict(
                      theirs, v=mine['v'])}[path]
        S.flush(on_conflict=policy)
    assert not S.has_changes()
    return S, doc, tags, meta


@pytest.mark.parametrize('path', ['merge', 'overwrite', 'function',
                                  'lost answer', 'refresh'])
def test_references_stay_live_after_a_flush_settles_the_document(
        db, forwarder, remote, path):
    """Children kept from before a flush that settled their document stay
    part of it: changes through them are tracked and written."""
    S, doc, tags, meta = settle_a_conflict(db, forwarder, remote, path)
    tags.append('x')
    meta['k'] = 2
    assert S.has_changes()
    assert doc['tags'] == ['t', 'x'] and doc['meta'] == {'k': 2}
    S.flush()
    assert db['a']['tags'] == ['t', 'x'] and db['a']['meta'] == {'k': 2}


def test_merge_reports_an_inline_attachment_both_sides_replaced(db):
    """The session and another writer both replace a small attachment:
    'merge' reports a conflict naming it and writes nothing."""
    put_with_attachments(db, 'a', {'f.txt': b'base'}, v=0)
    S = Session(db)
    S.put_attachment(S['a'], b'mine', 'f.txt')
    db.put_attachment(db['a'], b'theirs', 'f.txt')
    with pytest.raises(FlushError) as caught:
        S.flush(on_conflict='merge')
    assert "attachment 'f.txt'" in str(caught.value.failures['a'])
    assert on_server(db, 'a', 'f.txt') == b'theirs'
    assert S.get_attachment('a', 'f.txt').read() == b'mine'


@pytest.mark.parametrize('size', ['small', 'large'])
def test_merge_reports_attachments_put_on_a_document_deleted_meanwhile(
        db, size):
    """Attachments put on a document another writer deleted: 'merge' takes
    that for a change against a deletion, a conflict."""
    put(db, 'a', v=0)
    S = Session(db, max_inline_attachment=LIMIT)
    S.put_attachment(S['a'], SIZES[size], 'f.bin')
    db.delete(db['a'])
    with pytest.raises(FlushError) as caught:
        S.flush(on_conflict='merge')
    assert 'deleted on one side' in str(caught.value.failures['a'])
    assert db.get('a') is None and S.has_changes()


@pytest.mark.parametrize('size', ['small', 'large'])
def test_merge_accepts_the_same_attachment_put_on_both_sides(db, size):
    """The session and another writer put the very same content: the same
    change on both sides, merged."""
    put(db, 'a', v=0)
    S = Session(db, max_inline_attachment=LIMIT)
    S.put_attachment(S['a'], SIZES[size], 'f.bin')
    db.put_attachment(db['a'], SIZES[size], 'f.bin')
    S.flush(on_conflict='merge')
    assert on_server(db, 'a', 'f.bin') == SIZES[size]
    assert not S.has_changes()


def test_merge_reports_an_attachment_deleted_on_one_side_replaced_on_the_other(
        db):
    """Deleting an attachment the other writer replaced is a conflict too."""
    put_with_attachments(db, 'a', {'f.txt': b'base'}, v=0)
    S = Session(db)
    S.delete_attachment(S['a'], 'f.txt')
    db.put_attachment(db['a'], b'theirs', 'f.txt')
    with pytest.raises(FlushError):
        S.flush(on_conflict='merge')
    assert on_server(db, 'a', 'f.txt') == b'theirs'


@pytest.mark.parametrize('policy', ['raise', 'merge'])
def test_deleting_what_another_writer_deleted(db, policy):
    """Both sides delete the document: the 409 came with its answer, so
    'raise' reports it; 'merge' takes it as the same change on both
    sides."""
    put(db, 'a', v=0)
    S = Session(db)
    S.delete(S['a'])
    db.delete(db['a'])
    if policy == 'raise':
        with pytest.raises(FlushError) as caught:
            S.flush()
        assert isinstance(caught.value.failures['a'],
                          couchdb.ResourceConflict)
        assert S.deleted and S.has_changes()
    else:
        S.flush(on_conflict='merge')
        assert not S.has_changes() and 'a' not in S


def lose_the_answer(S, forwarder):
    """Flush ``S`` with the answer of its bulk request (and of the retry)
    lost: the server applied it, the session cannot know."""
    forwarder.fail('drop_answer', when=is_bulk_docs, times=2)
    with pytest.raises(OSError):
        S.flush()


def lose_the_attachment_answer(db, remote, forwarder, size):
    """A session that put attachment f.txt on 'a' and whose flush lost the
    answer (the bulk request's for a small one, the PUT's for a large one):
    the server has it, the session cannot know."""
    put(db, 'a', x=1)
    S = Session(remote, max_inline_attachment=LIMIT)
    S.put_attachment(S['a'], SIZES[size], 'f.txt')
    forwarder.fail('drop_answer', times=2, when=is_bulk_docs if
                   size == 'small' else lambda method, path: method == 'PUT')
    with pytest.raises(OSError):
        S.flush()
    assert on_server(db, 'a', 'f.txt') == SIZES[size]
    return S


@pytest.mark.parametrize('then', ['nothing', 'a field changed'])
@pytest.mark.parametrize('size', ['large', 'small'])
def test_a_lost_attachment_write_is_not_taken_for_another_writers_alike(
        db, remote, forwarder, size, then):
    """After a lost attachment answer, another writer replaces the
    attachment with content of the same length and type (text, whose
    digest CouchDB makes of what it stores): a later revision, not the
    session's write, which the history shows under it. With nothing done
    since, the put is settled as written, as if its answer had come back;
    a change made since is in conflict with the other writer's, and
    'raise' reports it. The server keeps the other writer's attachment."""
    S = lose_the_attachment_answer(db, remote, forwarder, size)
    landed = db['a'].rev
    theirs = bytes((byte + 1) % 256 for byte in SIZES[size])
    assert theirs != SIZES[size] and len(theirs) == len(SIZES[size])
    db.put_attachment(db['a'], theirs, 'f.txt')
    if then == 'nothing':
        assert S.flush() == [(True, 'a', landed)]
        assert not S.has_changes() and S['a']['_rev'] == landed
    else:
        S['a']['y'] = 'mine'
        with pytest.raises(FlushError) as caught:
            S.flush()
        assert isinstance(caught.value.failures['a'],
                          couchdb.ResourceConflict)
        assert S.has_changes() and S['a']['_rev'] == landed
    assert on_server(db, 'a', 'f.txt') == theirs
    assert generation(db, 'a') == 3


@pytest.mark.parametrize('theirs', [b'world', b'hello'])
def test_a_lost_create_with_a_text_attachment_is_told_by_its_content(
        db, remote, forwarder, theirs):
    """A create carrying a small text attachment never reaches the server
    (cut before), and another writer creates the document with the same
    fields and a text attachment of the same name, type and length. Its
    digest cannot be compared (CouchDB digests what it compresses), so its
    content is read (one GET): other content is a conflict, the session's
    attachment stays pending and an overwrite writes it; the same content
    cannot be told from the session's own write, and counts as it."""
    S = Session(remote)
    S['x'] = {'v': 1}
    S.put_attachment(S['x'], b'hello', 'a.txt', 'text/plain')
    forwarder.fail('cut_before', when=is_bulk_docs, times=2)
    with pytest.raises(OSError):
        S.flush()
    db['x'] = {'v': 1}
    db.put_attachment(db['x'], theirs, 'a.txt', 'text/plain')
    if theirs == b'hello':
        assert S.flush() == [(True, 'x', db['x'].rev)]
        assert not S.has_changes()
        return
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert isinstance(caught.value.failures['x'], couchdb.ResourceConflict)
    assert on_server(db, 'x', 'a.txt') == b'world'
    assert S.get_attachment('x', 'a.txt').read() == b'hello'
    assert S.has_changes()
    S.flush(on_conflict='overwrite')
    assert on_server(db, 'x', 'a.txt') == b'hello'


@pytest.mark.parametrize('policy', ['overwrite', 'mine'])
def test_overwriting_leaves_out_the_stub_of_an_attachment_deleted_meanwhile(
        db, policy):
    """Another writer deletes an attachment the session's version still
    shows; 'overwrite' (or a resolver choosing mine) writes the session's
    version without that stub: the session has no content for it, and
    CouchDB refuses a stub of an attachment it no longer has (412
    missing_stub) where PouchDB Server would bring it back. The user's
    change is written, and nothing is left pending."""
    db['a'] = {'v': 0}
    db.put_attachment(db['a'], b'gone soon', 'f.bin', 'application/x-f')
    db.put_attachment(db['a'], b'stays', 'g.bin', 'application/x-f')
    S = Session(db)
    S['a']['v'] = 1
    db.delete_attachment(db['a'], 'f.bin')
    S.flush(on_conflict='overwrite' if policy == 'overwrite' else
            lambda mine, theirs, base: mine)
    assert content(db, 'a')['v'] == 1
    assert sorted(db['a']['_attachments']) == ['g.bin']
    assert on_server(db, 'a', 'g.bin') == b'stays'
    assert sorted(S['a']['_attachments']) == ['g.bin']
    assert not S.has_changes()


@pytest.mark.parametrize('size', ['large', 'small'])
def test_merge_after_a_lost_attachment_put_takes_the_writers_deletion_of_it(
        db, remote, forwarder, size):
    """'merge': the session's attachment put reached the server with its
    answer lost; another writer deleted the attachment; the user changed a
    field. The other writer's deletion stands (no change of the session's
    since its write) and the field is written over it: no conflict."""
    S = lose_the_attachment_answer(db, remote, forwarder, size)
    db.delete_attachment(db['a'], 'f.txt')
    S['a']['y'] = 'mine'
    S.flush(on_conflict='merge')
    assert fields(db, 'a') == {'x': 1, 'y': 'mine'}
    assert on_server(db, 'a', 'f.txt') is None
    assert generation(db, 'a') == 4 and not S.has_changes()
    assert S['a']['_rev'] == db['a'].rev and '_attachments' not in S['a']


@pytest.mark.parametrize('policy', ['raise', 'merge', 'overwrite',
                                    'a function'])
def test_an_attachment_put_and_deleted_around_a_lost_write_sends_nothing(
        db, remote, forwarder, policy):
    """A document read, another writer deletes it, the session puts an
    attachment and its flush loses both answers; the user then deletes the
    attachment: nothing of the user's is left to write, with any policy.
    The other writer's deletion stands (no document brought back), and
    nothing is reported."""
    put(db, 'a', x=1)
    S = Session(remote)
    doc = S['a']
    db.delete(db['a'])
    S.put_attachment(doc, b'one', 'f.bin')
    forwarder.fail('drop_answer', when=is_bulk_docs, times=2)
    with pytest.raises(OSError):
        S.flush()
    S.delete_attachment(doc, 'f.bin')
    called = []
    S.flush(on_conflict=policy if policy != 'a function' else
            lambda mine, theirs, base: called.append(1) or mine)
    assert db.get('a') is None and called == []
    assert not S.has_changes() and S.flush() == []


def test_an_attachment_put_and_deleted_around_a_lost_write_that_missed(
        db, remote, forwarder):
    """A put whose write's answer was lost, then deleted: when the server
    shows the write never landed (another writer moved the document
    first), the deletion is dropped with the put, and 'merge' keeps the
    other writer's attachment of that name."""
    put(db, 'a', v=0)
    S = Session(remote, on_conflict='merge')
    S['a']['v'] = 1
    S.put_attachment('a', b'mine', 'f.txt')
    db.put_attachment(db['a'], b'theirs', 'f.txt')
    lose_the_answer(S, forwarder)
    S.delete_attachment('a', 'f.txt')
    S.flush()
    assert content(db, 'a')['v'] == 1
    assert on_server(db, 'a', 'f.txt') == b'theirs'
    assert not S.has_changes()


@pytest.mark.parametrize('size', ['small', 'large'])
def test_deleting_an_attachment_after_its_lost_answer_deletes_it(
        db, remote, forwarder, size):
    """An attachment whose write's answer was lost may be on the server:
    deleting it is a deletion, not a forgotten put."""
    S = lose_the_attachment_answer(db, remote, forwarder, size)
    S.delete_attachment('a', 'f.txt')
    assert S.has_changes()
    S.flush()
    assert on_server(db, 'a', 'f.txt') is None
    assert content(db, 'a') == {'x': 1} and not S.has_changes()
    assert S['a']['_rev'] == db['a'].rev


@pytest.mark.parametrize('policy', ['raise', 'merge'])
@pytest.mark.parametrize('size', ['small', 'large'])
def test_work_after_a_lost_attachment_answer_is_written_over_it(
        db, remote, forwarder, size, policy):
    """After a lost attachment answer, a change of the document is written
    over the session's own write, which is not taken for another writer's
    (no conflict, with 'raise' or 'merge'), and nothing is uploaded
    twice."""
    S = lose_the_attachment_answer(db, remote, forwarder, size)
    S['a']['x'] = 2
    S.put_attachment('a', b'g', 'g.txt')
    S.flush(on_conflict=policy)
    assert content(db, 'a')['x'] == 2
    assert on_server(db, 'a', 'f.txt') == SIZES[size]
    assert on_server(db, 'a', 'g.txt') == b'g'
    assert generation(db, 'a') == 3 and S['a']['_rev'] == db['a'].rev
    assert sorted(S['a']['_attachments']) == ['f.txt', 'g.txt']
    assert not S.has_changes()


@pytest.mark.parametrize('size', ['small', 'large'])
def test_a_lost_attachment_answer_alone_is_settled_without_a_second_copy(
        db, remote, forwarder, size):
    """Nothing else to do after a lost attachment answer: the next flush
    finds it on the server and writes no second revision."""
    S = lose_the_attachment_answer(db, remote, forwarder, size)
    assert S.has_changes()
    S.flush()
    assert generation(db, 'a') == 2 and S['a']['_rev'] == db['a'].rev
    assert not S.has_changes() and S.flush() == []


@pytest.mark.parametrize('policy', ['raise', 'merge'])
def test_deleting_after_a_lost_answer_deletes(db, remote, forwarder, policy):
    """An edit whose answer was lost, then ``del S[id]``: the deletion goes
    on top of the session's own write, with no conflict."""
    put(db, 'a', v=0)
    S = Session(remote, on_conflict=policy)
    S['a']['v'] = 1
    lose_the_answer(S, forwarder)
    assert content(db, 'a') == {'v': 1}
    del S['a']
    S.flush()
    assert db.get('a') is None and not S.has_changes()


def test_recreating_after_a_lost_deletion_creates(db, remote, forwarder):
    """A deletion whose answer was lost, then ``S[id] = ...``: the new
    content is written over the session's own deletion."""
    put(db, 'a', v=0)
    S = Session(remote)
    del S['a']
    lose_the_answer(S, forwarder)
    assert db.get('a') is None
    S['a'] = {'v': 'new'}
    S.flush()
    assert content(db, 'a') == {'v': 'new'} and not S.has_changes()


@pytest.mark.parametrize('then', ['revert', 'change again'])
def test_merge_after_a_lost_answer_and_another_writer_keeps_what_came_after(
        db, remote, forwarder, then):
    """A lost answer whose write reached the server, another writer's change
    on top, then a revert (or another change) merged: the session's own
    write, found in the server's history, is the base, so what the user did
    after it wins over it."""
    put(db, 'a', x=1)
    S = Session(remote, on_conflict='merge')
    S['a']['x'] = 2
    lose_the_answer(S, forwarder)
    S['a']['x'] = 1 if then == 'revert' else 3
    change(db, 'a', y='them')
    S.flush()
    assert content(db, 'a') == {'x': 1 if then == 'revert' else 3,
                                'y': 'them'}
    assert S['a']['_rev'] == db['a'].rev and not S.has_changes()


def test_a_resolver_after_a_lost_answer_gets_the_lost_write_as_base(
        db, remote, forwarder):
    """The resolver function's ``base`` is the session's own lost write
    when the server's history shows it under the other writer's change."""
    seen = []

    def resolve(mine, theirs, base):
        seen.append(base['x'])
        return dict(theirs, x=mine['x'])

    put(db, 'a', x=1)
    S = Session(remote)
    S['a']['x'] = 2
    lose_the_answer(S, forwarder)
    S['a']['x'] = 5
    change(db, 'a', y='them')
    S.flush(on_conflict=resolve)
    assert seen == [2] and content(db, 'a') == {'x': 5, 'y': 'them'}


def delta(mine, theirs, base):
    """A resolver that adds the user's change of counter ``n`` (mine less
    base) to the other writer's: a base that is not what the user changed
    from counts a change twice, or drops one. The user's deletion wins."""
    if mine is None:
        return {'_deleted': True}
    return dict(theirs, n=theirs['n'] + mine['n'] - base['n'])


POLICIES = ['raise', 'merge', 'overwrite', delta]


@pytest.mark.parametrize('policy', POLICIES)
def test_a_lost_answer_is_recognised_after_a_flush_that_never_arrived(
        db, remote, forwarder, policy):
    """A counter's write lands with its answer lost; the user counts once
    more, and the next flush is cut before the server sees it; the flush
    after that finds the first write on the server, its own: two counts
    on the server, once each, and no conflict, for every policy."""
    put(db, 'a', n=0)
    S = Session(remote, on_conflict=policy)
    S['a']['n'] += 1
    lose_the_answer(S, forwarder)
    S['a']['n'] += 1
    forwarder.fail('cut_before', when=is_bulk_docs, times=2)
    with pytest.raises(OSError):
        S.flush()
    assert content(db, 'a') == {'n': 1}
    [(ok, _, rev)] = S.flush()
    assert ok and content(db, 'a') == {'n': 2} and rev == db['a'].rev
    assert generation(db, 'a') == 3 and not S.has_changes()


@pytest.mark.parametrize('policy', ['raise', 'merge'])
def test_a_lost_create_is_recognised_after_a_flush_that_never_arrived(
        db, remote, forwarder, policy):
    """The same for a create: the later flush writes the change made since
    over the session's own create, and meets no conflict with it."""
    S = Session(remote, on_conflict=policy)
    S['x'] = {'tags': ['a']}
    lose_the_answer(S, forwarder)
    S['x']['tags'].append('b')
    forwarder.fail('cut_before', when=is_bulk_docs, times=2)
    with pytest.raises(OSError):
        S.flush()
    [(ok, _, _)] = S.flush()
    assert ok and content(db, 'x') == {'tags': ['a', 'b']}
    assert generation(db, 'x') == 2 and not S.has_changes()


@pytest.mark.parametrize('policy', POLICIES)
def test_a_lost_write_under_another_writers_change_is_settled_as_written(
        db, remote, forwarder, policy):
    """A counter's write lands with its answer lost, another writer counts
    on top, and the user does nothing more: as if the answer had come back,
    the flush writes nothing (it resends the write, which conflicts, and
    the server's history shows it) and reports the write, whatever the
    policy; the other writer's count stays."""
    put(db, 'a', n=0)
    S = Session(remote, on_conflict=policy)
    S['a']['n'] += 1
    lose_the_answer(S, forwarder)
    landed = db['a'].rev
    change(db, 'a', n=2)
    theirs = db['a'].rev
    assert S.flush() == [(True, 'a', landed)]
    assert content(db, 'a') == {'n': 2} and db['a'].rev == theirs
    assert not S.has_changes() and S['a']['_rev'] == landed
    assert S.flush() == []


@pytest.mark.parametrize('policy', POLICIES)
def test_a_lost_deletion_under_another_writers_create_is_settled(
        db, remote, forwarder, policy):
    """A deletion lands with its answer lost, and another writer creates the
    document again: the deletion is done, the session forgets the
    document, and the other writer's stays, whatever the policy."""
    put(db, 'a', n=0)
    S = Session(remote, on_conflict=policy)
    del S['a']
    lose_the_answer(S, forwarder)
    db['a'] = {'n': 'theirs'}
    [(ok, _, rev)] = S.flush()
    assert ok and rev.startswith('2-')
    assert content(db, 'a') == {'n': 'theirs'} and not S.has_changes()
    assert S['a']['n'] == 'theirs'     # read again: the session forgot it


@pytest.mark.parametrize('policy', POLICIES)
@pytest.mark.parametrize('then', ['nothing', 'deleted'])
def test_a_lost_create_over_a_deletion_is_found_under_another_writers_change(
        db, remote, forwarder, policy, then):
    """A create over a deleted document carries on its deleted branch (not
    at revision 1), its answer is lost, and another writer counts on top:
    the server's history still shows the create as the session's own. With
    nothing done since, nothing is written; a deletion made since deletes
    the document, or, with 'raise', is reported in conflict and stays
    pending."""
    put(db, 'x', old=True)
    db.delete(db['x'])
    S = Session(remote, on_conflict=policy)
    S['x'] = {'n': 1}
    lose_the_answer(S, forwarder)
    assert generation(db, 'x') == 3
    change(db, 'x', n=2)
    if then == 'nothing':
        [(ok, _, rev)] = S.flush()
        assert ok and rev.startswith('3-') and content(db, 'x') == {'n': 2}
        assert not S.has_changes()
        return
    del S['x']
    if policy == 'raise':
        with pytest.raises(FlushError) as caught:
            S.flush()
        assert isinstance(caught.value.failures['x'],
                          couchdb.ResourceConflict)
        assert content(db, 'x') == {'n': 2} and S.has_changes()
    elif policy == 'merge':
        with pytest.raises(FlushError):     # a deletion against a change
            S.flush()
        assert content(db, 'x') == {'n': 2} and S.has_changes()
    else:
        S.flush()
        assert 'x' not in db and not S.has_changes()


@pytest.mark.parametrize('policy', ['raise', 'merge', 'overwrite'])
def test_a_create_is_not_taken_for_an_older_document_with_its_content(
        db, remote, forwarder, policy):
    """A create that never reached the server (cut before) holds what a
    document deleted long before held; another writer creates the document
    anew: the old revision is no write of the session's (its create came
    after the deletion), so this is a conflict ('overwrite' writes the
    session's version), and the create is not lost."""
    put(db, 'x', state='on')
    db.delete(db['x'])
    S = Session(remote, on_conflict=policy)
    S['x'] = {'state': 'on'}
    forwarder.fail('cut_before', when=is_bulk_docs, times=2)
    with pytest.raises(OSError):
        S.flush()
    db['x'] = {'state': 'off'}
    if policy == 'overwrite':
        S.flush()
        assert content(db, 'x') == {'state': 'on'} and not S.has_changes()
        return
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert isinstance(caught.value.failures['x'], couchdb.ResourceConflict)
    assert content(db, 'x') == {'state': 'off'} and S.has_changes()


def test_a_lost_create_is_found_under_many_later_changes(db, remote,
                                                         forwarder):
    """A create lands with its answer lost, and another writer counts on
    it many times: the history still shows it as the session's own, and a
    resolver counting the user's later change gets it as the base."""
    S = Session(remote, on_conflict=delta)
    S['c'] = {'n': 1}
    lose_the_answer(S, forwarder)
    for n in range(2, 15):
        change(db, 'c', n=n)
    S['c']['n'] += 1
    S.flush()
    assert content(db, 'c') == {'n': 15} and not S.has_changes()


ONLY_UP = """function (newDoc, oldDoc, userCtx) {
  if (oldDoc && !newDoc._deleted && !(newDoc.n > oldDoc.n))
    throw({forbidden: 'n only goes up'});
}"""


@pytest.mark.parametrize('policy', ['raise', delta])
def test_a_refusal_for_the_write_that_landed_keeps_it_in_mind(
        db, remote, forwarder, policy):
    """A counter may only go up (the validation looks at the old
    document); its write lands with the answer lost, and the retry is
    refused for the very write that landed: the next flush still finds
    that write as the session's own, and counts the user's later change
    once."""
    db['_design/up'] = {'validate_doc_update': ONLY_UP}
    put(db, 'c', n=0)
    S = Session(remote, on_conflict=policy)
    S['c']['n'] += 1
    forwarder.fail('drop_answer', when=is_bulk_docs, times=1)
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert isinstance(caught.value.failures['c'], couchdb.Forbidden)
    assert content(db, 'c') == {'n': 1}
    S['c']['n'] += 1
    S.flush()
    assert content(db, 'c') == {'n': 2} and not S.has_changes()


@pytest.mark.parametrize('policy', ['raise', delta])
def test_a_refusal_after_a_lost_answer_keeps_the_lost_write_in_mind(
        db, validated, remote, forwarder, policy):
    """A counter's write lands with its answer lost; the next write is
    refused (forbidden) by PouchDB Server before it looks at the revision;
    once the user takes the bad value out, the flush after finds the first
    write as the session's own: two counts, each once."""
    put(db, 'c', n=0)
    S = Session(remote, on_conflict=policy)
    S['c']['n'] += 1
    lose_the_answer(S, forwarder)
    S['c']['n'] += 1
    S['c']['forbidden'] = True
    with pytest.raises(FlushError):
        S.flush()
    del S['c']['forbidden']
    S.flush()
    assert content(db, 'c') == {'n': 2} and not S.has_changes()


@pytest.mark.parametrize('then', ['deleted', 'put again'])
def test_an_attachment_changed_after_its_lost_put_merges(db, remote,
                                                         forwarder, then):
    """A lost write carried an attachment put, which landed; another writer
    changes a field; the user deletes the attachment, or puts new content:
    'merge' takes the attachment as the session's own write, so the user's
    change of it is no conflict, and both changes are written."""
    put(db, 'c', n=0)
    S = Session(remote, on_conflict='merge')
    S.put_attachment(S['c'], b'\x00first', 'a.bin', 'application/x-a')
    lose_the_answer(S, forwarder)
    change(db, 'c', x='theirs')
    if then == 'deleted':
        S.delete_attachment(S['c'], 'a.bin')
    else:
        S.put_attachment(S['c'], b'\x00second', 'a.bin', 'application/x-a')
    S.flush()
    assert content(db, 'c').get('x') == 'theirs' and not S.has_changes()
    assert on_server(db, 'c', 'a.bin') == (None if then == 'deleted' else
                                           b'\x00second')


@pytest.mark.parametrize('value', ['oops', {'f.txt': None}, ['f.txt']])
def test_a_resolver_giving_bad_attachments_is_refused_not_crashed(
        db, value):
    """A resolve function's document with an ``_attachments`` that is no
    dict of stubs is that document's refusal, reported; the flush writes
    the others."""
    put(db, 'a', n=0)
    put(db, 'b', n=0)
    S = Session(db)
    S['a']['n'] = 1
    S['b']['n'] = 1
    change(db, 'a', n=5)
    with pytest.raises(FlushError) as caught:
        S.flush(on_conflict=lambda mine, theirs, base:
                dict(theirs, _attachments=value))
    assert set(caught.value.failures) == {'a'}
    assert content(db, 'b') == {'n': 1} and content(db, 'a') == {'n': 5}


def test_a_conflict_raised_over_a_lost_write_is_merged_from_that_write(
        db, remote, forwarder):
    """After the lost write is found under another writer's change, 'raise'
    reports only what the user changed since in conflict, and the
    document's base is that write from then on: a merge afterwards takes
    the other writer's count and the user's later change, and counts
    nothing twice."""
    put(db, 'a', n=0)
    S = Session(remote)
    S['a']['n'] += 1
    lose_the_answer(S, forwarder)
    landed = db['a'].rev
    change(db, 'a', n=2)
    S['a']['note'] = 'mine'
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert isinstance(caught.value.failures['a'], couchdb.ResourceConflict)
    assert (True, 'a', landed) in caught.value.results
    assert S.diff(S['a']) == [{'op': 'add', 'path': '/note',
                               'value': 'mine'}]
    S.flush(on_conflict='merge')
    assert content(db, 'a') == {'n': 2, 'note': 'mine'}
    assert not S.has_changes()


def test_a_create_whose_retry_meets_another_writers_document(
        db, remote, forwarder):
    """The answer of a create is lost and the retry meets a document
    another writer created: the server's history shows it is not the
    session's, so it is a plain conflict, and deleting the create
    afterwards leaves the other writer's document alone."""
    put(db, 'a', theirs=1)
    S = Session(remote)
    S['a'] = {'mine': 1}
    forwarder.fail('drop_answer', when=is_bulk_docs, times=1)
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert isinstance(caught.value.failures['a'], couchdb.ResourceConflict)
    del S['a']
    assert S.flush() == []
    assert content(db, 'a') == {'theirs': 1}


def test_deleting_a_lost_create_leaves_another_writers_document(
        db, remote, forwarder):
    """A create that never reached the server (the flush failed), another
    writer's create of the same id, then the session deletes its own: the
    other writer's document is not deleted."""
    S = Session(remote)
    S['a'] = {'mine': 1}
    forwarder.fail('cut_before', when=is_bulk_docs, times=2)
    with pytest.raises(OSError):
        S.flush()
    put(db, 'a', theirs=1)
    del S['a']
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert isinstance(caught.value.failures['a'], couchdb.ResourceNotFound)
    assert content(db, 'a') == {'theirs': 1}
    assert not S.has_changes()


def test_a_lost_write_under_a_deletion_is_known_not_to_have_landed(
        db, remote, forwarder):
    """A write cut before the server saw it (python-couchdb's retry then
    meets a conflict) of a document another writer deleted: the tombstone's
    history shows the write is not there, so once the user changes the
    document back there is nothing left to send."""
    put(db, 'a', v=0)
    S = Session(remote)
    S['a']['v'] = 1
    db.delete(db['a'])
    forwarder.fail('cut_before', when=is_bulk_docs, times=1)
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert isinstance(caught.value.failures['a'], couchdb.ResourceConflict)
    S['a']['v'] = 0
    assert not S.has_changes()
    forwarder.received.clear()
    assert S.flush() == [] and sum(forwarder.received.values()) == 0
    assert 'a' not in db


@pytest.mark.parametrize('policy', ['raise', 'merge', 'overwrite'])
def test_a_lost_write_changed_back_is_left_clean(db, remote, forwarder,
                                                  policy):
    """A write whose outcome is unknown is sent again even if the user
    changed the document back since (it may have landed); when the server's
    history shows it did not, there is nothing of the user's to write: no
    write, no conflict, the same document object, clean, for every
    policy, also when another writer deleted the document meanwhile."""
    put(db, 'a', v=0)
    S = Session(remote)
    doc = S['a']
    doc['v'] = 1
    forwarder.fail('cut_before', when=is_bulk_docs, times=2)
    with pytest.raises(OSError):
        S.flush()
    db.delete(db['a'])
    doc['v'] = 0
    assert S.has_changes()          # it may have landed: to be checked
    assert S.flush(on_conflict=policy) == []
    assert 'a' not in db and S['a'] is doc and doc == {'_id': 'a', '_rev':
                                                        doc['_rev'], 'v': 0}
    assert not S.has_changes() and S.flush() == []


def test_a_lost_create_deleted_and_created_again_writes_over_the_server(
        db, remote, forwarder):
    """A create whose answers were lost (the server held another writer's
    document of that id), then deleted and created again in the session:
    the re-creation writes over what the server holds, as a deletion by id
    and a create do; it is not dropped as a deletion would be."""
    put(db, 'a', theirs=1)
    S = Session(remote)
    S['a'] = {'mine': 1}
    forwarder.fail('drop_answer', when=is_bulk_docs, times=2)
    with pytest.raises(OSError):
        S.flush()
    del S['a']
    S['a'] = {'again': 1}
    S.flush()
    assert content(db, 'a') == {'again': 1}
    assert not S.has_changes() and S['a']['_rev'] == db['a'].rev


def test_deleting_a_missing_id_beside_a_lost_answer_writes_no_tombstone(
        db, remote, forwarder):
    """``del S[id]`` of an id the server never had, in a flush whose bulk
    answer is lost: reported missing once, and never sent, not even as a
    deletion of nothing."""
    put(db, 'b', v=0)
    S = Session(remote)
    del S['a']
    S['b']['v'] = 1
    lose_the_answer(S, forwarder)
    S.flush()
    [row] = db.view('_all_docs', keys=['a'])
    assert row.get('error') == 'not_found'      # no tombstone either
    assert content(db, 'b') == {'v': 1} and not S.has_changes()


def test_a_change_reverted_after_a_lost_answer_still_has_changes(
        db, remote, forwarder):
    """After a lost answer, reverting the change leaves work to do (the
    server may hold the change), and flush writes the revert."""
    put(db, 'a', v=0)
    S = Session(remote)
    S['a']['v'] = 1
    lose_the_answer(S, forwarder)
    S['a']['v'] = 0
    assert S.has_changes()
    S.flush()
    assert content(db, 'a') == {'v': 0} and not S.has_changes()


def test_post_flush_hook_sees_batches_written_before_a_failure(
        db, remote, forwarder):
    """A flush split into batches whose second batch fails on the
    connection: the post-flush hook has seen the first batch's documents."""
    seen = []
    S = Session(remote, post_flush_hook=lambda S, deleted, created, changed:
                seen.extend(doc['_id'] for doc in created))
    S.batch_size = 2
    for id in 'abcd':
        S.create({'_id': id})
    posts = itertools.count()

    def second_post(method, path):
        return is_bulk_docs(method, path) and next(posts) >= 1

    forwarder.fail('cut_before', when=second_post, times=2)
    with pytest.raises(OSError):
        S.flush()
    assert sorted(seen) == ['a', 'b'] == user_docs(db)
    S.flush()
    assert sorted(seen) == ['a', 'b', 'c', 'd'] == user_docs(db)


def hook_calls(calls, when):
    """A hook that records ``(when, deleted ids, created ids, changed
    (id, diff))`` in ``calls``."""
    def hook(session, deleted, created, changed):
        calls.append((when, [d['_id'] for d in deleted],
                      [d['_id'] for d in created],
                      [(d['_id'], diff) for d, diff in changed]))
    return hook


def test_hooks_see_a_document_whose_only_change_is_an_upload(db):
    """A large attachment alone is a change the hooks see, as a small one
    is."""
    put(db, 'a', x=1)
    calls = []
    S = Session(db, max_inline_attachment=4,
                pre_flush_hook=hook_calls(calls, 'pre'),
                post_flush_hook=hook_calls(calls, 'post'))
    S.put_attachment(S['a'], b'large content', 'f.bin')
    S.flush()
    assert calls == [('pre', [], [], [('a', [])]),
                     ('post', [], [], [('a', [])])]


def test_an_upload_to_a_document_deleted_on_the_server_is_a_conflict(db):
    """A large attachment for a document another writer deleted: a
    conflict (the server answers the PUT not_found), settled as any."""
    put(db, 'a', x=1)
    S = Session(db, max_inline_attachment=4)
    S.put_attachment(S['a'], b'large content', 'f.bin')
    db.delete(db['a'])
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert isinstance(caught.value.failures['a'], couchdb.ResourceConflict)
    S.flush(on_conflict='overwrite')
    assert on_server(db, 'a', 'f.bin') == b'large content'
    assert content(db, 'a')['x'] == 1


def test_a_body_written_before_a_conflicted_upload_is_reported(
        db, remote, forwarder):
    """The bulk write of a document succeeds and its upload then meets
    another writer's change: the results and the post-flush hook show the
    body write, and the failure stays pending for the next flush."""
    put(db, 'a', x=1)
    calls = []
    S = Session(remote, max_inline_attachment=4,
                post_flush_hook=hook_calls(calls, 'post'))
    doc = S['a']
    doc['x'] = 2
    S.put_attachment(doc, b'large content', 'f.bin')
    meddled = []

    def another_writer_first(method, path):
        if method == 'PUT' and not meddled:
            meddled.append(change(db, 'a', y='them'))
        return False                    # the PUT itself goes through

    forwarder.fail('pass', when=another_writer_first)
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert meddled and db['a']['x'] == 2 and db['a']['y'] == 'them'
    assert (True, 'a', doc['_rev']) in caught.value.results
    assert (False, 'a', caught.value.failures['a']) in caught.value.results
    assert calls == [('post', [], [],
                      [('a', [{'op': 'replace', 'path': '/x', 'value': 2,
                               'was': 1}])])]
    S.flush(on_conflict='merge')
    assert on_server(db, 'a', 'f.bin') == b'large content'
    assert content(db, 'a')['y'] == 'them'


@pytest.mark.parametrize('fault', ['drop_answer', 'cut_before'])
def test_pre_flush_hook_is_not_applied_twice_after_a_lost_answer(
        db, remote, forwarder, fault):
    """A pre-flush hook stamps a change; the flush fails on the connection:
    the retry sends the stamped document as it was, without stamping it
    again."""
    put(db, 'a', v=0)

    def stamp(session, deleted, created, changed):
        for doc, diff in changed:
            doc['changes'] = doc.get('changes', 0) + 1

    S = Session(remote, pre_flush_hook=stamp)
    S['a']['v'] = 1
    forwarder.fail(fault, when=is_bulk_docs, times=2)
    with pytest.raises(OSError):
        S.flush()
    S.flush()
    assert content(db, 'a') == {'v': 1, 'changes': 1}
    assert generation(db, 'a') == 2


@pytest.mark.parametrize('change_id', [
    lambda doc: doc.__setitem__('_id', 'other'),
    lambda doc: doc.__delitem__('_id'),
    lambda doc: doc.pop('_id'),
    lambda doc: doc.update({'_id': 'other', 'v': 2}),
], ids=['assign', 'del', 'pop', 'update'])
def test_the_id_of_a_tracked_document_cannot_change(db, wire, change_id):
    """A change of ``_id`` is refused at once, naming the document, and
    changes nothing."""
    put(db, 'a', v=1)
    S = Session(db)
    doc = S['a']
    with pytest.raises(ValueError, match="document 'a'"):
        change_id(doc)
    assert doc['_id'] == 'a' and doc['v'] == 1 and not S.has_changes()


def test_clear_keeps_id_and_rev_and_writes_no_stray(db):
    """``doc.clear()`` empties the document under its own id and revision:
    no random-id document is created."""
    put(db, 'a', v=1, w=2)
    S = Session(db)
    doc = S['a']
    rev = doc['_rev']
    doc.clear()
    assert dict(doc) == {'_id': 'a', '_rev': rev}
    doc.update(x=3)
    S.flush()
    assert user_docs(db) == ['a'] and content(db, 'a') == {'x': 3}
    assert doc['_id'] == 'a' and doc['_rev'] == db['a'].rev


def test_removing_items_while_iterating_acts_like_a_plain_list(db):
    """Iterating over a tracked list sees the removals made meanwhile, as a
    plain list's iterator does."""
    put(db, 'a', items=[1, 2, 2, 3, {'k': 1}, {'k': 1}])
    S = Session(db)
    tracked, plain = S['a']['items'], list(db['a']['items'])
    for items in (tracked, plain):
        for item in items:
            if item == 2 or item == {'k': 1}:
                items.remove(item)
    assert tracked == plain
    for items in (tracked, plain):
        for item in reversed(items):
            if item == 3:
                del items[:2]
    assert tracked == plain
    S.flush()
    assert db['a']['items'] == plain


def test_changing_a_dict_while_iterating_raises_like_a_plain_dict(db):
    """A tracked dict's views are live, as a plain dict's are."""
    put(db, 'a', d={'x': 1, 'y': {'z': 2}})
    tracked = Session(db)['a']['d']
    for view in (tracked.items, tracked.values, tracked.keys):
        with pytest.raises(RuntimeError):
            for _ in view():
                tracked['new %d' % len(tracked)] = 0


def test_a_whole_document_pickles_as_a_plain_document(db):
    """``pickle`` gives back a plain couchdb.Document equal to the tracked
    one."""
    import pickle
    put(db, 'a', v=1, nested={'l': [1, {'x': 2}]})
    doc = Session(db)['a']
    copied = pickle.loads(pickle.dumps(doc))
    assert type(copied) is couchdb.Document and copied == dict(doc)
    assert pickle.loads(pickle.dumps(doc['nested'])) == {'l': [1, {'x': 2}]}



def test_a_write_on_connections_the_server_closed_is_no_lost_answer(
        db, remote, forwarder):
    """The server closed the idle connections python-couchdb pooled (here
    the forwarder, switched off and on): the next write goes on a fresh
    one, so its 409 is answered, and another writer's identical edit is a
    conflict, not taken for the session's own write."""
    put(db, 'a')
    S = Session(remote)
    doc = S['a']
    forwarder.mode = 'refuse'           # closes every open connection
    forwarder.mode = 'pass'
    doc['v'] = 1
    change(db, 'a', v=1)
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert isinstance(caught.value.failures['a'], couchdb.ResourceConflict)
    assert S.has_changes()


def test_a_document_created_again_after_a_lost_write_has_none_of_its_attachments(
        db, remote, forwarder):
    """A write carrying an attachment loses its answer; the document is
    then deleted and created again with new content in the session: the
    new document has no attachment, so deleting one is not_found."""
    put(db, 'c')
    S = Session(remote)
    S.put_attachment(S['c'], b'one', 'f.bin')
    other = couchdb.Database(db.resource.url)
    other.put_attachment(other['c'], b'theirs', 'g.bin')
    forwarder.fail('drop_answer', when=is_bulk_docs, times=2)
    with pytest.raises(OSError):
        S.flush()
    del S['c']
    S['c'] = {'x': 1}
    with pytest.raises(couchdb.ResourceNotFound):
        S.delete_attachment(S['c'], 'f.bin')


def test_merge_writes_a_document_created_again_with_an_attachment_over_a_deletion(
        db):
    """Deleted in the session, created again with an attachment of its
    own, while another writer deleted it too: 'merge' has nothing of the
    server's to merge, and writes the new document with its attachment
    (found by the soak: it was refused as a clash)."""
    put(db, 'b')
    S = Session(db, on_conflict='merge')
    S.get_many(['a', 'b'])
    del S['b']
    other = couchdb.Database(db.resource.url)
    other.delete(other['b'])
    S['b'] = {'n': 1}
    S.put_attachment(S['b'], b'new', 'f.bin')
    S.flush()
    assert stored(db, 'b')['n'] == 1
    assert db.get_attachment('b', 'f.bin').read() == b'new'


def test_merge_with_a_deletion_of_an_attachment_put_back_as_it_was(db):
    """'merge': an attachment the session puts again with the content it
    has is no change of its own; another writer's deletion of the document
    stands, with no conflict."""
    S = Session(db)
    S['a'] = {'v': 1}
    S.put_attachment(S['a'], b'same', 'f.bin', 'application/octet-stream')
    S.flush()
    S.put_attachment(S['a'], b'same', 'f.bin', 'application/octet-stream')
    db.delete(db['a'])
    S.flush(on_conflict='merge')
    assert 'a' not in db and not S.has_changes()


# -- Attachments --------------------------------------------------------------
#
# `put_attachment` and `delete_attachment` are queued until `flush()`; small
# attachments travel inline (base64) in the ``_bulk_docs`` request of their
# document, large ones are uploaded after it with a ``PUT`` each. The server's
# state is always checked with plain python-couchdb on the `db` fixture.
# `wire` and `put` are those at the top of the file; `VALIDATE`, `validated`,
# `change`, `generation`, `forwarder`, `remote` and `forwarded` those of the
# failures section.

#: Every byte value, both ways round.
ALL_BYTES = bytes(range(256)) + bytes(reversed(range(256)))

#: 5 MiB of incompressible content, for uploads that must stream.
BIG = random.Random(5).randbytes(5 * 1024 * 1024)

#: A small inline limit for tests that want cheap "large" attachments.
LIMIT = 100
SMALL = b'small content ' * 3               # 42 bytes: inline under LIMIT
LARGE = ALL_BYTES * 2                       # 1024 bytes: PUT under LIMIT
SIZES = {'small': SMALL, 'large': LARGE}

_MISSING = object()


# -- Attachments: fixtures and helpers ----------------------------------------

def put_with_attachments(db, id, attachments, **content):
    """Write a document with attachments straight to the server, with plain
    python-couchdb (one PUT per attachment)."""
    doc = put(db, id, **content)
    for filename, data in attachments.items():
        db.put_attachment(doc, data, filename)
    return db[id]


def fields(db, id):
    """The server's document without ``_id``, ``_rev`` and ``_attachments``."""
    return dict((k, v) for k, v in db[id].items()
                if k not in ('_id', '_rev', '_attachments'))


def stubs(db, id):
    """The server's attachment stubs of ``id``: ``{filename: stub}``."""
    return dict(db[id].get('_attachments') or {})


def on_server(db, id, filename):
    """An attachment's content read with plain python-couchdb (which gives
    ``None`` for an empty body), or ``None`` if there is no such attachment."""
    data = db.get_attachment(id, filename, _MISSING)
    if data is _MISSING:
        return None
    return b'' if data is None else data.read()


def read_back(db, id, filename):
    """An attachment's content read by a new Session and by plain
    python-couchdb; they must agree."""
    fresh = Session(db).get_attachment(id, filename, _MISSING)
    assert fresh is not _MISSING, 'a new session finds no %r' % filename
    content = fresh.read()
    assert on_server(db, id, filename) == content
    return content


def guessed_type(filename):
    """The content type python-couchdb's put_attachment guesses."""
    return ';'.join(filter(None, mimetypes.guess_type(filename)))


def assert_stub(stub, content, content_type):
    assert stub.get('content_type') == content_type
    assert stub.get('length') == len(content)
    assert 'data' not in stub


# -- Attachments: round trips -------------------------------------------------

def test_text_content_round_trips_as_utf8(db):
    """A str attachment is stored as its UTF-8 bytes, typed from the name."""
    text = 'Grüße, 世界 ✓\nline two\n'
    S = Session(db)
    doc_id = S.create({'type': 'note'})
    S.put_attachment(doc_id, text, 'note.txt')
    S.flush()
    assert read_back(db, doc_id, 'note.txt') == text.encode('utf-8')
    assert_stub(stubs(db, doc_id)['note.txt'], text.encode('utf-8'),
                'text/plain')


def test_binary_content_with_every_byte_value_round_trips(db):
    """Bytes with all 256 values come back exactly."""
    S = Session(db)
    doc_id = S.create({})
    S.put_attachment(doc_id, ALL_BYTES, 'all.bin', 'application/x-test')
    S.flush()
    assert read_back(db, doc_id, 'all.bin') == ALL_BYTES
    assert_stub(stubs(db, doc_id)['all.bin'], ALL_BYTES, 'application/x-test')


def test_empty_content_reads_back_as_empty_not_missing(db):
    """An empty attachment exists, with length 0, and reads as b''."""
    S = Session(db)
    doc_id = S.create({})
    S.put_attachment(doc_id, b'', 'empty.txt')
    S.flush()
    assert read_back(db, doc_id, 'empty.txt') == b''
    assert_stub(stubs(db, doc_id)['empty.txt'], b'', 'text/plain')


def test_five_megabytes_from_bytesio_round_trip(db):
    """A 5 MB io.BytesIO is uploaded and reads back byte for byte."""
    S = Session(db)
    doc_id = S.create({})
    S.put_attachment(doc_id, io.BytesIO(BIG), 'big.bin')
    S.flush()
    assert read_back(db, doc_id, 'big.bin') == BIG
    assert_stub(stubs(db, doc_id)['big.bin'], BIG, guessed_type('big.bin'))


def test_five_megabytes_from_a_real_file_round_trip(db, tmp_path):
    """A 5 MB real file opened 'rb' round-trips under its own name."""
    path = tmp_path / 'archive.tar'
    path.write_bytes(BIG)
    S = Session(db)
    doc_id = S.create({})
    with open(str(path), 'rb') as content:
        S.put_attachment(doc_id, content)
        S.flush()
    assert read_back(db, doc_id, 'archive.tar') == BIG
    assert_stub(stubs(db, doc_id)['archive.tar'], BIG,
                guessed_type('archive.tar'))


def test_file_content_is_read_from_where_the_file_stood(db):
    """A file-like object positioned past its start gives the rest only."""
    content = io.BytesIO(b'HEADER' + ALL_BYTES)
    content.read(6)
    S = Session(db)
    doc_id = S.create({})
    S.put_attachment(doc_id, content, 'rest.bin')
    S.flush()
    assert read_back(db, doc_id, 'rest.bin') == ALL_BYTES


ODD_NAMES = ['résumé ✓.txt', '日本語.bin', 'with spaces in it.txt',
             'dir/sub dir/file.txt']


@pytest.mark.parametrize('size', sorted(SIZES))
@pytest.mark.parametrize('filename', ODD_NAMES)
def test_unicode_spaces_and_slashes_in_filenames_round_trip(db, filename,
                                                            size):
    """Odd filenames work both inline and as an uploaded attachment."""
    content = SIZES[size]
    S = Session(db, max_inline_attachment=LIMIT)
    doc_id = S.create({})
    S.put_attachment(doc_id, content, filename)
    S.flush()
    assert sorted(stubs(db, doc_id)) == [filename]
    assert read_back(db, doc_id, filename) == content
    assert S[doc_id]['_attachments'][filename]['length'] == len(content)


@pytest.mark.parametrize('filename', ['a.txt', 'a.json', 'a.tar.gz',
                                      'a.png'])
def test_content_type_is_guessed_from_the_filename(db, filename):
    """Without content_type, the type is guessed as python-couchdb does."""
    S = Session(db)
    doc_id = S.create({})
    S.put_attachment(doc_id, b'x', filename)
    S.flush()
    assert stubs(db, doc_id)[filename]['content_type'] == \
        guessed_type(filename)


def test_text_stream_round_trips_as_utf8(db):
    """A text file-like object (io.StringIO) is stored as UTF-8."""
    S = Session(db)
    doc_id = S.create({})
    S.put_attachment(doc_id, io.StringIO('ünïcode'), 'u.txt')
    S.flush()
    assert read_back(db, doc_id, 'u.txt') == 'ünïcode'.encode('utf-8')


class Stream(object):
    """A file-like object that can only be read, once, in pieces."""

    def __init__(self, data):
        self._data = io.BytesIO(data)

    def read(self, size=-1):
        return self._data.read(min(size, 4096) if size and size > 0
                               else 4096)


def test_non_seekable_stream_is_kept_until_flush(db):
    """A stream that cannot seek is kept whole until the flush uploads it."""
    S = Session(db, max_inline_attachment=LIMIT)
    doc_id = S.create({})
    S.put_attachment(doc_id, Stream(BIG), 'big.bin')
    assert S.get_attachment(doc_id, 'big.bin').read() == BIG
    S.flush()
    assert read_back(db, doc_id, 'big.bin') == BIG


def test_put_attachment_on_a_document_deleted_here_raises(db):
    """ResourceNotFound at the call; nothing queued for the attachment."""
    put(db, 'a')
    S = Session(db)
    del S['a']
    with pytest.raises(couchdb.ResourceNotFound):
        S.put_attachment('a', b'x', 'x.txt')


def test_put_attachment_without_filename_needs_a_named_file(db):
    """Bytes without a filename are refused at the call (ValueError)."""
    S = Session(db)
    doc_id = S.create({})
    with pytest.raises(ValueError):
        S.put_attachment(doc_id, b'data')


# -- Attachments: requests ----------------------------------------------------

def test_put_and_delete_attachment_send_nothing_before_flush(db, wire):
    """Both are queued: no request until flush."""
    put_with_attachments(db, 'a', {'old.txt': b'old'})
    S = Session(db)
    doc = S['a']
    wire.clear()
    S.put_attachment(doc, b'new', 'new.txt')
    S.put_attachment(doc, io.BytesIO(BIG), 'big.bin')
    S.delete_attachment(doc, 'old.txt')
    assert wire.calls() == []
    assert sorted(stubs(db, 'a')) == ['old.txt']


def test_new_document_with_two_small_attachments_is_one_bulk_request(db,
                                                                     wire):
    """A new document and two small attachments: one base64 bulk request."""
    S = Session(db)
    doc_id = S.create({'_id': 'n', 'v': 1})
    S.put_attachment(doc_id, b'first', 'one.txt')
    S.put_attachment(doc_id, ALL_BYTES, 'two.bin', 'application/x-test')
    wire.clear()
    S.flush()
    assert wire.calls() == [('POST', '_bulk_docs')]
    [sent] = wire.bulk_bodies()[0]['docs']
    assert sent['_attachments'] == {
        'one.txt': {'content_type': 'text/plain',
                    'data': base64.b64encode(b'first').decode('ascii')},
        'two.bin': {'content_type': 'application/x-test',
                    'data': base64.b64encode(ALL_BYTES).decode('ascii')}}
    assert generation(db, 'n') == 1 and fields(db, 'n') == {'v': 1}
    assert on_server(db, 'n', 'one.txt') == b'first'
    assert on_server(db, 'n', 'two.bin') == ALL_BYTES


def test_session_document_holds_the_new_rev_and_stubs_after_flush(db):
    """After flush the session's document has the final _rev and stubs."""
    S = Session(db, max_inline_attachment=LIMIT)
    doc_id = S.create({})
    S.put_attachment(doc_id, SMALL, 'small.txt')
    S.put_attachment(doc_id, LARGE, 'large.bin')
    S.flush()
    doc = S[doc_id]
    assert doc['_rev'] == db[doc_id].rev
    assert sorted(doc['_attachments']) == ['large.bin', 'small.txt']
    assert_stub(doc['_attachments']['small.txt'], SMALL, 'text/plain')
    assert_stub(doc['_attachments']['large.bin'], LARGE,
                guessed_type('large.bin'))
    assert S.dirty == [] and S.new == [] and not S.has_changes()


def test_large_attachment_is_the_bulk_request_plus_one_streamed_put(db, wire):
    """A 5 MB attachment: the bulk request, then one streamed PUT."""
    S = Session(db)
    doc_id = S.create({'_id': 'n', 'v': 1})
    content = io.BytesIO(BIG)
    S.put_attachment(doc_id, content, 'big.bin')
    wire.clear()
    S.flush()
    assert wire.calls() == [('POST', '_bulk_docs'), ('PUT', 'n/big.bin')]
    [sent] = wire.bulk_bodies()[0]['docs']
    assert '_attachments' not in sent
    [(_, body)] = wire.puts()
    assert body is content                  # streamed, not read into memory
    assert generation(db, 'n') == 2
    assert S['n']['_rev'] == db['n'].rev
    assert_stub(S['n']['_attachments']['big.bin'], BIG,
                guessed_type('big.bin'))
    assert on_server(db, 'n', 'big.bin') == BIG


def test_small_and_large_attachments_together(db, wire):
    """Small ones ride in the bulk request, each large one gets a PUT."""
    S = Session(db, max_inline_attachment=LIMIT)
    doc_id = S.create({'_id': 'n'})
    S.put_attachment(doc_id, SMALL, 'a.txt')
    S.put_attachment(doc_id, LARGE, 'b.bin')
    S.put_attachment(doc_id, LARGE[::-1], 'c.bin')
    wire.clear()
    S.flush()
    assert sorted(wire.calls()) == [('POST', '_bulk_docs'),
                                    ('PUT', 'n/b.bin'), ('PUT', 'n/c.bin')]
    assert wire.calls()[0] == ('POST', '_bulk_docs')
    [sent] = wire.bulk_bodies()[0]['docs']
    assert sorted(sent['_attachments']) == ['a.txt']
    assert generation(db, 'n') == 3
    assert S['n']['_rev'] == db['n'].rev
    assert on_server(db, 'n', 'a.txt') == SMALL
    assert on_server(db, 'n', 'b.bin') == LARGE
    assert on_server(db, 'n', 'c.bin') == LARGE[::-1]


def test_inline_limit_is_inclusive(db, wire):
    """max_inline_attachment bytes go inline; one byte more is a PUT."""
    S = Session(db, max_inline_attachment=LIMIT)
    doc_id = S.create({'_id': 'n'})
    S.put_attachment(doc_id, b'x' * LIMIT, 'at.bin')
    S.put_attachment(doc_id, b'y' * (LIMIT + 1), 'over.bin')
    wire.clear()
    S.flush()
    assert wire.calls() == [('POST', '_bulk_docs'), ('PUT', 'n/over.bin')]
    [sent] = wire.bulk_bodies()[0]['docs']
    assert sorted(sent['_attachments']) == ['at.bin']


def test_default_inline_limit_is_64_kib(db, wire):
    """By default 64 KiB go inline and 64 KiB + 1 byte are uploaded."""
    S = Session(db)
    doc_id = S.create({'_id': 'n'})
    S.put_attachment(doc_id, b'x' * 65536, 'at.bin')
    S.put_attachment(doc_id, b'y' * 65537, 'over.bin')
    wire.clear()
    S.flush()
    assert wire.calls() == [('POST', '_bulk_docs'), ('PUT', 'n/over.bin')]
    assert on_server(db, 'n', 'at.bin') == b'x' * 65536
    assert on_server(db, 'n', 'over.bin') == b'y' * 65537


def test_large_attachment_alone_on_a_fetched_document_is_one_put(db, wire):
    """Nothing else to write: the flush is the PUT only."""
    put(db, 'a', v=0)
    S = Session(db, max_inline_attachment=LIMIT)
    S.put_attachment(S['a'], LARGE, 'big.bin')
    wire.clear()
    S.flush()
    assert wire.calls() == [('PUT', 'a/big.bin')]
    assert S['a']['_rev'] == db['a'].rev and generation(db, 'a') == 2
    assert on_server(db, 'a', 'big.bin') == LARGE and fields(db, 'a') == {
        'v': 0}


def test_put_attachment_by_id_fetches_the_document_once(db, wire):
    """An id the session does not hold is fetched (one GET), then queued."""
    put(db, 'a', v=0)
    S = Session(db)
    wire.clear()
    S.put_attachment('a', b'hello', 'hello.txt')
    assert wire.calls() == [('GET', 'a')]
    wire.clear()
    S.flush()
    assert wire.calls() == [('POST', '_bulk_docs')]
    assert on_server(db, 'a', 'hello.txt') == b'hello'


def test_editing_a_field_sends_stubs_only_and_keeps_the_attachments(db,
                                                                   wire):
    """Changing a field sends stubs, never data; the attachments stay."""
    put_with_attachments(db, 'a', {'one.txt': b'one', 'two.bin': ALL_BYTES},
                         v=0)
    S = Session(db)
    S['a']['v'] = 1
    wire.clear()
    S.flush()
    assert wire.calls() == [('POST', '_bulk_docs')]
    [sent] = wire.bulk_bodies()[0]['docs']
    assert sorted(sent['_attachments']) == ['one.txt', 'two.bin']
    for stub in sent['_attachments'].values():
        assert stub.get('stub') is True and 'data' not in stub
    assert fields(db, 'a') == {'v': 1}
    assert on_server(db, 'a', 'one.txt') == b'one'
    assert on_server(db, 'a', 'two.bin') == ALL_BYTES


def test_editing_after_flushing_attachments_sends_stubs_only(db, wire):
    """A change after flushing attachments in the same session keeps them."""
    S = Session(db, max_inline_attachment=LIMIT)
    doc_id = S.create({'_id': 'n', 'v': 0})
    S.put_attachment(doc_id, SMALL, 'small.txt')
    S.put_attachment(doc_id, LARGE, 'large.bin')
    S.flush()
    S['n']['v'] = 1
    wire.clear()
    S.flush()
    assert wire.calls() == [('POST', '_bulk_docs')]
    [sent] = wire.bulk_bodies()[0]['docs']
    assert sorted(sent['_attachments']) == ['large.bin', 'small.txt']
    for stub in sent['_attachments'].values():
        assert 'data' not in stub
    assert fields(db, 'n') == {'v': 1}
    assert on_server(db, 'n', 'small.txt') == SMALL
    assert on_server(db, 'n', 'large.bin') == LARGE


def test_deleting_an_attachment_flushed_in_the_same_session(db, wire):
    """An attachment flushed earlier in the session can be deleted later."""
    S = Session(db)
    doc_id = S.create({'_id': 'n'})
    S.put_attachment(doc_id, b'a', 'a.txt')
    S.put_attachment(doc_id, b'b', 'b.txt')
    S.flush()
    S.delete_attachment(doc_id, 'a.txt')
    S.flush()
    assert sorted(stubs(db, 'n')) == ['b.txt']
    assert on_server(db, 'n', 'b.txt') == b'b'


def test_adding_an_attachment_keeps_the_existing_ones(db, wire):
    """A new small attachment goes inline; existing ones go as stubs."""
    put_with_attachments(db, 'a', {'old.txt': b'old'})
    S = Session(db)
    S.put_attachment(S['a'], b'new', 'new.txt')
    wire.clear()
    S.flush()
    [sent] = wire.bulk_bodies()[0]['docs']
    assert 'data' not in sent['_attachments']['old.txt']
    assert 'data' in sent['_attachments']['new.txt']
    assert on_server(db, 'a', 'old.txt') == b'old'
    assert on_server(db, 'a', 'new.txt') == b'new'


def test_replacing_an_attachment_writes_the_new_content(db):
    """Putting an existing filename again replaces its content and type."""
    put_with_attachments(db, 'a', {'f.txt': b'old'})
    S = Session(db)
    S.put_attachment(S['a'], b'{"new": 1}', 'f.txt', 'application/json')
    S.flush()
    assert read_back(db, 'a', 'f.txt') == b'{"new": 1}'
    assert_stub(stubs(db, 'a')['f.txt'], b'{"new": 1}', 'application/json')


# -- Attachments: deleting ----------------------------------------------------

def test_put_then_delete_before_flush_sends_nothing(db, wire):
    """A put taken back before flush, nothing else changed: no request."""
    put(db, 'a', v=0)
    S = Session(db, max_inline_attachment=LIMIT)
    doc = S['a']
    S.put_attachment(doc, SMALL, 'small.txt')
    S.put_attachment(doc, LARGE, 'large.bin')
    S.delete_attachment(doc, 'small.txt')
    S.delete_attachment(doc, 'large.bin')
    wire.clear()
    assert S.flush() == []
    assert wire.calls() == []
    assert stubs(db, 'a') == {} and generation(db, 'a') == 1


def test_put_then_delete_leaves_has_changes_false(db):
    """has_changes() is False and dirty empty once a put is taken back."""
    put(db, 'a', v=0)
    S = Session(db)
    doc = S['a']
    S.put_attachment(doc, b'x', 'x.txt')
    S.delete_attachment(doc, 'x.txt')
    assert not S.has_changes()
    assert S.dirty == []


def test_put_then_delete_on_a_changed_document_sends_only_the_change(db,
                                                                     wire):
    """The field change is written; the attachment taken back is not."""
    put(db, 'a', v=0)
    S = Session(db, max_inline_attachment=LIMIT)
    doc = S['a']
    doc['v'] = 1
    S.put_attachment(doc, SMALL, 'small.txt')
    S.put_attachment(doc, LARGE, 'large.bin')
    S.delete_attachment(doc, 'small.txt')
    S.delete_attachment(doc, 'large.bin')
    wire.clear()
    S.flush()
    assert wire.calls() == [('POST', '_bulk_docs')]
    [sent] = wire.bulk_bodies()[0]['docs']
    assert not sent.get('_attachments')
    assert fields(db, 'a') == {'v': 1} and stubs(db, 'a') == {}


def test_put_then_delete_on_a_new_document_creates_it_without(db, wire):
    """A new document keeps only the attachments not taken back."""
    S = Session(db)
    doc_id = S.create({'_id': 'n'})
    S.put_attachment(doc_id, b'keep', 'keep.txt')
    S.put_attachment(doc_id, b'drop', 'drop.txt')
    S.delete_attachment(doc_id, 'drop.txt')
    wire.clear()
    S.flush()
    [sent] = wire.bulk_bodies()[0]['docs']
    assert sorted(sent['_attachments']) == ['keep.txt']
    assert sorted(stubs(db, 'n')) == ['keep.txt']


def test_deleting_a_missing_attachment_raises_at_the_call(db, wire):
    """ResourceNotFound at the call, naming document and filename."""
    put_with_attachments(db, 'a', {'there.txt': b'x'})
    S = Session(db)
    doc = S['a']
    with pytest.raises(couchdb.ResourceNotFound) as caught:
        S.delete_attachment(doc, 'nope.txt')
    message = str(caught.value)
    assert "'a'" in message and 'nope.txt' in message
    wire.clear()
    assert S.flush() == [] and wire.calls() == []
    assert sorted(stubs(db, 'a')) == ['there.txt']


def test_deleting_from_a_new_document_without_it_raises(db):
    """A document created in the session has no attachment but those put."""
    S = Session(db)
    doc_id = S.create({'_id': 'n'})
    with pytest.raises(couchdb.ResourceNotFound) as caught:
        S.delete_attachment(doc_id, 'nope.txt')
    assert "'n'" in str(caught.value) and 'nope.txt' in str(caught.value)


def test_deleting_an_attachment_twice_raises(db):
    """The second delete finds nothing left to delete."""
    put_with_attachments(db, 'a', {'f.txt': b'x'})
    S = Session(db)
    S.delete_attachment(S['a'], 'f.txt')
    with pytest.raises(couchdb.ResourceNotFound):
        S.delete_attachment(S['a'], 'f.txt')


def test_deleting_an_existing_attachment_removes_only_that_one(db, wire):
    """One bulk request; the other attachment goes as a stub and stays."""
    put_with_attachments(db, 'a', {'gone.txt': b'gone', 'kept.bin': ALL_BYTES},
                         v=0)
    S = Session(db)
    doc = S['a']
    S.delete_attachment(doc, 'gone.txt')
    wire.clear()
    S.flush()
    assert wire.calls() == [('POST', '_bulk_docs')]
    [sent] = wire.bulk_bodies()[0]['docs']
    assert sorted(sent['_attachments']) == ['kept.bin']
    assert 'data' not in sent['_attachments']['kept.bin']
    assert sorted(stubs(db, 'a')) == ['kept.bin']
    assert on_server(db, 'a', 'kept.bin') == ALL_BYTES
    assert fields(db, 'a') == {'v': 0}
    assert sorted(doc['_attachments']) == ['kept.bin']
    assert doc['_rev'] == db['a'].rev


def test_deleting_the_last_attachment(db):
    """The document stays, without attachments, here and on the server."""
    put_with_attachments(db, 'a', {'only.txt': b'x'}, v=0)
    S = Session(db)
    S.delete_attachment(S['a'], 'only.txt')
    S.flush()
    assert stubs(db, 'a') == {} and fields(db, 'a') == {'v': 0}
    assert not S['a'].get('_attachments')
    assert Session(db).get_attachment('a', 'only.txt') is None


def test_delete_and_put_again_replaces_the_content(db):
    """Delete then put of the same name writes the new content."""
    put_with_attachments(db, 'a', {'f.txt': b'old'})
    S = Session(db)
    S.delete_attachment(S['a'], 'f.txt')
    S.put_attachment(S['a'], b'new', 'f.txt')
    S.flush()
    assert read_back(db, 'a', 'f.txt') == b'new'


# -- Attachments: reading -----------------------------------------------------

def test_get_attachment_serves_a_pending_put_without_a_request(db, wire):
    """Pending puts (small, large, file) are served with no request."""
    put(db, 'a')
    S = Session(db, max_inline_attachment=LIMIT)
    doc = S['a']
    new_id = S.create({})
    S.put_attachment(doc, SMALL, 'small.txt')
    S.put_attachment(doc, LARGE, 'large.bin')
    S.put_attachment(new_id, io.BytesIO(ALL_BYTES), 'file.bin')
    wire.clear()
    assert S.get_attachment(doc, 'small.txt').read() == SMALL
    assert S.get_attachment('a', 'large.bin').read() == LARGE
    assert S.get_attachment(new_id, 'file.bin').read() == ALL_BYTES
    assert S.get_attachment(new_id, 'file.bin').read() == ALL_BYTES
    assert wire.calls() == []


def test_get_attachment_serves_the_pending_replacement_not_the_server(db,
                                                                     wire):
    """A put over an existing attachment is what the session reads."""
    put_with_attachments(db, 'a', {'f.txt': b'server'})
    S = Session(db)
    S.put_attachment(S['a'], b'session', 'f.txt')
    wire.clear()
    assert S.get_attachment('a', 'f.txt').read() == b'session'
    assert wire.calls() == []


def test_get_attachment_gives_default_for_one_deleted_in_the_session(db,
                                                                    wire):
    """No request; the default."""
    put_with_attachments(db, 'a', {'f.txt': b'x'})
    S = Session(db)
    S.delete_attachment(S['a'], 'f.txt')
    wire.clear()
    assert S.get_attachment('a', 'f.txt') is None
    assert S.get_attachment('a', 'f.txt', default=_MISSING) is _MISSING
    assert wire.calls() == []


def test_get_attachment_gives_default_for_a_document_deleted_here(db):
    """A document deleted in the session has no attachments."""
    put_with_attachments(db, 'a', {'f.txt': b'x'})
    S = Session(db)
    del S['a']
    assert S.get_attachment('a', 'f.txt', _MISSING) is _MISSING


def test_get_attachment_fetches_from_the_server_otherwise(db, wire):
    """One GET of the attachment; a missing one gives the default."""
    put_with_attachments(db, 'a', {'f.bin': ALL_BYTES, 'empty.txt': b''})
    S = Session(db)
    wire.clear()
    assert S.get_attachment('a', 'f.bin').read() == ALL_BYTES
    assert wire.calls() == [('GET', 'a/f.bin')]
    assert S.get_attachment(S['a'], 'empty.txt').read() == b''
    assert S.get_attachment('a', 'nope', _MISSING) is _MISSING
    assert S.get_attachment('nodoc', 'nope', _MISSING) is _MISSING


def test_get_attachment_after_flush_reads_the_server(db, wire):
    """Once flushed, the attachment is no longer held by the session."""
    S = Session(db)
    doc_id = S.create({'_id': 'n'})
    S.put_attachment(doc_id, b'content', 'f.txt')
    S.flush()
    wire.clear()
    assert S.get_attachment(doc_id, 'f.txt').read() == b'content'
    assert wire.calls() == [('GET', 'n/f.txt')]


# -- Attachments: conflicts ---------------------------------------------------
@pytest.mark.parametrize('theirs', ['replaced', 'deleted'])
@pytest.mark.parametrize('held', ['written by the session', 'read'])
def test_merge_putting_back_the_same_attachment_takes_theirs(db, held,
                                                             theirs):
    """'merge': the session puts back the content an attachment had when it
    wrote or read it, while another writer replaced or deleted it: no
    change on the session's side, so the other writer's stands, as for a
    field; no conflict."""
    S = Session(db)
    if held == 'read':
        put_with_attachments(db, 'a', {'f.bin': b'one'}, v=1)
        S['a']
    else:
        S['a'] = {'v': 1}
        S.put_attachment(S['a'], b'one', 'f.bin')
        S.flush()
    if theirs == 'replaced':
        db.put_attachment(db['a'], b'theirs', 'f.bin')
    else:
        db.delete_attachment(db['a'], 'f.bin')
    S.put_attachment(S['a'], b'one', 'f.bin')
    S.flush(on_conflict='merge')
    assert on_server(db, 'a', 'f.bin') == (
        b'theirs' if theirs == 'replaced' else None)
    assert not S.has_changes() and S['a']['_rev'] == db['a'].rev
    assert sorted(S['a'].get('_attachments') or {}) == (
        ['f.bin'] if theirs == 'replaced' else [])


def test_merge_writes_an_attachment_put_again_after_its_deletion(db):
    """'merge': the session wrote an attachment, deleted it, and puts the
    same content again, while another writer changed a field: the put is
    the session's change (the base has no attachment), and is written
    beside the other writer's change."""
    db['d'] = {'x': 0}
    S = Session(db)
    doc = S['d']
    S.put_attachment(doc, b'hello', 'f.txt', 'text/plain')
    S.flush()
    S.delete_attachment(doc, 'f.txt')
    S.flush()
    S.put_attachment(doc, b'hello', 'f.txt', 'text/plain')
    change(db, 'd', x='theirs')
    S.flush(on_conflict='merge')
    assert fields(db, 'd') == {'x': 'theirs'}
    assert on_server(db, 'd', 'f.txt') == b'hello'
    assert generation(db, 'd') == 5 and not S.has_changes()


EDITS = ['field and attachment', 'attachment only']


def conflicted(db, size, edit):
    """A session whose document 'a' has a pending attachment (and, for
    'field and attachment', a changed field) and whose flush with 'raise'
    met another writer's change: it checks what the FlushError leaves."""
    put_with_attachments(db, 'a', {'old.txt': b'old'}, v=0)
    S = Session(db, max_inline_attachment=LIMIT)
    doc = S['a']
    if edit == 'field and attachment':
        doc['mine'] = 1
    S.put_attachment(doc, SIZES[size], 'f.bin')
    change(db, 'a', theirs=1)
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert isinstance(caught.value.failures['a'], couchdb.ResourceConflict)
    assert on_server(db, 'a', 'f.bin') is None
    return S


@pytest.mark.parametrize('edit', EDITS)
@pytest.mark.parametrize('size', sorted(SIZES))
def test_conflict_with_raise_keeps_the_attachment_pending(db, wire, size,
                                                          edit):
    """'raise': FlushError; the attachment stays pending and readable."""
    S = conflicted(db, size, edit)
    wire.clear()
    assert S.get_attachment('a', 'f.bin').read() == SIZES[size]
    assert wire.calls() == []
    assert S.has_changes()


@pytest.mark.parametrize('edit', EDITS)
@pytest.mark.parametrize('size', sorted(SIZES))
def test_merge_after_a_conflict_writes_the_attachment_with_their_change(
        db, size, edit):
    """'merge' writes the attachment beside the other writer's change."""
    S = conflicted(db, size, edit)
    S.flush(on_conflict='merge')
    expected = {'v': 0, 'theirs': 1}
    if edit == 'field and attachment':
        expected['mine'] = 1
    assert fields(db, 'a') == expected
    assert on_server(db, 'a', 'f.bin') == SIZES[size]
    assert on_server(db, 'a', 'old.txt') == b'old'
    assert S['a']['_rev'] == db['a'].rev
    assert sorted(S['a']['_attachments']) == ['f.bin', 'old.txt']
    assert not S.has_changes()


@pytest.mark.parametrize('edit', EDITS)
@pytest.mark.parametrize('size', sorted(SIZES))
def test_overwrite_after_a_conflict_writes_the_attachment(db, size, edit):
    """'overwrite' writes the session's version with the attachment."""
    S = conflicted(db, size, edit)
    S.flush(on_conflict='overwrite')
    expected = {'v': 0}
    if edit == 'field and attachment':
        expected['mine'] = 1
    assert fields(db, 'a') == expected
    assert on_server(db, 'a', 'f.bin') == SIZES[size]
    assert on_server(db, 'a', 'old.txt') == b'old'
    assert S['a']['_rev'] == db['a'].rev


@pytest.mark.parametrize('size', sorted(SIZES))
def test_resolver_function_keeps_the_attachment(db, size):
    """A resolver function's document gets the session's attachment."""
    seen = []

    def resolve(mine, theirs, base):
        seen.append((mine, theirs, base))
        return dict(theirs, mine=mine['mine'])

    S = conflicted(db, size, 'field and attachment')
    S.flush(on_conflict=resolve)
    assert len(seen) == 1
    assert fields(db, 'a') == {'v': 0, 'mine': 1, 'theirs': 1}
    assert on_server(db, 'a', 'f.bin') == SIZES[size]
    assert on_server(db, 'a', 'old.txt') == b'old'
    assert S['a']['_rev'] == db['a'].rev


def test_merge_keeps_a_pending_attachment_deletion(db):
    """'merge' keeps a pending attachment deletion and their change."""
    put_with_attachments(db, 'a', {'gone.txt': b'x', 'kept.txt': b'y'}, v=0)
    S = Session(db)
    S.delete_attachment(S['a'], 'gone.txt')
    change(db, 'a', theirs=1)
    S.flush(on_conflict='merge')
    assert fields(db, 'a') == {'v': 0, 'theirs': 1}
    assert sorted(stubs(db, 'a')) == ['kept.txt']
    assert on_server(db, 'a', 'kept.txt') == b'y'


def test_merge_session_keeps_their_new_attachment_and_adds_its_own(db):
    """'merge' keeps the other writer's new attachment and adds ours."""
    put(db, 'a', v=0)
    S = Session(db, on_conflict='merge')
    S['a']['v'] = 1
    S.put_attachment(S['a'], b'mine', 'mine.txt')
    theirs = db['a']
    db.put_attachment(theirs, b'theirs', 'theirs.txt')
    S.flush()
    assert fields(db, 'a') == {'v': 1}
    assert on_server(db, 'a', 'mine.txt') == b'mine'
    assert on_server(db, 'a', 'theirs.txt') == b'theirs'


def test_another_writers_attachment_of_the_same_size_is_not_taken_for_ours(
        db):
    """A large upload that conflicts with another writer's attachment of the
    same name, size and type is reported, not counted as uploaded."""
    put(db, 'd', v=1)
    S = Session(db, max_inline_attachment=4)
    S.put_attachment(S['d'], b'MINE-MINE', 'f.bin')
    other = db['d']
    db.put_attachment(other, b'THEIRS-XX', 'f.bin', 'application/octet-stream')
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert isinstance(caught.value.failures['d'], couchdb.ResourceConflict)
    assert S.get_attachment('d', 'f.bin').read() == b'MINE-MINE'
    # Both sides replaced f.bin: 'merge' reports it, 'overwrite' writes ours.
    with pytest.raises(FlushError) as caught:
        S.flush(on_conflict='merge')
    assert "attachment 'f.bin'" in str(caught.value.failures['d'])
    assert db.get_attachment('d', 'f.bin').read() == b'THEIRS-XX'
    S.flush(on_conflict='overwrite')
    assert db.get_attachment('d', 'f.bin').read() == b'MINE-MINE'


# -- Attachments: documents the server refuses --------------------------------

@pytest.mark.parametrize('size', sorted(SIZES))
def test_refused_document_keeps_its_attachment_for_the_retry(db, validated,
                                                             wire, size):
    """A refused document keeps its attachment pending for the retry."""
    S = Session(db, max_inline_attachment=LIMIT)
    doc_id = S.create({'_id': 'n', 'forbidden': True})
    S.put_attachment(doc_id, SIZES[size], 'f.bin')
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert isinstance(caught.value.failures['n'], couchdb.Forbidden)
    assert 'n' not in db
    assert S.get_attachment(doc_id, 'f.bin').read() == SIZES[size]
    del S[doc_id]['forbidden']
    S.flush()
    assert fields(db, 'n') == {}
    assert read_back(db, 'n', 'f.bin') == SIZES[size]
    assert generation(db, 'n') == (1 if size == 'small' else 2)
    assert S['n']['_rev'] == db['n'].rev


@pytest.mark.parametrize('size', sorted(SIZES))
def test_refused_attachment_on_a_document_the_server_refuses(db, size):
    """A refused attachment-only write is a FlushError and stays pending."""
    put(db, 'a', forbidden=True)
    db['_design/validate'] = {'validate_doc_update': VALIDATE}
    S = Session(db, max_inline_attachment=LIMIT)
    doc = S['a']
    S.put_attachment(doc, SIZES[size], 'f.bin')
    try:
        with pytest.raises(FlushError) as caught:
            S.flush()
        assert isinstance(caught.value.failures['a'], couchdb.Forbidden)
    finally:
        assert stubs(db, 'a') == {}
        assert S.get_attachment('a', 'f.bin').read() == SIZES[size]
        del doc['forbidden']
        S.flush()
        assert fields(db, 'a') == {}
        assert on_server(db, 'a', 'f.bin') == SIZES[size]


# -- Attachments: broken connections ------------------------------------------
def test_a_lost_answer_is_not_taken_for_another_writers_attachment(
        db, forwarder, remote):
    """The answer of a write carrying an attachment is lost; another writer
    had put an attachment of that name with other content of the same
    length: the digests differ, so the server's version is not the
    session's own write, and 'raise' reports the conflict."""
    put(db, 'a', v=0)
    S = Session(remote)
    S.put_attachment(S['a'], b'one', 'g.bin', TYPE)
    db.put_attachment(db['a'], b'two', 'g.bin', TYPE)
    forwarder.fail('drop_answer', when=is_bulk_docs, times=1)
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert isinstance(caught.value.failures['a'], couchdb.ResourceConflict)
    assert on_server(db, 'a', 'g.bin') == b'two'
    assert S.get_attachment('a', 'g.bin').read() == b'one'



def is_put(method, path):
    """A predicate for `Forwarder.fail`: any PUT (an attachment upload)."""
    return method == 'PUT'


def start_upload_work(S, file_like=False):
    """A new document 'n' with a small and a large pending attachment."""
    S.create({'_id': 'n', 'v': 1})
    S.put_attachment('n', SMALL, 'small.txt')
    S.put_attachment('n', io.BytesIO(LARGE) if file_like else LARGE,
                     'large.bin')


def assert_uploads_done_once(db, S):
    """The document and both attachments are on the server, written once:
    one bulk revision and one upload revision."""
    assert fields(db, 'n') == {'v': 1}
    assert on_server(db, 'n', 'small.txt') == SMALL
    assert on_server(db, 'n', 'large.bin') == LARGE
    assert sorted(stubs(db, 'n')) == ['large.bin', 'small.txt']
    assert generation(db, 'n') == 2
    assert S['n']['_rev'] == db['n'].rev
    assert sorted(S['n']['_attachments']) == ['large.bin', 'small.txt']
    assert not S.has_changes()


def test_refused_connection_keeps_pending_attachments(db, remote, forwarder):
    """Connection refused: the next flush writes everything once."""
    S = Session(remote, max_inline_attachment=LIMIT)
    start_upload_work(S)
    forwarder.mode = 'refuse'
    with pytest.raises(ConnectionRefusedError):
        S.flush()
    assert 'n' not in db
    assert S.get_attachment('n', 'large.bin').read() == LARGE
    forwarder.mode = 'pass'
    S.flush()
    assert_uploads_done_once(db, S)


@pytest.mark.parametrize('times', [1, 2])
def test_dropped_answer_of_the_bulk_request_writes_attachments_once(
        db, remote, forwarder, times):
    """Bulk answer lost once or twice: each attachment written once."""
    S = Session(remote, max_inline_attachment=LIMIT)
    start_upload_work(S)
    forwarder.fail('drop_answer', when=is_bulk_docs, times=times)
    if times == 2:
        with pytest.raises(OSError):
            S.flush()
        assert on_server(db, 'n', 'small.txt') == SMALL
    S.flush()
    assert forwarder.pending_rules == 0
    assert_uploads_done_once(db, S)
    assert forwarded(forwarder, 'PUT', '/large.bin') == 1


@pytest.mark.parametrize('file_like', [False, True])
@pytest.mark.parametrize('times', [1, 2])
def test_dropped_answer_of_the_upload_writes_it_once(db, remote, forwarder,
                                                     times, file_like):
    """PUT answer lost once or twice: the attachment is written once."""
    S = Session(remote, max_inline_attachment=LIMIT)
    start_upload_work(S, file_like)
    forwarder.fail('drop_answer', when=is_put, times=times)
    if times == 2:
        with pytest.raises(OSError):
            S.flush()
        assert on_server(db, 'n', 'large.bin') == LARGE
    S.flush()
    assert forwarder.pending_rules == 0
    assert_uploads_done_once(db, S)


@pytest.mark.parametrize('file_like', [False, True])
def test_upload_cut_before_the_server_is_retried_with_all_content(
        db, remote, forwarder, file_like):
    """python-couchdb's retry of a cut PUT uploads the whole content."""
    S = Session(remote, max_inline_attachment=LIMIT)
    start_upload_work(S, file_like)
    forwarder.fail('cut_before', when=is_put, times=1)
    S.flush()
    assert forwarder.pending_rules == 0
    assert_uploads_done_once(db, S)


@pytest.mark.parametrize('file_like', [False, True])
def test_upload_cut_twice_raises_and_the_next_flush_uploads(
        db, remote, forwarder, file_like):
    """A PUT that never arrives raises; the next flush uploads it."""
    S = Session(remote, max_inline_attachment=LIMIT)
    start_upload_work(S, file_like)
    forwarder.fail('cut_before', when=is_put, times=2)
    with pytest.raises(OSError):
        S.flush()
    assert on_server(db, 'n', 'large.bin') is None
    assert S.get_attachment('n', 'large.bin').read() == LARGE
    S.flush()
    assert_uploads_done_once(db, S)


# -- What CouchDB refuses in a whole request ---------------------------------
#
# CouchDB 3 refuses a whole ``_bulk_docs`` (400, 413; PouchDB Server: some as
# 500) for one document it cannot take, and writes none of the others. The
# session refuses such documents itself, alone, before sending; what it cannot
# know locally it finds by splitting the request. Answers only CouchDB gives
# come from the forwarder's 'reply' action: the request never reaches the
# server, as none of it is written on CouchDB.

def bulk_docs_holding(id, status, error, reason):
    """A forwarder reply: refuse any ``_bulk_docs`` holding document ``id``
    as a whole, with ``status`` and ``{error, reason}``."""
    def reply(body):
        ids = [doc.get('_id') for doc in (body or {}).get('docs', ())]
        if id in ids:
            return status, {'error': error, 'reason': reason}
        return None
    return reply


def refused_alone(S, db, wire, bad, field):
    """Flush ``S``, where document ``bad`` breaks a rule of the server's and
    'good' is new: ``bad`` is refused, reported naming ``field``, not sent,
    and still pending; 'good' is written. The refusal."""
    wire.clear()
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert list(caught.value.failures) == [bad]
    refusal = caught.value.failures[bad]
    assert isinstance(refusal, couchdb.ServerError)
    reason = refusal.args[0][1]
    assert repr(bad) in reason and field in reason
    assert wire.bulk_ids() == [['good']]
    assert content(db, 'good') == {'v': 1}
    assert S.has_changes() and S.new == [S[bad]]
    return refusal


@pytest.mark.parametrize('member', ['_private', '_secret_', '_'])
def test_an_unknown_special_member_is_refused_alone(db, wire, member):
    """A top-level member starting with "_" that CouchDB does not know
    (400 doc_validation there, 500 on PouchDB Server, for the whole
    request) is refused before sending; the other documents are written;
    removing the member writes it."""
    S = Session(db)
    S['bad'] = {member: 1, 'v': 1}
    S['good'] = {'v': 1}
    refusal = refused_alone(S, db, wire, 'bad', member)
    assert refusal.args[0][0] == 'doc_validation'
    assert 'bad' not in db
    del S['bad'][member]
    S.flush()
    assert content(db, 'bad') == {'v': 1} and not S.has_changes()


def test_the_special_members_couchdb_knows_are_sent(db, wire):
    """_id, _rev, _attachments and _deleted are no reason to refuse."""
    put(db, 'a', v=0)
    S = Session(db)
    S['a']['v'] = 1
    S.create({'_id': 'n', '_attachments': {}, 'v': 1})
    S.flush()
    assert content(db, 'a') == {'v': 1} and content(db, 'n')['v'] == 1


def test_members_the_server_took_are_sent_again(db, wire):
    """A top-level "_" member the server's version holds already is the
    server's own, not the user's to be refused for: a _local/ document
    PouchDB Server stored with one is written when its top changes, as
    when a change is below it. (CouchDB refuses such a document when it
    is first written: there is nothing to test.)"""
    try:
        db.save({'_id': '_local/x', '_kept': 1, 'v': 0, 'inner': {'v': 0}})
    except couchdb.ServerError:
        pytest.skip('the server refuses the member when it is written')
    S = Session(db)
    S['_local/x']['v'] = 1
    S['_local/x']['inner']['v'] = 1
    S['_local/x']['_added'] = 1
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert list(caught.value.failures) == ['_local/x']
    assert "'_added'" in caught.value.failures['_local/x'].args[0][1]
    assert wire.bulk_ids() == []
    del S['_local/x']['_added']
    S.flush()
    assert wire.bulk_ids() == [['_local/x']]
    assert content(db, '_local/x') == {'_kept': 1, 'v': 1,
                                       'inner': {'v': 1}}
    assert not S.has_changes()


@pytest.mark.parametrize('bad', ['', '_design/', '_local/', '_secret',
                                 '_users_x'])
def test_an_id_couchdb_refuses_is_refused_alone(db, wire, bad):
    """An _id CouchDB refuses (illegal_docid: empty, the bare _design/ and
    _local/, any other starting with "_") is refused before sending; the
    others are written; it stays pending."""
    S = Session(db)
    S[bad] = {'v': 1}
    S['good'] = {'v': 1}
    refusal = refused_alone(S, db, wire, bad, '_id')
    assert refusal.args[0][0] == 'illegal_docid'
    assert user_docs(db) == ['good']
    del S[bad]
    assert not S.has_changes()


def test_design_and_local_ids_with_a_name_are_written(db):
    S = Session(db)
    S['_design/d'] = {'v': 1}
    S['_local/l'] = {'v': 1}
    S.flush()
    assert db['_design/d']['v'] == 1 and db['_local/l']['v'] == 1


@pytest.mark.parametrize('size', sorted(SIZES))
def test_an_attachment_name_starting_with_underscore_is_refused_alone(
        db, wire, size):
    """An attachment named "_..." (400 bad_request for the whole request on
    both servers) is refused before sending, inline or uploaded; the
    document keeps it pending; renamed, it is written."""
    S = Session(db, max_inline_attachment=LIMIT)
    S['bad'] = {'v': 1}
    S.put_attachment(S['bad'], SIZES[size], '_secret.bin')
    S['good'] = {'v': 1}
    refusal = refused_alone(S, db, wire, 'bad', '_secret.bin')
    assert refusal.args[0][0] == 'bad_request'
    assert wire.puts() == [] and 'bad' not in db
    assert S.get_attachment('bad', '_secret.bin').read() == SIZES[size]
    S.delete_attachment(S['bad'], '_secret.bin')
    S.put_attachment(S['bad'], SIZES[size], 'secret.bin')
    S.flush()
    assert read_back(db, 'bad', 'secret.bin') == SIZES[size]


def test_an_attachment_named_in_the_document_itself_is_checked(db, wire):
    """Attachments written straight into ``_attachments`` are checked too."""
    S = Session(db)
    S['bad'] = {'v': 1, '_attachments': {'_x': {
        'content_type': 'text/plain', 'data': 'aGk='}}}
    S['good'] = {'v': 1}
    refused_alone(S, db, wire, 'bad', '_x')


def test_a_document_over_max_document_size_is_refused_alone(db, wire):
    """A document whose JSON (attachments left out) is larger than
    max_document_size is refused before sending, naming its size and the
    limit; attachments do not count; None turns the check off."""
    S = Session(db, max_document_size=1000)
    S['bad'] = {'text': 'x' * 1000}
    S['inline'] = {'v': 1}
    S.put_attachment(S['inline'], b'y' * 3000, 'big.bin')
    S['good'] = {'v': 1}
    wire.clear()
    with pytest.raises(FlushError) as caught:
        S.flush()
    refusal = caught.value.failures['bad']
    assert list(caught.value.failures) == ['bad']
    assert refusal.args[0][0] == 'document_too_large'
    assert '1000' in refusal.args[0][1] and "'bad'" in refusal.args[0][1]
    assert sorted(wire.bulk_ids()[0]) == ['good', 'inline']
    assert read_back(db, 'inline', 'big.bin') == b'y' * 3000
    assert 'bad' not in db and S.new == [S['bad']]
    S.max_document_size = None
    S.flush()
    assert content(db, 'bad') == {'text': 'x' * 1000}


def test_the_default_max_document_size_is_couchdbs(db, wire):
    """By default the limit is CouchDB 3's, 8,000,000 bytes."""
    S = Session(db)
    S['bad'] = {'text': 'x' * 8000000}
    S['fits'] = {'text': 'x' * 7999900}
    wire.clear()
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert list(caught.value.failures) == ['bad']
    assert '8000000' in str(caught.value.failures['bad'])
    assert wire.bulk_ids() == [['fits']] and 'bad' not in db


def test_a_change_over_the_limit_is_refused_and_stays_pending(db):
    """A fetched document changed past the limit keeps its change."""
    put(db, 'a', v=0)
    S = Session(db, max_document_size=500)
    S['a']['text'] = 'x' * 600
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert list(caught.value.failures) == ['a']
    assert content(db, 'a') == {'v': 0} and S.dirty == [S['a']]
    S['a']['text'] = 'short'
    S.flush()
    assert content(db, 'a') == {'v': 0, 'text': 'short'}


@pytest.mark.parametrize('where, path', [
    (lambda text: {'name': text}, '/name'),
    (lambda text: {'x': [1, {'deep': text}]}, '/x/1/deep'),
    (lambda text: {text: 1}, 'key'),
])
def test_a_lone_surrogate_is_a_value_error_before_anything_is_sent(
        db, wire, where, path):
    """A string holding a lone surrogate (os.fsdecode of bytes that are not
    UTF-8) is a ValueError naming the document and the path, raised before
    any request; everything stays pending."""
    text = os.fsdecode(b'caf\xe9')
    S = Session(db)
    S['good'] = {'v': 1}
    S['bad'] = where(text)
    wire.clear()
    with pytest.raises(ValueError) as caught:
        S.flush()
    message = str(caught.value)
    assert "document 'bad'" in message and 'surrogate' in message
    assert path in message
    assert wire == [] and user_docs(db) == []
    assert sorted(doc['_id'] for doc in S.new) == ['bad', 'good']
    S.expunge('bad')
    S.flush()
    assert user_docs(db) == ['good']


def test_a_lone_surrogate_put_into_a_fetched_document(db, wire):
    put(db, 'a', v=0)
    S = Session(db)
    S['a']['tags'] = ['ok', os.fsdecode(b'\xff')]
    wire.clear()
    with pytest.raises(ValueError, match="document 'a'.*/tags/1"):
        S.flush()
    assert wire == [] and S.dirty == [S['a']]


def test_a_resolver_returning_a_lone_surrogate_fails_that_document(db):
    """After the first request, a resolver's bad string fails only its
    document."""
    put(db, 'a', v=0)
    put(db, 'b', v=0)
    S = Session(db)
    S['a']['v'] = 1
    S['b']['v'] = 1
    change(db, 'a', v=2)
    with pytest.raises(FlushError) as caught:
        S.flush(on_conflict=lambda mine, theirs, base: dict(
            theirs, name=os.fsdecode(b'\xff')))
    assert list(caught.value.failures) == ['a']
    assert isinstance(caught.value.failures['a'], ValueError)
    assert content(db, 'b') == {'v': 1} and content(db, 'a') == {'v': 2}


# When the server refuses a whole request anyway.

def test_a_whole_request_refused_for_one_document_is_split(db, wire):
    """A document only the server can judge (an invalid _rev: 400
    bad_request "Invalid rev format" for the whole request, on CouchDB and
    PouchDB Server) is found by splitting the request in halves: every
    other document is written, it is reported with the server's error and
    reason and stays pending, in a few requests."""
    S = Session(db)
    for n in range(8):
        S['d%d' % n] = {'v': n}
    S.save({'_id': 'bad', '_rev': 'not-a-rev', 'v': 1})
    wire.clear()
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert list(caught.value.failures) == ['bad']
    refusal = caught.value.failures['bad']
    assert isinstance(refusal, couchdb.ServerError)
    assert refusal.args[0][0] == 'bad_request'
    assert wire.calls() == [('POST', '_bulk_docs')] * len(wire)
    assert 2 <= len(wire) <= 1 + 2 * 4
    assert user_docs(db) == ['d%d' % n for n in range(8)]
    assert S.dirty == [S['bad']] and S.new == []
    written = [id for ids in wire.bulk_ids() for id in ids]
    assert sorted(set(written)) == sorted(['bad'] + user_docs(db))


def test_a_refused_request_names_the_document_too_large(
        db, forwarder, remote):
    """CouchDB's 413 document_too_large (a server configured below the
    session's max_document_size) names the document: it is refused with
    one more request, the others are written."""
    forwarder.fail('reply', when=is_bulk_docs, reply=bulk_docs_holding(
        'big', 413, 'document_too_large', 'big'))
    S = Session(remote)
    for id in ('a', 'big', 'c'):
        S[id] = {'v': 1}
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert caught.value.failures['big'].args[0] == (
        'document_too_large', 'big')
    assert list(caught.value.failures) == ['big']
    assert user_docs(db) == ['a', 'c'] and bulk_posts(forwarder) == 1
    assert forwarder.received['POST', '/%s/_bulk_docs' % db.name] == 2


@pytest.mark.parametrize('status', [400, 500])
def test_a_validation_refusal_of_a_whole_request_is_split(
        db, forwarder, remote, status):
    """CouchDB's 400 doc_validation for the whole request, or PouchDB
    Server's 500 with the same error, is about one document: found by
    splitting, the others written."""
    forwarder.fail('reply', when=is_bulk_docs, reply=bulk_docs_holding(
        'bad', status, 'doc_validation', 'Bad special document member: _x'))
    S = Session(remote)
    for id in ('a', 'b', 'bad', 'c', 'd'):
        S[id] = {'v': 1}
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert caught.value.failures['bad'].args[0] == (
        'doc_validation', 'Bad special document member: _x')
    assert user_docs(db) == ['a', 'b', 'c', 'd']
    assert S.new == [S['bad']]


def test_a_failing_server_is_no_reason_to_split(db, forwarder, remote):
    """A 500 that is not about a document (an unhealthy cluster) is raised
    as python-couchdb raises it, with nothing lost and no more requests."""
    forwarder.fail('reply', when=is_bulk_docs, times=1, reply=lambda body: (
        500, {'error': 'unknown_error', 'reason': 'function_clause'}))
    S = Session(remote)
    S['a'] = {'v': 1}
    S['b'] = {'v': 1}
    with pytest.raises(couchdb.ServerError):
        S.flush()
    assert forwarder.received['POST', '/%s/_bulk_docs' % db.name] == 1
    assert user_docs(db) == [] and len(S.new) == 2
    S.flush()
    assert user_docs(db) == ['a', 'b']


@pytest.mark.parametrize('status, error', [
    (401, 'unauthorized'), (403, 'forbidden'), (404, 'not_found')])
def test_a_refusal_not_about_a_document_raises_as_before(
        db, forwarder, remote, status, error):
    """401, 403 and a missing database refuse the whole request for a reason
    no document holds: raised at once, nothing lost."""
    forwarder.fail('reply', when=is_bulk_docs, times=1, reply=lambda body: (
        status, {'error': error, 'reason': 'no'}))
    S = Session(remote)
    S['a'] = {'v': 1}
    S['b'] = {'v': 1}
    with pytest.raises(couchdb.HTTPError):
        S.flush()
    assert forwarder.received['POST', '/%s/_bulk_docs' % db.name] == 1
    assert len(S.new) == 2
    S.flush()
    assert user_docs(db) == ['a', 'b']


def test_splitting_stops_after_max_split_requests(db, forwarder, remote):
    """Past max_split_requests, the documents of a refused batch are
    reported as not sent (and stay pending): a bounded number of
    requests."""
    forwarder.fail('reply', when=is_bulk_docs, reply=bulk_docs_holding(
        'd5', 400, 'bad_request', 'no'))
    S = Session(remote)
    S.max_split_requests = 2
    for n in range(8):
        S['d%d' % n] = {'v': n}
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert forwarder.received['POST', '/%s/_bulk_docs' % db.name] == 3
    failures = caught.value.failures
    assert sorted(failures) == ['d4', 'd5', 'd6', 'd7']
    assert 'gave up' in failures['d4'].args[0][1]
    assert user_docs(db) == ['d0', 'd1', 'd2', 'd3']
    assert len(S.new) == 4


def test_attachment_names_and_types_that_cannot_be_sent_fail_at_the_call(
        db, wire):
    """A filename with a lone surrogate (it cannot go in a URL or in JSON)
    and a content type that is not ASCII (it cannot go in a header) are a
    ValueError at put_attachment, naming the document; nothing is queued."""
    put(db, 'a', v=0)
    S = Session(db)
    doc = S['a']
    wire.clear()
    with pytest.raises(ValueError, match="document 'a'"):
        S.put_attachment(doc, b'x' * 70000, os.fsdecode(b'caf\xe9.bin'))
    with pytest.raises(ValueError, match="content type"):
        S.put_attachment(doc, b'x', 'f.txt', 'text/plain; charset=\u20ac')
    assert not S.has_changes() and wire == []


def test_max_document_size_is_measured_as_couchdb_measures_it(db, wire):
    """CouchDB counts a document's body without _id and _rev, its strings
    unescaped and each float as a few bytes: documents whose JSON is over
    the limit but whose measure is not are written."""
    S = Session(db, max_document_size=1000)
    S['lines'] = {'text': 'line\n' * 190}         # JSON 1,152 bytes
    S['floats'] = {'f': [0.1234567891234] * 100}  # JSON about 1,600
    S['x' * 1200] = {}                           # the id does not count
    S['over'] = {'text': 'y' * 999}
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert list(caught.value.failures) == ['over']
    assert 'max_document_size (1000)' in caught.value.failures['over'].args[
        0][1]
    assert sorted(user_docs(db)) == sorted(['floats', 'lines', 'x' * 1200])


def test_bad_value_from_a_post_flush_hook_is_reported_with_the_rest(db):
    """A bad value in a document a post-flush hook creates, after the first
    request was written, fails only that document, in the FlushError that
    also reports the first round's refusal; it says it was not sent."""
    def audit(S, deleted, created, changed):
        if not any(doc['_id'] == 'log' for doc in created):
            S['log'] = {'by': os.fsdecode(b'caf\xe9'), 'seen': {1}}

    S = Session(db, post_flush_hook=audit)
    S['a'] = {'v': 1}
    S['_bad'] = {}
    with pytest.raises(FlushError) as caught:
        S.flush()
    failures = caught.value.failures
    assert sorted(failures) == ['_bad', 'log']
    assert isinstance(failures['log'], TypeError)
    assert 'It was not sent' in str(failures['log'])
    assert 'Nothing was sent' not in str(failures['log'])
    assert user_docs(db) == ['a']
    assert sorted(doc['_id'] for doc in S.new) == ['_bad', 'log']


def test_update_checks_every_document_before_queuing_any(db):
    """S.update() queues nothing when any item is bad."""
    put(db, 'held', v=0)
    S = Session(db)
    S['held']
    for bad in ([{'_id': 'first'}, {'_id': 'second'}, {'_id': 5}],
                [{'_id': 'first'}, 'not a dict'],
                [{'_id': 'first'}, {'_id': 'first', 'v': 2}],
                [{'_id': 'first'}, {'_id': 'held'}]):
        with pytest.raises((TypeError, couchdb.ResourceConflict)):
            S.update(bad)
        assert not S.has_changes() and S.new == []
    assert S.update([{'_id': 'first'}, {'_id': 'held', '_rev': S['held'].rev,
                                        'v': 1}]) == ['first', 'held']
    S.flush()
    assert content(db, 'held') == {'v': 1} and 'first' in db


@pytest.mark.parametrize('bad', [
    {'_private': 1}, {'name': os.fsdecode(b'\xff')}, {'set': {1}},
    {'text': 'x' * 2000}])
def test_a_refused_resolution_leaves_the_users_document_as_it_was(db, bad):
    """A resolve function's document the server would refuse (or JSON
    cannot carry) fails that document, and leaves the user's version, on
    the revision it had: the conflict comes back at the next flush."""
    put(db, 'a', v=0)
    S = Session(db, max_document_size=1000)
    doc = S['a']
    rev = doc['_rev']
    doc['v'] = 'mine'
    change(db, 'a', v='theirs')
    with pytest.raises(FlushError) as caught:
        S.flush(on_conflict=lambda mine, theirs, base: dict(theirs, **bad))
    assert list(caught.value.failures) == ['a']
    assert doc == {'_id': 'a', '_rev': rev, 'v': 'mine'}
    assert content(db, 'a') == {'v': 'theirs'}
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert isinstance(caught.value.failures['a'], couchdb.ResourceConflict)


@pytest.mark.parametrize('option, value', [
    ('max_document_size', '8000000'), ('max_document_size', -1),
    ('max_inline_attachment', '64k'), ('max_inline_attachment', None)])
def test_bad_size_options_are_refused_at_construction(db, option, value):
    with pytest.raises(ValueError, match=option):
        Session(db, **{option: value})


# -- The write quorum of a cluster -------------------------------------------
#
# A CouchDB cluster that cannot confirm a write on ``w`` nodes answers 202 with
# ``"accepted": true`` per row; the forwarder's 'rewrite' action turns PouchDB
# Server's real 201 into that answer (`quorum_not_met`).

def test_documents_only_accepted_are_named_in_the_results(
        db, forwarder, remote):
    """flush() returns python-couchdb's rows, and `accepted`: the ids the
    server only accepted; a later write that meets the quorum leaves them
    out."""
    put(db, 'a', v=0)
    S = Session(remote)
    S['a']['v'] = 1
    S['n'] = {'v': 1}
    forwarder.fail('rewrite', when=is_bulk_docs, times=1,
                   rewrite=quorum_not_met)
    results = S.flush()
    assert sorted((ok, id) for ok, id, _ in results) == [
        (True, 'a'), (True, 'n')]
    assert results.accepted == {'a', 'n'}
    assert all(rev == db[id].rev for _, id, rev in results)
    assert not S.has_changes()
    S['a']['v'] = 2
    results = S.flush()
    assert results.accepted == set() and content(db, 'a') == {'v': 2}
    assert S.flush().accepted == set()


def test_flush_error_results_carry_accepted(db, validated, forwarder,
                                            remote):
    S = Session(remote)
    S['ok'] = {'v': 1}
    S['no'] = {'forbidden': True}
    forwarder.fail('rewrite', when=is_bulk_docs, times=1,
                   rewrite=quorum_not_met)
    with pytest.raises(FlushError) as caught:
        S.flush()
    assert caught.value.results.accepted == {'ok'}
    assert list(caught.value.failures) == ['no']


def test_an_upload_only_accepted_is_named(db, forwarder, remote):
    put(db, 'a', v=0)
    S = Session(remote, max_inline_attachment=LIMIT)
    S.put_attachment(S['a'], LARGE, 'big.bin')
    forwarder.fail('rewrite', when=lambda method, path: method == 'PUT',
                   times=1, rewrite=lambda status, body: (202, body))
    results = S.flush()
    assert results.accepted == {'a'}
    assert read_back(db, 'a', 'big.bin') == LARGE


def test_w_is_sent_with_every_write(db, monkeypatch):
    """Session(db, w=N) and flush(w=N) ask for that write quorum: ``?w=N``
    on _bulk_docs and on uploads."""
    urls = []
    request = couchdb.http.Session.request

    def recording(self, method, url, *args, **kwargs):
        urls.append((method, url))
        return request(self, method, url, *args, **kwargs)

    monkeypatch.setattr(couchdb.http.Session, 'request', recording)
    S = Session(db, w=2, max_inline_attachment=LIMIT)
    S['a'] = {'v': 1}
    S.put_attachment(S['a'], LARGE, 'big.bin')
    S.flush()
    writes = [url for method, url in urls if method in ('POST', 'PUT')]
    assert len(writes) == 2
    assert all(parse_qs(urlsplit(url).query).get('w') == ['2']
               for url in writes)
    del urls[:]
    S['a']['v'] = 2
    S.flush(w=3)
    [url] = [url for method, url in urls if method == 'POST']
    assert parse_qs(urlsplit(url).query)['w'] == ['3']
    del urls[:]
    S['a']['v'] = 3
    S.flush(w=None)
    [url] = [url for method, url in urls if method == 'POST']
    assert parse_qs(urlsplit(url).query)['w'] == ['2']
    assert content(db, 'a')['v'] == 3


@pytest.mark.parametrize('bad', [0, -1, '2', 1.5, True])
def test_a_bad_w_is_refused_at_the_call(db, bad):
    with pytest.raises(ValueError, match='w'):
        Session(db, w=bad)
    S = Session(db)
    S['a'] = {}
    with pytest.raises(ValueError, match='w'):
        S.flush(w=bad)
    assert S.new == [S['a']] and 'a' not in db


# -- Stateful model -----------------------------------------------------------
#
# One example is one user's session on a fresh database, seen through a
# `tools.forwarder.Forwarder`, next to a concurrent writer (plain
# python-couchdb on a direct connection). The rules read documents and keep
# references to them and to their children at any depth, edit through any
# kept reference (also one kept across earlier flushes), store plain values
# and edit through the user's own reference to them, create, delete and
# re-create documents, put and delete attachments, let the writer edit,
# delete and re-create the same documents, and flush with every
# ``on_conflict``, also through a broken connection.
#
# The model is plain data, of what the USER intends:
#
# - `Model.server`: {id: `Version`}: what the server holds (a deleted
#   document is a version with ``body`` None), changed by the writer and by
#   what the model expects of each flush;
# - `Model.held`: {id: `Held`}: what the session holds: the session's document
#   and a plain *mirror* of it that undergoes the same edits, the version it
#   is based on (`base`), its attachments and the attachment changes pending;
# - `Model.refs`: the kept references, each a pair of the session's object
#   (a tracked proxy, or the user's plain value) and the mirror's object at
#   the same place: edits go to both, so Python's aliasing rules (an edit
#   through a child taken out of the document no longer changes the
#   document) come for free;
# - `Model.unsure`: after a flush broken by a connection failure, the ids
#   whose write may have reached the server, and `Model.landed`, those the
#   model saw reach it (the model reads the server; the session cannot).
#
# After every step the invariants compare the server with `Model.server`
# (contents, attachments, revision generations, no stray ids), the session's
# documents and kept references with the mirrors, `S.diff()` with the
# mirror's changes since its base, and `S.has_changes()` with the pending
# work. A flush is checked against the outcomes the model allows for each
# document (`Outcome`): what the server holds after it, whether it is in
# `FlushError.failures` (and as which exception), whether the resolver
# function was called for it, and what becomes of the kept references.
#
# The rules for the edge cases (written down here, and in the report):
#
# 1. 'raise': a document the session changed and the server moved since the
#    session's base is a conflict, always: also when the writer wrote the very
#    value the session holds (two sessions adding 1 to one counter), and a
#    resolver function is called for it. Exceptions: the writer and the
#    session both deleted it (either outcome is allowed: a conflict, or done),
#    and the session's own write whose answer was lost (never a conflict).
# 2. The merge base of a document created (or re-created) in the session is
#    ABSENT, which three_way treats as the empty document where both sides
#    have one (README: "the empty document for one created ... in the
#    session") and lets a create win over a deletion on the other side.
# 3. Attachments merge name by name like dict keys (ABSENT for a missing
#    one): both sides changing one attachment differently is a conflict.
# 4. 'overwrite' (and a resolver returning the session's version) writes the
#    session's stubs: an attachment the session never changed keeps, per
#    name, the content the session read or the writer's later one (servers
#    differ: CouchDB keeps the current data for a stub, PouchDB Server looks
#    it up by digest); a stub the server can no longer serve may also make
#    the server refuse the document (reported in FlushError, not as a
#    conflict).
# 5. Generations: a write is exactly one new revision plus one per upload
#    of an attachment larger than `max_inline_attachment`; when the server
#    already holds the resolved document, zero or one; a document written by
#    a flush broken by a connection failure may get up to two more at the
#    flush that settles it.
# 6. After a flush broken by a connection failure each document the flush
#    would write is on the server as before, or as that flush would have
#    left it (or, with a large upload, with the bulk write done and the
#    upload not); `S.has_changes()` must be True as long as the server
#    differs from what the user intends; the next flush without a fault
#    must recognise what reached the server as its own (no conflict, for
#    a later deletion or re-creation too) and write the rest. The writer
#    does not touch such documents until then (the base of a merge would be
#    ambiguous), and faults are only tried with 'raise' and one at a time.
#    Since python-couchdb retries a failed request by itself, and a request
#    cut before the server saw it looks to the session like one whose answer
#    was lost, a server version equal to what a faulted (or the previous,
#    broken) flush sent may be taken for the session's own write even if the
#    writer wrote it: the session cannot tell. A document a broken flush
#    sent and the user changed back since may be sent again (and meet a
#    conflict if the server moved before the broken flush). So may an older
#    revision under another writer's change: a document a faulted flush
#    reports in conflict, whose server history holds what it sent, stays
#    unsure until a flush settles it.
# 7. A plain dict or list stored into a document belongs to the document,
#    as with plain Python dicts: edits through the user's reference to it
#    are the document's (written by the next flush, shown by `S.diff()`).
#    This is the brief's intended semantics; the README and
#    test_values_put_in_are_tracked_from_then_on described the opposite
#    (values copied in), see the report. Values given to `S.create` and
#    ``S[id] = ...`` are copied, as documented.
# 8. References kept across a flush stay live. Across a flush that replaced
#    the content (a merge, or a resolver's document), a reference is
#    re-pointed to the dict or list now at the same place if its way from
#    the root is dict keys only and the type is the same; other references
#    into that document (a list index on the way, a plain value) are dropped
#    as ambiguous. References into a document deleted in the session are
#    dropped. A reference to a child taken out of its document stays usable;
#    its edits are not the document's.
# 9. ``doc.clear()`` on a whole document removes its fields and keeps its id
#    (it is tried on documents without attachments only, where dropping
#    `_attachments` would be a question of its own).
# 10. Deleting by id an id the server does not have is reported in
#    FlushError as ResourceNotFound (documented); a document created by a
#    broken flush that did not reach the server and deleted again may be
#    reported so (also when the server holds another writer's document of
#    that id), or forgotten at once.
# 11. A resolver function returning None leaves the conflict pending and
#    reported; the model's resolvers return the session's version
#    ('mine'), the server's ('theirs'), the server's with the session's
#    fields over it, or None; a side that deleted is None, so 'theirs' of a
#    deletion is the session's version, and a deletion is returned as
#    ``{'_deleted': True}``. Pending attachment changes go on top of what
#    it returns (README: "resolve functions keep it").
# 12. PouchDB Server answers a create identical to the first revision of a
#    document it holds (same body, no parent: the same revision id) as
#    written, where CouchDB answers a conflict; the session reports what the
#    server answered, and nothing is lost either way.


#: Whether the server is the PouchDB Server the suite starts.
ON_POUCHDB = not os.environ.get('COUCHDB_URL', '').strip()

#: The rule families `SESSION_MODEL_SKIP` may name ('large': attachments
#: larger than `max_inline_attachment`).
MODEL_FAMILIES = {'plain', 'attachments', 'large', 'faults', 'writer', 'clear',
            'create', 'delete', 'merge', 'overwrite', 'resolve'}
MODEL_SKIP = set(filter(None,
                        os.environ.get('SESSION_MODEL_SKIP', '').split(',')))
assert MODEL_SKIP <= MODEL_FAMILIES, \
    'unknown rule families: %s' % (MODEL_SKIP - MODEL_FAMILIES)

# The suite's run is the same every time (derandomized), so that CI judges
# the change and not the draw; the soak explores anew each run.
settings.register_profile(
    'stateful-ci', max_examples=200, stateful_step_count=30, deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much])
settings.register_profile(
    'stateful-soak', max_examples=10000, stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much])
MODEL_PROFILE = 'stateful-soak' if os.environ.get('SESSION_SOAK') == '1' else \
    'stateful-ci'
if os.environ.get('SESSION_MODEL_STEPS'):      # for debugging
    settings.register_profile(
        'stateful-debug', settings.get_profile(MODEL_PROFILE),
        stateful_step_count=int(os.environ['SESSION_MODEL_STEPS']),
        max_examples=int(os.environ.get('SESSION_MODEL_EXAMPLES', 300)),
        report_multiple_bugs=False)
    MODEL_PROFILE = 'stateful-debug'

#: The document ids the session and the writer share.
IDS = ['a', 'b', 'c']
#: Attachment names; `MODEL_LIMIT` is the session's `max_inline_attachment`.
NAMES = ['f.bin', 'g.bin']
MODEL_LIMIT = 8
TYPE = 'application/octet-stream'

#: A small key alphabet (one key with the characters JSON Pointer escapes),
#: so that both writers often touch the same keys.
model_keys = st.sampled_from(['a', 'b', 'c', 'd/~'])
leaves = st.sampled_from([0, 1, 2, 'x', 'y', None, True, False])
values = st.recursive(
    leaves, lambda children: (st.lists(children, max_size=3) |
                              st.dictionaries(model_keys, children,
                                              max_size=3)),
    max_leaves=5)
containers = st.lists(values, max_size=3) | \
    st.dictionaries(model_keys, values, max_size=3)
bodies = st.dictionaries(model_keys, containers | values, max_size=4)
contents = st.sampled_from([b'', b'one', b'two', b'three'] + (
    [b'0123456789', b'large content'] if 'large' not in MODEL_SKIP else []))

RESOLVER_CHOICES = ['mine', 'theirs', 'theirs and my fields', 'none']


# -- Stateful model: helpers --------------------------------------------------

def user_body(document):
    """A plain deep copy of a document without ``_id``, ``_rev`` and
    ``_attachments``."""
    return {k: copy.deepcopy(v) for k, v in dict(document).items()
            if k not in ('_id', '_rev', '_attachments')}


def digest(content):
    """The digest a server gives an attachment of ``content``."""
    return 'md5-' + base64.b64encode(hashlib.md5(content).digest()).decode()


def generation_of(rev):
    return int(rev.split('-')[0])


def applied(attachments, pending):
    """``attachments`` ({name: content}) with the ``pending`` changes
    ({name: content, or None to delete}) made."""
    result = dict(attachments)
    for name, content in pending.items():
        if content is None:
            result.pop(name, None)
        else:
            result[name] = content
    return result


def merge_attachments(base, mine, theirs):
    """The three-way merge of attachments, name by name (rule 3).

    :raise ModelConflict: for a name both sides changed differently
    """
    merged = {}
    for name in sorted(set(base) | set(mine) | set(theirs)):
        value = three_way(base.get(name, ABSENT), mine.get(name, ABSENT),
                          theirs.get(name, ABSENT), '_attachments/' + name)
        if value is not ABSENT:
            merged[name] = value
    return merged


def is_connection_failure(exc):
    """What python-couchdb raises when a connection fails."""
    return isinstance(exc, (OSError, http.client.HTTPException))


def path_to(root, target):
    """The keys leading from ``root`` to the object ``target`` (by
    identity), or None if it is not in the document."""
    if root is target:
        return []
    items = root.items() if isinstance(root, dict) else enumerate(root)
    for key, value in items:
        if isinstance(value, (dict, list)):
            found = path_to(value, target)
            if found is not None:
                return [key] + found
    return None


def follow(root, path):
    """The object at ``path`` (dict keys only) in ``root``, or None."""
    node = root
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


class Version(object):
    """A version of a document on the server: ``body`` is None for a
    deletion; ``attachments`` is {name: content}."""

    def __init__(self, rev, body, attachments):
        self.rev, self.body, self.attachments = rev, body, attachments

    @property
    def gen(self):
        return generation_of(self.rev)

    def __repr__(self):
        return '<%s %r %r>' % (self.rev[:8], self.body,
                               sorted(self.attachments))


class Held(object):
    """What the session holds for one id.

    ``kind`` is 'fetched' (read, or written by a flush), 'new' (created in
    the session; ``base`` is then the version it is written over: a version,
    'lookup' for one deleted by id first, or None), 'deleted' (a fetched
    document deleted in the session) or 'deleted by id' (never fetched).
    ``attachments`` are those the session's version has (its stubs),
    ``pending`` the attachment changes waiting for a flush.
    """

    def __init__(self, kind, doc, mirror, base, attachments):
        self.kind, self.doc, self.mirror, self.base = kind, doc, mirror, base
        self.attachments = dict(attachments)
        self.pending = {}

    @property
    def live(self):
        return self.kind in ('fetched', 'new')

    def mine(self):
        """The session's version: ``(body or ABSENT, attachments)``."""
        if not self.live:
            return ABSENT, {}
        return self.mirror, applied(self.attachments, self.pending)

    def has_work(self):
        if self.kind != 'fetched':
            return True
        return bool(self.pending) or not same(self.mirror, self.base.body)

    def large_puts(self):
        return [name for name, content in self.pending.items()
                if content is not None and len(content) > MODEL_LIMIT]

    def inline_work(self):
        return any(content is None or len(content) <= MODEL_LIMIT
                   for content in self.pending.values())


class Ref(object):
    """A kept reference: ``obj`` is the session's object (a tracked proxy)
    or, if ``plain``, the user's own plain value stored into a document;
    ``mirror`` the model's object at the same place."""

    serial = 0

    def __init__(self, id, obj, mirror, plain=False):
        self.id, self.obj, self.mirror, self.plain = id, obj, mirror, plain
        Ref.serial += 1
        self.number = Ref.serial

    def __repr__(self):
        return '<%s ref #%d into %r: %r>' % (
            'plain' if self.plain else 'tracked', self.number, self.id,
            self.mirror)


class Outcome(object):
    """One outcome the model allows a flush for one document.

    ``kind``: 'written' (the server then holds ``body``, None for deleted,
    with ``attachments``, {name: [allowed contents]}, at a generation in
    ``gens``), 'unchanged' (nothing written; ``error`` is the exception class
    it must be reported with in FlushError, or None for not reported), or
    'either' for rule 6 (nothing or written). ``resolver`` is whether the
    resolver function must be called for it (None: may be).
    """

    def __init__(self, kind, body=None, attachments=None, gens=(),
                 error=None, resolver=False, why='', below=None):
        self.kind, self.body, self.error = kind, body, error
        # For 'unchanged': the version under the server's, taken for the
        # session's own write (see `SessionMachine.own_write_below`).
        self.below = below
        self.attachments = attachments or {}
        self.gens, self.resolver, self.why = set(gens), resolver, why

    def __repr__(self):
        if self.kind == 'written':
            return '<written %r %r gen %s (%s)>' % (
                self.body, sorted(self.attachments), sorted(self.gens),
                self.why)
        return '<%s %s (%s)>' % (self.kind, self.error and
                                 self.error.__name__, self.why)


def without(attachments, names):
    """``attachments`` ({name: content}) but ``names``."""
    return dict((name, content) for name, content in attachments.items()
                if name not in names)


def exact(attachments):
    return {name: [content] for name, content in attachments.items()}


# -- Stateful model: the machine ----------------------------------------------

class ForwardedMachine(RuleBasedStateMachine):
    """A state machine over a fresh database of the test server, which its
    sessions reach through `forwarder` (see `run_machine`)."""

    server_url = None
    forwarder = None

    def __init__(self):
        super().__init__()
        self.database = temporary_database(self.server_url)
        self.db = self.database.__enter__()
        self.forwarder.mode = 'pass'

    def session(self, **options):
        """A new session on the database, through the forwarder."""
        return Session(through(self.forwarder, self.db, self.server_url),
                       **options)

    def teardown(self):
        self.forwarder.mode = 'pass'
        self.database.__exit__(None, None, None)


def run_machine(machine, server_url, profile):
    """Run ``machine`` as a test with the settings ``profile``, through a
    forwarder to the server at ``server_url``."""
    parts = urlsplit(server_url)
    if parts.scheme != 'http':
        pytest.skip('the forwarder speaks plain HTTP only')
    with Forwarder(parts.hostname, parts.port or 80) as forwarder:
        machine.server_url = server_url
        machine.forwarder = forwarder
        run_state_machine_as_test(machine,
                                  settings=settings.get_profile(profile))


class SessionMachine(ForwardedMachine):
    """The user's session, the concurrent writer and the model (see the
    comment above)."""

    def __init__(self):
        super().__init__()
        self.S = self.session(max_inline_attachment=MODEL_LIMIT)
        self.server = {}
        self.held = {}
        self.refs = []
        self.unsure = set()
        self.refused = False    # whether `unsure` comes of refused connections
        self.landed = {}
        self.sent = {}              # {id: what the broken flush sent}
        self.created = []           # generated ids

    # -- Helpers.

    def ids(self):
        return IDS + self.created

    def live_on_server(self, id):
        version = self.server.get(id)
        return version is not None and version.body is not None

    def read_server(self):
        """{id: (rev, body, {name: (digest, length)})} of the server's live
        documents."""
        seen = {}
        for row in self.db.view('_all_docs', include_docs=True):
            doc = row.doc
            stubs = doc.get('_attachments') or {}
            seen[row.id] = (doc['_rev'], user_body(doc), dict(
                (name, (stub.get('digest'), stub.get('length')))
                for name, stub in stubs.items()))
        return seen

    def tombstone_rev(self, id):
        [row] = self.db.view('_all_docs', keys=[id])
        return row.value['rev'] if 'value' in row else None

    def observe(self, id, seen):
        """The server's version of ``id`` from ``seen`` (or a deleted one)."""
        if id not in seen:
            if id not in self.server and self.tombstone_rev(id) is None:
                return None
            return Version(self.tombstone_rev(id), None, {})
        rev, content, stubs = seen[id]
        return Version(rev, content, stubs)

    def pouchdb_dies(self, id):
        """Whether the session's write of ``id`` would kill PouchDB Server
        4.2 (a TypeError in its bulkDocs): a write on an old revision that
        is the very edit already made on it, on a branch that ends in a
        deletion (the writer made the session's edit, then deleted the
        document). CouchDB answers a conflict."""
        held, version = self.held.get(id), self.server.get(id)
        if not ON_POUCHDB or held is None or held.kind != 'fetched' or \
                version is None or version.body is not None or \
                held.base is None or held.base.rev is None:
            return False
        tombstone = self.db.get(id, rev=version.rev, revs=True) or {}
        revisions = tombstone.get('_revisions') or {}
        index = revisions.get('start', 0) - generation_of(held.base.rev) - 1
        ids = revisions.get('ids', [])
        if not 0 <= index < len(ids):
            return False
        child = self.db.get(id, rev='%d-%s' % (
            generation_of(held.base.rev) + 1, ids[index]))
        return child is not None and not child.get('_deleted') and \
            same(user_body(child), held.mirror)

    def history_holds(self, id, body):
        """Whether a revision of ``id`` older than the current one holds
        ``body`` (the server's history, read directly)."""
        latest = self.db.get(id, revs=True) or {}
        revisions = latest.get('_revisions') or {}
        start = revisions.get('start', 0)
        for n, hash in enumerate(revisions.get('ids', [])[1:], 1):
            old = self.db.get(id, rev='%d-%s' % (start - n, hash))
            if old is not None and not old.get('_deleted') and \
                    same(user_body(old), body):
                return True
        return False

    def own_write_below(self, id):
        """The version right after the one the session writes ``id`` over,
        in the history of the server's current version, if it is what the
        session sends and the server moved past it: the session takes it for
        its own write whose answer was lost (as the writer's identical
        edit cannot be told from it), settled as written (rule 6)."""
        held, version = self.held.get(id), self.server.get(id)
        if held is None or held.kind == 'deleted by id' or held.pending or \
                version is None:
            return None
        base = held.base
        latest = self.db.get(id, rev=version.rev, revs=True) or {}
        revisions = latest.get('_revisions') or {}
        if held.kind == 'new':
            # A create: the newest revision under the server's that started
            # the document (the first, or the one after a deletion).
            revs = ['%d-%s' % (revisions.get('start', 0) - n, hash)
                    for n, hash in enumerate(revisions.get('ids', []))]
            start = len(revs) - 1
            for n in range(1, len(revs)):
                if (self.db.get(id, rev=revs[n]) or {}).get('_deleted'):
                    start = n - 1
                    break
            child = self.db.get(id, rev=revs[start]) if start > 0 else None
            if child is None or child.get('_deleted') or \
                    child.get('_attachments') or \
                    not same(user_body(child), held.mirror,
                             exact_numbers=False):
                return None
            return Version(revs[start], user_body(child), {})
        index = revisions.get('start', 0) - generation_of(base.rev) - 1
        ids = revisions.get('ids', [])
        if not 0 < index < len(ids) - 1 or \
                ids[index + 1] != base.rev.split('-', 1)[1]:
            return None
        rev = '%d-%s' % (generation_of(base.rev) + 1, ids[index])
        child = self.db.get(id, rev=rev)
        if child is None:
            return None
        if held.kind == 'deleted':
            return Version(rev, None, {}) if child.get('_deleted') else None
        stubs = child.get('_attachments') or {}
        if child.get('_deleted') or not same(user_body(child), held.mirror,
                                             exact_numbers=False) or \
                sorted(stubs) != sorted(held.attachments):
            return None
        return Version(rev, user_body(child), held.attachments)

    def drop_refs(self, id):
        self.refs = [ref for ref in self.refs if ref.id != id]

    def track(self, id, doc):
        """Hold ``doc``, just read by the session, in the model."""
        version = self.server[id]
        assert version.body is not None
        assert same(user_body(doc), version.body), (
            user_body(doc), version.body)
        assert doc['_id'] == id and doc['_rev'] == version.rev
        self.held[id] = Held('fetched', doc, user_body(doc), version,
                             version.attachments)
        self.refs.append(Ref(id, doc, self.held[id].mirror))
        note('kept %r' % self.refs[-1])

    # -- Rules: reading and keeping references.

    @initialize(contents=st.lists(bodies, min_size=len(IDS),
                                  max_size=len(IDS)),
                exist=st.lists(st.booleans(), min_size=len(IDS),
                               max_size=len(IDS)))
    def documents_on_the_server(self, contents, exist):
        for id, content, there in zip(IDS, contents, exist):
            if there:
                self.db[id] = copy.deepcopy(content)
                self.server[id] = Version(self.db[id].rev, content, {})

    @rule(data=st.data())
    def read(self, data):
        """``S[id]`` or ``S.get_many(ids)``; keeps the documents."""
        ids = data.draw(st.lists(st.sampled_from(self.ids()), min_size=1,
                                 max_size=3, unique=True), label='ids')
        if len(ids) == 1 and data.draw(st.booleans(), label='S[id]'):
            try:
                docs = [self.S[ids[0]]]
            except couchdb.ResourceNotFound:
                docs = [None]
        else:
            docs = self.S.get_many(ids)
        for id, doc in zip(ids, docs):
            held = self.held.get(id)
            if held is not None:
                if held.live:
                    assert doc is held.doc, 'not the same object'
                else:
                    assert doc is None, 'a document deleted in the session'
            elif self.live_on_server(id):
                assert doc is not None, '%r not found' % id
                self.track(id, doc)
            else:
                assert doc is None, '%r found: %r' % (id, doc)

    # Not while a write's outcome is unknown: a view may then list an id
    # the session let go of, whose version on the server the model cannot
    # tell (the next flush settles it).
    @precondition(lambda self: not self.unsure)
    @rule(data=st.data())
    def read_a_view(self, data):
        """``S.view('_all_docs', include_docs=True)`` for some keys or for
        all, or `iterview` of it. A session holding documents asks for the
        rows without them and reads only those it lacks (issue 11): the
        rows are still the server's, with the session's object for each
        document it holds, None for one the server deleted, without the
        documents deleted in the session; the others are tracked."""
        how = data.draw(st.sampled_from(['keys', 'all', 'iterview']),
                        label='view')
        if how == 'keys':
            keys = data.draw(st.lists(st.sampled_from(self.ids()),
                                      min_size=1, max_size=4, unique=True),
                             label='keys')
            rows = list(self.S.view('_all_docs', include_docs=True,
                                    keys=keys))
        else:
            # The server lists its live documents, in id order.
            keys = sorted(id for id in self.server
                          if self.live_on_server(id))
            rows = list(self.S.view('_all_docs', include_docs=True)
                        if how == 'all' else
                        self.S.iterview('_all_docs', data.draw(
                            st.sampled_from([1, 2, 100]), label='batch'),
                            include_docs=True))
        # A key the server never had gives an error row, naming no
        # document: it stays, even for an id deleted in the session.
        expected = [id for id in keys if self.held.get(id) is None or
                    self.held[id].live or self.server.get(id) is None]
        assert [row.get('key') for row in rows] == expected
        for id, row in zip(expected, rows):
            held, version = self.held.get(id), self.server.get(id)
            if version is None:
                assert row.get('error') == 'not_found', row
                assert row.doc is None
            elif version.body is None:
                assert row['value'].get('deleted') is True, row
                assert row.doc is None, 'a document the server deleted'
            elif held is not None:
                assert row.doc is held.doc, 'not the same object'
            else:
                assert row.id == id
                self.track(id, row.doc)

    @rule(data=st.data())
    def keep_a_child(self, data):
        """Keep a reference to a dict or list inside a kept one, read in one
        of the ways that hand children out."""
        candidates = [ref for ref in self.refs if any(
            isinstance(value, (dict, list))
            for key, value in self.items(ref.mirror))]
        if not candidates:
            return
        ref = data.draw(st.sampled_from(candidates), label='parent')
        keys = [key for key, value in self.items(ref.mirror)
                if isinstance(value, (dict, list))]
        key = data.draw(st.sampled_from(keys), label='key')
        how = data.draw(st.sampled_from(
            ['[k]', 'get', 'items', 'values', 'setdefault', 'iter', '[-1]']),
            label='how')
        obj = ref.obj
        if isinstance(ref.mirror, dict):
            if how == 'get':
                child = obj.get(key)
            elif how == 'items':
                child = dict(obj.items())[key]
            elif how == 'values':
                child = list(obj.values())[list(obj).index(key)]
            elif how == 'setdefault':
                child = obj.setdefault(key, None)
            else:
                child = obj[key]
        else:
            if how == 'iter':
                child = list(iter(obj))[key]
            elif how == '[-1]':
                child = obj[key - len(obj)]
            else:
                child = obj[key]
        assert same(copy.deepcopy(child), ref.mirror[key])
        self.refs.append(Ref(ref.id, child, ref.mirror[key], ref.plain))
        note('kept %r' % self.refs[-1])

    def root_of(self, ref):
        held = self.held.get(ref.id)
        return held.doc if held is not None else None

    @staticmethod
    def items(container):
        if isinstance(container, dict):
            return list(container.items())
        return list(enumerate(container))

    # -- Rules: editing through kept references.

    def editable(self, plain=None):
        return [ref for ref in self.refs
                if plain is None or ref.plain == plain]

    @rule(data=st.data())
    def edit_through_a_kept_reference(self, data):
        refs = self.editable(plain=False)
        if not refs:
            return
        ref = data.draw(st.sampled_from(refs), label='ref')
        self.edit(data, ref)

    @precondition(lambda self: 'plain' not in MODEL_SKIP)
    @rule(data=st.data())
    def edit_through_a_plain_reference(self, data):
        refs = self.editable(plain=True)
        if not refs:
            return
        ref = data.draw(st.sampled_from(refs), label='plain ref')
        self.edit(data, ref)

    @precondition(lambda self: 'plain' not in MODEL_SKIP)
    @rule(data=st.data(), value=containers)
    def store_a_plain_value_and_keep_it(self, data, value):
        """``container[k] = value`` (or ``append``) with a fresh plain value
        the user keeps (rule 7)."""
        refs = [ref for ref in self.refs if not ref.plain]
        if not refs:
            return
        ref = data.draw(st.sampled_from(refs), label='into')
        mirror = copy.deepcopy(value)
        if isinstance(ref.mirror, dict):
            key = data.draw(model_keys, label='key')
            ref.obj[key] = value
            ref.mirror[key] = mirror
            note('%r[%r] = plain %r' % (ref, key, value))
        else:
            ref.obj.append(value)
            ref.mirror.append(mirror)
            note('%r.append(plain %r)' % (ref, value))
        self.refs.append(Ref(ref.id, value, mirror, plain=True))

    def edit(self, data, ref):
        """One random edit through ``ref``, made on the session's object
        and the mirror alike."""
        target, mirror = ref.obj, ref.mirror
        is_root = not ref.plain and target is self.root_of(ref)
        if isinstance(mirror, dict):
            present = [k for k in mirror
                       if not (is_root and k.startswith('_'))]
            nested = [k for k in present if isinstance(mirror[k], dict)]
            lists = [k for k in present if isinstance(mirror[k], list)]
            ops = ['[k] = v', 'update', '|=', 'setdefault']
            if present:
                ops += ['del [k]', 'pop']
            if nested:
                ops.append('[k][k2] = v')
            if lists:
                ops.append('[k] += [v]')
            held = self.held.get(ref.id)
            if not (is_root and (held.attachments or held.pending)) and \
                    'clear' not in MODEL_SKIP:
                ops.append('clear')
            op = data.draw(st.sampled_from(ops), label='op')
            value = data.draw(values, label='value')
            if op in ('del [k]', 'pop'):
                key = data.draw(st.sampled_from(present), label='key')
            elif op == '[k][k2] = v':
                key = data.draw(st.sampled_from(nested), label='key')
            elif op == '[k] += [v]':
                key = data.draw(st.sampled_from(lists), label='key')
            else:
                key = data.draw(model_keys, label='key')
            key2 = data.draw(model_keys, label='key2')
            note('%r: %s with k=%r k2=%r v=%r' % (ref, op, key, key2, value))
            for side in (target, mirror):
                v = copy.deepcopy(value)
                if op == '[k] = v':
                    side[key] = v
                elif op == 'update':
                    side.update({key: v})
                elif op == '|=':
                    side |= {key: v}
                elif op == 'setdefault':
                    side.setdefault(key, v)
                elif op == 'del [k]':
                    del side[key]
                elif op == 'pop':
                    side.pop(key)
                elif op == '[k][k2] = v':
                    side[key][key2] = v
                elif op == '[k] += [v]':
                    side[key] += [v]
                else:
                    side.clear()            # on a document: rule 9
        else:
            n = len(mirror)
            ops = ['append', 'insert', '+=', 'extend']
            if n:
                ops += ['[i] = v', 'del [i]', 'pop', 'pop()', 'remove']
            op = data.draw(st.sampled_from(ops), label='op')
            value = data.draw(values, label='value')
            index = data.draw(st.integers(0, max(n - 1, 0)), label='index')
            if op == 'insert':
                index = data.draw(st.integers(0, n), label='at')
            note('%r: %s with i=%r v=%r' % (ref, op, index, value))
            item = copy.deepcopy(mirror[index]) if op == 'remove' else None
            for side in (target, mirror):
                v = copy.deepcopy(value)
                if op == 'append':
                    side.append(v)
                elif op == 'insert':
                    side.insert(index, v)
                elif op == '+=':
                    side += [v]
                elif op == 'extend':
                    side.extend([v, copy.deepcopy(v)])
                elif op == '[i] = v':
                    side[index] = v
                elif op == 'del [i]':
                    del side[index]
                elif op == 'pop':
                    side.pop(index)
                elif op == 'pop()':
                    side.pop()
                else:
                    side.remove(copy.deepcopy(item))

    # -- Rules: creating and deleting.

    @precondition(lambda self: 'create' not in MODEL_SKIP)
    @rule(data=st.data(), content=bodies)
    def create(self, data, content):
        """``S.create(content)`` (a generated id) or ``S[id] = content``
        for an id the session does not hold live."""
        free = [id for id in IDS if id not in self.held or
                not self.held[id].live]
        how = data.draw(st.sampled_from(
            ['S.create'] + (['S[id] ='] if free else [])), label='how')
        if how == 'S.create':
            id = self.S.create(copy.deepcopy(content))
            self.created.append(id)
            base = None
        else:
            id = data.draw(st.sampled_from(free), label='id')
            self.S[id] = copy.deepcopy(content)
            held = self.held.get(id)
            if held is None:
                base = None
            elif held.kind == 'deleted':
                base = held.base
            else:
                base = 'lookup'
        note('created %r: %r' % (id, content))
        doc = self.S[id]
        self.held[id] = Held('new', doc, copy.deepcopy(content), base, {})
        self.refs.append(Ref(id, doc, self.held[id].mirror))

    @rule(data=st.data())
    def create_an_id_held_raises(self, data):
        live = [id for id, held in self.held.items() if held.live]
        if not live:
            return
        id = data.draw(st.sampled_from(live), label='id')
        with pytest.raises(couchdb.ResourceConflict):
            self.S.create({'_id': id})

    @precondition(lambda self: 'delete' not in MODEL_SKIP)
    @rule(data=st.data())
    def delete(self, data):
        """``del S[id]`` or ``S.delete(doc)``, held or not."""
        id = data.draw(st.sampled_from(self.ids()), label='id')
        held = self.held.get(id)
        how = data.draw(st.sampled_from(['del S[id]', 'S.delete(doc)']),
                        label='how')
        if held is not None and held.kind == 'deleted by id' and \
                id not in [doc['_id'] for doc in self.S.deleted]:
            # Found missing by a broken flush's look-up, and dropped at
            # once (rule 10).
            del self.held[id]
            held = None
        if held is not None and not held.live:
            with pytest.raises(couchdb.ResourceNotFound):
                if how == 'del S[id]':
                    del self.S[id]
                else:
                    self.S.delete({'_id': id})
            return
        if how == 'del S[id]' or held is None:
            del self.S[id]
        else:
            self.S.delete(held.doc)
        self.drop_refs(id)
        if held is None:
            self.held[id] = Held('deleted by id', None, None, None, {})
        elif held.kind == 'fetched' or isinstance(held.base, Version):
            # At the revision it was read at (or is written over).
            held.kind, held.doc, held.mirror, held.pending = \
                'deleted', None, None, {}
        elif id in self.unsure or held.base == 'lookup':
            # Maybe created by a broken flush, or deleted by id first:
            # deleted at the server's revision at flush time.
            self.held[id] = Held('deleted by id', None, None, None, {})
            if id not in [doc['_id'] for doc in self.S.deleted]:
                # The session knows its create never reached the server.
                assert id in self.unsure and id not in self.landed, \
                    'the deletion of %r was dropped' % id
                del self.held[id]
        else:
            del self.held[id]       # created and deleted: nothing to send

    # -- Rules: attachments.

    @precondition(lambda self: 'attachments' not in MODEL_SKIP)
    @rule(data=st.data(), content=contents)
    def put_attachment(self, data, content):
        live = [id for id in self.ids() if id in self.held and
                self.held[id].live]
        if not live:
            return
        id = data.draw(st.sampled_from(live), label='id')
        name = data.draw(st.sampled_from(NAMES), label='name')
        held = self.held[id]
        self.S.put_attachment(held.doc, content, name, TYPE)
        held.pending[name] = content

    @precondition(lambda self: 'attachments' not in MODEL_SKIP)
    @rule(data=st.data())
    def delete_attachment(self, data):
        live = [id for id in self.ids() if id in self.held and
                self.held[id].live]
        if not live:
            return
        id = data.draw(st.sampled_from(live), label='id')
        held = self.held[id]
        names = sorted(applied(held.attachments, held.pending))
        name = data.draw(st.sampled_from(NAMES), label='name')
        if name not in names:
            with pytest.raises(couchdb.ResourceNotFound):
                self.S.delete_attachment(held.doc, name)
            return
        self.S.delete_attachment(held.doc, name)
        if name in held.attachments:
            held.pending[name] = None
        else:
            del held.pending[name]

    # -- Rules: the concurrent writer.

    def writable(self):
        return [id for id in self.ids() if id not in self.unsure]

    @precondition(lambda self: 'writer' not in MODEL_SKIP)
    @rule(data=st.data())
    def writer_edits(self, data):
        ids = [id for id in self.writable() if self.live_on_server(id)]
        if not ids:
            return
        id = data.draw(st.sampled_from(ids), label='id')
        doc = self.db[id]
        how = data.draw(st.sampled_from(
            ['set', 'delete key', 'save unchanged', "the session's value"]),
            label='how')
        held = self.held.get(id)
        if how == "the session's value" and held is not None and held.live:
            for key in list(doc):
                if not key.startswith('_'):
                    del doc[key]
            doc.update(copy.deepcopy(held.mirror))
        elif how == 'delete key' and user_body(doc):
            del doc[data.draw(st.sampled_from(sorted(user_body(doc))))]
        elif how != 'save unchanged':
            key = data.draw(model_keys, label='key')
            doc[key] = data.draw(values, label='v')
        note('writer saves %r: %r' % (id, user_body(doc)))
        self.db.save(doc)
        version = self.server[id]
        self.server[id] = Version(doc['_rev'], user_body(doc),
                                  version.attachments)

    @precondition(lambda self: 'writer' not in MODEL_SKIP)
    @rule(data=st.data())
    def writer_deletes(self, data):
        ids = [id for id in self.writable() if self.live_on_server(id)]
        if not ids:
            return
        id = data.draw(st.sampled_from(ids), label='id')
        self.db.delete(self.db[id])
        self.server[id] = Version(self.tombstone_rev(id), None, {})

    @precondition(lambda self: 'writer' not in MODEL_SKIP)
    @rule(data=st.data(), content=bodies)
    def writer_creates(self, data, content):
        ids = [id for id in self.writable() if not self.live_on_server(id)]
        if not ids:
            return
        id = data.draw(st.sampled_from(ids), label='id')
        self.db[id] = copy.deepcopy(content)
        self.server[id] = Version(self.db[id].rev, content, {})

    @precondition(lambda self: 'writer' not in MODEL_SKIP and
                  'attachments' not in MODEL_SKIP)
    @rule(data=st.data(), content=contents)
    def writer_puts_an_attachment(self, data, content):
        ids = [id for id in self.writable() if self.live_on_server(id)]
        if not ids:
            return
        id = data.draw(st.sampled_from(ids), label='id')
        name = data.draw(st.sampled_from(NAMES), label='name')
        doc = self.db[id]
        self.db.put_attachment(doc, content, name, TYPE)
        version = self.server[id]
        self.server[id] = Version(self.db[id].rev, version.body, dict(
            version.attachments, **{name: content}))

    # -- Rules: flushing.

    @rule(policy=st.sampled_from(['raise', 'overwrite', 'merge', 'resolve']),
          choice=st.sampled_from(RESOLVER_CHOICES))
    def flush(self, policy, choice):
        if policy in MODEL_SKIP:
            policy = 'raise'
        self.check_flush(policy, choice, fault=None)

    @precondition(lambda self: 'faults' not in MODEL_SKIP and not self.unsure)
    @rule(action=st.sampled_from(['drop_answer', 'drop_answer', 'cut_before',
                                  'reset', 'refuse']),
          times=st.sampled_from([2, 1]),
          bulk_only=st.booleans())
    def flush_through_a_fault(self, action, times, bulk_only):
        """A flush whose next request(s) fail (rule 6)."""
        self.refused = action == 'refuse'
        if action == 'refuse':
            self.forwarder.mode = 'refuse'
        else:
            self.forwarder.fail(action, times=times,
                                when=is_bulk_docs if bulk_only else None)
        try:
            self.check_flush('raise', None, fault=action)
        finally:
            self.forwarder.mode = 'pass'

    def resolver(self, choice, calls):
        def resolve(mine, theirs, base):
            calls.append(next((side['_id'] for side in (mine, theirs, base)
                               if side and '_id' in side), None))
            if choice == 'none':
                return None
            if choice == 'mine' or theirs is None or (
                    choice == 'theirs and my fields' and mine is None):
                chosen = mine
            elif choice == 'theirs':
                chosen = theirs
            else:
                chosen = dict(theirs, **user_body(mine))
            return {'_deleted': True} if chosen is None else chosen
        return resolve

    def expect(self, id, policy, choice):
        """The outcomes the model allows a flush for ``id``."""
        outcomes = self.expect_outcomes(id, policy, choice)
        held, version = self.held[id], self.server.get(id)
        mine, mine_atts = held.mine()
        if held.kind == 'new' and held.base is None and version is not None \
                and version.body is not None and version.gen == 1 and \
                mine is not ABSENT and same(mine, version.body) and \
                not mine_atts and not version.attachments:
            # Rule 12: PouchDB Server takes a create identical to the first
            # revision of a document it holds (the revision ids are one
            # hash) as written; CouchDB answers a conflict.
            outcomes.append(Outcome('written', mine, {}, gens=[1],
                                    why='rule 12: an identical create'))
        return outcomes

    def expect_outcomes(self, id, policy, choice):
        outcomes = self.expect_outcomes_once(id, policy, choice)
        if id in self.unsure and self.refused and id not in self.landed:
            # Refused connections are an answer: the session knows the
            # broken flush sent nothing, unless a connection it had pooled
            # was closed too late for it to see (then it is unsure).
            self.unsure.discard(id)
            try:
                outcomes += self.expect_outcomes_once(id, policy, choice)
            finally:
                self.unsure.add(id)
        return outcomes

    def expect_outcomes_once(self, id, policy, choice):
        held = self.held[id]
        version = self.server.get(id)
        mine, mine_atts = held.mine()
        if id in self.landed:
            return self.expect_settling(id, held, version, mine, mine_atts)
        sent = self.sent.get(id)
        large = held.large_puts() if held.live else []
        if id in self.unsure and sent is not None and version is not None \
                and version.body is not None and same(sent[0], version.body) \
                and without(sent[1], large) == \
                without(version.attachments, large):
            # The server holds what the broken flush sent, written by the
            # writer before it: the session cannot tell it from its own.
            return self.expect_plainly(id, held, version, policy, choice) + \
                self.expect_settling(id, held, version, mine, mine_atts)
        if id in self.unsure and sent is not None and sent[0] is ABSENT and \
                version is not None and version.body is None:
            # The broken flush sent a deletion, and the server holds one,
            # the writer's: the session cannot tell it from its own either.
            return self.expect_plainly(id, held, version, policy, choice) + \
                self.expect_settling(id, held, version, mine, mine_atts)
        if id in self.unsure and held.kind == 'deleted by id':
            # Created, sent by a broken flush that did not reach the server,
            # deleted: reported as missing, or not (rule 10).
            outcomes = self.expect_plainly(id, held, version, policy, choice)
            outcomes.append(Outcome('unchanged', why='rule 10'))
            outcomes.append(Outcome('unchanged', error=couchdb.ResourceNotFound,
                                    why='rule 10'))
            if sent is not None and self.history_holds(id, sent[0]):
                # An older revision holds what was sent: the session cannot
                # tell it from its own create, under the writer's change,
                # which its deletion conflicts with (rule 6).
                outcomes.append(Outcome('unchanged',
                                        error=couchdb.ResourceConflict,
                                        resolver=None,
                                        why='rule 6: sent, in the history'))
            return outcomes
        if id in self.unsure and not held.has_work():
            # Sent by the broken flush, changed back since: the session may
            # send it again (and meet a conflict if the server moved).
            gen = version.gen if version is not None else 0
            outcomes = [Outcome('unchanged', why='changed back')]
            if self.moved(held, version):
                outcomes.append(Outcome('unchanged',
                                        error=couchdb.ResourceConflict,
                                        resolver=None, why='changed back'))
            elif mine is not ABSENT:
                outcomes.append(Outcome('written', mine, exact(mine_atts),
                                        gens=[gen + 1], why='sent again'))
            return outcomes
        outcomes = self.expect_plainly(id, held, version, policy, choice)
        if id in self.unsure and held.kind == 'fetched' and \
                same(mine, held.base.body) and \
                mine_atts == held.base.attachments:
            # Undone since a broken flush that failed before sending it
            # (a revision look-up): the session knows, and sends nothing.
            outcomes.append(Outcome('unchanged', why='undone, never sent'))
        if id in self.unsure:
            # The broken flush's write did not reach the server, but the
            # session cannot know: it may send it again (rule 5).
            for outcome in outcomes:
                if outcome.kind == 'written' and outcome.body is not None:
                    outcome.gens |= set(g + 1 for g in outcome.gens)
        return outcomes

    @staticmethod
    def moved(held, version):
        """Whether the server moved since the revision the session writes
        over."""
        theirs = version is not None and version.body is not None
        if held.kind == 'new':
            if held.base is None:
                return theirs
            if held.base == 'lookup':
                return False
            return version.rev != held.base.rev
        if held.kind == 'deleted by id':
            return False
        return version.rev != held.base.rev

    def expect_plainly(self, id, held, version, policy, choice):
        theirs = version.body if version is not None and \
            version.body is not None else ABSENT
        theirs_atts = version.attachments if theirs is not ABSENT else {}
        mine, mine_atts = held.mine()
        large = len(held.large_puts())
        bulk = 1 if held.kind != 'fetched' or held.inline_work() or \
            not same(held.mirror, held.base.body) else 0
        gen = version.gen if version is not None else 0

        def written(content, attachments, why, resolver=False, taken=False,
                    extra=0):
            if content is ABSENT:
                if theirs is ABSENT:
                    return Outcome('written', None, gens=[gen], why=why,
                                   resolver=resolver)
                return Outcome('written', None, gens=[gen + 1], why=why,
                               resolver=resolver)
            gens = [gen + bulk + large + extra]
            if taken:
                gens.append(gen + large)
            return Outcome('written', content, attachments, gens=gens,
                           why=why, resolver=resolver)

        # Deleted by id: at the server's revision, whatever it is.
        if held.kind == 'deleted by id':
            if theirs is ABSENT:
                return [Outcome('unchanged', error=couchdb.ResourceNotFound,
                                why='deleting a missing id')]
            return [written(ABSENT, {}, 'deleted by id')]
        if held.kind == 'new' and held.base == 'lookup':
            bulk = 1
            return [written(mine, exact(mine_atts), 'created over by id')]
        # The revision the session writes over, and whether the server
        # moved since.
        if held.kind == 'new':
            base, base_atts = ABSENT, {}
        else:
            base, base_atts = held.base.body, held.attachments
        if not self.moved(held, version):
            if mine is ABSENT and theirs is ABSENT:
                return [Outcome('written', None, gens=[gen])]
            return [written(mine, exact(mine_atts), 'plain write')]
        # A real conflict.
        conflict = Outcome('unchanged', error=couchdb.ResourceConflict,
                           resolver=policy == 'resolve', why='conflict')
        if mine is ABSENT and theirs is ABSENT:
            done = Outcome('written', None, gens=[gen], why='both deleted')
            if policy == 'raise':
                return [conflict, done]
            conflict.resolver = None
            done.resolver = None
            return [done, conflict] if policy != 'merge' else [done]
        if policy == 'raise':
            return [conflict]
        bulk = 1            # the resolved document is written
        # The stubs of attachments the server no longer has are dropped:
        # there is nothing to keep.
        stubs = {name: [content, theirs_atts[name]]
                 for name, content in held.attachments.items()
                 if name in theirs_atts}
        as_mine = dict(stubs, **exact(
            {name: content for name, content in held.pending.items()
             if content is not None}))
        for name, content in held.pending.items():
            if content is None:
                as_mine.pop(name, None)
        if policy == 'overwrite':
            return [written(mine, as_mine, 'overwrite',
                            taken=True)]
        if policy == 'merge':
            if ABSENT in (mine, theirs) and base is not ABSENT:
                # A deletion against the other side's version: a conflict
                # unless that side changed nothing, attachments included.
                body_, atts = (mine, mine_atts) if theirs is ABSENT else \
                    (theirs, theirs_atts)
                if same(body_, base) and atts == base_atts:
                    return [written(ABSENT, {}, 'merged into a deletion')]
                conflict.why = 'deleted against a change'
                return [conflict]
            try:
                merged = three_way(base, mine, theirs)
                merged_atts = merge_attachments(base_atts, mine_atts,
                                                theirs_atts) \
                    if merged is not ABSENT else {}
            except ModelConflict as exc:
                conflict.why = 'merge conflict at %s' % exc
                return [conflict]
            return [written(merged, exact(merged_atts), 'merged',
                            taken=True)]
        # A resolver function.
        if choice == 'none':
            return [conflict]
        if choice == 'mine' or theirs is ABSENT or (
                choice == 'theirs and my fields' and mine is ABSENT):
            return [written(mine, as_mine, 'resolved: mine', resolver=True,
                            taken=True)]
        if choice == 'theirs':
            content = theirs
        else:
            content = dict(theirs, **mine)
        atts = exact(applied(theirs_atts, held.pending))
        return [written(content, atts, 'resolved: ' + choice,
                        resolver=True, taken=True)]

    def expect_settling(self, id, held, version, mine, mine_atts):
        """Rule 6: the flush after a broken one: what reached the server is
        the session's own; the rest is written; never a conflict."""
        gen = version.gen if version is not None else 0
        theirs = ABSENT if version is None or version.body is None else \
            version.body
        large = len(held.large_puts()) if held.live else 0
        if mine is ABSENT:
            if theirs is ABSENT:
                outcomes = [Outcome('written', None, gens=[gen],
                                    why='deletion reached the server')]
                if held.kind == 'deleted by id':
                    outcomes.append(Outcome(
                        'unchanged', error=couchdb.ResourceNotFound,
                        why='rule 10'))
                return outcomes
            return [Outcome('written', None, gens=[gen + 1],
                            why='deleted after a broken flush')]
        gens = range(gen, gen + 3 + large)
        return [Outcome('written', mine, exact(mine_atts), gens=gens,
                        why='settled after a broken flush')]

    def check_flush(self, policy, choice, fault):
        if any(self.pouchdb_dies(id) for id in self.held):
            note('flush skipped: PouchDB Server would die of it')
            return
        expected = dict((id, self.expect(id, policy, choice))
                        for id, held in sorted(self.held.items())
                        if held.has_work() or id in self.unsure)
        if fault is not None:
            # python-couchdb may retry a failed request by itself, and the
            # session cannot know whether the first attempt reached the
            # server: a server holding just what the session sends may be
            # taken for its own write.
            # The bulk request carries no large attachment: those are
            # uploaded on top of what is taken for the session's own.
            for id, outcomes in expected.items():
                held, version = self.held[id], self.server.get(id)
                mine, mine_atts = held.mine()
                large = held.large_puts() if held.live else []
                if mine is not ABSENT and version is not None and \
                        version.body is not None and \
                        same(mine, version.body) and \
                        without(mine_atts, large) == \
                        without(version.attachments, large):
                    outcomes.append(Outcome(
                        'written', mine, exact(mine_atts),
                        gens=[version.gen + len(large)],
                        why='maybe its own write, retried'))
        for id, outcomes in expected.items():
            below = self.own_write_below(id) if fault is not None or \
                id in self.unsure else None
            if below is not None:
                outcomes.append(Outcome('unchanged', below=below,
                                        why='rule 6: its own, found below'))
        for id, outcomes in expected.items():
            note('expected for %r: %r' % (id, outcomes))
        calls = []
        on_conflict = policy if policy != 'resolve' else \
            self.resolver(choice, calls)
        results, failures, broken = None, {}, None
        try:
            results = self.S.flush(on_conflict=on_conflict)
        except FlushError as exc:
            results, failures = exc.results, exc.failures
        except Exception as exc:
            if fault is None or not is_connection_failure(exc):
                raise
            broken = exc
        note('flush(%r%s) -> %r' % (
            policy, ', %r' % choice if policy == 'resolve' else '',
            broken or (results, failures)))
        event('flush: %s' % ('broken' if broken else 'FlushError' if failures
                             else 'ok'))
        assert set(failures) <= set(expected), \
            'FlushError names documents without work: %r' % failures
        if broken is None and results is not None:
            written = set(id for ok, id, rev in results if ok)
            assert written <= set(expected), \
                'results name documents without work: %r' % results
        seen = self.read_server()
        # Every document with work ends in one of the allowed outcomes.
        chosen = {}
        for id, outcomes in expected.items():
            if broken is not None:
                outcomes = [Outcome('unchanged', why='not written')] + [
                    o for o in outcomes if o.kind == 'written'] + \
                    self.halfway(id, outcomes)
            version = self.server.get(id)
            found = [o for o in outcomes
                     if self.allowed(id, o, version, seen, failures,
                                     broken is not None, calls)]
            assert found, (
                'document %r: none of the allowed outcomes %r; server: %r, '
                'failures: %r, resolver called for %r' % (
                    id, outcomes, seen.get(id), failures.get(id), calls))
            chosen[id] = found[0]
        if broken is None and policy == 'resolve':
            must = set(id for id, o in chosen.items() if o.resolver)
            may = set(id for id, o in chosen.items() if o.resolver is None)
            assert must <= set(calls) <= must | may, (
                'resolver called for %r, must be for %r' % (calls, must))
        # Apply the outcomes to the model.
        for id, outcome in chosen.items():
            self.settle(id, outcome, seen, broken is not None, results)
        if broken is not None:
            # Everything the broken flush had to send (rule 6).
            self.unsure = set(expected)
            self.sent = dict((id, copy.deepcopy(self.held[id].mine()))
                             for id in expected if id in self.held)
        else:
            # A document still reported in conflict stays as the broken
            # flush left it.
            self.unsure = set(
                id for id in self.unsure if id in self.held and
                chosen.get(id) is not None and
                chosen[id].error is couchdb.ResourceConflict)
            self.landed = {}
            self.sent = dict((id, mine) for id, mine in self.sent.items()
                             if id in self.unsure)
            if fault is not None and fault != 'refuse':
                # A conflict answered to the retry of a request whose first
                # attempt failed: an older revision holding what was sent
                # may be the session's own write, under another writer's
                # change, and the session cannot tell (rule 6).
                for id, outcome in chosen.items():
                    held = self.held.get(id)
                    if outcome.error is couchdb.ResourceConflict and \
                            held is not None and held.live and \
                            self.history_holds(id, held.mirror):
                        self.unsure.add(id)
                        self.sent[id] = copy.deepcopy(held.mine())
            if not self.unsure:
                self.refused = False

    def halfway(self, id, outcomes):
        """A broken flush may have done the bulk write but not the upload
        of a large attachment (rule 6)."""
        held = self.held[id]
        extra = []
        for outcome in outcomes:
            if outcome.kind == 'written' and held.large_puts() and \
                    outcome.body is not None:
                attachments = dict(outcome.attachments)
                for name in held.large_puts():
                    old = held.attachments.get(name)
                    if old is None:
                        attachments.pop(name, None)
                    else:
                        attachments[name] = [old]
                extra.append(Outcome('written', outcome.body, attachments,
                                     gens=range(min(outcome.gens) - 2,
                                                max(outcome.gens) + 1),
                                     why='bulk written, upload not'))
        return extra

    def allowed(self, id, outcome, version, seen, failures, broken, calls):
        """Whether the server and the flush's report fit ``outcome``."""
        if broken:
            reported = True
        elif outcome.kind == 'unchanged' and outcome.error is not None:
            reported = id in failures and isinstance(failures[id],
                                                     outcome.error)
            if outcome.error is Exception:      # refused, not a conflict
                reported = reported and not isinstance(
                    failures[id], couchdb.ResourceConflict)
        else:
            reported = id not in failures
        if not reported:
            return False
        if not broken and outcome.resolver is True and id not in calls:
            return False
        if not broken and outcome.resolver is False and id in calls:
            return False
        if outcome.kind == 'unchanged':
            if version is None or version.body is None:
                return id not in seen
            return id in seen and seen[id][0] == version.rev
        if outcome.body is None:
            return id not in seen
        if id not in seen:
            return False
        rev, content, stubs = seen[id]
        if generation_of(rev) not in outcome.gens:
            return False
        if not same(content, outcome.body, exact_numbers=False):
            return False
        if set(stubs) != set(outcome.attachments):
            return False
        return all(any(stubs[name] == (digest(c), len(c)) for c in allowed)
                   for name, allowed in outcome.attachments.items())

    def settle(self, id, outcome, seen, broken, results):
        """Make the model what ``outcome`` left."""
        held = self.held[id]
        if outcome.below is not None and not broken:
            # Settled as its own write, under the writer's change.
            if outcome.below.body is None:
                self.drop_refs(id)
                del self.held[id]
            else:
                held.kind, held.base = 'fetched', outcome.below
            return
        if outcome.kind == 'unchanged':
            if outcome.error is couchdb.ResourceNotFound or (
                    held.kind == 'deleted by id' and not broken and
                    id not in [doc['_id'] for doc in self.S.deleted]):
                del self.held[id]       # reported (or not), and forgotten
            return
        version = self.observe(id, seen)
        if version is not None and version.body is not None:
            # The contents of the attachments, from the digests.
            version.attachments = dict(
                (name, next(c for c in outcome.attachments[name]
                            if (digest(c), len(c)) == stub))
                for name, stub in version.attachments.items())
        self.server[id] = version
        if broken:
            self.landed[id] = version
            return
        if outcome.body is None:
            assert id not in self.S, '%r is still in the session' % id
            self.drop_refs(id)
            del self.held[id]
            return
        ok = dict((i, rev) for success, i, rev in results or () if success)
        assert ok.get(id) == version.rev, \
            'results give %r for %r, the server has %s' % (
                ok.get(id), id, version.rev)
        if held.doc is None:
            # A resolution brought back a document deleted in the session.
            held.doc, held.mirror = self.S[id], copy.deepcopy(outcome.body)
            self.refs.append(Ref(id, held.doc, held.mirror))
        elif not same(held.mirror, outcome.body):
            self.repoint(id, outcome.body)
        held.kind, held.base = 'fetched', version
        held.attachments = dict(version.attachments)
        held.pending = {}

    def repoint(self, id, content):
        """Rule 8: the document's content was replaced by ``content``."""
        held = self.held[id]
        mirror = copy.deepcopy(content)
        kept = []
        for ref in self.refs:
            if ref.id != id:
                kept.append(ref)
                continue
            path = path_to(held.mirror, ref.mirror)
            if path is None:
                kept.append(ref)        # taken out before: stays as it was
                continue
            if ref.plain:
                continue
            node = follow(mirror, path) if all(
                isinstance(k, str) for k in path) else None
            if node is not None and type(node) is type(ref.mirror):
                ref.mirror = node
                kept.append(ref)
        held.mirror = mirror
        self.refs = kept

    # -- Invariants.

    @invariant()
    def the_model_holds(self):
        self.server_holds_what_the_model_says()
        self.documents_and_references_show_what_the_user_did()
        self.diff_is_the_change_since_the_base()
        self.has_changes_while_something_needs_writing()

    def server_holds_what_the_model_says(self):
        seen = self.read_server()
        live = set(id for id, version in self.server.items()
                   if version.body is not None)
        assert set(seen) == live, 'the server has %r, the model %r' % (
            sorted(seen), sorted(live))
        for id in live:
            version = self.server[id]
            rev, content, stubs = seen[id]
            assert rev == version.rev, (id, rev, version.rev)
            assert same(content, version.body, exact_numbers=False), (
                id, content, version.body)
            assert stubs == dict((name, (digest(c), len(c))) for name, c in
                                 version.attachments.items()), (id, stubs)

    def documents_and_references_show_what_the_user_did(self):
        for id, held in self.held.items():
            if not held.live:
                assert id not in self.S
                continue
            doc = held.doc
            assert self.S[id] is doc
            assert doc['_id'] == id, doc
            assert same(user_body(doc), held.mirror), (
                'document %r holds %r, the user made it %r' % (
                    id, user_body(doc), held.mirror))
            if held.kind == 'fetched':
                assert doc['_rev'] == held.base.rev, (doc['_rev'], held.base)
            assert sorted(doc.get('_attachments') or {}) == \
                sorted(held.attachments), (id, doc.get('_attachments'),
                                           held.attachments)
        for ref in self.refs:
            if ref.plain:
                assert same(ref.obj, ref.mirror), (
                    'a plain value stored into %r is %r, the document has %r'
                    ' there (rule 7)' % (ref.id, ref.obj, ref.mirror))
            else:
                shown = user_body(ref.obj) if ref.obj is \
                    self.root_of(ref) else copy.deepcopy(ref.obj)
                assert same(shown, ref.mirror), (
                    'a kept reference into %r shows %r, the model %r'
                    % (ref.id, ref.obj, ref.mirror))

    def diff_is_the_change_since_the_base(self):
        for id, held in self.held.items():
            if not held.live:
                continue
            ops = [op for op in self.S.diff(held.doc)
                   if not op['path'].startswith('/_')]
            base = {} if held.kind == 'new' else copy.deepcopy(
                held.base.body)
            assert same(jsonpatch.apply_patch(base, ops), held.mirror), (
                'S.diff(%r) = %r does not make %r of %r' % (
                    id, ops, held.mirror, base))

    def has_changes_while_something_needs_writing(self):
        needed = maybe = False
        for id, held in self.held.items():
            if id not in self.unsure:
                needed = needed or held.has_work()
                continue
            # Rule 6: needed if the server differs from the user's intent.
            version = self.landed.get(id, ())
            if version == () and self.own_write_below(id) is not None:
                differs = False     # the session may have settled it so
            elif version == () and held.mine()[0] is ABSENT:
                server = self.server.get(id)
                differs = server is not None and server.body is not None
            elif version == ():
                differs = held.has_work()
            else:
                mine, mine_atts = held.mine()
                if version is None or version.body is None:
                    differs = mine is not ABSENT
                else:
                    differs = mine is ABSENT or not same(
                        mine, version.body, exact_numbers=False) or \
                        mine_atts != version.attachments
            needed = needed or differs
            maybe = True
        if needed:
            assert self.S.has_changes(), 'has_changes() is False'
        elif not maybe:
            assert not self.S.has_changes(), 'has_changes() is True'


def test_the_session_keeps_to_the_users_intent(server_url):
    """The stateful model: see the comment above `SessionMachine`."""
    run_machine(SessionMachine, server_url, MODEL_PROFILE)


# -- Stateful model: counters, two sessions, a writer and lost answers --------

# `SessionMachine` keeps its writer off the documents a broken flush left
# unsure, and tries one fault at a time: the model of what a merge may do
# after two broken flushes and another writer's change would be ambiguous.
# This machine drops both limits for one intent a model can state exactly:
# counting. Two sessions and a plain python-couchdb writer count on shared
# documents; each count adds 1 to ``n`` and a tag of its own to ``seen``, in
# one edit, so the server's ``n`` equals the number of its tags whatever the
# order of the writes, unless a count was written twice or half. The
# sessions flush through the forwarder, often through faults (answers
# dropped, requests cut, connections reset), in any order and one after the
# other, with 'raise' or with a resolver that adds the user's counts since
# the base to the server's: a base that is not what the user counted from
# counts twice or drops counts. In the end each session flushes with that
# resolver, and the server must hold every count made, once.

COUNTERS = ['c', 'd']


def add_my_counts(mine, theirs, base):
    """The server's version with what the user counted since ``base``."""
    seen = dict(theirs['seen'])
    seen.update((tag, True) for tag in mine['seen']
                if tag not in base['seen'])
    return dict(theirs, n=theirs['n'] + mine['n'] - base['n'], seen=seen)


class CountingMachine(ForwardedMachine):

    def __init__(self):
        super().__init__()
        for id in COUNTERS:
            self.db[id] = {'n': 0, 'seen': {}}
        self.sessions = [self.session() for _ in (0, 1)]
        self.refs = [{}, {}]    # {id: the session's doc['seen'], kept}
        self.made = dict((id, set()) for id in COUNTERS)
        self.tags = itertools.count()

    def count_on(self, doc, seen, who):
        """Count on ``doc`` (its ``seen`` may be a reference kept to it);
        the tag of the count."""
        tag = '%s%d' % (who, next(self.tags))
        doc['n'] += 1
        seen[tag] = True
        return tag

    @rule(who=st.sampled_from([0, 1]), id=st.sampled_from(COUNTERS),
          kept=st.booleans())
    def user_counts(self, who, id, kept):
        """A user counts, through the document, or through a reference to
        its ``seen`` kept since an earlier count."""
        doc = self.sessions[who][id]
        seen = self.refs[who].setdefault(id, doc['seen']) if kept else \
            doc['seen']
        self.made[id].add(self.count_on(doc, seen, 'u%d-' % who))

    @rule(id=st.sampled_from(COUNTERS))
    def writer_counts(self, id):
        while True:
            doc = self.db[id]
            tag = self.count_on(doc, doc['seen'], 'w-')
            try:
                self.db.save(doc)
            except couchdb.ResourceConflict:
                continue
            self.made[id].add(tag)
            return

    @rule(who=st.sampled_from([0, 1]),
          policy=st.sampled_from(['raise', 'resolve']),
          fault=st.sampled_from([None, 'drop_answer', 'drop_answer',
                                 'drop_answer', 'cut_before', 'cut_before',
                                 'reset']),
          times=st.sampled_from([2, 2, 1]), bulk_only=st.booleans())
    def user_flushes(self, who, policy, fault, times, bulk_only):
        if fault is not None:
            self.forwarder.fail(fault, times=times,
                                when=is_bulk_docs if bulk_only else None)
        try:
            outcome = self.sessions[who].flush(
                on_conflict='raise' if policy == 'raise' else add_my_counts)
        except FlushError as exc:
            outcome = exc
        except Exception as exc:
            if fault is None or not is_connection_failure(exc):
                raise
            outcome = exc
        finally:
            self.forwarder.mode = 'pass'
        note('session %d flush(%s) through %s: %r' % (who, policy, fault,
                                                       outcome))
        event('counting flush: %s' % type(outcome).__name__)

    @invariant()
    def every_count_is_on_the_server_once_or_not_at_all(self):
        for id in COUNTERS:
            doc = self.db[id]
            assert doc['n'] == len(doc['seen']), (
                '%r: n is %d, with %d counts' % (id, doc['n'],
                                                 len(doc['seen'])))
            assert set(doc['seen']) <= self.made[id], doc

    def teardown(self):
        try:
            self.forwarder.mode = 'pass'
            for who, S in enumerate(self.sessions):
                for _ in range(3):
                    try:
                        S.flush(on_conflict=add_my_counts)
                        break
                    except FlushError as exc:
                        note('final flush of session %d: %r' % (who, exc))
                assert not S.has_changes(), 'session %d kept changes' % who
            for id in COUNTERS:
                doc = self.db[id]
                assert set(doc['seen']) == self.made[id], (
                    '%r: the server has %r, the users made %r'
                    % (id, sorted(doc['seen']), sorted(self.made[id])))
                assert doc['n'] == len(self.made[id]), doc
        finally:
            super().teardown()


settings.register_profile(
    'counting-ci', settings.get_profile('stateful-ci'), max_examples=80,
    stateful_step_count=25)
settings.register_profile(
    'counting-soak', settings.get_profile('stateful-soak'), max_examples=2000)
COUNTING_PROFILE = 'counting-soak' if os.environ.get('SESSION_SOAK') == '1' \
    else 'counting-ci'


def test_counts_survive_two_sessions_a_writer_and_lost_answers(server_url):
    """The counting model: see the comment above `CountingMachine`."""
    run_machine(CountingMachine, server_url, COUNTING_PROFILE)


# -- Deep documents -----------------------------------------------------------

# python-couchdb sends and reads back documents about as deep as the
# recursion limit (its JSON codec is C), deeper than the session's helpers
# could recurse: these documents reach that depth. ``==``, ``repr`` and json
# would recurse over them too, so the tests look at them with `nest` and
# `bottom`, which do not. The session works at any depth: the tests without
# a server go to 2000 levels, over a dict standing in for the database.
# Its helpers recurse up to the recursion limit before they switch to their
# twins; a finalizer the garbage collector runs just then (python-couchdb's
# ConnectionPool.__del__, left by earlier tests) fails for want of stack,
# and pytest reports that as an error. `nest` collects garbage first.

DEPTHS = [500, 900]


def nest(depth, **bottom):
    """The dict ``bottom`` under ``depth`` dicts, each the value of the key
    'x' of the one above."""
    gc.collect()
    value = bottom
    for _ in range(depth):
        value = {'x': value}
    return value


def bottom(value):
    """``(depth, innermost dict)`` of a value made by `nest` (a tracked one
    gives a tracked dict)."""
    depth = 0
    while 'x' in value:
        value = value['x']
        depth += 1
    return depth, value


def deep_doc(db, id, depth, **bottom_values):
    """Write a document ``depth`` deep straight to the server."""
    db.save(dict(nest(depth, **bottom_values), _id=id, top=0))


def deep_change(db, id, **values):
    """Another writer changes the bottom of a deep document."""
    doc = db[id]
    bottom(doc)[1].update(values)
    db.save(doc)


def deep_stored(db, id):
    """``(depth, bottom, top-level keys)`` of the server's document."""
    doc = db[id]
    return bottom(doc) + (sorted(doc),)


def path_to_bottom(depth, key):
    return '/x' * depth + '/' + key


@pytest.mark.parametrize('depth', DEPTHS)
def test_a_deep_document_is_created_and_flushed(db, depth):
    """A document as deep as python-couchdb can send is created, copied
    and written in one flush, whole."""
    data = nest(depth, v=[1, {'w': None}])
    S = Session(db)
    S.create(dict(data, _id='deep'))
    bottom(data)[1]['v'] = 'changed after create'
    [(ok, _, _)] = S.flush()
    assert ok
    assert deep_stored(db, 'deep') == (depth, {'v': [1, {'w': None}]},
                                       ['_id', '_rev', 'x'])


@pytest.mark.parametrize('depth', DEPTHS)
def test_a_deep_document_read_back_is_edited_at_the_bottom(db, depth):
    """A deep document read back and changed at the bottom: the diff is
    that change, with its path, and flush writes it."""
    deep_doc(db, 'deep', depth, v=0, gone=1)
    S = Session(db)
    doc = S['deep']
    _, inner = bottom(doc)
    inner['v'] = 1
    del inner['gone']
    inner['list'] = [nest(3, k='new')]
    assert S.diff(doc) == [
        {'op': 'replace', 'path': path_to_bottom(depth, 'v'), 'value': 1,
         'was': 0},
        {'op': 'remove', 'path': path_to_bottom(depth, 'gone'), 'was': 1},
        {'op': 'add', 'path': path_to_bottom(depth, 'list'),
         'value': [nest(3, k='new')]}]
    S.flush()
    assert deep_stored(db, 'deep') == (
        depth, {'v': 1, 'list': [nest(3, k='new')]}, ['_id', '_rev', 'top',
                                                     'x'])
    assert generation(db, 'deep') == 2 and S.dirty == []


@pytest.mark.parametrize('depth', DEPTHS)
def test_a_deep_document_merges_with_a_concurrent_change(db, depth):
    """'merge': changes at the bottom of a deep document on both sides, to
    different keys, are merged and written on the server's revision, with
    an ordinary document merged in the same flush."""
    deep_doc(db, 'deep', depth, v=0, w=0)
    put(db, 'other', v=0, w=0)
    S = Session(db)
    bottom(S['deep'])[1]['v'] = 'mine'
    S['other']['v'] = 'mine'
    deep_change(db, 'deep', w='theirs')
    change(db, 'other', w='theirs')
    S.flush(on_conflict='merge')
    assert deep_stored(db, 'deep') == (depth, {'v': 'mine', 'w': 'theirs'},
                                       ['_id', '_rev', 'top', 'x'])
    assert content(db, 'other') == {'v': 'mine', 'w': 'theirs'}
    assert generation(db, 'deep') == generation(db, 'other') == 3
    assert bottom(S['deep'])[1] == {'v': 'mine', 'w': 'theirs'}
    assert S.dirty == [] and S['deep'].rev == db['deep'].rev


@pytest.mark.parametrize('depth', DEPTHS)
def test_a_deep_conflict_is_reported_with_its_path(db, depth):
    """'merge': the same bottom key changed on both sides of a deep
    document is a real conflict naming its path; the ordinary document of
    the same flush is written."""
    deep_doc(db, 'deep', depth, v=0)
    put(db, 'other', v=0)
    S = Session(db)
    bottom(S['deep'])[1]['v'] = 'mine'
    S['other']['v'] = 'mine'
    deep_change(db, 'deep', v='theirs')
    with pytest.raises(FlushError) as caught:
        S.flush(on_conflict='merge')
    assert list(caught.value.failures) == ['deep']
    assert caught.value.failures['deep'].args[0] == (
        'conflict', 'both sides changed ' + path_to_bottom(depth, 'v'))
    assert deep_stored(db, 'deep')[1] == {'v': 'theirs'}
    assert content(db, 'other') == {'v': 'mine'}
    assert S.dirty == [S['deep']] and bottom(S['deep'])[1]['v'] == 'mine'


@pytest.mark.parametrize('depth', DEPTHS)
def test_a_deep_document_overwrites_a_concurrent_change(db, depth):
    """'overwrite': the session's deep document replaces the server's,
    with an ordinary document written in the same flush."""
    deep_doc(db, 'deep', depth, v=0, w=0)
    put(db, 'other', v=0)
    S = Session(db)
    bottom(S['deep'])[1]['v'] = 'mine'
    S['other']['v'] = 'mine'
    deep_change(db, 'deep', v='theirs', w='theirs')
    S.flush(on_conflict='overwrite')
    assert deep_stored(db, 'deep') == (depth, {'v': 'mine', 'w': 0},
                                       ['_id', '_rev', 'top', 'x'])
    assert content(db, 'other') == {'v': 'mine'}
    assert generation(db, 'deep') == 3 and S.dirty == []


# -- Deep documents: 2000 levels, no server -----------------------------------

def held(depth, **bottom_values):
    """A session over a dict standing in for the database (only ``S[id]``
    reads it), holding document 'deep' ``depth`` deep."""
    document = couchdb.Document(nest(depth, **bottom_values), _id='deep',
                                _rev='1-a')
    S = Session({'deep': document})
    return S, S['deep']


def test_a_2000_deep_value_is_copied_in_and_out():
    """Values 2000 deep are deep-copied into the session and out of it:
    changing the caller's value, or a copy, leaves the document alone; a
    new document's diff adds them."""
    data = nest(2000, v=[1])
    S = Session(None)
    doc = S[S.create(dict(data, _id='n'))]
    bottom(data)[1]['v'].append('caller')
    copies = [copy.deepcopy(doc), doc.copy(), doc['x'].copy()]
    for copied in copies:
        bottom(copied)[1]['v'].append('copy')
        assert type(bottom(copied)[1]) is dict
    assert [bottom(copied) for copied in copies] == [
        (2000, {'v': [1, 'copy']}), (2000, {'v': [1, 'copy']}),
        (1999, {'v': [1, 'copy']})]
    assert bottom(doc) == (2000, {'v': [1]}) and S.dirty == []
    [add_x, add_id] = S.diff(doc)
    assert add_id == {'op': 'add', 'path': '/_id', 'value': 'n'}
    assert add_x['op'] == 'add' and add_x['path'] == '/x'
    assert bottom(add_x['value']) == (1999, {'v': [1]})


def test_a_2000_deep_change_is_diffed_at_the_bottom():
    """A change at the bottom of a 2000-deep document is diffed as that
    change; one replacing the top then says what the top was (the version
    fetched)."""
    S, doc = held(2000, v=0)
    bottom(doc)[1]['v'] = 1
    assert S.diff(doc) == [{'op': 'replace', 'path': path_to_bottom(2000, 'v'),
                            'value': 1, 'was': 0}]
    doc['x']['x'] = 'flat'
    [op] = S.diff(doc)
    assert (op['op'], op['path'], op['value']) == ('replace', '/x/x', 'flat')
    assert bottom(op['was']) == (1998, {'v': 0})


def test_a_2000_deep_list_change_is_diffed_at_the_bottom():
    """Lists nested 2000 deep: an item appended at the bottom is one
    ``add``."""
    content = [0]
    for _ in range(2000):
        content = [content]
    document = couchdb.Document(_id='deep', _rev='1-a', l=content)
    S = Session({'deep': document})
    inner = S['deep']['l']
    while isinstance(inner[0], list):
        inner = inner[0]
    inner.append(1)
    assert S.diff(S['deep']) == [
        {'op': 'add', 'path': '/l' + '/0' * 2000 + '/1', 'value': 1}]


def test_a_bad_value_2000_deep_is_named_by_its_path():
    """A value JSON cannot carry, 2000 deep, fails the flush naming its
    path, before anything is sent."""
    S = Session(None)       # nothing may reach a database
    S.create(dict(nest(2000, v=[math.nan]), _id='n'))
    with pytest.raises(ValueError) as caught:
        S.flush()
    assert "document 'n'" in str(caught.value)
    assert 'the value at %s is nan' % (path_to_bottom(2000, 'v') + '/0') \
        in str(caught.value)
    S, doc = held(2000, v=0)
    bottom(doc)[1][1] = 'int key'
    with pytest.raises(TypeError) as caught:
        S.flush()
    assert 'the key 1 at %s is an int' % ('/x' * 2000) in str(caught.value)


def test_a_value_that_holds_itself_is_refused():
    """A dict holding itself cannot be copied in: ValueError, nothing
    queued (it used to run out of stack)."""
    loop = {'v': []}
    loop['v'].append(loop)
    S = Session(None)
    with pytest.raises(ValueError, match='holds itself'):
        S.create({'_id': 'n', 'loop': loop})
    assert S.new == []


def test_2000_deep_values_compare_as_json():
    """`_same` at 2000 levels: equal is equal, 1 is not 1.0 (unless numbers
    compare loosely) nor True, and one changed leaf differs."""
    same = session._same
    assert same(nest(2000, v=1), nest(2000, v=1))
    assert not same(nest(2000, v=1), nest(2000, v=2))
    assert not same(nest(2000, v=1), nest(2000, v=1.0))
    assert same(nest(2000, v=1), nest(2000, v=1.0), loose_numbers=True)
    assert not same(nest(2000, v=1), nest(2000, v=True), loose_numbers=True)
    assert not same(nest(2000, v=1), nest(1999, v=1))


def test_2000_deep_documents_merge_three_ways():
    """The three-way merge at 2000 levels: changes to different bottom keys
    merge; the same key changed differently is a conflict naming its
    path."""
    base = nest(2000, v=0, w=0)
    merged = session._merge_documents(base, nest(2000, v=1, w=0),
                                      nest(2000, v=0, w=2), False)
    assert bottom(merged) == (2000, {'v': 1, 'w': 2})
    with pytest.raises(session._MergeConflict) as caught:
        session._merge_documents(base, nest(2000, v=1, w=0),
                                 nest(2000, v=2, w=0), False)
    assert str(caught.value) == 'both sides changed ' + \
        path_to_bottom(2000, 'v')


def test_2000_deep_versions_diff_at_the_bottom():
    """The diff of two whole versions 2000 deep (as of a document created
    or resolved in the session) finds the changes at the bottom, in
    document order."""
    old = nest(2000, v=0, l=[[1, 2]], gone=None)
    new = nest(2000, v=1, l=[[1, 3]], added=True)
    ops = []
    session._diff_dict(ops, None, old, new)
    at = path_to_bottom(2000, '')
    assert ops == [
        {'op': 'replace', 'path': at + 'v', 'value': 1, 'was': 0},
        {'op': 'replace', 'path': at + 'l/0/1', 'value': 3, 'was': 2},
        {'op': 'remove', 'path': at + 'gone', 'was': None},
        {'op': 'add', 'path': at + 'added', 'value': True}]
