"""What ARC's 256-token cap on a program (the cpu preset's max_new_tokens) costs: of the programs the coder model's
runs here scored, how many reached the cap, and how many of those ran. Reads the runs' candidates.sqlite (kept
beside each run, not in git), so it covers the runs made on this machine. Prints a table; token_cap.txt holds it.

    python results/sweep/arc-qwen/token_cap.py
"""
import glob
import json
import os
import sqlite3

here = os.path.dirname(os.path.abspath(__file__))
rows = []
for db in sorted(glob.glob(os.path.join(here, "runs", "*", "candidates.sqlite"))):
    run = os.path.dirname(db)
    if not os.path.exists(os.path.join(run, "summary.json")):
        continue
    with open(os.path.join(run, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("model") != "qwen2.5-coder-1.5b":
        continue
    cap = cfg["max_new_tokens"]
    with sqlite3.connect(db) as con:  # every sampled program the run stored: new candidates and failed parses
        for ids, reward, info in con.execute("select completion_ids, reward, info from candidates "
                                             "where source not in ('warm-start', 'greedy')"):
            rows.append((os.path.basename(run), len(json.loads(ids)) >= cap, "error" in (info or ""), reward))
runs = sorted({r[0] for r in rows})
print(f"{len(runs)} runs: {', '.join(runs)}")
print("| programs | count | ran without an error | reward above 0 | mean reward |")
print("|---|---|---|---|---|")
for capped in (True, False):
    part = [r for r in rows if r[1] == capped]
    if part:
        print(f"| {'reached the cap' if capped else 'ended before it'} | {len(part)} | "
              f"{sum(not r[2] for r in part)} | {sum(r[3] > 0 for r in part)} | "
              f"{sum(r[3] for r in part) / len(part):.3f} |")
