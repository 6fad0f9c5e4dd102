// The floor: the least a JS process can do for the controller's output and writes.
// The streaming initial list (or, if the server answers 422/400, the paginated list then
// one watch), split lines, JSON.parse, print the same lines. No retries, no validation,
// no resume. bench.ts starts it exactly as it starts controller.ts (same runtime, same loader).
//
// By default it also writes status as the controller must (issue 12): it keeps each
// book's generation (name -> number) so that it prints Added/Modified only when the
// generation changes (not for the echo of its own status writes), and for each new
// generation whose status is not already Ready at it, sends one status merge patch,
// awaited before the next book, on a keep-alive connection.
//   --raw   no status writes and nothing kept per book: round 1's floor (prints every event)
//   --bare  reads the kubeconfig as JSON instead of importing client-node (the bench writes
//           it as JSON, which is also YAML)
// By default it loads the kubeconfig with client-node, as the controller does, because
// importing client-node dominates start-up and memory (see /work/shared/PERFORMANCE.md).
import https from 'node:https';
import type { IncomingMessage } from 'node:http';
import { readFileSync } from 'node:fs';

const PATH = '/apis/example.technosophos.com/v1/namespaces/default/books';
type Obj = {
  metadata: { name: string; resourceVersion: string; generation?: number };
  spec?: { title: string };
  status?: { conditions?: { type: string; status: string; observedGeneration?: number }[] };
};
const RAW = process.argv.includes('--raw');

let server: string;
let ca: https.RequestOptions['ca'];
let headers: Record<string, string> = {};
if (process.argv.includes('--bare')) {
  const kc = JSON.parse(readFileSync(process.env.KUBECONFIG ?? '', 'utf8'));
  server = kc.clusters[0].cluster.server;
  ca = Buffer.from(kc.clusters[0].cluster['certificate-authority-data'], 'base64');
  headers = { Authorization: `Bearer ${kc.users[0].user.token}` };
} else {
  const { KubeConfig } = await import('@kubernetes/client-node');
  const kc = new KubeConfig();
  kc.loadFromDefault();
  const opts: https.RequestOptions = {};
  await kc.applyToHTTPSOptions(opts);
  server = kc.getCurrentCluster()?.server ?? '';
  ca = opts.ca;
  headers = opts.headers as Record<string, string>;
}
const agent = new https.Agent({ keepAlive: true, ca });
const out = (line: string) => process.stdout.write(`${line}\n`);
process.on('SIGTERM', () => process.exit(0));

function get(query: string): Promise<IncomingMessage> {
  return new Promise((resolve, reject) => {
    https
      .get(`${server}${PATH}?${query}`, { agent, headers }, (res) => {
        res.setEncoding('utf8');
        resolve(res);
      })
      .on('error', reject);
  });
}

function patchStatus(name: string, generation: number): Promise<void> {
  const body = JSON.stringify({
    status: {
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
    },
  });
  return new Promise((resolve, reject) => {
    https
      .request(
        `${server}${PATH}/${name}/status`,
        {
          agent,
          method: 'PATCH',
          headers: {
            ...headers,
            'Content-Type': 'application/merge-patch+json',
            'Content-Length': Buffer.byteLength(body),
          },
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

const generations = new Map<string, number>();
async function seen(type: string, b: Obj) {
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
  out(
    `${before === undefined ? 'Added' : 'Modified'} a book ${name} with title '${b.spec?.title}'`,
  );
  const ready = b.status?.conditions?.find((c) => c.type === 'Ready');
  if (ready?.status !== 'True' || ready.observedGeneration !== generation)
    await patchStatus(name, generation);
}

async function follow(res: IncomingMessage) {
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

const timeout = 'allowWatchBookmarks=true&timeoutSeconds=300';
const streaming = await get(
  `watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&${timeout}`,
);
if (streaming.statusCode === 200) {
  await follow(streaming);
} else {
  streaming.resume();
  let rv = '';
  let cont = '';
  do {
    let body = '';
    for await (const chunk of await get(
      `limit=500${cont ? `&continue=${encodeURIComponent(cont)}` : ''}`,
    ))
      body += chunk;
    const list = JSON.parse(body);
    for (const b of list.items as Obj[]) await seen('ADDED', b);
    rv = list.metadata.resourceVersion;
    cont = list.metadata.continue ?? '';
  } while (cont);
  await follow(await get(`watch=true&resourceVersion=${rv}&${timeout}`));
}
