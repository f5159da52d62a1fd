"""An editing session for CouchDB: read documents, change them as plain dicts
and lists, and write every change in one bulk request.

A `Session` wraps a python-couchdb `Database` and behaves like one, with two
differences: changes to the documents it hands out are tracked for you, and
nothing is written until `Session.flush()`, which sends every create, change
and delete in one ``POST /db/_bulk_docs``.

>>> S = Session(db)
>>> note_id = S.create({'type': 'note', 'owner': {'name': 'bob'}, 'tags': []})
>>> S.flush()[0][0]
True

A later request, in a new session:

>>> S = Session(db)
>>> note = S[note_id]                   # one GET; S[note_id] is note from now on
>>> note['owner']['name'] = 'ann'       # tracked, at any depth
>>> note['tags'].append('draft')
>>> S.diff(note)[0]
{'op': 'replace', 'path': '/owner/name', 'value': 'ann', 'was': 'bob'}
>>> results = S.flush()                 # one POST /db/_bulk_docs
>>> db[note_id]['owner']
{'name': 'ann'}

Contents, in reading order:

- `FlushError`: raised by `flush()` when the server refused some documents;
  `TooManyRequests`: raised instead of a request past `max_requests`.
- `Session`: the Database look-alike; `flush()` and its conflict handling,
  `diff()`, the hooks, attachments, and the housekeeping views `new`,
  `dirty` and `deleted`.
- Web requests: `Middleware` (one session per WSGI request, flushed before
  the answer goes out), `current()` and `plain()`.
- Private pieces: the tracked proxies (ProxyTypes wrappers around the
  documents' dicts and lists that tell the session when they change), the
  identity map (each document's entry and the table of its states),
  attachments waiting for a flush, flush planning, one flush (`_Flush`:
  writes, lost answers, uploads, and the one path that settles conflicts),
  merging, and copies and diffs.
"""

import base64 as _base64
import collections as _collections
import collections.abc as _abc
import contextvars as _contextvars
import errno as _errno
import functools as _functools
import gc as _gc
import hashlib as _hashlib
import io as _io
import itertools as _itertools
import json as _json
import logging as _logging
import marshal as _marshal
import math as _math
import mimetypes as _mimetypes
import os as _os
import random as _random
import select as _select
import shutil as _shutil
import tempfile as _tempfile
import time as _time
import types as _types
import uuid as _uuid
from itertools import compress as _compress, filterfalse as _filterfalse
from itertools import repeat as _repeat
from operator import contains as _contains, is_not as _is_not
from operator import attrgetter as _attrgetter
from operator import methodcaller as _methodcaller
from urllib.parse import urlsplit as _urlsplit

from couchdb.client import (Database as _Database, Document as _Document,
                            Row as _Row, Server as _Server)
from couchdb.http import (RETRYABLE_ERRORS as _RETRYABLE_ERRORS,
                          Forbidden as _Forbidden,
                          extract_credentials as _extract_credentials,
                          HTTPError as _HTTPError,
                          PreconditionFailed as _PreconditionFailed,
                          Resource as _Resource,
                          Session as _HTTPSession,
                          ResourceConflict as _ResourceConflict,
                          ResourceNotFound as _ResourceNotFound,
                          ServerError as _ServerError,
                          Unauthorized as _Unauthorized)
from peak.util.proxies import ObjectProxy as _ObjectProxy

__version__ = '0.1.0'

__all__ = [
    'FlushError',
    'Middleware',
    'Session',
    'TooManyRequests',
    'current',
    'plain',
]

_logger = _logging.getLogger('session')
_logger.addHandler(_logging.NullHandler())


# -- Shared constants ---------------------------------------------------------

# The states of a document in the session (see "The identity map").
_CLEAN, _DIRTY, _NEW, _DELETED = 'clean', 'dirty', 'new', 'deleted'

# The revision of a document deleted by id only, looked up at flush time.
_LOOKUP = object()

# An absent key or value, where None is a value.
_MISSING = object()

# The types of the JSON values that hold no others and need no check (a
# float may be NaN or infinite), and of those that hold others.
_JSON_LEAVES = frozenset([str, int, bool, type(None)])
# The values a read hands out as they are: every JSON value but a dict or
# a list.
_READ_LEAVES = _JSON_LEAVES | frozenset([float])
_CONTAINERS = (dict, list)
_NUMBERS = (int, float)

# What `clear` keeps of a document: its identity.
_IDENTITY = ('_id', '_rev')

# The top-level members starting with "_" that CouchDB takes in a document;
# it refuses a request holding any other ("Bad special document member").
_SPECIAL_MEMBERS = frozenset([
    '_id', '_rev', '_attachments', '_deleted', '_revisions', '_revs_info',
    '_conflicts', '_deleted_conflicts', '_local_seq', '_replication_id',
    '_replication_state', '_replication_state_time',
    '_replication_state_reason', '_replication_stats'])


# -- Exceptions ---------------------------------------------------------------

class FlushError(Exception):
    """Raised by `Session.flush()` when the server refused some documents.

    What was written is applied (new ``_rev``, clean); what was refused stays
    pending in the session, unchanged, so a later ``flush()`` retries exactly
    those documents. A failed document with nothing left to write is
    dropped instead, as the deletion of a document the server does not have
    (a ``ResourceNotFound``: it is gone already). The message says which
    document stays pending and which was dropped, and why.

    :ivar results: every ``(success, id, rev_or_exception)`` of the flush
    :ivar failures: ``{id: exception}`` of the documents not written, the
                    dropped ones included; a conflict is a
                    `couchdb.ResourceConflict`
    :ivar dropped: the set of the ids in `failures` that the session dropped:
                   the next ``flush()`` does not retry them
    """

    def __init__(self, results, failures, dropped=()):
        self.results = results
        self.failures = failures
        self.dropped = set(dropped)
        Exception.__init__(self, _failures_message(failures, self.dropped))


class TooManyRequests(RuntimeError):
    """Raised instead of sending a request past `Session.max_requests`.

    Nothing is sent, and nothing pending is lost: a `flush()` it stops
    keeps what it had written and leaves the rest pending.

    :ivar limit: the session's ``max_requests``
    :ivar method: the method of the request not sent
    :ivar url: its URL
    """

    def __init__(self, limit, method, url):
        self.limit, self.method, self.url = limit, method, url
        RuntimeError.__init__(
            self, 'The session has sent its max_requests (%d) requests: %s %s '
            'was not sent. Nothing pending is lost. Read in bulk (get_many, '
            'view(..., include_docs=True)) or raise max_requests.'
            % (limit, method, _url_path(url)))


def _failures_message(failures, dropped):
    """FlushError's message: the documents not written, each with the
    server's reason, grouped by what becomes of them."""
    pending, gone, forgotten = [], [], []
    for id, exc in sorted(failures.items()):
        named = '%r (%s)' % (id, _describe(exc))
        if id not in dropped:
            pending.append(named)
        elif isinstance(exc, _ResourceNotFound):
            gone.append(named)      # a deletion with nothing to delete
        else:
            forgotten.append(named)  # taken out of the session meanwhile
    one = len(failures) == 1
    sentences = ['%d document%s not written.'
                 % (len(failures), ' was' if one else 's were')]
    if pending:
        sentences.append(
            '%s %s pending in the session; deal with the cause and flush() '
            'again.' % (_and(pending), 'stays' if len(pending) == 1 else
                        'stay'))
    if gone:
        one = len(gone) == 1
        sentences.append(
            '%s %s dropped from the session: %s already gone from the '
            'server, so there is nothing to delete.'
            % (_and(gone), 'was' if one else 'were',
               'it is' if one else 'they are'))
    if forgotten:
        one = len(forgotten) == 1
        sentences.append(
            '%s %s no longer pending in the session: flush() does not retry '
            '%s.' % (_and(forgotten), 'is' if one else 'are',
                     'it' if one else 'them'))
    return ' '.join(sentences)


def _and(items, most=10):
    """``'a'``, ``'a and b'``, ``'a, b and c'``: a list for messages, of
    ``most`` items and how many more there are."""
    if len(items) > most:
        return '%s and %d more' % (', '.join(items[:most]),
                                   len(items) - most)
    if len(items) < 2:
        return ''.join(items)
    return '%s and %s' % (', '.join(items[:-1]), items[-1])


def _describe(exc):
    """``error: reason`` of a python-couchdb exception, for messages."""
    if exc.args and isinstance(exc.args[0], tuple):
        return ': '.join(str(part) for part in exc.args[0] if part)
    return str(exc) or type(exc).__name__


def _a(value):
    """The type of ``value`` with its article, for messages: 'an int',
    'a set', 'an object' (and 'None' for None)."""
    if value is None:
        return 'None'
    name = type(value).__name__
    return ('an ' if name[:1].lower() in 'aeiou' else 'a ') + name


# -- Bulk work without the garbage collector ---------------------------------

# Reading documents in (`Session.get_many`, the rows of views), and flushing
# them, make several dicts, tuples and proxies per document, and most of
# them live on: CPython's garbage collector runs again every 700 of those,
# over younger objects each time and sometimes over all of them, to find no
# cycle (the session makes none it leaves behind: `_IdentityMap.release`).
# It is paused for such calls, as Mercurial does for its bulk work: about a
# twentieth of their client CPU. It is switched off for the whole process,
# so another thread's cycles wait for the call to end (and a thread that
# switches it off meanwhile finds it on again); it stays off if it was off.

def _gc_paused(method):
    """``method``, run with the garbage collector off."""
    @_functools.wraps(method)
    def paused(*args, **kwargs):
        if not _gc.isenabled():
            return method(*args, **kwargs)
        _gc.disable()
        try:
            return method(*args, **kwargs)
        finally:
            _gc.enable()
    return paused


# -- The session --------------------------------------------------------------

