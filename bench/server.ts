// A loopback HTTPS API server for the benchmark, in its own process (bench.ts starts it),
// so that serializing and encrypting does not delay the bench's event loop, which
// timestamps the client's output lines.
//
// It plays what the controller needs of a real API server (see /work/shared/PROTOCOL.md):
// - books with metadata.generation (+1 on each spec change) and resourceVersions from one counter;
// - the paginated list (limit/continue, served from the snapshot at the list's RV);
// - watches from an RV: every change after it, then held open until timeoutSeconds;
// - the streaming initial list (sendInitialEvents=true&resourceVersionMatch=NotOlderThan&
//   allowWatchBookmarks=true): an ADDED per book, a BOOKMARK annotated
//   k8s.io/initial-events-end, then the watch; or, as a server without the WatchList
//   feature, HTTP 422 Invalid;
// - the status subresource: PATCH .../books/NAME/status (application/merge-patch+json, RFC 7386)
//   merges into status only, bumps the RV, keeps the generation, and sends the MODIFIED echo a
//   real server sends; 404 for a book that is gone; optionally `latency` ms before answering.
//
// The workload's M watch events (bench/workload.ts) happen at once when bench.ts asks
// (POST /bench/burst), which it does once the client is in sync (every book printed and
// Ready): a burst during the initial sync would merge into it in a level-triggered
// controller (issue 9) and measure neither.
//
// Control (no auth, not counted), for bench.ts:
//   POST /bench/reset?books=K&events=0|1&watchlist=0|1&latency=MS&ready=0|1
//        a fresh world: the first K of the N books (already Ready at their generation if ready=1),
//        the M events pending if events=1 (only with K=N), open watches closed, counters zeroed.
//   POST /bench/burst        the M events, now.
//   POST /bench/create?n=C   C new books (ADDED now) the clock of the "books Ready" row starts on.
//   GET  /bench/stats        requests by kind, books not Ready, time until the created books were Ready,
//                            when the last status patch was answered (ms since the epoch).
//
// usage: node bench/server.ts BOOKS EVENTS CERT KEY TOKEN   (prints {"port":…})
import { createServer } from 'node:https';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { readFileSync } from 'node:fs';
import { bookNames, listTitle, authors, watchEvents } from './workload.ts';

const [books, events, certFile, keyFile, token] = process.argv.slice(2);
const N = Number(books);
const M = Number(events);
const BASE = '/apis/example.technosophos.com/v1/namespaces/default/books';
const API_VERSION = 'example.technosophos.com/v1';

// ---- objects: kept as JSON pieces so that a change costs a string concatenation ----
// A book's JSON is  head + RV + '"},"spec":' + spec + (status ? ',"status":' + status : '') + '}'
// where head ends inside metadata, just before the resourceVersion's value.
interface Entry {
  name: string;
  head: string;
  spec: string;
  gen: number;
  rv: number;
  status: string;
  readyGen: number;
}
const json = (e: Entry) =>
  `${e.head}${e.rv}"},"spec":${e.spec}${e.status ? `,"status":${e.status}` : ''}}`;
const head = (name: string, uid: string, gen: number) =>
  `{"apiVersion":"${API_VERSION}","kind":"Book","metadata":{"name":"${name}","namespace":"default","uid":"${uid}",` +
  `"creationTimestamp":"2026-11-25T10:00:00Z","generation":${gen},"resourceVersion":"`;
const uid = (prefix: string, i: number) =>
  `0b00c0de-${prefix}-4000-8000-${String(i).padStart(12, '0')}`;
const readyStatus = (gen: number) =>
  JSON.stringify({
    observedGeneration: gen,
    conditions: [
      {
        type: 'Ready',
        status: 'True',
        reason: 'Reconciled',
        message: '',
        observedGeneration: gen,
        lastTransitionTime: '2026-11-25T10:00:01Z',
      },
    ],
  });
/** The generation a status says the book is Ready at, or -1. */
function readyAt(status: Record<string, unknown> | undefined): number {
  const conditions = status?.conditions;
  const ready = Array.isArray(conditions) ? conditions.find((c) => c?.type === 'Ready') : undefined;
  if (ready?.status !== 'True') return -1;
  return Number(ready.observedGeneration ?? status?.observedGeneration ?? -1);
}

