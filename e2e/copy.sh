#!/usr/bin/env bash
# The copy path, as the README's "Copy it into your own project" section tells it, tested:
#   1. a fresh project (npm init -y) with the listed installs and settings, and the files to copy;
#   2. the checklist, for a Widget in acme.io: 1. the names, 2. the spec (SPEC, with a field of the
#      reader's own: color), 3. lineFor, 4. reconcile (the ConfigMap's data), 5. the tests' sample,
#      6. crd.yaml and deploy.yaml generated (npx tsx controller.ts manifests), never edited by
#      hand; then the copy's own tests; then step 4 again, further: a Secret made once (OWNED), a
#      status field of its own (STATUS) written every CHECK seconds (requeueAfter), and step 6 again;
#   3. the copy against the fake API server: its lines, its ConfigMap and Secret, the requeue, a
#      restart that writes nothing, and nothing says book;
#   4. the copy on a real kube-apiserver (e2e/cluster.ts copied beside it, as `npm run cluster` has
#      it), with the generated crd.yaml and deploy.yaml, as deploy.yaml's ServiceAccount: no 403,
#      Ready, the same checks, and the garbage collector deleting the ConfigMap and the Secret.
# Usage: bash e2e/copy.sh [DIR]   (default: a new temporary directory, removed afterwards)
# It needs npm (any Node: the copy brings Node 24 as a dev dependency), the npm registry, and the
# binaries of e2e/build.sh (built once per machine; E2E_BIN names another folder holding them).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${1:-$(mktemp -d -t widget-controller.XXXXXX)}
keep=${1:-}
say() { printf 'copy: %s\n' "$*" >&2; }
tests_failed=
finish() { # the copy's tests' log if they failed, however the script ends; the folder removed
  if [ -n "$tests_failed" ]; then cat "$dir/tests.log" >&2 && say "the copy's tests failed: their log above"; fi
  [ -n "$keep" ] || rm -rf "$dir"
}
trap finish EXIT
mkdir -p "$dir"
cd "$dir"
began=$SECONDS

say "a new project in $dir, as the README says"
npm init -y >/dev/null
npm pkg set type=module
# npm 11 runs no install scripts unless allowed: tsx's esbuild and the node package need theirs.
npm pkg set allowScripts.esbuild=true allowScripts.node=true --json
printf 'loglevel=error\n' >.npmrc # npm on an older Node warns EBADENGINE about the Node it installs
npm install --save-exact @kubernetes/client-node@2.0.1
npm install --save-dev --save-exact node@24.21.0 tsx@4.23.15 msw@3.0.5 fast-check@4.10.2 js-yaml@5.5.0
cp "$here"/controller.ts "$here"/controller.test.ts "$here"/fake-apiserver.ts .
cp controller.ts controller.ts.orig && cp controller.test.ts controller.test.ts.orig
say "node on PATH: $(node --version); npx node: $(npx node --version)"

# The checklist's edits, by edit(): it fails unless each `from` is there exactly once, so that the
# checklist and the files cannot drift apart unnoticed. Steps 1-6, the copy's tests (the project's,
# renamed through `sample`), then step 4 further and step 6 again, which the fake and the real
# server check below. The tests run before the Secret and the requeue on purpose: they test the
# machinery through the example's reconcile and hold it to what it sends, which a Secret and a
# requeue change (their client refuses a create; a restart writes only ConfigMaps; the status is
# exactly Ready; /metrics counts three reconciles; no reconcile after an annotation edit; one line
# when every list fails, not one per owned kind). About ten of them fail after, for that alone.
cat >edit.mjs <<'END'
import { readFileSync, writeFileSync } from 'node:fs';
export function edit(file, from, to) {
  const text = readFileSync(file, 'utf8');
  if (text.split(from).length !== 2) throw new Error(`${file}: not exactly one ${JSON.stringify(from)}`);
  writeFileSync(file, text.replace(from, to));
}
END
say "the checklist, for a Widget in acme.io"
npx node --input-type=module - <<'END'
import { edit } from './edit.mjs';
// 1. The names.
edit('controller.ts', "export const GROUP = 'example.technosophos.com';", "export const GROUP = 'acme.io';");
edit('controller.ts', "export const KIND = 'Book';", "export const KIND = 'Widget';");
edit('controller.ts', "export const PLURAL = 'books';", "export const PLURAL = 'widgets';");
edit('controller.ts', "export const SHORT_NAMES = ['bk'];", "export const SHORT_NAMES = ['wd'];");
// 2. The spec: the Widget's fields, and one more of the reader's own (color), optional.
edit('controller.ts', `  title: { type: 'string', minLength: 1, column: 'Title' },
  authors: { type: 'array', items: 'string', optional: true, column: 'Authors' },`,
`  replicas: { type: 'integer', minimum: 0, column: 'Replicas' },
  message: { type: 'string', minLength: 1, column: 'Message' },
  color: { type: 'string', enum: ['red', 'green', 'blue'], optional: true, column: 'Color' },`);
