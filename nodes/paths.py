"""Every file name and prefix the pack's nodes take, checked by one rule before any node runs.

ComfyUI validates a whole prompt before it executes a node: a V3 node's `validate_inputs` classmethod is
called then with the constant widget values (an input fed by a link arrives as None, its value is not
known yet), and a string it returns fails the prompt with that message. So a bad Save PaRa prefix is
refused before the trainer upstream of it starts, not after hours of training.

* `filename_prefix` (Save PaRa, Train PaRa's `save_every` files): one rule, one message, one limit, in
  `prefix_problem` / `resolve_prefix`.
* PaRa file names (Load PaRa, Load PaRa File): `para_options` is what their list offers (a placeholder
  when there is no file yet, so the front end never shows `undefined`), `para_name_problem` refuses the
  placeholder and names a file that is not there.
* Train PaRa also refuses to start when a Save PaRa fed by it has a prefix this rule refuses (ComfyUI
  still runs the valid outputs of a prompt whose Save PaRa failed validation; the PaRa would be lost).
"""
from __future__ import annotations

import os
import re

import folder_paths

from . import folders

MAX_PREFIX_BYTES = 200
"""At most 200 bytes (UTF-8) in a prefix: its last part plus the longest suffix the pack appends
(`_<step>_steps_NNNNN_.safetensors.para_state`, about 45 bytes) stays within the 255-byte file name limit
of ext4, APFS and NTFS."""

NO_FILE = "no PaRa file yet (put one in models/para)"
"""The only entry of a PaRa file list while there is no file: never a real file name (no .safetensors)."""

EXAMPLE = "para/my_subject"

_CHECKPOINT = re.compile(r"(?P<run>.*)_(?P<step>\d+)_steps_(?P<n>\d{5,})_\.safetensors")


# ---- filename_prefix -----------------------------------------------------------------------------
def prefix_problem(prefix) -> str:
    """'' if `prefix` is a usable filename_prefix, else why not (a short clause).

    The rule: a relative path of plain names under the output folder ('para/my_subject'): not empty, no
    NUL, not absolute, no empty part, '.' or '..' between the slashes, at most MAX_PREFIX_BYTES bytes.
    """
    if not isinstance(prefix, str) or not prefix.strip():
        return "it is empty"
    if "\0" in prefix:
        return "it contains a NUL character"
    size = len(prefix.encode("utf-8", "surrogatepass"))
    if size > MAX_PREFIX_BYTES:
        return f"it is {size} bytes long (at most {MAX_PREFIX_BYTES})"
    if os.path.isabs(prefix) or prefix.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", prefix):
        return "it is an absolute path"
    if any(p in (".", "..") or not p.strip() for p in re.split(r"[/\\]", prefix)):
        return "every part between slashes must be a plain name (no empty part, '.' or '..')"
    return ""


def prefix_message(node: str, prefix, why: str) -> str:
    """The one line every node shows for a refused prefix."""
    shown = prefix if not isinstance(prefix, str) or len(prefix) <= 80 else prefix[:77] + "..."
    return (f"{node}: filename_prefix {shown!r} cannot be used: {why}; use a relative path under the output "
            f"folder such as '{EXAMPLE}' (plain names, at most {MAX_PREFIX_BYTES} bytes)")


def resolve_prefix(node: str, prefix: str, out_dir: str) -> tuple[str, str, str]:
    """(folder, file name stem, subfolder) of a valid prefix under `out_dir`; ValueError (one line) otherwise."""
    why = prefix_problem(prefix)
    if why:
        raise ValueError(prefix_message(node, prefix, why))
    parts = re.split(r"[/\\]", prefix)
    return os.path.join(out_dir, *parts[:-1]), parts[-1], "/".join(parts[:-1])


def validate_prefix(node: str, prefix) -> bool | str:
    """For `validate_inputs`: True, or the message. A linked input (None here) is checked when it runs."""
    if isinstance(prefix, (list, tuple)):  # is_input_list nodes get lists
        for p in prefix:
            r = validate_prefix(node, p)
            if r is not True:
                return r
        return True
    if prefix is None:
        return True
    why = prefix_problem(prefix)
    return prefix_message(node, prefix, why) if why else True


def bad_save_downstream(prompt, node_id) -> str:
    """'' or the message for the first Save PaRa fed (directly or through other nodes) by node `node_id` of
    the API prompt whose constant filename_prefix the rule refuses."""
    if not isinstance(prompt, dict) or node_id is None:
        return ""
    users: dict[str, list[str]] = {}
    for nid, node in prompt.items():
        for v in (node.get("inputs") or {}).values() if isinstance(node, dict) else ():
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], (str, int)):
                users.setdefault(str(v[0]), []).append(str(nid))
    seen, todo = set(), [str(node_id)]
    while todo:
        for nid in users.get(todo.pop(), []):
            if nid in seen:
                continue
            seen.add(nid)
            todo.append(nid)
            node = prompt.get(nid, {})
            prefix = (node.get("inputs") or {}).get("filename_prefix")
            if node.get("class_type") == "PaRaSave" and isinstance(prefix, str) and prefix_problem(prefix):
                return f"Save PaRa (node {nid}) cannot save what this node trains: " + \
                    prefix_message("Save PaRa", prefix, prefix_problem(prefix))[len("Save PaRa: "):]
    return ""


# ---- PaRa file lists -------------------------------------------------------------------------------
def _order(name: str):
    """Final files first (by name); then the trainer's `<run>_<step>_steps_NNNNN_` checkpoints, per run the
    newest step first."""
    m = _CHECKPOINT.fullmatch(name.replace("\\", "/").rsplit("/", 1)[-1])
    if m is None:
        return (0, name.lower(), 0, "")
    folder = name[: len(name) - len(m.group(0))]
    return (1, (folder + m.group("run")).lower(), -int(m.group("step")), m.group("n"))


def para_files() -> list[str]:
    """The files of the `para` folders in the order the lists show them (see _order)."""
    return sorted(folder_paths.get_filename_list(folders.FOLDER), key=_order)


def para_options() -> list[str]:
    """What Load PaRa / Load PaRa File offer: the files, or NO_FILE when there is none."""
    return para_files() or [NO_FILE]


def para_name_problem(node: str, name) -> bool | str:
    """For `validate_inputs` of a para_name combo: True, or one line naming the file and the folders."""
    if name is None:  # fed by a link: checked when the node runs
        return True
    where = ", ".join(folder_paths.get_folder_paths(folders.FOLDER))
    if name == NO_FILE:
        return (f"{node}: no PaRa file chosen: put a .safetensors PaRa file in one of {where} (or train one with "
                "Train PaRa + Save PaRa), then refresh the node definitions (press R) and pick it")
    if name not in folder_paths.get_filename_list(folders.FOLDER):
        return f"{node}: PaRa file '{name}' not found in the para folders: {where}"
    return True