class Session(object):
    """An editing session (unit of work) on a python-couchdb `Database`.

    >>> S = Session(db)
    >>> S['ann'] = {'type': 'person', 'name': 'Ann'}
    >>> S['ann']['name']
    'Ann'
    >>> [ok for ok, id, rev in S.flush()]
    [True]

    Reads are cached: ``S[id]`` fetches a document once and returns the same
    object afterwards. Writes are queued: `create`, `save`, `update`,
    `delete`, ``S[id] = content``, ``del S[id]`` and any change made to a
    document the session handed out wait for `flush`. Everything else
    (``S.name``, ``S.info()``, ``S.changes()``, ...) is the wrapped
    database's own, sent straight to the server.

    A session is one unit of work for one thread: do not share it between
    threads (nothing in it is locked). In a web application, `Middleware`
    gives each request its own, as `current()`.

    :param db: the `couchdb.Database` to work on
    :param pre_flush_hook: ``hook(S, deleted, created, changed)``
                           called by `flush` before writing; see
                           `pre_flush_hook`
    :param post_flush_hook: called the same way after a write; see
                            `post_flush_hook`
    :param on_conflict: what `flush` does about conflicts by default:
                        ``'raise'``, ``'overwrite'``, ``'merge'`` or a
                        function; see `flush`
    :param max_inline_attachment: attachments of at most this many bytes
                                  travel inside the ``_bulk_docs`` request;
                                  larger ones are uploaded after it with a
                                  ``PUT`` each; see `put_attachment`
    :param max_document_size: the server's limit on a document's JSON
                              without its attachments, in bytes (CouchDB
                              3's ``max_document_size``, by default
                              8,000,000): `flush` refuses a larger document
                              itself instead of sending it; ``None`` turns
                              the check off
    :param w: the write quorum `flush` asks a CouchDB cluster for (``?w=``
              on each write); ``None`` leaves it to the database's
    :param max_requests: the most HTTP requests the session may send (reads,
                         writes, uploads, and the database's own methods
                         called through it); the one past it raises
                         `TooManyRequests` instead of going out. ``None``:
                         no limit. `requests` counts them.
    :param batch_size: the most documents one ``_bulk_docs`` request
                       carries; a flush of more sends several
    :param max_request_bytes: the most bytes one ``_bulk_docs`` request
                              carries (a document larger than that goes
                              alone); by default 1,000,000, under the
                              1 MiB body limit a proxy has unless told
                              otherwise (nginx's ``client_max_body_size``)
                              and far under CouchDB's own
                              ``max_http_request_size``; ``None``: no limit
    :raise TypeError: if ``db`` is a URL or a `couchdb.Server`: the session
                      works on one database, ``server[name]``
    """

    #: Most rounds of hook calls in one flush before it gives up.
    max_hook_rounds = 100

    #: Most times one flush resolves conflicts and writes again when the
    #: server keeps moving; each time costs one read and one write.
    max_conflict_rounds = 3

    #: Most requests one flush spends on finding the documents that made
    #: the server refuse a whole bulk request (about ``2 * log2(n)`` for
    #: each such document among ``n``).
    max_split_requests = 100

    def __init__(self, db, pre_flush_hook=None, post_flush_hook=None,
                 on_conflict='raise', max_inline_attachment=64 * 1024,
                 max_document_size=8000000, w=None, max_requests=None,
                 batch_size=10000, max_request_bytes=1000000):
        _check_db(db)
        self.db = db
        #: Most documents sent in one ``_bulk_docs`` request; a flush of
        #: more is split into several requests.
        self.batch_size = _check_count('batch_size', batch_size, none=False)
        if not self.batch_size:
            raise ValueError('batch_size must be at least 1, got 0')
        #: Most bytes in one ``_bulk_docs`` request, or ``None``.
        self.max_request_bytes = _check_count('max_request_bytes',
                                              max_request_bytes)
        self._budget = _Budget(_check_count('max_requests', max_requests))
        self._db = _counted_database(db, self._budget)  # what reads use
        self.on_conflict = _check_on_conflict(on_conflict)
        self.max_inline_attachment = _check_count(
            'max_inline_attachment', max_inline_attachment, none=False)
        self.max_document_size = _check_count('max_document_size',
                                              max_document_size)
        self.w = _check_w(w)
        self._pre_flush = pre_flush_hook
        self._post_flush = post_flush_hook
        self._map = _IdentityMap()  # the documents, and what is pending
        self._flushing = False
        self._writes = None         # the resource `_Flush` writes through

    @property
    def requests(self):
        """The number of HTTP requests this session has sent: reads,
        writes, uploads, and the database's methods called through it."""
        return self._budget.requests

    @property
    def max_requests(self):
        """The most requests the session may send, or ``None``; see
        `TooManyRequests`."""
        return self._budget.limit

    @max_requests.setter
    def max_requests(self, limit):
        self._budget.limit = _check_count('max_requests', limit)

    def __repr__(self):
        return '<%s %r: %d held, %d pending>' % (
            type(self).__name__, self.db.name, len(self._map.entries),
            len(self._map.pending))

    def __getattr__(self, name):
        # Everything the session does not define is the database's own.
        if name.startswith('__') or name == 'db':
            raise AttributeError(name)
        return getattr(self._db, name)

    # The dict protocol, as couchdb.Database has it.

    def __contains__(self, id):
        """Whether the document exists, as far as this session is concerned.

        Documents created in the session count, those deleted in it do not;
        any other id costs a ``HEAD`` request.

        :raise TypeError: if ``id`` is not a string
        """
        _check_id(id)
        entry = self._map.entries.get(id)
        if entry is None:
            return id in self._db
        return entry.state is not _DELETED

    def __iter__(self):
        """The ids of the documents on the server (``GET _all_docs``); work
        pending in the session is not included."""
        return iter(self._db)

    def __len__(self):
        """The number of documents on the server (``GET /db``); work
        pending in the session is not counted."""
        return len(self._db)

    def __bool__(self):
        """Whether the database exists (``HEAD /db``)."""
        return bool(self._db)

    def __getitem__(self, id):
        """The tracked document with this id.

        Fetched with one ``GET`` the first time, served from the session
        afterwards: ``S[id] is S[id]``.

        :raise ResourceNotFound: if the document does not exist, or is
                                 deleted in this session
        :raise TypeError: if ``id`` is not a string
        """
        _check_id(id)
        entry = self._map.entries.get(id)
        if entry is None:
            return self._track(self._db[id])
        if entry.state is _DELETED:
            raise _ResourceNotFound(('not_found', 'deleted in this session'))
        return self._map.hand_out(entry)

    def __setitem__(self, id, content):
        """Create the document ``id`` with a copy of ``content``; if
        ``content`` carries a ``_rev``, update the document instead, as
        `save` does. Nothing is sent before `flush`.

        :raise ResourceConflict: if the session already holds ``id`` and
                                 ``content`` has no ``_rev``
        :raise TypeError: if ``id`` is not a string, or ``content`` not a
                          dict
        """
        _check_id(id)
        entry = self._map.entries.get(id)
        if entry is not None and entry.doc is content and \
                entry.state is not _DELETED:
            return
        doc = _copy_in(content)
        doc['_id'] = id
        self._put(doc)

    def __delitem__(self, id):
        """Queue the deletion of the document ``id``.

        A document the session never fetched is deleted at the revision the
        server has at `flush` time; the revisions of all such deletions are
        looked up in one request.

        :raise ResourceNotFound: if the document is already deleted in this
                                 session
        :raise TypeError: if ``id`` is not a string
        """
        _check_id(id)
        entry = self._map.entries.get(id)
        if entry is None:
            self._map.add(_Entry(id, None, _DELETED, rev=_LOOKUP))
        else:
            self._delete_entry(entry)

    # Reading.

    def get(self, id, default=None, **options):
        """The tracked document with this id, or ``default`` if there is
        none (or it is deleted in this session).

        Like ``S[id]``, one ``GET`` at most. With ``options`` (``rev=``,
        ``revs=``, ``open_revs=``, ``conflicts=``, ...) the read asks for
        something other than the current document: it goes to the server
        every time and returns what python-couchdb returns, untracked,
        leaving the session's copy alone.

        :raise TypeError: if ``id`` is not a string
        """
        _check_id(id)
        if options and list(options) == ['conflicts'] and \
                options['conflicts'] in (True, 'true'):
            return self._with_conflicts(id, default)
        if options:
            return self._db.get(id, default, **options)
        entry = self._map.entries.get(id)
        if entry is None:
            try:
                return self._track(self._db[id])
            except _ResourceNotFound:
                return default
        if entry.state is _DELETED:
            return default
        return self._map.hand_out(entry)

    def _with_conflicts(self, id, default):
        """`get` with ``conflicts=True``: the tracked document, its
        ``_conflicts`` showing the losing leaves (never written back)."""
        entry = self._map.entries.get(id)
        if entry is None:
            doc = self._db.get(id, conflicts='true')
            return default if doc is None else self._track(doc)
        if entry.state is _DELETED or entry.doc is None:
            return default
        try:
            winner, losers = self._leaves(id)
        except _ResourceNotFound:
            return self._map.hand_out(entry)
        if winner['_rev'] == entry.subject.get('_rev'):
            _show_conflicts(entry, [loser['_rev'] for loser in losers])
        return self._map.hand_out(entry)

    @_gc_paused
    def get_many(self, ids):
        """The tracked documents with these ids, in order, with ``None`` for
        the missing ones.

        The ids not yet in the session are read with one ``POST
        _bulk_get`` per 1,000 documents (and one ``GET`` per ``_local/``
        document); the others cost nothing. A server without ``_bulk_get``
        is read with ``POST _all_docs?include_docs=true``. Python's garbage
        collector is paused meanwhile (see `_gc_paused`).

        :raise TypeError: if an id is not a string; nothing is read
        """
        ids = list(ids)
        if not all(map(isinstance, ids, _repeat(str))):
            for id in ids:
                _check_id(id)
        held = self._map.entries
        wanted = list(_filterfalse(held.__contains__, dict.fromkeys(ids)))
        if wanted:
            track = self._map.track
            for _, doc in _read_many(self._db, wanted).values():
                if doc is not None:
                    track(_Document(doc))
        # With no job running, `hand_out` is the document as it is.
        hand_out = _get_doc if self._map.asked is None else \
            self._map.hand_out
        return [None if entry is None or entry.state is _DELETED else
                hand_out(entry) for entry in map(held.get, ids)]

    def view(self, name, wrapper=None, **options):
        """Query a view, as `couchdb.Database.view` does.

        Rows keep ``id``, ``key`` and ``value``; with ``include_docs=True``,
        ``row.doc`` is the session's tracked document (the same object as
        ``S[row.id]``, with any changes made in the session). Rows of
        documents deleted in the session are left out. The request is made
        when the results are first used.

        With ``include_docs=True``, a session holding documents asks the
        server for the rows without theirs, and the documents it does not
        hold yet come in one ``POST _bulk_get`` (see `get_many`): two
        requests, or one when it holds them all. A session holding none,
        or asking for ``attachments``, ``conflicts`` or
        ``att_encoding_info`` too, lets the server include the documents:
        one request.
        """
        docs, options = _docs_apart(options, self._map.entries)
        return _ViewResults(self, name, options, wrapper, docs)

    def query(self, map_fun, reduce_fun=None, language='javascript',
              wrapper=None, **options):
        """Run a temporary view (``POST _temp_view``), with rows as in
        `view`; the server includes the documents. CouchDB 2 and later have
        no temporary views."""
        results = self._db.query(map_fun, reduce_fun, language, **options)
        return _ViewResults(self, None, options, wrapper, results=results)

    def iterview(self, name, batch, wrapper=None, **options):
        """Iterate over a view in batches of ``batch`` rows, with rows as
        in `view`: one request per batch, and with ``include_docs=True``
        in a session holding documents when the iteration starts, one
        ``POST _bulk_get`` more for the documents of the batch it does not
        hold yet (a view without any row is asked again with
        ``include_docs``: a reduce is the server's to refuse). Each
        document is the session's as the row comes out: one it held when
        the batch was read and let go of since (`reset`, `expunge`) is
        read again then."""
        docs, without = _docs_apart(options, self._map.entries)
        rows = self._db.iterview(name, batch, **without)
        first = True
        while docs:
            # islice(rows, batch) takes a batch without asking for the next.
            chunk = list(_itertools.islice(rows, max(batch, 1)))
            if _reduced(chunk) or first and not chunk:
                # A reduce is the server's to answer (or refuse) asked with
                # include_docs; rows alone do not tell one without rows.
                rows, docs = self._db.iterview(name, batch, **options), False
                break
            if not chunk:
                return
            first = False
            # Each row's document is the session's when it comes out.
            keys, fetched = self._docs_of_rows(chunk, name)
            for row, key in zip(chunk, keys):
                row = self._row(row, name, wrapper,
                                self._doc_of_row(key, fetched))
                if row is not None:
                    yield row
        for row in rows:
            row = self._row(row, name, wrapper)
            if row is not None:
                yield row

    def iterdocs(self, name='_all_docs', batch=1000, checkpoint=None,
                 **options):
        """Iterate over the documents of a view's rows (``_all_docs`` by
        default), for a job over many documents: each is the session's
        tracked document, to change or delete as usual.

        Rows come ``batch`` at a time, with their documents (one request:
        a job's documents are mostly not held yet, and the server reads a
        range of them with its rows for less than a second request costs;
        the rows of documents the session holds give its own). When the
        iteration moves past a batch, `flush` writes everything pending
        and the batch's documents leave the session (as `expunge` does),
        so memory is bounded by ``batch``, not by the database; documents
        the job reads or creates itself in its loop stay, as in any
        session. A
        `FlushError` or a connection failure ends the iteration with that
        exception, losing nothing: the failed documents stay pending, for
        a later `flush` or the next run.

        With ``checkpoint='name'``, the position after each written batch
        is recorded in ``_local/session-checkpoint-<name>`` (one ``PUT``
        per batch, and one ``GET`` more when the answer was lost and the
        retry met the record made), and the same call run again starts
        after the last batch fully written. The run that reaches the end
        marks it finished: a rerun yields nothing, until that document is
        deleted.
        A batch whose write was interrupted is yielded again: a job should
        set values rather than add to them, and then a document it changed
        already is found unchanged and not written twice.

        The iterator's ``total`` (the rows of the view, or of the range
        asked, at the start; design documents of ``_all_docs`` are left
        out, and skipped, unless ``design_docs=True``) is known before the
        first document, and ``done`` counts the documents yielded, those of
        earlier runs of the checkpoint included:
        ``tqdm(it, total=it.total, initial=it.done)`` shows progress. One
        INFO line per batch goes to the ``session`` logger.

        ``options`` are the view's (``startkey``, ``endkey``, ``key``,
        ``descending``, ``inclusive_end``, ...), but ``keys``, ``limit``,
        ``skip`` and ``include_docs``, which paging sets itself. Rows with
        equal keys are paged correctly on servers that ignore
        ``startkey_docid`` (PouchDB Server) too. A job should not change
        the keys of the view it goes over: a row that moves may come again
        or be missed, as with any paging.

        :raise ValueError: for a ``batch`` below 1, an option paging sets,
                           or a checkpoint recorded for another view or
                           other options
        """
        return _DocIterator(self, name, batch, checkpoint, options)

    def find(self, mango_query, wrapper=None):
        """Run a Mango query (``POST _find``) and iterate over the tracked
        documents it selects.

        The selection is the server's; the documents are the session's (with
        its changes), and those deleted in the session are left out. To a
        session holding documents the server sends the ids, and the
        documents it does not hold yet come in one ``POST _bulk_get``: two
        requests, one when it holds them all. To a session holding none the
        server sends the documents. With ``fields`` in the query it sends
        partial documents, which cannot be tracked: they are returned as
        python-couchdb returns them (one request; so with ``conflicts``).
        Each document is the session's as it comes out (see `iterview`).
        """
        held = self._map.entries
        if held and 'fields' not in mango_query and \
                not mango_query.get('conflicts'):
            query = dict(mango_query, fields=['_id'])
            rows = [{'id': doc['_id']} for doc in self._db.find(query)]
            # Each document is the session's when it comes out; None for
            # one deleted since it was found, or in the session.
            keys, fetched = self._docs_of_rows(rows, None)
            for key in keys:
                doc = self._doc_of_row(key, fetched)
                if doc is not None:
                    yield wrapper(doc) if wrapper is not None else doc
            return
        found = list(self._db.find(mango_query))
        partial = 'fields' in mango_query
        for doc in found:
            entry = held.get(doc.get('_id'))
            if entry is not None and entry.state is _DELETED:
                continue
            if not partial:
                doc = self._track(doc) if entry is None else \
                    self._map.hand_out(entry)
            yield wrapper(doc) if wrapper is not None else doc

    # Replication conflicts.

    def conflicts(self, doc_or_id):
        """The losing leaf revisions of a document, as plain dicts with
        their ``_rev``, oldest first; ``[]`` when it has none.

        Replication between writers that were apart leaves a document with
        several leaf revisions: the winner every read returns, and the
        losers CouchDB lists in ``_conflicts``. One ``GET
        /db/id?open_revs=all&revs=true`` reads them all (none when the
        session asked already since it last read or wrote the document).

        :raise ResourceNotFound: if the server has no such document
        :raise TypeError: if the id is not a string
        """
        return [_plain(_without_history(leaf))
                for leaf in self._leaves(doc_or_id)[1]]

    def resolve_conflicts(self, doc_or_id, resolve='merge'):
        """Fold every losing leaf of a document into the session's
        document, and queue the losers for deletion. Nothing is sent before
        `flush`, which writes the document on its revision and only then,
        in one more ``POST _bulk_docs`` for all documents resolved, deletes
        the losing leaves: no failure leaves a loser deleted whose content
        is not on the server.

        With ``'merge'``, each loser is merged as `flush`'s
        ``on_conflict='merge'`` merges, the session's document on one side,
        the loser on the other, and as base their nearest common ancestor
        when the server still has its body (compaction removes those of
        revisions that are not leaves): without one, only what both sides
        agree on merges. A clash leaves the document unresolved: `flush`
        reports it in `FlushError`, naming the paths, and sends neither the
        document nor a deletion. A function ``resolve(winner, loser,
        base)`` gets plain copies (``base`` ``None`` when there is none)
        and returns the content to keep, or ``None`` to leave the document
        as it is. Changes made to the document before and after the call
        are kept. Attachments are not merged: a loser whose attachments
        differ from the document's and from the base's clashes.

        Requests: `conflicts`, and one ``GET ?rev=`` per common ancestor.

        :raise ResourceNotFound: if the server has no such document
        """
        if resolve != 'merge' and not callable(resolve):
            raise ValueError("resolve must be 'merge' or a function, got %r"
                             % (resolve,))
        entry = self._live(doc_or_id)
        winner, losers = self._leaves(entry.id)
        entry.clash = None
        # The session's document may be at a losing leaf (a sibling won
        # since it was read): then every other leaf is to fold in.
        own = entry.subject.get('_rev')
        leaves = [winner] + losers
        ours = next((leaf for leaf in leaves if leaf['_rev'] == own), winner)
        losers = _losing(leaves, ours)
        if not losers:
            entry.losers = None
            return
        mine = _conflict_side(entry.subject)
        merged = [ours]                 # the leaves folded in so far
        for loser in losers:
            base = self._ancestor(entry, merged, loser)
            merged.append(loser)
            theirs = _conflict_side(loser)
            if resolve == 'merge':
                try:
                    mine = _merge_leaves(base, mine, theirs)
                except _MergeConflict as clash:
                    entry.clash = _ResourceConflict((
                        'conflict', 'the losing revision %s clashes with the '
                        'document: %s. Nothing was resolved; resolve it with '
                        'a function, or refresh() the document'
                        % (loser['_rev'], clash)))
                    self._map.touch(entry)
                    return
            else:
                content = resolve(_plain(mine), _plain(theirs),
                                  None if base is None else _plain(base))
                if content is None:
                    entry.losers = None
                    return
                if isinstance(content, dict) and content.get('_deleted'):
                    # The document goes, its losing leaves with it.
                    self._delete_entry(entry)
                    entry.losers = [leaf['_rev'] for leaf in losers]
                    return
                mine = _conflict_side(_copy_in(content))
        revision = entry.subject.get('_rev')
        # A copy: the version fetched may be the document itself, which
        # takes the merged content.
        fetched = _plain(entry.merge_base())
        # The writes whose answers were lost stay so: the next flush may
        # find one on the server.
        sent = entry.sent
        self._map.rebase(entry, mine, revision, fetched)
        entry.sent = sent
        entry.losers = [loser['_rev'] for loser in losers]

    def _leaves(self, doc_or_id):
        """``(winner, losers)`` of a document's leaves with their
        histories, read once (see `conflicts`) and kept while the session's
        document is at the winner's revision."""
        id = _id_of(doc_or_id)
        entry = self._map.entries.get(id)
        if entry is not None and entry.leaves is not None and \
                entry.doc is not None and \
                entry.leaves[0]['_rev'] == entry.subject.get('_rev'):
            return entry.leaves
        leaves = _leaf_docs(self._db.get(id, open_revs='all',
                                         revs='true') or [])
        if not leaves:
            raise _ResourceNotFound(('not_found', 'missing'))
        winner = max(leaves, key=_winning)
        losers = _losing(leaves, winner)
        if entry is not None and entry.doc is not None:
            entry.leaves = (winner, losers)
        return winner, losers

    def _ancestor(self, entry, merged, loser):
        """The body of the nearest common ancestor of ``loser`` and the
        leaves ``merged`` into the session's document so far, or ``None``
        (no common history, or compacted away)."""
        revs = [rev for rev in (_common_revision(leaf, loser)
                                for leaf in merged) if rev is not None]
        rev = max(revs, key=_generation) if revs else None
        if rev is None:
            return None
        base = self._db.get(entry.id, rev=rev)
        return None if base is None else _conflict_side(base)

    # Writing (queued until flush).

    def create(self, data):
        """Queue a new document holding a deep copy of ``data``.

        :return: the document id: ``data['_id']``, or a new uuid4 hex
        :raise TypeError: if ``data`` is not a dict, or its ``_id`` not a
                          string
        :raise ResourceConflict: if the session already holds that id
        """
        doc = _copy_in(data)
        doc.setdefault('_id', _uuid.uuid4().hex)
        return self._put(doc, create=True).id

    def save(self, doc):
        """Queue the creation or update of ``doc``, as
        `couchdb.Database.save` would write it.

        A document of this session is already tracked: nothing to do. A
        dict without ``_rev`` is created (from a deep copy; an ``_id`` is
        generated and set in ``doc`` if it has none); a dict with ``_id`` and
        ``_rev`` is adopted as a changed document; ``_deleted: true`` queues
        a deletion.

        :return: ``(id, rev)``; ``rev`` is the revision the document has
                 now, ``None`` for a new one (the new revision exists after
                 `flush`)
        :raise TypeError: if ``doc`` is not a dict, or its ``_id`` not a
                          string
        """
        entry = self._entry_of(doc)
        if entry is None or entry.state is _DELETED:
            if not isinstance(doc, dict):
                raise TypeError('expected dict, got %s' % type(doc).__name__)
            if entry is None and '_id' not in doc:
                doc['_id'] = _uuid.uuid4().hex
            _check_id(doc['_id'])
            copy = _copy_in(doc)
            if copy.get('_deleted'):
                self.delete(copy)
                return copy['_id'], copy.get('_rev')
            entry = self._put(copy)
        return entry.id, entry.doc.get('_rev')

    def update(self, documents):
        """`save` each of ``documents``. All are checked first, so that bad
        input queues none of them.

        :return: the list of their ids
        :raise TypeError: for an item that is not a dict, or an ``_id`` that
                          is not a string
        :raise ResourceConflict: for an id given twice, or a new document
                                 with the id of one the session holds
        """
        documents = list(documents)
        seen = set()
        for doc in documents:
            if self._entry_of(doc) is not None:
                continue
            if not isinstance(doc, dict):
                raise TypeError('expected dict, got %s' % type(doc).__name__)
            id = doc.get('_id')
            if id is None:
                continue
            _check_id(id)
            entry = self._map.entries.get(id)
            if id in seen:
                raise _ResourceConflict(('conflict', 'document %r is given '
                                         'twice' % id))
            if entry is not None and entry.state is not _DELETED and \
                    '_rev' not in doc and not doc.get('_deleted'):
                raise _ResourceConflict(
                    ('conflict', 'the session already holds document %r; '
                     'change that document instead of creating it again'
                     % id))
            seen.add(id)
        return [self.save(doc)[0] for doc in documents]

    def delete(self, doc):
        """Queue the deletion of ``doc`` (a document of this session, or any
        dict with ``_id``, and ``_rev`` to delete that revision).

        Deleting a document created in this session and not yet flushed just
        forgets it; a change followed by a deletion sends only the deletion.

        :raise ResourceNotFound: if it is already deleted in this session
        :raise TypeError: if ``doc`` is not a dict, or its ``_id`` not a
                          string
        """
        entry = self._entry_of(doc)
        if entry is None:
            if not isinstance(doc, dict):
                raise TypeError('expected dict, got %s' % type(doc).__name__)
            if doc.get('_id') is None:
                raise ValueError('document ID cannot be None')
            _check_id(doc['_id'])
            entry = self._map.entries.get(doc['_id'])
        if entry is not None:
            self._delete_entry(entry)
        else:
            self._map.add(_Entry(doc['_id'], None, _DELETED,
                                 rev=doc.get('_rev') or _LOOKUP))

    # Attachments (queued until flush).

    def put_attachment(self, doc, content, filename=None, content_type=None):
        """Queue an attachment for ``doc`` (a document of this session, or
        the id or a dict with the ``_id`` of one it then fetches).

        ``content`` is bytes, str (sent as UTF-8) or a file-like object: a
        seekable one is read at flush time (keep it open until then), any
        other is copied to a temporary file now. ``filename`` defaults to the
        file's name, ``content_type`` is guessed from the filename
        (``application/octet-stream`` when nothing fits).

        At `flush`, an attachment of at most `max_inline_attachment` bytes
        goes inline (base64) in the ``_bulk_docs`` request with its
        document: one request, one new revision. A larger one is uploaded
        after it with a ``PUT`` of its own, streamed. Either way it stays
        pending until the server has it: if the document's write fails, it
        goes with the retry.

        :raise ResourceNotFound: if the document is deleted in this session
        :raise TypeError: if the id is not a string
        :raise ValueError: for a filename UTF-8 cannot encode (a lone
                           surrogate) or a content type that is not ASCII
        """
        if filename is None:
            if not hasattr(content, 'name'):
                raise ValueError('no filename specified for attachment')
            filename = _os.path.basename(content.name)
        if content_type is None:
            content_type = ';'.join(
                filter(None, _mimetypes.guess_type(filename))) or \
                'application/octet-stream'
        entry = self._live(doc)
        if not isinstance(content, (bytes, bytearray, memoryview, str)) and \
                not hasattr(content, 'read'):
            raise TypeError('attachment %r of document %r: the content must '
                            'be bytes, str or a file-like object, got %s'
                            % (filename, entry.id, type(content).__name__))
        if not isinstance(filename, str) or not _encodes(filename):
            raise ValueError('attachment %r of document %r: a filename is a '
                             'string UTF-8 can encode' % (filename, entry.id))
        if not isinstance(content_type, str) or not content_type.isascii():
            raise ValueError('attachment %r of document %r: the content type '
                             '%r is not ASCII, as a MIME type is'
                             % (filename, entry.id, content_type))
        entry.own_attachments().put(filename,
                                    _Attachment(content, content_type))
        self._map.wait(entry)

    def get_attachment(self, id_or_doc, filename, default=None):
        """A file-like object with the content of an attachment, or
        ``default`` if there is none.

        An attachment put in this session and not yet flushed is served from
        the session, one deleted in it gives ``default``; otherwise it is
        read from the server (``GET /db/id/filename``).

        :raise TypeError: if the id is not a string
        """
        entry = self._held(id_or_doc, required=False)
        if entry is not None:
            if entry.state is _DELETED:
                return default
            if filename in entry.attachments:
                attachment = entry.attachments.get(filename)
                if attachment is None:
                    return default
                return _io.BytesIO(attachment.read())
            if entry.state is _NEW and entry.rev is None:
                return default          # not on the server yet
        data = self._db.get_attachment(entry.id if entry else id_or_doc,
                                      filename, _MISSING)
        if data is _MISSING:
            return default
        # python-couchdb gives None for an empty body.
        return _io.BytesIO(b'') if data is None else data

    def delete_attachment(self, doc, filename):
        """Queue the deletion of an attachment of ``doc``; it goes in the
        ``_bulk_docs`` request of the document. Deleting an attachment put
        in this session and not yet flushed just forgets it.

        :raise ResourceNotFound: if the document has no such attachment, or
                                 is deleted in this session
        :raise TypeError: if the id is not a string
        """
        entry = self._live(doc)
        entry.own_attachments().delete(entry.id, filename,
                                       entry.subject.get('_attachments'),
                                       entry.carried)
        self._map.wait(entry)

    # Flushing.

    @_gc_paused
    def flush(self, on_conflict=None, w=None):
        """Write every pending create, change and delete to the server.

        Changed documents are compared with the version fetched: one whose
        changes cancel out is not sent. The rest goes in one
        ``POST /db/_bulk_docs`` (split every `batch_size` documents), plus
        one ``POST _all_docs`` first when documents deleted by id need their
        revisions looked up (a ``_local/`` document's takes a ``GET`` of its
        own). A flush with nothing to do sends nothing.

        Written documents get their new ``_rev`` and stay tracked. The hooks
        run as described in `pre_flush_hook` and `post_flush_hook`.

        ``_bulk_docs`` is not atomic: the server may refuse some documents
        and take the others. What was written is applied; what was refused
        stays pending, unchanged, and `FlushError` says why. The deletion
        of a document the server does not have is reported there too, and
        dropped: there is nothing to retry.

        A document CouchDB would refuse is refused before sending, alone,
        so that it cannot make the server refuse the whole request: an
        ``_id`` starting with ``_`` that is not ``_design/<name>`` or
        ``_local/<name>``, or the empty one (``illegal_docid``); a top-level
        member starting with ``_`` that CouchDB does not know
        (``doc_validation``); an attachment name starting with ``_``
        (``bad_request``); JSON larger than `max_document_size`
        (``document_too_large``). Each is a `couchdb.ServerError` holding
        that error and a reason naming the document and the field. When the
        server still refuses a whole request for what one document holds
        (400, 412, 413, or PouchDB's 500 for a document it cannot read), the
        session splits the request in halves to find that document,
        spending at most `max_split_requests` requests, writes the others,
        and reports it with the server's error and reason. A refusal that
        is not about a document (401, 403, a missing database, a failing
        server) is raised as python-couchdb raises it, and nothing is lost.

        A CouchDB cluster that could not confirm the write quorum (``w``)
        answers 202, ``"accepted": true``: the write is on fewer nodes than
        asked. Such documents count as written, and their ids are in the
        results' ``accepted``.

        A request whose answer is lost (the connection dropped after the
        server may have applied it) leaves the outcome of its documents
        unknown: the session sends it once more, as python-couchdb would.
        The conflicts of bulk writes and uploads first cost one read of
        the server's versions for all of them (``POST _bulk_get``, as
        `get_many` reads). For a document whose outcome was unknown, a
        server version equal to what the session sent (by any of the
        flushes whose answers were lost since the document was last
        written) is its own write: it counts as written, and what was
        changed since is written over it. So is one the server's history
        shows under another writer's change (two more ``GET`` requests):
        the write counts as written, as if its answer had come back, and
        only what the user did since is in conflict with that change
        (nothing done since: nothing to write, whatever the policy). Any
        other conflict is real (even when the server holds what the session
        would write: another writer made the same change), and
        ``on_conflict`` (by default the session's) decides:

        - ``'raise'``: they stay pending and end up in `FlushError` (with
          no read unless an outcome was unknown).
        - ``'overwrite'``: the last writer wins: the session's version is
          written over the server's revision (a deletion deletes it; a
          change over a server-side deletion writes the document again),
          without the stubs of attachments the server no longer has.
        - ``'merge'``: a three-way merge of the version fetched (the empty
          document for one created or adopted in the session), the
          session's and the server's. Dicts merge key by key; a value
          changed on one side takes that side's; values (or lists) changed
          on both sides differently, a key removed on one side and changed
          on the other, or a deletion against a change, are real conflicts
          that stay pending, untouched, in `FlushError`; so is an
          attachment both sides changed. The merged document is written
          over the server's revision (unless the server has it already:
          then it is taken as it is) and the server's version becomes its
          base.
        - a function ``resolve(mine, theirs, base)`` of plain copies
          (``None`` for a deleted side) returning the document to write, or
          ``None`` to leave it pending and reported.

        Resolved documents go in one more bulk request; if the server moved
        again meanwhile, this repeats up to `max_conflict_rounds` times.
        Settling keeps the document object and its dicts and lists still in
        place: references the user kept stay live.

        A connection failure raises python-couchdb's or the socket's
        exception unchanged and loses nothing: the next flush sends it all,
        recognising writes that did reach the server. The post-flush hook
        has seen what was written before it.

        Python's garbage collector is paused while the flush runs, hooks
        included, and switched on again at its end if it was on (see
        `_gc_paused`).

        :param on_conflict: ``'raise'``, ``'overwrite'``, ``'merge'`` or a
                            function, for this flush only
        :param w: the write quorum for this flush only (``?w=`` on each
                  write); by default the session's `w`
        :return: ``(success, id, rev_or_exception)`` of each document
                 written, as `couchdb.Database.update` returns them, in a
                 list whose attribute ``accepted`` is the set of ids the
                 server only accepted (202: written on fewer nodes than the
                 write quorum; empty on a single server)
        :raise FlushError: if the server refused any document (the rest was
                           written); after the post-flush hook has seen what
                           was written
        :raise TypeError, ValueError: if a document holds a value JSON cannot
                                      carry (also a string with a lone
                                      surrogate, which UTF-8 cannot
                                      encode); nothing was sent
        """
        if on_conflict is None:
            on_conflict = self.on_conflict
        else:
            on_conflict = _check_on_conflict(on_conflict)
        w = self.w if w is None else _check_w(w)
        if self._flushing:
            raise RuntimeError('Session.flush() was called while the session '
                               'was flushing; a hook must not flush.')
        if not self._map.pending:
            return _FlushResults()
        self._flushing = True
        try:
            return _Flush(self, on_conflict, w).run()
        finally:
            self._flushing = False

    def _hooked(self, when):
        """Whether there is a ``'pre'`` or ``'post'`` flush hook to call
        (given to the session, or a subclass's method)."""
        if when == 'pre':
            return self._pre_flush is not None or \
                type(self).pre_flush_hook is not Session.pre_flush_hook
        return self._post_flush is not None or \
            type(self).post_flush_hook is not Session.post_flush_hook

    def pre_flush_hook(self, deleted, created, changed):
        """Called by `flush` before it writes.

        ``deleted`` and ``created`` are lists of documents (a document
        deleted by id only is a `couchdb.Document` holding just its
        ``_id``), ``changed`` a list of ``(document, diff)`` pairs. Whatever
        the hook changes, creates or deletes goes into the same bulk
        request: the hook is called again with only what became pending
        since its previous call, until a call adds nothing.

        Calls the ``pre_flush_hook`` given to the session; subclasses may
        override it instead.
        """
        if self._pre_flush is not None:
            self._pre_flush(self, deleted, created, changed)

    def post_flush_hook(self, deleted, created, changed):
        """Called by `flush` after each bulk request, with the documents it
        wrote, as `pre_flush_hook` is called. Whatever it changes is written
        by the same `flush` in a following request.

        Calls the ``post_flush_hook`` given to the session; subclasses may
        override it instead.
        """
        if self._post_flush is not None:
            self._post_flush(self, deleted, created, changed)

    def diff(self, doc_or_id):
        """The change from the version fetched to the current one, as a list
        of RFC 6902 JSON Patch operations.

        ``replace`` and ``remove`` operations also carry the value they
        overwrite under ``was`` (patch appliers ignore it). A document
        created (or adopted) in the session is diffed against the empty
        document. No request is made.

        :raise KeyError: if the session does not hold the document
        :raise ValueError: if the document is deleted in this session
        :raise TypeError: if the id is not a string
        """
        entry = self._held(doc_or_id)
        if entry.state is _DELETED:
            raise ValueError('document %r is deleted in this session: it '
                             'has no current version to diff' % entry.id)
        return entry.diff()

    # Housekeeping.

    @property
    def new(self):
        """A list of the documents created in this session and not yet
        flushed."""
        return [e.doc for e in self._map.pending.values() if e.state is _NEW]

    @property
    def dirty(self):
        """A list of the documents changed since they were fetched (or last
        flushed).

        Optimistic: a document is listed from its first change on, even if
        later changes cancel it out; `flush` compares it with the version
        fetched and sends only real changes. A document with attachment
        changes is listed too.
        """
        entries = list(self._map.pending.values())
        for entry in entries:
            entry.sync()        # changes made through adopted values
        return [e.doc for e in entries if e.state is _DIRTY or
                (e.state is _CLEAN and e.attachments.changes)]

    @property
    def deleted(self):
        """A list of the documents queued for deletion (one deleted by id
        only is a `couchdb.Document` holding just its ``_id``)."""
        return [e.doc_or_stub() for e in self._map.pending.values()
                if e.state is _DELETED]

    def has_changes(self):
        """Whether `flush` has anything to send: a new or deleted document,
        a changed one that differs from the version fetched, one whose
        last write's answer was lost, or losing leaves to delete (see
        `resolve_conflicts`). No request is made."""
        # A document whose last write's answer was lost is sent again.
        return any(e.state is _NEW or e.state is _DELETED or
                   e.attachments.changes or e.losers or e.clash
                   or e.sent is not None or e.diff()
                   for e in list(self._map.pending.values()))

    def expunge(self, doc_or_id):
        """Stop tracking a document: forget it and anything pending for it.
        The object stays usable as a plain dict; ``S[id]`` fetches the
        document again.

        :raise KeyError: if the session does not hold the document
        :raise TypeError: if the id is not a string
        """
        self._map.forget(self._held(doc_or_id))

    def refresh(self, doc_or_id):
        """Re-read a document from the server (one ``GET``), dropping its
        local changes, a pending deletion included. The session keeps
        handing out the same object, now holding the server's version.

        :return: the tracked document
        :raise ResourceNotFound: if the server does not have it (the
                                 session is left as it was)
        :raise KeyError: if the session does not hold the document
        :raise TypeError: if the id is not a string
        """
        entry = self._held(doc_or_id)
        fresh = self._db[entry.id]
        if entry.doc is None:
            self._map.forget(entry)
            return self._track(fresh)
        self._map.reload(entry, fresh)
        return entry.doc

    def reset(self):
        """Forget every document and everything pending. No request is
        made."""
        for entry in list(self._map.entries.values()):
            self._map.forget(entry)

    def __del__(self):
        # A session no one holds any more lets go of its documents at once
        # (see `_IdentityMap.release`): those the user kept are plain.
        held = self.__dict__.get('_map')
        if held is not None:
            held.sessions -= 1
            if held.sessions <= 0:
                held.close()

    def __copy__(self):
        # A copy is a second Session object for the same documents (as
        # copying the object's attributes makes it): the last of the two
        # to go lets go of them.
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        self._map.sessions += 1
        return twin

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        """Flush on a clean exit; on an exception, discard what is pending
        and let the exception through."""
        if exc_type is None:
            self.flush()
        else:
            self.reset()
        return False

    # Private helpers of the session.

    def _track(self, document):
        """The session's document for ``document`` just read from the
        server: the one it already holds, or a new tracked one."""
        return self._map.track(document).doc

    def _put(self, doc, create=False):
        """Queue ``doc`` (the session's own copy, with an ``_id``) for
        creation, or for update if it carries a ``_rev``."""
        id = doc['_id']
        _check_id(id)
        update = '_rev' in doc and not create
        entry = self._map.entries.get(id)
        if entry is None:
            # A document with a revision is adopted as changed, one without
            # is new; the base of both is the empty document.
            return self._map.add(_Entry(id, doc, _DIRTY if update else _NEW,
                                        base={}))
        if entry.state is _DELETED:
            # Creating an id deleted in this session writes over the deleted
            # revision: one write that leaves the new content.
            self._map.recreate(entry, doc)
        elif update:
            self._map.replace(entry, doc)
        else:
            raise _ResourceConflict(
                ('conflict', 'the session already holds document %r; change '
                 'that document instead of creating it again' % id))
        return entry

    def _delete_entry(self, entry):
        if entry.state is _DELETED:
            raise _ResourceNotFound(
                ('not_found', 'document %r is already deleted in this '
                 'session' % entry.id))
        if entry.state is _NEW and entry.rev is None:
            if entry.sent is None:
                self._map.forget(entry)     # never written: nothing to send
            else:
                # A flush whose connection failed may have created it.
                self._map.delete(entry, _LOOKUP)
        else:
            self._map.delete(entry)

    def _entry_of(self, doc):
        """The entry of ``doc`` if it is one of this session's documents
        (a whole document: not a dict inside one)."""
        if type(doc) is _TrackedDocument:
            entry = doc._entry
            if entry.doc is doc and self._map.entries.get(entry.id) is entry:
                return entry
        return None

    def _held(self, doc_or_id, required=True):
        entry = self._entry_of(doc_or_id)
        if entry is None:
            entry = self._map.entries.get(_id_of(doc_or_id))
        if entry is None and required:
            raise KeyError('the session does not hold document %r'
                           % (doc_or_id,))
        return entry

    def _live(self, doc_or_id):
        """The entry of a document the session has and has not deleted,
        fetching it if needed."""
        entry = self._held(doc_or_id, required=False)
        if entry is None:
            self[_id_of(doc_or_id)]
            entry = self._map.entries[_id_of(doc_or_id)]
        if entry.state is _DELETED:
            raise _ResourceNotFound(('not_found', 'document %r is deleted in '
                                     'this session' % entry.id))
        return entry

    def _row(self, row, name, wrapper, doc=_MISSING):
        """A row of view ``name`` whose ``doc`` is the session's document
        (``doc``, if given: see `_doc_of_row`), or ``None`` for the row of
        a document deleted in the session."""
        entry = self._map.entries.get(row.get('id'))
        if entry is not None and entry.state is _DELETED:
            return None
        if type(row) is not _SessionRow:
            row = _SessionRow(row)
        if doc is not _MISSING:
            if 'error' not in row:
                row['doc'] = doc
        elif row.get('doc') is not None:
            row['doc'] = self._included(_Document(row['doc']),
                                        _doc_key(row, name))
        return wrapper(row) if wrapper is not None else row

    def _docs_of_rows(self, rows, name):
        """What the view rows ``rows`` (of view ``name``), asked for without
        their documents, would have included: the key of each one's
        document (see `_doc_key`), and the documents the session lacks,
        read in one request, as `_read_many` gives them (a key asked for
        that the server has nothing for gives ``(None, None)``). Each is
        the session's once `_doc_of_row` hands it out."""
        keys = [_doc_key(row, name) for row in rows]
        held = self._map.entries
        wanted = [key for key in keys
                  if key is not None and _key_id(key) not in held]
        fetched = _read_many(self._db, wanted)
        for key in wanted:
            fetched.setdefault(key, (None, None))
        return keys, fetched

    def _doc_of_row(self, key, fetched):
        """The session's document for a row's ``key``, from `_docs_of_rows`
        (``fetched``), when the row is handed out: the one it holds then
        (None if deleted in the session), else the one read. The loop of
        an `iterview` or `find` may have let go of a document the session
        held when the rows were read (`reset`, `expunge`): it is read
        now."""
        if key is None:
            return None
        entry = self._map.entries.get(_key_id(key))
        if entry is not None:
            return None if entry.state is _DELETED else \
                self._map.hand_out(entry)
        if key not in fetched:
            fetched.update(_read_many(self._db, [key]))
        _, doc = fetched.get(key, (None, None))
        return None if doc is None else self._included(_Document(doc), key)

    def _included(self, document, key):
        """The session's document for ``document``, included in a view row
        for ``key`` (see `_doc_key`): the one it holds (None if deleted in
        the session) or a new tracked one; but the revision a link names
        is that revision, untracked, as `get` with ``rev`` gives it (it may
        not be the document's current one)."""
        entry = self._map.entries.get(document['_id'])
        if entry is None and isinstance(key, tuple):
            return document
        entry = self._map.track(document)
        return None if entry.state is _DELETED else entry.doc


def _id_of(doc_or_id):
    """The id of a document given as a dict (``None`` if it has no
    ``_id``) or by id.

    :raise TypeError: if the id is not a string
    """
    if isinstance(doc_or_id, dict):
        id = doc_or_id.get('_id')
        if id is None:
            return None
    else:
        id = doc_or_id
    _check_id(id)
    return id


def _copy_in(data):
    """The session's own copy of a document given by the user."""
    if not isinstance(data, dict):
        raise TypeError('expected dict, got %s' % type(data).__name__)
    return _Document(_plain(data))


def _check_id(id):
    """Raise TypeError, naming ``id``, if it is not a string: a mistake
    of the caller's, refused at the call. The rules a string id must follow
    are the server's, and are not checked here."""
    if not isinstance(id, str):
        raise TypeError('%r is not a document id: a document id is a '
                        'string, not %s' % (id, _a(id)))


def _check_db(db):
    """Raise TypeError if ``db`` is what people pass for a database by
    mistake: its URL, or the server."""
    if isinstance(db, (str, bytes)):
        if isinstance(db, str):
            # A password in the URL stays out of the message (and logs).
            db = _extract_credentials(db)[0]
        raise TypeError('Session() expects a couchdb.Database, got the %s '
                        '%r; open the database first: couchdb.Database(url), '
                        'or couchdb.Server(url)[name]'
                        % (type(db).__name__, db))
    if isinstance(db, _Server):
        raise TypeError('Session() expects a couchdb.Database, got the '
                        'couchdb.Server %r; pick one of its databases: '
                        'server[name]' % (db.resource.url,))


