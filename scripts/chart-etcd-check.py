"""Runs the etcd members the chart renders (etcd.deploy=true) as real etcd processes on this
machine and checks that they form one cluster: the rendered command line, flag for flag, with
what Kubernetes provides substituted — $(POD_NAME), and each member's DNS name resolving to its
own address (here 127.0.0.1 with a port of its own, as a pod IP with the same port would be).

usage: chart-etcd-check.py RENDERED.yaml
"""
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import yaml


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
sts = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["labels"].get("app.kubernetes.io/component") == "etcd")
name = sts["metadata"]["name"]
members = [f"{name}-{i}" for i in range(sts["spec"]["replicas"])]
container = sts["spec"]["template"]["spec"]["containers"][0]
command = container["command"]
assert command[0] == "etcd", command
ports = {(m, p): free_port() for m in members for p in (2379, 2380)}
work = tempfile.mkdtemp()
procs = []


def fail(message):
    for m in members:
        try:
            tail = open(f"{work}/{m}.log").read().splitlines()[-5:]
        except OSError:
            tail = []
        print(f"--- {m}:\n" + "\n".join(tail), file=sys.stderr)
    sys.exit(message)


try:
    for m in members:
        args = []
        for a in command:
            a = a.replace("$(POD_NAME)", m)
            # A member's DNS name and port: its own address.
            a = re.sub(r"http://(%s-\d+)\.[a-z0-9.-]+:(2379|2380)" % re.escape(name),
                       lambda g: f"http://127.0.0.1:{ports[(g.group(1), int(g.group(2)))]}", a)
            a = re.sub(r"0\.0\.0\.0:(2379|2380)", lambda g: f"127.0.0.1:{ports[(m, int(g.group(1)))]}", a)
            a = a.replace("/var/lib/etcd", f"{work}/{m}")
            args.append(a)
        log = open(f"{work}/{m}.log", "w")
        procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT))
    probe = container["readinessProbe"]["httpGet"]
    deadline = time.time() + 30
    for m in members:
        url = f"http://127.0.0.1:{ports[(m, probe['port'])]}{probe['path']}"
        while True:
            try:
                body = json.load(urllib.request.urlopen(url, timeout=2))
                if body.get("health") == "true":
                    break
            except Exception:
                pass
            for p in procs:
                if p.poll() is not None:
                    fail(f"an etcd member exited ({p.returncode})")
            if time.time() > deadline:
                fail(f"{m} not healthy at {url} within 30 s")
            time.sleep(0.3)
    # The liveness probe answers too.
    live = container["livenessProbe"]["httpGet"]
    for m in members:
        url = f"http://127.0.0.1:{ports[(m, live['port'])]}{live['path']}"
        if json.load(urllib.request.urlopen(url, timeout=2)).get("health") != "true":
            fail(f"{m}: liveness probe {url} not healthy")
    # One cluster of every member.
    req = urllib.request.Request(f"http://127.0.0.1:{ports[(members[0], 2379)]}/v3/cluster/member/list",
                                 data=b"{}", method="POST")
    listed = json.load(urllib.request.urlopen(req, timeout=5))["members"]
    assert sorted(x["name"] for x in listed) == members, listed
    print(f"chart etcd OK: {len(members)} member(s) formed one cluster")
finally:
    for p in procs:
        p.kill()
        p.wait()
    subprocess.run(["rm", "-rf", work])
