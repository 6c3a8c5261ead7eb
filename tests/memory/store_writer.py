"""Writer subprocess for the concurrency and crash tests (not a test module).

    python -m tests.memory.store_writer URL PREFIX SESSION_ID TAG COUNT [wait]

Appends COUNT messages (COUNT 0: until killed) with content "TAG:i" and prints each message id
on its own line, flushed, only after append_message has returned: a printed id is an
acknowledged write. With `wait` it first prints "ready" and waits for a line on stdin, so a
test can release several writers at the same moment, and it pauses 2 ms between appends: an
SQLite writer that commits back-to-back would otherwise keep the lock while the others sleep in
their busy handlers, and the "concurrent" writers would run one after another.
"""

from __future__ import annotations

import itertools
import sys
import time

from memory.store import open_store


def main(url: str, prefix: str, session_id: str, tag: str, count: int, wait: bool = False) -> None:
    store = open_store(url, prefix=prefix)
    if wait:
        print("ready", flush=True)
        sys.stdin.readline()
    numbers = itertools.count() if count == 0 else range(count)
    for i in numbers:
        msg = store.append_message(session_id, "user", f"{tag}:{i}", {"writer": tag, "i": i})
        sys.stdout.write(msg.id + "\n")
        sys.stdout.flush()
        if wait:
            time.sleep(0.002)
    store.close()


if __name__ == "__main__":
    url, prefix, session_id, tag, count = sys.argv[1:6]
    main(url, prefix, session_id, tag, int(count), wait=sys.argv[6:7] == ["wait"])
