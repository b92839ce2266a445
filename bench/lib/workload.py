#!/usr/bin/env python3
"""Workloads and analysis for bench/scheduling and bench/slot-reuse (docs/benchmarks.md).

Subcommands (all output JSON on stdout unless said otherwise):

  scheduling-spec MS_PER_MIN MIB_PER_GB   the seed-shaped DAG (ADR-028), scaled
  slot-reuse-spec N                        N heavy builds without dependencies
  dispatch-spec N                          N trivial /bin/sh derivations in a DAG (for dag-sh.nix)
  copies SPEC K                            K copies of SPEC's DAG under one top build (bench/simulate)
  with-cpu SPEC FRACTION CORES_JSON        SPEC with each build keeping FRACTION of its tier's cores busy
  with-touch-cost SPEC MS_PER_MIB          SPEC for `nix-tier simulate`: each build's time to touch
                                           its memory added to its time and as its CPU time
  analyze SPEC RUN_DIR BUDGET_MIB TIERS_JSON [TOUCHED_SPEC]   one run of a DAG (see analyze())
  table SPEC RESULT...                     the comparison table of bench/scheduling (text)
  gaps RUN_DIR                             heavy-to-heavy gaps of one bench/slot-reuse run

A spec is {"scale": ..., "top": NAME, "builds": [{"name", "tier", "ms", "mib", "deps"}]}; the
builds are listed so that every build comes after its dependencies. The test builder records
each run as `<name> <start_ms> <end_ms> <tier> <mib>` in RUN_DIR/records/records and marks its
start in RUN_DIR/records/started/<name> (testbuilder/src/main.rs).
"""

import json
import math
import os
import random
import sqlite3
import statistics
import sys

# ---------------------------------------------------------------------------------------------
# Workloads


def scheduling_spec(ms_per_min, mib_per_gb):
    """The seed's rebuild in its own units (minutes, GB), scaled to milliseconds and MiB.

    ADR-028 names the heavy builds and their times: Node.js PGO 60-90 min, Python PGO 45-75 min,
    Rust (PGO + bootstrap) ~45 min, on a 16 GB machine whose heavy tier allows 14 GB. Medium
    (Go, Rust crates, MCP servers; 6 GB tier) and light (CLI tools, libraries; 2 GB tier) builds
    are not timed there: they get times and peaks drawn from fixed ranges with a fixed seed, so
    that the whole rebuild at max-jobs = 2 takes about the seed's "2-4 hours" (its upper end).
    """
    rng = random.Random(28)
    builds = []

    def add(name, tier, minutes, gb, deps):
        builds.append({
            "name": name,
            "tier": tier,
            "ms": int(round(minutes * ms_per_min)),
            "mib": int(round(gb * mib_per_gb)),
            "deps": deps,
            "minutes": round(minutes, 3),
            "gb": round(gb, 3),
        })

    # Heavy: the three PGO runtimes, mid-range of the seed's times; peaks under the 14 GB tier.
    heavy = [("nodejs-24.1.0", 75, 10.0), ("python3-3.13.1", 60, 6.0), ("rustc-1.86.0", 45, 9.0)]
    for name, minutes, gb in heavy:
        add(name, "heavy", minutes, gb, [])
    # Medium: 30 builds, 2-8 min, 2-5 GB. Rust crates need rustc, MCP servers Node.js, Python
    # applications Python; Go programs need nothing heavy.
    kinds = [("rust-crate", "rustc-1.86.0", 10), ("mcp-server", "nodejs-24.1.0", 6),
             ("python-app", "python3-3.13.1", 4), ("go-tool", None, 10)]
    medium = []
    for kind, dep, count in kinds:
        for i in range(count):
            # One package per build (the hook learns reservations per package name, and a
            # rebuild builds each package once): "rust-crate4", version "1.0".
            name = f"{kind}{i}-1.0"
            add(name, "medium", rng.uniform(2, 8), rng.uniform(2, 5), [dep] if dep else [])
            medium.append(name)
    # Light: 200 builds, 0.2-2 min (log-uniform: most are short), 0.3-1.5 GB. 40 % need one
    # medium build (a CLI tool linking a crate, a wrapper of an MCP server), 15 % a heavy one
    # (a Python library), the rest nothing heavier; one in ten also needs an earlier light build.
    light = []
    for i in range(200):
        roll = rng.random()
        if roll < 0.40:
            deps = [rng.choice(medium)]
        elif roll < 0.55:
            deps = [rng.choice(heavy)[0]]
        else:
            deps = []
        if light and rng.random() < 0.10:
            deps.append(rng.choice(light))
        minutes = math.exp(rng.uniform(math.log(0.2), math.log(2.0)))
        name = f"tool{i}-0.1"
        add(name, "light", minutes, rng.uniform(0.3, 1.5), deps)
        light.append(name)
    # The generation that ties it together: light, no time, no memory.
    top = "home-manager-generation"
    add(top, "light", 0, 0, [b["name"] for b in builds])
    return {"scale": {"msPerMinute": ms_per_min, "mibPerGB": mib_per_gb}, "top": top, "builds": builds}


