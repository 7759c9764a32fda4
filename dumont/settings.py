"""Settings, all from the environment (django-environ). Every setting is listed in the README.

`DUMONT_ENV` picks the profile: `development` (default: safe local defaults, the embedded local
marketplace on) or `production` (no default for any secret, local marketplace off, `check --deploy`
clean).
"""

from datetime import timedelta
from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent
env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

DUMONT_ENV = env.str("DUMONT_ENV", default="development")
if DUMONT_ENV not in {"development", "production"}:
    raise environ.ImproperlyConfigured(f"DUMONT_ENV must be development or production, not {DUMONT_ENV!r}")
PRODUCTION = DUMONT_ENV == "production"

DEBUG = env.bool("DEBUG", default=not PRODUCTION)
# Production has no default: the process refuses to start without a real key.
SECRET_KEY = env.str("SECRET_KEY") if PRODUCTION else env.str("SECRET_KEY", default="dev-only-insecure-secret-key-change-me-in-production-0123456789")
# Fernet key(s) for secrets at rest (provider keys, restic passwords, agent secrets). Comma-separated:
# the first encrypts, all decrypt (rotation). Development derives one from SECRET_KEY.
DUMONT_ENCRYPTION_KEYS = env.list("DUMONT_ENCRYPTION_KEYS") if PRODUCTION else env.list(
    "DUMONT_ENCRYPTION_KEYS", default=[]
)
if PRODUCTION and (DEBUG or len(SECRET_KEY) < 50 or len(set(SECRET_KEY)) < 5):
    # an error, not check --deploy's warning: a production process with either must never start
    raise environ.ImproperlyConfigured("production refuses DEBUG on and a SECRET_KEY shorter than 50 characters "
                                       "(or of fewer than 5 distinct characters)")
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=[] if PRODUCTION else ["127.0.0.1", "localhost", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework_simplejwt.token_blacklist",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_beat",
    "dumont.core",
    "machines",
    "snapshots",
    "instances",
    "agent",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "dumont.urls"
WSGI_APPLICATION = "dumont.wsgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

DATABASES = {
    "default": env.db_url("DATABASE_URL", default="postgres://postgres@127.0.0.1:5432/dumont"),
}
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=60)
# no health-check query per request (it doubled the database round trips of a heartbeat); Django drops
# a broken persistent connection at the end of the request that found it broken
DATABASES["default"]["CONN_HEALTH_CHECKS"] = env.bool("DATABASE_CONN_HEALTH_CHECKS", default=False)
# pytest-django adds the xdist worker's suffix (test_dumont_gw3); the name itself can be moved aside
DATABASES["default"]["TEST"] = {"NAME": env.str("TEST_DATABASE_NAME", default="test_dumont")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTHENTICATION_BACKENDS = ["dumont.core.auth.UsernameOrEmailBackend"]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = Path(env.str("STATIC_ROOT", default=str(BASE_DIR / "staticfiles")))

# ---- Redis: one URL for broker and results (each pytest-xdist worker gets its own: tests/conftest.py) ----
REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")
REDIS_KEY_PREFIX = env.str("REDIS_KEY_PREFIX", default="dumont")

# ---- Rate limits (dumont/core/throttling.py): counted in Redis (REDIS_URL, under REDIS_KEY_PREFIX),
# "<n>/<s|m|h|d>", empty for none ----
THROTTLE_LOGIN_PER_USERNAME = env.str("THROTTLE_LOGIN_PER_USERNAME", default="10/min")
THROTTLE_LOGIN_PER_ADDRESS = env.str("THROTTLE_LOGIN_PER_ADDRESS", default="60/min")
THROTTLE_API_PER_USER = env.str("THROTTLE_API_PER_USER", default="1200/min")
# Reverse proxies in front of the web servers: the client address is the one this many hops back in
# X-Forwarded-For. 0: the socket's address (a client's own X-Forwarded-For would otherwise evade limits).
THROTTLE_NUM_PROXIES = env.int("THROTTLE_NUM_PROXIES", default=0)

# ---- REST framework, JWT, OpenAPI ----
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["rest_framework_simplejwt.authentication.JWTAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_PAGINATION_CLASS": "dumont.core.pagination.Pagination",
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "dumont.core.errors.api_exception_handler",
    "DEFAULT_THROTTLE_CLASSES": ["dumont.core.throttling.ApiPerUserThrottle"],
    "NUM_PROXIES": THROTTLE_NUM_PROXIES,
    "UNAUTHENTICATED_USER": None,
}
SIMPLE_JWT = {
    "ACCESS_TOKEN_LIFETIME": timedelta(seconds=env.int("JWT_ACCESS_SECONDS", default=15 * 60)),
    "REFRESH_TOKEN_LIFETIME": timedelta(seconds=env.int("JWT_REFRESH_SECONDS", default=7 * 24 * 3600)),
    "ROTATE_REFRESH_TOKENS": True,
    "BLACKLIST_AFTER_ROTATION": True,
    "UPDATE_LAST_LOGIN": True,
    "SIGNING_KEY": env.str("JWT_SIGNING_KEY", default=SECRET_KEY),
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Dumont Cloud API",
    "DESCRIPTION": "Control plane for rented GPU machines: launch races, hibernation, snapshots.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "SCHEMA_PATH_PREFIX": "/api/v1",
    "COMPONENT_SPLIT_REQUEST": True,
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "dumont.core.schema.strip_trailing_slashes",
        "dumont.core.schema.document_errors",
    ],
    "ENUM_NAME_OVERRIDES": {
        "InstanceStatusEnum": "instances.states.Status",
        "SnapshotStatusEnum": "snapshots.models.Snapshot.Status",
    },
}

