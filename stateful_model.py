"""A stateful model of `session.Session` against the real server (Hypothesis
`RuleBasedStateMachine`).

Not collected by default (the name does not match ``test_*.py``): run it with

    .venv/bin/python -m pytest -q stateful_model.py
    SESSION_SOAK=1 .venv/bin/python -m pytest -q stateful_model.py   # 10,000

``SESSION_MODEL_SKIP=plain,attachments`` (a comma-separated list of the rule
families below) leaves rule families out, to look past one failure at others.

The helpers `same`, `three_way`, `ABSENT`, `ModelConflict`, `through` and
`body` are copies of test_session.py's of the same name: drop them when this
file is merged into it.
"""

import base64
import copy
import hashlib
import http.client
import os
from urllib.parse import urlsplit

import couchdb
import couchdb.http
import jsonpatch
import pytest
from hypothesis import HealthCheck, event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize,
                                 invariant, precondition, rule,
                                 run_state_machine_as_test)

import session
from session import FlushError, Session
from tools.forwarder import Forwarder, is_bulk_docs
from tools.localserver import temporary_database


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
#    conflict if the server moved before the broken flush).
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
#    reported so, or forgotten at once.
# 11. A resolver function returning None leaves the conflict pending and
#    reported; the model's resolvers return the session's version
#    ('mine'), the server's ('theirs'), the server's with the session's
#    fields over it, or None; a side that deleted is None, so 'theirs' of a
#    deletion is the session's version, and a deletion is returned as
#    ``{'_deleted': True}``. Pending attachment changes go on top of what
#    it returns (README: "resolve functions keep it").


#: The rule families `SESSION_MODEL_SKIP` may name ('large': attachments
#: larger than `max_inline_attachment`).
FAMILIES = {'plain', 'attachments', 'large', 'faults', 'writer', 'clear',
            'create', 'delete', 'merge', 'overwrite', 'resolve'}
SKIP = set(filter(None, os.environ.get('SESSION_MODEL_SKIP', '').split(',')))
assert SKIP <= FAMILIES, 'unknown rule families: %s' % (SKIP - FAMILIES)

settings.register_profile(
    'stateful-ci', max_examples=200, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much])
settings.register_profile(
    'stateful-soak', max_examples=10000, stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much])
PROFILE = 'stateful-soak' if os.environ.get('SESSION_SOAK') == '1' else \
    'stateful-ci'
if os.environ.get('SESSION_MODEL_STEPS'):      # for debugging
    settings.register_profile(
        'stateful-debug', settings.get_profile(PROFILE),
        stateful_step_count=int(os.environ['SESSION_MODEL_STEPS']),
        max_examples=int(os.environ.get('SESSION_MODEL_EXAMPLES', 300)),
        report_multiple_bugs=False)
    PROFILE = 'stateful-debug'

#: The document ids the session and the writer share.
IDS = ['a', 'b', 'c']
#: Attachment names; `LIMIT` is the session's `max_inline_attachment`.
NAMES = ['f.bin', 'g.bin']
LIMIT = 8
TYPE = 'application/octet-stream'

#: A small key alphabet (one key with the characters JSON Pointer escapes),
#: so that both writers often touch the same keys.
keys = st.sampled_from(['a', 'b', 'c', 'd/~'])
leaves = st.sampled_from([0, 1, 2, 'x', 'y', None, True, False])
values = st.recursive(
    leaves, lambda children: (st.lists(children, max_size=3) |
                              st.dictionaries(keys, children, max_size=3)),
    max_leaves=5)
containers = st.lists(values, max_size=3) | st.dictionaries(keys, values,
                                                            max_size=3)
bodies = st.dictionaries(keys, containers | values, max_size=4)
contents = st.sampled_from([b'', b'one', b'two', b'three'] + (
    [b'0123456789', b'large content'] if 'large' not in SKIP else []))

RESOLVER_CHOICES = ['mine', 'theirs', 'theirs and my fields', 'none']


# -- Stateful model: helpers --------------------------------------------------

class _Absent(object):
    def __repr__(self):
        return 'ABSENT'


#: A missing dict key, or a deleted document, in `three_way`.
ABSENT = _Absent()


class ModelConflict(Exception):
    """Both sides changed the value at a path (the argument) differently."""


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
        return float(a) == float(b)
    return type(a) is type(b) and a == b


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


def body(document):
    """A plain deep copy of a document without ``_id``, ``_rev`` and
    ``_attachments``."""
    return {k: copy.deepcopy(v) for k, v in dict(document).items()
            if k not in ('_id', '_rev', '_attachments')}


