// Preloaded into the process under test by bench.ts for the memory rows and the requeue
// scenario (node --expose-gc --import, deno --v8-flags=--expose-gc --preload, bun --preload): on
// SIGUSR2 it forces a full GC, then writes {heapUsed, rss, …, spaces, resources} to
// $BENCH_MEMORY_FILE (resources: the ref'd timers, sockets… that keep the event loop alive).
// Nothing in controller.ts needs to change for it, and it costs the process nothing until the
// signal.
import { writeFileSync } from 'node:fs';
import process from 'node:process';
import v8 from 'node:v8';

const file = process.env.BENCH_MEMORY_FILE;
// BENCH_MEMORY_PEAKS=1: also the largest of each process.memoryUsage() figure, sampled every 20 ms
// from the start (what makes the peak RSS: V8's heap, or memory outside it).
const peaks: Record<string, number> = {};
if (file && process.env.BENCH_MEMORY_PEAKS === '1') {
  setInterval(() => {
    for (const [k, v] of Object.entries(process.memoryUsage()))
      peaks[k] = Math.max(peaks[k] ?? 0, v);
  }, 20).unref();
}
if (file) {
  process.on('SIGUSR2', () => {
    const before = process.memoryUsage();
    const g = globalThis as { gc?: () => void; Bun?: { gc(sync: boolean): void } };
    const bun = g.Bun;
    const gc = g.gc ?? (bun ? () => bun.gc(true) : undefined);
    for (let i = 0; i < 3; i++) gc?.();
    const { heapUsed, heapTotal, external, arrayBuffers, rss } = process.memoryUsage();
    // where the heap is, by V8 space (MB), and whether the runtime keeps source maps
    let spaces: Record<string, number> = {};
    try {
      spaces = Object.fromEntries(
        v8
          .getHeapSpaceStatistics()
          .map((s) => [s.space_name, Math.round(s.space_used_size / 104857.6) / 10]),
      );
    } catch {} // not every runtime has it
    const sourceMaps = (process as { sourceMapsEnabled?: boolean }).sourceMapsEnabled;
    // what keeps the event loop alive, by kind ('Timeout': one per ref'd timer); the probe opens
    // nothing before this. Not every runtime has it.
    const resources: Record<string, number> = {};
    try {
      for (const r of process.getActiveResourcesInfo()) resources[r] = (resources[r] ?? 0) + 1;
    } catch {}
    writeFileSync(
      file,
      JSON.stringify({
        heapUsed,
        heapTotal,
        external,
        arrayBuffers,
        rss,
        gc: Boolean(gc),
        spaces,
        sourceMaps,
        resources,
        peaks,
        before, // before the forced GC
      }),
    );
  });
}
