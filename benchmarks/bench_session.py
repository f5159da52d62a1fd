"""Benchmark: `session` against hand-written python-couchdb, side by side.

Run with ``make bench`` (``BENCH_ARGS='--edit 500'`` passes options on). It
uses the local PouchDB Server, or the server named by ``COUCHDB_URL``, or
``--url``. For each workload and each way of doing it, it prints the number
of HTTP requests, the median wall time over ``--runs`` runs and its spread
(fastest and slowest run), and the ratio of the medians to the hand-written
bulk baseline with its spread: the lowest and highest ratio of paired runs
(run *i* of a way against run *i* of the baseline, which ran next to it), so
that one noisy run is not read as a change:

(a) session   the editing session;
(b) floor     hand-written python-couchdb with plain dicts: bulk reads, one
              ``Database.update`` for all writes, only what changed;
(c) naive     ``db[id]`` per read, ``db.save`` / ``db.delete`` per write.

Workloads:

1. edit: fetch N documents with ``_all_docs?include_docs=true``, change one
   nested field in each, write.
2. mixed: one web request: read 50 documents by id (some several times),
   change 10, create 5, delete 2, write.
3. idle-cache flush: a session holding N fetched documents, 10 of them
   changed; the time of ``flush()``'s own work, HTTP excluded (reported
   apart), against the same flush with 100 held.
4. read-heavy: read every field of N nested documents through the session,
   against the same reads on plain dicts.
5. memory: the memory a session holding N documents keeps, against the
   same documents held as plain dicts (tracemalloc).
6. read by id: N documents by id, ``S.get_many(ids)`` against
   ``_all_docs?include_docs=true`` with ``keys``.
7. edit by id: workload 1 with the documents read by id (``get_many``
   against ``_all_docs`` with ``keys``).
8. view with documents: a view with ``include_docs=True`` over N documents
   of which the session holds three quarters already, against the same view
   through python-couchdb.

Besides wall time, each way's client CPU time (``time.process_time``) and
the bytes it received are shown; workloads 1 and 7 also give the ratio of
client CPU time, session / floor.
"""

import argparse
import collections
import gc
import os
import socket
import statistics
import sys
import time
import tracemalloc
import uuid

import couchdb
import couchdb.http

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import session  # noqa: E402
from tools.localserver import running_server, temporary_database  # noqa


# -- Measuring ----------------------------------------------------------------

class Meter(object):
    """Counts python-couchdb's HTTP requests, the time spent in them and
    the bytes received (from every socket of the process: the server runs
    in another)."""

    def __init__(self):
        self.reset()
        original = self.original = couchdb.http.Session.request
        received = self.received_into = socket.socket.recv_into
        meter = self

        def request(self, *args, **kwargs):
            meter.requests += 1
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                meter.http_seconds += time.perf_counter() - start

        def recv_into(self, *args, **kwargs):
            count = received(self, *args, **kwargs)
            meter.bytes += count
            return count

        couchdb.http.Session.request = request
        socket.socket.recv_into = recv_into

    def reset(self):
        self.requests = 0
        self.http_seconds = 0.0
        self.bytes = 0

    def close(self):
        couchdb.http.Session.request = self.original
        socket.socket.recv_into = self.received_into


# What `compare` measured of one way: the requests and bytes received of
# its last run, the median wall and HTTP seconds, and the wall, HTTP and
# client CPU seconds of each run, in the order of the runs (run i of every
# way was made in the same turn).
Result = collections.namedtuple(
    'Result', 'name requests received seconds http runs http_runs cpu_runs')


def measure(meter, runs, setup, work):
    """Run ``work(setup())`` ``runs`` times; return its `Result`."""
    return compare(meter, runs, setup, [('', work)])[0]


def compare(meter, runs, setup, ways):
    """Run each of ``ways`` (``(name, work)``) as ``work(setup())``, in
    turn, ``runs`` times (taking turns keeps a slow drift of the server from
    favouring one way); return a `Result` for each."""
    times = dict((name, ([], [], [])) for name, _ in ways)
    requests, received = {}, {}
    for _ in range(runs):
        for name, work in ways:
            state = setup()
            gc.collect()
            meter.reset()
            start, cpu = time.perf_counter(), time.process_time()
            work(state)
            times[name][0].append(time.perf_counter() - start)
            times[name][1].append(meter.http_seconds)
            times[name][2].append(time.process_time() - cpu)
            requests[name], received[name] = meter.requests, meter.bytes
    return [Result(name, requests[name], received[name],
                   statistics.median(times[name][0]),
                   statistics.median(times[name][1]), *times[name])
            for name, _ in ways]


def spread(values, digits):
    """``'low-high'`` of ``values``, each with ``digits`` decimals."""
    return '%.*f-%.*f' % (digits, min(values), digits, max(values))


