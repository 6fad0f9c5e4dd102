// A loopback HTTPS API server for the benchmark, in its own process (bench.ts starts it),
// so that serializing and encrypting does not delay the bench's event loop, which
// timestamps the client's output lines.
//
// Why not the tests' FakeApiServer (fake-apiserver.ts) in a child process: the rows are ratios of
// the controller to the floor, and the server's time is in both, so a slower server flattens them
// toward 1. `node bench/servers.ts` (20,000 books, 30,000 changes, 5,000 books written; 2 busy
// cores): streaming lists alike (80-140k events/s each), but a burst on an open watch 170-330k
// events/s here against 20-27k, and an apply plus a status patch per book, awaited in turn,
// 1,600-2,900 writes/s against 820-960. The bench also needs what the fake has no knob for: a
// world reset in one call (books already Ready with their ConfigMaps), a latency on the apply as
// well as on the status patch, and counts of requests by kind without a record of each request.
//
// It plays what the controller needs of a real API server, for two resources that share one
// resourceVersion counter:
// - books with metadata.generation (+1 on each spec change);
// - ConfigMaps, the ones the controller owns (label app.kubernetes.io/managed-by=book-controller);
// and for each:
// - the paginated list (limit/continue, served from a snapshot taken by the list's first page);
// - watches from an RV: every change after it, then held open until timeoutSeconds;
// - the streaming initial list (sendInitialEvents=true&resourceVersionMatch=NotOlderThan&
//   allowWatchBookmarks=true): an ADDED per object, a BOOKMARK annotated
//   k8s.io/initial-events-end, then the watch; or, as a server without the WatchList
//   feature, HTTP 422 Invalid;
// - GET of one object (the controller asks after a 422).
// Writes:
// - PATCH .../books/NAME/status, application/json-patch+json (RFC 6902: test, add, replace,
//   remove; a failed test of /metadata/uid is a 422, as on the real server) or
//   application/merge-patch+json (RFC 7386): changes status only, keeps the generation, bumps the RV
//   and sends the MODIFIED echo, unless nothing changed (no RV bump, no event); 404 for a book
//   that is gone.
// - PATCH .../configmaps/NAME?fieldManager=F&force=true, application/apply-patch+yaml (a JSON
//   body): server-side apply by one field manager. Creates (201, ADDED) or replaces what the
//   manager owns (labels, ownerReferences, data: 200, MODIFIED); when that changes nothing, 200
//   with the object as it is, and no RV bump, no event. Answers with managedFields, as a real
//   server does. A ConfigMap whose controller ownerReference names another uid and was written by
//   another manager is a 422 (only one controller reference).
// - The garbage collector, at once: a book deleted takes the ConfigMap it controls with it (DELETED
//   event); a ConfigMap applied for a book that is gone (another uid, or none) is deleted right
//   after.
// Every write may wait `latency` ms before answering (?latency on reset), the apply and the status
// patch alike.
//
// The workload's M watch events (bench/workload.ts) happen at once when bench.ts asks
// (POST /bench/burst), which it does once the client is in sync (every book printed and
// Ready): a burst during the initial sync would merge into it in a level-triggered
// controller (changes of one book that arrive while it waits are handled once) and measure
// neither.
//
// Control (no auth, not counted), for bench.ts:
//   POST /bench/reset?books=K&events=0|1&watchlist=0|1&latency=MS&ready=0|1
//        a fresh world: the first K of the N books (if ready=1, already Ready at their generation,
//        each with its correct ConfigMap: a restart has nothing to write), the M events pending if
//        events=1 (only with K=N), open watches closed, counters zeroed.
//   POST /bench/burst        the M events, now.
//   POST /bench/create?n=C   C new books (ADDED now) the clock of the "books Ready" row starts on.
//   GET  /bench/stats[?full=1]  requests by kind, books not Ready, time until the created books were
//                            Ready, when the last write was answered (ms since the epoch); with
//                            full=1 also the books whose ConfigMap is missing or wrong.
//
// It serves with the tests' certificate and accepts their token (fake-apiserver.ts).
//
// usage: node bench/server.ts BOOKS EVENTS   (prints {"port":…})
import { createServer } from 'node:https';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { SERVER_CERT, SERVER_KEY, TOKEN } from '../fake-apiserver.ts';
import { bookNames, listTitle, authors, watchEvents } from './workload.ts';