// 3. The line printed.
edit('controller.ts', "return `${change} a ${kind} ${name} with title '${book.spec.title}'`;",
  "return `${change} a ${kind} ${name} with message '${book.spec.message}'`;");
// 4. reconcile: the ConfigMap's data, color in it when set.
edit('controller.ts', '      const { title, authors = [] } = book.spec;', '      const { replicas, message, color } = book.spec;');
edit('controller.ts', "        data: authors.length > 0 ? { title, authors: authors.join('\\n') } : { title },",
  '        data: { replicas: String(replicas), message, ...(color && { color }) },');
// 5. The tests' sample spec.
edit('controller.test.ts', "const sample = (text: string): BookSpec => ({ title: text });",
  "const sample = (text: string): BookSpec => ({ replicas: 1, message: text });");
END
# 6. crd.yaml and deploy.yaml, from what the file declares.
manifests() {
  npx tsx controller.ts manifests crd >crd.yaml
  npx tsx controller.ts manifests deploy >deploy.yaml
  if grep -qi book crd.yaml deploy.yaml; then say "crd.yaml or deploy.yaml says book:" && grep -ni book crd.yaml deploy.yaml && exit 1; fi
}
manifests
edited() { diff "$1.orig" "$1" | grep -c '^>' || true; }
say "steps 1-5 wrote $(edited controller.ts) lines of controller.ts and $(edited controller.test.ts) of controller.test.ts; step 6 generated crd.yaml and deploy.yaml"
cp controller.ts controller.ts.orig

say "the copy's tests"
t=$SECONDS
# As the project's npm test runs them: 7 processes side by side (e2e/lanes.ts), since most of
# their time is waiting on purpose; in one process they take 5 minutes.
# A failure is said now, its log at the end: the checks below run too.
# (The spec reporter: the dot reporter drops why a file failed to load, e.g. a missing package.)
if npx node "$here"/e2e/lanes.ts 7 tsx --test --test-timeout=120000 controller.test.ts \
  >tests.log 2>&1; then
  say "the copy's tests passed in $((SECONDS - t))s"
else
  tests_failed=1
  say "the copy's tests FAILED in $((SECONDS - t))s (their log at the end), going on:"
  grep -E '^[0-9]│ *✖ ' tests.log | grep -v 'failing tests:' | sed -E 's/^[0-9]+│ *//; s/ \([0-9.]+ms\)$//' |
    sort -u >&2
  grep -o 'Error \[ERR_[A-Z_]*\]: .*' tests.log | sort -u | head -n 3 >&2 || true # one that stops a file loading
fi

say "step 4 further: a Secret, a status field, a requeue; then step 6 again"
npx node --input-type=module - <<'END'
import { edit } from './edit.mjs';
// 4, further. What it owns (a Secret too), a status field of its own (when it last looked), and in
// reconcile: a Secret made once (created when there is none, so its token never changes), and a
// look every CHECK seconds whose time is written only when one is due, so that a restart over
// widgets that are right writes nothing.
edit('controller.ts', "export const OWNED: Owned[] = [{ apiVersion: 'v1', kind: 'ConfigMap', plural: 'configmaps' }];",
  `export const OWNED: Owned[] = [
  { apiVersion: 'v1', kind: 'ConfigMap', plural: 'configmaps' },
  { apiVersion: 'v1', kind: 'Secret', plural: 'secrets', keep: true }, // kept: client.get reads it
];`);
edit('controller.ts', 'export const STATUS = {} as const satisfies Fields;',
  "export const STATUS = { lastChecked: { type: 'string', column: 'Checked' } } as const satisfies Fields;");
