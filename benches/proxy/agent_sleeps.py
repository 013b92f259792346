#!/usr/bin/env python3
"""Where the agent waits: its sleeps in a scheduler trace, by who woke it.

An analysis aid for `cargo bench --bench proxy`, not part of the bench run:
it reads the text of a `perf sched record -a` trace taken during a window
and says, for the ssh-agent, how long it slept and how often, split by
who woke it (the keyholder daemon: the proxy's slices; a load-generator
thread: the direct slices); how long it then waited on the run queue; and
how long each of its sleeps in the proxy's slices lasted against how many
load-generator threads (clients) the daemon woke during it. It only reads the trace; it never
starts, stops or signals anything.

    # as root, while a window runs (long slices make the sides easy to see):
    KH_BENCH_ONLY=connect16 KH_BENCH_RELAY=0 KH_BENCH_SLICE_MS=2000 \\
      KH_BENCH_SECS=20 KH_BENCH_ROUNDS=1 cargo bench --bench proxy &
    sleep 30   # past the build and the warm-up
    perf sched record -a -o sched.data -- sleep 6
    perf script -i sched.data -F comm,tid,cpu,time,event,trace > sched.txt
    python3 benches/proxy/agent_sleeps.py sched.txt "$(pgrep -x ssh-agent)"
"""

import bisect
import collections
import re
import sys

SWITCH = re.compile(r"prev_pid=(\d+) .*prev_state=(\S+) ==> .*next_pid=(\d+)")
WAKING = re.compile(r"comm=(\S+) pid=(\d+)")


def side(comm):
    """Which side of the window a waker belongs to."""
    if comm == "keyholder":
        return "proxy (woken by the daemon)"
    if comm.startswith("proxy-"):
        return "direct (woken by a client)"
    return "other (" + comm + ")"


def main(path, agent):
    sleeps = []  # (start, end, waker side)
    delays = collections.Counter()
    client_wakes = []  # times the daemon woke a load-generator thread
    asleep_since = None
    woken_at = None
    woken_by = None
    with open(path) as trace:
        for line in trace:
            f = line.split()
            if len(f) < 6:
                continue
            comm, time, event = f[0], float(f[3].rstrip(":")), f[4]
            if event.startswith("sched:sched_switch"):
                m = SWITCH.search(line)
                if not m:
                    continue
                prev, state, nxt = int(m.group(1)), m.group(2), int(m.group(3))
                if prev == agent and state.startswith("S"):
                    asleep_since = time
                if nxt == agent and woken_at is not None:
                    delays[woken_by] += time - woken_at
                    woken_at = None
            elif event.startswith("sched:sched_waking"):
                m = WAKING.search(line)
                if not m:
                    continue
                target_comm, target = m.group(1), int(m.group(2))
                if target == agent and asleep_since is not None:
                    sleeps.append((asleep_since, time, side(comm)))
                    woken_at, woken_by = time, side(comm)
                    asleep_since = None
                elif comm == "keyholder" and target_comm.startswith("proxy-"):
                    client_wakes.append(time)
    total = collections.Counter()
    count = collections.Counter()
    for start, end, who in sleeps:
        total[who] += end - start
        count[who] += 1
    print("agent sleeps, by who woke it: total ms, count; then run-queue wait after it, ms")
    for who in sorted(total):
        print(f"  {who}: {total[who] * 1e3:.1f} ms, {count[who]}; {delays[who] * 1e3:.1f} ms")
    print("agent sleeps woken by the daemon, by clients the daemon woke during them:")
    by_n = collections.defaultdict(list)
    for start, end, who in sleeps:
        if not who.startswith("proxy"):
            continue
        n = bisect.bisect_right(client_wakes, end) - bisect.bisect_left(client_wakes, start)
        by_n[min(n, 12)].append(end - start)
    for n in sorted(by_n):
        d = by_n[n]
        label = f"{n}+" if n == 12 else str(n)
        print(f"  {label:>3}: {len(d):5} sleeps, {sum(d) * 1e3:6.1f} ms, {sum(d) / len(d) * 1e6:5.0f} us each")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: agent_sleeps.py TRACE.txt AGENT_PID")
    main(sys.argv[1], int(sys.argv[2]))
