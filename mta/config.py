"""The engine's configuration: one typed place, loaded from TOML.

Every section is a dataclass; the loader checks each key against the field's
type and refuses unknown keys, so a typo never passes silently. Errors are
`ConfigError` with one line naming the key.

Which file: `--config`, else $MTA_CONFIG, else the first of ./config/mta.toml and
/etc/mta/mta.toml that exists (`find_config`), for every command. One rule for paths:
a relative path in the file (or a default one) is relative to the file's directory.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import string
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class ConfigError(Exception):
    """A bad configuration; str() is one line naming the problem."""


class StartupError(Exception):
    """The engine cannot start for a reason outside its config (an address taken by
    another process); str() is one line naming it."""


PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_SHAPING = str(PROJECT_ROOT / "config" / "shaping.toml")
CONFIG_ENV = "MTA_CONFIG"
CONFIG_SEARCH = ("config/mta.toml", "/etc/mta/mta.toml")


def find_config(explicit: str | None = None) -> Path:
    """The config file to use: `explicit` (--config), else $MTA_CONFIG, else the first
    of CONFIG_SEARCH that exists; ConfigError when there is none."""
    chosen = explicit or os.environ.get(CONFIG_ENV)
    if chosen:
        return Path(chosen)
    for candidate in map(Path, CONFIG_SEARCH):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"no config file: pass --config, set {CONFIG_ENV}, or create "
                      f"{' or '.join(CONFIG_SEARCH)}")


def path_setting(default: str) -> Any:
    """A file or directory setting: relative to the config file's directory."""
    return field(default=default, metadata={"path": True})


def resolve_paths(section: Any, base: Path) -> None:
    """Make every relative path setting of `section`, and of the sections in it,
    relative to `base` (the config file's directory)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if f.metadata.get("path") and value and not os.path.isabs(value):
            setattr(section, f.name, os.path.normpath(base / value))
        items = value.values() if isinstance(value, dict) else (
            value if isinstance(value, list) else [value])
        for item in items:
            if dataclasses.is_dataclass(item) and not isinstance(item, type):
                resolve_paths(item, base)


def parse_hostport(value: str, default_port: int | None = None) -> tuple[str, int]:
    """'127.0.0.1:2525' -> ('127.0.0.1', 2525); '[::1]:25' -> ('::1', 25)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        if default_port is None:
            raise ValueError(f"{value!r} is not HOST:PORT")
        return value.strip("[]"), default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} has no valid port")
    return host.strip("[]"), int(port)


def check_bindable(key: str, address: str) -> None:
    """A startup check: nothing listens on `address` ("HOST:PORT", the value of `key`),
    not even with SO_REUSEPORT (another engine); else one StartupError line."""
    host, port = parse_hostport(address)
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no listener
    try:
        probe.bind((host, port))
    except OSError as exc:
        raise StartupError(f"cannot listen on {address} ({key}): {exc.strerror}") from None
    finally:
        probe.close()


@dataclass
class EngineConfig:
    workers: int = 0  # 0: one per core
    # 0: every worker accepts and delivers. N: the `workers` only accept and N more
    # processes only deliver, so that delivery never holds up a 250 (as Postfix's smtpd
    # and smtp are separate processes); "idle": their event loops run under SCHED_IDLE.
    delivery_workers: int = 0
    delivery_priority: str = "idle"  # idle | normal
    hostname: str = "mta.localhost"
    # Mail for postmaster (and `local_mailboxes`) at the engine's own names goes here;
    # empty: it stays on the engine, handled as mail to the [bounce] domain.
    operator_address: str = ""
    local_mailboxes: list[str] = field(default_factory=lambda: ["abuse"])
    event_log: str = path_setting("./var/events.jsonl")
    audit_log: str = path_setting("./var/audit.jsonl")
    log_level: str = "info"


@dataclass
class SmtpConfig:
    listen: str = "127.0.0.1:2525"
    trusted_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    trusted_account: str = "default"
    local_domains: list[str] = field(default_factory=list)
    max_message_size: int = 26_214_400
    max_recipients: int = 1000
    max_command_line: int = 2048
    idle_timeout: float = 300.0
    data_timeout: float = 600.0
    commit_timeout: float = 60.0
    max_connections: int = 10_000
    max_connections_per_ip: int = 200
    max_unknown_commands: int = 5
    max_errors: int = 20  # error replies to an untrusted, unauthenticated session; 0: no limit
    max_junk_commands: int = 100  # NOOP, RSET, HELP, ... of such a session; 0: no limit
    greet_pause: float = 1.0  # untrusted clients that talk before the 220 get 554; 0: off
    max_auth_failures: int = 5
    auth_failure_window: float = 300.0
    tls_cert: str = path_setting("")
    tls_key: str = path_setting("")
    campaign_header: str = "X-Campaign-ID"
    send_at_header: str = "X-Send-At"  # RFC 3339 or Unix seconds: not attempted before; removed
    lane_header: str = "X-MTA-Lane"  # transactional | bulk (for accounts allowed it); removed


@dataclass
class SpoolConfig:
    path: str = path_setting("./var/spool")
    map_size: int = 8 * 1024**3
    min_free_disk: int = 256 * 1024**2
    max_map_use: float = 0.95
    max_batch: int = 512


