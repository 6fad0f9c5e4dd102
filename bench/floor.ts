// The floor: the least a JS process can do for the controller's output.
// Paginated list, one watch, split lines, JSON.parse, print the same lines.
// No retries, no validation, no resume. bench.ts starts it exactly as it
// starts controller.ts (same runtime, same loader).
//
// By default it loads the kubeconfig with client-node, as the controller does,
// because importing client-node dominates start-up and memory
// (see /work/shared/PERFORMANCE.md). With --bare it reads the kubeconfig as
// JSON (the bench writes it as JSON, which is also YAML) and imports nothing.
import https from 'node:https';
import { readFileSync } from 'node:fs';

const PATH = '/apis/example.technosophos.com/v1/namespaces/default/books';
type Obj = { metadata: { name: string; resourceVersion: string }; spec?: { title: string } };

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
const out = (line: string) => process.stdout.write(line + '\n');
process.on('SIGTERM', () => process.exit(0));

function get(query: string, onData: (chunk: string) => void): Promise<void> {
  return new Promise((resolve, reject) => {
    https.get(`${server}${PATH}?${query}`, { agent, headers }, (res) => {
      res.setEncoding('utf8');
      res.on('data', onData);
      res.on('end', resolve);
      res.on('error', reject);
    }).on('error', reject);
  });
}

let rv = '';
let cont = '';
do {
  let body = '';
  await get(`limit=500${cont ? `&continue=${encodeURIComponent(cont)}` : ''}`, (c) => { body += c; });
  const list = JSON.parse(body);
  for (const b of list.items as Obj[]) out(`Added a book ${b.metadata.name} with title '${b.spec?.title}'`);
  rv = list.metadata.resourceVersion;
  cont = list.metadata.continue ?? '';
} while (cont);

let rest = '';
await get(`watch=true&resourceVersion=${rv}&allowWatchBookmarks=true&timeoutSeconds=300`, (chunk) => {
  const lines = (rest + chunk).split('\n');
  rest = lines.pop() ?? '';
  for (const line of lines) {
    if (!line) continue;
    const { type, object: b } = JSON.parse(line) as { type: string; object: Obj };
    if (type === 'ADDED') out(`Added a book ${b.metadata.name} with title '${b.spec?.title}'`);
    else if (type === 'MODIFIED') out(`Modified a book ${b.metadata.name} with title '${b.spec?.title}'`);
    else if (type === 'DELETED') out(`Deleted a book ${b.metadata.name}`);
  }
});
