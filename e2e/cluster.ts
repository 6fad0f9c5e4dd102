// A real control plane for the end-to-end suite: etcd and kube-apiserver on loopback, started and
// stopped by the tests themselves (envtest's approach), built by e2e/build.sh into a cache outside
// the repository.
//
//   const cluster = await startCluster();   // etcd + kube-apiserver, kubeconfigs for admin and nobody
//   cluster.kubectl(['apply', '-f', 'crd.yaml']);
//   await cluster.startGarbageCollector();  // kube-controller-manager with only its garbage collector
//   await cluster.stop();                   // SIGTERM, then SIGKILL; prints their peak RSS
//
// E2E_EXISTING_CLUSTER=1 with KUBECONFIG naming a cluster (kind, k3d, ...): use that one instead;
// the cases that restart the server or read its audit log are then skipped.
// E2E_KEEP=1 keeps the temp folder (logs, audit log, kubeconfigs) for a look afterwards.
// E2E_BIN names the folder holding the binaries, for a copy of this file without e2e/build.sh.
// A copy needs ../fake-apiserver.ts beside it too (freePort), as the copy path has it.
// e2e/up.ts (npm run cluster) starts the same control plane for a person, until Ctrl-C.

import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, generateKeyPairSync, randomBytes } from 'node:crypto';
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import * as https from 'node:https';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { GROUP, OWNED } from '../controller.ts';
import { freePort } from '../fake-apiserver.ts';

export const ROOT = fileURLToPath(new URL('..', import.meta.url));

/**
 * Where e2e/build.sh puts the binaries: the versions come from the wrapper modules (e2e/apiserver
 * and e2e/etcd's go.mod). E2E_BIN overrides it. Without the go.mod files (this file copied alone),
 * the newest build in the cache, if there is one.
 */
export function binDir(): string {
  if (process.env.E2E_BIN) return process.env.E2E_BIN;
  const cache =
    process.env.E2E_CACHE ??
    join(process.env.XDG_CACHE_HOME ?? join(homedir(), '.cache'), 'book-controller-e2e');
  const version = (file: string, module: string) => {
    const path = join(ROOT, 'e2e', file);
    if (!existsSync(path)) return undefined;
    return readFileSync(path, 'utf8').match(new RegExp(`^require ${module} (\\S+)`, 'm'))?.[1];
  };
  const k8s = version('apiserver/go.mod', 'k8s.io/kubernetes');
  const etcd = version('etcd/go.mod', 'go.etcd.io/etcd/server/v3');
  if (k8s && etcd) return join(cache, `kubernetes-${k8s}-etcd-${etcd}`);
  const built = (existsSync(cache) ? readdirSync(cache) : [])
    .filter((name) => name.startsWith('kubernetes-'))
    .map((name) => join(cache, name))
    .filter((dir) => existsSync(join(dir, 'kube-apiserver')))
    .sort((a, b) => statSync(b).mtimeMs - statSync(a).mtimeMs);
  if (built[0]) return built[0];
  throw new Error(
    `no e2e/apiserver/go.mod and e2e/etcd/go.mod to read the versions from, and no build in ${cache}: ` +
      'set E2E_BIN to a folder holding etcd, kube-apiserver, kube-controller-manager and kubectl',
  );
}

export interface KubectlResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