edit('controller.ts', 'export async function reconcile(change: Change, book: Book, { client }: Context): Promise<void> {',
  `const CHECK = 10; // seconds between looks at a widget
export async function reconcile(
  change: Change,
  book: Book,
  { client, status }: Context,
): Promise<Result | void> {`);
edit('controller.ts', `      await client.apply(\`/api/v1/namespaces/\${namespace}/configmaps/\${name}\`, configMap);
      break;`, `      await client.apply(\`/api/v1/namespaces/\${namespace}/configmaps/\${name}\`, configMap);
      const secrets = \`/api/v1/namespaces/\${namespace}/secrets\`;
      if (!(await client.get(\`\${secrets}/\${name}\`))) {
        await client.create(secrets, {
          apiVersion: 'v1',
          kind: 'Secret',
          metadata: { name, namespace, labels: MANAGED_BY, ownerReferences: [ownerReference(book)] },
          stringData: { token: randomUUID() },
        });
      }
      const age = (Date.now() - (Date.parse(String(status.lastChecked)) || 0)) / 1000;
      if (age < CHECK) return { requeueAfter: CHECK - age };
      return { status: { lastChecked: new Date().toISOString() }, requeueAfter: CHECK };`);
END
manifests
say "that wrote $(edited controller.ts) more lines of controller.ts; crd.yaml and deploy.yaml generated again"

say "the copy against the fake API server"
npx tsx --input-type=module - <<'EOF'
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { FakeApiServer, writeKubeconfig } from './fake-apiserver.ts';

