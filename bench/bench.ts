// Benchmark: controller.ts against a floor (bench/floor.ts) or a computed ideal: start-up, sync
// and watch times, peak RSS, memory per book, requests and writes, time until new books are
// Ready, idle traffic; each row with its target and ✅/❌, all in one run.
//
//   node bench/bench.ts [--runs R] [--runtime node|deno|bun] [--launcher strip|tsx|npx]
//                       [--books N] [--events M] [--memory-books B] [--ready-books C] [--latency MS]
//                       [--concurrency 1,8] [--ready-runs R] [--skip sync,tsx,memory,ready,idle,requeue]
//                       [--raw] [--tables launchers,imports,tsx] [--controller FILE] [--pin]
//                       [--real [--real-books 3000] [--real-runs 3] [--skip-fake]]
//                       [--requeue-books 10000] [--requeue-after 5] [--requeue-seconds 30]
//                       [--requeue-runs 1] [--scenario sync,memory,ready,idle,requeue]
//   node bench/bench.ts --profile [--scenario stream|paged|ready1|ready8|memory] [--heap]
//
// --scenario (without --profile) runs only the scenarios named; --skip leaves some out.
//
// Scenarios (every one against bench/server.ts, a loopback HTTPS API server in its own process,
// reset to a fresh world before every run; it counts the requests of each run by kind):
//   sync+watch  N books (none Ready yet, no ConfigMaps); once the client is in sync (every book
//               printed and Ready), a burst of M watch events; with the streaming list, and with a
//               server that refuses it (422, so the client falls back to pages); on Node also the
//               streaming list under `npx tsx` (the controller's documented way to run). Controller
//               and floor (the same work: list + watch of books and owned ConfigMaps, one awaited
//               server-side apply and one awaited status patch per new generation; with --raw also
//               the raw floor, which only reads and prints) are run interleaved, in a rotating
//               order, R times. Initial sync = spawn → the stdout line by which every one of the N
//               books had its Added;
//               first event = spawn → the first line; watch = the burst → in sync again (the last
//               line, or the last write if later: a level-triggered controller may merge the
//               burst's changes). Peak RSS = VmHWM of the process running the code.
//   memory      B books already Ready, each with its correct ConfigMap (a restart: nothing to
//               write), streaming list; each subject started with bench/memprobe.ts preloaded:
//               after the B-th Added and 0.5 s, SIGUSR2 → forced GC → heapUsed. Per book =
//               (heap with B − heap with none) / B: the book and its ConfigMap's cache entry.
//   ready       C new books created while the controller watches, the server adding MS to every
//               write (the apply and the status patch); time (server side) from their ADDED until
//               the last is Ready, at each --concurrency, against the ideal C × 2 × MS / concurrency.
//   idle        10 Ready books, --watch-timeout 1, 5 s: one watch per timeout, nothing else.
//   requeue     Q new books; a copy of the controller (written at run time in a temp folder,
//               removed after) whose example reconcile returns { requeueAfter: S }, against the
//               controller as it is (its floor: the same without requeue). After the initial sync
//               (every book printed and Ready) and S s more, a window of W s: CPU seconds per
//               second (utime+stime in /proc/PID/stat), RSS (sampled every 250 ms, and at the end;
//               VmHWM for the whole run), reconciles per second (controller_runtime_reconcile_total
//               on its --health-port /metrics; ideal Q / S), requests per second the server saw by
//               kind (a requeued run that applies the same ConfigMap and leaves Ready as it is
//               sends nothing), lines printed (none), and at the end the ref'd timers
//               (process.getActiveResourcesInfo() through bench/memprobe.ts, on SIGUSR2).
//   --real      against a real kube-apiserver and etcd (e2e/cluster.ts, binaries from
//               e2e/build.sh): C books created while the subject runs (controller at each
//               --concurrency, and the floor), time until all are Ready; a restart over them
//               (writes counted in the audit log, and the books' and ConfigMaps' resourceVersions);
//               peak RSS. A few minutes; --skip-fake runs only these.
// Medians, [min–max] where runs > 1. Lines are checked against the workload: changes of one book
// may merge while it waits, but each book's lines follow its history and end in its
// final state. A controller flag it does not know (exit 2) makes its rows n/a.
//
// The server is a separate process: on 2 cores the client gets one core and the server shares
// the other with this process, whose event loop does nothing but timestamp the pipe. --pin makes
// that split explicit with taskset (client on CPU 1).
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import http from 'node:http';
import https from 'node:https';
import {
  closeSync,
  existsSync,
  fstatSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  readSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { builtinModules } from 'node:module';
import { cpus, hostname, loadavg, release, tmpdir, totalmem } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';
import { CA_CERT, freePort, writeKubeconfig } from '../fake-apiserver.ts';
import { authors as authorsOf, checkLines, listTitle as listTitleOf } from './workload.ts';

const BENCH = dirname(fileURLToPath(import.meta.url));
const ROOT = dirname(BENCH);
const { values: flags } = parseArgs({
  options: {
    books: { type: 'string', default: '20000' },
    events: { type: 'string', default: '30000' },
    runs: { type: 'string', default: '3' },
    runtime: { type: 'string', default: 'node' },
    launcher: { type: 'string', default: 'strip' },
    'memory-books': { type: 'string', default: '100000' },
    'ready-books': { type: 'string', default: '2000' },
    'ready-runs': { type: 'string', default: '1' },
    latency: { type: 'string', default: '10' },
    concurrency: { type: 'string', default: '1,8' },
    controller: { type: 'string', default: join(ROOT, 'controller.ts') },
    skip: { type: 'string', default: '' },
    tables: { type: 'string', default: '' },
    profile: { type: 'boolean', default: false },
    scenario: { type: 'string', default: '' }, // --profile: stream if none
    pin: { type: 'boolean', default: false },
    raw: { type: 'boolean', default: false },
    heap: { type: 'boolean', default: false },
    real: { type: 'boolean', default: false },
    'real-books': { type: 'string', default: '3000' },
    'real-runs': { type: 'string', default: '3' },
    'skip-fake': { type: 'boolean', default: false },
    'requeue-books': { type: 'string', default: '10000' },
    'requeue-after': { type: 'string', default: '5' },
    'requeue-seconds': { type: 'string', default: '30' },
    'requeue-runs': { type: 'string', default: '1' },
  },
});
const N = Number(flags.books),
  M = Number(flags.events),
  R = Number(flags.runs);
const MB = Number(flags['memory-books']),
  RB = Number(flags['ready-books']),
  LAT = Number(flags.latency);
const R_READY = Number(flags['ready-runs']);
const CONCURRENCY = flags.concurrency.split(',').map(Number);
const R_STARTUP = Math.min(R, 3);
const SKIP = new Set(flags.skip.split(',').filter(Boolean));
// --scenario without --profile: only the scenarios named run
const SCENARIOS = ['sync', 'memory', 'ready', 'idle', 'requeue'];
const ONLY = new Set(flags.profile ? [] : flags.scenario.split(',').filter(Boolean));
for (const s of ONLY) {
  if (!SCENARIOS.includes(s)) {
    console.error(`bench: --scenario ${s}: one or more of ${SCENARIOS.join(', ')}`);
    process.exit(1);
  }
}
const runs = (scenario: string) => !SKIP.has(scenario) && (ONLY.size === 0 || ONLY.has(scenario));
const QB = Number(flags['requeue-books']),
  QS = Number(flags['requeue-after']),
  QW = Number(flags['requeue-seconds']),
  R_REQUEUE = Number(flags['requeue-runs']);
const EXTRA = new Set(flags.tables.split(',').filter(Boolean));
const CONTROLLER = flags.controller;
const FLOOR = join(BENCH, 'floor.ts');
const PROBE = join(BENCH, 'memprobe.ts');
if (!existsSync(CONTROLLER)) {
  console.error(
    `bench: ${CONTROLLER} does not exist; pass --controller FILE (e.g. bench/floor.ts) to test the harness`,
  );
  process.exit(1);
}

// ---------- launchers: how a .ts file is started ----------
type Launcher = 'tsx' | 'npx' | 'strip' | 'deno' | 'bun' | 'tsx-nomaps' | 'strip-maps';
// tsx turns Node's source maps on (process.setSourceMapsEnabled(true)) when it registers: Node then
// reads and keeps the source map of every module loaded after it that names one (see tsxTable).
const NO_SOURCE_MAPS = 'data:text/javascript,process.setSourceMapsEnabled(false)';
const NODE = process.execPath;
/** The command line; `probe` preloads memprobe.ts with a GC the probe can force. */
function command(
  launcher: Launcher,
  file: string,
  args: string[] = [],
  nodeFlags: string[] = [],
  probe = false,
): string[] {
  const pre = probe ? ['--expose-gc', '--import', pathToFileURL(PROBE).href] : [];
  switch (launcher) {
    case 'tsx':
      return [NODE, ...nodeFlags, '--import', 'tsx', ...pre, file, ...args];
    case 'strip':
      return [NODE, ...nodeFlags, ...pre, file, ...args];
    case 'tsx-nomaps':
      return [
        NODE,
        ...nodeFlags,
        '--import',
        'tsx',
        '--import',
        NO_SOURCE_MAPS,
        ...pre,
        file,
        ...args,
      ];
    case 'strip-maps':
      return [NODE, ...nodeFlags, '--enable-source-maps', ...pre, file, ...args];
    case 'npx':
      return probe ? command('tsx', file, args, nodeFlags, probe) : ['npx', 'tsx', file, ...args];
    case 'deno':
      return [
        runtimeBinary('deno'),
        'run',
        '-A',
        '--no-lock',
        ...(probe ? ['--v8-flags=--expose-gc', '--preload', PROBE] : []),
        file,
        ...args,
      ];
    case 'bun':
      return [runtimeBinary('bun'), ...(probe ? ['--preload', PROBE] : []), file, ...args];
  }
}
// Deno and Bun, the versions the project tests with, through npx (fetched once into its cache);
// the binary itself is run, so that npx's own process is not part of start-up or memory.
const RUNTIMES = { deno: 'deno@2.9.6', bun: 'bun@1.4.5' };
const binaries = new Map<string, string>();
function runtimeBinary(name: 'deno' | 'bun'): string {
  let path = binaries.get(name);
  if (!path) {
    const script =
      name === 'deno'
        ? ['eval', 'console.log(Deno.execPath())']
        : ['-e', 'console.log(process.execPath)'];
    path = execFileSync('npx', ['-y', RUNTIMES[name], ...script], { encoding: 'utf8' }).trim();
    binaries.set(name, path);
  }
  return path;
}
const LAUNCHER_NAME: Record<Launcher, string> = {
  tsx: 'node --import tsx',
  npx: 'npx tsx',
  strip: 'node (type stripping)',
  'tsx-nomaps': 'node --import tsx, source maps off',
  'strip-maps': 'node --enable-source-maps',
  deno: `deno run -A (${RUNTIMES.deno})`,
  bun: `bun (${RUNTIMES.bun})`,
};
const MAIN: Launcher =
  flags.runtime === 'node' ? (flags.launcher as Launcher) : (flags.runtime as Launcher);

// ---------- TLS, kubeconfig, server ----------
// The tests' CA, server certificate, token and kubeconfig writer (fake-apiserver.ts): one of each
// in the repository. bench/server.ts serves with that certificate.
const tmp = mkdtempSync(join(tmpdir(), 'book-bench-'));
const kubeconfigDirs: string[] = []; // writeKubeconfig makes a temp dir per file: removed at the end
function kubeconfig(options: Parameters<typeof writeKubeconfig>[0]): string {
  const file = writeKubeconfig(options);
  kubeconfigDirs.push(dirname(file));
  return file;
}
const control = new https.Agent({ keepAlive: true, ca: CA_CERT, maxSockets: 1 });

interface ServerStats {
  listPages: number;
  watches: number;
  streamingLists: number;
  rejectedStreamingLists: number;
  cmListPages: number;
  cmWatches: number;
  cmStreamingLists: number;
  cmRejectedStreamingLists: number;
  cmUnselected: number;
  applies: number;
  appliesCreated: number;
  appliesUnchanged: number;
  applies422: number;
  statusPatches: number;
  statusPatches404: number;
  statusPatches422: number;
  statusUnchanged: number;
  gets: number;
  other: number;
  unauthorized: number;
  connections: number;
  generations: number;
  gcDeletes: number;
  books: number;
  configMaps: number;
  notReady: number;
  cmWrong: number | null;
  openWatches: number;
  openBookWatches: number;
  openCmWatches: number;
  rv: number;
  created: number;
  createdReady: number;
  readyMs: number;
  sinceFirstMs: number;
  lastPatchAt: number;
}
interface Server {
  proc: ChildProcess;
  kubeconfig: string;
  call: (path: string, query?: Record<string, string | number>) => Promise<ServerStats>;
  stop: () => void;
}
async function startServer(books: number, events: number): Promise<Server> {
  const proc = spawn(
    flags.pin ? 'taskset' : NODE,
    [
      ...(flags.pin ? ['-c', '0', NODE] : []),
      join(BENCH, 'server.ts'),
      String(books),
      String(events),
    ],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  const port = await new Promise<number>((resolve, reject) => {
    proc.stdout?.once('data', (d: Buffer) => resolve(JSON.parse(d.toString()).port));
    proc.once('exit', (c) => reject(new Error(`server exited (${c})`)));
  });
  // JSON (which is YAML): client-node reads it, and the bare floor can JSON.parse it
  const file = kubeconfig({ server: `https://127.0.0.1:${port}`, namespace: 'default' });
  const call = (path: string, query: Record<string, string | number> = {}) =>
    new Promise<ServerStats>((resolve, reject) => {
      const q = new URLSearchParams(Object.entries(query).map(([k, v]) => [k, String(v)]));
      https
        .request(
          `https://127.0.0.1:${port}/bench/${path}?${q}`,
          { agent: control, method: path === 'stats' ? 'GET' : 'POST' },
          (res) => {
            let body = '';
            res
              .on('data', (c) => {
                body += c;
              })
              .on('end', () => resolve(JSON.parse(body)));
          },
        )
        .on('error', reject)
        .end();
    });
  return { proc, kubeconfig: file, call, stop: () => proc.kill('SIGTERM') };
}

// ---------- /proc ----------
function descendants(pid: number): number[] {
  const out: number[] = [];
  try {
    for (const tid of readdirSync(`/proc/${pid}/task`)) {
      for (const c of readFileSync(`/proc/${pid}/task/${tid}/children`, 'utf8')
        .split(' ')
        .filter(Boolean)) {
        out.push(Number(c), ...descendants(Number(c)));
      }
    }
  } catch {
    /* gone */
  }
  return out;
}
// The process running the code: the deepest one whose command line names the
// file (npx and the tsx CLI are wrappers; tsx may also start an esbuild child).
function codePid(pid: number, file: string): number {
  const named = [pid, ...descendants(pid)].filter((p) => {
    try {
      return readFileSync(`/proc/${p}/cmdline`, 'utf8')
        .split('\0')
        .some((a) => a.endsWith(file.split('/').pop() ?? file));
    } catch {
      return false;
    }
  });
  return named.at(-1) ?? pid;
}
function procStats(pid: number): { rssMB: number; cpuS: number } {
  try {
    const hwm = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' '); // fields from #3 on
    return {
      rssMB: hwm ? Number(hwm[1]) / 1024 : NaN,
      cpuS: (Number(f[11]) + Number(f[12])) / 100,
    };
  } catch {
    return { rssMB: NaN, cpuS: NaN };
  }
}

// ---------- a child under test ----------
type Subject = { name: string; file: string; args?: string[] };
const CTRL: Subject = { name: 'controller', file: CONTROLLER };
const FLOORS: Subject = { name: 'floor', file: FLOOR };
const RAW: Subject = { name: 'raw floor', file: FLOOR, args: ['--raw'] };

class Child {
  proc: ChildProcess;
  t0 = performance.now();
  times: number[] = []; // arrival time of each stdout line
  chunks: Buffer[] = [];
  stderr = '';
  lastOutput = performance.now();
  exitCode: number | string | undefined;
  exited: Promise<number | string>;
  subject: Subject;
  constructor(
    subject: Subject,
    cmd: string[],
    kubeconfig: string,
    env: Record<string, string> = {},
  ) {
    this.subject = subject;
    if (flags.pin) cmd = ['taskset', '-c', '1', ...cmd];
    this.proc = spawn(cmd[0], cmd.slice(1), {
      cwd: ROOT,
      env: {
        ...process.env,
        ...env,
        KUBECONFIG: kubeconfig,
        PATH: `${dirname(NODE)}:${process.env.PATH}`,
      },
      stdio: ['ignore', 'pipe', 'pipe'],
      detached: true,
    });
    this.exited = new Promise((res) =>
      this.proc.on('exit', (code, sig) => {
        this.exitCode = code ?? sig ?? '?';
        res(this.exitCode);
      }),
    );
    this.proc.stdout?.on('data', (c: Buffer) => {
      const t = performance.now();
      this.lastOutput = t;
      this.chunks.push(c);
      for (let i = c.indexOf(10); i !== -1; i = c.indexOf(10, i + 1)) this.times.push(t);
    });
    this.proc.stderr?.on('data', (c: Buffer) => {
      this.stderr = (this.stderr + c.toString()).slice(-4000);
    });
  }
  get lines() {
    return this.times.length;
  }
  get pid() {
    return codePid(this.proc.pid ?? 0, this.subject.file);
  }
  text(): string[] {
    const s = Buffer.concat(this.chunks).toString('utf8').split('\n');
    s.pop();
    return s;
  }
  lastStderr(n = 2) {
    return this.stderr.trim().split('\n').slice(-n).join(' | ').slice(0, 400);
  }
  /** Until `done()` (checked every 20 ms), the child exits, or the timeout. */
  async until(
    done: () => boolean | Promise<boolean>,
    timeoutMs: number,
  ): Promise<'done' | 'exit' | 'timeout'> {
    const end = performance.now() + timeoutMs;
    while (performance.now() < end) {
      if (await done()) return 'done';
      if (this.exitCode !== undefined) return 'exit';
      await sleep(20);
    }
    return 'timeout';
  }
  /** `lines` lines; or output that stopped for `quietMs` after at least `minLines`. */
  waitLines(lines: number, quietMs: number, timeoutMs: number, minLines = 1) {
    return this.until(
      () =>
        this.lines >= lines ||
        (this.lines >= minLines && performance.now() - this.lastOutput > quietMs),
      timeoutMs,
    );
  }
  async stop(): Promise<number | string> {
    if (this.exitCode === undefined) {
      try {
        process.kill(this.pid, 'SIGTERM');
      } catch {
        /* gone */
      }
    }
    const kill = setTimeout(() => {
      try {
        process.kill(-(this.proc.pid ?? 0), 'SIGKILL');
      } catch {
        /* gone */
      }
    }, 5000);
    const code = await this.exited;
    clearTimeout(kill);
    return code;
  }
}
const spawnSubject = (
  s: Subject,
  server: { kubeconfig: string },
  launcher = MAIN,
  opts: {
    args?: string[];
    nodeFlags?: string[];
    probe?: boolean;
    env?: Record<string, string>;
  } = {},
) =>
  new Child(
    s,
    command(
      launcher,
      s.file,
      [...(s.args ?? []), ...(s === CTRL ? (opts.args ?? []) : [])],
      opts.nodeFlags,
      opts.probe,
    ),
    server.kubeconfig,
    opts.env,
  );
/** The controller refused a flag (exit 2): rows that need it are n/a. */
const refused = (c: Child) => (c.exitCode === 2 ? `n/a: exit 2 (${c.lastStderr(1)})` : undefined);

// ---------- stats and formatting ----------
const median = (xs: number[]) => {
  const s = xs.filter((x) => !Number.isNaN(x)).sort((a, b) => a - b);
  return s.length ? s[(s.length - 1) >> 1] : NaN;
};
const fmt = (x: number, d = 0) => (Number.isNaN(x) ? '–' : x.toFixed(d));
function cell(xs: number[], d = 0): string {
  const ok = xs.filter((x) => !Number.isNaN(x));
  if (ok.length < 2) return fmt(median(xs), d);
  return `${fmt(median(xs), d)} [${fmt(Math.min(...ok), d)}–${fmt(Math.max(...ok), d)}]`;
}
const mark = (ok: boolean | undefined) => (ok === undefined ? 'n/a' : ok ? '✅' : '❌');
interface Row {
  measure: string;
  controller: string;
  reference: string;
  ratio: string;
  target: string;
  ok: boolean | undefined;
}
const SUMMARY: Row[] = [];
const NOTES: string[] = [];
function ratioRow(
  measure: string,
  c: number[],
  ref: number[],
  refName: string,
  d: number,
  limit: number,
  na?: string,
) {
  const ratio = median(c) / median(ref);
  const row: Row = {
    measure,
    controller: na ?? cell(c, d),
    reference: `${refName} ${cell(ref, d)}`,
    ratio: na ? '–' : fmt(ratio, 2),
    target: `≤ ${limit}x`,
    ok: na || Number.isNaN(ratio) ? undefined : ratio <= limit,
  };
  SUMMARY.push(row);
  return row;
}
const printRows = (rows: Row[]) => {
  console.log('| measure | controller | floor or ideal | ratio | target | |');
  console.log('|---|---|---|---|---|---|');
  for (const r of rows)
    console.log(
      `| ${r.measure} | ${r.controller} | ${r.reference} | ${r.ratio} | ${r.target} | ${mark(r.ok)} |`,
    );
};
const progress = (s = '.') => process.stderr.write(s);

// ---------- scenario: sync + watch ----------
type Mode = 'streaming' | 'paginated';
/** One way to run the sync+watch scenario: the list the server allows, and how .ts is started. */
interface Variant {
  mode: Mode;
  launcher: Launcher;
  label: string;
}
const variant = (mode: Mode, launcher: Launcher): Variant => ({
  mode,
  launcher,
  label: launcher === MAIN ? mode : `${mode}, ${LAUNCHER_NAME[launcher]}`,
});
interface SyncRun {
  syncMs: number;
  firstMs: number;
  watchMs: number;
  rssMB: number;
  cpuS: number;
  lines: number;
  merged: number;
  requests: ServerStats;
  peaks?: { peaks: Record<string, number>; before: Record<string, number>; heapUsed: number };
  error?: string;
  na?: string;
}
async function syncRun(
  server: Server,
  s: Subject,
  mode: Mode,
  launcher = MAIN,
  nodeFlags: string[] = [],
  peaks = false, // sample process.memoryUsage() in the subject (bench/memprobe.ts)
): Promise<SyncRun> {
  await server.call('reset', {
    books: N,
    events: 1,
    watchlist: mode === 'streaming' ? 1 : 0,
    latency: 0,
  });
  const file = join(tmp, `peaks-${Math.random().toString(36).slice(2)}.json`);
  const probeEnv = { BENCH_MEMORY_FILE: file, BENCH_MEMORY_PEAKS: '1' };
  // npx cannot take node flags: the probe goes in through NODE_OPTIONS (every node in the chain
  // loads it; only the one running the code gets the signal)
  const c = !peaks
    ? spawnSubject(s, server, launcher, { nodeFlags })
    : launcher === 'npx'
      ? spawnSubject(s, server, launcher, {
          env: { ...probeEnv, NODE_OPTIONS: `--import ${pathToFileURL(PROBE).href}` },
        })
      : spawnSubject(s, server, launcher, { nodeFlags, probe: true, env: probeEnv });
  const writes = s !== RAW; // the raw floor writes nothing: never Ready
  const limit = 180_000 + (N + M) * 5;
  const inSync = async () => !writes || (await server.call('stats')).notReady === 0;
  // in sync: every book printed (N lines; fewer if it merged, then 2 s of silence) and Ready
  let how = await c.waitLines(N, 2000, limit);
  if (how === 'done') how = await c.until(inSync, limit);
  const run: SyncRun = {
    syncMs: NaN,
    firstMs: c.times.length ? c.times[0] - c.t0 : NaN,
    watchMs: NaN,
    rssMB: NaN,
    cpuS: NaN,
    lines: 0,
    merged: 0,
    requests: await server.call('stats'),
    na: refused(c),
  };
  if (how === 'done') {
    const linesAtSync = c.lines;
    const burst = performance.now();
    await server.call('burst');
    // then the burst: every line of a client that reports every change, or 2 s of silence; and Ready again
    how = await c.waitLines(N + M, 2000, limit, linesAtSync + 1);
    if (how === 'done') how = await c.until(inSync, limit);
    Object.assign(run, procStats(c.pid));
    if (peaks) {
      try {
        process.kill(c.pid, 'SIGUSR2');
        await c.until(() => existsSync(file), 10_000);
        run.peaks = JSON.parse(readFileSync(file, 'utf8'));
      } catch {
        /* no report */
      }
    }
    run.requests = await server.call('stats', { full: 1 });
    // in sync after the burst: the last line, or the last write if later
    const lastPatch = run.requests.lastPatchAt - performance.timeOrigin;
    run.watchMs =
      Math.max(c.times[c.times.length - 1], Number.isNaN(lastPatch) ? 0 : lastPatch) - burst;
  }
  const exit = await c.stop();
  const lines = c.text();
  // initial sync: the line by which each of the N listed books had printed its Added
  const listed = new Set<string>();
  for (let i = 0; i < lines.length; i++) {
    const m = /^Added a book (book-\d+) /.exec(lines[i]);
    if (m) {
      listed.add(m[1]);
      if (listed.size === N) {
        run.syncMs = c.times[i] - c.t0;
        break;
      }
    }
  }
  run.lines = lines.length;
  const { problems, merged } = checkLines(N, M, lines);
  run.merged = merged;
  if (how !== 'done')
    run.error = `${how} after ${lines.length} lines, exit ${exit}: ${c.lastStderr(6)}`;
  else if (problems.length) run.error = problems.join('; ');
  else if (exit !== 0) run.error = `exit ${exit} after SIGTERM (want 0): ${c.lastStderr()}`;
  if (c.stderr.trim() && !run.error)
    NOTES.push(`${s.name} (${mode}) wrote to stderr: ${c.lastStderr()}`);
  return run;
}

function requestText(r: ServerStats) {
  const parts = [];
  const plural = (n: number, one: string, many = `${one}s`) => `${n} ${n === 1 ? one : many}`;
  const lists = (
    what: string,
    streaming: number,
    refused: number,
    pages: number,
    watches: number,
  ) => {
    const p = [];
    if (streaming) p.push(plural(streaming, 'streaming list'));
    if (refused) p.push(`${refused} refused (422)`);
    if (pages) p.push(plural(pages, 'list page'));
    if (watches) p.push(plural(watches, 'watch', 'watches'));
    return p.length ? `${what}: ${p.join(', ')}` : '';
  };
  parts.push(
    lists('books', r.streamingLists, r.rejectedStreamingLists, r.listPages, r.watches),
    lists('ConfigMaps', r.cmStreamingLists, r.cmRejectedStreamingLists, r.cmListPages, r.cmWatches),
  );
  const unchanged = r.appliesUnchanged ? `, ${r.appliesUnchanged} unchanged` : '';
  parts.push(`${plural(r.applies, 'apply', 'applies')}${unchanged}`);
  const status = [
    r.statusPatches404 ? `${r.statusPatches404} 404` : '',
    r.statusPatches422 ? `${r.statusPatches422} 422` : '',
    r.statusUnchanged ? `${r.statusUnchanged} unchanged` : '',
  ].filter(Boolean);
  parts.push(
    `${plural(r.statusPatches, 'status patch', 'status patches')}${status.length ? ` (${status.join(', ')})` : ''}`,
  );
  if (r.gets) parts.push(`${r.gets} GET`);
  if (r.other) parts.push(`${r.other} other`);
  if (r.cmUnselected) parts.push(`${r.cmUnselected} ConfigMap lists without the label selector`);
  if (r.unauthorized) parts.push(`${r.unauthorized} 401`);
  parts.push(`${r.connections} conn.`);
  return parts.filter(Boolean).join(', ');
}

/** Writes that match the contract: at most one apply and one status patch per new generation, none wasted. */
function writesOk(r: ServerStats) {
  return (
    r.applies <= r.generations &&
    r.statusPatches <= r.generations &&
    r.appliesUnchanged === 0 &&
    r.statusUnchanged === 0 &&
    r.applies422 === 0 &&
    r.other === 0 &&
    r.notReady === 0 &&
    (r.cmWrong ?? 0) === 0
  );
}
const endState = (r: ServerStats) =>
  `${r.generations} new generations, ${r.notReady} not Ready, ${r.cmWrong ?? '?'} wrong ConfigMaps`;

async function syncTable() {
  const subjects = flags.raw ? [CTRL, FLOORS, RAW] : [CTRL, FLOORS];
  const variants = [variant('streaming', MAIN), variant('paginated', MAIN)];
  // On Node, also the way the README runs it (npx tsx), against the floor started the same way.
  if (flags.runtime === 'node' && MAIN !== 'npx' && !SKIP.has('tsx'))
    variants.push(variant('streaming', 'npx'));
  console.log(
    `\n## initial sync and watch: N=${N} books (none Ready yet), then M=${M} watch events; ${LAUNCHER_NAME[MAIN]}, ${R} runs\n`,
  );
  const server = await startServer(N, M);
  const res = new Map<string, SyncRun[]>();
  const errors: string[] = [];
  try {
    for (let r = 0; r < R; r++) {
      for (const v of variants) {
        for (let k = 0; k < subjects.length; k++) {
          const s = subjects[(k + r) % subjects.length]; // rotate the order each round
          const run = await syncRun(server, s, v.mode, v.launcher);
          if (run.error) errors.push(`${s.name}, ${v.label}, run ${r + 1}: ${run.error}`);
          const key = `${s.name}/${v.label}`;
          res.set(key, [...(res.get(key) ?? []), run]);
          progress();
        }
      }
    }
  } finally {
    server.stop();
    progress('\n');
  }
  const get = (s: Subject, v: Variant, f: (r: SyncRun) => number) =>
    (res.get(`${s.name}/${v.label}`) ?? []).map(f);
  const na = (v: Variant) => res.get(`controller/${v.label}`)?.find((r) => r.na)?.na;
  console.log(
    `| metric | variant | controller | floor | ratio |${flags.raw ? ' raw floor (no writes, no cache) |' : ''}`,
  );
  console.log(`|---|---|---|---|---|${flags.raw ? '---|' : ''}`);
  const detail = (metric: string, f: (r: SyncRun) => number, d = 0) => {
    for (const v of variants) {
      const c = get(CTRL, v, f),
        fl = get(FLOORS, v, f);
      console.log(
        `| ${metric} | ${v.label} | ${cell(c, d)} | ${cell(fl, d)} | ${fmt(median(c) / median(fl), 2)} |${flags.raw ? ` ${cell(get(RAW, v, f), d)} |` : ''}`,
      );
    }
  };
  detail('spawn → first line (ms)', (r) => r.firstMs);
  detail('spawn → N-th book Added (ms)', (r) => r.syncMs);
  detail('watch: burst of M events → in sync again (ms)', (r) => r.watchMs);
  detail('lines printed', (r) => r.lines);
  detail('lines merged (changes of a book that came while it waited)', (r) => r.merged);
  detail('peak RSS (MB)', (r) => r.rssMB);
  detail('CPU user+sys (s)', (r) => r.cpuS, 2);
  detail('applies', (r) => r.requests.applies);
  detail('status patches', (r) => r.requests.statusPatches);
  detail('books not Ready at the end', (r) => r.requests.notReady);
  detail('books with a wrong ConfigMap at the end', (r) => r.requests.cmWrong ?? NaN);
  console.log('\nrequests of the last run of each (counted by the server):\n');
  for (const v of variants)
    for (const s of subjects) {
      const last = res.get(`${s.name}/${v.label}`)?.at(-1);
      if (last) console.log(`- ${s.name}, ${v.label}: ${requestText(last.requests)}`);
    }
  for (const e of errors) console.log(`\n⚠️ ${e}`);

  for (const v of variants)
    ratioRow(
      `initial sync of ${N} books, ${v.label} (spawn → N-th Added, ms)`,
      get(CTRL, v, (r) => r.syncMs),
      get(FLOORS, v, (r) => r.syncMs),
      'floor',
      0,
      1.2,
      na(v),
    );
  for (const v of variants)
    ratioRow(
      `watch of ${M} events, ${v.label} (ms)`,
      get(CTRL, v, (r) => r.watchMs),
      get(FLOORS, v, (r) => r.watchMs),
      'floor',
      0,
      1.25,
      na(v),
    );
  for (const v of variants)
    ratioRow(
      `first event, ${v.label} (spawn → first line, ms)`,
      get(CTRL, v, (r) => r.firstMs),
      get(FLOORS, v, (r) => r.firstMs),
      'floor',
      0,
      1.1,
      na(v),
    );
  // requests: what the contract needs, and no more
  for (const v of variants) {
    const runs = res.get(`controller/${v.label}`) ?? [];
    const last = runs.at(-1);
    const want =
      v.mode === 'streaming'
        ? { streamingLists: 1, listPages: 0, watches: 0, cmStreamingLists: 1, cmListPages: 0 }
        : {
            streamingLists: 0,
            listPages: Math.max(1, Math.ceil(N / 500)),
            watches: 1,
            rejectedStreamingLists: 1,
            cmStreamingLists: 0,
            cmListPages: 1,
            cmWatches: 1,
            cmRejectedStreamingLists: 1,
          };
    const ok =
      last && !na(v)
        ? runs.every(
            (r) =>
              writesOk(r.requests) &&
              Object.entries(want).every(([k, n]) => r.requests[k as keyof ServerStats] === n),
          )
        : undefined;
    const fl = res.get(`floor/${v.label}`)?.at(-1);
    SUMMARY.push({
      measure: `requests, sync + watch, ${v.label}`,
      controller:
        na(v) ?? (last ? `${requestText(last.requests)}; ${endState(last.requests)}` : '–'),
      reference: fl ? `floor: ${requestText(fl.requests)}` : '',
      ratio: '–',
      target: `${v.mode === 'streaming' ? '1 streaming list each' : 'each: 1 refused streaming list, its pages, 1 watch'}; ≤ 1 apply and ≤ 1 status patch per new generation, none unchanged; all Ready with their ConfigMaps`,
      ok,
    });
  }
  for (const v of variants)
    ratioRow(
      `peak RSS, ${v.label} (MB)`,
      get(CTRL, v, (r) => r.rssMB),
      get(FLOORS, v, (r) => r.rssMB),
      'floor',
      0,
      1.15,
      na(v),
    );
}

// ---------- scenario: memory per cached book ----------
interface MemRun {
  heapUsed: number;
  rss: number;
  hwm: number;
  patches: number; // writes: applies + status patches
  rvMoved: number; // how far the server's resourceVersion moved
  requests?: ServerStats;
  gc: boolean;
  probe?: {
    heapTotal: number;
    external: number;
    arrayBuffers: number;
    spaces: Record<string, number>;
    sourceMaps?: boolean;
  };
  error?: string;
  na?: string;
}
async function memRun(
  server: Server,
  s: Subject,
  books: number,
  launcher = MAIN,
  nodeFlags: string[] = [],
): Promise<MemRun> {
  await server.call('reset', { books, events: 0, watchlist: 1, ready: 1, latency: 0 });
  const file = join(tmp, `mem-${Math.random().toString(36).slice(2)}.json`);
  const c = spawnSubject(s, server, launcher, {
    probe: true,
    env: { BENCH_MEMORY_FILE: file },
    nodeFlags,
  });
  const timeout = 60_000 + books;
  const how =
    books > 0
      ? await c.waitLines(books, 3000, timeout)
      : await c.until(async () => (await server.call('stats')).openWatches > 0, timeout);
  const run: MemRun = {
    heapUsed: NaN,
    rss: NaN,
    hwm: NaN,
    patches: NaN,
    rvMoved: NaN,
    gc: false,
  };
  if (how === 'done') {
    await sleep(500);
    try {
      process.kill(c.pid, 'SIGUSR2');
    } catch {
      /* gone */
    }
    await c.until(() => existsSync(file), 10_000);
    try {
      const m = JSON.parse(readFileSync(file, 'utf8'));
      Object.assign(run, { heapUsed: m.heapUsed, rss: m.rss / 1048576, gc: m.gc, probe: m });
    } catch {
      run.error = 'no memory report after SIGUSR2';
    }
    run.hwm = procStats(c.pid).rssMB;
  } else run.error = `${how} after ${c.lines} lines: ${c.lastStderr()}`;
  const exit = await c.stop();
  const st = await server.call('stats');
  run.requests = st;
  run.patches = st.applies + st.statusPatches;
  run.rvMoved = st.rv - 2 * books; // a fresh world: one RV per book and per ConfigMap
  if (c.lines < books) run.error ??= `printed ${c.lines} of ${books} lines`;
  if (exit !== 0) run.error ??= `exit ${exit} after SIGTERM: ${c.lastStderr()}`;
  run.na = refused(c);
  return run;
}

async function memoryTable() {
  const subjects = flags.raw ? [CTRL, FLOORS, RAW] : [CTRL, FLOORS];
  console.log(
    `\n## memory per cached book: ${MB} books already Ready with their ConfigMaps (a restart), streaming list; ${LAUNCHER_NAME[MAIN]}, ${R} runs\n`,
  );
  const server = await startServer(MB, 0);
  const res = new Map<string, MemRun[]>();
  const errors: string[] = [];
  try {
    for (let r = 0; r < R; r++) {
      for (let k = 0; k < subjects.length; k++) {
        const s = subjects[(k + r) % subjects.length];
        for (const books of [0, MB]) {
          const run = await memRun(server, s, books);
          if (run.error) errors.push(`${s.name}, ${books} books, run ${r + 1}: ${run.error}`);
          const key = `${s.name}/${books}`;
          res.set(key, [...(res.get(key) ?? []), run]);
          progress();
        }
      }
    }
  } finally {
    server.stop();
    progress('\n');
  }
  const get = (s: Subject, books: number, f: (r: MemRun) => number) =>
    (res.get(`${s.name}/${books}`) ?? []).map(f);
  // per book: each run's full heap minus the median empty heap of the same subject
  const perBook = (s: Subject) => {
    const none = median(get(s, 0, (r) => r.heapUsed));
    return get(s, MB, (r) => (r.heapUsed - none) / MB);
  };
  console.log(
    `| metric | controller | floor (a number per book and per ConfigMap) |${flags.raw ? ' raw floor (nothing per book) |' : ''}`,
  );
  console.log(`|---|---|---|${flags.raw ? '---|' : ''}`);
  const line = (metric: string, f: (s: Subject) => number[], d = 0) =>
    console.log(`| ${metric} | ${subjects.map((s) => cell(f(s), d)).join(' | ')} |`);
  line('heap used after GC, no books (MB)', (s) => get(s, 0, (r) => r.heapUsed / 1048576), 1);
  line(`heap used after GC, ${MB} books (MB)`, (s) => get(s, MB, (r) => r.heapUsed / 1048576), 1);
  line('bytes per cached book', perBook);
  line(`RSS after GC, ${MB} books (MB)`, (s) => get(s, MB, (r) => r.rss));
  line(`peak RSS, ${MB} books (MB)`, (s) => get(s, MB, (r) => r.hwm));
  line(`writes (applies + status patches) over ${MB} Ready books`, (s) =>
    get(s, MB, (r) => r.patches),
  );
  line(`resourceVersion moved by`, (s) => get(s, MB, (r) => r.rvMoved));
  if (!res.get(`controller/${MB}`)?.some((r) => r.gc))
    errors.push('the runtime offered no forced GC: heap numbers include garbage');
  for (const e of errors) console.log(`\n⚠️ ${e}`);
  const na = res.get(`controller/${MB}`)?.find((r) => r.na)?.na;
  const pb = median(perBook(CTRL));
  SUMMARY.push({
    measure: `memory per cached book (heap after GC, ${MB} books − none, / ${MB}; bytes)`,
    controller: na ?? cell(perBook(CTRL)),
    reference: `floor ${cell(perBook(FLOORS))}${flags.raw ? `, raw floor ${cell(perBook(RAW))}` : ''}`,
    ratio: '–',
    target: '≤ 500 bytes',
    ok: na || Number.isNaN(pb) ? undefined : pb <= 500,
  });
  SUMMARY.push({
    measure: `RSS at ${MB} books, after GC (MB)`,
    controller: na ?? cell(get(CTRL, MB, (r) => r.rss)),
    reference: `floor ${cell(get(FLOORS, MB, (r) => r.rss))}`,
    ratio: fmt(median(get(CTRL, MB, (r) => r.rss)) / median(get(FLOORS, MB, (r) => r.rss)), 2),
    target: 'beside it',
    ok: undefined,
  });
  const patches = get(CTRL, MB, (r) => r.patches);
  SUMMARY.push({
    measure: `requests, restart over ${MB} books already Ready with correct ConfigMaps (writes; resourceVersion moved)`,
    controller:
      na ??
      `${cell(patches)}; ${cell(get(CTRL, MB, (r) => r.rvMoved))}; ${(() => {
        const last = res.get(`controller/${MB}`)?.at(-1)?.requests;
        return last ? requestText(last) : '';
      })()}`,
    reference: `floor ${cell(get(FLOORS, MB, (r) => r.patches))}`,
    ratio: '–',
    target: '0',
    ok:
      na || !patches.length
        ? undefined
        : patches.every((p) => p === 0) && get(CTRL, MB, (r) => r.rvMoved).every((m) => m === 0),
  });
}

// ---------- scenario: books Ready ----------
interface ReadyRun {
  readyMs: number;
  patches: number;
  lines: number;
  error?: string;
  na?: string;
  stats?: ServerStats;
}
async function readyRun(
  server: Server,
  concurrency: number,
  launcher = MAIN,
  nodeFlags: string[] = [],
): Promise<ReadyRun> {
  await server.call('reset', { books: 0, events: 0, watchlist: 1, latency: LAT });
  const c = spawnSubject(CTRL, server, launcher, {
    args: ['--concurrency', String(concurrency)],
    nodeFlags,
  });
  const run: ReadyRun = { readyMs: NaN, patches: NaN, lines: 0 };
  let how = await c.until(async () => (await server.call('stats')).openWatches > 0, 60_000);
  if (how === 'done') {
    await sleep(300);
    await server.call('create', { n: RB });
    const limit = (RB * LAT * 4) / concurrency + 60_000;
    how = await c.until(async () => (await server.call('stats')).createdReady >= RB, limit);
    await c.waitLines(RB, 1000, 10_000);
  }
  const stats = await server.call('stats', { full: 1 });
  const exit = await c.stop();
  Object.assign(run, {
    readyMs: stats.readyMs,
    patches: stats.statusPatches,
    lines: c.lines,
    na: refused(c),
    stats,
  });
  if (how !== 'done')
    run.error = `${how}: ${stats.createdReady} of ${RB} Ready, ${c.lines} lines: ${c.lastStderr()}`;
  else if (exit !== 0) run.error = `exit ${exit} after SIGTERM: ${c.lastStderr()}`;
  return run;
}

async function readyTable() {
  console.log(
    `\n## books Ready: ${RB} new books, ${LAT} ms per write (apply and status patch); ${LAUNCHER_NAME[MAIN]}, ${R_READY} run(s) each\n`,
  );
  const server = await startServer(0, 0);
  const res = new Map<number, ReadyRun[]>();
  const errors: string[] = [];
  try {
    for (let r = 0; r < R_READY; r++) {
      for (const cc of CONCURRENCY) {
        const run = await readyRun(server, cc);
        if (run.error && !run.na) errors.push(`--concurrency ${cc}, run ${r + 1}: ${run.error}`);
        res.set(cc, [...(res.get(cc) ?? []), run]);
        progress();
      }
    }
  } finally {
    server.stop();
    progress('\n');
  }
  console.log(
    '| --concurrency | time until the last is Ready (ms) | ideal (ms) | ratio | applies | status patches | lines printed |',
  );
  console.log('|---|---|---|---|---|---|---|');
  for (const cc of CONCURRENCY) {
    const runs = res.get(cc) ?? [];
    const ideal = (RB * 2 * LAT) / cc;
    const na = runs.find((r) => r.na)?.na;
    console.log(
      `| ${cc} | ${na ?? cell(runs.map((r) => r.readyMs))} | ${ideal} | ${fmt(median(runs.map((r) => r.readyMs)) / ideal, 2)} | ${cell(runs.map((r) => r.stats?.applies ?? NaN))} | ${cell(runs.map((r) => r.patches))} | ${cell(runs.map((r) => r.lines))} |`,
    );
    ratioRow(
      `books Ready: ${RB} new books, ${LAT} ms per write, --concurrency ${cc} (ms)`,
      runs.map((r) => r.readyMs),
      [ideal],
      'ideal',
      0,
      1.2,
      na,
    );
    const last = runs.at(-1)?.stats;
    SUMMARY.push({
      measure: `requests, ${RB} new books at --concurrency ${cc}`,
      controller: na ?? (last ? `${requestText(last)}; ${endState(last)}` : '–'),
      reference: '',
      ratio: '–',
      target: `${RB} applies and ${RB} status patches (one each per new book)`,
      ok:
        na || !runs.length
          ? undefined
          : runs.every(
              (r) => r.stats?.applies === RB && r.patches === RB && r.stats && writesOk(r.stats),
            ),
    });
  }
  for (const e of errors) console.log(`\n⚠️ ${e}`);
}

// ---------- scenario: a real kube-apiserver (--real) ----------
interface RealRun {
  readyMs: number; // the first create sent → the last book Ready (seen by the bench's watch)
  createMs: number; // the first create sent → the last create answered
  rssMB: number;
  lines: number;
  error?: string;
  na?: string;
}
interface RealRestart {
  writes: number; // create/update/patch/delete in the audit log, in the namespace, while it ran
  moved: number; // books and ConfigMaps whose resourceVersion moved
  requests: string; // what it asked, by verb and resource (audit log)
  syncMs: number; // spawn → the last book's line
  rssMB: number;
  error?: string;
}
type ClusterModule = typeof import('../e2e/cluster.ts');
type Cluster = Awaited<ReturnType<ClusterModule['startCluster']>>;

/** A kubeconfig like the admin's, with `namespace` as its context's namespace. */
const kubeconfigIn = (cluster: Cluster, namespace: string) =>
  kubeconfig({ server: cluster.server, ca: cluster.ca, token: cluster.token, namespace });

/** A request to the real server with the admin's token, on a keep-alive agent. */
function realRequest(
  cluster: Cluster,
  agent: https.Agent,
  method: string,
  path: string,
  body?: unknown,
  contentType = 'application/json',
): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const text = body === undefined ? undefined : JSON.stringify(body);
    https
      .request(
        cluster.server + path,
        {
          agent,
          method,
          headers: {
            authorization: `Bearer ${cluster.token}`,
            ...(text === undefined ? {} : { 'content-type': contentType }),
          },
        },
        (res) => {
          let out = '';
          res.setEncoding('utf8');
          res.on('data', (c) => {
            out += c;
          });
          res.on('end', () => resolve({ status: res.statusCode ?? 0, body: out }));
        },
      )
      .on('error', reject)
      .end(text);
  });
}