export interface Cluster {
  /** true with E2E_EXISTING_CLUSTER=1: no restarts, no audit log. */
  existing: boolean;
  /** The admin's kubeconfig (system:masters), and one for a user with no rights at all. */
  kubeconfig: string;
  nobodyKubeconfig: string;
  /** https://127.0.0.1:PORT */
  server: string;
  /** The CA that signed the server's certificate (PEM), and the admin's bearer token. */
  ca: string;
  token: string;
  /** One JSON object per line (audit.k8s.io/v1 Event), or undefined for an existing cluster. */
  auditLog: string | undefined;
  dir: string;
  /** Runs the real kubectl, as a user would (admin unless another kubeconfig is given). */
  kubectl(
    args: string[],
    options?: { kubeconfig?: string; input?: string },
  ): Promise<KubectlResult>;
  /** The same, failing with kubectl's own message unless it exits 0; returns its stdout. */
  kubectlOk(args: string[], options?: { kubeconfig?: string; input?: string }): Promise<string>;
  /** An authenticated HTTPS request straight to the server, for what kubectl does not show. */
  request(
    method: string,
    path: string,
    options?: { body?: string; contentType?: string; token?: string },
  ): Promise<{ status: number; body: string }>;
  /**
   * Stops kube-apiserver (etcd keeps running), and starts it again on the same port. `kill`: at once
   * with SIGKILL, as a crash or an OOM kill would (open responses are cut, not ended).
   */
  stopApiserver(options?: { kill?: boolean }): Promise<void>;
  startApiserver(): Promise<void>;
  /** A second kube-apiserver on the same etcd (another port): returns a kubeconfig for it, and its stop. */
  startSecondApiserver(): Promise<{ kubeconfig: string; stop: () => Promise<void> }>;
  /** Compacts etcd's history up to now, as the apiserver does every --etcd-compaction-interval. */
  compact(): Promise<number>;
  /**
   * Starts kube-controller-manager with only its garbage collector (once; later calls wait for the
   * first), and resolves when the collector watches every resource. Call it after the CRDs are in:
   * the collector rereads discovery only every 30 s. With E2E_EXISTING_CLUSTER=1 the cluster's own
   * collector does the job, and this resolves at once.
   */
  startGarbageCollector(): Promise<void>;
  /**
   * Resolves, naming it and with its log's last lines, when etcd, kube-apiserver or
   * kube-controller-manager exits unasked (never for an existing cluster): for a program that keeps
   * the cluster up (e2e/up.ts).
   */
  lost: Promise<string>;
  /** Stops everything; prints the peak RSS of etcd, kube-apiserver and kube-controller-manager. */
  stop(): Promise<void>;
}

export interface ClusterOptions {
  /** The folder holding etcd, kube-apiserver, kube-controller-manager and kubectl (default: binDir()). */
  bin?: string;
  /** Keep the temp folder (logs, audit log, kubeconfigs) after stop (default: E2E_KEEP=1). */
  keep?: boolean;
  /** What kube-controller-manager runs (--controllers), started by startGarbageCollector. */
  controllers?: string[];
  /** The prefix of the lines printed on stderr, and of the temp folder's name (default: e2e). */
  label?: string;
}

const ADMIN_TOKEN = randomBytes(16).toString('hex');
const NOBODY_TOKEN = randomBytes(16).toString('hex');

/** A child process with its output in a log file, its peak RSS, and a stop that always ends it. */
class Daemon {
  child: ChildProcess;
  peakRssKiB = 0;
  exited: Promise<number | null>;
  name: string;
  log: string;
  /** Set by stop: an exit from then on was asked for. */
  stopping = false;

  constructor(name: string, program: string, args: string[], log: string) {
    this.name = name;
    this.log = log;
    writeFileSync(log, `$ ${program} ${args.join(' ')}\n`);
    const out = openSync(log, 'a'); // the child writes its log itself
    // In its own process group: a Ctrl-C in the terminal reaches only us, and stop() ends the
    // daemons in order (kube-controller-manager, kube-apiserver, then etcd), not all at once.
    this.child = spawn(program, args, { stdio: ['ignore', out, out], detached: true });
    this.exited = new Promise((resolve) =>
      this.child.on('exit', (code, signal) => resolve(code ?? (signal ? -1 : null))),
    );
    running.add(this);
    // If this process dies without stopping us (SIGKILL, a runner's timeout), a watchdog ends the daemon.
    spawn(
      'sh',
      [
        '-c',
        'while kill -0 "$0" 2>/dev/null && kill -0 "$1" 2>/dev/null; do sleep 1; done; kill -9 "$1" 2>/dev/null',
        String(process.pid),
        String(this.child.pid),
      ],
      { stdio: 'ignore', detached: true },
    ).unref();
  }

