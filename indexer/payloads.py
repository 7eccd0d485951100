"""Changes to stored payloads: the one type every writer (the pipeline, captions, tags, deletes by path) hands the
stores, so that no one writes back a whole payload read earlier and loses what another process wrote meanwhile.

At the bottom of the dependency graph beside the errors: the pipeline (`indexer`) writes with it, the stores
(`retriever`) apply it. A payload's keys: `paths` (list[str], every file with these bytes), `width`, `height`,
`bytes`, `mtime`, `format`, `taken`; `blob` and `source_name` for images indexed from bytes; later `tags` (list[str])
and `captions` ({model identity: text}).

`taken` is when the picture was taken, in one comparable naive form, "YYYY-MM-DDTHH:MM:SS" (`TAKEN_FORMAT`): the EXIF
DateTimeOriginal as written by the camera (its local time, no zone), else the file's mtime in UTC, else (bytes, URLs)
the time of indexing in UTC. Strings of this form order as the times they name, so filters compare them as strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from indexer.errors import InvalidQuery

Payload = dict[str, Any]

LIST_FIELDS = ("paths", "tags")  # payload fields that hold a list of distinct strings
CAPTIONS_FIELD = "captions"  # {model identity: caption}
TAKEN_FIELD = "taken"  # when the picture was taken, TAKEN_FORMAT
TAKEN_FORMAT = "%Y-%m-%dT%H:%M:%S"


def taken_form(moment: datetime) -> str:
    """A datetime in the payload's `taken` form: aware ones converted to UTC, seconds kept, fractions dropped."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.strftime(TAKEN_FORMAT)


def parse_taken(text: str) -> str:
    """An ISO 8601 date or datetime (a filter bound) in the `taken` form; a date means its midnight.

    Raises InvalidQuery for anything else."""
    try:
        return taken_form(datetime.fromisoformat(str(text).strip()))  # a date alone parses as its midnight
    except ValueError:
        raise InvalidQuery(
            f"{text!r} is not an ISO 8601 date or datetime (e.g. 2021-06-01 or 2021-06-01T12:30:00)"
        ) from None


@dataclass(frozen=True)
class PayloadUpdate:
    """A change to some fields of one payload, applied by the store in one transaction (never a whole payload
    read earlier and written back, which would lose what another process wrote meanwhile).

    set:      fields to set to these values (a value of None removes the field)
    add:      list fields (`paths`, `tags`): values appended when not present yet, in the order given
    remove:   list fields: values removed where present
    captions: entries of the `captions` mapping to set ({model identity: caption}); other models' stay
    Order of application: set, remove, add, captions. An update that changes nothing writes nothing.
    """

    set: dict[str, Any] = field(default_factory=dict)
    add: dict[str, tuple[str, ...]] = field(default_factory=dict)
    remove: dict[str, tuple[str, ...]] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in (*self.add, *self.remove):
            if name not in LIST_FIELDS:
                raise InvalidQuery(f"payload field {name!r} is not a list field ({', '.join(LIST_FIELDS)})")
        for name in self.set:
            if name in (*self.add, *self.remove) or (name == CAPTIONS_FIELD and self.captions):
                raise InvalidQuery(f"payload field {name!r} is both set and changed in one update")

    def is_empty(self) -> bool:
        return not (self.set or self.add or self.remove or self.captions)

    def merged(self, other: PayloadUpdate) -> PayloadUpdate:
        """This update followed by other, as one (list values joined, later sets win)."""
        add = {name: tuple(dict.fromkeys((*self.add.get(name, ()), *values))) for name, values in other.add.items()}
        remove = {
            name: tuple(dict.fromkeys((*self.remove.get(name, ()), *values))) for name, values in other.remove.items()
        }
        return PayloadUpdate(
            set={**self.set, **other.set},
            add={**self.add, **add},
            remove={**self.remove, **remove},
            captions={**self.captions, **other.captions},
        )

    def apply(self, payload: Payload) -> Payload:
        """The reference semantics: the payload after this update (a new dict; `payload` is not changed)."""
        result = dict(payload)
        for name, value in self.set.items():
            if value is None:
                result.pop(name, None)
            else:
                result[name] = value
        for name, values in self.remove.items():
            if name in result:
                gone = set(values)
                result[name] = [value for value in result[name] if value not in gone]
        for name, values in self.add.items():
            current = list(result.get(name) or [])
            known = set(current)
            for value in values:
                if value not in known:
                    current.append(value)
                    known.add(value)
            result[name] = current
        if self.captions:
            result[CAPTIONS_FIELD] = {**(result.get(CAPTIONS_FIELD) or {}), **self.captions}
        return result


def merged_payload(stored: Payload, new: Payload) -> Payload:
    """What a point already stored keeps when the same image is written again without replacing it: its own fields,
    the new one's list values (paths, tags) it lacks, captions of other models, and fields it does not have."""
    update = PayloadUpdate(
        add={name: tuple(new[name]) for name in LIST_FIELDS if new.get(name)},
        captions={key: text for key, text in (new.get(CAPTIONS_FIELD) or {}).items()
                  if key not in (stored.get(CAPTIONS_FIELD) or {})},
        set={key: value for key, value in new.items()
             if key not in stored and key not in LIST_FIELDS and key != CAPTIONS_FIELD},
    )
    return update.apply(stored)