const realBook = (name: string, i: number) => ({
  apiVersion: 'example.technosophos.com/v1',
  kind: 'Book',
  metadata: { name },
  spec: { title: listTitleOf(name, i), authors: authorsOf(i) },
});

/**
 * Watches the namespace's books from now, and resolves when every name in `names` is Ready at its
 * generation: the time that was seen.
 */
async function watchReady(
  cluster: Cluster,
  agent: https.Agent,
  ns: string,
  names: Set<string>,
  timeoutMs: number,
): Promise<{ done: Promise<number>; stop: () => void }> {
  const path = `/apis/example.technosophos.com/v1/namespaces/${ns}/books`;
  const list = await realRequest(cluster, agent, 'GET', `${path}?limit=1`);
  const rv = JSON.parse(list.body).metadata.resourceVersion;
  let stop = () => {};
  const done = new Promise<number>((resolve, reject) => {
    const waiting = new Set(names);
    const timer = setTimeout(
      () => reject(new Error(`${waiting.size} of ${names.size} not Ready after ${timeoutMs} ms`)),
      timeoutMs,
    );
    const req = https.get(
      `${cluster.server}${path}?watch=true&resourceVersion=${rv}&timeoutSeconds=3600`,
      {
        agent: new https.Agent({ ca: cluster.ca }),
        headers: { authorization: `Bearer ${cluster.token}` },
      },
      (res) => {
        let rest = '';
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => {
          const t = performance.now();
          const lines = (rest + chunk).split('\n');
          rest = lines.pop() ?? '';
          for (const line of lines) {
            if (!line) continue;
            const { object: b } = JSON.parse(line) as {
              object: {
                metadata: { name: string; generation?: number };
                status?: {
                  conditions?: { type: string; status: string; observedGeneration?: number }[];
                };
              };
            };
            const ready = b.status?.conditions?.find((c) => c.type === 'Ready');
            if (ready?.status === 'True' && ready.observedGeneration === b.metadata.generation)
              waiting.delete(b.metadata.name);
          }
          if (waiting.size === 0) {
            clearTimeout(timer);
            resolve(t);
            req.destroy();
          }
        });
      },
    );
    req.on('error', () => {});
    stop = () => {
      clearTimeout(timer);
      req.destroy();
    };
  });
  return { done, stop };
}