class _ViewResults(object):
    """View results whose rows carry the session's documents; anything else
    (``total_rows``, ``offset``, ``update_seq``, ...) is python-couchdb's
    `ViewResults`.

    With ``docs``, the rows are asked for without their documents and the
    session reads those it lacks (see `Session.view`): ``options`` are the
    view's options without ``include_docs``.
    """

    def __init__(self, session, name, options, wrapper, docs=False,
                 results=None):
        self._session = session
        self._name = name
        self._options = options
        # python-couchdb makes the rows `_SessionRow`s itself: no copy of
        # each to make.
        self._results = results if results is not None else \
            session._db.view(name, wrapper=_SessionRow, **options)
        self._wrapper = wrapper
        self._docs = docs
        self._rows = None

    def __repr__(self):
        return '<%s %r>' % (type(self).__name__, self._results)

    def __getattr__(self, name):
        if name.startswith('__'):
            raise AttributeError(name)
        return getattr(self._results, name)

    def __getitem__(self, key):
        """Results for a key (``results[key]``) or a key range
        (``results[start:end]``), as python-couchdb offers them."""
        results = self._results[key]
        return _ViewResults(self._session, self._name, results.options,
                            self._wrapper, self._docs, results)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)

    @property
    @_gc_paused
    def rows(self):
        """The list of rows (the request is made on first use)."""
        if self._rows is None:
            session, rows = self._session, self._results.rows
            if self._docs and (_reduced(rows) or not rows and
                               self._results.total_rows is None):
                # The server is to answer include_docs of a reduce (its
                # answer has no total_rows, even without rows).
                self._results = session._db.view(
                    self._name, wrapper=_SessionRow,
                    **dict(self._options, include_docs=True))
                rows, self._docs = self._results.rows, False
            docs = _itertools.repeat(_MISSING)
            if self._docs:
                keys, fetched = session._docs_of_rows(rows, self._name)
                docs = [session._doc_of_row(key, fetched) for key in keys]
            rows = (session._row(row, self._name, self._wrapper, doc)
                    for row, doc in zip(rows, docs))
            self._rows = [row for row in rows if row is not None]
        return self._rows


def _docs_apart(options, held):
    """Whether the session reads the documents of a view asked with
    ``options`` itself, and the options to ask the server with. It does
    only when it holds documents (``held``) the rows may name: otherwise
    all are to be read, and the server sends them with the rows for less
    than a second request costs."""
    if not held or options.get('include_docs') not in (True, 'true') or any(
            options.get(name) for name in _DOCUMENT_OPTIONS):
        return False, options
    options = dict(options)
    del options['include_docs']
    return True, options


# The view options that change the documents the server includes.
_DOCUMENT_OPTIONS = ('attachments', 'att_encoding_info', 'conflicts')


def _reduced(rows):
    """Whether ``rows`` are the rows of a reduce (they have no ``id``)."""
    return any('id' not in row and 'error' not in row for row in rows)


def _doc_key(row, name):
    """What ``include_docs`` would include in view row ``row``, as a key of
    `_read_many`: the row's document, or the one its value links to
    (``{"_id": ...}``, at ``"_rev"`` if given); ``None`` for none (a row of
    ``_all_docs`` for a deleted document or a missing key)."""
    value = row.get('value')
    if isinstance(value, dict):
        if '_id' in value or '_rev' in value:
            # CouchDB's rule: "_id": null links to nothing; a "_rev" alone
            # is a revision of the row's own document.
            id = value.get('_id', row.get('id'))
            if not isinstance(id, str):
                return None
            rev = value.get('_rev')
            return (id, rev) if isinstance(rev, str) else id
        if name == '_all_docs' and value.get('deleted'):
            return None
    return row.get('id')


class _SessionRow(_Row):
    """A view row whose ``doc`` is the session's tracked document."""

    @property
    def doc(self):
        return self.get('doc')


# -- Requests: counted, within the budget, logged ---------------------------

def _counted(resource, budget, retries=True):
    """A resource for ``resource``'s URL through an HTTP session of its own
    that counts requests in ``budget``, sharing the connections and settings
    of ``resource``'s. Without ``retries`` it does not send a request again
    by itself (`_Flush` retries writes itself, to know which outcomes are
    unknown), and never sends one on a pooled connection the server has
    closed meanwhile: the request would fail on the way out, and its
    outcome would look unknown though the server never saw it."""
    session = object.__new__(_CountedHTTPSession)
    session.__dict__.update(vars(resource.session))
    session.budget = budget
    session.writes = not retries
    if not retries:
        session.retryable_errors = set()
    counted = _Resource(resource.url, session)
    counted.credentials = resource.credentials
    counted.headers = dict(resource.headers)
    return counted


class _Budget(object):
    """The requests a `Session` has sent, and its `max_requests`; and, for
    the log, how many documents the request being sent carries."""

    __slots__ = ('requests', 'limit', 'documents')

    def __init__(self, limit):
        self.requests, self.limit, self.documents = 0, limit, None


class _CountedHTTPSession(_HTTPSession):
    """python-couchdb's HTTP session, counting each request in its budget
    (and refusing the one past the limit before sending anything) and
    logging it."""

    writes = False

    def request(self, method, url, body=None, headers=None, credentials=None,
                num_redirects=0):
        budget = self.budget
        if budget.limit is not None and budget.requests >= budget.limit:
            raise TooManyRequests(budget.limit, method, url)
        if self.writes:
            _drop_closed(self.connection_pool, url)
        budget.requests += 1
        started = _time.perf_counter()
        status = 'failed'
        try:
            answer = _HTTPSession.request(self, method, url, body, headers,
                                          credentials, num_redirects)
            status = answer[0]
            return answer
        except _HTTPError as exc:
            status = _status_of(exc)
            raise
        finally:
            if _logger.isEnabledFor(_logging.DEBUG):
                _logger.debug('%s %s: %s, %s%s bytes sent, %.1f ms', method,
                              _url_path(url), status, '' if
                              budget.documents is None else
                              '%d documents, ' % budget.documents,
                              _size_of(body),
                              (_time.perf_counter() - started) * 1000)
            budget.documents = None


def _status_of(exc):
    """The HTTP status of python-couchdb's exception, as far as known."""
    for cls, status in ((_Unauthorized, 401), (_Forbidden, 403),
                        (_ResourceNotFound, 404), (_ResourceConflict, 409),
                        (_PreconditionFailed, 412)):
        if isinstance(exc, cls):
            return status
    if exc.args and isinstance(exc.args[0], tuple) and exc.args[0]:
        return exc.args[0][0]
    return 'error'


def _url_path(url):
    """The path and query of ``url``, for logs (no credentials)."""
    return '/' + url.split('://', 1)[-1].split('/', 1)[-1] \
        if '/' in url.split('://', 1)[-1] else '/'


def _size_of(body):
    if body is None:
        return 0
    if isinstance(body, (bytes, str)):
        return len(body)
    return '?'                  # a stream, or JSON python-couchdb encodes


def _drop_closed(pool, url):
    """Close the idle connections of python-couchdb's ``pool`` for
    ``url``'s server that have something to read: the server closed them
    (an idle HTTP connection has nothing else to say)."""
    parts = _urlsplit(url)
    with pool.lock:
        idle = pool.conns.get((parts.scheme, parts.netloc)) or []
        for conn in list(idle):
            sock = getattr(conn, 'sock', None)
            if sock is not None and _readable(sock):
                idle.remove(conn)
                conn.close()


def _readable(sock):
    """Whether ``sock`` has something to read now (poll() where there is
    one: select() cannot watch descriptors past FD_SETSIZE, 1024)."""
    if hasattr(_select, 'poll'):
        poller = _select.poll()
        poller.register(sock, _select.POLLIN)
        return bool(poller.poll(0))
    return bool(_select.select([sock], [], [], 0)[0])


def _counted_database(db, budget):
    """``db`` as a `Session` reads it: the same database through a
    counted HTTP session (anything else, as it is)."""
    if not isinstance(db, _Database):
        return db
    return _Database(_counted(db.resource, budget), name=db._name)


# -- Reads: many documents in few requests ------------------------------------

# The most documents one ``POST _bulk_get`` asks for: the request stays
# small, and its answer the size of this many documents.
_READ_BATCH = 1000

# The URLs of the databases whose server has no ``_bulk_get`` (CouchDB 1,
# a proxy letting only some paths through): they are read through
# ``_all_docs``, and only the first read of each asks.
_NO_BULK_GET = set()


def _read_many(db, keys, tombstones=False):
    """The server's versions of the documents ``keys`` name, as ``{key:
    (rev, document, or None if deleted)}``: a key is an id (the current
    version) or an ``(id, rev)`` pair (that revision); a key the server
    has nothing for is left out.

    One ``POST _bulk_get`` per `_READ_BATCH` documents, one ``GET`` per
    ``_local/`` document (`_bulk_get` does not read those), and with
    ``tombstones`` one ``POST _all_docs`` for the documents PouchDB Server
    answers without a trace: it gives a deleted document like a missing
    one, an empty object, where CouchDB gives the deleted revision. A
    server without ``_bulk_get`` (404, 405 or 400 for the path) is read
    with ``POST _all_docs?include_docs=true`` instead, and ``GET ?rev=``
    for each ``(id, rev)``, for as long as the process runs.
    """
    found = {}
    keys = list(dict.fromkeys(keys))
    if all(map(isinstance, keys, _repeat(str))):
        # Ids only, the usual case: looked at in C.
        local = list(_compress(keys, map(str.startswith, keys,
                                         _repeat('_local/'))))
    else:
        local = [key for key in keys if _key_id(key).startswith('_local/')]
    for key in local:
        doc = db.get(key[0], rev=key[1]) if isinstance(key, tuple) else \
            db.get(key)
        if doc is not None:
            found[key] = (doc['_rev'], doc)
    if local:
        keys = [key for key in keys
                if not _key_id(key).startswith('_local/')]
    url = db.resource.url
    batches = _distinct_batches(keys)
    for number, batch in enumerate(batches):
        if url in _NO_BULK_GET:
            found.update(_read_without_bulk_get(db, batch))
            continue
        try:
            found.update(_bulk_get(db, batch, tombstones))
        except _HTTPError as exc:
            if number or _status_of(exc) not in (400, 404, 405):
                raise
            # Remembered only once the other way worked: a 404 may as well
            # say the database is missing.
            found.update(_read_without_bulk_get(db, batch))
            _NO_BULK_GET.add(url)
    return found


def _key_id(key):
    return key[0] if isinstance(key, tuple) else key


def _distinct_batches(keys):
    """``keys`` (distinct) in batches of at most `_READ_BATCH`, none naming
    one id twice: PouchDB Server answers a ``_bulk_get`` asking for an id
    twice with one result for both."""
    if all(map(isinstance, keys, _repeat(str))):
        # Distinct ids, the usual case: batches in order.
        return [keys[start:start + _READ_BATCH]
                for start in range(0, len(keys), _READ_BATCH)]
    batches, first = [], 0          # batches[first:] may have room
    for key in keys:
        id = _key_id(key)
        for batch, ids in batches[first:]:
            if id not in ids and len(batch) < _READ_BATCH:
                break
        else:
            batch, ids = [], set()
            batches.append((batch, ids))
        batch.append(key)
        ids.add(id)
        while first < len(batches) and len(batches[first][0]) >= _READ_BATCH:
            first += 1
    return [batch for batch, _ in batches]


def _bulk_get(db, keys, tombstones):
    """`_read_many` of ``keys`` (of distinct ids) through one ``POST
    _bulk_get``; see there."""
    _, _, answer = db.resource.post_json('_bulk_get', body={'docs': [
        {'id': key[0], 'rev': key[1]} if isinstance(key, tuple) else
        {'id': key} for key in keys]})
    results = {result.get('id'): result.get('docs') or []
               for result in answer.get('results') or []}
    found, traceless = {}, []
    for key in keys:
        items = results.get(key[0] if type(key) is tuple else key, ())
        if len(items) == 1:
            # One leaf, the usual answer: `_leaf_docs`, without its calls.
            doc = items[0].get('ok') if type(items[0]) is dict else None
            if type(doc) is dict:
                found[key] = (doc['_rev'],
                              None if doc.get('_deleted') else doc)
                continue
        # Asked without a revision, CouchDB gives every leaf revision (all
        # the branches of a conflict): the current one is the winner a
        # GET would give. PouchDB Server gives the winner alone.
        leaves = _leaf_docs(items)
        if leaves:
            doc = leaves[0] if len(leaves) == 1 else max(leaves, key=_winning)
            found[key] = (doc['_rev'], None if doc.get('_deleted') else doc)
        elif not isinstance(key, tuple) and not any(
                'error' in doc or 'missing' in doc for doc in items):
            traceless.append(key)
    if tombstones and traceless:
        for row in _all_docs(db, traceless):
            if 'error' not in row:
                found[row['id']] = (row['value']['rev'], None)
    return found


def _winning(doc):
    """The order in which CouchDB picks the current revision of a document
    among its leaves: a live one before a deleted one, then the longest
    history, then the greatest revision hash."""
    return (not doc.get('_deleted'),) + _winning_rev(doc)


def _winning_rev(leaf):
    """The order of revisions: the shorter history first, then the smaller
    hash (so, of leaves, the oldest first)."""
    generation, _, digest = leaf['_rev'].partition('-')
    return int(generation), digest


def _leaf_docs(items):
    """The documents of an answer listing leaves (``[{"ok": doc}, ...]``,
    of ``open_revs`` or ``_bulk_get``), without its errors and missing
    revisions."""
    return [item['ok'] for item in items
            if isinstance(item, dict) and isinstance(item.get('ok'), dict)]


def _losing(leaves, ours):
    """The live leaves but ``ours``, oldest first."""
    return sorted((leaf for leaf in leaves if leaf is not ours and
                   not leaf.get('_deleted')), key=_winning_rev)


def _read_without_bulk_get(db, keys):
    """`_read_many` of ``keys`` where the server has no ``_bulk_get``."""
    found = {}
    ids = [key for key in keys if not isinstance(key, tuple)]
    for row in _all_docs(db, ids, include_docs=True) if ids else ():
        if 'error' not in row:
            deleted = row['value'].get('deleted')
            found[row['id']] = (row['value']['rev'],
                                None if deleted else row['doc'])
    for key in keys:
        if isinstance(key, tuple):
            doc = db.get(key[0], rev=key[1])
            if doc is not None:
                found[key] = (doc['_rev'], None if doc.get('_deleted')
                              else doc)
    return found


# -- Jobs over many documents: iterdocs ---------------------------------------

# The view options `Session.iterdocs` sets itself, to page.
_PAGING_OPTIONS = ('keys', 'limit', 'skip', 'include_docs')

# Where `Session.iterdocs` records how far a job got.
_CHECKPOINT = '_local/session-checkpoint-%s'

# The rows one request reads when `iterdocs` counts the rows of a range.
_COUNT_BATCH = 10000


class _DocIterator(object):
    """The iterator `Session.iterdocs` returns: it pages a view with a
    `_ViewCursor`, hands out the documents of each batch, and at the end
    of each flushes, lets the batch's documents go and records the
    checkpoint.

    :ivar done: the documents yielded, by earlier runs of its checkpoint too
    :ivar total: the documents the view (or the range asked) had at the
                 start
    """

    def __init__(self, session, name, batch, checkpoint, options):
        if isinstance(batch, bool) or not isinstance(batch, int) or \
                batch < 1:
            raise ValueError('iterdocs() batch must be a whole number of at '
                             'least 1, got %r' % (batch,))
        options = dict(options)
        design = options.pop('design_docs', False)
        for option in _PAGING_OPTIONS:
            if option in options:
                raise ValueError(
                    'iterdocs() pages the view itself and sets %r; ask for '
                    'a range with startkey and endkey instead' % option)
        if 'key' in options:
            options['startkey'] = options['endkey'] = options.pop('key')
            options.pop('inclusive_end', None)
        if checkpoint is not None and not isinstance(checkpoint, str):
            raise TypeError('iterdocs() checkpoint must be a name (str), got '
                            '%r' % (checkpoint,))
        self.session = session
        self.name = name
        self.batch = batch
        self.options = options
        self.skip_design = name == '_all_docs' and not design
        # What a checkpoint records of the job, to refuse it to another.
        self.job = {'view': name, 'options': _plain(options),
                    'design_docs': name == '_all_docs' and bool(design)}
        self.checkpoint = None if checkpoint is None else \
            _CHECKPOINT % checkpoint
        self.checkpoint_rev = None
        self.cursor = _ViewCursor(session._db, name,
                                  dict(options, include_docs=True))
        self.done = 0
        self.total = None
        self.over = False           # finished, or stopped by an exception
        self.queue = _collections.deque()   # documents of the batch to yield
        self.batch_entries = []     # the entries of the batch's documents
        self.batch_started = False  # whether a batch was handed out
        # The documents held when the iteration starts: the job's batches
        # leave them alone.
        self.held_before = None
        self.started = _time.perf_counter()
        self.done_at_start = 0
        if self.checkpoint is not None:
            self.resume()
        if self.total is None:
            self.total = _count_rows(session._db, name, options,
                                     self.skip_design)

    def __repr__(self):
        return '<iterdocs %r: %s of %s done>' % (self.name, self.done,
                                                 self.total)

    def __iter__(self):
        return self

    def __next__(self):
        if self.over:
            raise StopIteration
        try:
            while not self.queue:
                if self.batch_started:
                    self.end_batch()
                if not self.next_batch():
                    self.over = True
                    self.session._map.asked = None
                    self.record(finished=True)
                    raise StopIteration
        except StopIteration:
            raise
        except BaseException:
            self.over = True        # stopped; the next run resumes
            self.session._map.asked = None
            raise
        self.done += 1
        return self.queue.popleft()

    def next_batch(self):
        """Read the next batch into `queue`: whether there was one."""
        session = self.session
        if self.held_before is None:
            self.held_before = set(session._map.entries)
            if session._map.asked is None:
                session._map.asked = set()
        rows = self.cursor.page(self.batch)
        if not rows:
            return False
        if self.skip_design:
            rows = [row for row in rows
                    if not row['id'].startswith('_design/')]
        held, queued = session._map.entries, set()
        for row in rows:
            doc = row.get('doc')    # None: a link to no document
            entry = held.get(row['id'])
            if doc is None or entry is not None and entry.state is _DELETED:
                continue
            # Tracked, even at the revision a link names: a job's documents
            # are to change (a stale one meets a conflict, and the batch
            # lets it go).
            doc = self.included(_Document(doc))
            # A document of several rows of the batch comes once.
            if doc is not None and id(doc) not in queued:
                queued.add(id(doc))
                self.queue.append(doc)
                self.batch_entries.append(doc._entry)
        self.batch_started = True
        return True

    def included(self, document):
        """The session's document for ``document`` of a batch, which is
        not one the loop asked for (see `_IdentityMap.hand_out`)."""
        map = self.session._map
        asked, map.asked = map.asked, None
        try:
            return self.session._included(document, None)
        finally:
            map.asked = asked

    def end_batch(self):
        """Write what is pending, let the batch's documents go, record the
        checkpoint, and log how it went."""
        session = self.session
        written = failed = 0
        try:
            written = sum(1 for row in session.flush() if row[0])
        except FlushError as exc:
            written = sum(1 for row in exc.results if row[0])
            failed = len(exc.failures)
            raise
        finally:
            if _logger.isEnabledFor(_logging.INFO):
                seconds = _time.perf_counter() - self.started
                _logger.info(
                    'iterdocs %s: %d/%d documents, %.0f documents/s, %d '
                    'written, %d failed', self.name, self.done, self.total,
                    (self.done - self.done_at_start) / seconds if seconds
                    else 0, written, failed)
        # The batch's documents the server has as the session does go (what
        # the job holds besides, read or created in its loop, stays): one
        # whose only work left is to watch plain values the job stored in it
        # goes too, as its other references do.
        entries, asked = session._map.entries, session._map.asked or ()
        for entry in self.batch_entries:
            if entry.id not in self.held_before and entry.id not in asked \
                    and entries.get(entry.id) is entry and \
                    entry.state is _CLEAN and not entry.unsettled():
                session._map.release(entry)
        self.batch_entries = []
        self.batch_started = False
        self.record(finished=False)

    # The checkpoint.

    def resume(self):
        """Take up the checkpoint's record, if there is one."""
        record = self.session._db.get(self.checkpoint)
        if record is None:
            return
        recorded = dict((name, record.get(name, False if name == 'design_docs'
                                          else None)) for name in self.job)
        # Compared as JSON: to Python, the option key=1 is key=True.
        if _json.dumps(recorded, sort_keys=True) != \
                _json.dumps(self.job, sort_keys=True):
            raise ValueError(
                'iterdocs() checkpoint %r was recorded for view %r with '
                'options %r, not for %r with %r: give this job a name of its '
                'own, or delete %s to start over' % (
                    self.checkpoint[len(_CHECKPOINT % ''):],
                    record.get('view'), record.get('options'), self.name,
                    self.options, self.checkpoint))
        self.checkpoint_rev = record['_rev']
        self.done = self.done_at_start = record.get('done', 0)
        self.total = record.get('total')
        self.over = bool(record.get('finished'))
        self.cursor.restore(record.get('cursor') or {})

    def record(self, finished):
        """Record the position after the batch just written."""
        if self.checkpoint is None:
            return
        body = dict(self.job, _id=self.checkpoint, done=self.done,
                    total=self.total, finished=finished,
                    cursor=self.cursor.state())
        if self.checkpoint_rev is not None:
            body['_rev'] = self.checkpoint_rev
        try:
            self.checkpoint_rev = self.session._db.save(body)[1]
        except _ResourceConflict:
            # The answer to a save that landed may have been lost, and
            # python-couchdb's retry met the record it had made: then it is
            # done (one more GET to tell).
            there = self.session._db.get(self.checkpoint)
            if there is None or not _same(_content(there), _content(body),
                                          loose_numbers=True):
                raise
            self.checkpoint_rev = there['_rev']


class _ViewCursor(object):
    """Where the paging of a view stands: after the row of ``key`` and
    document ``anchor``, the last one read.

    A page starts at ``startkey=key`` with ``startkey_docid=anchor``. Rows
    of equal keys come in the order of their ids, on CouchDB and PouchDB
    Server alike, so the rows of ``key`` read already are those up to the
    anchor in that order (see `after_anchor`): the cursor keeps no list of
    them, and holds the same few values however many rows share a key.
    PouchDB Server ignores ``startkey_docid`` and starts at the key's first
    row: there the cursor skips the ``skip`` rows it counted before the
    anchor, and when the anchor is not the first row it gets (rows moved
    or went meanwhile) it goes over the key's rows again from the first,
    past those up to the anchor. So rows with equal keys are neither lost
    nor repeated on either server.
    """

    def __init__(self, db, name, options):
        self.db = db
        self.name = name
        self.options = options
        self.descending = options.get('descending') in (True, 'true')
        self.key = None
        self.anchor = None          # None before the first page
        self.skip = 0
        self.ignores_docid = False  # the server ignores startkey_docid
        self.js_order = None        # the server orders ids as JavaScript
        self.ended = False
        self.asked = 0              # the limit of the last page asked

    def state(self):
        return {'key': self.key, 'anchor': self.anchor, 'skip': self.skip,
                'ignores_docid': self.ignores_docid, 'ended': self.ended}

    def restore(self, state):
        self.key, self.anchor = state.get('key'), state.get('anchor')
        self.skip = state.get('skip', 0)
        self.ignores_docid = bool(state.get('ignores_docid'))
        self.ended = bool(state.get('ended'))

    def page(self, count):
        """The next rows, about ``count`` of them; ``[]`` at the end."""
        while not self.ended:
            rows = self.read(count)
            new = [row for row in rows if not self.read_already(row)]
            self.move(rows)
            if new:
                return new
        return []

    def read(self, count):
        """One page of rows from the cursor on: rows after the anchor, maybe
        after rows of its key read already."""
        while True:
            rows = self.ask(count)
            if not rows and self.skip:
                self.skip = 0       # rows went: the key holds fewer now
                continue
            if self.anchor is None or not rows:
                return rows
            first = rows[0]
            if self.is_anchor(first):
                return rows
            if self.read_already(first):
                # A server honouring startkey_docid starts at the anchor or
                # after it.
                self.ignores_docid = True
                return self.scan(rows, count)
            if not self.skip:
                return rows         # the anchor went: the rows after it
            self.skip = 0           # rows moved: from the key's first row

    def ask(self, count):
        """The page of ``count`` rows (and the anchor) from the cursor."""
        self.asked = count + (self.anchor is not None)
        options = dict(self.options, limit=self.asked)
        if self.anchor is not None:
            options['startkey'] = self.key
            if self.name != '_all_docs':
                options['startkey_docid'] = self.anchor
            if self.skip:
                options['skip'] = self.skip
        return self.db.view(self.name, **options).rows

    def scan(self, rows, count):
        """``rows``, asked from the ``skip``-th row of the key on, start with
        rows read already: go past them, page by page, to the page that
        holds the first row after the anchor's place (or the end)."""
        while len(rows) == self.asked and all(
                self.read_already(row) for row in rows):
            self.skip += len(rows)
            rows = self.ask(count)
        return rows

    def is_anchor(self, row):
        return row.get('id') == self.anchor and _same_key(row, self.key)

    def read_already(self, row):
        return self.anchor is not None and _same_key(row, self.key) and (
            row['id'] == self.anchor or not self.after_anchor(row['id']))

    def after_anchor(self, id):
        """Whether the row of ``id`` comes after the anchor's among the rows
        of their key. CouchDB orders their ids by their UTF-8 bytes, as
        Python orders strings, and so does PouchDB Server on disk
        (LevelDB); PouchDB Server in memory orders them as JavaScript
        does, by UTF-16 code units (the two differ for characters beyond
        U+FFFF against U+E000 and above). The database's information tells
        them apart (one request, the first time): PouchDB's names its
        adapter."""
        if self.js_order is None:
            info = self.db.info()
            self.js_order = info.get('adapter') == 'memory' or \
                info.get('backend_adapter') == 'MemDOWN'
        anchor = self.anchor
        if self.js_order:
            id, anchor = _utf16(id), _utf16(anchor)
        return id < anchor if self.descending else id > anchor

    def move(self, rows):
        """Put the cursor after ``rows``, the page just read."""
        if len(rows) < self.asked:
            self.ended = True
        if not rows or self.read_already(rows[-1]):
            return                  # rows read already: the end
        last = rows[-1]
        key = last.get('key')
        before = sum(1 for row in rows if _same_key(row, key)) - 1
        # On a server that ignores startkey_docid, the rows of the key before
        # the last one, to skip.
        if self.anchor is not None and _same_key(last, self.key):
            self.skip = self.skip + before if self.ignores_docid else 0
        else:
            self.skip = before if self.ignores_docid else 0
        self.key, self.anchor = key, last['id']


def _utf16(text):
    """``text`` in the order JavaScript gives strings."""
    return text.encode('utf-16-be', 'surrogatepass')


def _same_key(row, key):
    """Whether view row ``row`` has the key ``key``."""
    return _one_key(row.get('key'), key)


def _one_key(a, b):
    """Whether the view keys ``a`` and ``b`` collate as one: numbers by
    value, objects member by member in their order (``{"a": 1, "b": 2}``
    and ``{"b": 2, "a": 1}`` are two keys to the server)."""
    if type(a) is dict and type(b) is dict:
        return len(a) == len(b) and all(
            name == other and _one_key(value, theirs) for (name, value),
            (other, theirs) in zip(a.items(), b.items()))
    if type(a) is list and type(b) is list:
        return len(a) == len(b) and all(map(_one_key, a, b))
    if type(a) in (int, float) and type(b) in (int, float):
        return a == b
    return type(a) is type(b) and a == b


