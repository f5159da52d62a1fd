"""A CouchDB-compatible server and scratch databases for tests and demos.

By default :func:`running_server` starts PouchDB Server (the npm package
``pouchdb-server``, installed into ``node_modules/`` by ``npm ci`` or
``make install``) with its databases in memory, on a free port of the
loopback interface, and stops it again afterwards.  When the environment
variable ``COUCHDB_URL`` is set (for example
``http://admin:admin@127.0.0.1:5984/``), that server is used instead and
nothing is started.

:func:`temporary_database` creates a randomly named database on a server and
deletes it again afterwards.

Run as a script (``python tools/localserver.py``), the module starts a server,
prints its URL and keeps it running until interrupted with Ctrl-C.

Only the standard library and python-couchdb are used.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid

import couchdb

__all__ = [
    'COUCHDB_URL_VARIABLE',
    'REPO_ROOT',
    'SERVER_EXECUTABLE',
    'ServerStartError',
    'find_free_port',
    'running_server',
    'temporary_database',
]

#: The environment variable naming an existing server to use instead.
COUCHDB_URL_VARIABLE = 'COUCHDB_URL'

#: The repository's root directory: the parent of ``tools/``.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The PouchDB Server launcher that ``npm ci`` installs.
SERVER_EXECUTABLE = os.path.join(
    REPO_ROOT, 'node_modules', '.bin', 'pouchdb-server')

#: How long to wait for a started server to answer, in seconds.
START_TIMEOUT = 30.0

#: How long to wait for a server to exit after SIGTERM, in seconds.
STOP_TIMEOUT = 10.0

#: How many times to try a fresh port when a server exits while starting
#: (for instance because another process took the port in the meantime).
START_ATTEMPTS = 3

#: How many lines of the server's log an error message quotes.
LOG_TAIL_LINES = 30

#: The prefix of the names that :func:`temporary_database` makes.
DATABASE_PREFIX = 'test_session_'


class ServerStartError(RuntimeError):
    """The local server could not be started or did not answer in time."""


def find_free_port(host='127.0.0.1'):
    """Return a TCP port on *host* that is free at the moment of the call.

    The port is found by binding a socket to port 0 and letting the operating
    system choose; the socket is closed again before returning, so another
    process could in principle take the port before it is used.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _normalise_url(url):
    """Return *url* with exactly one trailing slash."""
    return url.rstrip('/') + '/'


def _log_tail(path, lines=LOG_TAIL_LINES):
    """Return the last *lines* lines of the file at *path*, or a note."""
    try:
        with open(path, encoding='utf-8', errors='replace') as log:
            tail = log.read().splitlines()[-lines:]
    except OSError as error:
        return '(no log: %s)' % error
    return '\n'.join(tail) if tail else '(the log is empty)'


#: Fetches URLs directly, ignoring any proxy named in the environment.
_DIRECT_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _answers(url, timeout=1.0):
    """Tell whether a GET of *url* succeeds with a 2xx status."""
    try:
        with _DIRECT_OPENER.open(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _child_setup(parent_pid):
    """Run in the child between fork and exec.

    Gives the server default reactions to SIGINT, SIGTERM and SIGHUP (an
    ignored signal would otherwise be inherited), and on Linux asks the
    kernel to send it SIGTERM when its parent dies, so that the server does
    not outlive a test run that was killed outright (for example with
    SIGKILL), where no clean-up code gets to run.
    """
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    if not sys.platform.startswith('linux'):
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except Exception:  # pragma: no cover - best effort only
        return
    if os.getppid() != parent_pid:
        # The parent died before prctl took effect.
        os._exit(1)


def _start_process(port, workdir, log_path):
    """Start PouchDB Server on 127.0.0.1:*port* in *workdir*.

    Returns the :class:`subprocess.Popen` object.  The server runs in a
    session (and so a process group) of its own, with its standard output
    and error going to *log_path*.
    """
    command = [
        SERVER_EXECUTABLE,
        '--in-memory',
        '--host', '127.0.0.1',
        '--port', str(port),
        '--config', os.path.join(workdir, 'config.json'),
        '--no-color',
    ]
    parent_pid = os.getpid()
    with open(log_path, 'ab') as log:
        return subprocess.Popen(
            command,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: _child_setup(parent_pid),
        )


def _stop_process(process):
    """Stop *process* and its process group: SIGTERM, then SIGKILL.

    The group is sent SIGTERM; if the server has not exited within
    :data:`STOP_TIMEOUT` seconds, the group is sent SIGKILL.  Once the server
    has been reaped its group id is never signalled again, so that no
    unrelated process that later gets the same id can be hit.
    """
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=STOP_TIMEOUT)
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


#: Signals that, while a server runs, interrupt the caller like Ctrl-C does.
INTERRUPTING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

