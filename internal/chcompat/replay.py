"""Replays ClickHouse statements on chdb's embedded ClickHouse engine.

Reads a JSON list of steps from the file named by the first argument; each
step is {"sql": ..., "read": bool}. Every step runs in order in one fresh
session and database. A read's result comes back as TabSeparated text.
Writes a JSON list of {"error": str or null, "result": str or null}, one per
step, to stdout, and the engine's version to stderr. A failing step does not
stop the replay: every statement's fate is reported.
"""

import json
import sys
import tempfile

from chdb import session


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        steps = json.load(f)
    with tempfile.TemporaryDirectory() as path:
        s = session.Session(path)
        s.query("CREATE DATABASE tollgate")
        s.query("USE tollgate")
        sys.stderr.write(str(s.query("SELECT version()", "TabSeparated")).strip() + "\n")
        out = []
        for step in steps:
            try:
                if step.get("read"):
                    res = s.query(step["sql"], "TabSeparated")
                    out.append({"error": None, "result": res.bytes().decode("utf-8")})
                else:
                    s.query(step["sql"])
                    out.append({"error": None, "result": None})
            except Exception as e:  # chdb raises its own error type per failure
                out.append({"error": str(e), "result": None})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
