"""Where data lives and which model to use: one place decides, from arguments then environment."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from piaa_index.errors import UsageError
from piaa_index.layout import Layout

DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = (
    "default"  # resolved per model: `openai` for ViT-B-16, the shipped file for shapesworld
)
DEFAULT_FRONT_END = "sclip"
FRONT_ENDS: tuple[str, ...] = ("clip", "sclip")
# SCLIP repairs the last block of web-trained CLIP for dense use; the shipped shapesworld model
# was trained with a token-level loss on its plain last-block patches, so it uses those.
MODEL_FRONT_END = {"shapesworld": "clip", "shapesworld-gap": "clip"}


def default_front_end(model: str) -> str:
    """The patch front-end a model uses unless the user picks one."""
    return MODEL_FRONT_END.get(model, DEFAULT_FRONT_END)


def default_home() -> Path:
    """`PIAA_HOME`, else the platform's per-user data folder."""
    env = os.environ.get("PIAA_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "piaa-index"
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home())) / "piaa-index"
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "piaa-index"


# The prompt templates a label's text prototype averages over (CLIP's ensemble, shortened):
# here, without torch, so text search's numpy tower and the vocabulary share one list.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "there is a {} in the scene.",
)


@dataclass(frozen=True)
class ModelSpec:
    """Which model, which weights, which patch front-end (cheap: no torch import)."""

    model: str = DEFAULT_MODEL
    pretrained: str = DEFAULT_PRETRAINED
    front_end: str = DEFAULT_FRONT_END

    def __post_init__(self) -> None:
        if self.front_end not in FRONT_ENDS:
            raise ValueError(
                f"unknown front-end {self.front_end!r}; choose one of: {', '.join(FRONT_ENDS)}"
            )


@dataclass(frozen=True)
class Settings:
    """Resolved locations and model choice for one library."""

    home: Path
    db_url: str
    model: str | None  # None: use what the index was made with (or the default for a new index)
    pretrained: str | None
    front_end: str | None
    device: str

    @property
    def layout(self) -> Layout:
        """The paths under `home` (`piaa_index.layout`)."""
        return Layout(self.home)

    @classmethod
    def resolve(
        cls,
        home: str | Path | None = None,
        db: str | None = None,
        model: str | None = None,
        pretrained: str | None = None,
        front_end: str | None = None,
        device: str | None = None,
    ) -> Settings:
        """Arguments win over environment variables, which win over defaults."""
        home_path = Path(home).expanduser() if home else default_home()
        db_url = db or os.environ.get("PIAA_DB") or f"sqlite:///{Layout(home_path).sqlite_file}"
        try:  # database drivers and URL rendering take text: bytes that are not UTF-8 crash them
            db_url.encode("utf-8")
        except UnicodeEncodeError:
            shown = db_url.encode("utf-8", "backslashreplace").decode("utf-8")
            raise UsageError(
                f"the database location {shown} is not valid UTF-8: "
                "choose a --db or --home whose name is UTF-8"
            ) from None
        return cls(
            home=home_path,
            db_url=db_url,
            model=model or os.environ.get("PIAA_MODEL") or None,
            pretrained=pretrained or os.environ.get("PIAA_PRETRAINED") or None,
            front_end=front_end or os.environ.get("PIAA_FRONT_END") or None,
            device=device or os.environ.get("PIAA_DEVICE") or "auto",
        )