def slot_reuse_spec(n):
    """N heavy builds without dependencies, 32 MiB each, and a light top build. Their times are
    spread evenly over 5-10 s (5000 + (i + 1/2) x 5000 / N ms, in a fixed shuffled order): longer
    than Nix's default poll interval, and ending at every phase of its 5-second wake-up timer,
    as the ends of real builds lasting minutes do."""
    rng = random.Random(5)
    times = [int(5000 + (i + 0.5) * 5000 / n) for i in range(n)]
    rng.shuffle(times)
    builds = [{"name": f"heavy{i}-1.0", "tier": "heavy", "ms": ms, "mib": 32, "deps": []} for i, ms in enumerate(times)]
    top = "all"
    builds.append({"name": top, "tier": "light", "ms": 0, "mib": 0, "deps": [b["name"] for b in builds]})
    return {"scale": None, "top": top, "builds": builds}


def dispatch_spec(n):
    """N trivial derivations: node i depends on up to two of the 40 nodes before it, so the DAG
    is 41 levels deep (the top build included) and wide enough for 12 builds at once."""
    rng = random.Random(1000)
    builds = []
    for i in range(n):
        pool = list(range(max(0, i - 40), max(0, i - 10)))
        deps = sorted(set(rng.sample(pool, min(len(pool), rng.choice([0, 1, 2])))))
        builds.append({"name": f"t{i}", "tier": "light", "ms": 0, "mib": 0, "deps": [f"t{d}" for d in deps]})
    top = "top"
    builds.append({"name": top, "tier": "light", "ms": 0, "mib": 0, "deps": [b["name"] for b in builds]})
    return {"scale": None, "top": top, "builds": builds}


def copies(spec, k):
    """K copies of the DAG (names suffixed `-c<i>`) and one top build needing all of them."""
    builds = []
    for i in range(k):
        for b in spec["builds"]:
            if b["name"] != spec["top"]:
                builds.append(dict(b, name=f"{b['name']}-c{i}", deps=[f"{d}-c{i}" for d in b["deps"]]))
    top = spec["top"]
    builds.append({"name": top, "tier": "light", "ms": 0, "mib": 0, "deps": [b["name"] for b in builds]})
    return {"scale": spec["scale"], "top": top, "builds": builds}


def with_cpu(spec, fraction, cores):
    """Each build keeps `fraction` of its tier's cores busy over its run (its CPU time, for
    `nix-tier simulate`)."""
    for b in spec["builds"]:
        b["cpuMs"] = int(round(b["ms"] * fraction * cores[b["tier"]]))
    return spec


def with_touch_cost(spec, ms_per_mib):
    """The spec as `nix-tier simulate` should see it: the test builder writes every page it holds
    before it sleeps, so a build runs its sleep plus the time to touch its memory, and that time
    is CPU time. Its memory grows over that time (`touchMs`, for the lower bounds)."""
    for b in spec["builds"]:
        touch = int(round(b["mib"] * ms_per_mib))
        b["ms"] += touch
        b["cpuMs"] = touch
        b["touchMs"] = touch
    spec["touchMsPerMiB"] = ms_per_mib
    return spec