def _count_rows(db, name, options, skip_design):
    """The rows of view ``name`` asked with ``options`` (without design
    documents if ``skip_design``): the view's ``total_rows`` (one request,
    and one for the design documents), or for a range, its rows counted
    without their documents, `_COUNT_BATCH` per request (PouchDB Server's
    ``offset`` cannot tell where a range starts)."""
    ranged = any(option in options for option in ('startkey', 'endkey'))
    if not ranged:
        total = db.view(name, limit=0, **options).total_rows
        if skip_design:
            total -= len(db.view('_all_docs', startkey='_design/',
                                 endkey='_design0').rows)
        return total
    cursor, total = _ViewCursor(db, name, options), 0
    while True:
        rows = cursor.page(_COUNT_BATCH)
        if not rows:
            return total
        total += sum(1 for row in rows if not (
            skip_design and row['id'].startswith('_design/')))


# -- Web requests -------------------------------------------------------------

# The session of the web request being served; see `Middleware`.
_CURRENT = _contextvars.ContextVar('session.current')


def current():
    """The `Session` of the web request being served by `Middleware`.

    It lives in a `contextvars` variable, so each thread (and each request)
    sees its own.

    :raise LookupError: outside a request `Middleware` serves
    """
    try:
        return _CURRENT.get()
    except LookupError:
        raise LookupError(
            'session.current() has no session here: it is set only while '
            'session.Middleware serves a web request (while the app runs, '
            'and while the body it returns is read). Outside one, make a '
            'Session(db) of your own.') from None


def plain(value):
    """A plain deep copy of ``value``: a tracked document or any part of
    it becomes plain dicts, lists and JSON values; a plain value is copied
    the same way. Nothing is sent.

    It is what JSON encoders need, which do not know tracked documents::

        json.dumps(doc, default=session.plain)
        app.json.default = session.plain            # Flask

    :raise TypeError: for a value that is neither a container nor JSON (as
                      an encoder's ``default`` must)
    """
    if isinstance(value, (_Tracked, dict, list, tuple)) or \
            type(value) in _JSON_LEAVES or isinstance(value, float):
        return _plain(value)
    raise TypeError('Object of type %s is not JSON serializable; '
                    'session.plain() copies documents, their parts and JSON '
                    'values' % type(value).__name__)


class Middleware(object):
    """WSGI middleware giving each web request its own `Session`, flushed
    before the answer goes out.

    >>> app.wsgi_app = session.Middleware(app.wsgi_app, db)  # doctest: +SKIP

    For each request it makes ``Session(db, **session_options)``, the one
    `current()` returns while the request is served, and calls ``app``.

    - The app answers a status below 400 and raises nothing: the session is
      flushed before the status line goes out, so the answer tells the
      truth. A `FlushError` then turns it into ``409 Conflict`` with a JSON
      body naming each document not written and why (``{"error":
      "conflict", "failures": {id: reason}}``); CouchDB unreachable or
      failing (a connection error, a 5xx) into ``503 Service
      Unavailable``. Either way the app's own body is closed unsent.
    - The app raises, or answers 4xx or 5xx: nothing is flushed, and the
      session is thrown away.

    A body produced after the app returns (a generator, a streaming
    response) is read with the session still current. Changes made while
    it streams are flushed when it ends (the server closes it), after the
    status went out: a failure then cannot change the answer, so it is
    logged as an ERROR on the ``session`` logger and raised to the server;
    what failed stays unwritten. Flush in the app, before returning, what
    the answer depends on.
    """

    def __init__(self, app, db, **session_options):
        Session(db, **session_options)      # bad options fail now
        self.app, self.db, self.session_options = app, db, session_options

    def __call__(self, environ, start_response):
        S = Session(self.db, **self.session_options)
        started, written = [], []   # the app's start_response, its writes

        def capture(status, headers, exc_info=None):
            started[:] = [(status, headers, exc_info)]
            return written.append

        body = _in_request(S, self.app, environ, capture)
        chunks = iter(body)
        first = []
        try:
            # The app may call start_response as late as its first chunk.
            while not started and _in_request(S, _next, chunks, first):
                pass
            if not started:
                raise RuntimeError('the app never called start_response')
        except BaseException:
            _close(body)
            raise
        status, headers, exc_info = started[0]
        flushing = int(status.split(None, 1)[0]) < 400
        if flushing:
            answer = _in_request(S, _flushed, S)
            if answer is not None:
                _close(body)
                status, headers, payload = answer
                start_response(status, headers)
                return [payload]
        else:
            S.reset()
        start_response(status, headers, exc_info)
        return _Body(S, written + first, chunks, body, flushing)


def _in_request(S, function, *args):
    """``function(*args)`` with ``S`` the current session."""
    token = _CURRENT.set(S)
    try:
        return function(*args)
    finally:
        _CURRENT.reset(token)


def _next(chunks, into):
    """Append the next of ``chunks`` to ``into``: whether there was one."""
    for chunk in chunks:
        into.append(chunk)
        return True
    return False


def _flushed(S):
    """Flush ``S`` for `Middleware`: ``None`` if that went well, else
    ``(status, headers, body)`` of the answer to give instead."""
    try:
        S.flush()
    except FlushError as exc:
        answer = '409 Conflict', {
            'error': 'conflict', 'reason': 'documents were not written',
            'failures': dict((id, _describe(failure)) for id, failure in
                             exc.failures.items())}
    except (OSError, _HTTPError) as exc:
        status = _status_of(exc) if isinstance(exc, _HTTPError) else 0
        if isinstance(exc, _HTTPError) and not (
                isinstance(status, int) and status >= 500):
            raise
        answer = '503 Service Unavailable', {
            'error': 'service_unavailable',
            'reason': 'CouchDB could not be reached: %s' % (exc,)}
    else:
        return None
    _logger.info('%s: %s', answer[0], answer[1]['reason'])
    payload = _json.dumps(answer[1]).encode('utf-8')
    return answer[0], [('Content-Type', 'application/json'),
                       ('Content-Length', str(len(payload)))], payload


def _close(body):
    close = getattr(body, 'close', None)
    if close is not None:
        close()


class _Body(object):
    """The app's body as `Middleware` gives it to the server: read with the
    session current, and the changes made meanwhile flushed when the
    server closes it (if ``flushing``)."""

    def __init__(self, session, first, chunks, body, flushing):
        self.session, self.first, self.chunks = session, first, chunks
        self.body, self.flushing = body, flushing

    def __iter__(self):
        for chunk in self.first:
            yield chunk
        while True:
            try:
                chunk = _in_request(self.session, next, self.chunks)
            except StopIteration:
                return
            except BaseException:
                self.flushing = False   # the app failed: write nothing
                raise
            yield chunk

    def close(self):
        try:
            _in_request(self.session, _close, self.body)
        finally:
            if self.flushing and self.session.has_changes():
                try:
                    _in_request(self.session, self.session.flush)
                except Exception:
                    _logger.exception('changes made while the body streamed '
                                      'were not all written')
                    raise


# -- Tracked proxies ----------------------------------------------------------

# A tracked proxy is a ProxyTypes ObjectProxy around one dict or list of a
# document, plus the `_Entry` of that document. Every mutator calls
# `_touch()` before it changes the subject: the first change of a dict or
# list records a shallow copy of it, which diffs compare with (see
# `_Entry`). Every read path wraps the children it returns, and each proxy
# knows its parent, so changes at any depth are seen and found. A plain
# dict or list stored in a document becomes the document's own (adopted:
# changes made later through the user's reference to it are found, see
# `_Tracked._own`); a tracked value stored, and the values `pop()` hands
# out, are deep copies (`_plain`). The subject only ever holds plain dicts,
# lists and scalars: never a proxy.
#
# Every method of a dict or list is defined here or by ProxyTypes: those
# that only read and hand out no child (`keys`, `index`, `count`,
# comparisons, `len`, `repr`, ...) run on the subject. ProxyTypes' own
# in-place operators would bypass tracking, so they are all redefined here.


def _for_json(base):
    """The class tracked proxies of ``base`` objects give as their
    ``__class__``: a subclass, so that ``isinstance`` holds at C speed, whose
    name says what to do to a JSON encoder that meets one (they name the
    type they cannot encode)."""
    return type('%s (tracked by session; session.plain() copies it for '
                'JSON: json.dumps(value, default=session.plain))'
                % base.__name__, (base,), {'__slots__': (),
                                           '__module__': 'session'})


class _Tracked(_ObjectProxy):
    """A proxy for one dict or list of a tracked document."""

    __slots__ = ('_entry', '_parent', '_key')

    # ProxyTypes' proxies look every attribute up on the subject, in Python,
    # so that an explicit ``proxy.__setitem__(k, v)`` would change the
    # subject untracked, and every attribute access costs a Python call.
    # Python's own attribute access finds the proxy's methods and slots at
    # C speed, and, with no `__getattr__` (as ProxyTypes' wrappers have) and
    # none of ProxyTypes' Python `__setattr__` and `__delattr__`, reads and
    # stores ``proxy.__subject__`` and the slots below as fast as those of
    # any object: the reads of documents are mostly these. Each subclass
    # says what class its subjects are, as a plain class attribute, so that
    # ``isinstance(doc, dict)`` holds and costs no Python call.
    __getattribute__ = object.__getattribute__
    __setattr__ = object.__setattr__
    __delattr__ = object.__delattr__
    __hash__ = None             # as a dict's or list's (ProxyTypes hashes)
    # ProxyTypes' proxies are callable (they call the subject): Django's
    # templates would call a document instead of reading its fields.
    do_not_call_in_templates = True

    def _touch(self):
        """Called before each change: the first change of a clean document
        makes it dirty, and the first change of each of its dicts and lists
        records a shallow copy of it (see `_Entry`)."""
        entry = self._entry
        copies = entry.copies
        if copies is None:
            if entry.state is not _CLEAN:
                return          # new, or diffed against a base of its own
            if entry.map is None:
                return          # no longer in a session
            entry.map.touch(entry)
            copies = entry.copies
            if copies is None:
                return          # no longer in a session
        subject = self.__subject__
        place = id(subject)
        if place in copies:
            return
        before = subject.copy()
        snapshots = entry.map.snapshots
        if snapshots:
            # A plain value the document adopted may still be changed
            # through the user's reference, even once out of the document:
            # the version before holds its copy as the server has it.
            for key, child in (before.items() if type(before) is dict
                               else enumerate(before)):
                held = snapshots.get(id(child))
                if held is not None and held[0] is child:
                    before[key] = held[1]
        copies[place] = (subject, before)
        _mark(entry.marked, self)

    def _own(self, value, key):
        """``value``, about to be stored at ``key``, as the document's own.

        A plain dict or list from outside the session's documents becomes
        part of the document itself, as it would in a plain dict: the
        entry adopts it, and finds the changes made later through the
        user's references to it (see `_Entry.sync`), also when it was
        taken out and is stored again. A tracked value, or one a document
        holds already, is stored as a plain deep copy: documents are JSON
        trees.
        """
        kind = type(value)
        if kind in _JSON_LEAVES:
            return value
        entry = self._entry
        if (kind is not dict and kind is not list) or entry.map is None or \
                (entry.map.owned.get(id(value)) is value and
                 not entry.map.let_go(value)):
            return _plain(value)
        entry.map.adopt(entry, value, _wrap(value, entry, self, key))
        return value

    def copy(self):
        """A plain deep copy (a shallow one would let untracked aliases of
        the children escape)."""
        return _plain(self.__subject__)

    def __copy__(self):
        return _plain(self.__subject__)

    def __deepcopy__(self, memo):
        return _plain(self.__subject__)

    def __reduce_ex__(self, protocol):
        # Pickles (and copies) as the plain value.
        value = _plain(self.__subject__)
        return type(value), (value,)


def _mark(marked, proxy):
    """Mark the way from the root of a document down to ``proxy``, just
    copied, for diffs to follow: each dict or list above it, with the key
    of its marked child, or the set of them once there are several (see
    `_Entry`)."""
    parent = proxy._parent
    while parent is not None:
        container, key = parent.__subject__, proxy._key
        if type(container) is list or \
                container.get(key, _MISSING) is not proxy.__subject__:
            key = _place(container, key, proxy.__subject__)   # or moved
            if key is _MISSING:
                return      # taken out of the document: not its change
        mark = marked.get(id(container))
        if mark is not None:
            keys = mark[1]
            if type(keys) is set:
                keys.add(key)
            elif keys != key:
                marked[id(container)] = (container, {keys, key})
            return
        # Most marks have one key: no set for it.
        marked[id(container)] = (container, key)
        proxy, parent = parent, parent._parent


def _in_place(proxy, root):
    """Whether the dict or list of ``proxy`` is still where it was read,
    in the document whose subject is ``root``."""
    while True:
        parent = proxy._parent
        if parent is None:
            return proxy.__subject__ is root
        if _place(parent.__subject__, proxy._key,
                  proxy.__subject__) is _MISSING:
            return False
        proxy = parent


def _make_plain(value, owned, seen):
    """Turn what a plain dict or list about to be adopted holds into plain
    dicts, lists and scalars, in place, and return its dicts and lists:
    tracked values, tuples, and a dict or list met a second time (``seen``
    has those met so far) or in ``owned`` (adopted by a document already)
    become plain copies, since a document holds no object twice; other
    plain dicts and lists inside it stay themselves. A ``value`` seen
    already is one adopted inside another: nothing to do.

    :raise ValueError: if ``value`` holds itself
    """
    if id(value) in seen:
        return []
    work = [value]
    seen[id(value)] = value
    parts = [value]
    while work:
        container = work.pop()
        items = container.items() if type(container) is dict else \
            enumerate(container)
        for key, item in list(items):
            kind = type(item)
            if kind in _JSON_LEAVES:
                continue
            if (kind is dict or kind is list) and id(item) not in seen and \
                    owned.get(id(item)) is not item:
                seen[id(item)] = item
                parts.append(item)
                work.append(item)
            elif isinstance(item, (dict, list, tuple)):
                container[key] = _plain(item)
    return parts



class _TrackedDict(_Tracked):
    """A tracked dict."""

    __slots__ = ()
    __class__ = _for_json(dict)

    # Reads that hand out children.

    def __getitem__(self, key):
        value = self.__subject__[key]
        if type(value) in _READ_LEAVES:
            return value
        cls = _WRAPPERS.get(type(value))
        if cls is None:
            return value
        # As `_wrap` does, without a call: the most common read of a child.
        proxy = _new(cls)
        proxy.__subject__ = value
        proxy._entry = self._entry
        proxy._parent = self
        proxy._key = key
        return proxy

    def get(self, key, default=None):
        subject = self.__subject__
        if key in subject:
            return _wrap(subject[key], self._entry, self, key)
        return default

    def keys(self):
        view = _new(_KeysView)
        view._mapping = self
        return view

    fromkeys = dict.fromkeys

    def __iter__(self):
        # ProxyTypes defines no __iter__ for Python 3.
        return iter(self.__subject__)

    def __reversed__(self):
        return reversed(self.__subject__)

    def items(self):
        view = _new(_ItemsView)
        view._mapping = self    # as the view's __init__, without a call
        return view

    def values(self):
        view = _new(_ValuesView)
        view._mapping = self
        return view

    def __or__(self, other):
        merged = _plain(self.__subject__)
        merged.update(_plain(other))
        return merged

    def __ror__(self, other):
        merged = _plain(other)
        merged.update(_plain(self.__subject__))
        return merged

    # Mutators.

    def __setitem__(self, key, value):
        subject = self.__subject__
        if type(value) not in _JSON_LEAVES:
            if _is_child(value, subject.get(key, _MISSING)):
                return      # d[k] = d[k], and the store of d[k] += ...
            value = self._own(value, key)
        self._touch()
        subject[key] = value

    def __delitem__(self, key):
        subject = self.__subject__
        if key not in subject:
            raise KeyError(key)
        self._touch()
        del subject[key]

    def setdefault(self, key, default=None):
        subject = self.__subject__
        if key not in subject:
            default = self._own(default, key)
            self._touch()
            subject[key] = default
        return _wrap(subject[key], self._entry, self, key)

    def update(self, *args, **kwargs):
        values = dict((key, self._own(value, key)) for key, value
                      in dict(*args, **kwargs).items())
        if values:
            self._touch()
            self.__subject__.update(values)

    def __ior__(self, other):
        self.update(other)
        return self

    # What pop() and popitem() take out of a document is handed out as a
    # copy: the object itself may still be part of the version a diff
    # compares with.

    def pop(self, key, *default):
        subject = self.__subject__
        if key not in subject:
            return subject.pop(key, *default)
        self._touch()
        return _plain(subject.pop(key))

    def popitem(self):
        subject = self.__subject__
        if subject:
            self._touch()
        key, value = subject.popitem()
        return key, _plain(value)

    def clear(self):
        if self.__subject__:
            self._touch()
            self.__subject__.clear()


# The views of tracked dicts hand out tracked values, and offer what a
# dict's own views offer: reversed(), and ``mapping``, a read-only view of
# the tracked dict.

class _KeysView(_abc.KeysView):
    """``keys()`` of a tracked dict."""

    __slots__ = ()

    def __reversed__(self):
        return reversed(self._mapping.__subject__)

    mapping = property(lambda self: _types.MappingProxyType(self._mapping))


class _ItemsView(_abc.ItemsView):
    """``items()`` of a tracked dict: the values are tracked."""

    __slots__ = ()

    def __iter__(self):
        # Lazy, as a dict's own view: a change of size while iterating
        # raises RuntimeError.
        proxy = self._mapping
        subject = proxy.__subject__
        return zip(subject, _tracked_values(subject.items(), proxy._entry,
                                            proxy))

    def __reversed__(self):
        proxy = self._mapping
        return ((key, proxy[key]) for key in reversed(proxy.__subject__))

    mapping = _KeysView.mapping


class _ValuesView(_abc.ValuesView):
    """``values()`` of a tracked dict: the values are tracked."""

    __slots__ = ()

    def __iter__(self):
        proxy = self._mapping
        subject = proxy.__subject__
        return _tracked_values(subject.items(), proxy._entry, proxy)

    def __reversed__(self):
        proxy = self._mapping
        return (proxy[key] for key in reversed(proxy.__subject__))

    mapping = _KeysView.mapping


# The iterations of tracked dicts and lists, the most frequent reads of all,
# go through `_tracked_values`, with what it calls looked up once (locals
# are the fastest names). Each value is wrapped as it comes, never before:
# a dict or list put in while the loop runs (by the user, a refresh, a
# merge) comes out tracked too.

# The proxy class of each type of value that holds others (filled in below
# the classes).
_WRAPPERS = {}


def _tracked_values(items, entry, proxy, type=type, leaves=_READ_LEAVES,
                    wrappers=_WRAPPERS, new=object.__new__):
    # Of a dict (``items`` its items) or a list (``items`` enumerated).
    for key, value in items:
        if type(value) in leaves:
            yield value
            continue
        cls = wrappers.get(type(value))
        if cls is None:
            yield value
        else:
            child = new(cls)        # as `_wrap` does, without a call
            child.__subject__ = value
            child._entry = entry
            child._parent = proxy
            child._key = key
            yield child


class _TrackedList(_Tracked):
    """A tracked list."""

    __slots__ = ()
    __class__ = _for_json(list)

    # Reads that hand out children (a slice is a copy, as in Python; a plain
    # deep one, so that no untracked alias escapes).

    def __getitem__(self, index):
        if isinstance(index, slice):
            return _plain(self.__subject__[index])
        subject = self.__subject__
        value = subject[index]
        if type(value) in _READ_LEAVES:
            return value
        if index < 0:
            index += len(subject)
        return _wrap(value, self._entry, self, index)

    def __iter__(self):
        # Lazy, as a list's own iterator is: items removed or added while
        # iterating change what comes next, as they would in a plain list.
        return _tracked_values(enumerate(self.__subject__), self._entry, self)

    def __reversed__(self):
        # As a list's own reverse iterator: by index, stopping where the
        # list became shorter than the next index.
        subject = self.__subject__
        entry = self._entry
        index = len(subject) - 1
        while 0 <= index < len(subject):
            value = subject[index]
            yield value if type(value) in _JSON_LEAVES else \
                _wrap(value, entry, self, index)
            index -= 1

    def count(self, value):
        return self.__subject__.count(value)

    def index(self, value, *bounds):
        return self.__subject__.index(value, *bounds)

    def __add__(self, other):
        if not isinstance(other, list):
            return NotImplemented
        return _plain(self.__subject__) + _plain(other)

    def __radd__(self, other):
        if not isinstance(other, list):
            return NotImplemented
        return _plain(other) + _plain(self.__subject__)

    def __mul__(self, times):
        return _plain(self.__subject__ * times)

    __rmul__ = __mul__

    # Mutators.

    def __setitem__(self, index, value):
        subject = self.__subject__
        if isinstance(index, slice):
            value = [self._own(item, None) for item in value]
        elif _is_child(value, subject[index]):
            return      # l[i] = l[i], and the store of l[i] += ...
        else:
            value = self._own(value, index)
        self._touch()
        subject[index] = value

    def __delitem__(self, index):
        self._touch()
        del self.__subject__[index]

    def append(self, value):
        subject = self.__subject__
        if type(value) not in _JSON_LEAVES:
            value = self._own(value, len(subject))
        self._touch()
        subject.append(value)

    def extend(self, values):
        values = [self._own(item, None) for item in values]
        self._touch()
        self.__subject__.extend(values)

    def __iadd__(self, values):
        self.extend(values)
        return self

    def __imul__(self, times):
        subject = self.__subject__
        # Repeat with copies: a document holds no object twice.
        copies = [_plain(item) for _ in range(times - 1) for item in subject]
        self._touch()
        if times > 0:
            subject.extend(copies)
        else:
            subject.clear()
        return self

    def insert(self, index, value):
        value = self._own(value, None)
        self._touch()
        self.__subject__.insert(index, value)

    def pop(self, index=-1):
        self._touch()
        return _plain(self.__subject__.pop(index))

    def remove(self, value):
        self._touch()
        self.__subject__.remove(_plain(value))

    def clear(self):
        self._touch()
        self.__subject__.clear()

    def sort(self, *, key=None, reverse=False):
        self._touch()
        if key is not None:
            # The key function sees tracked values, as every read does.
            entry, given = self._entry, key

            def key(value):
                return given(_wrap(value, entry, self, None))
        self.__subject__.sort(key=key, reverse=reverse)

    def reverse(self):
        self._touch()
        self.__subject__.reverse()


_new = object.__new__
_WRAPPERS.update({dict: _TrackedDict, list: _TrackedList})


def _place(container, key, child):
    """Where ``child`` is in ``container`` now: ``key``, where it was read,
    unless list items moved since; `_MISSING` if it was taken out."""
    if isinstance(container, dict):
        return key if container.get(key, _MISSING) is child else _MISSING
    if key is not None and 0 <= key < len(container) and \
            container[key] is child:
        return key
    for index, item in enumerate(container):
        if item is child:
            return index
    return _MISSING


def _is_child(value, child):
    """Whether ``value`` is ``child``, or the proxy of ``child``."""
    return value is child or (isinstance(value, _Tracked) and
                              value.__subject__ is child)


def _wrap(value, entry, parent, key):
    """``value`` read at ``key`` of ``parent`` (a proxy of the document of
    ``entry``): a tracked proxy for a dict or list, the value itself
    otherwise."""
    cls = _WRAPPERS.get(type(value))
    if cls is None:
        return value
    proxy = _new(cls)
    proxy.__subject__ = value
    proxy._entry = entry
    proxy._parent = parent
    proxy._key = key
    return proxy


class _TrackedDocument(_TrackedDict):
    """A tracked `couchdb.Document`: a whole document.

    Its ``_id`` is fixed: the session writes the document under the id it
    was read or created with, so a change of it is refused at once, and
    `clear` keeps ``_id`` and ``_rev``.
    """

    # A `couchdb.Document` takes attributes and weak references.
    __slots__ = ('__dict__', '__weakref__')
    __class__ = _for_json(_Document)
    fromkeys = _Document.fromkeys

    # As `couchdb.Document`'s.

    @property
    def id(self):
        return self.__subject__['_id']

    @property
    def rev(self):
        return self.__subject__.get('_rev')

    def __setitem__(self, key, value):
        if key == '_id':
            self._check_id(value)
        _TrackedDict.__setitem__(self, key, value)

    def __delitem__(self, key):
        if key == '_id':
            self._check_id(_MISSING)
        _TrackedDict.__delitem__(self, key)

    def pop(self, key, *default):
        if key == '_id':
            self._check_id(_MISSING)
        return _TrackedDict.pop(self, key, *default)

    def popitem(self):
        subject = self.__subject__
        for key in reversed(subject):
            if key not in _IDENTITY:
                return key, self.pop(key)
        raise KeyError('popitem(): the document holds only its _id and _rev')

    def update(self, *args, **kwargs):
        values = dict(*args, **kwargs)
        if '_id' in values:
            self._check_id(values['_id'])
        _TrackedDict.update(self, values)

    def clear(self):
        subject = self.__subject__
        kept = [(key, subject[key]) for key in _IDENTITY if key in subject]
        if len(subject) > len(kept):
            self._touch()
            subject.clear()
            subject.update(kept)

    def _check_id(self, value):
        id = self.__subject__.get('_id')
        if value != id:
            raise ValueError(
                'document %r: its _id cannot change (asked for %s); the '
                'session writes it under the id it has. To move it, create '
                'a document with the new id and delete this one.'
                % (id, 'removal' if value is _MISSING else repr(value)))

    def __reduce_ex__(self, protocol):
        # Pickles (and copies) as a plain `couchdb.Document`.
        return _Document, (_plain(self.__subject__),)



def _root(document, entry):
    """The tracked proxy of a whole document (a `couchdb.Document`)."""
    proxy = _new(_TrackedDocument)
    proxy.__subject__ = document
    proxy._entry = entry
    proxy._parent = None
    proxy._key = None
    return proxy


# -- The identity map ---------------------------------------------------------

# What the session knows of a document is an `_Entry`, in one of four states.
# Only `_IdentityMap` changes them, through the transitions below, one method
# each; they keep `pending` right too.
#
#   state     the document is ...                 diffed against
#   CLEAN     the server's version at its _rev    itself: nothing to write
#   DIRTY     changed since it was CLEAN          `copies`, or a `base`
#   NEW       created (or re-created) here        the empty document
#   DELETED   to be deleted (at `rev`)            -
#
#   transition               from -> to           on
#   add(entry)               - -> any             read, create, save, del S[id]
#   touch(entry)             CLEAN -> DIRTY       the first change
#   replace(entry, doc)      any -> DIRTY, NEW    save() of new content
#   delete(entry, rev)       any -> DELETED       del S[id], delete(),
#                                                 a resolution
#   recreate(entry, doc)     DELETED -> NEW       S[id] = ... after del S[id]
#   rebase(entry, ...)       any -> DIRTY         a conflict settled over the
#                                                 server's version, the base
#   landed(entry, rev, ...)  (unchanged)          a lost write found on the
#   landed_under(entry, ...) any -> DIRTY, -      server (under another
#                                                 writer's change: it is the
#                                                 base),
#   not_landed(entry)        (unchanged), -       or found missing
#   clean(entry)             any -> CLEAN         written, uploaded, refreshed,
#                                                 or changes that cancel out
#   written(entry, ...)      any -> CLEAN, -      the server took the write
#   forget(entry)            any -> -             expunge, reset, gone
#
# `pending` holds the entries a flush must look at: all but the CLEAN ones,
# and CLEAN ones with attachment changes, adopted values or a write of
# unknown outcome (`wait`). `uploaded`, `reload` and `wait` are `clean`'s
# kin. An entry's `sent` (the writes whose answers were lost) is set by
# `_Flush`, which alone knows when a request went out.