def paired_ratios(runs, base_runs):
    """The ratio of each run to the baseline's run of the same number (in
    `compare`, the one made in the same turn)."""
    return [run / base for run, base in zip(runs, base_runs) if base]


# -- Documents ----------------------------------------------------------------

def make_doc(n):
    """A nested document of the size web applications keep."""
    return {'type': 'person', 'name': 'person %d' % n, 'age': n % 90,
            'active': n % 3 == 0, 'score': n * 1.5,
            'address': {'street': '%d High Street' % n, 'city': 'Leeds',
                        'geo': {'lat': 53.8, 'lon': -1.55}},
            'tags': ['t%d' % (n % 7), 't%d' % (n % 11), 'member'],
            'history': [{'at': '2026-01-%02d' % (d + 1), 'event': 'login',
                         'ok': True} for d in range(3)]}


def fill(db, count, prefix='doc'):
    ids = ['%s%07d' % (prefix, n) for n in range(count)]
    for start in range(0, count, 5000):
        db.update([dict(make_doc(n), _id=ids[n])
                   for n in range(start, min(count, start + 5000))])
    return ids


def walk(value):
    """Read every field of a document; returns a count of leaves."""
    if isinstance(value, dict):
        return sum(walk(item) for item in value.values())
    if isinstance(value, list):
        return sum(walk(item) for item in value)
    return 1


# -- The edits of workloads 1 and 7 (bench_cpu.py counts them too) -----------

def edit_by_session(db, ids, mark):
    S = session.Session(db)
    for row in S.view('_all_docs', include_docs=True):
        row.doc['address']['city'] = 'city %d' % mark
    S.flush()


def edit_by_floor(db, ids, mark):
    docs = [row.doc for row in db.view('_all_docs', include_docs=True)]
    for doc in docs:
        doc['address']['city'] = 'city %d' % mark
    db.update(docs)


# ``upto`` stops after the read or the edits, for bench_cpu.py --phases.

def edit_by_id_by_session(db, ids, mark, upto='write'):
    S = session.Session(db)
    docs = S.get_many(ids)
    if upto == 'read':
        return
    for doc in docs:
        doc['address']['city'] = 'city %d' % mark
    if upto == 'write':
        S.flush()


def edit_by_id_by_floor(db, ids, mark, upto='write'):
    docs = [row.doc for row in db.view('_all_docs', keys=ids,
                                       include_docs=True)]
    if upto == 'read':
        return
    for doc in docs:
        doc['address']['city'] = 'city %d' % mark
    if upto == 'write':
        db.update(docs)


def marked(edit, db, ids, counter):
    """``edit`` as a way of `compare`, writing the next mark of ``counter``
    (shared by the ways of a workload: each run writes a mark no run wrote
    before, so a session has every document to write)."""
    return lambda _: edit(db, ids, next(counter))


# -- Workloads ----------------------------------------------------------------

def edit_workload(db, meter, size, runs):
    ids = fill(db, size)
    counter = iter(range(10 ** 9))

    def by_naive(_):
        mark = next(counter)
        for id in db:
            doc = db[id]
            doc['address']['city'] = 'city %d' % mark
            db.save(doc)

    ways = [('session', marked(edit_by_session, db, ids, counter)),
            ('floor', marked(edit_by_floor, db, ids, counter))]
    if size <= 2000:
        ways.append(('naive', by_naive))
    return compare(meter, runs, lambda: None, ways)


def mixed_workload(db, meter, runs):
    ids = fill(db, 50)
    # Each id read once, the first ten of them three times more, as a
    # request handler reads what it needs where it needs it.
    reads = ids + ids[:10] * 3
    counter = iter(range(10 ** 9))

    def setup():
        # Two fresh documents to delete in each run.
        victims = ['victim-%s' % uuid.uuid4().hex for _ in range(2)]
        db.update([{'_id': id} for id in victims])
        return victims

    def by_session(victims):
        mark = next(counter)
        S = session.Session(db)
        S.get_many(ids + victims)
        for id in reads:
            S[id]['name']
        for id in ids[:10]:
            S[id]['tags'].append('seen %d' % mark)
        for n in range(5):
            S.create(make_doc(n))
        for id in victims:
            del S[id]
        S.flush()

    def by_floor(victims):
        mark = next(counter)
        rows = db.view('_all_docs', keys=ids + victims, include_docs=True)
        docs = dict((row.id, row.doc) for row in rows)
        for id in reads:
            docs[id]['name']
        changed = []
        for id in ids[:10]:
            docs[id]['tags'].append('seen %d' % mark)
            changed.append(docs[id])
        created = [dict(make_doc(n), _id=uuid.uuid4().hex) for n in range(5)]
        deleted = [{'_id': id, '_rev': docs[id]['_rev'], '_deleted': True}
                   for id in victims]
        db.update(changed + created + deleted)

    def by_naive(victims):
        mark = next(counter)
        docs = {}
        for id in reads:
            docs[id] = db[id]
            docs[id]['name']
        for id in ids[:10]:
            docs[id]['tags'].append('seen %d' % mark)
            db.save(docs[id])
        for n in range(5):
            db.save(dict(make_doc(n), _id=uuid.uuid4().hex))
        for id in victims:
            db.delete(db[id])

    # A request takes milliseconds: many runs, for a steady median.
    return compare(meter, runs * 5, setup, [
        ('session', by_session), ('floor', by_floor), ('naive', by_naive)])