const CHECK = 10; // the copy's reconcile looks again every CHECK seconds
const fake = await new FakeApiServer().listen();
fake.collectGarbage = true;
const kubeconfig = writeKubeconfig({ server: fake.url });
const run = (args) => {
  // node --import tsx, not npx tsx: npx does not pass SIGTERM on.
  const child = spawn(process.execPath, ['--import', 'tsx', 'controller.ts', ...args], {
    env: { ...process.env, KUBECONFIG: kubeconfig },
  });
  const out = { stdout: '', stderr: '', child };
  child.stdout.setEncoding('utf8').on('data', (text) => { out.stdout += text; });
  child.stderr.setEncoding('utf8').on('data', (text) => { out.stderr += text; });
  return out;
};
const stop = async (controller) => {
  controller.child.kill('SIGTERM');
  const [code] = await once(controller.child, 'exit');
  assert.equal(code, 0, controller.stderr);
};
const until = async (what, condition, ms = 20_000) => {
  const deadline = Date.now() + ms;
  for (let value = condition(); ; value = condition()) {
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
};
// The lastChecked values the status writes (JSON patches) carried, each once, in order.
const checks = () => [...new Set(fake.patches().flatMap((r) => [...JSON.stringify(r.body).matchAll(/"lastChecked":"([^"]+)"/g)].map((m) => m[1])))];

const help = run(['--help']);
await once(help.child, 'exit');
const controller = run(['--leader-elect']);
await until('the controller to lead and watch', () => fake.openWatches > 0 && fake.openWatchesOf('secrets') > 0);
fake.create('gizmo', { replicas: 2, message: 'hello', color: 'blue' });
await until('Added', () => controller.stdout.includes('Added'));
const [first] = await until('a status write with lastChecked', () => checks().length > 0 && checks());
const configMap = fake.configMap('default', 'gizmo');
const secret = fake.secret('default', 'gizmo');
const token = secret?.data?.token;
fake.update('gizmo', { replicas: 3, message: 'hello again', color: 'blue' });
await until('Modified', () => controller.stdout.includes('Modified'));
await until('the status of generation 2', () => fake.get('gizmo')?.status?.observedGeneration === 2);
assert.equal(fake.get('gizmo')?.status?.lastChecked, first, 'lastChecked kept across a spec change');
assert.equal(fake.secret('default', 'gizmo')?.data?.token, token, 'the token unchanged by a spec change');
const [, second] = await until('the requeue: a newer lastChecked', () => checks().length > 1 && checks(), (CHECK + 5) * 1000);
const apart = (Date.parse(second) - Date.parse(first)) / 1000;
assert.ok(apart >= CHECK && apart < CHECK + 3, `lastChecked ${first}, then ${second}`);
const lease = fake.lease('default', 'widget-controller');
await stop(controller);

// A restart over a widget that is right, within CHECK seconds of its last look: it writes nothing,
// and asks nothing about the Secret but the list and the watch.
const since = fake.requests.length;
const again = run(['--leader-elect']);
await until('Added again, after the restart', () => again.stdout.includes('Added'));
await new Promise((resolve) => setTimeout(resolve, 1000)); // a status write would come by then
const after = fake.requests.slice(since);
const writes = after.filter((r) => !['list', 'watch', 'get'].includes(r.verb) && r.resource !== 'leases');
assert.deepEqual(writes.map((r) => `${r.verb} ${r.path}`), [], 'the restart wrote nothing');
const secretRequests = after.filter((r) => r.resource === 'secrets' && !['list', 'watch'].includes(r.verb));
assert.deepEqual(secretRequests.map((r) => `${r.verb} ${r.path}`), [], 'no Secret request but list and watch');
assert.equal(fake.secret('default', 'gizmo')?.data?.token, token, 'the token unchanged by a restart');
fake.remove('gizmo');
await until('Deleted', () => again.stdout.includes('Deleted'));
await until('the garbage collector', () => !fake.configMap('default', 'gizmo') && !fake.secret('default', 'gizmo'));
await stop(again);
fake.close();

const lines = (controller.stdout + again.stdout).trim().split('\n');
console.log(lines.join('\n'));
assert.deepEqual(lines, [
  "Added a widget gizmo with message 'hello'",
  "Modified a widget gizmo with message 'hello again'",
  "Added a widget gizmo with message 'hello again'",
  'Deleted a widget gizmo',
]);
assert.ok(lease, 'the Lease is widget-controller');
assert.deepEqual(configMap?.data, { replicas: '2', message: 'hello', color: 'blue' });
assert.deepEqual(configMap?.metadata.labels, { 'app.kubernetes.io/managed-by': 'widget-controller' });
assert.equal(configMap?.metadata.ownerReferences?.[0]?.apiVersion, 'acme.io/v1');
assert.equal(configMap?.metadata.ownerReferences?.[0]?.kind, 'Widget');
assert.deepEqual(secret?.metadata.labels, { 'app.kubernetes.io/managed-by': 'widget-controller' });
assert.equal(secret?.metadata.ownerReferences?.[0]?.kind, 'Widget');
assert.equal(secret?.metadata.ownerReferences?.[0]?.controller, true);
assert.match(Buffer.from(token ?? '', 'base64').toString(), /^[0-9a-f-]{36}$/);
assert.equal(fake.requestsFor('secrets', 'create').length, 1, 'the Secret made once');
assert.match(help.stdout, /Reconciles Widget resources \(widgets\.acme\.io\)/);
assert.match(help.stdout, /the Lease widget-controller/);
for (const [what, text] of [['stdout', lines.join('\n')], ['stderr', controller.stderr + again.stderr], ['--help', help.stdout + help.stderr]]) {
  assert.doesNotMatch(text, /book/i, `${what} says book: ${text}`);
}
console.log(`color reached reconcile: ConfigMap data ${JSON.stringify(configMap?.data)}`);
console.log(`Secret made once, token kept across a spec change and a restart; requeued ${apart.toFixed(1)}s after the first look`);
console.log(`the restart sent ${after.length} requests, none a write; stderr: ${JSON.stringify(controller.stderr + again.stderr)}`);
EOF

say "the copy on a real kube-apiserver, as deploy.yaml's ServiceAccount"
mkdir -p e2e && cp "$here"/e2e/cluster.ts e2e/
# The binaries e2e/build.sh built (it says where), as a copy of cluster.ts finds them: E2E_BIN.
E2E_BIN=${E2E_BIN:-$(bash "$here"/e2e/build.sh 2>build.log)} || { cat build.log >&2; exit 1; }
export E2E_BIN
npx tsx --input-type=module - <<'EOF'
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { readAudit, startOwnCluster, waitFor } from './e2e/cluster.ts';

const CHECK = 10; // the copy's reconcile looks again every CHECK seconds
const cluster = await startOwnCluster({ label: 'copy' });
const controllers = [];
try {
  const { kubectlOk } = cluster;
  await kubectlOk(['apply', '-f', 'crd.yaml', '-f', 'deploy.yaml']);
  await kubectlOk(['wait', '--for=condition=Established', '-f', 'crd.yaml', '--timeout=60s']);
  await cluster.startGarbageCollector();
  await kubectlOk(['create', 'namespace', 'shop']);
  // A kubeconfig with a token of the ServiceAccount deploy.yaml defines: the generated RBAC is all it has.
  const token = (await kubectlOk(['create', 'token', 'widget-controller', '-n', 'widget-controller'])).trim();
  const view = JSON.parse(await kubectlOk(['config', 'view', '--minify', '--raw', '-o', 'json']));
  view.users = [{ name: 'sa', user: { token } }];
  view.contexts = [{ name: 'sa', context: { cluster: view.clusters[0].name, user: 'sa' } }];
  view['current-context'] = 'sa';
  const kubeconfig = join(cluster.dir, 'widget-controller.kubeconfig');
  writeFileSync(kubeconfig, JSON.stringify(view));
  const sa = 'system:serviceaccount:widget-controller:widget-controller';

  // As the Deployment runs it: -A --leader-elect, the Lease in its own namespace.
  const run = () => {
    const child = spawn(process.execPath, ['--import', 'tsx', 'controller.ts', '-A', '--leader-elect'], {
      env: { ...process.env, KUBECONFIG: kubeconfig, POD_NAMESPACE: 'widget-controller' },
    });
    const out = { stdout: '', stderr: '', child };
    child.stdout.setEncoding('utf8').on('data', (text) => { out.stdout += text; });
    child.stderr.setEncoding('utf8').on('data', (text) => { out.stderr += text; });
    controllers.push(out);
    return out;
  };
  const stop = async (controller) => {
    controller.child.kill('SIGTERM');
    const [code] = await once(controller.child, 'exit');
    assert.equal(code, 0, controller.stderr);
  };
  const line = (controller, text) =>
    waitFor(`the line ${text}`, () => (controller.stdout.includes(text) ? true : undefined), 60_000);
  const get = async (what) => JSON.parse(await kubectlOk(['get', what, '-n', 'shop', '-o', 'json']));
  const widget = (spec) => kubectlOk(['apply', '-f', '-'], {
    input: JSON.stringify({ apiVersion: 'acme.io/v1', kind: 'Widget', metadata: { name: 'gizmo', namespace: 'shop' }, spec }),
  });
  const readyAt = async (generation) => {
    await kubectlOk(['wait', '--for=condition=Ready', 'widget/gizmo', '-n', 'shop', '--timeout=60s']);
    return waitFor(`widget gizmo Ready at generation ${generation}`, async () => {
      const { status } = await get('widget/gizmo');
      return status?.observedGeneration === generation ? status : undefined;
    });
  };

  const controller = run();
  await widget({ replicas: 2, message: 'hello', color: 'green' });
  await line(controller, "Added a widget shop/gizmo with message 'hello'");
  const first = await readyAt(1);
  const configMap = await get('configmap/gizmo');
  const secret = await get('secret/gizmo');
  const owner = await get('widget/gizmo');
  assert.deepEqual(configMap.data, { replicas: '2', message: 'hello', color: 'green' });
  for (const made of [configMap, secret]) {
    assert.deepEqual(made.metadata.labels, { 'app.kubernetes.io/managed-by': 'widget-controller' });
    assert.equal(made.metadata.ownerReferences?.[0]?.uid, owner.metadata.uid);
    assert.equal(made.metadata.ownerReferences?.[0]?.controller, true);
  }
  assert.match(Buffer.from(secret.data.token, 'base64').toString(), /^[0-9a-f-]{36}$/);
  assert.ok(first.lastChecked, 'lastChecked written with Ready');

  // A spec change: Modified, Ready at generation 2, the status keeps lastChecked, the token stays.
  await widget({ replicas: 3, message: 'hello again', color: 'green' });
  await line(controller, "Modified a widget shop/gizmo with message 'hello again'");
  const second = await readyAt(2);
  assert.equal(second.lastChecked, first.lastChecked, 'lastChecked kept across a spec change');
  assert.equal((await get('secret/gizmo')).data.token, secret.data.token);

  // The requeue: lastChecked moves CHECK seconds later. Restart at once: a widget that is right.
  const checked = await waitFor('the requeue: a newer lastChecked', async () => {
    const { status } = await get('widget/gizmo');
    return status.lastChecked !== first.lastChecked ? status.lastChecked : undefined;
  }, (CHECK + 10) * 1000);
  const apart = (Date.parse(checked) - Date.parse(first.lastChecked)) / 1000;
  assert.ok(apart >= CHECK && apart < CHECK + 3, `lastChecked ${first.lastChecked}, then ${checked}`);
  const versions = async () =>
    Promise.all(['widget/gizmo', 'configmap/gizmo', 'secret/gizmo'].map(async (what) => (await get(what)).metadata.resourceVersion));
  const before = await versions();
  await stop(controller);
  const restartedAt = Date.now();
  const again = run();
  await line(again, "Added a widget shop/gizmo with message 'hello again'");
  await new Promise((resolve) => setTimeout(resolve, 1000)); // a status write would come by then
  assert.deepEqual(await versions(), before, 'the restart changed nothing');
  const writes = readAudit(cluster.auditLog).filter(
    (event) =>
      event.stage === 'ResponseComplete' &&
      event.user.username === sa &&
      Date.parse(event.requestReceivedTimestamp) >= restartedAt &&
      !['get', 'list', 'watch'].includes(event.verb) &&
      event.objectRef?.resource !== 'leases',
  );
  assert.deepEqual(writes.map((e) => `${e.verb} ${e.requestURI}`), [], 'the restart wrote nothing');

  // Deleted: the garbage collector deletes the ConfigMap and the Secret the widget owned.
  await kubectlOk(['delete', 'widget', 'gizmo', '-n', 'shop']);
  await line(again, 'Deleted a widget shop/gizmo');
  await waitFor('the garbage collector to delete the ConfigMap and the Secret', async () => {
    const left = await kubectlOk(['get', 'configmap/gizmo', 'secret/gizmo', '-n', 'shop', '--ignore-not-found', '-o', 'name']);
    return left.trim() === '' ? true : undefined;
  });
  await stop(again);

  const stderr = controller.stderr + again.stderr;
  assert.doesNotMatch(stderr, /forbidden|not allowed|cannot/i, stderr);
  const lines = (controller.stdout + again.stdout).trim().split('\n');
  console.log(lines.join('\n'));
  assert.deepEqual(lines, [
    "Added a widget shop/gizmo with message 'hello'",
    "Modified a widget shop/gizmo with message 'hello again'",
    "Added a widget shop/gizmo with message 'hello again'",
    'Deleted a widget shop/gizmo',
  ]);
  assert.doesNotMatch(lines.join('\n') + stderr, /book/i);
  const secretWrites = readAudit(cluster.auditLog).filter(
    (e) => e.stage === 'ResponseComplete' && e.objectRef?.resource === 'secrets' && e.user.username === sa && ['create', 'patch', 'update'].includes(e.verb),
  );
  assert.deepEqual(secretWrites.map((e) => `${e.verb} ${e.responseStatus?.code}`), ['create 201'], 'the Secret made once');
  console.log(`color reached reconcile: ConfigMap data ${JSON.stringify(configMap.data)}`);
  console.log(`as ${sa}: Ready, the Secret made once, lastChecked kept across a spec change, requeued ${apart.toFixed(1)}s after the first look`);
  console.log(`the restart wrote nothing (resourceVersions ${before.join(', ')} unchanged); the garbage collector deleted the ConfigMap and the Secret; stderr: ${JSON.stringify(stderr)}`);
} finally {
  for (const { child } of controllers) if (child.exitCode === null) child.kill('SIGKILL');
  await cluster.stop();
}
EOF
if [ -n "$tests_failed" ]; then say "all else works ($((SECONDS - began))s)" && exit 1; fi
say "the copy works ($((SECONDS - began))s)"