const [books, events] = process.argv.slice(2);
const N = Number(books);
const M = Number(events);
const NS = 'default';
const GROUP_VERSION = 'example.technosophos.com/v1';
const BOOKS = `/apis/${GROUP_VERSION}/namespaces/${NS}/books`;
const CMS = `/api/v1/namespaces/${NS}/configmaps`;
const MANAGER = 'book-controller';
const LABEL = 'app.kubernetes.io/managed-by';
const SELECTOR = `${LABEL}=${MANAGER}`;
const CREATED = '2026-11-25T10:00:00Z';

// ---- objects: kept as JSON pieces so that a change costs a string concatenation ----
// A book's JSON is  head + RV + '"},"spec":' + spec + (status ? ',"status":' + status : '') + '}'
// where head ends inside metadata, just before the resourceVersion's value.
interface Book {
  name: string;
  uid: string;
  head: string;
  spec: string;
  gen: number;
  rv: number;
  status: string;
  readyGen: number;
  want: string; // the content (see content()) its ConfigMap must have
}
// A ConfigMap's JSON is  head + RV + tail.
interface ConfigMap {
  name: string;
  uid: string;
  head: string;
  tail: string;
  rv: number;
  content: string;
  owner: string; // the uid of its controller ownerReference, or ''
  manager: string;
}
type Obj = Book | ConfigMap;
const bookJson = (e: Book) =>
  `${e.head}${e.rv}"},"spec":${e.spec}${e.status ? `,"status":${e.status}` : ''}}`;
const cmJson = (c: ConfigMap) => `${c.head}${c.rv}${c.tail}`;
const bookHead = (name: string, uid: string, gen: number) =>
  `{"apiVersion":"${GROUP_VERSION}","kind":"Book","metadata":{"name":"${name}","namespace":"${NS}","uid":"${uid}",` +
  `"creationTimestamp":"${CREATED}","generation":${gen},"resourceVersion":"`;
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

type Json = Record<string, unknown>;
const sortedObject = (o: unknown): Json | undefined => {
  if (typeof o !== 'object' || o === null || Array.isArray(o)) return undefined;
  const out: Json = {};
  for (const k of Object.keys(o).sort()) out[k] = (o as Json)[k];
  return out;
};
interface Ref {
  apiVersion?: string;
  kind?: string;
  name?: string;
  uid?: string;
  controller?: boolean;
  blockOwnerDeletion?: boolean;
}
// as the server serializes an OwnerReference: its fields in their Go order
const refOf = (r: Ref): Ref => ({
  apiVersion: r.apiVersion,
  kind: r.kind,
  name: r.name,
  uid: r.uid,
  controller: r.controller,
  blockOwnerDeletion: r.blockOwnerDeletion,
});
/** What a ConfigMap says, as the controller's apply can change it: labels, owners, data. */
const content = (labels: unknown, refs: Ref[], data: unknown) =>
  JSON.stringify([sortedObject(labels) ?? {}, refs.map(refOf), sortedObject(data) ?? {}]);
const ownerRef = (name: string, bookUid: string): Ref => ({
  apiVersion: GROUP_VERSION,
  kind: 'Book',
  name,
  uid: bookUid,
  controller: true,
  blockOwnerDeletion: true,
});
const wantedData = (title: string, list: string[]) =>
  list.length ? { title, authors: list.join('\n') } : { title };