class _IdentityMap(object):
    """The documents of one session, by id, and their states."""

    __slots__ = ('entries', 'pending', 'owned', 'snapshots', 'adopters',
                 'sessions', 'asked')

    def __init__(self):
        # The `Session` objects holding the map (see `Session.__copy__`).
        self.sessions = 1
        # While an iterdocs job runs: the ids of the documents its loop
        # asked the session for itself (see `hand_out`), which its batches
        # keep; otherwise None.
        self.asked = None
        # id: _Entry of every document the session holds: read, created,
        # adopted or deleted.
        self.entries = {}
        # id: _Entry a flush must look at. Flush looks nowhere else, so its
        # cost follows the number of changed documents, not of held ones.
        self.pending = {}
        # id(dict or list): it, for each dict and list of the plain values
        # the documents adopted (as of the adoption, or the last time the
        # document was clean): the user holds references into them, and
        # storing one elsewhere must copy it.
        self.owned = {}
        # id(adopted value): (it, its copy as of the last time its document
        # was clean).
        self.snapshots = {}
        # id(adopted value): (it, the entry of the document holding it).
        self.adopters = {}

    def add(self, entry):
        entry.map = self
        self.entries[entry.id] = entry
        if entry.state is not _CLEAN:
            self.pending[entry.id] = entry
        return entry

    def track(self, document):
        """The entry of ``document``, just read from the server: the one
        held already, or a new CLEAN one."""
        id = document['_id']
        entry = self.entries.get(id)
        if entry is None:
            # `add`, for a CLEAN entry (a read makes one for each document).
            entry = self.entries[id] = _Entry(id, document, _CLEAN)
            entry.map = self
        if self.asked is not None:
            self.asked.add(entry.id)
        return entry

    def hand_out(self, entry):
        """The document of ``entry``, held already, for a read of the
        user's: a job's loop that asks for a document itself (a summary it
        counts into) keeps it, even if it is also one of the job's batch
        (see `_DocIterator.end_batch`)."""
        if self.asked is not None:
            self.asked.add(entry.id)
        return entry.doc

    def touch(self, entry):
        """Before the first change of a CLEAN document: from now on each of
        its dicts and lists is copied (shallowly) before its own first
        change. Copy on write: documents only read cost nothing, and a
        change costs the size of what it changes."""
        if entry.state is _CLEAN and entry.map is self:
            entry.copies, entry.marked = {}, {}
            entry.state = _DIRTY
            self.pending[entry.id] = entry

    def replace(self, entry, document):
        """The user gives the document new content (the session's own
        copy, ``document``), diffed against the version it replaces."""
        if entry.state is not _NEW:
            base = entry.merge_base()
            entry.base = _plain(base) if base is entry.subject else base
            entry.copies = entry.marked = None
            entry.state = _DIRTY
        entry.hold(document)
        self.pending[entry.id] = entry

    def delete(self, entry, rev=None):
        """Queue the deletion, of revision ``rev`` if given (else of the
        revision the document has, or the one looked up at flush time)."""
        if entry.attachments.changes:
            entry.attachments.clear()
        if rev is not None:
            entry.rev = rev
        elif entry.doc is not None and entry.rev is None:
            entry.rev = entry.subject.get('_rev')
        entry.state = _DELETED
        self.pending[entry.id] = entry

    def recreate(self, entry, document):
        """New content for a DELETED entry, to be written over the deleted
        revision (kept in `rev`)."""
        entry.hold(document)
        entry.state = _NEW
        entry.base = {}
        entry.copies = entry.marked = None
        # The attachments lost writes carried were the old content's: the
        # new document has none of them (its write drops any that landed).
        # What was sent stays, to recognise those writes.
        if entry.sent is not None:
            entry.sent = [(sent, None) for sent, _ in entry.sent]
        self.pending[entry.id] = entry

    def rebase(self, entry, content, rev, theirs):
        """Hold ``content``, resolved against the server's version
        ``theirs`` (``None`` if deleted) at revision ``rev`` (``None`` to
        write without one), to be written over it; ``theirs`` becomes the
        base."""
        document = _copy_in(content)
        document['_id'] = entry.id
        document.pop('_rev', None)
        if rev is not None:
            document['_rev'] = rev
        entry.hold(document)
        entry.base = _plain(theirs) if theirs is not None else {}
        entry.copies = entry.marked = None
        entry.state = _DIRTY
        entry.rev = entry.sent = None
        self.pending[entry.id] = entry

    def landed(self, entry, rev, carried):
        """A write whose answer was lost, carrying the attachment changes
        ``carried``, reached the server, at ``rev``: they are done, unless
        changed since (see `_PendingAttachments.landed`)."""
        entry.sent = None
        if entry.state is _DELETED:
            return
        subject = entry.subject
        subject['_rev'] = rev
        entry.attachments.landed(subject, carried or {})

    def landed_under(self, entry, rev, sent, carried):
        """`landed`, for a write another writer changed since: the entry
        is as if the answer had come back, ``sent`` (the write as the
        session made it, at ``rev``) being the base of what was changed
        since, for the conflict with the other writer's change to settle.
        A deletion's entry has nothing of it left; a deletion the user made
        since deletes ``rev``, and a document created since writes over
        it."""
        self.landed(entry, rev, carried)
        if sent.get('_deleted'):
            if entry.state is _DELETED:
                self.forget(entry)
            else:
                entry.rev = rev     # created again since: over the deletion
            return
        base = _plain(sent)
        base['_rev'] = rev
        if entry.state is _DELETED:
            entry.rev = rev
        else:
            # What a read said of the leaves is no content that was sent.
            subject = entry.subject
            for key in ('_conflicts', '_deleted_conflicts'):
                if key in subject:
                    base[key] = _plain(subject[key])
            _take_stubs(base, subject)
            entry.state = _DIRTY
            entry.rev = None
        entry.base = base
        entry.copies = entry.marked = None
        self.pending[entry.id] = entry

    def not_landed(self, entry):
        """The write whose answer was lost did not reach the server: the
        attachment deletions queued only because it might have are
        dropped, and a create it carried that was deleted since is
        forgotten (the return value says so)."""
        entry.sent = None
        if entry.rev is _LOOKUP and entry.state is _DELETED:
            self.forget(entry)      # nothing of the session's to delete
            return True
        if entry.doc is not None:
            entry.attachments.unsent(entry.subject.get('_attachments'))
            self.wait(entry)
        return False

    def clean(self, entry):
        """The document equals what the server has: nothing to write (but
        attachments may wait for their upload)."""
        entry.state = _CLEAN
        entry.base = entry.copies = entry.marked = None
        entry.rev = entry.sent = None
        if entry.adopted:
            # Later changes of adopted values are found against copies of
            # them as the server has them now. (Disowned first: one may hold
            # another, adopted after it.)
            records, entry.adopted, seen = entry.adopted, [], {}
            for record in records:
                self.disown(record[3])
            for value, proxy, _, parts in records:
                if _in_place(proxy, entry.subject):
                    parts = self.own(value, seen)
                    before = _plain(value)
                    self.snapshots[id(value)] = (value, before)
                    entry.adopted.append([value, proxy, before, parts])
                    self.adopters[id(value)] = (value, entry)
        # `wait`: `unsettled` but for `sent`, cleared above.
        if entry.adopted or entry.attachments.changes or entry.losers or \
                entry.clash:
            self.wait(entry)
        elif entry.map is self:
            # The most common end of a write: nothing left.
            self.pending.pop(entry.id, None)

    def adopt(self, entry, value, proxy):
        """``value``, a plain dict or list of the user's, becomes part of
        the document of ``entry`` at the place of ``proxy``."""
        if entry.adopted is None:
            entry.adopted = []
        entry.adopted.append([value, proxy, None, self.own(value, {})])
        self.adopters[id(value)] = (value, entry)

    def let_go(self, value):
        """If ``value`` is a dict or list a document adopted and no longer
        holds, let it go, to be adopted again; whether it did."""
        held = self.adopters.get(id(value))
        if held is None or held[0] is not value:
            return False
        entry = held[1]
        for n, record in enumerate(entry.adopted or ()):
            if record[0] is value:
                if _in_place(record[1], entry.subject):
                    return False
                self.disown(record[3])
                del entry.adopted[n]
                return True
        return False

    def own(self, value, seen):
        """Make ``value`` plain (see `_make_plain`) and record its dicts
        and lists as the documents'; return them."""
        parts = _make_plain(value, self.owned, seen)
        for part in parts:
            self.owned[id(part)] = part
        return parts

    def disown(self, parts):
        for part in parts:
            if self.owned.get(id(part)) is part:
                del self.owned[id(part)]
            if self.adopters.get(id(part), (None,))[0] is part:
                del self.adopters[id(part)]
            held = self.snapshots.get(id(part))
            if held is not None and held[0] is part:
                del self.snapshots[id(part)]

    def written(self, entry, rev, payload):
        """The server took ``payload``, the entry's write, giving ``rev``;
        the attachment changes that went inline with it are done."""
        if entry.state is _DELETED:
            self.forget(entry)
            return
        subject = entry.doc.__subject__
        subject['_rev'] = rev
        if entry.attachments.changes:
            entry.attachments.written(subject, payload)
        self.clean(entry)

    def uploaded(self, entry, filename, rev, attachment):
        """An attachment was uploaded on its own, giving ``rev``."""
        entry.subject['_rev'] = rev
        entry.attachments.done(entry.subject, filename, attachment)
        self.clean(entry)

    def reload(self, entry, document):
        """Hold ``document``, just read from the server, dropping the local
        changes, attachment changes too."""
        entry.hold(document)
        entry.attachments = _NO_ATTACHMENTS
        entry.leaves = entry.losers = entry.clash = None
        self.clean(entry)

    def wait(self, entry):
        """Put a CLEAN entry in `pending` while it has attachment changes,
        adopted values or a write of unknown outcome, and take it out when
        it has none."""
        if entry.map is not self or entry.state is not _CLEAN:
            return
        if entry.adopted or entry.unsettled():
            self.pending[entry.id] = entry
        else:
            self.pending.pop(entry.id, None)

    def forget(self, entry):
        """The entry leaves the session: no longer held, pending or
        tracked."""
        if entry.map is self:
            self.pending.pop(entry.id, None)
            if self.entries.get(entry.id) is entry:
                del self.entries[entry.id]
        for record in entry.adopted or ():
            self.disown(record[3])
        entry.untrack()

    def release(self, entry):
        """`forget` the entry, for good: it also lets go of its document.
        The two refer to each other; without that, reference counting frees
        them, and the document's content, as soon as nothing else holds the
        document, instead of leaving a cycle for the garbage collector to
        find (a job's batches, a web request's session: each full
        collection goes over all of them). The document, if kept, stays
        readable and is tracked no more."""
        self.forget(entry)
        entry.doc = None

    def close(self):
        """`release` every entry: the session is gone. The map goes with
        it, so its tables are emptied whole rather than entry by entry."""
        for entries in (self.entries, self.pending):
            for entry in entries.values():
                entry.untrack()
                entry.doc = None
            entries.clear()
        self.owned.clear()
        self.snapshots.clear()
        self.adopters.clear()


# `_IdentityMap.hand_out` when no job runs: the entry's document as it is.
_get_doc = _attrgetter('doc')


# -- Document entries ---------------------------------------------------------

class _Entry(object):
    """What the session knows of one document id: its content, what diffs
    compare it with, and what waits for a flush. Its state changes only
    through the `_IdentityMap`."""

    __slots__ = ('id', 'doc', 'state', 'base', 'copies', 'marked', 'rev',
                 'map', 'sent', 'attachments', 'adopted', 'leaves', 'losers',
                 'clash')

    def __init__(self, id, document, state, base=None, rev=None):
        self.id = id
        # The tracked root proxy (`_root`, made here without a call: a
        # read makes one for each document); None for a deletion by id
        # only.
        if document is None:
            self.doc = None
        else:
            self.doc = proxy = _new(_TrackedDocument)
            proxy.__subject__ = document
            proxy._entry = self
            proxy._parent = proxy._key = None
        self.state = state
        # What the document is diffed against: `base` is a whole version,
        # for new documents (the empty one) and resolved ones (the
        # server's); a document changed since it was clean has `copies`
        # instead: {id(dict or list): (it, a shallow copy before its first
        # change)}, and `marked`: {id: (dict or list, the key of its marked
        # child, or the set of them)} for the ones holding those. Dicts and
        # lists never copied are as they were: copying only what changes
        # keeps the first change cheap, and diffs follow the marked ones
        # only.
        # None but in those states.
        self.base = base
        self.copies = self.marked = None
        # For DELETED: the revision to delete. For NEW: the revision of a
        # deleted document this one replaces. Either may be _LOOKUP.
        self.rev = rev
        # The identity map holding the entry; None once the session forgot
        # it, and then it tracks nothing.
        self.map = None
        # The writes whose answers never came back since the entry was
        # last settled, oldest first: [(what was sent, the attachment
        # changes it carried: {filename: _Attachment or None})]. Any one of
        # them may be what the server holds: until the entry is settled, a
        # server version equal to one is the session's own write (and only
        # then: see `_Flush`). Each later one was sent over the same
        # revision, so at most one of them landed. None when none.
        self.sent = None
        # Shared while there are none (most documents): see
        # `own_attachments`.
        self.attachments = _NO_ATTACHMENTS
        # [[dict or list, its proxy, a deep copy or None, the dicts and
        # lists in it]] of the plain values the user stored in the document
        # (see `_Tracked._own`): the user may change them through their own
        # references, which no proxy sees, so they are compared with the
        # copy taken when the document was last clean (`sync`). None when
        # there are none.
        self.adopted = None
        # Replication conflicts (see `Session.resolve_conflicts`): the
        # leaves read, as (winner, losers); the revisions of the losing
        # leaves to delete once the document is written; the clash that
        # keeps the document from being written. None when none.
        self.leaves = self.losers = self.clash = None

    @property
    def subject(self):
        return self.doc.__subject__

    def untrack(self):
        """Out of its identity map (see `_IdentityMap.forget`): it tracks
        nothing more."""
        self.map = None
        self.copies = self.marked = self.adopted = None
        if self.state is not _DELETED:
            self.state = _CLEAN

    def lost(self, sent, carried):
        """Record ``sent``, a write whose answer never came back, carrying
        the attachment changes ``carried``. Sent again as it was (a flush
        retried without a change), it is one write."""
        if self.sent is None:
            self.sent = []
        elif _same(self.sent[-1][0], sent):
            del self.sent[-1]
        self.sent.append((sent, carried))

    @property
    def carried(self):
        """The attachment changes the writes in `sent` carried, by
        filename: any of them may be on the server."""
        return dict(item for _, carried in self.sent or ()
                    for item in (carried or {}).items())

    def own_attachments(self):
        """The entry's `attachments`, its own, to change."""
        if self.attachments is _NO_ATTACHMENTS:
            self.attachments = _PendingAttachments()
        return self.attachments

    # Adopted values.

    def unsettled(self):
        """Whether a CLEAN entry has work left that is the server's to
        answer: attachment changes, a write of unknown outcome, losing
        leaves to delete, a clash to report."""
        return bool(self.attachments.changes or self.sent is not None or
                    self.losers or self.clash)

    def sync(self):
        """Make the changes made to adopted values through the user's own
        references visible to diffs: a clean document whose adopted value
        differs from its copy becomes dirty, and a dirty one diffs each
        adopted value against its copy."""
        if not self.adopted or self.state is _DELETED:
            return
        records, self.adopted = self.adopted, []
        for record in records:
            value, proxy, before, parts = record
            if not _in_place(proxy, self.subject):
                self.map.disown(parts)
                continue
            self.adopted.append(record)
            if before is None or (self.state is _CLEAN and
                                  _same(value, before)):
                continue        # stored since the base: diffed in full
            if self.state is _CLEAN:
                self.map.touch(self)
            if self.copies is not None and \
                    self.copies.get(id(value), (None, None))[1] is not before:
                self.copies[id(value)] = (value, before)
                _mark(self.marked, proxy)

    # What a flush sends.

    def diff(self):
        ops = []
        if self.adopted:
            self.sync()
        if self.state is _CLEAN:
            return ops
        try:
            if self.copies is not None:
                _diff_tracked(ops, None, self.subject, self.copies,
                              self.marked)
            else:
                _diff_dict(ops, None, self.base, self.subject)
        except _BadKey as exc:
            raise TypeError(_NOT_JSON % (self.id, exc))
        except ValueError:
            # Copying what changed met a dict or list holding itself: a
            # plain value the user stored and changed through their own
            # reference.
            path = _holding_itself(self.subject)
            if path is None:
                raise
            raise ValueError(_NOT_JSON % (self.id, _HOLDS_ITSELF % path)) \
                from None
        return ops

    def changed(self):
        """Whether the document differs from its base, where that is cheap
        to tell: True or False for a changed document whose changes are
        all JSON scalars put in place of others, in dicts that kept their
        keys (a flush has nothing of them to check); None where `diff`
        must tell."""
        if self.copies is None or self.adopted or self.state is not _DIRTY:
            return None
        try:
            return _changed_marked(self.subject, self.copies, self.marked)
        except RecursionError:
            return None         # too deep for the stack: `diff` can tell

    def payload(self, inline_limit=None):
        """The document to send, as a new dict python-couchdb may encode
        (its children are the subject's: send it before any change), with
        the attachment changes that go inline."""
        if self.state is _DELETED:
            return {'_id': self.id, '_rev': self.rev, '_deleted': True}
        payload = dict(self.doc.__subject__)
        # What a read said of the leaves is no content to write.
        if '_conflicts' in payload:
            del payload['_conflicts']
        if '_deleted_conflicts' in payload:
            del payload['_deleted_conflicts']
        if self.state is _NEW and self.rev is not None:
            payload['_rev'] = self.rev
        attachments = self.attachments
        if not (attachments.changes or attachments.digests):
            return payload
        stubs = attachments.payload(payload.get('_attachments'),
                                    inline_limit)
        if stubs:
            payload['_attachments'] = stubs
        elif stubs is not None:
            payload.pop('_attachments', None)     # the last one deleted
        return payload

    def merge_base(self):
        """The version changes were made from: the one fetched, or the empty
        document for one created or adopted in the session."""
        self.sync()
        if self.state is _NEW:
            return {}
        if self.copies is not None:
            return _materialize(self.subject, self.copies)
        if self.base is not None:
            return self.base
        return None if self.doc is None else self.subject

    def doc_or_stub(self):
        return self.doc if self.doc is not None else _Document(_id=self.id)

    def hold(self, document):
        """Make ``document`` (the session's own copy) the content of this
        entry's document. The object handed out stays the same, and so do
        its dicts and lists that are still in place: references the user
        kept to them stay live."""
        if self.doc is None:
            self.doc = _root(document, self)
        else:
            _graft(self.subject, document)


def _graft(target, source):
    """Make the dict or list ``target`` equal to ``source`` (plain, and no
    longer used by anyone else), keeping each dict and list of ``target``
    that ``source`` still has in the same place: a dict under the same key,
    a list item at the same index (or, when the list's length changed, an
    equal item in the same order)."""
    work = [(target, source)]
    while work:
        old, new = work.pop()
        if type(old) is list:
            pairs = [(old[i] if i is not None else _MISSING, value)
                     for i, value in _paired_items(old, new)]
            old[:] = [value if kept is _MISSING else kept
                      for kept, value in pairs]
            places = [(old, index, kept, value)
                      for index, (kept, value) in enumerate(pairs)
                      if kept is not _MISSING]
        else:
            for key in [key for key in old if key not in new]:
                del old[key]
            places = [(old, key, old.get(key, _MISSING), value)
                      for key, value in new.items()]
        for container, key, mine, value in places:
            if type(mine) is type(value) and type(value) in _CONTAINERS:
                work.append((mine, value))
            else:
                container[key] = value


def _paired_items(old, new):
    """``[(index in old or None, item of new)]``: which item of list
    ``old`` each item of ``new`` keeps (see `_graft`)."""
    if len(old) == len(new):
        return list(enumerate(new))
    pairs, start = [], 0
    for value in new:
        found = None
        if type(value) in _CONTAINERS:
            for i in range(start, len(old)):
                if _same(old[i], value):
                    found, start = i, i + 1
                    break
        pairs.append((found, value))
    return pairs


# -- Attachments --------------------------------------------------------------

class _PendingAttachments(object):
    """The attachment changes of one document until the server has them,
    and the digests of the attachments the session wrote."""

    __slots__ = ('changes', 'digests')

    def __init__(self):
        # {filename: _Attachment to put, or None to delete}.
        self.changes = {}
        # {filename: MD5 digest} of attachments this session wrote. PouchDB
        # Server finds a stub's attachment by its digest; the session's
        # stubs show none (CouchDB computes a different one for compressible
        # types, and ignores it in stubs), so it is added when sending.
        self.digests = None

    def __contains__(self, filename):
        return filename in self.changes

    def get(self, filename):
        return self.changes.get(filename)

    def clear(self):
        self.changes = {}

    def put(self, filename, attachment):
        self.changes[filename] = attachment

    def delete(self, id, filename, stubs, carried):
        """Queue the deletion of ``filename`` (``stubs``: the document's
        ``_attachments``; ``carried``: the changes a write of unknown
        outcome carried). Deleting one put and not yet written just forgets
        it."""
        on_server = filename in (stubs or {}) or filename in (carried or {})
        if self.changes.get(filename) is not None:
            if on_server:
                self.changes[filename] = None
            else:
                del self.changes[filename]      # put, then deleted
        elif on_server and filename not in self.changes:
            self.changes[filename] = None
        else:
            raise _ResourceNotFound(
                ('not_found', 'document %r has no attachment %r'
                 % (id, filename)))

    def inline(self, limit):
        """The changes that go in the bulk request: deletions, and puts of
        at most ``limit`` bytes."""
        if not self.changes:
            return {}
        return dict((name, a) for name, a in self.changes.items()
                    if a is None or not a.is_large(limit))

    def large(self, limit):
        """``[(filename, attachment)]`` of the puts uploaded on their
        own."""
        if not self.changes:
            return []
        return [(name, a) for name, a in self.changes.items()
                if a is not None and a.is_large(limit)]

    def payload(self, stubs, limit):
        """The ``_attachments`` to send instead of the document's ``stubs``,
        or ``None`` to send those as they are."""
        inline = self.inline(limit) if self.changes else None
        if not inline and not self.digests:
            return None
        # Attachments already on the server are sent as stubs: an update
        # without them would drop them.
        attachments = dict(stubs or {})
        for filename, digest in (self.digests or {}).items():
            if 'digest' not in attachments.get(filename, {'digest': 0}):
                attachments[filename] = dict(attachments[filename],
                                             digest=digest)
        for filename, attachment in (inline or {}).items():
            if attachment is None:
                attachments.pop(filename, None)
            else:
                attachments[filename] = attachment.inline()
        return attachments

    def written(self, subject, payload):
        """The server took ``payload``, a write of the document whose
        content is ``subject``: the changes that went inline are done."""
        if not self.changes:
            return
        sent = payload.get('_attachments') or {}
        self.landed(subject, dict(
            (filename, attachment) for filename, attachment
            in self.changes.items()
            if attachment is None or 'data' in sent.get(filename, ())))

    def unsent(self, stubs):
        """Drop the deletions of attachments the document does not have
        (``stubs``): queued for a put a lost write might have carried."""
        for filename, attachment in list(self.changes.items()):
            if attachment is None and filename not in (stubs or {}):
                del self.changes[filename]

    def landed(self, subject, carried):
        """A write whose answer was lost, carrying the changes ``carried``,
        reached the server: the document's stubs show them, and those still
        pending as they were are done."""
        stubs = subject.setdefault('_attachments', {})
        for filename, attachment in carried.items():
            if attachment is None:
                stubs.pop(filename, None)
            else:
                self.stub(stubs, filename, attachment)
            if self.changes.get(filename, _MISSING) is attachment:
                del self.changes[filename]
            # else changed since: that change stays pending, over this
        if not stubs:
            del subject['_attachments']

    def done(self, subject, filename, attachment):
        """An attachment was uploaded on its own."""
        self.stub(subject.setdefault('_attachments', {}), filename,
                  attachment)
        del self.changes[filename]

    def stub(self, stubs, filename, attachment):
        """Record in the document's ``stubs`` that the server has
        ``attachment``."""
        stubs[filename] = attachment.stub()
        if self.digests is None:
            self.digests = {}
        self.digests[filename] = attachment.digest()


# The attachment changes of every entry that has none: one object, not one
# (and its dict) per document read. It cannot change: an entry takes its own
# to change (`_Entry.own_attachments`).
_NO_ATTACHMENTS = _PendingAttachments()
_NO_ATTACHMENTS.changes = _types.MappingProxyType({})


class _Attachment(object):
    """The content of an attachment put in the session, kept until the
    server has it: bytes, or a seekable file read from where it stood."""

    __slots__ = ('content', 'content_type', 'start', 'size', 'md5')

    def __init__(self, content, content_type):
        self.content_type = content_type
        self.md5 = None
        if isinstance(content, str):
            content = content.encode('utf-8')
        elif isinstance(content, _io.TextIOBase):
            content = content.read().encode('utf-8')
        if isinstance(content, (bytes, bytearray, memoryview)):
            self.content = bytes(content)
            self.start, self.size = 0, len(self.content)
            return
        if not (hasattr(content, 'seekable') and content.seekable()):
            # Read it now, into memory or a temporary file, so that it can
            # be read again if the upload must be retried.
            spool = _tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024)
            _shutil.copyfileobj(content, spool)
            spool.seek(0)
            content = spool
        self.content = content
        self.start = content.tell()
        self.size = content.seek(0, _io.SEEK_END) - self.start
        content.seek(self.start)

    def is_large(self, limit):
        return limit is not None and self.size > limit

    def read(self):
        if isinstance(self.content, bytes):
            return self.content
        self.content.seek(self.start)
        return self.content.read()

    def stream(self):
        """The content to upload: bytes, or the file at its start."""
        if isinstance(self.content, bytes):
            return self.content
        self.content.seek(self.start)
        return self.content

    def inline(self):
        return {'content_type': self.content_type,
                'data': _base64.b64encode(self.read()).decode('ascii')}

    def stub(self):
        return {'content_type': self.content_type, 'length': self.size,
                'stub': True}

    def digest(self):
        """The MD5 digest of the content, as PouchDB Server gives it."""
        if self.md5 is None:
            md5 = _hashlib.md5()
            stream = self.stream()
            if isinstance(stream, bytes):
                md5.update(stream)
            else:
                for chunk in iter(lambda: stream.read(1 << 16), b''):
                    md5.update(chunk)
            self.md5 = 'md5-' + _base64.b64encode(md5.digest()).decode()
        return self.md5


# -- Flush planning -----------------------------------------------------------

