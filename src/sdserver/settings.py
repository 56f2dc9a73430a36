"""All settings in one pydantic-settings class.

Sources, highest priority first: CLI flags, environment (`SDSERVER_*`, `HF_TOKEN`), then the
`config.json` file in the original server's format (`hf_token`, `custom_models`) plus our keys.
"""

from __future__ import annotations

import json
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from sdserver.core.errors import ConfigError
from sdserver.core.types import Limits

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEMO_MODEL = "demo"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".gguf")
_URL_PATH = re.compile(r"^[A-Za-z0-9._~-]+$")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_KEY_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")

_file_values: ContextVar[dict[str, Any] | None] = ContextVar("sdserver_config_file", default=None)


class CustomModel(BaseModel):
    """One entry of the original `custom_models` list, kept as the client sees it."""

    model_config = ConfigDict(extra="ignore")

    model_path: str
    ui_label: str
    url_path: str
    requires_safety_checker: bool = False
    # Ours: SD 2.x single files are taken as v-prediction (and the rest as epsilon) unless this says otherwise.
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    # Ours: for an SD3/FLUX single file, a diffusers folder or hub id of the same family that lends what the
    # file lacks (VAE, text encoders, T5 tokenizer); falls back to Settings.encoders[family].
    encoders: str | None = None

    @field_validator("requires_safety_checker", mode="before")
    @classmethod
    def _strip(cls, value: Any) -> Any:
        # The original README documented it as a string ("true | false"); pydantic parses
        # true/false/yes/no/1/0 and rejects typos, but does not strip spaces.
        return value.strip() if isinstance(value, str) else value

    @field_validator("url_path")
    @classmethod
    def _url_safe(cls, value: str) -> str:
        if not is_url_safe(value):
            raise ValueError(f"url_path {value!r} must use only letters, digits, '.', '_', '~' and '-'")
        return value

    @model_validator(mode="after")
    def _path_exists(self) -> CustomModel:
        path = Path(self.model_path).expanduser()
        if not is_hub_id(self.model_path) and not (path.is_dir() or is_single_file(path)):
            raise ValueError(
                f"model_path {self.model_path!r} of {self.url_path!r} is not a folder, "
                "a .safetensors/.ckpt file or a hub id"
            )
        return self


def is_single_file(path: Path) -> bool:
    """A single-file checkpoint: a .safetensors or .ckpt file."""
    return path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES


def split_key(entry: str) -> tuple[str | None, str]:
    """(name, secret) of an API key entry `name:secret`; a bare secret has no name."""
    name, colon, secret = entry.partition(":")
    return (name, secret) if colon else (None, entry)


def _check_keys(entries: list[str], field: str) -> list[str]:
    """An empty or blank key would let an empty token in: stop start-up instead, with one clear line."""
    names: set[str] = set()
    for entry in entries:
        name, secret = split_key(entry)
        if not secret.strip():
            raise ValueError(f"{field}: a key is empty or blank; remove it or give it a secret")
        if secret != secret.strip():
            raise ValueError(f"{field}: a key starts or ends with whitespace, which no client can send")
        if name is not None and not _KEY_NAME.match(name):
            raise ValueError(f"{field}: key name {name!r} must be 1-64 letters, digits, '.', '_', '@' or '-'")
        if name is not None and name in names:
            raise ValueError(f"{field}: two keys are named {name!r}")
        names.add(name or "")
    return entries


def is_url_safe(name: str) -> bool:
    """A model name usable as one URL path segment as it is."""
    return bool(_URL_PATH.match(name)) and name not in (".", "..")