@dataclass
class HttpConfig:
    listen: str = "127.0.0.1:8025"
    admin_token: str = ""
    public_url: str = "http://127.0.0.1:8025"
    enabled: bool = True  # false: no HTTP listener at all (metrics are still recorded)
    operator_tokens: dict[str, str] = field(default_factory=dict)  # operator name -> token
    metrics_dir: str = path_setting("")  # prometheus multiprocess files; empty: a fresh temporary dir
    sample_interval: float = 1.0  # live gauges (connections, in flight) sampled this often
    queue_sample_interval: float = 2.0  # queue depth recomputed at most this often
    max_auth_failures: int = 10  # bad admin tokens per client address within the window: 429
    auth_failure_window: float = 60.0


@dataclass
class DnsConfig:
    nameservers: list[str] = field(default_factory=list)
    timeout: float = 5.0
    max_cname_depth: int = 8
    cache_size: int = 100_000
    negative_ttl_max: float = 3600.0
    dnssec_validating: bool = False  # the nameservers validate DNSSEC: their AD flag is trusted (DANE)


TLS_MODES = ("opportunistic", "opportunistic-insecure", "required", "required-insecure",
             "disabled")  # mta.delivery.tls.model.TlsMode


@dataclass
class DomainDeliveryConfig:
    tls: str = "opportunistic"  # one of TLS_MODES; no DANE or MTA-STS for this domain


@dataclass
class DeliveryConfig:
    enabled: bool = True  # false: accept and spool only (an intake-only node)
    port: int = 25
    allow_loopback_mx: bool = False
    source_address: str = ""
    max_mx_addresses: int = 5
    max_connections_per_destination: int = 20
    max_concurrent_deliveries: int = 2000
    transactional_slots: int = 100  # of max_concurrent_deliveries, kept free of bulk mail
    bulk_min_share: float = 0.2  # of a destination's sends, kept for bulk while both wait
    # While intake keeps a worker CPU-bound, bulk delivery takes no new work for this long
    # (0: never yields), then works for deliver_between_yields (mta.queue.intake_first).
    yield_to_intake: float = 4.0
    deliver_between_yields: float = 1.0
    connection_idle_timeout: float = 30.0
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    retry_initial: float = 300.0
    retry_max: float = 14_400.0
    retry_jitter: float = 0.1
    max_age: float = 432_000.0
    helo_name: str = ""
    line_length_limit: int = 998  # longer lines are broken before signing; 0: sent as they are
    domains: dict[str, DomainDeliveryConfig] = field(default_factory=dict)
    tls: str = "opportunistic"  # the TLS mode of every other domain (TLS_MODES)
    tls_ca_file: str = ""  # PEM CA certificates trusted besides (or instead of) the system's
    tls_system_ca: bool = True  # false: trust only tls_ca_file
    tls_min_version: str = "TLSv1.2"  # or "TLSv1.3"
    mta_sts: bool = True  # honour MTA-STS policies (RFC 8461)
    mta_sts_fetch_timeout: float = 10.0
    mta_sts_port: int = 443  # the policy servers' HTTPS port (443; tests use another)
    dane: bool = True  # honour DANE TLSA records (RFC 7672); needs [dns] dnssec_validating
    tls_policy_cache: float = 60.0  # seconds a domain's TLS policy is reused before a new look


@dataclass
class DkimKeyConfig:
    domain: str
    selector: str
    key_file: str = field(metadata={"path": True})
    algorithm: str = "rsa-sha256"  # or "ed25519-sha256"


@dataclass
class DkimConfig:
    keys: list[DkimKeyConfig] = field(default_factory=list)
    fallback_domain: str = ""  # sign for this domain when the From: domain has no key
    headers: list[str] = field(default_factory=list)  # empty: the built-in default list
    expiration: float = 0.0  # seconds until x=; 0: no x= tag


@dataclass
class BounceConfig:
    domain: str = "bounces.mta.localhost"  # VERP return paths and the unsubscribe mailto
    fbl_domain: str = ""  # feedback-loop reports arrive here; empty: same as domain
    verp: bool = True  # outgoing mail gets a VERP return path on `domain`
    verp_prefix: str = "b"
    verp_secret: str = ""  # HMAC key of VERP tokens; empty: a random key kept in the spool
    unparsed_dir: str = path_setting("./var/unparsed")  # reports the parser could not read, for an operator
    unparsed_quota: int = 100 * 1024**2  # bytes kept there at most; past it, not kept
    max_report_size: int = 1024**2  # mail from unauthenticated clients to the engine's domains
    # Networks of feedback loops whose complaints count without a token of ours.
    feedback_sources: list[str] = field(default_factory=list)
    cfbl: bool = True  # campaign mail carries CFBL-Address and CFBL-Feedback-ID (RFC 9477)


@dataclass
class ThrottleConfig:
    shaping_file: str = path_setting(SHIPPED_SHAPING)  # default: the one the engine ships
    state_file: str = path_setting("")  # empty: inside the spool environment


@dataclass
class PolicyConfig:
    """The service contract the policy guard enforces (rates in percent)."""

    enabled: bool = True
    hard_bounce_rate: float = 8.0  # % of a campaign's sent mail; pause at or above (8-15)
    complaint_rate: float = 0.5  # % of its delivered mail; pause above
    unsubscribe_rate: float = 1.0  # % of its delivered mail; pause above
    min_volume: int = 200  # sent mail before a campaign's rates are judged
    trial_limit: int = 100  # e-mails (recipients) a trial account may send in all
    monthly_cap_factor: int = 109  # monthly cap = this x subscriber_level (level 0: no cap)
    footer_text: str = "Email Marketing by MTA"  # added for accounts not on the pro plan
    footer_html: str = ""  # empty: footer_text, HTML-escaped, in a <p>
    unsubscribe_path: str = "/unsubscribe/"  # one-click links: [http] public_url + this + token
    unsubscribe_placeholder: str = "{{unsubscribe_url}}"  # replaced by the link in the body
    unsubscribe_label: str = "Unsubscribe"  # text of the visible link appended to the footer
    unsubscribe_mailbox: str = "unsubscribe"  # mailto local part on [bounce] domain
    unsubscribe_secret: str = ""  # HMAC key of the links; empty: a random key kept in the spool
    notice_from: str = ""  # From: of notices to accounts; empty: postmaster@[engine] hostname
    retention_days: float = 92.0  # a deleted account's data is purged after this (3 months)
    cache_ttl: float = 0.5  # seconds a worker trusts its copy of pauses and suspensions (<= 1)
    flush_interval: float = 0.1  # seconds between batched counter writes


