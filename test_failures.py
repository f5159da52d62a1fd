"""What `Session.flush()` does when things go wrong, against a real server.

Documents the server refuses, conflicts with other writers (``on_conflict``),
and broken connections: the session's database goes through a
`tools.forwarder.Forwarder`, a TCP forwarder that refuses connections, cuts
them before a request reaches the server, or drops the server's answer after
the server applied the request. The test checks the server's state through
the direct ``db`` fixture.

Every test ends with the server holding exactly the documents the user
meant, each written once: revision numbers (``'2-...'``) prove there was no
second write.
"""

import errno
import itertools
import json
from urllib.parse import unquote, urlsplit

import couchdb
import couchdb.http
import pytest

from session import FlushError, Session
from tools.forwarder import Forwarder, is_bulk_docs

VALIDATE = """function (newDoc, oldDoc, userCtx) {
    if (newDoc.forbidden) throw({forbidden: 'no forbidden docs'});
}"""


# -- Fixtures and helpers -----------------------------------------------------

class Recorder(list):
    """``(method, path in the database, JSON body)`` of every request
    python-couchdb made since the fixture started (or `clear()`)."""

    def __init__(self, db):
        list.__init__(self)
        self.prefix = urlsplit(db.resource.url).path.rstrip('/') + '/'

    def calls(self):
        return [(method, path) for method, path, _ in self]

    def bulk_ids(self):
        """The ids sent by each ``_bulk_docs`` request, one list each."""
        return [[doc['_id'] for doc in body['docs']]
                for method, path, body in self if path == '_bulk_docs']


@pytest.fixture
def wire(db, monkeypatch):
    """A `Recorder` of the requests made through python-couchdb."""
    recorder = Recorder(db)
    request = couchdb.http.Session.request

    def recording(self, method, url, body=None, *args, **kwargs):
        path = unquote(urlsplit(url).path)
        if path.startswith(recorder.prefix):
            path = path[len(recorder.prefix):]
        decoded = json.loads(body) if isinstance(body, (str, bytes)) \
            and body else body
        recorder.append((method, path, decoded))
        return request(self, method, url, body, *args, **kwargs)

    monkeypatch.setattr(couchdb.http.Session, 'request', recording)
    return recorder


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


def bulk_posts(forwarder):
    """How many ``POST _bulk_docs`` reached the server via ``forwarder``."""
    return sum(count for (method, path), count in forwarder.forwarded.items()
               if is_bulk_docs(method, path))


def put(db, id, **content):
    """Write a document straight to the server; return it as stored."""
    content['_id'] = id
    db.save(content)
    return db[id]


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


# -- Documents the server refuses ---------------------------------------------

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


# -- Conflicts: 'raise' -------------------------------------------------------

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


# -- Conflicts: 'overwrite' ---------------------------------------------------

def test_overwrite_writes_the_sessions_version_over_theirs(db, wire):
    """'overwrite': the session's whole version replaces the server's,
    on the server's revision; no FlushError."""
    put(db, 'a', v=0, keep=1)
    S = Session(db)
    S['a']['v'] = 'mine'
    change(db, 'a', v='theirs', extra=True)
    wire.clear()
    [(ok, id, rev)] = S.flush(on_conflict='overwrite')
    assert wire.calls() == [('POST', '_bulk_docs'), ('POST', '_all_docs'),
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


def test_overwrite_change_over_their_deletion_writes_it_again(db):
    """'overwrite': a change over a server-side deletion writes the
    document again."""
    put(db, 'a', v=0)
    S = Session(db)
    S['a']['v'] = 'mine'
    db.delete(db['a'])
    S.flush(on_conflict='overwrite')
    assert content(db, 'a') == {'v': 'mine'}
    assert generation(db, 'a') == 3 and S['a'].rev == db['a'].rev


def test_overwrite_create_over_their_create(db):
    """'overwrite': a document created in the session replaces one created
    concurrently with the same id."""
    S = Session(db)
    S.create({'_id': 'n', 'v': 'mine'})
    put(db, 'n', v='theirs', other=1)
    S.flush(on_conflict='overwrite')
    assert content(db, 'n') == {'v': 'mine'} and generation(db, 'n') == 2


# -- Conflicts: 'merge' -------------------------------------------------------

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
    [_, _, resend] = [body for _, _, body in wire]
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


# -- Conflicts: a resolver function -------------------------------------------

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
    assert wire.calls() == [('POST', '_bulk_docs'), ('POST', '_all_docs'),
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


# -- Connection failures -----------------------------------------------------

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
    assert remote.get_attachment('d0', 'blob.bin').read() == b'x' * 50000
    assert db.get_attachment('d1', 'me.py').read().startswith(b'"""What')
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
    with pytest.raises(TimeoutError):
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
    with pytest.raises(TimeoutError):
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
                   path.endswith('/_all_docs'))
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