# ---------------------------------------------------------------------------------------------
# Lower bounds


def in_critical_path_order(spec):
    """The same DAG with each build's name prefixed by its rank (`p000`, `p001`, ...) in
    critical-path order: the longest chain of build times from it to the top first. Nix asks
    about ready builds in the order of their names, so this makes it ask as a scheduler that
    knows the whole DAG would choose (Hydra's queue runner orders by the same). The top build
    keeps its name."""
    chain = {b["name"]: b["ms"] + tail_ms(spec, b["name"]) for b in spec["builds"]}
    order = sorted(chain, key=lambda name: (-chain[name], name))
    renamed = {name: f"p{rank:03d}{name}" for rank, name in enumerate(order)}
    renamed[spec["top"]] = spec["top"]
    builds = [dict(b, name=renamed[b["name"]], deps=[renamed[d] for d in b["deps"]]) for b in spec["builds"]]
    return dict(spec, builds=builds, order="critical-path")


def critical_path_ms(spec):
    """Longest chain of build times through the dependencies."""
    finish = {}
    for b in spec["builds"]:
        finish[b["name"]] = b["ms"] + max((finish[d] for d in b["deps"]), default=0)
    return max(finish.values())


def bounds(spec, budget_mib, tiers):
    """Lower bounds of the makespan, in ms.

    physical: max(longest chain, sum(peak x time) / budget); CPU is 0 (the builders sleep).
    tiers: what any schedule obeying the tiers needs: max(longest chain, sum(reservation x time)
    / budget, per tier sum(time) / maxJobs).
    A spec with each build's time to touch its memory (`with_touch_cost`) gives the bounds of the
    builds as the test builder runs them: the touch is part of every build's time, and over it a
    build holds half its peak on average.
    """
    builds = spec["builds"]
    chain = critical_path_ms(spec)
    mem = sum(b["mib"] * (b["ms"] - b.get("touchMs", 0) / 2) for b in builds) / budget_mib
    out = {"chainMs": chain, "memoryMs": mem, "cpuMs": 0, "physicalMs": max(chain, mem)}
    if tiers:
        reserved = sum(tiers[b["tier"]]["memoryMiB"] * b["ms"] for b in builds) / budget_mib
        per_tier = {t: sum(b["ms"] for b in builds if b["tier"] == t) / tiers[t]["maxJobs"] for t in tiers}
        # A tier of one job runs its builds one after another; the last of them ends no earlier
        # than their sum, and what depends on it runs after that.
        serial = {}
        for t in tiers:
            members = [b for b in builds if b["tier"] == t]
            if tiers[t]["maxJobs"] == 1 and members:
                serial[t] = sum(b["ms"] for b in members) + min(tail_ms(spec, b["name"]) for b in members)
        out.update({"reservedMemoryMs": reserved, "perTierMs": per_tier, "serialTierMs": serial,
                    "tiersMs": max([chain, reserved] + list(per_tier.values()) + list(serial.values()))})
    return out


def tail_ms(spec, name):
    """Longest chain of build times among the builds that depend on `name` (transitively)."""
    builds = spec["builds"]
    after = {name: 0}
    for b in builds:  # dependencies come first
        hits = [after[d] for d in b["deps"] if d in after]
        if hits:
            after[b["name"]] = b["ms"] + max(hits)
    return max(after.values())


# ---------------------------------------------------------------------------------------------
# Analysis of one run


def read_records(run_dir):
    path = os.path.join(run_dir, "records", "records")
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                p = line.split()
                if len(p) == 5:
                    records.append({"name": p[0], "start": int(p[1]), "end": int(p[2]), "tier": p[3], "mib": int(p[4])})
    return records


def started_names(run_dir):
    d = os.path.join(run_dir, "records", "started")
    return set(os.listdir(d)) if os.path.isdir(d) else set()


