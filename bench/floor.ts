// The floor: the least a JS process can do for the controller's output and writes.
// bench.ts starts it exactly as it starts controller.ts (same runtime, same loader).
//
// What the controller does, without retries, validation, resume or backoff:
// - it loads the kubeconfig with client-node, as the controller does, because importing
//   client-node dominates start-up and memory (bench.ts --tables imports measures it);
// - it lists and watches the owned ConfigMaps (labelSelector app.kubernetes.io/managed-by=
//   book-controller) and the books, each with the streaming list (or, if the server answers
//   422/400, the paginated list then one watch), split lines, JSON.parse;
// - it acts on books only once the ConfigMaps' initial state is in (the controller's workers wait
//   for both), so that a restart writes nothing;
// - it keeps one number per book (its generation) and one per ConfigMap (a 32-bit hash of its
//   owner's uid and its data), and for each new generation of a book: one awaited server-side
//   apply of its ConfigMap (the body controller.ts applies), unless the ConfigMap already says
//   that; then the line; then, unless the book is already Ready at that generation, one awaited
//   status JSON patch (a test of /metadata/uid, then add /status), on a keep-alive connection.
//   One book at a time, as `--concurrency 1`.
//   --raw   no writes, no ConfigMaps, nothing kept per book: only reads and prints every event
//   --bare  reads the kubeconfig as JSON instead of importing client-node (the bench writes
//           it as JSON, which is also YAML)
import https from 'node:https';
import type { IncomingMessage } from 'node:http';
import { readFileSync } from 'node:fs';

const GROUP_VERSION = 'example.technosophos.com/v1';
const LABELS = { 'app.kubernetes.io/managed-by': 'book-controller' };
const SELECTOR = `labelSelector=${encodeURIComponent('app.kubernetes.io/managed-by=book-controller')}`;
type Obj = {
  metadata: {
    name: string;
    uid: string;
    resourceVersion: string;
    generation?: number;
    annotations?: Record<string, string>;
    ownerReferences?: { uid: string; controller?: boolean }[];
  };
  spec?: { title: string; authors?: string[] };
  data?: { title?: string; authors?: string };
  status?: { conditions?: { type: string; status: string; observedGeneration?: number }[] };
};
const RAW = process.argv.includes('--raw');

let server: string;
let ca: https.RequestOptions['ca'];
let headers: Record<string, string> = {};
let NS = 'default'; // the kubeconfig context's namespace, as the controller's default
if (process.argv.includes('--bare')) {
  const kc = JSON.parse(readFileSync(process.env.KUBECONFIG ?? '', 'utf8'));
  NS = kc.contexts[0].context.namespace ?? NS;
  server = kc.clusters[0].cluster.server;
  ca = Buffer.from(kc.clusters[0].cluster['certificate-authority-data'], 'base64');
  headers = { Authorization: `Bearer ${kc.users[0].user.token}` };
} else {
  const { KubeConfig } = await import('@kubernetes/client-node');
  const kc = new KubeConfig();
  kc.loadFromDefault();
  NS = kc.getContextObject(kc.getCurrentContext())?.namespace ?? NS;
  const opts: https.RequestOptions = {};
  await kc.applyToHTTPSOptions(opts);
  server = kc.getCurrentCluster()?.server ?? '';
  ca = opts.ca;
  headers = opts.headers as Record<string, string>;
}
const BOOKS = `/apis/${GROUP_VERSION}/namespaces/${NS}/books`;
const CMS = `/api/v1/namespaces/${NS}/configmaps`;
const agent = new https.Agent({ keepAlive: true, ca });
const out = (line: string) => process.stdout.write(`${line}\n`);
process.on('SIGTERM', () => process.exit(0));

function get(path: string, query: string): Promise<IncomingMessage> {
  return new Promise((resolve, reject) => {
    https
      .get(`${server}${path}?${query}`, { agent, headers }, (res) => {
        res.setEncoding('utf8');
        resolve(res);
      })
      .on('error', reject);
  });
}

function send(method: string, path: string, type: string, body: string): Promise<void> {
  return new Promise((resolve, reject) => {
    https
      .request(
        `${server}${path}`,
        {
          agent,
          method,
          headers: { ...headers, 'Content-Type': type, 'Content-Length': Buffer.byteLength(body) },
        },
        (res) => {
          res.resume(); // 404: the book is gone, nothing to do
          res.on('end', resolve);
        },
      )
      .on('error', reject)
      .end(body);
  });
}

function apply(b: Obj, authors: string[]) {
  const { name, uid } = b.metadata;
  const title = b.spec?.title ?? '';
  const body = JSON.stringify({
    apiVersion: 'v1',
    kind: 'ConfigMap',
    metadata: {
      name,
      namespace: NS,
      labels: LABELS,
      ownerReferences: [
        {
          apiVersion: GROUP_VERSION,
          kind: 'Book',
          name,
          uid,
          controller: true,
          blockOwnerDeletion: true,
        },
      ],
    },
    data: authors.length ? { title, authors: authors.join('\n') } : { title },
  });
  const query = 'fieldManager=book-controller&force=true';
  return send('PATCH', `${CMS}/${name}?${query}`, 'application/apply-patch+yaml', body);
}

