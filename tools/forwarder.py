"""A TCP forwarder that breaks HTTP connections on purpose, for tests.

:class:`Forwarder` listens on a free port of 127.0.0.1 and forwards each
client connection to a target server, one HTTP/1.1 request at a time, so
keep-alive connections work (python-couchdb pools them).  It reads just
enough HTTP to find where each request and response ends (start line,
headers, ``Content-Length`` or chunked body); the bytes pass unchanged.

Every request gets one *action*:

``'pass'``          forward it and send the response back;
``'cut_before'``    read it, then close the client connection (FIN) without
                    forwarding anything: the server never sees it;
``'reset'``         the same, closing with a TCP reset (RST);
``'drop_answer'``   forward it, read the server's whole response (the server
                    has applied the request), then close the client
                    connection without sending any of it;
``'stall'``         read it and hold the connection, forwarding nothing,
                    until the client gives up (its timeout);
``'stall_answer'``  forward it, read the whole response, then hold the
                    connection without answering;
``'reply'``         answer it without forwarding it: ``reply(body)`` of the
                    request's body gives ``(status, JSON value)`` to send,
                    or None to leave the request to the other rules (the
                    way to give an answer only some other server gives,
                    such as CouchDB's refusal of a whole ``_bulk_docs``);
``'rewrite'``       forward it, read the whole response, and send instead
                    ``rewrite(status, JSON value)``'s ``(status, JSON
                    value)``, such as `quorum_not_met`.

`Forwarder.mode` is the action of every request that no rule claims, or
``'refuse'``: the listening socket is closed (connecting fails with
ECONNREFUSED) and so is every open connection.  `Forwarder.fail` adds a
rule: an action for the requests that match a predicate, the next N times.

>>> with Forwarder('127.0.0.1', 5984) as fw:                # doctest: +SKIP
...     db = couchdb.Database(fw.url + 'mydb')
...     fw.fail('drop_answer', when=is_bulk_docs, times=1)
...     db.update([{'_id': 'a'}])   # answer lost; python-couchdb re-sends
...     fw.forwarded['POST', '/mydb/_bulk_docs']
2

Only the standard library is used.
"""

import collections
import json
import selectors
import socket
import struct
import threading

__all__ = ['Forwarder', 'is_bulk_docs', 'quorum_not_met']

ACTIONS = ('pass', 'cut_before', 'reset', 'drop_answer', 'stall',
           'stall_answer', 'reply', 'rewrite')


def is_bulk_docs(method, path):
    """A predicate for `Forwarder.fail`: ``POST /db/_bulk_docs``."""
    return method == 'POST' and path.endswith('/_bulk_docs')


def quorum_not_met(status, rows):
    """A `Forwarder.fail` rewrite: a ``_bulk_docs`` answer as a CouchDB
    cluster gives it when the writes reached fewer nodes than the write
    quorum: 202, and ``"accepted": true`` in each row written."""
    if status != 201 or not isinstance(rows, list):
        return status, rows
    return 202, [dict(row, accepted=True) if row.get('ok') else row
                 for row in rows]


def _readable(sock, timeout):
    """Whether ``sock`` has data (or an end) to read within ``timeout``."""
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        return bool(selector.select(timeout))


def _chunked(headers):
    return 'chunked' in headers.get('transfer-encoding', '').lower()


class _Reader(object):
    """Buffered reads of HTTP messages from a socket; EOFError when it
    closes in the middle of one."""

    def __init__(self, sock):
        self.sock, self.buffer = sock, b''

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError('connection closed')
        self.buffer += data

    def line(self):
        """One line, with its CRLF."""
        while b'\n' not in self.buffer:
            self._fill()
        end = self.buffer.index(b'\n') + 1
        line, self.buffer = self.buffer[:end], self.buffer[end:]
        return line

    def head(self):
        """``(raw bytes, start line split, {lowercase name: value})`` of the
        next message, or None if the connection ends before one."""
        if not self.buffer:
            self.buffer = self.sock.recv(65536)
            if not self.buffer:
                return None
        lines = [self.line()]
        while lines[-1].strip():
            lines.append(self.line())
        headers = {}
        for line in lines[1:-1]:
            name, _, value = line.decode('latin-1').partition(':')
            headers[name.strip().lower()] = value.strip()
        return b''.join(lines), lines[0].decode('latin-1').split(), headers

    def exactly(self, count):
        """Yield ``count`` bytes, in pieces as they arrive."""
        while count > 0:
            if not self.buffer:
                self._fill()
            piece, self.buffer = self.buffer[:count], self.buffer[count:]
            count -= len(piece)
            yield piece

    def body(self, headers, unframed_until_eof=False):
        """Yield the raw body of a message with ``headers``, in pieces.  A
        message with neither Content-Length nor chunked encoding has no
        body, or (``unframed_until_eof``, for responses) runs to the end."""
        if _chunked(headers):
            while True:
                line = self.line()
                yield line
                size = int(line.split(b';')[0], 16)
                if size == 0:
                    break
                yield from self.exactly(size + 2)       # data and CRLF
            line = None
            while line != b'\r\n' and line != b'\n':    # trailers
                line = self.line()
                yield line
        elif 'content-length' in headers:
            yield from self.exactly(int(headers['content-length']))
        elif unframed_until_eof:
            while True:
                yield self.buffer
                self.buffer = self.sock.recv(65536)
                if not self.buffer:
                    break


