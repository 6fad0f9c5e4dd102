// Tests for controller.ts, with no cluster: msw plays the Kubernetes API server.
//
// The fake in fake-apiserver.ts behaves like the API server's books endpoint (paginated lists with
// continue tokens, watch streams cut at any byte, bookmarks, 410 Gone, Status error bodies).
// It is served over a real loopback TLS server, so the controller's own https request, its CA
// check and its bearer token are exercised as against a cluster, on Node, Deno and Bun alike.
//
//   npm test                                  (Node)
//   deno test -A controller.test.ts           (Deno)
//   bun test controller.test.ts               (Bun)

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeEach, describe, test } from 'node:test';
import { checkBook, handle, listAndWatch, loadConfig, main, type Book, type Config, type Handler } from './controller.ts';
import { FakeApiServer, SERVER_CERT, status, writeKubeconfig as writeKubeconfigFor } from './fake-apiserver.ts';

// ---------------------------------------------------------------------------------------------
// Waiting on events, never on the clock: every output line and every request wakes the waiters.

const waiters = new Set<() => void>();
const wake = () => waiters.forEach((check) => check());
function until(condition: () => boolean): Promise<void> {
  return new Promise((resolve) => {
    const check = () => condition() && (waiters.delete(check), resolve());
    waiters.add(check);
    check();
  });
}

/** What the controller printed, line by line: console.log is stdout, console.error is stderr. */
let stdout: string[] = [];
let stderr: string[] = [];
const realConsole = { log: console.log, error: console.error };
const lineIn = (lines: string[]) => (...args: unknown[]) => (lines.push(args.join(' ')), wake());

// ---------------------------------------------------------------------------------------------
// Running the controller in this process, against the fake, through its own main().

let fake: FakeApiServer;
const running: { stop: AbortController; exited: Promise<unknown> }[] = [];

/** Points KUBECONFIG at a fresh kubeconfig for the fake (or for the server, CA, token and namespace given). */
function writeKubeconfig(options: { server?: string; namespace?: string; token?: string; ca?: string } = {}) {
  process.env.KUBECONFIG = writeKubeconfigFor({ ...options, server: options.server ?? fake.url });
}

/** Runs the controller in this process until the test stops it (or afterEach does). */
function track(run: (signal: AbortSignal) => Promise<unknown>) {
  const stop = new AbortController();
  const exited = run(stop.signal);
  running.push({ stop, exited });
  return { stop: () => (stop.abort(), exited) };
}

const start = (args: string[] = []) => track((signal) => main(args, signal));

/** Runs listAndWatch with a handler of the test's own, configured as main would be. */
async function startWith(handler: Handler) {
  const config = await loadConfig([]);
  assert.equal(typeof config, 'object');
  return track((signal) => listAndWatch(config as Config, handler, signal));
}

const added = (name: string, title: string) => `Added a book ${name} with title '${title}'`;
const modified = (name: string, title: string) => `Modified a book ${name} with title '${title}'`;
const deleted = (name: string) => `Deleted a book ${name}`;
const MOBY_DICK = { title: 'Moby Dick', authors: ['Herman Melville'] };

beforeEach(async () => {
  stdout = [];
  stderr = [];
  console.log = lineIn(stdout);
  console.error = lineIn(stderr);
  fake = await new FakeApiServer({ onActivity: wake }).listen();
  writeKubeconfig();
});

afterEach(async () => {
  for (const { stop, exited } of running.splice(0)) {
    stop.abort();
    await exited;
  }
  fake.close();
  waiters.clear();
  Object.assign(console, realConsole);
});

// ---------------------------------------------------------------------------------------------

