// The benchmark's workload, shared by the server (which serves it) and the
// runner (which checks every line the client prints against it).

export interface WatchStep {
  index: number;
  type: 'ADDED' | 'MODIFIED' | 'DELETED';
  name: string;
  title?: string;
}

export function bookNames(n: number): string[] {
  return Array.from({ length: n }, (_, i) => `book-${String(i).padStart(6, '0')}`);
}

// The bench's book: a 57-character title with a non-Latin-1 dash (so the
// runtime stores it two bytes a character), and two authors (see server.ts).
export function listTitle(name: string, i: number): string {
  const t =
    i % 7 === 0
      ? `白鯨 ${name} – Moby-Dick; or, The Whale: bench edition`
      : `${name} – Moby-Dick; or, The Whale: the bench edition, 1851`;
  return t.padEnd(57, '.').slice(0, 57);
}

export const authors = (i: number) => ['Herman Melville', `Editor ${i % 97}`];

// Event j: j%3==0 creates new-j, j%3==1 changes the spec of a listed book (its
// generation goes up), j%3==2 deletes the book created two events before. The
// set of books stays about N, every DELETED names a book that exists.
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

// The exact lines a client prints that reports every change, list first, then the watch.
export function expectedLines(n: number, m: number): string[] {
  const out = bookNames(n).map(
    (name, i) => `Added a book ${name} with title '${listTitle(name, i)}'`,
  );
  for (const e of watchEvents(n, m)) {
    if (e.type === 'ADDED') out.push(`Added a book ${e.name} with title '${e.title}'`);
    else if (e.type === 'MODIFIED') out.push(`Modified a book ${e.name} with title '${e.title}'`);
    else out.push(`Deleted a book ${e.name}`);
  }
  return out;
}

const LINE = /^(Added|Modified|Deleted) a book (\S+)(?: with title '(.*)')?$/;

/**
 * Checks printed lines against the workload, allowing what a level-triggered
 * controller may do: changes of one book that arrive while it waits
 * merge, so a book may print fewer lines (an Added may carry a later title, a
 * book created and deleted while waiting may print nothing), but each book's
 * lines follow its history in order and end in its final state.
 * Returns the problems found (at most a few) and how many lines were merged away.
 */
export function checkLines(
  n: number,
  m: number,
  printed: string[],
): { problems: string[]; merged: number } {
  // history per book: the titles it had, in order ('' = deleted)
  const history = new Map<string, string[]>();
  for (const [i, name] of bookNames(n).entries()) history.set(name, [listTitle(name, i)]);
  for (const e of watchEvents(n, m)) {
    const h = history.get(e.name) ?? [];
    h.push(e.type === 'DELETED' ? '' : (e.title ?? ''));
    history.set(e.name, h);
  }
  const at = new Map<string, number>(); // index in history of the last line seen
  const problems: string[] = [];
  let expected = 0;
  for (const h of history.values()) expected += h.length;
  const bad = (s: string) => {
    if (problems.length < 5) problems.push(s);
  };
  for (const line of printed) {
    const m = LINE.exec(line);
    if (!m) {
      bad(`not a change line: ${JSON.stringify(line.slice(0, 100))}`);
      continue;
    }
    const [, type, name, title] = m;
    const h = history.get(name);
    if (!h) {
      bad(`a line for a book the server never had: ${line.slice(0, 100)}`);
      continue;
    }
    const prev = at.get(name) ?? -1;
    const idx = type === 'Deleted' ? h.indexOf('', prev + 1) : h.indexOf(title ?? '', prev + 1);
    if (idx === -1) {
      bad(`out of order or unknown state for ${name}: ${line.slice(0, 100)}`);
      continue;
    }
    if ((type === 'Added') !== (prev === -1 || h[prev] === ''))
      bad(
        `${type} where ${prev === -1 ? 'Added' : 'Modified/Deleted'} belongs: ${line.slice(0, 100)}`,
      );
    at.set(name, idx);
  }
  let missing = 0;
  for (const [name, h] of history) {
    const last = at.get(name);
    const created = h.length > 1 && h[h.length - 1] === '' && last === undefined; // created and deleted while waiting
    if (last !== h.length - 1 && !created) {
      missing++;
      bad(
        `${name} did not end in its final state (${h[h.length - 1] === '' ? 'deleted' : JSON.stringify(h[h.length - 1])})`,
      );
    }
  }
  if (missing > 5) problems.push(`… ${missing} books did not end in their final state`);
  return { problems, merged: expected - printed.length };
}
