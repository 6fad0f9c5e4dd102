// Benchmark: controller.ts against a floor (bench/floor.ts), both as child
// processes reading a loopback HTTPS API server (bench/server.ts).
//
//   node bench/bench.ts [--books N] [--events M] [--runs R] [--runtime node|deno|bun]
//                       [--launcher tsx|npx|strip] [--memory-books N] [--controller FILE]
//                       [--skip launchers,imports,memory] [--pin] [--profile]
//
// --profile runs the controller (or --controller FILE, e.g. bench/floor.ts) once under
// `node --cpu-prof` and prints the top 10 self-time functions.
//
// Everything is measured from the child's stdout, read by this process:
//   first event  = first line;  initial sync = N-th line (the N-th Added);
//   watch        = the M lines after it (the server starts the stream when the
//                  watch request arrives); throughput = M / (last − first watch line).
// Peak RSS is VmHWM of the process that runs the code (below npx/tsx wrappers),
// read just before SIGTERM. Runs of controller and floors are interleaved, in a
// rotating order, after one unmeasured warm-up each; tables show medians [min–max].
// Every printed line is checked against the workload, and exit 0 on SIGTERM.
//
// The server is a separate process: on 2 cores the client gets one core and the
// server (which mostly just encrypts pre-serialized bytes) shares the other with
// this process, whose event loop then does nothing but timestamp the pipe. In one
// process, the server's writes would delay those timestamps. --pin makes that
// split explicit with taskset (client on CPU 1), at the cost of the client's GC
// threads sharing its core.
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import https from 'node:https';
import { mkdtempSync, writeFileSync, readFileSync, readdirSync, existsSync, rmSync } from 'node:fs';
import { builtinModules } from 'node:module';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { expectedLines } from './workload.ts';

const BENCH = dirname(fileURLToPath(import.meta.url));
const ROOT = dirname(BENCH);
const { values: flags } = parseArgs({
  options: {
    books: { type: 'string', default: '20000' },
    events: { type: 'string', default: '30000' },
    runs: { type: 'string', default: '5' },
    runtime: { type: 'string', default: 'node' },
    launcher: { type: 'string', default: 'tsx' },
    'memory-books': { type: 'string', default: '100000' },
    controller: { type: 'string', default: join(ROOT, 'controller.ts') },
    skip: { type: 'string', default: '' },
    profile: { type: 'boolean', default: false },
    pin: { type: 'boolean', default: false },
  },
});
const N = Number(flags.books), M = Number(flags.events), R = Number(flags.runs);
const R_STARTUP = Math.min(R, 3); // the start-up and import tables: enough to see seconds
const SKIP = new Set(flags.skip.split(',').filter(Boolean));
const CONTROLLER = flags.controller;
const FLOOR = join(BENCH, 'floor.ts');
if (!existsSync(CONTROLLER)) {
  console.error(`bench: ${CONTROLLER} does not exist yet; pass --controller FILE (e.g. bench/floor.ts) to test the harness`);
  process.exit(1);
}

// ---------- launchers: how a .ts file is started ----------
type Launcher = 'tsx' | 'npx' | 'strip' | 'deno' | 'bun';
const NODE = process.execPath;
function command(launcher: Launcher, file: string, args: string[] = [], nodeFlags: string[] = []): string[] {
  switch (launcher) {
    case 'tsx': return [NODE, ...nodeFlags, '--import', 'tsx', file, ...args];
    case 'strip': return [NODE, ...nodeFlags, file, ...args];
    case 'npx': return ['npx', 'tsx', file, ...args];
    case 'deno': return ['deno', 'run', '-A', '--no-lock', file, ...args];
    case 'bun': return ['bun', file, ...args];
  }
}
const LAUNCHER_NAME: Record<Launcher, string> = {
  tsx: 'node --import tsx', npx: 'npx tsx', strip: 'node (type stripping)', deno: 'deno run -A', bun: 'bun',
};
const MAIN: Launcher = flags.runtime === 'node' ? (flags.launcher as Launcher) : (flags.runtime as Launcher);