const wanted = (name: string, bookUid: string, title: string, list: string[]) =>
  content({ [LABEL]: MANAGER }, [ownerRef(name, bookUid)], wantedData(title, list));

let cmSerial = 0;
/** A ConfigMap as the server stores it after an apply by `manager`. */
function makeConfigMap(
  name: string,
  cmUid: string,
  labels: Json,
  refs: Ref[],
  data: Json,
  manager: string,
  time: string,
  created = time,
): ConfigMap {
  const l = sortedObject(labels) ?? {};
  const r = refs.map(refOf);
  const d = sortedObject(data) ?? {};
  const fields = (o: Json) => Object.fromEntries(Object.keys(o).map((k) => [`f:${k}`, {}]));
  const managed = [
    {
      manager,
      operation: 'Apply',
      apiVersion: 'v1',
      time,
      fieldsType: 'FieldsV1',
      fieldsV1: {
        'f:data': fields(d),
        'f:metadata': {
          'f:labels': fields(l),
          'f:ownerReferences': Object.fromEntries(r.map((x) => [`k:{"uid":"${x.uid}"}`, {}])),
        },
      },
    },
  ];
  const head =
    `{"kind":"ConfigMap","apiVersion":"v1","metadata":{"name":"${name}","namespace":"${NS}",` +
    `"uid":"${cmUid}","resourceVersion":"`;
  const tail =
    `","creationTimestamp":"${created}","labels":${JSON.stringify(l)},"ownerReferences":` +
    `${JSON.stringify(r)},"managedFields":${JSON.stringify(managed)}},"data":${JSON.stringify(d)}}`;
  const controller = r.find((x) => x.controller);
  return {
    name,
    uid: cmUid,
    head,
    tail,
    rv: 0,
    content: content(l, r, d),
    owner: controller?.uid ?? '',
    manager,
  };
}

const names = bookNames(N);
const initial = names.map((name, i): Book => {
  const u = uid('0000', i);
  const title = listTitle(name, i);
  return {
    name,
    uid: u,
    head: bookHead(name, u, 1),
    spec: JSON.stringify({ title, authors: authors(i) }),
    gen: 1,
    rv: 0,
    status: '',
    readyGen: -1,
    want: wanted(name, u, title, authors(i)),
  };
});
const READY1 = readyStatus(1);
// the correct ConfigMap of each initial book (for ready=1), made once
let initialCms: ConfigMap[] | undefined;
const correctCms = () => {
  initialCms ??= initial.map((b, i) =>
    makeConfigMap(
      b.name,
      uid('00cf', i),
      { [LABEL]: MANAGER },
      [ownerRef(b.name, b.uid)],
      wantedData(listTitle(b.name, i), authors(i)),
      MANAGER,
      CREATED,
    ),
  );
  return initialCms;
};

// The workload's events, as changes to apply: what each sets (or deletes).
interface Step {
  type: 'ADDED' | 'MODIFIED' | 'DELETED';
  name: string;
  uid: string;
  head: string;
  spec: string;
  gen: number;
  want: string;
}
const steps: Step[] = [];
{
  const gens = new Map<string, number>(names.map((n) => [n, 1]));
  for (const e of watchEvents(N, M)) {
    if (e.type === 'DELETED') {
      steps.push({ type: 'DELETED', name: e.name, uid: '', head: '', spec: '', gen: 0, want: '' });
      continue;
    }
    const gen = e.type === 'ADDED' ? 1 : (gens.get(e.name) ?? 1) + 1;
    gens.set(e.name, gen);
    const listed = e.name.startsWith('book-');
    const i =
      e.type === 'ADDED' ? e.index : listed ? Number(e.name.slice(5)) : Number(e.name.slice(4));
    const u = uid(listed ? '0000' : '0001', i);
    const title = e.title ?? '';
    steps.push({
      type: e.type,
      name: e.name,
      uid: u,
      head: bookHead(e.name, u, gen),
      spec: JSON.stringify({ title, authors: authors(i) }),
      gen,
      want: wanted(e.name, u, title, authors(i)),
    });
  }
}