def idle_flush_workload(db, meter, sizes, runs):
    ids = fill(db, max(sizes))
    results = []
    counter = iter(range(10 ** 9))
    for size in sizes:
        S = session.Session(db)
        for start in range(0, size, 10000):
            S.get_many(ids[start:min(size, start + 10000)])

        def change(S=S):
            mark = next(counter)
            for id in ids[:10]:
                S[id]['address']['city'] = 'idle %d' % mark
            return S

        def flush(S):
            S.flush()

        result = measure(meter, runs, change, flush)
        own_runs = [seconds - http for seconds, http
                    in zip(result.runs, result.http_runs)]
        results.append(('session holding %d' % size, result.requests,
                        result.seconds - result.http, result.http, own_runs))
        del S
        gc.collect()
    return results


def read_workload(db, meter, size, runs):
    ids = fill(db, size)
    S = session.Session(db)
    tracked = S.get_many(ids)
    plain = [row.doc for row in db.view('_all_docs', keys=ids,
                                        include_docs=True)]
    assert walk(tracked) == walk(plain)
    return compare(meter, runs, lambda: None, [
        ('session', lambda _: walk(tracked)), ('plain', lambda _: walk(plain))])


def read_by_id_workload(db, meter, size, runs):
    ids = fill(db, size)

    def by_session(_):
        session.Session(db).get_many(ids)

    def by_floor(_):
        [row.doc for row in db.view('_all_docs', keys=ids,
                                    include_docs=True)]

    return compare(meter, runs, lambda: None,
                   [('session', by_session), ('floor', by_floor)])


def edit_by_id_workload(db, meter, size, runs):
    ids = fill(db, size)
    counter = iter(range(10 ** 9))
    return compare(meter, runs, lambda: None, [
        ('session', marked(edit_by_id_by_session, db, ids, counter)),
        ('floor', marked(edit_by_id_by_floor, db, ids, counter))])