# ---- Celery ----
# Every countdown, retry delay and time limit must stay below the visibility timeout, or Redis
# would hand a still-running task to a second worker (tests/core/test_celery_config.py checks it).
CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = REDIS_URL
CELERY_RESULT_EXPIRES = 3600
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SOFT_TIME_LIMIT = env.int("CELERY_TASK_SOFT_TIME_LIMIT", default=900)
CELERY_TASK_TIME_LIMIT = env.int("CELERY_TASK_TIME_LIMIT", default=960)
CELERY_MAX_RETRY_DELAY = env.int("CELERY_MAX_RETRY_DELAY", default=600)
CELERY_VISIBILITY_TIMEOUT = env.int("CELERY_VISIBILITY_TIMEOUT", default=7200)
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": CELERY_VISIBILITY_TIMEOUT,
    "global_keyprefix": f"{REDIS_KEY_PREFIX}:",
}
CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS = {"global_keyprefix": f"{REDIS_KEY_PREFIX}:"}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_ALWAYS_EAGER = False
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_TIMEZONE = TIME_ZONE
# The schedule lives in dumont/celery.py (BEAT_SCHEDULE) and is loaded into django-celery-beat's tables.

# ---- Domain settings ----
HEARTBEAT_RETENTION_HOURS = env.int("HEARTBEAT_RETENTION_HOURS", default=72)
HEARTBEAT_PRUNE_BATCH_SIZE = env.int("HEARTBEAT_PRUNE_BATCH_SIZE", default=5000)
HEARTBEAT_PRUNE_MAX_BATCHES = env.int("HEARTBEAT_PRUNE_MAX_BATCHES", default=100)
HEARTBEAT_PRUNE_INTERVAL_SECONDS = env.int("HEARTBEAT_PRUNE_INTERVAL_SECONDS", default=600)

# Every machine we rent carries a label starting with this, so orphans can be found by label.
DUMONT_LABEL_PREFIX = env.str("DUMONT_LABEL_PREFIX", default="dumont-")

# The web port of `make run`. The development defaults of the other local services derive from it (S3 server
# PORT+1, marketplace PORT+2), so two checkouts side by side differ by PORT alone.
PORT = env.int("PORT", default=8000)

# Where the control plane keeps its own files (SSH key, embedded services, marketplace state).
DUMONT_DATA_DIR = Path(env.str("DUMONT_DATA_DIR", default=str(BASE_DIR / ".dumont")))

# ---- Providers ----
# The embedded local marketplace (machines/providers/local): on by default in development, off in production.
LOCAL_MARKETPLACE_ENABLED = env.bool("LOCAL_MARKETPLACE_ENABLED", default=not PRODUCTION)
if PRODUCTION and LOCAL_MARKETPLACE_ENABLED:
    # its "machines" are processes on this host, reachable by anyone who can rent one
    raise environ.ImproperlyConfigured("production refuses the local marketplace (LOCAL_MARKETPLACE_ENABLED)")
