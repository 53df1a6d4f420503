"""Soak: a real fleet on loopback, disturbed for a long time, then judged.

    python benchmarks/soak.py                      # 30 min soak after a 30 min undisturbed baseline
    python benchmarks/soak.py --minutes 5 --baseline-seconds 300
    python benchmarks/soak.py --short              # ~80 s in all, for tests

What runs (everything on 127.0.0.1, every process in its own process group):
  * N real ``ftte-agent`` processes (``--agents``, default 4; ``--no-mdns --interface 127.0.0.1
    --port P``), each on its own Dirichlet shard (``ftte_core.data.partition_dirichlet``) of the
    bundled digits, with ``--slowdown`` so they leave the shared CPU mostly idle;
  * the real hub, ``ftte-hub train --no-mdns --peer ...`` (zoo ``mlp``, ``--max-versions`` 10^9
    and no target, so it runs for the whole time), one ``--out`` folder for all its restarts;
  * one faulty agent (``benchmarks/soak_peers.py faulty``): holds the key, answers every TASK
    with a bad UPDATE (row scale 1e3, 1e30 or 3.4e38, num_samples 2^61, NaN scales; the kind
    changes from task to task);
  * one stalled-handshake neighbour (``soak_peers.py stall``): up to ``--stall-cap`` TCP
    connections to every agent port that never send a HELLO, refreshed at ``--stall-rate`` per
    second per port;
  * disruptions, from a seeded random generator: every agent is SIGKILLed after an exponential
    time of mean ``--agent-kill-mean`` and restarted 1-5 s later (same command, same state dir);
    the hub is SIGKILLed about every ``--hub-kill-every`` seconds and restarted 0.5-3 s later
    with the same command. The last 10% of the soak has no disruptions, so the final stop meets
    a settled fleet. A hub or agent that exits by itself is noted and restarted.

First an undisturbed baseline runs (same seed, shards, agents and hub command; no kills, no
faulty agent, no neighbour) for ``--baseline-seconds`` (default: as long as the soak).

At the end the hub gets SIGTERM (what systemd sends) and up to 60 s to stop; then the agents
get SIGTERM, and anything still alive SIGKILL. Ctrl-C or SIGTERM of this script, or any error,
kills every child process group too (try/finally), and each child is also tied to this process
with PR_SET_PDEATHSIG, so even a SIGKILLed soak leaves no orphans.

While it runs it prints a row every ``--report-every`` seconds: elapsed time, hub version (last
metrics.jsonl line), hub RSS (VmRSS) and open fds (/proc/PID/fd), bytes of checkpoint.npz and of
journal/ in --out, agents up, hub starts, agent kills.

How it judges (the verdict table; each line ``verdict NAME: PASS|FAIL  details``):
  * versions: the ``version`` of every metrics.jsonl line, in file order, across all hub
    restarts. A resumed hub writes the lines missing for merges it replays from its journal
    (marked ``replayed``), so a good run reads 1, 2, 3, ... with no gap, no repeat and never
    going back.
  * lost: acknowledged updates lost. An agent logs ``update T accepted`` when its hub ACKs
    update T as accepted (the faulty agent writes every ACK to a JSON-lines file); these
    (agent id, task id) pairs are what the fleet was promised. Each must be merged - named in
    the ``devices``/``tasks`` lists of some metrics.jsonl line - or still held by the hub at the
    end: in the final checkpoint's buffer (``buf:<i>``) or in a journal record written after that
    checkpoint. Lost = acknowledged pairs in neither. Held pairs count as safe only if a hub
    can load them: when the hub restarted for the final stop has died before the SIGTERM (its
    resume failing), they are reported as stranded and the verdict fails. An acknowledgement
    that reached the agent but whose log line was cut by its SIGKILL is not counted (rare; it
    can only hide a loss, never invent one). Pairs acknowledged twice or merged twice are counted separately.
  * accuracy: the final checkpoint's model (initial-model.ftmd + checkpoint.npz parameters),
    evaluated here on the validation file, against the baseline's the same way; PASS within
    ``--accuracy-tolerance`` (default 0.02, the issue's goal).
  * merging: the longest time without a new version (between metrics lines, and from the last
    one to the end of the soak), PASS below ``--max-stall`` seconds.
  * hub exits: a hub that exits by itself during the soak (not killed by us): PASS when none.
  * sigterm: the hub exits 0 within 60 s of SIGTERM, having written summary.json.

``--json FILE`` writes every row and figure. The work folder (``--keep DIR``, else a new temp
folder) keeps the logs: agents/*.log, hub.log, peers/*.log, both --out folders.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

HERE = Path(__file__).resolve().parent
LOOPBACK = "127.0.0.1"
ACK_RE = re.compile(r"update (\S+) accepted \(hub version")
MAX_VERSIONS = 10 ** 9


class SoakError(Exception):
    """The soak cannot go on (one line)."""


class Interrupted(BaseException):
    """SIGTERM of this script: unwind through every finally."""


# -- child processes ---------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when this script dies, whatever kills it (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Child:
    """One child process in its own process group, its output appended to a log file."""

    def __init__(self, name: str, argv: List[str], log: Path, env: Dict[str, str]):
        self.name, self.argv, self.log, self.env = name, argv, log, env
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0
        self.log_offset = 0   # where the current life's output begins in the log

    def start(self, note: str = "") -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as f:
            f.write(f"=== soak: start #{self.starts + 1} of {self.name} at {time.strftime('%H:%M:%S')}"
                    f"{' (' + note + ')' if note else ''}\n".encode())
            self.log_offset = f.tell()
            self.proc = subprocess.Popen(self.argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True, preexec_fn=_die_with_parent)
        self.starts += 1

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.alive else None

    def signal(self, sig: int) -> None:
        if self.alive:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the whole group and reap it."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def stop(self, grace: float) -> Optional[int]:
        """SIGTERM, up to ``grace`` s, then SIGKILL; the exit code of a clean stop, else None."""
        if not self.alive:
            return self.proc.returncode if self.proc is not None else None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def output(self) -> str:
        """This life's output so far."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self.log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def last_line(self) -> str:
        lines = [ln for ln in self.output().splitlines() if ln.strip()]
        return lines[-1][:300] if lines else "(no output)"