def is_hub_id(source: str) -> bool:
    """A `owner/name` string that is not an existing local path is taken as a Hugging Face hub id."""
    return bool(_HUB_ID.match(source)) and not Path(source).expanduser().exists()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SDSERVER_", env_nested_delimiter="__", extra="ignore", populate_by_name=True
    )

    model: str | None = None  # hub id, local diffusers folder, or "demo"; None: the default (see resolve)
    hf_token: str | None = Field(default=None, validation_alias=AliasChoices("hf_token", "HF_TOKEN"))
    custom_models: list[CustomModel] = Field(default_factory=list)
    models_dir: str | None = None  # every diffusers folder and .safetensors/.ckpt file in it is a model
    max_loaded_models: int = Field(default=3, ge=1)  # the least recently used is unloaded past this
    max_memory_gb: float | None = Field(default=None, gt=0)  # and past this many GB of weights
    preload: Annotated[list[str], NoDecode] = Field(default_factory=list)  # models loaded at start; "all"
    loras_dir: str | None = None  # LoRA adapters (.safetensors) that requests may name
    host: str = "127.0.0.1"
    port: int = Field(default=1337, ge=0, le=65535)
    device: str = "auto"  # auto: cuda, then mps, then cpu
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"  # auto: fp16 on CUDA, fp32 otherwise
    max_queue: int = Field(default=64, ge=1)
    max_batch_size: int = Field(default=8, ge=1)
    batch_window_ms: float = Field(default=20.0, ge=0)
    queue_timeout: float | None = Field(default=600.0, gt=0)  # seconds a request may wait before it starts
    job_ttl: float = Field(default=3600.0, gt=0)  # seconds a finished job stays visible in the jobs API
    max_jobs_kept: int = Field(default=1000, ge=0)
    allow_webhooks: bool = False
    webhook_attempts: int = Field(default=3, ge=1, le=10)
    # Access and hardening
    api_keys: Annotated[list[str], NoDecode] = Field(  # Bearer keys; empty: no auth
        default_factory=list,
        validation_alias=AliasChoices("api_keys", "api_key", "SDSERVER_API_KEY", "SDSERVER_API_KEYS"),
    )
    api_auth: Annotated[list[str], NoDecode] = Field(default_factory=list)  # "user:pass" for HTTP Basic
    open_original_api: bool = False  # leave the original API's routes open when keys are set
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_body_mb: float = Field(default=32.0, gt=0)
    drain_timeout: float = Field(default=30.0, ge=0)  # seconds to finish work on SIGTERM

    @field_validator("cors_origins", "preload", "allowed_hosts", "webhook_allowed_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        # SDSERVER_CORS_ORIGINS=a,b in the environment; lists in config.json
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("api_keys", "admin_keys", "api_auth", mode="before")
    @classmethod
    def _comma_separated_credentials(cls, value: Any) -> Any:
        # As above, but an empty part is kept, so that a key left empty is refused, not dropped
        # (SDSERVER_API_KEY=$UNSET_VARIABLE must not start a server without keys).
        if isinstance(value, str):
            return [part.strip() for part in value.split(",")]
        return value

    @field_validator("api_keys", "admin_keys")
    @classmethod
    def _keys(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return _check_keys(value, str(info.field_name))

    @field_validator("api_auth")
    @classmethod
    def _user_colon_password(cls, value: list[str]) -> list[str]:
        for pair in value:
            user, colon, password = pair.partition(":")
            if not colon or not user.strip() or not password.strip():
                raise ValueError("api_auth entries must look like user:password, neither empty")
        return value

    @model_validator(mode="after")
    def _distinct_secrets(self) -> Settings:
        secrets = [split_key(entry)[1] for entry in (*self.api_keys, *self.admin_keys)]
        if len(set(secrets)) < len(secrets):
            raise ValueError("api_keys/admin_keys: the same secret is given twice")
        if self.allow_webhooks and not self.webhook_secret:
            raise ValueError("webhook_secret: needed with allow_webhooks (receivers verify each delivery with it)")
        return self

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys or self.api_auth or self.admin_keys)

    limits: Limits = Field(default_factory=Limits)

    @model_validator(mode="after")
    def _unique_url_paths(self) -> Settings:
        seen: set[str] = set()
        for custom in self.custom_models:
            if custom.url_path in seen:
                raise ValueError(f"duplicate url_path {custom.url_path!r} in custom_models")
            seen.add(custom.url_path)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, InitSettingsSource(settings_cls, _file_values.get() or {})

    @property
    def model_explicit(self) -> bool:
        return self.model is not None

    @property
    def base_model(self) -> str:
        return self.model or DEFAULT_MODEL

    # Model families (issue 12)
    encoders: dict[str, str] = Field(
        default_factory=dict,
        description="For SD3/FLUX single files that lack parts (VAE, text encoders, T5 tokenizer): a diffusers "
        'folder or hub id per family that lends them, e.g. {"flux": "black-forest-labs/FLUX.1-dev"}',
    )

    # Batching (issue 14)
    batching: Literal["step", "request"] = Field(
        default="step",
        description="step: requests join and leave the running batch between denoising steps, whatever their "
        "steps, sampler, guidance or strength; request: only requests that agree on all of those share a batch",
    )
    switch_after_steps: int = Field(
        default=40,
        ge=1,
        description="Step batching's fairness: once a request that cannot join the running batch (another model, "
        "size or LoRA set) has waited this many steps, the batch stops taking newcomers and it goes next",
    )

    # OpenAI / AUTOMATIC1111 adapters
    image_url_ttl: float = Field(default=3600.0, gt=0)  # seconds an OpenAI response_format=url image lives
    image_url_max_mb: float = Field(default=512.0, gt=0)  # memory for those images; the oldest go first

    # Studio and history (issue 13)
    outputs_dir: str = Field(
        default="outputs",
        description="Folder of saved images and their index (history.sqlite3); relative paths start in the "
        "working directory",
    )
    history: Literal["api", "all", "off"] = Field(
        default="api",
        description="What is saved: api = the studio and the jobs API, plus other APIs when the client asks "
        "(A1111 save_images); all = every image; off = nothing",
    )
    history_max_gb: float | None = Field(
        default=None, gt=0, description="Disk budget of saved images in GB; past it the oldest are deleted"
    )

    # Reliability, tenants, links and webhooks (issue 18)
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("admin_keys", "admin_key", "SDSERVER_ADMIN_KEY", "SDSERVER_ADMIN_KEYS"),
        description="Admin key, 'name:secret' or a bare secret (named 'admin'): sees every job, and alone may "
        "load, unload and rescan models and change AUTOMATIC1111's options",
    )
    public_url: str | None = Field(
        default=None,
        description="Base URL of the links the server hands out (OpenAI response_format=url), e.g. "
        "https://sd.example.com behind a proxy; default: the address the client connected to",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host names clients may use when listening beyond localhost (IP addresses, localhost, "
        "this machine's names and public_url's host always work; '*.example.com' matches subdomains, '*' any)",
    )
    webhook_secret: str | None = Field(
        default=None,
        description="Secret that signs every webhook delivery (HMAC-SHA256 in the Sdserver-Signature header)",
    )
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Webhook hosts allowed although they resolve to a loopback, private or link-local address",
    )

    @field_validator("public_url")
    @classmethod
    def _absolute_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"public_url must start with http:// or https:// and a host, got {value!r}")
        return value.rstrip("/") if value else value

    # Scale-out on Ray Serve (issue 16); `pip install 'sdserver[ray]'`
    ray: bool = Field(
        default=False,
        description="Serve from a Ray Serve application: engine replicas (one device each) behind the same API",
    )
    ray_address: str | None = Field(
        default=None,
        description="The Ray cluster to join (e.g. ray://head:10001, head:6379 or auto); none: start a local Ray",
    )
    replicas: int | None = Field(
        default=None,
        ge=1,
        description="Engine replicas, fixed (default: one per visible GPU, or 1 on CPUs); or use min/max_replicas",
    )
    min_replicas: int | None = Field(
        default=None, ge=0, description="Autoscaling on queue depth: the fewest engine replicas (with max_replicas)"
    )
    max_replicas: int | None = Field(
        default=None, ge=1, description="Autoscaling on queue depth: the most engine replicas (with min_replicas)"
    )
    gpus_per_replica: float | None = Field(
        default=None,
        ge=0,
        description="GPUs each engine replica owns (a fraction shares a GPU); default 1 where Ray sees GPUs, else 0",
    )
    cpus_per_replica: float = Field(
        default=1.0, gt=0, description="CPUs each engine replica reserves (torch uses as many threads)"
    )
    ingress_replicas: int = Field(
        default=1, ge=1, description="HTTP ingress replicas (any of them reads, streams and cancels any job)"
    )
    replica_queue: int | None = Field(
        default=None,
        ge=1,
        description="Requests one engine replica holds at once, running or waiting to join its batch; more wait "
        "in the ingress and go to the first free replica (default: 2 x max_batch_size)",
    )
    target_queue: float | None = Field(
        default=None,
        gt=0,
        description="Autoscaling target: requests per engine replica, running or waiting (default: max_batch_size)",
    )
    models_per_replica: int | None = Field(
        default=None,
        ge=1,
        description="Models one engine replica keeps loaded; requests go to a replica that has their model "
        "(default: max_loaded_models)",
    )
    retry_running: int = Field(
        default=0,
        ge=0,
        le=5,
        description="Times a request that was running on a replica that died is run again on another (same seed, "
        "same images); 0: it fails with 503. Queued requests are always moved to another replica",
    )
    ray_app_name: str = Field(default="sdserver", description="Name of the Ray Serve application")


def read_config_file(path: Path, *, required: bool) -> dict[str, Any]:
    if not path.exists():
        if required:
            raise ConfigError(f"config file {str(path)!r} not found (pass --model to run without one)")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a JSON object, not {type(data).__name__}")
    return data


def load_settings(config_path: Path | None = None, **overrides: Any) -> Settings:
    """Merge config file, environment and CLI overrides (None means "not given") into Settings."""
    given = {key: value for key, value in overrides.items() if value is not None}
    path = config_path or Path("config.json")
    file_values = read_config_file(path, required=config_path is not None and "model" not in given)
    token = _file_values.set(file_values)
    try:
        return Settings(**given)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "config"
        reason = error["msg"].removeprefix("Value error, ")
        raise ConfigError(f"invalid setting {where} (from flags, environment or {path}): {reason}") from None
    finally:
        _file_values.reset(token)
