// A Kubernetes controller for Book resources, in one file.
//
// It keeps a cache of the books up to date (list, then watch), and reconciles each book that
// changed: your `reconcile` below runs, one line is printed, and the book's status says how it
// went. The example reconcile keeps a ConfigMap per book, owned by the book.
//
//   Added a book moby-dick with title 'Moby Dick'
//   Deleted a book moby-dick
//
// It resumes a dropped watch where it stopped, relists when the server has forgotten that point,
// retries a failed reconcile with backoff, repairs what reconcile made when someone else changes
// it, runs as replicas with one leader, and says on stderr what is wrong and what fixes it.
//
//   npx tsx controller.ts [-n NAMESPACE | -A] [-l SELECTOR] [-o json] ...   (--help for all)
//   npx tsx controller.ts manifests > manifests.yaml   (the CRD and the RBAC, from this file)
//   npx -y deno@2 run --allow-env --allow-read --allow-net --allow-sys controller.ts
//   npx -y bun@1 controller.ts
//
// The protocol it follows: https://kubernetes.io/docs/reference/using-api/api-concepts/
//
// The map. What you change comes first; below the line, the machinery, in the order in which one
// change travels through it:
//
//   API server -> list, then watch -> cache of objects -> work queue -> worker -> your reconcile
//     -> a line on stdout -> the status (Ready) -> done: again after a backoff if it failed, or
//     later if it asked; what reconcile made is watched too, and a change to it is a repair.
//
//   What you change ......... the resource, FINALIZER, SPEC, STATUS, lineFor, OWNED, reconcile
//   What reconcile gets ..... Change, Context, Result, Client, ownerReference: all it needs
//   Configuration ........... flags and the kubeconfig
//   Requests ................ Api: one https request with the kubeconfig's credentials
//   List and watch .......... the initial state, then each change; resume, relist, bookmarks
//   The cache of objects .... what the watch saw, and what each object is owed
//   What reconcile made ..... the owned kinds' caches: repairs, no take-overs, client.get
//   The work queue .......... due keys, never one twice at once, backoff, later looks
//   Workers ................. work -> reconcileKey: Deleted owed, finalizer, Added/Modified
//   The client .............. what reconcile's requests go through
//   Output, Writes, Status .. the line; finalizer patches; Ready and your fields, one write
//   Saying what is wrong .... backoff, one line per problem, the cluster's own problems
//   Events, Metrics ......... what kubectl describe and Prometheus see
//   Leader election ......... one replica acts at a time
//   Health, Manifests ....... /healthz, /readyz, /metrics; crd.yaml and deploy.yaml
//   Main .................... main -> control: the watches, then the workers, until a signal
//
// One change, read downwards: listAndWatch -> watch -> watchEvents -> handleEvent ->
// ObjectCache.update -> WorkQueue.add -> work -> reconcileKey -> your reconcile -> printer ->
// StatusWriter.write -> WorkQueue.done -> report (a failure's line, ClusterProblems, an Event).
// It goes back only to call what was read already: Requests (Api.call, for the watch and the
// client), the work queue (next and done, for the worker), your reconcile, What reconcile made
// (OwnedObjects.apply, for client.apply) and Writes (patchObject, for the status); and forward
// only to Retries (after a failed list or watch) and countReconcile (in Metrics).

import { randomUUID } from 'node:crypto';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import { hostname } from 'node:os';
import type { Writable } from 'node:stream';
import { finished } from 'node:stream/promises';
import { setInterval } from 'node:timers';
import { setTimeout as sleep } from 'node:timers/promises';
import { basename } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import type { KubeConfig } from '@kubernetes/client-node';

// =============================================================================================
// What you change: the resource, its check, and what a reconcile does.

// books.example.technosophos.com/v1, installed by crd.yaml. Every message below is worded from
// these, and so are the field manager, the Lease and the label on what reconcile makes.
export const GROUP = 'example.technosophos.com';
export const VERSION = 'v1';
export const KIND = 'Book';
export const PLURAL = 'books';
export const SHORT_NAMES = ['bk']; // kubectl get bk
const kind = KIND.toLowerCase(); // book: as kubectl and the lines printed name one
export const CONTROLLER = `${kind}-controller`;

// Set a finalizer (say `${GROUP}/cleanup`) when Deleted must run even for a book deleted while no
// controller ran: Kubernetes then keeps a deleted book until the controller has seen it go.
// Empty, nothing holds up `kubectl delete`.
export const FINALIZER = '';

// The spec's fields, written once: BookSpec, the check of each book that comes in (checkSpec) and
// the CRD's schema (npx tsx controller.ts manifests crd) come from here. A field is required unless
// `optional`; `column` shows it in kubectl get under that heading.
export const SPEC = {
  title: { type: 'string', minLength: 1, column: 'Title' },
  authors: { type: 'array', items: 'string', optional: true, column: 'Authors' },
} as const satisfies Fields;

export type BookSpec = SpecOf<typeof SPEC>;

// Fields of your own in the status (what reconcile returns as `status`), declared here so that the
// API server keeps them: it drops what the schema does not name. Each is optional.
export const STATUS = {} as const satisfies Fields;

/** A book as reconcile sees it: its metadata, and its spec as checkSpec returned it. */
export type Book = Resource;

/** The line printed for each change a reconcile saw (-o json prints the same facts as JSON). */
export function lineFor(change: Change, book: Book, name: string): string {
  if (change === 'Deleted') return `Deleted a ${kind} ${name}`;
  return `${change} a ${kind} ${name} with title '${book.spec.title}'`;
}

// The kinds reconcile makes, each watched (by this label) so that a change by someone else is
// repaired. Owning a Secret too is one more entry: { apiVersion: 'v1', kind: 'Secret', ... }.
export const OWNED: Owned[] = [{ apiVersion: 'v1', kind: 'ConfigMap', plural: 'configmaps' }];
export const MANAGED_BY = { 'app.kubernetes.io/managed-by': CONTROLLER };

/**
 * Your code goes here: make the world match the book.
 *
 * Called by a worker for a book that changed since its last successful reconcile: Added,
 * Modified (its spec changed; or, printing nothing, someone changed what it made, or the time it
 * asked for came: `context.reason` says which), or Deleted (with the last book seen). Never twice
 * at once for one book. When it returns, the change is printed and the book's status says Ready,
 * with the fields it returned in `status`; `requeueAfter` asks for another look that many
 * seconds later. If it throws, the status says why and the book is tried again later, with
 * backoff. `client` makes requests as the controller does; they stop when it stops or stops
 * leading, since another replica takes over.
 */
export async function reconcile(change: Change, book: Book, { client }: Context): Promise<void> {
  const { name, namespace } = book.metadata;
  switch (change) {
    case 'Added':
    case 'Modified': {
      const { title, authors = [] } = book.spec;
      const configMap = {
        apiVersion: 'v1',
        kind: 'ConfigMap',
        metadata: { name, namespace, labels: MANAGED_BY, ownerReferences: [ownerReference(book)] },
        data: authors.length > 0 ? { title, authors: authors.join('\n') } : { title },
      };
      await client.apply(`/api/v1/namespaces/${namespace}/configmaps/${name}`, configMap);
      break;
    }
    case 'Deleted':
      // The ConfigMap needs nothing: the book owns it, so Kubernetes' garbage collector deletes it.
      // Clean up here what lives outside Kubernetes.
      break;
    default: // a new kind of change must be handled above
      change satisfies never;
  }
}

// ---------------------------------------------------------------------------------------------
// What reconcile gets, and what it returns: everything your code needs, and nothing more.

export type Change = 'Added' | 'Modified' | 'Deleted';

/** A kind reconcile makes. `keep`: the cache holds them whole: client.get of one sends nothing. */
export interface Owned {
  apiVersion: string;
  kind: string;
  plural: string;
  keep?: boolean; // costs the objects' memory: for what reconcile reads, such as a Secret made once
}
export type Reconcile = (
  change: Change,
  object: Resource,
  context: Context,
) => Promise<Result | void>;

/** What reconcile gets besides the object: its name as printed, and a client for the cluster. */
export interface Context {
  name: string; // NAME, or NAMESPACE/NAME with -A
  // Why it runs: the object changed (or is new, or gone), what it made was changed by someone
  // else, or the requeueAfter it returned last time came.
  reason: 'changed' | 'repair' | 'requeue';
  status: Readonly<Record<string, unknown>>; // what the object's status says, besides Ready
  signal: AbortSignal; // aborts when the controller stops or stops leading
  client: Client;
}

/**
 * What reconcile may return (nothing is fine): fields of its own for the object's status, written
 * in the same request as Ready (and only when they differ from what the status says), and when
 * to look again, as controller-runtime's Result{RequeueAfter} and kube-rs' Action::requeue.
 */
export interface Result {
  status?: Record<string, unknown>; // merged into the status: a field left out stays as it is
  requeueAfter?: number; // seconds: reconcile again then, in the latest state, printing nothing
}

/**
 * Requests with the controller's own credentials and connection, for any resource path. An error
 * from the server is thrown with its Status message. For an owned kind (OWNED) with the managed-by
 * label, what its watch sees answers instead where it can:
 * - get of one the cache has answers from it, with no request (one it lacks is asked for);
 * - apply is not sent when the fields it sets are already as given (what others added is no
 *   difference), and never takes over an object that is not ours: that is an error naming it.
 */
export interface Client {
  get<T>(path: string): Promise<T | undefined>; // undefined: there is none
  create<T>(path: string, object: object): Promise<T>;
  apply(path: string, object: object): Promise<void>; // server-side apply, as CONTROLLER, forced
  patch<T>(path: string, patch: object): Promise<T>; // a JSON merge patch (RFC 7386)
  delete(path: string): Promise<void>;
}

/** An owner reference to `object`, as the controller of what it is put on. */
export function ownerReference(object: Resource) {
  const { name, uid } = object.metadata;
  return { apiVersion, kind: KIND, name, uid, controller: true, blockOwnerDeletion: true };
}

// =============================================================================================
// The machinery: nothing below needs changing for another resource.

const resource = `${PLURAL}.${GROUP}`;
const apiVersion = `${GROUP}/${VERSION}`;

type Spec = Exclude<ReturnType<typeof checkSpec>, string>; // the spec, as checkSpec returns it

/** An object of the watched resource, as the cache keeps it: what checkObject let through. */
export interface Resource {
  metadata: {
    name: string;
    namespace: string;
    uid: string;
    generation: number | string;
    finalizers?: string[];
    deleting?: true; // it has a deletionTimestamp: Kubernetes waits for its finalizers
  };
  spec: Spec;
}

/** Checks an object from the server: the Resource in it, keeping only what is used, or why not. */
export function checkObject(object: unknown): Resource | string {
  const { metadata = {}, spec } = object as { metadata?: Record<string, unknown>; spec?: unknown };
  const { name, namespace = '', uid = '', generation, resourceVersion } = metadata;
  if (typeof name !== 'string' || typeof resourceVersion !== 'string') return 'it has no metadata';
  if (typeof spec !== 'object' || spec === null) return 'it has no spec';
  const checked = checkSpec(spec as Record<string, unknown>);
  if (typeof checked === 'string') return checked;
  // Where a server sets no generation, every change counts as a new spec (and no status is
  // written).
  const version = typeof generation === 'number' ? generation : resourceVersion;
  const kept: Resource = {
    metadata: { name, namespace: String(namespace), uid: String(uid), generation: version },
    spec: checked,
  };
  const { finalizers, deletionTimestamp } = metadata;
  if (Array.isArray(finalizers) && finalizers.length > 0) kept.metadata.finalizers = finalizers;
  if (deletionTimestamp) kept.metadata.deleting = true;
  return kept;
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

const FILE = basename(fileURLToPath(import.meta.url));

const USAGE = `Usage: npx tsx ${FILE} [options]
       npx tsx ${FILE} manifests [crd|deploy]   prints crd.yaml, deploy.yaml, or both

Reconciles ${KIND} resources (${resource}) and prints one line per change.

Options:
  -n, --namespace NS         watch namespace NS (default: the kubeconfig context's, else default)
  -A, --all-namespaces       watch every namespace; ${PLURAL} are named NAMESPACE/NAME
  -l, --selector SELECTOR    only ${PLURAL} whose labels match, as kubectl's (app=x,tier!=y)
  -o, --output text|json     json: one object per change, {"type","namespace","name","spec"}
      --context NAME         the kubeconfig context to use (default: its current context)
      --kubeconfig FILE      the kubeconfig to use (default: KUBECONFIG, ~/.kube/config, the pod's)
      --watch-timeout SECONDS  ask the server to end each watch after SECONDS (1 to 86400), then
                             resume (default 300)
      --concurrency N        reconcile up to N ${PLURAL} at once, 1 to 1000 (default 1)
      --leader-elect         act only while holding the Lease ${CONTROLLER}, so replicas take turns
      --leader-elect-namespace NS  the Lease's namespace (default: POD_NAMESPACE, the pod's, the
                             context's)
      --health-port PORT     serve GET /healthz, /readyz and /metrics over HTTP on PORT
  -h, --help                 show this help`;

// client-node's HTTP stack (undici) needs Node 22.19; Deno and Bun bring their own.
const NODE_NEEDED = '22.19';

/** The command line's flags, as --help documents them; throws on an unknown or malformed one. */
function parseFlags(args: string[]) {
  const string = { type: 'string' } as const;
  const { values, positionals } = parseArgs({
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
    allowPositionals: true, // manifests [crd|deploy]
  });
  return { ...values, command: positionals };
}

type Flags = ReturnType<typeof parseFlags>;

/** The numbers among the flags, checked; or the one line that says what is wrong. */
function checkFlags(flags: Flags) {
  const whole = (value: string | undefined, low: number, high: number) => {
    const number = Number(value);
    return Number.isInteger(number) && number >= low && number <= high ? number : undefined;
  };
  const watchTimeoutSeconds = whole(flags['watch-timeout'], 1, 86400);
  const concurrency = whole(flags.concurrency, 1, 1000);
  const healthPort = whole(flags['health-port'], 0, 65535);
  if (flags.namespace !== undefined && flags['all-namespaces']) {
    return '-n and -A cannot be used together';
  }
  if (flags.output !== 'text' && flags.output !== 'json') {
    return `-o takes text or json, not '${flags.output}'`;
  }
  if (!watchTimeoutSeconds) {
    return `--watch-timeout takes whole seconds from 1 to 86400, not '${flags['watch-timeout']}'`;
  }
  if (!concurrency) {
    return `--concurrency takes a whole number from 1 to 1000, not '${flags.concurrency}'`;
  }
  if (healthPort === undefined && flags['health-port'] !== undefined) {
    return `--health-port takes a port, not '${flags['health-port']}'`;
  }
  if (flags['leader-elect-namespace'] && !flags['leader-elect']) {
    return '--leader-elect-namespace needs --leader-elect';
  }
  return { watchTimeoutSeconds, concurrency, healthPort };
}

/** Reads the flags and the kubeconfig: the configuration, or the exit code if nothing is to run. */
export async function loadConfig(args: string[]): Promise<Config | number> {
  let flags: Flags;
  try {
    flags = parseFlags(args);
  } catch (err) {
    return fail(2, `${messageOf(err, ' ')} — see --help`); // an unknown or malformed flag
  }
  if (flags.help) {
    console.log(USAGE);
    return 0;
  }
  if (flags.command.length > 0) return printManifests(flags.command);
  const numbers = checkFlags(flags);
  if (typeof numbers === 'string') return fail(2, `${numbers} — see --help`);
  const { node, bun, deno } = process.versions;
  if (!bun && !deno && node.localeCompare(NODE_NEEDED, 'en', { numeric: true }) < 0) {
    return fail(
      1,
      `this controller needs Node ${NODE_NEEDED} or newer, and this is Node ${node} — ` +
        `install Node 24 (nvm install 24), or add it to the project ` +
        `(npm install --save-dev node@24) and run npx tsx ${FILE}`,
    );
  }
  const kubeConfig = await loadKubeConfig(flags);
  if (typeof kubeConfig === 'number') return kubeConfig;
  const context = kubeConfig.getContextObject(kubeConfig.getCurrentContext());
  const server = kubeConfig.getCurrentCluster()?.server ?? '';
  const namespace = flags['all-namespaces']
    ? undefined
    : (flags.namespace ?? context?.namespace ?? 'default');
  let leaseNamespace: string | undefined;
  if (flags['leader-elect']) {
    const own = flags['leader-elect-namespace'] ?? process.env.POD_NAMESPACE;
    leaseNamespace = own ?? (podNamespace() || context?.namespace) ?? 'default';
  }
  return {
    ...numbers,
    kubeConfig,
    server: server.replace(/\/$/, ''),
    namespace,
    selector: flags.selector,
    json: flags.output === 'json',
    leaseNamespace,
  };
}

/** The kubeconfig the flags name, checked: a cluster with a server. Or the exit code. */
async function loadKubeConfig(flags: Flags): Promise<KubeConfig | number> {
  // Imported here, after the checks, so that an old Node gets its one line, not a crash in undici.
  const { KubeConfig } = await import('@kubernetes/client-node');
  const kubeConfig = new KubeConfig();
  const file = flags.kubeconfig ?? process.env.KUBECONFIG ?? '~/.kube/config';
  try {
    if (flags.kubeconfig) kubeConfig.loadFromFile(flags.kubeconfig);
    else kubeConfig.loadFromDefault(); // KUBECONFIG, ~/.kube/config, or the pod's service account
  } catch (err) {
    const fix = 'check the file, or point --kubeconfig at another';
    return fail(1, `cannot load the kubeconfig ${file}: ${messageOf(err)} — ${fix}`);
  }
  // With nothing to load, client-node falls back to http://localhost:8080 under this context name.
  if (kubeConfig.getCurrentContext() === 'loaded-context') {
    const where = "KUBECONFIG, ~/.kube/config or a pod's service account";
    const fix = 'create a cluster (kind create cluster) or set KUBECONFIG';
    return fail(1, `no kubeconfig found (${where}) — ${fix}`);
  }
  if (flags.context && !kubeConfig.getContextObject(flags.context)) {
    const fix = 'list them with kubectl config get-contexts';
    return fail(1, `the kubeconfig ${file} has no context '${flags.context}' — ${fix}`);
  }
  if (flags.context) kubeConfig.setCurrentContext(flags.context);
  const cluster = kubeConfig.getCurrentCluster();
  if (!cluster?.server) {
    const fix = 'pick another with kubectl config use-context NAME';
    const name = kubeConfig.getCurrentContext();
    return fail(1, `the kubeconfig's context '${name}' names no cluster — ${fix}`);
  }
  if (cluster.server.startsWith('http:') && !cluster.skipTLSVerify) {
    const fix = 'use its https:// address, or set insecure-skip-tls-verify: true on the cluster';
    return fail(
      1,
      `the kubeconfig's server ${cluster.server} is plain HTTP, which kubectl refuses too` +
        ` — ${fix}`,
    );
  }
  if (cluster.skipTLSVerify) {
    console.error(
      `warning: insecure-skip-tls-verify is set, so the certificate of ${cluster.server} is not ` +
        'checked — set certificate-authority-data in the kubeconfig instead',
    );
  }
  return kubeConfig;
}

/** The namespace of the pod we run in, if we do. */
function podNamespace(): string | undefined {
  try {
    return readFileSync('/var/run/secrets/kubernetes.io/serviceaccount/namespace', 'utf8').trim();
  } catch {
    return undefined; // not in a pod
  }
}

// ---------------------------------------------------------------------------------------------
// Requests: node:https with the kubeconfig's CA and credentials, so that any runtime and any test
// server will do.

interface Status {
  code?: number;
  message?: string;
  details?: { retryAfterSeconds?: number };
}

/** An error response from the API server, or an ERROR event in a watch. */
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
  contentType?: string; // for a PATCH: which kind of patch the body is
  signal: AbortSignal;
}

