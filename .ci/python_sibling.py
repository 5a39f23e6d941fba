#!/usr/bin/env python3
"""A sibling service in Python, built only from proto/, run against a live brain-ops.

Generates the stubs with `python -m grpc_tools.protoc` into a scratch directory, starts
`$BRAIN_OPS_BIN_DIR/brain-ops serve` (free ports, scratch data, a principals file with an operator
and a service), and checks the safe-mode, Watch and audit contracts of DESIGN.md / docs/: one
PASS or FAIL line per check, exit status 1 if any failed. docs/CLIENTS.md explains it.
"""

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT_S = 1  # --watch-heartbeat-seconds for this run (the service's default is 5)
# The client rule (DESIGN.md, "Clients"; docs/SAFE_MODE.md): no message, status or heartbeat,
# within the staleness budget -> safe mode is on, reconnect with backoff. The budget's default is
# 30 s against the default 5 s heartbeat: six intervals. Scaled to this run's heartbeat.
BUDGET_S = 6 * HEARTBEAT_S
ONE_SHOT_DEADLINE_S = 2  # "CheckOperation with a deadline (2 seconds is plenty)"
SLACK_S = 1.0  # scheduling allowance on timing bounds (a loaded 2-core machine)
OPERATOR, SERVICE = "ops-oncall", "factory-executor"
OK = grpc.StatusCode.OK
failures = []


def check(name, ok, detail=""):
    detail = f" ({detail[:160]})" if detail else ""
    print(f"{'PASS' if ok else 'FAIL'} {name}{detail}", flush=True)
    if not ok:
        failures.append(name)
    return ok


def generate_stubs(out):
    protos = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ROOT, "proto"))
              for f in fs if f.endswith(".proto")]
    os.makedirs(out)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", os.path.join(ROOT, "proto"),
                    f"--python_out={out}", f"--grpc_python_out={out}", *sorted(protos)], check=True)
    sys.path.insert(0, out)