async function realRun(
  cluster: Cluster,
  agent: https.Agent,
  s: Subject,
  args: string[],
  ns: string,
  books: number,
): Promise<RealRun> {
  const run: RealRun = { readyMs: NaN, createMs: NaN, rssMB: NaN, lines: 0 };
  const booksPath = `/apis/example.technosophos.com/v1/namespaces/${ns}/books`;
  // a first book, so that the subject's first line says it is listing and watching
  await realRequest(cluster, agent, 'POST', booksPath, realBook('aaa-first', 0));
  const c = spawnSubject(s, { kubeconfig: kubeconfigIn(cluster, ns) }, MAIN, { args });
  let how = await c.waitLines(1, 60_000, 60_000);
  if (how === 'done') {
    await sleep(500);
    const names = new Set(
      Array.from({ length: books }, (_, i) => `book-${String(i).padStart(6, '0')}`),
    );
    const watch = await watchReady(cluster, agent, ns, names, 600_000);
    const t0 = performance.now();
    // create them as fast as the server takes them, 8 at a time
    const queue = [...names];
    await Promise.all(
      Array.from({ length: 8 }, async () => {
        for (let name = queue.shift(); name; name = queue.shift()) {
          const i = Number(name.slice(5));
          const r = await realRequest(cluster, agent, 'POST', booksPath, realBook(name, i));
          if (r.status !== 201)
            throw new Error(`create ${name}: ${r.status} ${r.body.slice(0, 200)}`);
        }
      }),
    );
    run.createMs = performance.now() - t0;
    try {
      run.readyMs = (await watch.done) - t0;
    } catch (err) {
      run.error = String(err);
      how = 'timeout';
    }
    watch.stop();
    await c.waitLines(books + 1, 2000, 60_000);
    run.rssMB = procStats(c.pid).rssMB;
  }
  const exit = await c.stop();
  run.lines = c.lines;
  run.na = refused(c);
  if (how !== 'done') run.error ??= `${how} after ${c.lines} lines: ${c.lastStderr(4)}`;
  else if (exit !== 0) run.error = `exit ${exit} after SIGTERM: ${c.lastStderr()}`;
  return run;
}