#: Signals ignored while a server is being stopped, so that the clean-up
#: runs to its end (it takes a second or so, STOP_TIMEOUT at most).
SHIELDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_interrupt(signum, frame):
    """Signal handler: raise KeyboardInterrupt, as Ctrl-C does."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _signal_guard():
    """Make signals unwind the block, and shield the clean-up after it.

    Python's default reaction to SIGTERM and SIGHUP is to die at once
    without running ``finally`` blocks, which would leave the server
    running.  Within the block those signals (when no handler is installed
    for them) raise KeyboardInterrupt instead, so pytest or any other caller
    unwinds and stops the server.  Yields a function that the caller's
    clean-up calls first: from then on SIGINT, SIGTERM and SIGHUP are
    ignored, so that a second signal (``timeout`` and terminals send them to
    a whole process group, users press Ctrl-C twice) cannot cut the clean-up
    short.  On leaving the block all handlers are restored.

    Does nothing outside the main thread, where Python cannot set handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    saved = {signum: signal.getsignal(signum) for signum in SHIELDED_SIGNALS}

    def shield():
        for signum in SHIELDED_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)

    try:
        for signum in INTERRUPTING_SIGNALS:
            if saved[signum] is signal.SIG_DFL:
                signal.signal(signum, _raise_interrupt)
        yield shield
    finally:
        for signum, handler in saved.items():
            if handler is not None:
                signal.signal(signum, handler)


def _wait_until_ready(process, url, log_path, timeout=None):
    """Poll *url* until it answers; return False if *process* exits first.

    Raises :class:`ServerStartError` when the server neither answers nor
    exits within *timeout* seconds (default: :data:`START_TIMEOUT`).
    """
    if timeout is None:
        timeout = START_TIMEOUT
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if _answers(url):
            return True
        time.sleep(0.1)
    raise ServerStartError(
        'PouchDB Server did not answer at %s within %.0f s.\n'
        'Last lines of its log:\n%s'
        % (url, timeout, _log_tail(log_path)))


@contextlib.contextmanager
def _local_server():
    """Start PouchDB Server in memory; yield its URL; stop it afterwards."""
    if not os.path.exists(SERVER_EXECUTABLE):
        raise ServerStartError(
            'PouchDB Server is not installed: %s is missing.\n'
            'Run `make test` (or `make install`, or `npm ci` in %s) to '
            'install it, or set %s to the URL of a running CouchDB server.'
            % (SERVER_EXECUTABLE, REPO_ROOT, COUCHDB_URL_VARIABLE))
    with _signal_guard() as shield:
        workdir = tempfile.mkdtemp(prefix='session-pouchdb-server-')
        log_path = os.path.join(workdir, 'server.log')
        process = None
        try:
            for attempt in range(1, START_ATTEMPTS + 1):
                port = find_free_port()
                url = 'http://127.0.0.1:%d/' % port
                process = _start_process(port, workdir, log_path)
                if _wait_until_ready(process, url, log_path):
                    break
                status = process.wait()
                process = None
                if attempt == START_ATTEMPTS:
                    raise ServerStartError(
                        'PouchDB Server exited with status %s while '
                        'starting (%d attempts).\n'
                        'If node_modules is incomplete, run `make test` '
                        '(or `npm ci`).\n'
                        'Last lines of its log:\n%s'
                        % (status, attempt, _log_tail(log_path)))
            yield url
        finally:
            shield()
            if process is not None:
                _stop_process(process)
            shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def running_server():
    """Provide a CouchDB-compatible server; yield its base URL.

    If the environment variable ``COUCHDB_URL`` is set and not empty, its
    value is yielded with a trailing slash and nothing is started.

    Otherwise PouchDB Server is started from ``node_modules/.bin`` in the
    repository, in memory, on a free port of 127.0.0.1, inside a temporary
    working directory (which receives its ``config.json`` and log), and
    ``'http://127.0.0.1:PORT/'`` is yielded once ``GET /`` answers.  On
    leaving the block the server's process group is terminated (and killed
    if it does not exit in time) and the working directory is removed, also
    when the block is left by an exception, KeyboardInterrupt, SIGTERM or
    SIGHUP (which are turned into KeyboardInterrupt while the server runs,
    in the main thread).  On Linux the server is also sent SIGTERM by the
    kernel if the starting thread dies without cleaning up (e.g. SIGKILL);
    only the small temporary directory is left behind then.

    Raises :class:`ServerStartError` if the server is not installed, exits
    while starting or does not answer within 30 seconds; the message quotes
    the end of the server's log.
    """
    url = os.environ.get(COUCHDB_URL_VARIABLE, '').strip()
    if url:
        yield _normalise_url(url)
        return
    with _local_server() as url:
        yield url


@contextlib.contextmanager
def temporary_database(url, prefix=DATABASE_PREFIX):
    """Create a randomly named database; yield it; delete it afterwards.

    *url* is the server's base URL (or a :class:`couchdb.Server`).  The name
    is *prefix* followed by 32 random hexadecimal digits, which is a valid
    CouchDB database name as long as *prefix* is one.  Yields the
    :class:`couchdb.Database`; the database is deleted on leaving the block,
    unless it is already gone.
    """
    server = url if isinstance(url, couchdb.Server) else couchdb.Server(url)
    name = prefix + uuid.uuid4().hex
    database = server.create(name)
    try:
        yield database
    finally:
        try:
            del server[name]
        except couchdb.ResourceNotFound:
            pass


def main():
    """Start a server, print its URL and keep it running until Ctrl-C."""
    try:
        with running_server() as url:
            print(url, flush=True)
            if os.environ.get(COUCHDB_URL_VARIABLE, '').strip():
                return 0
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    except ServerStartError as error:
        print(error, file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