class _FlushPlan(object):
    """What the next bulk request writes, worked out from pending entries.

    Each kind of work is a list of entries; `changed` holds ``(entry,
    diff)`` only for dirty entries that really differ from their base, and
    `unchanged` the dirty entries whose changes cancelled out.
    """

    def __init__(self, entries, inline_limit=None, strict=True, diffs=True):
        self.deleted = []       # entries to delete
        self.created = []       # new entries, written without a base
        self.changed = []       # (entry, diff) of dirty entries that differ;
        #                         without ``diffs`` (no hook to see them),
        #                         the diff is None where `_Entry.changed`
        #                         could tell without one
        self.unchanged = []     # dirty entries whose changes cancelled out
        self.uploads = []       # entries with attachments too large to
        #                         go inline, uploaded after the bulk request
        self.inline_limit = inline_limit
        # With ``strict``, a value JSON cannot carry raises at once (nothing
        # was sent yet); otherwise it is that document's outcome.
        self.strict = strict
        self.problems = {}      # id: TypeError or ValueError, if not strict;
        #                         or the clash of a resolution
        self.resolved = []      # entries with losing leaves to delete once
        #                         written (see `Session.resolve_conflicts`)
        self._by_id = by_id = {}
        for entry in entries:
            by_id[entry.id] = entry
            if diffs or entry.state is not _DIRTY or entry.clash is not None \
                    or entry.losers or entry.attachments.changes:
                self.add(entry)
                continue
            # The most common work, a document changed and nothing more:
            # `_Entry.changed` tells most of them without a diff.
            changed = entry.changed()
            if changed is None:
                self.add(entry)
            elif changed or entry.sent is not None:
                # (A document whose last write's outcome is unknown goes
                # again: see `add`.)
                self.changed.append((entry, None if changed else []))
            else:
                self.unchanged.append(entry)

    def add(self, entry):
        """Plan the work of ``entry``."""
        if entry.clash is not None:
            self.problems[entry.id] = entry.clash
            return
        if entry.losers:
            self.resolved.append(entry)
        if entry.state is _DELETED:
            self.deleted.append(entry)
            return
        inline_limit = self.inline_limit
        # Most documents have no attachment work: no call for them.
        attachments = entry.attachments
        large = attachments.large(inline_limit) if attachments.changes \
            else ()
        if entry.state is _NEW:
            self.created.append(entry)
        else:
            try:
                diff = entry.diff()
            except (TypeError, ValueError) as exc:
                # A key that is no string, a value holding itself.
                if self.strict:
                    raise
                self.problems[entry.id] = _not_sent(exc)
                return
            # A document whose last write's outcome is unknown goes again
            # even if its changes cancelled out since: the server may hold
            # what was sent. (An upload that goes anyway meets the same
            # conflict.)
            if diff or (entry.sent is not None and not large) or (
                    attachments.changes and attachments.inline(inline_limit)):
                self.changed.append((entry, diff))
            elif not large:
                self.unchanged.append(entry)
        if large:
            self.uploads.append(entry)

    def __bool__(self):
        # A problem (a clash, a value refused) is work too: it must reach
        # the flush's outcomes, to be reported.
        return bool(self.deleted or self.created or self.changed or
                    self.uploads or self.resolved or self.problems)

    def entry(self, id):
        return self._by_id[id]

    def keys(self):
        """``(id, kind)`` of each piece of work, to tell old work from new
        (a document whose only change is an upload is changed)."""
        return set([(e.id, 'deleted') for e in self.deleted] +
                   [(e.id, 'created') for e in self.created] +
                   [(e.id, 'changed') for e, _ in self.changed] +
                   [(e.id, 'changed') for e in self.uploads_only()])

    def only(self, wanted):
        """The part of the plan whose `keys` satisfy ``wanted(key)``."""
        part = _FlushPlan([], self.inline_limit)
        part.deleted = [e for e in self.deleted if wanted((e.id, 'deleted'))]
        part.created = [e for e in self.created if wanted((e.id, 'created'))]
        part.changed = [(e, d) for e, d in self.changed
                        if wanted((e.id, 'changed'))]
        part.uploads = [e for e in self.uploads if wanted(
            (e.id, 'created' if e in part.created else 'changed'))]
        return part

    def uploads_only(self):
        """The entries whose only work is an upload."""
        if not self.uploads:
            return []
        bulk = set(e.id for e in self.created)
        bulk.update(e.id for e, _ in self.changed)
        return [e for e in self.uploads if e.id not in bulk]

    def deleted_docs(self):
        return [e.doc_or_stub() for e in self.deleted]

    def created_docs(self):
        return [e.doc for e in self.created]

    def changed_docs(self):
        return [(e.doc, d) for e, d in self.changed] + \
            [(e.doc, []) for e in self.uploads_only()]

    def payloads(self):
        """The documents to send, as plain dicts python-couchdb may encode
        and modify (never the session's own objects); without those in
        `problems`.

        :raise TypeError, ValueError: if `strict`, for a value JSON cannot
                                      carry, naming the document and the
                                      path
        """
        checks = [(entry, entry.subject, '') for entry in self.created]
        # A changed document was valid as fetched: only what its diff puts
        # in needs checking (`_diff_dict` checks the keys it adds). One
        # without a diff has nothing to check (see `_Entry.changed`).
        checks += [(entry, op['value'], op['path'])
                   for entry, diff in self.changed if diff for op in diff
                   if 'value' in op and type(op['value']) not in _JSON_LEAVES]
        for entry, value, path in checks:
            try:
                _check_json(entry.id, value, path)
            except (TypeError, ValueError) as exc:
                if self.strict:
                    raise
                self.problems.setdefault(entry.id, _not_sent(exc))
        entries = self.created + [e for e, _ in self.changed] + self.deleted
        if self.problems:
            entries = [e for e in entries if e.id not in self.problems]
        limit = self.inline_limit
        return [entry.payload(limit) for entry in entries]


def _check_count(name, value, none=True):
    """``value``, a whole number of at least 0 (or None if ``none``)."""
    if (value is None and none) or (isinstance(value, int) and
                                    not isinstance(value, bool) and
                                    value >= 0):
        return value
    raise ValueError('%s must be a whole number of at least 0%s, got %r'
                     % (name, ' or None' if none else '', value))


def _check_w(w):
    if w is None or (isinstance(w, int) and not isinstance(w, bool) and
                     w > 0):
        return w
    raise ValueError('w, the write quorum, must be a positive int or None, '
                     'got %r' % (w,))


def _check_on_conflict(on_conflict):
    if on_conflict in ('raise', 'overwrite', 'merge') or callable(on_conflict):
        return on_conflict
    raise ValueError("on_conflict must be 'raise', 'overwrite', 'merge' or "
                     "a function, got %r" % (on_conflict,))


def _check_json(id, value, path=''):
    """Raise TypeError or ValueError, naming the path, if ``value`` (at
    ``path`` in document ``id``) holds anything JSON cannot carry."""
    problem = _json_problem(value)
    if problem is not None:
        keys, error, message = problem
        if message is _HOLDS_ITSELF:
            path += _holding_itself(value) or ''
        else:
            path += ''.join('/' + _escape(key) for key in reversed(keys))
        raise error(_NOT_JSON % (id, message % (path or '/')))


def _not_sent(exc):
    """``exc``, a document's bad value found after the flush sent others,
    saying so."""
    message = str(exc).replace(_NOTHING_SENT, _NOT_SENT)
    return type(exc)(message)


_NOT_SENT = 'It was not sent, and stays pending: fix it, and flush again.'
_NOTHING_SENT = 'Nothing was sent: fix it, and flush again.'
_NOT_JSON = 'document %r holds what JSON cannot carry: %s. ' + _NOTHING_SENT
_BAD_KEY = 'the key %r at %s is %s, but JSON object keys must be strings'


def _json_problem(value):
    """``None`` if JSON can carry ``value``; else ``(keys, exception class,
    message with a %s for the path)``, the keys leading to the bad value in
    reverse order. The path is only made for a bad value: this runs over
    every document a flush sends."""
    try:
        if isinstance(value, dict):
            items = value.items()
        elif isinstance(value, (list, tuple)):
            items = enumerate(value)
        elif isinstance(value, float):
            if _math.isfinite(value):
                return None
            return [], ValueError, 'the value at %%s is %r' % value
        elif isinstance(value, (str, int, type(None))):
            return None
        else:
            return [], TypeError, 'the value at %%s is %s' % _a(value)
        keyed = isinstance(value, dict)
        for key, item in items:
            if keyed and not isinstance(key, str):
                return [], TypeError, _BAD_KEY % (key, '%s', _a(key))
            if type(item) in _JSON_LEAVES:
                continue
            problem = _json_problem(item)
            if problem is not None:
                problem[0].append(key)
                return problem
        return None
    except RecursionError:
        pass                    # too deep for the stack: see `_unwind`
    return _unwind(_deep_json_problem(value))


def _deep_json_problem(value, held=None):
    """The iterative twin of `_json_problem` (see `_unwind`). ``held`` are
    the ids of the dicts and lists around this one: a value holding itself
    (through a plain dict the user stored and kept changing) is what makes
    the recursive one too deep, and would loop here."""
    if not isinstance(value, (dict, list, tuple)):
        return _json_problem(value)         # no recursion for the others
    if held is None:
        held = set()
    if id(value) in held:
        return [], ValueError, _HOLDS_ITSELF
    held.add(id(value))
    keyed = isinstance(value, dict)
    for key, item in value.items() if keyed else enumerate(value):
        if keyed and not isinstance(key, str):
            return [], TypeError, _BAD_KEY % (key, '%s', _a(key))
        if type(item) in _JSON_LEAVES:
            continue
        problem = yield _deep_json_problem(item, held)
        if problem is not None:
            problem[0].append(key)
            return problem
    held.discard(id(value))
    return None


_HOLDS_ITSELF = 'the dict or list at %s holds itself'


def _holding_itself(value):
    """The JSON Pointer of the first dict or list in ``value`` that holds
    one of the dicts and lists around it (itself, in JSON's eyes), or
    ``None``: found apart, to name the place of a loop once, not after
    going round it as far as the stack went."""
    around = {id(value): None}
    stack = [('', iter(_members(value)))]
    while stack:
        path, members = stack[-1]
        for key, item in members:
            if isinstance(item, (dict, list, tuple)):
                here = path + '/' + _escape(key)
                if id(item) in around:
                    return here
                around[id(item)] = None
                stack.append((here, iter(_members(item))))
                break
        else:
            stack.pop()
    return None


def _members(value):
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, (list, tuple)):
        return list(enumerate(value))
    return []


# -- One flush ----------------------------------------------------------------

# What `_Flush.settle` returns for a document to send again.
_RESEND = object()

# How many revisions of a history `_Flush.latest_start` reads, at most,
# looking for where a create whose answer was lost may be.
_HISTORY_READS = 100

# What `_Flush.landed_below` returns when the server's history shows that a
# lost write did not reach it.
_NOT_THERE = object()

# What `_Flush.settle` returns for a document with nothing left to write:
# no outcome at all.
_NOTHING = object()

# The reason of a deletion of a document whose create never reached the
# server, which holds another writer's.
_NEVER_CREATED = ('what this session created never reached the server: '
                  'nothing of its own to delete')


class _Flush(object):
    """One `Session.flush()` call: plans each bulk request (calling the
    hooks), sends it, settles its conflicts, uploads the large attachments,
    and applies the answers.

    Every document of a request has one of three outcomes: answered (a new
    revision, or the server's refusal), or unknown: the request went out and
    its answer never came back, so the server may or may not have applied
    it. Only an unknown outcome lets the server's version count as the
    session's own write (the entry's `sent`); a refusal that was answered is
    always what it says. Conflicts of bulk writes and of uploads take the
    same path, `settle`.
    """

    def __init__(self, session, on_conflict, w=None):
        self.session = session
        self.on_conflict = on_conflict
        self.w = w
        self.inline_limit = session.max_inline_attachment
        self.results = _FlushResults()  # (success, id, rev_or_exc) of every
        #                                 round, and the ids only accepted
        self.encoded = {}       # id: (payload, the size of its JSON), of
        #                         what was checked
        self.json = {}          # id: the JSON of that payload, kept while
        #                         `kept` stays under `keep_limit` bytes and
        #                         dropped once sent, so that a flush of many
        #                         documents holds a few requests' worth of
        #                         JSON, not all of it
        self.kept = 0
        limit = session.max_request_bytes
        self.keep_limit = None if limit is None else max(4 * limit, 1 << 22)
        self.sent_any = False   # whether a write went out: after that, a
        #                         bad value is its document's outcome
        self.splits = 0         # requests spent finding refused documents
        self.failures = {}      # id: exception, of the refused documents
        self.plan = None        # the plan of the round being written
        self.chosen = set()     # ids whose content an on_conflict function
        #                         chose: losers of theirs may be missing
        self.outcomes = {}      # id: new rev or exception, in that round
        self.wrote = {}         # id: rev, of what that round wrote (a
        #                         document refused in the end may have
        #                         been written before: its body, then a
        #                         conflicted upload)
        self.map = session._map

    def run(self):
        """Write rounds until the hooks add no work: the results, or
        `FlushError`. When a round fails on the connection, the post-flush
        hook still sees what that round had written. One INFO line on the
        session's logger says how it went."""
        started = _time.perf_counter()
        requests = self.session.requests
        ended = 'done'
        try:
            return self.rounds()
        except BaseException as exc:
            ended = type(exc).__name__
            raise
        finally:
            if _logger.isEnabledFor(_logging.INFO):
                _logger.info(
                    'flush %s: %d written, %d failed, %d requests, %.1f ms',
                    ended, sum(1 for row in self.results if row[0]),
                    len(self.failures), self.session.requests - requests,
                    (_time.perf_counter() - started) * 1000)

    def rounds(self):
        session = self.session
        for _ in range(session.max_hook_rounds):
            self.plan = self.plan_with_hooks()
            if not self.plan:
                break
            try:
                self.write(self.plan)
                self.delete_losers(self.plan)
            finally:
                if session._hooked('post'):
                    self.report(self.plan.only(
                        lambda key: key[0] in self.wrote))
            results, failures, outcomes = \
                self.results, self.failures, self.outcomes
            if failures.keys().isdisjoint(outcomes) and not any(
                    map(isinstance, outcomes.values(), _repeat(Exception))):
                # Every document written, the most common round.
                results.extend(zip(_repeat(True), outcomes, outcomes.values()))
                continue
            for id, outcome in outcomes.items():
                if isinstance(outcome, Exception):
                    if id in self.wrote:
                        results.append((True, id, self.wrote[id]))
                    failures[id] = outcome
                results.append((id not in failures, id, outcome))
        else:
            raise RuntimeError(
                'flush() gave up after %d rounds: the hooks keep creating '
                'work. What was written stays written; the rest is pending.'
                % session.max_hook_rounds)
        if self.failures:
            # A failure the session no longer has pending was dropped (a
            # deletion of what the server does not have): no retry.
            raise FlushError(self.results, self.failures, {
                id for id in self.failures if id not in self.map.pending})
        return self.results

    @property
    def resource(self):
        """The database's resource that writes go through (made once per
        session, on the first write)."""
        session = self.session
        if session._writes is None:
            session._writes = _counted(session.db.resource, session._budget,
                                       retries=False)
        return session._writes

    def record(self, id, outcome):
        """The outcome of ``id``'s latest write or settling."""
        self.outcomes[id] = outcome
        if not isinstance(outcome, Exception):
            self.wrote[id] = outcome

    def report(self, done):
        """Call the post-flush hook with the work of ``done``, if any."""
        if done and self.session._hooked('post'):
            self.session.post_flush_hook(done.deleted_docs(),
                                         done.created_docs(),
                                         done.changed_docs())

    # Planning.

    def plan_once(self):
        """The plan of the next bulk request: every pending entry but those
        refused in this flush. Entries whose changes cancelled out are clean
        again."""
        session, pending = self.session, self.map.pending
        plan = _FlushPlan([entry for id, entry in pending.items()
                           if id not in self.failures] if self.failures else
                          list(pending.values()), self.inline_limit,
                          strict=not self.sent_any,
                          diffs=session._hooked('pre') or
                          session._hooked('post'))
        for entry in plan.unchanged:
            self.map.clean(entry)
        return plan

    def plan_with_hooks(self):
        """The plan of the next bulk request, after calling the pre-flush
        hook until it adds no work."""
        session = self.session
        plan = self.plan_once()
        if not session._hooked('pre'):
            return plan
        # The hook saw the documents an earlier flush sent with the answer
        # lost: unchanged since, they are not new work.
        seen = set(key for key in plan.keys()
                   if self.sent_as_it_is(plan.entry(key[0])))
        for _ in range(session.max_hook_rounds):
            news = plan.only(lambda key: key not in seen)
            if not news:
                return plan
            seen |= news.keys()
            session.pre_flush_hook(news.deleted_docs(), news.created_docs(),
                                   news.changed_docs())
            # The hook may have changed anything: plan again.
            plan = self.plan_once()
        raise RuntimeError(
            'flush() gave up after %d calls of the pre-flush hook: it keeps '
            'creating work. Nothing was sent.' % session.max_hook_rounds)

    def sent_as_it_is(self, entry):
        """Whether ``entry`` is what a write of unknown outcome sent."""
        return entry.sent is not None and \
            _same(_plain(entry.payload(self.inline_limit)), entry.sent[-1][0])

    # Writing.

    def write(self, plan):
        """Send ``plan``, upload its large attachments, and settle the
        conflicts of both, for at most `Session.max_conflict_rounds` rounds
        of one read and one write; the outcomes are in `outcomes`."""
        self.outcomes, self.wrote = {}, {}
        payloads = plan.payloads()      # may raise on bad values: see strict
        for id, problem in plan.problems.items():
            self.record(id, problem)
        payloads = self.check(plan, payloads, strict=plan.strict)
        if self.look_up_revisions(plan, payloads):
            payloads = self.check(plan, payloads)   # with their revisions
        self.send(plan, payloads)
        self.upload(plan)
        settled = set()                 # ids resolve() gave its last word
        for round in range(self.session.max_conflict_rounds):
            if not any(map(isinstance, self.outcomes.values(),
                           _repeat(_ResourceConflict))):
                break           # (the most common end)
            conflicted = [id for id, outcome in self.outcomes.items()
                          if isinstance(outcome, _ResourceConflict) and
                          id not in settled]
            if not conflicted:
                break
            if self.on_conflict != 'raise':
                # Writers racing for one document meet again if they all
                # read and write again at once: a random pause, longer each
                # round (up to 10 ms, then 20, 40), parts them.
                _time.sleep(_random.uniform(0, 0.01 * 2 ** round))
            resend = self.resolve(plan, conflicted)
            again = set(payload['_id'] for payload in resend)
            settled.update(id for id in conflicted if id not in again)
            self.send(plan, self.check(plan, resend))
            self.upload(plan)
            if not resend:
                break

    def delete_losers(self, plan):
        """Delete the losing leaves of the documents of ``plan`` that were
        resolved (`Session.resolve_conflicts`), once each document is on
        the server as resolved: written by this flush, or unchanged. One
        ``POST _bulk_docs`` per `Session.batch_size` losers; a deletion
        the server answers with a conflict is done if the leaf is no
        longer there (the answer to an earlier one was lost)."""
        for entry in plan.resolved:
            if not entry.losers:
                continue
            if entry.id in self.chosen:
                # An on_conflict function chose what the server holds: the
                # losers' content may not be in it. They stay, unresolved.
                entry.losers = None
            elif entry.doc is not None:
                # Never the revision the document now is (a loser the
                # server made the winner meanwhile): that deletes it.
                rev = entry.subject.get('_rev')
                entry.losers = [loser for loser in entry.losers
                                if loser != rev] or None
            if not entry.losers and entry.map is not None:
                self.map.wait(entry)
        ready = [entry for entry in plan.resolved if entry.losers and
                 entry.clash is None and not isinstance(
                     self.outcomes.get(entry.id), Exception) and
                 (entry.id in self.wrote or entry.state is _CLEAN)]
        stubs = [{'_id': entry.id, '_rev': rev, '_deleted': True}
                 for entry in ready for rev in entry.losers]
        options = {} if self.w is None else {'w': self.w}
        size = self.session.batch_size
        by_id = dict((entry.id, entry) for entry in ready)
        for start in range(0, len(stubs), size):
            batch = stubs[start:start + size]
            rows = None
            for retry in (True, False):
                try:
                    _, _, rows = self.resource.post_json(
                        '_bulk_docs', body={'docs': batch}, **options)
                    break
                except Exception as exc:
                    if not (retry and _retryable(exc)):
                        raise
            rows = rows if isinstance(rows, list) else []
            for index, stub in enumerate(batch):
                entry = by_id[stub['_id']]
                # Rows come in the order of the documents sent.
                row = rows[index] if index < len(rows) else None
                done = row is not None and row.get('id') == stub['_id'] and \
                    'error' not in row
                if not done and not self.loser_gone(entry, stub['_rev']):
                    exc = _row_error(row['error'], row.get('reason')) if \
                        row is not None and 'error' in row else _ServerError(
                            ('no_answer', 'the server did not answer for the '
                             'deletion of losing revision %s' % stub['_rev']))
                    self.failures[entry.id] = exc
                    self.results.append((False, entry.id, exc))
                    continue
                entry.losers = [rev for rev in entry.losers
                                if rev != stub['_rev']] or None
            for entry in ready:
                if entry.map is not None:
                    self.map.wait(entry)

    def loser_gone(self, entry, rev):
        """Whether the losing leaf ``rev`` of ``entry``'s document is no
        longer a live leaf (one ``GET ?open_revs=all``)."""
        leaves = _leaf_docs(self.session._db.get(entry.id,
                                                 open_revs='all') or [])
        return not any(leaf.get('_rev') == rev and not leaf.get('_deleted')
                       for leaf in leaves)

    def check(self, plan, payloads, strict=False):
        """The ``payloads`` the server may take. Each of the others is
        refused here, alone, as its document's outcome (see `_refusal`), so
        that it cannot make the server refuse a whole request. Each payload
        is encoded once, here, for its size and to find strings UTF-8
        cannot encode.

        :raise ValueError: if ``strict``, for a string UTF-8 cannot encode
                           (otherwise that is the document's outcome)
        """
        kept, encoded, limit = [], self.encoded, self.inline_limit
        entry_of, encode = plan._by_id.__getitem__, self.encode
        for payload in payloads:
            id = payload['_id']
            if encoded.get(id, (None,))[0] is payload:
                kept.append(payload)
                continue
            refusal = _refusal(entry_of(id), payload, limit) or \
                encode(payload, strict)
            if refusal is None:
                kept.append(payload)
            else:
                self.record(id, refusal)
        for entry in plan.uploads_only():
            refusal = _refusal(entry, {'_id': entry.id}, self.inline_limit)
            if refusal is not None:
                self.record(entry.id, refusal)
        return kept

    def encode(self, payload, strict):
        """Encode ``payload`` into `encoded`: ``None``, or the refusal of a
        document larger than `Session.max_document_size`."""
        id = payload['_id']
        if payload.get('_rev') is _LOOKUP:
            # Filled in by the look-up, then encoded again: checked now.
            payload = dict(payload)
            del payload['_rev']
        try:
            data = ''.join(_encoder(payload, 0)).encode('utf-8')
        except UnicodeEncodeError:
            problem = ValueError(_NOT_JSON % (id, _unencodable(payload)))
            if strict:
                raise problem from None
            return _not_sent(problem)
        limit = self.session.max_document_size
        refusal = None if limit is None or len(data) <= limit else \
            _too_large(id, payload, data, limit)
        if refusal is None:
            size = len(data)
            self.encoded[id] = (payload, size)
            if id in self.json:
                self.kept -= len(self.json.pop(id))
            if self.keep_limit is None or self.kept + size <= self.keep_limit:
                self.json[id] = data
                self.kept += size
        return refusal

    def json_of(self, payload):
        """The JSON of ``payload``, checked by `check`, no longer kept:
        as kept, or made again (the same bytes: JSON encoding is
        deterministic)."""
        id = payload['_id']
        data = self.json.pop(id, None)
        if data is None:
            return _encode(self.encoded[id][0]).encode('utf-8')
        self.kept -= len(data)
        return data

    def batches(self, payloads):
        """``payloads`` in the batches of one request each, by
        `Session.batch_size` and `Session.max_request_bytes`."""
        count, limit = self.session.batch_size, self.session.max_request_bytes
        encoded = self.encoded
        batches, batch, size = [], [], len(b'{"docs":[]}')
        for payload in payloads:
            more = encoded[payload['_id']][1] + 1
            if batch and (len(batch) >= count or (
                    limit is not None and size + more > limit)):
                batches.append(batch)
                batch, size = [], len(b'{"docs":[]}')
            batch.append(payload)
            size += more
        if batch:
            batches.append(batch)
        return batches

    def send(self, plan, payloads):
        """POST ``payloads``, passed by `check`, to ``_bulk_docs`` in
        batches of at most `Session.batch_size` documents and
        `Session.max_request_bytes` bytes; record each document's outcome,
        and apply the successes. A request the server refuses as a whole
        for what one of its documents holds is split, to find that document
        (see `split`)."""
        batches = self.batches(payloads)
        batches.reverse()               # a stack, the first batch on top
        while batches:
            batch = batches.pop()
            try:
                status, rows = self.post(plan, batch)
            except _HTTPError as exc:
                refused = _whole_refusal(exc)
                if refused is None:
                    raise
                batches.extend(self.split(batch, refused))
                continue
            answers = dict(zip(map(_get_id, rows), rows))
            # A cluster short of the write quorum answers 202, and says so
            # in each row it only accepted.
            flagged = any(map(_contains, rows, _repeat('accepted')))
            results, outcomes, wrote = self.results, self.outcomes, self.wrote
            written, entry_of = self.map.written, plan._by_id.__getitem__
            for payload in batch:
                id = payload['_id']
                row = answers.get(id)
                entry = entry_of(id)
                if row is not None and 'error' not in row:
                    rev = outcomes[id] = wrote[id] = row['rev']
                    accepted = bool(row.get('accepted')) if flagged else \
                        status == 202
                    if accepted or results.accepted:
                        results.written(id, accepted)
                    written(entry, rev, payload)
                    continue
                outcome = self.outcomes[id] = _outcome(row)
                if isinstance(outcome, _ResourceNotFound) and \
                        payload.get('_deleted'):
                    # Gone already (a _local document leaves no tombstone
                    # to conflict with): nothing to delete, or to retry.
                    self.map.forget(entry)
                # Any other refusal leaves the lost writes in `sent`: one
                # may be on the server all the same (PouchDB Server
                # validates a write before it looks at its revision, and a
                # validation may refuse a write for the one that landed).

    def split(self, batch, refused):
        """The batches to send of ``batch``, which the server refused as a
        whole with ``refused`` (``(error, reason)``), the last one first: a
        document the reason names is refused, the others are sent again;
        else each half goes on its own. A single document is refused with
        the server's error and reason; so is each document of a batch once
        `Session.max_split_requests` requests are spent."""
        error, reason = refused
        if len(batch) > 1 and \
                self.splits < self.session.max_split_requests:
            # CouchDB's 413 names the document too large.
            named = [payload for payload in batch if payload['_id'] == reason]
            if named:
                self.record(reason, _row_error(error, reason))
                self.splits += 1
                return [[payload for payload in batch
                         if payload is not named[0]]]
            self.splits += 2
            half = len(batch) // 2
            return [batch[half:], batch[:half]]
        if len(batch) > 1:
            reason = ('not sent: the server refused each request holding it '
                      '(%s: %s), and the session gave up finding the '
                      'document at fault after %d requests'
                      % (error, reason, self.splits))
        for payload in batch:
            self.record(payload['_id'], _row_error(error, reason))
        return []

    def post(self, plan, batch):
        """The status and answer rows of one ``POST _bulk_docs``. A
        request whose answer was lost makes the outcome of its documents
        unknown (their `sent`), and is sent once more, as python-couchdb
        would retry it; the server then answers a conflict for what it had
        applied, which `settle` recognises."""
        json_of = self.json_of
        body = b'{"docs":[%s]}' % b','.join(
            [json_of(payload) for payload in batch])
        options = {} if self.w is None else {'w': self.w}
        self.sent_any = True
        budget = self.session._budget
        for retry in (True, False):
            budget.documents = len(batch)
            try:
                status, _, rows = self.resource.post_json(
                    '_bulk_docs', body=body, headers=_JSON_BODY, **options)
                return status, rows
            except Exception as exc:
                if not _answered(exc):
                    for payload in batch:
                        entry = plan.entry(payload['_id'])
                        entry.lost(_plain(payload), entry.attachments.inline(
                            self.inline_limit))
                if not (retry and _retryable(exc)):
                    raise

    def look_up_revisions(self, plan, payloads):
        """Fill in the ``_rev`` of deletions (and re-creations) of documents
        the session never fetched, with one ``POST _all_docs`` (and one
        ``GET`` for each ``_local/`` document: see `_all_docs`). A document
        created by a write whose answer was lost, then deleted, is deleted
        only if the server holds what that write sent: anything else there
        is another writer's, a conflict for `settle`. Telling needs the
        documents: then they are read as `_read_many` reads. Returns
        whether any payload needed its revision."""
        # Only deletions and re-creations have a revision to look up.
        if not any(entry.rev is _LOOKUP for entry in
                   plan.deleted + plan.created):
            return False
        ids = [p['_id'] for p in payloads if p.get('_rev') is _LOOKUP]
        if not ids:
            return False
        # A re-creation writes over whatever is there; a deletion deletes
        # only what the session wrote.
        unsure = set(id for id in ids if plan.entry(id).sent is not None and
                     plan.entry(id).state is _DELETED)
        if unsure:
            current = _read_many(self.session._db, ids, tombstones=True)
        else:
            current = dict((row['id'], (row['value']['rev'], row['value']))
                           for row in _all_docs(self.session._db, ids)
                           if 'error' not in row and
                           not row['value'].get('deleted'))
        revs = {}
        for id, (rev, doc) in current.items():
            if doc is None:
                continue            # deleted
            if id in unsure and not any(
                    _same_write(sent, doc,
                                read=self.attachment_reader(id, rev))
                    for sent, _ in plan.entry(id).sent):
                self.record(id, _ResourceConflict(
                    ('conflict', 'the server holds a document this session '
                     'did not write')))
                payloads[:] = [p for p in payloads if p['_id'] != id]
                continue
            revs[id] = rev
        for payload in payloads:
            if payload.get('_rev') is not _LOOKUP:
                continue
            id = payload['_id']
            entry = plan.entry(id)
            if id in revs:
                # Kept in the entry too: a retry after a lost answer must
                # send the same revision, to be recognised.
                entry.rev = payload['_rev'] = revs[id]
            else:
                del payload['_rev']
                if entry.state is not _DELETED:
                    entry.rev = None    # a re-creation: written without
        # Deletions of documents the server does not have are reported and
        # dropped at once: there is nothing to retry.
        for payload in list(payloads):
            if payload.get('_deleted') and '_rev' not in payload:
                payloads.remove(payload)
                self.record(payload['_id'], _ResourceNotFound(
                    ('not_found', 'missing')))
                self.map.forget(plan.entry(payload['_id']))
        return True

    # Attachments too large to go inline.

    def upload(self, plan):
        """PUT the large attachments of the documents written so far, one
        streamed request each; each gives a new revision. A conflict is
        recorded as the document's outcome, for `settle`."""
        for entry in plan.uploads:
            if isinstance(self.outcomes.get(entry.id), Exception) or \
                    entry.map is None:
                continue
            for filename, attachment in entry.attachments.large(
                    self.inline_limit):
                outcome = self.upload_one(entry, filename, attachment)
                self.record(entry.id, outcome)
                if isinstance(outcome, Exception):
                    break

    def upload_one(self, entry, filename, attachment):
        """PUT one attachment: the new revision, or the exception of the
        refusal."""
        try:
            answer = self.put(entry, filename, attachment)
        except _ResourceNotFound:
            # The document was deleted on the server: a conflict, as a bulk
            # write of it would be.
            return _ResourceConflict(('conflict', 'the document is deleted '
                                      'on the server'))
        except _HTTPError as exc:
            return exc          # a conflict goes to `settle` with the rest
        status, _, answer = answer
        self.results.written(entry.id, status == 202)
        self.map.uploaded(entry, filename, answer['rev'], attachment)
        return answer['rev']

    def put(self, entry, filename, attachment):
        """``PUT /db/id/filename?rev=...``, streamed; sent a second time,
        from the start of the content, when the answer is lost, as
        python-couchdb would retry it (which would read a streamed file on
        from where the failed attempt left it). The status and answer."""
        options = {} if self.w is None else {'w': self.w}
        self.sent_any = True
        for retry in (True, False):
            try:
                return self.resource(*_path_of(entry.id)).put_json(
                    filename, body=attachment.stream(),
                    headers={'Content-Type': attachment.content_type},
                    rev=entry.subject.get('_rev'), **options)
            except Exception as exc:
                if not _answered(exc):
                    # What the server holds if it applied the PUT: for
                    # `settle` to recognise, as for bulk writes.
                    sent = _plain(entry.subject)
                    sent.setdefault('_attachments', {})[filename] = {
                        'content_type': attachment.content_type,
                        'length': attachment.size}
                    entry.lost(sent, {filename: attachment})
                if not (retry and _retryable(exc)):
                    raise

    # Conflicts: one path for bulk writes and uploads.

    def attachment_reader(self, id, rev):
        """A function giving the content of an attachment of document
        ``id`` at revision ``rev`` by filename (``None`` if it has none),
        for `_same_write`: one ``GET /db/id/filename?rev=...`` each, read
        whole (it is one the session sent inline: small)."""
        def read(filename):
            try:
                _, _, data = self.session._db.resource(*_path_of(id)).get(
                    filename, rev=rev)
            except _ResourceNotFound:
                return None
            return b'' if data is None else data.read()
        return read

    def current(self, ids):
        """``{id: (rev, document or None if deleted)}`` of the server's
        current versions, read as `_read_many` reads; an id the server
        never had is left out, and so is a deleted ``_local/`` document,
        which leaves no tombstone."""
        return _read_many(self.session._db, ids, tombstones=True)

    def resolve(self, plan, ids):
        """Settle the conflicts of ``ids`` with one read: record in
        `outcomes` those settled without a write, and return the payloads
        to send again."""
        if self.on_conflict == 'raise':
            # Only an unknown outcome can turn out to be no conflict.
            ids = [id for id in ids if plan.entry(id).sent is not None]
            if not ids:
                return []
        current = self.current(ids)
        resend = []
        for id in ids:
            entry = plan.entry(id)
            rev, theirs = current.get(id, (None, None))
            outcome = self.settle(entry, rev, theirs)
            if outcome is _RESEND:
                resend.append(entry.payload(self.inline_limit))
            elif outcome is _NOTHING:
                del self.outcomes[id]
                self.map.clean(entry)
            elif outcome is not None:
                self.record(id, outcome)
        return resend

    def settle(self, entry, rev, theirs):
        """The new outcome for ``entry`` given the server's ``theirs`` at
        ``rev`` (``None`` if deleted or missing): a revision (settled), an
        exception (refused), `_RESEND`, `_NOTHING` (nothing to write, and no
        conflict), or ``None`` to keep the conflict."""
        mine = None if entry.state is _DELETED else entry.subject
        if entry.sent is not None:
            read = self.attachment_reader(entry.id, rev)
            for sent, carried in reversed(entry.sent):
                if _same_write(sent, theirs, read=read):
                    # An earlier write whose answer was lost reached the
                    # server: it is the base of what was changed since.
                    self.map.landed(entry, rev, carried)
                    return self.settle_on(entry, mine, rev, theirs, sent)
            # It may be below another writer's change: then the changes
            # made since were made over it. The server's history tells.
            found = self.landed_below(entry, rev, theirs)
            if found is _NOT_THERE:
                if self.map.not_landed(entry):
                    return _ResourceNotFound(('not_found', 'missing' if
                                              theirs is None else
                                              _NEVER_CREATED))
                if (entry.state is _CLEAN or entry.state is _DIRTY and
                        not entry.diff()) and not entry.attachments.changes:
                    # Sent only because it might have landed, and changed
                    # back since (its content, or its attachments only):
                    # nothing of the user's to write.
                    return _NOTHING
            elif found is not None:
                # As if the answer had come back: the write is settled, and
                # only what the user did since is in conflict with the
                # other writer's change, whatever the policy. Nothing done
                # since: nothing to write.
                written, sent, carried = found
                self.wrote[entry.id] = written
                self.map.landed_under(entry, written, sent, carried)
                if entry.map is None:
                    return written      # a deletion, done
                if entry.state is _DIRTY and not entry.diff() and \
                        not entry.attachments.changes:
                    self.map.clean(entry)
                    return written
                mine = None if entry.state is _DELETED else entry.subject
        if self.on_conflict == 'raise':
            return None
        if mine is None and theirs is None:
            return self.settle_on(entry, None, rev, theirs)   # both deleted
        base = entry.merge_base()
        if self.on_conflict == 'overwrite':
            content = _stubs_there(mine, theirs)
        elif self.on_conflict == 'merge':
            try:
                content = _merge_documents(base, mine, theirs,
                                           entry.state is _NEW)
                if theirs is not None or entry.state is not _NEW:
                    # (A document created again over a deletion has
                    # attachments of its own, as its content.)
                    _check_attachments(base, theirs, entry.attachments)
            except _MergeConflict as conflict:
                return _ResourceConflict(('conflict', str(conflict)))
        else:
            content = self.on_conflict(*[None if side is None else
                                         _plain(side) for side in
                                         (mine, theirs, base)])
            self.chosen.add(entry.id)
            if content is None:
                return None
            content = _stubs_there(content, theirs)
            problem = self.refusal_of(entry, content)
            if problem is not None:
                return problem      # the document stays as it was
        return self.settle_on(entry, content, rev, theirs)

    def refusal_of(self, entry, content):
        """The exception refusing a resolve function's ``content`` for
        ``entry`` as `check` would refuse it, or ``None``."""
        try:
            copy = _copy_in(content)
            _check_json(entry.id, copy)
            data = _encode(copy).encode('utf-8')
        except UnicodeEncodeError:
            return _not_sent(ValueError(_NOT_JSON % (entry.id,
                                                     _unencodable(copy))))
        except (TypeError, ValueError) as exc:
            return _not_sent(exc)
        return _refusal(entry, copy, self.inline_limit) or _too_large(
            entry.id, copy, data, self.session.max_document_size)

    def landed_below(self, entry, rev, theirs):
        """Which of the session's own writes whose answers were lost (the
        entry's `sent`) the server has in the history of its version
        ``theirs`` at ``rev``, as ``(its revision, what was sent, the
        attachment changes it carried)``: the revision after the one it
        was written over, if that holds what was sent; `_NOT_THERE` if none
        is there; ``None`` if that cannot be told (compaction drops the
        bodies of old revisions). One ``GET`` for the history, one for each
        revision it could be; ``rev`` may be a deletion's (a tombstone has
        a history too)."""
        if rev is None:
            return None
        db = self.session._db
        history = db.get(entry.id, rev=rev, revs_info='true') or {}
        # The revisions, newest first, and whether each is a deletion
        # (CouchDB says so; PouchDB Server calls every body 'available').
        info = [(item.get('rev'), item.get('status'))
                for item in history.get('_revs_info') or ()]
        read, found = {}, _NOT_THERE

        def version(n):
            if n not in read:
                read[n] = db.get(entry.id, rev=info[n][0])
            return read[n]

        for sent, carried in reversed(entry.sent):
            parent = sent.get('_rev')
            if parent:
                revs = [n for n in range(1, len(info) - 1)
                        if info[n + 1][0] == parent]
            else:
                revs = self.latest_start(info, version)
                if revs is None:
                    found = None
                    continue
            for n in revs:
                there = version(n)
                if there is None:
                    found = None        # compacted away
                elif _same_write(sent, None if there.get('_deleted') else
                                 there, read=self.attachment_reader(
                                     entry.id, info[n][0])):
                    return info[n][0], sent, carried
        return found

    def latest_start(self, info, version):
        """Where a create whose answer was lost may be in a history
        (``info``: the revisions from the server's latest down, with their
        status; ``version(n)`` reads one): ``[n]`` of the newest revision
        that started the document, the first one or the one after a
        deletion (CouchDB carries on a deleted branch), unless that is the
        latest (``[]``); ``None`` if that cannot be told. An older start is
        not the session's: its create was sent after the deletion above it.
        CouchDB gives a deletion's status; PouchDB Server calls every body
        'available', so the revisions are read down to the deletion (at
        most `_HISTORY_READS` of them)."""
        for n in range(1, len(info)):
            status = info[n][1]
            if status == 'available':
                there = version(n) if n <= _HISTORY_READS else None
                if there is None:
                    return None     # too far down, or compacted away
                deleted = bool(there.get('_deleted'))
            elif status == 'deleted':
                deleted = True
            else:
                return None         # compacted away
            if deleted:
                return [n - 1] if n > 1 else []
        return [len(info) - 1] if len(info) > 1 else []

    def settle_on(self, entry, content, rev, theirs, sent=None):
        """Make ``content`` (``None`` for a deletion) what ``entry`` writes
        over the server's ``theirs`` at ``rev``: settled at once when the
        server has it already (or ``sent``, the write whose answer was
        lost, which it was found to have: it may give numbers back in
        another form), else `_RESEND`."""
        if content is None or content.get('_deleted'):
            if theirs is None:
                self.map.forget(entry)  # deleted on the server already
                return rev if rev is not None else _ResourceNotFound(
                    ('not_found', 'missing'))
            self.map.delete(entry, rev)
            return _RESEND
        there = _same_write(content, theirs, loose_numbers=False) or (
            sent is not None and _same(_content(content, _NOT_CONTENT),
                                       _content(sent, _NOT_CONTENT)))
        # Over a deletion, CouchDB takes a document without ``_rev`` (it
        # extends the deleted branch) and refuses one with the old one.
        self.map.rebase(entry, content, rev if theirs is not None else None,
                        theirs)
        if there and not entry.attachments.inline(self.inline_limit):
            self.map.clean(entry)       # the server has it already
            return rev
        return _RESEND