/** The namespace's books and owned ConfigMaps: name → resourceVersion. */
async function versions(cluster: Cluster, agent: https.Agent, ns: string) {
  const out = new Map<string, string>();
  for (const path of [
    `/apis/example.technosophos.com/v1/namespaces/${ns}/books`,
    `/api/v1/namespaces/${ns}/configmaps?labelSelector=${encodeURIComponent('app.kubernetes.io/managed-by=book-controller')}`,
  ]) {
    const list = JSON.parse((await realRequest(cluster, agent, 'GET', path)).body) as {
      kind: string;
      items: { metadata: { name: string; resourceVersion: string } }[];
    };
    for (const o of list.items)
      out.set(`${list.kind}/${o.metadata.name}`, o.metadata.resourceVersion);
  }
  return out;
}

async function realRestart(
  cluster: Cluster,
  agent: https.Agent,
  s: Subject,
  ns: string,
  books: number,
): Promise<RealRestart> {
  const before = await versions(cluster, agent, ns);
  const audit = cluster.auditLog ?? '';
  const offset = audit && existsSync(audit) ? statSync(audit).size : 0;
  const c = spawnSubject(s, { kubeconfig: kubeconfigIn(cluster, ns) }, MAIN);
  const how = await c.waitLines(books + 1, 3000, 120_000);
  const syncMs = (c.times[books - 1] ?? NaN) - c.t0;
  await sleep(2000); // anything it would write, it writes now
  const rssMB = procStats(c.pid).rssMB;
  await c.stop();
  await sleep(500); // the audit log has its watches' ResponseComplete
  let writes = NaN;
  const byVerb = new Map<string, number>();
  if (audit) {
    const fd = openSync(audit, 'r');
    const size = fstatSync(fd).size;
    const buf = Buffer.alloc(size - offset);
    readSync(fd, buf, 0, buf.length, offset);
    closeSync(fd);
    writes = 0;
    for (const line of buf.toString('utf8').split('\n')) {
      if (!line) continue;
      const e = JSON.parse(line) as {
        stage: string;
        verb: string;
        objectRef?: { resource?: string; subresource?: string; namespace?: string };
      };
      if (e.stage !== 'ResponseComplete' || e.objectRef?.namespace !== ns) continue;
      const what = `${e.verb} ${e.objectRef.resource}${e.objectRef.subresource ? `/${e.objectRef.subresource}` : ''}`;
      byVerb.set(what, (byVerb.get(what) ?? 0) + 1);
      if (['create', 'update', 'patch', 'delete', 'deletecollection'].includes(e.verb)) writes++;
    }
  }
  const requests = [...byVerb].map(([k, v]) => `${v} ${k}`).join(', ');
  const after = await versions(cluster, agent, ns);
  let moved = 0;
  for (const [k, v] of after) if (before.get(k) !== v) moved++;
  for (const k of before.keys()) if (!after.has(k)) moved++;
  const run: RealRestart = { writes, moved, requests, syncMs, rssMB };
  if (how !== 'done') run.error = `${how} after ${c.lines} lines: ${c.lastStderr(4)}`;
  return run;
}

