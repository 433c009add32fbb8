"""The fleet's etcd, through etcd3gw (etcd's JSON gateway, /v3/).

etcd3gw does the HTTP and the leases. Three things it does not give, and
which the fleet needs, are done here on its session: the revision a read
was made at (its get() drops the response header), transactions with their
revision, and a watch that says when its start revision has been compacted
(its watcher drops that notice and the revisions, and ends silently).
Several endpoints: a call that cannot reach one tries the next.
"""
import base64
import json
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import ConnectionFailedError, ConnectionTimeoutError, Etcd3Exception

from .errors import XdeError

DEFAULT_URL = "http://127.0.0.1:2379"


class Unavailable(XdeError):
    """No endpoint answered."""


class Compacted(XdeError):
    """A watch's start revision is older than the oldest etcd keeps."""

    def __init__(self, revision):
        super().__init__(f"revision {revision} has been compacted")
        self.revision = revision


def _b64(s):
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _unb64(s):
    return base64.b64decode(s).decode() if s else ""


def prefix_end(prefix):
    """The end of the key range holding every key that starts with prefix."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def parse_urls(urls):
    """'http://h:p,http://h2:p2' -> [(scheme, host, port)], or XdeError."""
    out = []
    for url in (u.strip() for u in urls.split(",")):
        try:
            u = urlsplit(url)
            port = u.port or 2379
        except ValueError as e:
            raise XdeError(f"etcd URL {url!r}: {e}") from None
        if u.scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/"):
            raise XdeError(f"etcd URL {url!r}: expected http://HOST:PORT (several: comma-separated)")
        out.append((u.scheme, u.hostname, port))
    return out


@dataclass(frozen=True)
class Tls:
    """How to reach etcd over https: the CA that signed its members'
    certificates (None: the system's), and this client's certificate and
    key (None: none; etcd with --client-cert-auth refuses such a client)."""
    ca: str | None = None
    cert: str | None = None
    key: str | None = None


def check_tls(urls, ca=None, cert=None, key=None):
    """The Tls for urls from the files named (all None: None), or XdeError:
    a certificate without its key, a file that cannot be read, or TLS files
    with http:// URLs (they would be ignored)."""
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise XdeError("etcd TLS: give the client certificate and its key together "
                       "(--etcd-cert, --etcd-key)")
    for what, path in (("CA", ca), ("client certificate", cert), ("client key", key)):
        if path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise XdeError(f"etcd TLS: {what} {path}: {e.strerror}") from None
    plain = [f"{s}://{h}:{p}" for s, h, p in parse_urls(urls) if s != "https"]
    if plain:
        raise XdeError(f"etcd TLS files given, but {plain[0]} is not https://: "
                       f"they would not be used")
    return Tls(ca, cert, key)


class Etcd:
    """One thread's client (a call sets its endpoint's timeout)."""

    def __init__(self, urls=DEFAULT_URL, timeout=2.0, txn_timeout=None, tls=None):
        """timeout: seconds to connect, and for an answer; txn_timeout: for a
        transaction's answer (a large one takes etcd seconds: waiting less
        sends it to the next member while the first may still make it);
        tls: a Tls (check_tls) for https:// URLs."""
        self.urls = urls
        self.timeout = timeout
        self.txn_timeout = txn_timeout or timeout
        self.tls = tls
        tls = tls or Tls()
        self.clients = [Etcd3Client(host=h, port=p, protocol=s, timeout=timeout, api_path="/v3/",
                                    cert_cert=tls.cert, cert_key=tls.key)
                        for s, h, p in parse_urls(urls)]
        # the CA with each request: requests lets REQUESTS_CA_BUNDLE win over
        # a session's own, which would silently ignore --etcd-ca
        self.verify = {"verify": tls.ca} if tls.ca else {}
        for c in self.clients:
            # etcd's "require leader": a member cut off from the others' quorum
            # refuses calls and ends its watches (the gateway passes
            # Grpc-Metadata-* on as gRPC metadata), so that we move to another
            # member instead of waiting on one that no longer hears of changes
            c.session.headers["Grpc-Metadata-hasleader"] = "true"
        self.current = 0        # the endpoint that answered last

    def _url(self, c):
        return c.base_url

    def endpoint(self):
        """The URL the next call tries first (the last that answered)."""
        return self._url(self.clients[self.current])

    def _post(self, path, body, answer_timeout=None):
        """POST to the first endpoint that answers, starting at the last one
        that did."""
        errors = []
        for i in range(len(self.clients)):
            n = (self.current + i) % len(self.clients)
            c = self.clients[n]
            try:
                out = self._ask(c, path, body, answer_timeout)
            except (ConnectionFailedError, ConnectionTimeoutError,
                    requests.RequestException, ValueError) as e:
                # (a member killed mid-answer: a cut or unreadable body)
                errors.append(f"{self._url(c)}: {_reason(e)}")
                continue
            except Etcd3Exception as e:
                raise XdeError(f"etcd: {_reason(e)}") from None
            self.current = n
            return out
        raise Unavailable("etcd unreachable (" + "; ".join(errors) + ")")

    def _ask(self, c, path, body, answer_timeout=None):
        # etcd3gw's post() takes its timeout from the client: (connect, answer)
        c.timeout = (self.timeout, answer_timeout or self.timeout)
        return c.post(c.get_url(path), json=body, **self.verify)

    def close(self):
        for c in self.clients:
            c.session.close()

    # --- reads and writes ----------------------------------------------

    def range(self, prefix, revision=None):
        """(revision, {key: (value, mod_revision)}) of every key under prefix."""
        body = {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))}
        if revision:
            body["revision"] = revision
        r = self._post("/kv/range", body)
        kvs = {_unb64(kv["key"]): (_unb64(kv.get("value")), int(kv["mod_revision"]))
               for kv in r.get("kvs", [])}
        return int(r["header"]["revision"]), kvs

    def get(self, key):
        """(value, mod_revision) of one key, or (None, 0)."""
        r = self._post("/kv/range", {"key": _b64(key)})
        kvs = r.get("kvs", [])
        return (_unb64(kvs[0].get("value")), int(kvs[0]["mod_revision"])) if kvs else (None, 0)

    def txn(self, compare, puts=(), deletes=(), lease=None):
        """One transaction: when every (key, mod_revision) of compare holds
        (0: the key is absent), put each (key, value) and delete each key.
        Returns (succeeded, revision)."""
        body = {
            "compare": [{"key": _b64(k), "result": "EQUAL", "target": "MOD",
                         "mod_revision": rev} for k, rev in compare],
            "success": [{"request_put": {"key": _b64(k), "value": _b64(v),
                                         **({"lease": lease} if lease else {})}}
                        for k, v in puts]
                       + [{"request_delete_range": {"key": _b64(k)}} for k in deletes],
        }
        r = self._post("/kv/txn", body, answer_timeout=self.txn_timeout)
        return bool(r.get("succeeded")), int(r["header"]["revision"])

    def put(self, key, value, lease=None):
        body = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = lease
        return int(self._post("/kv/put", body)["header"]["revision"])

    def delete(self, key):
        self._post("/kv/deleterange", {"key": _b64(key)})

    def compact(self, revision):
        self._post("/kv/compaction", {"revision": revision, "physical": True})

    def grant(self, ttl):
        """A new lease of ttl seconds: its id."""
        return int(self._post("/lease/grant", {"TTL": ttl, "ID": 0})["ID"])

    def keepalive(self, lease):
        """Refresh a lease: its TTL, or -1 when it has expired (etcd then
        leaves the TTL out, as etcd3gw's Lease.refresh reads it). Through
        _post, so that an endpoint that went away is not asked forever."""
        r = self._post("/lease/keepalive", {"ID": lease})
        return int(r.get("result", {}).get("TTL", -1))

    def revoke(self, lease):
        self._post("/lease/revoke", {"ID": lease})

    def status(self):
        """Every endpoint's status (or the reason it gave none)."""
        out = []
        for c in self.clients:
            try:
                s = self._ask(c, "/maintenance/status", {})
                out.append({"endpoint": self._url(c), "version": s.get("version"),
                            "db_size": int(s.get("dbSize", 0)),
                            "leader": s.get("leader") == s.get("header", {}).get("member_id"),
                            "revision": int(s["header"]["revision"])})
            except Etcd3Exception as e:
                out.append({"endpoint": self._url(c), "error": _reason(e)})
        return out

    # --- watching -------------------------------------------------------

    def watch(self, prefix, start, idle=3.0):
        """Yield (revision, events) for each change under prefix from
        revision start on, events being (key, value or None when deleted).
        The events of one transaction come together. Returns when nothing
        came for idle seconds after etcd confirmed the watch (the caller
        looks around, then watches again from where it is); raises
        Compacted, Unavailable (also when etcd did not confirm it)."""
        c = self.clients[self.current]
        body = {"create_request": {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)),
                                   "start_revision": start}}
        try:
            resp = c.session.post(c.get_url("/watch"), json=body, stream=True, **self.verify,
                                  timeout=(self.timeout, idle))
        except requests.RequestException as e:
            raise self._moved_on(f"etcd unreachable ({self._url(c)}: {_reason(e)})") from None
        created = False
        try:
            if resp.status_code != 200:
                why = _message_of(resp.text) or resp.text[:200]
                if resp.status_code < 500:
                    raise XdeError(f"etcd watch: HTTP {resp.status_code} {why}")
                raise self._moved_on(f"etcd unreachable ({self._url(c)}: {why})")  # 503: no leader
            for line in resp.iter_lines(chunk_size=None):
                if not line:
                    continue
                msg = json.loads(line)
                if "error" in msg:      # the gateway's stream to etcd broke
                    raise self._moved_on(f"etcd watch ended ({self._url(c)}: "
                                         f"{msg['error'].get('message', msg['error'])})")
                r = msg["result"]
                if int(r.get("compact_revision", 0)):
                    raise Compacted(start)
                if r.get("canceled"):
                    raise XdeError(f"etcd canceled the watch: {r.get('cancel_reason', '?')}")
                created = created or bool(r.get("created"))
                events = r.get("events", [])
                if not events:
                    continue
                out = [(_unb64(e["kv"]["key"]),
                        None if e.get("type") == "DELETE" else _unb64(e["kv"].get("value")))
                       for e in events]
                yield max(int(e["kv"]["mod_revision"]) for e in events), out
        except (requests.RequestException, ValueError) as e:
            if created and "Read timed out" in str(e):
                return      # idle: the caller's turn
            raise self._moved_on(f"etcd watch ended ({self._url(c)}: {_reason(e)})") from None
        finally:
            resp.close()
        # the stream ended: etcd went away
        raise self._moved_on(f"etcd closed the watch ({self._url(c)})")

    def _moved_on(self, why):
        """Unavailable(why), the next watch going to the next endpoint."""
        self.current = (self.current + 1) % len(self.clients)
        return Unavailable(why)