describe('the seed walkthrough', () => {
  test('prints the listed book, then an add, a modify and a delete, and nothing on stderr', async () => {
    fake.create('moby-dick', MOBY_DICK);
    const controller = start();
    await until(() => stdout.length === 1);
    fake.create('hamlet', { title: 'Hamlet', authors: ['William Shakespeare'] });
    fake.update('moby-dick', { title: 'Moby-Dick; or, The Whale', authors: ['Herman Melville'] });
    fake.remove('moby-dick');
    await until(() => stdout.length === 4);
    assert.equal(await controller.stop(), 0);

    assert.deepEqual(stdout, [
      added('moby-dick', 'Moby Dick'),
      added('hamlet', 'Hamlet'),
      modified('moby-dick', 'Moby-Dick; or, The Whale'),
      deleted('moby-dick'),
    ]);
    assert.deepEqual(stderr, []);
    // One list in pages, then a watch from the list's resourceVersion asking for bookmarks and a timeout.
    const [list, watch] = fake.requests.map(({ verb, namespace, query }) => ({ verb, namespace, query }));
    assert.deepEqual(list, { verb: 'list', namespace: 'default', query: { limit: '500' } });
    assert.deepEqual(watch, {
      verb: 'watch',
      namespace: 'default',
      query: { watch: 'true', resourceVersion: '9997', allowWatchBookmarks: 'true', timeoutSeconds: '300' },
    });
  });
});