async function realTable() {
  const books = Number(flags['real-books']);
  const runs = Number(flags['real-runs']);
  const { startCluster } = (await import('../e2e/cluster.ts')) as ClusterModule;
  console.log(
    `\n## a real kube-apiserver (e2e/cluster.ts): ${books} books created while the subject runs, then a restart over them; ${LAUNCHER_NAME[MAIN]}, ${runs} runs\n`,
  );
  const cluster = await startCluster();
  const agent = new https.Agent({ keepAlive: true, ca: cluster.ca, maxSockets: 16 });
  let version = '';
  const res = new Map<string, RealRun[]>();
  const restarts = new Map<string, RealRestart[]>();
  const errors: string[] = [];
  type Case = { key: string; s: Subject; args: string[] };
  const cases: Case[] = [
    ...CONCURRENCY.map((cc) => ({
      key: `controller --concurrency ${cc}`,
      s: CTRL,
      args: ['--concurrency', String(cc)],
    })),
    { key: 'floor', s: FLOORS, args: [] },
  ];
  try {
    await cluster.kubectlOk(['apply', '-f', join(ROOT, 'crd.yaml')]);
    await cluster.kubectlOk([
      'wait',
      '--for=condition=Established',
      'crd/books.example.technosophos.com',
      '--timeout=60s',
    ]);
    version = JSON.parse((await realRequest(cluster, agent, 'GET', '/version')).body).gitVersion;
    let n = 0;
    for (let r = 0; r < runs; r++) {
      for (let k = 0; k < cases.length; k++) {
        const { key, s, args } = cases[(k + r) % cases.length];
        const ns = `bench-${++n}`;
        await realRequest(cluster, agent, 'POST', '/api/v1/namespaces', {
          apiVersion: 'v1',
          kind: 'Namespace',
          metadata: { name: ns },
        });
        const run = await realRun(cluster, agent, s, args, ns, books);
        if (run.error) errors.push(`${key}, run ${r + 1}: ${run.error}`);
        res.set(key, [...(res.get(key) ?? []), run]);
        progress();
        // a restart over the Ready books: the controller at its default concurrency, and the floor
        if (!run.error && (key === 'floor' || key === cases[0].key)) {
          const restart = await realRestart(cluster, agent, s, ns, books + 1);
          if (restart.error) errors.push(`${key} restart, run ${r + 1}: ${restart.error}`);
          const rk = s === CTRL ? 'controller' : 'floor';
          restarts.set(rk, [...(restarts.get(rk) ?? []), restart]);
          progress();
        }
        // keep the server small: what this run made goes (the next run uses a fresh namespace)
        for (const path of [
          `/apis/example.technosophos.com/v1/namespaces/${ns}/books`,
          `/api/v1/namespaces/${ns}/configmaps`,
        ])
          await realRequest(cluster, agent, 'DELETE', path);
      }
    }
  } finally {
    agent.destroy();
    await cluster.stop();
    progress('\n');
  }
  console.log(
    `server: ${version}; ${books} books (+1 created first, so that the subject is in sync)\n`,
  );
  console.log(
    '| subject | time until all Ready (ms) | creating them took (ms) | peak RSS (MB) | lines |',
  );
  console.log('|---|---|---|---|---|');
  for (const { key } of cases) {
    const rs = res.get(key) ?? [];
    console.log(
      `| ${key} | ${cell(rs.map((x) => x.readyMs))} | ${cell(rs.map((x) => x.createMs))} | ${cell(rs.map((x) => x.rssMB))} | ${cell(rs.map((x) => x.lines))} |`,
    );
  }
  console.log(
    '\n| restart over them | spawn → last line (ms) | writes (audit log) | objects whose RV moved | peak RSS (MB) | requests in the namespace (audit log, last run) |',
  );
  console.log('|---|---|---|---|---|---|');
  for (const [k, rs] of restarts)
    console.log(
      `| ${k} | ${cell(rs.map((x) => x.syncMs))} | ${cell(rs.map((x) => x.writes))} | ${cell(rs.map((x) => x.moved))} | ${cell(rs.map((x) => x.rssMB))} | ${rs.at(-1)?.requests ?? ''} |`,
    );
  for (const e of errors) console.log(`\n⚠️ ${e}`);
  const floor = res.get('floor') ?? [];
  for (const { key, s } of cases) {
    if (s !== CTRL) continue;
    const rs = res.get(key) ?? [];
    ratioRow(
      `real ${version}: ${books} new books Ready, ${key} (ms)`,
      rs.map((x) => x.readyMs),
      floor.map((x) => x.readyMs),
      'floor',
      0,
      1.2,
      rs.find((x) => x.na)?.na,
    );
  }
  const first = res.get(cases[0].key) ?? [];
  ratioRow(
    `real ${version}: peak RSS, ${cases[0].key} (MB)`,
    first.map((x) => x.rssMB),
    floor.map((x) => x.rssMB),
    'floor',
    0,
    1.15,
  );
  const rc = restarts.get('controller') ?? [];
  SUMMARY.push({
    measure: `real ${version}: restart over ${books} Ready books (writes in the audit log; objects whose resourceVersion moved)`,
    controller: `${cell(rc.map((x) => x.writes))}; ${cell(rc.map((x) => x.moved))}; ${rc.at(-1)?.requests ?? ''}`,
    reference: `floor ${cell((restarts.get('floor') ?? []).map((x) => x.writes))}; ${cell((restarts.get('floor') ?? []).map((x) => x.moved))}`,
    ratio: '–',
    target: '0; 0',
    ok: rc.length ? rc.every((x) => x.writes === 0 && x.moved === 0 && !x.error) : undefined,
  });
}