// ---- the world of one run ----
interface Watcher {
  res: ServerResponse;
  resource: Resource<Obj>;
  pos: number;
  pending: string;
  blocked: boolean;
}
/** One resource's objects, its event log (one line per RV bump of one of its objects), its watches. */
class Resource<T extends Obj> {
  state = new Map<string, T>();
  lines: string[] = [];
  rvs: number[] = [];
  watchers = new Set<Watcher>();
  snapshots = new Map<string, { rv: number; items: string[] }>();
  readonly kind: string;
  readonly apiVersion: string;
  readonly json: (o: T) => string;
  constructor(kind: string, apiVersion: string, json: (o: T) => string) {
    this.kind = kind;
    this.apiVersion = apiVersion;
    this.json = json;
  }
  reset(objects: T[]) {
    for (const w of this.watchers) w.res.destroy();
    this.watchers = new Set();
    this.state = new Map(objects.map((o) => [o.name, o]));
    this.lines = [];
    this.rvs = [];
    this.snapshots = new Map();
  }
  /** Records an event at a new RV (the object's, already set). `pump` sends it to the watches. */
  record(type: string, o: T) {
    this.lines.push(`{"type":"${type}","object":${this.json(o)}}\n`);
    this.rvs.push(o.rv);
  }
  pump() {
    for (const w of this.watchers) pump(w);
  }
  /** The index of the first event with an RV above `from`. */
  after(from: number) {
    let lo = 0;
    let hi = this.rvs.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.rvs[mid] <= from) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }
}
const books$ = new Resource<Book>('Book', GROUP_VERSION, bookJson);
const cms$ = new Resource<ConfigMap>('ConfigMap', 'v1', cmJson);
let rv = 0;
let workloadPending = false;
let latencyMs = 0;
let watchList = true;
let created = { n: 0, t0: 0, ready: 0, tReady: 0, names: new Set<string>() };
const zero = () => ({
  listPages: 0, // books
  watches: 0,
  streamingLists: 0,
  rejectedStreamingLists: 0,
  cmListPages: 0,
  cmWatches: 0,
  cmStreamingLists: 0,
  cmRejectedStreamingLists: 0,
  cmUnselected: 0, // ConfigMap lists or watches without the managed-by selector
  applies: 0,
  appliesCreated: 0,
  appliesUnchanged: 0,
  applies422: 0,
  statusPatches: 0,
  statusPatches404: 0,
  statusPatches422: 0,
  statusUnchanged: 0,
  gets: 0,
  other: 0,
  unauthorized: 0,
  connections: 0,
  generations: 0, // new (book, generation) pairs this run: what needs one apply and one status
  gcDeletes: 0,
});
let counts = zero();
let tFirst = 0; // the run's first client request
let lastWriteAt = NaN; // epoch ms
const clientSockets = new WeakSet<object>(); // connections that carried the client's requests (not the bench's)

function reset(q: URLSearchParams) {
  const k = Math.min(N, Number(q.get('books') ?? N));
  const ready = q.get('ready') === '1';
  rv = 0;
  books$.reset(
    initial.slice(0, k).map((e) => ({
      ...e,
      rv: ++rv,
      status: ready ? READY1 : '',
      readyGen: ready ? 1 : -1,
    })),
  );
  cms$.reset(
    ready
      ? correctCms()
          .slice(0, k)
          .map((c) => ({ ...c, rv: ++rv }))
      : [],
  );
  workloadPending = q.get('events') === '1' && k === N && M > 0;
  latencyMs = Number(q.get('latency') ?? 0);
  watchList = q.get('watchlist') !== '0';
  created = { n: 0, t0: 0, ready: 0, tReady: 0, names: new Set() };
  counts = zero();
  counts.generations = ready ? 0 : k;
  tFirst = 0;
  lastWriteAt = NaN;
}