describe('reading the watch stream', () => {
  for (const chunkBytes of [1, 7, Infinity]) {
    const how = chunkBytes === Infinity ? 'all events in one chunk' : `cut every ${chunkBytes} byte(s)`;
    test(`decodes a stream ${how}, even inside '白鯨' and an emoji`, async () => {
      fake.chunkBytes = chunkBytes;
      fake.hold(); // so the three events reach the watch together, as one replay
      const controller = start();
      await until(() => fake.watchRequests().length === 1);
      fake.create('baijing', { title: '白鯨', authors: ['赫尔曼·梅尔维尔'] });
      fake.create('emoji', { title: 'Moby Dick 🐋📚' });
      fake.update('baijing', { title: '白鯨記' });
      fake.release();
      await until(() => stdout.length === 3);
      await controller.stop();
      assert.deepEqual(stdout, [added('baijing', '白鯨'), added('emoji', 'Moby Dick 🐋📚'), modified('baijing', '白鯨記')]);
      assert.deepEqual(stderr, []);
    });
  }

  test('reports a line that is not a watch event and resumes from the last good resourceVersion', async () => {
    const controller = start();
    await until(() => fake.watchRequests().length === 1);
    fake.create('moby-dick', MOBY_DICK);
    await until(() => stdout.length === 1);
    const lastGood = fake.resourceVersionNow;
    fake.sendRaw('{"type":"ADDED","object":{"metadata":<html>\n');
    await until(() => fake.watchRequests().length === 2 && fake.openWatches === 1);
    fake.sendRaw('{"kind":"Status"}\n'); // JSON, but not an event
    await until(() => fake.watchRequests().length === 3);
    fake.create('hamlet', { title: 'Hamlet' });
    await until(() => stdout.length === 2);
    await controller.stop();
    assert.deepEqual(stdout, [added('moby-dick', 'Moby Dick'), added('hamlet', 'Hamlet')]);
    assert.equal(stderr.length, 2);
    assert.match(stderr[0] ?? '', /^the watch sent a line that is not a watch event: \{"type":"ADDED".*retrying in \d+\.\ds$/);
    assert.match(stderr[1] ?? '', /^the watch sent a line that is not a watch event: \{"kind":"Status"\}/);
    assert.deepEqual(fake.watchRequests().map((r) => r.query.resourceVersion), ['9996', lastGood, lastGood]);
    assert.equal(fake.listRequests().length, 1);
  });

  test('skips a book that fails the check, with a stderr line naming it, and keeps watching', async () => {
    fake.create('no-title', { authors: ['Anonymous'] });
    fake.create('moby-dick', MOBY_DICK);
    const controller = start();
    await until(() => stdout.length === 1 && stderr.length === 1);
    fake.update('no-title', { title: 42 });
    fake.create('bad-authors', { title: 'Beowulf', authors: 'unknown' });
    await until(() => stderr.length === 3);
    fake.update('no-title', { title: 'The Cloud of Unknowing' }); // fixed: news to the handler, so Added
    await until(() => stdout.length === 2);
    await controller.stop();
    assert.deepEqual(stdout, [added('moby-dick', 'Moby Dick'), added('no-title', 'The Cloud of Unknowing')]);
    assert.deepEqual(stderr, [
      'ignoring book no-title: spec.title is not a string — fix it with kubectl edit book no-title',
      'ignoring book no-title: spec.title is not a string — fix it with kubectl edit book no-title',
      'ignoring book bad-authors: spec.authors is not a list of strings — fix it with kubectl edit book bad-authors',
    ]);
  });
});

describe('resuming and relisting', () => {
  for (const how of ['reset', 'end'] as const) {
    test(`resumes a watch cut mid-event (connection ${how}) from the last resourceVersion, without relisting or repeating`, async () => {
      fake.create('moby-dick', MOBY_DICK);
      const controller = start();
      await until(() => fake.watchRequests().length === 1);
      fake.create('hamlet', { title: 'Hamlet' });
      await until(() => stdout.length === 2);
      const lastSeen = fake.resourceVersionNow;
      fake.createAndCutMidEvent('beowulf', { title: 'Beowulf' }, how);
      await until(() => stdout.length === 3);
      await controller.stop();
      assert.deepEqual(stdout, [added('moby-dick', 'Moby Dick'), added('hamlet', 'Hamlet'), added('beowulf', 'Beowulf')]);
      assert.deepEqual(fake.watchRequests().map((r) => r.query.resourceVersion), ['9997', lastSeen]);
      assert.equal(fake.listRequests().length, 1);
      assert.equal(stderr.length, 1); // the cut, once, with the retry
      assert.match(stderr[0] ?? '', how === 'reset' ? /^lost the connection to https:\/\/127\.0\.0\.1:\d+ \(ECONNRESET\); retrying in/
        : /^the watch ended in the middle of an event \(https:\/\/127\.0\.0\.1:\d+\); retrying in/);
    });
  }

  test('backs off when the server ends every watch at once, instead of spinning', async () => {
    fake.endWatchesAtOnce = true;
    const controller = start();
    await until(() => stderr.length === 2);
    await controller.stop();
    assert.match(stderr[0] ?? '', /^the watch ended at once, without any event \(https:\/\/127\.0\.0\.1:\d+\); retrying in 0\.[2-5]s$/);
    assert.match(stderr[1] ?? '', /retrying in (0\.[5-9]|1\.0)s$/); // doubling
    assert.equal(fake.listRequests().length, 1);
  });

  test('resumes at once, quietly, when the server ends the watch at its timeout', async () => {
    const controller = start(['--watch-timeout', '1']);
    await until(() => fake.watchRequests().length === 1);
    fake.create('moby-dick', MOBY_DICK); // the server will end this watch after a second
    await until(() => fake.watchRequests().length === 2);
    fake.create('hamlet', { title: 'Hamlet' });
    await until(() => stdout.length === 2);
    await controller.stop();
    assert.deepEqual(stdout, [added('moby-dick', 'Moby Dick'), added('hamlet', 'Hamlet')]);
    assert.deepEqual(stderr, []);
    assert.equal(fake.listRequests().length, 1);
    assert.equal(fake.watchRequests()[0]?.query.timeoutSeconds, '1');
  });

  test('moves the resume point with bookmarks, and prints nothing for them', async () => {
    fake.create('moby-dick', MOBY_DICK);
    const controller = start();
    await until(() => fake.openWatches === 1);
    fake.advance(5); // other resources change; no book event carries the new resourceVersion
    fake.bookmark();
    const bookmarked = fake.resourceVersionNow;
    fake.compact(); // so that resuming from the list's resourceVersion would cost a relist
    fake.endWatches();
    await until(() => fake.watchRequests().length === 2);
    fake.create('hamlet', { title: 'Hamlet' });
    await until(() => stdout.length === 2);
    await controller.stop();
    assert.deepEqual(stdout, [added('moby-dick', 'Moby Dick'), added('hamlet', 'Hamlet')]);
    assert.deepEqual(fake.watchRequests().map((r) => r.query.resourceVersion), ['9997', bookmarked]);
    assert.equal(fake.listRequests().length, 1);
    assert.deepEqual(stderr, []);
  });

  for (const form of ['an ERROR event', 'HTTP 410'] as const) {
    test(`relists after 410 Gone as ${form} and prints exactly the gap: deletes, adds and modifies`, async () => {
      fake.goneAsHttp = form === 'HTTP 410';
      for (const name of ['a', 'b', 'c']) fake.create(name, { title: name.toUpperCase() });
      const controller = start();
      await until(() => fake.openWatches === 1 && stdout.length === 3);
      fake.hold(); // the controller's next watch waits while the cluster changes and compacts
      fake.bookmark();
      fake.endWatches();
      await until(() => fake.watchRequests().length === 2);
      fake.remove('a');
      fake.update('b', { title: 'B, second edition' });
      fake.create('d', { title: 'D' });
      fake.compact();
      fake.release();
      await until(() => stdout.length === 6);
      fake.create('e', { title: 'E' }); // and the new watch carries on from the new list
      await until(() => stdout.length === 7);
      await controller.stop();
      assert.deepEqual(stdout.slice(3), [modified('b', 'B, second edition'), added('d', 'D'), deleted('a'), added('e', 'E')]);
      assert.deepEqual(stderr, []); // a 410 is routine
      assert.deepEqual(fake.requests.map((r) => r.verb), ['list', 'watch', 'watch', 'list', 'watch']);
    });
  }

  test('lists in pages of 500 following continue, and starts over when a continue token expires', async () => {
    for (let i = 0; i < 1200; i++) fake.create(`book-${i}`, { title: `Book ${i}` });
    fake.expireNextContinueToken = true;
    const controller = start();
    await until(() => fake.watchRequests().length === 1);
    await controller.stop();
    assert.equal(stdout.length, 1200);
    assert.equal(new Set(stdout).size, 1200); // each book once, though its page was listed twice
    assert.equal(stdout[1199], added('book-1199', 'Book 1199'));
    assert.deepEqual(fake.listRequests().map((r) => r.query), [
      { limit: '500' },
      { limit: '500', continue: 'token-0' }, // 410 Expired
      { limit: '500' },
      { limit: '500', continue: 'token-1' },
      { limit: '500', continue: 'token-2' },
    ]);
    assert.deepEqual(stderr, []);
  });

  test('abandons a list or a watch that sends nothing past the watch timeout, and starts over', { timeout: 30_000 }, async () => {
    fake.neverAnswerLists = true; // not even the response headers
    const controller = start(['--watch-timeout', '1']);
    await until(() => fake.listRequests().length === 1);
    fake.neverAnswerLists = false;
    fake.stallWatches = true; // the headers, then silence
    await until(() => fake.watchRequests().length === 1);
    fake.stallWatches = false;
    await until(() => fake.watchRequests().length === 2);
    fake.create('moby-dick', MOBY_DICK);
    await until(() => stdout.length === 1);
    await controller.stop();
    assert.deepEqual(stdout, [added('moby-dick', 'Moby Dick')]);
    assert.equal(stderr.length, 2);
    assert.match(stderr[0] ?? '', /^the list was not over after 6s \(https:\/\/127\.0\.0\.1:\d+\); retrying in \d+\.\ds$/);
    assert.match(stderr[1] ?? '', /^the watch was not over after 6s \(https:\/\/127\.0\.0\.1:\d+\); retrying in \d+\.\ds$/);
    assert.equal(fake.listRequests().length, 2);
  });

  test('reports a server that answers every watch with 410, and backs off between relists', async () => {
    fake.create('moby-dick', MOBY_DICK);
    fake.goneForever = true;
    const controller = start();
    await until(() => stderr.length === 1);
    await controller.stop();
    assert.match(stderr[0] ?? '', /^https:\/\/127\.0\.0\.1:\d+ failed to watch books \(410: too old resource version: \d+ \(\d+\)\); retrying in (0\.[5-9]|1\.0)s$/);
    assert.deepEqual(fake.requests.map((r) => r.verb), ['list', 'watch', 'list', 'watch']);
    assert.deepEqual(stdout, [added('moby-dick', 'Moby Dick')]); // a relist of the same book prints nothing
  });

  test('an ERROR event other than 410 backs off and resumes from the same resourceVersion, without relisting', async () => {
    fake.create('moby-dick', MOBY_DICK);
    const controller = start();
    await until(() => fake.openWatches === 1);
    fake.sendRaw(JSON.stringify({ type: 'ERROR', object: status(500, 'InternalError', 'etcdserver: leader changed') }) + '\n');
    await until(() => fake.watchRequests().length === 2);
    await controller.stop();
    assert.deepEqual(fake.watchRequests().map((r) => r.query.resourceVersion), ['9997', '9997']);
    assert.equal(fake.listRequests().length, 1);
    assert.match(stderr[0] ?? '', /failed to watch books \(500: etcdserver: leader changed\); retrying in \d+\.\ds$/);
  });
});

describe('errors a user will meet: one stderr line, cause then fix', () => {
  test('401: the credentials', async () => {
    writeKubeconfig({ token: 'expired' });
    const controller = start();
    await until(() => stderr.length === 1);
    await controller.stop();
    assert.match(stderr[0] ?? '', /^https:\/\/127\.0\.0\.1:\d+ does not accept our credentials \(401 Unauthorized\); retrying in \d+\.\ds — refresh them in your kubeconfig/);
  });

  test('403: names the verb and the resource to grant', async () => {
    fake.forbidden = true;
    const controller = start(['-n', 'library']);
    await until(() => stderr.length === 1);
    await controller.stop();
    assert.match(stderr[0] ?? '', /^not allowed to list books in namespace library \(403: .*cannot list resource "books".*\); retrying in \d+\.\ds — grant list and watch on books\.example\.technosophos\.com \(kubectl auth can-i list books\.example\.technosophos\.com -n library\)$/);
  });

  test('404: the CRD is missing; once installed, the controller picks it up without a restart', async () => {
    fake.crdInstalled = false;
    fake.create('moby-dick', MOBY_DICK);
    const controller = start();
    await until(() => stderr.length === 1);
    fake.crdInstalled = true;
    await until(() => stdout.length === 1);
    await controller.stop();
    assert.match(stderr[0] ?? '', /^the Book CRD is not installed on https:\/\/127\.0\.0\.1:\d+ \(404: .*\); retrying in \d+\.\ds — kubectl apply -f crd\.yaml$/);
    assert.deepEqual(stdout, [added('moby-dick', 'Moby Dick')]);
  });

  test('429: waits the Retry-After the server asked for', async () => {
    fake.failNext(429, 'TooManyRequests', 'the server has received too many requests and has asked us to try again later', { headers: { 'Retry-After': '1' } });
    fake.create('moby-dick', MOBY_DICK);
    const controller = start();
    await until(() => stdout.length === 1);
    await controller.stop();
    assert.deepEqual(stderr, [`${fake.url} is busy (429: the server has received too many requests and has asked us to try again later); retrying in 1.0s`]);
  });

  test('500 on the list: backs off and retries', async () => {
    fake.failNext(500, 'InternalError', 'etcdserver: request timed out');
    fake.create('moby-dick', MOBY_DICK);
    const controller = start();
    await until(() => stdout.length === 1);
    await controller.stop();
    assert.equal(stderr.length, 1);
    assert.match(stderr[0] ?? '', /failed to list books \(500: etcdserver: request timed out\); retrying in 0\.\ds$/);
  });

  test('server unreachable: names the server URL', async () => {
    writeKubeconfig({ server: 'https://127.0.0.1:1' });
    const controller = start();
    await until(() => stderr.length === 2);
    await controller.stop();
    // Backoff: the first wait is 0.25-0.5 s, the second 0.5-1 s (jittered).
    assert.match(stderr[0] ?? '', /^cannot reach https:\/\/127\.0\.0\.1:1 \(ECONNREFUSED\); retrying in 0\.[2-5]s — is the cluster running\? \(kubectl cluster-info\)$/);
    assert.match(stderr[1] ?? '', /retrying in (0\.[5-9]|1\.0)s/);
  });

  test("a TLS certificate the kubeconfig's CA did not sign", async () => {
    writeKubeconfig({ ca: SERVER_CERT }); // not the CA that signed the server's certificate
    const controller = start();
    await until(() => stderr.length === 1);
    await controller.stop();
    assert.match(stderr[0] ?? '', /^the TLS certificate of https:\/\/127\.0\.0\.1:\d+ did not verify \(\w+\); retrying in \d\.\ds — check certificate-authority-data in your kubeconfig$/);
    assert.equal(fake.requests.length, 0);
  });

  test('no kubeconfig at all: says so, and how to get one', async () => {
    const home = process.env.HOME;
    delete process.env.KUBECONFIG;
    process.env.HOME = mkdtempSync(join(tmpdir(), 'empty-home-'));
    const controller = start();
    await until(() => stderr.length === 1);
    await controller.stop();
    process.env.HOME = home;
    assert.match(stderr[0] ?? '', /^no kubeconfig found \(KUBECONFIG, ~\/\.kube\/config or a pod's service account\); retrying in 0\.\ds — set KUBECONFIG, or create a cluster \(kind create cluster\)$/);
  });

  test('a kubeconfig that is missing, broken, or names no cluster: one line, exit 1', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'bad-kubeconfig-'));
    const broken = join(dir, 'broken');
    writeFileSync(broken, 'clusters:\n  - name: fake\n   cluster: {\n');
    const noCluster = join(dir, 'no-cluster');
    writeFileSync(noCluster, JSON.stringify({ apiVersion: 'v1', kind: 'Config', 'current-context': 'gone', contexts: [], clusters: [], users: [] }));
    for (const file of [join(dir, 'missing'), broken, noCluster]) {
      process.env.KUBECONFIG = file;
      assert.equal(await main([], new AbortController().signal), 1);
    }
    assert.equal(stderr.length, 3);
    assert.match(stderr[0] ?? '', /^cannot load the kubeconfig: ENOENT.*missing' — check KUBECONFIG or ~\/\.kube\/config$/);
    assert.match(stderr[1] ?? '', /^cannot load the kubeconfig: .+ — check KUBECONFIG or ~\/\.kube\/config$/);
    assert.equal(stderr[2], "the kubeconfig's current context 'gone' names no cluster — pick one with kubectl config use-context NAME");
  });
});

describe('the handler', () => {
  test('is not called again once the controller is stopped', async () => {
    for (const name of ['a', 'b', 'c']) fake.create(name, { title: name });
    const calls: string[] = [];
    const controller = await startWith(async (_event, _book, name) => {
      calls.push(name);
      wake();
      void controller.stop(); // as SIGTERM would, while the handler is busy
    });
    await until(() => calls.length === 1);
    await controller.stop();
    assert.deepEqual(calls, ['a']);
  });

  test('is awaited one event at a time, in order, and one that throws is reported while the watch goes on', async () => {
    const calls: string[] = [];
    const controller = await startWith(async (event, book, name) => {
      calls.push(`start ${event} ${name}`);
      await new Promise((resolve) => setImmediate(resolve)); // the reader's reconcile, taking its time
      if (name === 'cursed') throw new Error('the ink is wet');
      calls.push(`end ${event} ${name}`);
      await handle(event, book, name);
    });
    for (const name of ['a', 'cursed', 'b']) fake.create(name, { title: name });
    await until(() => stdout.length === 2);
    fake.update('a', { title: 'A2' });
    fake.remove('a');
    await until(() => stdout.length === 4);
    await controller.stop();
    assert.deepEqual(calls, [
      'start Added a', 'end Added a',
      'start Added cursed',
      'start Added b', 'end Added b',
      'start Modified a', 'end Modified a',
      'start Deleted a', 'end Deleted a',
    ]);
    assert.deepEqual(stderr, ['the handler failed on book cursed: the ink is wet']);
  });
});

describe('flags and shutdown', () => {
  test('-A watches every namespace and names books NAMESPACE/NAME', async () => {
    fake.create('moby-dick', MOBY_DICK, 'library');
    fake.create('moby-dick', { title: 'Moby Dick, the musical' }, 'theatre'); // the same name, another book
    const controller = start(['-A']);
    await until(() => stdout.length === 2);
    fake.remove('moby-dick', 'theatre');
    await until(() => stdout.length === 3);
    await controller.stop();
    assert.deepEqual(stdout, [
      added('library/moby-dick', 'Moby Dick'),
      added('theatre/moby-dick', 'Moby Dick, the musical'),
      deleted('theatre/moby-dick'),
    ]);
    assert.ok(fake.requests.every((r) => r.namespace === undefined));
  });

  test('the namespace comes from -n, else the kubeconfig context, else "default"', async () => {
    writeKubeconfig({ namespace: 'library' });
    fake.create('moby-dick', MOBY_DICK, 'library');
    fake.create('hamlet', { title: 'Hamlet' }, 'theatre');
    let controller = start();
    await until(() => stdout.length === 1);
    await controller.stop();
    controller = start(['--namespace', 'theatre']);
    await until(() => stdout.length === 2);
    await controller.stop();
    assert.deepEqual(stdout, [added('moby-dick', 'Moby Dick'), added('hamlet', 'Hamlet')]);
    assert.deepEqual(fake.listRequests().map((r) => r.namespace), ['library', 'theatre']);
  });

  test('--help prints the flags; a bad flag exits 2 with one line', async () => {
    assert.equal(await main(['--help'], new AbortController().signal), 0);
    for (const flag of ['--namespace', '--all-namespaces', '--watch-timeout', '--help']) assert.ok(stdout.join('\n').includes(flag), flag);
    assert.equal(await main(['--colour'], new AbortController().signal), 2);
    assert.equal(await main(['--watch-timeout', 'soon'], new AbortController().signal), 2);
    assert.equal(stderr.length, 2);
    assert.match(stderr[0] ?? '', /^Unknown option '--colour'.* — see --help$/);
    assert.equal(stderr[1], "--watch-timeout takes a whole number of seconds, not 'soon' — see --help");
  });

  test('stops promptly when asked, while watching and while waiting to retry', async () => {
    let controller = start();
    await until(() => fake.watchRequests().length === 1);
    assert.equal(await controller.stop(), 0);
    fake.failNext(429, 'TooManyRequests', 'slow down', { headers: { 'Retry-After': '3600' } });
    controller = start();
    await until(() => stderr.length === 1);
    assert.equal(await controller.stop(), 0); // not an hour later: the test would time out
  });
});

describe('checkBook', () => {
  test('accepts a book with a title and optional authors, and says what is wrong otherwise', () => {
    const metadata = { name: 'm', resourceVersion: '1' };
    const book: Book = { metadata, spec: { title: 'Moby Dick', authors: ['Herman Melville'] } };
    assert.deepEqual(checkBook(book), book);
    // Only the typed fields are kept: the rest of a server object is left behind.
    const fromServer = { apiVersion: 'example.technosophos.com/v1', kind: 'Book', metadata: { ...metadata, uid: 'u', managedFields: [{}] }, spec: { title: 'x', extra: 1 } };
    assert.deepEqual(checkBook(fromServer), { metadata, spec: { title: 'x' } });
    assert.equal(checkBook({ metadata }), 'it has no spec');
    assert.equal(checkBook({ metadata, spec: { authors: [] } }), 'spec.title is not a string');
    assert.equal(checkBook({ metadata, spec: { title: 'x', authors: [1] } }), 'spec.authors is not a list of strings');
    assert.equal(checkBook(null), 'it has no metadata');
  });
});

describe('as a program, on this runtime', () => {
  // How a user starts it here: npx tsx controller.ts (Node), deno run …, bun controller.ts.
  const command = process.versions.deno
    ? [process.execPath, 'run', '--allow-env', '--allow-read', '--allow-net', 'controller.ts']
    : process.versions.bun
      ? [process.execPath, 'controller.ts']
      : [process.execPath, '--import', 'tsx', 'controller.ts']; // not tsx's CLI: under load it may SIGKILL its child

  for (const signal of ['SIGTERM', 'SIGINT'] as const) {
    test(`prints the seed walkthrough on stdout and exits 0 within a second of ${signal}`, { timeout: 30_000 }, async () => {
      fake.create('moby-dick', MOBY_DICK);
      const [program = '', ...args] = command;
      const child = spawn(program, args, { cwd: fileURLToPath(new URL('.', import.meta.url)), env: process.env });
      const out: string[] = [];
      const err: string[] = [];
      child.stdout.setEncoding('utf8').on('data', (text: string) => (out.push(...text.split('\n').filter(Boolean)), wake()));
      child.stderr.setEncoding('utf8').on('data', (text: string) => (err.push(text), wake()));
      const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
      await until(() => out.length === 1);
      fake.update('moby-dick', { title: 'Moby-Dick; or, The Whale' });
      fake.remove('moby-dick');
      await until(() => out.length === 3);
      const signalled = Date.now();
      process.kill(child.pid ?? 0, signal); // not child.kill(): Deno then reports the signal, not the exit code
      assert.equal(await exited, 0);
      assert.ok(Date.now() - signalled < 1000, `exited ${Date.now() - signalled} ms after ${signal}`);
      assert.deepEqual(out, [added('moby-dick', 'Moby Dick'), modified('moby-dick', 'Moby-Dick; or, The Whale'), deleted('moby-dick')]);
      assert.deepEqual(err, []);
    });
  }
});