def peak_holding(records):
    """Largest sum of the builders' memory at once (intervals half-open), and most builds at once."""
    events = sorted([(r["start"], 1, r["mib"]) for r in records] + [(r["end"], 0, r["mib"]) for r in records])
    held = peak = running = most = 0
    for _, kind, mib in events:
        if kind:
            held += mib
            running += 1
            peak = max(peak, held)
            most = max(most, running)
        else:
            held -= mib
            running -= 1
    return peak, most


def tier_peaks(records):
    """Most builds of each tier running at once (intervals half-open)."""
    peaks = {}
    for tier in {r["tier"] for r in records}:
        events = sorted([(r["start"], 1) for r in records if r["tier"] == tier] +
                        [(r["end"], 0) for r in records if r["tier"] == tier])
        running = most = 0
        for _, kind in events:
            running += 1 if kind else -1
            most = max(most, running)
        peaks[tier] = most
    return peaks


def build_errors(run_dir):
    text = read_file(os.path.join(run_dir, "build.err"), "")
    return [line for line in text.splitlines() if line.startswith("error: builder for")]


def read_file(path, default=None):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def history_rows(run_dir):
    path = os.path.join(run_dir, "state", "nix-tier", "history.sqlite")
    if not os.path.exists(path):
        return []
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT package, version, tier, wall_ms, peak_mib, limit_mib, outcome FROM builds").fetchall()
    finally:
        con.close()
    return [dict(zip(["package", "version", "tier", "wallMs", "peakMiB", "limitMiB", "outcome"], r)) for r in rows]


def analyze(spec, run_dir, budget_mib, tiers, touched=None):
    """One run of `spec`'s DAG: makespan, memory, OOM kills, failures, the history's rows, and
    the lower bounds of the spec's times and, given `touched` (the spec with each build's time
    to touch its memory, `with_touch_cost`), of the times the builds take on this machine."""
    meta = json.loads(read_file(os.path.join(run_dir, "meta.json")))
    records = read_records(run_dir)
    started = started_names(run_dir)
    finished = {r["name"] for r in records}
    by_name = {b["name"]: b for b in spec["builds"]}
    peak_held, most = peak_holding(records)
    hist = history_rows(run_dir)
    # Builds whose peak the hook recorded below what the builder really held (MiB, rounded up
    # by the hook): the part charged before the watcher moved the builder stays outside.
    under = [(h["package"], h["peakMiB"], by_name.get(f'{h["package"]}-{h["version"]}', {}).get("mib"))
             for h in hist if h["peakMiB"] is not None]
    under = [u for u in under if u[2] is not None and u[1] < u[2]]
    result = {
        "config": meta["config"],
        "label": meta["label"],
        "maxJobs": meta["maxJobs"],
        "hook": meta["hook"],
        "exit": meta["exit"],
        "makespanMs": meta["endMs"] - meta["startMs"],
        "cgroupPeakMiB": meta["peakBytes"] / 2**20 if meta.get("peakBytes") is not None else None,
        "cgroupLimitMiB": meta["limitMiB"],
        "heldPeakMiB": peak_held,
        "mostAtOnce": most,
        "oomKillsCgroup": meta.get("oomKillParent"),
        "oomKillsKernelLog": meta.get("oomKillsDmesg"),
        "oomKillsHistory": sum(1 for h in hist if h["outcome"] == "oom-killed"),
        "builds": len(spec["builds"]),
        "succeeded": len(finished),
        "killedOrFailed": sorted(started - finished),
        "neverStarted": len(spec["builds"]) - len(started),
        "historyRows": len(hist),
        "tierPeaks": tier_peaks(records),
        "tierLimits": {t: v["maxJobs"] for t, v in tiers.items()} if tiers and meta["hook"] else None,
        "builderErrors": build_errors(run_dir)[:10],
        "killedBySignal9": sum(1 for e in build_errors(run_dir) if "signal 9" in e),
        "leftoverCgroups": meta.get("leftoverCgroups", 0),
        "historyPeakBelowHeld": under,
        "bounds": bounds(spec, budget_mib, tiers),
    }
    if touched is not None:
        result["boundsWithTouch"] = bounds(touched, budget_mib, tiers)
        result["touchMsPerMiB"] = touched["touchMsPerMiB"]
    prediction = json.loads(read_file(os.path.join(run_dir, "prediction.json"), "null") or "null")
    if prediction:
        p = prediction["prediction"]
        result["predictedMs"] = p["makespanMs"]
        result["predictionError"] = (p["makespanMs"] - result["makespanMs"]) / result["makespanMs"]
        result["predictedOomKills"] = sum(1 for r in p["runs"] if r["outcome"] == "oom-killed")
        result["predictedNotBuilt"] = sum(1 for r in p["runs"] if r["outcome"] == "not-built")
    oom = [v for v in (result["oomKillsKernelLog"], result["oomKillsCgroup"]) if v is not None]
    result["oomKills"] = max(oom + [result["oomKillsHistory"]])
    result["killedNotByOom"] = max(0, result["killedBySignal9"] - result["oomKills"])
    return result


