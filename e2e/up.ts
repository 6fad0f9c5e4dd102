// A real control plane one command away, for a reader with no cluster (what envtest and kind give
// Go users): the e2e suite's etcd, kube-apiserver and kube-controller-manager (garbage collector and
// namespace controller), on loopback, with crd.yaml and deploy.yaml applied, until Ctrl-C.
//
//   npm run cluster                      # or: npx tsx e2e/up.ts [--keep]
//   export KUBECONFIG=...                # the line it prints, in another terminal; then as usual:
//   npx tsx controller.ts
//   kubectl apply -f book.yaml           # kubectl: the one it names, if you have none
//
// e2e/build.sh builds the binaries first (10-25 minutes once per machine, on 2 cores; then a
// second). There is no kubelet: the Deployment from deploy.yaml is stored, but never runs pods.
// Ctrl-C (SIGINT), SIGTERM or SIGHUP stops everything and removes the temp folder (kubeconfig,
// logs, audit log, etcd's data) unless --keep; a second Ctrl-C (a second later) kills at once.

import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { type Cluster, handleSignalsYourself, ROOT, startOwnCluster } from './cluster.ts';

const USAGE = `Usage: npm run cluster [-- --keep]   (or: npx tsx e2e/up.ts [--keep])

Builds (or reuses) etcd, kube-apiserver, kube-controller-manager and kubectl with e2e/build.sh,
starts them on 127.0.0.1, applies crd.yaml and deploy.yaml, prints the KUBECONFIG to use, and keeps
them up until Ctrl-C.

  --keep    keep the temp folder (kubeconfig, logs, audit log, etcd's data) after stopping
            (so does E2E_KEEP=1)
  -h, --help`;

const say = (line: string) => console.error(`cluster: ${line}`);

async function up(): Promise<number> {
  let args: { keep?: boolean; help?: boolean };
  try {
    args = parseArgs({
      options: { keep: { type: 'boolean' }, help: { type: 'boolean', short: 'h' } },
    }).values;
  } catch (err) {
    console.error(`${(err as Error).message}\n\n${USAGE}`);
    return 2;
  }
  if (args.help) {
    console.log(USAGE);
    return 0;
  }
  const began = Date.now();

  // The first SIGINT, SIGTERM or SIGHUP stops everything in order; another one a second later or
  // more kills at once (the daemons get SIGKILL as we exit). Not sooner: under `npm run`, one Ctrl-C
  // can arrive twice (from the terminal, and passed on by npm and tsx).
  handleSignalsYourself();
  const stop = new AbortController();
  const stopped = new Promise<'stop'>((resolve) =>
    stop.signal.addEventListener('abort', () => resolve('stop')),
  );
  let cluster: Cluster | undefined;
  let firstSignal = 0;
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.on(signal, () => {
      if (!stop.signal.aborted) {
        firstSignal = Date.now();
        say(`${signal}: stopping`);
        return stop.abort();
      }
      if (Date.now() - firstSignal < 1000) return;
      say(`${signal} again: killing everything now${cluster ? `; left ${cluster.dir}` : ''}`);
      process.exit(130);
    });
  }

  // 1. The binaries: e2e/build.sh builds what is missing (its progress on our stderr), and prints
  // their folder.
  const build = spawn('bash', [join(ROOT, 'e2e', 'build.sh')], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let printed = '';
  build.stdout.setEncoding('utf8').on('data', (text: string) => (printed += text));
  const onStop = () => build.kill('SIGTERM');
  stop.signal.addEventListener('abort', onStop);
  const [code] = await new Promise<[number | null]>((resolve) =>
    build.on('close', (exitCode) => resolve([exitCode])),
  );
  stop.signal.removeEventListener('abort', onStop);
  if (stop.signal.aborted) return 0;
  const bin = printed.trim().split('\n').pop() ?? '';
  if (code !== 0 || !bin) {
    say(`e2e/build.sh failed (exit ${code}): see its lines above`);
    return 1;
  }

  // 2. etcd and kube-apiserver, on ports the kernel picks.
  try {
    cluster = await startOwnCluster({
      bin,
      label: 'cluster',
      keep: args.keep ? true : undefined, // else E2E_KEEP=1, as for the tests
      // The garbage collector (a book's ConfigMap goes with the book), and the namespace
      // controller (kubectl delete namespace finishes). Nothing that needs nodes or pods.
      controllers: ['garbagecollector', 'namespace'],
    });
  } catch (err) {
    say(`could not start: ${(err as Error).message}`);
    return 1;
  }

  // 3. The manifests, then kube-controller-manager (after the CRD: its garbage collector rereads
  // discovery only every 30 s), each step given up on a signal.
  const running = cluster;
  const steps = async () => {
    const applied = ['crd.yaml', 'deploy.yaml'].filter((file) => existsSync(join(ROOT, file)));
    for (const file of applied) {
      await running.kubectlOk(['apply', '-f', file]);
      if (file === 'crd.yaml')
        await running.kubectlOk([
          'wait',
          '--for=condition=Established',
          '-f',
          file,
          '--timeout=60s',
        ]);
    }
    await running.startGarbageCollector();
    const version = await running.request('GET', '/version');
    return { applied, version: JSON.parse(version.body).gitVersion as string };
  };
  let outcome: Awaited<ReturnType<typeof steps>> | 'stop' | Error;
  try {
    outcome = await Promise.race([steps(), stopped, running.lost.then((why) => new Error(why))]);
  } catch (err) {
    outcome = err as Error;
  }
  if (outcome instanceof Error || outcome === 'stop') {
    if (outcome instanceof Error) say(`could not start: ${outcome.message}`);
    await running.stop();
    return outcome === 'stop' ? 0 : 1;
  }

  say(
    `kube-apiserver ${outcome.version} at ${running.server} (etcd, kube-controller-manager running); ` +
      `up in ${((Date.now() - began) / 1000).toFixed(1)}s`,
  );
  say(`applied ${outcome.applied.join(', ')}`);
  console.log(`export KUBECONFIG=${running.kubeconfig}`);
  say(`kubectl ${join(bin, 'kubectl')} if you have none (the same version as the server)`);
  say(`audit log ${running.auditLog} ; Ctrl-C stops it`);

  // 4. Up until a signal, or until one of the daemons dies.
  const end = await Promise.race([stopped, running.lost]);
  if (end !== 'stop') say(`stopping: ${end}`);
  await running.stop();
  return end === 'stop' ? 0 : 1;
}

process.exit(await up());