LOCAL_MARKETPLACE_URL = env.str("LOCAL_MARKETPLACE_URL", default=f"http://127.0.0.1:{PORT + 2}")
VASTAI_API_URL = env.str("VASTAI_API_URL", default="https://console.vast.ai/api/v0/")
RUNPOD_API_URL = env.str("RUNPOD_API_URL", default="https://api.runpod.io/graphql")
GCP_COMPUTE_API_URL = env.str("GCP_COMPUTE_API_URL", default="https://compute.googleapis.com/compute/v1/")
PROVIDER_TIMEOUT_SECONDS = env.float("PROVIDER_TIMEOUT_SECONDS", default=20.0)

# ---- The launch race (instances/race.py) ----
RACE_BATCH_SIZE = env.int("RACE_BATCH_SIZE", default=5)
RACE_MAX_ROUNDS = env.int("RACE_MAX_ROUNDS", default=3)
RACE_BATCH_TIMEOUT_SECONDS = env.float("RACE_BATCH_TIMEOUT_SECONDS", default=90.0)
# a machine not ready this long after its create is destroyed (earlier batches stay in the race until then)
RACE_MACHINE_TIMEOUT_SECONDS = env.float("RACE_MACHINE_TIMEOUT_SECONDS", default=180.0)
RACE_POLL_INTERVAL_SECONDS = env.float("RACE_POLL_INTERVAL_SECONDS", default=1.0)
# once a machine reports running, how long its SSH may take to answer a command
RACE_SSH_TIMEOUT_SECONDS = env.float("RACE_SSH_TIMEOUT_SECONDS", default=60.0)
# how long pause/resume wait for the provider before giving up (the instance keeps its state)
MACHINE_ACTION_TIMEOUT_SECONDS = env.float("MACHINE_ACTION_TIMEOUT_SECONDS", default=180.0)
RECONCILE_INTERVAL_SECONDS = env.int("RECONCILE_INTERVAL_SECONDS", default=60)
# pending/launching/destroying work untouched this long, with no worker holding its lock, is re-enqueued
RECONCILE_STALE_SECONDS = env.float("RECONCILE_STALE_SECONDS", default=30.0)

# ---- Auto-hibernation and wake (instances/hibernation.py) ----
IDLE_GPU_THRESHOLD_PERCENT = env.float("IDLE_GPU_THRESHOLD_PERCENT", default=5.0)
IDLE_WINDOW_SECONDS = env.float("IDLE_WINDOW_SECONDS", default=180.0)
# heartbeats further apart than this are a gap (never idleness); the agent beats every 10 s
HEARTBEAT_MAX_GAP_SECONDS = env.float("HEARTBEAT_MAX_GAP_SECONDS", default=30.0)
HIBERNATION_SWEEP_SECONDS = env.float("HIBERNATION_SWEEP_SECONDS", default=15.0)
HIBERNATE_RETRY_BASE_SECONDS = env.float("HIBERNATE_RETRY_BASE_SECONDS", default=60.0)
HIBERNATE_RETRY_MAX_SECONDS = env.float("HIBERNATE_RETRY_MAX_SECONDS", default=3600.0)
HIBERNATION_RELEASE_SECONDS = env.float("HIBERNATION_RELEASE_SECONDS", default=1800.0)
# A hibernation tells the agent to prepare (no new sync) and waits this long for its `hibernate_ready`
# before the final incremental pass; without the answer it runs two passes.
HIBERNATE_AGENT_READY_SECONDS = env.float("HIBERNATE_AGENT_READY_SECONDS", default=60.0)
# This many hibernations failed in a row: an operator alert, and the user sees why and what it costs.
HIBERNATE_ALERT_AFTER_FAILURES = env.int("HIBERNATE_ALERT_AFTER_FAILURES", default=3)
# `restic check --read-data-subset` the control plane runs after a hibernation's backup, before the
# destroy: how much of the repository's pack data it reads back ("5%", "64M", "1/10"; empty: no read).
SNAPSHOT_VERIFY_READ_SUBSET = env.str("SNAPSHOT_VERIFY_READ_SUBSET", default="64M")
# The fast path (README "Fast wake"): a hibernation (and a snapshot asked for with "fast") also stores a
# restore-optimised copy beside restic's, and a wake restores from it. Off: every restore is restic's.
SNAPSHOT_FASTPATH = env.bool("SNAPSHOT_FASTPATH", default=True)
# how old an object no manifest names must be before the garbage collector deletes it
SNAPSHOT_FASTPATH_GC_GRACE_SECONDS = env.int("SNAPSHOT_FASTPATH_GC_GRACE_SECONDS", default=3600)
# after a recorded periodic sync, a running instance's fast path is brought up to date (a presync) when its
# newest one is older than this, so the hibernation's fast path uploads only what changed since (0: never)
SNAPSHOT_FASTPATH_PRESYNC_SECONDS = env.int("SNAPSHOT_FASTPATH_PRESYNC_SECONDS", default=600)