def _path_of(id):
    """The path segments of document ``id`` (a design document's name is
    its own segment)."""
    if id.startswith('_design/'):
        return '_design', id[len('_design/'):]
    return (id,)


def _all_docs(db, ids, include_docs=False):
    """The rows ``POST _all_docs`` answers for the ``keys`` ``ids``, the
    documents too with ``include_docs``; one request, plus one ``GET`` per
    ``_local/`` id.

    CouchDB 3 lists a local document in ``_all_docs`` (``value`` ``{"rev":
    "0-1"}``) when its id is asked for, PouchDB Server answers an error row
    or nothing: a ``GET`` through python-couchdb reads it from both, and its
    row is made to look like CouchDB's. A deleted local document leaves no
    tombstone: its ``GET`` is a 404, given as the error row of an id the
    server never had.
    """
    local = [id for id in ids if id.startswith('_local/')]
    rows = []
    if len(local) < len(ids):
        options = {'include_docs': True} if include_docs else {}
        rows.extend(db.view('_all_docs', keys=[
            id for id in ids if not id.startswith('_local/')], **options))
    for id in local:
        doc = db.get(id)
        if doc is None:
            rows.append({'key': id, 'error': 'not_found'})
            continue
        row = {'id': id, 'key': id, 'value': {'rev': doc['_rev']}}
        if include_docs:
            row['doc'] = doc
        rows.append(row)
    return rows


def _retryable(exc):
    """Whether python-couchdb would send the request again after ``exc``."""
    return isinstance(exc, OSError) and bool(exc.args) and \
        exc.args[0] in _RETRYABLE_ERRORS


def _answered(exc):
    """Whether ``exc``, raised by a write, proves the server did not apply
    it: the connection was refused, or the server refused the request as a
    whole (a status below 500, or a refusal for what a document holds; a
    server error may come after a part was written)."""
    if _whole_refusal(exc) is not None or isinstance(exc, TooManyRequests):
        return True
    if isinstance(exc, _HTTPError):
        status = _status_of(exc)
        return not (isinstance(status, int) and status >= 500)
    return isinstance(exc, ConnectionRefusedError) or (
        isinstance(exc, OSError) and exc.args[:1] == (_errno.ECONNREFUSED,))


_ROW_ERRORS = {
    'conflict': _ResourceConflict,
    'forbidden': _Forbidden,
    'unauthorized': _Unauthorized,
    'not_found': _ResourceNotFound,
}


def _outcome(row):
    """The new revision of a ``_bulk_docs`` answer row, or the exception
    (python-couchdb's, holding ``(error, reason)``) for a refused one."""
    if row is None:
        return _ServerError(('no_answer', 'the server did not answer for '
                             'this document'))
    if 'error' in row:
        return _row_error(row['error'], row.get('reason'))
    return row['rev']


def _row_error(error, reason):
    """python-couchdb's exception for a document refused with ``error``
    and ``reason``."""
    return _ROW_ERRORS.get(error, _ServerError)((error, reason))


# The id of an answer row (of ``_bulk_docs``), or None.
_get_id = _methodcaller('get', 'id')

# The headers of a request whose body is JSON already encoded.
_JSON_BODY = {'Content-Type': 'application/json'}

# The session encodes the documents it writes itself, one by one, to know
# their sizes and to find bad strings before sending: as python-couchdb's
# own encoder does (no NaN, UTF-8 as it is), without its spaces. Its
# checks have already refused what JSON cannot carry.
#
# A flush encodes every document it writes, so the encoder is made once:
# `json.JSONEncoder.encode` makes a new C encoder at each call, which costs
# as much as encoding a small document. It keeps no record of the
# containers it is in (``markers``): nothing it meets can hold itself, and
# that record would need clearing after an error. Without the C
# accelerator (as on PyPy), the pure Python encoder does the same.
def _make_encoder():
    """The encoder of the JSON the session sends, ``encoder(value, 0)``
    giving its chunks: the C one of `json` where there is one (a flush calls
    it once per document)."""
    python = _json.JSONEncoder(allow_nan=False, ensure_ascii=False,
                               separators=(',', ':'))
    make = getattr(_json.encoder, 'c_make_encoder', None)
    if make is None:
        return lambda value, _: [python.encode(value)]
    return make(None, python.default, _json.encoder.encode_basestring,
                None, ':', ',', False, False, False)


_encoder = _make_encoder()


def _encode(value):
    """The JSON of ``value``, as the session sends it."""
    return ''.join(_encoder(value, 0))

# The errors of PouchDB's 500 for a document it cannot read (CouchDB's 400).
_DOCUMENT_ERRORS = frozenset(['doc_validation', 'illegal_docid',
                              'bad_request', 'badarg'])


def _whole_refusal(exc):
    """``(error, reason)`` if ``exc`` is the server's refusal of a whole
    write for what one of its documents holds (400, 412, 413, or PouchDB's
    500 for a document it cannot read); ``None`` for anything else (401,
    403, a missing database, a failing server)."""
    if isinstance(exc, _PreconditionFailed):
        status, error = 412, exc.args[0] if exc.args else None
    elif isinstance(exc, _ServerError) and exc.args and \
            isinstance(exc.args[0], tuple) and len(exc.args[0]) == 2 and \
            isinstance(exc.args[0][0], int):
        status, error = exc.args[0]
    else:
        return None
    if isinstance(error, tuple) and len(error) == 2:
        error, reason = error
    else:                       # not JSON: a proxy's page, say
        if isinstance(error, bytes):
            error = error.decode('utf-8', 'replace')
        error, reason = None, (error or '').strip()[:200] or None
    if status in (400, 412, 413) or \
            (status == 500 and error in _DOCUMENT_ERRORS):
        return error or _STATUS_ERRORS.get(status, 'bad_request'), reason
    return None


_STATUS_ERRORS = {400: 'bad_request', 412: 'precondition_failed',
                  413: 'too_large'}


def _refusal(entry, payload, inline_limit):
    """The refusal, as python-couchdb's exception, of a document the
    server would refuse (`Session.flush` lists the rules), or ``None``."""
    doc_id = entry.id
    if doc_id[:1] in ('', '_'):
        problem = _id_problem(doc_id)
        if problem is not None:
            return _ServerError(('illegal_docid', 'document %r: %s'
                                 % (doc_id, problem)))
    # The top-level members the server's version had are its own: it took
    # them. A document changed since it was clean has that version's
    # members in the copy of its top (if that changed at all).
    keys, copies = payload, entry.copies
    if copies is not None and entry.state is _DIRTY and \
            entry.doc is not None:
        before = copies.get(id(entry.doc.__subject__))
        keys = () if before is None else payload.keys() - before[1].keys()
    for key in keys:
        if key[:1] == '_' and key not in _SPECIAL_MEMBERS:
            return _ServerError((
                'doc_validation', 'document %r: the top-level member %r '
                'starts with "_", which CouchDB keeps for its own members '
                '(Bad special document member)' % (doc_id, key)))
    if not entry.attachments.changes and '_attachments' not in payload:
        return None
    names = payload.get('_attachments') or ()
    if entry.attachments.changes:
        names = list(names) + [name for name, _ in
                               entry.attachments.large(inline_limit)]
    for name in names:
        if isinstance(name, str) and name[:1] == '_':
            return _ServerError((
                'bad_request', 'document %r: the attachment name %r starts '
                'with "_", which CouchDB refuses' % (doc_id, name)))
    return None


def _too_large(id, payload, data, limit):
    """The refusal of document ``id``, ``payload`` encoded as ``data``, if
    CouchDB would find it larger than ``limit`` (None: no limit)."""
    # The JSON is never smaller than CouchDB's measure: only a document
    # whose JSON is larger than the limit needs measuring.
    if limit is None or len(data) <= limit:
        return None
    size = _couch_size(dict((key, value) for key, value in payload.items()
                            if key not in _NOT_BODY))
    if size <= limit:
        return None
    return _ServerError((
        'document_too_large', 'document %r is %d bytes as CouchDB measures '
        'it (the JSON of its body, without _id, _rev and attachments), more '
        'than max_document_size (%d); the server would refuse it'
        % (id, size, limit)))


# The special members CouchDB keeps apart from a document's body.
_NOT_BODY = frozenset(['_id', '_rev', '_attachments', '_deleted', '_revisions',
                       '_revs_info', '_conflicts', '_deleted_conflicts',
                       '_local_seq'])


def _couch_size(value):
    """The size CouchDB 3 gives ``value`` (a document's body) to compare
    with ``max_document_size``: its JSON with strings as their UTF-8 bytes
    unescaped, and each float counted as 3 to 6 bytes whatever its digits
    (couch_ejson_size)."""
    total, stack = 0, [value]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            total += 2 + len(value.encode('utf-8'))
        elif value is None or value is True:
            total += 4
        elif value is False:
            total += 5
        elif isinstance(value, int):
            total += len(str(value))
        elif isinstance(value, float):
            total += _float_size(value)
        elif isinstance(value, dict):
            total += 1 + 2 * len(value) if value else 2
            for key, item in value.items():
                stack.append(key)
                stack.append(item)
        else:                   # a list or tuple
            total += 1 + len(value) if value else 2
            stack.extend(value)
    return total


def _float_size(value):
    """The bytes CouchDB counts for a float (see `_couch_size`)."""
    if value < 0.0:
        return _float_size(-value) + 1
    if value in (0.0, 1.0):
        return 3
    if value < 1.0:
        for bound, size in ((1e-300, 3), (1e-100, 6), (1e-10, 5), (0.01, 4)):
            if value <= bound:
                return size
        return 3
    return 5 if value >= 1e100 else 4 if value >= 1e10 else 3


def _id_problem(id):
    """Why CouchDB refuses the document id ``id``, or ``None``."""
    if not id:
        return 'its _id is empty'
    if id in ('_design/', '_local/'):
        return 'its _id needs a name after the "/"'
    if id[:1] == '_' and not id.startswith(('_design/', '_local/')):
        return ('its _id starts with "_", which only _design/<name> and '
                '_local/<name> ids may')
    return None


def _unencodable(value):
    """The message (with the path) for the first string in ``value``, a
    key or a value, that UTF-8 cannot encode: one holding a lone surrogate,
    as ``os.fsdecode`` makes of bytes that are not UTF-8."""
    stack = [(value, None)]     # (value, (key, parent's node)) at any depth
    while stack:
        value, node = stack.pop()
        if isinstance(value, dict):
            items = value.items()
        elif isinstance(value, (list, tuple)):
            items = enumerate(value)
        else:
            items = ()
            if isinstance(value, str) and not _encodes(value):
                return 'the string at %s %s' % (_node_path(node),
                                                _surrogate(value))
        for key, item in items:
            if isinstance(key, str) and not _encodes(key):
                return 'the key %r at %s %s' % (
                    key, _node_path(node), _surrogate(key))
            stack.append((item, (key, node)))
    return 'a string UTF-8 cannot encode'


def _encodes(text):
    try:
        text.encode('utf-8')
    except UnicodeEncodeError:
        return False
    return True


def _surrogate(text):
    bad = next(char for char in text if not _encodes(char))
    return ('holds the lone surrogate %r, which UTF-8 cannot encode (os.'
            'fsdecode makes such strings of bytes that are not UTF-8)' % bad)


def _node_path(node):
    keys = []
    while node is not None:
        key, node = node
        keys.append(key)
    return ''.join('/' + _escape(key) for key in reversed(keys)) or '/'


class _FlushResults(list):
    """What `Session.flush` returns: its ``(success, id, rev_or_exc)``
    rows, and ``accepted``, the ids of the documents a CouchDB cluster only
    accepted (answered 202: written on fewer nodes than the write quorum,
    ``w``)."""

    def __init__(self, *args):
        list.__init__(self, *args)
        self.accepted = set()

    def written(self, id, accepted):
        """Note a write of ``id``: its latest decides."""
        if accepted:
            self.accepted.add(id)
        else:
            self.accepted.discard(id)


# -- Conflicts ----------------------------------------------------------------

class _MergeConflict(Exception):
    """A change a three-way merge cannot settle (private)."""


# The members of a document that are not its content, for comparing what
# was sent with what the session holds.
_NOT_CONTENT = ('_rev', '_attachments', '_conflicts', '_deleted_conflicts')


def _content(document, leave_out=('_rev',)):
    """A document without its ``_rev``, for comparing versions."""
    return dict((key, value) for key, value in document.items()
                if key not in leave_out)


def _same_write(sent, theirs, loose_numbers=True, read=None):
    """Whether the server's version ``theirs`` (``None`` if deleted) is the
    document ``sent``: the same content (numbers by value, unless not
    ``loose_numbers``: a JavaScript server keeps 1.0 as 1), and attachments
    of the same names, types and lengths (what the server says of them: its
    digests may differ from the session's). With ``read``, a function
    giving the content of an attachment of ``theirs`` by filename, an
    attachment ``sent`` carried whose digest cannot be compared is read
    and compared."""
    if sent.get('_deleted') or theirs is None:
        return bool(sent.get('_deleted')) and theirs is None
    mine = sent.get('_attachments') or {}
    stubs = theirs.get('_attachments') or {}
    leave_out = ('_rev', '_attachments')
    if set(mine) != set(stubs) or not _same(
            _content(sent, leave_out), _content(theirs, leave_out),
            loose_numbers):
        return False
    # The generation the write gave, if it was an update: an attachment it
    # carried was last written then (a stub's revpos says when), or it is
    # another writer's, however alike.
    generation = _generation(sent['_rev']) + 1 if sent.get('_rev') else None
    for name, attachment in mine.items():
        if generation is not None and not attachment.get('stub') and \
                stubs[name].get('revpos', generation) != generation:
            return False
        length = attachment.get('length')
        digest = None
        if 'data' in attachment:
            data = _base64.b64decode(attachment['data'])
            length = len(data)
            digest = 'md5-' + _base64.b64encode(
                _hashlib.md5(data).digest()).decode()
        stub = stubs[name]
        if stub.get('content_type') != attachment.get('content_type') or \
                stub.get('length') != length:
            return False
        # The server's digest is the MD5 of the data, but for the types
        # CouchDB compresses (it digests what it stores): where it can be
        # compared, content of the same length can still differ. Else the
        # content itself tells, if it may be read.
        if digest is None:
            continue
        if _compressed(stub.get('content_type')) or 'digest' not in stub:
            if read is not None and read(name) != data:
                return False
        elif stub['digest'] != digest:
            return False
    return True


# The content types CouchDB compresses by default (``compressible_types``).
_COMPRESSIBLE = ('text/', 'application/javascript', 'application/json',
                 'application/xml')


def _compressed(content_type):
    """Whether CouchDB compresses attachments of ``content_type``."""
    return (content_type or '').split(';')[0].strip().lower().startswith(
        _COMPRESSIBLE)