// ---------- scenario: idle with a short watch timeout ----------
async function idleTable() {
  const seconds = 5,
    timeout = 1,
    books = 10;
  console.log(
    `\n## idle: ${books} books already Ready, --watch-timeout ${timeout}, ${seconds} s after sync; ${LAUNCHER_NAME[MAIN]}\n`,
  );
  const server = await startServer(books, 0);
  console.log('| mode | requests (counted by the server) | watches per timeout |');
  console.log('|---|---|---|');
  try {
    for (const mode of ['streaming', 'paginated'] as Mode[]) {
      await server.call('reset', {
        books,
        events: 0,
        watchlist: mode === 'streaming' ? 1 : 0,
        ready: 1,
      });
      const c = spawnSubject(CTRL, server, MAIN, { args: ['--watch-timeout', String(timeout)] });
      const how = await c.waitLines(books, 3000, 60_000);
      await sleep(seconds * 1000);
      const st = await server.call('stats');
      await c.stop();
      const na = refused(c) ?? (how !== 'done' ? `${how}: ${c.lastStderr()}` : undefined);
      const watches = st.watches + st.streamingLists;
      const cmWatches = st.cmWatches + st.cmStreamingLists;
      const allowed = Math.ceil(st.sinceFirstMs / 1000 / timeout) + 1;
      const lists = mode === 'streaming' ? 0 : 1;
      console.log(
        `| ${mode} | ${requestText(st)} over ${fmt(st.sinceFirstMs / 1000, 1)} s | ${fmt(watches / (st.sinceFirstMs / 1000 / timeout), 2)} |`,
      );
      SUMMARY.push({
        measure: `requests, idle ${fmt(st.sinceFirstMs / 1000, 1)} s with --watch-timeout ${timeout}, ${mode}`,
        controller: na ?? requestText(st),
        reference: '',
        ratio: '–',
        target: `≤ ${allowed} watches of each (one per timeout), ${lists} list pages of each, 0 writes`,
        ok: na
          ? undefined
          : watches <= allowed &&
            cmWatches <= allowed &&
            st.listPages === lists &&
            st.cmListPages === lists &&
            st.statusPatches === 0 &&
            st.applies === 0 &&
            st.other === 0,
      });
      progress();
    }
  } finally {
    server.stop();
    progress('\n');
  }
}

// ---------- scenario: requeue ----------
/**
 * A copy of `file` whose example reconcile also returns { requeueAfter: seconds }, in a folder of
 * the bench's temp folder (removed at the end) where its imports resolve as the original's do:
 * node_modules a link to the repository's, and a package.json that makes it an ES module. The
 * original `reconcile` is renamed and wrapped, so the copy follows whatever the original does.
 */
function requeueCopy(file: string, seconds: number): Subject | { na: string } {
  const src = readFileSync(file, 'utf8');
  const declaration = 'export async function reconcile(';
  if (!src.includes(declaration)) return { na: `n/a: no '${declaration}' in ${file}` };
  if (/^\s*import[^;]*?from\s*['"]\.\.?\//m.test(src))
    return { na: `n/a: ${file} imports files next to it; the copy would not find them` };
  const dir = join(tmp, 'requeue');
  mkdirSync(dir, { recursive: true });
  if (!existsSync(join(dir, 'node_modules')))
    symlinkSync(join(ROOT, 'node_modules'), join(dir, 'node_modules'), 'dir');
  writeFileSync(join(dir, 'package.json'), '{ "type": "module" }\n');
  const copy = join(dir, `requeue-${seconds}s-${file.split('/').pop()}`);
  writeFileSync(
    copy,
    `${src.replace(declaration, 'async function reconcileAsGiven(')}
// Added by bench/bench.ts (requeue scenario): the reconcile above, asking for another look
// every ${seconds} s.
export async function reconcile(change: Change, book: Book, context: Context): Promise<Result | void> {
  const result = await reconcileAsGiven(change, book, context);
  return change === 'Deleted' ? result : { ...result, requeueAfter: ${seconds} };
}
`,
  );
  return { name: `controller, requeueAfter ${seconds}`, file: copy };
}

/** The subject's /metrics, each family's samples summed over their labels. */
function scrape(port: number): Promise<Map<string, number>> {
  return new Promise((resolve) => {
    http
      .get(`http://127.0.0.1:${port}/metrics`, (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => {
          body += c;
        });
        res.on('end', () => {
          const sums = new Map<string, number>();
          for (const m of body.matchAll(/^(\w+)(?:\{[^}]*\})? (\S+)$/gm))
            sums.set(m[1], (sums.get(m[1]) ?? 0) + Number(m[2]));
          resolve(sums);
        });
      })
      .on('error', () => resolve(new Map()));
  });
}

/** VmRSS now (MB). */
function rssNow(pid: number): number {
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) / 1024 : NaN;
  } catch {
    return NaN;
  }
}

interface RequeueRun {
  syncMs: number; // spawn → every book printed and Ready
  windowS: number; // the window, measured
  cpuS: number; // the subject's utime+stime in the window
  serverCpuS: number; // the server's, in the same window
  reconciles: number; // controller_runtime_reconcile_total, in the window
  failed: number; // controller_runtime_reconcile_errors_total, in the window
  rssStartMB: number;
  rssEndMB: number;
  rssPeakMB: number; // the largest VmRSS sampled in the window
  hwmMB: number; // VmHWM: the whole run, the initial sync included
  heapMB: number; // heap used after a forced GC, at the end
  heapTotalMB: number; // V8's heap before that GC: what it holds, garbage included
  timers: number; // ref'd Timeout handles at the end
  lines: number; // lines printed in the window
  requests: ServerStats; // counted by the server in the window
  end: ServerStats; // the server at the end (full: wrong ConfigMaps too)
  error?: string;
  na?: string;
}

/** The counters of `b` less those of `a`: what happened between two stats calls. */
function statsSince(a: ServerStats, b: ServerStats): ServerStats {
  const out = { ...b };
  for (const k of Object.keys(b) as (keyof ServerStats)[]) {
    const x = a[k],
      y = b[k];
    if (typeof x === 'number' && typeof y === 'number') (out as Record<string, unknown>)[k] = y - x;
  }
  return out;
}

async function requeueRun(server: Server, s: Subject): Promise<RequeueRun> {
  await server.call('reset', { books: QB, events: 0, watchlist: 1, latency: 0 });
  const port = await freePort();
  const file = join(tmp, `requeue-${Math.random().toString(36).slice(2)}.json`);
  const subject = { ...s, args: [...(s.args ?? []), '--health-port', String(port)] };
  const c = spawnSubject(subject, server, MAIN, { probe: true, env: { BENCH_MEMORY_FILE: file } });
  const run: RequeueRun = {
    syncMs: NaN,
    windowS: NaN,
    cpuS: NaN,
    serverCpuS: NaN,
    reconciles: NaN,
    failed: NaN,
    rssStartMB: NaN,
    rssEndMB: NaN,
    rssPeakMB: NaN,
    hwmMB: NaN,
    heapMB: NaN,
    heapTotalMB: NaN,
    timers: NaN,
    lines: NaN,
    requests: await server.call('stats'),
    end: await server.call('stats'),
  };
  const limit = 180_000 + QB * 10;
  let how = await c.waitLines(QB, 2000, limit);
  if (how === 'done')
    how = await c.until(async () => (await server.call('stats')).notReady === 0, limit);
  if (how === 'done') {
    run.syncMs = performance.now() - c.t0;
    await sleep(QS * 1000); // every book has had its first requeue: the steady state
    const pid = c.pid;
    const serverPid = server.proc.pid ?? 0;
    // The window is QW s to the millisecond, its edges read alike (CPU, then /metrics): the keys
    // due together in a burst (those the initial sync finished together) are then counted as
    // often at both ends, whatever the phase the window starts at.
    const lines0 = c.lines;
    const rssStart = rssNow(pid);
    const t0 = performance.now();
    const cpu0 = procStats(pid).cpuS,
      serverCpu0 = procStats(serverPid).cpuS;
    const metrics0 = await scrape(port);
    const stats0 = await server.call('stats');
    let peak = rssStart;
    for (let left = QW * 1000; left > 0 && c.exitCode === undefined; ) {
      await sleep(Math.min(250, left));
      peak = Math.max(peak, rssNow(pid));
      left = t0 + QW * 1000 - performance.now();
    }
    const t1 = performance.now();
    const cpu1 = procStats(pid).cpuS,
      serverCpu1 = procStats(serverPid).cpuS;
    const metrics1 = await scrape(port);
    const stats1 = await server.call('stats');
    const delta = (name: string) => (metrics1.get(name) ?? NaN) - (metrics0.get(name) ?? NaN);
    Object.assign(run, {
      rssStartMB: rssStart,
      windowS: (t1 - t0) / 1000,
      cpuS: cpu1 - cpu0,
      serverCpuS: serverCpu1 - serverCpu0,
      reconciles: delta('controller_runtime_reconcile_total'),
      failed: delta('controller_runtime_reconcile_errors_total'),
      rssEndMB: rssNow(pid),
      rssPeakMB: peak,
      hwmMB: procStats(pid).rssMB,
      lines: c.lines - lines0,
      requests: statsSince(stats0, stats1),
    });
    // last, as it forces a GC: the heap after it, and what keeps the event loop alive
    try {
      process.kill(pid, 'SIGUSR2');
      await c.until(() => existsSync(file), 10_000);
      const m = JSON.parse(readFileSync(file, 'utf8'));
      run.heapMB = m.heapUsed / 1048576;
      run.heapTotalMB = (m.before?.heapTotal ?? NaN) / 1048576;
      run.timers = m.resources ? (m.resources.Timeout ?? 0) : NaN; // none: the runtime has no count
    } catch {
      /* no report */
    }
  }
  run.end = await server.call('stats', { full: 1 });
  const exit = await c.stop();
  run.na = refused(c);
  if (how !== 'done') run.error = `${how} after ${c.lines} lines, exit ${exit}: ${c.lastStderr(4)}`;
  else if (exit !== 0) run.error = `exit ${exit} after SIGTERM (want 0): ${c.lastStderr()}`;
  if (c.stderr.trim() && !run.error)
    NOTES.push(`${s.name} (requeue) wrote to stderr: ${c.lastStderr()}`);
  return run;
}