@dataclass
class ClusterConfig:
    """Several engine nodes sharing throttles and policy state through Redis."""

    redis: str = ""  # "redis://HOST:PORT/DB"; empty: single node, everything in LMDB
    node: str = ""  # this node's name among the nodes; empty: hostname:SMTP port
    key_prefix: str = "mta:"  # every key the engine writes starts with this
    timeout: float = 0.5  # seconds a Redis call may take before the node goes local
    retry_interval: float = 1.0  # seconds between reconnection attempts while Redis is down
    node_ttl: float = 5.0  # a node that stops renewing its registration is gone after this


@dataclass
class TlsReportConfig:
    """TLS reporting (RFC 8460): daily reports to the domains that ask for them."""

    enabled: bool = False
    reporting_domain: str = ""  # From: and DKIM domain of mailed reports; the submitter
    organization: str = ""  # organization-name; empty: reporting_domain
    contact: str = ""  # contact-info; empty: the sender address
    sender: str = "tlsrpt-noreply"  # local part of the From: at reporting_domain
    post_timeout: float = 30.0  # an https: report POST
    check_interval: float = 3600.0  # worker 0 looks for finished days to report this often


@dataclass
class InjectConfig:
    """The HTTP injection API (mta/inject): POST /api/inject/v1, on a listener of its own
    that every worker serves (SO_REUSEPORT), authenticated per account."""

    listen: str = ""  # HOST:PORT; empty: no injection API
    max_recipients: int = 10_000  # per request; more: 413
    max_request_size: int = 64 * 1024**2  # bytes of one request's JSON; more: 413
    max_total_size: int = 256 * 1024**2  # bytes of one request's messages together; more: 413


@dataclass
class TrackingConfig:
    """Open and click tracking of campaign mail (mta/tracking), served on [http] listen."""

    opens: bool = True  # a 1x1 image per recipient in HTML parts
    clicks: bool = True  # http(s) links in text and HTML parts become signed redirects
    header: str = "X-MTA-Tracking"  # per campaign: "off", "opens" or "clicks"; removed
    secret: str = ""  # HMAC key of the tokens; empty: a random key kept in the spool
    click_path: str = "/c/"  # click links: [http] public_url + this + token
    open_path: str = "/o/"  # the pixel: [http] public_url + this + token + ".gif"
    hidden_link: bool = True  # an invisible link in HTML parts: whoever follows it is a bot
    client_address: str = "truncate"  # in events: "truncate" (/24, /48), "hash", "full", "none"
    scanner_window: float = 10.0  # s after delivery: clicks on every link within it = machine
    machine_agents: list[str] = field(default_factory=lambda: [
        "GoogleImageProxy", "YahooMailProxy", "ggpht.com", "Mail-Privacy", "Barracuda",
        "Mimecast", "Proofpoint", "Symantec", "Trend Micro", "python-requests", "curl/",
        "Go-http-client", "Wget", "bot", "spider", "crawler", "HeadlessChrome",
        "Microsoft Office Existence Discovery"])  # user-agent substrings (case ignored)


@dataclass
class AccountConfig:
    name: str
    password_hash: str = ""
    api_key_hashes: list[str] = field(default_factory=list)  # `mta account new-api-key`
    email: str = ""
    plan: str = "standard"
    subscriber_level: int = 0
    sender_domains: list[str] = field(default_factory=list)
    tracking: bool = True  # false: no open pixel, no click rewriting (the unsubscribe link stays)
    max_rate: str = ""  # "500/m": its mail is paced out at this rate (accepted, never refused)
    lane: str = "bulk"  # the lane of its mail: bulk | transactional
    lanes: list[str] = field(default_factory=list)  # lanes its mail may choose by lane_header
    pool: str = ""  # its egress pool; empty: [egress] default_pool (trial: trial_pool)
    pools: list[str] = field(default_factory=list)  # pools its campaign_pool_header may pick


@dataclass
class WindowConfig:
    """A campaign's delivery window: its mail is attempted only during one of its windows
    (mta.queue.schedule); outside them, attempts wait for the next window start."""

    campaign: str
    account: str = ""  # empty: the campaign of any account
    days: list[str] = field(default_factory=list)  # "mon", "mon-fri"; empty: every day
    hours: str = "00:00-24:00"  # HH:MM-HH:MM, local time in `timezone`
    timezone: str = "UTC"  # a zoneinfo name


@dataclass
class EgressSourceConfig:
    """A sending identity (mta.egress): outgoing connections bind `address` and say EHLO
    `ehlo_name`, always together."""

    name: str
    address: str  # IPv4 or IPv6 address of this machine
    ehlo_name: str
    warmup_start: str = ""  # "YYYY-MM-DD": warming from that day (mta.egress.warmup)
    warmup_schedule: list[int] = field(default_factory=list)  # empty: [egress.warmup] schedule


