// A Kubernetes controller for Book resources, in one file.
//
// It keeps a cache of the books up to date (list, then watch), and reconciles each book that
// changed: your `reconcile` below runs, one line is printed, and the book's status says how it went.
//
//   Added a book moby-dick with title 'Moby Dick'
//   Deleted a book moby-dick
//
// It resumes a dropped watch where it stopped, relists when the server has forgotten that point,
// retries a failed reconcile with backoff, runs as replicas with one leader, and says on stderr
// what is wrong and what fixes it.
//
//   npx tsx controller.ts [-n NAMESPACE | -A] [-l SELECTOR] [-o json] ...      (--help for all)
//   npx -y deno@2 run --allow-env --allow-read --allow-net --allow-sys controller.ts     npx -y bun@1 controller.ts
//
// The protocol it follows: https://kubernetes.io/docs/reference/using-api/api-concepts/

import { randomUUID } from 'node:crypto';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import { hostname } from 'node:os';
import type { Writable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import type { KubeConfig } from '@kubernetes/client-node';

// =============================================================================================
// What you change: the resource, its check, and what a reconcile does.

// books.example.technosophos.com/v1, installed by crd.yaml. Every message below is worded from these.
export const GROUP = 'example.technosophos.com';
export const VERSION = 'v1';
export const KIND = 'Book';
export const PLURAL = 'books';

export interface BookSpec {
  title: string;
  authors?: string[];
}

/**
 * Checks a book's spec once, where it comes in from the server: returns the spec, or why it is not one.
 * It keeps only the fields named here: a field added to BookSpec must be copied here too, or it is dropped.
 */
export function checkSpec(spec: Record<string, unknown>): BookSpec | string {
  const { title, authors } = spec;
  if (typeof title !== 'string') return 'spec.title is not a string';
  if (authors === undefined) return { title };
  if (!Array.isArray(authors) || !authors.every((author) => typeof author === 'string')) {
    return 'spec.authors is not a list of strings';
  }
  return { title, authors };
}

/** The line printed for each change a reconcile saw; with -o json, the same facts as one JSON object. */
export function describe(change: Change, book: Book, name: string): string {
  return change === 'Deleted'
    ? `Deleted a ${kind} ${name}`
    : `${change} a ${kind} ${name} with title '${book.spec.title}'`;
}

/**
 * Your code goes here: make the world match the book.
 *
 * Called by a worker when a book changed since its last successful reconcile: Added, Modified (its
 * spec changed: metadata.generation), or Deleted (with the last book seen). Never twice at once for
 * one book. When it returns, the change is printed and the book's status says Ready. If it throws, the
 * status says why and the book is tried again later, with backoff. `signal` aborts when the controller stops
 * or stops leading: stop then, since another replica takes over.
 */
export async function reconcile(
  change: Change,
  _book: Book,
  _name: string,
  _signal: AbortSignal,
): Promise<void> {
  switch (change) {
    case 'Added':
    case 'Modified':
      break; // e.g. create or update what the book describes, passing `signal` on to any request
    case 'Deleted':
      break; // e.g. clean up what it described
    default: // a new kind of change must be handled above
      change satisfies never;
  }
}

// =============================================================================================
// The machinery: nothing below needs changing for another resource.

const kind = KIND.toLowerCase();
const resource = `${PLURAL}.${GROUP}`;

export type Change = 'Added' | 'Modified' | 'Deleted';
export type Reconcile = typeof reconcile;

export interface Book {
  metadata: { name: string; namespace: string; uid: string; generation: number | string };
  spec: BookSpec;
}

/** Checks an object from the server: returns the Book in it, keeping only what the controller uses, or why there is none. */
export function checkBook(object: unknown): Book | string {
  const { metadata = {}, spec } = object as { metadata?: Record<string, unknown>; spec?: unknown };
  const { name, namespace = '', uid = '', generation, resourceVersion } = metadata;
  if (typeof name !== 'string' || typeof resourceVersion !== 'string') return 'it has no metadata';
  if (typeof spec !== 'object' || spec === null) return 'it has no spec';
  const checked = checkSpec(spec as Record<string, unknown>);
  if (typeof checked === 'string') return checked;
  // Where a server sets no generation, every change counts as a new spec (and no status is written).
  const version = typeof generation === 'number' ? generation : resourceVersion;
  return {
    metadata: { name, namespace: String(namespace), uid: String(uid), generation: version },
    spec: checked,
  };
}

// ---------------------------------------------------------------------------------------------
// Configuration: the cluster from the kubeconfig, the rest from flags.

export interface Config {
  kubeConfig: KubeConfig;
  server: string;
  namespace: string | undefined; // undefined: all namespaces
  selector: string | undefined;
  json: boolean;
  watchTimeoutSeconds: number;
  concurrency: number;
  leaseNamespace: string | undefined; // set by --leader-elect
  healthPort: number | undefined;
}

const USAGE = `Usage: npx tsx controller.ts [options]

Reconciles ${KIND} resources (${resource}) and prints one line per change.

Options:
  -n, --namespace NS           watch namespace NS (default: the kubeconfig context's, else "default")
  -A, --all-namespaces         watch every namespace; ${PLURAL} are named NAMESPACE/NAME
  -l, --selector SELECTOR      only ${PLURAL} whose labels match, as kubectl's (app=x,tier!=y)
  -o, --output text|json       json: one object per change, {"type","namespace","name","spec"}
      --context NAME           the kubeconfig context to use (default: its current context)
      --kubeconfig FILE        the kubeconfig to use (default: KUBECONFIG, ~/.kube/config, or the pod's)
      --watch-timeout SECONDS  ask the server to end each watch after SECONDS, 1 to 86400; it resumes (default 300)
      --concurrency N          reconcile up to N ${PLURAL} at once, 1 to 1000 (default 1)
      --leader-elect           act only while holding the Lease book-controller, so that replicas take turns
      --leader-elect-namespace NS  the Lease's namespace (default: POD_NAMESPACE, the pod's, the context's)
      --health-port PORT       serve GET /healthz and /readyz over HTTP on PORT
  -h, --help                   show this help`;

// client-node's HTTP stack (undici) needs Node 22.19; Deno and Bun bring their own.
const NODE_NEEDED = '22.19';

/** The command line's flags, as --help documents them; throws on an unknown or malformed one. */
function parseFlags(args: string[]) {
  const string = { type: 'string' } as const;
  return parseArgs({
    args,
    options: {
      namespace: { ...string, short: 'n' },
      'all-namespaces': { type: 'boolean', short: 'A' },
      selector: { ...string, short: 'l' },
      output: { ...string, short: 'o', default: 'text' },
      context: string,
      kubeconfig: string,
      'watch-timeout': { ...string, default: '300' },
      concurrency: { ...string, default: '1' },
      'leader-elect': { type: 'boolean' },
      'leader-elect-namespace': string,
      'health-port': string,
      help: { type: 'boolean', short: 'h' },
    },
  }).values;
}

/** Reads the flags and the kubeconfig; returns the configuration, or the exit code when there is nothing to run. */
export async function loadConfig(args: string[]): Promise<Config | number> {
  let flags: ReturnType<typeof parseFlags>;
  try {
    flags = parseFlags(args);
  } catch (err) {
    return fail(2, `${messageOf(err, ' ')} — see --help`); // parseArgs: an unknown or malformed flag
  }
  if (flags.help) {
    console.log(USAGE);
    return 0;
  }
  const whole = (value: string | undefined, low: number, high: number) =>
    Number.isInteger(Number(value)) && Number(value) >= low && Number(value) <= high
      ? Number(value)
      : undefined;
  const watchTimeoutSeconds = whole(flags['watch-timeout'], 1, 86400);
  const concurrency = whole(flags.concurrency, 1, 1000);
  const healthPort = whole(flags['health-port'], 0, 65535);
  const usage = (message: string) => fail(2, `${message} — see --help`);
  if (flags.namespace !== undefined && flags['all-namespaces'])
    return usage('-n and -A cannot be used together');
  if (flags.output !== 'text' && flags.output !== 'json')
    return usage(`-o takes text or json, not '${flags.output}'`);
  if (!watchTimeoutSeconds)
    return usage(
      `--watch-timeout takes whole seconds from 1 to 86400, not '${flags['watch-timeout']}'`,
    );
  if (!concurrency)
    return usage(`--concurrency takes a whole number from 1 to 1000, not '${flags.concurrency}'`);
  if (healthPort === undefined && flags['health-port'] !== undefined)
    return usage(`--health-port takes a port, not '${flags['health-port']}'`);
  if (flags['leader-elect-namespace'] && !flags['leader-elect'])
    return usage('--leader-elect-namespace needs --leader-elect');

  const { node, bun, deno } = process.versions;
  if (!bun && !deno && node.localeCompare(NODE_NEEDED, 'en', { numeric: true }) < 0) {
    return fail(
      1,
      `this controller needs Node ${NODE_NEEDED} or newer, and this is Node ${node}: ` +
        'run it with npx tsx controller.ts after npm ci (the project brings Node 24), or install Node 24 (nvm install 24)',
    );
  }
  // Imported here, after the checks, so that an old Node gets the line above instead of a crash inside undici.
  const { KubeConfig } = await import('@kubernetes/client-node');
  const kubeConfig = new KubeConfig();
  const file = flags.kubeconfig ?? process.env.KUBECONFIG ?? '~/.kube/config';
  try {
    if (flags.kubeconfig) kubeConfig.loadFromFile(flags.kubeconfig);
    else kubeConfig.loadFromDefault(); // KUBECONFIG, ~/.kube/config, or the in-cluster service account
  } catch (err) {
    return fail(
      1,
      `cannot load the kubeconfig ${file}: ${messageOf(err)} — check the file, or point --kubeconfig at another`,
    );
  }
  // With nothing to load, client-node falls back to http://localhost:8080 under this context name.
  if (kubeConfig.getCurrentContext() === 'loaded-context') {
    return fail(
      1,
      "no kubeconfig found (KUBECONFIG, ~/.kube/config or a pod's service account)" +
        ' — create a cluster (kind create cluster) or set KUBECONFIG; npm run demo shows the controller without one',
    );
  }
  if (flags.context && !kubeConfig.getContextObject(flags.context)) {
    return fail(
      1,
      `the kubeconfig ${file} has no context '${flags.context}' — list them with kubectl config get-contexts`,
    );
  }
  if (flags.context) kubeConfig.setCurrentContext(flags.context);
  const context = kubeConfig.getContextObject(kubeConfig.getCurrentContext());
  const cluster = kubeConfig.getCurrentCluster();
  if (!cluster?.server) {
    return fail(
      1,
      `the kubeconfig's context '${kubeConfig.getCurrentContext()}' names no cluster — pick another with kubectl config use-context NAME`,
    );
  }
  if (cluster.server.startsWith('http:') && !cluster.skipTLSVerify) {
    return fail(
      1,
      `the kubeconfig's server ${cluster.server} is plain HTTP, which kubectl refuses too` +
        ' — use its https:// address, or set insecure-skip-tls-verify: true on the cluster to allow it',
    );
  }
  if (cluster.skipTLSVerify) {
    console.error(
      `warning: insecure-skip-tls-verify is set, so the certificate of ${cluster.server} is not checked` +
        ' — set certificate-authority-data in the kubeconfig instead',
    );
  }
  let podNamespace: string | undefined;
  try {
    podNamespace = readFileSync(
      '/var/run/secrets/kubernetes.io/serviceaccount/namespace',
      'utf8',
    ).trim();
  } catch {} // not in a pod
  return {
    kubeConfig,
    server: cluster.server.replace(/\/$/, ''),
    namespace: flags['all-namespaces']
      ? undefined
      : (flags.namespace ?? context?.namespace ?? 'default'),
    selector: flags.selector,
    json: flags.output === 'json',
    watchTimeoutSeconds,
    concurrency,
    leaseNamespace: !flags['leader-elect']
      ? undefined
      : (flags['leader-elect-namespace'] ??
        process.env.POD_NAMESPACE ??
        (podNamespace || context?.namespace) ??
        'default'),
    healthPort,
  };
}

// ---------------------------------------------------------------------------------------------
// Requests: node:https with the kubeconfig's CA and credentials, so that any runtime and any test server will do.

interface Status {
  code?: number;
  message?: string;
  details?: { retryAfterSeconds?: number };
}

/** An error response from the API server, or an ERROR event in a watch: its code, Status message and what failed. */
type ApiError = Error & { code: number; verb: string; retryAfterSeconds: number };
const apiError = (code: number, message: string, verb: string, retryAfterSeconds = 0): ApiError =>
  Object.assign(new Error(message), { code, verb, retryAfterSeconds });
const isApiError = (err: unknown, code?: number): err is ApiError =>
  typeof (err as ApiError)?.verb === 'string' &&
  (code === undefined || (err as ApiError).code === code);

interface Call {
  verb: string;
  method?: string;
  path: string;
  query?: URLSearchParams;
  body?: unknown;
  signal: AbortSignal;
}

async function call(
  config: Config,
  { verb, method = 'GET', path, query, body, signal }: Call,
): Promise<http.IncomingMessage> {
  const url = new URL(`${config.server}${path}${query ? `?${query}` : ''}`);
  // A PATCH is a JSON merge patch: what it names is set, what it leaves out stays; a list (conditions) is replaced whole.
  const contentType = method === 'PATCH' ? 'application/merge-patch+json' : 'application/json';
  const headers = {
    Accept: 'application/json',
    'Content-Type': contentType,
    'User-Agent': `${kind}-controller`,
  }; // audit logs name us
  // A request other than a watch that hears nothing for 30 s is on a dead connection (a watch has its deadline).
  const options: https.RequestOptions = {
    method,
    signal,
    headers,
    timeout: verb === 'watch' ? undefined : 30_000,
  };
  await config.kubeConfig.applyToHTTPSOptions(options); // on every request: exec and OIDC credentials refresh here
  // client-node's agent closes the connection after each request; ours keeps it open, sparing a TLS
  // handshake per request. Only a proxy-url in the kubeconfig needs client-node's.
  if (!config.kubeConfig.getCurrentCluster()?.proxyUrl)
    options.agent = url.protocol === 'http:' ? agents.http : agents.https;
  const response = await new Promise<http.IncomingMessage>((resolve, reject) =>
    (url.protocol === 'http:' ? http : https)
      .request(url, options, resolve)
      .on('error', reject)
      .on('timeout', function (this: http.ClientRequest) {
        this.destroy(new Error(`${config.server} did not answer for 30s`));
      })
      .end(body === undefined ? undefined : JSON.stringify(body)),
  );
  if (signal.aborted) {
    // Deno lets a response in after its request was aborted
    response.destroy();
    throw signal.reason;
  }
  response.setEncoding('utf8'); // decodes across chunk boundaries, even inside a multi-byte character
  const code = response.statusCode ?? 0;
  if (code < 300) return response;
  const text = await readAll(response);
  const status: Status = text.startsWith('{') ? JSON.parse(text) : { message: text.trim() }; // a missing CRD: "404 page not found\n"
  const header = response.headers['retry-after']; // seconds, or an HTTP date
  const retryAfter =
    Number(header) ||
    (header ? (Date.parse(header) - Date.now()) / 1000 : 0) ||
    status.details?.retryAfterSeconds;
  throw apiError(code, status.message ?? `HTTP ${code}`, verb, Math.max(0, retryAfter || 0));
}

// Not the runtime's global agents: they drop a connection after 5 s without a byte, which is every idle watch.
const agents = {
  http: new http.Agent({ keepAlive: true }),
  https: new https.Agent({ keepAlive: true }),
};

async function readAll(response: http.IncomingMessage): Promise<string> {
  let body = '';
  for await (const chunk of response) body += chunk;
  return body;
}

const callJson = async <T>(config: Config, request: Call): Promise<T> =>
  JSON.parse(await readAll(await call(config, request)));

const booksPath = (namespace: string | undefined) =>
  `/apis/${GROUP}/${VERSION}${namespace === undefined ? '' : `/namespaces/${namespace}`}/${PLURAL}`;

// ---------------------------------------------------------------------------------------------
// List and watch: they keep the cache equal to the server's books, and never wait on a reconcile.

interface BookList {
  metadata: { resourceVersion: string; continue?: string };
  items: unknown[] | null;
}

// One line of a watch stream. ADDED, MODIFIED and DELETED carry a book (checkBook decides if it is
// one), BOOKMARK only a newer resourceVersion, ERROR a Status.
type WatchEvent =
  | {
      type: 'ADDED' | 'MODIFIED' | 'DELETED' | 'BOOKMARK';
      object: { metadata: { resourceVersion: string; annotations?: Record<string, string> } };
    }
  | { type: 'ERROR'; object: Status };

/**
 * A connection can die without a word (a half-open TCP connection) and leave us waiting for ever. The
 * server ends a watch at the watch timeout, and we give a list as long: past that, plus a grace, start over.
 */
function deadline(config: Config, verb: string, signal: AbortSignal) {
  const seconds = config.watchTimeoutSeconds + 5;
  const timeout = AbortSignal.timeout(seconds * 1000);
  const explain = (err: unknown) =>
    timeout.aborted ? new Error(`the ${verb} was not over after ${seconds}s`) : err;
  return { signal: AbortSignal.any([signal, timeout]), explain };
}

const query = (config: Config, params: Record<string, string>) =>
  new URLSearchParams(config.selector ? { ...params, labelSelector: config.selector } : params);

/** Lists every book, a page at a time; each page carries the list's resourceVersion. */
async function* listBooks(config: Config, signal: AbortSignal): AsyncGenerator<BookList> {
  const params = query(config, { limit: '500' });
  do {
    const limit = deadline(config, 'list', signal);
    const request = {
      verb: 'list',
      path: booksPath(config.namespace),
      query: params,
      signal: limit.signal,
    };
    const page = await callJson<BookList>(config, request).catch((err) =>
      Promise.reject(limit.explain(err)),
    );
    yield page;
    // A continue token expires after a few minutes (HTTP 410): the caller then lists again from scratch.
    params.set('continue', page.metadata.continue ?? '');
  } while (params.get('continue'));
}

/** Watches books, yielding the events of each chunk; returns when the server ends the stream. */
async function* watchBooks(
  config: Config,
  params: URLSearchParams,
  signal: AbortSignal,
): AsyncGenerator<WatchEvent[]> {
  const limit = deadline(config, 'watch', signal);
  let response: http.IncomingMessage | undefined;
  try {
    response = await call(config, {
      verb: 'watch',
      path: booksPath(config.namespace),
      query: params,
      signal: limit.signal,
    });
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
  let event: { type?: unknown; object?: { metadata?: { resourceVersion?: unknown } } } | null =
    null;
  try {
    event = JSON.parse(line);
  } catch {} // reported below
  const isChange = ['ADDED', 'MODIFIED', 'DELETED', 'BOOKMARK'].includes(String(event?.type));
  if (
    event?.type === 'ERROR' ||
    (isChange && typeof event?.object?.metadata?.resourceVersion === 'string')
  )
    return event as WatchEvent;
  throw new Error(`the watch sent a line that is not a watch event: ${line.slice(0, 60)}`);
}

/** A server that cannot stream the initial list: list in pages instead, for the rest of the run. */
class NoStreamingList extends Error {}

/**
 * Keeps `books` equal to the server's books, for ever: gets the initial state, then watches from its
 * resourceVersion, marking every book that changed as due. Returns only when `signal` aborts; every
 * failure is reported and retried.
 */
async function listAndWatch(
  config: Config,
  books: Books,
  stdout: Writable,
  health: Health,
  signal: AbortSignal,
): Promise<void> {
  let resourceVersion = ''; // where the next watch starts; empty: get the initial state first
  let streaming = true; // get it as a watch (KEP-3157: one request, no large list bodies) until a server says no
  let failures = 0; // in a row, for the backoff
  let routine: number | undefined; // the code of the last failure, if routine: it is so only once in a row
  const timeoutSeconds = String(config.watchTimeoutSeconds);

  while (!signal.aborted) {
    let listed: Set<string> | undefined; // while the initial state streams in: the books in it
    try {
      if (!resourceVersion && !streaming) {
        const inList = new Set<string>();
        let listedAt = '';
        for await (const page of listBooks(config, signal)) {
          for (const object of page.items ?? []) books.update(object, inList);
          listedAt = page.metadata.resourceVersion;
          health.progress();
        }
        books.removeAllBut(inList); // only a whole list is a starting point: after a failed page, list again
        resourceVersion = listedAt;
        health.ready = true;
        failures = 0;
      }
      // Bookmarks tell even an idle watch the newer resourceVersions to resume from. At timeoutSeconds
      // the server ends the watch, and we resume: a connection is never trusted for ever.
      const from: Record<string, string> = resourceVersion
        ? { resourceVersion }
        : { sendInitialEvents: 'true', resourceVersionMatch: 'NotOlderThan' };
      const params = query(config, {
        watch: 'true',
        ...from,
        allowWatchBookmarks: 'true',
        timeoutSeconds,
      });
      listed = resourceVersion ? undefined : new Set();
      const started = Date.now();
      let events = 0;
      for await (const chunk of watchBooks(config, params, signal)) {
        // stdout is full: stop reading, so that the server waits on TCP
        if (stdout.writableNeedDrain) await once(stdout, 'drain', { signal });
        for (const event of chunk) {
          if (event.type === 'ERROR') {
            const { code = 500, message = 'ERROR event', details } = event.object;
            if (listed && code !== 410) throw new NoStreamingList(message);
            throw apiError(code, message, 'watch', details?.retryAfterSeconds);
          }
          if (event.type === 'DELETED') books.remove(event.object);
          else if (event.type !== 'BOOKMARK') books.update(event.object, listed);
          else if (
            listed &&
            event.object.metadata.annotations?.['k8s.io/initial-events-end'] === 'true'
          ) {
            books.removeAllBut(listed); // the initial state is complete
            health.ready = true;
            listed = undefined;
          }
          // The initial events come in no order of resourceVersion: resume from them only once complete.
          if (!listed) resourceVersion = event.object.metadata.resourceVersion;
          events++;
          failures = 0;
          routine = undefined;
          health.progress();
        }
      }
      if (listed)
        throw new NoStreamingList('the watch ended before the initial state was complete');
      health.progress();
      // The server ended the watch (its timeout): routine, resume at once. Unless it does so at once, every time.
      if (events === 0 && Date.now() - started < 1000)
        throw new Error('the watch ended at once, without any event');
    } catch (err) {
      if (signal.aborted) break;
      if (
        streaming &&
        listed &&
        (err instanceof NoStreamingList || isApiError(err, 400) || isApiError(err, 422))
      ) {
        // an older server, or one without the WatchList feature
        streaming = false;
        resourceVersion = '';
        continue;
      }
      // 410 Gone: the server no longer has the history since our resourceVersion (or the list's
      // continue token expired). Only a new list tells what changed meanwhile. Once is routine, so quiet;
      // so is a 429 that asks for a second (a server filling its cache after a restart or a new CRD).
      // A 410 is also the server's answer after an outage: relist soon, not after the outage's backoff.
      if (isApiError(err, 410) && routine !== 410) failures = 0;
      const delayMs = retryDelayMs(failures++, err);
      const code =
        isApiError(err, 410) || (isApiError(err, 429) && err.retryAfterSeconds <= 1)
          ? err.code
          : undefined;
      if (code === undefined || code === routine) console.error(explain(err, config, delayMs));
      routine = code;
      if (code === 410) resourceVersion = '';
      await sleep(delayMs, undefined, { signal }).catch(() => {});
    }
  }
}

const MAX_RETRY_AFTER_MS = 5 * 60_000;

/** Exponential backoff with jitter (so that restarted controllers spread out), or what the server asked. */
function retryDelayMs(failures: number, err: unknown): number {
  if (isApiError(err) && err.retryAfterSeconds > 0)
    return Math.min(err.retryAfterSeconds * 1000, MAX_RETRY_AFTER_MS);
  return jitter(Math.min(30_000, 500 * 2 ** failures));
}

const jitter = (ceilingMs: number) => ceilingMs / 2 + (Math.random() * ceilingMs) / 2;
const inSeconds = (ms: number) => `${(ms / 1000).toFixed(1)}s`;

/** One stderr line: what failed, that we retry, and what would fix it. */
function explain(err: unknown, { server, namespace }: Config, delayMs: number): string {
  const asked = isApiError(err) ? err.retryAfterSeconds * 1000 : 0;
  const retrying =
    `retrying in ${inSeconds(delayMs)}` +
    (asked > MAX_RETRY_AFTER_MS
      ? ` (asked for ${asked / 1000}s; 5 minutes is the most we wait)`
      : '');
  const code = (err as { code?: unknown })?.code;
  if (isApiError(err)) {
    const where = namespace === undefined ? 'all namespaces' : `namespace ${namespace}`;
    switch (code) {
      case 401:
        return `${server} does not accept our credentials (401 Unauthorized); ${retrying} — refresh them in your kubeconfig (kubectl auth whoami)`;
      case 403:
        return (
          `not allowed to ${err.verb} ${PLURAL} in ${where} (403: ${err.message}); ${retrying}` +
          ` — grant list and watch on ${resource} (kubectl auth can-i ${err.verb} ${resource} ${namespace ? `-n ${namespace}` : '-A'})`
        );
      case 404:
        return `the ${KIND} CRD is not installed on ${server} (404: ${err.message}); ${retrying} — kubectl apply -f crd.yaml`;
      case 429:
        return `${server} is busy (429: ${err.message}); ${retrying}`;
      default:
        return `${server} failed to ${err.verb} ${PLURAL} (${code}: ${err.message}); ${retrying}`;
    }
  }
  if (
    typeof code === 'string' &&
    /^(ECONNREFUSED|ENOTFOUND|EAI_AGAIN|ETIMEDOUT|EHOSTUNREACH|ENETUNREACH)$/.test(code)
  ) {
    return `cannot reach ${server} (${code}); ${retrying} — is the cluster running? (kubectl cluster-info)`;
  }
  if (code === 'ECONNRESET' || code === 'EPIPE')
    return `lost the connection to ${server} (${code}); ${retrying}`;
  if (typeof code === 'string' && /CERT|SELF_SIGNED|SIGNATURE|ALTNAME/.test(code)) {
    return `the TLS certificate of ${server} did not verify (${code}); ${retrying} — check certificate-authority-data in your kubeconfig`;
  }
  return `${messageOf(err)} (${server}); ${retrying}`;
}

// ---------------------------------------------------------------------------------------------
// The cache and the work queue: the watch marks books as due, workers reconcile them.

/** What the controller knows of one book: the server's latest, what the last reconcile saw, and its Ready condition. */
interface Entry {
  book: Book | undefined; // undefined: deleted on the server, its Deleted not yet reconciled
  reconciled: Book | undefined; // what the last successful reconcile saw
  ready: number | string; // the Ready condition the server has: the generation it was Reconciled at, else "False Reason 3 message"
  since: number; // its lastTransitionTime
}

/**
 * The books by namespace/name, and which of them are due. The queue keeps client-go's workqueue rules:
 * a book is never reconciled by two workers at once; one that changes meanwhile is reconciled again
 * afterwards; one that failed waits its own backoff, reset by a success and cut short by a change.
 */
class Books {
  readonly entries = new Map<string, Entry>();
  private readonly due = new Set<string>(); // in the order they became due
  private readonly busy = new Set<string>();
  private readonly again = new Set<string>(); // changed while busy
  private readonly failures = new Map<string, number>();
  private readonly timers = new Map<string, ReturnType<typeof setTimeout>>();
  private waiting: (() => void)[] = []; // idle workers
  readonly config: Config;
  statusForbidden = false; // once told, the rest of the run goes without status

  constructor(config: Config) {
    this.config = config;
  }

  /** The book in a list or watch event: caches it and marks it due, if it is new. `listed` collects an initial state's keys. */
  update(object: unknown, listed?: Set<string>) {
    const key = this.keyOf(object);
    listed?.add(key);
    const book = checkBook(object);
    if (typeof book === 'string') {
      // the cache keeps its last good state, so that a later delete is still reported
      const { name, namespace } = (object as { metadata: Book['metadata'] }).metadata;
      return console.error(
        `ignoring ${kind} ${key}: ${book} — fix it with kubectl edit ${kind} ${name} -n ${namespace}`,
      );
    }
    book.metadata.namespace = this.config.namespace ?? book.metadata.namespace; // one copy for all, not one per book
    const entry = this.entries.get(key);
    const { ready, since } = readyCondition(object);
    const { uid, generation } = entry?.book?.metadata ?? {};
    // Nothing a reconcile acts on changed (a label, our own status write coming back, a relist): not due.
    // A Ready condition other than the one we wrote does make it due, and the worker writes ours again.
    if (
      uid === book.metadata.uid &&
      generation === book.metadata.generation &&
      entry?.ready === ready &&
      entry.since === since
    )
      return;
    if (entry) Object.assign(entry, { book, ready, since });
    else this.entries.set(key, { book, reconciled: undefined, ready, since });
    this.add(key);
  }

  remove(object: unknown) {
    const key = this.keyOf(object);
    const entry = this.entries.get(key);
    if (entry?.book) {
      entry.book = undefined;
      this.add(key);
    }
  }

  /** After an initial state: every book we knew and it lacks was deleted while we were not watching. */
  removeAllBut(listed: Set<string>) {
    for (const [key, entry] of this.entries)
      if (!listed.has(key) && entry.book) this.remove(entry.book);
  }

  /** The name users see, and the cache's key: NAME, or NAMESPACE/NAME with -A. */
  keyOf(object: unknown): string {
    const { namespace = '', name = '' } =
      (object as { metadata?: Partial<Book['metadata']> })?.metadata ?? {};
    return this.config.namespace === undefined ? `${namespace}/${name}` : name;
  }

  /** Marks a book as due now; a change cuts its retry backoff short. */
  add(key: string) {
    clearTimeout(this.timers.get(key));
    this.timers.delete(key);
    if (this.busy.has(key)) return void this.again.add(key);
    this.due.add(key);
    this.waiting.shift()?.();
  }

  /** Waits for the next due book and marks it busy; undefined once `signal` aborts. */
  async next(signal: AbortSignal): Promise<string | undefined> {
    while (!signal.aborted) {
      const [key] = this.due;
      if (key === undefined) {
        await new Promise<void>((resolve) => this.waiting.push(resolve));
        continue;
      }
      this.due.delete(key);
      this.busy.add(key);
      return key;
    }
  }

  /** A worker is done with a book. After a failure it is due again after its backoff, which this returns. */
  done(key: string, failed: boolean): number {
    this.busy.delete(key);
    const failures = failed ? (this.failures.get(key) ?? 0) + 1 : 0;
    const delayMs = failed ? jitter(Math.min(5 * 60_000, 1000 * 2 ** failures)) : 0; // about 1 s, doubling to 5 minutes
    if (failed) {
      this.failures.set(key, failures);
      this.timers.set(
        key,
        setTimeout(() => this.add(key), delayMs),
      );
    } else {
      this.failures.delete(key);
    }
    if (this.again.delete(key)) this.add(key);
    return delayMs;
  }

  stop() {
    for (const timer of this.timers.values()) clearTimeout(timer);
    for (const wake of this.waiting) wake();
  }
}

/** Takes due books and reconciles them, one at a time, until `signal` aborts. `--concurrency` workers run side by side. */
async function work(books: Books, print: Print, reconcileBook: Reconcile, signal: AbortSignal) {
  for (let name = await books.next(signal); name !== undefined; name = await books.next(signal)) {
    const key = name; // the cache's key is the name users see
    const entry = books.entries.get(key);
    if (!entry) {
      // deleted and reconciled while it was due again
      books.done(key, false);
      continue;
    }
    const { book, reconciled } = entry;
    let failure: unknown;
    try {
      // What changed since the last successful reconcile. A new uid under the same name: deleted and created again.
      if (reconciled && (!book || book.metadata.uid !== reconciled.metadata.uid)) {
        await reconcileBook('Deleted', reconciled, name, signal);
        entry.reconciled = undefined;
        await print('Deleted', reconciled, name, signal);
      }
      if (book && book.metadata.generation !== entry.reconciled?.metadata.generation) {
        const change = entry.reconciled ? 'Modified' : 'Added';
        await reconcileBook(change, book, name, signal);
        entry.reconciled = book;
        await print(change, book, name, signal);
      }
    } catch (err) {
      failure = err ?? new Error(`threw ${err}`);
    }
    if (signal.aborted) return;
    if (!entry.book && !entry.reconciled) books.entries.delete(key);
    // A book that changed meanwhile is due again: its status waits for the reconcile of its latest state.
    const statusFailure =
      entry.book === book
        ? await writeStatus(books, entry, failure, signal).catch((err: unknown) => err)
        : undefined;
    if (signal.aborted) return;
    const retrying = `retrying in ${inSeconds(books.done(key, failure !== undefined || statusFailure !== undefined))}`;
    if (failure !== undefined)
      console.error(`reconcile of ${kind} ${name} failed: ${messageOf(failure)}; ${retrying}`);
    else if (statusFailure !== undefined)
      console.error(
        `cannot write the status of ${kind} ${name} (${messageOf(statusFailure)}); ${retrying}`,
      );
  }
}

// ---------------------------------------------------------------------------------------------
// Status: the outcome of the last reconcile, on the book itself, so that kubectl get and kubectl wait show it.

interface Condition {
  type?: string;
  status?: string;
  reason?: string;
  message?: string;
  observedGeneration?: number;
  lastTransitionTime?: string;
}

function readyCondition(object: unknown): { ready: number | string; since: number } {
  const { status } = object as {
    status?: { observedGeneration?: number; conditions?: Condition[] };
  };
  const {
    status: is,
    reason,
    message,
    observedGeneration: generation,
    lastTransitionTime = '',
  } = status?.conditions?.find?.((condition) => condition.type === 'Ready') ?? {};
  if (generation === undefined || generation !== status?.observedGeneration)
    return { ready: '', since: 0 };
  // Most books are Ready, and there may be many: for them this is a number, not a string.
  const ready =
    is === 'True' && reason === 'Reconciled' && !message
      ? generation
      : `${is} ${reason} ${generation} ${message}`;
  return { ready, since: Date.parse(lastTransitionTime) || 0 };
}

/** Writes the book's Ready condition, unless it already says exactly that. */
async function writeStatus(
  books: Books,
  entry: Entry,
  failure: unknown,
  signal: AbortSignal,
): Promise<void> {
  const { metadata } = entry.book ?? {};
  if (!metadata || books.statusForbidden || typeof metadata.generation !== 'number') return;
  const condition =
    failure === undefined
      ? {
          type: 'Ready',
          status: 'True',
          reason: 'Reconciled',
          message: '',
          observedGeneration: metadata.generation,
        }
      : {
          type: 'Ready',
          status: 'False',
          reason: 'ReconcileFailed',
          message: messageOf(failure),
          observedGeneration: metadata.generation,
        };
  const { ready } = readyCondition({
    status: { observedGeneration: metadata.generation, conditions: [condition] },
  });
  if (entry.ready === ready) return;
  const was = typeof entry.ready === 'number' ? 'True' : entry.ready.split(' ')[0];
  // It changes only on a flip, and in whole seconds, as the server keeps it (so its echo is no change).
  const since =
    was === condition.status && entry.since ? entry.since : Math.floor(Date.now() / 1000) * 1000;
  const lastTransitionTime = new Date(since).toISOString().replace('.000Z', 'Z');
  const body = {
    status: {
      observedGeneration: metadata.generation,
      conditions: [{ ...condition, lastTransitionTime }],
    },
  };
  const path = `${booksPath(metadata.namespace)}/${metadata.name}/status`;
  try {
    await readAll(await call(books.config, { verb: 'patch', method: 'PATCH', path, body, signal }));
    // Unless the book changed meanwhile (created again, or another writer): then it is due again.
    if (entry.book?.metadata === metadata) Object.assign(entry, { ready, since });
  } catch (err) {
    if (isApiError(err, 404)) return; // the book is gone: nothing to say
    if (!isApiError(err, 403)) throw err;
    if (books.statusForbidden) return; // another worker said so already
    books.statusForbidden = true;
    console.error(
      `not allowed to patch ${PLURAL}/status in namespace ${metadata.namespace} (403: ${err.message}); going on without status` +
        ` — grant patch on ${PLURAL}/status (kubectl auth can-i patch ${resource} --subresource=status -n ${metadata.namespace})`,
    );
  }
}

// ---------------------------------------------------------------------------------------------
// Output: stdout is the product, so a pipe gets every line, in order, and a slow reader slows us down.

type Print = (change: Change, book: Book, name: string, signal: AbortSignal) => Promise<void>;

/** One line per change. While stdout is full it waits, so that a slow reader slows the workers and the watch. */
function printer(stdout: Writable, json: boolean): Print {
  return async (change, book, name, signal) => {
    signal.throwIfAborted(); // once stopped, not one more line
    const { namespace, name: bookName } = book.metadata;
    const line = json
      ? JSON.stringify({ type: change, namespace, name: bookName, spec: book.spec })
      : describe(change, book, name);
    // A speed trick: the lines of one tick go out in one write.
    if (!stdout.writableCorked) {
      stdout.cork();
      process.nextTick(() => stdout.uncork());
    }
    if (!stdout.write(`${line}\n`)) await once(stdout, 'drain', { signal });
  };
}

// ---------------------------------------------------------------------------------------------
// Leader election over a Lease, with client-go's timings: replicas take turns, one acts at a time.

const LEASE_NAME = 'book-controller';
const LEASE_SECONDS = 15;
const RENEW_DEADLINE_MS = 10_000; // shorter than the lease: a leader that cannot renew stops before anyone may take over
const RETRY_PERIOD_MS = 2_000;

interface LeaseSpec {
  holderIdentity?: string;
  leaseDurationSeconds?: number;
  acquireTime?: string;
  renewTime?: string;
  leaseTransitions?: number;
}
interface Lease {
  metadata: { resourceVersion?: string };
  spec?: LeaseSpec;
}

// MicroTime: the API server refuses a time without exactly six fractional digits.
const microTime = (ms: number) => new Date(ms).toISOString().replace('Z', '000Z');

class LeaderElection {
  readonly identity = `${hostname()}_${randomUUID().slice(0, 8)}`;
  readonly where: string;
  holder = '';
  private observed = { spec: '', at: 0 }; // the lease as we last saw it change, by our own clock
  private readonly config: Config;
  private readonly path: string;

  constructor(config: Config, namespace: string) {
    this.config = config;
    this.where = `the Lease ${namespace}/${LEASE_NAME}`;
    this.path = `/apis/coordination.k8s.io/v1/namespaces/${namespace}/leases`;
  }

  /** One round of client-go's tryAcquireOrRenew: true if we hold the lease now. */
  async tryAcquireOrRenew(signal: AbortSignal): Promise<boolean> {
    const lease = await callJson<Lease>(this.config, {
      verb: 'get',
      path: `${this.path}/${LEASE_NAME}`,
      signal,
    }).catch((err) => (isApiError(err, 404) ? undefined : Promise.reject(err)));
    const now = Date.now(); // when we saw it: after the GET, so that a slow answer does not shorten the lease
    const spec = lease?.spec ?? {};
    if (JSON.stringify(spec) !== this.observed.spec)
      this.observed = { spec: JSON.stringify(spec), at: now };
    this.holder = spec.holderIdentity ?? '';
    // Judged by our own clock since we saw the record change, never by the times written in it: the
    // holder's clock may differ from ours, but a record that stays the same for a lease duration is dead.
    const expired = now - this.observed.at > (spec.leaseDurationSeconds ?? LEASE_SECONDS) * 1000;
    if (this.holder && this.holder !== this.identity && !expired) return false;
    const ours = this.holder === this.identity;
    return this.write(
      lease,
      {
        holderIdentity: this.identity,
        leaseDurationSeconds: LEASE_SECONDS,
        acquireTime: ours ? spec.acquireTime : microTime(now),
        renewTime: microTime(now),
        leaseTransitions: (spec.leaseTransitions ?? 0) + (ours || !lease ? 0 : 1),
      },
      signal,
    );
  }

  /** Gives the lease up, so that a follower takes over within a retry period instead of a lease duration. */
  async release() {
    const signal = AbortSignal.timeout(500);
    const lease = await callJson<Lease>(this.config, {
      verb: 'get',
      path: `${this.path}/${LEASE_NAME}`,
      signal,
    });
    if (lease.spec?.holderIdentity !== this.identity) return;
    await this.write(
      lease,
      {
        ...lease.spec,
        holderIdentity: '',
        leaseDurationSeconds: 1,
        renewTime: microTime(Date.now()),
      },
      signal,
    );
  }

  /** Creates or updates the lease; a 409 means another replica wrote first, since we read it. */
  private async write(
    lease: Lease | undefined,
    spec: LeaseSpec,
    signal: AbortSignal,
  ): Promise<boolean> {
    const body = {
      apiVersion: 'coordination.k8s.io/v1',
      kind: 'Lease',
      metadata: { ...lease?.metadata, name: LEASE_NAME },
      spec,
    };
    const request = lease
      ? { verb: 'update', method: 'PUT', path: `${this.path}/${LEASE_NAME}`, body, signal }
      : { verb: 'create', method: 'POST', path: this.path, body, signal };
    try {
      await readAll(await call(this.config, request));
      this.observed = { spec: JSON.stringify(spec), at: Date.now() };
      return true;
    } catch (err) {
      if (isApiError(err, 409)) return false;
      throw err;
    }
  }

  /** Waits until this replica leads; returns a signal that aborts if it stops leading, with why. */
  async lead(health: Health, signal: AbortSignal): Promise<AbortSignal> {
    const attempt = (limit: AbortSignal) =>
      this.tryAcquireOrRenew(limit).catch((err: unknown) => ({ err }));
    health.ready = true; // following is all a follower should do
    for (
      let waiting = false, held = await attempt(signal);
      held !== true;
      held = await attempt(signal)
    ) {
      if (typeof held === 'object' && !signal.aborted) {
        const hint = isApiError(held.err, 403)
          ? ' — grant get, create and update on leases.coordination.k8s.io (see deploy.yaml)'
          : '';
        console.error(
          `cannot get or write ${this.where} (${messageOf(held.err)}); retrying in ${RETRY_PERIOD_MS / 1000}s${hint}`,
        );
      }
      if (!waiting && this.holder)
        console.error(`waiting to lead: ${this.where} is held by ${this.holder}`);
      waiting ||= Boolean(this.holder);
      if (held === false) health.progress(); // the lease was read: following is going as it should
      await sleep(RETRY_PERIOD_MS, undefined, { signal });
    }
    console.error(`leading as ${this.identity} (${this.where})`);
    health.ready = false; // until the initial state is in
    const lost = new AbortController();
    void (async () => {
      // renews quietly: if it cannot for the renew deadline, the one line comes from main
      for (
        let renewed = Date.now();
        !signal.aborted;
        await sleep(RETRY_PERIOD_MS, undefined, { signal }).catch(() => {})
      ) {
        // No renewal may outlive the renew deadline, which ends before any follower may take over.
        const held = await attempt(
          AbortSignal.any([
            signal,
            AbortSignal.timeout(Math.max(1, renewed + RENEW_DEADLINE_MS - Date.now())),
          ]),
        );
        if (signal.aborted) return;
        if (held === true) {
          renewed = Date.now();
          health.progress();
        } else if (!held && this.holder !== this.identity)
          return lost.abort(new Error(`${this.where} is now held by ${this.holder || 'no one'}`));
        else if (Date.now() - renewed > RENEW_DEADLINE_MS) {
          const timedOut =
            typeof held === 'object' &&
            /^(TimeoutError|AbortError)$/.test(String((held.err as Error)?.name));
          const why =
            typeof held !== 'object'
              ? ''
              : timedOut
                ? ' (no answer before the renew deadline)'
                : ` (${messageOf(held.err)})`;
          return lost.abort(
            new Error(`could not renew ${this.where} for ${RENEW_DEADLINE_MS / 1000}s${why}`),
          );
        }
      }
    })();
    return lost.signal;
  }
}

// ---------------------------------------------------------------------------------------------
// Health: what the kubelet asks before it restarts us (/healthz) or counts us in (/readyz).

class Health {
  lastProgress = Date.now(); // a list page, a watch event or its clean end, a lease renewed or checked
  ready = false; // following, or leading with the initial state in

  progress() {
    this.lastProgress = Date.now();
  }

  /** Serves /healthz and /readyz on `port`; resolves once listening. */
  async serve(port: number, staleAfterMs: number): Promise<http.Server> {
    const server = http.createServer((request, response) => {
      const stale = Date.now() - this.lastProgress > staleAfterMs;
      const [code, text] =
        request.url === '/healthz'
          ? stale
            ? [500, `no list page, watch event or lease renewal for ${staleAfterMs / 1000}s`]
            : [200, 'ok']
          : request.url === '/readyz'
            ? this.ready
              ? [200, 'ok']
              : [503, 'the initial list is not handled yet']
            : [404, 'not found: try /healthz or /readyz'];
      response.writeHead(code, { 'Content-Type': 'text/plain' }).end(`${text}\n`);
    });
    await new Promise((resolve, reject) =>
      server.listen(port).once('listening', resolve).once('error', reject),
    );
    return server;
  }
}

// ---------------------------------------------------------------------------------------------
// Main: configuration, then (as the leader, with --leader-elect) the watch and the workers until SIGINT or SIGTERM.

/** Runs the controller until `signal` aborts; returns the process exit code. */
export async function main(
  args: string[],
  signal: AbortSignal,
  options: { reconcile?: Reconcile; stdout?: Writable } = {},
): Promise<number> {
  let server: http.Server | undefined;
  let election: LeaderElection | undefined;
  try {
    const config = await loadConfig(args);
    if (typeof config === 'number') return config;
    const health = new Health();
    if (config.healthPort !== undefined)
      server = await health.serve(config.healthPort, (config.watchTimeoutSeconds + 30) * 1000);
    election =
      config.leaseNamespace === undefined
        ? undefined
        : new LeaderElection(config, config.leaseNamespace);
    const lost = (await election?.lead(health, signal)) ?? new AbortController().signal;
    const running = AbortSignal.any([signal, lost]);
    const books = new Books(config);
    const stdout = options.stdout ?? process.stdout;
    const print = printer(stdout, config.json);
    const workers = Array.from({ length: config.concurrency }, () =>
      work(books, print, options.reconcile ?? reconcile, running),
    );
    await listAndWatch(config, books, stdout, health, running);
    books.stop();
    if (lost.aborted)
      return fail(
        1,
        `stopped leading: ${messageOf(lost.reason)} — exiting, so that a new replica starts clean`,
      );
    await Promise.race([Promise.all(workers), sleep(300)]); // in-flight reconciles were told to stop; wait briefly
    await election?.release().catch(() => {});
    return 0;
  } catch (err) {
    const { name, code } = err as { name?: string; code?: string };
    if (signal.aborted) {
      // stopped while waiting to lead, or just as it won
      await election?.release().catch(() => {});
      return 0;
    }
    if (name === 'NotCapable' || name === 'PermissionDenied') {
      return fail(
        2,
        `Deno needs more permissions (${messageOf(err)}) — run deno run --allow-env --allow-read --allow-net --allow-sys controller.ts`,
      );
    }
    if (code === 'ERR_MODULE_NOT_FOUND') return fail(1, `${messageOf(err)} — run npm ci first`);
    if (code === 'EADDRINUSE' || code === 'EACCES')
      return fail(1, `cannot serve health checks (${messageOf(err)}) — pick another --health-port`);
    throw err;
  } finally {
    server?.close();
  }
}

/** An error's message on one line: every diagnostic is one line. */
function messageOf(err: unknown, join?: string): string {
  const message = (err instanceof Error ? err.message : String(err)).trim();
  return join === undefined ? (message.split('\n')[0] ?? '') : message.replace(/\s*\n\s*/g, join);
}

function fail(exitCode: number, message: string): number {
  console.error(message);
  return exitCode;
}

// Runs only as the entry point, not when imported by the tests. Node 22 and tsx lack import.meta.main.
const isEntryPoint =
  (import.meta as { main?: boolean }).main ?? process.argv[1] === fileURLToPath(import.meta.url);
if (isEntryPoint) {
  const stop = new AbortController();
  process.once('SIGINT', () => stop.abort());
  process.once('SIGTERM', () => stop.abort());
  process.stdout.on('error', () => stop.abort()); // EPIPE: the reader is gone (| head -1), and so are we, quietly
  stop.signal.addEventListener('abort', () => setTimeout(() => process.exit(0), 1000).unref()); // even if the reader is stuck
  const exitCode = await main(process.argv.slice(2), stop.signal);
  process.stdout.write('', () => process.exit(exitCode)); // every line printed reaches the pipe first (within that second)
}

// Where to go next: owner references and finalizers for what reconcile creates; Events for kubectl describe;
// metrics; other resources watched the same way, marking their owner book as due (kube-rs's `Controller::owns`).