# The agent's periodic incremental backup (its sync service), and how often the control plane records
# (and verifies) the syncs agents report as periodic snapshots.
AGENT_SYNC_ENABLED = env.bool("AGENT_SYNC_ENABLED", default=True)
AGENT_SYNC_RECORD_SECONDS = env.int("AGENT_SYNC_RECORD_SECONDS", default=60)
# How long the storage keys of an agent's sync live in `r2` mode; the agent asks for new ones
# (POST /api/v1/agent/sync-credentials, signed like a heartbeat) when a quarter of that is left.
AGENT_SYNC_CREDENTIALS_TTL_SECONDS = env.int("AGENT_SYNC_CREDENTIALS_TTL_SECONDS", default=6 * 3600)

# Where DumontAgent on a machine posts its heartbeats (this server's public URL in production).
AGENT_CONTROL_PLANE_URL = env.str("AGENT_CONTROL_PLANE_URL", default=f"http://127.0.0.1:{PORT}")

# Object storage price used in the savings ledger (Cloudflare R2 standard: $0.015/GB-month).
SNAPSHOT_STORAGE_PRICE_PER_GB_MONTH = env.float("SNAPSHOT_STORAGE_PRICE_PER_GB_MONTH", default=0.015)

# ---- Lost machines and recovery (instances/lost.py), CPU standby (instances/standby.py) ----
# A machine is checked when its heartbeats stopped for longer than this. It is lost (destroyed, recovered
# elsewhere) only when the provider says it is gone or failed for good; running but not answering SSH
# (LOST_SSH_TRIES tries of LOST_SSH_TIMEOUT_SECONDS) it is `unreachable` and kept.
LOST_MACHINE_SECONDS = env.float("LOST_MACHINE_SECONDS", default=60.0)
# An unreachable machine is re-checked every sweep; after this long it is flagged for the operator
# (an OperatorAlert), never destroyed on its own.
UNREACHABLE_GRACE_SECONDS = env.float("UNREACHABLE_GRACE_SECONDS", default=1800.0)
# More than this share of the running instances (and at least LOST_FLEET_SILENT_MIN) silent in one sweep:
# the likely cause is our own network; the sweep judges nobody and raises an operator alert.
LOST_FLEET_SILENT_SHARE = env.float("LOST_FLEET_SILENT_SHARE", default=0.2)
LOST_FLEET_SILENT_MIN = env.int("LOST_FLEET_SILENT_MIN", default=3)
LOST_SWEEP_SECONDS = env.float("LOST_SWEEP_SECONDS", default=10.0)
LOST_SSH_TIMEOUT_SECONDS = env.float("LOST_SSH_TIMEOUT_SECONDS", default=10.0)
LOST_SSH_TRIES = env.int("LOST_SSH_TRIES", default=2)
# How often the standby sweep provisions missing standbys, starts due mirror syncs and retries failbacks.
STANDBY_SWEEP_SECONDS = env.float("STANDBY_SWEEP_SECONDS", default=10.0)
STANDBY_BOOT_TIMEOUT_SECONDS = env.float("STANDBY_BOOT_TIMEOUT_SECONDS", default=600.0)
# after a standby failed to provision (or an automatic failback found no GPU), wait this long to retry
STANDBY_RETRY_SECONDS = env.float("STANDBY_RETRY_SECONDS", default=300.0)
STANDBY_SYNC_TIMEOUT_SECONDS = env.float("STANDBY_SYNC_TIMEOUT_SECONDS", default=3600.0)
STANDBY_IMAGE = env.str("STANDBY_IMAGE", default="debian-12")

# ---- Machine reliability (machines/reliability.py) ----
RELIABILITY_WINDOW_HOURS = env.int("RELIABILITY_WINDOW_HOURS", default=72)
RELIABILITY_MIN_ATTEMPTS = env.int("RELIABILITY_MIN_ATTEMPTS", default=3)
RELIABILITY_BLACKLIST_BELOW = env.float("RELIABILITY_BLACKLIST_BELOW", default=0.3)
RELIABILITY_MAX_CONSECUTIVE_FAILURES = env.int("RELIABILITY_MAX_CONSECUTIVE_FAILURES", default=3)
BLACKLIST_HOURS = env.float("BLACKLIST_HOURS", default=24.0)
BLACKLIST_SEVERE_HOURS = env.float("BLACKLIST_SEVERE_HOURS", default=72.0)

