// Preloaded into the process under test by bench.ts for the memory row (node --expose-gc
// --import, deno --v8-flags=--expose-gc --preload, bun --preload): on SIGUSR2 it forces a
// full GC, then writes {heapUsed, rss} to $BENCH_MEMORY_FILE. Nothing in controller.ts
// needs to change for it, and it costs the process nothing until the signal.
import { writeFileSync } from 'node:fs';
import process from 'node:process';

const file = process.env.BENCH_MEMORY_FILE;
if (file) {
  process.on('SIGUSR2', () => {
    const g = globalThis as { gc?: () => void; Bun?: { gc(sync: boolean): void } };
    const bun = g.Bun;
    const gc = g.gc ?? (bun ? () => bun.gc(true) : undefined);
    for (let i = 0; i < 3; i++) gc?.();
    const { heapUsed, rss } = process.memoryUsage();
    writeFileSync(file, JSON.stringify({ heapUsed, rss, gc: Boolean(gc) }));
  });
}
