// A fake Kubernetes API server for the controller's tests and for the demo.
//
// It plays the parts of kube-apiserver this controller meets, each a short section below:
//   - requests: bearer tokens (401), queued faults, Status bodies for every error;
//   - objects: one resourceVersion counter and one event log for every resource, as in one etcd;
//   - writes: create (409 AlreadyExists), update (409 on a stale resourceVersion or another uid),
//     JSON merge patch, JSON patch (RFC 6902, `test` included), server-side apply with field
//     managers, conflicts and force, delete; the status subresource; metadata.generation;
//   - metadata rules: uid immutable, ownerReferences validated (one controller), finalizers that
//     hold a deletion (deletionTimestamp) until the last one goes, and none added while deleting;
//   - lists and watches: pages with continue tokens (which expire), label selectors (an object that
//     stops matching arrives as DELETED), watch streams cut at any byte, bookmarks, 410 Gone,
//     streaming lists (sendInitialEvents);
//   - the resources: the controller's custom resource (named by what controller.ts exports),
//     ConfigMaps, Events (core/v1 and events.k8s.io/v1), Leases for leader election;
//   - admission: OwnerReferencesPermissionEnforcement's 403 for blockOwnerDeletion, if asked;
//   - a garbage collector, off unless a test turns it on (it lives in kube-controller-manager).
// The handlers are msw's, served over a real loopback TLS server with a throwaway CA, so a client's
// own https request, its CA check and its bearer token are exercised as against a cluster, on Node,
// Deno and Bun alike.
//
// The file, top to bottom:
//   - what a test imports besides the server: the CA, the kubeconfig writer, freePort, the types of
//     what it stores and of each request it records;
//   - the knobs (Knobs, as `fake.knobs`): the faults, delays and features a test sets and leaves
//     set, each with what the real server does, and their defaults in one place;
//   - the rules: Status bodies, patches, field managers, metadata validation;
//   - the store (Store), then lists and watches (Streams);
//   - the handlers (class ApiServer): what a request meets, from its bytes to its answer;
//   - the test controls (class FakeApiServer, which extends ApiServer): what a test calls, that is
//     listen and close, changes made as another client would, faults queued, what it reads back;
//   - the demo (runDemo). As a program this file is the demo (`npm run demo`, or `npx tsx
//     fake-apiserver.ts`): it starts the fake, runs the real controller.ts against it as a child
//     process, and plays the seed's walkthrough.

import { spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import type { IncomingMessage, ServerResponse } from 'node:http';
import * as https from 'node:https';
import { type AddressInfo, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { isDeepStrictEqual } from 'node:util';
import { getResponse, HttpResponse, http, type PathParams } from 'msw';
import { GROUP, KIND, OWNED, PLURAL, VERSION } from './controller.ts';

export { GROUP, KIND, PLURAL, VERSION };
export const GROUP_VERSION = `${GROUP}/${VERSION}`;
export const TOKEN = 'test-token';
// A throwaway CA and a certificate for 127.0.0.1 and localhost signed by it (P-256, valid to 2126),
// made with `openssl req -x509 …` and `openssl x509 -req …`. The key opens nothing else.
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
export const SERVER_KEY = `-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgWRUO/hP9kax8OQxA
ESxcUHC7DKnC7kw1eo2yffOec3ahRANCAARY6upyf2aOv47NGH+4mKNyz15bC5L6
itzEqcRcmPV7iNyE3FG+OQxN3wYwa/B6q7d8nIzfKVKThv/isiJO5eWc
-----END PRIVATE KEY-----
`;

/** Writes a kubeconfig for a server (with the CA) to a fresh temp dir; returns its path. */
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

/**
 * A port nobody listens on now: bound on 127.0.0.1 port 0, then let go. For a server a test starts
 * (the controller's health port, a second fake, a real kube-apiserver in e2e/).
 */
export async function freePort(): Promise<number> {
  const probe = createServer();
  await new Promise<void>((resolve) => probe.listen(0, '127.0.0.1', resolve));
  const { port } = probe.address() as AddressInfo;
  await new Promise((resolve) => probe.close(resolve));
  return port;
}

// ---------------------------------------------------------------------------------------------
// The objects it keeps, and what it records about each request.

export type Spec = Record<string, unknown>;
export type Labels = Record<string, string>;
export interface OwnerReference {
  apiVersion: string;
  kind: string;
  name: string;
  uid: string;
  controller?: boolean;
  blockOwnerDeletion?: boolean;
}
export interface ManagedFieldsEntry {
  manager: string;
  operation: 'Apply' | 'Update';
  apiVersion: string;
  time: string;
  fieldsType: 'FieldsV1';
  fieldsV1: Record<string, unknown>;
}
export interface Metadata {
  name: string;
  namespace: string;
  resourceVersion: string;
  uid: string;
  creationTimestamp: string;
  generation?: number;
  labels?: Labels;
  annotations?: Labels;
  ownerReferences?: OwnerReference[];
  finalizers?: string[];
  deletionTimestamp?: string;
  deletionGracePeriodSeconds?: number;
  managedFields?: ManagedFieldsEntry[];
}
export interface StoredObject {
  apiVersion: string;
  kind: string;
  metadata: Metadata;
  [field: string]: unknown;
}
export interface StoredBook extends StoredObject {
  kind: typeof KIND;
  metadata: Metadata & { generation: number };
  spec: Spec;
  status?: Record<string, unknown>;
}
export interface StoredConfigMap extends StoredObject {
  kind: 'ConfigMap';
  data?: Record<string, string>;
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

export type Verb = 'list' | 'watch' | 'get' | 'create' | 'update' | 'patch' | 'apply' | 'delete';
export type Resource =
  | typeof PLURAL
  | `${typeof PLURAL}/status`
  | 'configmaps'
  | 'secrets'
  | 'events'
  | 'leases'
  | (string & {}); // another kind that controller.ts's OWNED lists
/** One request as the fake received it. */
export interface ApiRequest {
  verb: Verb;
  resource: Resource;
  namespace: string | undefined; // undefined: across all namespaces
  name?: string;
  method: string;
  path: string; // without the query
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
  name?: string; // only a request for the object of this name
  always?: boolean; // every such request, not just the next, until clearFaults()
}

/** A kind of object it serves, and how the real server names it in messages. */
interface ResourceType {
  resource: string; // the plural, as in paths
  apiVersion: string;
  kind: string;
  group: string; // '' for the core group
  qualified: string; // books.example.technosophos.com, configmaps: as messages name the resource
  qualifiedKind: string; // Book.example.technosophos.com, ConfigMap: as validation names the kind
  unconditionalUpdate: boolean; // a PUT may leave out metadata.resourceVersion
  showManagedFields: boolean; // metadata.managedFields in what it answers
}
const resourceType = (
  resource: ResourceType['resource'],
  group: string,
  version: string,
  kind: string,
  builtIn: boolean,
): ResourceType => ({
  resource,
  apiVersion: group ? `${group}/${version}` : version,
  kind,
  group,
  qualified: group ? `${resource}.${group}` : resource,
  qualifiedKind: group ? `${kind}.${group}` : kind,
  unconditionalUpdate: builtIn, // custom resources need a resourceVersion on every update
  showManagedFields: builtIn, // left out of the books so that tests compare them as before
});
const BOOKS = resourceType(PLURAL, GROUP, VERSION, KIND, false);
const CONFIGMAPS = resourceType('configmaps', '', 'v1', 'ConfigMap', true);
const SECRETS = resourceType('secrets', '', 'v1', 'Secret', true);
// What reconcile makes, as controller.ts's OWNED lists it, served like any built-in kind: a copy
// that owns a Deployment keeps its tests. ConfigMaps and Secrets are served whatever it lists.
const OWNED_TYPES = [
  CONFIGMAPS,
  SECRETS,
  ...OWNED.filter(({ plural }) => plural !== 'configmaps' && plural !== 'secrets').map(
    ({ apiVersion, kind, plural }) => {
      const [group, version] = apiVersion.includes('/') ? apiVersion.split('/') : ['', apiVersion];
      return resourceType(plural, group ?? '', version ?? 'v1', kind, true);
    },
  ),
];
const basePath = (type: ResourceType) => (type.group ? `/apis/${type.apiVersion}` : '/api/v1');
const CORE_EVENTS = resourceType('events', '', 'v1', 'Event', true);
const EVENTS = resourceType('events', 'events.k8s.io', 'v1', 'Event', true);

// ---------------------------------------------------------------------------------------------
// The knobs: how this API server differs from a healthy, current kube-apiserver, in one object
// (`fake.knobs`). A test sets them, `fake.knobs.forbidden = true`, and each is read when a request
// needs it, so it holds from the next request on; each says which requests it touches. Faults
// queued for one request (failNext, failInitialEvents), an outage (refuseConnections) and the
// garbage collector (collectGarbage) are FakeApiServer's controls, below.

/** What a test turns on a FakeApiServer: a fault, a delay, a feature or a plugin. */
export interface Knobs {
  /**
   * The real server writes each watch event whole; the network may still cut it anywhere. Every
   * watch stream is written in pieces of this many bytes (1: byte by byte), so a client has to
   * join lines across reads. Infinity: each write whole.
   */
  chunkBytes: number;
  /**
   * With the CRD installed, the books' paths exist. false: every request for books gets what the
   * real server answers for a path it does not know, a plain-text 404 "404 page not found".
   */
  crdInstalled: boolean;
  /**
   * A user whose RBAC role does not allow a request gets 403 Forbidden, the Status naming the
   * user, the verb and the resource. true: every request for books but their status gets it.
   */
  forbidden: boolean;
  /** The same 403, for every request for books/status (the user may read books, not write). */
  forbidStatus: boolean;
  /**
   * A busy server takes a while to make a write. Every request to books/status but a get waits
   * this long once logged, before anything happens: the write, its event, its answer come late.
   */
  statusLatencyMs: number;
  /**
   * The answer to a write can come after the write is made and its watch event sent. A status
   * write is made (its MODIFIED goes out at once), then its answer waits this long.
   */
  statusAnswerDelayMs: number;
  /**
   * The WatchList feature (streaming lists, `sendInitialEvents=true`), on by default since 1.34.
   * false: a server before it, which answers such a watch with 422 Invalid.
   */
  watchList: boolean;
  /**
   * A half-open connection: a watch is answered (200 and its headers), then nothing more comes,
   * no event and no end. It is not an open watch for openWatches either.
   */
  stallWatches: boolean;
  /** A list request is taken and never answered, not even with its headers. */
  neverAnswerLists: boolean;
  /**
   * A watch from a resourceVersion older than the last compaction gets 410 Gone (see compact()).
   * true: every watch from a resourceVersion gets it, however recent; a watch from none
   * (a fresh start, a streaming list) does not.
   */
  goneForever: boolean;
  /**
   * The real server ends a watch at its timeoutSeconds. true: every watch is answered, then ended
   * at once, before any event (its initial ADDEDs included).
   */
  endWatchesAtOnce: boolean;
  /**
   * A defensive case: the real server answers a too-old watch with HTTP 200 and an ERROR event
   * (as here by default); HTTP 410 comes from lists. true: the watch gets HTTP 410 instead.
   */
  goneAsHttp: boolean;
  /**
   * A continue token expires (etcd compacted past it): its list gets 410 Expired, with a token to
   * go on with, inconsistently. true: the next list with a continue token gets that, and this is
   * false again.
   */
  expireNextContinueToken: boolean;
  /**
   * For a moment after a CRD is established, or after it restarts, the real server answers 429
   * 'storage is (re)initializing' with Retry-After: 1. The next N lists and watches of books get
   * it (each counts this down).
   */
  storageInitializing: number;
  /**
   * A streaming list sends its ADDEDs, then the bookmark annotated k8s.io/initial-events-end.
   * true: the ADDEDs, then the stream ends without it (a server restarting).
   */
  endInitialEventsEarly: boolean;
  /**
   * OwnerReferencesPermissionEnforcement (on in many managed clusters), for a user who may not
   * update the owner's finalizers (books/finalizers): a request that newly sets blockOwnerDeletion
   * on an owner reference gets 403.
   */
  refuseBlockOwnerDeletion: boolean;
  /**
   * A slow network back: the next Lease update is written at once, and answered this many ms
   * later. Then 0 again.
   */
  delayNextLeaseUpdateMs: number;
  /**
   * etcd timing out: updates of a Lease that name one of these holders get 500 InternalError, so
   * that holder cannot renew (add an identity: `fake.knobs.refuseLeaseUpdatesFrom.add(id)`).
   */
  refuseLeaseUpdatesFrom: Set<string>;
}

/** A new fake's knobs: a healthy API server of today, with the CRD installed. */
const defaultKnobs = (): Knobs => ({
  chunkBytes: Infinity,
  crdInstalled: true,
  forbidden: false,
  forbidStatus: false,
  statusLatencyMs: 0,
  statusAnswerDelayMs: 0,
  watchList: true,
  stallWatches: false,
  neverAnswerLists: false,
  goneForever: false,
  endWatchesAtOnce: false,
  goneAsHttp: false,
  expireNextContinueToken: false,
  storageInitializing: 0,
  endInitialEventsEarly: false,
  refuseBlockOwnerDeletion: false,
  delayNextLeaseUpdateMs: 0,
  refuseLeaseUpdatesFrom: new Set(),
});

// ---------------------------------------------------------------------------------------------
// Status bodies: every error, in the real server's words.

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

/** An error answer, thrown from deep in a write and answered by the request's handler. */
class Refusal extends Error {
  readonly body: ReturnType<typeof status>;
  constructor(body: ReturnType<typeof status>) {
    super(body.message);
    this.body = body;
  }
  response() {
    return HttpResponse.json(this.body, { status: this.body.code });
  }
}
const refusal = (code: number, reason: string, message: string, details?: object) =>
  new Refusal(status(code, reason, message, details as Record<string, unknown>));

const detailsOf = (type: ResourceType, name: string) => ({
  name,
  ...(type.group && { group: type.group }),
  kind: type.resource,
});
const notFound = (type: ResourceType, name: string) =>
  refusal(404, 'NotFound', `${type.qualified} "${name}" not found`, detailsOf(type, name));
const alreadyExists = (type: ResourceType, name: string) =>
  refusal(
    409,
    'AlreadyExists',
    `${type.qualified} "${name}" already exists`,
    detailsOf(type, name),
  );
const MODIFIED =
  'the object has been modified; please apply your changes to the latest version and try again';
/** 409 Conflict, for a stale resourceVersion or (why given) a failed uid precondition. */
const conflict = (qualified: string, name: string, details: object, why = MODIFIED) =>
  refusal(
    409,
    'Conflict',
    `Operation cannot be fulfilled on ${qualified} "${name}": ${why}`,
    details,
  );
const badRequest = (message: string) => refusal(400, 'BadRequest', message);
/** What a JSON patch that fails (a `test` included) gets: the library's reason is not passed on. */
const patchFailed = () =>
  refusal(422, 'Invalid', 'the server rejected our request due to an error in our request', {});

/** One field error of a 422 Invalid, in apimachinery's field.Error words. */
interface Cause {
  reason: 'FieldValueInvalid' | 'FieldValueRequired' | 'FieldValueForbidden';
  field: string;
  message: string;
}
const goValue = (value: unknown) =>
  typeof value === 'number' || typeof value === 'boolean' ? String(value) : JSON.stringify(value);
const invalidValue = (field: string, value: unknown, detail: string): Cause => ({
  reason: 'FieldValueInvalid',
  field,
  message: `Invalid value: ${goValue(value)}: ${detail}`,
});
const requiredValue = (field: string, detail: string): Cause => ({
  reason: 'FieldValueRequired',
  field,
  message: `Required value: ${detail}`,
});
const forbiddenValue = (field: string, detail: string): Cause => ({
  reason: 'FieldValueForbidden',
  field,
  message: `Forbidden: ${detail}`,
});
/** 422 Invalid: `Kind.group "name" is invalid: field: why` (several in brackets). */
function invalid(group: string, qualifiedKind: string, name: string, causes: Cause[]) {
  const each = [...new Set(causes.map((cause) => `${cause.field}: ${cause.message}`))];
  const all = each.length > 1 ? `[${each.join(', ')}]` : each[0];
  return refusal(422, 'Invalid', `${qualifiedKind} ${JSON.stringify(name)} is invalid: ${all}`, {
    name,
    ...(group && { group }),
    kind: qualifiedKind.split('.')[0],
    causes,
  });
}
const invalidObject = (type: ResourceType, name: string, causes: Cause[]) =>
  invalid(type.group, type.qualifiedKind, name, causes);
const nameMismatch = (inBody: unknown, inUrl: string) =>
  badRequest(
    `the name of the object (${String(inBody)}) does not match the name on the URL (${inUrl})`,
  );
// ---------------------------------------------------------------------------------------------
// Patches: JSON merge patch (RFC 7386) and JSON patch (RFC 6902).

const isObject = (value: unknown): value is Record<string, unknown> =>
  typeof value === 'object' && value !== null && !Array.isArray(value);
/** A deep copy without undefined values: what a round trip through JSON leaves. */
const plain = <T>(value: T): T => JSON.parse(JSON.stringify(value));

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

/**
 * RFC 6902: add, remove, replace, move, copy, test, applied in order to a copy; all or nothing.
 * Throws a message for the first operation that cannot apply (a failed `test` included).
 */
export function jsonPatch(document: unknown, operations: unknown): unknown {
  if (!Array.isArray(operations)) throw new Error('the JSON patch is not a list of operations');
  const root = { doc: plain(document) as unknown };
  const pointer = (path: unknown): string[] => {
    if (typeof path !== 'string' || (path && !path.startsWith('/')))
      throw new Error(`bad JSON pointer ${JSON.stringify(path)}`);
    return [
      'doc',
      ...path
        .split('/')
        .slice(1)
        .map((t) => t.replace(/~1/g, '/').replace(/~0/g, '~')),
    ];
  };
  // The container holding the pointer's last token, and that token.
  const locate = (tokens: string[]): [Record<string, unknown> | unknown[], string] => {
    let at: unknown = root;
    for (const token of tokens.slice(0, -1)) {
      at = Array.isArray(at) ? at[Number(token)] : isObject(at) ? at[token] : undefined;
      if (at === undefined) throw new Error(`missing path ${tokens.slice(1).join('/')}`);
    }
    if (!isObject(at) && !Array.isArray(at)) throw new Error('the path is not in an object');
    return [at, tokens.at(-1) ?? ''];
  };
  const index = (list: unknown[], token: string, end: number) => {
    const i = token === '-' ? list.length : Number(token);
    if (!/^(\d+|-)$/.test(token) || i > end) throw new Error(`index ${token} out of range`);
    return i;
  };
  const read = (tokens: string[]) => {
    const [at, key] = locate(tokens);
    const value = Array.isArray(at) ? at[index(at, key, at.length - 1)] : at[key];
    if (value === undefined) throw new Error(`missing value at ${tokens.slice(1).join('/')}`);
    return value;
  };
  const remove = (tokens: string[]) => {
    const value = read(tokens);
    const [at, key] = locate(tokens);
    if (Array.isArray(at)) at.splice(index(at, key, at.length - 1), 1);
    else delete at[key];
    return value;
  };
  const add = (tokens: string[], value: unknown) => {
    const [at, key] = locate(tokens);
    if (Array.isArray(at)) at.splice(index(at, key, at.length), 0, plain(value));
    else at[key] = plain(value);
  };
  for (const operation of operations) {
    if (!isObject(operation)) throw new Error('a JSON patch operation is not an object');
    const path = pointer(operation.path);
    const from = () => pointer(operation.from);
    switch (operation.op) {
      case 'add':
        add(path, operation.value);
        break;
      case 'remove':
        remove(path);
        break;
      case 'replace':
        remove(path);
        add(path, operation.value);
        break;
      case 'move':
        add(path, remove(from()));
        break;
      case 'copy':
        add(path, read(from()));
        break;
      case 'test':
        if (!isDeepStrictEqual(read(path), operation.value))
          throw new Error(`testing value ${operation.path} failed: test failed`);
        break;
      default:
        throw new Error(`Unexpected kind: ${String(operation.op)}`);
    }
  }
  return root.doc;
}

// ---------------------------------------------------------------------------------------------
// Field managers (server-side apply): who set which field.

// A field is a path: map keys one by one, ownerReferences entries by uid, finalizers by value;
// anything else (a list, a number, a string) is one field. Named as the real server names them
// in conflicts: .data.title, .metadata.labels.app, .metadata.ownerReferences[uid="…"].
type Segment = string | { uid: string } | { value: string };
interface Field {
  path: Segment[];
  value: unknown;
}
interface Manager {
  manager: string;
  operation: 'Apply' | 'Update';
  time: string;
  fields: Set<string>;
}
const fieldName = (path: Segment[]) =>
  path
    .map((s) =>
      typeof s === 'string'
        ? `.${s}`
        : 'uid' in s
          ? `[uid=${JSON.stringify(s.uid)}]`
          : `[=${JSON.stringify(s.value)}]`,
    )
    .join('');

/** The fields an object sets. apiVersion, kind, status and metadata's own fields are nobody's. */
function fieldsOf(object: Record<string, unknown>): Map<string, Field> {
  const fields = new Map<string, Field>();
  const add = (path: Segment[], value: unknown) => fields.set(fieldName(path), { path, value });
  const visit = (value: unknown, path: Segment[]) => {
    if (!isObject(value) || Object.keys(value).length === 0) return add(path, value);
    for (const [key, inner] of Object.entries(value)) visit(inner, [...path, key]);
  };
  for (const [key, value] of Object.entries(object)) {
    if (key !== 'metadata' && key !== 'apiVersion' && key !== 'kind' && key !== 'status')
      visit(value, [key]);
  }
  const metadata = isObject(object.metadata) ? object.metadata : {};
  for (const key of ['labels', 'annotations'])
    if (isObject(metadata[key])) visit(metadata[key], ['metadata', key]);
  for (const ref of Array.isArray(metadata.ownerReferences) ? metadata.ownerReferences : [])
    if (isObject(ref)) add(['metadata', 'ownerReferences', { uid: String(ref.uid) }], ref);
  for (const finalizer of Array.isArray(metadata.finalizers) ? metadata.finalizers : [])
    add(['metadata', 'finalizers', { value: String(finalizer) }], finalizer);
  return fields;
}

/** Sets a field in an object, making the maps and lists on its way. */
function setField(object: Record<string, unknown>, path: Segment[], value: unknown) {
  let at = object;
  for (const [i, segment] of path.entries()) {
    const last = i === path.length - 1;
    if (typeof segment !== 'string') {
      const list = at as unknown as unknown[];
      const same = (item: unknown) =>
        'uid' in segment ? isObject(item) && item.uid === segment.uid : item === segment.value;
      const found = list.findIndex(same);
      if (found >= 0) list[found] = plain(value);
      else list.push(plain(value));
      return;
    }
    const next = path[i + 1];
    if (last) at[segment] = plain(value);
    else if (typeof next !== 'string' && !Array.isArray(at[segment])) at[segment] = [];
    else if (typeof next === 'string' && !isObject(at[segment])) at[segment] = {};
    at = at[segment] as Record<string, unknown>;
  }
}

/** Removes a field from an object, and the maps and lists it leaves empty. */
function removeField(object: Record<string, unknown>, path: Segment[]) {
  const [segment, ...rest] = path;
  if (segment === undefined) return;
  if (typeof segment !== 'string') {
    const list = object as unknown as unknown[];
    const found = list.findIndex((item) =>
      'uid' in segment ? isObject(item) && item.uid === segment.uid : item === segment.value,
    );
    if (found >= 0) list.splice(found, 1);
    return;
  }
  const inner = object[segment];
  if (rest.length && (isObject(inner) || Array.isArray(inner))) {
    removeField(inner as Record<string, unknown>, rest);
    if (Object.keys(inner).length === 0) delete object[segment];
  } else if (!rest.length) delete object[segment];
}

/**
 * Who owns what after a write that is not an apply (create, update, patch): the writer takes the
 * fields whose value it changed, from whoever had them; a field removed is nobody's.
 */
function afterUpdate(
  managers: Manager[],
  before: Record<string, unknown> | undefined,
  after: Record<string, unknown>,
  writer: string,
): Manager[] {
  const old = fieldsOf(before ?? {});
  const now = fieldsOf(after);
  const changed = [...now].filter(([name, f]) => !isDeepStrictEqual(old.get(name)?.value, f.value));
  const result = managers.map((m) => ({ ...m, fields: new Set(m.fields) }));
  for (const m of result) {
    for (const name of m.fields) if (!now.has(name)) m.fields.delete(name);
    for (const [name] of changed) m.fields.delete(name);
  }
  let mine = result.find((m) => m.manager === writer && m.operation === 'Update');
  if (!mine && changed.length) {
    mine = { manager: writer, operation: 'Update', time: '', fields: new Set() };
    result.push(mine);
  }
  for (const [name] of changed) mine?.fields.add(name);
  if (mine && changed.length) mine.time = timestamp();
  return result.filter((m) => m.fields.size > 0);
}

/** How a conflict names another manager: an Update one with its API version. */
const managerName = (m: Manager, apiVersion: string) =>
  `${JSON.stringify(m.manager)}${m.operation === 'Update' ? ` using ${apiVersion}` : ''}`;

/**
 * Server-side apply: the object as `manager` says it should be, over `current`. A field another
 * manager owns with another value is a conflict (409) unless `force`, which takes it over; a field
 * this manager applied before and no longer sends is removed, unless someone else owns it too.
 */
function apply(
  type: ResourceType,
  current: StoredObject,
  managers: Manager[],
  applied: Record<string, unknown>,
  manager: string,
  force: boolean,
): { object: StoredObject; managers: Manager[] } {
  const wanted = fieldsOf(applied);
  const has = fieldsOf(current);
  const others = managers
    .filter((m) => m.manager !== manager || m.operation !== 'Apply')
    .map((m) => ({ ...m, fields: new Set(m.fields) }));
  const mine = managers.find((m) => m.manager === manager && m.operation === 'Apply');
  const conflicts: [Manager, string][] = [];
  for (const [name, field] of wanted) {
    if (!has.has(name) || isDeepStrictEqual(has.get(name)?.value, field.value)) continue;
    for (const other of others) {
      if (!other.fields.has(name)) continue;
      if (force) other.fields.delete(name);
      else conflicts.push([other, name]);
    }
  }
  if (conflicts.length) throw applyConflict(conflicts, type.apiVersion);
  const object = plain(current) as StoredObject;
  for (const name of mine?.fields ?? [])
    if (!wanted.has(name) && !others.some((m) => m.fields.has(name))) {
      const field = has.get(name);
      if (field) removeField(object, field.path);
    }
  for (const field of wanted.values()) setField(object, field.path, field.value);
  const fields = new Set(wanted.keys());
  const same = mine && isDeepStrictEqual(mine.fields, fields);
  const next: Manager = {
    manager,
    operation: 'Apply',
    time: same ? mine.time : timestamp(),
    fields,
  };
  return { object, managers: [...others.filter((m) => m.fields.size > 0), next] };
}

function applyConflict(conflicts: [Manager, string][], apiVersion: string) {
  const byManager = new Map<string, string[]>();
  for (const [m, name] of conflicts) {
    const who = managerName(m, apiVersion);
    byManager.set(who, [...(byManager.get(who) ?? []), name]);
  }
  const [[who, [name]] = ['', ['']]] = byManager;
  const message =
    conflicts.length === 1
      ? `Apply failed with 1 conflict: conflict with ${who}: ${name}`
      : `Apply failed with ${conflicts.length} conflicts: ${[...byManager]
          .sort(([a], [b]) => (a < b ? -1 : 1))
          .map(([m, names]) => [`conflicts with ${m}:`, ...names.map((n) => `- ${n}`)].join('\n'))
          .join('\n')}`;
  const causes = conflicts.map(([m, field]) => ({
    reason: 'FieldManagerConflict',
    message: `conflict with ${managerName(m, apiVersion)}`,
    field,
  }));
  return refusal(409, 'Conflict', message, { causes });
}

/** metadata.managedFields, as the real server shows who owns what (FieldsV1). */
function managedFields(managers: Manager[], apiVersion: string, object: StoredObject) {
  const fields = fieldsOf(object);
  return managers.map((m) => {
    const tree: Record<string, unknown> = {};
    for (const name of m.fields) {
      let at = tree;
      for (const segment of fields.get(name)?.path ?? []) {
        const key =
          typeof segment === 'string'
            ? `f:${segment}`
            : 'uid' in segment
              ? `k:${JSON.stringify({ uid: segment.uid })}`
              : `v:${JSON.stringify(segment.value)}`;
        at[key] ??= {};
        at = at[key] as Record<string, unknown>;
      }
    }
    return {
      manager: m.manager,
      operation: m.operation,
      apiVersion,
      time: m.time,
      fieldsType: 'FieldsV1' as const,
      fieldsV1: tree,
    };
  });
}

// ---------------------------------------------------------------------------------------------
// Validation: what every object's metadata must satisfy.

/** Owner references: apiVersion, kind, name and uid each, and at most one controller. */
function checkOwnerReferences(refs: unknown): Cause[] {
  if (!Array.isArray(refs)) return [];
  const causes: Cause[] = [];
  let controller = '';
  for (const [i, ref] of refs.entries()) {
    const at = `metadata.ownerReferences[${i}]`;
    const r = isObject(ref) ? ref : {};
    for (const key of ['apiVersion', 'kind', 'name', 'uid'])
      if (!r[key]) causes.push(requiredValue(`${at}.${key}`, 'must not be empty'));
    if (r.controller !== true) continue;
    const name = `${r.kind}/${r.name}`;
    if (!controller) controller = name;
    else
      causes.push(
        invalidValue(
          'metadata.ownerReferences',
          refs.map(ownerReferenceAsGo),
          'Only one reference can have Controller set to true. ' +
            `Found "true" in references for ${controller} and ${name}`,
        ),
      );
  }
  return causes;
}
/** An owner reference as the server marshals it: its fields in Go's order. */
const ownerReferenceAsGo = (ref: unknown) => {
  const r = isObject(ref) ? ref : {};
  const { apiVersion, kind, name, uid, controller, blockOwnerDeletion } = r;
  return plain({ apiVersion, kind, name, uid, controller, blockOwnerDeletion });
};

/** What a write may not do to an object's metadata. */
function checkMetadataUpdate(before: Metadata, after: Metadata): Cause[] {
  const causes: Cause[] = [];
  if (after.uid !== before.uid) {
    const cause = invalidValue('metadata.uid', after.uid, 'field is immutable');
    causes.push(cause, cause); // checked twice (common fields, then the strategy): one message
  }
  if (before.deletionTimestamp) {
    const added = (after.finalizers ?? []).filter((f) => !before.finalizers?.includes(f));
    if (added.length)
      causes.push(
        forbiddenValue(
          'metadata.finalizers',
          'no new finalizers can be added if the object is being deleted, found new finalizers ' +
            `[]string{${[...new Set(added)]
              .sort()
              .map((f) => JSON.stringify(f))
              .join(', ')}}`,
        ),
      );
  }
  return causes;
}

/** OwnerReferencesPermissionEnforcement's refusal of a blockOwnerDeletion newly set. */
function checkBlockOwnerDeletion(
  type: ResourceType,
  before: StoredObject | undefined,
  after: StoredObject,
) {
  const blocking = (object: StoredObject | undefined) =>
    (object?.metadata.ownerReferences ?? []).filter((r) => r.blockOwnerDeletion).map((r) => r.uid);
  const had = blocking(before);
  if (blocking(after).every((uid) => had.includes(uid))) return;
  const { name } = after.metadata;
  throw refusal(
    403,
    'Forbidden',
    `${type.qualified} "${name}" is forbidden: cannot set blockOwnerDeletion if an ` +
      "ownerReference refers to a resource you can't set finalizers on: , <nil>",
    detailsOf(type, name),
  );
}

/** Times as the server writes them: RFC 3339 in whole seconds. */
const timestamp = () => new Date().toISOString().replace(/\.\d+Z$/, 'Z');
// ---------------------------------------------------------------------------------------------
// The store: every object, one resourceVersion counter and one event log, as one etcd keeps them,
// and the rules every write follows whoever makes it (a request, or a test acting as a client).

/** One change, kept for watches that resume from an older resourceVersion. `before` is the object
 * as it was, so a watch with a label selector can tell "stopped matching" from "changed". */
interface StoreEvent {
  resourceVersion: number;
  type: ResourceType;
  kind: 'ADDED' | 'MODIFIED' | 'DELETED';
  object: StoredObject;
  before?: StoredObject;
}

/** An admission plugin's check of a write: throws a Refusal to refuse it. */
type Admission = (type: ResourceType, old: StoredObject | undefined, now: StoredObject) => void;

class Store {
  // resourceVersions cross a digit boundary (9999 → 10000) early, so ordering them as strings or
  // numbers would show. All resources share them, as all objects in one etcd do.
  resourceVersion = 9996;
  oldestWatchable = 0; // a watch from an older resourceVersion gets 410 Gone
  readonly history: StoreEvent[] = [];
  /** The garbage collector (kube-controller-manager's): deletes what only gone owners owned. */
  collectGarbage = false;
  private readonly objects = new Map<ResourceType, Map<string, StoredObject>>();
  private readonly managers = new Map<string, Manager[]>(); // by uid
  private collecting = false;
  private admission: Admission | undefined; // for the request being served: may refuse a write

  private readonly changed: (event: StoreEvent) => void;

  constructor(changed: (event: StoreEvent) => void) {
    this.changed = changed;
  }

  /** Runs a request's writes with an admission check (a plugin of the API server). */
  admitting<T>(admission: Admission | undefined, act: () => T): T {
    this.admission = admission;
    try {
      return act();
    } finally {
      this.admission = undefined;
    }
  }
  nextResourceVersion() {
    return String(++this.resourceVersion);
  }
  all(type: ResourceType): StoredObject[] {
    return [...(this.objects.get(type)?.values() ?? [])];
  }
  get(type: ResourceType, namespace: string, name: string): StoredObject | undefined {
    return this.objects.get(type)?.get(`${namespace}/${name}`);
  }
  mustGet(type: ResourceType, namespace: string, name: string): StoredObject {
    const object = this.get(type, namespace, name);
    if (!object) throw notFound(type, name);
    return object;
  }
  managersOf(object: StoredObject): Manager[] {
    return this.managers.get(object.metadata.uid) ?? [];
  }

  /** A new object, as `by` writes it (a manager name, or the managers an apply computed). */
  create(type: ResourceType, proposed: StoredObject, by: string | Manager[]): StoredObject {
    const { name, namespace } = proposed.metadata;
    if (this.get(type, namespace, name)) throw alreadyExists(type, name);
    const causes = checkOwnerReferences(proposed.metadata.ownerReferences);
    if (causes.length) throw invalidObject(type, name, causes);
    const { apiVersion: _, kind: __, ...fields } = proposed;
    const object = tidy({
      apiVersion: type.apiVersion,
      kind: type.kind,
      ...fields,
      metadata: {
        ...proposed.metadata,
        resourceVersion: this.nextResourceVersion(),
        uid: crypto.randomUUID(),
        creationTimestamp: timestamp(),
        generation: type === BOOKS ? 1 : undefined,
        deletionTimestamp: undefined,
        deletionGracePeriodSeconds: undefined,
      },
      status: type === BOOKS ? undefined : proposed.status, // a status subresource's is reset
    });
    const managers = typeof by === 'string' ? afterUpdate([], undefined, object, by) : by;
    this.admission?.(type, undefined, object);
    this.put(type, object, managers);
    this.record(type, 'ADDED', object);
    return object;
  }

  /**
   * Every change to a stored object goes through here. What the server keeps whatever the writer
   * sends (name, uid unless changed, creation and deletion times, generation), validation (422),
   * then, if anything changed, a new resourceVersion and a MODIFIED event; nothing at all for a
   * write that changes nothing. An object being deleted goes once its last finalizer does.
   */
  write(type: ResourceType, before: StoredObject, proposed: StoredObject, by: string | Manager[]) {
    const m = before.metadata;
    const metadata: Metadata = {
      ...proposed.metadata,
      name: m.name,
      namespace: m.namespace,
      uid: proposed.metadata.uid || m.uid,
      resourceVersion: m.resourceVersion,
      creationTimestamp: m.creationTimestamp,
      generation: m.generation,
      deletionTimestamp: m.deletionTimestamp,
      deletionGracePeriodSeconds: m.deletionGracePeriodSeconds,
      managedFields: undefined,
    };
    const causes = [
      ...checkMetadataUpdate(m, metadata),
      ...checkOwnerReferences(metadata.ownerReferences),
    ];
    if (causes.length) throw invalidObject(type, m.name, causes);
    const object = tidy({
      ...proposed,
      apiVersion: before.apiVersion,
      kind: before.kind,
      metadata,
    });
    if (type === BOOKS && !isDeepStrictEqual(plain(object.spec), plain(before.spec)))
      object.metadata.generation = (m.generation ?? 0) + 1;
    const managers =
      typeof by === 'string' ? afterUpdate(this.managersOf(before), before, object, by) : by;
    const unchanged =
      isDeepStrictEqual(
        object,
        tidy({ ...before, metadata: { ...m, managedFields: undefined } }),
      ) && isDeepStrictEqual(managers, this.managersOf(before));
    if (unchanged) return before; // the real server writes nothing for a no-op
    this.admission?.(type, before, object);
    if (metadata.deletionTimestamp && !metadata.finalizers?.length) {
      this.erase(type, before); // the DELETED event carries the object as it was stored
      return object;
    }
    object.metadata.resourceVersion = this.nextResourceVersion();
    this.put(type, object, managers);
    this.record(type, 'MODIFIED', object, before);
    return object;
  }

  /**
   * DELETE: an object with finalizers only gets a deletionTimestamp (a MODIFIED event) and stays
   * until they are gone; one without goes at once (a DELETED event). Returns what the server
   * answers with: the object kept, or undefined (gone).
   */
  delete(type: ResourceType, namespace: string, name: string): StoredObject | undefined {
    const before = this.mustGet(type, namespace, name);
    if (!before.metadata.finalizers?.length) {
      this.erase(type, before);
      return undefined;
    }
    if (before.metadata.deletionTimestamp) return before;
    const metadata = { ...before.metadata, deletionTimestamp: timestamp() };
    const object = { ...before, metadata: { ...metadata, deletionGracePeriodSeconds: 0 } };
    object.metadata.resourceVersion = this.nextResourceVersion();
    this.put(type, object, this.managersOf(before));
    this.record(type, 'MODIFIED', object, before);
    return object;
  }

  private erase(type: ResourceType, before: StoredObject) {
    const { namespace, name, uid } = before.metadata;
    this.objects.get(type)?.delete(`${namespace}/${name}`);
    this.managers.delete(uid);
    const object = {
      ...before,
      metadata: { ...before.metadata, resourceVersion: this.nextResourceVersion() },
    };
    this.record(type, 'DELETED', object);
  }

  private put(type: ResourceType, object: StoredObject, managers: Manager[]) {
    if (!this.objects.has(type)) this.objects.set(type, new Map());
    this.managers.set(object.metadata.uid, managers);
    if (type.showManagedFields)
      object.metadata.managedFields = managedFields(managers, type.apiVersion, object);
    const { namespace, name } = object.metadata;
    this.objects.get(type)?.set(`${namespace}/${name}`, object);
  }

  private record(
    type: ResourceType,
    kind: StoreEvent['kind'],
    object: StoredObject,
    before?: StoredObject,
  ) {
    const resourceVersion = Number(object.metadata.resourceVersion);
    this.history.push({ resourceVersion, type, kind, object, before });
    this.changed(this.history.at(-1) as StoreEvent);
    if (this.collectGarbage) this.collect();
  }

  /**
   * The garbage collector, in the background deletion it does by default: every object whose
   * owner references all name uids that no longer exist is deleted (the finalizer rule applies).
   */
  collect() {
    if (this.collecting) return;
    this.collecting = true;
    try {
      for (let again = true; again; ) {
        again = false;
        const all = [...this.objects.values()].flatMap((objects) => [...objects.values()]);
        const alive = new Set(all.map((object) => object.metadata.uid));
        for (const [type, objects] of this.objects)
          for (const object of [...objects.values()]) {
            const refs = object.metadata.ownerReferences ?? [];
            if (!refs.length || object.metadata.deletionTimestamp) continue;
            if (refs.some((ref) => alive.has(ref.uid))) continue;
            this.delete(type, object.metadata.namespace, object.metadata.name);
            again = true;
          }
      }
    } finally {
      this.collecting = false;
    }
  }
}

/** An object as the server stores it: no undefined fields, no empty metadata maps or lists. */
function tidy(object: StoredObject): StoredObject {
  const result = plain(object);
  const metadata = result.metadata as unknown as Record<string, unknown>;
  for (const key of ['labels', 'annotations', 'ownerReferences', 'finalizers', 'managedFields']) {
    const value = metadata[key];
    if ((Array.isArray(value) || isObject(value)) && Object.keys(value).length === 0)
      delete metadata[key];
  }
  // A Secret's stringData is write-only: stored base64-encoded in data, and the type defaults.
  if (result.kind === 'Secret') {
    const { stringData } = result;
    const encoded = Object.entries(isObject(stringData) ? stringData : {}).map(
      ([key, value]) => [key, Buffer.from(String(value)).toString('base64')] as const,
    );
    result.data = { ...(isObject(result.data) ? result.data : {}), ...Object.fromEntries(encoded) };
    delete result.stringData;
    result.type ??= 'Opaque';
  }
  for (const key of ['data', 'binaryData'])
    if (isObject(result[key]) && Object.keys(result[key]).length === 0) delete result[key];
  return result;
}

// ---------------------------------------------------------------------------------------------
// Lists and watches, of any resource: pages, continue tokens, watch streams cut at any byte,
// bookmarks, 410 Gone, streaming lists; most of the knobs (above) are read here.

const CONTINUE_EXPIRED =
  'The provided continue parameter is too old to display a consistent list result. ' +
  'You can start a new list without the continue parameter, or use the continue token in this ' +
  'response to retrieve the remainder of the results. Continuing with the provided token results ' +
  'in an inconsistent list - objects that were created, modified, or deleted between the time ' +
  'the first chunk was returned and now may show up in the list.';
const END_OF_INITIAL_EVENTS = { 'k8s.io/initial-events-end': 'true' };

const eventLine = (type: string, object: unknown) => `${JSON.stringify({ type, object })}\n`;

function bookmarkLine(type: ResourceType, resourceVersion: number, annotations?: Labels) {
  const metadata = {
    resourceVersion: String(resourceVersion),
    ...(annotations && { annotations }),
  };
  return eventLine('BOOKMARK', { kind: type.kind, apiVersion: type.apiVersion, metadata });
}

const visible = (object: StoredObject, namespace: string | undefined, selector: Selector) =>
  (!namespace || object.metadata.namespace === namespace) && selector(object.metadata.labels ?? {});

/**
 * The line a watch gets for a change, or '' for none. Through a label selector, a change that
 * makes an object stop matching arrives as DELETED, one that makes it start matching as ADDED.
 */
function lineFor(watch: OpenWatch | undefined, event: StoreEvent): string {
  if (!watch || watch.type !== event.type) return '';
  const matches = (object: StoredObject) => visible(object, watch.namespace, watch.selector);
  if (event.kind === 'DELETED')
    return matches(event.object) ? eventLine('DELETED', event.object) : '';
  const was = event.before !== undefined && matches(event.before);
  if (matches(event.object)) return eventLine(was ? 'MODIFIED' : 'ADDED', event.object);
  if (!was || !event.before) return '';
  // The object as the watch last matched it, at the resourceVersion of the change.
  const { before } = event;
  const resourceVersion = event.object.metadata.resourceVersion;
  return eventLine('DELETED', { ...before, metadata: { ...before.metadata, resourceVersion } });
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
      return (
        `unable to parse requirement: found '${term}', ` +
        "expected: ',', '=', '!=', 'in', 'notin' or end of string"
      );
    }
  }
  return (labels) => tests.every((test) => test(labels));
}

/** One open watch stream: what it watches, and how to write to it or end it. */
interface OpenWatch {
  type: ResourceType;
  namespace: string | undefined;
  selector: Selector;
  bookmarks: boolean;
  send(text: string): void;
  end(): void;
  drop(): void;
}

class Streams {
  readonly watches = new Set<OpenWatch>();
  held: (() => void)[] | undefined; // watch requests waiting for release()
  initialEventsFault: Record<string, unknown> | undefined; // ends the next streaming list
  private readonly continueTokens = new Map<string, StoredObject[]>(); // token → rest of a list
  private issuedTokens = 0;
  private readonly store: Store;
  private readonly knobs: Knobs;
  private readonly onActivity: () => void;

  constructor(store: Store, knobs: Knobs, onActivity: () => void) {
    this.store = store;
    this.knobs = knobs;
    this.onActivity = onActivity;
  }

  async listOrWatch(
    type: ResourceType,
    verb: 'list' | 'watch',
    namespace: string | undefined,
    query: Record<string, string>,
  ): Promise<Response> {
    if (type === BOOKS && this.knobs.storageInitializing > 0) {
      this.knobs.storageInitializing--;
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
    if (verb === 'list' && this.knobs.neverAnswerLists) await new Promise(() => {});
    if (verb === 'list') return this.list(type, namespace, selector, query);
    const invalid = this.checkWatchOptions(query);
    if (invalid) return HttpResponse.json(invalid, { status: 422 });
    if (this.held) await new Promise<void>((resolve) => this.held?.push(resolve));
    return this.watch(type, namespace, selector, query);
  }

  private list(
    type: ResourceType,
    namespace: string | undefined,
    selector: Selector,
    query: Record<string, string>,
  ): Response {
    const matching = () =>
      this.store.all(type).filter((object) => visible(object, namespace, selector));
    let items = matching();
    if (query.continue) {
      const rest = this.knobs.expireNextContinueToken
        ? undefined
        : this.continueTokens.get(query.continue);
      this.knobs.expireNextContinueToken = false;
      if (!rest) {
        // The real 410 carries a token to go on with, inconsistently; a careful client relists.
        const inconsistent = `inconsistent-${query.continue}`;
        this.continueTokens.set(inconsistent, matching());
        return HttpResponse.json(
          {
            ...status(410, 'Expired', CONTINUE_EXPIRED),
            metadata: { continue: inconsistent },
          },
          { status: 410 },
        );
      }
      items = rest;
    }
    const limit = Number(query.limit) || items.length;
    const metadata: { resourceVersion: string; continue?: string; remainingItemCount?: number } = {
      resourceVersion: String(this.store.resourceVersion),
    };
    if (items.length > limit) {
      metadata.continue = `token-${this.issuedTokens++}`;
      metadata.remainingItemCount = items.length - limit;
      this.continueTokens.set(metadata.continue, items.slice(limit));
    }
    return HttpResponse.json({
      apiVersion: type.apiVersion,
      kind: `${type.kind}List`,
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
    if (query.sendInitialEvents === 'true' && !this.knobs.watchList) {
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
    return status(
      422,
      'Invalid',
      `ListOptions.meta.k8s.io "" is invalid: ${each.length > 1 ? `[${each.join(', ')}]` : each}`,
      {
        group: 'meta.k8s.io',
        kind: 'ListOptions',
        causes: causes.map((cause) => ({ reason: 'FieldValueForbidden', ...cause })),
      },
    );
  }

  private watch(
    type: ResourceType,
    namespace: string | undefined,
    selector: Selector,
    query: Record<string, string>,
  ): Response {
    const streamingList = query.sendInitialEvents === 'true';
    // No resourceVersion (or "0"): start from the current state, sent as ADDED events.
    const fromNow = streamingList || !query.resourceVersion || query.resourceVersion === '0';
    const from = fromNow ? this.store.resourceVersion : Number(query.resourceVersion);
    const oldest = this.store.oldestWatchable;
    if (!fromNow && (from < oldest || this.knobs.goneForever)) {
      const gone = status(410, 'Expired', `too old resource version: ${from} (${oldest})`);
      if (this.knobs.goneAsHttp) return HttpResponse.json(gone, { status: 410 });
      return new Response(eventLine('ERROR', gone));
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
          type,
          namespace,
          selector,
          bookmarks: query.allowWatchBookmarks === 'true',
          send: (text) => {
            const bytes = encoder.encode(text);
            for (let at = 0; at < bytes.length; at += this.knobs.chunkBytes)
              stream.enqueue(bytes.slice(at, at + this.knobs.chunkBytes));
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
        if (this.knobs.stallWatches) return;
        if (this.knobs.endWatchesAtOnce) return stream.close();
        let replay: string[];
        if (fromNow) {
          replay = this.store
            .all(type)
            .filter((object) => visible(object, namespace, selector))
            .map((object) => eventLine('ADDED', object));
          // The initial state is complete: a bookmark at the snapshot's resourceVersion says so
          // (to a client that asked for bookmarks), or a fault a test queued ends the stream.
          const fault = streamingList && type === BOOKS ? this.initialEventsFault : undefined;
          if (fault) this.initialEventsFault = undefined;
          const early = streamingList && this.knobs.endInitialEventsEarly;
          if (fault) replay.push(eventLine('ERROR', fault));
          else if (streamingList && watch.bookmarks && !early)
            replay.push(bookmarkLine(type, this.store.resourceVersion, END_OF_INITIAL_EVENTS));
          if (fault || early) {
            watch.send(replay.join(''));
            return stream.close();
          }
        } else {
          replay = this.store.history
            .filter((event) => event.resourceVersion > from)
            .map((event) => lineFor(watch, event));
        }
        watch.send(replay.join(''));
        watches.add(watch);
        this.onActivity();
        // Without timeoutSeconds, kube-apiserver's --min-request-timeout: 30 minutes (and up
        // to as much again, at random).
        const seconds = query.timeoutSeconds ? Number(query.timeoutSeconds) : 1800;
        timer = setTimeout(watch.end, seconds * 1000);
      },
      cancel: forget, // the client went away
    });
    return new Response(body, { headers: { 'Content-Type': 'application/json' } });
  }

  /** A change, to every open watch it concerns. */
  broadcast(event: StoreEvent) {
    for (const watch of this.watches) watch.send(lineFor(watch, event));
    this.onActivity();
  }
}

// ---------------------------------------------------------------------------------------------
// The handlers: what a request meets. ApiServer is the API server proper: the state a cluster
// keeps (the store, the watches, the Leases, the request log) and msw's handlers, each request
// routed to one. Nothing here is for a test to call: FakeApiServer, below, is.

type Subresource = 'status' | undefined;

/** Which verb a request is, from its method, whether it names an object, and its query. */
function verbOf(
  method: string,
  name: string | undefined,
  query: URLSearchParams,
  contentType: string | undefined,
): Verb | undefined {
  if (method === 'GET') return name ? 'get' : query.get('watch') === 'true' ? 'watch' : 'list';
  if (method === 'POST') return name ? undefined : 'create';
  if (!name) return undefined;
  if (method === 'PUT') return 'update';
  if (method === 'DELETE') return 'delete';
  if (method !== 'PATCH') return undefined;
  return contentType === 'application/apply-patch+yaml' ? 'apply' : 'patch';
}

/** A custom resource with a status subresource: writes to /status change only status, writes to
 * the object never change status. */
function scoped(
  type: ResourceType,
  before: StoredObject,
  proposed: StoredObject,
  subresource?: Subresource,
): StoredObject {
  if (type !== BOOKS) return proposed;
  if (subresource === 'status') return { ...before, status: proposed.status };
  return { ...proposed, status: before.status };
}

const leaseDetails = (name: string) => ({ name, group: 'coordination.k8s.io', kind: 'leases' });
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
        `parsing time ${JSON.stringify(value)} as "2006-01-02T15:04:05.000000Z07:00": ` +
          `cannot parse as MicroTime (spec.${field})`,
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

/** The API server proper: its state, and what it does with each request. */
class ApiServer {
  /** How it differs from a healthy server, as a test sets it: see Knobs. */
  readonly knobs: Knobs = defaultKnobs();
  protected readonly store: Store = new Store((event) => this.streams.broadcast(event));
  protected readonly streams = new Streams(this.store, this.knobs, () => this.onActivity());
  protected readonly leases = new Map<string, StoredLease>(); // by namespace/name
  protected readonly faults: { match: FaultOptions; response: () => Response }[] = [];
  /** Every request it received, in order, as a test reads them back (see ApiRequest). */
  readonly requests: ApiRequest[] = [];
  /** The bearer tokens it accepts; anything else gets 401. One per controller tells them apart. */
  readonly tokens = new Set([TOKEN]);

  /** Called on every request and every change: tests wait on it instead of sleeping. */
  onActivity: () => void;

  private readonly handlers = [
    ...this.routes(BOOKS, `/apis/${GROUP_VERSION}`, true),
    ...OWNED_TYPES.flatMap((type) => this.routes(type, basePath(type))),
    ...this.routes(CORE_EVENTS, '/api/v1'),
    ...this.routes(EVENTS, `/apis/${EVENTS.apiVersion}`),
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
  protected readonly tls = https.createServer(
    { key: SERVER_KEY, cert: SERVER_CERT },
    (req, res) => {
      // A client may hang up at any time, even while sending its body: that ends this request only.
      req.on('error', () => res.destroy());
      this.bridge(req, res).catch(() => res.destroy());
    },
  );
  url = '';

  constructor(options: { onActivity?: () => void } = {}) {
    this.onActivity = options.onActivity ?? (() => {});
  }

  /** Serves a node:https request with msw's handlers, streaming the response body in chunks. */
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
      res.destroy(); // the stream failed: drop the connection, as a crashing server does
    }
  }

  // ------------------------------------------------------------------------------------------
  // Requests: logged, authenticated, given a queued fault, then routed by method and path.

  /**
   * What every request goes through first: it is logged, then checked for the bearer token, then
   * given the next fault a test queued for it, if any. A response here ends the request.
   * Synchronous from here to the answer (or to a wait a knob asks for), so that a test reacting to
   * the request's activity cannot change the knobs under it.
   */
  private admit(
    request: Request,
    entry: Pick<ApiRequest, 'verb' | 'resource' | 'namespace' | 'name'>,
    text = '',
  ): Response | ApiRequest {
    const token = (request.headers.get('authorization') ?? '').replace(/^Bearer /, '');
    const url = new URL(request.url);
    const logged: ApiRequest = {
      ...entry,
      method: request.method,
      path: url.pathname,
      query: Object.fromEntries(url.searchParams),
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
        (!match.resource || match.resource === logged.resource) &&
        (!match.name || match.name === logged.name),
    );
    if (fault >= 0 && this.faults[fault]?.match.always) return this.faults[fault].response();
    if (fault >= 0) return this.faults.splice(fault, 1)[0]?.response() ?? Response.error();
    if (notJson)
      return statusResponse(
        400,
        'BadRequest',
        `the body of the request is not JSON: ${notJson.slice(0, 60)}`,
      );
    return logged;
  }

  /** The endpoints of a resource: its collections (one namespace, all) and each object. */
  private routes(type: ResourceType, base: string, withStatus = false) {
    const some = `*${base}/namespaces/:namespace/${type.resource}`;
    const to =
      (subresource?: Subresource) =>
      ({ request, params }: { request: Request; params: PathParams }) =>
        this.serve(request, type, params.namespace, params.name, subresource);
    return [
      http.get(`*${base}/${type.resource}`, to()),
      http.all(some, to()),
      http.all(`${some}/:name`, to()),
      ...(withStatus ? [http.all(`${some}/:name/status`, to('status'))] : []),
    ];
  }

  private async serve(
    request: Request,
    type: ResourceType,
    namespaceParam: PathParams[string],
    nameParam: PathParams[string],
    subresource: Subresource,
  ): Promise<Response> {
    const namespace = namespaceParam === undefined ? undefined : String(namespaceParam);
    const name = nameParam === undefined ? undefined : String(nameParam);
    const query = new URL(request.url).searchParams;
    const contentType = request.headers.get('content-type')?.split(';')[0]?.trim();
    const verb = verbOf(request.method, name, query, contentType);
    if (!verb)
      return statusResponse(
        405,
        'MethodNotAllowed',
        'the server does not allow this method on the requested resource',
      );
    const resource = (subresource ? `${type.resource}/${subresource}` : type.resource) as Resource;
    const text = request.method === 'GET' ? '' : await request.text();
    const admitted = this.admit(request, { verb, resource, namespace, name }, text);
    if (admitted instanceof Response) return admitted;
    const writesStatus = resource === `${PLURAL}/status` && verb !== 'get';
    if (writesStatus && this.knobs.statusLatencyMs) await sleep(this.knobs.statusLatencyMs);
    const refused = type === BOOKS ? this.refuseBooks(verb, namespace, name, resource) : undefined;
    if (refused) return refused;
    if (verb === 'list' || verb === 'watch')
      return this.streams.listOrWatch(type, verb, namespace, admitted.query);
    try {
      // Who owns what this write sets: ?fieldManager=, else the User-Agent up to its first '/'.
      const agent = request.headers.get('user-agent')?.split('/')[0];
      const manager = admitted.query.fieldManager || agent || 'unknown';
      const admission = this.knobs.refuseBlockOwnerDeletion ? checkBlockOwnerDeletion : undefined;
      const [object, code = 200] = this.store.admitting(admission, () =>
        this.act(type, verb, admitted, subresource, manager),
      );
      if (writesStatus && this.knobs.statusAnswerDelayMs)
        await sleep(this.knobs.statusAnswerDelayMs);
      return HttpResponse.json(object, { status: code });
    } catch (err) {
      if (err instanceof Refusal) return err.response();
      throw err;
    }
  }

  /**
   * 404 when the CRD is missing, 403 when the user may not: the same for every books endpoint.
   * A missing CRD is no Status: the real server answers its unknown paths in plain text.
   */
  private refuseBooks(
    verb: Verb,
    namespace: string | undefined,
    name?: string,
    resource: Resource = PLURAL,
  ): Response | undefined {
    if (!this.knobs.crdInstalled)
      return new Response('404 page not found\n', {
        status: 404,
        headers: { 'Content-Type': 'text/plain; charset=utf-8' },
      });
    const forbidden =
      resource === `${PLURAL}/status` ? this.knobs.forbidStatus : this.knobs.forbidden;
    if (!forbidden) return undefined;
    const where = namespace ? ` in the namespace "${namespace}"` : ' at the cluster scope';
    return statusResponse(
      403,
      'Forbidden',
      `${BOOKS.qualified}${name ? ` "${name}"` : ''} is forbidden: ` +
        `User "system:serviceaccount:default:reader" cannot ${verb} resource "${resource}" ` +
        `in API group "${GROUP}"${where}`,
      { ...(name && { name }), group: GROUP, kind: PLURAL },
    );
  }

  // ------------------------------------------------------------------------------------------
  // Reads and writes of one object: get, create, update, patch, apply, delete.

  /** One request on one object (or a create): what to answer, and its HTTP status. */
  private act(
    type: ResourceType,
    verb: Verb,
    request: ApiRequest,
    subresource: Subresource,
    manager: string,
  ): [object, number?] {
    const namespace = request.namespace ?? '';
    const name = request.name ?? '';
    const body = request.body;
    if (verb === 'create') return [this.createObject(type, namespace, request, manager), 201];
    if (verb === 'get') return [this.store.mustGet(type, namespace, name)];
    if (verb === 'delete') return [this.deleteObject(type, namespace, name, body)];
    if (!isObject(body) && verb !== 'patch') throw badRequest('the body is not a JSON object');
    const before = this.store.get(type, namespace, name);
    if (verb === 'apply') {
      const applied = this.applyObject(type, namespace, name, before, request);
      return [applied, before ? 200 : 201];
    }
    if (!before) throw notFound(type, name);
    const proposed =
      verb === 'update'
        ? this.checkUpdate(type, before, body as Record<string, unknown>)
        : this.patchObject(type, before, request);
    const rv = proposed.metadata.resourceVersion;
    if (rv !== undefined && rv !== before.metadata.resourceVersion)
      throw conflict(type.qualified, name, detailsOf(type, name));
    return [this.store.write(type, before, scoped(type, before, proposed, subresource), manager)];
  }

  /** POST: name (or generateName) required, the namespace the URL's. */
  private createObject(
    type: ResourceType,
    namespace: string,
    request: ApiRequest,
    manager: string,
  ) {
    const body = request.body;
    if (!isObject(body)) throw badRequest('the body is not a JSON object');
    const metadata = isObject(body.metadata) ? body.metadata : {};
    const generated =
      typeof metadata.generateName === 'string'
        ? `${metadata.generateName}${Math.random().toString(36).slice(2, 7)}`
        : undefined;
    const name = typeof metadata.name === 'string' && metadata.name ? metadata.name : generated;
    if (!name)
      throw invalidObject(type, '', [
        requiredValue('metadata.name', 'name or generateName is required'),
      ]);
    if (metadata.namespace !== undefined && metadata.namespace !== namespace)
      throw badRequest(
        'the namespace of the provided object does not match the namespace sent on the request',
      );
    request.name = name;
    const object = { ...body, metadata: { ...metadata, name, namespace } } as StoredObject;
    return this.store.create(type, object, manager);
  }

  /**
   * PUT: the whole object. Its name must be the URL's; a uid is a precondition (409 when another
   * object now has the name); a custom resource needs a resourceVersion (422 without).
   */
  private checkUpdate(type: ResourceType, before: StoredObject, body: Record<string, unknown>) {
    const { name, uid, namespace } = before.metadata;
    const metadata = isObject(body.metadata) ? body.metadata : {};
    if (metadata.name !== name) throw nameMismatch(metadata.name, name);
    if (metadata.uid && metadata.uid !== uid) {
      const group = type.group ? `${type.group}/` : '';
      const key = `/registry/${group}${type.resource}/${namespace}/${name}`;
      throw conflict(
        type.qualified,
        name,
        detailsOf(type, name),
        `StorageError: invalid object, Code: 4, Key: ${key}, ResourceVersion: 0, ` +
          `AdditionalErrorMsg: Precondition failed: UID in precondition: ${metadata.uid}, ` +
          `UID in object meta: ${uid}`,
      );
    }
    if (!metadata.resourceVersion && !type.unconditionalUpdate)
      throw invalidObject(type, name, [
        invalidValue('metadata.resourceVersion', 0, 'must be specified for an update'),
      ]);
    return body as StoredObject;
  }

  /** PATCH: a JSON merge patch, a JSON patch, or (not for custom resources) a strategic merge
   * patch, here merged as a JSON merge patch. `force` belongs to apply only. */
  private patchObject(type: ResourceType, before: StoredObject, request: ApiRequest): StoredObject {
    if (request.query.force !== undefined)
      throw invalid('meta.k8s.io', 'PatchOptions.meta.k8s.io', '', [
        forbiddenValue('force', 'may not be specified for non-apply patch'),
      ]);
    const how = request.contentType?.split(';')[0]?.trim();
    let patched: unknown;
    if (
      how === 'application/merge-patch+json' ||
      (how === 'application/strategic-merge-patch+json' && type !== BOOKS)
    ) {
      if (!isObject(request.body)) throw badRequest('the merge patch is not a JSON object');
      patched = mergePatch(before, request.body);
    } else if (how === 'application/json-patch+json') {
      if (!Array.isArray(request.body))
        throw badRequest(
          'error decoding patch: json: cannot unmarshal object into Go value of type ' +
            '[]handlers.jsonPatchOp',
        );
      try {
        patched = jsonPatch(before, request.body);
      } catch {
        throw patchFailed();
      }
    } else {
      throw refusal(415, 'UnsupportedMediaType', '415: Unsupported Media Type', {});
    }
    if (!isObject(patched) || !isObject(patched.metadata))
      throw badRequest('the patched object has no metadata');
    return patched as StoredObject;
  }

  /**
   * Server-side apply: `?fieldManager=` required (422), creates the object if missing, merges
   * field by field with ownership (409 Conflict unless `?force=true`); a no-op writes nothing.
   */
  private applyObject(
    type: ResourceType,
    namespace: string,
    name: string,
    before: StoredObject | undefined,
    request: ApiRequest,
  ): StoredObject {
    const manager = request.query.fieldManager;
    if (!manager)
      throw invalid('meta.k8s.io', 'PatchOptions.meta.k8s.io', '', [
        requiredValue('fieldManager', 'is required for apply patch'),
      ]);
    const body = request.body as Record<string, unknown>;
    if (!body.kind) throw badRequest(`Object 'Kind' is missing in '${JSON.stringify(body)}'`);
    const metadata = isObject(body.metadata) ? body.metadata : {};
    if (metadata.name !== undefined && metadata.name !== name)
      throw nameMismatch(metadata.name, name);
    // A resourceVersion is a precondition on an object that exists ("0": none); one that does not
    // is created, whatever it says (as kube-apiserver 1.37 does for ConfigMaps and custom
    // resources).
    const rv = metadata.resourceVersion;
    if (before && rv && rv !== '0' && rv !== before.metadata.resourceVersion)
      throw conflict(type.qualified, name, detailsOf(type, name));
    const current = before ?? ({ metadata: { name, namespace } } as StoredObject);
    const managers = before ? this.store.managersOf(before) : [];
    const force = request.query.force === 'true';
    const result = apply(type, current, managers, body, manager, force);
    if (!before) return this.store.create(type, result.object, result.managers);
    return this.store.write(type, before, scoped(type, before, result.object), result.managers);
  }

  /** DELETE: preconditions in the body's DeleteOptions; finalizers hold the object (see Store). */
  private deleteObject(type: ResourceType, namespace: string, name: string, options: unknown) {
    const before = this.store.mustGet(type, namespace, name);
    const preconditions =
      isObject(options) && isObject(options.preconditions) ? options.preconditions : {};
    const why = {
      uid: 'The object might have been deleted and then recreated',
      resourceVersion: 'The object might have been modified',
    };
    for (const [field, label] of [
      ['uid', 'UID'],
      ['resourceVersion', 'ResourceVersion'],
    ] as const) {
      const wanted = preconditions[field];
      if (wanted && wanted !== before.metadata[field])
        throw conflict(
          type.qualifiedKind, // as its early check names it: ConfigMap, Book.example.…
          name,
          { name, ...(type.group && { group: type.group }), kind: type.kind },
          `the ${label} in the precondition (${String(wanted)}) does not match the ${label} in ` +
            `record (${before.metadata[field]}). ${why[field]}`,
        );
    }
    const kept = this.store.delete(type, namespace, name);
    if (kept) return kept;
    const details = { ...detailsOf(type, name), uid: before.metadata.uid };
    return { kind: 'Status', apiVersion: 'v1', metadata: {}, status: 'Success', details };
  }

  // ------------------------------------------------------------------------------------------
  // Leases (coordination.k8s.io/v1), for leader election: optimistic concurrency.

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
    return HttpResponse.json(this.writeLease(name, spec, namespace), { status: 201 });
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
      return invalid('coordination.k8s.io', 'Lease.coordination.k8s.io', name, [
        invalidValue('metadata.resourceVersion', 0, 'must be specified for an update'),
      ]).response();
    }
    if (this.knobs.refuseLeaseUpdatesFrom.has(checked.spec.holderIdentity ?? '')) {
      return statusResponse(
        500,
        'InternalError',
        'Internal error occurred: etcdserver: request timed out',
      );
    }
    const before = this.leases.get(`${namespace}/${name}`);
    if (!before) return leaseNotFound(name);
    // Optimistic concurrency: an update based on an older read loses, and must read again.
    if (checked.resourceVersion !== before.metadata.resourceVersion)
      return conflict('leases.coordination.k8s.io', name, leaseDetails(name)).response();
    const lease = this.writeLease(name, checked.spec, namespace);
    const delay = this.knobs.delayNextLeaseUpdateMs;
    this.knobs.delayNextLeaseUpdateMs = 0;
    if (delay) await sleep(delay); // written already: only the answer is slow
    return HttpResponse.json(lease);
  }

  /** A Lease written, created if missing: by a request, or by a test's putLease. */
  protected writeLease(name: string, spec: LeaseSpec, namespace: string): StoredLease {
    const before = this.leases.get(`${namespace}/${name}`);
    const lease: StoredLease = {
      apiVersion: 'coordination.k8s.io/v1',
      kind: 'Lease',
      metadata: {
        name,
        namespace,
        resourceVersion: this.store.nextResourceVersion(),
        uid: before?.metadata.uid ?? crypto.randomUUID(),
        creationTimestamp: before?.metadata.creationTimestamp ?? timestamp(),
      },
      spec,
    };
    this.leases.set(`${namespace}/${name}`, lease);
    this.onActivity();
    return lease;
  }
}

// ---------------------------------------------------------------------------------------------
// The test controls: what a test calls. FakeApiServer serves ApiServer's handlers on loopback
// TLS, and does to the cluster what a test asks, as another client would; it queues faults, and
// it tells what the server received and holds.

/**
 * The fake API server a test starts, `await new FakeApiServer({ onActivity }).listen()`, and
 * ends with close(). Its requests go to ApiServer's handlers; its methods are the test's.
 */
export class FakeApiServer extends ApiServer {
  /**
   * kube-controller-manager's garbage collector: off, as in a bare API server. Not a knob: another
   * component, which, turned on, collects at once what gone owners left, then after every change.
   */
  get collectGarbage() {
    return this.store.collectGarbage;
  }
  set collectGarbage(on: boolean) {
    this.store.collectGarbage = on;
    if (on) this.store.collect();
  }

  // Its life: listening on a port of its own, an outage, the end.

  async listen(host = '127.0.0.1'): Promise<this> {
    await new Promise<void>((resolve) => this.tls.listen(0, host, resolve));
    const address = this.tls.address();
    this.url = `https://${host}:${typeof address === 'object' && address ? address.port : 0}`;
    return this;
  }

  /**
   * An outage: for `ms` the server refuses connections (ECONNREFUSED) and drops the ones it has,
   * then listens again on the same port.
   */
  async refuseConnections(ms: number) {
    const port = Number(new URL(this.url).port);
    const host = new URL(this.url).hostname;
    for (const watch of this.streams.watches) watch.drop();
    this.tls.closeAllConnections();
    await new Promise<void>((resolve) => this.tls.close(() => resolve()));
    await sleep(ms);
    await new Promise<void>((resolve) => this.tls.listen(port, host, resolve));
  }

  close() {
    this.release();
    for (const watch of this.streams.watches) watch.end();
    this.tls.closeAllConnections();
    this.tls.close();
  }

  // ------------------------------------------------------------------------------------------
  // What a test does to the cluster, as another client would: books.

  create(name: string, spec: Spec, namespace = 'default', labels?: Labels): StoredBook {
    const metadata = { name, namespace, ...(labels && { labels }) } as Metadata;
    const book = { apiVersion: GROUP_VERSION, kind: KIND, metadata, spec };
    return this.store.create(BOOKS, book, 'kubectl-create') as StoredBook;
  }
  /** A new spec: generation +1 (unless the spec is unchanged: then no write at all). */
  update(name: string, spec: Spec, namespace = 'default') {
    this.change(name, namespace, (book) => ({ ...book, spec }));
  }
  /** New labels (replacing the old): a metadata-only change, so the generation stays. */
  label(name: string, labels: Labels, namespace = 'default') {
    this.change(name, namespace, (book) => ({ ...book, metadata: { ...book.metadata, labels } }));
  }
  /**
   * `kubectl delete book`: gone at once (DELETED), or, while it has finalizers, marked with a
   * deletionTimestamp (MODIFIED) until the last one is removed. Returns whether it is gone.
   */
  remove(name: string, namespace = 'default'): boolean {
    this.mustGet(name, namespace);
    return this.store.delete(BOOKS, namespace, name) === undefined;
  }
  /** Deleted and created again under the same name: a new uid, generation 1, no status. */
  recreate(name: string, spec?: Spec, namespace = 'default'): StoredBook {
    const before = this.mustGet(name, namespace);
    if (!this.remove(name, namespace))
      throw new Error(`the book ${namespace}/${name} has finalizers: it is not gone`);
    return this.create(name, spec ?? before.spec, namespace, before.metadata.labels);
  }
  /**
   * Sets a book's finalizers as another client would (a merge patch): none may be added while it is
   * being deleted (throws the server's 422 message); removing the last one of a book being deleted
   * deletes it.
   */
  setFinalizers(name: string, finalizers: string[], namespace = 'default') {
    this.change(name, namespace, (book) => ({
      ...book,
      metadata: { ...book.metadata, finalizers },
    }));
  }
  /** The book as stored now (a copy), to assert on its status. */
  get(name: string, namespace = 'default'): StoredBook | undefined {
    const book = this.store.get(BOOKS, namespace, name);
    return book && (structuredClone(book) as StoredBook);
  }
  finalizers(name: string, namespace = 'default'): string[] {
    return [...(this.mustGet(name, namespace).metadata.finalizers ?? [])];
  }
  /** When the book was deleted, if it is being deleted (held by finalizers). */
  deletionTimestamp(name: string, namespace = 'default'): string | undefined {
    return this.store.get(BOOKS, namespace, name)?.metadata.deletionTimestamp;
  }
  private mustGet(name: string, namespace: string): StoredBook {
    const book = this.store.get(BOOKS, namespace, name);
    if (!book) throw new Error(`the fake has no book ${namespace}/${name}`);
    return book as StoredBook;
  }
  private change(name: string, namespace: string, edit: (book: StoredBook) => StoredBook) {
    const before = this.mustGet(name, namespace);
    this.store.write(BOOKS, before, edit(structuredClone(before)), 'kubectl-edit');
  }

  // ConfigMaps and Events.

  /** The ConfigMap as stored now (a copy), managedFields included. */
  configMap(namespace: string, name: string): StoredConfigMap | undefined {
    const configMap = this.store.get(CONFIGMAPS, namespace, name);
    return configMap && (structuredClone(configMap) as StoredConfigMap);
  }
  /** A Secret as stored now (a copy): its data base64-encoded, as the real server keeps it. */
  secret(namespace: string, name: string): StoredObject | undefined {
    const secret = this.store.get(SECRETS, namespace, name);
    return secret && structuredClone(secret);
  }
  configMaps(namespace?: string): StoredConfigMap[] {
    return this.store
      .all(CONFIGMAPS)
      .filter((c) => !namespace || c.metadata.namespace === namespace)
      .map((c) => structuredClone(c) as StoredConfigMap);
  }
  /**
   * Creates or replaces a ConfigMap as another client would (an Update by `manager`, who then owns
   * the fields it changed). Throws the server's message when it refuses (say, two controllers).
   */
  putConfigMap(
    configMap: { metadata: Partial<Metadata> & { name: string }; data?: Record<string, string> },
    manager = 'kubectl',
  ): StoredConfigMap {
    const namespace = configMap.metadata.namespace ?? 'default';
    const proposed = {
      apiVersion: 'v1',
      kind: 'ConfigMap',
      ...configMap,
      metadata: { ...configMap.metadata, namespace },
    } as StoredConfigMap;
    const before = this.store.get(CONFIGMAPS, namespace, configMap.metadata.name);
    const stored = before
      ? this.store.write(CONFIGMAPS, before, proposed, manager)
      : this.store.create(CONFIGMAPS, proposed, manager);
    return structuredClone(stored) as StoredConfigMap;
  }
  /** `kubectl edit`: data keys set (null removes one), owned by `manager` from then on. */
  editConfigMap(
    namespace: string,
    name: string,
    data: Record<string, string | null>,
    manager = 'kubectl-edit',
  ): StoredConfigMap {
    const before = this.store.get(CONFIGMAPS, namespace, name);
    if (!before) throw new Error(`the fake has no ConfigMap ${namespace}/${name}`);
    const proposed = mergePatch(before, { data }) as StoredObject;
    return structuredClone(
      this.store.write(CONFIGMAPS, before, proposed, manager),
    ) as StoredConfigMap;
  }
  /** `kubectl delete configmap`, with the finalizer rule. Returns whether it is gone. */
  deleteConfigMap(namespace: string, name: string): boolean {
    if (!this.store.get(CONFIGMAPS, namespace, name))
      throw new Error(`the fake has no ConfigMap ${namespace}/${name}`);
    return this.store.delete(CONFIGMAPS, namespace, name) === undefined;
  }
  /** The Events stored (core/v1 and events.k8s.io/v1), oldest first. */
  events(namespace?: string): StoredObject[] {
    return [...this.store.all(CORE_EVENTS), ...this.store.all(EVENTS)]
      .filter((e) => !namespace || e.metadata.namespace === namespace)
      .sort((a, b) => Number(a.metadata.resourceVersion) - Number(b.metadata.resourceVersion))
      .map((e) => structuredClone(e));
  }

  // Leases.

  /** Writes a Lease as another client would (creating it if needed); returns what is stored. */
  putLease(name: string, spec: LeaseSpec, namespace = 'default'): StoredLease {
    return this.writeLease(name, spec, namespace);
  }
  lease(namespace: string, name: string): StoredLease | undefined {
    const lease = this.leases.get(`${namespace}/${name}`);
    return lease && structuredClone(lease);
  }

  // The server's history, its watches, and faults.

  /** Other resources changed: the cluster's resourceVersion moves on, with no event. */
  advance(by: number) {
    this.store.resourceVersion += by;
  }
  /** etcd compaction: the history up to now is gone, for every resource. */
  compact() {
    this.store.oldestWatchable = this.store.resourceVersion;
  }
  /** A bookmark to every watch that asked for them, at the current resourceVersion. */
  bookmark() {
    for (const watch of this.streams.watches)
      if (watch.bookmarks) watch.send(bookmarkLine(watch.type, this.store.resourceVersion));
  }
  /** Writes raw text into every open watch stream of `resource` (by default the books'). */
  sendRaw(text: string, resource: Resource = PLURAL) {
    for (const watch of this.streams.watches)
      if (watch.type.resource === resource) watch.send(text);
  }
  /** Ends every open watch cleanly, as the server does at timeoutSeconds. */
  endWatches() {
    for (const watch of this.streams.watches) watch.end();
  }
  /** Creates a book, but every open watch of books breaks off in the middle of its event. */
  createAndCutMidEvent(name: string, spec: Spec, how: 'reset' | 'end') {
    const open = [...this.streams.watches].filter((watch) => watch.type === BOOKS);
    for (const watch of open) this.streams.watches.delete(watch);
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
   * instead, as a Status body, with `options.headers` (say Retry-After) and
   * `details.retryAfterSeconds`.
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
  /** Takes back every fault queued by failNext, `always` ones included. */
  clearFaults() {
    this.faults.length = 0;
  }
  /** The next streaming list of books sends its ADDEDs, then this error as an ERROR event. */
  failInitialEvents(code: number, reason: string, message: string) {
    this.streams.initialEventsFault = status(code, reason, message);
  }
  /** Watch requests wait (a slow server) until release(). */
  hold() {
    this.streams.held = [];
  }
  release() {
    const held = this.streams.held ?? [];
    this.streams.held = undefined;
    for (const resolve of held) resolve();
  }

  // What a test reads back.

  get resourceVersionNow() {
    return String(this.store.resourceVersion);
  }
  /** Open watches of books (of `openWatchesOf(resource)` for another resource). */
  get openWatches() {
    return this.openWatchesOf(PLURAL);
  }
  openWatchesOf(resource: Resource) {
    return [...this.streams.watches].filter((watch) => watch.type.resource === resource).length;
  }
  /** The requests for a resource, of one verb if given. */
  requestsFor(resource: Resource, verb?: Verb) {
    return this.requests.filter((r) => r.resource === resource && (!verb || r.verb === verb));
  }
  watchRequests(resource: Resource = PLURAL) {
    return this.requestsFor(resource, 'watch');
  }
  listRequests(resource: Resource = PLURAL) {
    return this.requestsFor(resource, 'list');
  }
  /** The status writes, in order. */
  patches() {
    return this.requestsFor(`${PLURAL}/status`);
  }
  leaseRequests() {
    return this.requestsFor('leases');
  }
  configMapRequests(verb?: Verb) {
    return this.requestsFor('configmaps', verb);
  }
  eventRequests() {
    return this.requestsFor('events');
  }
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
  // Under tsx (npx tsx fake-apiserver.ts), its loader; under plain node, Node strips the types.
  const underTsx = process.execArgv.some((arg) => arg.includes('tsx'));
  return underTsx
    ? [process.execPath, '--import', 'tsx', 'controller.ts']
    : [process.execPath, 'controller.ts'];
}

/**
 * Runs the demo: the fake on loopback (with a garbage collector), the controller as a child
 * process (its stdout shown as is, or given to `stdout`), then moby-dick added, retitled and
 * deleted a second apart. Narration goes to stderr (or `narrate`). Ends by stopping the
 * controller with SIGTERM; returns its exit code and the requests it made.
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
  fake.collectGarbage = true; // as in a cluster: deleting the book deletes its ConfigMap
  const kubeconfig = writeKubeconfig({ server: fake.url });
  const [program = '', ...args] = controllerCommand();
  narrate(
    `a fake API server is listening on ${fake.url}; starting the controller: ` +
      `KUBECONFIG=${kubeconfig} ${[basename(program), ...args].join(' ')}`,
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
  const kind = KIND.toLowerCase(); // book, as kubectl names it
  try {
    await until(() => fake.openWatches > 0); // the controller has its initial state and is watching
    const steps: [string, () => void][] = [
      [
        `kubectl apply -f ${kind}.yaml`,
        () => fake.create('moby-dick', { title: 'Moby Dick', authors: ['Herman Melville'] }),
      ],
      [
        `kubectl patch ${kind} moby-dick --type merge ` +
          `-p '{"spec":{"title":"Moby-Dick; or, The Whale"}}'`,
        () =>
          fake.update('moby-dick', {
            title: 'Moby-Dick; or, The Whale',
            authors: ['Herman Melville'],
          }),
      ],
      [`kubectl delete ${kind} moby-dick`, () => fake.remove('moby-dick')],
    ];
    for (const [command, step] of steps) {
      if (over || signal.aborted) break;
      narrate(command);
      step();
      await pause();
    }
    if (!over && !signal.aborted) narrate('stopping the controller (SIGTERM)');
    // Ctrl-C reached the controller too (one process group): a moment before telling it again.
    if (!over && signal.aborted) await Promise.race([exited, sleep(1000)]);
    // Not child.kill(): Deno then reports the signal, not the exit code.
    if (!over) process.kill(child.pid ?? 0, 'SIGTERM');
    return { exitCode: await exited, requests: fake.requests };
  } finally {
    fake.close();
  }
}

// Runs only as the entry point, not when imported by the tests (Node 22, tsx: no import.meta.main).
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