def _reason(e):
    """Why a call failed, in a few words: etcd's message when etcd answered,
    else what went wrong with the connection."""
    # etcd3gw keeps its exceptions' text in detail_text, not in args
    text = getattr(e, "detail_text", None) or str(e)
    if message := _message_of(text):
        return message
    if tls := re.search(r"SSLError\(\w+\(\d+, '(?:\[\w+: \w+\] )?(.+?)(?: \(_ssl\.c:\d+\))?'",
                        text):
        why = tls.group(1)            # e.g. certificate verify failed: ...
        if why.startswith("EOF occurred") or " alert " in why:     # etcd's refusal, TLS 1.3, 1.2
            why = "etcd ended the handshake (does it trust this client's certificate?)"
        return f"TLS: {why}"
    for known in ("Connection refused", "timed out", "No route to host", "Network is unreachable",
                  "Connection reset", "Remote end closed", "Permission denied"):
        if known.lower() in text.lower():
            return known.lower()
    return (text.strip().splitlines() or [type(e).__name__])[0][:120]


def _message_of(body):
    """The message of etcd's answer: {"message": ...} of a unary call,
    {"error": {"message": ...}} of a watch; None if it is not such."""
    try:
        doc = json.loads(body)
        return doc.get("message") or doc["error"].get("message")
    except (ValueError, AttributeError, TypeError, KeyError):
        return None