def _merge_documents(base, mine, theirs, new):
    """The three-way merge of whole documents (``None`` for a deletion);
    ``None`` means the merge is a deletion.

    :raise _MergeConflict: naming what both sides changed
    """
    if mine is None or theirs is None:
        if theirs is None and (mine is None or new):
            return mine                 # nothing on the server to merge
        changed = mine if theirs is None else theirs
        # The server's version may give numbers in another form (see
        # `_merge`).
        if base is not None and \
                _same_write(base, changed, changed is theirs) and \
                _same_digests(base, changed):
            return None                 # the other side only deleted
        raise _MergeConflict('deleted on one side and changed on the other')
    merged = _merge(_content(base), _content(mine), _content(theirs), '')
    return _plain(merged)


def _check_attachments(base, theirs, pending):
    """Raise `_MergeConflict` if the server's version ``theirs`` changed an
    attachment since ``base`` that the session changes too (``pending``:
    the entry's `_PendingAttachments`)."""
    changes = pending.changes
    if not changes:
        return
    base = base or {}
    before = base.get('_attachments') or {}
    if theirs is None:
        # Deleted on the server: a clash, unless the session only put back
        # what the base had (no change of its own, as for a field).
        for filename, attachment in changes.items():
            known = before.get(filename, {}).get('digest') or \
                (pending.digests or {}).get(filename)
            if attachment is None if filename not in before else \
                    attachment is not None and known is not None and \
                    attachment.digest() == known:
                continue
            raise _MergeConflict('deleted on one side and its attachments '
                                 'changed on the other')
        changes.clear()
        return
    after = theirs.get('_attachments') or {}
    # A stub's revpos is the generation that last wrote the attachment.
    generation = _generation(base.get('_rev'))
    unchanged = []              # the session's puts of the base's content
    for filename, attachment in changes.items():
        stub = after.get(filename)
        known = before.get(filename, {}).get('digest') or \
            (pending.digests or {}).get(filename)
        if filename in before and attachment is not None and \
                known is not None and attachment.digest() == known:
            # The session put back what the base had: no change of its
            # own, so the other side's stands (changed, kept or deleted),
            # as for a field.
            unchanged.append(filename)
            continue
        if stub is None:
            changed = filename in before and attachment is not None
        else:
            changed = filename not in before or \
                stub.get('revpos', generation + 1) > generation
            # Written again with the same content is no change.
            if changed and known is not None and \
                    stub.get('digest') == known:
                changed = False
            if changed and attachment is not None and \
                    stub.get('digest') == attachment.digest() and \
                    stub.get('length') == attachment.size:
                changed = False         # the same content on both sides
        if changed:
            raise _MergeConflict('both sides changed the attachment %r'
                                 % filename)
    for filename in unchanged:
        del changes[filename]


def _take_stubs(base, document):
    """Give ``base`` the attachment stubs of ``document``."""
    stubs = document.get('_attachments')
    if stubs:
        base['_attachments'] = _plain(stubs)
    else:
        base.pop('_attachments', None)


def _stubs_there(document, theirs):
    """``document`` (``None`` for a deletion), to be written over the
    server's version ``theirs`` (``None`` if deleted), without the stubs of
    the attachments ``theirs`` lacks: a stub keeps an attachment the server
    has, and CouchDB refuses one for an attachment it no longer has (412
    ``missing_stub``); the session has no content to send for it."""
    stubs = None if document is None else document.get('_attachments')
    if not stubs or not isinstance(stubs, dict):
        return document         # (what is no dict is refused when checked)
    there = (theirs or {}).get('_attachments') or {}
    kept = dict((name, stub) for name, stub in stubs.items()
                if name in there or not isinstance(stub, dict) or
                not stub.get('stub'))
    if len(kept) == len(stubs):
        return document
    document = dict(document)
    if kept:
        document['_attachments'] = kept
    else:
        del document['_attachments']
    return document


def _generation(rev):
    """The number before the dash of a revision; 0 for none."""
    return int(rev.split('-', 1)[0]) if rev else 0


def _same_digests(a, b):
    """Whether the attachments both versions give a digest for agree
    (an attachment written again with the same content is unchanged)."""
    stubs = b.get('_attachments') or {}
    return all(stub.get('digest') is None or
               stubs.get(name, {}).get('digest') in (None, stub['digest'])
               for name, stub in (a.get('_attachments') or {}).items())


def _merge(base, mine, theirs, path):
    """Three-way merge of JSON values; `_MISSING` stands for an absent
    dict key. A number the server's version ``theirs`` has in another form
    than ``base`` is no change of theirs: a JavaScript server gives the
    session's 1.0 back as 1."""
    try:
        if _same_quick(mine, theirs):
            return mine
        if _same_quick(base, mine):
            return theirs
        if _same_quick(base, theirs, True):
            return mine
        if isinstance(mine, dict) and isinstance(theirs, dict):
            older = base if isinstance(base, dict) else {}
            merged = {}
            for key in list(mine) + [key for key in theirs if key not in mine]:
                value = _merge(older.get(key, _MISSING),
                               mine.get(key, _MISSING),
                               theirs.get(key, _MISSING),
                               path + '/' + _escape(key))
                if value is not _MISSING:
                    merged[key] = value
            return merged
        raise _MergeConflict('both sides changed %s' % (path or '/'))
    except RecursionError:
        pass                    # too deep for the stack: see `_unwind`
    return _unwind(_deep_merge(base, mine, theirs, path, {}))


def _deep_merge(base, mine, theirs, path, memo):
    """The iterative twin of `_merge` (see `_unwind`; ``memo`` is
    `_deep_same`'s); keep the two in step."""
    if (yield _deep_same(mine, theirs, False, memo)):
        return mine
    if (yield _deep_same(base, mine, False, memo)):
        return theirs
    if (yield _deep_same(base, theirs, True, memo)):
        return mine
    if not (isinstance(mine, dict) and isinstance(theirs, dict)):
        raise _MergeConflict('both sides changed %s' % (path or '/'))
    older = base if isinstance(base, dict) else {}
    merged = {}
    for key in list(mine) + [key for key in theirs if key not in mine]:
        value = yield _deep_merge(older.get(key, _MISSING),
                                  mine.get(key, _MISSING),
                                  theirs.get(key, _MISSING),
                                  path + '/' + _escape(key), memo)
        if value is not _MISSING:
            merged[key] = value
    return merged


# -- Replication conflicts ----------------------------------------------------

# The members that describe a leaf, not its content.
_LEAF_MEMBERS = ('_rev', '_revisions', '_conflicts', '_deleted_conflicts')


def _show_conflicts(entry, revs):
    """Set the ``_conflicts`` a reader sees in ``entry``'s document, in
    what it is diffed against too: a change of it is none."""
    targets = [entry.subject]
    if entry.copies is not None and id(entry.subject) in entry.copies:
        targets.append(entry.copies[id(entry.subject)][1])
    elif entry.base is not None and entry.base is not True:
        targets.append(entry.base)
    for target in targets:
        if revs:
            target['_conflicts'] = list(revs)
        else:
            target.pop('_conflicts', None)


def _without_history(leaf):
    return dict((key, value) for key, value in leaf.items()
                if key != '_revisions')


def _conflict_side(document):
    """A plain copy of ``document``'s content, for merging leaves."""
    return dict((key, _plain(value)) for key, value in document.items()
                if key not in _LEAF_MEMBERS)


def _common_revision(winner, loser):
    """The newest revision in the histories (``_revisions``) of both
    leaves, or ``None``."""
    histories = []
    for leaf in (winner, loser):
        history = (leaf or {}).get('_revisions') or {}
        start, ids = history.get('start'), history.get('ids') or []
        if not isinstance(start, int):
            return None
        histories.append(dict((start - n, digest)
                              for n, digest in enumerate(ids)))
    mine, theirs = histories
    for generation in sorted(set(mine) & set(theirs), reverse=True):
        if mine[generation] == theirs[generation]:
            return '%d-%s' % (generation, mine[generation])
    return None


def _merge_leaves(base, mine, theirs):
    """The content of two leaves ``mine`` and ``theirs`` merged over their
    ``base`` (``None`` when unknown: then they must agree).

    :raise _MergeConflict: naming the paths that clash
    """
    digests = [_attachment_digests(side) for side in (base, mine, theirs)]
    if digests[2] != digests[1] and (base is None or
                                     digests[2] != digests[0]):
        raise _MergeConflict('their attachments differ (attachments are not '
                             'merged)')
    strip = ('_attachments',)
    if base is None:
        ops = []
        _diff_dict(ops, None, _content(theirs, strip), _content(mine, strip))
        if ops:
            raise _MergeConflict('there is no common version to merge them '
                                 'on, and they differ at %s' % ', '.join(
                                     sorted(set(op['path'] for op in ops))))
        return mine
    merged = _merge(_content(base, strip), _content(mine, strip),
                    _content(theirs, strip), '')
    merged = _plain(merged)
    if '_attachments' in mine:
        merged['_attachments'] = mine['_attachments']
    return merged


def _attachment_digests(document):
    if document is None:
        return None
    return dict((name, (stub or {}).get('digest')) for name, stub in
                (document.get('_attachments') or {}).items())


# -- Copies and diffs ---------------------------------------------------------

# Documents may be as deep as python-couchdb can send and read back: its
# JSON codec is C, good for about as many levels as the recursion limit
# (~990 of the default 1000). The helpers below recurse in Python, a frame
# or two a level, and would fail at half that. Each keeps its recursion,
# the fast way for ordinary documents, and has an iterative twin,
# `_deep_<name>`: the same code as a generator that yields its nested calls
# instead of making them, for `_unwind` to run from a loop with a stack of
# its own, so that depth costs memory, not frames. A helper that meets
# RecursionError runs its twin instead, with the same result: `_plain`,
# `_materialize`, `_json_problem` and `_merge` at the level that met it
# (they are pure); `_same` and the diffs (which append to a list) start
# again from the top. The recursive diffs and `_merge` compare with `_same`
# at every level, which for a deep document costs its depth squared: their
# twins remember the comparisons they made (see `_deep_same`). The
# recursion limit is left alone: it is the whole process's.

def _unwind(call):
    """The result of ``call``, a generator of a `_deep_*` twin, run to its
    end: each generator it yields is a nested call, run in turn from here,
    and its result sent back."""
    stack, result = [], None
    while True:
        try:
            nested = call.send(result)
        except StopIteration as done:
            if not stack:
                return done.value
            call, result = stack.pop(), done.value
        else:
            stack.append(call)
            call, result = nested, None


def _plain(value):
    """A deep copy of ``value`` made of plain dicts and lists (tuples become
    lists, proxies their subjects); anything else is kept as it is, for
    `_check_json` to judge.

    :raise ValueError: if ``value`` holds itself
    """
    try:
        if isinstance(value, _Tracked):
            value = value.__subject__
        kind = type(value)
        if kind is dict or (kind is not list and isinstance(value, dict)):
            return {key: item if type(item) in _JSON_LEAVES else _plain(item)
                    for key, item in value.items()}
        if kind is list or isinstance(value, (list, tuple)):
            return [item if type(item) in _JSON_LEAVES else _plain(item)
                    for item in value]
        return value
    except RecursionError:
        pass                    # too deep for the stack: see `_unwind`
    return _unwind(_deep_plain(value, set()))


def _deep_plain(value, held):
    """The iterative twin of `_plain` (see `_unwind`). ``held`` are the ids
    of the dicts and lists being copied around this one: a value holding
    itself is too deep for any stack, and would fill the memory here."""
    if isinstance(value, _Tracked):
        value = value.__subject__
    kind = type(value)
    keyed = kind is dict or (kind is not list and isinstance(value, dict))
    if not keyed and not (kind is list or isinstance(value, (list, tuple))):
        return value
    if id(value) in held:
        raise ValueError('a dict or list holds itself: JSON cannot carry it')
    held.add(id(value))
    if keyed:
        copy = {}
        for key, item in value.items():
            copy[key] = item if type(item) in _JSON_LEAVES else (
                yield _deep_plain(item, held))
    else:
        copy = []
        for item in value:
            copy.append(item if type(item) in _JSON_LEAVES else (
                yield _deep_plain(item, held)))
    held.remove(id(value))
    return copy


def _escape(key):
    """``key`` as a JSON Pointer (RFC 6901) reference token."""
    return str(key).replace('~', '~0').replace('/', '~1')


def _same(a, b, loose_numbers=False):
    """Whether ``a`` and ``b`` are the same JSON value: unlike ``==``,
    ``True`` is not ``1``, and ``1`` is not ``1.0`` unless
    ``loose_numbers``."""
    try:
        return _same_quick(a, b, loose_numbers)
    except RecursionError:
        pass                    # too deep for the stack: see `_unwind`
    return _unwind(_deep_same(a, b, loose_numbers))


def _same_quick(a, b, loose_numbers=False):
    """`_same`, recursively: RecursionError if too deep for the stack. The
    recursive diffs and `_merge` call it at every level, and let that
    error reach their own fallback, which compares without repeating
    itself (see `_deep_same`)."""
    if a is b:
        return True
    kind = type(a)
    if kind is not type(b):
        return (loose_numbers and kind in _NUMBERS and type(b) in _NUMBERS
                and _same_number(a, b))
    if kind is dict or kind is list:
        # Fast paths in C: containers that differ by ``==`` differ (but for
        # ``loose_numbers``: see `_same_number`); equal ones whose marshal
        # bytes (which tell True from 1 from 1.0) agree are the same. Only
        # the rest is compared item by item.
        if a == b:
            try:
                if _marshal.dumps(a, 2) == _marshal.dumps(b, 2):
                    return True
            except ValueError:
                pass
        elif not loose_numbers:
            return False
    if kind is dict:
        return len(a) == len(b) and all(
            key in b and _same_quick(value, b[key], loose_numbers)
            for key, value in a.items())
    if kind is list:
        return len(a) == len(b) and all(
            _same_quick(x, y, loose_numbers) for x, y in zip(a, b))
    if loose_numbers and kind is int and not (-_EXACT <= a <= _EXACT and
                                              -_EXACT <= b <= _EXACT):
        return _same_number(a, b)
    return a == b


# The ints a double holds exactly.
_EXACT = 2 ** 53


def _same_number(a, b):
    """Whether two numbers are one to a JavaScript server, which holds
    every number as a double: it gives 5.948392946531295e+16 back as
    59483929465312950, which Python reads as an int that ``==`` tells from
    the float, and 2**53 + 1 as 2**53."""
    try:
        return float(a) == float(b)
    except OverflowError:
        return False            # an int beyond any double


def _deep_same(a, b, loose_numbers, memo=None):
    """The iterative twin of `_same` (see `_unwind`), item by item: its
    shortcuts in C recurse too. ``memo`` keeps the answers for pairs of
    dicts or lists, with the pairs (so that their ids stay theirs), for the
    twins that compare the parts of what they compared before: at every
    level of a deep document, which would cost its depth squared."""
    kind = type(a)
    if a is b or kind is not type(b) or kind not in _CONTAINERS:
        return _same_quick(a, b, loose_numbers)     # no recursion here
    key = id(a), id(b)
    if memo is not None and key in memo:
        return memo[key][0]
    same = len(a) == len(b)
    if same and kind is dict:
        for item, value in a.items():
            if item not in b or not (
                    yield _deep_same(value, b[item], loose_numbers, memo)):
                same = False
                break
    elif same:
        for x, y in zip(a, b):
            if not (yield _deep_same(x, y, loose_numbers, memo)):
                same = False
                break
    if memo is not None:
        memo[key] = same, a, b
    return same


# Paths are (parent path, key) pairs, the root's is None: the JSON Pointer
# is only made for an operation, since diffs run over every changed
# document a flush sends.

def _pointer(path):
    """The JSON Pointer (RFC 6901) of a path."""
    pointer = ''
    while path is not None:
        path, key = path
        token = _TOKENS.get(key) if type(key) is str else None
        if token is None:
            token = '/' + _escape(key)
            if type(key) is str and len(_TOKENS) < 10000:
                _TOKENS[key] = token
        pointer = token + pointer
    return pointer


# The reference tokens of the keys met in pointers: documents of a kind
# share their keys.
_TOKENS = {}


# The diffs of whole documents start at `_diff_dict` (against a whole
# version) and `_diff_tracked` (against the copies made on write); the
# helpers they call recurse, and each has its twin for deep documents.

def _diff_dict(ops, path, old, new):
    """Append to ``ops`` the JSON Patch operations turning dict ``old`` into
    dict ``new`` (both at ``path``)."""
    start = len(ops)
    try:
        return _diff_keys(ops, path, old, new)
    except RecursionError:
        del ops[start:]         # too deep for the stack: see `_unwind`
    _unwind(_deep_diff_keys(ops, path, old, new, {}))


def _diff_tracked(ops, path, current, copies, marked):
    """Append to ``ops`` the changes of ``current``, a dict or list of the
    document that was there at ``path`` before, following the marked ones
    (see `_Entry`)."""
    start = len(ops)
    try:
        return _diff_marked(ops, path, current, copies, marked)
    except RecursionError:
        del ops[start:]         # too deep for the stack: see `_unwind`
    _unwind(_deep_diff_marked(ops, path, current, copies, marked, {}))


def _diff_value(ops, path, old, new):
    """Append to ``ops`` the JSON Patch operations turning ``old`` into
    ``new`` (both at ``path``)."""
    kind = type(old)
    if kind is type(new):
        if kind is dict:
            return _diff_keys(ops, path, old, new)
        if kind is list:
            return _diff_list(ops, path, old, new)
        if old == new:
            return
    ops.append({'op': 'replace', 'path': _pointer(path), 'value': _plain(new),
                'was': _plain(old)})


def _deep_diff_value(ops, path, old, new, memo):
    """The iterative twin of `_diff_value` (see `_unwind`; ``memo`` is
    `_deep_same`'s)."""
    kind = type(old)
    if kind is not type(new) or kind not in _CONTAINERS:
        _diff_value(ops, path, old, new)    # no recursion for these
    elif kind is dict:
        yield _deep_diff_keys(ops, path, old, new, memo)
    else:
        yield _deep_diff_list(ops, path, old, new, memo)


def _diff_keys(ops, path, old, new):
    """`_diff_value` of two dicts."""
    for key, value in old.items():
        if key not in new:
            ops.append({'op': 'remove', 'path': _pointer((path, key)),
                        'was': _plain(value)})
            continue
        other = new[key]
        # Most values did not change: skip equal leaves without a call.
        if value is other or (type(value) in _JSON_LEAVES and
                              type(value) is type(other) and value == other):
            continue
        if type(value) in _CONTAINERS and _same_quick(value, other):
            continue
        _diff_value(ops, (path, key), value, other)
    _diff_added(ops, path, old, new)


def _deep_diff_keys(ops, path, old, new, memo):
    """The iterative twin of `_diff_keys` (see `_unwind`; ``memo`` is
    `_deep_same`'s); keep the two in step."""
    for key, value in old.items():
        if key not in new:
            ops.append({'op': 'remove', 'path': _pointer((path, key)),
                        'was': _plain(value)})
            continue
        other = new[key]
        if value is other or (type(value) in _JSON_LEAVES and
                              type(value) is type(other) and value == other):
            continue
        if type(value) in _CONTAINERS and (
                yield _deep_same(value, other, False, memo)):
            continue
        yield _deep_diff_value(ops, (path, key), value, other, memo)
    _diff_added(ops, path, old, new)


def _diff_added(ops, path, old, new):
    """The ``add`` operations of the keys of dict ``new`` that ``old``
    lacks."""
    for key, value in new.items():
        if key not in old:
            if not isinstance(key, str):
                raise _BadKey(_BAD_KEY % (key, _pointer(path) or '/',
                                          _a(key)))
            ops.append({'op': 'add', 'path': _pointer((path, key)),
                        'value': _plain(value)})


class _BadKey(TypeError):
    """A dict key JSON cannot carry, met by a diff (private)."""


def _materialize(value, copies):
    """A plain deep copy of the version ``value`` had before the changes
    recorded in ``copies`` (see `_Entry`)."""
    try:
        if type(value) not in _CONTAINERS and not isinstance(value, dict):
            return value
        recorded = copies.get(id(value))
        if recorded is not None:
            value = recorded[1]
        if isinstance(value, dict):
            return {key: item if type(item) in _JSON_LEAVES else
                    _materialize(item, copies) for key, item in value.items()}
        return [item if type(item) in _JSON_LEAVES else
                _materialize(item, copies) for item in value]
    except RecursionError:
        pass                    # too deep for the stack: see `_unwind`
    return _unwind(_deep_materialize(value, copies))


def _deep_materialize(value, copies):
    """The iterative twin of `_materialize` (see `_unwind`)."""
    if type(value) not in _CONTAINERS and not isinstance(value, dict):
        return value
    recorded = copies.get(id(value))
    if recorded is not None:
        value = recorded[1]
    if isinstance(value, dict):
        copy = {}
        for key, item in value.items():
            copy[key] = item if type(item) in _JSON_LEAVES else (
                yield _deep_materialize(item, copies))
        return copy
    copy = []
    for item in value:
        copy.append(item if type(item) in _JSON_LEAVES else (
            yield _deep_materialize(item, copies)))
    return copy


def _diff_marked(ops, path, current, copies, marked):
    """`_diff_tracked`, recursively."""
    recorded = copies.get(id(current))
    if recorded is None:
        # Unchanged itself: only its marked children may hold changes,
        # diffed in the document's order.
        for key in _marked_keys(current, marked):
            _diff_marked(ops, (path, key), current[key], copies, marked)
        return
    before = recorded[1]
    if not isinstance(current, dict):
        return _diff_list(ops, path, [_materialize(item, copies)
                                      for item in before], current)
    kept = True                 # whether current has every key of before
    for key, old in before.items():
        new = current.get(key, _MISSING)
        if new is old:
            if type(new) in _CONTAINERS:
                child = id(new)
                if child in marked or child in copies:
                    _diff_marked(ops, (path, key), new, copies, marked)
        elif new is _MISSING:
            kept = False
            ops.append({'op': 'remove', 'path': _pointer((path, key)),
                        'was': _materialize(old, copies)})
        elif type(old) in _READ_LEAVES and type(new) in _READ_LEAVES:
            # A scalar for a scalar, the most common change: what
            # `_diff_value` would do, without its calls.
            if type(old) is not type(new) or old != new:
                ops.append({'op': 'replace', 'path': _pointer((path, key)),
                            'value': new, 'was': old})
        else:
            _diff_value(ops, (path, key), _materialize(old, copies), new)
    if not kept or len(current) != len(before):
        _diff_added(ops, path, before, current)   # else no key was added


def _changed_marked(current, copies, marked):
    """`_Entry.changed`: whether ``current``, a dict or list of the
    document, differs from what it was, following the marked ones as
    `_diff_marked` does, but building no operations; None at the first
    change that is not a JSON scalar for a scalar in a dict with the same
    keys, in the same order, as before."""
    place = id(current)
    recorded = copies.get(place)
    changed = False
    if recorded is not None:
        before = recorded[1]
        if not isinstance(current, dict) or list(before) != list(current):
            return None
        # The keys whose values are other objects now, found in C: most of
        # a changed dict is as it was.
        for key in _compress(before, map(_is_not, before.values(),
                                         current.values())):
            old, new = before[key], current[key]
            kind = type(new)
            if kind in _JSON_LEAVES and type(old) in _JSON_LEAVES:
                if kind is not type(old) or old != new:
                    changed = True
            elif kind is float and type(old) in _READ_LEAVES and \
                    new - new == 0:
                if type(old) is not float or old != new:
                    changed = True
            else:
                return None     # for a diff, or a check (NaN, infinite)
    # Its children changed below are marked (`_mark`). In a dict compared
    # above, a child that is another object now was compared, and a marked
    # key may be gone since (the dict was changed after the mark).
    mark = marked.get(place)
    if mark is None:
        return changed
    keys = mark[1]
    for key in keys if type(keys) is set else (keys,):
        if recorded is None:
            child = current[key]
        else:
            child = before.get(key, _MISSING)
            if child is _MISSING or current[key] is not child:
                continue
        below = _changed_marked(child, copies, marked)
        if below is None:
            return None
        changed = changed or below
    return changed


def _marked_keys(current, marked):
    """The keys of the marked children of ``current``, a dict or list not
    copied itself, in the document's order."""
    mark = marked.get(id(current))
    if mark is None:
        return ()
    keys = mark[1]
    if type(keys) is not set:
        return (keys,)
    return [key for key in current if key in keys] if \
        isinstance(current, dict) else sorted(keys)


def _deep_diff_marked(ops, path, current, copies, marked, memo):
    """The iterative twin of `_diff_marked` (see `_unwind`; ``memo`` is
    `_deep_same`'s); keep the two in step."""
    recorded = copies.get(id(current))
    if recorded is None:
        keys = _marked_keys(current, marked)
        for key in keys:
            yield _deep_diff_marked(ops, (path, key), current[key], copies,
                                    marked, memo)
        return
    before = recorded[1]
    if not isinstance(current, dict):
        yield _deep_diff_list(ops, path, [_materialize(item, copies)
                                          for item in before], current, memo)
        return
    kept = True
    for key, old in before.items():
        new = current.get(key, _MISSING)
        if new is old:
            if type(new) in _CONTAINERS:
                child = id(new)
                if child in marked or child in copies:
                    yield _deep_diff_marked(ops, (path, key), new, copies,
                                            marked, memo)
        elif new is _MISSING:
            kept = False
            ops.append({'op': 'remove', 'path': _pointer((path, key)),
                        'was': _materialize(old, copies)})
        elif type(old) in _READ_LEAVES and type(new) in _READ_LEAVES:
            if type(old) is not type(new) or old != new:
                ops.append({'op': 'replace', 'path': _pointer((path, key)),
                            'value': new, 'was': old})
        else:
            yield _deep_diff_value(ops, (path, key),
                                   _materialize(old, copies), new, memo)
    if not kept or len(current) != len(before):
        _diff_added(ops, path, before, current)


def _diff_list(ops, path, old, new):
    # Skip the common head and tail; pair off the middles item by item, then
    # add what the new middle has more, or remove what the old has more.
    head, old_end, new_end = 0, len(old), len(new)
    while head < old_end and head < new_end and \
            _same_quick(old[head], new[head]):
        head += 1
    while (old_end > head and new_end > head and
           _same_quick(old[old_end - 1], new[new_end - 1])):
        old_end -= 1
        new_end -= 1
    paired = min(old_end, new_end) - head
    for index in range(head, head + paired):
        _diff_value(ops, (path, index), old[index], new[index])
    for index in range(head + paired, new_end):
        ops.append({'op': 'add', 'path': _pointer((path, index)),
                    'value': _plain(new[index])})
    for index in range(head + paired, old_end):
        ops.append({'op': 'remove', 'path': _pointer((path, head + paired)),
                    'was': _plain(old[index])})


def _deep_diff_list(ops, path, old, new, memo):
    """The iterative twin of `_diff_list` (see `_unwind`; ``memo`` is
    `_deep_same`'s); keep the two in step."""
    head, old_end, new_end = 0, len(old), len(new)
    while head < old_end and head < new_end and (
            yield _deep_same(old[head], new[head], False, memo)):
        head += 1
    while old_end > head and new_end > head and (
            yield _deep_same(old[old_end - 1], new[new_end - 1], False,
                             memo)):
        old_end -= 1
        new_end -= 1
    paired = min(old_end, new_end) - head
    for index in range(head, head + paired):
        yield _deep_diff_value(ops, (path, index), old[index], new[index],
                               memo)
    for index in range(head + paired, new_end):
        ops.append({'op': 'add', 'path': _pointer((path, index)),
                    'value': _plain(new[index])})
    for index in range(head + paired, old_end):
        ops.append({'op': 'remove', 'path': _pointer((path, head + paired)),
                    'was': _plain(old[index])})