// ---------- TLS, kubeconfig, server ----------
const tmp = mkdtempSync(join(tmpdir(), 'book-bench-'));
function makeCerts() {
  const ssl = (...a: string[]) => execFileSync('openssl', a, { cwd: tmp, stdio: 'pipe' });
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  ssl('req', '-x509', ...ec, '-keyout', 'ca.key', '-out', 'ca.crt', '-days', '1', '-subj', '/CN=book-bench-ca');
  ssl('req', ...ec, '-keyout', 'server.key', '-out', 'server.csr', '-subj', '/CN=127.0.0.1');
  writeFileSync(join(tmp, 'ext.cnf'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n');
  ssl('x509', '-req', '-in', 'server.csr', '-CA', 'ca.crt', '-CAkey', 'ca.key', '-CAcreateserial', '-out', 'server.crt', '-days', '1', '-extfile', 'ext.cnf');
}
makeCerts();
const TOKEN = 'bench-token-' + Math.random().toString(36).slice(2);

interface Server { proc: ChildProcess; kubeconfig: string; stats: () => Promise<{ connections: number; requests: number }> }
async function startServer(books: number, events: number): Promise<Server> {
  const proc = spawn(flags.pin ? 'taskset' : NODE, [...(flags.pin ? ['-c', '0', NODE] : []), join(BENCH, 'server.ts'), String(books), String(events), join(tmp, 'server.crt'), join(tmp, 'server.key'), TOKEN], { stdio: ['ignore', 'pipe', 'inherit'] });
  const port = await new Promise<number>((resolve, reject) => {
    proc.stdout?.once('data', (d: Buffer) => resolve(JSON.parse(d.toString()).port));
    proc.once('exit', (c) => reject(new Error(`server exited (${c})`)));
  });
  // JSON is YAML, so client-node reads it and the bare floor can JSON.parse it
  const kubeconfig = join(tmp, `kubeconfig-${port}.json`);
  writeFileSync(kubeconfig, JSON.stringify({
    apiVersion: 'v1', kind: 'Config', 'current-context': 'bench',
    clusters: [{ name: 'bench', cluster: { server: `https://127.0.0.1:${port}`, 'certificate-authority-data': readFileSync(join(tmp, 'ca.crt')).toString('base64') } }],
    users: [{ name: 'bench', user: { token: TOKEN } }],
    contexts: [{ name: 'bench', context: { cluster: 'bench', user: 'bench', namespace: 'default' } }],
  }, null, 2));
  const ca = readFileSync(join(tmp, 'ca.crt'));
  // requests and TLS connections since the last call (this call's own connection not counted)
  const stats = () => new Promise<{ connections: number; requests: number }>((resolve, reject) => {
    https.get(`https://127.0.0.1:${port}/bench-stats`, { ca, agent: false }, (res) => {
      let body = '';
      res.on('data', (c) => { body += c; }).on('end', () => resolve(JSON.parse(body)));
    }).on('error', reject);
  });
  return { proc, kubeconfig, stats };
}

// ---------- /proc ----------
function descendants(pid: number): number[] {
  const out: number[] = [];
  try {
    for (const tid of readdirSync(`/proc/${pid}/task`)) {
      for (const c of readFileSync(`/proc/${pid}/task/${tid}/children`, 'utf8').split(' ').filter(Boolean)) {
        out.push(Number(c), ...descendants(Number(c)));
      }
    }
  } catch { /* gone */ }
  return out;
}
// The process running the code: the deepest one whose command line names the
// file (npx and the tsx CLI are wrappers; tsx may also start an esbuild child).
function codePid(pid: number, file: string): number {
  const named = [pid, ...descendants(pid)].filter((p) => {
    try { return readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0').some((a) => a.endsWith(file.split('/').pop() ?? file)); } catch { return false; }
  });
  return named.at(-1) ?? pid;
}
function procStats(pid: number): { rssMB: number; cpuS: number } {
  try {
    const hwm = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' '); // fields from #3 on
    return { rssMB: hwm ? Number(hwm[1]) / 1024 : NaN, cpuS: (Number(f[11]) + Number(f[12])) / 100 };
  } catch { return { rssMB: NaN, cpuS: NaN }; }
}

// ---------- one run ----------
interface Run { firstMs: number; syncMs: number; watchMs: number; rssMB: number; cpuS: number; exitCode: number | string; requests?: number; connections?: number; watchCpuMs: number; error?: string }
async function runOnce(cmd: string[], file: string, kubeconfig: string, books: number, events: number, expected?: string[]): Promise<Run> {
  const total = books + events;
  const env = { ...process.env, KUBECONFIG: kubeconfig, PATH: `${dirname(NODE)}:${process.env.PATH}` };
  const t0 = performance.now();
  if (flags.pin) cmd = ['taskset', '-c', '1', ...cmd]; // the client gets core 1; bench and server share core 0
  const child = spawn(cmd[0], cmd.slice(1), { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  const chunks: Buffer[] = [];
  let stderr = '';
  let lines = 0, tFirst = NaN, tSync = NaN, tWatch0 = NaN, tLast = NaN;
  let stats = { rssMB: NaN, cpuS: NaN };
  let cpuAtSync = NaN;
  const exited = new Promise<number | string>((res) => child.on('exit', (code, sig) => res(code ?? sig ?? '?')));
  const done = new Promise<void>((resolve) => {
    child.stdout?.on('data', (c: Buffer) => {
      const t = performance.now();
      chunks.push(c);
      for (let i = c.indexOf(10); i !== -1; i = c.indexOf(10, i + 1)) {
        lines++;
        if (lines === 1) tFirst = t;
        if (lines === books) { tSync = t; cpuAtSync = procStats(codePid(child.pid ?? 0, file)).cpuS; }
        if (lines === books + 1) tWatch0 = t;
        if (lines === total) tLast = t;
      }
      if (lines >= total) resolve();
    });
    child.on('exit', () => resolve());
  });
  child.stderr?.on('data', (c: Buffer) => { stderr = (stderr + c.toString()).slice(-2000); });
  const timeout = setTimeout(() => child.kill('SIGKILL'), 60_000 + total * 2);
  await done;
  const pid = codePid(child.pid ?? 0, file);
  if (lines >= total) stats = procStats(pid);
  if (child.exitCode === null) {
    try { process.kill(pid, 'SIGTERM'); } catch { /* gone */ }
  }
  const stop = setTimeout(() => { try { process.kill(-(child.pid ?? 0), 'SIGKILL'); } catch { /* gone */ } }, 5000);
  const exitCode = await exited;
  clearTimeout(stop); clearTimeout(timeout);
  const run: Run = { firstMs: tFirst - t0, syncMs: tSync - t0, watchMs: tLast - tWatch0, ...stats, watchCpuMs: (stats.cpuS - cpuAtSync) * 1000, exitCode };
  if (books === 0) run.syncMs = run.firstMs;
  if (lines < total) run.error = `printed ${lines} of ${total} lines, exit ${exitCode}: ${stderr.trim().split('\n').slice(-3).join(' | ')}`;
  else if (expected) {
    const got = Buffer.concat(chunks).toString('utf8').split('\n');
    const bad = expected.findIndex((l, i) => got[i] !== l);
    if (bad !== -1) run.error = `line ${bad + 1}: expected ${JSON.stringify(expected[bad])}, got ${JSON.stringify(got[bad])}`;
    else if (got.length !== expected.length + 1) run.error = `${got.length - 1 - expected.length} extra lines: ${JSON.stringify(got[expected.length])}`;
  }
  if (exitCode !== 0 && !run.error) run.error = `exit ${exitCode} after SIGTERM (want 0)`;
  return run;
}

// ---------- stats and tables ----------
const median = (xs: number[]) => { const s = xs.filter((x) => !Number.isNaN(x)).sort((a, b) => a - b); return s.length ? s[(s.length - 1) >> 1] : NaN; };
const fmt = (x: number, d = 0) => (Number.isNaN(x) ? '–' : x.toFixed(d));
function cell(xs: number[], d = 0): string {
  const ok = xs.filter((x) => !Number.isNaN(x));
  if (ok.length < 2) return fmt(median(xs), d);
  return `${fmt(median(xs), d)} [${fmt(Math.min(...ok), d)}–${fmt(Math.max(...ok), d)}]`;
}
type Subject = { name: string; file: string; args?: string[] };
const SUBJECTS: Subject[] = [
  { name: 'controller', file: CONTROLLER },
  { name: 'floor', file: FLOOR },
  { name: 'bare floor', file: FLOOR, args: ['--bare'] },
];

// one unmeasured run of each subject: fills tsx's and deno's transform caches and the page cache
async function warmUp(launcher: Launcher, subjects: Subject[]) {
  const server = await startServer(10, 3);
  try {
    for (const s of subjects) await runOnce(command(launcher, s.file, s.args), s.file, server.kubeconfig, 10, 3);
  } finally {
    server.proc.kill('SIGTERM');
  }
}

async function compare(launcher: Launcher, books: number, events: number, runs: number, subjects = SUBJECTS) {
  await warmUp(launcher, subjects);
  const server = await startServer(books, events);
  const expected = expectedLines(books, events);
  const results = new Map<string, Run[]>(subjects.map((s) => [s.name, []]));
  const errors: string[] = [];
  try {
    await server.stats(); // reset
    for (let r = 0; r < runs; r++) {
      for (let k = 0; k < subjects.length; k++) {
        const s = subjects[(k + r) % subjects.length]; // rotate the order each round
        const run = await runOnce(command(launcher, s.file, s.args), s.file, server.kubeconfig, books, events, expected);
        const st = await server.stats();
        run.requests = st.requests;
        run.connections = st.connections - 1; // minus the previous stats call's own connection
        if (run.error) errors.push(`${s.name} run ${r + 1}: ${run.error}`);
        results.get(s.name)?.push(run);
        process.stderr.write('.');
      }
    }
  } finally {
    server.proc.kill('SIGTERM');
  }
  process.stderr.write('\n');
  return { results, errors };
}

const col = (runs: Run[] | undefined, f: (r: Run) => number) => (runs ?? []).map(f);
function row(metric: string, res: Map<string, Run[]>, f: (r: Run) => number, d: number, target: string, limit?: number, lowerIsBetter = true) {
  const c = col(res.get('controller'), f), fl = col(res.get('floor'), f), b = col(res.get('bare floor'), f);
  const ratio = median(c) / median(fl);
  const ok = limit === undefined || Number.isNaN(ratio) ? '' : (lowerIsBetter ? ratio <= limit : 1 / ratio <= limit) ? ' ✅' : ' ❌';
  return `| ${metric} | ${cell(c, d)} | ${cell(fl, d)} | ${fmt(ratio, 2)}${ok} | ${target} | ${cell(b, d)} |`;
}

async function mainTable() {
  console.log(`\n## controller vs floor: N=${N} books, M=${M} watch events, ${LAUNCHER_NAME[MAIN]}, ${R} runs\n`);
  const { results: res, errors } = await compare(MAIN, N, M, R);
  console.log('| metric | controller | floor | ratio | target | bare floor (no client-node) |');
  console.log('|---|---|---|---|---|---|');
  console.log(row('start → first event (ms)', res, (r) => r.firstMs, 0, 'as small as the libraries allow'));
  console.log(row(`initial sync after start-up: first event → N-th Added (ms)`, res, (r) => r.syncMs - r.firstMs, 0, '≤ 1.5', 1.5));
  console.log(row(`start → N-th Added (ms)`, res, (r) => r.syncMs, 0, ''));
  console.log(row(`watch: first → last of M events (ms)`, res, (r) => r.watchMs, 0, '≤ 1.25', 1.25));
  console.log(row(`watch throughput (events/s)`, res, (r) => (M / r.watchMs) * 1000, 0, '', undefined, false));
  console.log(row('CPU used during the watch (ms, 10 ms ticks)', res, (r) => r.watchCpuMs, 0, ''));
  console.log(row('peak RSS (MB)', res, (r) => r.rssMB, 0, '≤ 2', 2));
  console.log(row('CPU time, user+sys (s)', res, (r) => r.cpuS, 2, ''));
  console.log(row('HTTP requests', res, (r) => r.requests ?? NaN, 0, ''));
  console.log(row('TLS connections', res, (r) => r.connections ?? NaN, 0, ''));
  for (const e of errors) console.log(`\n⚠️ ${e}`);
}

async function memoryTable(books: number) {
  console.log(`\n## memory: N=${books} books, M=${M} events, ${LAUNCHER_NAME[MAIN]}, ${R} runs\n`);
  const { results: res, errors } = await compare(MAIN, books, M, R);
  console.log('| metric | controller | floor | ratio | target | bare floor |');
  console.log('|---|---|---|---|---|---|');
  console.log(row('peak RSS (MB)', res, (r) => r.rssMB, 0, '≤ 2', 2));
  console.log(row('initial sync after start-up (ms)', res, (r) => r.syncMs - r.firstMs, 0, '≤ 1.5', 1.5));
  console.log(row('watch: first → last (ms)', res, (r) => r.watchMs, 0, '≤ 1.25', 1.25));
  for (const e of errors) console.log(`\n⚠️ ${e}`);
}

async function launcherTable() {
  const books = 500, events = 30;
  const launchers: Launcher[] = ['tsx', 'npx', 'strip', 'deno', 'bun'];
  console.log(`\n## start-up by launcher: N=${books}, M=${events}, ${R_STARTUP} runs (start → first event, peak RSS)\n`);
  console.log('| launcher | controller first event (ms) | floor first event (ms) | controller RSS (MB) | floor RSS (MB) | bare floor first event (ms) | notes |');
  console.log('|---|---|---|---|---|---|---|');
  for (const l of launchers) {
    const { results: res, errors } = await compare(l, books, events, R_STARTUP);
    const c = res.get('controller') ?? [], f = res.get('floor') ?? [], b = res.get('bare floor') ?? [];
    const note = [...new Set(errors.map((e) => e.replace(/ run \d+/, '')))].join('; ').slice(0, 300);
    console.log(`| ${LAUNCHER_NAME[l]} | ${cell(c.map((r) => r.firstMs))} | ${cell(f.map((r) => r.firstMs))} | ${cell(c.map((r) => r.rssMB))} | ${cell(f.map((r) => r.rssMB))} | ${cell(b.map((r) => r.firstMs))} | ${note} |`);
  }
}

// ---------- import cost of each dependency ----------
function dependencies(file: string): string[] {
  const src = readFileSync(file, 'utf8');
  const specs = new Set<string>(['@kubernetes/client-node']);
  for (const m of src.matchAll(/(?:^|\s)(?:import|export)\s[^'"]*?from\s*['"]([^'"]+)['"]|import\s*\(\s*['"]([^'"]+)['"]\s*\)|^import\s+['"]([^'"]+)['"]/gm)) {
    const s = m[1] ?? m[2] ?? m[3];
    if (!s || s.startsWith('.') || s.startsWith('/') || s.startsWith('node:') || builtinModules.includes(s)) continue;
    specs.add(s);
  }
  return [...specs];
}

function probe(launcher: Launcher, spec?: string): Promise<{ wallMs: number; importMs: number; rssMB: number }> {
  return new Promise((resolve) => {
    const t0 = performance.now();
    const env = { ...process.env, PATH: `${dirname(NODE)}:${process.env.PATH}` };
    const cmd = command(launcher, join(BENCH, 'import-probe.ts'), spec ? [spec] : []);
    const child = spawn(cmd[0], cmd.slice(1), { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d) => { out += d; });
    child.on('exit', () => {
      const wallMs = performance.now() - t0;
      try { resolve({ wallMs, ...JSON.parse(out) }); } catch { resolve({ wallMs: NaN, importMs: NaN, rssMB: NaN }); }
    });
  });
}

async function importTable() {
  const deps = dependencies(CONTROLLER);
  const launchers: Launcher[] = ['strip', 'tsx', 'npx', 'deno', 'bun'];
  console.log(`\n## import cost (medians of ${R_STARTUP}): in-process \`await import(dep)\` time; whole process wall time and RSS\n`);
  console.log(`| launcher | empty .ts process: wall (ms) / RSS (MB) | ${deps.map((d) => `import('${d}') (ms)`).join(' | ')} | process with all deps: wall (ms) / RSS (MB) |`);
  console.log(`|---|---|${deps.map(() => '---|').join('')}---|`);
  const baseline: Record<string, number> = {};
  const clientNode: Record<string, number> = {};
  for (const l of launchers) {
    const take = async (spec?: string) => {
      const rs = [];
      for (let r = 0; r < R_STARTUP; r++) rs.push(await probe(l, spec));
      return { wallMs: median(rs.map((x) => x.wallMs)), importMs: median(rs.map((x) => x.importMs)), rssMB: median(rs.map((x) => x.rssMB)) };
    };
    const empty = await take();
    baseline[l] = empty.wallMs;
    const each = [];
    for (const d of deps) each.push(await take(d));
    clientNode[l] = each[0].importMs; // deps[0] is client-node
    const all = await take(deps.join(','));
    console.log(`| ${LAUNCHER_NAME[l]} | ${fmt(empty.wallMs)} / ${fmt(empty.rssMB)} | ${each.map((e) => fmt(e.importMs)).join(' | ')} | ${fmt(all.wallMs)} / ${fmt(all.rssMB)} |`);
  }
  console.log(`\ntsx's cost over Node's own type stripping: registering the loader (empty file) ${fmt(baseline.tsx - baseline.strip)} ms; ` +
    `its hooks on client-node's modules ${fmt(clientNode.tsx - clientNode.strip)} ms; npx on top (empty file, \`npx tsx\` − \`node --import tsx\`) ${fmt(baseline.npx - baseline.tsx)} ms`);
}

// ---------- --profile: top self-time functions of one run ----------
async function profile(file: string) {
  const dir = join(tmp, 'prof');
  // Node's own type stripping keeps line numbers exact (tsx's output is one line); tsx if that fails.
  const server = await startServer(N, M);
  let launcher: Launcher = 'strip';
  let run = await runOnce(command(launcher, file, [], ['--cpu-prof', `--cpu-prof-dir=${dir}`]), file, server.kubeconfig, N, M);
  if (run.error && !existsSync(dir)) {
    launcher = 'tsx';
    run = await runOnce(command(launcher, file, [], ['--cpu-prof', `--cpu-prof-dir=${dir}`]), file, server.kubeconfig, N, M);
  }
  server.proc.kill('SIGTERM');
  console.log(`\n## CPU profile of ${file} (${LAUNCHER_NAME[launcher]}, N=${N}, M=${M}): first ${fmt(run.firstMs)} ms, sync ${fmt(run.syncMs)} ms, watch ${fmt(run.watchMs)} ms${run.error ? `, ${run.error}` : ''}\n`);
  const files = existsSync(dir) ? readdirSync(dir).filter((f) => f.endsWith('.cpuprofile')) : [];
  // CPU.<date>.<time>.<pid>.<thread>.<seq>.cpuprofile: thread 0 is the main thread
  const main = files.find((f) => f.split('.')[4] === '0') ?? files[0];
  if (!main) { console.log('no .cpuprofile written (did the process exit through process.exit on SIGTERM?)'); return; }
  type Node = { id: number; callFrame: { functionName: string; url: string; lineNumber: number } };
  const p = JSON.parse(readFileSync(join(dir, main), 'utf8')) as { nodes: Node[]; samples: number[]; timeDeltas: number[] };
  const byId = new Map(p.nodes.map((n) => [n.id, n]));
  const self = new Map<string, number>(), byFile = new Map<string, number>();
  let total = 0;
  const short = (url: string) => url.replace(`file://${ROOT}/`, '').replace(/^.*node_modules\//, '').replace(/^file:\/\//, '');
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
  const top = (m: Map<string, number>, n: number) => [...m].sort((a, b) => b[1] - a[1]).slice(0, n);
  console.log(`| self time (ms) | % of busy ${fmt(total / 1000)} ms | function url:line |\n|---|---|---|`);
  for (const [k, v] of top(self, 10)) console.log(`| ${fmt(v / 1000, 1)} | ${fmt((100 * v) / total, 1)} | ${k.replaceAll('|', '\\|')} |`);
  if (self.size && top(self, 10).some(([k]) => k.startsWith('consoleCall'))) {
    console.log('\nnote: --cpu-prof attaches an inspector session, which also handles every console.log: `consoleCall` is inflated here.');
  }
  console.log(`\nby package / file: ${top(byFile, 8).map(([k, v]) => `${k} ${fmt((100 * v) / total, 1)}%`).join(', ')}`);
  console.log(`(profile: ${join(dir, main)}; other threads: ${files.length - 1} file(s))`);
}

// ---------- main ----------
if (flags.pin) execFileSync('taskset', ['-p', '-c', '0', String(process.pid)], { stdio: 'ignore' });
console.log(`# Book controller benchmark — ${new Date().toISOString()}, node ${process.version}, ${(await import('node:os')).cpus().length} cores, controller ${CONTROLLER}`);
try {
  if (flags.profile) {
    await profile(CONTROLLER);
  } else {
    await mainTable();
    if (!SKIP.has('memory') && Number(flags['memory-books']) > 0) await memoryTable(Number(flags['memory-books']));
    if (!SKIP.has('launchers')) await launcherTable();
    if (!SKIP.has('imports')) await importTable();
  }
} finally {
  if (!flags.profile) rmSync(tmp, { recursive: true, force: true });
}
