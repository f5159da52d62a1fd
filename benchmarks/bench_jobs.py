"""Benchmark: big jobs with `session`, against hand-written python-couchdb.

Run with ``make bench`` (after ``bench_session.py``; ``BENCH_JOBS_ARGS=
'--migrate 20000'`` passes options on). It uses the local PouchDB Server,
or the server named by ``COUCHDB_URL``, or ``--url``. Each run of a job is
a process of its own, so that its peak memory (``ru_maxrss``) is its own:

1. migration: N documents of the benchmark's shape, one field changed in
   each; the session's ``iterdocs`` (batches of 5,000) against the floor,
   python-couchdb's ``iterview`` with ``include_docs`` and one
   ``Database.update`` every 5,000 documents. Wall time and peak RSS, with
   their spread over the runs and the ratio session / floor.
2. creates: 100,000 (N) new documents in one ``flush()``, against 20,000
   (N / 5): the peak RSS of each, and the memory the documents themselves
   take (RSS after creating them, before the flush, less the RSS before);
   the flush of the many may take no more than 1.2 times the peak of the
   few plus the memory of the documents added.
3. resume: the migration with a checkpoint, killed (SIGKILL) at a random
   point and run again to its end: every document must be changed exactly
   once (its revision number grows by one), and the two runs together take
   no longer than 1.1 times an uninterrupted run plus one batch.
"""

import argparse
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import time
from urllib.parse import quote

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import couchdb  # noqa: E402
import session  # noqa: E402
from bench_session import fill, make_doc, on_server, spread  # noqa: E402
from tools.localserver import temporary_database  # noqa: E402

BATCH = 5000


# -- The jobs, each run in a process of its own -------------------------------

def peak_rss():
    """This process's peak resident memory, in bytes (Linux: kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss():
    """This process's resident memory now, in bytes."""
    with open('/proc/self/statm') as statm:
        return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def migrate_by_session(db, mark, checkpoint=None):
    S = session.Session(db)
    for doc in S.iterdocs(batch=BATCH, checkpoint=checkpoint):
        doc['address']['city'] = 'city %s' % mark


def migrate_by_floor(db, mark):
    docs = []
    for row in db.iterview('_all_docs', BATCH, include_docs=True):
        doc = row.doc
        doc['address']['city'] = 'city %s' % mark
        docs.append(doc)
        if len(docs) == BATCH:
            db.update(docs)
            docs = []
    if docs:
        db.update(docs)


def create_many(db, count):
    S = session.Session(db)
    before = rss()
    for n in range(count):
        S.create(make_doc(n))
    held = rss() - before
    S.flush()
    return {'documents': held}


def child(args):
    """Run one job and print what it measured as JSON."""
    db = couchdb.Database(args.child_db)
    started = time.perf_counter()
    extra = {}
    if args.child == 'session':
        migrate_by_session(db, args.mark, args.checkpoint)
    elif args.child == 'floor':
        migrate_by_floor(db, args.mark)
    else:
        extra = create_many(db, args.count)
    print(json.dumps(dict(extra, seconds=time.perf_counter() - started,
                          peak=peak_rss())))


def url_of(db):
    """The URL of ``db``, with the credentials python-couchdb took out."""
    url, credentials = db.resource.url, db.resource.credentials
    if not credentials:
        return url
    scheme, rest = url.split('://', 1)
    return '%s://%s:%s@%s' % (scheme, quote(credentials[0], safe=''),
                              quote(credentials[1], safe=''), rest)


def spawn(db, job, mark='', count=0, checkpoint=None):
    """Start a job's process; its `subprocess.Popen`."""
    command = [sys.executable, os.path.abspath(__file__), '--child', job,
               '--child-db', url_of(db), '--mark', str(mark),
               '--count', str(count)]
    if checkpoint:
        command += ['--checkpoint', checkpoint]
    return subprocess.Popen(command, stdout=subprocess.PIPE)


def run_job(db, job, **options):
    """Run a job to its end; what it measured."""
    process = spawn(db, job, **options)
    out, _ = process.communicate()
    if process.returncode:
        raise RuntimeError('the %s job failed (exit status %s)'
                           % (job, process.returncode))
    return json.loads(out)


def generations(db):
    return dict((row.id, int(row.value['rev'].split('-')[0]))
                for row in db.view('_all_docs'))


# -- Workloads -----------------------------------------------------------------

