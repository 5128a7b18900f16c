#!/usr/bin/env python3
"""Where a message's time goes on the AWS-shaped stack, stage by stage.

Reads the function log lines the Lambda emulator prints with TEST_LOG (each with the time it
arrived and its environment, as CloudWatch keeps them), and prints, for the messages of a
one-conversation run, the median of each stage from the message route's step to the first
chunk's post:

    TEST_LOG="info,sqlx::query=debug,aws_smithy_runtime::client::orchestrator=debug" \
        infra/local/aws-sim.sh bench --only 1 2> stack.log
    infra/local/timeline.py stack.log

A statement's log line comes when it ends and carries its elapsed time; an SDK call's
"resolving endpoint" line marks its start (with the endpoint's port: the first one the message
route calls is the management API, the other SQS) and "exiting attempt loop" its end.
"""
import json
import re
import statistics
import sys

LINE = re.compile(r"(\d+\.\d+) (\S+)/\d+ (\{.*)")


def events(path):
    """(time in ms, function, request id, kind, detail) for the lines that matter."""
    for line in open(path, errors="replace"):
        m = LINE.match(line)
        if not m:
            continue
        try:
            entry = json.loads(m.group(3))
        except ValueError:
            continue
        request = next(
            (s["requestId"] for s in entry.get("spans") or [] if "requestId" in s), None
        )
        if request is None:
            continue
        t, function, fields = float(m.group(1)) * 1000, m.group(2), entry.get("fields", {})
        if "elapsed_secs" in fields:
            call = re.search(r"from (\w+)\(", fields.get("db.statement", ""))
            if call:
                yield t, function, request, "sql", (call.group(1), fields["elapsed_secs"] * 1000)
        elif "endpoint_params" in fields:
            port = re.search(r'endpoint: Some\(\\?"http://[^:]+:(\d+)', fields["endpoint_params"])
            yield t, function, request, "call", port.group(1) if port else "?"
        elif fields.get("message", "").startswith("a retry is either"):
            yield t, function, request, "called", None


def main(path):
    invocations = {}
    for t, function, request, kind, detail in events(path):
        invocations.setdefault((function, request), []).append((t, kind, detail))
    routes = [e for (f, _), e in invocations.items() if f == "ws-message"]
    jobs = sorted(
        (e for (f, _), e in invocations.items() if f == "orchestrator"), key=lambda e: e[0][0]
    )
    stages = {}

    def add(name, ms):
        stages.setdefault(name, []).append(ms)

    for route in routes:
        accepted = next((e for e in route if e[1] == "sql" and e[2][0] == "accept_message"), None)
        calls = [e for e in route if e[1] == "call"]
        ends = [e for e in route if e[1] == "called"]
        if not accepted or len(calls) < 2 or len(ends) < 2:
            continue
        management = calls[0][2]
        typing_start, typing_end = calls[0][0], ends[0][0]
        sqs = next(e for e in calls if e[2] != management)
        # The SQS call ends last or first among the two after typing: take the end after it.
        sqs_end = min((e[0] for e in ends[1:] if e[0] >= sqs[0]), default=None)
        job = next((j for j in jobs if j[0][0] > sqs[0]), None)
        if sqs_end is None or job is None:
            continue
        read = next((e for e in job if e[1] == "sql" and e[2][0] == "job_context"), None)
        write = next((e for e in job if e[1] == "sql" and e[2][0] == "write_reply"), None)
        if not read or not write:
            continue
        post = next((e for e in job if e[1] == "call" and e[0] >= write[0]), None)
        posted = next((e for e in job if e[1] == "called" and post and e[0] >= post[0]), None)
        if not posted:
            continue
        add("1 accept_message (one round trip)", accepted[2][1])
        add("2 accepted -> typing post sent", typing_start - accepted[0])
        add("3 typing post, answered", typing_end - typing_start)
        add("4 -> SQS send sent", sqs[0] - typing_end)
        add("5 SQS send, answered (moto)", sqs_end - sqs[0])
        add("6 sent -> job_context starts (event source, Lambda invoke)", read[0] - read[2][1] - sqs[0])
        add("7 job_context (one round trip)", read[2][1])
        add("8 -> write_reply starts (the model's first piece)", write[0] - write[2][1] - read[0])
        add("9 write_reply (one round trip)", write[2][1])
        add("10 -> first chunk posted", post[0] - write[0])
        add("11 first chunk post, answered", posted[0] - post[0])
    if not stages:
        sys.exit("no complete message found: run with TEST_LOG as the docstring says")
    count = len(next(iter(stages.values())))
    print(f"median over {count} messages, ms (from the functions' clock; the client's legs are not here)")
    for name in sorted(stages, key=lambda n: int(n.split()[0])):
        print(f"  {statistics.median(stages[name]):7.1f}  {name}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/dev/stdin")