function deleteBook(name: string) {
  const b = books$.state.get(name);
  if (!b) return;
  books$.state.delete(name);
  b.rv = ++rv;
  books$.record('DELETED', b);
  collect(name);
}

/** The garbage collector: a ConfigMap whose controller is not the book of that name goes. */
function collect(name: string) {
  const c = cms$.state.get(name);
  if (!c?.owner || books$.state.get(name)?.uid === c.owner) return;
  cms$.state.delete(name);
  c.rv = ++rv;
  cms$.record('DELETED', c);
  counts.gcDeletes++;
}

function applyWorkload() {
  if (!workloadPending) return;
  workloadPending = false;
  for (const s of steps) {
    if (s.type === 'DELETED') {
      deleteBook(s.name);
      continue;
    }
    const before = books$.state.get(s.name);
    // a spec change keeps the status the book has (its conditions are now stale)
    const e: Book = {
      name: s.name,
      uid: s.uid,
      head: s.head,
      spec: s.spec,
      gen: s.gen,
      rv: ++rv,
      status: before?.status ?? '',
      readyGen: before?.readyGen ?? -1,
      want: s.want,
    };
    books$.state.set(s.name, e);
    books$.record(s.type, e);
    counts.generations++;
  }
  books$.pump();
  cms$.pump();
}

