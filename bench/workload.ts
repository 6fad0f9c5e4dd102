// The benchmark's workload, shared by the server (which serves it) and the
// runner (which checks every line the client prints against it).

export interface Book {
  apiVersion: string;
  kind: 'Book';
  metadata: { name: string; namespace: string; resourceVersion: string; uid: string; creationTimestamp: string; generation: number };
  spec: { title: string; authors: string[] };
}

export interface WatchStep { index: number; type: 'ADDED' | 'MODIFIED' | 'DELETED'; name: string; title?: string }

export function bookNames(n: number): string[] {
  return Array.from({ length: n }, (_, i) => `book-${String(i).padStart(6, '0')}`);
}

export function listTitle(name: string, i: number): string {
  return i % 7 === 0 ? `白鯨 (Moby-Dick) #${i}` : `Title of ${name}`;
}

// Event j: j%3==0 creates new-j, j%3==1 modifies a listed book (a new RV each
// time), j%3==2 deletes the book created two events before. The set of books
// stays about N, every DELETED names a book that exists.
export function* watchEvents(n: number, m: number): Generator<WatchStep> {
  const names = bookNames(n);
  for (let j = 0; j < m; j++) {
    if (j % 3 === 0) yield { index: j, type: 'ADDED', name: `new-${j}`, title: `New book ${j}` };
    else if (j % 3 === 1) {
      const name = n > 0 ? names[((j - 1) / 3) % n] : `new-${j - 1}`;
      yield { index: j, type: 'MODIFIED', name, title: `Revised ${j}: ${name}` };
    } else yield { index: j, type: 'DELETED', name: `new-${j - 2}` };
  }
}

// The exact lines a correct client prints, list first, then the watch.
export function expectedLines(n: number, m: number): string[] {
  const out = bookNames(n).map((name, i) => `Added a book ${name} with title '${listTitle(name, i)}'`);
  for (const e of watchEvents(n, m)) {
    if (e.type === 'ADDED') out.push(`Added a book ${e.name} with title '${e.title}'`);
    else if (e.type === 'MODIFIED') out.push(`Modified a book ${e.name} with title '${e.title}'`);
    else out.push(`Deleted a book ${e.name}`);
  }
  return out;
}
