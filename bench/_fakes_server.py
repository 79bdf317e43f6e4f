"""The provider fakes (tests/fakes) as a process of their own, for the benchmarks.

    python bench/_fakes_server.py --only twilio --dir /tmp/x --latency 0.1-0.3

Starts the named fakes (twilio, sendgrid, fcm; default all three) on free ports of 127.0.0.1, prints one
JSON line with their base URLs and credentials (FCM's service-account file is written into ``--dir``),
then serves until SIGTERM/SIGINT or stdin closes, and prints a second JSON line: per fake, the messages
accepted, the requests refused (with the first few reasons), the most requests it held at once
(``max_in_flight``) and any bug in the fake itself.

``--latency``: each valid send request waits this long before it is answered, as a provider's API does:
``0`` (default: at once), ``0.2`` (always 200 ms) or ``0.1-0.3`` (uniform between 100 and 300 ms).

The benchmarks run each fake in its own process, apart from the workers, so a fake's request handling
(Twilio's and SendGrid's fakes validate every request against the providers' OpenAPI documents) never
takes the GIL from a worker; they still share the machine's cores, which the benchmarks account for.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

sys.path.insert(0, str(ROOT / "bench"))

from _harness import format_latency, parse_latency  # noqa: E402
from fakes import FcmFake, SendGridFake, TwilioFake  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="twilio,sendgrid,fcm", help="comma-separated: twilio, sendgrid, fcm")
    parser.add_argument("--dir", type=Path, required=True, help="where FCM's service-account file goes")
    parser.add_argument("--latency", type=parse_latency, default=(0.0, 0.0),
                        help="seconds each valid send request waits before its answer: 0, 0.2 or 0.1-0.3 (uniform)")
    args = parser.parse_args()
    wanted = [name.strip() for name in args.only.split(",") if name.strip()]
    fakes, info = {}, {"pid": os.getpid()}
    for name in wanted:
        if name == "twilio":
            fake = TwilioFake(latency=args.latency).start()
            info[name] = {"base_url": fake.base_url, "account_sid": fake.account_sid, "auth_token": fake.auth_token,
                          "messaging_service_sid": fake.messaging_service_sid}
        elif name == "sendgrid":
            fake = SendGridFake(latency=args.latency).start()
            info[name] = {"base_url": fake.base_url, "api_key": fake.api_key}
        elif name == "fcm":
            fake = FcmFake(project_id="remind-bench", latency=args.latency).start()
            path = fake.write_credentials(args.dir / f"fcm-{os.getpid()}.json")
            info[name] = {"base_url": fake.base_url, "project_id": fake.project_id, "credentials_file": str(path)}
        else:
            parser.error(f"unknown fake {name!r}")
        info[name]["latency"] = format_latency(fake.latency)
        fakes[name] = fake
    print(json.dumps(info), flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def stdin_closed() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=stdin_closed, daemon=True).start()
    stop.wait()
    summary = {}
    for name, fake in fakes.items():
        summary[name] = {"messages": len(fake.messages), "requests": fake.requests, "rejected": len(fake.rejected),
                         "rejected_first": [list(r) for r in fake.rejected[:3]], "errors": fake.errors[:3],
                         "max_in_flight": fake.max_in_flight, "latency": format_latency(fake.latency)}
        fake.stop()
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
