"""Property-based tests of session.py: change tracking, diffs and JSON types.

Every example works on a real server (the ``db`` fixture of conftest.py):
a document is written with plain python-couchdb, read in a `Session`,
changed, and what the user sees is checked: the tracked document, `diff`,
what `flush` returns and what the server holds afterwards.

The reference model is a plain copy of the document (nested dicts and lists)
that undergoes the same changes. Values put into a tracked document are
deep-copied by the session (like JSON, no aliasing), so the model stores a
``copy.deepcopy`` of every value it is given.

The server is a JavaScript one (PouchDB Server) in development: it keeps no
difference between ``1`` and ``1.0`` and keeps integers exactly only up to
2**53, so integers stay in that range and documents read back from the
server are compared with numbers taken by value (``True`` is still not
``1``).
"""

import collections
import copy
import json
import uuid

import couchdb
import jsonpatch
import jsonpointer
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

import session

# -- Strategies ---------------------------------------------------------------

MAX_INT = 2 ** 53

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


# -- Helpers ------------------------------------------------------------------

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
    return json.dumps(item, sort_keys=True)


def size(value):
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
                   size(h.plain) < 400]
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
                vandalize(vt)
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
                    fresh.append(mt[k])
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
            for v in fresh:
                vandalize(v)
        elif op == 'setdefault':
            k = self.key(h)
            vt, vp, source = self.value()
            got = self.apply('%s.setdefault(%r, %r)' % (expr, k, vp),
                             lambda: t.setdefault(k, vt),
                             lambda: p.setdefault(k, vp))
            if source is None:
                vandalize(vt)
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
            self.apply('%s[%d] = %r' % (expr, i, vp), on_tracked, on_plain)
            if source is None:
                vandalize(vt)
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
            self.apply('%s[%r] = %r' % (expr, s, vp), on_tracked, on_plain)
            if source is None:
                vandalize(vt)
                for item in vt:
                    vandalize(item)
        elif op == 'append':
            vt, vp, source = self.value()
            self.apply('%s.append(%r)' % (expr, vp),
                       lambda: t.append(vt), lambda: p.append(vp))
            if source is None:
                vandalize(vt)
        elif op in ('extend', '+='):
            vt, vp, source = self.value(lists_only=True)
            if op == 'extend':
                self.apply('%s.extend(%r)' % (expr, vp),
                           lambda: t.extend(vt), lambda: p.extend(vp))
            else:
                self.apply('%s += %r' % (expr, vp),
                           lambda: iadd(t, vt) is t, lambda: iadd(p, vp) is p)
            if source is None:
                for item in vt:
                    vandalize(item)
        elif op == 'insert':
            i = self.draw(st.integers(-n - 2, n + 2))
            vt, vp, source = self.value()
            self.apply('%s.insert(%d, %r)' % (expr, i, vp),
                       lambda: t.insert(i, vt), lambda: p.insert(i, vp))
            if source is None:
                vandalize(vt)
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


# -- Tracking -----------------------------------------------------------------

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


# -- Diff ---------------------------------------------------------------------

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


# -- JSON types ---------------------------------------------------------------

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


# -- Conflicts: the three-way merge ------------------------------------------
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