async function requeueTable() {
  const ideal = QB / QS;
  console.log(
    `\n## requeue: ${QB} new books, a copy of the controller whose reconcile returns { requeueAfter: ${QS} }, against the controller as it is; a ${QW} s window from ${QS} s after the initial sync; ${LAUNCHER_NAME[MAIN]}, ${R_REQUEUE} run(s)\n`,
  );
  console.log(
    `rows: what each process did in the same ${QW} s window of a steady state (${QB} books, all Ready; with requeue each one reconciled every ${QS} s, ideally ${fmt(ideal)}/s, printing and writing nothing): CPU = utime+stime / wall; RSS from /proc (peak sampled every 250 ms in the window; VmHWM over the whole run); reconciles from its /metrics; requests as the server counted them.\n`,
  );
  if (QW % QS !== 0)
    console.log(
      `⚠️ --requeue-seconds ${QW} is not whole periods of ${QS} s: keys due together may be counted once more or less\n`,
    );
  const copy = requeueCopy(CONTROLLER, QS);
  const subjects: Subject[] = 'na' in copy ? [CTRL] : [copy, CTRL];
  const server = await startServer(QB, 0);
  const res = new Map<string, RequeueRun[]>();
  const errors: string[] = [];
  try {
    for (let r = 0; r < R_REQUEUE; r++) {
      for (let k = 0; k < subjects.length; k++) {
        const s = subjects[(k + r) % subjects.length]; // rotate the order each round
        const run = await requeueRun(server, s);
        if (run.error && !run.na) errors.push(`${s.name}, run ${r + 1}: ${run.error}`);
        res.set(s.name, [...(res.get(s.name) ?? []), run]);
        progress();
      }
    }
  } finally {
    server.stop();
    progress('\n');
  }
  const withRequeue = res.get(subjects[0] === CTRL ? '' : subjects[0].name) ?? [];
  const without = res.get(CTRL.name) ?? [];
  const na =
    'na' in copy
      ? copy.na
      : (withRequeue.find((r) => r.na)?.na ??
        (withRequeue.every((r) => Number.isNaN(r.windowS)) ? 'n/a: no window (see ⚠️)' : undefined));
  // no ratio to nothing: an idle controller may use no CPU tick in the window
  const ratioOf = (a: number, b: number) => (b > 0 ? fmt(a / b, 2) : '–');
  const usPerReconcile = (r: RequeueRun) =>
    r.reconciles > 0 ? (r.cpuS / r.reconciles) * 1e6 : NaN;
  const perS = (f: (r: RequeueRun) => number) => (r: RequeueRun) => f(r) / r.windowS;
  const reqPerS = (k: keyof ServerStats) => perS((r) => Number(r.requests[k]));
  const otherPerS = perS(
    (r) =>
      r.requests.gets +
      r.requests.other +
      r.requests.listPages +
      r.requests.cmListPages +
      r.requests.streamingLists +
      r.requests.cmStreamingLists,
  );
  console.log(`| metric | requeueAfter ${QS} | without requeue | ratio |`);
  console.log('|---|---|---|---|');
  const line = (metric: string, f: (r: RequeueRun) => number, d = 0, ratio = true) => {
    const a = withRequeue.map(f),
      b = without.map(f);
    console.log(
      `| ${metric} | ${cell(a, d)} | ${cell(b, d)} | ${ratio ? ratioOf(median(a), median(b)) : '–'} |`,
    );
  };
  line('spawn → every book printed and Ready (ms)', (r) => r.syncMs);
  line(
    `reconciles per second (ideal ${fmt(ideal)} with requeue)`,
    perS((r) => r.reconciles),
    0,
    false,
  );
  line('failed reconciles in the window', (r) => r.failed, 0, false);
  line(
    'CPU (s per s)',
    perS((r) => r.cpuS),
    4,
  );
  line('CPU per reconcile (µs)', usPerReconcile, 0, false);
  line(
    'server CPU (s per s)',
    perS((r) => r.serverCpuS),
    4,
  );
  line('RSS at the start of the window (MB)', (r) => r.rssStartMB);
  line('RSS at the end of the window (MB)', (r) => r.rssEndMB);
  line('peak RSS in the window (MB)', (r) => r.rssPeakMB);
  line('peak RSS of the whole run, VmHWM (MB)', (r) => r.hwmMB);
  line('V8 heap total before a forced GC, at the end (MB)', (r) => r.heapTotalMB, 1);
  line('heap used after that GC (MB)', (r) => r.heapMB, 1);
  line("ref'd timers at the end (Timeout in getActiveResourcesInfo)", (r) => r.timers, 0, false);
  line('lines printed in the window', (r) => r.lines, 0, false);
  line('applies per second', reqPerS('applies'), 2, false);
  line('status patches per second', reqPerS('statusPatches'), 2, false);
  line('GETs, lists and other requests per second', otherPerS, 2, false);
  line('watches started in the window', (r) => r.requests.watches + r.requests.cmWatches, 0, false);
  line('books not Ready at the end', (r) => r.end.notReady, 0, false);
  line('books with a wrong ConfigMap at the end', (r) => r.end.cmWrong ?? NaN, 0, false);
  console.log(`\nrequests in the window of the last run of each (counted by the server):\n`);
  for (const s of subjects) {
    const last = res.get(s.name)?.at(-1);
    if (last)
      console.log(`- ${s.name}: ${requestText(last.requests)} in ${fmt(last.windowS, 1)} s`);
  }
  for (const e of errors) console.log(`\n⚠️ ${e}`);

  const rate = withRequeue.map(perS((r) => r.reconciles));
  SUMMARY.push({
    measure: `requeue: reconciles per second, ${QB} books each with requeueAfter ${QS} (${QW} s window)`,
    controller: na ?? cell(rate),
    reference: `ideal ${fmt(ideal)}`,
    ratio: na ? '–' : fmt(median(rate) / ideal, 2),
    target: '≥ 0.95x',
    ok: na || !rate.length ? undefined : median(rate) / ideal >= 0.95,
  });
  const cpu = withRequeue.map(perS((r) => r.cpuS));
  const usPer = withRequeue.map(usPerReconcile);
  SUMMARY.push({
    measure: `requeue: CPU of ${QB} books requeued every ${QS} s (s per s; µs per reconcile)`,
    controller: na ?? `${cell(cpu, 4)}; ${cell(usPer)} µs`,
    reference: `without requeue ${cell(without.map(perS((r) => r.cpuS)), 4)}`,
    ratio: na ? '–' : ratioOf(median(cpu), median(without.map(perS((r) => r.cpuS)))),
    target: 'beside it',
    ok: undefined,
  });
  ratioRow(
    `requeue: RSS at the end of the ${QW} s window (MB)`,
    withRequeue.map((r) => r.rssEndMB),
    without.map((r) => r.rssEndMB),
    'without requeue',
    0,
    1.15,
    na,
  );
  ratioRow(
    `requeue: peak RSS in the ${QW} s window (MB)`,
    withRequeue.map((r) => r.rssPeakMB),
    without.map((r) => r.rssPeakMB),
    'without requeue',
    0,
    1.15,
    na,
  );
  const last = withRequeue.at(-1);
  SUMMARY.push({
    measure: `requests, requeue: ${QW} s window of ${QB} books requeued every ${QS} s`,
    controller:
      na ?? (last ? `${requestText(last.requests)}; at the end: ${endState(last.end)}` : '–'),
    reference: (() => {
      const w = without.at(-1);
      return w ? `without requeue: ${requestText(w.requests)}` : '';
    })(),
    ratio: '–',
    target:
      '0 applies, 0 status patches, no GET, list or other request (watches only); no line; all Ready',
    ok:
      na || !withRequeue.length
        ? undefined
        : withRequeue.every(
            (r) =>
              r.requests.applies === 0 &&
              r.requests.statusPatches === 0 &&
              otherPerS(r) === 0 &&
              r.lines === 0 &&
              r.end.notReady === 0 &&
              (r.end.cmWrong ?? 0) === 0,
          ),
  });
  const timers = withRequeue.map((r) => r.timers),
    timersWithout = without.map((r) => r.timers);
  SUMMARY.push({
    measure: `requeue: ref'd timers at the end, ${QB} keys waiting (process.getActiveResourcesInfo())`,
    controller: na ?? cell(timers),
    reference: `without requeue ${cell(timersWithout)}`,
    ratio: '–',
    target: '≤ 1 more than without (one timer for every waiting key)',
    ok:
      na || Number.isNaN(median(timers)) || Number.isNaN(median(timersWithout))
        ? undefined
        : median(timers) <= median(timersWithout) + 1,
  });
}

// ---------- what tsx costs (--tables tsx) ----------
// The same controller and floor started five ways: Node's own type stripping, the same with source
// maps on, node --import tsx, that with source maps turned off again right after tsx registers,
// and npx tsx. Heap and RSS after GC with client-node loaded and no books, then peak RSS of the
// streaming sync+watch run.
async function tsxTable() {
  const launchers: Launcher[] = ['strip', 'strip-maps', 'tsx', 'tsx-nomaps', 'npx'];
  const runs = Math.min(R, 2);
  console.log(
    `\n## what tsx costs: idle after start-up (GC'd), then peak RSS of the streaming sync of ${N} books + ${M} events; ${runs} run(s) each\n`,
  );
  const cells = new Map<string, string[]>();
  const idle = await startServer(0, 0);
  try {
    for (const l of launchers) {
      for (const s of [CTRL, FLOORS]) {
        // npx cannot preload the probe: its idle columns would be node --import tsx's
        const mems: MemRun[] = [];
        if (l !== 'npx') for (let r = 0; r < runs; r++) mems.push(await memRun(idle, s, 0, l));
        const mb = (f: (m: MemRun) => number) => cell(mems.map(f), 1);
        cells.set(`${l}/${s.name}`, [
          mb((m) => m.heapUsed / 1048576),
          mb((m) => m.probe?.spaces.old_space ?? NaN),
          mb((m) => m.probe?.spaces.code_space ?? NaN),
          mb((m) => (m.probe?.external ?? NaN) / 1048576),
          mb((m) => m.rss),
          String(mems.at(-1)?.probe?.sourceMaps ?? '–'),
        ]);
        progress();
      }
    }
  } finally {
    idle.stop();
  }
  const server = await startServer(N, M);
  const peaks = new Map<string, number[]>();
  const parts = new Map<string, number[][]>();
  try {
    for (let r = 0; r < runs; r++)
      for (const l of launchers)
        for (const s of [CTRL, FLOORS]) {
          const run = await syncRun(server, s, 'streaming', l, [], true);
          const key = `${l}/${s.name}`;
          peaks.set(key, [...(peaks.get(key) ?? []), run.rssMB]);
          const p = run.peaks?.peaks ?? {};
          const mb = (x: number | undefined) => (x === undefined ? NaN : x / 1048576);
          parts.set(key, [
            ...(parts.get(key) ?? []),
            [mb(p.heapTotal), mb(p.heapUsed), mb(p.external), mb(run.peaks?.heapUsed)],
          ]);
          progress();
        }
  } finally {
    server.stop();
    progress('\n');
  }
  console.log(
    '| launcher | subject | heap used, idle (MB) | old space (MB) | code space (MB) | external (MB) | RSS, idle (MB) | source maps on | peak RSS, sync+watch (MB) | its largest V8 heap total / heap used / external (MB) | heap used after GC at the end (MB) |',
  );
  console.log('|---|---|---|---|---|---|---|---|---|---|---|');
  for (const l of launchers)
    for (const s of [CTRL, FLOORS]) {
      const key = `${l}/${s.name}`;
      const idleCells = (cells.get(key) ?? []).join(' | ');
      const ps = parts.get(key) ?? [];
      const col = (i: number) => cell(ps.map((x) => x[i]));
      console.log(
        `| ${LAUNCHER_NAME[l]} | ${s.name} | ${idleCells} | ${cell(peaks.get(key) ?? [])} | ${col(0)} / ${col(1)} / ${col(2)} | ${col(3)} |`,
      );
    }
}

// ---------- start-up by launcher, and import cost (extra tables: --tables launchers,imports) ----------
async function launcherTable() {
  const books = 500;
  const launchers: Launcher[] = ['tsx', 'npx', 'strip', 'deno', 'bun'];
  console.log(
    `\n## start-up by launcher: ${books} books already Ready, ${R_STARTUP} runs (spawn → ${books}-th Added, peak RSS)\n`,
  );
  console.log(
    '| launcher | controller (ms) | floor (ms) | controller RSS (MB) | floor RSS (MB) | notes |',
  );
  console.log('|---|---|---|---|---|---|');
  const server = await startServer(books, 0);
  try {
    for (const l of launchers) {
      const res = new Map<string, { ms: number; rss: number }[]>();
      const notes = new Set<string>();
      for (let r = -1; r < R_STARTUP; r++) {
        // r = -1: warm-up
        for (const s of [CTRL, FLOORS]) {
          await server.call('reset', { books, events: 0, watchlist: 1, ready: 1 });
          const c = spawnSubject(s, server, l);
          const how = await c.waitLines(books, 3000, 60_000);
          const rss = procStats(c.pid).rssMB;
          await c.stop();
          if (how !== 'done') notes.add(`${s.name}: ${how} ${c.lastStderr(1)}`);
          if (r >= 0)
            res.set(s.name, [...(res.get(s.name) ?? []), { ms: c.times[books - 1] - c.t0, rss }]);
          progress();
        }
      }
      const c = res.get('controller') ?? [],
        f = res.get('floor') ?? [];
      console.log(
        `| ${LAUNCHER_NAME[l]} | ${cell(c.map((x) => x.ms))} | ${cell(f.map((x) => x.ms))} | ${cell(c.map((x) => x.rss))} | ${cell(f.map((x) => x.rss))} | ${[...notes].join('; ').slice(0, 300)} |`,
      );
    }
  } finally {
    server.stop();
    progress('\n');
  }
}

function dependencies(file: string): string[] {
  const src = readFileSync(file, 'utf8');
  const specs = new Set<string>(['@kubernetes/client-node']);
  for (const m of src.matchAll(
    /(?:^|\s)(?:import|export)\s[^'"]*?from\s*['"]([^'"]+)['"]|import\s*\(\s*['"]([^'"]+)['"]\s*\)|^import\s+['"]([^'"]+)['"]/gm,
  )) {
    const s = m[1] ?? m[2] ?? m[3];
    if (
      !s ||
      s.startsWith('.') ||
      s.startsWith('/') ||
      s.startsWith('node:') ||
      builtinModules.includes(s)
    )
      continue;
    specs.add(s);
  }
  return [...specs];
}

