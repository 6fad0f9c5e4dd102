// Runs the unit tests as several processes side by side: `npm test`, `npm run test:deno` and
// `npm run test:bun` use it. Each process gets TEST_LANE=i/n, and controller.test.ts runs only
// the tests of that lane (see "Lanes" there): most of the suite's time is waiting on purpose
// (backoffs, lease deadlines, ten seconds of a rate), so lanes cut the wall time, not the checks.
// Every line the lanes print is shown as it comes, marked with its lane; the exit code is 1 if
// any lane failed.
//
//   node e2e/lanes.ts LANES COMMAND...     e.g. node e2e/lanes.ts 7 tsx --test controller.test.ts

import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';

const [count = '', program = '', ...args] = process.argv.slice(2);
const lanes = Number(count);
if (!Number.isInteger(lanes) || lanes < 1 || !program) {
  console.error('usage: node e2e/lanes.ts LANES COMMAND...');
  process.exit(2);
}

const started = performance.now();
console.log(
  `lanes: ${[program, ...args].join(' ')}, as ${lanes} processes side by side (TEST_LANE=1/${lanes} to ${lanes}/${lanes}); each line is marked with its lane`,
);
const children = Array.from({ length: lanes }, (_, i) => {
  const lane = i + 1;
  const child = spawn(program, args, {
    env: { ...process.env, TEST_LANE: `${lane}/${lanes}` },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  for (const [from, to] of [
    [child.stdout, process.stdout],
    [child.stderr, process.stderr],
  ] as const) {
    createInterface({ input: from }).on('line', (line) => to.write(`${lane}│ ${line}\n`));
  }
  const exited = new Promise<number>((resolve) => {
    child.on('error', (error) => {
      console.error(`${lane}│ cannot start ${program}: ${error.message}`);
      resolve(127);
    });
    child.on('close', (code, signal) => resolve(code ?? (signal ? 128 : 1)));
  });
  return { lane, child, exited };
});

for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.on(signal, () => {
    for (const { child } of children) child.kill(signal);
  });
}

const failed: string[] = [];
for (const { lane, exited } of children) {
  const code = await exited;
  if (code !== 0) failed.push(`${lane} (exit ${code})`);
}
const seconds = Math.round((performance.now() - started) / 1000);
if (failed.length === 0) {
  console.log(`lanes: all ${lanes} passed in ${seconds}s`);
} else {
  console.log(
    `lanes: ${failed.length} of ${lanes} failed in ${seconds}s: lane ${failed.join(', lane ')}; ` +
      'their lines are marked with their number',
  );
  process.exitCode = 1;
}
