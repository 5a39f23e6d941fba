#!/usr/bin/env python3
"""Runs the walkthrough steps of the README and of docs/INCIDENT_SIMULATION.md against a live
`brain-ops serve` and checks every output.

Steps run in one scratch directory, in order, each in its own bash; a step that starts a
background server writes its pid to `<name>.pid` there, and the server is stopped at the end.
The README marks each step as a fenced block whose info string is `sh walkthrough`, followed by
a fenced block (`json` or `text`) holding the expected output. In expected output, `<hash>`
matches 64 hex digits, `<time>` an RFC 3339 UTC time, `<n>` a whole number, `<any>` anything;
JSON outputs are compared as JSON. Exits non-zero on the first step whose output differs.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLACEHOLDERS = {
    "<hash>": r"[0-9a-f]{64}",
    "<time>": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z",
    "<n>": r"\d+",
    "<any>": r".*",
}


def steps(readme):
    blocks = re.findall(r"^```([^\n]*)\n(.*?)^```", readme, re.S | re.M)
    for i, (info, body) in enumerate(blocks):
        if info.strip() == "sh walkthrough":
            if i + 1 >= len(blocks) or blocks[i + 1][0].strip() not in ("json", "text"):
                sys.exit(f"walkthrough step without an expected output block:\n{body}")
            yield body, blocks[i + 1][0].strip(), blocks[i + 1][1]


def pattern(text):
    out = ""
    for part in re.split(r"(<hash>|<time>|<n>|<any>)", text):
        out += PLACEHOLDERS.get(part, re.escape(part))
    return re.compile(out + r"\Z", re.S)


def matches(expected, actual):
    if isinstance(expected, str):
        return isinstance(actual, str) and pattern(expected).match(actual) is not None
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and expected.keys() == actual.keys()
            and all(matches(expected[k], actual[k]) for k in expected)
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(expected) == len(actual)
            and all(matches(e, a) for e, a in zip(expected, actual))
        )
    return expected == actual


def json_documents(text):
    """Parses one or more concatenated JSON documents (grpcurl prints one per message)."""
    decoder, docs, i = json.JSONDecoder(), [], 0
    text = text.strip()
    while i < len(text):
        doc, end = decoder.raw_decode(text, i)
        docs.append(doc)
        i = end
        while i < len(text) and text[i].isspace():
            i += 1
    return docs


def check(command, kind, expected, actual):
    if kind == "json":
        try:
            ok = matches(json_documents(expected), json_documents(actual))
        except json.JSONDecodeError:
            ok = False
    else:
        lines = lambda t: [l.rstrip() for l in t.strip().splitlines()]
        exp, act = lines(expected), lines(actual)
        ok = len(exp) == len(act) and all(pattern(e).match(a) for e, a in zip(exp, act))
    if not ok:
        print(f"FAILED: {command.strip()}\n--- expected\n{expected}\n--- actual\n{actual}")
        sys.exit(1)


def main():
    binary_dir = os.environ.get("BRAIN_OPS_BIN_DIR") or os.path.join(ROOT, "target", "debug")
    if not os.path.exists(os.path.join(binary_dir, "brain-ops")):
        sys.exit(f"build brain-ops first: no binary in {binary_dir}")
    if shutil.which("grpcurl") is None:
        sys.exit("grpcurl is not on PATH")
    data = tempfile.mkdtemp(prefix="brain-ops-walkthrough-")
    env = dict(os.environ, PATH=binary_dir + os.pathsep + os.environ["PATH"])
    env["BRAIN_DATA_DIR"] = os.path.join(data, "data")
    for key in [k for k in env if k.startswith("BRAIN_") and k != "BRAIN_DATA_DIR"]:
        del env[key]
    log = open(os.path.join(data, "serve.log"), "w")
    server = subprocess.Popen(["brain-ops", "serve"], env=env, stdout=log, stderr=log, cwd=data)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen("http://127.0.0.1:9464/readyz", timeout=1)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    log.close()
                    sys.exit("brain-ops did not become ready:\n" + open(log.name).read())
                time.sleep(0.1)
        # docs/EVIDENCE.md's offline verifier is a file the walkthrough runs.
        evidence = open(os.path.join(ROOT, "docs", "EVIDENCE.md")).read()
        for name, body in re.findall(r"^```python ([\w.]+)\n(.*?)^```", evidence, re.S | re.M):
            open(os.path.join(data, name), "w").write(body)
        count = 0
        # The README's steps, then the recovery steps and drills of the incident scenarios.
        for document in ["README.md", os.path.join("docs", "INCIDENT_SIMULATION.md")]:
            text = open(os.path.join(ROOT, document)).read()
            for command, kind, expected in steps(text):
                result = subprocess.run(
                    ["bash", "-c", command], env=env, cwd=data, capture_output=True, text=True,
                    timeout=180,
                )
                check(command, kind, expected, result.stdout + result.stderr)
                count += 1
        if count == 0:
            sys.exit("the documents have no walkthrough steps")
        # The live scrape, after the walkthrough has exercised the service, must lint clean.
        if shutil.which("promtool"):
            scrape = urllib.request.urlopen("http://127.0.0.1:9464/metrics", timeout=5).read()
            lint = subprocess.run(["promtool", "check", "metrics"], input=scrape, capture_output=True)
            if lint.returncode != 0:
                sys.exit("promtool check metrics failed:\n" + (lint.stdout + lint.stderr).decode())
            print("promtool check metrics: the live scrape is clean")
        elif os.environ.get("CI"):
            sys.exit("promtool is not installed")
        print(f"walkthrough: {count} passed, 0 failed")
    finally:
        # Servers a step started in the background leave their pid in <name>.pid.
        for name in os.listdir(data):
            if name.endswith(".pid"):
                try:
                    os.kill(int(open(os.path.join(data, name)).read().strip()), signal.SIGTERM)
                except (ValueError, ProcessLookupError):
                    pass
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
        if code != 0:
            print(open(log.name).read())
            sys.exit(f"brain-ops exited {code} on SIGTERM")
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
