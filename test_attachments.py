"""Attachments in a `Session`, tested against a real CouchDB-compatible server.

`put_attachment` and `delete_attachment` are queued until `flush()`; small
attachments travel inline (base64) in the ``_bulk_docs`` request of their
document, large ones are uploaded after it with a ``PUT`` each. The `wire`
fixture records every HTTP request python-couchdb makes; the server's state
is always checked with plain python-couchdb on the `db` fixture.
"""

import base64
import io
import json
import mimetypes
import random
from urllib.parse import unquote, urlsplit

import couchdb
import couchdb.http
import pytest

from session import FlushError, Session

try:
    from tools.forwarder import Forwarder, is_bulk_docs
except ImportError:             # the forwarder is not written yet
    Forwarder = is_bulk_docs = None

#: Every byte value, both ways round.
ALL_BYTES = bytes(range(256)) + bytes(reversed(range(256)))

#: 5 MiB of incompressible content, for uploads that must stream.
BIG = random.Random(5).randbytes(5 * 1024 * 1024)

#: A small inline limit for tests that want cheap "large" attachments.
LIMIT = 100
SMALL = b'small content ' * 3               # 42 bytes: inline under LIMIT
LARGE = ALL_BYTES * 2                       # 1024 bytes: PUT under LIMIT
SIZES = {'small': SMALL, 'large': LARGE}

VALIDATE = """function (newDoc, oldDoc, userCtx) {
    if (newDoc.forbidden) throw({forbidden: 'no forbidden docs'});
}"""

_MISSING = object()


# -- Fixtures and helpers -----------------------------------------------------

class Wire(list):
    """``(method, path in the database, body)`` of every request python-couchdb
    made since the fixture started (or `clear()`). JSON bodies are snapshots
    (python-couchdb gets them as dicts), attachment bodies are what was given:
    bytes, or the file-like object that was streamed."""

    def __init__(self, db):
        list.__init__(self)
        self.prefix = urlsplit(db.resource.url).path.rstrip('/') + '/'

    def calls(self):
        return [(method, path) for method, path, _ in self]

    def bulk_bodies(self):
        return [body for method, path, body in self
                if (method, path) == ('POST', '_bulk_docs')]

    def puts(self):
        return [(path, body) for method, path, body in self if method == 'PUT']


@pytest.fixture
def wire(db, monkeypatch):
    recorded = Wire(db)
    request = couchdb.http.Session.request

    def recording(self, method, url, body=None, *args, **kwargs):
        path = unquote(urlsplit(url).path)
        if path.startswith(recorded.prefix):
            path = path[len(recorded.prefix):]
        if isinstance(body, (dict, list)):
            body = json.loads(json.dumps(body))
        recorded.append((method, path, body))
        return request(self, method, url, body, *args, **kwargs)

    monkeypatch.setattr(couchdb.http.Session, 'request', recording)
    return recorded


@pytest.fixture
def validated(db):
    """The database refuses documents with a true ``forbidden`` field."""
    db['_design/validate'] = {'validate_doc_update': VALIDATE}


def put(db, id, **content):
    """Write a document straight to the server; return it as stored."""
    content['_id'] = id
    db.save(content)
    return db[id]


def put_with_attachments(db, id, attachments, **content):
    """Write a document with attachments straight to the server, with plain
    python-couchdb (one PUT per attachment)."""
    doc = put(db, id, **content)
    for filename, data in attachments.items():
        db.put_attachment(doc, data, filename)
    return db[id]


def change(db, id, **values):
    """Another writer changes a document on the server."""
    doc = db[id]
    doc.update(values)
    db.save(doc)
    return doc


def fields(db, id):
    """The server's document without ``_id``, ``_rev`` and ``_attachments``."""
    return dict((k, v) for k, v in db[id].items()
                if k not in ('_id', '_rev', '_attachments'))


def generation(db, id):
    """The number before the dash of the server's revision of ``id``."""
    return int(db[id].rev.split('-')[0])


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


# -- Round trips --------------------------------------------------------------

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


# -- Requests -----------------------------------------------------------------

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


# -- Deleting -----------------------------------------------------------------

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


# -- Reading ------------------------------------------------------------------

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


# -- Conflicts ----------------------------------------------------------------

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


# -- Documents the server refuses ---------------------------------------------

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


# -- Broken connections -------------------------------------------------------

needs_forwarder = pytest.mark.skipif(
    Forwarder is None, reason='tools/forwarder.py is not there yet')


def is_put(method, path):
    """A predicate for `Forwarder.fail`: any PUT (an attachment upload)."""
    return method == 'PUT'


@pytest.fixture
def forwarder(server_url):
    """A `Forwarder` to the test server, in 'pass' mode."""
    parts = urlsplit(server_url)
    if parts.scheme != 'http':
        pytest.skip('the forwarder speaks plain HTTP only')
    with Forwarder(parts.hostname, parts.port or 80) as fw:
        yield fw


@pytest.fixture
def remote(forwarder, db, server_url):
    """The test database reached through the forwarder, with its own
    connection pool."""
    parts = urlsplit(server_url)
    netloc = urlsplit(forwarder.url).netloc
    if parts.username:
        netloc = parts.netloc.rpartition('@')[0] + '@' + netloc
    url = 'http://%s%s%s' % (netloc, parts.path.rstrip('/') + '/', db.name)
    return couchdb.Database(url, session=couchdb.http.Session())


def forwarded(forwarder, method, kind):
    """How many requests of ``method`` to paths ending in ``kind`` reached
    the server."""
    return sum(count for (m, path), count in forwarder.forwarded.items()
               if m == method and path.endswith(kind))


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


@needs_forwarder
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


@needs_forwarder
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


@needs_forwarder
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


@needs_forwarder
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


@needs_forwarder
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