# The control plane's SSH key (generated on first use); installed on every machine it rents.
DUMONT_SSH_KEY_PATH = Path(env.str("DUMONT_SSH_KEY_PATH", default=str(DUMONT_DATA_DIR / "ssh" / "id_ed25519")))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}, "paramiko": {"level": "WARNING"}},
}
# Loggers held at WARNING (or `name=LEVEL`): `make run` names the routine ones here (each task run, beat tick,
# request) so that a person reads warnings, errors and one line per instance status change, not chatter.
for _entry in env.list("DUMONT_QUIET_LOGGERS", default=[]):
    _name, _, _level = _entry.partition("=")
    LOGGING["loggers"][_name] = {"level": _level or "WARNING"}

if PRODUCTION:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=True)
    SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True

# ---- Snapshots: restic on the GPU machine, to S3-compatible storage (Cloudflare R2 in production) ----
# Development defaults: the embedded S3 server of `make run` (`python -m dumont.s3server --port PORT+1
# --fast-port PORT+4 ...`).
# Production has no default: unset, every snapshot fails with "object storage is not configured".
SNAPSHOT_S3_ENDPOINT = env.str("SNAPSHOT_S3_ENDPOINT", default="" if PRODUCTION else f"http://127.0.0.1:{PORT + 1}")
# Where the fast path's objects (`{prefix}/fast/...`) are read and written, always with the control plane's key
# (machines get presigned URLs for it, never a key). Empty: the same as SNAPSHOT_S3_ENDPOINT (production, R2).
# Development: the embedded S3 server's second, ungated rclone on PORT+4 (dumont/s3server.py says why).
SNAPSHOT_FAST_S3_ENDPOINT = env.str("SNAPSHOT_FAST_S3_ENDPOINT",
                                    default="" if PRODUCTION else f"http://127.0.0.1:{PORT + 4}")
SNAPSHOT_S3_BUCKET = env.str("SNAPSHOT_S3_BUCKET", default="dumont-snapshots")
SNAPSHOT_S3_REGION = env.str("SNAPSHOT_S3_REGION", default="auto")  # R2 wants "auto"
# The control plane's own key: bucket setup, sizes, deletes, restic init/forget/prune. Never sent to a machine.
SNAPSHOT_S3_ACCESS_KEY_ID = env.str("SNAPSHOT_S3_ACCESS_KEY_ID", default="" if PRODUCTION else "dumont-dev-access-key")
SNAPSHOT_S3_SECRET_ACCESS_KEY = env.str(
    "SNAPSHOT_S3_SECRET_ACCESS_KEY", default="" if PRODUCTION else "dumont-dev-secret-key-change-me"
)
# What a user's machine gets to reach its repository: "scoped" (keys derived per user prefix from
# SNAPSHOT_S3_SCOPE_SECRET: the embedded S3 server), "r2" (R2 temporary credentials limited to the
# user's prefix) or "shared" (the key above: only for a store with no way to scope keys; any user's
# machine could then delete every repository).
SNAPSHOT_MACHINE_CREDENTIALS = env.str("SNAPSHOT_MACHINE_CREDENTIALS", default="r2" if PRODUCTION else "scoped")
# Empty in development: derived from SECRET_KEY.
SNAPSHOT_S3_SCOPE_SECRET = env.str("SNAPSHOT_S3_SCOPE_SECRET", default="")
SNAPSHOT_R2_ACCOUNT_ID = env.str("SNAPSHOT_R2_ACCOUNT_ID", default="")
SNAPSHOT_R2_API_TOKEN = env.str("SNAPSHOT_R2_API_TOKEN", default="")
SNAPSHOT_R2_API_URL = env.str("SNAPSHOT_R2_API_URL", default="https://api.cloudflare.com/client/v4")
# The control plane's restic (empty: the one on PATH), copied over SFTP to machines lacking its version.
SNAPSHOT_RESTIC_BINARY = env.str("SNAPSHOT_RESTIC_BINARY", default="")
SNAPSHOT_RESTIC_CONNECTIONS = env.int("SNAPSHOT_RESTIC_CONNECTIONS", default=32)
SNAPSHOT_RESTIC_PACK_SIZE_MB = env.int("SNAPSHOT_RESTIC_PACK_SIZE_MB", default=16)
SNAPSHOT_RESTIC_COMPRESSION = env.str("SNAPSHOT_RESTIC_COMPRESSION", default="auto")
# One restic command (backup, restore) may run this long; the tasks' limits sit just above it and
# stay below CELERY_VISIBILITY_TIMEOUT (checked by tests/core/test_celery_config.py).
SNAPSHOT_COMMAND_TIMEOUT_SECONDS = env.int("SNAPSHOT_COMMAND_TIMEOUT_SECONDS", default=3000)
SNAPSHOT_TASK_SOFT_TIME_LIMIT = SNAPSHOT_COMMAND_TIMEOUT_SECONDS + 120
SNAPSHOT_TASK_TIME_LIMIT = SNAPSHOT_COMMAND_TIMEOUT_SECONDS + 180
# Retention, per instance: the newest N verified periodic and hibernation snapshots are kept (and
# every manual one, and always the newest verified one); the rest is forgotten and pruned.
SNAPSHOT_KEEP_PERIODIC = env.int("SNAPSHOT_KEEP_PERIODIC", default=12)
SNAPSHOT_KEEP_HIBERNATE = env.int("SNAPSHOT_KEEP_HIBERNATE", default=1)
SNAPSHOT_RETENTION_INTERVAL_SECONDS = env.int("SNAPSHOT_RETENTION_INTERVAL_SECONDS", default=1800)
SNAPSHOT_RETENTION_BATCH_SIZE = env.int("SNAPSHOT_RETENTION_BATCH_SIZE", default=200)
# Progress events (InstanceEvent feed) at most this often during a backup or restore.
SNAPSHOT_PROGRESS_EVENT_SECONDS = env.float("SNAPSHOT_PROGRESS_EVENT_SECONDS", default=5.0)