// ---- watches ----
const CHUNK = 64 * 1024;
function pump(w: Watcher) {
  if (w.blocked) return;
  const { lines } = w.resource;
  while (w.pending || w.pos < lines.length) {
    let out = w.pending;
    w.pending = '';
    while (out.length < CHUNK && w.pos < lines.length) out += lines[w.pos++];
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

function watch(res: ServerResponse, q: URLSearchParams, r: Resource<Obj>) {
  const books = r === (books$ as Resource<Obj>);
  const streaming = q.get('sendInitialEvents') === 'true';
  if (streaming && !watchList) {
    if (books) counts.rejectedStreamingLists++;
    else counts.cmRejectedStreamingLists++;
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
  if (streaming) {
    if (books) counts.streamingLists++;
    else counts.cmStreamingLists++;
  } else if (books) counts.watches++;
  else counts.cmWatches++;
  const timeout = Number(q.get('timeoutSeconds') || 1800);
  res.writeHead(200, { 'content-type': 'application/json', 'transfer-encoding': 'chunked' });
  const w: Watcher = { res, resource: r, pos: r.lines.length, pending: '', blocked: false };
  if (streaming) {
    // the current state as ADDED events, then the bookmark at the current RV
    const parts: string[] = [];
    for (const e of r.state.values()) parts.push(`{"type":"ADDED","object":${r.json(e)}}\n`);
    parts.push(
      `${JSON.stringify({
        type: 'BOOKMARK',
        object: {
          apiVersion: r.apiVersion,
          kind: r.kind,
          metadata: {
            resourceVersion: String(rv),
            annotations: { 'k8s.io/initial-events-end': 'true' },
          },
        },
      })}\n`,
    );
    w.pending = parts.join('');
  } else {
    w.pos = r.after(Number(q.get('resourceVersion') || rv));
  }
  r.watchers.add(w);
  pump(w);
  // after the log, hold the watch open until its timeout, as a quiet server does
  const timer = setTimeout(() => res.end(), timeout * 1000);
  res.on('close', () => {
    clearTimeout(timer);
    r.watchers.delete(w);
  });
}

function page(q: URLSearchParams, r: Resource<Obj>): string {
  const cont = q.get('continue');
  let snap = cont ? r.snapshots.get(cont.split(':')[0]) : undefined;
  let key = cont?.split(':')[0] ?? '';
  if (!snap) {
    key = `s${r.snapshots.size}`;
    snap = { rv, items: [...r.state.values()].map(r.json) };
    r.snapshots.set(key, snap);
  }
  const start = cont ? Number(cont.split(':')[1]) : 0;
  const limit = Number(q.get('limit') || snap.items.length || 1);
  const end = Math.min(start + limit, snap.items.length);
  const meta: Record<string, string> = { resourceVersion: String(snap.rv) };
  if (end < snap.items.length) meta.continue = `${key}:${end}`;
  else r.snapshots.delete(key);
  return `{"apiVersion":"${r.apiVersion}","kind":"${r.kind}List","metadata":${JSON.stringify(meta)},"items":[${snap.items.slice(start, end).join(',')}]}`;
}

// ---- writes ----
function body(req: IncomingMessage, then: (text: string) => void) {
  let text = '';
  req.setEncoding('utf8');
  req.on('data', (c) => {
    text += c;
  });
  // setTimeout(…, 0) would still wait a timer tick (about 1 ms): only delay when asked to
  req.on('end', () => (latencyMs > 0 ? setTimeout(() => then(text), latencyMs) : then(text)));
}

function send(res: ServerResponse, code: number, obj: string) {
  lastWriteAt = performance.timeOrigin + performance.now();
  res.writeHead(code, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(obj),
  });
  res.end(obj);
}

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

const isEqual = (a: unknown, b: unknown) => JSON.stringify(a) === JSON.stringify(b);

/** RFC 6902 on the parts of a book a status patch can see: metadata.uid (test only) and status. */
function jsonPatch(e: Book, ops: unknown): { status?: unknown; code?: number; message?: string } {
  if (!Array.isArray(ops)) return { code: 400, message: 'the body is not a JSON patch' };
  let current: unknown = e.status ? JSON.parse(e.status) : undefined;
  for (const op of ops as { op?: string; path?: string; value?: unknown }[]) {
    if (op.op === 'test') {
      const actual =
        op.path === '/metadata/uid'
          ? e.uid
          : op.path === '/metadata/generation'
            ? e.gen
            : op.path === '/status'
              ? current
              : undefined;
      if (!isEqual(actual, op.value))
        return {
          code: 422,
          message: `the server rejected our request due to an error in our request`,
        };
    } else if ((op.op === 'add' || op.op === 'replace') && op.path === '/status') {
      if (op.op === 'replace' && current === undefined)
        return {
          code: 422,
          message: 'replace operation does not apply: doc is missing path: /status',
        };
      current = op.value;
    } else if (op.op === 'remove' && op.path === '/status') current = undefined;
    else return { code: 422, message: `the fake server does not do ${op.op} ${op.path}` };
  }
  return { status: current };
}

function patchStatus(req: IncomingMessage, res: ServerResponse, name: string) {
  body(req, (text) => {
    counts.statusPatches++;
    const type = String(req.headers['content-type']);
    const isJsonPatch = type.startsWith('application/json-patch+json');
    if (!isJsonPatch && !type.startsWith('application/merge-patch+json')) {
      return status(
        res,
        415,
        'UnsupportedMediaType',
        `the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml`,
      );
    }
    const e = books$.state.get(name);
    if (!e) {
      counts.statusPatches404++;
      return status(res, 404, 'NotFound', `books.example.technosophos.com "${name}" not found`);
    }
    let patch: unknown;
    try {
      patch = JSON.parse(text);
    } catch {
      return status(res, 400, 'BadRequest', 'the body is not JSON');
    }
    let next: unknown;
    if (isJsonPatch) {
      const result = jsonPatch(e, patch);
      if (result.code) {
        if (result.code === 422) counts.statusPatches422++;
        return status(res, result.code, 'Invalid', result.message ?? '');
      }
      next = result.status;
    } else {
      const current = e.status ? JSON.parse(e.status) : {};
      next = merge(current, (patch as { status?: unknown }).status ?? {});
    }
    const text2 = next === undefined ? '' : JSON.stringify(next);
    if (text2 === e.status) {
      counts.statusUnchanged++;
      return send(res, 200, bookJson(e));
    }
    e.status = text2;
    e.readyGen = readyAt(next as Json | undefined);
    e.rv = ++rv;
    if (created.names.has(name) && e.readyGen === e.gen) {
      created.names.delete(name);
      if (++created.ready === created.n) created.tReady = performance.now();
    }
    send(res, 200, bookJson(e));
    books$.record('MODIFIED', e);
    books$.pump();
  });
}

function apply(req: IncomingMessage, res: ServerResponse, name: string, q: URLSearchParams) {
  body(req, (text) => {
    counts.applies++;
    const type = String(req.headers['content-type']);
    if (!type.startsWith('application/apply-patch+yaml')) {
      counts.other++;
      return status(res, 415, 'UnsupportedMediaType', `this fake applies only apply patches`);
    }
    const manager = q.get('fieldManager');
    if (!manager)
      return status(
        res,
        400,
        'BadRequest',
        'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: is required for apply patch',
      );
    let o: { kind?: string; apiVersion?: string; metadata?: Json; data?: Json };
    try {
      o = JSON.parse(text);
    } catch {
      return status(res, 400, 'BadRequest', 'the body is not JSON (this fake reads no YAML)');
    }
    if (o.kind !== 'ConfigMap' || o.apiVersion !== 'v1' || o.metadata?.name !== name)
      return status(res, 400, 'BadRequest', 'the body is not the ConfigMap of this path');
    const labels = (o.metadata?.labels ?? {}) as Json;
    const refs = (o.metadata?.ownerReferences ?? []) as Ref[];
    const before = cms$.state.get(name);
    const mine = refs.find((r) => r.controller);
    if (before?.owner && before.manager !== manager && mine && mine.uid !== before.owner) {
      counts.applies422++;
      return status(
        res,
        422,
        'Invalid',
        `ConfigMap "${name}" is invalid: metadata.ownerReferences: Invalid value: []v1.OwnerReference{...}: Only one reference can have Controller set to true`,
      );
    }
    const time = new Date().toISOString().replace(/\.\d+Z$/, 'Z');
    const cmUid = before?.uid ?? `0c0ffee0-00cf-4000-8000-${String(++cmSerial).padStart(12, '0')}`;
    const born = before ? CREATED : time;
    const next = makeConfigMap(name, cmUid, labels, refs, o.data ?? {}, manager, time, born);
    if (before && before.content === next.content) {
      counts.appliesUnchanged++;
      return send(res, 200, cmJson(before));
    }
    next.rv = ++rv;
    cms$.state.set(name, next);
    if (!before) counts.appliesCreated++;
    send(res, before ? 200 : 201, cmJson(next));
    cms$.record(before ? 'MODIFIED' : 'ADDED', next);
    collect(name);
    cms$.pump();
  });
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

function stats(full: boolean) {
  let notReady = 0;
  let cmWrong = 0;
  for (const e of books$.state.values()) {
    if (e.readyGen !== e.gen) notReady++;
    if (full && cms$.state.get(e.name)?.content !== e.want) cmWrong++;
  }
  return {
    ...counts,
    books: books$.state.size,
    configMaps: cms$.state.size,
    notReady,
    cmWrong: full ? cmWrong : NaN,
    openWatches: books$.watchers.size + cms$.watchers.size,
    openBookWatches: books$.watchers.size,
    openCmWatches: cms$.watchers.size,
    rv,
    created: created.n,
    createdReady: created.ready,
    readyMs: created.tReady ? created.tReady - created.t0 : NaN,
    sinceFirstMs: tFirst ? performance.now() - tFirst : NaN,
    lastPatchAt: lastWriteAt,
  };
}

function create(n: number) {
  created = { n, t0: performance.now(), ready: 0, tReady: 0, names: new Set() };
  for (let i = 0; i < n; i++) {
    const name = `ready-${String(i).padStart(6, '0')}`;
    const u = uid('0002', i);
    const title = listTitle(name, i);
    const e: Book = {
      name,
      uid: u,
      head: bookHead(name, u, 1),
      spec: JSON.stringify({ title, authors: authors(i) }),
      gen: 1,
      rv: ++rv,
      status: '',
      readyGen: -1,
      want: wanted(name, u, title, authors(i)),
    };
    books$.state.set(name, e);
    created.names.add(name);
    books$.record('ADDED', e);
  }
  counts.generations += n;
  books$.pump();
}

const notFound = (res: ServerResponse, req: IncomingMessage, path: string) => {
  counts.other++;
  return status(
    res,
    404,
    'NotFound',
    `the server could not find the requested resource (${req.method} ${path})`,
  );
};

function serve(req: IncomingMessage, res: ServerResponse, path: string, q: URLSearchParams) {
  const r = path.startsWith(BOOKS) ? books$ : path.startsWith(CMS) ? cms$ : undefined;
  if (!r) return notFound(res, req, path);
  const base = r === books$ ? BOOKS : CMS;
  const rest = path.slice(base.length);
  if (rest === '') {
    if (req.method !== 'GET') return notFound(res, req, path);
    if (r === cms$ && q.get('labelSelector') !== SELECTOR) counts.cmUnselected++;
    if (q.get('watch') === 'true' || q.get('watch') === '1')
      return watch(res, q, r as Resource<Obj>);
    if (r === books$) counts.listPages++;
    else counts.cmListPages++;
    const text = page(q, r as Resource<Obj>);
    res.writeHead(200, {
      'content-type': 'application/json',
      'content-length': Buffer.byteLength(text),
    });
    return void res.end(text);
  }
  const [, name, sub, more] = rest.split('/').map(decodeURIComponent);
  if (more !== undefined || !name) return notFound(res, req, path);
  if (r === books$ && sub === 'status' && req.method === 'PATCH')
    return patchStatus(req, res, name);
  if (r === cms$ && sub === undefined && req.method === 'PATCH') return apply(req, res, name, q);
  if (sub === undefined && req.method === 'GET') {
    counts.gets++;
    const o = r.state.get(name);
    if (!o)
      return status(
        res,
        404,
        'NotFound',
        `${r === books$ ? 'books.example.technosophos.com' : 'configmaps'} "${name}" not found`,
      );
    const text = (r.json as (o: Obj) => string)(o);
    res.writeHead(200, { 'content-type': 'application/json' });
    return void res.end(text);
  }
  return notFound(res, req, path);
}

const server = createServer({ cert: SERVER_CERT, key: SERVER_KEY, keepAlive: true }, (req, res) => {
  const url = new URL(req.url ?? '/', 'https://x');
  const q = url.searchParams;
  switch (url.pathname) {
    case '/bench/stats':
      return res.end(JSON.stringify(stats(q.get('full') === '1')));
    case '/bench/reset':
      reset(q);
      return res.end('{}');
    case '/bench/burst':
      applyWorkload();
      return res.end('{}');
    case '/bench/create':
      create(Number(q.get('n')));
      return res.end('{}');
  }
  if (req.headers.authorization !== `Bearer ${TOKEN}`) {
    counts.unauthorized++;
    return status(res, 401, 'Unauthorized', 'Unauthorized');
  }
  if (!tFirst) tFirst = performance.now();
  if (!clientSockets.has(req.socket)) {
    clientSockets.add(req.socket);
    counts.connections++;
  }
  serve(req, res, url.pathname, q);
});
server.keepAliveTimeout = 60_000;
server.listen(0, '127.0.0.1', () => {
  const addr = server.address();
  process.stdout.write(
    `${JSON.stringify({ port: typeof addr === 'object' && addr ? addr.port : 0 })}\n`,
  );
});
process.on('SIGTERM', () => process.exit(0));