class Forwarder(object):
    """Forwards connections to ``127.0.0.1:PORT`` to ``target_host:
    target_port``, failing on demand.  A context manager: leaving it (or
    `close()`) stops the threads and closes every socket.

    :ivar url: ``'http://127.0.0.1:PORT/'``
    :ivar received: a `collections.Counter` of ``(method, path)`` (without
                    query string) of every request read from a client
    :ivar forwarded: the same, of the requests that reached the server
    :ivar log: ``(method, path, action)`` of every request, in order
    :ivar connections: how many client connections were accepted
    """

    def __init__(self, target_host, target_port):
        self.target = (target_host, target_port)
        self.received = collections.Counter()
        self.forwarded = collections.Counter()
        self.log = []
        self.connections = 0
        self._lock = threading.RLock()
        self._mode, self._rules = 'pass', []
        self._sockets, self._threads = set(), []
        self._stopped, self._port = False, 0
        self._listen()
        self.url = 'http://127.0.0.1:%d/' % self._port
        self._start(self._accept_loop)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @property
    def mode(self):
        """The action of the requests no rule claims, or ``'refuse'``.
        Setting it cancels every rule; ``'refuse'`` closes the listening
        socket and all connections, any other mode listens again (on the
        same port)."""
        return self._mode

    @mode.setter
    def mode(self, mode):
        if mode not in ACTIONS + ('refuse',):
            raise ValueError('unknown mode %r' % (mode,))
        with self._lock:
            self._mode, self._rules = mode, []
            if mode == 'refuse':
                self._close(self._listener)
                self._listener = None
                self._close_connections()
            elif self._listener is None and not self._stopped:
                self._listen()

    def fail(self, action, when=None, times=None, reply=None, rewrite=None):
        """Give ``action`` to the requests for which ``when(method, path)``
        is true (every request if ``when`` is None), to the next ``times``
        of them (all if None).  The first rule, in the order they were
        added, that matches a request claims it.  ``reply`` and ``rewrite``
        are the functions of the actions of those names.  Returns the
        forwarder."""
        if action not in ACTIONS:
            raise ValueError('unknown action %r' % (action,))
        if (action == 'reply') != (reply is not None) or \
                (action == 'rewrite') != (rewrite is not None):
            raise ValueError('reply= goes with the action reply, rewrite= '
                             'with rewrite')
        with self._lock:
            self._rules.append([action, when, times, reply or rewrite])
        return self

    @property
    def pending_rules(self):
        """How many rules are not used up yet."""
        with self._lock:
            return len(self._rules)

    def close(self):
        """Stop listening, close every connection, join the threads."""
        with self._lock:
            self._stopped = True
            self._close(self._listener)
            self._listener = None
            self._close_connections()
        for thread in self._threads:
            thread.join(5)

    # Internals.

    def _start(self, target, *args):
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _listen(self):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(('127.0.0.1', self._port))
        listener.listen(64)
        listener.setblocking(False)
        self._port = listener.getsockname()[1]
        self._listener = listener

    def _track(self, sock):
        with self._lock:
            self._sockets.add(sock)
        return sock

    def _close(self, sock, reset=False):
        """Close ``sock`` (None is fine): with RST if ``reset``; else with a
        shutdown first, which wakes a thread blocked reading it."""
        if sock is None:
            return
        try:
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                struct.pack('ii', 1, 0))
            else:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        with self._lock:
            self._sockets.discard(sock)

    def _close_connections(self):
        with self._lock:
            for sock in list(self._sockets):
                self._close(sock)

    def _accept_loop(self):
        while not self._stopped:
            listener = self._listener
            if listener is None:
                threading.Event().wait(0.02)
                continue
            try:
                if not _readable(listener, 0.05):
                    continue
                with self._lock:
                    if listener is not self._listener:
                        continue
                    client = self._track(listener.accept()[0])
                    client.setblocking(True)
                    self.connections += 1
            except (OSError, ValueError):       # closed in the meantime
                continue
            self._start(self._serve, client)

    def _action(self, method, path, body):
        """``(action, its function or the reply to send)`` of a request."""
        with self._lock:
            for rule in self._rules:
                action, when, times, function = rule
                if when is not None and not when(method, path):
                    continue
                if action == 'reply':
                    function = function(_json_of(body))
                    if function is None:
                        continue
                if times is not None:
                    rule[2] -= 1
                    if rule[2] <= 0:
                        self._rules.remove(rule)
                return action, function
            return ('reset' if self._mode == 'refuse' else self._mode), None

    def _serve(self, client):
        """Relay the requests of one client connection, one at a time."""
        upstream = None
        requests = _Reader(client)
        try:
            while True:
                head = requests.head()
                if head is None:
                    break
                raw, (method, target, _), headers = head
                body = b''.join(requests.body(headers))
                request = raw + body
                path = target.split('?')[0]
                if _chunked(headers):
                    body = _unchunk(body)
                action, function = self._action(method, path, body)
                with self._lock:
                    self.received[method, path] += 1
                    self.log.append((method, path, action))
                if action == 'reply':
                    client.sendall(_response(*function))
                    continue
                if action in ('cut_before', 'reset'):
                    self._close(client, reset=action == 'reset')
                    break
                if action == 'stall':
                    while client.recv(65536):
                        pass
                    break
                if upstream is not None and _readable(upstream, 0):
                    self._close(upstream)   # the server closed it when idle
                    upstream = None
                if upstream is None:
                    upstream = self._track(
                        socket.create_connection(self.target))
                    responses = _Reader(upstream)
                upstream.sendall(request)
                with self._lock:
                    self.forwarded[method, path] += 1
                if action == 'rewrite':
                    status, answer, keep = self._read_answer(responses)
                    client.sendall(_response(*function(status, answer)))
                    if keep:
                        continue
                    break
                keep = self._relay(responses, method,
                                   client if action == 'pass' else None)
                if action == 'stall_answer':
                    while client.recv(65536):
                        pass
                if action != 'pass' or not keep:
                    break
        except (OSError, EOFError, ValueError):
            pass
        finally:
            self._close(client)
            self._close(upstream)

    def _read_answer(self, responses):
        """``(status, JSON value, whether the connection stays open)`` of
        the next response, read whole."""
        status, headers = self._final_head(responses, None)
        body = b''.join(responses.body(headers))
        if _chunked(headers):
            body = _unchunk(body)
        keep = headers.get('connection', '').lower() != 'close'
        return status, _json_of(body), keep

    def _relay(self, responses, method, client):
        """Read one response (after any 1xx ones), sending it on to
        ``client`` unless that is None; whether both connections may carry
        another request."""
        status, headers = self._final_head(responses, client)
        framed = method == 'HEAD' or status in (204, 304)
        if not framed:
            framed = _chunked(headers) or 'content-length' in headers
            for piece in responses.body(headers, unframed_until_eof=True):
                if client is not None and piece:
                    client.sendall(piece)
        return framed and headers.get('connection', '').lower() != 'close'

    @staticmethod
    def _final_head(responses, client):
        """``(status, headers)`` of the next response that is not a 1xx
        one; every head read is sent on to ``client`` unless it is None."""
        status = 100
        while status < 200:
            raw, status_line, headers = responses.head() or (b'', [], {})
            if len(status_line) < 2:
                raise EOFError('no response')
            status = int(status_line[1])
            if client is not None:
                client.sendall(raw)
        return status, headers


def _unchunk(raw):
    """The data of a chunked body (trailers dropped)."""
    data, rest = b'', raw
    while rest:
        line, _, rest = rest.partition(b'\r\n')
        size = int(line.split(b';')[0] or b'0', 16)
        if size == 0:
            break
        data, rest = data + rest[:size], rest[size + 2:]
    return data


def _json_of(body):
    try:
        return json.loads(body.decode('utf-8')) if body else None
    except ValueError:
        return None


_REASONS = {200: 'OK', 201: 'Created', 202: 'Accepted', 400: 'Bad Request',
            404: 'Object Not Found', 409: 'Conflict',
            412: 'Precondition Failed', 413: 'Request Entity Too Large',
            500: 'Internal Server Error'}


def _response(status, value):
    """The bytes of an HTTP/1.1 response carrying ``value`` as JSON."""
    body = (json.dumps(value) + '\n').encode('utf-8')
    head = ('HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n'
            'Content-Length: %d\r\n\r\n'
            % (status, _REASONS.get(status, 'Status'), len(body)))
    return head.encode('latin-1') + body