def through(forwarder, db, server_url, timeout=None):
    """The database ``db`` reached through ``forwarder``: a
    `couchdb.Database` with its own connection pool."""
    parts = urlsplit(server_url)
    netloc = urlsplit(forwarder.url).netloc
    if parts.username:
        netloc = parts.netloc.rpartition('@')[0] + '@' + netloc
    url = 'http://%s%s%s' % (netloc, parts.path.rstrip('/') + '/', db.name)
    return couchdb.Database(url, session=couchdb.http.Session(timeout=timeout))


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
                if content is not None and len(content) > LIMIT]

    def inline_work(self):
        return any(content is None or len(content) <= LIMIT
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
                 error=None, resolver=False, why=''):
        self.kind, self.body, self.error = kind, body, error
        self.attachments = attachments or {}
        self.gens, self.resolver, self.why = set(gens), resolver, why

    def __repr__(self):
        if self.kind == 'written':
            return '<written %r %r gen %s (%s)>' % (
                self.body, sorted(self.attachments), sorted(self.gens),
                self.why)
        return '<%s %s (%s)>' % (self.kind, self.error and
                                 self.error.__name__, self.why)


def exact(attachments):
    return {name: [content] for name, content in attachments.items()}


# -- Stateful model: the machine ----------------------------------------------