# ---------------------------------------------------------------------------------------------
# Reports


def fmt_s(ms):
    return f"{ms / 1000:.1f}"


def table(spec, results):
    b = results[0]["bounds"]
    base = next((r for r in results if r["config"] == "a"), results[0])
    scale = spec["scale"]
    lines = []
    lines.append(f"workload: {len(spec['builds'])} builds "
                 f"({sum(1 for x in spec['builds'] if x['tier'] == 'heavy')} heavy, "
                 f"{sum(1 for x in spec['builds'] if x['tier'] == 'medium')} medium, "
                 f"{sum(1 for x in spec['builds'] if x['tier'] == 'light')} light), "
                 f"1 seed-minute = {scale['msPerMinute']} ms, 1 GB = {scale['mibPerGB']} MiB; "
                 f"build time {fmt_s(sum(x['ms'] for x in spec['builds']))} s in all")
    tiered = next((r for r in results if r["hook"]), None)
    lines.append(f"lower bound (any scheduler): {fmt_s(b['physicalMs'])} s = max(longest chain {fmt_s(b['chainMs'])} s, "
                 f"memory x time / budget {fmt_s(b['memoryMs'])} s, CPU 0 s: the builders sleep)")
    if tiered:
        tb = tiered["bounds"]
        per = ", ".join(f"{t} {fmt_s(v)} s" for t, v in tb["perTierMs"].items())
        serial = "".join(f", {t} builds one after another, then the shortest tail after one of them {fmt_s(v)} s"
                         for t, v in tb["serialTierMs"].items())
        lines.append(f"lower bound under the seed's tiers: {fmt_s(tb['tiersMs'])} s = max(chain, reservations x time / budget "
                     f"{fmt_s(tb['reservedMemoryMs'])} s, time per tier / maxJobs: {per}{serial})")
    touched = results[0].get("boundsWithTouch")
    if touched:
        lines.append(f"with each build's time to touch its memory ({results[0]['touchMsPerMiB']} ms per MiB, measured): "
                     f"lower bound {fmt_s(touched['physicalMs'])} s (chain {fmt_s(touched['chainMs'])} s, memory x time / budget "
                     f"{fmt_s(touched['memoryMs'])} s)" + (f", under the seed's tiers {fmt_s(tiered['boundsWithTouch']['tiersMs'])} s"
                                                           if tiered else ""))
    lines.append("")
    head = ["config", "makespan s", "predicted s", "error", "(a)/this", "this/bound", "this/tier bound", "with touch", "peak MiB", "held MiB",
            "at once", "OOM kills", "failed", "not built"]
    rows = []
    for r in results:
        fails = len(r["killedOrFailed"])
        not_built = r["builds"] - r["succeeded"] - fails
        rows.append([
            r["label"],
            fmt_s(r["makespanMs"]) + ("*" if r["succeeded"] < r["builds"] else ""),
            fmt_s(r["predictedMs"]) if "predictedMs" in r else "",
            f"{100 * r['predictionError']:+.1f} %" if "predictedMs" in r else "",
            f"{base['makespanMs'] / r['makespanMs']:.2f}",
            f"{r['makespanMs'] / b['physicalMs']:.2f}",
            f"{r['makespanMs'] / r['bounds']['tiersMs']:.2f} of {fmt_s(r['bounds']['tiersMs'])}" if r["hook"] else "",
            with_touch(r),
            f"{r['cgroupPeakMiB']:.0f}/{r['cgroupLimitMiB']}" if r["cgroupPeakMiB"] is not None else "n/a",
            str(r["heldPeakMiB"]),
            str(r["mostAtOnce"]),
            str(r["oomKills"]),
            str(fails),
            str(not_built),
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    fmt_row = lambda row: "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row))
    lines.append(fmt_row(head))
    lines.extend(fmt_row(row) for row in rows)
    lines.append("")
    lines.append("peak MiB: the parent cgroup's memory.max_usage_in_bytes / its limit (builders, nix-store, hook, page cache);")
    lines.append("held MiB: largest sum of the builders' own allocations at once (their records); at once: most builders running;")
    lines.append("failed: builders that started and never finished (killed or failed); not built: never started (a dependency failed).")
    if any(r["succeeded"] < r["builds"] for r in results):
        lines.append("*: the build did not complete (failed builds, and everything depending on them never built).")
    lines.append("predicted: `nix-tier simulate` before the build; error: (predicted - measured) / measured.")
    lines.append("bound: the lower bound any scheduler faces; tier bound: the one a scheduler obeying that row's tiers faces;")
    lines.append("with touch: this/bound and this/tier bound of the builds' times with their time to touch their memory added.")
    for r in results:
        if r.get("tierLimits"):
            over = [f"{t} {r['tierPeaks'].get(t, 0)} > maxJobs {m}" for t, m in r["tierLimits"].items()
                    if r["tierPeaks"].get(t, 0) > m]
            lines.append(f"{r['label']}: most builds at once per tier "
                         + ", ".join(f"{t} {r['tierPeaks'].get(t, 0)}/{m}" for t, m in r["tierLimits"].items())
                         + ((" (learned mode: maxJobs holds only builds without history)" if "learned mode" in r["label"]
                             else f" -- TIER LIMIT EXCEEDED: {'; '.join(over)}") if over else ""))
        if "predictedMs" in r and (r["predictedOomKills"] or r["oomKills"]):
            lines.append(f"{r['label']}: predicted {r['predictedOomKills']} OOM kills and {r['predictedNotBuilt']} builds never "
                         f"started; measured {r['oomKills']} and {r['builds'] - r['succeeded'] - len(r['killedOrFailed'])}")
        for e in r.get("builderErrors", [])[:3]:
            lines.append(f"{r['label']}: {e}")
        if r.get("killedNotByOom"):
            lines.append(f"{r['label']}: {r['killedNotByOom']} builder(s) killed by SIGKILL without an OOM kill in the kernel log")
        if r.get("leftoverCgroups"):
            lines.append(f"{r['label']}: {r['leftoverCgroups']} per-build cgroup(s) left behind by the hook's watchers")
        if r["hook"] and r["historyRows"]:
            short = [1 - peak / held for _, peak, held in r["historyPeakBelowHeld"]]
            lines.append(f"{r['label']}: the hook's history recorded a peak below the builder's own allocation for "
                         f"{len(short)} of {r['historyRows']} builds"
                         + (f" (median {100 * statistics.median(short):.0f} % below, at most {100 * max(short):.0f} %)" if short else ""))
    return "\n".join(lines)


def over(r, key, bounds="bounds"):
    """`r`'s makespan over its bound `key` ("physicalMs" or "tiersMs") among `bounds`: "bounds"
    (the spec's times) or "boundsWithTouch" (with the time to touch memory)."""
    return r["makespanMs"] / r[bounds][key]


def with_touch(r):
    """This run's makespan over its bounds with the time to touch memory, as the table shows them."""
    if "boundsWithTouch" not in r:
        return ""
    return f"{over(r, 'physicalMs', 'boundsWithTouch'):.2f}" + (f", {over(r, 'tiersMs', 'boundsWithTouch'):.2f}" if r["hook"] else "")


def judged_ratio(r, key):
    """`r`'s makespan over the bound `key` the verdicts judge by: with the time to touch memory
    when the run has it."""
    return over(r, key, "boundsWithTouch" if "boundsWithTouch" in r else "bounds")


def over_bounds(r, key):
    """`r`'s makespan over its bound `key`, and over the same bound with the time to touch memory
    when the run has it, as text."""
    text = f"{over(r, key):.2f}x"
    if "boundsWithTouch" in r:
        text += f"; {over(r, key, 'boundsWithTouch'):.2f}x with the time to touch memory"
    return text


def verdicts(results):
    """The targets of bench/scheduling, checked; one line each."""
    a = next((r for r in results if r["config"] == "a"), None)
    c = next((r for r in results if r["config"] == "c"), None)
    e = next((r for r in results if r["config"] == "e"), None)
    out = []
    if e is not None:
        ratio = judged_ratio(e, "physicalMs")
        ok = ratio <= 1.3 and e["oomKills"] == 0 and not e["killedOrFailed"]
        out.append(f"(e) learned mode within 1.3x of the lower bound, 0 OOM kills: {'met' if ok else 'MISSED'} "
                   f"({over_bounds(e, 'physicalMs')}, {e['oomKills']} OOM kills, {len(e['killedOrFailed'])} failed)")
    predicted = [r for r in results if "predictedMs" in r]
    if predicted:
        off = [r for r in predicted if abs(r["predictionError"]) > 0.10]
        out.append(f"predictions within 10 % of the measured makespan: {'met' if not off else 'MISSED'} ("
                   + ", ".join(f"{r['config']} {100 * r['predictionError']:+.1f} %" for r in predicted) + ")")
    if c is not None:
        ok = c["oomKills"] == 0 and not c["killedOrFailed"] and c["exit"] == 0
        out.append(f"(c) zero OOM kills and failures: {'met' if ok else 'MISSED'} "
                   f"({c['oomKills']} OOM kills, {len(c['killedOrFailed'])} failed, exit {c['exit']})")
        ratio = judged_ratio(c, "tiersMs")
        out.append(f"(c) within 1.05x of the bound under the seed's tiers: {'met' if ratio <= 1.05 else 'MISSED'} "
                   f"({over_bounds(c, 'tiersMs')})")
    if a is None or c is None:
        return out + ["(the comparisons with (a) are made when (a) and (c) both ran)"]
    speedup = a["makespanMs"] / c["makespanMs"]
    out.append(f"(c) at least 2x faster than (a): {'met' if speedup >= 2 else 'MISSED'} ({speedup:.2f}x)")
    ratio = judged_ratio(c, "physicalMs")
    out.append(f"(c) within 1.25x of the lower bound: {'met' if ratio <= 1.25 else 'MISSED'} ({over_bounds(c, 'physicalMs')})")
    return out


def result_line(spec, results):
    """bench/scheduling's figures as one `RESULT` line: the order Nix asked in when it was not
    the workload's own, then per configuration its makespan (s), the ratio to the lower bound
    and, with the hook, to its tier bound, and its OOM kills."""
    fields = [f"order={spec['order']}"] if "order" in spec else []
    if results and "touchMsPerMiB" in results[0]:
        fields.append(f"touch_ms_per_mib={results[0]['touchMsPerMiB']}")
    for r in results:
        c = r["config"]
        fields.append(f"{c}_makespan_s={r['makespanMs'] / 1000:.1f}")
        fields.append(f"{c}_over_bound={over(r, 'physicalMs'):.2f}")
        if r["hook"]:
            fields.append(f"{c}_over_tier_bound={over(r, 'tiersMs'):.2f}")
        if "boundsWithTouch" in r:
            fields.append(f"{c}_over_bound_touch={over(r, 'physicalMs', 'boundsWithTouch'):.2f}")
            if r["hook"]:
                fields.append(f"{c}_over_tier_bound_touch={over(r, 'tiersMs', 'boundsWithTouch'):.2f}")
        fields.append(f"{c}_oom_kills={r['oomKills']}")
        if "predictedMs" in r:
            fields.append(f"{c}_predicted_s={r['predictedMs'] / 1000:.1f}")
            fields.append(f"{c}_prediction_error={r['predictionError']:+.3f}")
    return "RESULT scheduling " + " ".join(fields)


def fitted_tiers(spec, budget_mib):
    """Tiers fitted to the workload's peaks: each tier's memoryMiB is its largest peak plus 2 %
    and 8 MiB (the builder's own code and stack); heavy 2 jobs, medium as many as the budget
    holds (at most 4), light 12. Printed as the profile arguments of bench/scheduling, then JSON."""
    top = {t: max(b["mib"] for b in spec["builds"] if b["tier"] == t) for t in ("heavy", "medium", "light")}
    mem = {t: math.ceil(v * 1.02) + 8 for t, v in top.items()}
    jobs = {"heavy": 2, "medium": min(4, budget_mib // mem["medium"]), "light": 12}
    cores = {"heavy": 7, "medium": 4, "light": 2}
    args = " ".join(f"{jobs[t]}:{cores[t]}:{mem[t]}" for t in ("heavy", "medium", "light"))
    return args, {t: {"maxJobs": jobs[t], "memoryMiB": mem[t]} for t in mem}


def summary(r):
    return (f"{r['makespanMs'] / 1000:.1f} s, exit {r['exit']}, {r['oomKills']} OOM kills, "
            f"{len(r['killedOrFailed'])} failed, {r['builds'] - r['succeeded'] - len(r['killedOrFailed'])} not built")


def gaps(run_dir):
    """Gaps between the end of one heavy build and the start of the next (ms)."""
    heavy = sorted((r for r in read_records(run_dir) if r["tier"] == "heavy"), key=lambda r: r["start"])
    return [nxt["start"] - cur["end"] for cur, nxt in zip(heavy, heavy[1:])]


def main(argv):
    cmd = argv[1]
    if cmd == "scheduling-spec":
        json.dump(scheduling_spec(float(argv[2]), float(argv[3])), sys.stdout, indent=1)
    elif cmd == "slot-reuse-spec":
        json.dump(slot_reuse_spec(int(argv[2])), sys.stdout, indent=1)
    elif cmd == "dispatch-spec":
        json.dump(dispatch_spec(int(argv[2])), sys.stdout)
    elif cmd == "copies":
        json.dump(copies(json.loads(read_file(argv[2])), int(argv[3])), sys.stdout)
    elif cmd == "with-cpu":
        json.dump(with_cpu(json.loads(read_file(argv[2])), float(argv[3]), json.loads(argv[4])), sys.stdout)
    elif cmd == "critical-path-order":
        json.dump(in_critical_path_order(json.loads(read_file(argv[2]))), sys.stdout, indent=1)
    elif cmd == "with-touch-cost":
        json.dump(with_touch_cost(json.loads(read_file(argv[2])), float(argv[3])), sys.stdout)
    elif cmd == "analyze":
        spec = json.loads(read_file(argv[2]))
        tiers = json.loads(argv[5]) if argv[5] else None
        touched = json.loads(read_file(argv[6])) if len(argv) > 6 else None
        json.dump(analyze(spec, argv[3], float(argv[4]), tiers, touched), sys.stdout, indent=1)
    elif cmd == "table":
        spec = json.loads(read_file(argv[2]))
        results = [json.loads(read_file(p)) for p in argv[3:]]
        print(table(spec, results))
        print()
        print("\n".join(verdicts(results)))
        print(result_line(spec, results))
    elif cmd == "fitted-tiers":
        args, tiers = fitted_tiers(json.loads(read_file(argv[2])), int(argv[3]))
        print(args)
        print(json.dumps(tiers))
    elif cmd == "summary":
        print(summary(json.loads(read_file(argv[2]))))
    elif cmd == "gaps":
        json.dump(gaps(argv[2]), sys.stdout)
    else:
        sys.exit(f"unknown subcommand {cmd}")


if __name__ == "__main__":
    main(sys.argv)
