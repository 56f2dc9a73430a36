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
    """A `owner/name` string that is not an existing local path (nor a checkpoint file name) is taken as
    a Hugging Face hub id."""
    return (
        bool(_HUB_ID.match(source))
        and not Path(source).expanduser().exists()
        and Path(source).suffix.lower() not in SINGLE_FILE_SUFFIXES
    )


def looks_like_path(source: str) -> bool:
    """Meant as a local file or folder: a checkpoint file name, or a path that is not `owner/name`."""
    if Path(source).suffix.lower() in SINGLE_FILE_SUFFIXES:
        return True
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source


class Settings(BaseSettings):
    """Every setting of the server, written once: each field's default and description are its
    `sdserver serve --option` (cli_options.py builds them), its `SDSERVER_<NAME>` environment
    variable and its config.json key. A field marked `json_schema_extra={"cli": False}` has no flag;
    `{"flag": "name"}` names its flag when the field name would read badly (lists: one per use)."""

    model_config = SettingsConfigDict(
        env_prefix="SDSERVER_", env_nested_delimiter="__", extra="ignore", populate_by_name=True
    )

    model: str | None = Field(
        default=None,
        description=f"Base model: a hub id, a diffusers folder, a .safetensors/.ckpt file, or 'demo' (the bundled "
        f"one). Default: {DEFAULT_MODEL} from the hub, or the demo model when that cannot be loaded",
    )
    hf_token: str | None = Field(
        default=None,
        validation_alias=AliasChoices("hf_token", "HF_TOKEN"),
        description="Hugging Face token for gated models (config.json or HF_TOKEN; no flag: it would show in ps)",
        json_schema_extra={"cli": False},
    )
    custom_models: list[CustomModel] = Field(
        default_factory=list,
        description="The original server's custom models (config.json only)",
        json_schema_extra={"cli": False},
    )
    models_dir: str | None = Field(
        default=None, description="Folder whose diffusers sub-folders and .safetensors/.ckpt files are models, by name"
    )
    max_loaded_models: int = Field(
        default=3, ge=1, description="Models kept loaded at most; past it the least recently used one is unloaded"
    )
    max_memory_gb: float | None = Field(
        default=None, gt=0, description="GB of model weights kept loaded at most (default: no limit)"
    )
    preload: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Also load this model at start (repeat; 'all' for every model); others load on first use",
    )
    loras_dir: str | None = Field(default=None, description="Folder of LoRA .safetensors files that requests may name")
    upscalers_dir: str | None = Field(
        default=None, description="Folder of upscaler models (ESRGAN, Real-ESRGAN, SwinIR, ...: any spandrel reads)"
    )
    controlnet_dir: str | None = Field(
        default=None, description="Folder of ControlNet models (diffusers folders or single files) requests may name"
    )
    embeddings_dir: str | None = Field(
        default=None, description="Folder of textual-inversion embeddings (.pt, .safetensors), used by name in prompts"
    )
    host: str = Field(default="127.0.0.1", description="Address to listen on (0.0.0.0: every interface)")
    port: int = Field(default=1337, ge=0, le=65535, description="Port to listen on (0: any free port)")
    device: str = Field(default="auto", description="auto (CUDA, then Apple MPS, then CPU), cuda, cuda:N, mps or cpu")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        default="auto", description="Weights' dtype; auto: float16 on CUDA, float32 elsewhere"
    )
    max_queue: int = Field(default=64, ge=1, description="Requests waiting at most; past it 429")
    max_batch_size: int = Field(default=8, ge=1, description="Images per pipeline call at most")
    batch_window_ms: float = Field(
        default=20.0, ge=0, description="Milliseconds a batch waits for compatible company under load"
    )
    queue_timeout: float | None = Field(
        default=600.0, gt=0, description="Seconds a request may wait in the queue before it is dropped (504)"
    )
    job_ttl: float = Field(default=3600.0, gt=0, description="Seconds a finished job stays visible in the jobs API")
    max_jobs_kept: int = Field(default=1000, ge=0, description="Finished jobs kept at most")
    allow_webhooks: bool = Field(default=False, description="Let jobs POST their result to a client-chosen URL")
    webhook_attempts: int = Field(default=3, ge=1, le=10, description="Delivery attempts per webhook")
    # Access and hardening
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("api_keys", "api_key", "SDSERVER_API_KEY", "SDSERVER_API_KEYS"),
        description="Require Authorization: Bearer KEY (repeat for several keys); none: no auth",
        json_schema_extra={"flag": "api-key"},
    )
    api_auth: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Also accept HTTP Basic user:pass (A1111 clients; repeatable)"
    )
    open_original_api: bool = Field(
        default=False, description="Keep the original API's routes open when API keys are set"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Allow browser pages from this origin, e.g. http://host:port (repeatable)",
        json_schema_extra={"flag": "cors-origin"},
    )
    max_body_mb: float = Field(default=32.0, gt=0, description="Largest request body in MB; past it 413")
    drain_timeout: float = Field(
        default=30.0, ge=0, description="On SIGTERM or Ctrl-C, seconds to finish queued and running work"
    )

    @field_validator(
        "cors_origins", "preload", "allowed_hosts", "webhook_allowed_hosts", "compile_sizes", mode="before"
    )
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

    limits: Limits = Field(default_factory=Limits, description="Caps on what one request may ask for")

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
        'folder or hub id per family that lends them, e.g. {"flux": "black-forest-labs/FLUX.1-dev"} '
        "(config.json, or SDSERVER_ENCODERS as JSON)",
        json_schema_extra={"cli": False},
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
    image_url_ttl: float = Field(
        default=3600.0, gt=0, description="Seconds an OpenAI response_format=url image stays downloadable"
    )
    image_url_max_mb: float = Field(
        default=512.0, gt=0, description="MB of memory for those images; past it the oldest go first"
    )

    # Logging (issue 11)
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level")
    log_format: Literal["auto", "text", "json"] = Field(
        default="auto",
        description="auto: readable on a terminal, one plain line per record otherwise; json: one JSON object a line",
    )

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

    # Speed and memory (issue 15): resolved for the device by engine/speed.py; "auto" picks by what is known
    channels_last: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Keep the UNet and VAE weights in channels-last layout (faster convolutions on NVIDIA tensor "
        "cores); auto: on with CUDA",
    )
    fuse_qkv: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Fuse each attention's query/key/value projections into one matmul where the model allows "
        "(undone for a model once a LoRA is used on it); auto: on with CUDA",
    )
    tf32: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="TF32 matmuls for float32 work (NVIDIA Ampere and newer only); auto: on where supported",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile the denoiser's repeated blocks and the VAE decoder, for the sizes in "
        "compile_sizes, before /ready says ready (start-up takes longer; other sizes run uncompiled)",
    )
    compile_sizes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="WIDTHxHEIGHT sizes compiled at start-up, comma-separated (default: each loaded model's "
        "native size)",
    )
    offload: Literal["auto", "none", "model", "sequential"] = Field(
        default="auto",
        description="Keep weights in CPU memory and move them to the GPU as needed: model = one model at a "
        "time, sequential = one layer at a time (slowest, least memory); auto: chosen per model from its size "
        "and the free GPU memory at load",
    )
    vae_tiling: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Decode images in overlapping tiles (bounded memory); auto: above vae_tile_megapixels, or "
        "when the memory estimate says one image would not fit",
    )
    vae_tile_megapixels: float = Field(
        default=4.2, gt=0, description="With vae_tiling auto, images larger than this many megapixels decode tiled"
    )
    attention_slicing: Literal["auto", "on", "off"] = Field(
        default="auto", description="Compute attention in slices to save memory; auto: on with Apple MPS"
    )
    quantize: Literal["none", "int8", "fp8"] = Field(
        default="none",
        description="Store the denoiser's linear weights in 8 bits (torchao weight-only; needs `pip install "
        "torchao`; fp8 needs an NVIDIA Ada/Hopper GPU): about half the memory of fp16 for FLUX and SD 3.5",
    )
    memory_limit_gb: float | None = Field(
        default=None,
        gt=0,
        description="Device memory sdserver may use in all, weights and work (CUDA: a hard cap on torch's "
        "allocator, e.g. to share a card or to simulate a smaller one); default: all the device has",
    )

    @field_validator("compile_sizes")
    @classmethod
    def _sizes(cls, value: list[str]) -> list[str]:
        for size in value:
            parse_size(size)
        return value

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