@dataclass
class EgressWarmupConfig:
    """Warm-up of new sources (mta.egress.warmup): a daily cap per provider that rises one
    step per day while the source's signals there stay healthy."""

    schedule: list[int] = field(default_factory=lambda: [
        50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 0])  # per day; 0: unlimited
    timezone: str = "UTC"  # a zoneinfo name: days roll over at its midnight
    max_hard_bounce_rate: float = 0.02  # of the day's attempts
    max_complaint_rate: float = 0.001  # of the day's deliveries
    max_deferral_rate: float = 0.05  # reputation and "slow down" deferrals, of attempts
    min_sample: int = 50  # fewer attempts (and fewer than the cap): the step holds
    on_bad_health: str = "hold"  # "hold" or "step_back"


@dataclass
class EgressPoolMember:
    source: str  # an [[egress.sources]] name
    weight: int = 1  # its share of the pool's mail (smooth weighted round robin)


@dataclass
class EgressPoolConfig:
    name: str
    sources: list[EgressPoolMember] = field(default_factory=list)


@dataclass
class EgressConfig:
    """Source addresses and pools (mta.egress); no sources: [delivery] source_address
    and helo_name, as one implicit source."""

    sources: list[EgressSourceConfig] = field(default_factory=list)
    pools: list[EgressPoolConfig] = field(default_factory=list)
    default_pool: str = ""  # accounts without a pool; required once pools exist
    trial_pool: str = ""  # trial accounts without a pool of their own; empty: default_pool
    campaign_pool_header: str = "X-MTA-Pool"  # a pool of the account's `pools`; removed
    down_interval: float = 60.0  # seconds a source that failed to bind stays down
    run_length: int = 10  # messages in a row to one destination from the source picked
    warmup: EgressWarmupConfig = field(default_factory=EgressWarmupConfig)


@dataclass
class WebhookConfig:
    """An HTTP endpoint the event outbox feeds (mta.outbox.webhook): batches of events as
    a JSON array in one POST, signed with `secret` (header X-MTA-Signature)."""

    name: str
    url: str  # http:// or https:// (https trusts the system's CA store, plus ca_file)
    secret: str = field(repr=False)  # the HMAC-SHA256 key; required; never shown
    events: list[str] = field(default_factory=list)  # event types sent; empty: all
    accounts: list[str] = field(default_factory=list)  # accounts whose events are sent; empty: all
    batch_size: int = 100  # events per POST at most
    batch_wait: float = 1.0  # seconds to wait for a batch to fill
    timeout: float = 10.0  # seconds for one POST (connect + answer)
    max_age: float = 86400.0  # seconds an event is retried before it goes to the dead letters
    ca_file: str = path_setting("")  # extra CA certificates (PEM) trusted for https


@dataclass
class OutboxConfig:
    """The event outbox behind [[webhooks]] and [[amqp]] (mta.outbox): retries and alerts."""

    retry_initial: float = 1.0  # seconds before the first retry of a failed batch
    retry_max: float = 300.0  # longest wait between retries (doubling, with jitter)
    alert_depth: int = 100_000  # events waiting in the outbox past which the operator is told
    alert_age: float = 3600.0  # seconds the oldest waiting event may wait before that


@dataclass
class AmqpConfig:
    """An AMQP 0-9-1 exchange (RabbitMQ) the event outbox feeds (mta.outbox.amqp): one
    persistent JSON message per event, message_id = the event's id, and an event leaves
    the outbox only once the broker confirmed it (publisher confirms)."""

    name: str
    url: str = field(repr=False)  # amqp://USER:PASSWORD@HOST:PORT/VHOST or amqps://; never shown
    exchange: str = "mta.events"  # "": the default exchange (routing_key then names a queue)
    exchange_type: str = "topic"  # direct | fanout | topic | headers
    declare_exchange: bool = True  # declare it (durable) on connect; false: it must exist
    routing_key: str = "mta.{type}"  # placeholders {type} and {account}
    mandatory: bool = True  # an event no queue is bound for is a failure (retried), not dropped
    events: list[str] = field(default_factory=list)  # event types sent; empty: all
    accounts: list[str] = field(default_factory=list)  # accounts whose events are sent; empty: all
    batch_size: int = 100  # events published together, then confirmed together
    batch_wait: float = 1.0  # seconds to wait for a batch to fill
    timeout: float = 10.0  # seconds for a connection, and for the confirms of one batch
    max_age: float = 86400.0  # seconds an event is retried before it goes to the dead letters
    ca_file: str = path_setting("")  # amqps: extra CA certificates (PEM) trusted for the broker