function patchStatus(b: Obj, generation: number): Promise<void> {
  const status = {
    observedGeneration: generation,
    conditions: [
      {
        type: 'Ready',
        status: 'True',
        reason: 'Reconciled',
        message: '',
        observedGeneration: generation,
        lastTransitionTime: new Date().toISOString().replace(/\.\d+Z$/, 'Z'),
      },
    ],
  };
  const body = JSON.stringify([
    { op: 'test', path: '/metadata/uid', value: b.metadata.uid },
    { op: 'add', path: '/status', value: status },
  ]);
  const path = `${BOOKS}/${b.metadata.name}/status`;
  return send('PATCH', path, 'application/json-patch+json', body);
}

/** FNV-1a, 32 bits: what a ConfigMap says (owner uid and data), as one number. */
function hash(owner: string, title: string, authors: string): number {
  const s = `${owner}\n${title}\n${authors}`;
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

// ---- the owned ConfigMaps: name -> hash ----
const configMaps = new Map<string, number>();
let configMapsIn = () => {};
const configMapsReady = new Promise<void>((resolve) => {
  configMapsIn = resolve;
});
function seenConfigMap(type: string, c: Obj) {
  if (type === 'BOOKMARK') {
    if (c.metadata.annotations?.['k8s.io/initial-events-end'] === 'true') configMapsIn();
    return;
  }
  if (type === 'DELETED') {
    configMaps.delete(c.metadata.name);
    return;
  }
  const owner = c.metadata.ownerReferences?.find((r) => r.controller)?.uid ?? '';
  configMaps.set(c.metadata.name, hash(owner, c.data?.title ?? '', c.data?.authors ?? ''));
}

// ---- the books: name -> generation ----
const generations = new Map<string, number>();
async function seenBook(type: string, b: Obj) {
  const name = b.metadata.name;
  if (RAW) {
    if (type === 'ADDED') out(`Added a book ${name} with title '${b.spec?.title}'`);
    else if (type === 'MODIFIED') out(`Modified a book ${name} with title '${b.spec?.title}'`);
    else if (type === 'DELETED') out(`Deleted a book ${name}`);
    return;
  }
  if (type === 'DELETED') {
    if (generations.delete(name)) out(`Deleted a book ${name}`);
    return;
  }
  if (type !== 'ADDED' && type !== 'MODIFIED') return;
  const generation = b.metadata.generation ?? 0;
  const before = generations.get(name);
  if (before === generation) return; // a status or metadata change: our own echo
  generations.set(name, generation);
  await configMapsReady;
  const authors = b.spec?.authors ?? [];
  const h = hash(b.metadata.uid, b.spec?.title ?? '', authors.join('\n'));
  if (configMaps.get(name) !== h) {
    await apply(b, authors);
    configMaps.set(name, h);
  }
  out(
    `${before === undefined ? 'Added' : 'Modified'} a book ${name} with title '${b.spec?.title}'`,
  );
  const ready = b.status?.conditions?.find((c) => c.type === 'Ready');
  if (ready?.status !== 'True' || ready.observedGeneration !== generation)
    await patchStatus(b, generation);
}

type Seen = (type: string, object: Obj) => void | Promise<void>;
async function follow(res: IncomingMessage, seen: Seen) {
  let rest = '';
  for await (const chunk of res) {
    const lines = (rest + chunk).split('\n');
    rest = lines.pop() ?? '';
    for (const line of lines) {
      if (!line) continue;
      const { type, object } = JSON.parse(line) as { type: string; object: Obj };
      await seen(type, object);
    }
  }
}

async function listAndWatch(path: string, selector: string, seen: Seen, listed: () => void) {
  const timeout = `allowWatchBookmarks=true&timeoutSeconds=300${selector}`;
  const streaming = await get(
    path,
    `watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&${timeout}`,
  );
  if (streaming.statusCode === 200) return follow(streaming, seen);
  streaming.resume();
  let rv = '';
  let cont = '';
  do {
    let body = '';
    const more = cont ? `&continue=${encodeURIComponent(cont)}` : '';
    for await (const chunk of await get(path, `limit=500${more}${selector}`)) body += chunk;
    const list = JSON.parse(body);
    for (const o of list.items as Obj[]) await seen('ADDED', o);
    rv = list.metadata.resourceVersion;
    cont = list.metadata.continue ?? '';
  } while (cont);
  listed();
  await follow(await get(path, `watch=true&resourceVersion=${rv}&${timeout}`), seen);
}

await Promise.all([
  RAW ? undefined : listAndWatch(CMS, `&${SELECTOR}`, seenConfigMap, configMapsIn),
  listAndWatch(BOOKS, '', seenBook, () => {}),
]);