def held_view_workload(db, meter, size, runs):
    ids = fill(db, size)
    db.save({'_id': '_design/people', 'views': {'by_name': {
        'map': 'function (doc) { if (doc.type === "person") '
               '{ emit(doc.name, null); } }'}}})
    len(db.view('people/by_name', limit=1))     # build the index
    held = ids[:size * 3 // 4]

    def setup():
        S = session.Session(db)
        S.get_many(held)
        return S

    def by_session(S):
        for row in S.view('people/by_name', include_docs=True):
            row.doc['name']

    def by_floor(_):
        for row in db.view('people/by_name', include_docs=True):
            row.doc['name']

    return compare(meter, runs, setup,
                   [('session', by_session), ('floor', by_floor)])


def memory_workload(db, size):
    ids = fill(db, size)

    def held(load):
        gc.collect()
        tracemalloc.start()
        kept = load()
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del kept
        return current, peak

    def by_session():
        S = session.Session(db)
        S.get_many(ids)
        return S

    def by_plain():
        return [row.doc for row in db.view('_all_docs', keys=ids,
                                           include_docs=True)]

    return [(name,) + held(load) for name, load in
            [('session', by_session), ('plain', by_plain)]]


# -- Report -------------------------------------------------------------------

def report(title, rows, baseline):
    """Print the `Result` rows of `compare`: "min-max s" is the fastest and
    the slowest run; the ratio is of the medians, to the ``baseline`` way,
    and its "min-max" the lowest and highest ratio of paired runs; "own" is
    the median time spent outside HTTP requests (python-couchdb's JSON
    encoding and decoding counts as HTTP)."""
    print('\n%s' % title)
    print('  %-8s %8s %8s %-15s %5s %-11s %7s %7s %7s %9s' % (
        'way', 'requests', 'median s', 'min-max s', 'ratio', 'min-max',
        'own s', 'HTTP s', 'CPU s', 'KB recv'))
    base = dict((row.name, row) for row in rows)[baseline]
    for row in rows:
        ratios = paired_ratios(row.runs, base.runs) or [0]
        print('  %-8s %8d %8.4f %-15s %5.2f %-11s %7.4f %7.4f %7.4f %9.1f'
              % (row.name, row.requests, row.seconds, spread(row.runs, 4),
                 row.seconds / base.seconds if base.seconds else 0,
                 spread(ratios, 2), row.seconds - row.http, row.http,
                 statistics.median(row.cpu_runs), row.received / 1e3))


def report_cpu(rows, baseline):
    """Print the ratio of client CPU time of the session to ``baseline``'s,
    with the spread of paired runs."""
    ways = dict((row.name, row) for row in rows)
    mine, base = ways['session'].cpu_runs, ways[baseline].cpu_runs
    ratios = paired_ratios(mine, base) or [0]
    print('  client CPU session / %s: %.2f (min-max of paired runs %s)' % (
        baseline, statistics.median(mine) / statistics.median(base)
        if statistics.median(base) else 0, spread(ratios, 2)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--url', help='server URL (default: COUCHDB_URL or '
                        'a local PouchDB Server)')
    parser.add_argument('--runs', type=int, default=5)
    parser.add_argument('--edit', type=int, default=2000, metavar='N')
    parser.add_argument('--idle', type=int, default=100000, metavar='N')
    parser.add_argument('--read', type=int, default=2000, metavar='N')
    parser.add_argument('--memory', type=int, default=10000, metavar='N')
    parser.add_argument('--smoke', action='store_true',
                        help='tiny sizes, one run: checks the script works')
    args = parser.parse_args(argv)
    if args.smoke:
        args.runs, args.edit, args.idle, args.read, args.memory = \
            1, 20, 200, 20, 50
    on_server(run, args)


def on_server(run, args):
    """``run(args, url)`` on the server ``args.url`` names, or on a local
    one started for it."""
    if args.url:
        run(args, args.url)
    else:
        with running_server() as url:
            run(args, url)


def run(args, url):
    meter = Meter()
    welcome = couchdb.Server(url).resource.get_json()[2]
    server = ('PouchDB Server %s' % welcome['version']
              if 'express-pouchdb' in welcome else
              'CouchDB %s' % welcome['version'])
    print('session benchmark on %s, %d run(s) each: median wall time,\n'
          'min-max over the runs (of ratios: over paired runs)'
          % (server, args.runs))
    try:
        with temporary_database(url) as db:
            rows = edit_workload(db, meter, args.edit, args.runs)
            report('1. edit %d documents' % args.edit, rows, 'floor')
            report_cpu(rows, 'floor')
        with temporary_database(url) as db:
            report('2. mixed request (read 50, change 10, create 5, '
                   'delete 2)', mixed_workload(db, meter, args.runs), 'floor')
        with temporary_database(url) as db:
            small = min(100, args.idle)
            rows = idle_flush_workload(db, meter, [small, args.idle],
                                       args.runs)
            print('\n3. idle-cache flush: 10 changed documents, flush() own '
                  'work (HTTP apart)')
            print('  %-22s %8s %8s %-15s %7s' % (
                'held', 'requests', 'own s', 'min-max own s', 'HTTP s'))
            for name, requests, own, http, own_runs in rows:
                print('  %-22s %8d %8.5f %-15s %7.4f' % (
                    name, requests, own, spread(own_runs, 5), http))
            ratios = paired_ratios(rows[1][4], rows[0][4]) or [0]
            print('  ratio %d held / %d held: %.2f (min-max of paired '
                  'runs %s)' % (args.idle, small, rows[1][2] / rows[0][2],
                                spread(ratios, 2)))
        with temporary_database(url) as db:
            report('4. read every field of %d documents' % args.read,
                   read_workload(db, meter, args.read, args.runs), 'plain')
        with temporary_database(url) as db:
            rows = memory_workload(db, args.memory)
            print('\n5. memory held by %d documents (tracemalloc)'
                  % args.memory)
            for name, current, peak in rows:
                print('  %-26s %9.1f MB held %9.1f MB peak' % (
                    name, current / 1e6, peak / 1e6))
            print('  ratio session / plain: %.2f held, %.2f peak' % (
                rows[0][1] / rows[1][1], rows[0][2] / rows[1][2]))
        with temporary_database(url) as db:
            report('6. read %d documents by id' % args.edit,
                   read_by_id_workload(db, meter, args.edit, args.runs),
                   'floor')
        with temporary_database(url) as db:
            rows = edit_by_id_workload(db, meter, args.edit, args.runs)
            report('7. edit %d documents read by id' % args.edit, rows,
                   'floor')
            report_cpu(rows, 'floor')
        with temporary_database(url) as db:
            report('8. view with include_docs over %d documents, 3/4 of '
                   'them held' % args.edit,
                   held_view_workload(db, meter, args.edit, args.runs),
                   'floor')
    finally:
        meter.close()


if __name__ == '__main__':
    main()