@dataclass
class Config:
    engine: EngineConfig = field(default_factory=EngineConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    bounce: BounceConfig = field(default_factory=BounceConfig)
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tlsrpt: TlsReportConfig = field(default_factory=TlsReportConfig)
    inject: InjectConfig = field(default_factory=InjectConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    accounts: list[AccountConfig] = field(default_factory=list)
    windows: list[WindowConfig] = field(default_factory=list)
    egress: EgressConfig = field(default_factory=EgressConfig)
    amqp: list[AmqpConfig] = field(default_factory=list)
    webhooks: list[WebhookConfig] = field(default_factory=list)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)

    def account(self, name: str) -> AccountConfig | None:
        return next((a for a in self.accounts if a.name == name), None)


# --- loading --------------------------------------------------------------

_VALIDATORS: dict[tuple[str, str], typing.Callable[[Any], None]] = {}


def _validator(section: str, key: str):
    def register(fn):
        _VALIDATORS[(section, key)] = fn
        return fn

    return register


@_validator("smtp", "listen")
@_validator("http", "listen")
def _check_hostport(value: str) -> None:
    parse_hostport(value)


@_validator("tracking", "client_address")
def _check_client_address(value: str) -> None:
    if value not in ("truncate", "hash", "full", "none"):
        raise ValueError("must be one of truncate, hash, full, none")


@_validator("inject", "listen")
def _check_optional_hostport(value: str) -> None:
    if value:
        parse_hostport(value)


@_validator("inject", "max_recipients")
@_validator("inject", "max_request_size")
@_validator("inject", "max_total_size")
def _check_positive(value: int) -> None:
    if value < 1:
        raise ValueError("must be at least 1")


@_validator("accounts", "api_key_hashes")
def _check_api_key_hashes(value: list[str]) -> None:
    for item in value:
        if not re.fullmatch(r"sha256\$[0-9a-f]{64}", item):
            raise ValueError(f"{item[:20]!r}... is not an API key hash (make one with "
                             "`mta account new-api-key`)")


@_validator("smtp", "trusted_networks")
@_validator("bounce", "feedback_sources")
def _check_networks(value: list[str]) -> None:
    for net in value:
        ipaddress.ip_network(net, strict=False)


@_validator("dns", "nameservers")
def _check_nameservers(value: list[str]) -> None:
    for ns in value:
        host, _ = parse_hostport(ns, 53)
        ipaddress.ip_address(host)


@_validator("delivery", "port")
@_validator("delivery", "mta_sts_port")
def _check_port(value: int) -> None:
    if not 0 < value < 65536:
        raise ValueError("must be a port number (1-65535)")


@_validator("delivery", "line_length_limit")
def _check_line_length_limit(value: int) -> None:
    if value != 0 and not 78 <= value <= 998:
        raise ValueError("must be 0 (off) or 78-998 (RFC 5322 2.1.1)")


@_validator("smtp", "max_recipients")
def _check_max_rcpt(value: int) -> None:
    if value < 100:
        raise ValueError("must be at least 100 (RFC 5321 4.5.3.1.8)")


@_validator("dkim", "keys")
def _check_dkim_keys(value: list[DkimKeyConfig]) -> None:
    for key in value:
        if key.algorithm not in ("rsa-sha256", "ed25519-sha256"):
            raise ValueError(f"algorithm must be rsa-sha256 or ed25519-sha256, got {key.algorithm!r}")


@_validator("delivery", "domains")
def _check_domain_policies(value: dict[str, DomainDeliveryConfig]) -> None:
    for name, policy in value.items():
        _check_tls_mode(policy.tls, f"{name}: ")


@_validator("delivery", "tls")
def _check_tls_mode(value: str, where: str = "") -> None:
    if value not in TLS_MODES:
        raise ValueError(f"{where}tls must be one of {', '.join(TLS_MODES)}, got {value!r}")


@_validator("delivery", "tls_min_version")
def _check_tls_version(value: str) -> None:
    if value not in ("TLSv1.2", "TLSv1.3"):
        raise ValueError(f"must be TLSv1.2 or TLSv1.3, got {value!r}")


@_validator("engine", "log_level")
def _check_level(value: str) -> None:
    if value.lower() not in {"debug", "info", "warning", "error"}:
        raise ValueError("must be debug, info, warning or error")


# Values that end up in message headers or SMTP commands: CR, LF and NUL in any string
# of the config are refused at load (header injection), and these keys must also have
# the syntax of what they become. A string key that may hold several lines (a footer
# text, say) must be listed in MULTILINE_KEYS.
MULTILINE_KEYS: set[tuple[str, str]] = {("policy", "footer_text"), ("policy", "footer_html")}
_DOMAIN_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
                          r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?")
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]{1,76}")  # RFC 5322 ftext


def _check_text(value: str) -> None:
    if any(c in value for c in "\r\n\0"):
        raise ValueError("must not contain CR, LF or NUL")


@_validator("engine", "hostname")
@_validator("bounce", "domain")
@_validator("dkim", "domain")
@_validator("dkim", "selector")
def _check_domain_name(value: str) -> None:
    if not _DOMAIN_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a domain name")


@_validator("delivery", "helo_name")
@_validator("tlsrpt", "reporting_domain")
@_validator("bounce", "fbl_domain")
@_validator("dkim", "fallback_domain")
def _check_optional_domain(value: str) -> None:
    if value:
        _check_domain_name(value)


@_validator("smtp", "local_domains")
@_validator("accounts", "sender_domains")
def _check_domain_list(value: list[str]) -> None:
    for item in value:
        _check_domain_name(item)


@_validator("egress", "campaign_pool_header")
@_validator("smtp", "campaign_header")
@_validator("smtp", "send_at_header")
@_validator("smtp", "lane_header")
def _check_field_name(value: str) -> None:
    if not _FIELD_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a header field name")


@_validator("accounts", "max_rate")
def _check_rate(value: str) -> None:
    if value:
        from mta.throttle.account_pace import parse_rate
        parse_rate(value)


@_validator("accounts", "lane")
def _check_lane(value: str) -> None:
    if value not in ("bulk", "transactional"):
        raise ValueError(f"{value!r}: bulk or transactional")


@_validator("accounts", "lanes")
def _check_lanes(value: list[str]) -> None:
    for lane in value:
        _check_lane(lane)


