// A Kubernetes controller for Book resources, in one file.
//
// It lists the books, then watches them, and calls `handle` once per change, in the order the
// API server sent them:
//
//   Added a book moby-dick with title 'Moby Dick'
//   Deleted a book moby-dick
//
// It resumes a dropped watch where it stopped, relists when the server has forgotten that point,
// backs off when things fail, and says on stderr what is wrong and what fixes it.
//
//   npx tsx controller.ts [-n NAMESPACE | -A] [--watch-timeout SECONDS]
//   deno run --allow-env --allow-read --allow-net controller.ts     or     bun controller.ts
//
// The protocol it follows: https://kubernetes.io/docs/reference/using-api/api-concepts/

import * as http from 'node:http';
import * as https from 'node:https';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import type { KubeConfig } from '@kubernetes/client-node';

// ---------------------------------------------------------------------------------------------
// The resource: books.example.technosophos.com/v1, installed by crd.yaml.

const GROUP = 'example.technosophos.com';
const VERSION = 'v1';
const PLURAL = 'books';

export interface Book {
  metadata: { name: string; namespace?: string; resourceVersion: string };
  spec: { title: string; authors?: string[] };
}

/**
 * Checks an object from the server once, at the edge: returns the Book in it, or says why there is none.
 * It keeps only the fields the type names, so the handler sees what the type promises and the cache stays small.
 */
export function checkBook(object: unknown): Book | string {
  const { metadata, spec } = (object ?? {}) as { metadata?: Record<string, unknown>; spec?: Record<string, unknown> };
  const { name, namespace, resourceVersion } = metadata ?? {};
  if (typeof name !== 'string' || typeof resourceVersion !== 'string') return 'it has no metadata';
  if (typeof spec !== 'object' || spec === null) return 'it has no spec';
  const { title, authors } = spec;
  if (typeof title !== 'string') return 'spec.title is not a string';
  const authorsOk = authors === undefined || (Array.isArray(authors) && authors.every((a): a is string => typeof a === 'string'));
  if (!authorsOk) return 'spec.authors is not a list of strings';
  const book: Book = { metadata: { name, resourceVersion }, spec: { title } };
  if (typeof namespace === 'string') book.metadata.namespace = namespace;
  if (authors) book.spec.authors = authors;
  return book;
}

interface BookList { metadata: { resourceVersion: string; continue?: string }; items: unknown[] | null }

// One line of a watch stream. ADDED, MODIFIED and DELETED carry a book (checkBook decides if it is
// one), BOOKMARK only a newer resourceVersion, ERROR a Status.
type WatchEvent =
  | { type: 'ADDED' | 'MODIFIED' | 'DELETED' | 'BOOKMARK'; object: { metadata: { resourceVersion: string } } }
  | { type: 'ERROR'; object: Status };

/** The body of every API error response, and the object of an ERROR event. */
interface Status { code?: number; message?: string }

// ---------------------------------------------------------------------------------------------
// Configuration: the cluster from the kubeconfig, the rest from flags.

export interface Config {
  kubeConfig: KubeConfig;
  server: string;
  namespace: string | undefined; // undefined: all namespaces
  watchTimeoutSeconds: number;
}

const USAGE = `Usage: npx tsx controller.ts [options]

Watches Book resources (${PLURAL}.${GROUP}) and prints one line per change.

Options:
  -n, --namespace NS           watch namespace NS (default: the kubeconfig context's, else "default")
  -A, --all-namespaces         watch every namespace; books are named NAMESPACE/NAME
      --watch-timeout SECONDS  ask the server to end each watch after SECONDS; it resumes (default 300)
  -h, --help                   show this help

The cluster and credentials come from KUBECONFIG, ~/.kube/config or the pod's service account.`;

// client-node's HTTP stack (undici) needs Node 22.19; Deno and Bun bring their own.
const NODE_NEEDED = '22.19';

