#!/usr/bin/env python3
"""Issue 11's actor scaling, from bench/gpu/scaling.sh's `actors` runs (one per actor count).

  actor_scaling.py row N SUMMARY_JSON [GENERATING_SUM OVERALL_SUM]  -> one JSON line
  actor_scaling.py table ACTORS_JSONL                                -> the scaling table

A row holds, for N actor GPUs: the generated tokens per second the learner took in (from the
learner's metrics: samples per step x mean completion length / step time) and the sums of the
actors' own rates (each actor logs its tokens/s while generating and over its life when it
stops). The table sets each against N = 1: the speed-up, its share of linear (speed-up / N) and
what each added GPU brought (rate_N - rate_{N-1}, over rate_1)."""
import json
import sys

SAMPLES_PER_STEP = 16 * 16  # configs/small-gpu.yaml: prompts_per_step x group_size


def row(n, summary_path, generating=None, overall=None):
    try:
        j = json.loads(open(summary_path).read().strip().splitlines()[-1])
    except (OSError, IndexError, ValueError) as e:
        sys.exit(f"actor_scaling.py: {summary_path}: no learner summary ({e})")
    r = {"actors": int(n), "staleness_mean": j["staleness_mean"], "step_s": j["step_s"],
         "intake_tokens_per_s": round(SAMPLES_PER_STEP * j["mean_length"] / j["step_s"]),
         "learner_wait_s": j["split_s"]["wait_s"]}
    if generating is not None:
        r["actors_generating_tokens_per_s"] = int(float(generating))
        r["actors_overall_tokens_per_s"] = int(float(overall))
    return r


def table(rows):
    rows = sorted(rows, key=lambda r: r["actors"])
    base = rows[0]
    keys = [("intake_tokens_per_s", "learner intake"), ("actors_overall_tokens_per_s", "actors, overall"),
            ("actors_generating_tokens_per_s", "actors, while generating")]
    out = ["| actors | " + " | ".join(f"{name} (tokens/s, x vs {base['actors']}, % of linear, added GPU)"
                                       for _, name in keys) + " | learner wait (s/step) |",
           "|---" * (len(keys) + 2) + "|"]
    prev = None
    for r in rows:
        cells = []
        for k, _ in keys:
            if k not in r or k not in base or not base[k]:
                cells.append("-")
                continue
            x = r[k] / base[k]
            lin = x * base["actors"] / r["actors"]
            added = "-" if prev is None or k not in prev else f"{(r[k] - prev[k]) / base[k] * 100:.0f}%"
            cells.append(f"{r[k]:,} ({x:.2f}x, {lin * 100:.0f}%, {added})")
        out.append(f"| {r['actors']} | " + " | ".join(cells) + f" | {r['learner_wait_s']:.3f} |")
        prev = r
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "row":
        print(json.dumps(row(*sys.argv[2:6])))
    elif len(sys.argv) == 3 and sys.argv[1] == "table":
        print(table([json.loads(l) for l in open(sys.argv[2]) if l.strip()]))
    else:
        sys.exit(__doc__)