@_validator("delivery", "bulk_min_share")
def _check_share(value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError("a fraction: more than 0, at most 1")


@_validator("windows", "days")
def _check_days(value: list[str]) -> None:
    from mta.queue.schedule import parse_days
    parse_days(value)


@_validator("windows", "hours")
def _check_hours(value: str) -> None:
    from mta.queue.schedule import parse_hours
    parse_hours(value)


@_validator("windows", "timezone")
def _check_timezone(value: str) -> None:
    from mta.queue.schedule import zone
    zone(value)


@_validator("engine", "local_mailboxes")
def _check_local_parts(value: list[str]) -> None:
    for item in value:
        _check_local_part(item)


@_validator("engine", "operator_address")
def _check_operator_address(value: str) -> None:
    if not value:
        return
    local, at, domain = value.rpartition("@")
    if not at:
        raise ValueError(f"{value!r} is not an e-mail address (local@domain)")
    _check_local_part(local)
    _check_domain_name(domain)
    if domain.lower().rstrip(".").split(".")[-1] == "localhost":
        raise ValueError(f"{value!r} is one of the engine's own names: mail to it would loop")


@_validator("smtp", "max_junk_commands")
def _check_not_negative(value: int) -> None:
    if value < 0:
        raise ValueError("must be 0 (no limit) or more")


@_validator("delivery", "yield_to_intake")
def _check_yield(value: float) -> None:
    if value < 0:
        raise ValueError("seconds: 0 (never yields) or more")


@_validator("delivery", "deliver_between_yields")
def _check_between_yields(value: float) -> None:
    if value <= 0:
        raise ValueError("seconds: more than 0")


@_validator("bounce", "max_report_size")
def _check_report_size(value: int) -> None:
    if value < 1024:
        raise ValueError("must be at least 1024 bytes")


@_validator("tlsrpt", "sender")
@_validator("bounce", "verp_prefix")
def _check_local_part(value: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9!#$%&'*/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*/=?^_`{|}~-]+)*",
                        value):
        raise ValueError(f"{value!r} is not a valid local part")


@_validator("http", "public_url")
def _check_url(value: str) -> None:
    if not re.fullmatch(r"https?://[\x21-\x7e]+", value) or any(c in value for c in "<>\"'"):
        raise ValueError(f"{value!r} is not an http(s) URL")


@_validator("policy", "hard_bounce_rate")
def _check_hard_bounce_rate(value: float) -> None:
    if not 8.0 <= value <= 15.0:
        raise ValueError(f"must be within 8-15 (percent, the service contract), got {value}")


@_validator("policy", "complaint_rate")
@_validator("policy", "unsubscribe_rate")
def _check_percent(value: float) -> None:
    if not 0.0 < value <= 100.0:
        raise ValueError(f"must be a percentage above 0, got {value}")


@_validator("policy", "min_volume")
def _check_min_volume(value: int) -> None:
    if value < 1:
        raise ValueError("must be at least 1")


@_validator("policy", "cache_ttl")
def _check_cache_ttl(value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError("must be above 0 and at most 1 second")


@_validator("policy", "unsubscribe_path")
def _check_unsubscribe_path(value: str) -> None:
    if not re.fullmatch(r"/[A-Za-z0-9._~/-]*", value):
        raise ValueError(f"{value!r} is not a URL path starting with /")


@_validator("policy", "unsubscribe_mailbox")
def _check_mailbox(value: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,32}", value):
        raise ValueError(f"{value!r} is not a simple local part (letters, digits, . _ -)")


@_validator("cluster", "redis")
def _check_redis_url(value: str) -> None:
    if value and not re.fullmatch(r"(redis|rediss|unix)://[\x21-\x7e]+", value):
        raise ValueError(f"{value!r} is not a redis://HOST:PORT/DB URL")


@_validator("cluster", "timeout")
@_validator("cluster", "retry_interval")
@_validator("cluster", "node_ttl")
def _check_positive_seconds(value: float) -> None:
    if value <= 0:
        raise ValueError(f"must be a positive number of seconds, got {value}")


@_validator("accounts", "plan")
def _check_plan(value: str) -> None:
    if value not in ("trial", "standard", "pro"):
        raise ValueError(f"must be trial, standard or pro, got {value!r}")


def _check_egress_sources(value: list[EgressSourceConfig]) -> None:
    names: set[str] = set()
    addresses: set[str] = set()
    for source in value:
        if source.name == "async":  # inbound events' "source"
            raise ValueError("'async' is reserved; give the source another name")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", source.name):
            raise ValueError(f"{source.name!r} is not a source name (letters, digits, . _ -)")
        try:
            address = str(ipaddress.ip_address(source.address))
        except ValueError:
            raise ValueError(f"{source.name}: address {source.address!r} is not an IP "
                             "address") from None
        _check_domain_name(source.ehlo_name)
        if source.name in names:
            raise ValueError(f"source {source.name!r} is defined twice")
        if address in addresses:
            raise ValueError(f"{source.name}: address {address} is another source's "
                             "(one address, one EHLO name)")
        names.add(source.name)
        addresses.add(address)


def _check_egress_pools(value: list[EgressPoolConfig]) -> None:
    names: set[str] = set()
    for pool in value:
        if pool.name in names:
            raise ValueError(f"pool {pool.name!r} is defined twice")
        names.add(pool.name)
        if not pool.sources:
            raise ValueError(f"pool {pool.name!r} has no sources")
        members = [m.source for m in pool.sources]
        if len(set(members)) != len(members):
            raise ValueError(f"pool {pool.name!r} lists a source twice")
        for member in pool.sources:
            if member.weight <= 0:
                raise ValueError(f"pool {pool.name!r}: weight of {member.source!r} must be "
                                 f"above 0, got {member.weight}")


@_validator("egress", "schedule")
def _check_default_warmup_schedule(value: list[int]) -> None:
    if not value:
        raise ValueError("needs at least one step")
    _check_warmup_schedule(value)


@_validator("egress", "warmup_schedule")
def _check_warmup_schedule(value: list[int]) -> None:
    if any(n < 0 for n in value):
        raise ValueError("messages per day must be 0 (unlimited) or more")
    if 0 in value[:-1]:
        raise ValueError("0 (unlimited) may only be the last step")


@_validator("egress", "warmup_start")
def _check_warmup_start(value: str) -> None:
    import datetime

    if value:
        try:
            datetime.date.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a date YYYY-MM-DD") from None


@_validator("egress", "timezone")
def _check_warmup_timezone(value: str) -> None:
    from mta.queue.schedule import zone
    zone(value)


@_validator("egress", "max_hard_bounce_rate")
@_validator("egress", "max_complaint_rate")
@_validator("egress", "max_deferral_rate")
def _check_rate_fraction(value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be a fraction between 0 and 1, got {value}")


@_validator("egress", "min_sample")
def _check_min_sample(value: int) -> None:
    if value < 1:
        raise ValueError("must be at least 1")


@_validator("egress", "on_bad_health")
def _check_on_bad_health(value: str) -> None:
    if value not in ("hold", "step_back"):
        raise ValueError(f"must be hold or step_back, got {value!r}")


@_validator("egress", "down_interval")
def _check_down_interval(value: float) -> None:
    if value <= 0:
        raise ValueError("must be a positive number of seconds")


@_validator("egress", "run_length")
def _check_run_length(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
        raise ValueError("must be a whole number of messages from 1 to 1000")


DELIVERY_PRIORITIES = ("idle", "normal")


def check_listeners(cfg: Config) -> None:
    """No two of the engine's listeners on the same address: the second would fail to
    bind in every worker, over and over."""
    listeners = [("[smtp] listen", cfg.smtp.listen)]
    if cfg.http.enabled:
        listeners.append(("[http] listen", cfg.http.listen))
    if cfg.inject.listen:
        listeners.append(("[inject] listen", cfg.inject.listen))
    seen: dict[tuple[str, int], str] = {}
    for key, address in listeners:
        host, port = parse_hostport(address)
        where = (host.lower(), port)
        if where in seen:
            raise ConfigError(f"{key} and {seen[where]} are the same address ({address})")
        seen[where] = key


def check_engine(cfg: Config) -> None:
    engine = cfg.engine
    if engine.workers < 0 or engine.delivery_workers < 0:
        raise ConfigError("[engine] workers and delivery_workers must be 0 or more")
    if engine.delivery_priority not in DELIVERY_PRIORITIES:
        raise ConfigError(f"[engine] delivery_priority must be "
                          f"{' or '.join(DELIVERY_PRIORITIES)}, got {engine.delivery_priority!r}")


def check_egress(cfg: Config) -> None:
    """The references between [egress] and [[accounts]]: every pool named exists, every
    source a pool lists exists; ConfigError with one line otherwise."""
    eg = cfg.egress
    try:
        _check_egress_sources(eg.sources)
        _check_egress_pools(eg.pools)
    except ValueError as exc:
        raise ConfigError(f"[egress] {exc}") from None
    sources = {s.name for s in eg.sources}
    pools = {p.name for p in eg.pools}
    for pool in eg.pools:
        for member in pool.sources:
            if member.source not in sources:
                raise ConfigError(f"[egress] pool {pool.name!r}: unknown source "
                                  f"{member.source!r}")
    if sources and not pools:
        raise ConfigError("[egress] sources are defined but no [[egress.pools]] uses them")
    if pools and not eg.default_pool:
        raise ConfigError("[egress] default_pool must name a pool once pools are defined")
    for key in ("default_pool", "trial_pool"):
        name = getattr(eg, key)
        if name and name not in pools:
            raise ConfigError(f"[egress] {key}: unknown pool {name!r}")
    for account in cfg.accounts:
        for name in [account.pool, *account.pools]:
            if name and name not in pools:
                raise ConfigError(f"[[accounts]] {account.name}: unknown pool {name!r}")


_AMQP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_AMQP_EXCHANGE = re.compile(r"[A-Za-z0-9_.:-]{0,127}")  # RabbitMQ's rule for names
AMQP_ROUTING_FIELDS = ("type", "account")


@_validator("amqp", "name")
def _check_amqp_name(value: str) -> None:
    if not _AMQP_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a name (letters, digits, . _ -; up to 64)")


@_validator("amqp", "url")
def _check_amqp_url(value: str) -> None:
    """Never shows the value: it may hold a password."""
    usage = "must be amqp://USER:PASSWORD@HOST:PORT/VHOST or amqps://... (value not shown)"
    if not re.fullmatch(r"amqps?://[\x21-\x7e]+", value):
        raise ValueError(usage)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(usage) from None
    if not parts.hostname:
        raise ValueError(usage)


@_validator("amqp", "exchange")
def _check_amqp_exchange(value: str) -> None:
    if not _AMQP_EXCHANGE.fullmatch(value):
        raise ValueError(f"{value!r} is not an exchange name (letters, digits, - _ . :)")


@_validator("amqp", "exchange_type")
def _check_amqp_exchange_type(value: str) -> None:
    if value not in ("direct", "fanout", "topic", "headers"):
        raise ValueError(f"must be direct, fanout, topic or headers, got {value!r}")


@_validator("amqp", "routing_key")
def _check_amqp_routing_key(value: str) -> None:
    try:
        parsed = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a template: {exc}") from None
    for literal, name, spec, conversion in parsed:
        if name is not None and (name not in AMQP_ROUTING_FIELDS or spec or conversion):
            raise ValueError(f"{value!r}: only {{type}} and {{account}} may be used")
        if not literal.isascii():
            raise ValueError(f"{value!r} must be ASCII")
    if len(value) > 200:
        raise ValueError("must be at most 200 characters (a routing key is at most 255)")


@_validator("amqp", "events")
def _check_amqp_events(value: list[str]) -> None:
    for item in value:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,63}", item):
            raise ValueError(f"{item!r} is not an event type (Delivery, Bounce, ...)")


@_validator("amqp", "batch_size")
def _check_amqp_batch_size(value: int) -> None:
    if not 1 <= value <= 10_000:
        raise ValueError(f"must be within 1-10000, got {value}")


@_validator("amqp", "timeout")
@_validator("amqp", "max_age")
def _check_amqp_seconds(value: float) -> None:
    if value <= 0:
        raise ValueError(f"must be a positive number of seconds, got {value}")


@_validator("amqp", "batch_wait")
def _check_amqp_batch_wait(value: float) -> None:
    if not 0 <= value <= 60:
        raise ValueError(f"must be within 0-60 seconds, got {value}")


@_validator("webhooks", "name")
def _check_webhook_name(value: str) -> None:
    if not _AMQP_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a name (letters, digits, . _ -; at most 64)")


@_validator("webhooks", "url")
def _check_webhook_url(value: str) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if (parts.scheme not in ("http", "https") or not parts.hostname
            or not re.fullmatch(r"[\x21-\x7e]+", value) or any(c in value for c in "<>\"'\\")):
        raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")


@_validator("webhooks", "secret")
def _check_webhook_secret(value: str) -> None:
    if len(value) < 16:
        raise ValueError("must be at least 16 characters (value not shown)")


@_validator("webhooks", "events")
def _check_webhook_events(value: list[str]) -> None:
    _check_amqp_events(value)


@_validator("webhooks", "batch_size")
def _check_webhook_batch_size(value: int) -> None:
    _check_amqp_batch_size(value)


@_validator("webhooks", "timeout")
@_validator("webhooks", "max_age")
@_validator("outbox", "retry_initial")
@_validator("outbox", "retry_max")
@_validator("outbox", "alert_age")
def _check_outbox_seconds(value: float) -> None:
    _check_amqp_seconds(value)


@_validator("webhooks", "batch_wait")
def _check_webhook_batch_wait(value: float) -> None:
    _check_amqp_batch_wait(value)


@_validator("outbox", "alert_depth")
def _check_alert_depth(value: int) -> None:
    if value < 1:
        raise ValueError("must be at least 1")


def check_webhooks(cfg: Config) -> None:
    """Each sink name once across [[webhooks]] and [[amqp]] (the outbox keeps a cursor per
    name)."""
    seen = {sink.name for sink in cfg.amqp}
    for hook in cfg.webhooks:
        if hook.name in seen:
            raise ConfigError(f"[[webhooks]] {hook.name!r} is defined twice (names are shared "
                              "with [[amqp]])")
        seen.add(hook.name)


def check_amqp(sinks: list[AmqpConfig]) -> None:
    """Each [[amqp]] name once (the outbox keeps a cursor per name); the default exchange
    ("") cannot be declared."""
    seen: set[str] = set()
    for sink in sinks:
        if sink.name in seen:
            raise ConfigError(f"[[amqp]] {sink.name!r} is defined twice")
        seen.add(sink.name)
        if not sink.exchange and sink.declare_exchange:
            raise ConfigError(f"[[amqp]] {sink.name}: the default exchange (exchange = \"\") "
                              "cannot be declared: set declare_exchange = false")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}s"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} has the wrong type: {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        return build_section(tp, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        _, value_tp = typing.get_args(tp)
        return {k: _coerce(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Any:
        return value
    if isinstance(value, bool) != (tp is bool) or not isinstance(value, tp):
        raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r}")
    return value


def _check_strings(value: Any) -> None:
    """CR, LF and NUL are refused in every string (header and command injection)."""
    if isinstance(value, str):
        _check_text(value)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k)
            _check_strings(v)


def build_section(cls: type, table: dict[str, Any], where: str) -> Any:
    """Build dataclass `cls` from a TOML table, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    section = where.split("]")[0].lstrip("[")
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"unknown key {key!r} in {where}")
        name = f"{where} {key}"
        kwargs[key] = _coerce(value, hints[key], name)
        check = _VALIDATORS.get((section, key))
        try:
            if (section, key) not in MULTILINE_KEYS:
                _check_strings(kwargs[key])
            if check is not None:
                check(kwargs[key])
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    missing = [
        n for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where} is missing required key {missing[0]!r}")
    return cls(**kwargs)


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Load and validate a config file, its relative paths made relative to its
    directory; None gives the defaults (relative to the current directory)."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {str(p)!r} not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from None
    hints = typing.get_type_hints(Config)
    kwargs: dict[str, Any] = {}
    top_fields = {f.name for f in dataclasses.fields(Config)}
    for key, value in raw.items():
        if key not in top_fields:
            raise ConfigError(f"unknown section [{key}]")
        kwargs[key] = _coerce(value, hints[key], f"[{key}]")
    cfg = Config(**kwargs)
    check_engine(cfg)
    check_listeners(cfg)
    check_egress(cfg)
    check_amqp(cfg.amqp)
    check_webhooks(cfg)
    resolve_paths(cfg, p.parent.absolute())
    return cfg