const names = bookNames(N);
const initial = names.map(
  (name, i): Entry => ({
    name,
    head: head(name, uid('0000', i), 1),
    spec: JSON.stringify({ title: listTitle(name, i), authors: authors(i) }),
    gen: 1,
    rv: i + 1,
    status: '',
    readyGen: -1,
  }),
);
const READY1 = readyStatus(1);
// the list's items, serialized once per variant (ready or not) and kept: every run starts from them
const itemsCache = new Map<boolean, string[]>();
const items = (ready: boolean) => {
  let it = itemsCache.get(ready);
  if (!it) {
    it = initial.map((e) => json({ ...e, status: ready ? READY1 : '' }));
    itemsCache.set(ready, it);
  }
  return it;
};
items(false);

// The workload's events, as changes to apply: what each sets (or deletes).
interface Step {
  type: 'ADDED' | 'MODIFIED' | 'DELETED';
  name: string;
  head: string;
  spec: string;
  gen: number;
}
const steps: Step[] = [];
{
  const gens = new Map<string, number>(names.map((n) => [n, 1]));
  const heads = new Map<string, string>();
  for (const e of watchEvents(N, M)) {
    if (e.type === 'ADDED') {
      const h = head(e.name, uid('0001', e.index), 1);
      heads.set(e.name, h);
      gens.set(e.name, 1);
      steps.push({
        type: 'ADDED',
        name: e.name,
        head: h,
        spec: JSON.stringify({ title: e.title, authors: authors(e.index) }),
        gen: 1,
      });
    } else if (e.type === 'MODIFIED') {
      const gen = (gens.get(e.name) ?? 1) + 1;
      gens.set(e.name, gen);
      const listed = e.name.startsWith('book-');
      const i = listed ? Number(e.name.slice(5)) : Number(e.name.slice(4));
      steps.push({
        type: 'MODIFIED',
        name: e.name,
        head: head(e.name, uid(listed ? '0000' : '0001', i), gen),
        spec: JSON.stringify({ title: e.title, authors: authors(i) }),
        gen,
      });
    } else {
      steps.push({ type: 'DELETED', name: e.name, head: '', spec: '', gen: gens.get(e.name) ?? 1 });
    }
  }
}

// ---- the world of one run ----
interface Watcher {
  res: ServerResponse;
  pos: number;
  pending: string;
  blocked: boolean;
}
let state = new Map<string, Entry>();
let log: string[] = []; // log[i] has RV base + 1 + i; every RV bump appends one event
let base = 0; // RV of the initial state (the paginated list's RV)
let rv = 0;
let listItems: string[] = [];
let workloadPending = false;
let latencyMs = 0;
let watchList = true;
let watchers = new Set<Watcher>();
let created = { n: 0, t0: 0, ready: 0, tReady: 0, names: new Set<string>() };
const zero = () => ({
  listPages: 0,
  watches: 0,
  streamingLists: 0,
  rejectedStreamingLists: 0,
  statusPatches: 0,
  statusPatches404: 0,
  other: 0,
  unauthorized: 0,
  connections: 0,
});
let counts = zero();
let tFirst = 0; // the run's first client request
let lastPatchAt = NaN; // epoch ms
const clientSockets = new WeakSet<object>(); // connections that carried the client's requests (not the bench's)

function reset(q: URLSearchParams) {
  const k = Math.min(N, Number(q.get('books') ?? N));
  const ready = q.get('ready') === '1';
  for (const w of watchers) w.res.destroy();
  watchers = new Set();
  state = new Map();
  for (let i = 0; i < k; i++) {
    const e = initial[i];
    state.set(e.name, { ...e, status: ready ? READY1 : '', readyGen: ready ? 1 : -1 });
  }
  listItems = items(ready).slice(0, k);
  base = rv = k;
  log = [];
  workloadPending = q.get('events') === '1' && k === N && M > 0;
  latencyMs = Number(q.get('latency') ?? 0);
  watchList = q.get('watchlist') !== '0';
  created = { n: 0, t0: 0, ready: 0, tReady: 0, names: new Set() };
  counts = zero();
  tFirst = 0;
  lastPatchAt = NaN;
}

function append(type: string, e: Entry) {
  log.push(`{"type":"${type}","object":${json(e)}}\n`);
  for (const w of watchers) pump(w);
}

function applyWorkload() {
  if (!workloadPending) return;
  workloadPending = false;
  for (const s of steps) {
    const before = state.get(s.name);
    if (s.type === 'DELETED') {
      if (!before) continue;
      state.delete(s.name);
      before.rv = ++rv;
      log.push(`{"type":"DELETED","object":${json(before)}}\n`);
      continue;
    }
    // a spec change keeps the status the book has (its conditions are now stale)
    const e: Entry = {
      name: s.name,
      head: s.head,
      spec: s.spec,
      gen: s.gen,
      rv: ++rv,
      status: before?.status ?? '',
      readyGen: before?.readyGen ?? -1,
    };
    state.set(s.name, e);
    log.push(`{"type":"${s.type}","object":${json(e)}}\n`);
  }
  for (const w of watchers) pump(w);
}