/** The errors that requests to the API server met: only these can be the cluster's problem. */
const fromApiServer = new WeakSet<object>();

/** Sends requests to the server of `config`; every write first passes `fence` (leadership). */
class Api {
  readonly config: Config;
  readonly metrics: Metrics;
  fence = () => {};
  // Not the runtime's global agents: they drop a connection after 5 s without a byte, which is
  // every idle watch. Keep-alive spares a TLS handshake per request.
  private readonly agents = {
    http: new http.Agent({ keepAlive: true }),
    https: new https.Agent({ keepAlive: true }),
  };

  constructor(config: Config, metrics: Metrics) {
    this.config = config;
    this.metrics = metrics;
  }

  /** Sends a request; an answer over 299 is thrown as an ApiError. */
  async call(request: Call): Promise<http.IncomingMessage> {
    try {
      return await this.send(request);
    } catch (err) {
      if (typeof err === 'object' && err !== null) fromApiServer.add(err);
      throw err;
    }
  }

  private async send(request: Call): Promise<http.IncomingMessage> {
    const { verb, method = 'GET', path, query, body, signal } = request;
    // Lease writes are how a replica becomes and stays the leader: the fence is for the rest.
    if (method !== 'GET' && !path.includes('/leases')) this.fence();
    const { server, kubeConfig } = this.config;
    const url = new URL(`${server}${path}${query ? `?${query}` : ''}`);
    const headers = {
      Accept: 'application/json',
      'Content-Type': request.contentType ?? 'application/json',
      'User-Agent': CONTROLLER, // audit logs name us
    };
    // A request other than a watch that hears nothing for 30 s is on a dead connection.
    const timeout = verb === 'watch' ? undefined : 30_000;
    const options: https.RequestOptions = { method, signal, headers, timeout };
    // On every request, since exec and OIDC credentials refresh here; a plugin (exec or
    // auth-provider) that hangs is bounded by the request's signal like the request itself.
    const credentials = kubeConfig.applyToHTTPSOptions(options);
    const user = kubeConfig.getCurrentUser();
    await (user?.exec || user?.authProvider ? untilAborted(credentials, signal) : credentials);
    if (method !== 'GET' && !path.includes('/leases')) this.fence(); // credentials take time
    // Only a proxy-url in the kubeconfig needs client-node's own agent.
    if (!kubeConfig.getCurrentCluster()?.proxyUrl) {
      options.agent = url.protocol === 'http:' ? this.agents.http : this.agents.https;
    }
    const count = (code: string) => this.countRequest(code, method, url.host);
    const response = await new Promise<http.IncomingMessage>((resolve, reject) => {
      const client = url.protocol === 'http:' ? http : https;
      const sent = client.request(url, options, resolve);
      sent.on('error', (err) => {
        count('<error>');
        reject(err);
      });
      sent.on('timeout', () => sent.destroy(silence(`${server} did not answer for 30s`, 30_000)));
      sent.end(body === undefined ? undefined : JSON.stringify(body));
    });
    if (signal.aborted) {
      response.destroy(); // Deno lets a response in after its request was aborted
      throw signal.reason;
    }
    const code = response.statusCode ?? 0;
    count(String(code));
    if (code < 300) return response;
    throw await apiErrorOf(response, code, verb);
  }
  private countRequest(code: string, method: string, host: string) {
    this.metrics.count('rest_client_requests_total', { code, method, host });
  }

  async json<T>(request: Call): Promise<T> {
    return JSON.parse(await readAll(await this.call(request)));
  }
}

/** The error an answer over 299 says: its Status message, and how long it asks us to wait. */
async function apiErrorOf(response: http.IncomingMessage, code: number, verb: string) {
  const text = await readAll(response);
  // A missing CRD answers "404 page not found\n", not a Status.
  const status: Status = text.startsWith('{') ? JSON.parse(text) : { message: text.trim() };
  const header = response.headers['retry-after']; // seconds, or an HTTP date
  const retryAfter =
    Number(header) ||
    (header ? (Date.parse(header) - Date.now()) / 1000 : 0) ||
    status.details?.retryAfterSeconds;
  return apiError(code, status.message ?? `HTTP ${code}`, verb, Math.max(0, retryAfter || 0));
}

/** `promise`, unless `signal` aborts first. */
async function untilAborted<T>(promise: Promise<T>, signal: AbortSignal): Promise<T> {
  signal.throwIfAborted();
  let stop = () => {};
  const aborted = new Promise<never>((_resolve, reject) => {
    stop = () => reject(signal.reason);
    signal.addEventListener('abort', stop, { once: true });
  });
  try {
    return await Promise.race([promise, aborted]);
  } finally {
    signal.removeEventListener('abort', stop);
  }
}

// The event loop's heartbeat. A timer that fires after the process itself was paused (SIGSTOP, a
// suspended machine) measured our silence, not the server's.
const heartbeat = { last: performance.now(), pausedAt: Number.NEGATIVE_INFINITY };
setInterval(() => {
  const now = performance.now();
  if (now - heartbeat.last > 3_000) heartbeat.pausedAt = now;
  heartbeat.last = now;
}, 1_000).unref();

/** A timeout's error: the server's silence, unless we were paused within the last `ms`. */
function silence(message: string, ms: number): Error {
  const now = performance.now();
  const paused = now - heartbeat.last > 3_000 || now - heartbeat.pausedAt < ms;
  if (!paused) return new Error(message);
  return Object.assign(new Error('this process was paused'), { code: 'EPAUSED' });
}

/** The body of an answer from the API server; a connection cut meanwhile is its failure. */
async function readAll(response: http.IncomingMessage): Promise<string> {
  response.setEncoding('utf8'); // decodes across chunks, even inside a multi-byte character
  let body = '';
  try {
    for await (const chunk of response) body += chunk;
  } catch (err) {
    if (typeof err === 'object' && err !== null) fromApiServer.add(err);
    throw err;
  }
  return body;
}

/** Reads an answer we do not need to its end, so that its connection serves the next request. */
async function discard(response: http.IncomingMessage): Promise<void> {
  response.resume();
  await finished(response).catch((err: unknown) => {
    if (typeof err === 'object' && err !== null) fromApiServer.add(err);
    throw err;
  });
}

// ---------------------------------------------------------------------------------------------
// List and watch: they keep a cache equal to the server's objects, and never wait on a reconcile.

/** What a cache does with what list and watch bring. */
interface Cache {
  /** An object listed or watched; `listed` collects the keys of an initial state. */
  update(object: unknown, listed?: Set<string>): void;
  remove(object: unknown): void;
  /** After an initial state: what it lacks was deleted while we were not watching. */
  removeAllBut(listed: Set<string>): void;
  keyOf(object: unknown): string;
}

/** A collection to list and watch, and the cache that keeps it. */
interface Collection {
  plural: string; // as messages name it
  path: string; // in the namespace watched, or in all
  selector: string | undefined;
  cache: Cache;
}

interface List {
  metadata: { resourceVersion: string; continue?: string };
  items: unknown[] | null;
}

// One line of a watch stream. ADDED, MODIFIED and DELETED carry an object, BOOKMARK only a newer
// resourceVersion, ERROR a Status.
type WatchEvent = ObjectEvent | { type: 'ERROR'; object: Status };
type ObjectEvent = {
  type: 'ADDED' | 'MODIFIED' | 'DELETED' | 'BOOKMARK';
  object: { metadata: { resourceVersion: string; annotations?: Record<string, string> } };
};

/**
 * A connection can die without a word (a half-open TCP connection) and leave us waiting for ever.
 * The server ends a watch at the watch timeout, and a list gets as long: past that, plus a
 * grace, start over.
 */
function deadline(config: Config, verb: string, signal: AbortSignal) {
  const seconds = config.watchTimeoutSeconds + 5;
  const timeout = AbortSignal.timeout(seconds * 1000);
  const explain = (err: unknown) =>
    timeout.aborted ? silence(`the ${verb} was not over after ${seconds}s`, seconds * 1000) : err;
  return { signal: AbortSignal.any([signal, timeout]), explain };
}

const query = (collection: Collection, params: Record<string, string>) => {
  const { selector } = collection;
  return new URLSearchParams(selector ? { ...params, labelSelector: selector } : params);
};

/** A server that refuses to stream the initial state: list in pages instead, for the run. */
class NoStreamingList extends Error {}

/** What the lists, watches and workers of one server share: the problems said, and how it lists. */
interface ServerState {
  problems: Set<string>; // the problems said on stderr, until they clear
  streaming: boolean; // get initial states as a watch (KEP-3157) until the server says no
}

/** Where the list and watch of a collection stand. */
interface Position {
  resourceVersion: string; // where the next watch starts; empty: get the initial state first
  listed: Set<string> | undefined; // while an initial state streams in: its keys
}

/**
 * Keeps a cache equal to a collection on the server, for ever: gets the initial state, then
 * watches from its resourceVersion. Returns only when `signal` aborts; every failure is reported
 * (once while it lasts) and retried with backoff. `synced` is called once an initial state is in.
 */
async function listAndWatch(
  api: Api,
  collection: Collection,
  { health, stdout, serverState }: { health: Health; stdout: Writable; serverState: ServerState },
  synced: () => void,
  signal: AbortSignal,
): Promise<void> {
  const position: Position = { resourceVersion: '', listed: undefined };
  const retries = new Retries(api.config, collection, serverState);
  while (!signal.aborted) {
    position.listed = undefined;
    try {
      if (!position.resourceVersion && !serverState.streaming) {
        position.resourceVersion = await listInPages(api, collection, health, signal);
        synced();
      }
      await watch(api, collection, position, { health, stdout, synced, retries }, signal);
    } catch (err) {
      if (signal.aborted) break;
      const refused =
        err instanceof NoStreamingList || isApiError(err, 400) || isApiError(err, 422);
      if (position.listed && refused) {
        // An older server, or one without the WatchList feature: said once, for every collection.
        if (serverState.streaming) {
          console.error(
            `${api.config.server} cannot stream lists (${messageOf(err)}); ` +
              'listing in pages from now on',
          );
        }
        serverState.streaming = false;
        continue;
      }
      // 410 Gone: the server no longer has the history since our resourceVersion (or the list's
      // continue token expired). Only a new list tells what changed meanwhile.
      if (isApiError(err, 410)) position.resourceVersion = '';
      await sleep(retries.after(err), undefined, { signal }).catch(() => {});
    }
  }
}

/** Lists the whole collection in pages into its cache; returns the list's resourceVersion. */
async function listInPages(api: Api, collection: Collection, health: Health, signal: AbortSignal) {
  const listed = new Set<string>();
  let resourceVersion = '';
  for await (const page of listPages(api, collection, signal)) {
    for (const object of page.items ?? []) collection.cache.update(object, listed);
    resourceVersion = page.metadata.resourceVersion;
    health.progress();
  }
  collection.cache.removeAllBut(listed); // only a whole list is a starting point
  return resourceVersion;
}

/** Lists a collection, a page at a time; each page carries the list's resourceVersion. */
async function* listPages(api: Api, collection: Collection, signal: AbortSignal) {
  const params = query(collection, { limit: '500' });
  do {
    const limit = deadline(api.config, 'list', signal);
    const request = { verb: 'list', path: collection.path, query: params, signal: limit.signal };
    const page = await api.json<List>(request).catch((err) => Promise.reject(limit.explain(err)));
    yield page;
    // A continue token expires after a few minutes (HTTP 410): the caller then lists again.
    params.set('continue', page.metadata.continue ?? '');
  } while (params.get('continue'));
}

/**
 * The query of a watch from `resourceVersion`; without one, of a streaming list, which sends the
 * initial state first. Bookmarks tell even an idle watch the newer resourceVersions to resume from.
 * At timeoutSeconds the server ends the watch, and we resume: no connection is trusted for ever.
 */
function watchQuery(config: Config, collection: Collection, resourceVersion: string) {
  const from: Record<string, string> = resourceVersion
    ? { resourceVersion }
    : { sendInitialEvents: 'true', resourceVersionMatch: 'NotOlderThan' };
  const timeoutSeconds = String(config.watchTimeoutSeconds);
  return query(collection, { watch: 'true', ...from, allowWatchBookmarks: 'true', timeoutSeconds });
}

/** One watch, until the server ends it; with no resourceVersion, a streaming list first. */
async function watch(
  api: Api,
  collection: Collection,
  position: Position,
  {
    health,
    stdout,
    synced,
    retries,
  }: { health: Health; stdout: Writable; synced: () => void; retries: Retries },
  signal: AbortSignal,
) {
  const { resourceVersion } = position;
  const params = watchQuery(api.config, collection, resourceVersion);
  position.listed = resourceVersion ? undefined : new Set();
  const started = performance.now();
  let events = 0;
  for await (const chunk of watchEvents(api, collection.path, params, signal)) {
    // stdout is full: stop reading, so that the server waits on TCP. Not during a streaming list,
    // which would end at its deadline with no resourceVersion to resume from.
    if (!position.listed && stdout.writableNeedDrain) await once(stdout, 'drain', { signal });
    for (const event of chunk) {
      if (event.type === 'ERROR') {
        const { code = 500, message = 'ERROR event', details } = event.object;
        if (position.listed && (code === 400 || code === 422)) throw new NoStreamingList(message);
        throw apiError(code, message, 'watch', details?.retryAfterSeconds);
      }
      if (!position.listed) retries.cleared(); // the watch works: what failed before is over
      handleEvent(event, collection.cache, position, synced);
      events++;
      health.progress();
    }
  }
  // A streaming list that ends early was cut short (a restarting server): stream it again.
  if (position.listed) {
    throw new Error(`the list of ${collection.plural} ended before it was complete`);
  }
  health.progress();
  // The server ended the watch (its timeout): routine, resume at once. Unless it does so at once,
  // every time.
  if (events === 0 && performance.now() - started < 1000) {
    throw new Error('the watch ended at once, without any event');
  }
}