function probe(
  launcher: Launcher,
  spec?: string,
): Promise<{ wallMs: number; importMs: number; rssMB: number }> {
  return new Promise((resolve) => {
    const t0 = performance.now();
    const env = { ...process.env, PATH: `${dirname(NODE)}:${process.env.PATH}` };
    const cmd = command(launcher, join(BENCH, 'import-probe.ts'), spec ? [spec] : []);
    const child = spawn(cmd[0], cmd.slice(1), {
      cwd: ROOT,
      env,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    child.stdout.on('data', (d) => {
      out += d;
    });
    child.on('exit', () => {
      const wallMs = performance.now() - t0;
      try {
        resolve({ wallMs, ...JSON.parse(out) });
      } catch {
        resolve({ wallMs: NaN, importMs: NaN, rssMB: NaN });
      }
    });
  });
}

async function importTable() {
  const deps = dependencies(CONTROLLER);
  const launchers: Launcher[] = ['strip', 'tsx', 'npx', 'deno', 'bun'];
  console.log(
    `\n## import cost (medians of ${R_STARTUP}): in-process \`await import(dep)\` time; whole process wall time and RSS\n`,
  );
  console.log(
    `| launcher | empty .ts process: wall (ms) / RSS (MB) | ${deps.map((d) => `import('${d}') (ms)`).join(' | ')} | process with all deps: wall (ms) / RSS (MB) |`,
  );
  console.log(`|---|---|${deps.map(() => '---|').join('')}---|`);
  for (const l of launchers) {
    const take = async (spec?: string) => {
      const rs = [];
      for (let r = 0; r < R_STARTUP; r++) rs.push(await probe(l, spec));
      return {
        wallMs: median(rs.map((x) => x.wallMs)),
        importMs: median(rs.map((x) => x.importMs)),
        rssMB: median(rs.map((x) => x.rssMB)),
      };
    };
    const empty = await take();
    const each = [];
    for (const d of deps) each.push(await take(d));
    const all = await take(deps.join(','));
    console.log(
      `| ${LAUNCHER_NAME[l]} | ${fmt(empty.wallMs)} / ${fmt(empty.rssMB)} | ${each.map((e) => fmt(e.importMs)).join(' | ')} | ${fmt(all.wallMs)} / ${fmt(all.rssMB)} |`,
    );
  }
}

// ---------- --profile: top self-time functions of one run of a scenario ----------
/** A profile's top entries as a table, then its share by package or file. */
function printTop(
  header: string,
  self: Map<string, number>,
  byFile: Map<string, number>,
  total: number,
  rows: number,
  amount: (value: number) => string,
) {
  const top = (m: Map<string, number>, n: number) => [...m].sort((a, b) => b[1] - a[1]).slice(0, n);
  console.log(`${header}\n|---|---|---|`);
  for (const [k, v] of top(self, rows))
    console.log(`| ${amount(v)} | ${fmt((100 * v) / total, 1)} | ${k.replaceAll('|', '\\|')} |`);
  const shares = top(byFile, 8).map(([k, v]) => `${k} ${fmt((100 * v) / total, 1)}%`);
  console.log(`\nby package / file: ${shares.join(', ')}`);
}

/** --profile --heap: what was still allocated when the process exited, by function (sampled). */
function heapProfile(dir: string, file: string, what: string) {
  console.log(`\n## heap profile of ${file} (${LAUNCHER_NAME.strip}), ${what}\n`);
  const files = existsSync(dir) ? readdirSync(dir).filter((f) => f.endsWith('.heapprofile')) : [];
  const main = files.find((f) => f.split('.')[4] === '0') ?? files[0];
  if (!main) return console.log('no .heapprofile written');
  type HeapNode = {
    callFrame: { functionName: string; url: string; lineNumber: number };
    selfSize: number;
    children: HeapNode[];
  };
  const p = JSON.parse(readFileSync(join(dir, main), 'utf8')) as { head: HeapNode };
  const self = new Map<string, number>();
  const byFile = new Map<string, number>();
  let total = 0;
  const short = (url: string) =>
    url
      .replace(`file://${ROOT}/`, '')
      .replace(/^.*node_modules\//, '')
      .replace(/^file:\/\//, '');
  const walk = (n: HeapNode) => {
    const cf = n.callFrame;
    if (n.selfSize) {
      total += n.selfSize;
      const key = `${cf.functionName || '(anonymous)'} ${cf.url ? `${short(cf.url)}:${cf.lineNumber + 1}` : ''}`;
      self.set(key, (self.get(key) ?? 0) + n.selfSize);
      const f = cf.url
        ? short(cf.url).replace(/^(@[^/]+\/[^/]+|[^/]+)\/.*$/, '$1')
        : cf.functionName;
      byFile.set(f, (byFile.get(f) ?? 0) + n.selfSize);
    }
    for (const c of n.children) walk(c);
  };
  walk(p.head);
  const header = `| live at exit (MB) | % of ${fmt(total / 1048576, 1)} MB | allocated by url:line |`;
  printTop(header, self, byFile, total, 15, (v) => fmt(v / 1048576, 1));
  console.log(`(profile: ${join(dir, main)})`);
}

async function profile(file: string, scenario: string) {
  const dir = join(tmp, 'prof');
  const nodeFlags = flags.heap
    ? ['--heap-prof', `--heap-prof-dir=${dir}`]
    : ['--cpu-prof', `--cpu-prof-dir=${dir}`];
  const s: Subject = { name: file === CONTROLLER ? 'controller' : file, file };
  let what = '';
  // Node's own type stripping keeps line numbers exact (tsx's output is one line).
  if (scenario === 'stream' || scenario === 'paged') {
    const server = await startServer(N, M);
    const run = await syncRun(
      server,
      s,
      scenario === 'stream' ? 'streaming' : 'paginated',
      'strip',
      nodeFlags,
    );
    server.stop();
    what = `sync+watch ${scenario}, N=${N}, M=${M}: sync ${fmt(run.syncMs)} ms, watch ${fmt(run.watchMs)} ms, ${requestText(run.requests)}${run.error ? `; ${run.error}` : ''}`;
  } else if (scenario.startsWith('ready')) {
    const cc = Number(scenario.slice(5)) || 1;
    const server = await startServer(0, 0);
    const run = await readyRun(server, cc, 'strip', nodeFlags);
    server.stop();
    what = `books Ready, ${RB} books, --concurrency ${cc}: ${fmt(run.readyMs)} ms (ideal ${(RB * 2 * LAT) / cc}), ${run.patches} status patches${run.error ? `; ${run.error}` : ''}`;
  } else if (scenario === 'memory') {
    const server = await startServer(MB, 0);
    const run = await memRun(server, s, MB, 'strip', nodeFlags);
    server.stop();
    what = `memory, ${MB} Ready books: heap ${fmt(run.heapUsed / 1048576, 1)} MB, peak RSS ${fmt(run.hwm)} MB${run.error ? `; ${run.error}` : ''}`;
  } else throw new Error(`--scenario ${scenario}: stream, paged, ready1, ready8 or memory`);
  if (flags.heap) return heapProfile(dir, file, what);
  console.log(`\n## CPU profile of ${file} (${LAUNCHER_NAME.strip}), ${what}\n`);
  const files = existsSync(dir) ? readdirSync(dir).filter((f) => f.endsWith('.cpuprofile')) : [];
  // CPU.<date>.<time>.<pid>.<thread>.<seq>.cpuprofile: thread 0 is the main thread
  const main = files.find((f) => f.split('.')[4] === '0') ?? files[0];
  if (!main) {
    console.log('no .cpuprofile written (did the process exit through process.exit on SIGTERM?)');
    return;
  }
  type Node = { id: number; callFrame: { functionName: string; url: string; lineNumber: number } };
  const p = JSON.parse(readFileSync(join(dir, main), 'utf8')) as {
    nodes: Node[];
    samples: number[];
    timeDeltas: number[];
  };
  const byId = new Map(p.nodes.map((n) => [n.id, n]));
  const self = new Map<string, number>(),
    byFile = new Map<string, number>();
  let total = 0;
  const short = (url: string) =>
    url
      .replace(`file://${ROOT}/`, '')
      .replace(/^.*node_modules\//, '')
      .replace(/^file:\/\//, '');
  p.samples.forEach((id, i) => {
    const cf = byId.get(id)?.callFrame;
    const dt = p.timeDeltas[i] ?? 0;
    if (!cf || cf.functionName === '(idle)') return;
    total += dt;
    const key = `${cf.functionName || '(anonymous)'} ${cf.url ? `${short(cf.url)}:${cf.lineNumber + 1}` : ''}`;
    self.set(key, (self.get(key) ?? 0) + dt);
    const f = cf.url ? short(cf.url).replace(/^(@[^/]+\/[^/]+|[^/]+)\/.*$/, '$1') : cf.functionName;
    byFile.set(f, (byFile.get(f) ?? 0) + dt);
  });
  const header = `| self time (ms) | % of busy ${fmt(total / 1000)} ms | function url:line |`;
  printTop(header, self, byFile, total, 12, (v) => fmt(v / 1000, 1));
  console.log(`(profile: ${join(dir, main)}; other threads: ${files.length - 1} file(s))`);
}

// one unmeasured run of each subject: fills tsx's and deno's transform caches and the page cache
async function warmUp() {
  const server = await startServer(100, 0);
  try {
    for (const s of flags.raw ? [CTRL, FLOORS, RAW] : [CTRL, FLOORS]) {
      await server.call('reset', { books: 100, events: 0, watchlist: 1 });
      const c = spawnSubject(s, server);
      await c.waitLines(100, 2000, 60_000);
      await c.stop();
    }
  } finally {
    server.stop();
  }
}

// ---------- main ----------
if (flags.pin) execFileSync('taskset', ['-p', '-c', '0', String(process.pid)], { stdio: 'ignore' });
const started = performance.now();
const runtimeVersion =
  MAIN === 'deno' || MAIN === 'bun'
    ? execFileSync(runtimeBinary(MAIN), ['--version'], { encoding: 'utf8' }).split('\n')[0]
    : `node ${process.version}`;
console.log(
  `# Book controller benchmark — ${new Date().toISOString()}, ${hostname()}: ${cpus().length} × ${cpus()[0]?.model ?? '?'}, ${fmt(totalmem() / 2 ** 30, 1)} GiB, Linux ${release()}, load ${loadavg()
    .map((x) => x.toFixed(2))
    .join(
      ' ',
    )}; bench on node ${process.version}; subjects on ${LAUNCHER_NAME[MAIN]} (${runtimeVersion}); controller ${CONTROLLER}`,
);
try {
  if (flags.profile) {
    await profile(CONTROLLER, flags.scenario || 'stream');
  } else {
    if (!flags['skip-fake']) {
      await warmUp();
      if (runs('sync')) await syncTable();
      if (runs('memory') && MB > 0) await memoryTable();
      if (runs('ready') && RB > 0) await readyTable();
      if (runs('idle')) await idleTable();
      if (runs('requeue') && QB > 0) await requeueTable();
      if (EXTRA.has('launchers')) await launcherTable();
      if (EXTRA.has('imports')) await importTable();
      if (EXTRA.has('tsx')) await tsxTable();
    }
    if (flags.real) await realTable();
    console.log(
      `\n## summary: each measure against its floor or ideal, and its target (${LAUNCHER_NAME[MAIN]}, ${runs('sync') || runs('memory') ? `${R} interleaved runs` : 'runs as above'} on the fake${flags.real ? `, ${flags['real-runs']} on the real server` : ''}; medians [min–max])\n`,
    );
    printRows(SUMMARY);
    for (const n of NOTES.slice(0, 5)) console.log(`\nnote: ${n}`);
    console.log(`\n(bench took ${fmt((performance.now() - started) / 1000)} s)`);
  }
} finally {
  control.destroy();
  if (!flags.profile) rmSync(tmp, { recursive: true, force: true });
  for (const dir of kubeconfigDirs) rmSync(dir, { recursive: true, force: true });
}
