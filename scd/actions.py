"""Actions as people write them: a comma list or a file of names or indices, and the sidecar
`<clip>.actions.txt` that gives a video's own actions, one per frame.

Action j is the one taken on the way into frame j (the references' convention); the model's
null index (`num_classes`) means no action and is also spelled `none`.
"""

from __future__ import annotations

from pathlib import Path

from scd.errors import ActionError

SIDECAR_SUFFIX = ".actions.txt"


def parse_actions(spec: str | Path | None, names: tuple[str, ...], num_classes: int) -> list[int] | None:
    """Actions from a comma list ("up,up,left,2") or a file (one per line or comma separated; `#`
    comments). Names are the model's action names (case-insensitive); indices 0..num_classes, where
    num_classes itself is the null action ("none" also names it)."""
    if spec is None:
        return None
    text = str(spec)
    path = Path(text)
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # not a usable path (e.g. a NUL byte): read it as a list
        is_file = False
    where = ""
    if ("," not in text and path.suffix and "\x00" not in text) or is_file:
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not an action
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ActionError(f"cannot read action file {path}: {err}") from None
        where = f" in {path}"
    lookup = {name.lower(): i for i, name in enumerate(names)}
    lookup.update({"none": num_classes, "null": num_classes, "noop": num_classes})
    actions = []
    for line in text.splitlines():
        for item in line.split("#", 1)[0].split(","):
            item = item.strip().lower()
            if not item:
                continue
            if item.isascii() and item.lstrip("-").isdigit():
                index = int(item)
                if not 0 <= index <= num_classes:
                    raise ActionError(f"action index {index}{where} is out of range 0..{num_classes} ({num_classes} = none)")
                actions.append(index)
            elif item in lookup:
                actions.append(lookup[item])
            else:
                known = ", ".join(list(names) + ["none"]) or f"indices 0..{num_classes}"
                raise ActionError(f"unknown action {item!r}{where}: this model knows {known}")
    if not actions:
        raise ActionError(f"no actions found in {spec!r}")
    return actions


def sidecar_path(video: str | Path) -> Path:
    """Where the actions of `video` live: `clip.mp4` -> `clip.actions.txt`."""
    return Path(video).with_suffix(SIDECAR_SUFFIX)


def read_sidecar(video: str | Path, names: tuple[str, ...], num_classes: int) -> list[int] | None:
    """The actions listed beside `video`, or None when it has no sidecar file."""
    path = sidecar_path(video)
    if not Path(video).is_file() or not path.is_file():
        return None
    return parse_actions(path, names, num_classes)


def format_actions(actions: list[int], names: tuple[str, ...], num_classes: int) -> str:
    """A file `parse_actions` reads back: one action per line, by name where the model has names."""
    def name(index: int) -> str:
        if index == num_classes:
            return "none"
        return names[index] if index < len(names) else str(index)
    return "".join(f"{name(int(a))}\n" for a in actions)


def parse_label(spec: str | int | None, names: tuple[str, ...], num_classes: int,
                condition: str | None) -> int | None:
    """A class-conditioned model's class: an index 0..num_classes-1 or one of the model's class
    names (case-insensitive). Refused for a model that takes no class label."""
    if spec is None:
        return None
    if condition != "label":
        raise ActionError("label is for class-conditioned models and this one has no classes: drop it" +
                          (" (it is steered by actions)" if condition == "action" else ""), parameter="label")
    text = str(spec).strip()
    if text.isascii() and text.lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < num_classes:
            raise ActionError(f"label {index} is out of range: this model has classes 0..{num_classes - 1}",
                              parameter="label")
        return index
    lookup = {name.lower(): i for i, name in enumerate(names)}
    if text.lower() not in lookup:
        known = f"one of {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}" if names else "an index"
        raise ActionError(f"unknown label {text!r}: give {known} (0..{num_classes - 1})", parameter="label")
    return lookup[text.lower()]
