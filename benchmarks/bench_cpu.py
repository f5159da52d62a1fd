"""Benchmark: the client CPU of the session, counted in instructions.

Run with ``make bench`` (last; ``BENCH_CPU_ARGS='--size 500'`` passes
options on). It uses the local PouchDB Server, or the server named by
``COUCHDB_URL``, or ``--url``. ``time.process_time`` on a shared machine
moves by a third from run to run, which hides a change of a few percent;
valgrind's callgrind counts the instructions the client runs instead, the
same from run to run (the server is another process, and waiting costs no
instructions). Each way of workloads 1, 4 and 7 of ``bench_session.py``
(edit N documents read through ``_all_docs`` with ``include_docs``, read
every field of N documents, edit N documents read by id) runs in a process
of its own under callgrind, once with ``--runs`` repetitions after a
warm-up and once with the warm-up only: the difference over the
repetitions is one run's instructions, start-up and imports left out.
Instructions are not seconds (a cache miss costs more than an add), so this
says which way does more work, and by how much, not the time: the targets
of client CPU (session / floor) and of reads through the proxies (session /
plain dicts) are checked on it too. ``--phases`` also counts workload 7 in
three parts (the read, the edits, the write), to show where the session
spends more than the floor.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import couchdb  # noqa: E402
import session  # noqa: E402
from bench_session import (edit_by_floor, edit_by_id_by_floor,  # noqa: E402
                           edit_by_id_by_session, edit_by_session, fill,
                           on_server, walk)
from tools.localserver import temporary_database  # noqa: E402


# -- The ways, each run in a process of its own -------------------------------

# The documents workload 4 reads, read once per process (in its warm-up).
HELD = {}


def read_by_session(db, ids, mark):
    if 'session' not in HELD:
        S = session.Session(db)
        HELD['session'] = S, S.get_many(ids)
    walk(HELD['session'][1])


def read_plain(db, ids, mark):
    if 'plain' not in HELD:
        HELD['plain'] = [row.doc for row in db.view(
            '_all_docs', keys=ids, include_docs=True)]
    walk(HELD['plain'])


# (title, the session's way, the baseline's name and way)
WORKLOADS = [
    ('1. edit %d documents', edit_by_session, 'floor', edit_by_floor),
    ('4. read every field of %d documents', read_by_session, 'plain',
     read_plain),
    ('7. edit %d documents read by id', edit_by_id_by_session, 'floor',
     edit_by_id_by_floor),
]
WAYS = dict((way.__name__, way) for _, mine, _, base in WORKLOADS
            for way in (mine, base))


def child(args):
    """A warm-up run of one way, then ``args.runs`` more, each writing a
    mark no run wrote before (a session does not write what it did not
    change)."""
    db = couchdb.Database(args.child_db)
    ids = sorted(id for id in db if not id.startswith('_design/'))
    way = WAYS[args.child]
    upto = {} if args.upto is None else {'upto': args.upto}
    for mark in range(args.runs + 1):
        way(db, ids, args.mark + mark, **upto)


# -- Counting -----------------------------------------------------------------

def instructions(args, db, way, runs, upto=None):
    """The instructions a process running ``way`` ``runs`` times after its
    warm-up runs in all (None with ``--smoke``: run, not counted); with
    ``upto``, each run stops there (see `edit_by_id_by_session`)."""
    command = [sys.executable, os.path.abspath(__file__), '--child', way,
               '--child-db', db.resource.url, '--runs', str(runs),
               '--mark', str(args.marks)] + \
        ([] if upto is None else ['--upto', upto])
    args.marks += runs + 1
    if args.smoke:
        subprocess.run(command, check=True)
        return None
    done = subprocess.run(
        ['valgrind', '--tool=callgrind', '--callgrind-out-file=/dev/null'] +
        command, check=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, universal_newlines=True)
    found = re.search(r'Collected : (\d+)', done.stderr)
    if found is None:
        raise RuntimeError('callgrind gave no count:\n' + done.stderr[-2000:])
    return int(found.group(1))


def per_run(args, db, way, upto=None):
    """The instructions of one run of ``way``."""
    whole = instructions(args, db, way, args.runs, upto)
    alone = instructions(args, db, way, 0, upto)
    if whole is None:
        return None
    return (whole - alone) / float(args.runs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--url', help='server URL (default: COUCHDB_URL or '
                        'a local PouchDB Server)')
    parser.add_argument('--runs', type=int, default=2)
    parser.add_argument('--size', type=int, default=2000, metavar='N')
    parser.add_argument('--only', metavar='1,4,7',
                        help='count only these workloads')
    parser.add_argument('--phases', action='store_true',
                        help='also count workload 7 by phase: the read, '
                        'the edits, the write')
    parser.add_argument('--smoke', action='store_true',
                        help='tiny size, one run, no valgrind: checks the '
                        'script works')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    parser.add_argument('--child-db', help=argparse.SUPPRESS)
    parser.add_argument('--mark', type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument('--upto', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.marks = 0
    if args.child:
        return child(args)
    if args.smoke:
        args.runs, args.size = 1, 20
    elif shutil.which('valgrind') is None:
        print('bench_cpu.py: valgrind is not installed (Debian: apt install '
              'valgrind); instructions not counted')
        return
    on_server(run, args)


def run(args, url):
    print('session client CPU benchmark: instructions per run (callgrind), '
          '%d run(s) after a warm-up' % args.runs)
    with temporary_database(url) as db:
        fill(db, args.size)
        for title, mine, name, base in WORKLOADS:
            if args.only and title.split('.')[0] not in \
                    args.only.split(','):
                continue
            counts = [per_run(args, db, way.__name__) for way in (mine,
                                                                  base)]
            print('\n' + title % args.size)
            if counts[0] is None:
                print('  run, not counted (--smoke)')
                continue
            print('  session %8.1f M instructions' % (counts[0] / 1e6))
            print('  %-7s %8.1f M instructions' % (name, counts[1] / 1e6))
            print('  client CPU session / %s: %.2f (instructions)'
                  % (name, counts[0] / counts[1]))
        if args.phases:
            phases(args, db)


def phases(args, db):
    """Workload 7 by phase: where the session's instructions beyond the
    floor's go. Each phase is counted as the runs that stop after it less
    those that stop before it."""
    print('\n7. by phase: session and floor, and what the session spends '
          'more per document')
    ends = {}
    for way in (edit_by_id_by_session, edit_by_id_by_floor):
        ends[way] = [per_run(args, db, way.__name__, upto)
                     for upto in ('read', 'edit', 'write')]
    if None in ends[edit_by_id_by_session]:
        print('  run, not counted (--smoke)')
        return
    last = {way: 0 for way in ends}
    for n, phase in enumerate(('read', 'edit', 'write')):
        mine, floor = [ends[way][n] - last[way] for way in
                       (edit_by_id_by_session, edit_by_id_by_floor)]
        last = {way: ends[way][n] for way in ends}
        print('  %-5s  session %7.1f M  floor %7.1f M  %+6.1f k per document'
              % (phase, mine / 1e6, floor / 1e6,
                 (mine - floor) / args.size / 1e3))


if __name__ == '__main__':
    main()