// ---- watches ----
const CHUNK = 64 * 1024;
function pump(w: Watcher) {
  if (w.blocked) return;
  while (w.pending || w.pos < log.length) {
    let out = w.pending;
    w.pending = '';
    while (out.length < CHUNK && w.pos < log.length) out += log[w.pos++];
    if (!w.res.write(out)) {
      w.blocked = true;
      w.res.once('drain', () => {
        w.blocked = false;
        pump(w);
      });
      return;
    }
  }
}

function watch(_req: IncomingMessage, res: ServerResponse, q: URLSearchParams) {
  const streaming = q.get('sendInitialEvents') === 'true';
  if (streaming && !watchList) {
    counts.rejectedStreamingLists++;
    return status(
      res,
      422,
      'Invalid',
      'Watch.meta.k8s.io "" is invalid: sendInitialEvents: Forbidden: sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled',
    );
  }
  if (
    streaming &&
    (q.get('resourceVersionMatch') !== 'NotOlderThan' || q.get('allowWatchBookmarks') !== 'true')
  ) {
    counts.other++;
    return status(
      res,
      422,
      'Invalid',
      'sendInitialEvents requires resourceVersionMatch=NotOlderThan and allowWatchBookmarks=true',
    );
  }
  if (streaming) counts.streamingLists++;
  else counts.watches++;
  const timeout = Number(q.get('timeoutSeconds') || 1800);
  res.writeHead(200, { 'content-type': 'application/json', 'transfer-encoding': 'chunked' });
  const w: Watcher = { res, pos: log.length, pending: '', blocked: false };
  if (streaming) {
    // the current state as ADDED events, then the bookmark at the current RV
    const parts: string[] = [];
    for (const e of state.values()) parts.push(`{"type":"ADDED","object":${json(e)}}\n`);
    parts.push(
      `${JSON.stringify({
        type: 'BOOKMARK',
        object: {
          apiVersion: API_VERSION,
          kind: 'Book',
          metadata: {
            resourceVersion: String(rv),
            annotations: { 'k8s.io/initial-events-end': 'true' },
          },
        },
      })}\n`,
    );
    w.pending = parts.join('');
  } else {
    const from = Number(q.get('resourceVersion') || rv);
    w.pos = Math.max(0, Math.min(log.length, from - base)); // the first event with RV > from
  }
  watchers.add(w);
  pump(w);
  // after the log, hold the watch open until its timeout, as a quiet server does
  const timer = setTimeout(() => res.end(), timeout * 1000);
  res.on('close', () => {
    clearTimeout(timer);
    watchers.delete(w);
  });
}

// ---- status ----
function merge(target: unknown, patch: unknown): unknown {
  // RFC 7386
  if (typeof patch !== 'object' || patch === null || Array.isArray(patch)) return patch;
  const out: Record<string, unknown> =
    typeof target === 'object' && target !== null && !Array.isArray(target) ? { ...target } : {};
  for (const [k, v] of Object.entries(patch)) {
    if (v === null) delete out[k];
    else out[k] = merge(out[k], v);
  }
  return out;
}

function patchStatus(req: IncomingMessage, res: ServerResponse, name: string) {
  let body = '';
  req.setEncoding('utf8');
  req.on('data', (c) => {
    body += c;
  });
  const answer = () => {
    counts.statusPatches++;
    if (!String(req.headers['content-type']).startsWith('application/merge-patch+json')) {
      return status(
        res,
        415,
        'UnsupportedMediaType',
        `the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml`,
      );
    }
    const e = state.get(name);
    if (!e) {
      counts.statusPatches404++;
      return status(res, 404, 'NotFound', `books.example.technosophos.com "${name}" not found`);
    }
    let patch: { status?: unknown };
    try {
      patch = JSON.parse(body);
    } catch {
      return status(res, 400, 'BadRequest', 'the body is not JSON');
    }
    const next = merge(e.status ? JSON.parse(e.status) : {}, patch.status ?? {}) as Record<
      string,
      unknown
    >;
    e.status = JSON.stringify(next);
    e.readyGen = readyAt(next);
    e.rv = ++rv;
    if (created.names.has(name) && e.readyGen === e.gen) {
      created.names.delete(name);
      if (++created.ready === created.n) created.tReady = performance.now();
    }
    const obj = json(e);
    lastPatchAt = performance.timeOrigin + performance.now();
    res.writeHead(200, {
      'content-type': 'application/json',
      'content-length': Buffer.byteLength(obj),
    });
    res.end(obj);
    append('MODIFIED', e);
  };
  // setTimeout(…, 0) would still wait a timer tick (about 1 ms): only delay when asked to
  req.on('end', () => (latencyMs > 0 ? setTimeout(answer, latencyMs) : answer()));
}

