"""Where model weights live and how they are named: the Hugging Face cache open_clip downloads
into, what is in it, fetching once, failing in seconds without network, and content hashes.

open_clip fetches a pretrained tag through huggingface_hub, which on a machine without network
retries for about a minute and then fails with a message that names no file. So before open_clip
is asked, `local_weights` looks in the cache; a file that is there is loaded from its path (no
request at all), and a file that is not is fetched only when the hub answers a 3-second probe,
else one message says what the probe met (a name that does not resolve, a refused connection,
silence), the offline ways out (`piaa demo`, `--model shapesworld`, `--pretrained PATH`), the
file, the cache folder and `piaa models fetch`.

A checkpoint file given by path is recorded by its sha256 (computed once per path, size and
mtime, remembered in `$PIAA_HOME/weights-sha256.json`), so a library accepts the same bytes at a
new path and refuses different bytes at any path.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from piaa_index.config import default_home
from piaa_index.durable import write_bytes_atomic
from piaa_index.errors import PiaaError
from piaa_index.layout import WEIGHT_HASHES, Layout

PROBE_TIMEOUT_S = 3.0
HASH_CACHE = WEIGHT_HASHES  # <home>/weights-sha256.json
_TRUE = {"1", "on", "yes", "true"}
_CHUNK = 1 << 20


class WeightsUnavailable(PiaaError):
    """The weights are not in the cache and cannot be downloaded here (exit 1)."""


def hub_cache() -> Path:
    """The folder huggingface_hub (and so open_clip) downloads into, as it decides it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def url_cache() -> Path:
    """open_clip's folder for weights it downloads by URL (tags with no Hugging Face repo)."""
    return Path.home() / ".cache" / "clip"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


@dataclass(frozen=True)
class Source:
    """Where open_clip gets the weights of one (model, tag)."""

    model: str
    tag: str
    repo_id: str | None  # Hugging Face repository
    filenames: tuple[str, ...]  # in the order open_clip tries them (safetensors first)
    url: str | None  # a direct download, for tags with no repository

    def describe(self) -> str:
        if self.repo_id:
            return f"{' or '.join(self.filenames)} from the Hugging Face repository {self.repo_id}"
        return f"{self.url}"

    def cache_folder(self) -> Path:
        if self.repo_id:
            return hub_cache() / ("models--" + self.repo_id.replace("/", "--"))
        return url_cache()


def source_for(model: str, tag: str) -> Source:
    """The download source of an open_clip (model, tag); imports open_clip."""
    from open_clip import pretrained as oc_pretrained

    cfg = oc_pretrained.get_pretrained_cfg(model, tag)
    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)
        filename = filename or oc_pretrained.HF_WEIGHTS_NAME
        safe = tuple(oc_pretrained._get_safe_alternatives(filename))
        return Source(model, tag, repo_id, (*safe, filename), None)
    return Source(model, tag, None, (), cfg.get("url") or None)


def cached_file(src: Source) -> Path | None:
    """The weights file if it is in the cache, without any network request."""
    if src.repo_id:
        from huggingface_hub import try_to_load_from_cache

        for name in src.filenames:
            found = try_to_load_from_cache(src.repo_id, name, cache_dir=str(hub_cache()))
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
        return None
    if src.url:
        path = url_cache() / os.path.basename(src.url)
        return path if path.is_file() else None
    return None


def endpoint_answers(
    url: str | None = None, timeout: float = PROBE_TIMEOUT_S, problems: list[str] | None = None
) -> bool:
    """True when the hub (or `url`) answers an HTTP request at all within `timeout` seconds;
    when it does not, what went wrong is appended to `problems` (as `probe_problem` says it)."""
    target = url or hub_endpoint()
    try:
        request = urllib.request.Request(target, method="HEAD")
        with urllib.request.urlopen(request, timeout=timeout):  # noqa: S310 - http(s) only
            return True
    except urllib.error.HTTPError:
        return True  # an answer, even 404 or 401, means the network is there
    except (OSError, ValueError) as exc:  # refused, unreachable, timed out, DNS, a malformed URL
        if problems is not None:
            problems.append(probe_problem(target, exc, timeout))
        return False


def probe_problem(url: str, exc: BaseException, timeout: float) -> str:
    """What happened to a request to `url`, truthfully: "cannot reach HOST: REASON" (a name that
    does not resolve and a refused connection fail at once; only a silent server times out)."""
    host = urllib.parse.urlsplit(url).netloc or url
    reason: object = getattr(exc, "reason", None) or exc  # URLError wraps the socket's error
    if isinstance(reason, TimeoutError):  # socket.timeout is TimeoutError
        return f"no answer from {host} in {timeout:g} s"
    if isinstance(reason, socket.gaierror):
        why = f"the name does not resolve ({reason.strerror or reason})"
    elif isinstance(reason, OSError):
        why = reason.strerror or str(reason) or type(reason).__name__
    else:
        why = str(reason) or type(reason).__name__
    return f"cannot reach {host}: {why}"


OFFLINE_WAYS_OUT = (
    "without network, `piaa demo` or `piaa index DIR --model shapesworld` (the model shipped "
    "with piaa) work now, or --pretrained PATH to a checkpoint on this machine"
)