def free_ports(n: int) -> List[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind((LOOPBACK, 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


# -- set-up ------------------------------------------------------------------------------------------
def prepare(work: Path, agents: int, alpha: float, seed: int) -> Dict[str, object]:
    from ftte_core import data as ftdata
    from ftte_core.protocol import generate_key, write_key

    work.mkdir(parents=True, exist_ok=True)
    key_path = work / "fleet.key"
    if not key_path.exists():
        write_key(key_path, generate_key())
    ds = ftdata.load_bundled("digits")
    train, val = ftdata.train_val_split(ds, val_fraction=0.25, seed=seed)
    shards = ftdata.partition_dirichlet(train, agents, alpha=alpha, seed=seed, min_size=64)
    data = work / "data"
    data.mkdir(exist_ok=True)
    ftdata.save_npz(data / "val.npz", val)
    paths = []
    for i, shard in enumerate(shards):
        paths.append(data / f"agent-{i}.npz")
        ftdata.save_npz(paths[-1], shard)
    return {"key": key_path, "val": data / "val.npz", "shards": paths, "sizes": [len(s) for s in shards]}


class Phase:
    """One fleet (baseline or soak): the agents, the hub, optionally the faulty agent and the staller."""

    def __init__(self, name: str, args, prep, work: Path, faulty: bool, stall: bool):
        self.name, self.args, self.prep = name, args, prep
        self.dir = work / name
        self.out = self.dir / "hub-out"
        env = dict(os.environ, FTTE_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        n = args.agents
        ports = free_ports(n + 1)
        self.agent_ports, faulty_port = ports[:n], ports[n]
        self.agents: List[Child] = []
        for i, (port, shard) in enumerate(zip(self.agent_ports, prep["shards"])):
            self.agents.append(Child(f"agent-{i}", [
                sys.executable, "-m", "ftte_agent", "--key", str(prep["key"]), "--data", str(shard),
                "--name", f"soak-{i}", "--memory-budget", args.agent_budget, "--slowdown", f"{args.slowdown:g}",
                "--port", str(port), "--state-dir", str(self.dir / "state" / f"agent-{i}"), "--no-mdns",
                "--interface", LOOPBACK], self.dir / "agents" / f"agent-{i}.log", env))
        self.faulty_acks = self.dir / "peers" / "faulty-acks.jsonl"
        self.faulty_id = "soak-faulty"
        self.faulty = Child("faulty", [
            sys.executable, str(HERE / "soak_peers.py"), "faulty", "--key", str(prep["key"]), "--port",
            str(faulty_port), "--agent-id", self.faulty_id, "--acks", str(self.faulty_acks), "--seed",
            str(args.seed)], self.dir / "peers" / "faulty.log", env) if faulty else None
        self.staller = Child("stall", [
            sys.executable, str(HERE / "soak_peers.py"), "stall", "--ports", ",".join(map(str, self.agent_ports)),
            "--cap", str(args.stall_cap), "--rate", f"{args.stall_rate:g}", "--report", "10"],
            self.dir / "peers" / "stall.log", env) if stall else None
        peers = [f"{LOOPBACK}:{p}" for p in self.agent_ports] + ([f"{LOOPBACK}:{faulty_port}"] if faulty else [])
        hub_argv = [sys.executable, "-m", "ftte_hub.cli", "train", "--key", str(prep["key"]), "--model", "mlp",
                    "--val-data", str(prep["val"]), "--out", str(self.out), "--min-agents", str(n), "--no-mdns",
                    "--buffer", str(args.buffer), "--max-versions", str(MAX_VERSIONS), "--seed", str(args.seed),
                    "--task-timeout", "120"]
        for p in peers:
            hub_argv += ["--peer", p]
        self.hub = Child("hub", hub_argv, self.dir / "hub.log", env)
        self.children = self.agents + [c for c in (self.faulty, self.staller) if c] + [self.hub]

    def kill_all(self) -> None:
        for c in self.children:
            c.kill()

    def agent_ids(self) -> Dict[str, str]:
        ids = {}
        for i, a in enumerate(self.agents):
            try:
                ids[a.name] = (self.dir / "state" / f"agent-{i}" / "agent_id").read_text().strip()
            except OSError:
                pass
        return ids

    def start_agents(self) -> None:
        for a in self.agents:
            a.start()
        if self.faulty:
            self.faulty.start()
        deadline = time.monotonic() + 120
        waiting = list(self.agents)
        while waiting:
            waiting = [a for a in waiting if "listening on" not in a.output()]
            for a in waiting:
                if not a.alive:
                    raise SoakError(f"{a.name} exited at start ({a.proc.returncode}): {a.last_line()}")
            if waiting and time.monotonic() > deadline:
                raise SoakError(f"{waiting[0].name} is not listening after 120 s: {waiting[0].last_line()}")
            time.sleep(0.2)


# -- sampling ----------------------------------------------------------------------------------------
def proc_rss(pid: Optional[int]) -> Optional[int]:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def proc_fds(pid: Optional[int]) -> Optional[int]:
    if pid is None:
        return None
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def tree_bytes(path: Path) -> int:
    total = 0
    try:
        for p in path.rglob("*"):
            try:
                if p.is_file():
                    total += p.stat().st_size
            except OSError:
                pass
    except OSError:
        pass
    return total


def file_bytes(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class MetricsTail:
    """Reads metrics.jsonl incrementally (complete lines only)."""

    def __init__(self, path: Path):
        self.path = path
        self.version: Optional[int] = None
        self.accuracy: Optional[float] = None
        self._offset = 0

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self._offset:   # rewritten by a resume (torn lines dropped): read it again
                    self._offset = 0
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return
        end = chunk.rfind(b"\n") + 1
        self._offset += end
        for line in chunk[:end].splitlines():
            try:
                obj = json.loads(line)
                self.version, self.accuracy = int(obj["version"]), float(obj["accuracy"])
            except (ValueError, KeyError, TypeError):
                pass


ROW_HEAD = (f"{'elapsed':>8} {'version':>8} {'hub RSS':>9} {'hub fds':>7} {'ckpt':>9} {'journal':>9} "
            f"{'agents up':>9} {'hub starts':>10} {'agent kills':>11}")


def fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.1f}Mi" if n >= 2**20 else f"{n / 1024:.1f}Ki"


# -- running a phase ---------------------------------------------------------------------------------
def run_phase(phase: Phase, seconds: float, args, disturb: bool, rows: List[dict], events: List[str]) -> dict:
    """Run ``phase`` for ``seconds`` (from the hub's first start), disturbing it if asked; returns facts."""
    rng = random.Random(args.seed)
    say = lambda msg: (events.append(msg), print(f"# {msg}", flush=True))  # noqa: E731
    phase.start_agents()
    if phase.staller:
        phase.staller.start()
    phase.hub.start("first")
    t0 = time.monotonic()
    quiet_after = seconds * 0.9 if disturb else seconds
    next_hub_kill = args.hub_kill_every * rng.uniform(0.8, 1.2)
    hub_down_until: Optional[float] = None
    agent_next_kill = [rng.expovariate(1.0 / args.agent_kill_mean) for _ in phase.agents]
    agent_down_until: List[Optional[float]] = [None] * len(phase.agents)
    hub_kills = agent_kills = hub_self_exits = agent_self_exits = 0
    hub_exit_lines: List[str] = []
    last_exit = -1e9
    metrics = MetricsTail(phase.out / "metrics.jsonl")
    next_row = 0.0
    print(ROW_HEAD, flush=True)
    while True:
        now = time.monotonic() - t0
        if now >= seconds:
            break
        # the hub
        if hub_down_until is not None:
            if now >= hub_down_until:
                phase.hub.start("restart")
                hub_down_until = None
        elif not phase.hub.alive:
            hub_self_exits += 1
            line = phase.hub.last_line()
            hub_exit_lines.append(line)
            say(f"{now:7.1f} s: the hub exited by itself ({phase.hub.proc.returncode}): {line}")
            # restart, backing off when it keeps failing at once (e.g. a resume that cannot work)
            hub_down_until = now + (2.0 if now - last_exit > 30 else 15.0)
            last_exit = now
        elif disturb and now >= next_hub_kill and now < quiet_after:
            phase.hub.kill()
            hub_kills += 1
            hub_down_until = now + rng.uniform(0.5, 3.0)
            next_hub_kill = now + args.hub_kill_every * rng.uniform(0.8, 1.2)
        # the agents
        for i, a in enumerate(phase.agents):
            if agent_down_until[i] is not None:
                if now >= agent_down_until[i]:
                    a.start("restart")
                    agent_down_until[i] = None
            elif not a.alive:
                agent_self_exits += 1
                say(f"{now:7.1f} s: {a.name} exited by itself ({a.proc.returncode}): {a.last_line()}")
                agent_down_until[i] = now + 2.0
            elif disturb and now >= agent_next_kill[i] and now < quiet_after:
                a.kill()
                agent_kills += 1
                agent_down_until[i] = now + rng.uniform(1.0, 5.0)
                agent_next_kill[i] = agent_down_until[i] + rng.expovariate(1.0 / args.agent_kill_mean)
        for c in (phase.faulty, phase.staller):
            if c is not None and not c.alive:
                say(f"{now:7.1f} s: {c.name} exited ({c.proc.returncode}): {c.last_line()}; restarting it")
                c.start("restart")
        if now >= next_row:
            next_row += args.report_every
            metrics.poll()
            pid = phase.hub.pid
            row = {"elapsed_s": round(now, 1), "version": metrics.version, "hub_rss": proc_rss(pid),
                   "hub_fds": proc_fds(pid), "checkpoint_bytes": file_bytes(phase.out / "checkpoint.npz"),
                   "journal_bytes": tree_bytes(phase.out / "journal"),
                   "agents_up": sum(a.alive for a in phase.agents), "hub_starts": phase.hub.starts,
                   "agent_kills": agent_kills, "phase": phase.name}
            rows.append(row)
            print(f"{row['elapsed_s']:>7.0f}s {row['version'] if row['version'] is not None else '-':>8} "
                  f"{fmt_bytes(row['hub_rss']):>9} {row['hub_fds'] if row['hub_fds'] is not None else '-':>7} "
                  f"{fmt_bytes(row['checkpoint_bytes']):>9} {fmt_bytes(row['journal_bytes']):>9} "
                  f"{row['agents_up']:>9} {row['hub_starts']:>10} {agent_kills:>11}", flush=True)
        time.sleep(0.2)
    end_wall = time.time()
    if phase.staller:
        phase.staller.stop(5)
    # the end: the hub first (it may still STOP its agents), then everyone else
    if hub_down_until is not None or not phase.hub.alive:
        phase.hub.start("for the final stop")   # never judge a hub we just killed: let it resume first
        time.sleep(min(10.0, args.report_every))
    alive_at_sigterm = phase.hub.alive   # False: it could not even resume (it died before the signal)
    t_term = time.monotonic()
    summary_before = file_bytes(phase.out / "summary.json") and (phase.out / "summary.json").stat().st_mtime
    code = phase.hub.stop(60.0)
    stop_s = time.monotonic() - t_term
    summary_written = (phase.out / "summary.json").exists() and \
        (phase.out / "summary.json").stat().st_mtime != summary_before
    hub_last = phase.hub.last_line()
    for c in phase.agents + ([phase.faulty] if phase.faulty else []):
        c.stop(10.0)
    say(f"{phase.name}: hub stopped by SIGTERM -> exit {code if code is not None else 'none (SIGKILLed after 60 s)'}"
        f" in {stop_s:.1f} s; its last line: {hub_last}")
    return {"seconds": seconds, "end_unix": end_wall, "hub_kills": hub_kills, "agent_kills": agent_kills,
            "hub_self_exits": hub_self_exits, "hub_exit_lines": hub_exit_lines[:20],
            "agent_self_exits": agent_self_exits, "hub_starts": phase.hub.starts,
            "alive_at_sigterm": alive_at_sigterm, "sigterm_exit": code, "sigterm_seconds": round(stop_s, 1),
            "summary_written": summary_written, "hub_last_line": hub_last}


# -- judging -----------------------------------------------------------------------------------------
def read_metrics(out: Path) -> List[dict]:
    lines = []
    try:
        text = (out / "metrics.jsonl").read_text(errors="replace")
    except OSError:
        return lines
    for ln in text.splitlines():
        try:
            obj = json.loads(ln)
            if isinstance(obj, dict) and "version" in obj:
                lines.append(obj)
        except ValueError:
            pass
    return lines


def version_check(lines: List[dict]) -> dict:
    versions = [int(m["version"]) for m in lines]
    seen: Set[int] = set()
    repeats = backwards = 0
    for i, v in enumerate(versions):
        if v in seen:
            repeats += 1
        seen.add(v)
        if i and v < versions[i - 1]:
            backwards += 1
    top = max(versions) if versions else 0
    gaps = len(set(range(1, top + 1)) - seen)
    return {"lines": len(versions), "last": top, "gaps": gaps, "repeats": repeats, "backwards": backwards,
            "replayed_lines": sum(1 for m in lines if m.get("replayed"))}


def acknowledged(phase: Phase) -> Tuple[List[Tuple[str, str]], int]:
    """(agent id, task id) of every update the fleet was told was accepted; and how many were told twice."""
    pairs: List[Tuple[str, str]] = []
    ids = phase.agent_ids()
    for a in phase.agents:
        aid = ids.get(a.name, a.name)
        try:
            text = a.log.read_text(errors="replace")
        except OSError:
            continue
        pairs += [(aid, m.group(1)) for m in ACK_RE.finditer(text)]
    if phase.faulty:
        try:
            for ln in phase.faulty_acks.read_text().splitlines():
                try:
                    obj = json.loads(ln)
                except ValueError:
                    continue
                if obj.get("accepted"):
                    pairs.append((phase.faulty_id, str(obj.get("task_id"))))
        except OSError:
            pass
    return pairs, len(pairs) - len(set(pairs))


def held_by_hub(out: Path) -> Tuple[Set[Tuple[str, str]], Optional[int], str]:
    """(agent id, task id) the hub still holds unmerged: the checkpoint's buffer and the journal after it."""
    from ftte_core.update import Update, UpdateError
    from ftte_hub import checkpoint as ckpt

    held: Set[Tuple[str, str]] = set()
    try:
        saved = ckpt.load_checkpoint(out)
    except ckpt.CheckpointError as e:
        return held, None, str(e)
    if saved is None:
        return held, None, "no checkpoint"
    meta, _, buffer = saved
    version = int(meta.get("driver", {}).get("version", meta.get("version", 0)))
    for raw in buffer:
        try:
            u = Update.from_bytes(raw)
            held.add((u.device_id, u.task_id))
        except UpdateError:
            pass
    note = ""
    for v in ckpt.journal_versions(out):
        if v < version:
            continue
        try:
            for header, blob in ckpt.read_journal(ckpt.journal_path(out, v)):
                if header.get("e") == "update":
                    try:
                        held.add((str(header.get("dev", "")), Update.from_bytes(blob).task_id))
                    except UpdateError:
                        pass
        except (ckpt.CheckpointError, OSError) as e:
            note = f"journal {v}: {e}"
    return held, version, note


def evaluate_checkpoint(out: Path, val_path: Path) -> Optional[float]:
    from ftte_core.data import load_npz
    from ftte_core.modelfile import model_from_bytes
    from ftte_hub import checkpoint as ckpt

    try:
        saved = ckpt.load_checkpoint(out)
        if saved is None:
            return None
        model = model_from_bytes((out / ckpt.INITIAL_MODEL).read_bytes())
        model.load_state(saved[1])
        val = load_npz(str(val_path))
        _, acc = model.evaluate(val.x, val.y)
        return float(acc)
    except Exception as e:  # a wrecked model or file is a finding, not a crash of the soak
        print(f"# cannot evaluate the checkpoint in {out}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return None


def longest_stall(lines: List[dict], start_unix: float, end_unix: float) -> float:
    times = [start_unix] + sorted(float(m.get("unix_time", 0)) for m in lines if not m.get("replayed")) + [end_unix]
    return max(b - a for a, b in zip(times, times[1:]))


def judge(phase: Phase, facts: dict, baseline_acc: Optional[float], args, start_unix: float) -> Tuple[list, dict]:
    lines = read_metrics(phase.out)
    vc = version_check(lines)
    acked, acked_twice = acknowledged(phase)
    merged: Dict[Tuple[str, str], int] = {}
    for m in lines:
        for dev, tid in zip(m.get("devices") or [], m.get("tasks") or []):
            merged[(str(dev), str(tid))] = merged.get((str(dev), str(tid)), 0) + 1
    held, ckpt_version, note = held_by_hub(phase.out)
    acked_set = set(acked)
    lost = sorted(p for p in acked_set if p not in merged and p not in held)
    # held on disk is only safe if a hub can load it: a hub that died before the final SIGTERM
    # (its resume failing) strands everything it holds
    stranded = 0 if facts["alive_at_sigterm"] else sum(1 for p in acked_set if p not in merged and p in held)
    merged_twice = sum(1 for n in merged.values() if n > 1)
    faulty_acked = sum(1 for a, _ in acked_set if a == phase.faulty_id)
    # the acknowledgements come from the agents' log lines: if their wording changed, say so rather
    # than report "0 lost" over nothing
    unreadable = (sum(1 for a, _ in merged if a != phase.faulty_id) > 0
                  and sum(1 for a, _ in acked_set if a != phase.faulty_id) == 0)
    acc = evaluate_checkpoint(phase.out, phase.prep["val"])
    stall = longest_stall(lines, start_unix, facts["end_unix"])
    drop = None if acc is None or baseline_acc is None else baseline_acc - acc
    figures = {"versions": vc, "acknowledged": len(acked_set), "acknowledged_twice": acked_twice,
               "acknowledged_faulty": faulty_acked, "merged_pairs": len(merged), "merged_twice": merged_twice,
               "held_at_end": len(held), "checkpoint_version": ckpt_version, "held_note": note,
               "lost": len(lost), "stranded": stranded, "lost_examples": lost[:10], "accuracy": acc,
               "baseline_accuracy": baseline_acc,
               "last_metrics_accuracy": lines[-1].get("accuracy") if lines else None,
               "longest_stall_s": round(stall, 1), **facts}
    ok = lambda b: "PASS" if b else "FAIL"  # noqa: E731
    verdicts = [
        ("versions", ok(vc["lines"] > 0 and vc["gaps"] == 0 and vc["repeats"] == 0 and vc["backwards"] == 0),
         f"{vc['lines']} metrics lines up to version {vc['last']}: {vc['gaps']} gaps, {vc['repeats']} repeats, "
         f"{vc['backwards']} going back ({vc['replayed_lines']} replayed lines)"),
        ("lost", ok(not lost and not stranded and acked_twice == 0 and merged_twice == 0 and not unreadable),
         ("no 'update T accepted' line in any agent log although their updates were merged: the agent's "
          "log wording changed (soak.ACK_RE); " if unreadable else "") +
         f"acknowledged updates lost: {len(lost)} of {len(acked_set)} acknowledged "
         f"({faulty_acked} of them the faulty agent's); acknowledged twice {acked_twice}, merged twice "
         f"{merged_twice}; {len(held)} held unmerged at the end"
         + (f", {stranded} acknowledged ones stranded there (the hub could not resume from that state)"
            if stranded else "") + (f"; {note}" if note else "")),
        ("accuracy", ok(drop is not None and drop <= args.accuracy_tolerance),
         f"final accuracy {_f(acc)} against the undisturbed run's {_f(baseline_acc)}"
         + (f" (drop {drop:+.4f}, tolerance {args.accuracy_tolerance:g})" if drop is not None else "")),
        ("merging", ok(vc["lines"] > 0 and stall < args.max_stall),
         f"longest time without a new version {stall:.1f} s (limit {args.max_stall:g} s)"),
        ("hub_exits", ok(facts["hub_self_exits"] == 0),
         f"{facts['hub_self_exits']} exits by itself" + (f"; first: {facts['hub_exit_lines'][0]}"
                                                          if facts["hub_exit_lines"] else "")),
        ("sigterm", ok(facts["sigterm_exit"] == 0 and facts["summary_written"]),
         f"exit {facts['sigterm_exit']} after {facts['sigterm_seconds']} s, summary.json "
         f"{'written' if facts['summary_written'] else 'not written'}"),
    ]
    return verdicts, figures


def _f(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4f}"


# -- main --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Soak a loopback fleet: kills, restarts, a faulty agent, a stalling "
                                            "neighbour; then versions, lost updates and accuracy.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="length of the disturbed soak")
    p.add_argument("--short", action="store_true",
                   help="a ~80 s run for tests: 50 s soak, 20 s baseline, hub killed every ~20 s, agents every ~15 s")
    p.add_argument("--baseline-seconds", type=float, default=None,
                   help="length of the undisturbed run (default: as long as the soak; 0: none)")
    p.add_argument("--agents", type=int, default=4, help="real ftte-agent processes")
    p.add_argument("--hub-kill-every", type=float, default=180.0, help="mean seconds between hub SIGKILLs")
    p.add_argument("--agent-kill-mean", type=float, default=90.0, help="mean seconds between an agent's SIGKILLs")
    p.add_argument("--buffer", type=int, default=4, help="K: updates per merge")
    p.add_argument("--slowdown", type=float, default=20.0,
                   help="ftte-agent --slowdown: sleep (X-1) x the training time after each task (spares the CPU)")
    p.add_argument("--agent-budget", default="64MiB", help="ftte-agent --memory-budget")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew concentration of the shards")
    p.add_argument("--no-faulty", action="store_true", help="no faulty agent")
    p.add_argument("--no-stall", action="store_true", help="no stalled-handshake neighbour")
    p.add_argument("--stall-cap", type=int, default=64, help="stalled connections held per agent port")
    p.add_argument("--stall-rate", type=float, default=8.0, help="new stalled connections per second per agent port")
    p.add_argument("--report-every", type=float, default=60.0, help="seconds between progress rows")
    p.add_argument("--accuracy-tolerance", type=float, default=0.02, help="allowed accuracy drop against the baseline")
    p.add_argument("--max-stall", type=float, default=90.0, help="longest time without a new version that passes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default=None, metavar="DIR", help="work folder (default: a new temp folder, kept)")
    p.add_argument("--json", default=None, metavar="FILE", help="write rows, figures and verdicts as JSON")
    args = p.parse_args(argv)
    if args.short:
        args.minutes = 50 / 60
        args.hub_kill_every = 20.0
        args.agent_kill_mean = 15.0
        args.report_every = 10.0
        args.max_stall = 30.0
        if args.baseline_seconds is None:
            args.baseline_seconds = 20.0
    soak_s = args.minutes * 60
    base_s = soak_s if args.baseline_seconds is None else args.baseline_seconds
    if args.agents < 1 or soak_s <= 0:
        p.error("--agents and --minutes must be positive")

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ftte_soak_"))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("baseline", "soak"):
        if (work / name).exists():
            raise SystemExit(f"soak: {work / name} exists; use an empty --keep folder")

    def on_term(signum, frame):
        raise Interrupted()
    signal.signal(signal.SIGTERM, on_term)

    prep = prepare(work, args.agents, args.alpha, args.seed)
    print(f"# work folder {work}; {args.agents} agents with {prep['sizes']} samples; "
          f"baseline {base_s:g} s, soak {soak_s:g} s", flush=True)
    rows: List[dict] = []
    events: List[str] = []
    phases: List[Phase] = []
    baseline_acc = None
    base_facts = None
    try:
        if base_s > 0:
            print(f"# undisturbed baseline, {base_s:g} s", flush=True)
            base = Phase("baseline", args, prep, work, faulty=False, stall=False)
            phases.append(base)
            base_facts = run_phase(base, base_s, args, disturb=False, rows=rows, events=events)
            base.kill_all()
            baseline_acc = evaluate_checkpoint(base.out, prep["val"])
            base_lines = read_metrics(base.out)
            print(f"# baseline: version {base_lines[-1]['version'] if base_lines else 0}, "
                  f"checkpoint accuracy {_f(baseline_acc)}", flush=True)
        print(f"# soak, {soak_s:g} s: hub SIGKILLed every ~{args.hub_kill_every:g} s, each agent every "
              f"~{args.agent_kill_mean:g} s" + ("" if args.no_faulty else ", a faulty agent")
              + ("" if args.no_stall else f", {args.stall_cap} stalled handshakes per agent at "
                                          f"{args.stall_rate:g}/s"), flush=True)
        soak = Phase("soak", args, prep, work, faulty=not args.no_faulty, stall=not args.no_stall)
        phases.append(soak)
        start_unix = time.time()
        facts = run_phase(soak, soak_s, args, disturb=True, rows=rows, events=events)
        soak.kill_all()
    except SoakError as e:
        print(f"soak: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Interrupted):
        print("soak: interrupted; every child process was killed", file=sys.stderr)
        return 130
    finally:
        for ph in phases:
            ph.kill_all()

    verdicts, figures = judge(soak, facts, baseline_acc, args, start_unix)
    stall_lines = [ln for ln in soak.staller.output().splitlines() if ln.startswith("{")] if soak.staller else []
    print()
    print(f"hub kills {facts['hub_kills']}, agent kills {facts['agent_kills']}, hub starts {facts['hub_starts']}, "
          f"agents exiting by themselves {facts['agent_self_exits']}")
    if stall_lines:
        print(f"stalled-handshake neighbour, last status: {stall_lines[-1]}")
    soak_rows = [r for r in rows if r["phase"] == "soak"]
    rss = [r["hub_rss"] for r in soak_rows if r["hub_rss"]]
    fds = [r["hub_fds"] for r in soak_rows if r["hub_fds"]]
    ck = [r["checkpoint_bytes"] for r in soak_rows if r["checkpoint_bytes"]]
    if rss:
        print(f"hub RSS first/last/max {fmt_bytes(rss[0])} / {fmt_bytes(rss[-1])} / {fmt_bytes(max(rss))}; "
              f"fds max {max(fds) if fds else '-'}; checkpoint first/last {fmt_bytes(ck[0] if ck else None)} / "
              f"{fmt_bytes(ck[-1] if ck else None)}")
    print(f"acknowledged updates lost: {figures['lost']}")
    print(f"final accuracy {_f(figures['accuracy'])} (last metrics line {figures['last_metrics_accuracy']}), "
          f"undisturbed {_f(baseline_acc)}")
    print()
    width = max(len(n) for n, _, _ in verdicts)
    for name, verdict, detail in verdicts:
        print(f"verdict {name + ':':<{width + 1}} {verdict}  {detail}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "figures": figures, "baseline": base_facts,
                                               "events": events, "stall": stall_lines[-1:],
                                               "verdicts": verdicts}, indent=1, default=str))
    print(f"# logs and outputs in {work}")
    return 0 if all(v == "PASS" for _, v, _ in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
