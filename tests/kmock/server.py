"""kmock (PyPI, MIT), an independent in-memory Kubernetes API emulator, on a free port of 127.0.0.1,
for tests/kube_backend.rs: no real API server can be installed on the machines the tests run on.

Usage: server.py [PORT] (default: a free port). Prints `URL http://127.0.0.1:PORT` once it
serves, then runs until killed or until its standard input closes (so it dies with its test).

kmock stores objects and serves create, get, list, watch, patch and delete, but it has no kubelet
(a pod gets a status only when a test PATCHes `/api/v1/namespaces/NS/pods/NAME/status`, which it
merges into the stored pod), it ignores label and field selectors, and a new watch starts with an
ADDED event for every stored object whatever resourceVersion it asks from. Additions, for tests:
- `GET /api/v1/namespaces/NS/pods/NAME/log?container=C&tailLines=N`: the text a test stored with
  `PUT /_test/logs/NS/NAME/C` (kmock itself would answer with the pod's JSON); 404 when none.
- `GET /_test/requests`: the method, path, query and Authorization header of every request served
  so far, as JSON, so a test can check what a client sent (the selectors kmock itself ignores).
"""

import asyncio
import datetime
import itertools
import re
import sys
import uuid

import kmock

PORT = int(sys.argv[1]) if len(sys.argv) > 1 else None
SEEN: list[dict[str, str]] = []


VERSIONS = itertools.count(1)


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator that records every request it serves and stamps what it stores as an API
    server does: a new `resourceVersion` on each create and update (kube-rs' watcher re-lists on
    any watch event without one), and `namespace`, `uid` and `creationTimestamp` on create."""

    async def _handle(self, request: kmock.Request):
        SEEN.append({'method': str(request.method.value), 'path': request.url.path,
                     'query': request.url.raw_query_string,
                     'authorization': request.headers.get('Authorization', '')})
        if isinstance(request.data, dict) and request.action in (kmock.action.CREATE, kmock.action.UPDATE):
            meta = request.data.setdefault('metadata', {})
            meta['resourceVersion'] = str(next(VERSIONS))
            if request.action == kmock.action.CREATE:
                if request.namespace:
                    meta.setdefault('namespace', request.namespace)
                meta.setdefault('uid', str(uuid.uuid4()))
                meta.setdefault('creationTimestamp',
                                datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ'))
        return await super()._handle(request)


LOG = re.compile(r'^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$')
SET_LOG = re.compile(r'^/_test/logs/([^/]+)/([^/]+)/([^/]+)$')


async def main() -> None:
    logs: dict[tuple[str, str, str], str] = {}

    async with Emulator() as k, kmock.Server(k, port=PORT) as server:
        k.resources.load_bundled()

        def serve_log(request: kmock.Request) -> bytes:
            ns, pod = LOG.match(request.url.path).groups()
            container = request.params.get('container', '')
            text = logs.get((ns, pod, container))
            if text is None:
                raise kmock.KubernetesNotFoundError(message=f'no log for container "{container}" of pod "{pod}"')
            tail = request.params.get('tailLines')
            if tail is not None:
                lines = text.splitlines(keepends=True)
                text = ''.join(lines[-int(tail):]) if int(tail) > 0 else ''
            return text.encode()

        def store_log(request: kmock.Request) -> dict:
            logs[SET_LOG.match(request.url.path).groups()] = request.text
            return {}

        k['get', LOG] << serve_log
        k['put', SET_LOG] << store_log
        k['get /_test/requests'] << (lambda: list(SEEN))

        print('URL', server.url, flush=True)
        # Ends when the test closes our stdin (or dies), or by a signal.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


asyncio.run(main())