class Server:
    """`brain-ops serve` on free ports (a restart keeps them) and a scratch data directory."""

    def __init__(self, binary, work, principals):
        self.binary, self.work, self.principals = binary, work, principals
        self.grpc_addr, self.metrics_addr, self.proc, self.starts = "127.0.0.1:0", None, None, 0

    def start(self):
        self.starts += 1
        log = os.path.join(self.work, f"serve-{self.starts}.log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("BRAIN_")}
        args = [self.binary, "serve", "--grpc-addr", self.grpc_addr,
                "--metrics-addr", "127.0.0.1:0", "--data-dir", os.path.join(self.work, "data"),
                "--auth-file", self.principals, "--log-format", "json",
                "--watch-heartbeat-seconds", str(HEARTBEAT_S)]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(args, env=env, stdout=out, stderr=out)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            serving = [json.loads(l) for l in open(log) if '"brain-ops serving"' in l]
            if serving:
                self.grpc_addr, self.metrics_addr = serving[0]["grpc"], serving[0]["metrics"]
                try:  # ready: ledger verified, state rebuilt
                    urllib.request.urlopen(f"http://{self.metrics_addr}/readyz", timeout=1)
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        self.proc.kill()
        sys.exit("brain-ops did not become ready:\n" + open(log).read())

    def pause(self):
        """SIGSTOP, and wait until every thread has stopped (delivery is not synchronous)."""
        self.proc.send_signal(signal.SIGSTOP)
        task = f"/proc/{self.proc.pid}/task"
        stopped = lambda: all(open(f"{task}/{t}/stat").read().rsplit(")", 1)[1].split()[0]
                              in "tT" for t in os.listdir(task))
        if os.path.isdir(task) and wait_until(stopped, 5) is None:
            sys.exit("brain-ops did not stop on SIGSTOP")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait() if self.proc else None


def auth(token):
    return [("authorization", f"Bearer {token}")] if token else []


def call(method, request, token, timeout=10):
    """(OK, response) or (code, details)."""
    try:
        return OK, method(request, metadata=auth(token), timeout=timeout)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def wait_until(predicate, within, step=0.02):
    """The time at which predicate() first held, or None."""
    deadline = time.monotonic() + within
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            return None
        time.sleep(step)


class Sibling:
    """Holds a Watch stream on its own channel and decides from the last message it saw."""

    def __init__(self, pb, stubs, server, token):
        self.pb, self.stubs, self.server, self.token = pb, stubs, server, token
        self.lock = threading.Lock()
        self.heard, self.enabled, self.revision = None, True, None  # nothing heard: blocked
        self.messages, self.attempts, self.errors = [], 0, []
        self.call, self.call_started, self.stopped = None, 0.0, False
        threading.Thread(target=self._follow, daemon=True).start()
        threading.Thread(target=self._watchdog, daemon=True).start()

    def view(self):
        with self.lock:
            if self.heard is None:
                return "unknown"
            if time.monotonic() - self.heard >= BUDGET_S:
                return "stale"
            return "on" if self.enabled else "off"

    def may_run(self):
        """The gate for every execution, deployment and bundle load: only a fresh "off"."""
        return self.view() == "off"

    def _follow(self):
        backoff = 0.1
        while not self.stopped:
            channel = grpc.insecure_channel(self.server.grpc_addr)
            stream = self.stubs.SafeModeServiceStub(channel).Watch(
                self.pb.WatchRequest(), metadata=auth(self.token))
            with self.lock:
                self.call, self.call_started = stream, time.monotonic()
                self.attempts += 1
            try:
                for m in stream:
                    with self.lock:
                        self.heard, self.enabled = time.monotonic(), m.status.enabled
                        self.revision = m.status.revision
                        self.messages.append((self.heard, m.heartbeat, m.status.enabled,
                                              m.status.revision))
                    backoff = 0.1
            except grpc.RpcError as e:
                with self.lock:
                    self.errors.append((e.code(), e.details() or ""))
            channel.close()
            time.sleep(backoff)
            backoff = min(backoff * 2, 1.0)  # a real sibling might cap higher

    def _watchdog(self):
        """A stream silent for the budget is given up and reconnected."""
        while not self.stopped:
            with self.lock:
                if self.call and time.monotonic() - max(self.heard or 0,
                                                         self.call_started) >= BUDGET_S:
                    self.call.cancel()
                    self.call = None
            time.sleep(0.05)

    def since(self, t):
        with self.lock:
            return [m for m in self.messages if m[0] >= t]


def one_shot_allowed(sm, stubs, addr, token, kind, operation):
    """docs/SAFE_MODE.md rule 3: anything but an explicit "allowed" within the deadline is a no."""
    with grpc.insecure_channel(addr) as channel:
        code, r = call(stubs.SafeModeServiceStub(channel).CheckOperation,
                       sm.CheckOperationRequest(kind=kind, operation=operation), token,
                       ONE_SHOT_DEADLINE_S)
    return code == OK and r.allowed, code


def canonical(obj):
    """RFC 8785 for the records' shape: ASCII keys, strings, integers, booleans, null."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def main():
    bin_dir = os.environ.get("BRAIN_OPS_BIN_DIR") or os.path.join(ROOT, "target", "debug")
    binary = os.path.join(bin_dir, "brain-ops")
    if not os.access(binary, os.X_OK):
        sys.exit(f"build brain-ops first: no binary at {binary}")
    work = tempfile.mkdtemp(prefix="brain-ops-python-sibling-")
    generate_stubs(os.path.join(work, "stubs"))
    from brain.ops.v1 import audit_pb2 as au, audit_pb2_grpc as au_grpc
    from brain.ops.v1 import safe_mode_pb2 as sm, safe_mode_pb2_grpc as sm_grpc
    from brain.ops.v1 import types_pb2 as ty

    tokens = {OPERATOR: "op_" + secrets.token_hex(16), SERVICE: "svc_" + secrets.token_hex(16)}
    principals = os.path.join(work, "principals.toml")
    with open(principals, "w") as f:
        for name, role in [(OPERATOR, "operator"), (SERVICE, "service")]:
            digest = hashlib.sha256(tokens[name].encode()).hexdigest()
            f.write(f'[[principal]]\nname = "{name}"\nrole = "{role}"\ntoken_sha256 = "{digest}"\n')
    op, svc = tokens[OPERATOR], tokens[SERVICE]

    server, sibling, started = Server(binary, work, principals), None, time.monotonic()
    try:
        server.start()
        channel = grpc.insecure_channel(server.grpc_addr)  # reconnects after a restart
        safe, audit = sm_grpc.SafeModeServiceStub(channel), au_grpc.AuditServiceStub(channel)
        safe_mode_flow(sm, safe, audit, au, op, svc)
        status = call(safe.GetStatus, sm.GetStatusRequest(), op)[1].status
        sibling = Sibling(sm, sm_grpc, server, svc)
        watch_flow(sm, sm_grpc, safe, op, svc, sibling, server, status)
        audit_flow(au, ty, audit, op, svc)
    except Exception as e:  # an unexpected error is a failed check, and the server still stops
        check("no unexpected error", False, f"{type(e).__name__}: {e}")
    finally:
        if sibling:  # the stream open now must end with the service's own UNAVAILABLE
            sibling.stopped, n = True, len(sibling.errors)
        code = server.stop()
        if sibling:
            wait_until(lambda: len(sibling.errors) > n, 3)
            end = sibling.errors[n] if len(sibling.errors) > n else None
            check("Watch ends with UNAVAILABLE when brain-ops shuts down",
                  end is not None and end[0] == grpc.StatusCode.UNAVAILABLE
                  and "shutting down" in end[1], str(end))
        check("brain-ops exits 0 on SIGTERM", code == 0, f"exit {code}")
    print(f"python sibling: {time.monotonic() - started:.1f} s, "
          f"{len(failures)} failed{': ' + ', '.join(failures) if failures else ''}")
    if failures:
        for log in sorted(f for f in os.listdir(work) if f.endswith(".log")):
            print(f"--- {log}\n" + open(os.path.join(work, log)).read()[-4000:])
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failures else 0)


def safe_mode_flow(sm, safe, audit, au, op, svc):
    code, r = call(safe.GetStatus, sm.GetStatusRequest(), svc)
    check("GetStatus: safe mode off on a fresh ledger",
          code == OK and not r.status.enabled and r.status.revision == 0, str(code))
    ask = lambda op_name, kind=sm.OPERATION_KIND_DEPLOYMENT: call(
        safe.CheckOperation, sm.CheckOperationRequest(kind=kind, operation=op_name), svc, 2)
    code, r = ask("deploy api v1")
    check("CheckOperation allowed while off", code == OK and r.allowed and r.audit_seq == 0)

    reason = "incident 42: bad bundle in production"
    code, r = call(safe.Enable, sm.EnableRequest(reason=reason), op)
    s = r.status if code == OK else None
    check("Enable as operator changes the state",
          code == OK and r.changed and s.enabled and s.revision > 0
          and s.source == sm.SAFE_MODE_SOURCE_API and s.enabled_by == OPERATOR
          and s.reason == reason and s.enabled_at.seconds > 0
          and len(s.blocked_operations) == 3, str(code))
    revision = s.revision if s else None

    code, r = ask("deploy api v2")
    check("CheckOperation refused with an answer, not an error (allowed=false, audit_seq set)",
          code == OK and not r.allowed and r.audit_seq > 0 and r.status.enabled, str(code))
    if code == OK:
        msg = r.message
        check("the refusal says what, why, by whom and how to lift it",
              all(x in msg for x in ["deploy api v2", reason, OPERATOR, "Disable"]), msg)
        code, page = call(audit.List, au.AuditServiceListRequest(after_seq=r.audit_seq - 1,
                                                                 page_size=1), op)
        rec = json.loads(page.events[0].record_json) if code == OK and page.events else {}
        check("audit_seq names the system.safe_mode_execution_blocked event",
              rec.get("event_type") == "system.safe_mode_execution_blocked"
              and rec.get("source") == SERVICE and rec.get("success") is False, str(rec)[:200])
    burst = [ask("deploy api v3") for _ in range(5)]
    check("blocked calls in the same second are aggregated (some audit_seq 0)",
          all(c == OK and not x.allowed for c, x in burst) and any(x.audit_seq == 0
                                                                  for _, x in burst))

    def counted():
        code, page = call(audit.List, au.AuditServiceListRequest(
            event_type_prefix="system.safe_mode_execution_blocked", page_size=1000), op)
        return sum(int(json.loads(e.record_json)["metadata"]["count"]) for e in page.events
                   if '"operation":"deploy api v3"' in e.record_json) if code == OK else -1
    check(f"every blocked call is counted in the ledger (counts add up to {len(burst)})",
          wait_until(lambda: counted() == len(burst), 5, 0.2) is not None,
          f"counted {counted()}")

    code, r = call(safe.Enable, sm.EnableRequest(reason="again"), op)
    check("Enable again is idempotent (changed=false, same revision)",
          code == OK and not r.changed and r.status.revision == revision, str(code))
    code, page = call(audit.List, au.AuditServiceListRequest(
        event_type_prefix="system.safe_mode_enabled"), op)
    check("the repeat appended nothing", code == OK and len(page.events) == 1)

    code, details = call(safe.Disable, sm.DisableRequest(reason="a sibling tries to thaw"), svc)
    check("service credential on Disable is PERMISSION_DENIED naming principal and RPC",
          code == grpc.StatusCode.PERMISSION_DENIED and SERVICE in details
          and "Disable" in details, f"{code}: {details}")

    def denial():
        code, page = call(audit.List, au.AuditServiceListRequest(
            event_type_prefix="system.permission_denied"), op)
        return [json.loads(e.record_json) for e in page.events] if code == OK else []
    wait_until(lambda: denial(), 3, 0.2)
    d = denial()[:1]
    check("the refused Disable is on record as CRITICAL system.permission_denied",
          bool(d) and d[0]["severity"] == "critical" and d[0]["source"] == SERVICE
          and "Disable" in d[0]["metadata"].get("rpc", ""), str(d)[:300])
    check("still frozen after the refused Disable",
          call(safe.GetStatus, sm.GetStatusRequest(), op)[1].status.enabled)
    for label, token in [("no token", None), ("an unknown token", "not-a-token")]:
        code, details = call(safe.GetStatus, sm.GetStatusRequest(), token)
        check(f"{label} is UNAUTHENTICATED", code == grpc.StatusCode.UNAUTHENTICATED, str(code))

    code, r = call(safe.Disable, sm.DisableRequest(reason="bundle rolled back"), op)
    check("Disable as operator lifts the freeze",
          code == OK and r.changed and not r.status.enabled and r.status.revision > revision)
    code, r = call(safe.Disable, sm.DisableRequest(reason="again"), op)
    check("Disable again is idempotent (changed=false)", code == OK and not r.changed)
    code, r = ask("deploy api v2")
    check("CheckOperation allowed again", code == OK and r.allowed)

    for name, method, request, field in [
        ("Enable with an empty reason", safe.Enable, sm.EnableRequest(reason=""), "reason"),
        ("CheckOperation without a kind", safe.CheckOperation,
         sm.CheckOperationRequest(operation="deploy"), "kind"),
        ("CheckOperation with a 257-char operation", safe.CheckOperation,
         sm.CheckOperationRequest(kind=sm.OPERATION_KIND_EXECUTION, operation="x" * 257),
         "operation")]:
        code, details = call(method, request, op)
        check(f"{name} is INVALID_ARGUMENT naming {field}",
              code == grpc.StatusCode.INVALID_ARGUMENT and field in details, f"{code}: {details}")


def watch_flow(sm, sm_grpc, safe, op, svc, sibling, server, status):
    t = wait_until(lambda: sibling.messages, 5)
    first = sibling.messages[0] if sibling.messages else None
    check("Watch sends the current status first, at once",
          t is not None and first[0] - sibling.call_started < HEARTBEAT_S and not first[1]
          and (first[2], first[3]) == (status.enabled, status.revision) and status.revision > 0,
          str(first))
    check("the sibling may run while safe mode is off", sibling.may_run(), sibling.view())

    revision = status.revision
    for reason, on in [("watch: freeze", True), ("watch: thaw", False)]:
        t0 = time.monotonic()
        method, request = (safe.Enable, sm.EnableRequest) if on else (safe.Disable,
                                                                       sm.DisableRequest)
        code, r = call(method, request(reason=reason), op)
        revision = r.status.revision if code == OK else None
        seen = wait_until(lambda: any(not hb and en == on and rev == revision
                                      for _, hb, en, rev in sibling.since(t0)), 2 * HEARTBEAT_S)
        check(f"Watch delivers {'Enable' if on else 'Disable'} as a change message",
              code == OK and seen is not None and sibling.may_run() != on,
              f"{seen - t0:.3f} s" if seen else str(sibling.since(t0)))

    t0 = time.monotonic()
    held = wait_until(lambda: not sibling.may_run(), BUDGET_S + 2) is None
    beats = [m for m in sibling.since(t0) if m[1]]
    gaps = [b[0] - a[0] for a, b in zip(beats, beats[1:])]
    check(f"heartbeats alone keep the sibling running past the budget ({BUDGET_S} s)", held,
          f"{len(beats)} heartbeats")
    check(f"heartbeats arrive every {HEARTBEAT_S} s and carry the status",
          len(beats) >= BUDGET_S and all(abs(g - HEARTBEAT_S) < SLACK_S for g in gaps)
          and all((en, rev) == (False, revision) for _, _, en, rev in beats),
          f"gaps {[round(g, 2) for g in gaps]}")

    # Silence on an open connection: the server is frozen, not gone.
    attempts = sibling.attempts
    server.pause()
    t_stop = time.monotonic()
    allowed, code = one_shot_allowed(sm, sm_grpc, server.grpc_addr, svc,
                                     sm.OPERATION_KIND_EXECUTION, "run job 7")
    check("one-shot CheckOperation: no answer within the deadline counts as blocked",
          not allowed and code == grpc.StatusCode.DEADLINE_EXCEEDED, str(code))
    fails_closed("SIGSTOP", sibling, t_stop)
    wait_until(lambda: sibling.attempts > attempts, 2)
    check("the stale sibling reconnects", sibling.attempts > attempts,
          f"{sibling.attempts - attempts} new attempts")
    server.proc.send_signal(signal.SIGCONT)
    recovers("SIGCONT: the sibling hears from brain-ops again and may run", sibling)

    # A dead server: the stream breaks at once, the last view ages out, a restart brings it back.
    server.proc.kill()
    server.proc.wait()
    t_kill = time.monotonic()
    allowed, code = one_shot_allowed(sm, sm_grpc, server.grpc_addr, svc,
                                     sm.OPERATION_KIND_EXECUTION, "run job 8")
    check("one-shot CheckOperation: an unreachable server counts as blocked", not allowed,
          str(code))
    fails_closed("SIGKILL", sibling, t_kill)
    server.start()
    recovers("restart on the same data and port: the sibling reconnects and may run", sibling)
    check("after the restart the sibling sees the revision it saw before",
          sibling.revision == revision, f"{sibling.revision}, before {revision}")


def fails_closed(what, sibling, t_silent):
    """The gate closes once the last message is a budget old: not before, not much after."""
    flip = wait_until(lambda: not sibling.may_run(), BUDGET_S + 2)
    after = flip - t_silent if flip else None
    check(f"{what}: the sibling fails closed at the staleness budget, not before",
          after is not None and BUDGET_S - HEARTBEAT_S - SLACK_S <= after <= BUDGET_S + SLACK_S
          and sibling.view() == "stale", f"blocked {after:.2f} s after {what}" if after else
          f"still {sibling.view()} {BUDGET_S + 2} s after {what}")


def recovers(name, sibling):
    t0 = time.monotonic()
    back = wait_until(lambda: sibling.since(t0) and sibling.may_run(), BUDGET_S + 2)
    check(name, back is not None, f"{back - t0:.2f} s" if back else sibling.view())


def audit_flow(au, ty, audit, op, svc):
    event = au.Event(event_type="factory.step_failed", triggered_by="executor-7",
                     reason="timeout after 300 s", metadata={"step": "deploy", "api_token": "s3"})
    key = "python-sibling-" + secrets.token_hex(4)
    code, first = call(audit.Record, au.RecordRequest(event=event, idempotency_key=key), svc)
    check("Record answers seq and hash", code == OK and first.seq > 0 and len(first.hash) == 64
          and not first.duplicate, str(code))
    code, again = call(audit.Record, au.RecordRequest(event=event, idempotency_key=key), svc)
    check("the same idempotency key and payload returns the same seq (duplicate=true)",
          code == OK and again.seq == first.seq and again.hash == first.hash and again.duplicate)
    other = au.Event(event_type="factory.step_failed", reason="something else")
    code, details = call(audit.Record, au.RecordRequest(event=other, idempotency_key=key), svc)
    check("the same key with another payload is ALREADY_EXISTS",
          code == grpc.StatusCode.ALREADY_EXISTS and "idempotency_key" in details, str(code))

    batch = [au.BatchRecord(event=au.Event(event_type=f"factory.python_step_{i}",
                                           mode_after=ty.OPERATION_MODE_ONLINE))
             for i in range(3)]
    code, r = call(audit.RecordBatch, au.RecordBatchRequest(records=batch), svc)
    seqs = [x.seq for x in r.results] if code == OK else []
    check("RecordBatch answers one result per record, in order",
          len(seqs) == 3 and seqs == sorted(seqs) and seqs[0] > first.seq, str(seqs))
    bad = list(batch[:1]) + [au.BatchRecord(event=au.Event(event_type="Not A Type"))]
    code, details = call(audit.RecordBatch, au.RecordBatchRequest(records=bad), svc)
    check("an invalid batch is INVALID_ARGUMENT naming records[1] and event_type",
          code == grpc.StatusCode.INVALID_ARGUMENT and "records[1]" in details
          and "event_type" in details, f"{code}: {details}")
    for name, ev, want, field in [
        ("an invalid event type", au.Event(event_type="factory"),
         grpc.StatusCode.INVALID_ARGUMENT, "event_type"),
        ("a bad metadata key", au.Event(event_type="factory.x", metadata={"Bad Key": "v"}),
         grpc.StatusCode.INVALID_ARGUMENT, "metadata"),
        ("a reserved system.* type", au.Event(event_type="system.safe_mode_disabled"),
         grpc.StatusCode.PERMISSION_DENIED, "event_type")]:
        code, details = call(audit.Record, au.RecordRequest(event=ev), svc)
        check(f"Record with {name} is {want.name} naming {field}",
              code == want and field in details, f"{code}: {details}")

    code, _ = call(audit.List, au.AuditServiceListRequest(), svc)
    check("a service may not read the ledger (PERMISSION_DENIED)",
          code == grpc.StatusCode.PERMISSION_DENIED, str(code))
    records, after = [], 0
    while True:  # page through the whole ledger, 7 at a time
        code, page = call(audit.List, au.AuditServiceListRequest(after_seq=after, page_size=7), op)
        if code != OK:
            break
        records += [(e, json.loads(e.record_json)) for e in page.events]
        if page.next_after_seq == 0:
            break
        after = page.next_after_seq
    mine = [rec for e, rec in records if e.seq == first.seq]
    check("List returns the stored record: principal as source, secrets redacted",
          code == OK and len(mine) == 1 and mine[0]["source"] == SERVICE
          and mine[0]["triggered_by"] == "executor-7" and mine[0]["severity"] == "error"
          and mine[0]["metadata"] == {"api_token": "[REDACTED]", "step": "deploy"}
          and mine[0]["idempotency_key"] == key and mine[0]["hash"] == first.hash,
          str(mine)[:300])
    check("the batch is stored with its fields",
          [rec["event_type"] for e, rec in records if e.seq in seqs]
          == [f"factory.python_step_{i}" for i in range(3)]
          and all(rec["mode_after"] == "online" for e, rec in records if e.seq in seqs))
    check("the invalid batch stored nothing",
          sum(rec["event_type"] == "factory.python_step_0" for _, rec in records) == 1)
    prev, problems = "0" * 64, []
    for i, (e, rec) in enumerate(records):
        body = {k: v for k, v in rec.items() if k != "hash"}
        digest = hashlib.sha256(canonical(body).encode()).hexdigest()
        if (e.seq, rec["prev_hash"], e.record_json, digest, e.hash) != (
                i + 1, prev, canonical(rec), rec["hash"], rec["hash"]):
            problems.append(e.seq)
        prev = rec["hash"]
    check("the chain verifies in Python too (seqs, links, JCS, SHA-256)",
          bool(records) and not problems, f"{len(records)} records, bad seqs {problems[:5]}")

    last = records[-1][0] if records else au.LedgerEvent(seq=1)
    code, v = call(audit.VerifyChain, au.VerifyChainRequest(to_seq=last.seq), op)
    check("VerifyChain: valid over what was read",
          code == OK and v.valid and v.checked == last.seq and v.first_bad_seq == 0
          and v.head_seq >= last.seq, str(code))
    code, v = call(audit.VerifyChain, au.VerifyChainRequest(), op)
    check("VerifyChain: the whole ledger is valid up to its head",
          code == OK and v.valid and v.checked == v.head_seq and len(v.head_hash) == 64)
    code, details = call(audit.VerifyChain, au.VerifyChainRequest(from_seq=5, to_seq=2), op)
    check("VerifyChain with from_seq after to_seq is INVALID_ARGUMENT naming from_seq",
          code == grpc.StatusCode.INVALID_ARGUMENT and "from_seq" in details, str(code))


if __name__ == "__main__":
    main()
