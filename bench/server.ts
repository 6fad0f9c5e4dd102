// A loopback HTTPS API server for the benchmark: a paginated list of N books,
// then M watch events streamed as fast as the socket takes them.
//
// It runs in its own process (bench.ts starts it) so that serializing and
// encrypting the stream does not delay the bench process's event loop, which
// timestamps the client's output lines. Everything is serialized before the
// server listens, so a request costs only socket writes.
//
// usage: node bench/server.ts BOOKS EVENTS CERT KEY TOKEN   (prints {"port":…})
import { createServer } from 'node:https';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { readFileSync } from 'node:fs';
import { bookNames, listTitle, watchEvents, type Book } from './workload.ts';

const [books, events, certFile, keyFile, token] = process.argv.slice(2);
const N = Number(books);
const M = Number(events);
const PATH = '/apis/example.technosophos.com/v1/namespaces/default/books';
const API_VERSION = 'example.technosophos.com/v1';

// ---- the data: list items, their list RV, and the event log after it ----
function book(name: string, rv: number, title: string): Book {
  return {
    apiVersion: API_VERSION,
    kind: 'Book',
    metadata: {
      name,
      namespace: 'default',
      resourceVersion: String(rv),
      uid: `0b00c0de-0000-4000-8000-${String(rv).padStart(12, '0')}`,
      creationTimestamp: '2026-11-25T10:00:00Z',
      generation: 1,
    },
    spec: { title, authors: ['Herman Melville', `Editor ${rv % 97}`] },
  };
}

const names = bookNames(N);
const items = names.map((name, i) => JSON.stringify(book(name, i + 1, listTitle(name, i))));
const listRV = N; // book i has RV i+1; the list is at RV N

// Event j carries RV N+1+j. Bookmarks every 1000 events move the RV only.
const lines: string[] = [];
const firstLineOfEvent: number[] = []; // index into lines, per event
for (const e of watchEvents(N, M)) {
  firstLineOfEvent.push(lines.length);
  const rv = listRV + 1 + e.index;
  const obj = book(e.name, rv, e.title ?? `Deleted ${e.name}`);
  lines.push(JSON.stringify({ type: e.type, object: obj }) + '\n');
  if ((e.index + 1) % 1000 === 0) {
    lines.push(JSON.stringify({
      type: 'BOOKMARK',
      object: { apiVersion: API_VERSION, kind: 'Book', metadata: { resourceVersion: String(rv) } },
    }) + '\n');
  }
}
// byte offset of each event in the whole stream, so a watch from RV X starts after X
const stream = Buffer.from(lines.join(''));
const offsets: number[] = [];
{
  let off = 0, e = 0;
  for (let l = 0; l < lines.length; l++) {
    if (firstLineOfEvent[e] === l) { offsets.push(off); e++; }
    off += Buffer.byteLength(lines[l]);
  }
  offsets.push(stream.length);
}

const pageCache = new Map<string, Buffer>();
function page(start: number, limit: number): Buffer {
  const key = `${start}/${limit}`;
  let body = pageCache.get(key);
  if (!body) {
    const end = Math.min(start + limit, N);
    const meta: Record<string, string> = { resourceVersion: String(listRV) };
    if (end < N) meta.continue = `c${end}`;
    body = Buffer.from(`{"apiVersion":"${API_VERSION}","kind":"BookList","metadata":${JSON.stringify(meta)},"items":[${items.slice(start, end).join(',')}]}`);
    pageCache.set(key, body);
  }
  return body;
}
for (let s = 0; s < N; s += 500) page(s, 500); // what every client asks for
if (N === 0) page(0, 500);

// ---- HTTP ----
function status(res: ServerResponse, code: number, reason: string, message: string) {
  res.writeHead(code, { 'content-type': 'application/json' });
  res.end(JSON.stringify({ kind: 'Status', apiVersion: 'v1', metadata: {}, status: 'Failure', message, reason, code }));
}

function watch(req: IncomingMessage, res: ServerResponse, q: URLSearchParams) {
  const rv = Number(q.get('resourceVersion') || listRV);
  const first = Math.max(0, Math.min(M, rv - listRV)); // first event with RV > rv
  const timeout = Number(q.get('timeoutSeconds') || 300);
  res.writeHead(200, { 'content-type': 'application/json', 'transfer-encoding': 'chunked' });
  res.flushHeaders();
  let off = offsets[first];
  const CHUNK = 64 * 1024;
  const pump = () => {
    while (off < stream.length) {
      const end = Math.min(off + CHUNK, stream.length);
      const more = res.write(stream.subarray(off, end));
      off = end;
      if (!more) { res.once('drain', pump); return; }
    }
  };
  pump();
  // after the log, hold the watch open until its timeout, as a quiet server does
  const timer = setTimeout(() => res.end(), timeout * 1000);
  req.on('close', () => clearTimeout(timer));
}

// per run, read and reset by the bench through GET /bench-stats
let stats = { connections: 0, requests: 0 };
const server = createServer({ cert: readFileSync(certFile), key: readFileSync(keyFile), keepAlive: true }, (req, res) => {
  const url = new URL(req.url ?? '/', 'https://x');
  if (url.pathname === '/bench-stats') {
    res.end(JSON.stringify(stats));
    stats = { connections: 0, requests: 0 };
    return;
  }
  stats.requests++;
  if (req.headers.authorization !== `Bearer ${token}`) return status(res, 401, 'Unauthorized', 'Unauthorized');
  if (req.method !== 'GET' || url.pathname !== PATH) return status(res, 404, 'NotFound', `the server could not find the requested resource ${url.pathname}`);
  const q = url.searchParams;
  if (q.get('watch') === 'true' || q.get('watch') === '1') return watch(req, res, q);
  const cont = q.get('continue');
  const start = cont ? Number(cont.slice(1)) : 0;
  const limit = Number(q.get('limit') || N || 1);
  const body = page(start, limit);
  res.writeHead(200, { 'content-type': 'application/json', 'content-length': body.length });
  res.end(body);
});
server.on('secureConnection', () => stats.connections++);
server.keepAliveTimeout = 60_000;
server.listen(0, '127.0.0.1', () => {
  const addr = server.address();
  process.stdout.write(JSON.stringify({ port: typeof addr === 'object' && addr ? addr.port : 0 }) + '\n');
});
process.on('SIGTERM', () => process.exit(0));
