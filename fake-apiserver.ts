// A fake Kubernetes API server for books (and leases), for the tests and for the demo.
//
// It plays the parts of the API server this controller meets: paginated lists with continue
// tokens, watch streams cut at any byte, bookmarks, 410 Gone, streaming lists (sendInitialEvents),
// label selectors, the status subresource with JSON merge patches, metadata.generation, Leases for
// leader election, and Status bodies for every error. The handlers are msw's, served over a real
// loopback TLS server with a throwaway CA, so a client's own https request, its CA check and its
// bearer token are exercised as against a cluster, on Node, Deno and Bun alike.
//
// As a program it is the demo (`npm run demo`, or `npx tsx fake-apiserver.ts`): it starts the fake,
// runs the real controller.ts against it as a child process, and plays the seed's walkthrough.

import { spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import type { IncomingMessage, ServerResponse } from 'node:http';
import * as https from 'node:https';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { isDeepStrictEqual } from 'node:util';
import { getResponse, http, HttpResponse } from 'msw';

export const GROUP = 'example.technosophos.com';
export const GROUP_VERSION = `${GROUP}/v1`;
export const TOKEN = 'test-token';

// A throwaway CA and a certificate for 127.0.0.1 and localhost signed by it (P-256, valid to 2126),
// made with `openssl req -x509 …` and `openssl x509 -req …`. The private key opens nothing else.
export const CA_CERT = `-----BEGIN CERTIFICATE-----
MIIBqzCCAVGgAwIBAgIUUhmmC9ttqpX+Ox46e226tkBJJMEwCgYIKoZIzj0EAwIw
IjEgMB4GA1UEAwwXYm9vay1jb250cm9sbGVyIHRlc3QgQ0EwIBcNMjYxMTI1MTYy
ODA5WhgPMjEyNjExMDExNjI4MDlaMCIxIDAeBgNVBAMMF2Jvb2stY29udHJvbGxl
ciB0ZXN0IENBMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAErO55AkJC44JyeA74
KFzsRiUV229YzjYsk7Ex3MjMxP5PcRL+5ozP3oHCeqhygKVjZT7tq48sgoH2Msgi
Sp8MUqNjMGEwHQYDVR0OBBYEFJ5hwhV1gKUR4Xn6mL7zf8ANShGEMB8GA1UdIwQY
MBaAFJ5hwhV1gKUR4Xn6mL7zf8ANShGEMA8GA1UdEwEB/wQFMAMBAf8wDgYDVR0P
AQH/BAQDAgEGMAoGCCqGSM49BAMCA0gAMEUCID5TtoCs8aNq9oYPALXzjtUV6JWo
6d5p9UBMvDDOGBrBAiEA58woarfhBAyzJZPmWYTrkatHguBKWS8PnQokfpphqvY=
-----END CERTIFICATE-----
`;
export const SERVER_CERT = `-----BEGIN CERTIFICATE-----
MIIBxzCCAW2gAwIBAgIUM4iTx8SU3PhxRQQ7DWeGXC+Q5QcwCgYIKoZIzj0EAwIw
IjEgMB4GA1UEAwwXYm9vay1jb250cm9sbGVyIHRlc3QgQ0EwIBcNMjYxMTI1MTYy
ODA5WhgPMjEyNjExMDExNjI4MDlaMBQxEjAQBgNVBAMMCWxvY2FsaG9zdDBZMBMG
ByqGSM49AgEGCCqGSM49AwEHA0IABFjq6nJ/Zo6/js0Yf7iYo3LPXlsLkvqK3MSp
xFyY9XuI3ITcUb45DE3fBjBr8Hqrt3ycjN8pUpOG/+KyIk7l5ZyjgYwwgYkwGgYD
VR0RBBMwEYcEfwAAAYIJbG9jYWxob3N0MAkGA1UdEwQCMAAwCwYDVR0PBAQDAgeA
MBMGA1UdJQQMMAoGCCsGAQUFBwMBMB0GA1UdDgQWBBRsD0yzYPepJaZq5zrUCdle
FKanPDAfBgNVHSMEGDAWgBSeYcIVdYClEeF5+pi+83/ADUoRhDAKBggqhkjOPQQD
AgNIADBFAiEAterXMmcWgxRKY8kLsYqEgXCK+n8Nya+MeNd4SZCFzUMCIENbMDJu
IU+mBvl9G0NxBDGXFvZnb0iy7elEYJ3QGBvl
-----END CERTIFICATE-----
`;
const SERVER_KEY = `-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgWRUO/hP9kax8OQxA
ESxcUHC7DKnC7kw1eo2yffOec3ahRANCAARY6upyf2aOv47NGH+4mKNyz15bC5L6
itzEqcRcmPV7iNyE3FG+OQxN3wYwa/B6q7d8nIzfKVKThv/isiJO5eWc
-----END PRIVATE KEY-----
`;

/** Writes a kubeconfig for a server (with the CA, not insecure) to a fresh temp dir; returns its path. */
/** With `insecure`, no CA at all and `insecure-skip-tls-verify: true`, as some kubeconfigs have. */
export function writeKubeconfig(options: {
  server: string;
  namespace?: string;
  token?: string;
  ca?: string;
  insecure?: boolean;
}): string {
  const file = join(mkdtempSync(join(tmpdir(), 'book-controller-')), 'kubeconfig');
  const trust = options.insecure
    ? { 'insecure-skip-tls-verify': true }
    : { 'certificate-authority-data': btoa(options.ca ?? CA_CERT) };
  writeFileSync(
    file,
    JSON.stringify({
      apiVersion: 'v1',
      kind: 'Config',
      clusters: [{ name: 'fake', cluster: { server: options.server, ...trust } }],
      users: [{ name: 'reader', user: { token: options.token ?? TOKEN } }],
      contexts: [
        {
          name: 'fake',
          context: { cluster: 'fake', user: 'reader', namespace: options.namespace },
        },
      ],
      'current-context': 'fake',
    }),
  );
  return file;
}

// ---------------------------------------------------------------------------------------------
// The objects it keeps, and what it records about each request.

export type Spec = Record<string, unknown>;
export type Labels = Record<string, string>;
interface Metadata {
  name: string;
  namespace: string;
  resourceVersion: string;
  uid: string;
  creationTimestamp: string;
}
export interface StoredBook {
  apiVersion: string;
  kind: 'Book';
  metadata: Metadata & { generation: number; labels?: Labels };
  spec: Spec;
  status?: Record<string, unknown>;
}
export interface StoredLease {
  apiVersion: 'coordination.k8s.io/v1';
  kind: 'Lease';
  metadata: Metadata;
  spec: LeaseSpec;
}
export interface LeaseSpec {
  holderIdentity?: string;
  leaseDurationSeconds?: number;
  acquireTime?: string;
  renewTime?: string;
  leaseTransitions?: number;
}

export type Verb = 'list' | 'watch' | 'get' | 'create' | 'update' | 'patch';
export type Resource = 'books' | 'books/status' | 'leases';
/** One request as the fake received it. */
export interface ApiRequest {
  verb: Verb;
  resource: Resource;
  namespace: string | undefined; // undefined: across all namespaces
  name?: string;
  query: Record<string, string>;
  body?: unknown; // parsed JSON, for writes
  contentType?: string;
  token: string; // the bearer token it carried: tells apart two controllers sharing one fake
  at: number; // performance.now() on arrival, to assert the time between requests
}

/** What a failNext fault matches, and what it adds to the response. */
export interface FaultOptions {
  headers?: Record<string, string>; // e.g. { 'Retry-After': '1' }
  retryAfterSeconds?: number; // Status details.retryAfterSeconds
  verb?: Verb; // only the next request with this verb (default: any request)
  resource?: Resource;
}

/** A Kubernetes Status body, the shape of every error the API server sends. */
export const status = (
  code: number,
  reason: string,
  message: string,
  details?: Record<string, unknown>,
) => ({
  kind: 'Status',
  apiVersion: 'v1',
  metadata: {},
  status: 'Failure',
  message,
  reason,
  ...(details && { details }),
  code,
});
const statusResponse = (
  code: number,
  reason: string,
  message: string,
  details?: Record<string, unknown>,
  headers?: Record<string, string>,
) => HttpResponse.json(status(code, reason, message, details), { status: code, headers });

const bookDetails = (name: string) => ({ name, group: GROUP, kind: 'books' });
const leaseDetails = (name: string) => ({ name, group: 'coordination.k8s.io', kind: 'leases' });

// One change to a book, kept for watches that resume from an older resourceVersion. `before` is the
// object as it was, so a watch with a label selector can tell "stopped matching" from "changed".
interface BookEvent {
  resourceVersion: number;
  type: 'ADDED' | 'MODIFIED' | 'DELETED';
  object: StoredBook;
  before?: StoredBook;
}
interface OpenWatch {
  namespace: string | undefined;
  selector: Selector;
  bookmarks: boolean;
  send(text: string): void;
  end(): void;
  drop(): void;
}

// ---------------------------------------------------------------------------------------------
// The server.

export class FakeApiServer {
  // resourceVersions cross a digit boundary (9999 → 10000) early, so ordering them as strings or
  // numbers would show. Books and leases share them, as all objects in one etcd do.
  private resourceVersion = 9996;
  private readonly books = new Map<string, StoredBook>(); // by namespace/name
  private readonly leases = new Map<string, StoredLease>(); // by namespace/name
  private history: BookEvent[] = [];
  private oldestWatchable = 0; // a watch from an older resourceVersion gets 410 Gone
  private readonly watches = new Set<OpenWatch>();
  private readonly continueTokens = new Map<string, StoredBook[]>(); // token → the rest of that list's snapshot
  private issuedTokens = 0;
  private readonly faults: { match: FaultOptions; response: () => Response }[] = [];
  private readonly refusedHolders = new Set<string>();
  private initialEventsFault: Record<string, unknown> | undefined; // a Status for the next streaming list to end with
  private held: (() => void)[] | undefined;
  readonly requests: ApiRequest[] = [];
  /** The bearer tokens it accepts; anything else gets 401. Add one per controller to tell their requests apart. */
  readonly tokens = new Set([TOKEN]);

  /** Called on every request and every change: tests wait on it instead of sleeping. */
  onActivity: () => void;

  // Knobs a test turns: how the stream is cut, and how the server misbehaves.
  chunkBytes = Infinity;
  crdInstalled = true;
  forbidden = false; // 403 on lists and watches of books
  forbidStatus = false; // 403 on status patches
  statusLatencyMs = 0; // added to every status patch
  statusAnswerDelayMs = 0; // added after a status patch is written, before it is answered (a slow network back)
  watchList = true; // the WatchList feature (streaming lists); false: 422, as servers before 1.34 answer
  stallWatches = false; // answer a watch, then send nothing: a half-open connection
  neverAnswerLists = false; // take a list request and never answer it
  goneForever = false; // answer every watch from a resourceVersion with 410 Gone
  endWatchesAtOnce = false;
  // A defensive case: the real server answers a too-old watch with HTTP 200 and an ERROR event (the
  // default here); HTTP 410 comes from lists. This answers the watch with HTTP 410 instead.
  goneAsHttp = false;
  expireNextContinueToken = false;
  // The next N requests for books get 429 'storage is (re)initializing' with Retry-After: 1, as a real
  // server answers for a moment after a CRD is established or after it restarts (its watch cache fills).
  storageInitializing = 0;
  // A streaming list sends its ADDEDs, then ends the stream without the initial-events-end bookmark.
  endInitialEventsEarly = false;

  private readonly handlers = [
    http.get(`*/apis/${GROUP_VERSION}/namespaces/:namespace/books`, ({ request, params }) =>
      this.listOrWatch(request, String(params.namespace)),
    ),
    http.get(`*/apis/${GROUP_VERSION}/books`, ({ request }) =>
      this.listOrWatch(request, undefined),
    ),
    http.get(`*/apis/${GROUP_VERSION}/namespaces/:namespace/books/:name`, ({ request, params }) =>
      this.getBook(request, String(params.namespace), String(params.name)),
    ),
    http.patch(
      `*/apis/${GROUP_VERSION}/namespaces/:namespace/books/:name/status`,
      ({ request, params }) =>
        this.patchStatus(request, String(params.namespace), String(params.name)),
    ),
    http.get(
      '*/apis/coordination.k8s.io/v1/namespaces/:namespace/leases/:name',
      ({ request, params }) =>
        this.getLease(request, String(params.namespace), String(params.name)),
    ),
    http.post('*/apis/coordination.k8s.io/v1/namespaces/:namespace/leases', ({ request, params }) =>
      this.createLease(request, String(params.namespace)),
    ),
    http.put(
      '*/apis/coordination.k8s.io/v1/namespaces/:namespace/leases/:name',
      ({ request, params }) =>
        this.updateLease(request, String(params.namespace), String(params.name)),
    ),
  ];
  private readonly tls = https.createServer({ key: SERVER_KEY, cert: SERVER_CERT }, (req, res) => {
    // A client may hang up at any time, even while sending its body: that ends this request, not the fake.
    req.on('error', () => res.destroy());
    this.bridge(req, res).catch(() => res.destroy());
  });
  url = '';

  constructor(options: { onActivity?: () => void } = {}) {
    this.onActivity = options.onActivity ?? (() => {});
  }

  async listen(host = '127.0.0.1'): Promise<this> {
    await new Promise<void>((resolve) => this.tls.listen(0, host, resolve));
    const address = this.tls.address();
    this.url = `https://${host}:${typeof address === 'object' && address ? address.port : 0}`;
    return this;
  }

  close() {
    this.release();
    for (const watch of this.watches) watch.end();
    this.tls.closeAllConnections();
    this.tls.close();
  }

  /** Serves a node:https request with msw's handlers, streaming the response body chunk by chunk. */
  private async bridge(req: IncomingMessage, res: ServerResponse) {
    req.socket.setNoDelay(true);
    const headers = new Headers();
    for (const [name, value] of Object.entries(req.headers))
      if (typeof value === 'string') headers.set(name, value);
    const method = req.method ?? 'GET';
    let body: string | undefined;
    if (method !== 'GET' && method !== 'HEAD') {
      const chunks: Buffer[] = [];
      for await (const chunk of req) chunks.push(chunk as Buffer);
      body = Buffer.concat(chunks).toString('utf8');
    }
    const request = new Request(new URL(req.url ?? '/', this.url), { method, headers, body });
    const response =
      (await getResponse(this.handlers, request)) ??
      statusResponse(404, 'NotFound', 'the server could not find the requested resource');
    res.writeHead(response.status, Object.fromEntries(response.headers));
    res.flushHeaders();
    const reader = response.body?.getReader();
    res.on('close', () => void reader?.cancel().catch(() => {}));
    try {
      for (let chunk = await reader?.read(); chunk && !chunk.done; chunk = await reader?.read())
        res.write(chunk.value);
      res.end();
    } catch {
      res.destroy(); // the stream failed: drop the connection, as a crashing server or a broken network does
    }
  }

  /**
   * What every request goes through first: it is logged, then checked for the bearer token, then
   * given the next fault a test queued for it, if any. A response here ends the request.
   * Synchronous from here to the answer (or to a wait a knob asks for), so that a test reacting to
   * the request's activity cannot change the knobs under it.
   */
  private admit(
    request: Request,
    entry: Omit<ApiRequest, 'query' | 'at' | 'body' | 'contentType' | 'token'>,
    text = '',
  ): Response | ApiRequest {
    const token = (request.headers.get('authorization') ?? '').replace(/^Bearer /, '');
    const logged: ApiRequest = {
      ...entry,
      query: Object.fromEntries(new URL(request.url).searchParams),
      token,
      at: performance.now(),
    };
    let notJson = '';
    if (request.method !== 'GET') {
      logged.contentType = request.headers.get('content-type') ?? undefined;
      try {
        logged.body = text ? JSON.parse(text) : undefined;
      } catch {
        notJson = logged.body = text;
      }
    }
    this.requests.push(logged);
    this.onActivity();
    if (!request.headers.get('authorization')?.startsWith('Bearer ') || !this.tokens.has(token)) {
      return statusResponse(401, 'Unauthorized', 'Unauthorized');
    }
    const fault = this.faults.findIndex(
      ({ match }) =>
        (!match.verb || match.verb === logged.verb) &&
        (!match.resource || match.resource === logged.resource),
    );
    if (fault >= 0) return this.faults.splice(fault, 1)[0]?.response() ?? Response.error();
    if (notJson)
      return statusResponse(
        400,
        'BadRequest',
        `the body of the request is not JSON: ${notJson.slice(0, 60)}`,
      );
    return logged;
  }

  // ------------------------------------------------------------------------------------------
  // Books: list, watch, get, and the status subresource.

  private async listOrWatch(request: Request, namespace: string | undefined): Promise<Response> {
    const verb = new URL(request.url).searchParams.get('watch') === 'true' ? 'watch' : 'list';
    const admitted = this.admit(request, { verb, resource: 'books', namespace });
    if (admitted instanceof Response) return admitted;
    const { query } = admitted;
    const refused = this.refuseBooks(verb, namespace);
    if (refused) return refused;
    if (this.storageInitializing > 0) {
      this.storageInitializing--;
      return statusResponse(
        429,
        'TooManyRequests',
        'storage is (re)initializing',
        { retryAfterSeconds: 1 },
        { 'Retry-After': '1' },
      );
    }
    const selector = parseSelector(query.labelSelector ?? '');
    if (typeof selector === 'string') return statusResponse(400, 'BadRequest', selector);
    if (verb === 'list' && this.neverAnswerLists) await new Promise(() => {});
    if (verb === 'list') return this.list(namespace, selector, query);
    const invalid = this.checkWatchOptions(query);
    if (invalid) return HttpResponse.json(invalid, { status: 422 });
    if (this.held) await new Promise<void>((resolve) => this.held?.push(resolve));
    return this.watch(namespace, selector, query);
  }

  /**
   * 404 when the CRD is missing, 403 when the user may not: the same for every books endpoint.
   * A missing CRD is no Status: the real server answers its unknown paths in plain text.
   */
  private refuseBooks(
    verb: Verb,
    namespace: string | undefined,
    name?: string,
    resource: Resource = 'books',
  ): Response | undefined {
    if (!this.crdInstalled)
      return new Response('404 page not found\n', {
        status: 404,
        headers: { 'Content-Type': 'text/plain; charset=utf-8' },
      });
    const forbidden = resource === 'books/status' ? this.forbidStatus : this.forbidden;
    if (!forbidden) return undefined;
    const where = namespace ? ` in the namespace "${namespace}"` : ' at the cluster scope';
    return statusResponse(
      403,
      'Forbidden',
      `books.${GROUP}${name ? ` "${name}"` : ''} is forbidden: ` +
        `User "system:serviceaccount:default:reader" cannot ${verb} resource "${resource}" in API group "${GROUP}"${where}`,
      { ...(name && { name }), group: GROUP, kind: 'books' },
    );
  }

  private list(
    namespace: string | undefined,
    selector: Selector,
    query: Record<string, string>,
  ): Response {
    let items = [...this.books.values()].filter((book) => this.visible(book, namespace, selector));
    if (query.continue) {
      const rest = this.expireNextContinueToken
        ? undefined
        : this.continueTokens.get(query.continue);
      this.expireNextContinueToken = false;
      if (!rest) {
        // The real 410 carries a token to go on with, inconsistently (rv -1); a careful client lists again instead.
        const inconsistent = `inconsistent-${query.continue}`;
        this.continueTokens.set(
          inconsistent,
          [...this.books.values()].filter((book) => this.visible(book, namespace, selector)),
        );
        return HttpResponse.json(
          {
            ...status(
              410,
              'Expired',
              'The provided continue parameter is too old to display a consistent list result. ' +
                'You can start a new list without the continue parameter, or use the continue token in this response to ' +
                'retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - ' +
                'objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.',
            ),
            metadata: { continue: inconsistent },
          },
          { status: 410 },
        );
      }
      items = rest;
    }
    const limit = Number(query.limit) || items.length;
    const metadata: { resourceVersion: string; continue?: string; remainingItemCount?: number } = {
      resourceVersion: String(this.resourceVersion),
    };
    if (items.length > limit) {
      metadata.continue = `token-${this.issuedTokens++}`;
      metadata.remainingItemCount = items.length - limit;
      this.continueTokens.set(metadata.continue, items.slice(limit));
    }
    return HttpResponse.json({
      apiVersion: GROUP_VERSION,
      kind: 'BookList',
      metadata,
      items: items.slice(0, limit),
    });
  }

  /**
   * Streaming lists (KEP-3157): `sendInitialEvents=true` needs `resourceVersionMatch=NotOlderThan`
   * (else 422); a server without the WatchList feature refuses it outright. Without
   * `allowWatchBookmarks=true` the real server accepts it, but never sends the end bookmark.
   */
  private checkWatchOptions(query: Record<string, string>) {
    const forbid = (field: string, why: string) => ({ field, message: `Forbidden: ${why}` });
    const causes: { field: string; message: string }[] = [];
    if (query.sendInitialEvents === 'true' && !this.watchList) {
      causes.push(
        forbid(
          'sendInitialEvents',
          'sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled',
        ),
      );
    } else if (query.sendInitialEvents === 'true') {
      if (query.resourceVersionMatch !== 'NotOlderThan') {
        causes.push(
          forbid(
            'resourceVersionMatch',
            'sendInitialEvents requires setting resourceVersionMatch to NotOlderThan',
          ),
        );
      }
    } else if (query.resourceVersionMatch) {
      causes.push(
        forbid(
          'resourceVersionMatch',
          'resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided',
        ),
      );
    }
    if (!causes.length) return undefined;
    const each = causes.map((cause) => `${cause.field}: ${cause.message}`);
    return {
      ...status(
        422,
        'Invalid',
        `ListOptions.meta.k8s.io "" is invalid: ${each.length > 1 ? `[${each.join(', ')}]` : each[0]}`,
        {
          group: 'meta.k8s.io',
          kind: 'ListOptions',
          causes: causes.map((cause) => ({ reason: 'FieldValueForbidden', ...cause })),
        },
      ),
    };
  }

  private watch(
    namespace: string | undefined,
    selector: Selector,
    query: Record<string, string>,
  ): Response {
    const streamingList = query.sendInitialEvents === 'true';
    // No resourceVersion (or "0"): start from the current state, sent as ADDED events.
    const fromNow = streamingList || !query.resourceVersion || query.resourceVersion === '0';
    const from = fromNow ? this.resourceVersion : Number(query.resourceVersion);
    if (!fromNow && (from < this.oldestWatchable || this.goneForever)) {
      const gone = status(
        410,
        'Expired',
        `too old resource version: ${from} (${this.oldestWatchable})`,
      );
      if (this.goneAsHttp) return HttpResponse.json(gone, { status: 410 });
      return new Response(`${JSON.stringify({ type: 'ERROR', object: gone })}\n`);
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    const encoder = new TextEncoder();
    const watches = this.watches;
    let watch: OpenWatch | undefined;
    const forget = () => {
      if (watch) watches.delete(watch);
      clearTimeout(timer);
      watch = undefined;
    };
    const body = new ReadableStream<Uint8Array>({
      start: (stream) => {
        watch = {
          namespace,
          selector,
          bookmarks: query.allowWatchBookmarks === 'true',
          send: (text) => {
            const bytes = encoder.encode(text);
            for (let at = 0; at < bytes.length; at += this.chunkBytes)
              stream.enqueue(bytes.slice(at, at + this.chunkBytes));
          },
          end: () => {
            forget();
            stream.close();
          },
          drop: () => {
            forget();
            stream.error(new Error('dropped'));
          },
        };
        if (this.stallWatches) return;
        if (this.endWatchesAtOnce) return stream.close();
        let replay: string[];
        if (fromNow) {
          replay = [...this.books.values()]
            .filter((book) => this.visible(book, namespace, selector))
            .map((book) => eventLine('ADDED', book));
          // The initial state is complete: a bookmark at the snapshot's resourceVersion says so (only
          // to a client that asked for bookmarks), or a fault a test queued ends the stream instead.
          const fault = streamingList ? this.initialEventsFault : undefined;
          this.initialEventsFault = undefined;
          if (fault) replay.push(eventLine('ERROR', fault));
          else if (
            streamingList &&
            query.allowWatchBookmarks === 'true' &&
            !this.endInitialEventsEarly
          ) {
            replay.push(this.bookmarkLine({ 'k8s.io/initial-events-end': 'true' }));
          }
          if (fault || (streamingList && this.endInitialEventsEarly)) {
            watch.send(replay.join(''));
            return stream.close();
          }
        } else {
          replay = this.history
            .filter((event) => event.resourceVersion > from)
            .map((event) => this.lineFor(watch, event));
        }
        watch.send(replay.join(''));
        watches.add(watch);
        this.onActivity();
        timer = setTimeout(watch.end, Number(query.timeoutSeconds) * 1000);
      },
      cancel: forget, // the client went away
    });
    return new Response(body, { headers: { 'Content-Type': 'application/json' } });
  }

  private visible(book: StoredBook, namespace: string | undefined, selector: Selector) {
    return (
      (!namespace || book.metadata.namespace === namespace) && selector(book.metadata.labels ?? {})
    );
  }

  /**
   * The line a watch gets for a change, or '' for none. Through a label selector, a change that
   * makes a book stop matching arrives as DELETED, one that makes it start matching as ADDED.
   */
  private lineFor(watch: OpenWatch | undefined, event: BookEvent): string {
    if (!watch) return '';
    const is =
      event.type !== 'DELETED' && this.visible(event.object, watch.namespace, watch.selector);
    const was =
      event.type === 'DELETED'
        ? this.visible(event.object, watch.namespace, watch.selector)
        : event.before !== undefined && this.visible(event.before, watch.namespace, watch.selector);
    if (event.type === 'DELETED') return was ? eventLine('DELETED', event.object) : '';
    if (is) return eventLine(was ? 'MODIFIED' : 'ADDED', event.object);
    if (was && event.before) {
      // The object as the watch last matched it, at the resourceVersion of the change.
      const { before } = event;
      return eventLine('DELETED', {
        ...before,
        metadata: { ...before.metadata, resourceVersion: event.object.metadata.resourceVersion },
      });
    }
    return '';
  }

  private bookmarkLine(annotations?: Record<string, string>) {
    const metadata = {
      resourceVersion: String(this.resourceVersion),
      ...(annotations && { annotations }),
    };
    return `${JSON.stringify({
      type: 'BOOKMARK',
      object: { kind: 'Book', apiVersion: GROUP_VERSION, metadata },
    })}\n`;
  }

  private record(type: BookEvent['type'], object: StoredBook, before?: StoredBook) {
    const event: BookEvent = {
      resourceVersion: Number(object.metadata.resourceVersion),
      type,
      object,
      before,
    };
    this.history.push(event);
    for (const watch of this.watches) watch.send(this.lineFor(watch, event));
    this.onActivity();
  }

  private getBook(request: Request, namespace: string, name: string): Response {
    const admitted = this.admit(request, { verb: 'get', resource: 'books', namespace, name });
    if (admitted instanceof Response) return admitted;
    const refused = this.refuseBooks('get', namespace, name);
    if (refused) return refused;
    const book = this.books.get(`${namespace}/${name}`);
    if (!book)
      return statusResponse(
        404,
        'NotFound',
        `books.${GROUP} "${name}" not found`,
        bookDetails(name),
      );
    return HttpResponse.json(book);
  }

  /**
   * The status subresource: a JSON merge patch (RFC 7386) into `status` only; anything else in the
   * body is ignored, except a metadata.resourceVersion, which is a precondition (409 if stale).
   * The resourceVersion moves and watches get MODIFIED; the generation does not move.
   */
  private async patchStatus(request: Request, namespace: string, name: string): Promise<Response> {
    const admitted = this.admit(
      request,
      { verb: 'patch', resource: 'books/status', namespace, name },
      await request.text(),
    );
    if (admitted instanceof Response) return admitted;
    if (this.statusLatencyMs) await sleep(this.statusLatencyMs);
    const refused = this.refuseBooks('patch', namespace, name, 'books/status');
    if (refused) return refused;
    if (admitted.contentType?.split(';')[0]?.trim() !== 'application/merge-patch+json') {
      return statusResponse(
        415,
        'UnsupportedMediaType',
        `the body of the request was in an unknown format - ` +
          `accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml`,
      );
    }
    const patch = admitted.body;
    if (!isObject(patch))
      return statusResponse(400, 'BadRequest', 'the patch is not a JSON object');
    const before = this.books.get(`${namespace}/${name}`);
    if (!before)
      return statusResponse(
        404,
        'NotFound',
        `books.${GROUP} "${name}" not found`,
        bookDetails(name),
      );
    const precondition = isObject(patch.metadata) ? patch.metadata.resourceVersion : undefined;
    if (precondition !== undefined && precondition !== before.metadata.resourceVersion)
      return conflict('books', name, bookDetails(name));
    const merged = mergePatch(before.status ?? {}, patch.status ?? {});
    const status = isObject(merged) ? merged : {};
    if (isDeepStrictEqual(status, before.status ?? {})) return HttpResponse.json(before); // no change: no write, no event
    const book: StoredBook = {
      ...before,
      metadata: { ...before.metadata, resourceVersion: this.nextResourceVersion() },
      status,
    };
    this.books.set(`${namespace}/${name}`, book);
    this.record('MODIFIED', book, before);
    if (this.statusAnswerDelayMs) await sleep(this.statusAnswerDelayMs);
    return HttpResponse.json(book);
  }

  // ------------------------------------------------------------------------------------------
  // Leases (coordination.k8s.io/v1), for leader election: optimistic concurrency on resourceVersion.

  private getLease(request: Request, namespace: string, name: string): Response {
    const admitted = this.admit(request, { verb: 'get', resource: 'leases', namespace, name });
    if (admitted instanceof Response) return admitted;
    const lease = this.leases.get(`${namespace}/${name}`);
    return lease ? HttpResponse.json(lease) : leaseNotFound(name);
  }

  private async createLease(request: Request, namespace: string): Promise<Response> {
    const admitted = this.admit(
      request,
      { verb: 'create', resource: 'leases', namespace },
      await request.text(),
    );
    if (admitted instanceof Response) return admitted;
    const checked = checkLease(admitted.body);
    if (typeof checked === 'string') return statusResponse(400, 'BadRequest', checked);
    const { name, spec } = checked;
    admitted.name = name;
    if (this.leases.has(`${namespace}/${name}`)) {
      return statusResponse(
        409,
        'AlreadyExists',
        `leases.coordination.k8s.io "${name}" already exists`,
        leaseDetails(name),
      );
    }
    return HttpResponse.json(this.putLease(name, spec, namespace), { status: 201 });
  }

  private async updateLease(request: Request, namespace: string, name: string): Promise<Response> {
    const admitted = this.admit(
      request,
      { verb: 'update', resource: 'leases', namespace, name },
      await request.text(),
    );
    if (admitted instanceof Response) return admitted;
    const checked = checkLease(admitted.body);
    if (typeof checked === 'string') return statusResponse(400, 'BadRequest', checked);
    if (checked.name !== name) {
      return statusResponse(
        400,
        'BadRequest',
        `the name of the object (${checked.name}) does not match the name on the URL (${name})`,
      );
    }
    if (checked.resourceVersion === undefined) {
      return statusResponse(
        422,
        'Invalid',
        `leases.coordination.k8s.io "${name}" is invalid: metadata.resourceVersion: ` +
          'Invalid value: 0: must be specified for an update',
        {
          name,
          group: 'coordination.k8s.io',
          kind: 'leases',
          causes: [
            {
              reason: 'FieldValueInvalid',
              message: 'Invalid value: 0: must be specified for an update',
              field: 'metadata.resourceVersion',
            },
          ],
        },
      );
    }
    if (this.refusedHolders.has(checked.spec.holderIdentity ?? '')) {
      return statusResponse(
        500,
        'InternalError',
        'Internal error occurred: etcdserver: request timed out',
      );
    }
    const before = this.leases.get(`${namespace}/${name}`);
    if (!before) return leaseNotFound(name);
    // Optimistic concurrency: an update based on an older read loses, and must read again.
    if (checked.resourceVersion !== before.metadata.resourceVersion) {
      return conflict('leases.coordination.k8s.io', name, leaseDetails(name));
    }
    return HttpResponse.json(this.putLease(name, checked.spec, namespace));
  }

  // ------------------------------------------------------------------------------------------
  // What a test does to the cluster.

  private nextResourceVersion() {
    return String(++this.resourceVersion);
  }

  create(name: string, spec: Spec, namespace = 'default', labels?: Labels): StoredBook {
    const book: StoredBook = {
      apiVersion: GROUP_VERSION,
      kind: 'Book',
      metadata: {
        name,
        namespace,
        resourceVersion: this.nextResourceVersion(),
        uid: crypto.randomUUID(),
        creationTimestamp: new Date().toISOString().replace(/\.\d+Z$/, 'Z'),
        generation: 1,
        ...(labels && { labels }),
      },
      spec,
    };
    this.books.set(`${namespace}/${name}`, book);
    this.record('ADDED', book);
    return book;
  }
  /** A new spec: generation +1 (unless the spec is unchanged: then no write at all). */
  update(name: string, spec: Spec, namespace = 'default') {
    this.change(name, namespace, (book) => ({ ...book, spec }));
  }
  /** New labels (replacing the old): a metadata-only change, so the generation stays. */
  label(name: string, labels: Labels, namespace = 'default') {
    this.change(name, namespace, (book) => ({ ...book, metadata: { ...book.metadata, labels } }));
  }
  remove(name: string, namespace = 'default') {
    const before = this.mustGet(name, namespace);
    this.books.delete(`${namespace}/${name}`);
    this.record('DELETED', {
      ...before,
      metadata: { ...before.metadata, resourceVersion: this.nextResourceVersion() },
    });
  }
  /** Deleted and created again under the same name: a new uid, generation 1, no status. */
  recreate(name: string, spec?: Spec, namespace = 'default'): StoredBook {
    const before = this.mustGet(name, namespace);
    this.remove(name, namespace);
    return this.create(name, spec ?? before.spec, namespace, before.metadata.labels);
  }
  /** The book as stored now (a copy), to assert on its status. */
  get(name: string, namespace = 'default'): StoredBook | undefined {
    const book = this.books.get(`${namespace}/${name}`);
    return book && structuredClone(book);
  }
  private mustGet(name: string, namespace: string): StoredBook {
    const book = this.books.get(`${namespace}/${name}`);
    if (!book) throw new Error(`the fake has no book ${namespace}/${name}`);
    return book;
  }
  private change(name: string, namespace: string, edit: (book: StoredBook) => StoredBook) {
    const before = this.mustGet(name, namespace);
    const after = edit(before);
    if (isDeepStrictEqual(after, before)) return; // the real server writes nothing for a no-op
    const generation =
      before.metadata.generation + (isDeepStrictEqual(after.spec, before.spec) ? 0 : 1);
    const book = {
      ...after,
      metadata: { ...after.metadata, generation, resourceVersion: this.nextResourceVersion() },
    };
    this.books.set(`${namespace}/${name}`, book);
    this.record('MODIFIED', book, before);
  }

  /** Writes a Lease as another client would (creating it if needed); returns what is stored. */
  putLease(name: string, spec: LeaseSpec, namespace = 'default'): StoredLease {
    const before = this.leases.get(`${namespace}/${name}`);
    const lease: StoredLease = {
      apiVersion: 'coordination.k8s.io/v1',
      kind: 'Lease',
      metadata: {
        name,
        namespace,
        resourceVersion: this.nextResourceVersion(),
        uid: before?.metadata.uid ?? crypto.randomUUID(),
        creationTimestamp:
          before?.metadata.creationTimestamp ?? new Date().toISOString().replace(/\.\d+Z$/, 'Z'),
      },
      spec,
    };
    this.leases.set(`${namespace}/${name}`, lease);
    this.onActivity();
    return lease;
  }
  lease(namespace: string, name: string): StoredLease | undefined {
    const lease = this.leases.get(`${namespace}/${name}`);
    return lease && structuredClone(lease);
  }
  /** From now on, updates of a Lease that name this holder fail (500): its leader cannot renew. */
  refuseLeaseUpdatesFrom(holderIdentity: string) {
    this.refusedHolders.add(holderIdentity);
  }

  /** Other resources changed: the cluster's resourceVersion moves on, with no book event. */
  advance(by: number) {
    this.resourceVersion += by;
  }
  /** etcd compaction: the history up to now is gone. */
  compact() {
    this.oldestWatchable = this.resourceVersion;
  }
  bookmark() {
    const line = this.bookmarkLine();
    for (const watch of this.watches) if (watch.bookmarks) watch.send(line);
  }
  /** Writes raw text into every open watch stream. */
  sendRaw(text: string) {
    for (const watch of this.watches) watch.send(text);
  }
  /** Ends every open watch cleanly, as the server does at timeoutSeconds. */
  endWatches() {
    for (const watch of this.watches) watch.end();
  }
  /** Creates a book, but every open watch breaks off in the middle of its event: the connection resets, or ends. */
  createAndCutMidEvent(name: string, spec: Spec, how: 'reset' | 'end') {
    const open = [...this.watches];
    this.watches.clear();
    const book = this.create(name, spec);
    const line = eventLine('ADDED', book);
    for (const watch of open) {
      watch.send(line.slice(0, line.length / 2));
      if (how === 'reset') watch.drop();
      else watch.end();
    }
  }
  /**
   * The next request (or the next one with `options.verb` / `options.resource`) gets this error
   * instead, as a Status body, with `options.headers` (say Retry-After) and `details.retryAfterSeconds`.
   */
  failNext(code: number, reason: string, message: string, options: FaultOptions = {}) {
    const details =
      options.retryAfterSeconds === undefined
        ? undefined
        : { retryAfterSeconds: options.retryAfterSeconds };
    this.faults.push({
      match: options,
      response: () => statusResponse(code, reason, message, details, options.headers),
    });
  }
  /** The next streaming list sends its ADDEDs, then this error as an ERROR event instead of its end bookmark, and ends. */
  failInitialEvents(code: number, reason: string, message: string) {
    this.initialEventsFault = status(code, reason, message);
  }
  /** Watch requests wait (a slow server) until release(). */
  hold() {
    this.held = [];
  }
  release() {
    const held = this.held ?? [];
    this.held = undefined;
    for (const resolve of held) resolve();
  }

  // What a test reads back.
  get resourceVersionNow() {
    return String(this.resourceVersion);
  }
  get openWatches() {
    return this.watches.size;
  }
  watchRequests() {
    return this.requests.filter((r) => r.verb === 'watch');
  }
  listRequests() {
    return this.requests.filter((r) => r.verb === 'list');
  }
  /** The status patches, in order. */
  patches() {
    return this.requests.filter((r) => r.resource === 'books/status');
  }
  leaseRequests() {
    return this.requests.filter((r) => r.resource === 'leases');
  }
}

// ---------------------------------------------------------------------------------------------
// The rules, as small functions.

const eventLine = (type: string, object: unknown) => `${JSON.stringify({ type, object })}\n`;

const isObject = (value: unknown): value is Record<string, unknown> =>
  typeof value === 'object' && value !== null && !Array.isArray(value);

/** RFC 7386: objects merge key by key, null deletes a key, anything else replaces (lists whole). */
export function mergePatch(target: unknown, patch: unknown): unknown {
  if (!isObject(patch)) return patch;
  const result: Record<string, unknown> = isObject(target) ? { ...target } : {};
  for (const [key, value] of Object.entries(patch)) {
    if (value === null) delete result[key];
    else result[key] = mergePatch(result[key], value);
  }
  return result;
}

const conflict = (resource: string, name: string, details: Record<string, unknown>) =>
  statusResponse(
    409,
    'Conflict',
    `Operation cannot be fulfilled on ${resource} "${name}": the object has been modified; ` +
      'please apply your changes to the latest version and try again',
    details,
  );
const leaseNotFound = (name: string) =>
  statusResponse(
    404,
    'NotFound',
    `leases.coordination.k8s.io "${name}" not found`,
    leaseDetails(name),
  );

// MicroTime is RFC 3339 with exactly six fractional digits; the server cannot decode anything else.
const MICRO_TIME = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}(Z|[+-]\d{2}:\d{2})$/;

/** A Lease body as the server decodes it, or the 400 message it answers. */
function checkLease(
  body: unknown,
): { name: string; resourceVersion?: string; spec: LeaseSpec } | string {
  const cannot = (why: string) => `Lease in version "v1" cannot be handled as a Lease: ${why}`;
  if (!isObject(body) || !isObject(body.metadata) || typeof body.metadata.name !== 'string')
    return cannot('metadata.name is missing');
  const spec = isObject(body.spec) ? body.spec : {};
  for (const field of ['acquireTime', 'renewTime'] as const) {
    const value = spec[field];
    if (
      value !== undefined &&
      value !== null &&
      (typeof value !== 'string' || !MICRO_TIME.test(value))
    ) {
      return cannot(
        `parsing time ${JSON.stringify(value)} as "2006-01-02T15:04:05.000000Z07:00": cannot parse as MicroTime (spec.${field})`,
      );
    }
  }
  const resourceVersion = body.metadata.resourceVersion;
  return {
    name: body.metadata.name,
    resourceVersion: typeof resourceVersion === 'string' ? resourceVersion : undefined,
    spec,
  };
}

type Selector = (labels: Labels) => boolean;

/**
 * A label selector, as kubectl's -l passes it: `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`,
 * `k notin (a,b)`, joined by commas (all must hold). Returns the error message for a bad one.
 */
export function parseSelector(text: string): Selector | string {
  const has = (labels: Labels, key: string) => Object.hasOwn(labels, key);
  const tests: Selector[] = [];
  for (const term of text
    .split(/,(?![^(]*\))/)
    .map((t) => t.trim())
    .filter(Boolean)) {
    const set = /^([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)$/.exec(term);
    const equality = /^([\w./-]+)\s*(==|=|!=)\s*([\w.-]*)$/.exec(term);
    const exists = /^(!?)\s*([\w./-]+)$/.exec(term);
    if (set) {
      const [, key = '', op, list = ''] = set;
      const values = list.split(',').map((v) => v.trim());
      tests.push(
        op === 'in'
          ? (l) => has(l, key) && values.includes(l[key] ?? '')
          : (l) => !has(l, key) || !values.includes(l[key] ?? ''),
      );
    } else if (equality) {
      const [, key = '', op, value] = equality;
      tests.push(op === '!=' ? (l) => l[key] !== value : (l) => has(l, key) && l[key] === value);
    } else if (exists) {
      const [, not, key = ''] = exists;
      tests.push(not ? (l) => !has(l, key) : (l) => has(l, key));
    } else {
      return `unable to parse requirement: found '${term}', expected: ',', '=', '!=', 'in', 'notin' or end of string`;
    }
  }
  return (labels) => tests.every((test) => test(labels));
}

// ---------------------------------------------------------------------------------------------
// The demo: the real controller.ts against this fake, playing the seed's walkthrough.

/** How to start controller.ts with the runtime (and loader) this process runs on. */
function controllerCommand(): string[] {
  const versions = process.versions as Record<string, string | undefined>;
  if (versions.deno)
    return [
      process.execPath,
      'run',
      '--allow-env',
      '--allow-read',
      '--allow-net',
      '--allow-sys',
      'controller.ts',
    ];
  if (versions.bun) return [process.execPath, 'controller.ts'];
  // Under tsx (npx tsx fake-apiserver.ts), its loader; under plain node, Node strips the types itself.
  const underTsx = process.execArgv.some((arg) => arg.includes('tsx'));
  return underTsx
    ? [process.execPath, '--import', 'tsx', 'controller.ts']
    : [process.execPath, 'controller.ts'];
}

/**
 * Runs the demo: the fake on loopback, the controller as a child process (its stdout is shown as is,
 * or given to `stdout`), then moby-dick added, retitled and deleted a second apart. Narration goes to
 * stderr (or `narrate`). Ends by stopping the controller with SIGTERM; returns its exit code and
 * the requests it made.
 */
export async function runDemo(
  options: {
    stdout?: (text: string) => void;
    narrate?: (line: string) => void;
    signal?: AbortSignal;
    stepMs?: number;
  } = {},
): Promise<{ exitCode: number | null; requests: ApiRequest[] }> {
  const { signal = new AbortController().signal, stepMs = 1000 } = options;
  const narrate = options.narrate ?? ((line: string) => console.error(`demo: ${line}`));
  const waiters = new Set<() => void>();
  const fake = await new FakeApiServer({
    onActivity: () => {
      for (const check of waiters) check();
    },
  }).listen();
  const kubeconfig = writeKubeconfig({ server: fake.url });
  const [program = '', ...args] = controllerCommand();
  narrate(
    `a fake API server is listening on ${fake.url}; starting the controller: KUBECONFIG=${kubeconfig} ${[basename(program), ...args].join(' ')}`,
  );
  const child = spawn(program, args, {
    cwd: fileURLToPath(new URL('.', import.meta.url)),
    env: { ...process.env, KUBECONFIG: kubeconfig },
    stdio: ['ignore', options.stdout ? 'pipe' : 'inherit', 'inherit'],
  });
  child.stdout?.setEncoding('utf8').on('data', (text: string) => options.stdout?.(text));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  let over = false;
  void exited.then(() => {
    over = true;
    for (const check of waiters) check();
  });
  const stop = AbortSignal.any([signal, AbortSignal.timeout(20_000)]);
  const until = (condition: () => boolean) =>
    new Promise<void>((resolve) => {
      const check = () => {
        if (!condition() && !over && !stop.aborted) return;
        waiters.delete(check);
        resolve();
      };
      waiters.add(check);
      stop.addEventListener('abort', check, { once: true });
      check();
    });
  const pause = () => sleep(stepMs, undefined, { signal }).catch(() => {});
  try {
    await until(() => fake.openWatches > 0); // the controller has its initial state and is watching
    const steps: [string, () => void][] = [
      [
        'kubectl apply -f book.yaml',
        () => fake.create('moby-dick', { title: 'Moby Dick', authors: ['Herman Melville'] }),
      ],
      [
        `kubectl patch book moby-dick --type merge -p '{"spec":{"title":"Moby-Dick; or, The Whale"}}'`,
        () =>
          fake.update('moby-dick', {
            title: 'Moby-Dick; or, The Whale',
            authors: ['Herman Melville'],
          }),
      ],
      ['kubectl delete book moby-dick', () => fake.remove('moby-dick')],
    ];
    for (const [command, step] of steps) {
      if (over || signal.aborted) break;
      narrate(command);
      step();
      await pause();
    }
    if (!over && !signal.aborted) narrate('stopping the controller (SIGTERM)');
    // Ctrl-C reached the controller too (one process group): give it a moment before telling it again.
    if (!over && signal.aborted) await Promise.race([exited, sleep(1000)]);
    if (!over) process.kill(child.pid ?? 0, 'SIGTERM'); // not child.kill(): Deno then reports the signal, not the exit code
    return { exitCode: await exited, requests: fake.requests };
  } finally {
    fake.close();
  }
}

// Runs only as the entry point, not when imported by the tests. Node 22 and tsx lack import.meta.main.
const isEntryPoint =
  (import.meta as { main?: boolean }).main ?? process.argv[1] === fileURLToPath(import.meta.url);
if (isEntryPoint) {
  const stop = new AbortController();
  // `on`, not `once`: Ctrl-C may arrive twice (from the terminal, and relayed by tsx's CLI).
  process.on('SIGINT', () => stop.abort());
  process.on('SIGTERM', () => stop.abort());
  const { exitCode } = await runDemo({ signal: stop.signal });
  process.exit(stop.signal.aborted ? 0 : (exitCode ?? 1));
}
