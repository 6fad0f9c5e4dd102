#!/usr/bin/env bash
# The copy path, as the README's "Copy it into your own project" section tells it, tested:
#   1. a fresh project (npm init -y) with the listed installs and settings, and the files to copy;
#   2. the resource renamed to a Widget in acme.io, changing only what the checklist names;
#   3. the copy run against the fake API server: its lines, its stderr, --help, the Lease and the
#      ConfigMap's owner say widget/widgets/acme.io, and nothing says book; then its tests.
# Usage: bash e2e/copy.sh [DIR]   (default: a new temporary directory, removed afterwards)
# It needs npm (any Node: the copy brings Node 24 as a dev dependency) and the npm registry.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${1:-$(mktemp -d /tmp/widget-controller.XXXXXX)}
[ -n "${1:-}" ] || trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir"
cd "$dir"
say() { printf 'copy: %s\n' "$*" >&2; }

say "a new project in $dir, as the README says"
npm init -y >/dev/null
npm pkg set type=module
# npm 11 runs no install scripts unless allowed: tsx's esbuild and the node package need theirs.
npm pkg set allowScripts.esbuild=true allowScripts.node=true --json
printf 'loglevel=error\n' >.npmrc # npm on an older Node warns EBADENGINE about the Node it installs
npm install --save-exact @kubernetes/client-node@2.0.1
npm install --save-dev --save-exact node@24.21.0 tsx@4.23.15 msw@3.0.5
cp "$here"/controller.ts "$here"/controller.test.ts "$here"/fake-apiserver.ts "$here"/crd.yaml \
  "$here"/deploy.yaml .
say "node on PATH: $(node --version); npx node: $(npx node --version)"

say "renaming the resource to a Widget in acme.io, changing only what the checklist names"
npx node --input-type=module - <<'EOF'
import { readFileSync, writeFileSync } from 'node:fs';
// Replaces `from` with `to` in `file`; each must be there exactly once, so that the checklist and
// the files cannot drift apart unnoticed.
function edit(file, from, to) {
  const text = readFileSync(file, 'utf8');
  if (text.split(from).length !== 2) throw new Error(`${file}: not exactly one ${JSON.stringify(from)}`);
  writeFileSync(file, text.replace(from, to));
}
// controller.ts, checklist 1: the resource.
edit('controller.ts', "export const GROUP = 'example.technosophos.com';", "export const GROUP = 'acme.io';");
edit('controller.ts', "export const KIND = 'Book';", "export const KIND = 'Widget';");
edit('controller.ts', "export const PLURAL = 'books';", "export const PLURAL = 'widgets';");
// 2: the spec, and its check.
edit('controller.ts', `export interface BookSpec {
  title: string;
  authors?: string[];
}`, `export interface BookSpec {
  replicas: number;
  message: string;
}`);
edit('controller.ts', `  const { title, authors } = spec;
  if (typeof title !== 'string') return 'spec.title is not a string';
  if (authors === undefined) return { title };
  if (!Array.isArray(authors) || !authors.every((author) => typeof author === 'string')) {
    return 'spec.authors is not a list of strings';
  }
  return { title, authors };`, `  const { replicas, message } = spec;
  if (!Number.isInteger(replicas)) return 'spec.replicas is not a whole number';
  if (typeof message !== 'string') return 'spec.message is not a string';
  return { replicas: Number(replicas), message };`);
// 3: the line printed.
edit('controller.ts', "return `${change} a ${kind} ${name} with title '${book.spec.title}'`;",
  "return `${change} a ${kind} ${name} with message '${book.spec.message}'`;");
// 4: what reconcile makes.
edit('controller.ts', `      const { title, authors = [] } = book.spec;`, `      const { replicas, message } = book.spec;`);
edit('controller.ts', `        data: authors.length > 0 ? { title, authors: authors.join('\\n') } : { title },`,
  `        data: { replicas: String(replicas), message },`);
// 5: the tests' sample spec.
edit('controller.test.ts', "const sample = (text: string): BookSpec => ({ title: text });",
  "const sample = (text: string): BookSpec => ({ replicas: 1, message: text });");
// 6: crd.yaml and deploy.yaml: the names.
for (const file of ['crd.yaml', 'deploy.yaml']) {
  const text = readFileSync(file, 'utf8');
  writeFileSync(file, text.replaceAll('example.technosophos.com', 'acme.io').replaceAll('books', 'widgets')
    .replaceAll('Book', 'Widget').replaceAll('book', 'widget'));
}
EOF

say "the copy against the fake API server"
npx tsx --input-type=module - <<'EOF'
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { FakeApiServer, writeKubeconfig } from './fake-apiserver.ts';

const fake = await new FakeApiServer().listen();
fake.collectGarbage = true;
const kubeconfig = writeKubeconfig({ server: fake.url });
const run = (args) => {
  // node --import tsx, not npx tsx: npx does not pass SIGTERM on.
  const command = [process.execPath, ['--import', 'tsx', 'controller.ts', ...args]];
  const child = spawn(...command, { env: { ...process.env, KUBECONFIG: kubeconfig } });
  const out = { stdout: '', stderr: '', child };
  child.stdout.setEncoding('utf8').on('data', (text) => { out.stdout += text; });
  child.stderr.setEncoding('utf8').on('data', (text) => { out.stderr += text; });
  return out;
};
const until = async (what, condition) => {
  const deadline = Date.now() + 20_000;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
};
const help = run(['--help']);
await once(help.child, 'exit');
const controller = run(['--leader-elect']);
await until('the controller to lead and watch', () => fake.openWatches > 0 && fake.openWatchesOf('configmaps') > 0);
fake.create('gizmo', { replicas: 2, message: 'hello' });
await until('Added', () => controller.stdout.includes('Added'));
const configMap = fake.configMap('default', 'gizmo');
fake.update('gizmo', { replicas: 3, message: 'hello again' });
await until('Modified', () => controller.stdout.includes('Modified'));
fake.remove('gizmo');
await until('Deleted', () => controller.stdout.includes('Deleted'));
const lease = fake.lease('default', 'widget-controller');
controller.child.kill('SIGTERM');
const [code] = await once(controller.child, 'exit');
fake.close();
const lines = controller.stdout.trim().split('\n');
console.log(lines.join('\n'));
assert.deepEqual(lines, [
  "Added a widget gizmo with message 'hello'",
  "Modified a widget gizmo with message 'hello again'",
  'Deleted a widget gizmo',
]);
assert.equal(code, 0);
assert.ok(lease, 'the Lease is widget-controller');
assert.deepEqual(configMap?.data, { replicas: '2', message: 'hello' });
assert.deepEqual(configMap?.metadata.labels, { 'app.kubernetes.io/managed-by': 'widget-controller' });
assert.equal(configMap?.metadata.ownerReferences?.[0]?.apiVersion, 'acme.io/v1');
assert.equal(configMap?.metadata.ownerReferences?.[0]?.kind, 'Widget');
assert.match(help.stdout, /Reconciles Widget resources \(widgets\.acme\.io\)/);
assert.match(help.stdout, /the Lease widget-controller/);
for (const [what, text] of [['stdout', controller.stdout], ['stderr', controller.stderr], ['--help', help.stdout + help.stderr]]) {
  assert.doesNotMatch(text, /book/i, `${what} says book: ${text}`);
}
console.log(`stderr: ${JSON.stringify(controller.stderr)}`);
EOF

say "the copy's tests"
npx tsx --test --test-timeout=120000 controller.test.ts
say "the copy works"
