"""quality-governance-platform, in miniature: the fleet lab's sample service.

Serves /healthz (200 while the process serves) and /readyz (200 only when the .env settings
are valid and the database schema revision equals the one this release expects; otherwise 503
with the reason), and two endpoints of its critical functionality that the agents' smoke checks
call: /api/incidents (JSON, answered after the release's `api_delay_ms`, default 20) and
/api/reports (JSON status "ok" only while FEATURE_REPORTS=on). A release whose release.json sets
`crash_after_s` exits with an error that long after it starts (a crash loop under systemd). Reads release.json (which this release's code is) and .env (its settings)
from its own directory at startup, so a changed checkout or .env needs a restart, as in the
runbook. Python stdlib + psycopg2 only.
"""

import http.server
import json
import logging
import os
import sys
import threading
import time

import psycopg2

APP_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PORT = 8000
DEFAULT_LOG = "/var/log/app/app.log"


def load_release():
    with open(os.path.join(APP_DIR, "release.json"), encoding="utf-8") as f:
        return json.load(f)


def parse_env(path):
    """Returns (settings, problems) for a KEY=VALUE file; '#' starts a comment line."""
    settings, problems = {}, []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        return settings, ["cannot read %s: %s" % (path, e.strerror)]
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            problems.append(".env line %d is not KEY=VALUE" % number)
            continue
        settings[key.strip()] = value.strip()
    return settings, problems


def validate(settings, release):
    problems = []
    for key in release["required_settings"]:
        if not settings.get(key):
            problems.append("setting %s is missing or empty" % key)
    url = settings.get("DATABASE_URL", "")
    if url and not url.startswith("postgresql://"):
        problems.append("setting DATABASE_URL must start with postgresql://")
    port = settings.get("APP_PORT", "")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        problems.append("setting APP_PORT is not a port number: %r" % port)
    for key, value in settings.items():
        if key.startswith("FEATURE_") and value not in ("on", "off"):
            problems.append("setting %s must be on or off, not %r" % (key, value))
    return problems


def schema_revision(url):
    conn = psycopg2.connect(url, connect_timeout=3)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT version_num FROM alembic_version")
            rows = cur.fetchall()
    finally:
        conn.close()
    return rows[0][0] if rows else None


class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 1024
    daemon_threads = True
    allow_reuse_address = True


def make_handler(release, settings, problems):
    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "qgp-lab/" + release["release"]

        def log_message(self, fmt, *args):
            logging.info("%s %s", self.client_address[0], fmt % args)

        def reply(self, status, body):
            data = (body + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                self.reply(200, "ok release=%s" % release["release"])
            elif path == "/readyz":
                self.reply(*self.readiness())
            elif path == "/version":
                self.reply(200, json.dumps(release, sort_keys=True))
            elif path == "/api/incidents":
                time.sleep(release.get("api_delay_ms", 20) / 1000.0)
                self.reply(200, json.dumps({"status": "ok", "incidents": []}))
            elif path == "/api/reports":
                if settings.get("FEATURE_REPORTS") == "on":
                    self.reply(200, json.dumps({"status": "ok", "reports": []}))
                else:
                    self.reply(503, json.dumps({"status": "disabled"}))
            else:
                self.reply(404, "not found")

        def readiness(self):
            if problems:
                return 503, "not ready: config: " + "; ".join(problems)
            expected = release["schema_revision"]
            try:
                actual = schema_revision(settings["DATABASE_URL"])
            except Exception as e:  # any database failure means not ready
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                return 503, "not ready: database: %s" % reason
            if actual != expected:
                return 503, "not ready: schema revision is %s, release %s expects %s" % (
                    actual, release["release"], expected)
            return 200, "ready release=%s schema=%s" % (release["release"], actual)

    return Handler


def main():
    release = load_release()
    settings, problems = parse_env(os.path.join(APP_DIR, ".env"))
    problems += validate(settings, release)
    log_path = settings.get("APP_LOG") or DEFAULT_LOG
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    logging.basicConfig(filename=log_path, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    port_text = settings.get("APP_PORT", "")
    port = int(port_text) if port_text.isdigit() and 0 < int(port_text) < 65536 else DEFAULT_PORT
    logging.info("starting release %s (expects schema %s) on port %d",
                 release["release"], release["schema_revision"], port)
    for problem in problems:
        logging.error("config: %s", problem)
    crash_after = release.get("crash_after_s")
    if crash_after:
        # A release that crash-loops: it serves for a moment, then dies (systemd restarts it).
        def crash():
            logging.error("crash: release %s hit a fatal error after %ss", release["release"], crash_after)
            logging.shutdown()
            os._exit(1)

        threading.Timer(float(crash_after), crash).start()
    server = Server(("0.0.0.0", port), make_handler(release, settings, problems))
    try:
        server.serve_forever()
    finally:
        logging.info("stopping release %s", release["release"])


if __name__ == "__main__":
    sys.exit(main())