def unavailable_message(src: Source, why: str) -> str:
    """One line: what is missing and why, the offline ways out, and how to get the weights."""
    return (
        f"the {src.model} weights '{src.tag}' are not on this machine and cannot be downloaded "
        f"({why}); {OFFLINE_WAYS_OUT}. To get these weights: run "
        f"`piaa models fetch {src.model} {src.tag}` on a machine with network and copy the "
        f"folder {src.cache_folder().name} from its cache into {src.cache_folder().parent} "
        f"here (HF_HUB_CACHE / HF_HOME), or download {src.describe()} and pass "
        "--pretrained PATH to it"
    )


# The default model's source, known without importing open_clip (and torch with it: several
# seconds), so that an offline machine hears at once that its weights are missing. A test
# checks it against open_clip's own table.
KNOWN_SOURCES = {
    ("ViT-B-16", "openai"): Source(
        "ViT-B-16",
        "openai",
        "timm/vit_base_patch16_clip_224.openai",
        ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
        None,
    ),
}


def check_before_loading(model: str, tag: str) -> None:
    """Fail at once, before torch is imported, when the default model's weights are neither
    cached nor downloadable; any other (model, tag) is checked by `local_weights` later."""
    if tag == "default" and model == "ViT-B-16":
        tag = "openai"
    src = KNOWN_SOURCES.get((model, tag))
    if src is not None and cached_file(src) is None:
        _require_download(src)


def _require_download(src: Source) -> None:
    """WeightsUnavailable, at once, when `src` cannot be downloaded here: HF_HUB_OFFLINE is set
    or its server does not answer a short probe."""
    if hub_offline():
        raise WeightsUnavailable(unavailable_message(src, "HF_HUB_OFFLINE is set"))
    where = hub_endpoint() if src.repo_id else src.url
    problems: list[str] = []
    if not endpoint_answers(where, problems=problems):
        why = problems[0] if problems else f"no answer from {where}"
        raise WeightsUnavailable(unavailable_message(src, why))


def local_weights(model: str, tag: str) -> Path | None:
    """The cached weights file of (model, tag); None when it is not cached and the hub
    answers (open_clip then downloads it); WeightsUnavailable, at once, when it cannot."""
    src = source_for(model, tag)
    found = cached_file(src)
    if found is not None:
        return found
    _require_download(src)
    return None


def fetch(model: str, tag: str) -> Path:
    """Download the weights of (model, tag) into the cache open_clip reads, once."""
    from open_clip import pretrained as oc_pretrained

    found = local_weights(model, tag)
    if found is not None:
        return found
    cfg = oc_pretrained.get_pretrained_cfg(model, tag)
    try:
        target = oc_pretrained.download_pretrained(cfg, cache_dir=None)
    except Exception as exc:  # huggingface_hub and urllib raise many kinds
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsUnavailable(f"download of {model} '{tag}' failed: {first}") from None
    return Path(target)


SHIPPED_DIR = Path(__file__).resolve().parent / "assets" / "shapesworld"


def shipped_models() -> list[dict[str, Any]]:
    """The ShapesWorld models that ship inside the package (tests, demo, offline proof)."""
    out = []
    for model, filename in (
        ("shapesworld", "shapesworld.safetensors"),
        ("shapesworld-gap", "shapesworld-gap.safetensors"),
    ):
        path = SHIPPED_DIR / filename
        present = path.is_file()
        out.append(
            {
                "model": model,
                "tag": "default",
                "cached": present,
                "size": path.stat().st_size if present else None,
                "path": str(path) if present else None,
                "source": "shipped with piaa-index",
            }
        )
    return out


def list_models(everything: bool = False) -> list[dict[str, Any]]:
    """The shipped model and the open_clip weights in the cache (`everything`: every
    (model, tag) open_clip knows, cached or not), each with its path and size."""
    rows = [*shipped_models(), *cached_models()]
    return rows if everything else [r for r in rows if r["cached"]]


def cached_models() -> list[dict[str, Any]]:
    """Every (model, tag) open_clip knows, with where its file is cached (or null) and size."""
    import open_clip

    rows = []
    for model, tag in open_clip.list_pretrained():
        src = source_for(model, tag)
        found = cached_file(src)
        rows.append(
            {
                "model": model,
                "tag": tag,
                "cached": found is not None,
                "size": found.stat().st_size if found else None,
                "path": str(found) if found else None,
                "source": src.describe(),
            }
        )
    return rows


# ---- content hashes of checkpoint files ---------------------------------------------------------


def sha256_file(path: str | os.PathLike[str], home: Path | None = None) -> str:
    """sha256 of a file, hex; remembered by (path, size, mtime) so a 600 MB checkpoint is read
    once, not at every command. A file that changes gets a new size or mtime, so a new hash."""
    p = Path(path).resolve()
    st = p.stat()
    key = str(p)
    stamp = [st.st_size, st.st_mtime_ns]
    cache_path = Layout(home or default_home()).weight_hashes
    cache = _read_cache(cache_path)
    hit = cache.get(key)
    if isinstance(hit, list) and len(hit) == 3 and hit[:2] == stamp:
        return str(hit[2])
    digest = hashlib.sha256()
    with open(p, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    cache[key] = [*stamp, value]
    try:  # a cache we cannot write only costs time
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(cache, indent=1, sort_keys=True).encode("utf-8")
        # No fsync: a cache; a crash may lose it, and the checkpoint is hashed again.
        write_bytes_atomic(data, cache_path, unique=True, fsync=False)
    except OSError:
        pass
    return value


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