# ---- Agent: DumontAgent heartbeats (agent/) ----
# What the server tells every agent: seconds between heartbeats.
AGENT_HEARTBEAT_INTERVAL_SECONDS = env.int("AGENT_HEARTBEAT_INTERVAL_SECONDS", default=10)
# A signed heartbeat is accepted this long after its timestamp, and this far ahead of our clock.
AGENT_SIGNATURE_MAX_AGE_SECONDS = env.int("AGENT_SIGNATURE_MAX_AGE_SECONDS", default=300)
AGENT_CLOCK_SKEW_SECONDS = env.int("AGENT_CLOCK_SKEW_SECONDS", default=5)
# Decrypted agent secrets stay this long in each web process's memory (never in Redis).
AGENT_SECRET_CACHE_SECONDS = env.int("AGENT_SECRET_CACHE_SECONDS", default=60)
# Each instance's status and encrypted secret are mirrored in Redis (agent.mirror) for at most this long;
# saves and deletes invalidate the entry at once, so this only bounds writes that bypass model signals.
AGENT_MIRROR_TTL_SECONDS = env.int("AGENT_MIRROR_TTL_SECONDS", default=300)
AGENT_MAX_BODY_BYTES = env.int("AGENT_MAX_BODY_BYTES", default=16384)
# An instance may send this many heartbeats per AGENT_HEARTBEAT_INTERVAL_SECONDS (it sends one; retries
# and state changes add a few); more are a 429 that stores nothing. 0: no limit.
AGENT_HEARTBEATS_PER_INTERVAL = env.int("AGENT_HEARTBEATS_PER_INTERVAL", default=5)
# Heartbeats are buffered in Redis and flushed to PostgreSQL in batches: every interval (beat) and as
# soon as the buffer holds a batch. A batch taken by a flusher that never finished it goes back after
# AGENT_FLUSH_STALE_SECONDS (the flush task's time limits stay below it).
AGENT_FLUSH_INTERVAL_SECONDS = env.int("AGENT_FLUSH_INTERVAL_SECONDS", default=2)
AGENT_FLUSH_BATCH_SIZE = env.int("AGENT_FLUSH_BATCH_SIZE", default=1000)
AGENT_FLUSH_MAX_BATCHES = env.int("AGENT_FLUSH_MAX_BATCHES", default=100)
AGENT_FLUSH_STALE_SECONDS = env.int("AGENT_FLUSH_STALE_SECONDS", default=120)
# Heartbeats PostgreSQL refuses are set aside in a Redis dead-letter list, the newest this many kept.
AGENT_DEAD_LETTER_MAX = env.int("AGENT_DEAD_LETTER_MAX", default=1000)
# The sync service's period when the control plane deploys an agent with a sync command.
AGENT_SYNC_INTERVAL_SECONDS = env.int("AGENT_SYNC_INTERVAL_SECONDS", default=300)
