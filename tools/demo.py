"""A worked example of `session`, run by ``make demo``.

It starts the local PouchDB Server (or uses ``COUCHDB_URL``), fills a scratch
database the way an application would, then plays one web request through a
`session.Session`: reads, nested changes, a creation and a deletion, written
by one ``flush()``. Every HTTP request python-couchdb makes is printed as it
goes over the wire.
"""

import json
import os
import sys
from urllib.parse import unquote, urlsplit

import couchdb
import couchdb.http

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import session  # noqa: E402
from tools.localserver import running_server, temporary_database  # noqa: E402


def show_requests(db_path):
    """Print each request python-couchdb sends, with the body of a bulk
    write."""
    original = couchdb.http.Session.request

    def request(self, method, url, body=None, *args, **kwargs):
        path = unquote(urlsplit(url).path)[len(db_path):] or '/'
        query = urlsplit(url).query
        print('    -> %s %s%s' % (method, path, '?' + unquote(query)
                                  if query else ''))
        if path.endswith('_bulk_docs'):
            docs = body['docs'] if isinstance(body, dict) else \
                json.loads(body)['docs']
            for doc in docs:
                print('         %s' % json.dumps(doc, sort_keys=True))
        return original(self, method, url, body, *args, **kwargs)

    couchdb.http.Session.request = request
    return lambda: setattr(couchdb.http.Session, 'request', original)


def main():
    with running_server() as url, temporary_database(url) as db:
        for id, doc in [
                ('ann', {'type': 'person', 'name': 'Ann',
                         'address': {'city': 'Leeds'}, 'tags': ['staff']}),
                ('bob', {'type': 'person', 'name': 'Bob', 'tags': []}),
                ('old-note', {'type': 'note', 'text': 'obsolete'})]:
            db[id] = doc
        stop_showing = show_requests(urlsplit(db.resource.url).path)

        print('One web request, one session:')
        print('  S = session.Session(db)')
        S = session.Session(db)
        print("  ann = S['ann']")
        ann = S['ann']
        print("  S['ann'] is ann  ->", S['ann'] is ann, '(no second GET)')
        print("  ann['address']['city'] = 'York'")
        ann['address']['city'] = 'York'
        print("  ann['tags'].append('admin')")
        ann['tags'].append('admin')
        print("  S['bob']['name'] = 'Bob'   (the same value: bob will not be "
              "sent)")
        S['bob']['name'] = 'Bob'
        print("  note_id = S.create({'type': 'note', 'text': 'hello'})")
        note_id = S.create({'type': 'note', 'text': 'hello'})
        print("  del S['old-note']   (never fetched: its _rev is looked up "
              "at flush)")
        del S['old-note']
        print('  S.diff(ann):')
        for op in S.diff(ann):
            print('    ', op)
        print('  new: %d, dirty: %d, deleted: %d' % (
            len(S.new), len(S.dirty), len(S.deleted)))
        print('  S.flush():')
        for ok, id, rev in S.flush():
            print('    %-34s %s %s' % (id, 'ok' if ok else 'FAILED', rev))

        stop_showing()
        print('\nWhat the server holds now (read with plain python-couchdb):')
        for id in ('ann', 'bob', note_id, 'old-note'):
            doc = db.get(id)
            if doc is None:
                print('  %s: deleted' % id)
            else:
                doc = dict(doc)
                rev = doc.pop('_rev')
                print('  %s (%s...): %s' % (id, rev[:6],
                                            json.dumps(doc, sort_keys=True)))


if __name__ == '__main__':
    main()
