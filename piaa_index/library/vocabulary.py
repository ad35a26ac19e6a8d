"""The vocabulary: the labels a user cares about, versioned in SQL, and their text prototypes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from piaa_index.catalog.store import VocabularyInfo
from piaa_index.config import DEFAULT_TEMPLATES
from piaa_index.errors import UserInputError
from piaa_index.library.part import Part
from piaa_index.query.language import normalize_label


class VocabularyEditor(Part):
    """Reads and changes the vocabulary; every change is a new version (tags become stale)."""

    def vocabulary(self) -> VocabularyInfo | None:
        return self.store.vocabulary()

    def labels(self) -> list[str]:
        vocab = self.store.vocabulary()
        return vocab.names if vocab else []

    def set_vocabulary(
        self, labels: Sequence[str], templates: Sequence[str] | None = None
    ) -> VocabularyInfo:
        """Replace the vocabulary (a new version; tags become stale)."""
        names = clean_labels(labels)
        if templates is None:
            current = self.store.vocabulary()
            templates = current.templates if current else default_templates()
        templates = list(templates)
        for template in templates:
            check_template(template)
        current = self.store.vocabulary()
        if current and current.names == names and current.templates == templates:
            return current
        return self.store.new_vocabulary(names, templates)

    def add_labels(self, labels: Sequence[str]) -> VocabularyInfo:
        current = self.labels()
        held = {normalize_label(x) for x in current}
        new = [x for x in clean_labels(labels) if normalize_label(x) not in held]
        return self.set_vocabulary(current + new)

    def remove_labels(self, labels: Sequence[str]) -> VocabularyInfo:
        """Remove labels, matched as queries match them (`normalize_label`: "dog" is "Dog")."""
        current = self.labels()
        gone = {normalize_label(x): x for x in clean_labels(labels)}
        held = {normalize_label(x) for x in current}
        unknown = [name for key, name in gone.items() if key not in held]
        if unknown:
            raise UserInputError(f"not in the vocabulary: {', '.join(unknown)}")
        return self.set_vocabulary([x for x in current if normalize_label(x) not in gone])

    def set_preset(self, name: str) -> VocabularyInfo:
        from piaa_index.library.presets import preset_classes

        try:
            classes = preset_classes(name)
        except ValueError as exc:
            raise UserInputError(str(exc)) from None
        return self.set_vocabulary(classes)

    def require_vocabulary(self) -> VocabularyInfo:
        vocab = self.store.vocabulary()
        if vocab is None or not vocab.labels:
            raise UserInputError(
                "the vocabulary is empty: set one with `piaa vocab set LABEL...` "
                "or `piaa vocab preset voc|coco|nus`"
            )
        return vocab

    def text_prototypes(self, vocab: VocabularyInfo) -> np.ndarray:
        """[C, d] text prototypes of the vocabulary's labels (per-label templates honoured)."""
        # One batched text pass per distinct template list (usually one for the whole vocabulary).
        protos = np.zeros((len(vocab.labels), self.encoder.dim), dtype=np.float32)
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, lb in enumerate(vocab.labels):
            groups.setdefault(tuple(lb.templates), []).append(i)
        for templates, rows in groups.items():
            names = [vocab.labels[i].name for i in rows]
            protos[rows] = self.encoder.text_prototypes(names, list(templates))
        # A concept taught from examples (`piaa teach`) has its examples' prototype instead.
        from piaa_index.library.teaching import taught_prototypes

        taught = taught_prototypes(self.store)
        for i, lb in enumerate(vocab.labels):
            proto = taught.get(normalize_label(lb.name))
            if proto is not None and proto.shape == (protos.shape[1],):
                protos[i] = proto
        return protos


def check_template(template: str) -> None:
    """A prompt template holds exactly one `{}` (where the label goes) and no other brace: the
    label is put in by plain replacement, so `{x}` would reach the model as literal text."""
    rest = template.replace("{}", "", 1)
    if "{}" not in template or "{" in rest or "}" in rest:
        raise UserInputError(
            f"prompt template {template!r} must hold exactly one '{{}}' (where the label goes) "
            "and no other braces, e.g. 'a photo of a {}.'"
        )


def default_templates() -> list[str]:
    return list(DEFAULT_TEMPLATES)


def clean_labels(labels: Sequence[str]) -> list[str]:
    """Whitespace-normalised labels, duplicates dropped as queries match labels (casefolded:
    "Straße" and "STRASSE" are one label), order kept."""
    seen: set[str] = set()
    out = []
    for raw in labels:
        name = " ".join(str(raw).split())
        if not name:
            raise UserInputError("empty label")
        if any(ch in name for ch in "()\"'&|!"):
            raise UserInputError(
                f"label {name!r} contains a character reserved by the query language"
            )
        key = normalize_label(name)  # the one matching rule, the query language's
        if key in {"and", "or", "not"}:
            raise UserInputError(f"{name!r} is a query operator, not a label")
        if key not in seen:
            seen.add(key)
            out.append(name)
    return out