/** Watches a collection, yielding the events of each chunk; returns when the server ends it. */
async function* watchEvents(api: Api, path: string, params: URLSearchParams, signal: AbortSignal) {
  const limit = deadline(api.config, 'watch', signal);
  let response: http.IncomingMessage | undefined;
  try {
    response = await api.call({ verb: 'watch', path, query: params, signal: limit.signal });
    response.setEncoding('utf8');
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

/** Parses one line of a watch stream, checking what the loop relies on. */
function parseEvent(line: string): WatchEvent {
  let event: { type?: unknown; object?: { metadata?: { resourceVersion?: unknown } } } | null =
    null;
  try {
    event = JSON.parse(line);
  } catch {} // reported below
  const isChange = ['ADDED', 'MODIFIED', 'DELETED', 'BOOKMARK'].includes(String(event?.type));
  const resourceVersion = event?.object?.metadata?.resourceVersion;
  if (event?.type === 'ERROR' || (isChange && typeof resourceVersion === 'string')) {
    return event as WatchEvent;
  }
  throw new Error(`the watch sent a line that is not a watch event: ${line.slice(0, 60)}`);
}

/**
 * Puts one watch event into the cache. During a streaming list it notes each key, and at the
 * list's closing bookmark removes what the list did not have. (A function of its own, so that a
 * watch waiting for its next event does not keep the list's keys.)
 */
function handleEvent(event: ObjectEvent, cache: Cache, position: Position, synced: () => void) {
  const { listed } = position;
  const { metadata } = event.object;
  if (event.type === 'DELETED') cache.remove(event.object);
  else if (event.type !== 'BOOKMARK') cache.update(event.object, listed);
  else if (listed && metadata.annotations?.['k8s.io/initial-events-end'] === 'true') {
    cache.removeAllBut(listed); // the initial state is complete
    position.listed = undefined;
    synced();
  }
  // The initial events come in no order of resourceVersion: resume from them once complete.
  if (!position.listed) position.resourceVersion = metadata.resourceVersion;
}

// ---------------------------------------------------------------------------------------------
// The cache of objects: what the watch saw of each, and what each is owed (a reconcile of its
// newest spec, the Deleted of an earlier one). It tells the work queue which keys are due.

/** The name users see, and the caches' key: NAME in the namespace watched, else NAMESPACE/NAME. */
function keyOf(object: unknown, config: Pick<Config, 'namespace'>): string {
  const { metadata } = object as { metadata?: { namespace?: string; name?: string } };
  const { namespace = '', name = '' } = metadata ?? {};
  return namespace === config.namespace ? name : [namespace, name].join('/');
}

/** What the controller knows of one name. One object at a time has it; each has its own uid. */
export interface Entry {
  key: string; // NAME, or NAMESPACE/NAME with -A
  object: Resource | undefined; // the one the server has (selected, not being deleted), newest seen
  reconciled: Resource['metadata']['generation'] | undefined; // what its last Added/Modified saw
  tried: boolean; // a reconcile of it began (or our finalizer on it says so): its Deleted is owed
  drifted: boolean; // someone changed what reconcile made: reconcile again, printing nothing
  requeue: boolean; // its reconcile asked for another look: when it is next taken, it runs
  status: Record<string, unknown> | undefined; // its status fields besides Ready's
  gone: Gone[] | undefined; // earlier ones, oldest first, with what each is still owed
  // Its Ready condition on the server, if about the generation its status observed:
  ready: Ready | undefined; // what it says
  observed: number; // of which generation
  since: number; // since when (lastTransitionTime), in seconds as the API keeps it
}

/** What a Ready condition says. */
interface Ready {
  status: string; // True, False or Unknown
  reason: string;
  message: string;
}

/** Our last write of our finalizer onto an object (uid), and the resourceVersion it made. */
interface Echo {
  uid: string;
  resourceVersion: string;
  ours: boolean; // put on, or taken off
}

/** An object gone from the server (deleted, being deleted, or out of the -l selector). */
interface Gone {
  object: Resource; // the last seen
  owed: boolean; // its Deleted reconcile; else only our finalizer is left to take off
  watched: boolean; // still on the server and in the watch (being deleted): more events may come
}

interface Condition {
  type?: string;
  status?: string;
  reason?: string;
  message?: string;
  observedGeneration?: number;
  lastTransitionTime?: string;
}

/**
 * What the object's Ready condition says, of which generation, and since when: nothing unless it
 * is about the generation its status observed.
 */
function readyCondition(object: unknown) {
  const { status } = object as {
    status?: { observedGeneration?: number; conditions?: Condition[] };
  };
  const condition = status?.conditions?.find?.((item) => item.type === 'Ready');
  const observed = condition?.observedGeneration;
  if (!condition || observed === undefined || observed !== status?.observedGeneration) {
    return { ready: undefined, observed: 0, since: 0 };
  }
  const { status: is = '', reason = '', message = '' } = condition;
  const ready: Ready = { status: is, reason, message };
  const since = Math.floor(Date.parse(condition.lastTransitionTime ?? '') / 1000) || 0;
  // Most objects say what a success writes: they keep SUCCESS itself (bench: bytes per book).
  return { ready: sameReady(ready, SUCCESS) ? SUCCESS : ready, observed, since };
}

function sameReady(a: Ready | undefined, b: Ready | undefined) {
  return a?.status === b?.status && a?.reason === b?.reason && a?.message === b?.message;
}

/**
 * A 53-bit digest (cyrb53) of a value, taking each object's keys in sorted order, so that equal
 * content digests equal whatever order its keys come in. It reads the strings where they are,
 * building none: many ConfigMaps pass through here.
 */
class Digest {
  private h1 = 0xdeadbeef;
  private h2 = 0x41c6ce57;

  add(value: unknown): this {
    if (typeof value === 'string') return this.mix(value.length).mix(34).text(value); // 34: "
    if (typeof value !== 'object' || value === null) return this.text(String(value));
    if (Array.isArray(value)) {
      this.text('[');
      for (const item of value) this.add(item).text(',');
      return this.text(']');
    }
    this.text('{');
    for (const key of Object.keys(value).sort()) {
      const field = (value as Record<string, unknown>)[key];
      if (field !== undefined) this.add(key).add(field);
    }
    return this.text('}');
  }

  private text(text: string): this {
    for (let i = 0; i < text.length; i++) this.mix(text.charCodeAt(i));
    return this;
  }

  private mix(code: number): this {
    this.h1 = Math.imul(this.h1 ^ code, 2654435761);
    this.h2 = Math.imul(this.h2 ^ code, 1597334677);
    return this;
  }

  /** A number, so that each cached object keeps 8 bytes. */
  value(): number {
    const { h1, h2 } = this;
    const a = Math.imul(h1 ^ (h1 >>> 16), 2246822507) ^ Math.imul(h2 ^ (h2 >>> 13), 3266489909);
    const b = Math.imul(h2 ^ (h2 >>> 16), 2246822507) ^ Math.imul(a ^ (a >>> 13), 3266489909);
    return 4294967296 * (2097151 & b) + (a >>> 0);
  }
}

/**
 * The objects by key. What the watch says changes an entry, by these rules, and makes its key
 * due (urgent: it cuts a failure's backoff short) or not:
 *
 * | what the watch says            | what changes                                   | due      |
 * | ------------------------------ | ---------------------------------------------- | -------- |
 * | a new object (new name or uid) | it is the entry's object; the one before, gone | urgent   |
 * | back in the -l selector        | the same, as if new                            | urgent   |
 * | a new spec (generation)        | the newest is kept                             | urgent   |
 * | deleted, or out of the -l      | it is gone: its Deleted is owed if a reconcile | urgent   |
 * |   selector, or being deleted   |   of it began; else nothing (unless our        |          |
 * |                                |   finalizer is on it: that must come off)      |          |
 * | another Ready condition        | kept, so that ours is written again            | yes, not |
 * |                                |                                                | urgent   |
 * | our finalizer taken off        | kept, so that it is put back                   | yes, not |
 * |                                |                                                | urgent   |
 * | labels, annotations, status    | nothing                                        | no       |
 * | what reconcile made, changed   | drifted: reconcile again, printing nothing     | yes, not |
 * |                                |                                                | urgent   |
 *
 * Whether the key is idle, due, taken by a worker or backing off is the work queue's (below):
 * its rules make the same change right in every one of those states.
 */
export class ObjectCache implements Cache {
  readonly entries = new Map<string, Entry>();
  private readonly invalid = new Map<string, string>(); // objects that fail checkObject, and why
  // Rare states, by key, kept apart from the entries (every entry would pay for a field):
  private readonly finished = new Map<string, string>(); // a uid being deleted whose Deleted ran
  // Our last finalizer write on each, until its echo (the watch event our write caused) comes.
  private readonly echoes = new Map<string, Echo>();
  // While our finalizer write on one is in flight: the resourceVersions the watch shows of it, and
  // whether it left the watch (or was listed again) meanwhile.
  private readonly writing = new Map<string, { seen: Set<string>; left: boolean }>();
  // The reader's status fields we wrote (or could not), by key, until the watch shows them: an
  // event sent before our write would otherwise make the next write leave them out.
  readonly unwritten = new Map<string, Record<string, unknown>>();
  private readonly config: Pick<Config, 'namespace' | 'selector'>;
  private readonly queue: WorkQueue;
  readonly finalizer: string;

  constructor(config: Pick<Config, 'namespace' | 'selector'>, queue: WorkQueue, finalizer: string) {
    this.config = config;
    this.queue = queue;
    this.finalizer = finalizer;
  }

  /** The name users see, and the cache's key: NAME, or NAMESPACE/NAME with -A. */
  keyOf(object: unknown): string {
    return keyOf(object, this.config);
  }

  /** Whether our finalizer keeps `object` on the server until we let it go. */
  holds(object: Resource): boolean {
    return this.finalizer !== '' && object.metadata.finalizers?.includes(this.finalizer) === true;
  }

  update(object: unknown, listed?: Set<string>) {
    const key = this.keyOf(object);
    listed?.add(key);
    const checked = this.check(key, object);
    if (!checked) return;
    if (listed) this.relisted(key); // a list says what is now
    this.sees(key, checked, object);
    if (checked.metadata.deleting) return this.markGone(key, checked, true);
    const { ready, observed, since } = readyCondition(object);
    let entry = this.entries.get(key);
    if (!entry) {
      entry = newEntry(key);
      this.entries.set(key, entry);
    }
    const readyChanged =
      !sameReady(entry.ready, ready) || entry.observed !== observed || entry.since !== since;
    entry.ready = ready;
    entry.observed = observed;
    entry.since = since;
    entry.status = ownStatus(object);
    const unwritten = this.unwritten.get(key);
    if (
      unwritten &&
      new Digest().add({ ...entry.status, ...unwritten }).value() ===
        new Digest().add(entry.status).value()
    ) {
      this.unwritten.delete(key); // the server says them now
    }
    const before = entry.object?.metadata;
    if (before?.uid !== checked.metadata.uid) {
      if (entry.object) this.retire(entry, entry.object, false);
      // Our finalizer on it means an earlier run reconciled it, so its Deleted is owed. Not when
      // it is back in -l with the Deleted of its time before still owed (in gone): the finalizer
      // is that time's; nor while our own write of it is in flight: it may be this run's.
      const back = entry.gone?.some((gone) => gone.object.metadata.uid === checked.metadata.uid);
      entry.object = checked;
      entry.tried = this.holds(checked) && !back && !this.writing.has(key);
      return this.queue.add(key);
    }
    if (before.generation !== checked.metadata.generation) {
      entry.object = checked;
      return this.queue.add(key);
    }
    // The finalizers are kept up to date in place: the object is the same one. Ours gone from it
    // (someone took it off) makes it due, to put it back; never urgently.
    if (String(before.finalizers) !== String(checked.metadata.finalizers)) {
      const lost = !this.holds(checked) && before.finalizers?.includes(this.finalizer) === true;
      before.finalizers = checked.metadata.finalizers;
      if (lost) this.queue.add(key, false);
    }
    // A Ready condition other than ours makes it due, to write ours again; never urgently.
    if (readyChanged) this.queue.add(key, false);
  }

  remove(object: unknown) {
    const key = this.keyOf(object);
    this.invalid.delete(key);
    const entry = this.entries.get(key);
    const checked = checkObject(object);
    const last = typeof checked === 'string' ? entry?.object : checked;
    if (!entry || !last) return;
    if (last === checked) this.sees(key, checked, object);
    // Out of the watch: an echo still awaited will not come, and what comes later is newer.
    if (this.echoes.get(key)?.uid === last.metadata.uid) this.echoes.delete(key);
    const writing = this.writing.get(key);
    if (writing) writing.left = true;
    last.metadata.namespace = this.config.namespace ?? last.metadata.namespace;
    if (this.finished.get(key) === last.metadata.uid)
      this.finished.delete(key); // gone at last
    else this.markGone(key, last, false);
    this.settle(key);
  }

  removeAllBut(listed: Set<string>) {
    for (const [key, entry] of this.entries) {
      if (listed.has(key)) continue;
      this.relisted(key);
      this.finished.delete(key);
      for (const gone of entry.gone ?? []) gone.watched = false; // gone from the server as well
      if (entry.object) this.markGone(key, entry.object, false);
      this.settle(key);
    }
  }

  /** Someone changed what the object's reconcile made: reconcile it again, after its backoff. */
  repair(key: string) {
    const entry = this.entries.get(key);
    if (!entry?.object) return;
    entry.drifted = true;
    this.queue.add(key, false);
  }

  /**
   * An object that carries our finalizer but is not selected by -l (it left the selector while no
   * replica ran): its Deleted runs, and the finalizer comes off. Unless the watch has it.
   */
  orphan(object: unknown) {
    const key = this.keyOf(object);
    const checked = checkObject(object);
    if (typeof checked === 'string') return;
    // One the selector matches is the watch's: its list may be newer than this one.
    const { labels } = (object as { metadata: { labels?: Record<string, string> } }).metadata;
    if (this.config.selector && selects(this.config.selector, labels)) return;
    checked.metadata.namespace = this.config.namespace ?? checked.metadata.namespace;
    const entry = this.entries.get(key);
    this.sees(key, checked, object);
    if (!this.holds(checked)) return;
    if (entry?.object?.metadata.uid === checked.metadata.uid) return;
    this.markGone(key, checked, false);
  }

  /**
   * We wrote our finalizer onto `object` (`ours`: put it on; else took it off), and the server
   * answered with `resourceVersion`. Until the watch shows that write, an event sent before it
   * does not undo it (see sees). Gone meanwhile (or out of -l), a finalizer put on must come off.
   */
  /** An echo awaited will not come, or comes after what the list said: awaited no longer. */
  private relisted(key: string) {
    this.echoes.delete(key);
    const writing = this.writing.get(key);
    if (writing) writing.left = true;
  }

  /** Our finalizer write on `key` begins: what the watch shows of it meanwhile is noted. */
  writes(key: string) {
    this.writing.set(key, { seen: new Set(), left: false });
  }

  wrote(key: string, object: Resource, resourceVersion: string, ours: boolean) {
    const writing = this.writing.get(key);
    this.writing.delete(key);
    const entry = this.entries.get(key);
    // Its echo came before the answer: the cache says that, or something newer, already.
    if (!entry || writing?.seen.has(resourceVersion)) return;
    const { uid } = object.metadata;
    const gone = entry.gone?.find((earlier) => earlier.object.metadata.uid === uid);
    const live = entry.object?.metadata.uid === uid;
    // Out of the watch and back meanwhile: what it says may be older than the write, or newer.
    // Another look settles it (the finalizer patch reads the object first).
    if (live && writing?.left) return this.queue.add(key, false);
    // Its echo comes only while the watch shows it (selected, or being deleted). '': it was so.
    if (resourceVersion && !writing?.left && (live || gone?.watched)) {
      this.echoes.set(key, { uid, resourceVersion, ours });
    }
    const known = live ? entry.object : gone?.object;
    if (known) return this.setOurs(known, ours);
    if (!ours) return;
    const held = { ...object, metadata: { ...object.metadata } };
    this.setOurs(held, true);
    entry.gone = [...(entry.gone ?? []), { object: held, owed: false, watched: false }];
    this.queue.add(key);
  }

  /**
   * An event for `object` as the watch sent it, seen through our last finalizer write: an event
   * older than that write's own shows our finalizer as we left it (resourceVersions are only ever
   * compared for equality: the watch sends them in order, so ours comes before newer ones).
   */
  private sees(key: string, object: Resource, raw: unknown) {
    const { resourceVersion } = (raw as { metadata?: { resourceVersion?: string } }).metadata ?? {};
    if (resourceVersion) this.writing.get(key)?.seen.add(resourceVersion);
    const echo = this.echoes.get(key);
    if (echo?.uid !== object.metadata.uid) return;
    if (resourceVersion === echo.resourceVersion)
      this.echoes.delete(key); // caught up
    else this.setOurs(object, echo.ours);
  }

  private setOurs(object: Resource, ours: boolean) {
    const others = (object.metadata.finalizers ?? []).filter((name) => name !== this.finalizer);
    const finalizers = ours ? [...others, this.finalizer] : others;
    object.metadata.finalizers = finalizers.length > 0 ? finalizers : undefined;
  }

  /** An owner's key, as the cache has it: one copy of the string, not two. */
  ownerKey(namespace: string | undefined, name: string | undefined): string {
    const key = this.keyOf({ metadata: { namespace, name } });
    return this.entries.get(key)?.key ?? key;
  }

  /** The Deleted of `uid`, being deleted, has run: its later events are its finalizers going. */
  finish(key: string, uid: string) {
    this.finished.set(key, uid);
  }

  /** Forgets the key once it holds nothing and no worker has it. */
  settle(key: string) {
    const entry = this.entries.get(key);
    if (!entry || entry.object || entry.gone || this.finished.has(key)) return;
    if (this.queue.busy.has(key)) return;
    this.entries.delete(key);
    this.echoes.delete(key);
    this.writing.delete(key);
    this.unwritten.delete(key);
    this.queue.forget(key);
  }

  /** The object `last` is gone from the server, or is going: what is owed for it. */
  private markGone(key: string, last: Resource, watched: boolean) {
    const { uid } = last.metadata;
    const entry = this.entries.get(key);
    if (this.finished.get(key) === uid) return; // its Deleted ran: the rest is its finalizers going
    // The object the entry has now (it may be back in -l since an earlier one of it went).
    if (entry?.object?.metadata.uid === uid) return this.retire(entry, last, watched);
    const earlier = entry?.gone?.find((gone) => gone.object.metadata.uid === uid);
    if (earlier) {
      earlier.object = last; // its Deleted sees the newest spec
      earlier.watched = watched;
      return;
    }
    // One we never saw: ours only if our finalizer is on it (an earlier run reconciled it; unless
    // our own write of it is in flight: then only the finalizer is to come off).
    if (!this.holds(last)) return;
    const owner = entry ?? newEntry(key);
    this.entries.set(key, owner);
    if (owner.object) this.retire(owner, owner.object, false); // the watch has not told yet
    owner.gone = [...(owner.gone ?? []), { object: last, owed: !this.writing.has(key), watched }];
    this.queue.add(key);
  }

  /** The entry's object is gone: what it is owed moves to `gone`. */
  private retire(entry: Entry, last: Resource, watched: boolean) {
    const { uid } = last.metadata;
    const earlier = entry.gone?.find((gone) => gone.object.metadata.uid === uid);
    if (earlier) {
      // Back and gone again before its time out was done: one item, owing what either owes.
      Object.assign(earlier, { object: last, owed: earlier.owed || entry.tried, watched });
      this.queue.add(entry.key);
    } else if (entry.tried || this.holds(last)) {
      entry.gone = [...(entry.gone ?? []), { object: last, owed: entry.tried, watched }];
      this.queue.add(entry.key);
    }
    Object.assign(entry, { object: undefined, reconciled: undefined, tried: false });
    Object.assign(entry, { drifted: false, requeue: false, status: undefined });
  }

  /** The object, checked; an object the check refuses is said once per reason, and left. */
  private check(key: string, object: unknown): Resource | undefined {
    const checked = checkObject(object);
    if (typeof checked !== 'string') {
      this.invalid.delete(key);
      // One copy of the namespace for all, when one namespace is watched.
      checked.metadata.namespace = this.config.namespace ?? checked.metadata.namespace;
      return checked;
    }
    if (this.invalid.get(key) === checked) return;
    this.invalid.set(key, checked);
    const { name, namespace } = (object as { metadata: Resource['metadata'] }).metadata;
    const fix = `fix it with kubectl edit ${kind} ${name} -n ${namespace}`;
    console.error(`ignoring ${kind} ${key}: ${checked} — ${fix}`);
  }
}

/** The status fields of the reader's own: all but Ready's (conditions and observedGeneration). */
function ownStatus(object: unknown): Record<string, unknown> | undefined {
  const { status } = object as { status?: Record<string, unknown> };
  if (typeof status !== 'object' || status === null) return undefined;
  const { conditions, observedGeneration, ...own } = status;
  return Object.keys(own).length > 0 ? own : undefined;
}

/** Whether labels match a label selector as the API server reads it: a=b, a!=b, a in (x,y), a
 * notin (x), a, !a, joined by commas. */
function selects(selector: string, labels: Record<string, string> = {}): boolean {
  const terms = selector.match(/[^,(]+(\([^)]*\))?/g) ?? [];
  return terms.every((text) => {
    const term = text.trim();
    const compare = /^([^\s=!]+)\s*(==|=|!=)\s*(\S*)$/.exec(term);
    if (compare) {
      const [, key = '', operator, value] = compare;
      return operator === '!=' ? labels[key] !== value : labels[key] === value;
    }
    const set = /^(\S+)\s+(in|notin)\s+\(([^)]*)\)$/.exec(term);
    if (set) {
      const [, key = '', operator, values = ''] = set;
      const listed = values.split(',').map((value) => value.trim());
      const has = key in labels && listed.includes(labels[key] ?? '');
      return operator === 'in' ? has : !has;
    }
    if (term.startsWith('!')) return !(term.slice(1).trim() in labels);
    return term in labels;
  });
}

function newEntry(key: string): Entry {
  return {
    key,
    object: undefined,
    reconciled: undefined,
    tried: false,
    drifted: false,
    requeue: false,
    status: undefined,
    gone: undefined,
    ready: undefined,
    observed: 0,
    since: 0,
  };
}

// ---------------------------------------------------------------------------------------------
// What reconcile made: for each owned kind, a cache of what its watch says, enough to find each
// object's owner, to tell whether it still says what reconcile applied, and to answer client.get.

/** An owned object as the cache keeps it. */
interface OwnedEntry {
  owner: string; // the key of the object of ours that controls it (by kind and name), or ''
  other: string | undefined; // its controller, if that is not one of ours: 'Kind name'
  applied: number; // a digest of the fields this controller applied, as they are now
  object?: unknown; // with `keep`, the object without its managedFields: what client.get answers
}

type Reference = {
  apiVersion?: string;
  kind?: string;
  name?: string;
  uid?: string;
  controller?: boolean;
};
type ManagedFields = {
  manager?: string;
  operation?: string;
  subresource?: string;
  fieldsV1?: object;
};
/** An object of any kind, as the API server sends it: what the owned caches read of it. */
type KubeObject = {
  apiVersion?: string;
  kind?: string;
  metadata?: {
    name?: string;
    namespace?: string;
    resourceVersion?: string;
    labels?: Record<string, string>;
    ownerReferences?: Reference[];
    managedFields?: ManagedFields[];
  };
};

const groupOf = (apiVersion = '') => (apiVersion.includes('/') ? apiVersion.split('/')[0] : '');

/**
 * The objects of one owned kind that carry the managed-by label, by key, as its watch says: whose
 * each is, and whether it still says what this controller applied. A change by someone else to
 * what we applied (an edit, a deletion, the label taken off) makes its owner due, as a repair.
 */
class OwnedCache implements Cache {
  readonly entries = new Map<string, OwnedEntry>();
  // Applies in flight: what each applies, and whether another change came meanwhile.
  readonly applying = new Map<string, { digest: number; overtaken: boolean }>();
  readonly owned: Owned; // the kind, as OWNED lists it
  private readonly config: Config;
  private readonly objects: ObjectCache;

  constructor(owned: Owned, config: Config, objects: ObjectCache) {
    this.owned = owned;
    this.config = config;
    this.objects = objects;
  }

  /** NAME in the namespace watched, else NAMESPACE/NAME: each kind has its own. */
  keyOf(object: unknown): string {
    return keyOf(object, this.config);
  }

  entryOf(object: unknown): OwnedEntry {
    const { managedFields = [], ...metadata } = (object as KubeObject).metadata ?? {};
    const controller = metadata.ownerReferences?.find((reference) => reference.controller);
    const mine = controller?.kind === KIND && groupOf(controller.apiVersion) === GROUP;
    // Found by kind and name, as controller-runtime's EnqueueRequestForOwner: a copy restored
    // with an earlier owner's uid is the owner's to repair, not a stranger's.
    const owner = mine ? this.objects.ownerKey(metadata.namespace, controller.name) : '';
    const ours = managedFields.find(
      (fields) =>
        fields.manager === CONTROLLER && fields.operation === 'Apply' && !fields.subresource,
    );
    const digest = ours ? new Digest().add(project(object, ours.fieldsV1 ?? {})).value() : 0;
    const kept = this.owned.keep ? { ...(object as object), metadata } : undefined;
    const other = controller && !mine ? `${controller.kind} ${controller.name}` : undefined;
    return kept
      ? { owner, other, applied: digest, object: kept }
      : { owner, other, applied: digest };
  }

  update(object: unknown, listed?: Set<string>) {
    const key = this.keyOf(object);
    listed?.add(key);
    const entry = this.entryOf(object);
    const before = this.entries.get(key);
    this.entries.set(key, entry);
    const applying = this.applying.get(key);
    if (applying?.digest === entry.applied) return; // our own apply, coming back
    if (applying) applying.overtaken = true;
    if (before?.applied !== entry.applied || before.owner !== entry.owner) this.changed(entry);
    // Someone took the owner reference off: the object that had it puts it back.
    if (before?.owner && before.owner !== entry.owner) this.changed(before);
  }

  remove(object: unknown) {
    const key = this.keyOf(object);
    const applying = this.applying.get(key);
    if (applying) applying.overtaken = true;
    const before = this.entries.get(key);
    this.entries.delete(key);
    if (before) this.changed(before);
  }

  removeAllBut(listed: Set<string>) {
    for (const [key, entry] of this.entries) {
      if (listed.has(key)) continue;
      this.entries.delete(key);
      this.changed(entry);
    }
  }

  /** Whether the watch sees objects in this namespace. */
  covers(namespace: string | undefined): boolean {
    return this.config.namespace === undefined || namespace === this.config.namespace;
  }

  private changed({ owner }: OwnedEntry) {
    if (owner) this.objects.repair(owner);
  }
}

/**
 * The part of `value` that a managedFields entry (fieldsV1) names: what one manager set. `f:` is
 * a field, `k:` a list item by its keys, `v:` a list item by its value, `.` the item itself.
 */
function project(value: unknown, fields: object): unknown {
  const names = Object.keys(fields).filter((name) => name !== '.');
  if (names.length === 0) return value;
  const inner = fields as Record<string, object>;
  if (Array.isArray(value)) {
    const items = names.map((name) => [JSON.parse(name.slice(2)), inner[name] ?? {}] as const);
    return value.flatMap((item) => {
      const found = items.find(([key]) => matches(item, key));
      return found ? [project(item, found[1])] : [];
    });
  }
  if (typeof value !== 'object' || value === null) return value;
  const projected: Record<string, unknown> = {};
  for (const name of names) {
    const field = name.slice(2);
    if (name.startsWith('f:') && field in value) {
      projected[field] = project((value as Record<string, unknown>)[field], inner[name] ?? {});
    }
  }
  return projected;
}

/** Whether a list item is the one a `k:` key (its fields) or a `v:` key (its value) names. */
function matches(item: unknown, key: unknown): boolean {
  if (typeof key !== 'object' || key === null || typeof item !== 'object' || item === null) {
    return item === key;
  }
  const fields = Object.entries(key);
  return fields.every(([name, value]) => (item as Record<string, unknown>)[name] === value);
}

/** The fields an apply of `object` sets, as they come back in the projection of what we own. */
function applied(object: object): number {
  const {
    apiVersion,
    kind,
    metadata = {},
    ...content
  } = object as KubeObject & Record<string, unknown>;
  const { name, namespace, ...rest } = metadata;
  return new Digest().add({ ...content, metadata: rest }).value();
}

/**
 * The owned kinds' caches, and what reconcile's client does with them: an apply that is sent
 * only where it changes something, and never takes over an object that is not ours; a get that
 * answers from the cache what the watch sees.
 */
class OwnedObjects {
  readonly caches: OwnedCache[]; // one per owned kind

  constructor(config: Config, objects: ObjectCache, kinds: Owned[]) {
    this.caches = kinds.map((kind) => new OwnedCache(kind, config, objects));
  }

  /** The cache of the object's kind, if it is owned and its watch sees it. */
  private cacheOf(apiVersion: unknown, kind: unknown, namespace: string | undefined) {
    const cache = this.caches.find(
      (cache) => cache.owned.apiVersion === apiVersion && cache.owned.kind === kind,
    );
    return cache?.covers(namespace) ? cache : undefined;
  }

  /** The object at `path`, if the cache has it: an owned kind's, with the label (a copy). */
  get(path: string): unknown {
    const parts = /^\/(?:api\/(v1)|apis\/([^/]+\/[^/]+))\/namespaces\/([^/]+)\/([^/]+)\/([^/]+)$/;
    const [, core, grouped, namespace, plural, name] = parts.exec(path) ?? [];
    const cache = this.caches.find(
      (cache) => cache.owned.apiVersion === (core ?? grouped) && cache.owned.plural === plural,
    );
    if (!cache?.owned.keep || !cache.covers(namespace)) return undefined;
    const entry = cache.entries.get(cache.keyOf({ metadata: { namespace, name } }));
    return entry && structuredClone(entry.object);
  }

  /**
   * Server-side apply of `object` as CONTROLLER. Of an owned kind with the managed-by label, the
   * watch sees it: not sent when the cache shows the fields we set already as given, and never
   * over an object that is not ours (ours: the label, or a book of this name as its controller).
   */
  async apply(api: Api, path: string, object: object, signal: AbortSignal): Promise<void> {
    const { apiVersion, kind, metadata = {} } = object as KubeObject;
    const labelled = metadata.labels?.[LABEL] === CONTROLLER;
    const cache = labelled ? this.cacheOf(apiVersion, kind, metadata.namespace) : undefined;
    if (!cache) return sendApply(api, path, object, signal);
    const key = cache.keyOf(object);
    const cached = cache.entries.get(key);
    const wanted = cache.entryOf(object);
    const digest = applied(object);
    const another = cached?.owner && cached.owner !== wanted.owner ? `${KIND} ${cached.owner}` : '';
    if (cached && (cached.other || another)) {
      throw notOurs(object, wanted.owner, cached.other ?? another);
    }
    if (cached?.applied === digest) return;
    const applying = { digest, overtaken: false };
    cache.applying.set(key, applying);
    try {
      if (cached) await applyOver(api, path, object, signal);
      else await createOrRepair(api, cache, path, object, signal);
      // The object says at least this now, so its watch event is no change (unless the watch
      // already told something newer). No body is kept: client.get answers from the watch.
      if (!applying.overtaken)
        cache.entries.set(key, { owner: wanted.owner, other: undefined, applied: digest });
    } finally {
      cache.applying.delete(key);
    }
  }
}

/**
 * The apply of an object the cache lacks: none is there, or one that is not ours (it has no label).
 * A resourceVersion that no object has makes the apply create it, or fail with 409 if one is
 * there: then it is read, and applied only if it is ours.
 */
async function createOrRepair(
  api: Api,
  cache: OwnedCache,
  path: string,
  object: object,
  signal: AbortSignal,
) {
  const { metadata } = object as KubeObject;
  const onlyNew = { ...object, metadata: { ...metadata, resourceVersion: '1' } };
  try {
    return await sendApply(api, path, onlyNew, signal);
  } catch (err) {
    if (!isApiError(err, 409)) throw err;
  }
  const current = await api.json<KubeObject>({ verb: 'get', path, signal }).catch((err) => {
    if (isApiError(err, 404)) return undefined; // gone since
    throw err;
  });
  const owner = cache.entryOf(object).owner;
  const labelled = current?.metadata?.labels?.[LABEL] === CONTROLLER;
  const controlled =
    owner !== '' && current !== undefined && cache.entryOf(current).owner === owner;
  if (current && !labelled && !controlled) throw notOurs(current, owner);
  await applyOver(api, path, object, signal);
}

/**
 * The apply. Refused for a second controller (422): an earlier owner's reference (a book of this
 * name, another uid) that someone else's write restored, which an apply cannot take off (it is
 * theirs). A merge patch then replaces the list without it, if nobody wrote since.
 */
async function applyOver(api: Api, path: string, object: object, signal: AbortSignal) {
  try {
    return await sendApply(api, path, object, signal);
  } catch (err) {
    if (!isApiError(err, 422)) throw err;
    const current = await api.json<KubeObject>({ verb: 'get', path, signal });
    if (!(await dropStaleOwner(api, path, current, object, signal))) throw err;
  }
  await sendApply(api, path, object, signal);
}

/** Takes an earlier owner's reference off `current`; false if it has none. */
async function dropStaleOwner(
  api: Api,
  path: string,
  current: unknown,
  object: object,
  signal: AbortSignal,
) {
  const isController = (reference: Reference) => reference.controller && reference.kind === KIND;
  const wanted = (object as KubeObject).metadata?.ownerReferences?.find(isController);
  const { resourceVersion, ownerReferences = [] } = (current as KubeObject).metadata ?? {};
  const stale = ownerReferences.find(
    (reference) =>
      isController(reference) && reference.name === wanted?.name && reference.uid !== wanted?.uid,
  );
  if (!stale) return false;
  const kept = ownerReferences.filter((reference) => reference !== stale);
  const body = { metadata: { resourceVersion, ownerReferences: kept } };
  const request = { verb: 'patch', method: 'PATCH', path, body, contentType: MERGE_PATCH };
  await discard(await api.call({ ...request, signal }));
  return true;
}

const LABEL = Object.keys(MANAGED_BY)[0] ?? '';

async function sendApply(api: Api, path: string, object: object, signal: AbortSignal) {
  const query = new URLSearchParams({ fieldManager: CONTROLLER, force: 'true' });
  const contentType = 'application/apply-patch+yaml'; // JSON is YAML
  const request = { verb: 'apply', method: 'PATCH', path, query, body: object, contentType };
  await discard(await api.call({ ...request, signal }));
}

/** An object reconcile would take over from someone else: it is left alone, and this says why. */
class NotOurs extends Error {
  readonly reason = 'ErrResourceExists'; // as sample-controller's Event says it
}

function notOurs(object: unknown, owner: string, controlledBy?: string): NotOurs {
  const { kind: itsKind = 'the object', metadata = {} } = object as KubeObject;
  const what = `${itsKind} ${metadata.namespace}/${metadata.name} already exists`;
  const controller = metadata.ownerReferences?.find((reference) => reference.controller);
  const by = controlledBy ?? (controller && `${controller.kind} ${controller.name}`);
  if (by) {
    const whose = `${what} and is controlled by ${by}`;
    const fix = 'delete it, or take it off its owner';
    return new NotOurs(`${whose}, not by this ${kind}${owner ? ` (${owner})` : ''} — ${fix}`);
  }
  const label = `${LABEL}=${CONTROLLER}`;
  return new NotOurs(
    `${what} and is not managed by ${CONTROLLER} — ` +
      `delete it, or label it ${label} to hand it over`,
  );
}

// ---------------------------------------------------------------------------------------------
// The work queue: which keys are due, and when the waiting ones will be. It knows keys, not
// objects.

/** Time as the work queue reads it, and its one timer (tests pass a clock they move by hand). */
export interface Clock {
  now(): number; // milliseconds, monotonic
  after(ms: number, callback: () => void): () => void; // returns what cancels it
}

const monotonic: Clock = {
  now: () => performance.now(),
  after: (ms, callback) => {
    const timer = setTimeout(callback, ms);
    return () => clearTimeout(timer);
  },
};

/** A key waiting for a time: its backoff after a failure, or a later look reconcile asked for. */
interface Wait {
  at: number;
  backoff: boolean;
}

/**
 * Keys to reconcile, with client-go's workqueue rules:
 * - a key is never taken by two workers at once;
 * - a key added while a worker has it is taken again once that worker is done, in its latest
 *   state (whatever was added meanwhile, once);
 * - a key that failed waits its backoff (about 1 s, doubling to 5 minutes), which only an urgent
 *   add (a new spec, uid or deletion) cuts short; a success forgets its failures;
 * - a key may wait for a time (reconcile asked to look again later): an add before then takes it
 *   at once. One timer serves every waiting key, the earliest, as client-go's delaying queue does.
 * A key is in at most one of `due`, `busy` and `waits`.
 */
export class WorkQueue {
  private readonly due = new Map<string, number>(); // due now, in order, and since when
  readonly busy = new Map<string, number>(); // taken by a worker, and since when
  private readonly again = new Map<string, boolean>(); // added while busy: whether urgently
  private readonly failures = new Map<string, number>(); // in a row, for the backoff
  private readonly waits = new Map<string, Wait>(); // waiting for a time
  private readonly times: [number, string][] = []; // the same times as a heap, earliest first
  private timer: { at: number; cancel: () => void } | undefined;
  private idle: (() => void)[] = []; // workers waiting for a due key
  private stopped = false;
  private readonly clock: Clock;
  private readonly metrics: Metrics | undefined;

  constructor(clock: Clock = monotonic, metrics?: Metrics) {
    this.clock = clock;
    this.metrics = metrics;
    if (metrics) this.measure(metrics);
  }

  /** Marks a key as due. Not `urgent`: a key backing off waits for its backoff to end. */
  add(key: string, urgent = true) {
    if (this.busy.has(key)) {
      this.again.set(key, urgent || this.again.get(key) === true);
      return;
    }
    if (!urgent && this.waits.get(key)?.backoff) return;
    this.waits.delete(key); // its time in the heap is stale now
    if (this.due.has(key)) return;
    this.due.set(key, this.clock.now());
    this.metrics?.count('workqueue_adds_total', QUEUE);
    this.idle.shift()?.();
  }

  /** Waits for the next due key and marks it busy; undefined once `signal` aborts. */
  async next(signal: AbortSignal): Promise<string | undefined> {
    while (!signal.aborted && !this.stopped) {
      const [first] = this.due;
      if (first === undefined) {
        await new Promise<void>((resolve) => this.idle.push(resolve));
        continue;
      }
      const [key, since] = first;
      this.due.delete(key);
      const now = this.clock.now();
      this.busy.set(key, now);
      const waited = (now - since) / 1000;
      this.metrics?.observe('workqueue_queue_duration_seconds', QUEUE, waited, QUEUE_BUCKETS);
      return key;
    }
  }

  /**
   * A worker is done with `key`. After a failure it waits its backoff; after a success, the
   * `laterMs` reconcile asked for, if any. Returns how long it waits (0: it does not).
   */
  done(key: string, failed: boolean, laterMs = 0): number {
    const taken = this.busy.get(key) ?? this.clock.now();
    this.busy.delete(key);
    const seconds = (this.clock.now() - taken) / 1000;
    this.metrics?.observe('workqueue_work_duration_seconds', QUEUE, seconds, QUEUE_BUCKETS);
    const failures = failed ? (this.failures.get(key) ?? 0) + 1 : 0;
    if (failed) {
      this.failures.set(key, failures);
      this.metrics?.count('workqueue_retries_total', QUEUE);
    } else {
      this.failures.delete(key);
    }
    const delayMs = failed ? jitter(Math.min(5 * 60_000, 1000 * 2 ** failures)) : laterMs;
    if (delayMs > 0) this.wait(key, delayMs, failed);
    const again = this.again.get(key);
    this.again.delete(key);
    if (again !== undefined) this.add(key, again);
    return delayMs;
  }

  /** The key is gone for good: no backoff or wait is kept for it. */
  forget(key: string) {
    this.failures.delete(key);
    this.waits.delete(key);
  }

  /** How many keys are due now. */
  get depth(): number {
    return this.due.size;
  }

  /** Whether the key waits for a time (a backoff, or a later look). */
  isWaiting(key: string): boolean {
    return this.waits.has(key);
  }

  stop() {
    this.stopped = true;
    this.timer?.cancel();
    for (const wake of this.idle) wake();
  }

  private wait(key: string, ms: number, backoff: boolean) {
    if (this.stopped) return;
    const at = this.clock.now() + ms;
    this.waits.set(key, { at, backoff });
    heapPush(this.times, [at, key]);
    // A stale time leaves the heap when it passes. Keys that wait anew often (a later look cut
    // short by each change) would pile them up for as long: past twice the waits, start afresh.
    if (this.times.length > 2 * this.waits.size + 64) {
      this.times.length = 0;
      for (const [waiting, wait] of this.waits) heapPush(this.times, [wait.at, waiting]);
    }
    this.arm();
  }

  /** Sets the one timer for the earliest time in the heap that is still a key's. */
  private arm() {
    while (this.times[0] && this.waits.get(this.times[0][1])?.at !== this.times[0][0]) {
      heapPop(this.times);
    }
    const earliest = this.times[0];
    if (!earliest || this.stopped || (this.timer && this.timer.at <= earliest[0])) return;
    this.timer?.cancel();
    const at = earliest[0];
    const fire = () => {
      this.timer = undefined;
      this.expire();
    };
    // Timers take at most 2^31 - 1 ms (24.8 days): a later time is armed for again from there.
    const ms = Math.min(Math.max(0, at - this.clock.now()), 2 ** 31 - 1);
    this.timer = { at: this.clock.now() + ms, cancel: this.clock.after(ms, fire) };
  }

  /** The keys whose time has come are due. */
  private expire() {
    const now = this.clock.now();
    while (this.times[0] && this.times[0][0] <= now) {
      const [at, key] = heapPop(this.times) ?? [0, ''];
      if (this.waits.get(key)?.at !== at) continue; // added since: a stale time
      this.waits.delete(key);
      this.add(key);
    }
    this.arm();
  }

  private measure(metrics: Metrics) {
    metrics.count('workqueue_adds_total', QUEUE, 0);
    metrics.count('workqueue_retries_total', QUEUE, 0);
    metrics.gauge('workqueue_depth', () => [[QUEUE, this.due.size]]);
    metrics.gauge('workqueue_longest_running_processor_seconds', () => {
      const [first] = this.busy.values(); // taken first, so running longest
      return [[QUEUE, first === undefined ? 0 : (this.clock.now() - first) / 1000]];
    });
    metrics.gauge('workqueue_unfinished_work_seconds', () => {
      let total = 0;
      for (const taken of this.busy.values()) total += this.clock.now() - taken;
      return [[QUEUE, total / 1000]];
    });
  }
}

const jitter = (ceilingMs: number) => ceilingMs / 2 + (Math.random() * ceilingMs) / 2;

/** Adds to a binary heap of [time, key], earliest first. */
function heapPush(heap: [number, string][], item: [number, string]) {
  heap.push(item);
  for (let i = heap.length - 1; i > 0; ) {
    const parent = (i - 1) >> 1;
    if ((heap[parent]?.[0] ?? 0) <= item[0]) break;
    [heap[i], heap[parent]] = [heap[parent] as [number, string], item];
    i = parent;
  }
}

/** Takes the earliest from a binary heap of [time, key]. */
function heapPop(heap: [number, string][]): [number, string] | undefined {
  const top = heap[0];
  const last = heap.pop();
  if (heap.length === 0 || !last) return top;
  heap[0] = last;
  for (let i = 0; ; ) {
    const left = 2 * i + 1;
    const right = left + 1;
    let least = i;
    if (left < heap.length && (heap[left]?.[0] ?? 0) < (heap[least]?.[0] ?? 0)) least = left;
    if (right < heap.length && (heap[right]?.[0] ?? 0) < (heap[least]?.[0] ?? 0)) least = right;
    if (least === i) break;
    [heap[i], heap[least]] = [heap[least] as [number, string], heap[i] as [number, string]];
    i = least;
  }
  return top;
}

// ---------------------------------------------------------------------------------------------
// Workers: they take due objects and reconcile them, one at a time each; --concurrency side by
// side.

interface Worker {
  api: Api;
  problems: ClusterProblems;
  events: EventRecorder;
  queue: WorkQueue;
  objects: ObjectCache;
  owned: OwnedObjects;
  statusWriter: StatusWriter;
  client: Client; // what reconcile's requests go through: one for all, stopped with `signal`
  print: Print;
  reconcile: Reconcile;
  signal: AbortSignal;
}

/** Takes due objects and reconciles them until `signal` aborts. */
async function work(worker: Worker) {
  const { queue, objects, signal } = worker;
  for (let key = await queue.next(signal); key !== undefined; key = await queue.next(signal)) {
    const entry = objects.entries.get(key);
    const object = entry?.object;
    const subject = entry?.gone?.[0]?.object ?? object; // what a failure is about
    const started = performance.now();
    let failure: unknown;
    let result: Result | undefined;
    try {
      result = await reconcileKey(objects, key, stepsFor(worker, key));
    } catch (err) {
      failure = err ?? new Error(`threw ${err}`);
    }
    if (signal.aborted) return;
    // An object that changed meanwhile is due again: its status waits for its latest state. A
    // failure while an earlier object's Deleted was still owed (gone items go first, and leave
    // only when done) is that object's, not this one's: nothing is said in this one's status.
    let statusFailure: unknown;
    const current = entry && object && entry.object === object;
    const earlierFailed = failure !== undefined && entry?.gone !== undefined;
    if (current && !earlierFailed) {
      const own = result?.status;
      statusFailure = await worker.statusWriter
        .write(entry, failure, own, signal)
        .catch((err) => err);
    }
    if (signal.aborted) return;
    const err = failure ?? statusFailure;
    const { requeueAfter = 0 } = result ?? {};
    const laterMs =
      current && Number.isFinite(requeueAfter) && requeueAfter > 0 ? requeueAfter * 1000 : 0;
    if (entry && laterMs > 0) entry.requeue = true;
    const delayMs = queue.done(key, err !== undefined, laterMs);
    objects.settle(key);
    countReconcile(worker.api.metrics, err === undefined, (performance.now() - started) / 1000);
    const outcome = { subject, object: entry?.object, failure, statusFailure, delayMs };
    report(worker, key, outcome);
  }
}

/** What reconciling a key does besides the cache: the reader's reconcile, and requests. */
export interface Steps {
  reconcile(change: Change, object: Resource, reason?: Context['reason']): Promise<Result | void>;
  print(change: Change, object: Resource): Promise<void>;
  // Each returns the resourceVersion written ('' if nothing was), or false if it is gone.
  addFinalizer(object: Resource): Promise<string | false>;
  removeFinalizer(object: Resource): Promise<string | false>;
}

function stepsFor(worker: Worker, key: string): Steps {
  const { api, objects, print, signal } = worker;
  const { client } = worker;
  return {
    reconcile: async (change, object, reason = 'changed') => {
      api.fence();
      const status = objects.entries.get(key)?.status ?? {};
      return worker.reconcile(change, object, { name: key, reason, status, signal, client });
    },
    print: (change, object) => print(change, object, key, signal),
    addFinalizer: (object) => addFinalizer(api, object, objects.finalizer, signal),
    removeFinalizer: (object) => removeFinalizer(api, object, objects.finalizer, signal),
  };
}

/**
 * Reconciles what changed for a key since its last success: first the Deleted owed to earlier
 * objects of its name, oldest first, then the object it has now. Throws what a step threw; what
 * succeeded before that is not done again.
 */
export async function reconcileKey(
  objects: ObjectCache,
  key: string,
  steps: Steps,
): Promise<Result | undefined> {
  const entry = objects.entries.get(key);
  if (!entry) return;
  if (entry.gone) await reconcileEarlier(objects, entry, steps);
  const { object } = entry;
  if (!object) return;
  if (objects.finalizer && !objects.holds(object)) {
    objects.writes(key);
    const written = await steps.addFinalizer(object);
    if (written === false) return; // replaced or gone: the watch will say
    objects.wrote(key, object, written, true);
    if (entry.object !== object) return; // a new spec, or gone, meanwhile: it is due again
  }
  const newSpec = object.metadata.generation !== entry.reconciled;
  const { drifted, requeue } = entry;
  const reason = newSpec ? 'changed' : drifted ? 'repair' : requeue ? 'requeue' : undefined;
  if (!reason) return;
  const change = entry.reconciled === undefined ? 'Added' : 'Modified';
  entry.drifted = false; // a change from now on needs another repair
  entry.requeue = false;
  entry.tried = true;
  let result: Result | undefined;
  try {
    result = (await steps.reconcile(change, object, reason)) || undefined;
  } catch (err) {
    if (entry.object === object) {
      entry.drifted ||= drifted;
      entry.requeue ||= requeue;
    }
    throw err;
  }
  if (!newSpec) return result; // a repair or a later look: nothing changed, so nothing is printed
  await steps.print(change, object);
  // This generation is reconciled, unless the object went meanwhile (it may be back, out of -l
  // and in again: then it is new).
  const { uid } = object.metadata;
  const went = entry.gone?.some((gone) => gone.object.metadata.uid === uid);
  if (entry.object?.metadata.uid === uid && !went) entry.reconciled = object.metadata.generation;
  return result;
}

/** The Deleted owed to the earlier objects of a name, oldest first; our finalizer off each. */
async function reconcileEarlier(objects: ObjectCache, entry: Entry, steps: Steps) {
  for (let gone = entry.gone?.[0]; gone; gone = entry.gone?.[0]) {
    if (gone.owed) {
      const last = gone.object;
      await steps.reconcile('Deleted', last);
      await steps.print('Deleted', last);
      gone.owed = false;
    }
    const { uid } = gone.object.metadata;
    // Back in the -l selector meanwhile: it is the entry's object again, finalizer and all.
    const back = entry.object?.metadata.uid === uid;
    if (objects.holds(gone.object) && !back) {
      objects.writes(entry.key);
      const written = await steps.removeFinalizer(gone.object);
      if (written !== false) objects.wrote(entry.key, gone.object, written, false);
    }
    // Its later events are its other finalizers going.
    if (gone.watched) objects.finish(entry.key, uid);
    entry.gone = entry.gone?.length === 1 ? undefined : entry.gone?.slice(1);
  }
}

// ---------------------------------------------------------------------------------------------
// The client reconcile gets: the same requests, and an apply that knows what the cache knows.

function clientFor(api: Api, owned: OwnedObjects, signal: AbortSignal): Client {
  const request = (verb: string, method: string, path: string, body?: unknown, type?: string) =>
    api.json<unknown>({ verb, method, path, body, signal, contentType: type });
  return {
    get: async <T>(path: string) => {
      const cached = owned.get(path);
      if (cached) return cached as T;
      return request('get', 'GET', path).then(
        (object) => object as T,
        (err) => (isApiError(err, 404) ? undefined : Promise.reject(err)),
      );
    },
    create: <T>(path: string, object: object) =>
      request('create', 'POST', path, object).then((created) => created as T),
    apply: (path: string, object: object) => owned.apply(api, path, object, signal),
    patch: <T>(path: string, patch: object) =>
      request('patch', 'PATCH', path, patch, MERGE_PATCH).then((patched) => patched as T),
    delete: (path: string) =>
      request('delete', 'DELETE', path).then(
        () => {},
        (err) => (isApiError(err, 404) ? undefined : Promise.reject(err)),
      ),
  };
}

// ---------------------------------------------------------------------------------------------
// Output: stdout is the product, so a pipe gets every line, in order, and a slow reader slows us.

type Print = (change: Change, object: Resource, name: string, signal: AbortSignal) => Promise<void>;

/** One line per change. While stdout is full it waits, so that a slow reader slows the workers. */
function printer(stdout: Writable, json: boolean, fence: () => void): Print {
  return async (change, object, name, signal) => {
    signal.throwIfAborted(); // once stopped, not one more line
    fence();
    const { namespace, name: objectName } = object.metadata;
    const line = json
      ? JSON.stringify({ type: change, namespace, name: objectName, spec: object.spec })
      : lineFor(change, object, name);
    // The lines of one tick go out in one write (bench: the watch of 10000 events).
    if (!stdout.writableCorked) {
      stdout.cork();
      process.nextTick(() => stdout.uncork());
    }
    if (!stdout.write(`${line}\n`)) await once(stdout, 'drain', { signal });
  };
}

// ---------------------------------------------------------------------------------------------
// Writes to the object. Each carries its uid as a JSON patch test, so that the server refuses
// it for another object created since under the same name (a merge patch's uid is no precondition).

const JSON_PATCH = 'application/json-patch+json';
const MERGE_PATCH = 'application/merge-patch+json';
function uidTest(object: Resource) {
  return { op: 'test', path: '/metadata/uid', value: object.metadata.uid };
}
const objectPath = ({ metadata }: Resource) =>
  `${collectionPath(metadata.namespace)}/${metadata.name}`;

interface Current {
  metadata: {
    uid: string;
    resourceVersion: string;
    finalizers?: string[];
    deletionTimestamp?: string;
  };
}

/** The object as the server has it now; undefined if it is gone. */
async function getCurrent(api: Api, object: Resource, signal: AbortSignal) {
  return api.json<Current>({ verb: 'get', path: objectPath(object), signal }).catch((err) => {
    if (isApiError(err, 404)) return undefined;
    throw err;
  });
}

/**
 * After a 422 for a JSON patch (a failed test says no more than that): whether the object under
 * that name is now another one, or gone.
 */
async function isReplaced(api: Api, object: Resource, signal: AbortSignal): Promise<boolean> {
  return (await getCurrent(api, object, signal))?.metadata.uid !== object.metadata.uid;
}

async function patchObject(
  api: Api,
  object: Resource,
  body: object[],
  signal: AbortSignal,
  sub = '',
) {
  const request = { verb: 'patch', method: 'PATCH', contentType: JSON_PATCH, signal };
  await discard(await api.call({ ...request, path: `${objectPath(object)}${sub}`, body }));
}

/**
 * Sets the object's finalizers to `change(current)`, read fresh: a JSON patch replaces a list
 * whole, so it tests the resourceVersion it was read at, and the server refuses it if anyone
 * wrote since. Returns the resourceVersion it wrote ('' if there was nothing to write), or false if
 * the server no longer has the object (gone, or another under its name).
 */
async function editFinalizers(
  api: Api,
  object: Resource,
  change: (finalizers: string[]) => string[],
  signal: AbortSignal,
): Promise<string | false> {
  const current = await getCurrent(api, object, signal);
  if (current?.metadata.uid !== object.metadata.uid) return false;
  const finalizers = current.metadata.finalizers ?? [];
  const wanted = change(finalizers);
  if (String(wanted) === String(finalizers)) return '';
  const { resourceVersion } = current.metadata;
  const patch = [
    uidTest(object),
    { op: 'test', path: '/metadata/resourceVersion', value: resourceVersion },
    { op: 'add', path: '/metadata/finalizers', value: wanted }, // add sets it, there or not
  ];
  const request = { verb: 'patch', method: 'PATCH', contentType: JSON_PATCH, signal };
  try {
    const written = await api.json<Current>({ ...request, path: objectPath(object), body: patch });
    return written.metadata.resourceVersion;
  } catch (err) {
    if (isApiError(err, 404)) return false;
    if (isApiError(err, 422) && (await isReplaced(api, object, signal))) return false;
    throw err;
  }
}

/** Adds our finalizer, so that a deleted object waits for its Deleted reconcile. */
async function addFinalizer(api: Api, object: Resource, finalizer: string, signal: AbortSignal) {
  const add = (all: string[]) => (all.includes(finalizer) ? all : [...all, finalizer]);
  return editFinalizers(api, object, add, signal);
}

/** Removes our finalizer, once the object's Deleted is reconciled: Kubernetes then deletes it. */
async function removeFinalizer(api: Api, object: Resource, finalizer: string, signal: AbortSignal) {
  const remove = (all: string[]) => all.filter((name) => name !== finalizer);
  return editFinalizers(api, object, remove, signal);
}

// ---------------------------------------------------------------------------------------------
// Status: the outcome of the last reconcile, on the object itself, for kubectl get and wait.

/**
 * Writes each object's Ready condition, unless it says exactly that already. Where it may not
 * (403, in a namespace) it says so once, then lets one write there try again every
 * STATUS_RETRY_MS while the others wait; once one goes through, those that waited are written
 * too. Fixing RBAC needs no restart, and a refusal costs a request per STATUS_RETRY_MS, not one per
 * object.
 */
class StatusWriter {
  private readonly refusals = new Map<string, Refusal>(); // by namespace
  private readonly api: Api;
  private readonly queue: WorkQueue;
  private readonly objects: ObjectCache;

  constructor(api: Api, queue: WorkQueue, objects: ObjectCache) {
    this.api = api;
    this.queue = queue;
    this.objects = objects;
  }

  /** Writes Ready for `failure` (none: True), and the reconcile's `own` status fields. */
  async write(
    entry: Entry,
    failure: unknown,
    own: Record<string, unknown> | undefined,
    signal: AbortSignal,
  ) {
    const { object } = entry;
    const generation = object?.metadata.generation;
    if (!object || typeof generation !== 'number') return;
    const condition = conditionFor(failure);
    const { fields, same } = this.fieldsFor(entry, own);
    const upToDate = sameReady(entry.ready, condition) && entry.observed === generation;
    if (upToDate && same) return;
    const { namespace } = object.metadata;
    const refusal = this.refusals.get(namespace);
    if (refusal && (refusal.trying || refusal.timer)) {
      refusal.waiting.add(entry.key);
      return;
    }
    if (refusal) refusal.trying = true;
    // lastTransitionTime changes only on a flip, and in whole seconds as the server keeps it (so
    // its echo is no change).
    const flipped = entry.ready?.status !== condition.status || !entry.since;
    const since = flipped ? Math.floor(Date.now() / 1000) : entry.since;
    // Known before it is sent, so that its echo is no change, even when it comes before the answer.
    const { ready, observed, status } = entry;
    const before = { ready, observed, since: entry.since, status };
    Object.assign(entry, { ready: condition, observed: generation, since, status: fields });
    try {
      const value = statusOf(condition, generation, since, fields);
      const patch = [uidTest(object), { op: 'add', path: '/status', value }];
      await patchObject(this.api, object, patch, signal, '/status');
      if (refusal) this.allowed(namespace, refusal);
    } catch (err) {
      const unchanged =
        entry.ready === condition && entry.observed === generation && entry.since === since;
      if (unchanged && entry.status === fields) Object.assign(entry, before);
      if (refusal) {
        refusal.trying = false;
        if (!isApiError(err, 403)) this.again(refusal); // no answer about the permission: next
      }
      // Gone, or another object under the same name: its own events make it due.
      if (isApiError(err, 404)) return;
      if (isApiError(err, 422) && (await isReplaced(this.api, object, signal))) return;
      if (!isApiError(err, 403)) throw err;
      this.refused(entry.key, namespace, err.message);
    }
  }

  /**
   * The status fields to write: the reader's, with those the watch has not shown yet (a write
   * failed, or an event from before it came after); and whether the status says them already.
   */
  private fieldsFor(entry: Entry, own: Record<string, unknown> | undefined) {
    const unwritten = this.objects.unwritten.get(entry.key);
    const mine = own || unwritten ? { ...unwritten, ...own } : undefined;
    const fields = mine ? { ...entry.status, ...mine } : entry.status; // a field set undefined goes
    const same =
      !mine || new Digest().add(fields).value() === new Digest().add(entry.status).value();
    if (!same && mine) this.objects.unwritten.set(entry.key, mine); // until the watch shows them
    return { fields, same };
  }

  stop() {
    for (const { timer } of this.refusals.values()) clearTimeout(timer);
  }

  private refused(key: string, namespace: string, message: string) {
    let refusal = this.refusals.get(namespace);
    if (!refusal) {
      refusal = { trying: false, timer: undefined, waiting: new Set() };
      this.refusals.set(namespace, refusal);
      const can = `kubectl auth can-i patch ${resource} --subresource=status -n ${namespace}`;
      console.error(
        `not allowed to patch ${PLURAL}/status in namespace ${namespace} (403: ${message}); ` +
          `trying again every ${inSeconds(STATUS_RETRY_MS)} — grant patch on ${PLURAL}/status ` +
          `(${can})`,
      );
    }
    refusal.waiting.add(key);
    const tryAgain = (waiting: Refusal) => {
      waiting.timer = undefined;
      this.again(waiting);
    };
    refusal.timer ??= setTimeout(tryAgain, STATUS_RETRY_MS, refusal);
  }

  private allowed(namespace: string, refusal: Refusal) {
    this.refusals.delete(namespace);
    console.error(`allowed to patch ${PLURAL}/status in namespace ${namespace} now`);
    this.again(refusal);
  }

  /** The objects whose status waited are due again (never cutting a backoff short). */
  private again(refusal: Refusal) {
    for (const key of refusal.waiting) this.queue.add(key, false);
    refusal.waiting.clear();
  }
}

/** The status written: the reader's fields, observedGeneration and the Ready condition. */
function statusOf(
  ready: Ready,
  observedGeneration: number,
  since: number,
  fields: Record<string, unknown> | undefined,
) {
  const lastTransitionTime = new Date(since * 1000).toISOString().replace('.000Z', 'Z');
  const conditions = [{ type: 'Ready', ...ready, observedGeneration, lastTransitionTime }];
  return { ...fields, observedGeneration, conditions };
}

/** The Ready condition a reconcile's outcome gives. */
function conditionFor(failure: unknown): Ready {
  if (failure === undefined) return SUCCESS;
  return { status: 'False', reason: reasonOf(failure), message: messageOf(failure) };
}

const SUCCESS: Ready = { status: 'True', reason: 'Reconciled', message: '' };

/** Status writes that a namespace refused: they wait while one tries again. */
interface Refusal {
  trying: boolean;
  timer: ReturnType<typeof setTimeout> | undefined;
  waiting: Set<string>;
}

const STATUS_RETRY_MS = 10_000;

// ---------------------------------------------------------------------------------------------
// Saying what is wrong: one line per problem, cause then fix. A list or watch that fails backs off
// as client-go's reflector does; a reconcile that fails is its object's own, unless the API
// server's (unreachable, failing, busy or silent): then it is said once for all objects.

/**
 * How long to wait after a failure, and whether to say it: client-go's reflector backoff (0.8 s
 * doubling to 30 s, jittered, reset after 2 minutes without a failure), or what the server asked.
 * A problem is said once while it lasts.
 */
class Retries {
  private failures = 0;
  private readonly serverState: ServerState; // the problems every collection said: one line for all
  private mine = ''; // the problem this collection has, if it said one
  private lastFailure = Number.NEGATIVE_INFINITY;
  private previous: unknown; // the last failure, until a watch event
  private readonly config: Config;
  private readonly collection: Collection;

  constructor(config: Config, collection: Collection, serverState: ServerState) {
    this.config = config;
    this.collection = collection;
    this.serverState = serverState;
  }

  cleared() {
    this.previous = undefined;
    this.serverState.problems.delete(this.mine);
    this.mine = '';
  }

  /** The delay before the next try, after `err`; says what failed, unless it is routine. */
  after(err: unknown): number {
    // The first 410 is routine (after an outage too): relist at once. So is a 429 that asks for
    // a second (a server filling its cache), and a pause of our own.
    const gone = isApiError(err, 410);
    const previous = this.previous;
    const first = !(isApiError(previous) && isApiError(err) && previous.code === err.code);
    this.previous = err;
    const routine = gone || (isApiError(err, 429) && err.retryAfterSeconds <= 1);
    const delayMs = gone && first ? 0 : this.backoffMs(err);
    const problem = problemOf(err, this.config, this.collection);
    // The same problem, even where its message differs (a 410 names the resourceVersion).
    const same = isApiError(err) ? `${this.collection.plural} ${err.verb} ${err.code}` : problem;
    const paused = (err as { code?: unknown })?.code === 'EPAUSED';
    if (same !== this.mine) this.serverState.problems.delete(this.mine); // that one is over
    this.mine = same;
    if (!(routine && first) && !paused && !this.serverState.problems.has(same)) {
      const asked = isApiError(err) ? err.retryAfterSeconds * 1000 : 0;
      const capped =
        asked > MAX_RETRY_AFTER_MS
          ? ` (asked for ${asked / 1000}s; 5 minutes is the most we wait)`
          : '';
      const fix = fixFor(err, this.config, this.collection);
      console.error(`${problem}; retrying in ${inSeconds(delayMs)}${capped}${fix}`);
      this.serverState.problems.add(same);
    }
    return delayMs;
  }

  private backoffMs(err: unknown): number {
    const now = performance.now();
    if (now - this.lastFailure > 120_000) this.failures = 0;
    this.lastFailure = now;
    const asked = isApiError(err) ? err.retryAfterSeconds * 1000 : 0;
    if (asked > 0) return Math.min(asked, MAX_RETRY_AFTER_MS);
    const base = 800 * 2 ** Math.min(this.failures++, 6);
    return Math.min(30_000, base * (1 + Math.random()));
  }
}

const MAX_RETRY_AFTER_MS = 5 * 60_000;
const inSeconds = (ms: number) => `${(ms / 1000).toFixed(1)}s`;

/** What failed, on one line, naming the server, the collection and the namespace. */
function problemOf(err: unknown, config: Config, collection: Collection): string {
  const { server, namespace } = config;
  const code = (err as { code?: unknown })?.code;
  if (isApiError(err)) {
    const where = namespace === undefined ? 'all namespaces' : `namespace ${namespace}`;
    switch (code) {
      case 401:
        return `${server} does not accept our credentials (401 Unauthorized)`;
      case 403:
        return `not allowed to ${err.verb} ${collection.plural} in ${where} (403: ${err.message})`;
      case 404:
        if (collection.plural === PLURAL) {
          return `the ${KIND} CRD is not installed on ${server} (404: ${err.message})`;
        }
        return `the ${collection.plural} API is not on ${server} (404: ${err.message})`;
      case 429:
        return `${server} is busy (429: ${err.message})`;
      default:
        return `${server} failed to ${err.verb} ${collection.plural} (${code}: ${err.message})`;
    }
  }
  if (typeof code === 'string' && UNREACHABLE.test(code)) {
    return `cannot reach ${server} (${code})`;
  }
  if (code === 'ECONNRESET' || code === 'EPIPE')
    return `lost the connection to ${server} (${code})`;
  if (typeof code === 'string' && /CERT|SELF_SIGNED|SIGNATURE|ALTNAME/.test(code)) {
    return `the TLS certificate of ${server} did not verify (${code})`;
  }
  return `${messageOf(err)} (${server})`;
}

/** What would fix it, after a dash; the retry delay goes between. */
function fixFor(err: unknown, { namespace }: Config, collection: Collection): string {
  const code = (err as { code?: unknown })?.code;
  const resourceName = collection.plural === PLURAL ? resource : collection.plural;
  if (code === 401) return ' — refresh them in your kubeconfig (kubectl auth whoami)';
  if (code === 403) {
    const where = namespace ? `-n ${namespace}` : '-A';
    const check = `kubectl auth can-i watch ${resourceName} ${where}`;
    return ` — grant list and watch on ${resourceName} (${check})`;
  }
  if (code === 404 && collection.plural === PLURAL) return ' — kubectl apply -f crd.yaml';
  if (typeof code === 'string' && UNREACHABLE.test(code)) {
    return ' — is the cluster running? (kubectl cluster-info)';
  }
  if (typeof code === 'string' && /CERT|SELF_SIGNED|SIGNATURE|ALTNAME/.test(code)) {
    return ' — check certificate-authority-data in your kubeconfig';
  }
  return '';
}

const UNREACHABLE = /^(ECONNREFUSED|ENOTFOUND|EAI_AGAIN|E\w*UNREACH|ETIMEDOUT)$/;
const NETWORK = /^(ECONNRESET|EPIPE|EPAUSED)$/;
const MANY = 3; // objects failing alike within a second: the server's problem, not theirs

/**
 * The cause of a failure that may be the API server's; undefined for the object's own. Only what
 * a request to the API server met counts: the reader's own code, and its calls elsewhere, fail
 * for the object. A 5xx or 429 counts only where MANY objects or a watch get it (see held).
 */
function clusterCause(err: unknown): string | undefined {
  if (!fromApiServer.has(err as object)) return undefined;
  if (isApiError(err)) return err.code === 429 || err.code >= 500 ? String(err.code) : undefined;
  const code = (err as { code?: unknown })?.code;
  if (typeof code === 'string' && (UNREACHABLE.test(code) || NETWORK.test(code))) return code;
  if (/did not answer for|was not over after/.test(messageOf(err))) return 'silent';
  return undefined;
}

/**
 * Says how a reconcile ended. A failure is the object's own problem (its line, with its backoff,
 * and a Warning Event for a failed reconcile), unless it is the cluster's: said once for all.
 */
function report(
  worker: Worker,
  key: string,
  outcome: {
    subject?: Resource;
    object?: Resource;
    failure: unknown;
    statusFailure: unknown;
    delayMs: number;
  },
) {
  const { subject, object, failure, statusFailure, delayMs } = outcome;
  const err = failure ?? statusFailure;
  if (err === undefined) {
    if (object) worker.events.recovered(key, object);
    else worker.events.forget(key);
    worker.problems.cleared(key);
    return;
  }
  const failedAt = performance.now();
  const own = () => {
    // Said at once, or a second later (see held): the retry is as far off as it is by then.
    const left = Math.max(0, delayMs - (performance.now() - failedAt));
    const retrying = `retrying in ${inSeconds(left)}`;
    if (failure !== undefined) {
      if (subject) worker.events.failed(key, subject, messageOf(failure), reasonOf(failure));
      console.error(`reconcile of ${kind} ${key} failed: ${messageOf(failure)}; ${retrying}`);
    } else {
      const why = messageOf(statusFailure);
      console.error(`cannot write the status of ${kind} ${key} (${why}); ${retrying}`);
    }
  };
  if (!worker.problems.held(key, err, delayMs, own)) own();
}

interface Waiting {
  cause: string;
  retryAt: number;
  err: unknown;
  own: (() => void) | undefined; // says it as the object's own, if the server turns out fine
}

class ClusterProblems {
  private readonly waiting = new Map<string, Waiting>(); // by object key
  private causesSaid: string[] = []; // the causes said on stderr, until they clear
  private clearedAt = Number.NEGATIVE_INFINITY;
  private since = 0;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private readonly server: string;
  private readonly serverState: ServerState; // what lists and watches said: a 5xx there is its

  constructor(server: string, serverState: ServerState) {
    this.server = server;
    this.serverState = serverState;
  }

  /**
   * An object failed. Whether the failure may be the cluster's: then it is held a second, to see
   * whether it is; if not, `own` says it as the object's. A cluster's problem is said once for all.
   */
  held(key: string, err: unknown, delayMs: number, own: () => void): boolean {
    const cause = clusterCause(err);
    if (cause === undefined) return false;
    if (cause === 'EPAUSED') return true; // we were paused: nobody's fault, nothing to say
    const now = performance.now();
    if (this.waiting.size === 0) this.since = now;
    const isHttpCode = /^\d+$/.test(cause); // an HTTP status: one object's own, unless many get it
    const said = this.causesSaid.includes(cause);
    this.waiting.set(key, {
      cause,
      retryAt: now + delayMs,
      err,
      own: isHttpCode && !said ? own : undefined,
    });
    // Requests sent before the cluster came back fail for a moment more: that is not news.
    if (said || (!isHttpCode && now - this.clearedAt < 5_000)) return true;
    // A moment later, so that the line can say how many objects it holds up.
    this.timer ??= setTimeout(() => this.say(), 1_000);
    this.timer.unref?.();
    return true;
  }

  private say() {
    this.timer = undefined;
    const now = performance.now();
    const causes = new Set([...this.waiting.values()].map((waits) => waits.cause));
    for (const cause of causes) {
      if (this.causesSaid.includes(cause)) continue;
      const alike = [...this.waiting].filter(([, waits]) => waits.cause === cause);
      const isHttpCode = /^\d+$/.test(cause);
      const watched = [...this.serverState.problems].some((problem) =>
        problem.endsWith(` ${cause}`),
      );
      if (isHttpCode && alike.length < MANY && !watched) {
        for (const [key, waits] of alike) {
          this.waiting.delete(key);
          waits.own?.(); // one object's own failure: said as its own
        }
        continue;
      }
      let next = Number.POSITIVE_INFINITY; // a loop: a spread of 100k arguments would throw
      for (const [, waits] of alike) if (waits.retryAt > now) next = Math.min(next, waits.retryAt);
      this.causesSaid.push(cause);
      const err = alike[0]?.[1].err;
      const what = isApiError(err)
        ? `${this.server} failed to ${err.verb} (${err.code}: ${err.message})`
        : cause === 'silent'
          ? messageOf(err)
          : UNREACHABLE.test(cause)
            ? `cannot reach ${this.server} (${cause})`
            : `lost the connection to ${this.server} (${cause})`;
      const when = Number.isFinite(next) ? `; the next try in ${inSeconds(next - now)}` : '';
      const waiting = alike.length === 1 ? `1 ${kind} waits` : `${alike.length} ${PLURAL} wait`;
      console.error(`${what}: ${waiting} for it${when}`);
    }
  }

  /** An object succeeded: the cluster works again. */
  cleared(key: string) {
    // A success that was held up proves the server works again; another may have sent nothing.
    if (!this.waiting.delete(key) || this.causesSaid.length === 0) return;
    const seconds = Math.round((performance.now() - this.since) / 1000);
    const rest = this.waiting.size;
    const retried =
      rest > 0 ? `; ${rest} ${PLURAL} that waited are retried as their backoff ends` : '';
    console.error(`${this.server} works again, after ${seconds}s${retried}`);
    this.causesSaid = [];
    this.waiting.clear();
    this.clearedAt = performance.now();
  }
}

// ---------------------------------------------------------------------------------------------
// Events: what kubectl describe shows under the object. core/v1 Events, as client-go's recorder
// writes them (every kubectl reads them; a repeat is one merge patch of its count).

/** An Event as written: its name, what it says, how often it happened, and since when. */
type Recorded = { name: string; message: string; count: number; first: string };

class EventRecorder {
  // The last failure of each failing object: the Event that says it, and how often it happened.
  private readonly failures = new Map<string, Recorded & { uid: string }>();
  private readonly api: Api;

  constructor(api: Api) {
    this.api = api;
  }

  /** A reconcile failed: one Warning per object and message; a repeat raises its count. */
  failed(key: string, object: Resource, message: string, reason: string) {
    const last = this.failures.get(key);
    const now = new Date().toISOString().replace(/\.\d+Z$/, 'Z');
    if (last?.message === message && last.uid === object.metadata.uid) {
      last.count++;
      const path = `/api/v1/namespaces/${object.metadata.namespace}/events/${last.name}`;
      const body = { count: last.count, lastTimestamp: now };
      const patch = { verb: 'patch', method: 'PATCH', path, body, contentType: MERGE_PATCH };
      // An Event expires (after an hour) or was deleted: write it again, with its count.
      this.send(patch, () => this.create(object, last, 'Warning', reason, now));
      return;
    }
    const { uid } = object.metadata;
    const failure = { uid, name: eventName(object), message, count: 1, first: now };
    this.failures.set(key, failure);
    this.create(object, failure, 'Warning', reason, now);
  }

  /** An object is Ready again after failing: one Normal Event. */
  recovered(key: string, object: Resource) {
    if (!this.failures.delete(key)) return;
    const now = new Date().toISOString().replace(/\.\d+Z$/, 'Z');
    const message = `${KIND} is Ready again`;
    const event = { name: eventName(object), message, count: 1, first: now };
    this.create(object, event, 'Normal', 'Reconciled', now);
  }

  forget(key: string) {
    this.failures.delete(key);
  }

  private create(object: Resource, event: Recorded, type: string, reason: string, now: string) {
    const { namespace, name, uid } = object.metadata;
    const body = {
      apiVersion: 'v1',
      kind: 'Event',
      metadata: { name: event.name, namespace },
      involvedObject: { apiVersion, kind: KIND, name, namespace, uid },
      type,
      reason,
      message: event.message,
      source: { component: CONTROLLER },
      reportingComponent: CONTROLLER,
      reportingInstance: hostname(),
      count: event.count,
      firstTimestamp: event.first,
      lastTimestamp: now,
    };
    const path = `/api/v1/namespaces/${namespace}/events`;
    this.send({ verb: 'create', method: 'POST', path, body });
  }

  /**
   * Never awaited and never retried: an Event that cannot be written is not worth a wait. A patch
   * of one that is gone (404) runs `gone` instead.
   */
  private send(request: Omit<Call, 'signal'>, gone?: () => void) {
    const signal = AbortSignal.timeout(10_000);
    void this.api.call({ ...request, signal }).then(
      (response) => response.resume(),
      (err) => {
        if (isApiError(err, 404)) gone?.();
      },
    );
  }
}

const eventName = (object: Resource) =>
  `${object.metadata.name}.${randomUUID().replaceAll('-', '').slice(0, 16)}`;

// ---------------------------------------------------------------------------------------------
// Metrics, in Prometheus' text format, under the names controller-runtime and client-go use, so
// that the dashboards and alerts people have for those work here too.

const FAMILIES = {
  controller_runtime_reconcile_total: ['counter', 'Total number of reconciliations per controller'],
  controller_runtime_reconcile_errors_total: [
    'counter',
    'Total number of reconciliation errors per controller',
  ],
  controller_runtime_reconcile_time_seconds: [
    'histogram',
    'Length of time per reconciliation per controller',
  ],
  controller_runtime_active_workers: ['gauge', 'Number of currently used workers per controller'],
  controller_runtime_max_concurrent_reconciles: [
    'gauge',
    'Maximum number of concurrent reconciles per controller',
  ],
  workqueue_depth: ['gauge', 'Current depth of workqueue'],
  workqueue_adds_total: ['counter', 'Total number of adds handled by workqueue'],
  workqueue_retries_total: ['counter', 'Total number of retries handled by workqueue'],
  workqueue_queue_duration_seconds: [
    'histogram',
    'How long in seconds an item stays in workqueue before being requested',
  ],
  workqueue_work_duration_seconds: [
    'histogram',
    'How long in seconds processing an item from workqueue takes',
  ],
  workqueue_longest_running_processor_seconds: [
    'gauge',
    'How many seconds has the longest running processor for workqueue been running',
  ],
  workqueue_unfinished_work_seconds: [
    'gauge',
    'How many seconds of work has been done that is in progress and has not been observed by ' +
      'work_duration',
  ],
  leader_election_master_status: [
    'gauge',
    'Gauge of if the reporting system is master of the relevant lease, 0 indicates backup, ' +
      '1 indicates master',
  ],
  rest_client_requests_total: [
    'counter',
    'Number of HTTP requests, partitioned by status code, method, and host',
  ],
  process_resident_memory_bytes: ['gauge', 'Resident memory size in bytes'],
  process_cpu_seconds_total: ['counter', 'Total user and system CPU time spent in seconds'],
  process_start_time_seconds: ['gauge', 'Start time of the process since unix epoch in seconds'],
} as const;
type Family = keyof typeof FAMILIES;

// controller-runtime's buckets for reconcile time, client-go's for the work queue.
const RECONCILE_BUCKETS = [
  0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 1,
  1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 4.5, 5, 6, 7, 8, 9, 10, 15, 20, 25, 30, 40, 50, 60,
];
const QUEUE_BUCKETS = [1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.1, 1, 10, 100, 1000];

class Histogram {
  readonly buckets: number[];
  readonly counts: number[];
  sum = 0;
  count = 0;

  constructor(buckets: number[]) {
    this.buckets = buckets;
    this.counts = buckets.map(() => 0);
  }

  observe(value: number) {
    const at = this.buckets.findIndex((bound) => value <= bound);
    if (at >= 0) this.counts[at] = (this.counts[at] ?? 0) + 1;
    this.sum += value;
    this.count++;
  }
}

// The label text of each labels object, worked out once: most are the same few objects.
const labelTexts = new WeakMap<Record<string, string>, string>();

function labelText(labels: Record<string, string>): string {
  let text = labelTexts.get(labels);
  if (text === undefined) {
    text = Object.entries(labels)
      .map(([name, value]) => `${name}="${value.replace(/[\\"]/g, '\\$&').replace(/\n/g, '\\n')}"`)
      .join(',');
    labelTexts.set(labels, text);
  }
  return text;
}

class Metrics {
  private readonly samples = new Map<Family, Map<string, number | Histogram>>();
  private readonly gauges = new Map<Family, () => [Record<string, string>, number][]>();

  /** Adds to a counter. */
  count(family: Family, labels: Record<string, string>, by = 1) {
    const samples = this.family(family);
    const key = labelText(labels);
    samples.set(key, ((samples.get(key) as number | undefined) ?? 0) + by);
  }

  observe(family: Family, labels: Record<string, string>, seconds: number, buckets: number[]) {
    const samples = this.family(family);
    const key = labelText(labels);
    let histogram = samples.get(key);
    if (!(histogram instanceof Histogram)) {
      histogram = new Histogram(buckets);
      samples.set(key, histogram);
    }
    histogram.observe(seconds);
  }

  /** A gauge read when the metrics are asked for. */
  gauge(family: Family, read: () => [Record<string, string>, number][]) {
    this.gauges.set(family, read);
  }

  private family(family: Family) {
    let samples = this.samples.get(family);
    if (!samples) {
      samples = new Map();
      this.samples.set(family, samples);
    }
    return samples;
  }

  /** The text exposition format, version 0.0.4. */
  render(): string {
    const lines: string[] = [];
    for (const [family, [type, help]] of Object.entries(FAMILIES) as [Family, [string, string]][]) {
      const samples = new Map(this.samples.get(family));
      for (const [labels, value] of this.gauges.get(family)?.() ?? [])
        samples.set(labelText(labels), value);
      if (samples.size === 0) continue;
      lines.push(`# HELP ${family} ${help}`, `# TYPE ${family} ${type}`);
      for (const [labels, value] of samples) {
        if (typeof value === 'number') {
          lines.push(`${family}${labels ? `{${labels}}` : ''} ${value}`);
          continue;
        }
        const comma = labels ? `${labels},` : '';
        let cumulative = 0;
        value.buckets.forEach((bound, at) => {
          cumulative += value.counts[at] ?? 0;
          lines.push(`${family}_bucket{${comma}le="${bound}"} ${cumulative}`);
        });
        lines.push(`${family}_bucket{${comma}le="+Inf"} ${value.count}`);
        lines.push(`${family}_sum${labels ? `{${labels}}` : ''} ${value.sum}`);
        lines.push(`${family}_count${labels ? `{${labels}}` : ''} ${value.count}`);
      }
    }
    return `${lines.join('\n')}\n`;
  }
}

/** What the runtime tells of the process (Deno and Bun tell all three, as Node does). */
function processMetrics(metrics: Metrics) {
  const startedAt = Date.now() / 1000 - process.uptime();
  metrics.gauge('process_resident_memory_bytes', () => [[{}, process.memoryUsage.rss()]]);
  metrics.gauge('process_cpu_seconds_total', () => {
    const { user, system } = process.cpuUsage();
    return [[{}, (user + system) / 1e6]];
  });
  metrics.gauge('process_start_time_seconds', () => [[{}, Math.round(startedAt)]]);
}

/** The reconcile metrics, at zero before the first reconcile, and the workers' gauges. */
function showReconciles(metrics: Metrics, queue: WorkQueue, concurrency: number) {
  const controller = CONTROLLER_LABEL;
  metrics.count('controller_runtime_reconcile_total', SUCCEEDED, 0);
  metrics.count('controller_runtime_reconcile_total', FAILED, 0);
  metrics.count('controller_runtime_reconcile_errors_total', controller, 0);
  metrics.gauge('controller_runtime_active_workers', () => [[controller, queue.busy.size]]);
  metrics.gauge('controller_runtime_max_concurrent_reconciles', () => [[controller, concurrency]]);
}

/** Counts a reconcile as controller-runtime does. */
function countReconcile(metrics: Metrics, succeeded: boolean, seconds: number) {
  metrics.count('controller_runtime_reconcile_total', succeeded ? SUCCEEDED : FAILED);
  if (!succeeded) metrics.count('controller_runtime_reconcile_errors_total', CONTROLLER_LABEL);
  const family = 'controller_runtime_reconcile_time_seconds';
  metrics.observe(family, CONTROLLER_LABEL, seconds, RECONCILE_BUCKETS);
}

// The labels of the controller's and its queue's metrics (one object each: see labelText).
const CONTROLLER_LABEL = { controller: kind };
const SUCCEEDED = { controller: kind, result: 'success' };
const FAILED = { controller: kind, result: 'error' };
const QUEUE = { name: kind };

// ---------------------------------------------------------------------------------------------
// Leader election over a Lease, with client-go's timings: replicas take turns, one acts at a time.
//
// What it guarantees: a leader acts (reconciles, prints, writes) only while its last successful
// renewal was sent less than RENEW_DEADLINE_MS ago, by a monotonic clock, checked synchronously
// before each action; a follower takes over only after seeing the record unchanged for
// LEASE_SECONDS by its own clock. What it cannot: a write already sent may still land, up to the
// request timeout, after the deadline, and clocks that run at different rates shrink the 5 s
// margin; no lock over a network is perfect.

const LEASE_NAME = CONTROLLER;
const LEASE_SECONDS = 15;
const RENEW_DEADLINE_MS = 10_000; // shorter than the lease: the leader stops before anyone starts
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
  private observed = { spec: '', at: 0 }; // the lease as we last saw it change, by our clock
  private renewedAt = Number.NEGATIVE_INFINITY; // when our last successful renewal was sent
  private deadline: ReturnType<typeof setTimeout> | undefined;
  private readonly lost = new AbortController();
  private readonly api: Api;
  private readonly path: string;
  private readonly now: () => number;

  constructor(api: Api, namespace: string, now: () => number) {
    this.api = api;
    this.now = now;
    this.where = `the Lease ${namespace}/${LEASE_NAME}`;
    this.path = `/apis/coordination.k8s.io/v1/namespaces/${namespace}/leases`;
  }

  get leading(): boolean {
    return !this.lost.signal.aborted && this.now() - this.renewedAt <= RENEW_DEADLINE_MS;
  }

  /** Throws, and stops the controller, unless this replica surely still leads. */
  fence = () => {
    if (this.now() - this.renewedAt <= RENEW_DEADLINE_MS) return;
    const why = `could not renew ${this.where} for ${RENEW_DEADLINE_MS / 1000}s`;
    if (!this.lost.signal.aborted) this.lost.abort(new Error(why));
    throw this.lost.signal.reason;
  };

  private fenceQuietly() {
    try {
      this.fence();
    } catch {} // lost is aborted: main says why
  }

  /** One round of client-go's tryAcquireOrRenew: true if we hold the lease now. */
  async tryAcquireOrRenew(signal: AbortSignal): Promise<boolean> {
    const sentAt = this.now();
    const lease = await this.api
      .json<Lease>({ verb: 'get', path: `${this.path}/${LEASE_NAME}`, signal })
      .catch((err) => (isApiError(err, 404) ? undefined : Promise.reject(err)));
    const now = this.now(); // after the GET, so that a slow answer does not shorten the lease
    const spec = lease?.spec ?? {};
    if (JSON.stringify(spec) !== this.observed.spec)
      this.observed = { spec: JSON.stringify(spec), at: now };
    this.holder = spec.holderIdentity ?? '';
    // Judged by our own clock since we saw the record change, never by the times written in it:
    // the holder's clock may differ from ours, but a record unchanged for a lease duration is dead.
    const expired = now - this.observed.at > (spec.leaseDurationSeconds ?? LEASE_SECONDS) * 1000;
    if (this.holder && this.holder !== this.identity && !expired) return false;
    const ours = this.holder === this.identity;
    const wall = Date.now();
    const renewal = {
      holderIdentity: this.identity,
      leaseDurationSeconds: LEASE_SECONDS,
      acquireTime: ours ? spec.acquireTime : microTime(wall),
      renewTime: microTime(wall),
      leaseTransitions: (spec.leaseTransitions ?? 0) + (ours || !lease ? 0 : 1),
    };
    if (!(await this.write(lease, renewal, signal))) return false;
    this.renewedAt = sentAt; // timed from when it was sent, not from its answer
    return true;
  }

  /** Gives the lease up, so that a follower takes over within a retry period. */
  async release() {
    const signal = AbortSignal.timeout(500);
    const path = `${this.path}/${LEASE_NAME}`;
    const lease = await this.api.json<Lease>({ verb: 'get', path, signal });
    if (lease.spec?.holderIdentity !== this.identity) return;
    const spec = { ...lease.spec, holderIdentity: '', leaseDurationSeconds: 1 };
    await this.write(lease, { ...spec, renewTime: microTime(Date.now()) }, signal);
  }

  /** Creates or updates the lease; a 409 means another replica wrote first, since we read it. */
  private async write(lease: Lease | undefined, spec: LeaseSpec, signal: AbortSignal) {
    const metadata = { ...lease?.metadata, name: LEASE_NAME };
    const body = { apiVersion: 'coordination.k8s.io/v1', kind: 'Lease', metadata, spec };
    const request = lease
      ? { verb: 'update', method: 'PUT', path: `${this.path}/${LEASE_NAME}`, body, signal }
      : { verb: 'create', method: 'POST', path: this.path, body, signal };
    try {
      await readAll(await this.api.call(request));
      this.observed = { spec: JSON.stringify(spec), at: this.now() };
      return true;
    } catch (err) {
      if (isApiError(err, 409)) return false;
      throw err;
    }
  }

  private attempt(signal: AbortSignal) {
    return this.tryAcquireOrRenew(signal).catch((err: unknown) => ({ err }));
  }

  /** Waits until this replica leads; returns a signal that aborts if it stops leading, with why. */
  async lead(health: Health, signal: AbortSignal): Promise<AbortSignal> {
    health.ready = true; // following is all a follower should do
    let waiting = false;
    let said = ''; // the problem last said, said again only once it changed
    for (let held = await this.attempt(signal); held !== true; held = await this.attempt(signal)) {
      const problem = typeof held === 'object' ? messageOf(held.err) : '';
      if (problem !== said && typeof held === 'object' && !signal.aborted) {
        const hint = isApiError(held.err, 403)
          ? ' — grant get, create and update on leases.coordination.k8s.io (see deploy.yaml)'
          : '';
        const retrying = `retrying in ${RETRY_PERIOD_MS / 1000}s`;
        console.error(
          `cannot get or write ${this.where} (${messageOf(held.err)}); ${retrying}${hint}`,
        );
      }
      said = problem;
      if (!waiting && this.holder)
        console.error(`waiting to lead: ${this.where} is held by ${this.holder}`);
      waiting ||= Boolean(this.holder);
      if (held === false) health.progress(); // the lease was read: following goes as it should
      await sleep(RETRY_PERIOD_MS, undefined, { signal });
    }
    console.error(`leading as ${this.identity} (${this.where})`);
    health.ready = false; // until the initial state is in
    void this.renew(health, signal);
    return this.lost.signal;
  }

  /** Renews quietly; when it cannot within the renew deadline, the one line comes from main. */
  private async renew(health: Health, signal: AbortSignal) {
    while (!signal.aborted && !this.lost.signal.aborted) {
      await sleep(RETRY_PERIOD_MS, undefined, { signal }).catch(() => {});
      if (signal.aborted) return;
      // No attempt may outlive the renew deadline, credentials included.
      const left = Math.ceil(Math.max(1, this.renewedAt + RENEW_DEADLINE_MS - this.now()));
      const held = await this.attempt(AbortSignal.any([signal, AbortSignal.timeout(left)]));
      if (signal.aborted) return;
      if (held === true) {
        health.progress();
        // Stop at the deadline itself, not at the next attempt's end, if no renewal comes.
        clearTimeout(this.deadline);
        this.deadline = setTimeout(
          () => this.leading || this.fenceQuietly(),
          RENEW_DEADLINE_MS + 1,
        );
        this.deadline.unref?.();
        continue;
      }
      if (!held && this.holder !== this.identity) {
        this.lost.abort(new Error(`${this.where} is now held by ${this.holder || 'no one'}`));
        return;
      }
      if (this.now() - this.renewedAt <= RENEW_DEADLINE_MS) continue;
      const name = typeof held === 'object' ? String((held.err as Error)?.name) : '';
      const timedOut = /^(TimeoutError|AbortError)$/.test(name);
      let why = '';
      if (typeof held === 'object') {
        why = timedOut ? ' (no answer before the renew deadline)' : ` (${messageOf(held.err)})`;
      }
      const seconds = RENEW_DEADLINE_MS / 1000;
      this.lost.abort(new Error(`could not renew ${this.where} for ${seconds}s${why}`));
      return;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Health: what the kubelet asks before it restarts us (/healthz) or counts us in (/readyz).

class Health {
  // A list page, a watch event or its clean end, a lease renewed or checked.
  lastProgress = Date.now();
  ready = false; // following, or leading with the initial state in

  progress() {
    this.lastProgress = Date.now();
  }

  /** Serves /healthz, /readyz and /metrics on `port`; resolves once listening. */
  async serve(port: number, staleAfterMs: number, metrics: Metrics): Promise<http.Server> {
    const server = http.createServer((request, response) => {
      if (request.url === '/metrics') {
        const type = 'text/plain; version=0.0.4; charset=utf-8';
        response.writeHead(200, { 'Content-Type': type }).end(metrics.render());
        return;
      }
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
            : [404, 'not found: try /healthz, /readyz or /metrics'];
      response.writeHead(code, { 'Content-Type': 'text/plain' }).end(`${text}\n`);
    });
    await new Promise((resolve, reject) =>
      server.listen(port).once('listening', resolve).once('error', reject),
    );
    return server;
  }
}

// ---------------------------------------------------------------------------------------------
// Manifests: the CRD and the RBAC, from the declarations above.
//
//   npx tsx controller.ts manifests crd > crd.yaml
//   npx tsx controller.ts manifests deploy > deploy.yaml
//   npx tsx controller.ts manifests | kubectl apply -f -

// As the Dockerfile is built: docker build -t book-controller:0.1.0 .
const IMAGE = `${CONTROLLER}:0.1.0`;

type Scalar = 'string' | 'integer' | 'boolean';

/** A field of the spec: a small part of OpenAPI (JSON Schema), and two words of our own. */
interface Field {
  type: Scalar | 'array';
  optional?: boolean; // else the field is required
  column?: string; // the heading of a column for it in kubectl get
  items?: Scalar; // an array's: the type of each element
  minLength?: number; // a string's, in characters (as the API server counts them)
  maxLength?: number;
  enum?: readonly string[]; // a string's
  minimum?: number; // an integer's
  maximum?: number;
}
type Fields = Record<string, Field>;

/** The TypeScript type of a value that `field` declares. */
type ValueOf<F> = F extends { enum: readonly (infer Value)[] }
  ? Value
  : F extends { type: 'array'; items: infer Item }
    ? ValueOf<{ type: Item }>[]
    : F extends { type: 'integer' }
      ? number
      : F extends { type: 'boolean' }
        ? boolean
        : string;

/** The TypeScript type of a spec that `fields` declares; an `optional` field may be absent. */
export type SpecOf<F extends Fields> = Flat<
  { -readonly [K in keyof F as F[K] extends { optional: true } ? never : K]: ValueOf<F[K]> } & {
    -readonly [K in keyof F as F[K] extends { optional: true } ? K : never]?: ValueOf<F[K]>;
  }
>;
type Flat<T> = { [K in keyof T]: T[K] };

/**
 * Checks a spec once, where it comes in from the server: the spec, keeping only the fields SPEC
 * declares (as the API server prunes the others), or one line saying which field is wrong.
 */
export function checkSpec(spec: Record<string, unknown>): SpecOf<typeof SPEC> | string {
  return checkFields(SPEC, spec, 'spec');
}

/** Checks `object` against `fields`: the declared fields, checked, or which one is wrong. */
export function checkFields<F extends Fields>(
  fields: F,
  object: Record<string, unknown>,
  path: string,
): SpecOf<F> | string {
  const checked: Record<string, unknown> = {};
  for (const [name, field] of Object.entries(fields)) {
    const value = object[name];
    // The API server drops a null as if the field were not there.
    if ((value === undefined || value === null) && field.optional) continue;
    const wrong = whatIsWrong(field, value);
    if (wrong !== undefined) return `${path}.${name} ${wrong}`;
    checked[name] = value;
  }
  return checked as SpecOf<F>;
}

// Each type a field may have: the test of a value, and its name in a message, alone and in a list.
const TYPES = {
  string: { is: (value: unknown) => typeof value === 'string', one: 'a string', many: 'strings' },
  integer: { is: Number.isInteger, one: 'a whole number', many: 'whole numbers' },
  boolean: {
    is: (value: unknown) => typeof value === 'boolean',
    one: 'true or false',
    many: 'booleans',
  },
};

/** What is wrong with `value` as `field` declares it, in a few words; undefined: nothing. */
function whatIsWrong(field: Field, value: unknown): string | undefined {
  if (field.type === 'array') {
    const item = TYPES[field.items ?? 'string'];
    const fits = Array.isArray(value) && value.every((element) => item.is(element));
    return fits ? undefined : `is not a list of ${item.many}`;
  }
  if (!TYPES[field.type].is(value)) return `is not ${TYPES[field.type].one}`;
  if (typeof value === 'string') {
    const length = [...value].length; // characters, not UTF-16 units, as the API server counts
    const { minLength = 0, maxLength = Number.POSITIVE_INFINITY } = field;
    if (length < minLength) {
      return minLength === 1 ? 'is empty' : `is under ${minLength} characters`;
    }
    if (length > maxLength) return `is over ${maxLength} characters`;
    if (field.enum && !field.enum.includes(value)) return `is not one of ${field.enum.join(', ')}`;
  }
  if (typeof value === 'number') {
    if (field.minimum !== undefined && value < field.minimum) return `is under ${field.minimum}`;
    if (field.maximum !== undefined && value > field.maximum) return `is over ${field.maximum}`;
  }
  return undefined;
}

/** The OpenAPI schema of a spec that `fields` declares, as the CRD carries it. */
export function schemaOf(fields: Fields): Record<string, unknown> {
  const properties: Record<string, object> = {};
  for (const [name, field] of Object.entries(fields)) {
    const { items, optional, column, ...schema } = field;
    properties[name] = items === undefined ? schema : { ...schema, items: { type: items } };
  }
  const required = Object.keys(fields).filter((name) => !fields[name]?.optional);
  if (required.length === 0) return { type: 'object', properties };
  return { type: 'object', required, properties };
}

/** The columns of kubectl get for the fields that name one, under `.spec` or `.status`. */
export function columnsOf(fields: Fields, under = 'spec'): object[] {
  return Object.entries(fields).flatMap(([name, field]) => {
    if (field.column === undefined) return [];
    const type = field.type === 'array' ? 'string' : field.type;
    return [{ name: field.column, type, jsonPath: `.${under}.${name}` }];
  });
}

// What the controller writes in the status: Ready, and the generation it was reconciled at.
const STATUS_SCHEMA = {
  type: 'object',
  properties: {
    observedGeneration: { type: 'integer', format: 'int64' },
    conditions: {
      type: 'array',
      'x-kubernetes-list-type': 'map',
      'x-kubernetes-list-map-keys': ['type'],
      items: {
        type: 'object',
        required: ['type', 'status', 'lastTransitionTime'],
        properties: {
          type: { type: 'string' },
          status: { type: 'string', enum: ['True', 'False', 'Unknown'] },
          reason: { type: 'string' },
          message: { type: 'string' },
          observedGeneration: { type: 'integer', format: 'int64' },
          lastTransitionTime: { type: 'string', format: 'date-time' },
        },
      },
    },
  },
};

/** The status: what the controller writes (Ready), and the fields of STATUS, none required. */
function statusSchema(): object {
  const own = schemaOf(STATUS).properties as object;
  return { ...STATUS_SCHEMA, properties: { ...own, ...STATUS_SCHEMA.properties } };
}

/** crd.yaml: the resource, its schema from SPEC and STATUS, and its columns in kubectl get. */
export function customResourceDefinition(): object {
  const names = { kind: KIND, listKind: `${KIND}List`, plural: PLURAL, singular: kind };
  const ready = '.status.conditions[?(@.type=="Ready")].status';
  const version = {
    name: VERSION,
    served: true,
    storage: true,
    // Without it, a status write bumps the generation, and the controller sees its own writes.
    subresources: { status: {} },
    schema: {
      openAPIV3Schema: {
        type: 'object',
        required: ['spec'],
        properties: { spec: schemaOf(SPEC), status: statusSchema() },
      },
    },
    additionalPrinterColumns: [
      ...columnsOf(SPEC),
      ...columnsOf(STATUS, 'status'),
      { name: 'Ready', type: 'string', jsonPath: ready },
      { name: 'Age', type: 'date', jsonPath: '.metadata.creationTimestamp' },
    ],
  };
  return {
    apiVersion: 'apiextensions.k8s.io/v1',
    kind: 'CustomResourceDefinition',
    metadata: { name: resource },
    spec: {
      group: GROUP,
      scope: 'Namespaced',
      names: { ...names, shortNames: SHORT_NAMES },
      versions: [version],
    },
  };
}

/** What the controller may do, in every namespace (it runs with -A). */
export function clusterRules(ownedKinds: readonly Owned[] = OWNED): object[] {
  const rule = (group: string, name: string, verbs: string[]) => {
    return { apiGroups: [group], resources: [name], verbs };
  };
  // What reconcile makes: server-side apply is a patch that may create. A core kind ('v1') has the
  // group ''.
  const owned = ownedKinds.map(({ apiVersion, plural }) => {
    const group = apiVersion.includes('/') ? apiVersion.replace(/\/.*/, '') : '';
    return rule(group, plural, ['get', 'list', 'watch', 'create', 'patch', 'delete']);
  });
  return [
    rule(GROUP, PLURAL, ['get', 'list', 'watch', 'patch']), // patch: the FINALIZER, when set
    rule(GROUP, `${PLURAL}/status`, ['patch']),
    // blockOwnerDeletion on what an object owns needs this where the admission plugin
    // OwnerReferencesPermissionEnforcement is on.
    rule(GROUP, `${PLURAL}/finalizers`, ['update']),
    ...owned,
    rule('', 'events', ['create', 'patch']), // core/v1 Events, as client-go writes them
  ];
}

/** deploy.yaml: the controller in a cluster, as two replicas with one leader. */
export function deployment(): object[] {
  const namespace = CONTROLLER;
  const rbac = 'rbac.authorization.k8s.io';
  const subjects = [{ kind: 'ServiceAccount', name: CONTROLLER, namespace }];
  const leaderElection = { name: `${CONTROLLER}-leader-election`, namespace };
  // The Lease the replicas elect a leader over (--leader-elect), in their own namespace only.
  const leaseRule = { apiGroups: ['coordination.k8s.io'], resources: ['leases'] };
  return [
    { apiVersion: 'v1', kind: 'Namespace', metadata: { name: namespace } },
    { apiVersion: 'v1', kind: 'ServiceAccount', metadata: { name: CONTROLLER, namespace } },
    {
      apiVersion: `${rbac}/v1`,
      kind: 'ClusterRole',
      metadata: { name: CONTROLLER },
      rules: clusterRules(),
    },
    {
      apiVersion: `${rbac}/v1`,
      kind: 'ClusterRoleBinding',
      metadata: { name: CONTROLLER },
      roleRef: { apiGroup: rbac, kind: 'ClusterRole', name: CONTROLLER },
      subjects,
    },
    {
      apiVersion: `${rbac}/v1`,
      kind: 'Role',
      metadata: leaderElection,
      rules: [{ ...leaseRule, verbs: ['get', 'create', 'update'] }],
    },
    {
      apiVersion: `${rbac}/v1`,
      kind: 'RoleBinding',
      metadata: leaderElection,
      roleRef: { apiGroup: rbac, kind: 'Role', name: leaderElection.name },
      subjects,
    },
    controllerDeployment(namespace),
  ];
}

/** The Deployment: its image is built by the Dockerfile (docker build -t IMAGE .). */
function controllerDeployment(namespace: string): object {
  const labels = { app: CONTROLLER };
  const probe = (path: string) => ({ httpGet: { path, port: 'health' } });
  const container = {
    name: 'controller',
    image: IMAGE,
    imagePullPolicy: 'IfNotPresent',
    args: ['-A', '--leader-elect', '--health-port', '8080'],
    env: [
      // where the Lease lives
      { name: 'POD_NAMESPACE', valueFrom: { fieldRef: { fieldPath: 'metadata.namespace' } } },
    ],
    ports: [{ name: 'health', containerPort: 8080 }],
    // Restarts a controller that stopped making progress.
    livenessProbe: { ...probe('/healthz'), periodSeconds: 10, failureThreshold: 3 },
    // Ready once the initial list is handled, or while following.
    readinessProbe: { ...probe('/readyz'), periodSeconds: 5 },
    // Measured by npm run bench: about 145 MB at start under Node 24, 250 MB with 20k objects
    // cached, 380 MB with 100k. Raise the limit with the number of objects.
    resources: { requests: { cpu: '50m', memory: '192Mi' }, limits: { memory: '512Mi' } },
    securityContext: {
      allowPrivilegeEscalation: false,
      readOnlyRootFilesystem: true,
      capabilities: { drop: ['ALL'] },
    },
  };
  // runAsUser 1000: the node user of the Node image.
  const securityContext = {
    runAsNonRoot: true,
    runAsUser: 1000,
    seccompProfile: { type: 'RuntimeDefault' },
  };
  return {
    apiVersion: 'apps/v1',
    kind: 'Deployment',
    metadata: { name: CONTROLLER, namespace, labels },
    spec: {
      replicas: 2, // one leads; the other takes over within seconds if it goes away
      selector: { matchLabels: labels },
      template: {
        metadata: { labels },
        spec: { serviceAccountName: CONTROLLER, securityContext, containers: [container] },
      },
    },
  };
}

/** Everything to install: the CRD, then the controller. */
export function manifests(): object[] {
  return [customResourceDefinition(), ...deployment()];
}

/** What `manifests [crd|deploy]` prints: YAML under a header line; undefined for another word. */
export function manifestsText(file?: string): string | undefined {
  const files: Record<string, () => object[]> = {
    crd: () => [customResourceDefinition()],
    deploy: deployment,
  };
  const objects = file === undefined ? manifests() : files[file]?.();
  if (objects === undefined) return undefined;
  const command = file === undefined ? 'manifests' : `manifests ${file} > ${file}.yaml`;
  const header = `# Generated by: npx tsx ${FILE} ${command} (change ${FILE}, not this)`;
  return `${header}\n${toYaml(objects)}`;
}

/**
 * Kubernetes objects as YAML documents, separated by ---: mappings in block style, lists of
 * plain values in flow style ([get, list]), strings quoted only where YAML would read them
 * otherwise.
 */
export function toYaml(objects: object[]): string {
  const documents = objects.map((object) => (isBlock(object) ? yamlLines(object, '') : ['{}']));
  return documents.map((lines) => `${lines.join('\n')}\n`).join('---\n');
}

/** The lines of a mapping or a list, in block style, each starting with `indent`. */
function yamlLines(value: object, indent: string): string[] {
  if (Array.isArray(value)) {
    return value.flatMap((item: unknown) => {
      if (!isBlock(item)) return [`${indent}- ${flow(item)}`];
      const [first = '', ...rest] = yamlLines(item, `${indent}  `);
      return [`${indent}- ${first.trimStart()}`, ...rest];
    });
  }
  return Object.entries(value).flatMap(([key, item]: [string, unknown]) => {
    if (item === undefined) return [];
    if (!isBlock(item)) return [`${indent}${scalar(key)}: ${flow(item)}`];
    return [`${indent}${scalar(key)}:`, ...yamlLines(item, `${indent}  `)];
  });
}

/** A value written on lines of its own; the others (a scalar, {}, [], [a, b]) fit on one. */
function isBlock(value: unknown): value is object {
  if (typeof value !== 'object' || value === null) return false;
  if (Array.isArray(value)) return value.some((item) => typeof item === 'object' && item !== null);
  return Object.keys(value).length > 0;
}

/** A value on its key's line: a scalar, {}, or a list of scalars ([get, list]). */
function flow(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(scalar).join(', ')}]`;
  return typeof value === 'object' && value !== null ? '{}' : scalar(value);
}

// Strings that YAML 1.1 (Kubernetes' parser) or 1.2 reads as a boolean, null, number or date.
const NOT_STRINGS = [
  /^(y|yes|n|no|true|false|on|off|null|~)$/i,
  /^[-+]?(\d[\d_]*(\.[\d_]*)?|\.\d[\d_]*)(e[-+]?\d+)?$/i,
  /^[-+]?(0[box]|\d[\d_]*(:[0-5]?\d)+|\.inf$|\.nan$)/i,
  /^\d{4}-\d\d?-\d\d?/,
];

/** A scalar as YAML: plain where that reads back as the same string, else quoted. */
function scalar(value: unknown): string {
  if (typeof value !== 'string') return String(value);
  const plain = /^[\w./-][\w./:-]*$/.test(value) && !/^-$|:$/.test(value);
  if (plain && !NOT_STRINGS.some((pattern) => pattern.test(value))) return value;
  // Control characters and line breaks: in double quotes, escaped as in JSON (YAML reads those).
  if (/[\p{Cc}\u2028\u2029\ufeff]/u.test(value)) {
    const unicode = (char: string) => `\\u${char.charCodeAt(0).toString(16).padStart(4, '0')}`;
    return JSON.stringify(value).replace(/[\p{Cc}\u2028\u2029\ufeff]/gu, unicode);
  }
  return `'${value.replaceAll("'", "''")}'`;
}

/** The command `manifests [crd|deploy]`: prints them, and 0; another word is refused with 2. */
function printManifests(words: string[]): number {
  const [command, file, ...rest] = words;
  const text = command === 'manifests' && rest.length === 0 ? manifestsText(file) : undefined;
  if (text === undefined) {
    const usage = 'manifests, manifests crd or manifests deploy';
    return fail(2, `unknown command '${words.join(' ')}': try ${usage} — see --help`);
  }
  process.stdout.write(text);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Main: configuration, then (as the leader, with --leader-elect) the watches and the workers, until
// SIGINT or SIGTERM.

export interface Options {
  reconcile?: Reconcile;
  stdout?: Writable;
  finalizer?: string; // instead of FINALIZER
  owned?: Owned[]; // instead of OWNED
  now?: () => number; // a monotonic clock in milliseconds, for the lease
}

/** The collection of an owned kind, in the namespaces the controller watches, by its label. */
function ownedCollection(config: Config, cache: OwnedCache): Collection {
  const { apiVersion, plural } = cache.owned;
  const group = apiVersion.includes('/') ? `/apis/${apiVersion}` : `/api/${apiVersion}`;
  const where = config.namespace === undefined ? '' : `/namespaces/${config.namespace}`;
  const selector = Object.entries(MANAGED_BY)
    .map(([label, value]) => `${label}=${value}`)
    .join(',');
  return { plural, path: `${group}${where}/${plural}`, selector, cache };
}

/** Runs the controller until `signal` aborts; returns the process exit code. */
export async function main(
  args: string[],
  signal: AbortSignal,
  options: Options = {},
): Promise<number> {
  let server: http.Server | undefined;
  let election: LeaderElection | undefined;
  try {
    const config = await loadConfig(args);
    if (typeof config === 'number') return config;
    const health = new Health();
    const metrics = new Metrics();
    processMetrics(metrics);
    if (config.healthPort !== undefined) {
      const staleAfterMs = (config.watchTimeoutSeconds + 30) * 1000;
      server = await health.serve(config.healthPort, staleAfterMs, metrics);
    }
    const api = new Api(config, metrics);
    if (config.leaseNamespace !== undefined) {
      const now = options.now ?? (() => performance.now());
      const leader = new LeaderElection(api, config.leaseNamespace, now);
      api.fence = leader.fence;
      const status = { name: CONTROLLER };
      metrics.gauge('leader_election_master_status', () => [[status, leader.leading ? 1 : 0]]);
      election = leader;
    }
    const lost = (await election?.lead(health, signal)) ?? new AbortController().signal;
    await control(api, health, options, AbortSignal.any([signal, lost]));
    if (lost.aborted) {
      const why = messageOf(lost.reason);
      return fail(1, `stopped leading: ${why} — exiting, so that a new replica starts clean`);
    }
    await election?.release().catch(() => {});
    return 0;
  } catch (err) {
    if (!signal.aborted) return exitCodeOf(err);
    await election?.release().catch(() => {}); // stopped while waiting to lead, or as it won
    return 0;
  } finally {
    server?.close();
  }
}

/** The watches and the workers, until `signal` aborts. */
async function control(api: Api, health: Health, options: Options, signal: AbortSignal) {
  const { config, metrics } = api;
  const queue = new WorkQueue(monotonic, metrics);
  const objects = new ObjectCache(config, queue, options.finalizer ?? FINALIZER);
  const owned = new OwnedObjects(config, objects, options.owned ?? OWNED);
  const statusWriter = new StatusWriter(api, queue, objects);
  const stdout = options.stdout ?? process.stdout;
  // What the lists, watches and workers say on stderr is shared: a problem of the server's is one
  // line, not one per collection or per object.
  const serverState: ServerState = { problems: new Set<string>(), streaming: true };
  const worker: Worker = {
    api,
    problems: new ClusterProblems(config.server, serverState),
    events: new EventRecorder(api),
    queue,
    objects,
    owned,
    statusWriter,
    client: clientFor(api, owned, signal),
    print: printer(stdout, config.json, () => api.fence()),
    reconcile: options.reconcile ?? reconcile,
    signal,
  };
  showReconciles(metrics, queue, config.concurrency);
  // Workers start once the caches of what reconcile made hold their initial state, so that a
  // restart repeats no write; the objects are reconciled as their initial state comes in.
  const objectsIn = deferred();
  const ownedIn = owned.caches.map(() => deferred());
  const allOwnedIn = Promise.all(ownedIn.map((kind) => kind.promise));
  void Promise.all([objectsIn.promise, allOwnedIn]).then(() => {
    health.ready = true;
  });
  const workers = Array.from({ length: config.concurrency }, async () => {
    await allOwnedIn;
    await work(worker);
  });
  const path = collectionPath(config.namespace);
  const objectCollection = { plural: PLURAL, path, selector: config.selector, cache: objects };
  if (objects.finalizer && config.selector) {
    void objectsIn.promise.then(() => releaseUnselected(api, objects, path, signal));
  }
  const shared = { health, stdout, serverState };
  await Promise.all([
    listAndWatch(api, objectCollection, shared, objectsIn.resolve, signal),
    ...owned.caches.map((cache, i) =>
      listAndWatch(api, ownedCollection(config, cache), shared, ownedIn[i].resolve, signal),
    ),
  ]);
  queue.stop();
  statusWriter.stop();
  // In-flight reconciles were told to stop; wait briefly.
  await Promise.race([Promise.all(workers), sleep(300)]);
}

/**
 * With -l and a finalizer: an object that left the selector while no replica ran still carries
 * our finalizer, and no watch of ours will see it again. One list of the whole collection at the
 * start (the objects outside the selector too) finds them: each gets its Deleted, and the
 * finalizer comes off.
 */
async function releaseUnselected(
  api: Api,
  objects: ObjectCache,
  path: string,
  signal: AbortSignal,
) {
  const collection = { plural: PLURAL, path, selector: undefined, cache: objects };
  while (!signal.aborted) {
    try {
      for await (const page of listPages(api, collection, signal)) {
        for (const object of page.items ?? []) objects.orphan(object);
      }
      return;
    } catch (err) {
      if (signal.aborted) return;
      const why = `cannot list the ${PLURAL} outside the selector that carry our finalizer`;
      console.error(`${why} (${messageOf(err)}); retrying in 30s`);
      await sleep(30_000, undefined, { signal }).catch(() => {});
    }
  }
}

/** The exit code for what stopped the controller, after its one line; or the error, rethrown. */
function exitCodeOf(err: unknown): number {
  const { name, code } = err as { name?: string; code?: string };
  if (name === 'NotCapable' || name === 'PermissionDenied') {
    const run = `deno run --allow-env --allow-read --allow-net --allow-sys ${FILE}`;
    return fail(2, `Deno needs more permissions (${messageOf(err)}) — run ${run}`);
  }
  if (code === 'ERR_MODULE_NOT_FOUND') return fail(1, `${messageOf(err)} — run npm ci first`);
  if (code === 'EADDRINUSE' || code === 'EACCES') {
    return fail(1, `cannot serve health checks (${messageOf(err)}) — pick another --health-port`);
  }
  throw err;
}

/** A promise, and the function that resolves it. */
function deferred() {
  let resolve = () => {};
  const promise = new Promise<void>((done) => {
    resolve = done;
  });
  return { promise, resolve: () => resolve() };
}

const collectionPath = (namespace: string | undefined) =>
  `/apis/${GROUP}/${VERSION}${namespace === undefined ? '' : `/namespaces/${namespace}`}/${PLURAL}`;

/** Why a reconcile failed, in a word, for its Ready condition and Event: the error's, if any. */
function reasonOf(err: unknown): string {
  const { reason } = (err ?? {}) as { reason?: unknown };
  return typeof reason === 'string' && /^[A-Z]\w*$/.test(reason) ? reason : 'ReconcileFailed';
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

// Runs only as the entry point, not when imported by the tests. Node 22 and tsx lack
// import.meta.main.
const isEntryPoint =
  (import.meta as { main?: boolean }).main ?? process.argv[1] === fileURLToPath(import.meta.url);
if (isEntryPoint) {
  const stop = new AbortController();
  process.once('SIGINT', () => stop.abort());
  process.once('SIGTERM', () => stop.abort());
  // EPIPE: the reader is gone (| head -1), and so are we, quietly.
  process.stdout.on('error', () => stop.abort());
  // Within a second, even if the reader is stuck.
  stop.signal.addEventListener('abort', () => setTimeout(() => process.exit(0), 1000).unref());
  const exitCode = await main(process.argv.slice(2), stop.signal);
  // Every line printed reaches the pipe first (within that second).
  process.stdout.write('', () => process.exit(exitCode));
}

// Where to go next: conditions beyond Ready; owned objects in other namespaces or cluster-scoped
// (an ownerReference cannot cross namespaces: use a finalizer, and a label, to find them);
// nested objects and lists of objects in SPEC (schemaOf and checkFields take a line or two each);
// a second version of the resource, with a conversion webhook.