/** Reads the flags and the kubeconfig; returns the configuration, or the exit code when there is nothing to run. */
export async function loadConfig(args: string[]): Promise<Config | number> {
  const { values: flags } = parseArgs({
    args,
    options: {
      namespace: { type: 'string', short: 'n' },
      'all-namespaces': { type: 'boolean', short: 'A' },
      'watch-timeout': { type: 'string', default: '300' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (flags.help) {
    console.log(USAGE);
    return 0;
  }
  const watchTimeoutSeconds = Number(flags['watch-timeout']);
  if (!Number.isInteger(watchTimeoutSeconds) || watchTimeoutSeconds < 1) {
    return fail(2, `--watch-timeout takes a whole number of seconds, not '${flags['watch-timeout']}' — see --help`);
  }
  const { node, bun, deno } = process.versions;
  if (!bun && !deno && node.localeCompare(NODE_NEEDED, 'en', { numeric: true }) < 0) {
    return fail(1, `this controller needs Node ${NODE_NEEDED} or newer, and this is Node ${node}: ` +
      'run it with npx -y -p node@24 tsx controller.ts, or install Node 24 (nvm install 24)');
  }
  // Imported here, after the check, so that an old Node gets the line above instead of a crash inside undici.
  const { KubeConfig } = await import('@kubernetes/client-node');
  const kubeConfig = new KubeConfig();
  try {
    kubeConfig.loadFromDefault(); // KUBECONFIG, ~/.kube/config, or the in-cluster service account
  } catch (err) {
    return fail(1, `cannot load the kubeconfig: ${messageOf(err)} — check KUBECONFIG or ~/.kube/config`);
  }
  const context = kubeConfig.getContextObject(kubeConfig.getCurrentContext());
  const server = kubeConfig.getCurrentCluster()?.server;
  const noCluster = `the kubeconfig's current context '${kubeConfig.getCurrentContext()}' names no cluster`;
  if (!server) return fail(1, `${noCluster} — pick one with kubectl config use-context NAME`);
  const namespace = flags['all-namespaces'] ? undefined : (flags.namespace ?? context?.namespace ?? 'default');
  return { kubeConfig, server, namespace, watchTimeoutSeconds };
}

// ---------------------------------------------------------------------------------------------
// List and watch: plain GETs over node:https, with the kubeconfig's CA and credentials.

/** An error response from the API server, or an ERROR event in a watch: its HTTP code and Status message. */
type ApiError = Error & { code: number; verb: 'list' | 'watch'; retryAfterSeconds: number };
const apiError = (code: number, message: string, verb: ApiError['verb'], retryAfterSeconds = 0): ApiError =>
  Object.assign(new Error(message), { code, verb, retryAfterSeconds });
const isApiError = (err: unknown): err is ApiError => typeof (err as ApiError)?.verb === 'string';

async function get(config: Config, verb: 'list' | 'watch', query: URLSearchParams, signal: AbortSignal) {
  const namespace = config.namespace ? `/namespaces/${config.namespace}` : '';
  const url = new URL(`${config.server.replace(/\/$/, '')}/apis/${GROUP}/${VERSION}${namespace}/${PLURAL}?${query}`);
  const options: https.RequestOptions = { signal, headers: { Accept: 'application/json' } };
  await config.kubeConfig.applyToHTTPSOptions(options); // on every request: exec and OIDC credentials refresh here
  // client-node's agent closes the connection after each request; the runtime's global agent keeps it
  // open, sparing a TLS handshake per list page. Only a proxy-url in the kubeconfig needs client-node's.
  if (!config.kubeConfig.getCurrentCluster()?.proxyUrl) options.agent = undefined;
  const response = await new Promise<http.IncomingMessage>((resolve, reject) =>
    (url.protocol === 'http:' ? http : https).request(url, options, resolve).on('error', reject).end());
  if (signal.aborted) { // Deno lets a response in after its request was aborted
    response.destroy();
    throw signal.reason;
  }
  response.setEncoding('utf8'); // decodes across chunk boundaries, even inside a multi-byte character
  if (response.statusCode === 200) return response;
  const body = await readAll(response);
  const status: Status = body.startsWith('{') ? JSON.parse(body) : { message: body };
  const retryAfter = Number(response.headers['retry-after']) || 0;
  throw apiError(response.statusCode ?? 0, status.message ?? `HTTP ${response.statusCode}`, verb, retryAfter);
}

async function readAll(response: http.IncomingMessage): Promise<string> {
  let body = '';
  for await (const chunk of response) body += chunk;
  return body;
}

/**
 * A connection can die without a word (a half-open TCP connection) and leave us waiting for ever. The
 * server answers a list, and ends a watch, within the watch timeout: past that, plus a grace, start over.
 */
function deadline(config: Config, verb: 'list' | 'watch', signal: AbortSignal) {
  const seconds = config.watchTimeoutSeconds + 5;
  const timeout = AbortSignal.timeout(seconds * 1000);
  const explain = (err: unknown) => (timeout.aborted ? new Error(`the ${verb} was not over after ${seconds}s`) : err);
  return { signal: AbortSignal.any([signal, timeout]), explain };
}

/** Lists every book, a page at a time; each page carries the list's resourceVersion. */
async function* listBooks(config: Config, signal: AbortSignal): AsyncGenerator<BookList> {
  const query = new URLSearchParams({ limit: '500' });
  do {
    const limit = deadline(config, 'list', signal);
    const body = await get(config, 'list', query, limit.signal).then(readAll).catch((err) => {
      throw limit.explain(err);
    });
    const page: BookList = JSON.parse(body);
    yield page;
    // A continue token expires after a few minutes (HTTP 410): the caller then lists again from scratch.
    query.set('continue', page.metadata.continue ?? '');
  } while (query.get('continue'));
}

/** Watches books changed after `resourceVersion`, yielding the events of each chunk; returns when the server ends the stream. */
async function* watchBooks(config: Config, resourceVersion: string, signal: AbortSignal): AsyncGenerator<WatchEvent[]> {
  // Bookmarks tell even an idle watch the newer resourceVersions to resume from. At timeoutSeconds
  // the server ends the watch, and we resume: a connection is never trusted for ever.
  const timeoutSeconds = String(config.watchTimeoutSeconds);
  const query = new URLSearchParams({ watch: 'true', resourceVersion, allowWatchBookmarks: 'true', timeoutSeconds });
  const limit = deadline(config, 'watch', signal);
  let response: http.IncomingMessage | undefined;
  try {
    response = await get(config, 'watch', query, limit.signal);
    let partial = '';
    for await (const chunk of response) {
      const lines = (partial + chunk).split('\n');
      partial = lines.pop() ?? '';
      yield lines.filter((line) => line.trim()).map(parseEvent);
    }
    if (partial.trim()) throw new Error('the watch ended in the middle of an event');
  } catch (err) {
    throw limit.explain(err);
  } finally {
    response?.destroy();
  }
}

/** Parses one line of a watch stream, checking what the loop relies on: its type and resourceVersion. */
function parseEvent(line: string): WatchEvent {
  let event: { type?: unknown; object?: { metadata?: { resourceVersion?: unknown } } } | null = null;
  try {
    event = JSON.parse(line);
  } catch {} // reported below
  const isChange = ['ADDED', 'MODIFIED', 'DELETED', 'BOOKMARK'].includes(String(event?.type));
  if (event?.type === 'ERROR' || (isChange && typeof event?.object?.metadata?.resourceVersion === 'string')) {
    return event as WatchEvent;
  }
  throw new Error(`the watch sent a line that is not a watch event: ${line.slice(0, 60)}`);
}

export type BookEventType = 'Added' | 'Modified' | 'Deleted';
export type Handler = (type: BookEventType, book: Book, name: string) => void | Promise<void>;
type Change = Parameters<Handler>;

/**
 * Lists the books, then watches them for ever, calling `handle` once per change and waiting for it
 * before the next. Returns only when `signal` aborts; every failure is reported and retried.
 */
export async function listAndWatch(config: Config, handle: Handler, signal: AbortSignal): Promise<void> {
  const known = new Map<string, Book>(); // what `handle` has been told, by namespace/name
  let resourceVersion = ''; // where the next watch starts; empty: list first
  let failures = 0; // in a row, for the backoff

  const keyOf = (object: unknown) => {
    const { namespace = '', name = '' } = (object as { metadata?: Partial<Book['metadata']> })?.metadata ?? {};
    return { key: `${namespace}/${name}`, name: config.namespace ? name : `${namespace}/${name}` };
  };
  // upsert and remove bring `known` up to date and return what the handler must be told, if anything.
  const upsert = (object: unknown, listed?: Set<string>): Change | undefined => {
    const { key, name } = keyOf(object);
    listed?.add(key);
    const book = checkBook(object);
    if (typeof book === 'string') {
      console.error(`ignoring book ${name}: ${book} — fix it with kubectl edit book ${name}`);
      return undefined;
    }
    const before = known.get(key);
    if (before?.metadata.resourceVersion === book.metadata.resourceVersion) return undefined; // nothing new
    known.set(key, book);
    return [before ? 'Modified' : 'Added', book, name];
  };
  const remove = (object: unknown): Change | undefined => {
    const { key, name } = keyOf(object);
    const book = known.get(key);
    if (!book) return undefined;
    known.delete(key);
    return ['Deleted', book, name];
  };
  const tell = async (change: Change | undefined) => {
    if (!change) return;
    signal.throwIfAborted(); // once stopped, not one more call
    try {
      await handle(...change);
    } catch (err) {
      console.error(`the handler failed on book ${change[2]}: ${messageOf(err)}`); // and the watch goes on
    }
  };

  while (!signal.aborted) {
    try {
      if (!resourceVersion) {
        // A (re)list: whatever we knew and the list lacks was deleted while we were not watching.
        const listed = new Set<string>();
        let listedAt = '';
        for await (const page of listBooks(config, signal)) {
          printTogether();
          for (const object of page.items ?? []) await tell(upsert(object, listed));
          listedAt = page.metadata.resourceVersion;
        }
        for (const [key, book] of known) if (!listed.has(key)) await tell(remove(book));
        resourceVersion = listedAt;
      }
      const started = Date.now();
      let events = 0;
      for await (const chunk of watchBooks(config, resourceVersion, signal)) {
        printTogether();
        for (const event of chunk) {
          if (event.type === 'ERROR') {
            throw apiError(event.object.code ?? 500, event.object.message ?? 'ERROR event', 'watch');
          }
          if (event.type === 'DELETED') await tell(remove(event.object));
          else if (event.type !== 'BOOKMARK') await tell(upsert(event.object)); // a bookmark only moves resourceVersion
          resourceVersion = event.object.metadata.resourceVersion;
          events++;
          failures = 0;
        }
      }
      // The server ended the watch (its timeout): routine, resume at once. Unless it does so at once, every time.
      if (events === 0 && Date.now() - started < 1000) throw new Error('the watch ended at once, without any event');
    } catch (err) {
      if (signal.aborted) break;
      // 410 Gone: the server no longer has the history since our resourceVersion (or the list's
      // continue token expired). Only a new list tells what changed meanwhile; once is routine, so quiet.
      const gone = isApiError(err) && err.code === 410;
      if (gone) resourceVersion = '';
      const delayMs = retryDelayMs(failures++, err);
      if (!gone || failures > 1) console.error(explain(err, config, delayMs));
      await sleep(delayMs, undefined, { signal }).catch(() => {});
    }
  }
}

/** Exponential backoff from ~0.5 s to 30 s with jitter (so that restarted controllers spread out), or what a 429 asked. */
function retryDelayMs(failures: number, err: unknown): number {
  if (isApiError(err) && err.retryAfterSeconds > 0) return err.retryAfterSeconds * 1000;
  const ceiling = Math.min(30_000, 500 * 2 ** failures);
  return ceiling / 2 + (Math.random() * ceiling) / 2;
}

/** One stderr line: what failed, that we retry, and what would fix it. */
function explain(err: unknown, { server, namespace, kubeConfig }: Config, delayMs: number): string {
  const retrying = `retrying in ${(delayMs / 1000).toFixed(1)}s`;
  const code = (err as { code?: unknown })?.code;
  // With nothing to load, client-node falls back to http://localhost:8080 under this context name.
  if (kubeConfig.getCurrentContext() === 'loaded-context') {
    return `no kubeconfig found (KUBECONFIG, ~/.kube/config or a pod's service account); ${retrying}` +
      ' — set KUBECONFIG, or create a cluster (kind create cluster)';
  }
  if (isApiError(err)) {
    const books = `${PLURAL}.${GROUP}`;
    switch (code) {
      case 401:
        return `${server} does not accept our credentials (401 Unauthorized); ${retrying}` +
          ' — refresh them in your kubeconfig (kubectl auth whoami)';
      case 403:
        return `not allowed to ${err.verb} books in ${namespace ? `namespace ${namespace}` : 'all namespaces'}` +
          ` (403: ${err.message}); ${retrying} — grant list and watch on ${books}` +
          ` (kubectl auth can-i ${err.verb} ${books} ${namespace ? `-n ${namespace}` : '-A'})`;
      case 404:
        return `the Book CRD is not installed on ${server} (404: ${err.message}); ${retrying} — kubectl apply -f crd.yaml`;
      case 429:
        return `${server} is busy (429: ${err.message}); ${retrying}`;
      default:
        return `${server} failed to ${err.verb} books (${code}: ${err.message}); ${retrying}`;
    }
  }
  if (typeof code === 'string' && /^(ECONNREFUSED|ENOTFOUND|EAI_AGAIN|ETIMEDOUT|EHOSTUNREACH|ENETUNREACH)$/.test(code)) {
    return `cannot reach ${server} (${code}); ${retrying} — is the cluster running? (kubectl cluster-info)`;
  }
  if (code === 'ECONNRESET' || code === 'EPIPE') return `lost the connection to ${server} (${code}); ${retrying}`;
  if (typeof code === 'string' && /CERT|SELF_SIGNED|SIGNATURE|ALTNAME/.test(code)) {
    return `the TLS certificate of ${server} did not verify (${code}); ${retrying}` +
      ' — check certificate-authority-data in your kubeconfig';
  }
  return `${messageOf(err)} (${server}); ${retrying}`;
}

/** The first line of an error's message: every diagnostic is one line. */
function messageOf(err: unknown): string {
  return (err instanceof Error ? err.message : String(err)).trim().split('\n')[0] ?? '';
}

function fail(exitCode: number, message: string): number {
  console.error(message);
  return exitCode;
}

/** The lines printed from now until the next tick leave stdout in one write, not one write each. */
function printTogether() {
  process.stdout.cork();
  process.nextTick(() => process.stdout.uncork());
}

// ---------------------------------------------------------------------------------------------
// The handler: your code goes here.

/**
 * Called once per change of a book, in the order the server sent them; the next call waits until
 * this one has finished. `name` is the book's name, or NAMESPACE/NAME with --all-namespaces.
 * If it throws, the error is reported on stderr and the watch goes on.
 */
export async function handle(event: BookEventType, book: Book, name: string): Promise<void> {
  switch (event) {
    case 'Added':
    case 'Modified':
      console.log(`${event} a book ${name} with title '${book.spec.title}'`);
      break;
    case 'Deleted':
      console.log(`Deleted a book ${name}`);
      break;
    default: // a new kind of event must be handled above
      event satisfies never;
  }
}

// ---------------------------------------------------------------------------------------------
// Main: flags and kubeconfig, then list and watch until SIGINT or SIGTERM.

/** Runs the controller until `signal` aborts; returns the process exit code. */
export async function main(args: string[], signal: AbortSignal): Promise<number> {
  let config: Config | number;
  try {
    config = await loadConfig(args);
  } catch (err) {
    return fail(2, `${messageOf(err)} — see --help`); // parseArgs: an unknown or malformed flag
  }
  if (typeof config === 'number') return config;
  await listAndWatch(config, handle, signal);
  return 0;
}

// Runs only as the entry point, not when imported by the tests. Node 22 and tsx lack import.meta.main.
const isEntryPoint = (import.meta as { main?: boolean }).main ?? process.argv[1] === fileURLToPath(import.meta.url);
if (isEntryPoint) {
  const stop = new AbortController();
  process.once('SIGINT', () => stop.abort());
  process.once('SIGTERM', () => stop.abort());
  process.exit(await main(process.argv.slice(2), stop.signal));
}

// Where to go next: a status subresource written back by the handler; a work queue keyed by book,
// so that a slow handler does not hold up other books; leader election for more than one replica.