class SessionMachine(RuleBasedStateMachine):
    """The user's session, the concurrent writer and the model (see the
    comment above)."""

    server_url = None
    forwarder = None

    def __init__(self):
        super().__init__()
        self.database = temporary_database(self.server_url)
        self.db = self.database.__enter__()
        self.forwarder.mode = 'pass'
        self.S = Session(through(self.forwarder, self.db, self.server_url),
                         max_inline_attachment=LIMIT)
        self.server = {}
        self.held = {}
        self.refs = []
        self.unsure = set()
        self.landed = {}
        self.sent = {}              # {id: what the broken flush sent}
        self.created = []           # generated ids

    def teardown(self):
        self.forwarder.mode = 'pass'
        self.database.__exit__(None, None, None)

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
            seen[row.id] = (doc['_rev'], body(doc), dict(
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

    def drop_refs(self, id):
        self.refs = [ref for ref in self.refs if ref.id != id]

    def track(self, id, doc):
        """Hold ``doc``, just read by the session, in the model."""
        version = self.server[id]
        assert version.body is not None
        assert same(body(doc), version.body), (body(doc), version.body)
        assert doc['_id'] == id and doc['_rev'] == version.rev
        self.held[id] = Held('fetched', doc, body(doc), version,
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

    @precondition(lambda self: 'plain' not in SKIP)
    @rule(data=st.data())
    def edit_through_a_plain_reference(self, data):
        refs = self.editable(plain=True)
        if not refs:
            return
        ref = data.draw(st.sampled_from(refs), label='plain ref')
        self.edit(data, ref)

    @precondition(lambda self: 'plain' not in SKIP)
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
            key = data.draw(keys, label='key')
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
            present = [k for k in mirror if not (is_root and k.startswith('_'))]
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
                    'clear' not in SKIP:
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
                key = data.draw(keys, label='key')
            key2 = data.draw(keys, label='key2')
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

    @precondition(lambda self: 'create' not in SKIP)
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

    @precondition(lambda self: 'delete' not in SKIP)
    @rule(data=st.data())
    def delete(self, data):
        """``del S[id]`` or ``S.delete(doc)``, held or not."""
        id = data.draw(st.sampled_from(self.ids()), label='id')
        held = self.held.get(id)
        how = data.draw(st.sampled_from(['del S[id]', 'S.delete(doc)']),
                        label='how')
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

    @precondition(lambda self: 'attachments' not in SKIP)
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

    @precondition(lambda self: 'attachments' not in SKIP)
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

    @precondition(lambda self: 'writer' not in SKIP)
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
        elif how == 'delete key' and body(doc):
            del doc[data.draw(st.sampled_from(sorted(body(doc))))]
        elif how != 'save unchanged':
            doc[data.draw(keys, label='key')] = data.draw(values, label='v')
        note('writer saves %r: %r' % (id, body(doc)))
        self.db.save(doc)
        version = self.server[id]
        self.server[id] = Version(doc['_rev'], body(doc), version.attachments)

    @precondition(lambda self: 'writer' not in SKIP)
    @rule(data=st.data())
    def writer_deletes(self, data):
        ids = [id for id in self.writable() if self.live_on_server(id)]
        if not ids:
            return
        id = data.draw(st.sampled_from(ids), label='id')
        self.db.delete(self.db[id])
        self.server[id] = Version(self.tombstone_rev(id), None, {})

    @precondition(lambda self: 'writer' not in SKIP)
    @rule(data=st.data(), content=bodies)
    def writer_creates(self, data, content):
        ids = [id for id in self.writable() if not self.live_on_server(id)]
        if not ids:
            return
        id = data.draw(st.sampled_from(ids), label='id')
        self.db[id] = copy.deepcopy(content)
        self.server[id] = Version(self.db[id].rev, content, {})

    @precondition(lambda self: 'writer' not in SKIP and
                  'attachments' not in SKIP)
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
        if policy in SKIP:
            policy = 'raise'
        self.check_flush(policy, choice, fault=None)

    @precondition(lambda self: 'faults' not in SKIP and not self.unsure)
    @rule(action=st.sampled_from(['drop_answer', 'drop_answer', 'cut_before',
                                  'reset', 'refuse']),
          times=st.sampled_from([2, 1]),
          bulk_only=st.booleans())
    def flush_through_a_fault(self, action, times, bulk_only):
        """A flush whose next request(s) fail (rule 6)."""
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
                chosen = dict(theirs, **body(mine))
            return {'_deleted': True} if chosen is None else chosen
        return resolve

    def expect(self, id, policy, choice):
        """The outcomes the model allows a flush for ``id``."""
        held = self.held[id]
        version = self.server.get(id)
        mine, mine_atts = held.mine()
        if id in self.landed:
            return self.expect_settling(id, held, version, mine, mine_atts)
        sent = self.sent.get(id)
        if id in self.unsure and sent is not None and version is not None \
                and version.body is not None and same(sent[0], version.body) \
                and sent[1] == version.attachments:
            # The server holds what the broken flush sent, written by the
            # writer before it: the session cannot tell it from its own.
            return self.expect_plainly(id, held, version, policy, choice) + \
                self.expect_settling(id, held, version, mine, mine_atts)
        if id in self.unsure and held.kind == 'deleted by id':
            # Created, sent by a broken flush that did not reach the server,
            # deleted: reported as missing, or not (rule 10).
            outcomes = self.expect_plainly(id, held, version, policy, choice)
            return outcomes + [Outcome('unchanged', why='rule 10')]
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
        stubs = {name: [content] + ([theirs_atts[name]]
                                    if name in theirs_atts else [])
                 for name, content in held.attachments.items()}
        as_mine = dict(stubs, **exact(
            {name: content for name, content in held.pending.items()
             if content is not None}))
        for name, content in held.pending.items():
            if content is None:
                as_mine.pop(name, None)
        refused = Outcome('unchanged', error=Exception, why='stub refused')
        maybe_refused = [refused] if mine is not ABSENT and set(
            held.attachments) - set(theirs_atts) else []
        if policy == 'overwrite':
            return [written(mine, as_mine, 'overwrite',
                            taken=True)] + maybe_refused
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
                            taken=True)] + maybe_refused
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
        expected = dict((id, self.expect(id, policy, choice))
                        for id, held in sorted(self.held.items())
                        if held.has_work() or id in self.unsure)
        if fault is not None:
            # python-couchdb may retry a failed request by itself, and the
            # session cannot know whether the first attempt reached the
            # server: a server holding just what the session sends may be
            # taken for its own write.
            for id, outcomes in expected.items():
                held, version = self.held[id], self.server.get(id)
                mine, mine_atts = held.mine()
                if mine is not ABSENT and version is not None and \
                        version.body is not None and \
                        same(mine, version.body) and \
                        mine_atts == version.attachments:
                    outcomes.append(Outcome(
                        'written', mine, exact(mine_atts), gens=[version.gen],
                        why='maybe its own write, retried'))
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
            self.sent = dict((id, self.held[id].mine()) for id in expected
                             if id in self.held)
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
            assert same(body(doc), held.mirror), (
                'document %r holds %r, the user made it %r' % (
                    id, body(doc), held.mirror))
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
                shown = body(ref.obj) if ref.obj is self.root_of(ref) else \
                    copy.deepcopy(ref.obj)
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
            if version == () and held.mine()[0] is ABSENT:
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
    parts = urlsplit(server_url)
    if parts.scheme != 'http':
        pytest.skip('the forwarder speaks plain HTTP only')
    with Forwarder(parts.hostname, parts.port or 80) as forwarder:
        SessionMachine.server_url = server_url
        SessionMachine.forwarder = forwarder
        run_state_machine_as_test(SessionMachine,
                                  settings=settings.get_profile(PROFILE))