def migration_workload(db, size, runs):
    fill(db, size)
    times = {'session': [], 'floor': []}
    peaks = {'session': [], 'floor': []}
    for run in range(runs):
        for way in ('session', 'floor'):
            measured = run_job(db, way, mark='%s %d' % (way, run))
            times[way].append(measured['seconds'])
            peaks[way].append(measured['peak'])
            db.compact()
    return times, peaks


def creates_workload(url, size):
    measured = {}
    for count in (size // 5, size):
        with temporary_database(url) as db:
            measured[count] = run_job(db, 'create', count=count)
    return measured


def resume_workload(db, size):
    fill(db, size)
    before = generations(db)
    whole = run_job(db, 'session', mark='whole', checkpoint='whole')
    started = time.perf_counter()
    process = spawn(db, 'session', mark='resumed', checkpoint='resumed')
    time.sleep(random.uniform(0.2, 0.8) * whole['seconds'])
    process.send_signal(signal.SIGKILL)
    process.communicate()
    killed_at = db.get('_local/session-checkpoint-resumed') or {}
    run_job(db, 'session', mark='resumed', checkpoint='resumed')
    total = time.perf_counter() - started
    after = generations(db)
    once = all(after[id] == before[id] + 2 for id in before)
    return whole['seconds'], total, killed_at.get('done', 0), once


# -- Report -------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--url', help='server URL (default: COUCHDB_URL or '
                        'a local PouchDB Server)')
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument('--migrate', type=int, default=100000, metavar='N')
    parser.add_argument('--create', type=int, default=100000, metavar='N')
    parser.add_argument('--smoke', action='store_true',
                        help='tiny sizes, one run: checks the script works')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    parser.add_argument('--child-db', help=argparse.SUPPRESS)
    parser.add_argument('--mark', default='', help=argparse.SUPPRESS)
    parser.add_argument('--count', type=int, default=0,
                        help=argparse.SUPPRESS)
    parser.add_argument('--checkpoint', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    if args.smoke:
        args.runs, args.migrate, args.create = 1, 30, 50
    on_server(run, args)


def run(args, url):
    print('session big jobs benchmark, %d run(s) each, every job in a '
          'process of its own' % args.runs)
    with temporary_database(url) as db:
        times, peaks = migration_workload(db, args.migrate, args.runs)
    print('\n1. migration of %d documents, batches of %d' % (args.migrate,
                                                              BATCH))
    print('  %-8s %9s %-17s %9s %-15s' % ('way', 'median s', 'min-max s',
                                           'peak MB', 'min-max MB'))
    for way in ('session', 'floor'):
        print('  %-8s %9.2f %-17s %9.1f %-15s' % (
            way, statistics.median(times[way]), spread(times[way], 2),
            statistics.median(peaks[way]) / 1e6,
            spread([p / 1e6 for p in peaks[way]], 1)))
    print('  ratio session / floor: %.2f time (min-max of paired runs %s), '
          '%.2f peak RSS' % (
              statistics.median(times['session']) /
              statistics.median(times['floor']),
              spread([s / f for s, f in zip(times['session'],
                                            times['floor'])], 2),
              statistics.median(peaks['session']) /
              statistics.median(peaks['floor'])))
    measured = creates_workload(url, args.create)
    few, many = sorted(measured)
    allowed = 1.2 * (measured[few]['peak'] + measured[many]['documents'] -
                     measured[few]['documents'])
    print('\n2. creates in one flush()')
    for count in (few, many):
        print('  %7d documents: peak %7.1f MB, the documents %7.1f MB, '
              '%.2f s' % (count, measured[count]['peak'] / 1e6,
                          measured[count]['documents'] / 1e6,
                          measured[count]['seconds']))
    print('  peak of %d / (peak of %d + the documents added): %.2f '
          '(at most 1.2: %.1f MB allowed)' % (
              many, few, 1.2 * measured[many]['peak'] / allowed,
              allowed / 1e6))
    with temporary_database(url) as db:
        whole, total, at, once = resume_workload(db, args.migrate)
    print('\n3. resume: the migration killed after %d documents were '
          'recorded, then run again' % at)
    batch = whole * min(1.0, BATCH / float(args.migrate))
    print('  uninterrupted %.2f s; killed and resumed %.2f s in all; '
          'ratio %.2f to uninterrupted plus one batch (%.2f s)' % (
              whole, total, total / (whole + batch), batch))
    print('  every document changed exactly once: %s' % once)


if __name__ == '__main__':
    main()