  get alive() {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /** VmHWM: the most resident memory the process ever had, while it still runs. */
  sampleRss() {
    try {
      const status = readFileSync(`/proc/${this.child.pid}/status`, 'utf8');
      const kib = Number(status.match(/^VmHWM:\s+(\d+) kB/m)?.[1] ?? 0);
      this.peakRssKiB = Math.max(this.peakRssKiB, kib);
    } catch {} // not Linux, or already gone
  }

  async stop(now = false) {
    this.stopping = true;
    if (!this.alive) return;
    this.sampleRss();
    // process.kill, not child.kill: Deno's child.kill does nothing once it has sent one signal.
    // kube-apiserver waits up to 60 s for open HTTP/2 streams (Deno's watches) on SIGTERM: 5 s is plenty here.
    const kill = (signal: NodeJS.Signals) => {
      try {
        process.kill(this.child.pid ?? 0, signal);
      } catch {}
    };
    kill(now ? 'SIGKILL' : 'SIGTERM');
    const timer = setTimeout(() => kill('SIGKILL'), 5_000);
    await this.exited;
    clearTimeout(timer);
    running.delete(this);
  }

  tail(lines = 20) {
    try {
      return readFileSync(this.log, 'utf8').trimEnd().split('\n').slice(-lines).join('\n');
    } catch {
      return '';
    }
  }
}

// Whatever happens to the test run (a failed assertion, an uncaught error), no daemon outlives it.
const running = new Set<Daemon>();
process.on('exit', () => {
  for (const daemon of running) daemon.child.kill('SIGKILL');
});
const SIGNALS = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;
function killAllAndDie(signal: NodeJS.Signals) {
  for (const daemon of running) daemon.child.kill('SIGKILL');
  process.kill(process.pid, signal);
}
for (const signal of SIGNALS) process.once(signal, killAllAndDie);

/**
 * For a program that stops the cluster itself on SIGINT, SIGTERM and SIGHUP (cluster.stop(), then
 * exit), as e2e/up.ts does: turns off the default, which SIGKILLs the daemons and dies of the signal.
 */
export function handleSignalsYourself() {
  for (const signal of SIGNALS) process.off(signal, killAllAndDie);
}

/** Thrown inside waitFor's fn: stop waiting at once (the process waited on is gone). */
export class GiveUp extends Error {}

/** Polls until fn returns a value, or fails naming what it waited for. */
export async function waitFor<T>(
  what: string,
  fn: () => Promise<T | undefined> | T | undefined,
  timeoutMs = 60_000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const value = await fn();
      if (value !== undefined) return value;
    } catch (err) {
      if (err instanceof GiveUp) throw err;
      last = err;
    }
    if (Date.now() > deadline)
      throw new Error(
        `timed out after ${timeoutMs / 1000}s waiting for ${what}${last ? ` (last error: ${String(last)})` : ''}`,
      );
    await sleep(100);
  }
}

function httpsRequest(
  url: string,
  ca: string,
  token: string,
  method = 'GET',
  body?: string,
  contentType = 'application/json',
) {
  return new Promise<{ status: number; body: string }>((resolve, reject) => {
    const request = https.request(
      url,
      {
        method,
        ca,
        headers: {
          authorization: `Bearer ${token}`,
          ...(body === undefined ? {} : { 'content-type': contentType }),
        },
        timeout: 10_000,
      },
      (response) => {
        let text = '';
        response
          .setEncoding('utf8')
          .on('data', (chunk: string) => (text += chunk))
          .on('end', () => resolve({ status: response.statusCode ?? 0, body: text }));
      },
    );
    request
      .on('error', reject)
      .on('timeout', () => request.destroy(new Error(`${method} ${url}: no answer in 10s`)));
    request.end(body);
  });
}