// ---- HTTP ----
function status(res: ServerResponse, code: number, reason: string, message: string) {
  res.writeHead(code, { 'content-type': 'application/json' });
  res.end(
    JSON.stringify({
      kind: 'Status',
      apiVersion: 'v1',
      metadata: {},
      status: 'Failure',
      message,
      reason,
      code,
    }),
  );
}

function page(q: URLSearchParams): string {
  const cont = q.get('continue');
  const start = cont ? Number(cont.slice(1)) : 0;
  const limit = Number(q.get('limit') || listItems.length || 1);
  const end = Math.min(start + limit, listItems.length);
  const meta: Record<string, string> = { resourceVersion: String(base) };
  if (end < listItems.length) meta.continue = `c${end}`;
  return `{"apiVersion":"${API_VERSION}","kind":"BookList","metadata":${JSON.stringify(meta)},"items":[${listItems.slice(start, end).join(',')}]}`;
}

function stats() {
  let notReady = 0;
  for (const e of state.values()) if (e.readyGen !== e.gen) notReady++;
  return {
    ...counts,
    books: state.size,
    notReady,
    openWatches: watchers.size,
    rv,
    created: created.n,
    createdReady: created.ready,
    readyMs: created.tReady ? created.tReady - created.t0 : NaN,
    sinceFirstMs: tFirst ? performance.now() - tFirst : NaN,
    lastPatchAt,
  };
}

const server = createServer(
  { cert: readFileSync(certFile), key: readFileSync(keyFile), keepAlive: true },
  (req, res) => {
    const url = new URL(req.url ?? '/', 'https://x');
    const q = url.searchParams;
    switch (url.pathname) {
      case '/bench/stats':
        return res.end(JSON.stringify(stats()));
      case '/bench/reset':
        reset(q);
        return res.end('{}');
      case '/bench/burst':
        applyWorkload();
        return res.end('{}');
      case '/bench/create': {
        const n = Number(q.get('n'));
        created = { n, t0: performance.now(), ready: 0, tReady: 0, names: new Set() };
        for (let i = 0; i < n; i++) {
          const name = `ready-${String(i).padStart(6, '0')}`;
          const e: Entry = {
            name,
            head: head(name, uid('0002', i), 1),
            spec: JSON.stringify({ title: listTitle(name, i), authors: authors(i) }),
            gen: 1,
            rv: ++rv,
            status: '',
            readyGen: -1,
          };
          state.set(name, e);
          created.names.add(name);
          log.push(`{"type":"ADDED","object":${json(e)}}\n`);
        }
        for (const w of watchers) pump(w);
        return res.end('{}');
      }
    }
    if (req.headers.authorization !== `Bearer ${token}`) {
      counts.unauthorized++;
      return status(res, 401, 'Unauthorized', 'Unauthorized');
    }
    if (!tFirst) tFirst = performance.now();
    if (!clientSockets.has(req.socket)) {
      clientSockets.add(req.socket);
      counts.connections++;
    }
    if (
      req.method === 'PATCH' &&
      url.pathname.startsWith(`${BASE}/`) &&
      url.pathname.endsWith('/status')
    ) {
      const name = url.pathname.slice(BASE.length + 1, -'/status'.length);
      if (!name.includes('/')) return patchStatus(req, res, decodeURIComponent(name));
    }
    if (req.method !== 'GET' || url.pathname !== BASE) {
      counts.other++;
      return status(
        res,
        404,
        'NotFound',
        `the server could not find the requested resource (${req.method} ${url.pathname})`,
      );
    }
    if (q.get('watch') === 'true' || q.get('watch') === '1') return watch(req, res, q);
    counts.listPages++;
    const body = page(q);
    res.writeHead(200, {
      'content-type': 'application/json',
      'content-length': Buffer.byteLength(body),
    });
    res.end(body);
  },
);
server.keepAliveTimeout = 60_000;
server.listen(0, '127.0.0.1', () => {
  const addr = server.address();
  process.stdout.write(
    `${JSON.stringify({ port: typeof addr === 'object' && addr ? addr.port : 0 })}\n`,
  );
});
process.on('SIGTERM', () => process.exit(0));
