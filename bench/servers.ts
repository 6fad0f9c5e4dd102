// How fast bench/server.ts and the tests' FakeApiServer (fake-apiserver.ts) serve the bench's
// workload, each in a process of its own, to one client: why the bench has a server of its own
// (see the header of bench/server.ts).
//   - streaming list: N books as ADDED events, then the initial-events-end bookmark;
//   - burst: on that watch, the workload's M changes (bench/workload.ts), made at once;
//   - writes: for each of K books, one server-side apply of its ConfigMap and one status JSON
//     patch, awaited in turn on a keep-alive connection (what the floor does).
//
//   node bench/servers.ts [N=20000] [M=30000] [K=5000]
import { spawn, type ChildProcess } from 'node:child_process';
import https from 'node:https';
import { fileURLToPath } from 'node:url';
import { CA_CERT, FakeApiServer, GROUP_VERSION, TOKEN } from '../fake-apiserver.ts';
import { authors, bookNames, listTitle, watchEvents } from './workload.ts';

const BOOKS = `/apis/${GROUP_VERSION}/namespaces/default/books`;
const CMS = '/api/v1/namespaces/default/configmaps';

// As a child (--fake N M): FakeApiServer with N books; a line on stdin makes the M changes.
if (process.argv[2] === '--fake') {
  const [n, m] = process.argv.slice(3).map(Number);
  const fake = await new FakeApiServer().listen();
  for (const [i, name] of bookNames(n).entries())
    fake.create(name, { title: listTitle(name, i), authors: authors(i) });
  process.stdout.write(`${JSON.stringify({ url: fake.url })}\n`);
  process.stdin.setEncoding('utf8').on('data', () => {
    for (const e of watchEvents(n, m)) {
      if (e.type === 'DELETED') fake.remove(e.name);
      else if (e.type === 'ADDED')
        fake.create(e.name, { title: e.title, authors: authors(e.index) });
      else fake.update(e.name, { title: e.title, authors: authors(e.index) });
    }
  });
} else {
  const [N = 20000, M = 30000, K = 5000] = process.argv.slice(2).map(Number);
  const agent = new https.Agent({ ca: CA_CERT, keepAlive: true, maxSockets: 1 });
  const headers = { authorization: `Bearer ${TOKEN}` };
  const request = (url: string, method: string, path: string, type = '', body = '') =>
    new Promise<string>((resolve, reject) => {
      const h = type ? { ...headers, 'content-type': type } : headers;
      https
        .request(url + path, { agent, method, headers: h }, (res) => {
          let text = '';
          res.setEncoding('utf8');
          res.on('data', (c) => {
            text += c;
          });
          res.on('end', () => resolve(text));
        })
        .on('error', reject)
        .end(body);
    });
  const started = (child: ChildProcess) =>
    new Promise<{ port?: number; url?: string }>((resolve) =>
      child.stdout?.once('data', (d) => resolve(JSON.parse(String(d).split('\n')[0]))),
    );

  /** The streaming list, then the burst on the same watch: events per second of each. */
  const watch = (url: string, burst: () => void) =>
    new Promise<string>((resolve) => {
      const query =
        'watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=600';
      const t0 = performance.now();
      let t1 = 0;
      let listed = 0;
      let changes = 0;
      let rest = '';
      https.get(`${url}${BOOKS}?${query}`, { headers, ca: CA_CERT }, (res) => {
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => {
          const lines = (rest + chunk).split('\n');
          rest = lines.pop() ?? '';
          for (const line of lines) {
            if (t1 && ++changes === M) {
              const t2 = performance.now();
              res.destroy();
              resolve(
                `streaming list ${rate(listed, t1 - t0)} events/s, burst ${rate(M, t2 - t1)} events/s`,
              );
            } else if (!t1 && line.includes('"BOOKMARK"')) {
              t1 = performance.now();
              burst();
            } else if (!t1) listed++;
          }
        });
      });
    });

  /** One apply and one status patch for each of the first K books, in turn: writes per second. */
  async function writes(url: string): Promise<string> {
    const list = JSON.parse(await request(url, 'GET', `${BOOKS}?limit=${K}`));
    const t0 = performance.now();
    for (const b of list.items) {
      const { name, uid } = b.metadata;
      const owner = { apiVersion: GROUP_VERSION, kind: 'Book', name, uid, controller: true };
      const cm = {
        apiVersion: 'v1',
        kind: 'ConfigMap',
        metadata: {
          name,
          labels: { 'app.kubernetes.io/managed-by': 'book-controller' },
          ownerReferences: [{ ...owner, blockOwnerDeletion: true }],
        },
        data: { title: b.spec.title, authors: b.spec.authors.join('\n') },
      };
      const query = 'fieldManager=book-controller&force=true';
      await request(
        url,
        'PATCH',
        `${CMS}/${name}?${query}`,
        'application/apply-patch+yaml',
        JSON.stringify(cm),
      );
      const ready = { type: 'Ready', status: 'True', reason: 'Reconciled', observedGeneration: 1 };
      const patch = [
        { op: 'test', path: '/metadata/uid', value: uid },
        { op: 'add', path: '/status', value: { observedGeneration: 1, conditions: [ready] } },
      ];
      await request(
        url,
        'PATCH',
        `${BOOKS}/${name}/status`,
        'application/json-patch+json',
        JSON.stringify(patch),
      );
    }
    return `writes ${rate(2 * list.items.length, performance.now() - t0)}/s`;
  }
  const rate = (n: number, ms: number) => Math.round(n / (ms / 1000)).toLocaleString('en');

  const self = fileURLToPath(import.meta.url);
  const server = fileURLToPath(new URL('server.ts', import.meta.url));
  const bench = spawn(process.execPath, [server, String(N), String(M)], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const { port } = await started(bench);
  const url = `https://127.0.0.1:${port}`;
  const control = (what: string) => request(url, 'POST', `/bench/${what}`);
  await control(`reset?books=${N}&events=1`);
  const benchWatch = await watch(url, () => void control('burst'));
  await control(`reset?books=${N}`);
  console.log(`bench/server.ts: ${benchWatch}, ${await writes(url)}`);
  bench.kill();

  const fake = spawn(process.execPath, [self, '--fake', String(N), String(M)], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  const fakeUrl = (await started(fake)).url ?? '';
  const fakeWatch = await watch(fakeUrl, () => fake.stdin?.write('burst\n'));
  console.log(`FakeApiServer:   ${fakeWatch}, ${await writes(fakeUrl)}`);
  fake.kill();
  agent.destroy();
}
