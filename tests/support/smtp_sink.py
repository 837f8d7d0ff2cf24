#!/usr/bin/env python3
"""An SMTP server for Herald's tests, built on aiosmtpd (an implementation
that is not ours). Driven from Rust by `herald_testkit::smtp::SmtpSink`.

Usage:
    python3 smtp_sink.py --out messages.jsonl [--port 0] [--tls none|starttls|tls]
                         [--cert server.pem --key server.key]
                         [--user NAME] [--idle-timeout SECS] [--pipelining]
    The password for --user is read from the SMTP_SINK_PASSWORD variable
    (so it does not show in `ps`).

It listens on 127.0.0.1 (port 0 picks a free one) and prints one line,
`LISTENING <port>`, on stdout once it accepts connections. It exits when its
stdin closes, so it never outlives the test process that started it.

TLS modes:
    none      plain SMTP.
    starttls  advertises STARTTLS and refuses MAIL before it (530).
    tls       implicit TLS from the first byte (smtps).
With --pipelining, EHLO offers PIPELINING (RFC 2920), as Postfix and Exim
do; aiosmtpd reads commands one line at a time either way.
With --user, AUTH PLAIN and LOGIN are offered (also without TLS in `none`
mode, for tests) and MAIL without a successful AUTH gets 530; a wrong
password gets 535.

Every message whose content arrived is written to --out as one JSON line:
    {"mail_from", "rcpt_tos", "raw", "headers": [[name, value], ...],
     "text", "html", "tls", "auth_user", "peer_port", "dropped", "pipelined"}
`headers`, `text` and `html` come from Python's own `email` parser (headers
decoded, parts with their transfer encoding undone). `dropped` is true when
the sink closed the connection instead of answering (see `drop-`), i.e. the
sender cannot know whether it was accepted. `pipelined` is true when the
client had already sent more (its RCPT TO) before the sink answered MAIL FROM.

Failure modes, chosen by the recipient's local part, so one sink serves many
scenarios at once (TAG is anything, to keep addresses apart):
    tempfail-N-TAG@…    451 to the first N RCPTs of this exact address, then accept.
    tempfail-TAG@…      451 to every RCPT (a provider that always fails).
    reject-TAG@…        550 to RCPT (a permanent rejection).
    slowrcpt-MS-TAG@…   wait MS milliseconds before answering RCPT.
    slow-MS-TAG@…       wait MS milliseconds after the content arrived, before
                        the final reply to DATA (then accept).
    drop-TAG@…          close the connection after the content arrived,
                        without answering (every time).
    drop-N-TAG@…        do that the first N times for this address, then accept.
Anything else is accepted. Counters (N) live in the process.
"""

import argparse
import asyncio
import email
import email.policy
import json
import logging
import os
import re
import ssl
import sys
import warnings

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

MODE = re.compile(r"^(tempfail|reject|slowrcpt|slow|drop)-(?:(\d+)-)?")


def mode_of(address):
    """(mode, number) for an address, or (None, None)."""
    local = address.split("@", 1)[0].lower()
    m = MODE.match(local)
    if not m:
        return None, None
    mode, n = m.group(1), m.group(2)
    if mode in ("slow", "slowrcpt") and n is None:
        return None, None
    return mode, (int(n) if n is not None else None)


def parse_message(raw):
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    headers = [[k, str(v)] for k, v in msg.items()]

    def part(kind):
        body = msg.get_body(preferencelist=(kind,))
        return body.get_content() if body is not None else None

    try:
        text, html = part("plain"), part("html")
    except Exception:  # a malformed message is still recorded, raw
        text, html = None, None
    return headers, text, html


class Sink:
    def __init__(self, out, pipelining):
        self.out = out
        self.pipelining = pipelining
        self.counts = {}

    def bump(self, key):
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key]

    def record(self, server, session, envelope, dropped):
        raw = envelope.original_content or b""
        headers, text, html = parse_message(raw)
        line = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "raw": raw.decode("utf-8", errors="replace"),
            "headers": headers,
            "text": text,
            "html": html,
            # session.ssl is set by STARTTLS only; implicit TLS shows on the transport.
            "tls": session.ssl is not None or server.transport.get_extra_info("ssl_object") is not None,
            "auth_user": session.auth_data,
            "peer_port": session.peer[1] if session.peer else None,
            "dropped": dropped,
            "pipelined": getattr(envelope, "pipelined", False),
        }
        # One write per line, flushed: a reader never sees half a message.
        with open(self.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        # aiosmtpd's own EHLO handling, plus the keyword when asked for.
        session.host_name = hostname
        if self.pipelining:
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        # Bytes already read past this command were sent before its reply.
        # (aiosmtpd reads a line at a time from an asyncio StreamReader,
        # whose private buffer holds the rest.)
        envelope.pipelined = len(server._reader._buffer) > 0
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        mode, n = mode_of(address)
        if mode == "tempfail" and (n is None or self.bump(("tempfail", address)) <= n):
            return "451 4.3.0 Temporary failure, try again later"
        if mode == "reject":
            return "550 5.1.1 Mailbox unavailable"
        if mode == "slowrcpt":
            await asyncio.sleep(n / 1000)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        for address in envelope.rcpt_tos:
            mode, n = mode_of(address)
            if mode == "slow":
                await asyncio.sleep(n / 1000)
            if mode == "drop" and (n is None or self.bump(("drop", address)) <= n):
                self.record(server, session, envelope, dropped=True)
                # abort(): no flush, so the reply aiosmtpd writes next is lost.
                server.transport.abort()
                return "250 OK"
        self.record(server, session, envelope, dropped=False)
        return "250 OK"


def authenticator_for(user, password):
    def authenticate(server, session, envelope, mechanism, auth_data):
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == user.encode()
            and auth_data.password == password.encode()
        )
        # auth_data becomes session.auth_data: the user name, never the password.
        return AuthResult(success=ok, handled=False, auth_data=user if ok else None)

    return authenticate


async def main():
    p = argparse.ArgumentParser(description="SMTP sink for Herald's tests")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--tls", choices=("none", "starttls", "tls"), default="none")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--user")
    p.add_argument("--idle-timeout", type=float, default=300)
    p.add_argument("--pipelining", action="store_true")
    args = p.parse_args()
    # aiosmtpd warns about AUTH without TLS (wanted here) and its own deprecations.
    warnings.simplefilter("ignore")
    logging.getLogger("mail.log").setLevel(logging.ERROR)

    ctx = None
    if args.tls != "none":
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.cert, args.key)

    kwargs = {
        "hostname": "sink.herald.test",
        "timeout": args.idle_timeout,
        "enable_SMTPUTF8": True,
    }
    if args.tls == "starttls":
        kwargs.update(tls_context=ctx, require_starttls=True)
    if args.user:
        kwargs.update(
            authenticator=authenticator_for(args.user, os.environ.get("SMTP_SINK_PASSWORD", "")),
            auth_required=True,
            # With STARTTLS, AUTH only after it. aiosmtpd does not count
            # implicit TLS as TLS, and `none` mode allows AUTH in clear for tests.
            auth_require_tls=args.tls == "starttls",
        )

    sink = Sink(args.out, args.pipelining)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(sink, loop=loop, **kwargs),
        host="127.0.0.1",
        port=args.port,
        ssl=ctx if args.tls == "tls" else None,
    )
    port = server.sockets[0].getsockname()[1]
    print(f"LISTENING {port}", flush=True)

    stop = loop.create_future()

    def on_stdin():
        if not os.read(sys.stdin.fileno(), 4096) and not stop.done():
            stop.set_result(None)

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    await stop
    server.close()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
