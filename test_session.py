"""The contract of `session`, tested against a real CouchDB-compatible server.

Each test gets a fresh database (the `db` fixture of conftest.py). The `wire`
fixture records every HTTP request python-couchdb makes, so tests can assert
what went over the wire.
"""

import copy
import doctest
import importlib.util
import json
import math
import os
from urllib.parse import parse_qs, unquote, urlsplit

import couchdb
import couchdb.http
import jsonpatch
import pytest

import session
from session import FlushError, Session
from tools.localserver import temporary_database


# -- Fixtures and helpers -----------------------------------------------------

class Request(object):
    """One HTTP request: method, path within the database, query, body."""

    def __init__(self, method, url, body):
        parts = urlsplit(url)
        self.method = method
        self.path = unquote(parts.path)
        self.query = parse_qs(parts.query)
        self.body = json.loads(body) if isinstance(body, (str, bytes)) \
            and body else body

    def __repr__(self):
        return '%s %s' % (self.method, self.path)


class Wire(list):
    """The requests made since the fixture started (or `clear()`)."""

    def __init__(self, db):
        list.__init__(self)
        self.prefix = urlsplit(db.resource.url).path.rstrip('/')

    def calls(self):
        """``(method, path)`` of each request, the path relative to the
        database ('' for the database itself)."""
        return [(r.method, r.path[len(self.prefix):].lstrip('/'))
                for r in self]

    def bulk_posts(self):
        return [r for r in self if r.method == 'POST' and
                r.path.endswith('/_bulk_docs')]

    def writes(self):
        return [r for r in self if r.method in ('PUT', 'DELETE') or
                r.path.endswith('/_bulk_docs')]


@pytest.fixture
def wire(db, monkeypatch):
    recorded = Wire(db)
    original = couchdb.http.Session.request

    def request(self, method, url, body=None, *args, **kwargs):
        recorded.append(Request(method, url, body))
        return original(self, method, url, body, *args, **kwargs)

    monkeypatch.setattr(couchdb.http.Session, 'request', request)
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


def test_readme_examples_run(db):
    """Every example in README.txt works as shown."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        'README.txt')
    failures, tries = doctest.testfile(
        path, module_relative=False, globs={'db': db},
        optionflags=doctest.ELLIPSIS)
    assert failures == 0
    assert tries > 30


def test_namespace_is_the_api():
    """dir(session) shows the API, and __all__ names it."""
    public = [name for name in dir(session) if not name.startswith('_')]
    assert sorted(public) == ['FlushError', 'Session']
    assert sorted(session.__all__) == ['FlushError', 'Session']


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
    """get_many: one POST _all_docs for the ids not cached, in order."""
    for id in 'abc':
        put(db, id, name=id)
    S = Session(db)
    a = S['a']
    wire.clear()
    docs = S.get_many(['b', 'a', 'nope', 'c', 'b'])
    assert wire.calls() == [('POST', '_all_docs')]
    assert wire[0].body == {'keys': ['b', 'nope', 'c']}
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
    """Not a dict: TypeError; bad _id: ValueError; held id: conflict."""
    put(db, 'held', v=1)
    S = Session(db)
    with pytest.raises(TypeError):
        S.create('x')
    with pytest.raises(TypeError):
        S['y'] = ['not', 'a', 'dict']
    for bad in (5, None, '', '_secret'):
        with pytest.raises(ValueError):
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


# -- Passing through to the database -----------------------------------------

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


def test_dict_proxy_iterates_over_keys(db):
    """Iterating a tracked dict gives its keys (ProxyTypes alone would
    not)."""
    put(db, 'doc', a=1, b={'c': 2})
    doc = Session(db)['doc']
    assert sorted(doc) == ['_id', '_rev', 'a', 'b']
    assert list(doc['b']) == ['c']
    assert sorted(k for k, v in doc.items()) == ['_id', '_rev', 'a', 'b']


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
    """A dict or list stored in a document is tracked, also after a
    flush; the session stores a copy."""
    put(db, 'doc')
    S = Session(db)
    doc = S['doc']
    value = {'tags': []}
    doc['new'] = value
    value['tags'].append('outside')        # the session holds a copy
    S.flush()
    doc['new']['tags'].append('inside')
    assert S.dirty == [doc]
    S.flush()
    assert db['doc']['new'] == {'tags': ['inside']}


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
                  '5. memory'):
        assert title in out


def test_benchmark_session_requests_match_the_hand_written_floor(server):
    """On the edit and mixed workloads the session makes exactly as many
    requests as hand-written bulk code, however often it reads an id."""
    bench = load_benchmark()
    meter = bench.Meter()
    try:
        for workload in (lambda db: bench.edit_workload(db, meter, 30, 1),
                         lambda db: bench.mixed_workload(db, meter, 1)):
            with temporary_database(server) as db:
                requests = dict((row[0], row[1]) for row in workload(db))
            assert requests['session'] == requests['floor'] == 2
            assert requests['naive'] > 30
    finally:
        meter.close()


def load_benchmark():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        'benchmarks', 'bench_session.py')
    spec = importlib.util.spec_from_file_location('bench_session', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