def parse_size(text: str) -> tuple[int, int]:
    """(width, height) from "WIDTHxHEIGHT"; ValueError naming the text otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if match is None or int(match[1]) % 8 or int(match[2]) % 8 or not int(match[1]) or not int(match[2]):
        raise ValueError(f"size {text!r} must be WIDTHxHEIGHT in pixels, multiples of 8, e.g. 1024x1024")
    return int(match[1]), int(match[2])


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
        settings = Settings(**given)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "config"
        reason = error["msg"].removeprefix("Value error, ")
        raise ConfigError(f"invalid setting {where} (from flags, environment or {path}): {reason}") from None
    finally:
        _file_values.reset(token)
    _check_paths(settings)
    return settings


def _check_paths(settings: Settings) -> None:
    """Local paths that do not exist: found now, before anything heavy is imported or loaded."""
    model = settings.model
    if model and model != DEMO_MODEL and looks_like_path(model) and not Path(model).expanduser().exists():
        kind = "file" if Path(model).suffix.lower() in SINGLE_FILE_SUFFIXES else "file or folder"
        raise ConfigError(f"model {model!r}: no such {kind}")
    for name in ("models_dir", "loras_dir", "upscalers_dir", "controlnet_dir", "embeddings_dir"):
        folder = getattr(settings, name)
        if folder is not None and not Path(folder).expanduser().is_dir():
            raise ConfigError(f"{name} {folder!r} is not a folder")