function kubeconfigFor(server: string, ca: string, user: string, token: string): string {
  // JSON is YAML: kubectl and client-node read it alike.
  return JSON.stringify(
    {
      apiVersion: 'v1',
      kind: 'Config',
      clusters: [
        {
          name: 'e2e',
          cluster: { server, 'certificate-authority-data': Buffer.from(ca).toString('base64') },
        },
      ],
      users: [{ name: user, user: { token } }],
      contexts: [{ name: user, context: { cluster: 'e2e', user, namespace: 'default' } }],
      'current-context': user,
    },
    null,
    2,
  );
}

function runKubectl(
  kubectl: string,
  kubeconfig: string,
  args: string[],
  input?: string,
): Promise<KubectlResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(kubectl, args, {
      env: { ...process.env, KUBECONFIG: kubeconfig },
      cwd: ROOT,
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (text: string) => (stdout += text));
    child.stderr.setEncoding('utf8').on('data', (text: string) => (stderr += text));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
    child.stdin.end(input);
  });
}

function withKubectl(kubectl: string, defaultKubeconfig: () => string) {
  const run = (args: string[], options: { kubeconfig?: string; input?: string } = {}) =>
    runKubectl(kubectl, options.kubeconfig ?? defaultKubeconfig(), args, options.input);
  const ok = async (args: string[], options: { kubeconfig?: string; input?: string } = {}) => {
    const result = await run(args, options);
    if (result.code !== 0)
      throw new Error(`kubectl ${args.join(' ')} exited ${result.code}: ${result.stderr.trim()}`);
    return result.stdout;
  };
  return { kubectl: run, kubectlOk: ok };
}

/** Our own control plane, or with E2E_EXISTING_CLUSTER=1 the one KUBECONFIG names. */
export async function startCluster(options: ClusterOptions = {}): Promise<Cluster> {
  return process.env.E2E_EXISTING_CLUSTER === '1' ? existingCluster() : startOwnCluster(options);
}

/** A kind reconcile makes, as controller.ts's OWNED names it (core kinds: apiVersion v1). */
export interface OwnedKind {
  apiVersion: string;
  kind?: string;
  plural: string;
}

/**
 * The audit policy: Metadata (each request's URI with the resourceVersion asked for, verb, user and
 * status) for the resource's group (GROUP: books and their status), the kinds reconcile makes
 * (OWNED: one `{apiVersion, kind, plural}` or a list of them), Leases and Events; nothing else.
 * From controller.ts's constants, so that a copy's writes are logged: a renamed resource, Secrets.
 */
export function auditPolicy(
  group: string = GROUP,
  ownedKinds: OwnedKind | readonly OwnedKind[] = OWNED,
): object {
  const owned = ([] as OwnedKind[]).concat(ownedKinds);
  const byGroup = new Map<string, Set<string>>([
    ['coordination.k8s.io', new Set(['leases'])],
    ['', new Set(['events'])],
  ]);
  for (const { apiVersion, plural } of owned) {
    const its = apiVersion.includes('/') ? (apiVersion.split('/')[0] ?? '') : '';
    if (its === group) continue; // the whole group is in already
    byGroup.set(its, (byGroup.get(its) ?? new Set()).add(plural));
  }
  return {
    apiVersion: 'audit.k8s.io/v1',
    kind: 'Policy',
    omitStages: ['RequestReceived'],
    rules: [
      {
        level: 'Metadata',
        resources: [
          { group },
          ...[...byGroup].map(([group, resources]) => ({ group, resources: [...resources] })),
        ],
      },
      { level: 'None' },
    ],
  };
}

