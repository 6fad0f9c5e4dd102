// Times `await import(dep)` for each comma-separated dependency in argv[2]
// and prints {importMs, rssMB} as JSON. With no argument it imports nothing:
// the runtime's (and loader's) own start-up cost.
const t0 = performance.now();
for (const spec of (process.argv[2] ?? '').split(',').filter(Boolean)) await import(spec);
const importMs = performance.now() - t0;
console.log(JSON.stringify({ importMs, rssMB: process.memoryUsage().rss / 1048576 }));
