"""Every scored candidate of a run, persisted in SQLite (standard library).

One row per candidate: its canonical key (UNIQUE, so a candidate is never scored twice), the completion it
came from (text and token ids, so a greedy member replays the exact tokens), reward, info (JSON), source,
step, whether it cost an oracle call (warm-start candidates are given, and do not), and wall time. Completions with no valid candidate are stored too
(key NULL, reward 0, the reason in info), so nothing the model wrote is lost, but they cost no oracle call.

Sources: on-policy (task prompt), neighbour (NS prompt), opro (OPRO prompt), warm-start. Greedy members
reuse rows and add none.

Every write is one transaction in WAL mode with synchronous=FULL: a killed process leaves the database as of
its last committed batch, never corrupt, and reopening the run folder resumes from it.
"""
import json
import sqlite3
import time
from dataclasses import dataclass, field

SCHEMA = """
CREATE TABLE IF NOT EXISTS candidates (
    id INTEGER PRIMARY KEY,
    key TEXT UNIQUE,
    completion TEXT NOT NULL,
    completion_ids TEXT NOT NULL,
    reward REAL NOT NULL,
    info TEXT NOT NULL,
    source TEXT NOT NULL,
    step INTEGER NOT NULL,
    oracle INTEGER NOT NULL,
    time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS by_reward ON candidates(reward DESC) WHERE key IS NOT NULL;
"""
SOURCES = ("on-policy", "neighbour", "opro", "warm-start")


@dataclass
class Row:
    key: str | None  # canonical candidate; None when the completion had no valid candidate
    completion: str
    reward: float
    source: str
    step: int
    completion_ids: list[int] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    oracle: bool = True
    time: float = 0.0


def _row(r) -> Row:
    return Row(key=r[0], completion=r[1], completion_ids=json.loads(r[2]), reward=r[3], info=json.loads(r[4]),
               source=r[5], step=r[6], oracle=bool(r[7]), time=r[8])


COLUMNS = "key, completion, completion_ids, reward, info, source, step, oracle, time"


class Database:
    def __init__(self, path):
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None)  # explicit transactions below
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(SCHEMA)

    def close(self):
        self.conn.close()

    def add(self, rows: list[Row]):
        """Insert rows in one transaction. A row whose key already exists is an error: callers look up first."""
        for r in rows:
            assert r.source in SOURCES, f"unknown source '{r.source}'"
        now = time.time()
        with self._transaction():
            self.conn.executemany(
                f"INSERT INTO candidates ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(r.key, r.completion, json.dumps(r.completion_ids), float(r.reward), json.dumps(r.info),
                  r.source, r.step, int(r.oracle), r.time or now) for r in rows])

    def _transaction(self):
        conn = self.conn

        class Tx:
            def __enter__(self):
                conn.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type, *_):
                conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
        return Tx()

    def lookup(self, keys) -> dict[str, Row]:
        """Rows of the given keys that exist."""
        keys = list(set(keys))
        out = {}
        for i in range(0, len(keys), 500):  # SQLite caps the number of bound parameters
            chunk = keys[i:i + 500]
            q = f"SELECT {COLUMNS} FROM candidates WHERE key IN ({','.join('?' * len(chunk))})"
            out.update({r.key: r for r in map(_row, self.conn.execute(q, chunk))})
        return out

    def top(self, k: int, distinct_completions=False) -> list[Row]:
        """The k best scored candidates, best first (ties: earliest first). With distinct_completions, at
        most one row per completion text (greedy members should differ)."""
        rows = map(_row, self.conn.execute(
            f"SELECT {COLUMNS} FROM candidates WHERE key IS NOT NULL ORDER BY reward DESC, id ASC"
            + ("" if distinct_completions else f" LIMIT {int(k)}")))
        if not distinct_completions:
            return list(rows)
        out, seen = [], set()
        for r in rows:
            if r.completion not in seen:
                seen.add(r.completion)
                out.append(r)
                if len(out) == k:
                    break
        return out

    def sample_top(self, k: int, rng) -> Row | None:
        """A uniformly random one of the k best (the NS anchor), or None while nothing is scored."""
        rows = self.top(k)
        return rng.choice(rows) if rows else None

    def history(self, k: int) -> list[tuple[str, float]]:
        """The k best (candidate, reward) pairs, worst to best: the OPRO prompt's list."""
        return [(r.key, r.reward) for r in reversed(self.top(k))]

    def oracle_calls(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM candidates WHERE oracle = 1").fetchone()[0]

    def count(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM candidates").fetchone()[0]

    def best(self) -> Row | None:
        rows = self.top(1)
        return rows[0] if rows else None

    def scored(self) -> list[Row]:
        """Every row with a valid candidate, in insertion order."""
        return list(map(_row, self.conn.execute(
            f"SELECT {COLUMNS} FROM candidates WHERE key IS NOT NULL ORDER BY id")))

    def curve(self) -> list[tuple[int, float]]:
        """(oracle calls so far, best reward so far) after every oracle call, for the plot. The best so far
        starts from the candidates scored for free (the warm start)."""
        (given,) = self.conn.execute("SELECT MAX(reward) FROM candidates WHERE oracle = 0 AND key IS NOT NULL")
        out, best = [], given[0] if given[0] is not None else float("-inf")
        for (reward,) in self.conn.execute("SELECT reward FROM candidates WHERE oracle = 1 ORDER BY id"):
            best = max(best, reward)
            out.append((len(out) + 1, best))
        return out