/** etcd and kube-apiserver on loopback, in a new temp folder (whatever E2E_EXISTING_CLUSTER says). */
export async function startOwnCluster(options: ClusterOptions = {}): Promise<Cluster> {
  const bin = options.bin ?? binDir();
  const label = options.label ?? 'e2e';
  const keep = options.keep ?? process.env.E2E_KEEP === '1';
  for (const name of ['etcd', 'kube-apiserver', 'kubectl']) {
    if (!existsSync(join(bin, name)))
      throw new Error(
        `no ${join(bin, name)}: build the control plane first with bash e2e/build.sh`,
      );
  }
  const dir = mkdtempSync(join(tmpdir(), `book-${label}-`));
  const started = Date.now();
  // Any daemon that exits unasked: the first one's name, exit code and last log lines.
  let lose: (what: string) => void = () => {};
  const lost = new Promise<string>((resolve) => (lose = resolve));
  const watch = (daemon: Daemon) => {
    daemon.exited.then((code) => {
      if (!daemon.stopping) lose(`${daemon.name} exited (${code}):\n${daemon.tail()}`);
    });
    return daemon;
  };

  // etcd: loopback only, a throwaway data dir, no fsync (a test's data need not survive a power cut).
  const [clientPort, peerPort] = [await freePort(), await freePort()];
  const etcdUrl = `http://127.0.0.1:${clientPort}`;
  const peerUrl = `http://127.0.0.1:${peerPort}`;
  const etcd = watch(
    new Daemon(
      'etcd',
      join(bin, 'etcd'),
      [
        '--name=e2e',
        `--data-dir=${join(dir, 'etcd')}`,
        '--unsafe-no-fsync',
        '--log-level=warn',
        `--listen-client-urls=${etcdUrl}`,
        `--advertise-client-urls=${etcdUrl}`,
        `--listen-peer-urls=${peerUrl}`,
        `--initial-advertise-peer-urls=${peerUrl}`,
        `--initial-cluster=e2e=${peerUrl}`,
      ],
      join(dir, 'etcd.log'),
    ),
  );
  await waitFor(
    'etcd to answer /health',
    async () => {
      if (!etcd.alive) throw new GiveUp(`etcd exited:\n${etcd.tail()}`);
      const response = await fetch(`${etcdUrl}/health`).catch(() => undefined);
      return response?.ok ? true : undefined;
    },
    30_000,
  ).catch((err) => {
    etcd.stop();
    throw err;
  });

  // kube-apiserver's inputs: tokens, service-account keys, an audit policy.
  writeFileSync(
    join(dir, 'tokens.csv'),
    `${ADMIN_TOKEN},admin,admin-uid,"system:masters"\n${NOBODY_TOKEN},nobody,nobody-uid\n`,
  );
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
  writeFileSync(join(dir, 'sa.key'), privateKey.export({ type: 'pkcs8', format: 'pem' }));
  writeFileSync(join(dir, 'sa.pub'), publicKey.export({ type: 'spki', format: 'pem' }));
  // JSON is YAML.
  writeFileSync(join(dir, 'audit-policy.yaml'), `${JSON.stringify(auditPolicy(), null, 2)}\n`);
  const auditLog = join(dir, 'audit.log');
  const certDir = join(dir, 'certs');
  mkdirSync(certDir);

  const apiserverArgs = (port: number, name: string) => [
    '--bind-address=127.0.0.1',
    '--advertise-address=127.0.0.1',
    `--secure-port=${port}`,
    `--cert-dir=${certDir}`,
    `--etcd-servers=${etcdUrl}`,
    '--etcd-compaction-interval=10s',
    `--token-auth-file=${join(dir, 'tokens.csv')}`,
    '--authorization-mode=RBAC',
    '--anonymous-auth=false',
    `--service-account-key-file=${join(dir, 'sa.pub')}`,
    `--service-account-signing-key-file=${join(dir, 'sa.key')}`,
    '--service-account-issuer=https://kubernetes.default.svc',
    '--service-cluster-ip-range=10.0.0.0/24',
    `--audit-policy-file=${join(dir, 'audit-policy.yaml')}`,
    `--audit-log-path=${name === 'kube-apiserver' ? auditLog : join(dir, `${name}-audit.log`)}`,
    '--audit-log-mode=blocking',
    '--v=0',
    // The default reconciler refuses a loopback address; with no Endpoints for `kubernetes` nothing here misses it.
    '--endpoint-reconciler-type=none',
    // On top of the default plugins, as on most clusters: an ownerReference with blockOwnerDeletion
    // needs `update` on the owner's finalizers subresource (books/finalizers).
    '--enable-admission-plugins=OwnerReferencesPermissionEnforcement',
  ];

  const apiserverPort = await freePort();
  const server = `https://127.0.0.1:${apiserverPort}`;
  let apiserver: Daemon | undefined;
  let apiserverPeakKiB = 0;
  let ca = '';
  const startOne = async (name: string, port: number): Promise<Daemon> => {
    const daemon = watch(
      new Daemon(
        name,
        join(bin, 'kube-apiserver'),
        apiserverArgs(port, name),
        join(dir, `${name}.log`),
      ),
    );
    // The self-signed apiserver.crt in --cert-dir holds the serving certificate and the CA that signed it.
    const url = `https://127.0.0.1:${port}`;
    await waitFor(
      `${name} on ${url} to answer /readyz with 200`,
      async () => {
        if (!daemon.alive) throw new GiveUp(`${name} exited:\n${daemon.tail()}`);
        if (!existsSync(join(certDir, 'apiserver.crt'))) return undefined;
        ca = readFileSync(join(certDir, 'apiserver.crt'), 'utf8');
        const { status } = await httpsRequest(`${url}/readyz`, ca, ADMIN_TOKEN).catch(() => ({
          status: 0,
        }));
        return status === 200 ? true : undefined;
      },
      90_000,
    ).catch(async (err) => {
      await daemon.stop();
      throw err;
    });
    return daemon;
  };
  const startApiserver = async () => {
    apiserver = await startOne('kube-apiserver', apiserverPort);
  };
  const stopApiserver = async (options: { kill?: boolean } = {}) => {
    apiserver?.sampleRss();
    apiserverPeakKiB = Math.max(apiserverPeakKiB, apiserver?.peakRssKiB ?? 0);
    await apiserver?.stop(options.kill);
    apiserver = undefined;
  };
  try {
    await startApiserver();
  } catch (err) {
    await etcd.stop();
    throw err;
  }

  const kubeconfig = join(dir, 'admin.kubeconfig');
  const nobodyKubeconfig = join(dir, 'nobody.kubeconfig');
  writeFileSync(kubeconfig, kubeconfigFor(server, ca, 'admin', ADMIN_TOKEN));
  writeFileSync(nobodyKubeconfig, kubeconfigFor(server, ca, 'nobody', NOBODY_TOKEN));

  // kube-controller-manager, only its garbage collector (unless options.controllers says more), as
  // the admin; no leader election, and no port (--secure-port=0): it is ready when its log says the
  // collector's monitors have synced.
  let controllerManager: Daemon | undefined;
  let garbageCollector: Promise<void> | undefined;
  const startGarbageCollector = () => {
    garbageCollector ??= (async () => {
      const program = join(bin, 'kube-controller-manager');
      if (!existsSync(program))
        throw new Error(
          `no ${program}: build it with bash e2e/build.sh (it builds what is missing)`,
        );
      const daemon = watch(
        new Daemon(
          'kube-controller-manager',
          program,
          [
            `--kubeconfig=${kubeconfig}`,
            `--controllers=${(options.controllers ?? ['garbagecollector']).join(',')}`,
            '--leader-elect=false',
            '--secure-port=0',
            '--v=1',
          ],
          join(dir, 'kube-controller-manager.log'),
        ),
      );
      controllerManager = daemon;
      await waitFor(
        "kube-controller-manager's garbage collector to sync its monitors",
        () => {
          if (!daemon.alive) throw new GiveUp(`kube-controller-manager exited:\n${daemon.tail()}`);
          return /resource monitors (have synced|could be synced)/.test(
            readFileSync(daemon.log, 'utf8'),
          )
            ? true
            : undefined;
        },
        90_000,
      );
    })();
    return garbageCollector;
  };
  console.error(
    `${label}: etcd ${etcdUrl} and kube-apiserver ${server} ready in ${((Date.now() - started) / 1000).toFixed(1)}s (${dir})`,
  );

  return {
    existing: false,
    kubeconfig,
    nobodyKubeconfig,
    server,
    ca,
    token: ADMIN_TOKEN,
    auditLog,
    dir,
    ...withKubectl(join(bin, 'kubectl'), () => kubeconfig),
    request: (method, path, options = {}) =>
      httpsRequest(
        server + path,
        ca,
        options.token ?? ADMIN_TOKEN,
        method,
        options.body,
        options.contentType,
      ),
    stopApiserver,
    startApiserver,
    startGarbageCollector,
    lost,
    async startSecondApiserver() {
      const port = await freePort();
      const second = await startOne('kube-apiserver-2', port);
      const config = join(dir, 'second.kubeconfig');
      writeFileSync(config, kubeconfigFor(`https://127.0.0.1:${port}`, ca, 'admin', ADMIN_TOKEN));
      return { kubeconfig: config, stop: () => second.stop() };
    },
    async compact() {
      // etcd's gRPC gateway: the current revision, then a physical compaction up to it.
      const post = async (path: string, body: object) => {
        const response = await fetch(etcdUrl + path, {
          method: 'POST',
          body: JSON.stringify(body),
        });
        if (!response.ok)
          throw new Error(`etcd ${path}: ${response.status} ${await response.text()}`);
        return response.json() as Promise<{ header: { revision: string } }>;
      };
      const { header } = await post('/v3/kv/range', {
        key: Buffer.from('/').toString('base64'),
        limit: 1,
      });
      await post('/v3/kv/compaction', { revision: header.revision, physical: true });
      return Number(header.revision);
    },
    async stop() {
      etcd.sampleRss();
      controllerManager?.sampleRss();
      await controllerManager?.stop();
      await stopApiserver();
      await etcd.stop();
      const mib = (kib: number) =>
        kib
          ? `${(kib / 1024).toFixed(0)} MiB`
          : 'unknown (gone before a sample, or /proc/PID/status unreadable: Deno needs -A)';
      const kcm = controllerManager
        ? `, kube-controller-manager ${mib(controllerManager.peakRssKiB)}`
        : '';
      console.error(
        `${label}: peak RSS (VmHWM) kube-apiserver ${mib(apiserverPeakKiB)}, etcd ${mib(etcd.peakRssKiB)}${kcm}; up ${((Date.now() - started) / 1000).toFixed(0)}s`,
      );
      if (keep) console.error(`${label}: kept ${dir}`);
      else rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** A cluster the user already has (kind, k3d): KUBECONFIG names it; a ServiceAccount plays `nobody`. */
async function existingCluster(): Promise<Cluster> {
  const kubeconfig = process.env.KUBECONFIG;
  if (!kubeconfig) throw new Error('E2E_EXISTING_CLUSTER=1 needs KUBECONFIG naming the cluster');
  const local = join(binDir(), 'kubectl');
  const kubectlPath = existsSync(local) ? local : 'kubectl';
  const dir = mkdtempSync(join(tmpdir(), 'book-e2e-'));
  const tools = withKubectl(kubectlPath, () => kubeconfig);
  const view = JSON.parse(
    await tools.kubectlOk(['config', 'view', '--minify', '--raw', '-o', 'json']),
  );
  const server: string = view.clusters[0].cluster.server;
  const caData: string | undefined = view.clusters[0].cluster['certificate-authority-data'];
  const ca = caData
    ? Buffer.from(caData, 'base64').toString()
    : readFileSync(view.clusters[0].cluster['certificate-authority'], 'utf8');
  // A user with no rights: a fresh ServiceAccount, with a short-lived token.
  await tools.kubectl(['create', 'serviceaccount', 'e2e-nobody', '-n', 'default']);
  const nobodyToken = (
    await tools.kubectlOk(['create', 'token', 'e2e-nobody', '-n', 'default', '--duration=1h'])
  ).trim();
  const nobodyKubeconfig = join(dir, 'nobody.kubeconfig');
  writeFileSync(nobodyKubeconfig, kubeconfigFor(server, ca, 'nobody', nobodyToken));
  const token: string = view.users[0]?.user?.token ?? '';
  const unsupported = async () => {
    throw new Error('not with E2E_EXISTING_CLUSTER=1');
  };
  return {
    existing: true,
    kubeconfig,
    nobodyKubeconfig,
    server,
    ca,
    token,
    auditLog: undefined,
    dir,
    ...tools,
    request: (method, path, options = {}) =>
      httpsRequest(
        server + path,
        ca,
        options.token ?? token,
        method,
        options.body,
        options.contentType,
      ),
    stopApiserver: unsupported,
    startApiserver: unsupported,
    startSecondApiserver: unsupported,
    compact: unsupported,
    startGarbageCollector: async () => {},
    lost: new Promise(() => {}),
    async stop() {
      await tools.kubectl([
        'delete',
        'serviceaccount',
        'e2e-nobody',
        '-n',
        'default',
        '--ignore-not-found',
      ]);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** The audit log's events, parsed: which requests the server saw, in order. */
export interface AuditEvent {
  verb: string;
  requestURI: string;
  stage: string;
  user: { username: string };
  userAgent?: string;
  responseStatus?: { code?: number };
  /** RFC 3339 with microseconds, the server's clock (the same machine as the tests'). */
  requestReceivedTimestamp?: string;
  objectRef?: { resource?: string; subresource?: string; namespace?: string; name?: string };
}
export function readAudit(path: string): AuditEvent[] {
  return readFileSync(path, 'utf8')
    .split('\n')
    .filter(Boolean)
    .map((line) => JSON.parse(line) as AuditEvent);
}

/**
 * e2e/metricscheck, built by e2e/build.sh beside the control plane: Prometheus' own text parser
 * (github.com/prometheus/common/expfmt). Its name carries a hash of its sources, as build.sh makes it.
 */
export function metricsCheckPath(): string {
  const source = ['main.go', 'go.mod'].map((file) =>
    readFileSync(join(ROOT, 'e2e', 'metricscheck', file)),
  );
  const hash = createHash('sha256').update(Buffer.concat(source)).digest('hex').slice(0, 12);
  return join(binDir(), `metricscheck-${hash}`);
}

/** A metric family as metricscheck prints it (one JSON line each). */
export interface MetricFamily {
  name: string;
  type: 'COUNTER' | 'GAUGE' | 'HISTOGRAM' | 'SUMMARY' | 'UNTYPED' | 'GAUGE_HISTOGRAM';
  help: string;
  metrics: {
    labels: Record<string, string>;
    value?: number;
    count?: number;
    sum?: number;
    buckets?: [string, number][];
  }[];
}

/**
 * Parses a /metrics exposition with Prometheus' parser: the families, or an Error with the parser's
 * own message (or that of metricscheck's checks: HELP and TYPE for every family, sane histograms).
 */
export function checkMetrics(exposition: string): Promise<MetricFamily[]> {
  const program = metricsCheckPath();
  if (!existsSync(program))
    throw new Error(`no ${program}: build it with bash e2e/build.sh (it builds what is missing)`);
  return new Promise((resolve, reject) => {
    const child = spawn(program, [], { stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (text: string) => (stdout += text));
    child.stderr.setEncoding('utf8').on('data', (text: string) => (stderr += text));
    child.on('error', reject);
    child.on('close', (code) => {
      if (code !== 0) return reject(new Error(stderr.trim() || `metricscheck exited ${code}`));
      resolve(
        stdout
          .split('\n')
          .filter(Boolean)
          .map((line) => JSON.parse(line) as MetricFamily),
      );
    });
    child.stdin.end(exposition);
  });
}
